//! A linear layer whose one-row products (a decode step) run as a multi-threaded matrix-vector
//! product.
//!
//! candle sends a `[1, k] × [k, n]` product to the `gemm` crate's matrix-vector path, which runs on
//! one thread. Decoding one token is a chain of such products over every decoder weight: bound by
//! memory bandwidth, which one core cannot use up. Here the weight's rows (`[n, k]`, row-major as
//! stored) are split across the rayon pool (the same pool candle's own matmuls use, sized by
//! `RAYON_NUM_THREADS`), each output element a dot product over a contiguous row. Every other input
//! (several rows, other dtypes or devices, non-contiguous weights) takes candle's path unchanged.

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

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The product for one input row of f32 on the CPU, or `None` where candle's path applies.
    fn matvec(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.inner.weight();
        let Ok((n, k)) = w.dims2() else {
            return Ok(None);
        };
        if !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || w.dtype() != DType::F32
            || x.elem_count() != k
            || x.dims().last() != Some(&k)
        {
            return Ok(None);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut out = vec![0f32; n];
        {
            let (storage, layout) = w.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Ok(None);
            };
            let w = &data[start..end];
            out.par_chunks_mut(ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, out)| {
                    let rows = &w[task * ROWS_PER_TASK * k..];
                    for (j, o) in out.iter_mut().enumerate() {
                        *o = dot(&rows[j * k..(j + 1) * k], &xs);
                    }
                });
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

fn dot(a: &[f32], b: &[f32]) -> f32 {
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
        // Several rows take candle's path.
        let x = Tensor::randn(0f32, 1.0, (1, 3, k), &dev)?;
        assert!(Linear::new(w, None).matvec(&x)?.is_none());
        Ok(())
    }
}
