//! Prometheus metrics on `prometheus-client`: every family the mesh exports is declared once, with
//! its help text, label set and buckets, in [`MeshMetrics`], registered in one registry per
//! process, and served as Prometheus text by [`serve_metrics`]. Series appear in a process's
//! exposition once it records them, so each service shows only its own.
//!
//! Recording goes through the typed families (`MeshMetrics::global().kv_cache_blocks
//! .get_or_create(&KvBlockLabels { state: KvBlockState::free }).set(n)`) or the named helpers
//! below, which the gateway uses.

mod http;
pub mod labels;

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

pub use http::{serve_metrics, CONTENT_TYPE};
use labels::*;

/// Upper bounds (seconds) of the latency histograms: 1 ms to 60 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Upper bounds of `vlm_decoder_batch_size`: sequences per decode step.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A histogram family whose histograms all have the same buckets.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS.iter().copied())
}

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS.iter().copied())
}

fn latency<L: Clone + Eq + std::hash::Hash>() -> Histograms<L> {
    Family::new_with_constructor(latency_histogram)
}

/// Every metric family of the mesh. Counter names are registered without `_total`, which the
/// encoder appends.
#[derive(Debug)]
pub struct MeshMetrics {
    // Every service.
    pub rpc_server_requests: Family<RpcCallLabels, Counter>,
    pub rpc_server_duration: Histograms<RpcCallLabels>,
    pub rpc_server_in_flight: Family<RpcLabels, Gauge>,
    pub admission_queue_depth: Family<ServiceLabels, Gauge>,
    pub admission_shed: Family<ServiceLabels, Counter>,
    pub saturation: Family<ServiceLabels, Gauge<f64, AtomicU64>>,
    pub memory_budget_bytes: Family<MemoryBudgetLabels, Gauge>,
    pub memory_budget_refused: Family<ServiceLabels, Counter>,
    pub memory_budget_waiting: Family<ServiceLabels, Gauge>,
    pub stage_duration: Histograms<StageLabels>,
    pub tls_certificate_expiry: Family<TlsLabels, Gauge>,
    pub tls_reloads: Family<TlsReloadLabels, Counter>,
    // The gateway.
    pub cache_lookups: Family<CacheLookupLabels, Counter>,
    pub cache_stores: Family<CacheStoreLabels, Counter>,
    pub gateway_retries: Family<RetryLabels, Counter>,
    pub gateway_routing: Family<RouteLabels, Counter>,
    pub gateway_routed_cached_tokens: Family<RouteLabels, Counter>,
    pub gateway_abandoned: Family<AbandonLabels, Counter>,
    pub tokens_generated: Family<NoLabels, Counter>,
    pub time_to_first_token: Histograms<NoLabels>,
    pub inter_token_latency: Histograms<NoLabels>,
    pub watch_streams: Family<NoLabels, Gauge>,
    pub watch_frames: Family<WatchFrameLabels, Counter>,
    pub watch_encoder_calls_saved: Family<NoLabels, Counter>,
    pub watch_events_discarded: Family<NoLabels, Counter>,
    // The decoder's step loop.
    pub decoder_batch_size: Histograms<NoLabels>,
    pub kv_cache_blocks: Family<KvBlockLabels, Gauge>,
    pub decoder_running_sequences: Family<NoLabels, Gauge>,
    pub decoder_queued_requests: Family<NoLabels, Gauge>,
    pub prefix_cache_tokens: Family<PrefixLabels, Counter>,
    pub decoder_queue_wait: Histograms<QueueWaitLabels>,
    registry: Registry,
}

/// Registers `metric` under `name` and hands back its handle (families share their series
/// between clones).
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl MeshMetrics {
    /// The process-wide families every service records into and [`serve_metrics`] serves.
    pub fn global() -> &'static MeshMetrics {
        static GLOBAL: OnceLock<MeshMetrics> = OnceLock::new();
        GLOBAL.get_or_init(MeshMetrics::new)
    }

    /// A fresh registry with every family registered (help texts get their final period from
    /// the registry).
    pub(crate) fn new() -> MeshMetrics {
        let r = &mut Registry::default();
        MeshMetrics {
            rpc_server_requests: registered(r, "vlm_rpc_server_requests",
                "Server calls finished, by gRPC status code", Family::default()),
            rpc_server_duration: registered(r, "vlm_rpc_server_duration_seconds",
                "Server call duration, request start to end of the response stream", latency()),
            rpc_server_in_flight: registered(r, "vlm_rpc_server_in_flight",
                "Server calls in progress (including their response streams)", Family::default()),
            admission_queue_depth: registered(r, "vlm_admission_queue_depth",
                "Calls waiting for a serving slot (load shedding starts when this reaches --max-queue)",
                Family::default()),
            admission_shed: registered(r, "vlm_admission_shed",
                "Calls refused because the queue was full or the deadline passed in it",
                Family::default()),
            saturation: registered(r, "vlm_saturation",
                "The service's load against its capacity, for autoscalers (1 = at capacity): encoder and projector (calls in flight + queued) / --max-in-flight; decoder the larger of KV-cache blocks in use / all blocks and (running + waiting sequences) / --max-batch",
                Family::default()),
            memory_budget_bytes: registered(r, "vlm_memory_budget_bytes",
                "Request data held against the service's memory budget (state=used) and the budget (state=limit, --max-bytes-in-flight)",
                Family::default()),
            memory_budget_refused: registered(r, "vlm_memory_budget_refused",
                "Reservations refused because they exceeded the memory budget, found it full or waited past their deadline",
                Family::default()),
            memory_budget_waiting: registered(r, "vlm_memory_budget_waiting",
                "Reservations waiting for room in the memory budget",
                Family::default()),
            stage_duration: registered(r, "vlm_stage_duration_seconds",
                "Time spent in one pipeline stage", latency()),
            tls_certificate_expiry: registered(r, "vlm_tls_certificate_expiry_seconds",
                "The notAfter of the certificate a service presents, in unix seconds (kind=mesh: its mesh identity; kind=public: the gateway's --public-cert), updated when the files are reloaded",
                Family::default()),
            tls_reloads: registered(r, "vlm_tls_reloads",
                "Changes of a service's certificate, key or CA files, by result: loaded (new connections use them) or refused (unusable; the previous ones stay in use)",
                Family::default()),
            cache_lookups: registered(r, "vlm_cache_lookups",
                "Feature-cache lookups, by result (hit, miss, error)", Family::default()),
            cache_stores: registered(r, "vlm_cache_stores",
                "Feature-cache writes, by result (ok, error)", Family::default()),
            gateway_retries: registered(r, "vlm_gateway_retries",
                "Stage calls repeated on another replica, by stage and kind (retry, failover)",
                Family::default()),
            gateway_routing: registered(r, "vlm_gateway_routing_decisions",
                "Decoder calls by why they went to their replica (prefix, affinity, spilled, balanced, off)",
                Family::default()),
            gateway_routed_cached_tokens: registered(r, "vlm_gateway_routed_cached_tokens",
                "Prompt positions the decoders served from their prefix cache, by the routing decision that sent the call",
                Family::default()),
            gateway_abandoned: registered(r, "vlm_gateway_abandoned_calls",
                "Stage calls given up on while running (and tried again elsewhere), by stage and reason",
                Family::default()),
            tokens_generated: registered(r, "vlm_tokens_generated",
                "Tokens generated and streamed to clients", Family::default()),
            time_to_first_token: registered(r, "vlm_time_to_first_token_seconds",
                "From receiving a request to streaming its first token", latency()),
            inter_token_latency: registered(r, "vlm_inter_token_latency_seconds",
                "Time between consecutive tokens of one stream", latency()),
            watch_streams: registered(r, "vlm_watch_streams",
                "Watch (live frame) streams open", Family::default()),
            watch_frames: registered(r, "vlm_watch_frames",
                "Frames of Watch streams, by result: received (every frame), reused (no encoder call), partial (some views encoded), full, dropped (replaced by a newer frame while waiting), failed",
                Family::default()),
            watch_encoder_calls_saved: registered(r, "vlm_watch_encoder_calls_saved",
                "Frames of Watch streams served without an encoder call (their features reused)",
                Family::default()),
            watch_events_discarded: registered(r, "vlm_watch_events_discarded",
                "Watch stream events (frame events, refusals) discarded because the client had not read a whole queue of earlier ones",
                Family::default()),
            decoder_batch_size: registered(r, "vlm_decoder_batch_size",
                "Sequences advanced together by one decode step",
                Family::new_with_constructor(batch_histogram)),
            kv_cache_blocks: registered(r, "vlm_kv_cache_blocks",
                "KV-cache blocks: used by running sequences, cached (unreferenced prefix blocks, reclaimable), free",
                Family::default()),
            decoder_running_sequences: registered(r, "vlm_decoder_running_sequences",
                "Sequences in the decoder's batch", Family::default()),
            decoder_queued_requests: registered(r, "vlm_decoder_queued_requests",
                "Requests waiting for KV-cache memory or a batch slot", Family::default()),
            prefix_cache_tokens: registered(r, "vlm_prefix_cache_tokens",
                "Prompt positions whose KV came from the prefix cache (hit) or was computed (miss)",
                Family::default()),
            decoder_queue_wait: registered(r, "vlm_decoder_queue_wait_seconds",
                "Time from a request reaching the decoder's queue to its admission (or expiry)",
                latency()),
            registry: std::mem::take(r),
        }
    }

    /// Everything recorded so far, in the Prometheus text exposition format (0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String never fails");
        out
    }
}

/// Times one pipeline stage (`preprocess`, `vision_forward`, `project`, `prefill`, `decode`,
/// `cache.lookup`…) in `vlm_stage_duration_seconds`.
pub fn observe_stage(stage: &str, took: Duration) {
    MeshMetrics::global()
        .stage_duration
        .get_or_create(&StageLabels {
            stage: stage.to_string(),
        })
        .observe(took.as_secs_f64());
}

/// One feature-cache lookup, by `result`: `hit`, `miss`, `error` (or `off`: no cache).
pub fn cache_lookup(result: &str) {
    let Some(result) = CacheLookup::parse(result) else {
        return unknown("vlm_cache_lookups_total", result);
    };
    MeshMetrics::global()
        .cache_lookups
        .get_or_create(&CacheLookupLabels { result })
        .inc();
}

/// One feature-cache write, by `result`: `ok` or `error`.
pub fn cache_store(result: &str) {
    let Some(result) = CacheStore::parse(result) else {
        return unknown("vlm_cache_stores_total", result);
    };
    MeshMetrics::global()
        .cache_stores
        .get_or_create(&CacheStoreLabels { result })
        .inc();
}

/// A stage call repeated on another replica; `kind` is `retry` or `failover`.
pub fn stage_retry(stage: &str, kind: &str) {
    let Some(kind) = RetryKind::parse(kind) else {
        return unknown("vlm_gateway_retries_total", kind);
    };
    MeshMetrics::global()
        .gateway_retries
        .get_or_create(&RetryLabels {
            stage: stage.to_string(),
            kind,
        })
        .inc();
}

/// One token streamed to a client: `ttft` for a request's first token (from receiving the
/// request), `itl` for every later one (since the previous token).
pub fn token_streamed(ttft: Option<Duration>, itl: Option<Duration>) {
    let m = MeshMetrics::global();
    m.tokens_generated.get_or_create(&NoLabels).inc();
    if let Some(d) = ttft {
        m.time_to_first_token
            .get_or_create(&NoLabels)
            .observe(d.as_secs_f64());
    }
    if let Some(d) = itl {
        m.inter_token_latency
            .get_or_create(&NoLabels)
            .observe(d.as_secs_f64());
    }
}

/// The certificate `service` presents as `kind` (`mesh` or `public`) expires at `not_after`
/// (unix seconds).
pub fn tls_certificate(service: &str, kind: &str, not_after: i64) {
    let Some(kind) = TlsKind::parse(kind) else {
        return unknown("vlm_tls_certificate_expiry_seconds", kind);
    };
    let m = MeshMetrics::global();
    let labels = TlsLabels {
        service: service.to_string(),
        kind,
    };
    m.tls_certificate_expiry
        .get_or_create(&labels)
        .set(not_after);
    for result in [TlsReload::loaded, TlsReload::refused] {
        let _ = m.tls_reloads.get_or_create(&TlsReloadLabels {
            tls: labels.clone(),
            result,
        });
    }
}

/// A change of `service`'s `kind` TLS files was loaded (`ok`) or refused.
pub fn tls_reload(service: &str, kind: &str, ok: bool) {
    let Some(kind) = TlsKind::parse(kind) else {
        return unknown("vlm_tls_reloads_total", kind);
    };
    MeshMetrics::global()
        .tls_reloads
        .get_or_create(&TlsReloadLabels {
            tls: TlsLabels {
                service: service.to_string(),
                kind,
            },
            result: if ok {
                TlsReload::loaded
            } else {
                TlsReload::refused
            },
        })
        .inc();
}

/// Creates, at zero, every series `role` (`gateway`, `encoder`, `projector`, `decoder`) records
/// whose labels are known in advance, so they are in the exposition before the first event
/// (dashboards, alerts and `rate()` need the series to exist). Per-call series
/// (`vlm_rpc_server_*{method,code}`) still appear with their first call.
pub fn preregister(role: &str) {
    let m = MeshMetrics::global();
    let stages: &[&str] = match role {
        "gateway" => &["cache.lookup"],
        "encoder" => &["preprocess", "vision_forward"],
        "projector" => &["project"],
        "decoder" => &["prefill", "decode"],
        _ => &[],
    };
    for stage in stages {
        let _ = m.stage_duration.get_or_create(&StageLabels {
            stage: stage.to_string(),
        });
    }
    let service = match role {
        "encoder" => Some("vlm.v1.Encoder"),
        "projector" => Some("vlm.v1.Projector"),
        "decoder" => Some("vlm.v1.Decoder"),
        _ => None,
    };
    if let Some(service) = service {
        let _ = m.saturation.get_or_create(&ServiceLabels { service });
    }
    match role {
        "gateway" => {
            for result in [
                CacheLookup::hit,
                CacheLookup::miss,
                CacheLookup::error,
                CacheLookup::off,
            ] {
                let _ = m.cache_lookups.get_or_create(&CacheLookupLabels { result });
            }
            for result in [CacheStore::ok, CacheStore::error] {
                let _ = m.cache_stores.get_or_create(&CacheStoreLabels { result });
            }
            for stage in ["encoder", "projector", "decoder"] {
                for kind in [RetryKind::retry, RetryKind::failover] {
                    let _ = m.gateway_retries.get_or_create(&RetryLabels {
                        stage: stage.to_string(),
                        kind,
                    });
                }
            }
            for reason in [
                RouteReason::prefix,
                RouteReason::affinity,
                RouteReason::spilled,
                RouteReason::balanced,
                RouteReason::off,
            ] {
                let _ = m.gateway_routing.get_or_create(&RouteLabels { reason });
                let _ = m
                    .gateway_routed_cached_tokens
                    .get_or_create(&RouteLabels { reason });
            }
            for stage in ["encoder", "projector", "decoder"] {
                for reason in [AbandonReason::slow, AbandonReason::slow_token] {
                    let _ = m
                        .gateway_abandoned
                        .get_or_create(&AbandonLabels { stage, reason });
                }
            }
            let _ = m.tokens_generated.get_or_create(&NoLabels);
            let _ = m.time_to_first_token.get_or_create(&NoLabels);
            let _ = m.inter_token_latency.get_or_create(&NoLabels);
            let _ = m.watch_streams.get_or_create(&NoLabels);
            for result in [
                WatchFrame::received,
                WatchFrame::reused,
                WatchFrame::partial,
                WatchFrame::full,
                WatchFrame::dropped,
                WatchFrame::failed,
            ] {
                let _ = m.watch_frames.get_or_create(&WatchFrameLabels { result });
            }
            let _ = m.watch_encoder_calls_saved.get_or_create(&NoLabels);
            let _ = m.watch_events_discarded.get_or_create(&NoLabels);
        }
        "decoder" => {
            let _ = m.decoder_batch_size.get_or_create(&NoLabels);
            for state in [KvBlockState::used, KvBlockState::cached, KvBlockState::free] {
                let _ = m.kv_cache_blocks.get_or_create(&KvBlockLabels { state });
            }
            let _ = m.decoder_running_sequences.get_or_create(&NoLabels);
            let _ = m.decoder_queued_requests.get_or_create(&NoLabels);
            for result in [PrefixLookup::hit, PrefixLookup::miss] {
                let _ = m
                    .prefix_cache_tokens
                    .get_or_create(&PrefixLabels { result });
            }
            for outcome in [QueueOutcome::admitted, QueueOutcome::expired] {
                let _ = m
                    .decoder_queue_wait
                    .get_or_create(&QueueWaitLabels { outcome });
            }
        }
        _ => {}
    }
}

/// A label value outside its closed set is a caller's bug; it is logged, not exported.
fn unknown(series: &'static str, value: &str) {
    tracing::warn!(series, value, "unknown label value; not counted");
}

#[cfg(test)]
mod tests;
