//! Telemetry for every mesh process: one [`init`] that sets up `tracing` (human-readable or
//! JSON logs, env-filter) and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, exports spans over
//! OTLP/gRPC; the W3C trace-context carriers for gRPC ([`grpc`]); and Prometheus metrics
//! ([`metrics`]).
//!
//! Spans are ordinary `tracing` spans; `tracing-opentelemetry` turns them into OTel spans, so code
//! outside this crate never touches the OTel API except through the helpers here.

pub mod export;
pub mod grpc;
pub mod metrics;

use std::str::FromStr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use grpc::{GrpcClientTrace, GrpcServerTrace, GrpcServerTraceLayer};
pub use metrics::{serve_metrics, MeshMetrics};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (for log shippers).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format must be text or json, not {other:?}")),
        }
    }
}

/// Keeps the trace pipeline alive; dropping it flushes the spans still queued, so the last
/// spans of a process that exits are not lost. Drop it outside async code, while the Tokio
/// runtime the exporter was built in still runs.
#[must_use = "dropping the guard shuts the exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (OTLP endpoint configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: shutting the span exporter down failed: {e}");
            }
        }
    }
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
        && std::env::var("OTEL_SDK_DISABLED").map_or(true, |v| v != "true")
}

/// Installs the global subscriber for a process named `service_name`.
///
/// Log level comes from `VLM_LOG` (then `RUST_LOG`), else `default_filter`. With an OTLP endpoint
/// in the environment, spans also go to it through a batch processor; the standard `OTEL_*`
/// variables apply (`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` override the name given
/// here, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`). The exporter's gRPC
/// channel is built on the current Tokio runtime, so call this inside one when exporting.
pub fn init(
    service_name: &str,
    format: LogFormat,
    default_filter: &str,
) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_env("VLM_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let (otel, provider) = if otlp_configured() && tokio::runtime::Handle::try_current().is_ok() {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        // The pid tells replicas of one service apart in a trace.
        let mut resource = Resource::builder().with_attribute(opentelemetry::KeyValue::new(
            "process.pid",
            i64::from(std::process::id()),
        ));
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(service_name.to_string());
        }
        // Failures are logged once, and each recovery; the SDK itself drops failed batches silently.
        let exporter = export::ReportingExporter::new(exporter, export::configured_endpoint());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        let tracer = provider.tracer("vlm-mesh");
        // Spans are exported regardless of the log filter: a trace must be whole even when
        // logs are quiet. Only the mesh's own INFO-level spans and events are traced, not
        // those of the libraries underneath (h2, hyper, tower).
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target().starts_with("vlm") && *m.level() <= tracing::Level::INFO
            }));
        (Some(layer), Some(provider))
    } else {
        (None, None)
    };
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .try_init()?;
    Ok(TelemetryGuard { provider })
}

/// The W3C trace id (32 lowercase hex digits) of the current span, if it belongs to a trace.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = tracing::Span::current().context();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Records a named event with string attributes on the current span (retries, failovers,
/// per-layer statistics): events become OTel span events with these attributes.
pub fn span_event(name: &'static str, attributes: &[(&'static str, String)]) {
    let attrs = attributes
        .iter()
        .map(|(k, v)| opentelemetry::KeyValue::new(*k, v.clone()))
        .collect();
    tracing::Span::current().add_event(name, attrs);
}
