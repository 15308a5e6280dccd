//! TLS helpers for the certificate tests: a certificate directory laid out as Kubernetes mounts
//! a Secret (files are symlinks through `..data`, which is swapped atomically on every update),
//! and a raw TLS client that reports the certificate a server shows.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls;
use vlm_net::certs::DevPki;

/// A directory of certificates in the layout of a mounted Secret: `ca.pem` → `..data/ca.pem`,
/// `..data` → `..v<N>`. Each [`SecretDir::publish`] writes a new version and swaps `..data`
/// with one rename, as the kubelet does when cert-manager renews a certificate.
pub struct SecretDir {
    pub dir: PathBuf,
    version: u32,
}

impl SecretDir {
    /// Publishes `files` (name, contents) as the first version; `dir` must not hold them yet.
    pub fn create(dir: &Path, files: &[(String, Vec<u8>)]) -> SecretDir {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = SecretDir {
            dir: dir.to_path_buf(),
            version: 0,
        };
        s.publish(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        }
        s
    }

    /// Writes a new version holding `files` and points `..data` at it atomically.
    pub fn publish(&mut self, files: &[(String, Vec<u8>)]) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let version = self.dir.join(&name);
        std::fs::create_dir(&version).unwrap();
        for (file, data) in files {
            std::fs::write(version.join(file), data).unwrap();
            if file.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::Permissions::from_mode(0o600);
                std::fs::set_permissions(version.join(file), mode).unwrap();
            }
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }
}

/// Every file `up` and `ask` read from a dev PKI: `ca.pem` (= `ca`, e.g. a bundle of two CAs) and
/// each role's `.pem` and `.key`.
pub fn pki_files(pki: &DevPki, ca: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![("ca.pem".to_string(), ca.as_bytes().to_vec())];
    for leaf in &pki.leaves {
        files.push((
            format!("{}.pem", leaf.role),
            leaf.cert_pem.clone().into_bytes(),
        ));
        files.push((
            format!("{}.key", leaf.role),
            leaf.key_pem.clone().into_bytes(),
        ));
    }
    files
}

/// The serial (hex) and notAfter (unix seconds) of a PEM certificate's first block.
pub fn leaf_of_pem(pem: &[u8]) -> (String, i64) {
    let der = CertificateDer::from_pem_slice(pem).unwrap();
    let (not_after, serial) = vlm_net::tls_source::leaf_facts(&der).unwrap();
    (serial, not_after)
}

/// The certificate a fresh TLS connection to `addr` is shown: its serial, notAfter and names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub serial: String,
    pub not_after: i64,
    pub names: Vec<String>,
}

/// Connects to `addr` over TLS trusting only `ca_pem`, verifying `server_name`, offering `alpn`
/// and presenting `identity` (cert PEM, key PEM) if given; what the server showed, or why the
/// handshake failed.
pub async fn served_leaf(
    addr: &str,
    ca_pem: &[u8],
    server_name: &str,
    alpn: &[u8],
    identity: Option<(&[u8], &[u8])>,
) -> Result<Served, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    let tls = tokio::time::timeout(std::time::Duration::from_secs(30), connect)
        .await
        .map_err(|_| "TLS handshake timed out".to_string())??;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (not_after, serial) = vlm_net::tls_source::leaf_facts(&leaf).unwrap();
    let names = vlm_net::certs::certificate_names(&leaf).unwrap();
    Ok(Served {
        serial,
        not_after,
        names,
    })
}
