//! The engine's vocabulary: its sizes, the sequences it is given, and what admitting and stepping
//! them answer. The scheduler that uses them is [`super::Engine`].

use candle_core::Tensor;

use crate::constraint::Constraint;
use crate::decoder::Decoder;
use crate::error::ModelError;
use crate::generate::TokenEvent;
use crate::kv::PosKey;
use crate::monitor::LayerStats;
use crate::mrope::RopePositions;
use crate::sampling::SamplingParams;

/// Positions per KV block: small enough that little is wasted at the end of a sequence and prefixes
/// match at a fine grain, large enough that block bookkeeping is negligible (vLLM's default too).
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Prompt positions per prefill chunk: large enough that the chunk's matrix products run at full
/// speed, small enough that running streams wait at most one such chunk per token.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Sizes of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Blocks in the pool (the KV budget divided by the block size in bytes).
    pub blocks: usize,
    /// Most sequences running at once (the batch size cap).
    pub max_batch: usize,
    pub prefill_chunk: usize,
}

impl EngineConfig {
    /// The pool that `kv_cache_bytes` buys for `decoder`.
    pub fn with_budget(
        decoder: &Decoder,
        kv_cache_bytes: usize,
        max_batch: usize,
        prefill_chunk: usize,
    ) -> Self {
        let block_size = DEFAULT_BLOCK_SIZE;
        let shape = decoder.kv_shape(block_size);
        EngineConfig {
            block_size,
            blocks: kv_cache_bytes / shape.block_bytes(),
            max_batch: max_batch.max(1),
            prefill_chunk: prefill_chunk.max(1),
        }
    }

    /// Exactly enough for one sequence of `positions` positions.
    pub fn for_one(positions: usize) -> Self {
        EngineConfig {
            block_size: DEFAULT_BLOCK_SIZE,
            blocks: positions.div_ceil(DEFAULT_BLOCK_SIZE),
            max_batch: 1,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Caller-chosen identity of a sequence.
pub type SeqId = u64;

/// A sequence to run.
#[derive(Clone)]
pub struct SeqRequest {
    /// Prompt embeddings `[T, hidden]` (image rows spliced in).
    pub embeds: Tensor,
    /// What each of the `T` prompt positions is, for prefix sharing.
    pub keys: Vec<PosKey>,
    pub params: SamplingParams,
    /// Tokens an earlier replica already delivered: prefilled after the prompt, not emitted again.
    pub resume: Vec<u32>,
    /// Per-layer statistics of the prefill. Such a sequence prefills in one piece and computes
    /// every position (no prefix reuse), so the statistics cover the whole prompt.
    pub monitor: bool,
    /// M-RoPE models (GLM-4.1V) with images in the prompt: the prompt's 3-D positions
    /// ([`crate::mrope`]), one per prompt row. `None`: position = index (text only, and every
    /// other model).
    pub rope: Option<RopePositions>,
    /// `params.format` compiled (off the engine's thread, by the caller); compiled at admission
    /// when `None` and a format is set.
    pub constraint: Option<Constraint>,
}

/// Outcome of [`super::Engine::try_admit`]. (A request handed back is moved once per admission
/// attempt; boxing it would save a copy of a few hundred bytes per attempt, nothing per step.)
#[allow(clippy::large_enum_variant)]
pub enum Admission {
    /// Running from the next step; this many prompt positions came from the prefix cache.
    Admitted { cached_tokens: usize },
    /// Not now (KV memory or the batch cap): try again after a step.
    Wait(SeqRequest),
}

/// What a step produced, in order.
#[derive(Debug)]
pub enum StepEvent {
    /// The prompt is in the cache; the sequence's first token follows in the same step.
    Prefilled {
        id: SeqId,
        /// Prefill positions reused from the prefix cache.
        cached_tokens: usize,
        /// With [`SeqRequest::monitor`]: one row per decoder layer.
        layers: Vec<LayerStats>,
    },
    /// A sampled token; `token.finish` is set on the last one, after which the sequence is gone.
    Token {
        id: SeqId,
        token: TokenEvent,
        /// Sequences in the forward that produced it.
        batch: usize,
    },
    /// The sequence failed and is gone.
    Failed { id: SeqId, error: ModelError },
}

/// Pool and batch state for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineUsage {
    pub running: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub blocks_cached: usize,
    pub blocks_free: usize,
}
