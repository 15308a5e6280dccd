//! The label sets of the mesh's metric families: one type per set of label names, and an enum
//! wherever the values are a closed set (its variants are spelled as the exposed values).

// The derive writes a variant's identifier as the label value, so variants are the values.
#![allow(non_camel_case_types)]

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelSetEncoder};

/// No labels. Unlabelled series are families keyed by this, so that, like labelled ones, they
/// appear in a process's exposition only once that process records them.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(&self, _encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

/// `{stage}`: a pipeline stage (`preprocess`, `vision_forward`, `cache.lookup`, `project`,
/// `prefill`, `decode`) or, for retries, the stage called (`encoder`, `projector`, `decoder`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

/// `{service,method}` of a gRPC call (`vlm.v1.Encoder`, `Encode`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub service: String,
    pub method: String,
}

/// `{service,method,code}` of a finished gRPC call; `code` is its numeric gRPC status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCallLabels {
    #[prometheus(flatten)]
    pub rpc: RpcLabels,
    pub code: i64,
}

/// `{service}`: the gRPC service name a load-shedding layer guards.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: &'static str,
}

/// Outcome of a feature-cache lookup; `off` when the gateway runs without a cache.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CacheLookup {
    hit,
    miss,
    error,
    off,
}

impl CacheLookup {
    pub fn parse(s: &str) -> Option<CacheLookup> {
        Some(match s {
            "hit" => CacheLookup::hit,
            "miss" => CacheLookup::miss,
            "error" => CacheLookup::error,
            "off" => CacheLookup::off,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLookupLabels {
    pub result: CacheLookup,
}

/// Outcome of a feature-cache write.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum CacheStore {
    ok,
    error,
}

impl CacheStore {
    pub fn parse(s: &str) -> Option<CacheStore> {
        Some(match s {
            "ok" => CacheStore::ok,
            "error" => CacheStore::error,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheStoreLabels {
    pub result: CacheStore,
}

/// Why a stage call went to another replica: a retry after a failed call, or a failover of a
/// stream that broke midway.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RetryKind {
    retry,
    failover,
}

impl RetryKind {
    pub fn parse(s: &str) -> Option<RetryKind> {
        Some(match s {
            "retry" => RetryKind::retry,
            "failover" => RetryKind::failover,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub stage: String,
    pub kind: RetryKind,
}

/// State of a KV-cache block: held by a running sequence, cached (an unreferenced prefix block,
/// reclaimable) or free.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum KvBlockState {
    used,
    cached,
    free,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KvBlockLabels {
    pub state: KvBlockState,
}

/// Whether a prompt position's KV came from the prefix cache (`hit`) or was computed (`miss`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum PrefixLookup {
    hit,
    miss,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefixLabels {
    pub result: PrefixLookup,
}

/// How a request's wait in the decoder's queue ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum QueueOutcome {
    admitted,
    expired,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueWaitLabels {
    pub outcome: QueueOutcome,
}

/// Of a service's memory budget (`--max-bytes-in-flight`): bytes reserved now, or the limit.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum MemoryState {
    used,
    limit,
}

/// `{service,state}` of a memory budget.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemoryBudgetLabels {
    pub service: &'static str,
    pub state: MemoryState,
}

/// What happened to a frame of a Watch stream (`received` counts every frame that arrived).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum WatchFrame {
    received,
    reused,
    partial,
    full,
    dropped,
    failed,
}

/// `{result}` of `vlm_watch_frames`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchFrameLabels {
    pub result: WatchFrame,
}

/// Why the gateway sent a decoder call where it did (`vlm_gateway_routing_decisions`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RouteReason {
    /// To the replica holding the longest prefix of the prompt.
    prefix,
    /// To the replica the request's session (its affinity key) went to before.
    affinity,
    /// The best-matching replica was over the load bound: to the best one within it.
    spilled,
    /// No replica holds any of the prompt: power of two choices over load.
    balanced,
    /// Prefix routing is off (`--decoder-routing balance`).
    off,
}

/// `{reason}` of the routing decisions and of the cached tokens they earned.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub reason: RouteReason,
}

/// Why the gateway gave up on a stage call that was still running.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum AbandonReason {
    /// No answer (or first token) within the adaptive timeout, while other replicas answer
    /// faster.
    slow,
    /// A decoder produced no next token within the adaptive timeout, while other replicas step
    /// faster.
    slow_token,
}

/// `{stage,reason}` of `vlm_gateway_abandoned_calls`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AbandonLabels {
    pub stage: &'static str,
    pub reason: AbandonReason,
}

/// Which certificate of a service: its mesh identity, or the gateway's public one.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TlsKind {
    mesh,
    public,
}

impl TlsKind {
    pub fn parse(s: &str) -> Option<TlsKind> {
        Some(match s {
            "mesh" => TlsKind::mesh,
            "public" => TlsKind::public,
            _ => return None,
        })
    }
}

/// `{service,kind}` of a certificate a service presents (`gateway`, `mesh`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub service: String,
    pub kind: TlsKind,
}

/// Outcome of a change of TLS files.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum TlsReload {
    loaded,
    refused,
}

/// `{service,kind,result}` of a TLS reload.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabels {
    #[prometheus(flatten)]
    pub tls: TlsLabels,
    pub result: TlsReload,
}
