//! The decoder's own Prometheus series: batch sizes, KV blocks, prefix-cache tokens, the queue.
//! The families (names, help, buckets) are declared with the mesh's others in
//! `vlm_telemetry::MeshMetrics`.

use std::time::Duration;

use vlm_model::EngineUsage;
use vlm_telemetry::metrics::labels::{
    KvBlockLabels, KvBlockState, NoLabels, PrefixLabels, PrefixLookup, QueueOutcome,
    QueueWaitLabels, ServiceLabels,
};
use vlm_telemetry::MeshMetrics;

/// A count as a gauge value.
fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Records the number of sequences one decode step carried.
pub(crate) fn batch_size(n: usize) {
    MeshMetrics::global()
        .decoder_batch_size
        .get_or_create(&NoLabels)
        .observe(n as f64);
}

/// KV blocks by state, running sequences and queued requests, after each admission round and
/// whenever the loop goes idle; and the decoder's `vlm_saturation`: the larger of the KV blocks
/// in use against all of them and the sequences running or waiting against `max_batch`.
pub(crate) fn engine_state(u: &EngineUsage, queued: usize, max_batch: usize) {
    let m = MeshMetrics::global();
    let kv = u.blocks_used as f64 / u.blocks_total.max(1) as f64;
    let batch = (u.running + queued) as f64 / max_batch.max(1) as f64;
    m.saturation
        .get_or_create(&ServiceLabels {
            service: vlm_proto::decoder_server::SERVICE_NAME,
        })
        .set(kv.max(batch));
    for (state, n) in [
        (KvBlockState::used, u.blocks_used),
        (KvBlockState::cached, u.blocks_cached),
        (KvBlockState::free, u.blocks_free),
    ] {
        m.kv_cache_blocks
            .get_or_create(&KvBlockLabels { state })
            .set(gauge(n));
    }
    m.decoder_running_sequences
        .get_or_create(&NoLabels)
        .set(gauge(u.running));
    m.decoder_queued_requests
        .get_or_create(&NoLabels)
        .set(gauge(queued));
}

/// Prompt positions served from the prefix cache (`hit`) and computed (`miss`).
pub(crate) fn prefix_tokens(hit: usize, miss: usize) {
    let m = MeshMetrics::global();
    for (result, n) in [(PrefixLookup::hit, hit), (PrefixLookup::miss, miss)] {
        m.prefix_cache_tokens
            .get_or_create(&PrefixLabels { result })
            .inc_by(n as u64);
    }
}

/// Time a request waited for admission, by how the wait ended.
pub(crate) fn queue_wait(waited: Duration, outcome: QueueOutcome) {
    MeshMetrics::global()
        .decoder_queue_wait
        .get_or_create(&QueueWaitLabels { outcome })
        .observe(waited.as_secs_f64());
}
