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
                    for j in 0..ROWS_PER_TASK.min(n - first) {
                        let row = &w[(first + j) * k..(first + j + 1) * k];
                        for r in 0..m {
                            out[r * ROWS_PER_TASK + j] = dot(row, &xs[r * k..(r + 1) * k]);
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
        let x = Tensor::randn(0f32, 1.0, (5, k), &dev)?;
        let batched = ours.forward(&x)?;
        let theirs = candle_nn::Linear::new(w.clone(), None).forward(&x)?;
        let diff = (&batched - theirs)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "5 rows: max |diff| {diff}");
        for r in 0..5 {
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
