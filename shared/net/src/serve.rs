//! Running a mesh service: one call that adds the standard services, binds
//! TLS, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;

use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::ServerTlsConfig;
use tonic_health::ServingStatus;

use crate::{
    error_chain, health_and_reflection, reflection_v1alpha, server_builder, ChannelOptions,
    NetError,
};

/// Serves `service` plus health and reflection on an already-bound
/// `listener` until `shutdown` completes, then drains open calls.
///
/// Binding first (port 0 is fine) lets the caller learn the address and
/// announce it before serving; connections that arrive in between queue in
/// the listener. Health reports `S::NAME` and "" as SERVING from the start —
/// call this only once the service is ready — and NOT_SERVING as soon as
/// shutdown begins, so balancers stop routing new calls during the drain.
pub async fn serve_grpc<S, F>(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    service: S,
    shutdown: F,
) -> Result<(), NetError>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    F: Future<Output = ()>,
{
    let (reporter, health, reflection) = health_and_reflection()?;
    let reflection_v1alpha = reflection_v1alpha()?;
    reporter
        .set_service_status(S::NAME, ServingStatus::Serving)
        .await;
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let opts = ChannelOptions::default();
    // serve_with_incoming ignores the builder's TCP options, so they are set
    // on the incoming stream instead.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(opts.tcp_keepalive);
    let drain = async move {
        shutdown.await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        reporter
            .set_service_status(S::NAME, ServingStatus::NotServing)
            .await;
    };
    tracing::info!(service = S::NAME, %addr, tls = tls.is_some(), "serving");
    server_builder(tls)?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, drain)
        .await
        .map_err(|e| NetError::Serve {
            addr,
            reason: error_chain(&e),
        })
}
