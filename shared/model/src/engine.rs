//! The step engine: continuous batching over the paged KV cache.
//!
//! Every [`Engine::step`] advances all running sequences together: one forward carries the next
//! token of every decoding sequence (one row each, so the decoder's weights are read once per step
//! however many sequences run), and at most one chunk of at most `prefill_chunk` prompt positions of
//! one prefilling sequence runs beside it, so a long prompt arriving delays the running streams by
//! one chunk per step instead of its whole prefill. Sequences join between steps ([`Engine::try_admit`])
//! and leave as soon as they finish, without stalling the others.
//!
//! Admission is by KV memory: a sequence is admitted only when the blocks for its prompt plus
//! `max_tokens` fit next to what running sequences have been promised, so a running sequence never
//! runs out of cache. Its leading full prompt blocks are looked up in the prefix index first
//! ([`crate::kv`]); those positions are not computed again.
//!
//! Nothing here knows about threads or the network: the decoder service owns one engine on one
//! thread and feeds it requests; the in-process [`crate::Generation`] runs one sequence through the
//! same code.

use candle_core::{DType, Tensor};

use crate::decoder::{BatchSeq, Decoder};
use crate::error::{ModelError, Result};
use crate::generate::Completion;
use crate::kv::{block_hashes, next_block_hash, BlockHash, BlockId, KvPool, KvShape, PosKey};
use crate::linear::MAX_FAST_ROWS;
use crate::monitor::LayerStats;
use crate::mrope::RopePositions;
use crate::prompt::PromptBuilder;

mod types;

pub use types::{
    Admission, EngineConfig, EngineUsage, SeqId, SeqRequest, StepEvent, DEFAULT_BLOCK_SIZE,
    DEFAULT_PREFILL_CHUNK,
};

struct Seq<'a> {
    id: SeqId,
    /// Prefill input still to run (dropped once prefilled).
    embeds: Option<Tensor>,
    /// Keys of every position written or to be written (prompt, resumed, then fed tokens).
    keys: Vec<PosKey>,
    /// Hashes of the leading full blocks, as far as computed.
    chain: Vec<BlockHash>,
    blocks: Vec<BlockId>,
    /// Blocks still promised by the pool.
    reserved: usize,
    /// Positions in the cache.
    len: usize,
    /// Positions to prefill (prompt + resumed tokens).
    prefill_len: usize,
    /// The prompt's positions: those after it (resumed tokens) are replayed as decode rows.
    prompt_len: usize,
    cached_tokens: usize,
    monitor: Option<Vec<LayerStats>>,
    completion: Completion<'a>,
    /// The last sampled token, to feed at the next step.
    pending: Option<u32>,
    rope: Option<RopePositions>,
}

/// Continuous-batching scheduler over one decoder; see the module docs.
pub struct Engine<'a> {
    decoder: &'a Decoder,
    prompt: &'a PromptBuilder,
    cfg: EngineConfig,
    pool: KvPool,
    /// In admission order (the oldest prefilling sequence gets the next chunk).
    running: Vec<Seq<'a>>,
}

impl<'a> Engine<'a> {
    pub fn new(decoder: &'a Decoder, prompt: &'a PromptBuilder, cfg: EngineConfig) -> Self {
        let pool = KvPool::new(decoder.kv_shape(cfg.block_size), cfg.blocks);
        Engine {
            decoder,
            prompt,
            cfg,
            pool,
            running: Vec::new(),
        }
    }

    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    pub fn kv_shape(&self) -> KvShape {
        self.pool.shape()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty()
    }

    pub fn usage(&self) -> EngineUsage {
        let u = self.pool.usage();
        EngineUsage {
            running: self.running.len(),
            blocks_total: u.total,
            blocks_used: u.used,
            blocks_cached: u.cached,
            blocks_free: u.total - u.used - u.cached,
        }
    }

    /// Blocks a sequence of `positions` positions needs.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.cfg.block_size)
    }

    /// Refuses a request that could never run here, whatever else is running: context, sampling
    /// parameters, or more KV than the whole budget.
    pub fn check(&self, prompt_tokens: usize, max_tokens: usize) -> Result<()> {
        let ctx = self.decoder.max_positions();
        if prompt_tokens + max_tokens > ctx {
            return Err(ModelError::InvalidParams(format!(
                "prompt ({prompt_tokens} tokens incl. image rows) + max_tokens ({max_tokens}) exceeds the model's context of {ctx} tokens"
            )));
        }
        let need = self.blocks_for(prompt_tokens + max_tokens);
        if need > self.cfg.blocks {
            let shape = self.pool.shape();
            return Err(ModelError::InvalidParams(format!(
                "prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {} bytes of KV cache, more than the decoder's whole budget of {} bytes ({} tokens)",
                need * shape.block_bytes(),
                self.cfg.blocks * shape.block_bytes(),
                self.cfg.blocks * self.cfg.block_size
            )));
        }
        Ok(())
    }

    /// Admits `req` as sequence `id` if its KV fits now, or hands it back to wait.
    pub fn try_admit(&mut self, id: SeqId, req: SeqRequest) -> Result<Admission> {
        let (t, hidden) = req.embeds.dims2()?;
        if hidden != self.decoder.hidden_size() || t == 0 || req.keys.len() != t {
            return Err(ModelError::InvalidInput(format!(
                "prompt embeddings [{t}, {hidden}] with {} keys; expected [T>0, {}] and T keys",
                req.keys.len(),
                self.decoder.hidden_size()
            )));
        }
        if let Some(r) = &req.rope {
            if r.len() != t {
                return Err(ModelError::InvalidInput(format!(
                    "{} rotary positions for a prompt of {t} rows",
                    r.len()
                )));
            }
        }
        let max_tokens = req.params.max_tokens as usize;
        self.check(t, max_tokens)?;
        let completion = Completion::new(
            self.prompt,
            &req.params,
            &req.resume,
            t,
            self.decoder.max_positions(),
            req.constraint.clone(),
        )?;
        if self.running.len() >= self.cfg.max_batch {
            return Ok(Admission::Wait(req));
        }
        let mut keys = req.keys.clone();
        keys.extend(req.resume.iter().map(|&id| PosKey::Token(id)));
        let prefill_len = keys.len();
        // The last prefill position is always computed: its logits give the first token. Only
        // prompt blocks are shared: resumed positions are replayed as the decode steps that
        // first computed them (see `prefill_chunk`).
        let shareable = if req.monitor {
            0
        } else {
            (prefill_len - 1).min(t) / self.cfg.block_size
        };
        let hashes = block_hashes(
            &keys[..shareable * self.cfg.block_size],
            self.cfg.block_size,
        );
        let matched = self.pool.matched_prefix(&hashes);
        let new_blocks = self.blocks_for(t + max_tokens) - matched;
        if new_blocks + self.pool.idle_prefix(&hashes) > self.pool.usage().available() {
            return Ok(Admission::Wait(req));
        }
        let blocks = self.pool.lookup(&hashes[..matched]);
        self.pool.reserve(new_blocks);
        let embeds = if req.resume.is_empty() {
            req.embeds
        } else {
            Tensor::cat(
                &[
                    &req.embeds.to_dtype(self.decoder.dtype())?,
                    &self.decoder.embed_tokens(&req.resume)?,
                ],
                0,
            )?
        };
        let cached_tokens = matched * self.cfg.block_size;
        self.running.push(Seq {
            id,
            embeds: Some(embeds),
            keys,
            chain: hashes[..matched].to_vec(),
            blocks,
            reserved: new_blocks,
            len: cached_tokens,
            prefill_len,
            prompt_len: t,
            cached_tokens,
            monitor: req.monitor.then(Vec::new),
            completion,
            pending: None,
            rope: req.rope,
        });
        Ok(Admission::Admitted { cached_tokens })
    }

    /// Drops a sequence (its caller went away or its deadline passed); its blocks return to the
    /// pool, published ones as cached prefixes.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        match self.running.iter().position(|s| s.id == id) {
            Some(i) => {
                let s = self.running.remove(i);
                self.release(s);
                true
            }
            None => false,
        }
    }

    fn release(&mut self, s: Seq<'a>) {
        for &b in &s.blocks {
            self.pool.release(b);
        }
        self.pool.unreserve(s.reserved);
    }

    /// One step: a prefill chunk of the oldest prefilling sequence, and one token of every
    /// sequence that is decoding. Returns what happened, in order.
    pub fn step(&mut self) -> Result<Vec<StepEvent>> {
        let mut events = Vec::new();
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].pending.is_some())
            .collect();
        if let Some(i) = self.running.iter().position(|s| s.embeds.is_some()) {
            if let Err(error) = self.prefill_chunk(i, &mut events) {
                let s = self.running.remove(i);
                events.push(StepEvent::Failed { id: s.id, error });
                self.release(s);
                // Indices after `i` moved down by one.
                let decoding: Vec<usize> = decoding
                    .into_iter()
                    .map(|j| if j > i { j - 1 } else { j })
                    .collect();
                self.decode(&decoding, &mut events);
                self.retire();
                return Ok(events);
            }
        }
        self.decode(&decoding, &mut events);
        self.retire();
        Ok(events)
    }

    /// Removes finished sequences.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].completion.finish_reason().is_some() {
                let s = self.running.remove(i);
                self.release(s);
            } else {
                i += 1;
            }
        }
    }

    /// Makes sure sequence `i` has blocks for `rows` more positions.
    fn grow(&mut self, i: usize, rows: usize) -> Result<()> {
        let bs = self.cfg.block_size;
        while self.running[i].blocks.len() * bs < self.running[i].len + rows {
            if self.running[i].reserved == 0 {
                return Err(ModelError::InvalidParams(
                    "sequence outgrew its KV reservation".into(),
                ));
            }
            let b = self.pool.allocate();
            let s = &mut self.running[i];
            s.reserved -= 1;
            s.blocks.push(b);
        }
        Ok(())
    }

    /// Publishes sequence `i`'s blocks that became full.
    fn publish(&mut self, i: usize) {
        let bs = self.cfg.block_size;
        let s = &mut self.running[i];
        while s.chain.len() < s.len / bs {
            let b = s.chain.len();
            let prev = if b == 0 { [0u8; 32] } else { s.chain[b - 1] };
            let h = next_block_hash(&prev, &s.keys[b * bs..(b + 1) * bs]);
            s.chain.push(h);
            self.pool.publish(s.blocks[b], h);
        }
    }

    /// The next chunk of sequence `i`'s prefill: `(start, rows, replay)`. Prompt positions go in
    /// chunks of at most `prefill_chunk` (all at once for a monitored sequence); resumed tokens
    /// (`replay`) in chunks of at most [`MAX_FAST_ROWS`], each row on its own as a decode step.
    fn next_chunk(&self, i: usize) -> (usize, usize, bool) {
        let s = &self.running[i];
        if s.len < s.prompt_len {
            let left = s.prompt_len - s.len;
            let rows = if s.monitor.is_some() {
                left
            } else {
                left.min(self.cfg.prefill_chunk)
            };
            return (s.len, rows, false);
        }
        let rows = (s.prefill_len - s.len)
            .min(self.cfg.prefill_chunk)
            .min(MAX_FAST_ROWS);
        (s.len, rows, true)
    }

    /// Runs the next chunk of sequence `i`'s prefill. A resumed stream's tokens (those an earlier
    /// replica delivered) are replayed as one-row sequences sharing its blocks: each row takes
    /// the decode path (the few-row products and the in-place attention), so their keys, values
    /// and the last one's logits are the bits the uninterrupted run's decode steps computed, and
    /// a failover resumes with exactly its tokens, whatever kernels prefill uses.
    fn prefill_chunk(&mut self, i: usize, events: &mut Vec<StepEvent>) -> Result<()> {
        let (start, rows, replay) = self.next_chunk(i);
        let monitor = self.running[i].monitor.is_some() && !replay;
        self.grow(i, rows)?;
        let s = &mut self.running[i];
        let x = s
            .embeds
            .as_ref()
            .expect("prefilling sequences have embeddings")
            .narrow(0, start, rows)?;
        let mut stats = Vec::new();
        let seq = |pos: usize, rows: usize| BatchSeq {
            blocks: &s.blocks,
            pos,
            rows,
            rope: s.rope.as_ref(),
        };
        let seqs: Vec<BatchSeq> = if replay {
            (start..start + rows).map(|p| seq(p, 1)).collect()
        } else {
            vec![seq(start, rows)]
        };
        let logits =
            self.decoder
                .forward_batch(&x, &seqs, &mut self.pool, monitor.then_some(&mut stats))?;
        drop(seqs);
        s.len += rows;
        if let Some(m) = s.monitor.as_mut() {
            m.extend(stats);
        }
        self.publish(i);
        let s = &mut self.running[i];
        if s.len < s.prefill_len {
            return Ok(());
        }
        s.embeds = None;
        events.push(StepEvent::Prefilled {
            id: s.id,
            cached_tokens: s.cached_tokens,
            layers: s.monitor.take().unwrap_or_default(),
        });
        // The chunk's last row: the prompt's last position, or the last resumed token.
        let row = logits
            .get(logits.dim(0)? - 1)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let token = s.completion.accept(&row)?;
        s.pending = token.finish.is_none().then_some(token.id);
        events.push(StepEvent::Token {
            id: s.id,
            token,
            batch: 1,
        });
        Ok(())
    }

    /// Feeds each listed sequence's pending token in one forward and samples the next ones.
    fn decode(&mut self, which: &[usize], events: &mut Vec<StepEvent>) {
        if which.is_empty() {
            return;
        }
        if let Err(error) = self.decode_batch(which, events) {
            // A failed forward fails every sequence in it; the engine goes on with the rest.
            let msg = error.to_string();
            for &i in which {
                let s = &mut self.running[i];
                if s.completion.finish_reason().is_none() {
                    events.push(StepEvent::Failed {
                        id: s.id,
                        error: ModelError::InvalidInput(format!("batched decode step: {msg}")),
                    });
                }
            }
            let mut ids: Vec<SeqId> = which.iter().map(|&i| self.running[i].id).collect();
            ids.sort_unstable();
            for id in ids {
                self.cancel(id);
            }
        }
    }

    fn decode_batch(&mut self, which: &[usize], events: &mut Vec<StepEvent>) -> Result<()> {
        for &i in which {
            self.grow(i, 1)?;
        }
        let ids: Vec<u32> = which
            .iter()
            .map(|&i| {
                self.running[i]
                    .pending
                    .expect("decoding sequences have a token")
            })
            .collect();
        let x = self.decoder.embed_tokens(&ids)?;
        let logits = {
            let seqs: Vec<BatchSeq> = which
                .iter()
                .map(|&i| BatchSeq {
                    blocks: &self.running[i].blocks,
                    pos: self.running[i].len,
                    rows: 1,
                    rope: self.running[i].rope.as_ref(),
                })
                .collect();
            self.decoder
                .forward_batch(&x, &seqs, &mut self.pool, None)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
        };
        for (&i, (id, row)) in which.iter().zip(ids.into_iter().zip(logits)) {
            let s = &mut self.running[i];
            s.len += 1;
            s.keys.push(PosKey::Token(id));
            s.pending = None;
            self.publish(i);
            let s = &mut self.running[i];
            let token = s.completion.accept(&row)?;
            s.pending = token.finish.is_none().then_some(token.id);
            events.push(StepEvent::Token {
                id: s.id,
                token,
                batch: which.len(),
            });
        }
        Ok(())
    }
}
