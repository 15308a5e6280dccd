//! A linear layer whose few-row products (a decode step of a batch of sequences) run as a
//! multi-threaded product that reads each weight once.
//!
//! candle sends a `[1, k] × [k, n]` product to the `gemm` crate's matrix-vector path, which runs on
//! one thread. Decoding is a chain of such products over every decoder weight: bound by memory
//! bandwidth, which one core cannot use up. Here the weight's rows (`[n, k]`, row-major as stored)
//! are split across the rayon pool (the same pool candle's own matmuls use, sized by
//! `RAYON_NUM_THREADS`); each weight row is read once and multiplied with every input row while it
//! sits in registers, so a batch of up to [`MAX_FAST_ROWS`] sequences costs one pass over the
//! weights (the kernels are in `kernels`). Every output element is the same chain whatever the
//! number of rows, so a sequence decoded in a batch gets bit-identical results to the same sequence
//! decoded alone. More rows (a prefill chunk), and every product of the vision tower and the
//! projector, run on the f32 GEMM (`kernels::sgemm`, where the CPU has AVX-512: register-blocked
//! and cache-tiled, over the weights as stored), whose elements are each one chain whatever the
//! number of rows too. Every other input (other dtypes or devices, non-contiguous weights, CPUs
//! without AVX-512) takes candle's path unchanged. f32 CPU weights are copied to
//! cache-line-aligned storage at load.

use candle_core::{CpuStorage, DType, Device, Module, Storage, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use crate::kernels::{isa, sgemm, task_products, ROWS_PER_TASK};
use crate::qweight::QWeight;

/// `y = x Wᵀ + b`, a drop-in for [`candle_nn::Linear`]; the weight dense or quantized
/// (`crate::quant`).
#[derive(Clone, Debug)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The quantized weight, when there is one: `inner` then holds an empty placeholder weight
    /// and only its bias is used.
    quantized: Option<QWeight>,
    /// Whether few-row products take the multi-threaded path (decoder layers) or the GEMM
    /// whatever the rows (vision and projector: on the GEMM a row's result never depends on how
    /// the rows are chunked).
    fast: bool,
}

thread_local! {
    /// The calling thread's output buffer of the few-row products (kept between calls: a decode
    /// step makes a hundred of them, and a fresh buffer each time costs page faults and zeroing).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Input rows up to which a product reads the weight once and reuses it from cache; beyond this a
/// prefill chunk is compute-bound and the f32 GEMM is the faster path.
pub const MAX_FAST_ROWS: usize = 32;

impl Linear {
    /// An f32 CPU weight is copied to a cache-line-aligned start (see [`aligned`]); any other
    /// weight is kept as it is.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        let weight = match aligned(&weight) {
            Ok(Some(w)) => w,
            _ => weight,
        };
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
            quantized: None,
            fast: true,
        }
    }

    /// A dense layer that multiplies every input with the f32 GEMM (candle's matmul where the
    /// CPU lacks AVX-512).
    pub(crate) fn plain(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear {
            inner: candle_nn::Linear::new(weight, bias),
            quantized: None,
            fast: false,
        }
    }

    /// A layer whose weight is quantized (see [`QWeight`]).
    pub(crate) fn quantized(weight: QWeight, bias: Option<Tensor>) -> Linear {
        let placeholder = Tensor::zeros(0, DType::F32, &Device::Cpu).expect("an empty tensor");
        Linear {
            inner: candle_nn::Linear::new(placeholder, bias),
            quantized: Some(weight),
            fast: false,
        }
    }

    pub fn is_quantized(&self) -> bool {
        self.quantized.is_some()
    }

    fn forward_quantized(&self, w: &QWeight, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = w.forward(x)?;
        match self.inner.bias() {
            None => Ok(y),
            Some(b) => y.broadcast_add(b),
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
        let Some(xs) = AlignedRows::of(x)? else {
            return Ok(None);
        };
        let xs = xs.as_slice();
        let out = SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut blocked) => self.product_rows(&mut blocked, xs, m),
            // Re-entered on this thread (a rayon worker that took up another product while it
            // waited for its own): a buffer of its own.
            Err(_) => self.product_rows(&mut Vec::new(), xs, m),
        })?;
        let Some(out) = out else {
            return Ok(None);
        };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("x has k elements on its last axis") = n;
        let y = Tensor::from_vec(out, dims, x.device())?;
        match self.inner.bias() {
            None => Ok(Some(y)),
            Some(b) => Ok(Some(y.broadcast_add(b)?)),
        }
    }

    /// `x Wᵀ` for the `m` rows of `xs` (`[m, k]`, row-major) as `[m, n]`, computed in `blocked`
    /// (laid out `[task][row][j]`, so each task owns one contiguous slice); `None` if the weight
    /// is not contiguous f32 on the CPU.
    fn product_rows(
        &self,
        blocked: &mut Vec<f32>,
        xs: &[f32],
        m: usize,
    ) -> candle_core::Result<Option<Vec<f32>>> {
        let w = self.inner.weight();
        let (n, k) = w.dims2()?;
        let tasks = n.div_ceil(ROWS_PER_TASK);
        // Every element is written by its task before it is read: no need to clear it.
        blocked.resize(tasks * m * ROWS_PER_TASK, 0.0);
        {
            let (storage, layout) = w.storage_and_layout();
            let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
                (&*storage, layout.contiguous_offsets())
            else {
                return Ok(None);
            };
            let w = &data[start..end];
            let isa = isa();
            blocked
                .par_chunks_mut(m * ROWS_PER_TASK)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * ROWS_PER_TASK;
                    let rows = ROWS_PER_TASK.min(n - first);
                    task_products(isa, &w[first * k..(first + rows) * k], k, xs, m, out);
                });
        }
        let mut out = Vec::with_capacity(m * n);
        for r in 0..m {
            for (task, block) in blocked.chunks(m * ROWS_PER_TASK).enumerate() {
                let width = ROWS_PER_TASK.min(n - task * ROWS_PER_TASK);
                out.extend_from_slice(&block[r * ROWS_PER_TASK..r * ROWS_PER_TASK + width]);
            }
        }
        Ok(Some(out))
    }
}

impl Linear {
    /// The product on the f32 GEMM ([`crate::kernels::sgemm`]) for f32 input and weights on
    /// the CPU, where the CPU has AVX-512; `None` where candle's matmul applies.
    fn gemm(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.inner.weight();
        let Ok((n, k)) = w.dims2() else {
            return Ok(None);
        };
        if !sgemm::available()
            || crate::kernels::gemm_disabled()
            || !matches!(x.device(), Device::Cpu)
            || x.dtype() != DType::F32
            || w.dtype() != DType::F32
            || x.dims().last() != Some(&k)
            || x.elem_count() == 0
            || k == 0
        {
            return Ok(None);
        }
        let m = x.elem_count() / k;
        let x = x.contiguous()?;
        let out = {
            let (ws, wl) = w.storage_and_layout();
            let (xs, xl) = x.storage_and_layout();
            let (
                Storage::Cpu(CpuStorage::F32(wd)),
                Some((w0, w1)),
                Storage::Cpu(CpuStorage::F32(xd)),
                Some((x0, x1)),
            ) = (&*ws, wl.contiguous_offsets(), &*xs, xl.contiguous_offsets())
            else {
                return Ok(None);
            };
            sgemm::gemm(&wd[w0..w1], n, &xd[x0..x1], m, k)
        };
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
        if let Some(w) = &self.quantized {
            return self.forward_quantized(w, x);
        }
        // Few rows of a decoder layer: the kernels that read each weight once; more rows (and
        // every product of the vision tower and projector, whatever the rows: a row's result
        // never depends on the others) the f32 GEMM, else candle's matmul.
        if self.fast {
            if let Some(y) = self.matvec(x)? {
                return Ok(y);
            }
        }
        match self.gemm(x)? {
            Some(y) => Ok(y),
            None => self.inner.forward(x),
        }
    }
}

/// Bytes of a cache line: vector loads that start on one never straddle two.
const CACHE_LINE: usize = 64;
/// f32 per cache line.
const LINE_F32: usize = CACHE_LINE / std::mem::size_of::<f32>();

/// A copy of an f32 CPU tensor whose data starts on a cache-line boundary: a view (offset 0 to 15
/// floats) into a slightly larger buffer. Allocators align large buffers to 16 bytes, so without
/// this most 64-byte loads of a weight row straddle two cache lines and cost two loads. `None`
/// for other dtypes and devices.
fn aligned(t: &Tensor) -> candle_core::Result<Option<Tensor>> {
    if starts_on_cache_line(t) {
        // Already aligned (the checkpoint loader writes f32 weights aligned): no second copy.
        return Ok(None);
    }
    let Some(rows) = AlignedRows::of(t)? else {
        return Ok(None);
    };
    let n = rows.len;
    let flat = Tensor::from_vec(rows.buf, n + LINE_F32, t.device())?.narrow(0, rows.start, n)?;
    Ok(Some(flat.reshape(t.dims())?))
}

/// True for a contiguous f32 CPU tensor whose first element starts a cache line.
fn starts_on_cache_line(t: &Tensor) -> bool {
    if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
        return false;
    }
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) if start < end => {
            (data[start..end].as_ptr() as usize).is_multiple_of(CACHE_LINE)
        }
        _ => false,
    }
}

/// An f32 tensor of `dims` over `src`'s elements, its data starting on a cache line (what
/// [`Linear::new`] would otherwise copy it to).
pub(crate) fn aligned_tensor(
    fill: impl FnOnce(&mut [f32]) -> candle_core::Result<()>,
    len: usize,
    dims: &[usize],
) -> candle_core::Result<Tensor> {
    let mut buf = vec![0f32; len + LINE_F32];
    let misalign = (buf.as_ptr() as usize % CACHE_LINE) / std::mem::size_of::<f32>();
    let start = (LINE_F32 - misalign) % LINE_F32;
    fill(&mut buf[start..start + len])?;
    let flat = Tensor::from_vec(buf, len + LINE_F32, &Device::Cpu)?.narrow(0, start, len)?;
    flat.reshape(dims)
}

/// Floats copied to a cache-line-aligned start inside a buffer `LINE_F32` floats longer.
struct AlignedRows {
    buf: Vec<f32>,
    start: usize,
    len: usize,
}

impl AlignedRows {
    /// The elements of an f32 CPU tensor, copied once from its storage (`None` for other dtypes
    /// and devices).
    fn of(t: &Tensor) -> candle_core::Result<Option<Self>> {
        if !matches!(t.device(), Device::Cpu) || t.dtype() != DType::F32 {
            return Ok(None);
        }
        let t = t.contiguous()?;
        let (storage, layout) = t.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        Ok(Some(Self::new(&data[start..end])))
    }

    fn new(src: &[f32]) -> Self {
        let mut buf = vec![0f32; src.len() + LINE_F32];
        let misalign = (buf.as_ptr() as usize % CACHE_LINE) / std::mem::size_of::<f32>();
        let start = (LINE_F32 - misalign) % LINE_F32;
        buf[start..start + src.len()].copy_from_slice(src);
        AlignedRows {
            buf,
            start,
            len: src.len(),
        }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
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
        // More rows than the fast path takes go to the f32 GEMM (candle's matmul without
        // AVX-512).
        let x = Tensor::randn(0f32, 1.0, (1, MAX_FAST_ROWS + 1, k), &dev)?;
        assert!(Linear::new(w, None).matvec(&x)?.is_none());
        Ok(())
    }

    /// Many rows, a decoder layer and a vision one: close to candle's matmul (the GEMM sums in
    /// another order), and on the GEMM a vision layer's rows the same bits however they are
    /// chunked (a projector multiplies rows as they arrive).
    #[test]
    fn many_rows_match_candles_matmul_and_chunking_never_changes_a_row() -> candle_core::Result<()>
    {
        let dev = Device::Cpu;
        let (n, k) = (70, 301);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 1.0, n, &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 50, k), &dev)?;
        let theirs = candle_nn::Linear::new(w.clone(), Some(b.clone())).forward(&x)?;
        for layer in [
            Linear::new(w.clone(), Some(b.clone())),
            Linear::plain(w.clone(), Some(b.clone())),
        ] {
            let ours = layer.forward(&x)?;
            assert_eq!(ours.dims(), theirs.dims());
            let diff = (&ours - &theirs)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-3, "fast {}: max |diff| {diff}", layer.fast);
        }
        let plain = Linear::plain(w, Some(b));
        let rows = x.reshape((100, k))?;
        let whole = plain.forward(&rows)?.to_vec2::<f32>()?;
        let mut chunked = Vec::new();
        for (start, len) in [(0, 1), (1, 64), (65, 3), (68, 32)] {
            chunked.extend(
                plain
                    .forward(&rows.narrow(0, start, len)?)?
                    .to_vec2::<f32>()?,
            );
        }
        // candle's matmul (CPUs without AVX-512, or `VLM_NO_GEMM`) does not promise it.
        if sgemm::available() && !crate::kernels::gemm_disabled() {
            assert_eq!(whole, chunked);
        }
        Ok(())
    }
}
