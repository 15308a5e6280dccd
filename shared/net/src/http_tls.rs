//! TLS for the gateway's HTTP/1.1 port (the OpenAI-compatible endpoint): the same certificates,
//! reloading and client-auth policy as the gRPC port ([`ServerTls`]), with ALPN `http/1.1`.

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::{Alpn, ClientAuth, NetError, ServerTls, TlsFiles};

/// Accepts TLS connections for an HTTP/1.1 server.
#[derive(Debug, Clone)]
pub struct HttpTlsAcceptor {
    tls: ServerTls,
}

impl HttpTlsAcceptor {
    /// Server identity from `files`, loaded once; with [`ClientAuth::Optional`] a client
    /// certificate is not needed, but one that is presented must chain to the CA.
    pub fn new(files: &TlsFiles, client_auth: ClientAuth) -> Result<Self, NetError> {
        Ok(Self::from_server_tls(ServerTls::from_files(
            files,
            client_auth,
        )?))
    }

    /// With `tls`'s source: every new connection gets its material of the moment.
    pub fn from_server_tls(tls: ServerTls) -> Self {
        HttpTlsAcceptor { tls }
    }

    /// Runs the handshake, bounded in time.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.tls.accept(stream, Alpn::Http1).await
    }
}
