//! A linear layer whose few-row products (a decode step of a batch of sequences) run as a
//! multi-threaded product that reads each weight once.
//!
//! candle sends a `[1, k] × [k, n]` product to the `gemm` crate's matrix-vector path, which runs on
//! one thread. Decoding is a chain of such products over every decoder weight: bound by memory
//! bandwidth, which one core cannot use up. Here the weight's rows (`[n, k]`, row-major as stored)
//! are split across the rayon pool (the same pool candle's own matmuls use, sized by
//! `RAYON_NUM_THREADS`); each weight row is read once and multiplied with every input row while it
//! sits in cache, so a batch of up to [`MAX_FAST_ROWS`] sequences costs one pass over the weights.
//! Every output element is the same [`dot`] whatever the number of rows, so a sequence decoded in a
//! batch gets bit-identical results to the same sequence decoded alone. Every other input (more
//! rows, other dtypes or devices, non-contiguous weights) takes candle's path unchanged.

use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// `y = x Wᵀ + b`, a drop-in for [`candle_nn::Linear`].
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
}

/// Output elements per rayon task: large enough that scheduling costs nothing next to the
/// `ROWS_PER_TASK × k` weights each task streams, small enough to balance two to a few dozen cores.
const ROWS_PER_TASK: usize = 64;

/// Input rows up to which a product reads the weight once and reuses it from cache; beyond this a
/// prefill chunk is compute-bound and candle's blocked matmul is the faster path.
pub const MAX_FAST_ROWS: usize = 32;

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The product for at most [`MAX_FAST_ROWS`] input rows of f32 on the CPU, or `None` where
    /// candle's path applies.
    fn matvec(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.inner.weight();
        let Ok((n, k)) = w.dims2() else {
            return Ok(None);
        };
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || w.dtype() != DType::F32
            || x.dims().last() != Some(&k)
            || x.elem_count() == 0
            || x.elem_count() > MAX_FAST_ROWS * k
        {
            return Ok(None);
        }
        let m = x.elem_count() / k;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        // Output laid out [task][row][j] while computing, so each task owns one contiguous slice.
        let tasks = n.div_ceil(ROWS_PER_TASK);
        let mut blocked = vec![0f32; tasks * m * ROWS_PER_TASK];
        {
            let (storage, layout) = w.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Ok(None);
            };
            let w = &data[start..end];
            blocked
                .par_chunks_mut(m * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * ROWS_PER_TASK;
                    let rows = ROWS_PER_TASK.min(n - first);
                    let w = |j: usize| &w[(first + j) * k..(first + j + 1) * k];
                    let x = |r: usize| &xs[r * k..(r + 1) * k];
                    let mut put = |j: usize, r: usize, v: f32| out[r * ROWS_PER_TASK + j] = v;
                    // Groups of four input rows against pairs of weight rows, the rest of the
                    // input rows one at a time against four weight rows: every element is the
                    // same `products` chain whatever the grouping.
                    let mut r = 0;
                    while r + 4 <= m {
                        let xr = [x(r), x(r + 1), x(r + 2), x(r + 3)];
                        let mut j = 0;
                        while j + 2 <= rows {
                            let d = products::<2, 4>([w(j), w(j + 1)], xr);
                            for (dj, row) in d.iter().enumerate() {
                                for (dr, &v) in row.iter().enumerate() {
                                    put(j + dj, r + dr, v);
                                }
                            }
                            j += 2;
                        }
                        if j < rows {
                            let d = products::<1, 4>([w(j)], xr);
                            for (dr, &v) in d[0].iter().enumerate() {
                                put(j, r + dr, v);
                            }
                        }
                        r += 4;
                    }
                    for r in r..m {
                        let mut j = 0;
                        while j + 4 <= rows {
                            let d = products::<4, 1>([w(j), w(j + 1), w(j + 2), w(j + 3)], [x(r)]);
                            for (dj, row) in d.iter().enumerate() {
                                put(j + dj, r, row[0]);
                            }
                            j += 4;
                        }
                        for j in j..rows {
                            put(j, r, products::<1, 1>([w(j)], [x(r)])[0][0]);
                        }
                    }
                });
        }
        let mut out = vec![0f32; m * n];
        for (task, block) in blocked.chunks(m * ROWS_PER_TASK).enumerate() {
            let first = task * ROWS_PER_TASK;
            let width = ROWS_PER_TASK.min(n - first);
            for r in 0..m {
                out[r * n + first..r * n + first + width]
                    .copy_from_slice(&block[r * ROWS_PER_TASK..r * ROWS_PER_TASK + width]);
            }
        }
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has k elements on its last axis") = n;
        let y = Tensor::from_vec(out, dims, x.device())?;
        match self.inner.bias() {
            None => Ok(Some(y)),
            Some(b) => Ok(Some(y.broadcast_add(b)?)),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self.matvec(x)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// `candle_nn::linear_b` returning our [`Linear`].
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    let l = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
    Ok(Linear::new(l.weight().clone(), l.bias().cloned()))
}

/// Lanes summed independently, so the compiler keeps them in vector registers.
const LANES: usize = 16;

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// Lanes of one accumulator register (AVX2: 8 f32).
const PRODUCT_LANES: usize = 8;

/// Dot products of `R` weight rows with `C` input rows: `out[r][c] = w[r] · x[c]`. Each element is
/// one chain: fused multiply-adds over 8 lanes in order, then the lanes summed in order, then the
/// tail, so it is bit-identical for any `R` and `C`: a row's result never depends on which rows
/// it was grouped with (a sequence decodes the same in a batch as alone). The `R × C` independent
/// accumulators keep the FMA units busy while each loaded weight chunk is used `C` times.
fn products_lanes<const R: usize, const C: usize>(w: [&[f32]; R], x: [&[f32]; C]) -> [[f32; C]; R] {
    const L: usize = PRODUCT_LANES;
    let k = w[0].len();
    let body = k / L * L;
    let mut acc = [[[0f32; L]; C]; R];
    let mut at = 0;
    while at < body {
        for (ar, wr) in acc.iter_mut().zip(&w) {
            let wc: &[f32; L] = wr[at..at + L].try_into().expect("L lanes");
            for (a, xr) in ar.iter_mut().zip(&x) {
                let xc: &[f32; L] = xr[at..at + L].try_into().expect("L lanes");
                for i in 0..L {
                    a[i] = wc[i].mul_add(xc[i], a[i]);
                }
            }
        }
        at += L;
    }
    let mut out = [[0f32; C]; R];
    for ((o, ar), wr) in out.iter_mut().zip(&acc).zip(&w) {
        for ((o, a), xr) in o.iter_mut().zip(ar).zip(&x) {
            let tail: f32 = wr[body..].iter().zip(&xr[body..]).map(|(p, q)| p * q).sum();
            *o = a.iter().sum::<f32>() + tail;
        }
    }
    out
}

/// [`products_lanes`] with AVX2 registers: the same per-element operations (lane-wise fused
/// multiply-adds over 8 lanes, then the lanes summed in order, then the tail).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn products_avx2<const R: usize, const C: usize>(
    w: [&[f32]; R],
    x: [&[f32]; C],
) -> [[f32; C]; R] {
    use std::arch::x86_64::*;
    const L: usize = PRODUCT_LANES;
    let k = w[0].len();
    let body = k / L * L;
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut at = 0;
    while at < body {
        let mut xv = [_mm256_setzero_ps(); C];
        for c in 0..C {
            // SAFETY: at + L <= body <= x[c].len() (every row has k elements).
            xv[c] = unsafe { _mm256_loadu_ps(x[c].as_ptr().add(at)) };
        }
        for r in 0..R {
            // SAFETY: as above, for the weight rows.
            let wv = unsafe { _mm256_loadu_ps(w[r].as_ptr().add(at)) };
            for c in 0..C {
                acc[r][c] = _mm256_fmadd_ps(wv, xv[c], acc[r][c]);
            }
        }
        at += L;
    }
    let mut out = [[0f32; C]; R];
    for r in 0..R {
        for c in 0..C {
            let mut lanes = [0f32; L];
            // SAFETY: `lanes` holds L f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]) };
            let tail: f32 = w[r][body..]
                .iter()
                .zip(&x[c][body..])
                .map(|(p, q)| p * q)
                .sum();
            out[r][c] = lanes.iter().sum::<f32>() + tail;
        }
    }
    out
}

/// [`products_lanes`], compiled for AVX2+FMA where the CPU has them (elsewhere `mul_add` is a
/// correctly rounded software FMA: the same numbers, slower).
fn products<const R: usize, const C: usize>(w: [&[f32]; R], x: [&[f32]; C]) -> [[f32; C]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features products_avx2 is compiled for.
            return unsafe { products_avx2(w, x) };
        }
    }
    products_lanes(w, x)
}

/// Dot product of two equal-length f32 slices (AVX2+FMA where the CPU has them).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features dot_avx2 is compiled for.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_lanes(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_row_matches_candles_matmul_with_and_without_bias() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // k not a multiple of the lane count, n not a multiple of the task size.
        let (n, k) = (203, 77);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, n, &dev)?;
        for bias in [None, Some(b)] {
            let ours = Linear::new(w.clone(), bias.clone());
            let theirs = candle_nn::Linear::new(w.clone(), bias);
            for shape in [vec![1, k], vec![1, 1, k]] {
                let x = Tensor::randn(0f32, 1.0, shape.clone(), &dev)?;
                assert!(
                    ours.matvec(&x)?.is_some(),
                    "fast path not taken for {shape:?}"
                );
                let (a, b) = (ours.forward(&x)?, theirs.forward(&x)?);
                assert_eq!(a.dims(), b.dims());
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-4, "{shape:?}: max |diff| {diff}");
            }
        }
        // A batch of rows: each row's result is bit-identical to that row alone.
        let ours = Linear::new(w.clone(), None);
        let x = Tensor::randn(0f32, 1.0, (9, k), &dev)?;
        let batched = ours.forward(&x)?;
        let theirs = candle_nn::Linear::new(w.clone(), None).forward(&x)?;
        let diff = (&batched - theirs)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "9 rows: max |diff| {diff}");
        for r in 0..9 {
            let alone = ours.forward(&x.narrow(0, r, 1)?)?;
            let row = batched.narrow(0, r, 1)?;
            assert_eq!(alone.to_vec2::<f32>()?, row.to_vec2::<f32>()?, "row {r}");
        }
        // More rows than the fast path takes go to candle.
        let x = Tensor::randn(0f32, 1.0, (1, MAX_FAST_ROWS + 1, k), &dev)?;
        assert!(Linear::new(w, None).matvec(&x)?.is_none());
        Ok(())
    }
}
