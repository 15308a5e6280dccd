//! The server side of reloadable TLS: [`ServerTls`] is a source plus a client-auth policy, and
//! [`tls_incoming`] turns accepted TCP connections into TLS streams, each handshaking with the
//! configuration current when it arrived. tonic's own `ServerTlsConfig` is fixed at start, so the
//! gRPC servers are served from this stream instead (`serve_with_incoming`); tonic reads the
//! peer's certificates from it exactly as from its own TLS (`TlsConnectInfo`), so caller roles
//! and per-peer shares see the same identities.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::TcpIncoming;

use crate::tls_source::{Alpn, TlsSource};
use crate::{ClientAuth, NetError, TlsFiles, TlsPems};

/// Bounds a peer's handshake, so half-open connections cannot pile up on a server.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once before the accept loop waits for one to finish: a flood of
/// silent connections costs a bounded number of tasks, each ended by [`HANDSHAKE_TIMEOUT`].
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// A server's TLS: the identity to present (reloaded with its source) and whether clients must
/// present a certificate of the CA.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub source: Arc<TlsSource>,
    pub client_auth: ClientAuth,
}

impl ServerTls {
    pub fn new(source: Arc<TlsSource>, client_auth: ClientAuth) -> ServerTls {
        ServerTls {
            source,
            client_auth,
        }
    }

    /// Loaded once from `files`, not watched (tools, tests).
    pub fn from_files(files: &TlsFiles, client_auth: ClientAuth) -> Result<ServerTls, NetError> {
        Ok(ServerTls::new(TlsSource::load(files, None)?, client_auth))
    }

    /// From PEMs in memory, checked now.
    pub fn from_pems(pems: &TlsPems, client_auth: ClientAuth) -> Result<ServerTls, NetError> {
        Ok(ServerTls::new(TlsSource::from_pems(pems)?, client_auth))
    }

    /// An acceptor with the current material, for one new connection.
    pub fn acceptor(&self, alpn: Alpn) -> TlsAcceptor {
        TlsAcceptor::from(self.source.current().server_config(self.client_auth, alpn))
    }

    /// One handshake with the current material, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept(
        &self,
        stream: TcpStream,
        alpn: Alpn,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let acceptor = self.acceptor(alpn);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// The TLS connections of `tcp`, handshaken (h2) concurrently; failed handshakes are logged and
/// left out. Accepting stops, and the listener closes, when the returned stream is dropped (a
/// server that shuts down drops its incoming stream).
pub fn tls_incoming(
    mut tcp: TcpIncoming,
    tls: ServerTls,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel::<TlsStream<TcpStream>>(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = pending.clone().acquire_owned() => p.expect("never closed"),
            };
            let next = tokio::select! {
                _ = tx.closed() => return,
                next = tcp.next() => next,
            };
            let stream = match next {
                None => return,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                let peer = stream.peer_addr().ok();
                match tls.accept(stream, Alpn::H2).await {
                    Ok(s) => {
                        let _ = tx.send(s).await;
                    }
                    Err(e) => tracing::debug!(?peer, "TLS handshake failed: {e}"),
                }
                drop(permit);
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|s| s.map(Ok)))
}
