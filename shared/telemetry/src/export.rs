//! Reports the health of span export: the SDK's batch processor drops a batch it cannot send
//! without a word, so a collector that is down, misnamed or refusing would go unnoticed. The
//! wrapper logs the first failure (with the endpoint and the error) and every recovery, once each,
//! never once per batch.

use std::sync::Mutex;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// Log target of export-health lines. It does not start with `vlm`, so these events never become
/// span events themselves (the OTel layer takes only `vlm*` targets).
pub const EXPORT_LOG_TARGET: &str = "otlp_export";

/// What one export result changes, as a log line to write (or none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The first failure after start or after a recovery.
    Failing { error: String },
    /// The first success after failures; how many batches were lost meanwhile.
    Recovered { lost_batches: u64 },
}

/// Export health: healthy, or failing since some batch.
#[derive(Debug, Default)]
pub struct ExportHealth {
    failed_batches: Option<u64>,
}

impl ExportHealth {
    /// Books one export result; returns the line to log when the state changes.
    pub fn record(&mut self, result: &OTelSdkResult) -> Option<Transition> {
        match (result, self.failed_batches) {
            (Ok(()), None) => None,
            (Ok(()), Some(lost)) => {
                self.failed_batches = None;
                Some(Transition::Recovered { lost_batches: lost })
            }
            (Err(e), None) => {
                self.failed_batches = Some(1);
                Some(Transition::Failing {
                    error: e.to_string(),
                })
            }
            (Err(_), Some(n)) => {
                self.failed_batches = Some(n + 1);
                None
            }
        }
    }
}

/// A span exporter that reports its inner exporter's failures and recoveries.
#[derive(Debug)]
pub struct ReportingExporter<E> {
    inner: E,
    endpoint: String,
    health: Mutex<ExportHealth>,
}

impl<E> ReportingExporter<E> {
    pub fn new(inner: E, endpoint: String) -> Self {
        ReportingExporter {
            inner,
            endpoint,
            health: Mutex::new(ExportHealth::default()),
        }
    }

    fn report(&self, result: &OTelSdkResult) {
        let transition = self
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(result);
        match transition {
            Some(Transition::Failing { error }) => tracing::warn!(
                target: EXPORT_LOG_TARGET,
                endpoint = %self.endpoint,
                "exporting spans over OTLP to {} failed: {error}; spans are dropped until it \
                 recovers (reported once)",
                self.endpoint
            ),
            Some(Transition::Recovered { lost_batches }) => tracing::info!(
                target: EXPORT_LOG_TARGET,
                endpoint = %self.endpoint,
                "exporting spans over OTLP to {} works again ({lost_batches} batch(es) lost)",
                self.endpoint
            ),
            None => {}
        }
    }
}

impl<E: SpanExporter> SpanExporter for ReportingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        self.report(&result);
        result
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The traces endpoint the exporter sends to, as the OTLP variables name it (for log lines).
pub fn configured_endpoint() -> String {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
    .unwrap_or_else(|| "the default endpoint".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_sdk::error::OTelSdkError;

    fn err() -> OTelSdkResult {
        Err(OTelSdkError::InternalFailure("connection refused".into()))
    }

    #[test]
    fn the_first_failure_and_each_recovery_are_reported_once() {
        let mut h = ExportHealth::default();
        assert_eq!(h.record(&Ok(())), None);
        assert_eq!(
            h.record(&err()),
            Some(Transition::Failing {
                error: "Operation failed: connection refused".into()
            })
        );
        assert_eq!(h.record(&err()), None);
        assert_eq!(h.record(&err()), None);
        assert_eq!(
            h.record(&Ok(())),
            Some(Transition::Recovered { lost_batches: 3 })
        );
        assert_eq!(h.record(&Ok(())), None);
        assert!(matches!(h.record(&err()), Some(Transition::Failing { .. })));
    }
}
