//! The client side of reloadable TLS: channels whose every new connection presents the current
//! certificate and trusts the current CA bundle of a [`TlsSource`]. tonic's `ClientTlsConfig` is
//! fixed when the endpoint is built, so these channels dial with a connector of their own
//! (`Endpoint::connect_with_connector_lazy`): TCP, then rustls with the source's current config
//! and the server name to verify.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::tls_source::TlsSource;
use crate::{endpoint, ChannelOptions, NetError};

/// How a client channel does TLS: a fixed tonic config, or a reloading source and the name the
/// server's certificate must carry.
#[derive(Debug, Clone)]
pub enum ClientTls {
    Fixed(ClientTlsConfig),
    Reloading {
        source: Arc<TlsSource>,
        server_name: String,
    },
}

impl From<ClientTlsConfig> for ClientTls {
    fn from(c: ClientTlsConfig) -> Self {
        ClientTls::Fixed(c)
    }
}

/// A channel to `url` that connects on first use and reconnects after failures (as
/// [`crate::connect_lazy`]), with `tls` (`None`: plaintext, `http://` only).
pub fn lazy_channel(
    url: &str,
    tls: Option<ClientTls>,
    opts: &ChannelOptions,
) -> Result<Channel, NetError> {
    match tls {
        None => Ok(endpoint(url, None, opts)?.connect_lazy()),
        Some(ClientTls::Fixed(c)) => Ok(endpoint(url, Some(c), opts)?.connect_lazy()),
        Some(ClientTls::Reloading {
            source,
            server_name,
        }) => {
            let bad = |reason: &str| NetError::Endpoint {
                url: url.to_string(),
                reason: reason.to_string(),
            };
            let rest = url
                .strip_prefix("https://")
                .ok_or_else(|| bad("TLS needs an https:// URL"))?;
            let name = ServerName::try_from(server_name.clone())
                .map_err(|e| bad(&format!("{server_name:?} is not a server name: {e}")))?;
            // tonic would refuse an https:// URI without its own TLS config: the endpoint dials
            // `http://` through our connector, which does the TLS, and keeps https as the origin.
            let origin: Uri = url.parse().map_err(|e| bad(&format!("{e}")))?;
            let ep = endpoint(&format!("http://{rest}"), None, opts)?.origin(origin);
            let connector = ReloadingConnector {
                source,
                server_name: name,
                keepalive: opts.tcp_keepalive.is_some(),
            };
            Ok(ep.connect_with_connector_lazy(connector))
        }
    }
}

/// Dials TCP, then TLS with the source's configuration of the moment.
#[derive(Clone)]
struct ReloadingConnector {
    source: Arc<TlsSource>,
    server_name: ServerName<'static>,
    keepalive: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for ReloadingConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("the URL has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or("the URL has no port")?;
            let tcp = dial(host, port, this.keepalive).await?;
            let config = this.source.current().client_config();
            let tls = TlsConnector::from(config)
                .connect(this.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// The first address of `host` that accepts, with the mesh's TCP options.
async fn dial(host: &str, port: u16, keepalive: bool) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_keepalive(keepalive)?;
        socket.set_nodelay(true)?;
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}
