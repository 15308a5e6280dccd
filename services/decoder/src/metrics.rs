//! The decoder's own Prometheus series: batch sizes, KV blocks, prefix-cache tokens, the queue.

use std::time::Duration;

use vlm_model::EngineUsage;
use vlm_telemetry::metrics::Metrics;

/// Sequences per decode step.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// Records the number of sequences one decode step carried.
pub(crate) fn batch_size(n: usize) {
    Metrics::global().observe_in(
        "vlm_decoder_batch_size",
        "Sequences advanced together by one decode step.",
        &[],
        BATCH_BUCKETS,
        n as f64,
    );
}

/// KV blocks by state, running sequences and queued requests, after each admission round.
pub(crate) fn engine_state(u: &EngineUsage, queued: usize) {
    let m = Metrics::global();
    for (state, n) in [
        ("used", u.blocks_used),
        ("cached", u.blocks_cached),
        ("free", u.blocks_free),
    ] {
        m.gauge_set(
            "vlm_kv_cache_blocks",
            "KV-cache blocks: used by running sequences, cached (unreferenced prefix blocks, reclaimable), free.",
            &[("state", state)],
            n as f64,
        );
    }
    m.gauge_set(
        "vlm_decoder_running_sequences",
        "Sequences in the decoder's batch.",
        &[],
        u.running as f64,
    );
    m.gauge_set(
        "vlm_decoder_queued_requests",
        "Requests waiting for KV-cache memory or a batch slot.",
        &[],
        queued as f64,
    );
}

/// Prompt positions served from the prefix cache (`hit`) and computed (`miss`).
pub(crate) fn prefix_tokens(hit: usize, miss: usize) {
    let m = Metrics::global();
    let help = "Prompt positions whose KV came from the prefix cache (hit) or was computed (miss).";
    m.inc_by(
        "vlm_prefix_cache_tokens_total",
        help,
        &[("result", "hit")],
        hit as f64,
    );
    m.inc_by(
        "vlm_prefix_cache_tokens_total",
        help,
        &[("result", "miss")],
        miss as f64,
    );
}

/// Time a request waited for admission; `outcome` is `admitted` or `expired`.
pub(crate) fn queue_wait(waited: Duration, outcome: &str) {
    Metrics::global().observe(
        "vlm_decoder_queue_wait_seconds",
        "Time from a request reaching the decoder's queue to its admission (or expiry).",
        &[("outcome", outcome)],
        waited,
    );
}
