//! Fetching `http(s)://` image URLs for the OpenAI endpoint, only with `--allow-image-urls` (a
//! server that fetches URLs its callers choose can be pointed at internal addresses).
//!
//! One GET with `reqwest` (rustls on ring, HTTP/1.1), no redirects, no proxy from the environment,
//! bounded in time and size: a `Content-Length` over the limit is refused before the body is read,
//! and the body is read chunk by chunk and refused as soon as it passes the limit. HTTPS verifies the
//! server against the system's CA bundle (`SSL_CERT_FILE`, else the usual Linux locations).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls;

/// The whole fetch (connect, handshake, headers, body) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);
/// Connecting (TCP and TLS) must finish within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// The CA roots in `bundle` (a PEM file), else in the system's bundle (`SSL_CERT_FILE`, else the
/// usual Linux locations), or why there are none.
fn roots(bundle: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let path = match bundle {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .or_else(|| CA_BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()))
            .ok_or("no system CA bundle found for https image URLs (set SSL_CERT_FILE)")?,
    };
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert); // a bundle may hold certificates rustls cannot use
    }
    Ok(roots)
}

/// An HTTP client for image URLs, and why https URLs cannot be fetched (no CA bundle), if so.
pub struct Fetcher {
    client: reqwest::Client,
    no_https: Option<String>,
}

impl Fetcher {
    /// A client trusting the CAs in `bundle`, or the system's with `None`.
    pub fn new(bundle: Option<&Path>) -> Result<Fetcher, String> {
        let (roots, no_https) = match roots(bundle) {
            Ok(r) => (r, None),
            Err(e) => (rustls::RootCertStore::empty(), Some(e)),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .user_agent("vlm-mesh-gateway")
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", vlm_net::error_chain(&e)))?;
        Ok(Fetcher { client, no_https })
    }

    /// GETs `url` (http or https), refusing bodies over `max_bytes`.
    pub async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Bytes, String> {
        let fetch = async {
            let url = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
            if url.host_str().is_none() {
                return Err("the URL has no host".to_string());
            }
            self.get(url, max_bytes).await
        };
        match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
            Ok(r) => r.map_err(|e| format!("cannot fetch the image: {e}")),
            Err(_) => Err(format!(
                "cannot fetch the image: no complete answer within {FETCH_TIMEOUT:?}"
            )),
        }
    }

    async fn get(&self, url: reqwest::Url, max_bytes: usize) -> Result<Bytes, String> {
        match url.scheme() {
            "http" => {}
            "https" => {
                if let Some(why) = &self.no_https {
                    return Err(why.clone());
                }
            }
            other => return Err(format!("unsupported URL scheme {other:?} (http or https)")),
        }
        let (host, port) = (
            url.host_str().unwrap_or_default().to_string(),
            url.port_or_known_default().unwrap_or_default(),
        );
        let mut resp = self.client.get(url).send().await.map_err(|e| {
            if e.is_connect() {
                format!(
                    "cannot connect to {host}:{port}: {}",
                    vlm_net::error_chain(&e)
                )
            } else {
                vlm_net::error_chain(&e)
            }
        })?;
        if !resp.status().is_success() {
            return Err(format!("the server answered {}", resp.status()));
        }
        if resp.content_length().is_some_and(|n| n > max_bytes as u64) {
            return Err(too_large(max_bytes));
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| vlm_net::error_chain(&e))? {
            if body.len() + chunk.len() > max_bytes {
                return Err(too_large(max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        if body.is_empty() {
            return Err("the server sent an empty body".into());
        }
        Ok(body.freeze())
    }
}

fn too_large(max_bytes: usize) -> String {
    format!("the image is larger than {max_bytes} bytes")
}

/// GETs `url` (http or https) with the process's one [`Fetcher`] (the system's CAs), refusing
/// bodies over `max_bytes`.
pub async fn fetch_image(url: &str, max_bytes: usize) -> Result<Bytes, String> {
    static FETCHER: OnceLock<Result<Fetcher, String>> = OnceLock::new();
    match FETCHER.get_or_init(|| Fetcher::new(None)) {
        Ok(f) => f.fetch(url, max_bytes).await,
        Err(e) => Err(format!("cannot fetch the image: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-shot HTTP server on loopback that answers `response`; returns its URL and the
    /// request it received.
    async fn serve_once(response: Vec<u8>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/images/cat.png?x=1",
            listener.local_addr().unwrap()
        );
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "client closed before sending its request");
                req.extend_from_slice(&buf[..n]);
            }
            // The client may hang up early (oversized body): not this server's failure.
            let _ = s.write_all(&response).await;
            let _ = s.shutdown().await;
            String::from_utf8(req).unwrap()
        });
        (url, task)
    }

    #[tokio::test]
    async fn fetches_the_body_of_a_200() {
        let (url, server) =
            serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nPNG!!".to_vec()).await;
        let body = fetch_image(&url, 1024).await.unwrap();
        assert_eq!(&body[..], b"PNG!!");
        let req = server.await.unwrap();
        assert!(
            req.starts_with("GET /images/cat.png?x=1 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase().contains("host: 127.0.0.1:"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn refuses_errors_and_oversized_bodies() {
        let (url, _server) =
            serve_once(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec()).await;
        let e = fetch_image(&url, 1024).await.unwrap_err();
        assert!(e.contains("404"), "{e}");

        let mut big = b"HTTP/1.1 200 OK\r\ncontent-length: 2048\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 2048));
        let (url, _server) = serve_once(big).await;
        let e = fetch_image(&url, 1024).await.unwrap_err();
        assert!(e.contains("larger than 1024 bytes"), "{e}");

        // Nothing listens on the port of a listener that is gone.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch_image(&format!("http://127.0.0.1:{port}/a.png"), 1024)
            .await
            .unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");

        // No Content-Length (read to the end of the connection): refused once past the limit.
        let mut big = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'y', 4096));
        let (url, _server) = serve_once(big).await;
        let e = fetch_image(&url, 1024).await.unwrap_err();
        assert!(e.contains("larger than 1024 bytes"), "{e}");

        // Redirects are not followed (the target could be an internal address).
        let (url, _server) = serve_once(
            b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/x.png\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
        .await;
        let e = fetch_image(&url, 1024).await.unwrap_err();
        assert!(e.contains("302"), "{e}");

        let e = fetch_image("ftp://127.0.0.1/a.png", 1024)
            .await
            .unwrap_err();
        assert!(e.contains("unsupported URL scheme"), "{e}");
    }

    /// HTTPS: the server is verified against the given CA (and refused without it), and the body
    /// comes back as over http.
    #[tokio::test]
    async fn https_verifies_the_server_against_the_ca() {
        let pki = tempfile::tempdir().unwrap();
        vlm_net::certs::generate_dev_certs(pki.path(), &[]).unwrap();
        let files = vlm_net::TlsFiles::for_role(pki.path(), "gateway");
        let acceptor =
            vlm_net::HttpTlsAcceptor::new(&files, vlm_net::ClientAuth::Optional).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            // Two connections: the trusting client's, then the other's (refused in the handshake).
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tls.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&buf[..n]);
                }
                tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nJPEG")
                    .await
                    .unwrap();
                let _ = tls.shutdown().await;
            }
        });
        let url = format!("https://localhost:{port}/pic.jpg");
        let trusting = Fetcher::new(Some(&pki.path().join("ca.pem"))).unwrap();
        assert_eq!(&trusting.fetch(&url, 1024).await.unwrap()[..], b"JPEG");
        // Another CA: the server's certificate is not trusted.
        let other = tempfile::tempdir().unwrap();
        vlm_net::certs::generate_dev_certs(other.path(), &[]).unwrap();
        let wary = Fetcher::new(Some(&other.path().join("ca.pem"))).unwrap();
        let e = wary.fetch(&url, 1024).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        server.await.unwrap();
    }
}
