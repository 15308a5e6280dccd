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
/// its working set when one is set (see [`cgroup_headroom`]).
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
        let stat = std::fs::read_to_string("/sys/fs/cgroup/memory.stat").unwrap_or_default();
        available = available.min(cgroup_headroom(max, current, &stat));
    }
    Some(available)
}

/// What a cgroup can still take: its limit minus its working set, i.e. `memory.current` without
/// `inactive_file` (as the kubelet counts it). `memory.current` alone counts the page cache of the
/// memory-mapped checkpoint, which the kernel reclaims before it would OOM-kill, so a pod that had
/// just read its weights would see almost no headroom.
fn cgroup_headroom(max: usize, current: usize, stat: &str) -> usize {
    let inactive_file = stat
        .lines()
        .find_map(|l| l.strip_prefix("inactive_file "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    max.saturating_sub(current.saturating_sub(inactive_file))
}

#[cfg(test)]
mod tests {
    use super::cgroup_headroom;

    #[test]
    fn reclaimable_page_cache_counts_as_headroom() {
        let gib = 1usize << 30;
        // 20 GiB limit; 18 GiB charged, of which 14 GiB is the checkpoint's inactive page cache.
        let stat = format!(
            "anon {}\nfile {}\ninactive_file {}\nactive_file 0\n",
            4 * gib,
            14 * gib,
            14 * gib
        );
        assert_eq!(cgroup_headroom(20 * gib, 18 * gib, &stat), 16 * gib);
        // Without memory.stat (or the field), the old, conservative figure.
        assert_eq!(cgroup_headroom(20 * gib, 18 * gib, ""), 2 * gib);
        // Never negative.
        assert_eq!(cgroup_headroom(gib, 2 * gib, "inactive_file 0\n"), 0);
    }
}
