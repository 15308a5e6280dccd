//! Client channels and server builders with the mesh's HTTP/2 settings.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};

use crate::{error_chain, NetError};

/// HTTP/2 and TCP settings for mesh channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Fail a connection attempt after this long, so retries can move to
    /// another replica instead of waiting on a dead address.
    pub connect_timeout: Duration,
    /// TCP keepalive, to notice peers that vanished without a FIN.
    pub tcp_keepalive: Option<Duration>,
    /// HTTP/2 PING interval while streams are open: a decode stream may be
    /// silent for a long prefill, and a dead peer must still be detected.
    pub http2_keepalive_interval: Duration,
    /// How long to wait for the PING ack before declaring the connection dead.
    pub http2_keepalive_timeout: Duration,
    /// Let HTTP/2 flow-control windows grow with the bandwidth-delay product;
    /// fixed 64 KiB windows throttle multi-megabyte tensor streams.
    pub http2_adaptive_window: bool,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            connect_timeout: Duration::from_secs(5),
            tcp_keepalive: Some(Duration::from_secs(30)),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            http2_adaptive_window: true,
        }
    }
}

/// Builds an endpoint for `url` (`https://host:port` with `tls`, or
/// `http://host:port` with `tls = None`).
///
/// The scheme must agree with `tls`: tonic silently skips TLS for an `http://`
/// URL even when a TLS config is set, which would downgrade a mesh hop to
/// plaintext, so that combination is an error here.
pub fn endpoint(
    url: &str,
    tls: Option<ClientTlsConfig>,
    opts: &ChannelOptions,
) -> Result<Endpoint, NetError> {
    let bad = |reason: &str| NetError::Endpoint {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let ep = Endpoint::from_shared(url.to_string()).map_err(|e| bad(&error_chain(&e)))?;
    let scheme = ep.uri().scheme_str().unwrap_or("");
    let ep = match (scheme, tls) {
        ("https", Some(tls)) => ep
            .tls_config(tls)
            .map_err(|e| NetError::TlsConfig(format!("{url}: {}", error_chain(&e))))?,
        ("http", None) => ep,
        ("http", Some(_)) => {
            return Err(bad(
                "TLS is configured but the URL is http://; use https://",
            ))
        }
        ("https", None) => return Err(bad("https:// needs a TLS configuration")),
        _ => return Err(bad("scheme must be http:// or https://")),
    };
    if ep.uri().host().is_none_or(str::is_empty) {
        return Err(bad("missing host"));
    }
    Ok(ep
        .connect_timeout(opts.connect_timeout)
        .tcp_keepalive(opts.tcp_keepalive)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(opts.http2_keepalive_interval)
        .keep_alive_timeout(opts.http2_keepalive_timeout)
        .http2_adaptive_window(opts.http2_adaptive_window))
}

/// Connects now; fails if the peer is unreachable or the handshake fails.
pub async fn connect(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, NetError> {
    endpoint(url, tls, &ChannelOptions::default())?
        .connect()
        .await
        .map_err(|e| NetError::Connect {
            url: url.to_string(),
            reason: error_chain(&e),
        })
}

/// Returns a channel that connects on first use and reconnects after
/// failures, so a service can start before its peers are up.
pub fn connect_lazy(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, NetError> {
    Ok(endpoint(url, tls, &ChannelOptions::default())?.connect_lazy())
}

/// Concurrent calls (HTTP/2 streams) one client connection may have open on a mesh server.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// A server builder with the mesh's HTTP/2 settings, and tonic's own (fixed) TLS if given; the
/// mesh's servers do TLS in their incoming stream instead ([`crate::tls_incoming`]), so that it
/// can be reloaded.
pub fn server_builder(tls: Option<tonic::transport::ServerTlsConfig>) -> Result<Server, NetError> {
    let opts = ChannelOptions::default();
    let builder = Server::builder()
        .tcp_nodelay(true)
        .tcp_keepalive(opts.tcp_keepalive)
        .http2_keepalive_interval(Some(opts.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(opts.http2_keepalive_timeout))
        .http2_adaptive_window(Some(opts.http2_adaptive_window))
        // One connection cannot open more calls than this at once (each waiting for its first
        // message costs a task and a buffer; see `Admission`).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    match tls {
        Some(tls) => builder
            .tls_config(tls)
            .map_err(|e| NetError::TlsConfig(error_chain(&e))),
        None => Ok(builder),
    }
}
