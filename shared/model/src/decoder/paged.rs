//! The batched forward's attention over the paged KV pool: projections on all rows at once, new
//! keys and values written into each sequence's blocks, decode rows attending over their blocks in
//! place (the few-row kernels), prefill chunks as dense products over the gathered cache.

use candle_core::{DType, Module, Tensor};
use candle_transformers::utils::repeat_kv;
use rayon::prelude::*;

use super::{causal_mask, Attention, Layer, Rope};
use crate::kernels::{row_dots, weighted_sum};
use crate::kv::{BlockId, KvPool};
use crate::vision::softmax_f32;

impl Attention {
    /// Attention for the rows of several sequences at once (`x` is `[N, hidden]`, each sequence's
    /// rows consecutive): the projections run on all rows together, the new keys and values go
    /// into each sequence's blocks, and each sequence attends over its own cache.
    pub(super) fn forward_batch(
        &self,
        x: &Tensor,
        rope: (&Rope, &Tensor, &Tensor),
        layer: usize,
        seqs: &[BatchSeq],
        pool: &mut KvPool,
    ) -> candle_core::Result<Tensor> {
        let (rope, cos, sin) = rope;
        let n = x.dim(0)?;
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        // [N, heads*d] → [1, heads, N, d] for the rotation, and back to f32 rows.
        let heads = |y: Tensor, count: usize| y.reshape((1, n, count, d))?.transpose(1, 2);
        let rows = |y: &Tensor, count: usize| {
            y.transpose(1, 2)?
                .reshape((n, count * d))?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let q = rope.apply_with(&heads(self.q.forward(x)?, h)?, cos, sin)?;
        let k = rope.apply_with(&heads(self.k.forward(x)?, kvh)?, cos, sin)?;
        let v = self.v.forward(x)?;
        let (qs, ks) = (rows(&q, h)?, rows(&k, kvh)?);
        let vs = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut r = 0;
        for s in seqs {
            for i in 0..s.rows {
                let (row, p) = (r + i, s.pos + i);
                let at = row * kvh * d..(row + 1) * kvh * d;
                let bs = pool.shape().block_size;
                pool.write(layer, s.blocks[p / bs], p % bs, &ks[at.clone()], &vs[at]);
            }
            r += s.rows;
        }
        let mut out = vec![0f32; n * h * d];
        let pool = &*pool;
        // Single-row sequences (decode steps): a kernel reading the blocks in place, one task per
        // (row, head). Each row's result depends only on its own sequence.
        let mut single = vec![None; n];
        let mut r = 0;
        for s in seqs {
            if s.rows == 1 {
                single[r] = Some((s.blocks, s.pos + 1));
            }
            r += s.rows;
        }
        let rep = h / kvh;
        out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
            let (row, head) = (task / h, task % h);
            if let Some((blocks, len)) = single[row] {
                let q = &qs[(row * h + head) * d..(row * h + head + 1) * d];
                attend(pool, layer, blocks, head / rep, len, q, o);
            }
        });
        // Prefill chunks: dense products over the gathered cache, with the causal mask.
        let mut r = 0;
        for s in seqs {
            if s.rows > 1 {
                let y = self.dense_prefill(&q.narrow(2, r, s.rows)?, pool, layer, s)?;
                out[r * h * d..(r + s.rows) * h * d].copy_from_slice(&y);
            }
            r += s.rows;
        }
        let out = Tensor::from_vec(out, (n, h * d), x.device())?.to_dtype(x.dtype())?;
        self.o.forward(&out)
    }

    /// Attention of `q [1, H, t, d]` (positions `s.pos..s.pos+t`) over the sequence's cache,
    /// as `[t, H*d]` f32 rows.
    fn dense_prefill(
        &self,
        q: &Tensor,
        pool: &KvPool,
        layer: usize,
        s: &BatchSeq,
    ) -> candle_core::Result<Vec<f32>> {
        let (t, total) = (s.rows, s.pos + s.rows);
        let (k, v) = pool.gather(layer, s.blocks, total);
        let shape = (1, self.kv_heads, total, self.head_dim);
        let dev = q.device();
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(Tensor::from_vec(k, shape, dev)?, rep)?.contiguous()?;
        let v = repeat_kv(Tensor::from_vec(v, shape, dev)?, rep)?.contiguous()?;
        let q = q.to_dtype(DType::F32)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?
            .broadcast_add(&causal_mask(t, s.pos, DType::F32, dev)?)?;
        softmax_f32(&scores)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((t, self.heads * self.head_dim))?
            .flatten_all()?
            .to_vec1::<f32>()
    }
}

/// One query row's attention over positions `0..len` of one KV head, reading the blocks in place:
/// scores scaled by 1/√d, softmax in f32, weighted sum of the values into `out`.
fn attend(
    pool: &KvPool,
    layer: usize,
    blocks: &[BlockId],
    kv_head: usize,
    len: usize,
    q: &[f32],
    out: &mut [f32],
) {
    let d = q.len();
    let scale = (d as f32).sqrt();
    let mut scores = Vec::with_capacity(len);
    for keys in pool.head_slices(false, layer, blocks, kv_head, len) {
        let from = scores.len();
        row_dots(q, keys, &mut scores);
        for s in &mut scores[from..] {
            *s /= scale;
        }
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
    out.fill(0.0);
    let mut j = 0;
    for values in pool.head_slices(true, layer, blocks, kv_head, len) {
        let n = values.len() / d;
        weighted_sum(&scores[j..j + n], values, out);
        j += n;
    }
}

impl Layer {
    pub(super) fn forward_batch(
        &self,
        x: &Tensor,
        rope: (&Rope, &Tensor, &Tensor),
        layer: usize,
        seqs: &[BatchSeq],
        pool: &mut KvPool,
    ) -> candle_core::Result<Tensor> {
        self.around(x, |h| self.attn.forward_batch(h, rope, layer, seqs, pool))
    }
}

/// One sequence's share of a batched forward ([`super::Decoder::forward_batch`]).
#[derive(Debug, Clone, Copy)]
pub struct BatchSeq<'b> {
    /// Its KV blocks, covering at least positions `0..pos + rows`.
    pub blocks: &'b [BlockId],
    /// Positions already in its cache: its first row goes at this position.
    pub pos: usize,
    /// Its rows of the batch input (consecutive, in `seqs` order).
    pub rows: usize,
    /// M-RoPE models (GLM-4.1V): the sequence's 3-D positions; `None`: position = cache index
    /// on every axis (text only).
    pub rope: Option<&'b crate::mrope::RopePositions>,
}
