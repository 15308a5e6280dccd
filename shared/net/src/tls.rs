//! mTLS configuration. Internal hops require a client certificate from the
//! mesh CA and verify the server's name; the public gateway port may accept
//! clients without a certificate.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{NetError, ServerTls, HANDSHAKE_TIMEOUT};

/// Where a process finds its TLS material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The mesh CA certificate: trust anchor for peers in both directions.
    pub ca: PathBuf,
    /// This process's certificate chain (leaf first).
    pub cert: PathBuf,
    /// This process's private key.
    pub key: PathBuf,
}

impl TlsFiles {
    /// The layout written by [`crate::certs::generate_dev_certs`]:
    /// `dir/ca.pem`, `dir/{role}.pem`, `dir/{role}.key`.
    pub fn for_role(dir: impl AsRef<Path>, role: &str) -> Self {
        let dir = dir.as_ref();
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}.key")),
        }
    }

    /// Reads and parses all three files.
    pub fn load(&self) -> Result<TlsPems, NetError> {
        let ca = read(&self.ca, "CA certificate")?;
        let cert = read(&self.cert, "certificate")?;
        let key = read(&self.key, "private key")?;
        warn_if_key_exposed(&self.key);
        check_certs(&ca, "CA certificate", &self.ca.display().to_string())?;
        check_certs(&cert, "certificate", &self.cert.display().to_string())?;
        check_key(&key, &self.key.display().to_string())?;
        Ok(TlsPems { ca, cert, key })
    }
}

/// TLS material in memory (PEM). `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPems {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl fmt::Debug for TlsPems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPems")
            .field("ca", &"<pem>")
            .field("cert", &"<pem>")
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every client must present a certificate chaining to the CA (internal hops).
    Required,
    /// Clients may connect without a certificate; one that is presented must
    /// still chain to the CA (public gateway port).
    Optional,
}

impl TlsPems {
    /// Parses the PEMs, so a bad blob fails here with a clear message rather
    /// than later inside the TLS stack.
    pub fn validate(&self) -> Result<(), NetError> {
        check_certs(&self.ca, "CA certificate", "(in memory)")?;
        check_certs(&self.cert, "certificate", "(in memory)")?;
        check_key(&self.key, "(in memory)")
    }

    /// A server's TLS from these PEMs (never reloaded); fails on an unusable certificate, key or
    /// CA, or a key that does not match the certificate.
    pub fn server_config(&self, client_auth: ClientAuth) -> Result<ServerTls, NetError> {
        ServerTls::from_pems(self, client_auth)
    }

    /// Trusts only the mesh CA (no system roots), checks that the server's
    /// certificate is valid for `server_name`, and presents this identity.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        client_config_base(&self.ca, server_name)
            .identity(Identity::from_pem(&self.cert, &self.key))
    }
}

fn client_config_base(ca: &[u8], server_name: &str) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(server_name)
        .timeout(HANDSHAKE_TIMEOUT)
}

/// Server TLS for internal services, loaded once: client certificate required. (`serve`
/// watches its files instead: [`crate::TlsSource::watch`].)
pub fn server_tls(files: &TlsFiles) -> Result<ServerTls, NetError> {
    ServerTls::from_files(files, ClientAuth::Required)
}

/// Server TLS for the public gateway port, loaded once: TLS always, client certificate
/// optional (but verified against the CA when presented).
pub fn server_tls_client_auth_optional(files: &TlsFiles) -> Result<ServerTls, NetError> {
    ServerTls::from_files(files, ClientAuth::Optional)
}

/// Client config for internal hops: verifies `server_name` against the mesh CA
/// and presents this process's certificate.
pub fn client_tls(files: &TlsFiles, server_name: &str) -> Result<ClientTlsConfig, NetError> {
    Ok(files.load()?.client_config(server_name))
}

/// Client config without a client certificate (external clients of the
/// public gateway port). Still verifies the server against `ca`.
pub fn client_tls_without_identity(
    ca: &Path,
    server_name: &str,
) -> Result<ClientTlsConfig, NetError> {
    let pem = read(ca, "CA certificate")?;
    check_certs(&pem, "CA certificate", &ca.display().to_string())?;
    Ok(client_config_base(&pem, server_name))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, NetError> {
    std::fs::read(path).map_err(|source| NetError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn check_certs(pem: &[u8], what: &'static str, origin: &str) -> Result<(), NetError> {
    let err = |reason: String| NetError::Pem {
        what,
        origin: origin.to_string(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no \"BEGIN CERTIFICATE\" block found".into()));
    }
    Ok(())
}

fn check_key(pem: &[u8], origin: &str) -> Result<(), NetError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map(|_| ())
        .map_err(|e| NetError::Pem {
            what: "private key",
            origin: origin.to_string(),
            reason: format!("no usable PKCS#8, PKCS#1 or SEC1 private key ({e})"),
        })
}

#[cfg(unix)]
fn warn_if_key_exposed(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(path) {
        if md.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", md.permissions().mode() & 0o777),
                "private key is readable by other users");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_key_exposed(_: &Path) {}
