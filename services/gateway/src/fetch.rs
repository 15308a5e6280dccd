//! Fetching `http(s)://` image URLs for the OpenAI endpoint, only with `--allow-image-urls` (a
//! server that fetches URLs its callers choose can be pointed at internal addresses).
//!
//! One GET over HTTP/1.1, no redirects, bounded in time and size. HTTPS verifies the server
//! against the system's CA bundle (`SSL_CERT_FILE`, else the usual Linux locations).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// The whole fetch (connect, handshake, headers, body) must finish within this.
const FETCH_TIMEOUT: Duration = Duration::from_secs(20);

const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let path = std::env::var("SSL_CERT_FILE")
                .ok()
                .or_else(|| {
                    CA_BUNDLES
                        .iter()
                        .find(|p| std::path::Path::new(p).exists())
                        .map(|p| p.to_string())
                })
                .ok_or("no system CA bundle found for https image URLs (set SSL_CERT_FILE)")?;
            let pem = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
                let _ = roots.add(cert); // a bundle may hold certificates rustls cannot use
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
        .map(tokio_rustls::TlsConnector::from)
}

async fn get<S>(io: S, uri: &hyper::Uri, max_bytes: usize) -> Result<Bytes, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let host = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .header(hyper::header::USER_AGENT, "vlm-mesh-gateway")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("the server answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), max_bytes)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("the image is larger than {max_bytes} bytes")
            } else {
                e.to_string()
            }
        })?
        .to_bytes();
    if body.is_empty() {
        return Err("the server sent an empty body".into());
    }
    Ok(body)
}

/// GETs `url` (http or https), refusing bodies over `max_bytes`.
pub async fn fetch_image(url: &str, max_bytes: usize) -> Result<Bytes, String> {
    let fetch = async {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("the URL has no host")?.to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        if https {
            let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                .map_err(|e| e.to_string())?;
            let tls = tls_connector()?
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            get(tls, &uri, max_bytes).await
        } else {
            get(tcp, &uri, max_bytes).await
        }
    };
    match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(r) => r.map_err(|e| format!("cannot fetch the image: {e}")),
        Err(_) => Err(format!(
            "cannot fetch the image: no complete answer within {FETCH_TIMEOUT:?}"
        )),
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
    }
}
