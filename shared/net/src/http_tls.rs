//! TLS for the gateway's HTTP/1.1 port (the OpenAI-compatible endpoint): the same certificates and
//! client-auth policy as the gRPC port, as a plain rustls acceptor, since tonic's TLS is only
//! reachable through its own server.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::{ClientAuth, NetError, TlsFiles};

/// Bounds a peer's handshake, as on the gRPC ports, so half-open connections cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections for an HTTP/1.1 server.
#[derive(Clone)]
pub struct HttpTlsAcceptor {
    inner: TlsAcceptor,
}

impl HttpTlsAcceptor {
    /// Server identity from `files`; with [`ClientAuth::Optional`] a client certificate is not
    /// needed, but one that is presented must chain to the CA.
    pub fn new(files: &TlsFiles, client_auth: ClientAuth) -> Result<Self, NetError> {
        let pems = files.load()?;
        let bad = |e: &dyn std::fmt::Display| NetError::TlsConfig(e.to_string());
        let certs = CertificateDer::pem_slice_iter(&pems.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|e| bad(&e))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&pems.ca) {
            roots.add(ca.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        );
        let verifier = match client_auth {
            ClientAuth::Required => verifier.build(),
            ClientAuth::Optional => verifier.allow_unauthenticated().build(),
        }
        .map_err(|e| bad(&e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(&e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| bad(&e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HttpTlsAcceptor {
            inner: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Runs the handshake, bounded in time.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.inner.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}
