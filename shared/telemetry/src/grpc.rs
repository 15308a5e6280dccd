//! W3C trace context over gRPC, as a tower pair: [`GrpcServerTraceLayer`] wraps a server's
//! service, extracts `traceparent`/`tracestate` from the request metadata and runs the call
//! inside a server span; [`GrpcClientTrace`] wraps a client channel, opens a client span and
//! injects its context into the outgoing metadata. Both follow the OTel RPC conventions
//! (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`) and keep the span open
//! until the response stream ends, so a streaming call's span covers the whole stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use opentelemetry::propagation::{Extractor, Injector};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::labels::{RpcCallLabels, RpcLabels};
use crate::MeshMetrics;

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// Splits `/pkg.Service/Method` into (`pkg.Service`, `Method`).
fn rpc_names(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default().to_string();
    let method = parts.next().unwrap_or_default().to_string();
    (service, method)
}

/// The label for a method nobody serves: made-up paths must not create a metric series (or a
/// span name) each.
const UNKNOWN: &str = "unknown";

/// [`rpc_names`] for a server that serves `known` paths (all when None): a path outside them is
/// named `unknown` (its service kept when it serves other methods).
fn server_rpc_names(path: &str, known: Option<&[&str]>) -> (String, String) {
    let (service, method) = rpc_names(path);
    let Some(known) = known else {
        return (service, method);
    };
    if known.contains(&path) {
        return (service, method);
    }
    let prefix = format!("/{service}/");
    let service = if known.iter().any(|k| k.starts_with(&prefix)) {
        service
    } else {
        UNKNOWN.to_string()
    };
    (service, UNKNOWN.to_string())
}

fn rpc_span(kind: &'static str, (service, method): &(String, String)) -> Span {
    tracing::info_span!(
        target: "vlm_telemetry::grpc",
        "rpc",
        otel.name = %format!("{service}/{method}"),
        otel.kind = kind,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

fn record_status(span: &Span, headers: &HeaderMap) -> Option<i64> {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())?;
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
    Some(code)
}

/// A server call being measured: counted and timed when its response stream ends.
struct ServerRpc {
    labels: RpcLabels,
    start: Instant,
    code: Option<i64>,
}

impl ServerRpc {
    fn start((service, method): (String, String)) -> ServerRpc {
        let labels = RpcLabels { service, method };
        MeshMetrics::global()
            .rpc_server_in_flight
            .get_or_create(&labels)
            .inc();
        ServerRpc {
            labels,
            start: Instant::now(),
            code: None,
        }
    }
}

impl Drop for ServerRpc {
    fn drop(&mut self) {
        let m = MeshMetrics::global();
        m.rpc_server_in_flight.get_or_create(&self.labels).dec();
        let call = RpcCallLabels {
            rpc: self.labels.clone(),
            // A stream dropped before its trailers was cancelled by the peer (CANCELLED = 1).
            code: self.code.unwrap_or(1),
        };
        m.rpc_server_requests.get_or_create(&call).inc();
        m.rpc_server_duration
            .get_or_create(&call)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A response body that holds its call's span until the stream ends and records the final
/// `grpc-status` from the trailers (or a trailers-only response's headers).
struct TracedBody {
    inner: Body,
    span: Span,
    server: Option<ServerRpc>,
}

impl HttpBody for TracedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(trailers) = frame.trailers_ref() {
                let code = record_status(&self.span, trailers);
                if let (Some(rpc), Some(code)) = (self.server.as_mut(), code) {
                    rpc.code = Some(code);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn traced_response(
    resp: Response<Body>,
    span: Span,
    mut server: Option<ServerRpc>,
) -> Response<Body> {
    let code = record_status(&span, resp.headers());
    if let (Some(rpc), Some(code)) = (server.as_mut(), code) {
        rpc.code = Some(code);
    }
    resp.map(|inner| {
        Body::new(TracedBody {
            inner,
            span,
            server,
        })
    })
}

/// Server half: see the module docs. By default every path is named as it comes;
/// [`GrpcServerTraceLayer::serving`] names paths outside the served methods `unknown`, so a
/// caller inventing method names cannot grow the metrics without bound.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerTraceLayer {
    known: Option<&'static [&'static str]>,
}

impl GrpcServerTraceLayer {
    /// Labels only these `/package.Service/Method` paths by name.
    pub fn serving(known: &'static [&'static str]) -> Self {
        GrpcServerTraceLayer { known: Some(known) }
    }
}

impl<S> Layer<S> for GrpcServerTraceLayer {
    type Service = GrpcServerTrace<S>;
    fn layer(&self, inner: S) -> GrpcServerTrace<S> {
        GrpcServerTrace {
            inner,
            known: self.known,
        }
    }
}

/// A server service wrapped by [`GrpcServerTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcServerTrace<S> {
    inner: S,
    known: Option<&'static [&'static str]>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for GrpcServerTrace<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, ReqBody> Service<Request<ReqBody>> for GrpcServerTrace<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let names = server_rpc_names(req.uri().path(), self.known);
        let span = rpc_span("server", &names);
        let rpc = ServerRpc::start(names);
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        // A missing or malformed traceparent leaves an invalid context: the span starts a trace.
        let _ = span.set_parent(parent);
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        Box::pin(async move {
            let resp = tracing::Instrument::instrument(fut, span.clone()).await?;
            Ok(traced_response(resp, span, Some(rpc)))
        })
    }
}

/// Client half: wraps a channel (`GrpcClientTrace::new(channel)`) for any generated client.
#[derive(Debug, Clone)]
pub struct GrpcClientTrace<T> {
    inner: T,
}

impl<T> GrpcClientTrace<T> {
    pub fn new(inner: T) -> Self {
        GrpcClientTrace { inner }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T> Service<Request<Body>> for GrpcClientTrace<T>
where
    T: Service<Request<Body>, Response = Response<Body>>,
    T::Future: Send + 'static,
    T::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = T::Error;
    type Future = BoxFuture<Response<Body>, T::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let span = rpc_span("client", &rpc_names(req.uri().path()));
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tracing::Instrument::instrument(fut, span.clone()).await {
                Ok(resp) => Ok(traced_response(resp, span, None)),
                Err(e) => {
                    span.record("otel.status_code", "ERROR");
                    Err(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_methods_share_one_label() {
        let known = &["/vlm.v1.Gateway/Generate", "/vlm.v1.Gateway/GetModelInfo"][..];
        let named = |p| server_rpc_names(p, Some(known));
        assert_eq!(
            named("/vlm.v1.Gateway/Generate"),
            ("vlm.v1.Gateway".into(), "Generate".into())
        );
        assert_eq!(
            named("/vlm.v1.Gateway/x7Rq"),
            ("vlm.v1.Gateway".into(), "unknown".into())
        );
        assert_eq!(named("/evil.Svc/x"), ("unknown".into(), "unknown".into()));
        assert_eq!(
            named("/vlm.v1.Gateway"),
            ("vlm.v1.Gateway".into(), "unknown".into())
        );
        assert_eq!(
            server_rpc_names("/any.Svc/Thing", None),
            ("any.Svc".into(), "Thing".into())
        );
    }

    #[test]
    fn rpc_names_split_the_path() {
        assert_eq!(
            rpc_names("/vlm.v1.Encoder/Encode"),
            ("vlm.v1.Encoder".to_string(), "Encode".to_string())
        );
        assert_eq!(rpc_names("/"), (String::new(), String::new()));
    }
}
