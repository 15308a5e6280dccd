//! The default KV-cache budget: enough for every batch slot to hold a full-context sequence twice
//! over (the second half keeps shared prefixes cached), but never more than half the memory this
//! process can still get (the machine's available memory, or its cgroup's limit in a container).

use vlm_model::engine::DEFAULT_BLOCK_SIZE;
use vlm_model::Decoder;

/// Bytes of KV cache to budget for `decoder` with `max_batch` sequences per step.
pub(crate) fn default_kv_bytes(decoder: &Decoder, max_batch: usize) -> usize {
    let per_token = decoder.kv_shape(DEFAULT_BLOCK_SIZE).bytes_per_token();
    let one_context = decoder.max_positions() * per_token;
    let wanted = 2 * max_batch * one_context;
    let Some(available) = available_memory() else {
        tracing::warn!(
            "cannot read the available memory; KV cache budget = 2 × batch × context; set --kv-cache-bytes to choose"
        );
        return wanted;
    };
    let budget = wanted.min(available / 2);
    if budget < one_context {
        tracing::warn!(
            available_mib = available >> 20,
            one_context_mib = one_context >> 20,
            "half the available memory holds less than one full-context sequence; the budget is one context, which may not fit: set --kv-cache-bytes"
        );
        return one_context;
    }
    budget
}

/// An explicit `--kv-cache-bytes`, refused at start-up when it is more than this process can get
/// (the pool would fail to allocate, or be killed for memory once filled).
pub(crate) fn check_explicit(bytes: usize) -> anyhow::Result<usize> {
    match available_memory() {
        Some(available) if bytes > available => anyhow::bail!(
            "--kv-cache-bytes {bytes} ({} MiB) is more than the memory this process can get \
             ({} MiB available{}); lower it, or leave it unset for the default (half of what is \
             available at most)",
            bytes >> 20,
            available >> 20,
            if cgroup_limited() {
                ", within its cgroup's limit"
            } else {
                ""
            }
        ),
        _ => Ok(bytes),
    }
}

fn cgroup_limited() -> bool {
    std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .is_ok_and(|v| v.trim().parse::<usize>().is_ok())
}

/// Memory this process can still allocate: `MemAvailable`, capped by the cgroup v2 limit minus
/// current usage when one is set.
fn available_memory() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: usize = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let mut available = kib * 1024;
    let read = |f: &str| -> Option<usize> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}
