//! Fetching `http(s)://` image URLs for the OpenAI endpoint, only with `--allow-image-urls` (a
//! server that fetches URLs its callers choose can be pointed at internal addresses).
//!
//! One GET with `reqwest` (rustls on ring, HTTP/1.1), no redirects, no proxy from the environment,
//! bounded in time and size: a `Content-Length` over the limit is refused before the body is read,
//! and the body is read chunk by chunk and refused as soon as it passes the limit. HTTPS verifies the
//! server against the system's CA bundle (`SSL_CERT_FILE`, else the usual Linux locations).
//!
//! Addresses: unless allowed (`--allow-private-image-urls`), a URL whose host is, or resolves
//! only to, a loopback, private, link-local, shared (CGNAT), unspecified, multicast or broadcast
//! address is refused (server-side request forgery: `http://169.254.169.254/` is a cloud's
//! metadata service). Names are resolved by our resolver, which drops such addresses, so the
//! check and the connection use the same addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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

/// True for addresses a URL from a client may not make the gateway connect to: anything but
/// global unicast. IPv6 forms that carry an IPv4 address (mapped `::ffff:a.b.c.d`, compatible
/// `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged by that address; local-use
/// NAT64 (`64:ff9b:1::/48`), Teredo (`2001::/32`, whose server address is obfuscated),
/// site-local (`fec0::/10`), documentation (`2001:db8::/32`) and discard (`100::/64`) prefixes
/// are internal.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_internal_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link-local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site-local fec0::/10 (deprecated, still routed)
                || (s[0], s[1], s[2]) == (0x64, 0xff9b, 1) // local-use NAT64 64:ff9b:1::/48
                || (s[0], s[1]) == (0x2001, 0) // Teredo 2001::/32
                || (s[0], s[1]) == (0x2001, 0x0db8) // documentation 2001:db8::/32
                || (s[0], s[1], s[2], s[3]) == (0x100, 0, 0, 0) // discard 100::/64
        }
    }
}

/// The IPv4 address an IPv6 address stands for: IPv4-mapped, IPv4-compatible (`::a.b.c.d`, not
/// `::` or `::1`), well-known NAT64 (`64:ff9b::/96`) or 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
        return Some(low); // IPv4-compatible
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low); // NAT64
    }
    if s[0] == 0x2002 {
        let [a, b] = s[1].to_be_bytes();
        let [c, d] = s[2].to_be_bytes();
        return Some(Ipv4Addr::new(a, b, c, d)); // 6to4
    }
    None
}

fn is_internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || a == 0 // "this network"
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT) 100.64/10
}

/// The system resolver, keeping only the addresses the policy allows.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| !is_internal(a.ip()))
                .collect();
            if public.is_empty() && !all.is_empty() {
                return Err(format!(
                    "{host} resolves only to internal addresses ({}); refused (--allow-private-image-urls allows them)",
                    all.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ")
                )
                .into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// An HTTP client for image URLs, and why https URLs cannot be fetched (no CA bundle), if so.
pub struct Fetcher {
    client: reqwest::Client,
    no_https: Option<String>,
    allow_internal: bool,
}

impl Fetcher {
    /// A client trusting the CAs in `bundle`, or the system's with `None`; `allow_internal` lets
    /// URLs reach internal addresses (see the module docs).
    pub fn new(bundle: Option<&Path>, allow_internal: bool) -> Result<Fetcher, String> {
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
        let mut builder = reqwest::Client::builder();
        if !allow_internal {
            builder = builder.dns_resolver(PublicOnly);
        }
        let client = builder
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .user_agent("vlm-mesh-gateway")
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", vlm_net::error_chain(&e)))?;
        Ok(Fetcher {
            client,
            no_https,
            allow_internal,
        })
    }

    /// GETs `url` (http or https), refusing bodies over `max_bytes`.
    pub async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Bytes, String> {
        let fetch = async {
            let url = reqwest::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
            let Some(host) = url.host_str() else {
                return Err("the URL has no host".to_string());
            };
            // An address literal (IPv6 in brackets); a name is checked by the resolver.
            let ip = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .ok();
            if let Some(ip) = ip.filter(|ip| !self.allow_internal && is_internal(*ip)) {
                return Err(format!(
                    "{ip} is an internal address; refused (--allow-private-image-urls allows it)"
                ));
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

/// GETs `url` (http or https) with the process's [`Fetcher`] (the system's CAs) for this address
/// policy, refusing bodies over `max_bytes`.
pub async fn fetch_image(
    url: &str,
    max_bytes: usize,
    allow_internal: bool,
) -> Result<Bytes, String> {
    static PUBLIC: OnceLock<Result<Fetcher, String>> = OnceLock::new();
    static ANY: OnceLock<Result<Fetcher, String>> = OnceLock::new();
    let fetcher = if allow_internal { &ANY } else { &PUBLIC };
    match fetcher.get_or_init(|| Fetcher::new(None, allow_internal)) {
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
        let body = fetch_image(&url, 1024, true).await.unwrap();
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
        let e = fetch_image(&url, 1024, true).await.unwrap_err();
        assert!(e.contains("404"), "{e}");

        let mut big = b"HTTP/1.1 200 OK\r\ncontent-length: 2048\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'x', 2048));
        let (url, _server) = serve_once(big).await;
        let e = fetch_image(&url, 1024, true).await.unwrap_err();
        assert!(e.contains("larger than 1024 bytes"), "{e}");

        // Nothing listens on the port of a listener that is gone.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = fetch_image(&format!("http://127.0.0.1:{port}/a.png"), 1024, true)
            .await
            .unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");

        // No Content-Length (read to the end of the connection): refused once past the limit.
        let mut big = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'y', 4096));
        let (url, _server) = serve_once(big).await;
        let e = fetch_image(&url, 1024, true).await.unwrap_err();
        assert!(e.contains("larger than 1024 bytes"), "{e}");

        // Redirects are not followed (the target could be an internal address).
        let (url, _server) = serve_once(
            b"HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/x.png\r\ncontent-length: 0\r\n\r\n"
                .to_vec(),
        )
        .await;
        let e = fetch_image(&url, 1024, true).await.unwrap_err();
        assert!(e.contains("302"), "{e}");

        let e = fetch_image("ftp://127.0.0.1/a.png", 1024, true)
            .await
            .unwrap_err();
        assert!(e.contains("unsupported URL scheme"), "{e}");
    }

    #[test]
    fn internal_addresses_are_classified() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "::10.0.0.1",
            "::169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a00:1::",
            "2002:c0a8:101::5",
            "fec0::1",
            "feff::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(is_internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "::8.8.8.8",
            "64:ff9b::8.8.8.8",
            "2002:808:808::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_internal(ip.parse().unwrap()), "{ip}");
        }
    }

    /// Without the flag, a URL that names or resolves to an internal address is refused before
    /// any connection (the server would answer if it were asked).
    #[tokio::test]
    async fn internal_addresses_are_refused_unless_allowed() {
        let (url, _server) =
            serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nPNG!!".to_vec()).await;
        let e = fetch_image(&url, 1024, false).await.unwrap_err();
        assert!(e.contains("127.0.0.1 is an internal address"), "{e}");
        let by_name = url.replace("127.0.0.1", "localhost");
        let e = fetch_image(&by_name, 1024, false).await.unwrap_err();
        assert!(e.contains("resolves only to internal addresses"), "{e}");
        let e = fetch_image("http://[::1]:9/a.png", 1024, false)
            .await
            .unwrap_err();
        assert!(e.contains("internal address"), "{e}");
        assert_eq!(&fetch_image(&url, 1024, true).await.unwrap()[..], b"PNG!!");
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
        let trusting = Fetcher::new(Some(&pki.path().join("ca.pem")), true).unwrap();
        assert_eq!(&trusting.fetch(&url, 1024).await.unwrap()[..], b"JPEG");
        // Another CA: the server's certificate is not trusted.
        let other = tempfile::tempdir().unwrap();
        vlm_net::certs::generate_dev_certs(other.path(), &[]).unwrap();
        let wary = Fetcher::new(Some(&other.path().join("ca.pem")), true).unwrap();
        let e = wary.fetch(&url, 1024).await.unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        server.await.unwrap();
    }
}
