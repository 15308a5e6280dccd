//! The one way a role is served, once its service is built: bind and announce the ports (the
//! `listening` contract in the parent module's docs), wrap the generated server in the standard
//! stack (`vlm_net::server_layers`: trace, caller roles, deadline, admission) with the role's
//! message limit, and serve it, with health and reflection, until Ctrl-C or SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;
use vlm_decoder::DecoderService;
use vlm_encoder::EncoderService;
use vlm_gateway::GatewayService;
use vlm_projector::ProjectorService;
use vlm_proto::decoder_server::DecoderServer;
use vlm_proto::encoder_server::EncoderServer;
use vlm_proto::gateway_server::GatewayServer;
use vlm_proto::projector_server::ProjectorServer;

use super::CommonArgs;

/// Messages larger than this are refused by the transport; the gateway's own limits (images,
/// prompt) are checked first for anything below it, with clearer errors.
pub(super) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// tonic's own limit on a received message, which the projector and decoder keep: their requests
/// arrive as streams of chunks far smaller than this.
pub(super) const DEFAULT_MESSAGE_BYTES: usize = 4 << 20;

/// A generated tonic server of one of the roles: servable, with a limit on received messages.
pub(super) trait GrpcServer:
    Service<Request<Body>, Response = Response<Body>, Error = Infallible>
    + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
    fn with_message_limit(self, bytes: usize) -> Self;
}

macro_rules! grpc_servers {
    ($($server:ty),* $(,)?) => {$(
        impl GrpcServer for $server {
            fn with_message_limit(self, bytes: usize) -> Self {
                self.max_decoding_message_size(bytes)
            }
        }
    )*};
}

grpc_servers!(
    EncoderServer<EncoderService>,
    ProjectorServer<ProjectorService>,
    DecoderServer<DecoderService>,
    GatewayServer<GatewayService>,
);

/// A port served beside the gRPC one (the gateway's OpenAI endpoint), announced as
/// ` <label>=<addr>` and stopped by the same signals.
pub(super) struct HttpPort {
    /// `http` (the TLS port) or `http-plaintext`.
    pub label: &'static str,
    pub addr: SocketAddr,
    pub served: Pin<Box<dyn Future<Output = anyhow::Result<()>>>>,
}

/// What differs between roles once their service is built.
pub(super) struct Stage<S> {
    pub server: S,
    /// `None` only for the gateway's `--plaintext` debugging mode.
    pub tls: Option<vlm_net::ServerTls>,
    /// Largest message accepted from a caller.
    pub max_message_bytes: usize,
    pub http: Vec<HttpPort>,
    /// Slots, queue and memory budget (shared with the service, which reserves what it buffers).
    pub admission: vlm_net::AdmissionGate,
}

/// Serves `stage` on the addresses in `common`; returns once it has drained after a signal.
pub(super) async fn serve_stage<S>(common: &CommonArgs, stage: Stage<S>) -> anyhow::Result<()>
where
    S: GrpcServer,
    S::Future: Send + 'static,
{
    let callers = allowed_callers::<S>(common, stage.tls.is_some())?;
    let listener = bind(common.listen, "--listen").await?;
    // Before `listening` is printed: a supervisor may signal us the moment it reads that line.
    let shutdown = vlm_net::shutdown_signal();
    let ports: Vec<(&str, SocketAddr)> = stage.http.iter().map(|h| (h.label, h.addr)).collect();
    announce(&listener, &ports)?;
    let health = bind_health(common.health_listen).await?;
    let service = vlm_net::server_layers(stage.admission, callers.clone())
        .service(stage.server.with_message_limit(stage.max_message_bytes));
    let grpc = vlm_net::serve_grpc_with_health_port(
        listener, health, stage.tls, service, callers, shutdown,
    );
    let http = futures::future::try_join_all(stage.http.into_iter().map(|h| h.served));
    let (g, h) = tokio::join!(grpc, http);
    g?;
    h?;
    Ok(())
}

/// `--allowed-callers`, or the role's default: the gateway's public API takes any caller, the
/// stages only the gateway. Logged, since it decides who may call.
fn allowed_callers<S: NamedService>(
    common: &CommonArgs,
    tls: bool,
) -> anyhow::Result<vlm_net::AllowedCallers> {
    let is_gateway = S::NAME == <GatewayServer<GatewayService> as NamedService>::NAME;
    let callers = match &common.allowed_callers {
        Some(c) => c.clone(),
        None if is_gateway => vlm_net::AllowedCallers::Any,
        None => vlm_net::AllowedCallers::gateway(),
    };
    anyhow::ensure!(
        tls || callers == vlm_net::AllowedCallers::Any,
        "--allowed-callers {callers} needs TLS: without it no caller has a certificate"
    );
    tracing::info!(service = S::NAME, allowed_callers = %callers, "caller roles");
    Ok(callers)
}

pub(super) async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({flag})"))
}

/// The bound `--metrics-listen` address, announced as ` metrics=<addr>` on the `listening` line.
static METRICS_ADDR: OnceLock<SocketAddr> = OnceLock::new();

/// Serves this process's Prometheus metrics on `addr` (before the role loads its model, so the
/// port answers during start-up too).
pub(super) async fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = bind(addr, "--metrics-listen").await?;
    let _ = METRICS_ADDR.set(listener.local_addr()?);
    vlm_telemetry::serve_metrics(listener);
    Ok(())
}

/// Prints the `listening <addr> [http=<addr>] [http-plaintext=<addr>] [metrics=<addr>]` line.
fn announce(grpc: &TcpListener, http: &[(&str, SocketAddr)]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    write!(out, "listening {}", grpc.local_addr()?)?;
    for (label, addr) in http {
        write!(out, " {label}={addr}")?;
    }
    if let Some(m) = METRICS_ADDR.get() {
        write!(out, " metrics={m}")?;
    }
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

/// Binds the plaintext health port, if asked for, and announces it after `listening`.
async fn bind_health(addr: Option<SocketAddr>) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = bind(addr, "--health-listen").await?;
    let local = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "health-listening {local}")?;
    out.flush()?;
    Ok(Some(listener))
}
