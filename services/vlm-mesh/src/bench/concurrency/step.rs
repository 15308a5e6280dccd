//! The decode step in process: one batched forward of N decode rows at a fixed context, without
//! the mesh (the text-generation speed `llama-batched-bench` reports per batch size). It shows
//! what batching itself buys, apart from arrivals, prefills and the network.

use std::path::Path;
use std::time::Instant;

use vlm_model::kv::KvPool;
use vlm_model::{BatchSeq, Checkpoint, DType, Decoder, Device};

use crate::bench::Spread;

/// Positions already in each sequence's cache when the timed steps start.
pub(super) const CONTEXT: usize = 256;

#[derive(serde::Serialize, Debug)]
pub(super) struct StepRow {
    /// Sequences per forward (decode rows).
    pub batch: usize,
    /// Context of each sequence at the first timed step.
    pub context: usize,
    pub step_ms: Spread,
    /// batch / p50 step time.
    pub tok_per_s: f64,
    /// p50 step time over that of batch 1 (what inter-token latency pays for batching)…
    pub step_over_batch_1: f64,
    /// …and tokens/s over that of batch 1 (what throughput gains).
    pub tok_per_s_over_batch_1: f64,
}

/// Times `steps` decode steps (after 2 untimed ones) at every batch size in `levels`.
pub(super) fn decode_steps(
    model: &Path,
    levels: &[usize],
    steps: usize,
) -> anyhow::Result<Vec<StepRow>> {
    let ckpt = Checkpoint::open(model)?;
    let decoder = Decoder::load(&ckpt, DType::F32, &Device::Cpu)?;
    let context = CONTEXT.min(decoder.max_positions().saturating_sub(steps + 3));
    anyhow::ensure!(
        context > 0,
        "the model's context is too short to time decode steps"
    );
    let bs = vlm_model::engine::DEFAULT_BLOCK_SIZE;
    let per_seq = (context + steps + 2).div_ceil(bs);
    let mut measured: Vec<(usize, Spread)> = Vec::new();
    for &n in levels {
        let mut pool = KvPool::new(decoder.kv_shape(bs), n * per_seq);
        pool.reserve(n * per_seq);
        let blocks: Vec<Vec<u32>> = (0..n)
            .map(|_| (0..per_seq).map(|_| pool.allocate()).collect())
            .collect();
        let ids: Vec<u32> = (1..=n as u32).collect();
        let mut times = Vec::with_capacity(steps);
        for step in 0..steps + 2 {
            let x = decoder.embed_tokens(&ids)?;
            let seqs: Vec<BatchSeq> = blocks
                .iter()
                .map(|b| BatchSeq {
                    blocks: b,
                    pos: context + step,
                    rows: 1,
                    rope: None,
                })
                .collect();
            let t = Instant::now();
            let logits = decoder.forward_batch(&x, &seqs, &mut pool, None)?;
            // The logits as the engine takes them, to sample from.
            let _rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            if step >= 2 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        measured.push((n, Spread::of(&mut times)?));
    }
    let base = measured
        .iter()
        .find(|m| m.0 == 1)
        .map(|m| m.1.p50)
        .ok_or_else(|| anyhow::anyhow!("the decode-step table needs batch size 1 as its base"))?;
    Ok(measured
        .into_iter()
        .map(|(batch, step_ms)| {
            let tok_per_s = batch as f64 * 1e3 / step_ms.p50;
            StepRow {
                batch,
                context,
                step_ms,
                tok_per_s,
                step_over_batch_1: step_ms.p50 / base,
                tok_per_s_over_batch_1: tok_per_s / (1e3 / base),
            }
        })
        .collect())
}
