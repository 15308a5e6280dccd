//! Running a mesh service: the standard layers every service is wrapped in
//! ([`server_layers`]), and one call that adds the standard services, binds
//! TLS, and drains on shutdown.

use std::convert::Infallible;
use std::future::Future;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tower::layer::util::{Identity, Stack};
use tower::{Layer, ServiceBuilder};
use vlm_telemetry::GrpcServerTraceLayer;

use crate::{
    error_chain, health_and_reflection, reflection_v1alpha, server_builder, tls_incoming,
    AdmissionGate, AdmissionLayer, AllowedCallers, CallerRoleLayer, ChannelOptions, DeadlineLayer,
    NetError, ServerTls, StatusHygieneLayer,
};

/// [`server_layers`]' stack.
pub type ServerLayers = ServiceBuilder<
    Stack<
        AdmissionLayer,
        Stack<
            DeadlineLayer,
            Stack<
                CallerRoleLayer,
                Stack<StatusHygieneLayer, Stack<GrpcServerTraceLayer, Identity>>,
            >,
        >,
    >,
>;

/// The layers a mesh service is served behind, outermost first: a server span and the RPC
/// metrics for every call, continuing the caller's W3C trace (methods outside `vlm.v1` are
/// labelled `unknown`); bounded status messages, and INVALID_ARGUMENT for requests that are not
/// valid protobuf ([`StatusHygieneLayer`]); PERMISSION_DENIED for callers whose certificate's
/// role is not in `callers` ([`CallerRoleLayer`]: refused calls are traced and counted, but take
/// no admission slot); the caller's deadline, fixed from `grpc-timeout` as the call arrives;
/// admission through `gate` (slots, a bounded queue that waits at most until that deadline,
/// request bytes against the memory budget). `server_layers(gate, callers).service(svc)` is
/// ready for [`serve_grpc`].
pub fn server_layers(gate: AdmissionGate, callers: AllowedCallers) -> ServerLayers {
    ServiceBuilder::new()
        .layer(GrpcServerTraceLayer::serving(vlm_proto::METHOD_PATHS))
        .layer(StatusHygieneLayer)
        .layer(CallerRoleLayer::new(callers))
        .layer(DeadlineLayer)
        .layer(AdmissionLayer::new(gate))
}

/// Serves `service` (as it is: wrap it in [`server_layers`] for tracing,
/// deadlines and load shedding) plus health and reflection on an
/// already-bound `listener` until `shutdown` completes, then drains open calls.
///
/// Binding first (port 0 is fine) lets the caller learn the address and
/// announce it before serving; connections that arrive in between queue in
/// the listener. Each connection handshakes with `tls`'s material of the moment, so a reloaded
/// certificate serves new connections while open ones carry on. Health reports `S::NAME` and "" as SERVING from the start —
/// call this only once the service is ready — and NOT_SERVING as soon as
/// shutdown begins, so balancers stop routing new calls during the drain.
pub async fn serve_grpc<S, F>(
    listener: TcpListener,
    tls: Option<ServerTls>,
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
    serve_grpc_with_health_port(listener, None, tls, service, AllowedCallers::Any, shutdown).await
}

/// [`serve_grpc`], plus — when `health_listener` is given — a second port
/// without TLS that serves only `grpc.health.v1`, from the same reporter.
/// Server reflection answers only `callers` (the service's own `--allowed-callers`); health
/// answers everyone.
///
/// Kubernetes' gRPC probes cannot speak TLS, let alone present a client
/// certificate, so the kubelet cannot probe an mTLS port. The health port
/// tells nothing but serving status, and it keeps answering (NOT_SERVING)
/// while the main port drains, so readiness drops before the process exits.
pub async fn serve_grpc_with_health_port<S, F>(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    tls: Option<ServerTls>,
    service: S,
    callers: AllowedCallers,
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
    let (reporter, health, reflection) = health_and_reflection(S::NAME)?;
    let reflection = CallerRoleLayer::new(callers.clone()).layer(reflection);
    let reflection_v1alpha = CallerRoleLayer::new(callers).layer(reflection_v1alpha(S::NAME)?);
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
    let health_port = match health_listener {
        Some(l) => Some(spawn_health_port(l, health.clone())?),
        None => None,
    };
    tracing::info!(service = S::NAME, %addr, tls = tls.is_some(), "serving");
    let router = server_builder(None)?
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(service);
    let served = match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(incoming, tls), drain)
                .await
        }
        None => router.serve_with_incoming_shutdown(incoming, drain).await,
    }
    .map_err(|e| NetError::Serve {
        addr,
        reason: error_chain(&e),
    });
    if let Some((stop, task)) = health_port {
        let _ = stop.send(());
        let _ = task.await;
    }
    served
}

/// Serves `health` alone, without TLS, on `listener` until the returned
/// sender fires (or is dropped).
fn spawn_health_port<H>(
    listener: TcpListener,
    health: H,
) -> Result<(oneshot::Sender<()>, JoinHandle<()>), NetError>
where
    H: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let server = server_builder(None)?.add_service(health);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tracing::info!(%addr, "serving grpc.health.v1 without TLS (probe port)");
    let task = tokio::spawn(async move {
        let stop = async {
            let _ = stop_rx.await;
        };
        if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(%addr, error = %error_chain(&e), "probe port failed");
        }
    });
    Ok((stop_tx, task))
}
