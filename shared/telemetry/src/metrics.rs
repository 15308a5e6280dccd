//! Prometheus metrics: a small process-wide registry of counters, gauges and histograms keyed by
//! name and labels, rendered in the Prometheus text exposition format (0.0.4), and an HTTP
//! endpoint that serves it. Hand-rolled because the mesh needs only these three kinds and the
//! text format; no extra dependency tree for it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Upper bounds (seconds) of the latency histograms: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

struct Family {
    help: &'static str,
    kind: Kind,
    /// Histogram bucket upper bounds.
    buckets: &'static [f64],
    values: BTreeMap<String, f64>,
    histograms: BTreeMap<String, Histogram>,
}

/// The registry; see [`Metrics::global`].
#[derive(Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn label_string(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect::<Vec<_>>()
        .join(",")
}

impl Metrics {
    /// The process-wide registry every service records into.
    pub fn global() -> &'static Metrics {
        static GLOBAL: OnceLock<Metrics> = OnceLock::new();
        GLOBAL.get_or_init(Metrics::default)
    }

    fn with_family<R>(
        &self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        f: impl FnOnce(&mut Family) -> R,
    ) -> R {
        let mut families = self.families.lock().expect("metrics lock");
        let fam = families.entry(name).or_insert_with(|| Family {
            help,
            kind,
            buckets: LATENCY_BUCKETS,
            values: BTreeMap::new(),
            histograms: BTreeMap::new(),
        });
        f(fam)
    }

    /// Adds `by` to a counter (name should end in `_total`).
    pub fn inc_by(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], by: f64) {
        self.with_family(name, help, Kind::Counter, |f| {
            *f.values.entry(label_string(labels)).or_default() += by;
        });
    }

    /// Adds one to a counter.
    pub fn inc(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)]) {
        self.inc_by(name, help, labels, 1.0);
    }

    /// Moves a gauge by `delta` (in-flight calls, queue depth).
    pub fn gauge_add(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        delta: f64,
    ) {
        self.with_family(name, help, Kind::Gauge, |f| {
            *f.values.entry(label_string(labels)).or_default() += delta;
        });
    }

    /// Sets a gauge.
    pub fn gauge_set(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        self.with_family(name, help, Kind::Gauge, |f| {
            f.values.insert(label_string(labels), value);
        });
    }

    /// Records one observation (seconds) in a latency histogram (name ends in `_seconds`).
    pub fn observe(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: Duration,
    ) {
        self.observe_in(name, help, labels, LATENCY_BUCKETS, value.as_secs_f64());
    }

    /// Records one observation in a histogram with its own bucket bounds (sizes, counts); the
    /// first call for a name fixes its buckets.
    pub fn observe_in(
        &self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        buckets: &'static [f64],
        v: f64,
    ) {
        self.with_family(name, help, Kind::Histogram, |f| {
            if f.histograms.is_empty() {
                f.buckets = buckets;
            }
            let h = f.histograms.entry(label_string(labels)).or_default();
            if h.counts.is_empty() {
                h.counts = vec![0; f.buckets.len()];
            }
            for (i, le) in f.buckets.iter().enumerate() {
                if v <= *le {
                    h.counts[i] += 1;
                }
            }
            h.sum += v;
            h.count += 1;
        });
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let families = self.families.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, f) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            for (labels, v) in &f.values {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
            for (labels, h) in &f.histograms {
                let sep = if labels.is_empty() { "" } else { "," };
                for (le, c) in f.buckets.iter().zip(&h.counts) {
                    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {c}");
                }
                let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
                let braces = |s: &str| {
                    if s.is_empty() {
                        String::new()
                    } else {
                        format!("{{{s}}}")
                    }
                };
                let _ = writeln!(out, "{name}_sum{} {}", braces(labels), h.sum);
                let _ = writeln!(out, "{name}_count{} {}", braces(labels), h.count);
            }
        }
        out
    }
}

/// Times one pipeline stage (`preprocess`, `vision_forward`, `project`, `prefill`, `decode`,
/// `cache.lookup`…) in `vlm_stage_duration_seconds`.
pub fn observe_stage(stage: &str, took: Duration) {
    Metrics::global().observe(
        "vlm_stage_duration_seconds",
        "Time spent in one pipeline stage.",
        &[("stage", stage)],
        took,
    );
}

/// One feature-cache lookup, by `result`: `hit`, `miss` or `error`.
pub fn cache_lookup(result: &str) {
    Metrics::global().inc(
        "vlm_cache_lookups_total",
        "Feature-cache lookups, by result (hit, miss, error).",
        &[("result", result)],
    );
}

/// One feature-cache write, by `result`: `ok` or `error`.
pub fn cache_store(result: &str) {
    Metrics::global().inc(
        "vlm_cache_stores_total",
        "Feature-cache writes, by result (ok, error).",
        &[("result", result)],
    );
}

/// A stage call repeated on another replica; `kind` is `retry` or `failover`.
pub fn stage_retry(stage: &str, kind: &str) {
    Metrics::global().inc(
        "vlm_gateway_retries_total",
        "Stage calls repeated on another replica, by stage and kind (retry, failover).",
        &[("stage", stage), ("kind", kind)],
    );
}

/// One token streamed to a client: `ttft` for a request's first token (from receiving the
/// request), `itl` for every later one (since the previous token).
pub fn token_streamed(ttft: Option<Duration>, itl: Option<Duration>) {
    let m = Metrics::global();
    m.inc(
        "vlm_tokens_generated_total",
        "Tokens generated and streamed to clients.",
        &[],
    );
    if let Some(d) = ttft {
        m.observe(
            "vlm_time_to_first_token_seconds",
            "From receiving a request to streaming its first token.",
            &[],
            d,
        );
    }
    if let Some(d) = itl {
        m.observe(
            "vlm_inter_token_latency_seconds",
            "Time between consecutive tokens of one stream.",
            &[],
            d,
        );
    }
}

/// Serves [`Metrics::global`] as Prometheus text (any path) on `listener` until the process ends.
pub fn serve_metrics(listener: TcpListener) -> JoinHandle<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving Prometheus metrics");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    let body = Metrics::global().render();
                    hyper::Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.inc("vlm_x_total", "x", &[("code", "0")]);
        m.inc("vlm_x_total", "x", &[("code", "0")]);
        m.observe(
            "vlm_y_seconds",
            "y",
            &[("stage", "a\"b")],
            Duration::from_millis(3),
        );
        let text = m.render();
        assert!(text.contains("# TYPE vlm_x_total counter\n"));
        assert!(text.contains("vlm_x_total{code=\"0\"} 2\n"));
        assert!(text.contains("vlm_y_seconds_bucket{stage=\"a\\\"b\",le=\"0.0025\"} 0\n"));
        assert!(text.contains("vlm_y_seconds_bucket{stage=\"a\\\"b\",le=\"0.005\"} 1\n"));
        assert!(text.contains("vlm_y_seconds_count{stage=\"a\\\"b\"} 1\n"));
    }
}
