//! A quantized weight matrix `[n, k]` and its products.
//!
//! Where the CPU has AVX-512 VNNI, q8_0 and q4_K matrices are repacked at load into the int8
//! GEMM's interleaved layout (`kernels::qpack`; the blocks are not kept beside it, so the
//! memory stays that of the blocks, within a few percent) and every product, one row or a
//! prefill of hundreds, quantizes its input rows once to 8 bits per block and runs the GEMM
//! (`kernels::qgemm`): llama.cpp's repack and llamafile's sgemm, on this crate's rayon pool.
//!
//! Elsewhere (and for q6_K, the LM head under `q4_k`) the blocks are candle's (`k_quants`):
//! q4_K / q6_K products use candle's dot-product kernels (`vec_dot`, AVX2 when the CPU has it),
//! each input row quantized to the kernels' 8-bit activation blocks; q8_0 its own kernel with
//! f32 inputs. The products are split over output columns on the rayon pool, the pool of our
//! own f32 kernels, not through candle's `QMatMul`, for two reasons measured on 2 cores: candle
//! runs its quantized products on a second thread pool of its own whose workers spin between
//! jobs, so a decode step that alternates between the two pools (attention and f32 work on
//! rayon) lost half its speed to the spinning; and `QMatMul` keeps, beside the blocks, a
//! repacked copy of every matrix for its AVX-512 VNNI kernels (and a third for AMX, of q4_K
//! matrices multiplied by 32 rows or more), which doubles to triples a quantized model's
//! memory: what quantizing is for.
//!
//! On every path each output element is computed by one fixed chain whatever the number of
//! input rows, so a sequence gets the same numbers in a batch as alone.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K, GgmlType};
use candle_core::quantized::{GgmlDType, QTensor, QuantizedType};
// (QuantizedType: the dequantizing `embedding` of `Vec<block>`.)
use candle_core::{CpuStorage, Device, Module, Storage, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

use crate::kernels::{self, Packed, QActs};

mod packing;
mod q8rows;
pub(crate) use packing::PackedRows;
pub(crate) use q8rows::Q8Rows;

/// Output columns per rayon task: each task's weight rows stay in cache while every input row
/// is multiplied with them.
const COLS_PER_TASK: usize = 64;

#[derive(Clone)]
pub(crate) struct QWeight {
    blocks: Arc<Blocks>,
    n: usize,
    k: usize,
}

pub(crate) enum Blocks {
    Q8_0(Q8Rows),
    Q4K(Vec<BlockQ4K>),
    Q6K(Vec<BlockQ6K>),
    /// q8_0 or q4_K repacked for the int8 GEMM (where the CPU has AVX-512 VNNI).
    Packed(Packed),
}

impl std::fmt::Debug for QWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QWeight([{}, {}])", self.n, self.k)
    }
}

/// Blocks of one of the formats quantization uses.
pub(crate) trait IntoBlocks {
    fn into_blocks(self) -> Blocks;
}

macro_rules! into_blocks {
    ($($t:ty => $v:ident),+) => {$(
        impl IntoBlocks for Vec<$t> {
            fn into_blocks(self) -> Blocks {
                Blocks::$v(self)
            }
        }
    )+};
}
into_blocks!(BlockQ4K => Q4K, BlockQ6K => Q6K);

impl IntoBlocks for Blocks {
    fn into_blocks(self) -> Blocks {
        self
    }
}

impl IntoBlocks for Q8Rows {
    fn into_blocks(self) -> Blocks {
        Blocks::Q8_0(self)
    }
}

/// Values per q8_0 block.
const Q8_BLOCK: usize = 32;

/// `Σ w·x` over one q8_0 row: each block's 32 products summed in 16 lanes, scaled, accumulated;
/// the lanes summed as a fixed tree. One chain per element, whatever rows it is computed with.
#[inline(always)]
fn dot_q8(qs: &[i8], d: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for ((q, &s), x) in qs.chunks_exact(32).zip(d).zip(x.chunks_exact(32)) {
        let mut p = [0f32; 16];
        for i in 0..16 {
            p[i] = (q[i + 16] as f32).mul_add(x[i + 16], q[i] as f32 * x[i]);
        }
        for i in 0..16 {
            acc[i] = p[i].mul_add(s, acc[i]);
        }
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0]
}

/// [`dot_q8`] for `R` input rows at once, on AVX-512: each block's 32 values are widened once
/// and used for every row. Per row the operations are the same as one row alone (one product
/// pair, one fused add per block, a fixed final reduction), so the grouping never changes a
/// result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_q8_avx512<const R: usize>(qs: &[i8], d: &[f32], x: [&[f32]; R]) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    for (b, &s) in d.iter().enumerate() {
        let at = b * Q8_BLOCK;
        // SAFETY: at + 32 <= qs.len() and <= every x[r].len() (k values, whole blocks).
        unsafe {
            let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                qs.as_ptr().add(at) as *const __m128i
            )));
            let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                qs.as_ptr().add(at + 16) as *const __m128i,
            )));
            let s = _mm512_set1_ps(s);
            for r in 0..R {
                let x0 = _mm512_loadu_ps(x[r].as_ptr().add(at));
                let x1 = _mm512_loadu_ps(x[r].as_ptr().add(at + 16));
                let p = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                acc[r] = _mm512_fmadd_ps(p, s, acc[r]);
            }
        }
    }
    std::array::from_fn(|r| _mm512_reduce_add_ps(acc[r]))
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`products`] for q8_0 rows: f32 inputs, no input quantization; on AVX-512, four input rows
/// share each widened weight block.
fn products_q8(w: &Q8Rows, (m, k, n): (usize, usize, usize), lhs: &[f32]) -> Vec<f32> {
    let kb = k / Q8_BLOCK;
    let avx512 = has_avx512();
    in_tasks(m, n, |first, cols, out| {
        for c in 0..cols {
            let j = first + c;
            let (qs, d) = (&w.qs[j * k..(j + 1) * k], &w.d[j * kb..(j + 1) * kb]);
            let x = |r: usize| &lhs[r * k..(r + 1) * k];
            let mut r = 0;
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                while r + 4 <= m {
                    // SAFETY: the CPU has AVX-512F.
                    let v =
                        unsafe { dot_q8_avx512::<4>(qs, d, [x(r), x(r + 1), x(r + 2), x(r + 3)]) };
                    for (i, v) in v.into_iter().enumerate() {
                        out[(r + i) * COLS_PER_TASK + c] = v;
                    }
                    r += 4;
                }
                while r < m {
                    // SAFETY: as above.
                    out[r * COLS_PER_TASK + c] = unsafe { dot_q8_avx512::<1>(qs, d, [x(r)]) }[0];
                    r += 1;
                }
            }
            for r in r..m {
                out[r * COLS_PER_TASK + c] = dot_q8(qs, d, x(r));
            }
        }
    })
}

/// Runs `task(first column, columns, out)` for every group of [`COLS_PER_TASK`] output columns
/// on the rayon pool, `out` laid out `[row][COLS_PER_TASK]`; returns `[m, n]`.
fn in_tasks(m: usize, n: usize, task: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let tasks = n.div_ceil(COLS_PER_TASK);
    let mut blocked = vec![0f32; tasks * m * COLS_PER_TASK];
    blocked
        .par_chunks_mut(m * COLS_PER_TASK)
        .enumerate()
        .for_each(|(t, out)| {
            let first = t * COLS_PER_TASK;
            task(first, COLS_PER_TASK.min(n - first), out)
        });
    let mut dst = Vec::with_capacity(m * n);
    for r in 0..m {
        for (t, block) in blocked.chunks(m * COLS_PER_TASK).enumerate() {
            let cols = COLS_PER_TASK.min(n - t * COLS_PER_TASK);
            dst.extend_from_slice(&block[r * COLS_PER_TASK..r * COLS_PER_TASK + cols]);
        }
    }
    dst
}

/// A whole `[n, k]` tensor quantized to `format`'s blocks.
pub(crate) fn quantize_blocks(w: &Tensor, format: GgmlDType) -> candle_core::Result<Blocks> {
    let (n, k) = w.dims2()?;
    Ok(match format {
        GgmlDType::Q8_0 => {
            let mut rows = Q8Rows::with_capacity(n * k);
            rows.push(
                &w.to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?,
            );
            Blocks::Q8_0(rows)
        }
        GgmlDType::Q4K | GgmlDType::Q6K => {
            let bytes = QTensor::quantize(w, format)?.data()?.into_owned();
            match format {
                GgmlDType::Q4K => Blocks::Q4K(blocks_from_bytes(&bytes)),
                _ => Blocks::Q6K(blocks_from_bytes(&bytes)),
            }
        }
        other => candle_core::bail!("no quantized products in {other:?}"),
    })
}

/// GGML's bytes of each q4_K block (`repr(C)` plain data of exactly 144 bytes).
pub(crate) fn block_bytes(blocks: &[BlockQ4K]) -> Vec<[u8; 144]> {
    const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
    let mut out = vec![[0u8; 144]; blocks.len()];
    // SAFETY: `out` holds exactly `blocks.len()` × 144 bytes, does not overlap `blocks`, and
    // `BlockQ4K` is 144 bytes of f16 and u8 fields without padding (candle asserts its size).
    unsafe {
        std::ptr::copy_nonoverlapping(
            blocks.as_ptr() as *const u8,
            out.as_mut_ptr() as *mut u8,
            out.len() * 144,
        )
    };
    out
}

/// Reinterprets GGML block bytes as blocks of `T` (copied: the bytes may not be aligned).
fn blocks_from_bytes<T: GgmlType>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let mut out = vec![T::zeros(); bytes.len() / size];
    // SAFETY: `out` holds exactly bytes.len() / size blocks of the repr(C) plain-data type `T`
    // (f16, f32 and integer fields only: every bit pattern is a value), and does not overlap
    // `bytes`.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            out.as_mut_ptr() as *mut u8,
            out.len() * size,
        )
    };
    out
}

impl QWeight {
    /// `blocks` hold `[n, k]`: q8_0 and q4_K repacked for the int8 GEMM where the CPU has
    /// AVX-512 VNNI (the blocks as they are elsewhere, and for q6_K).
    pub fn new(blocks: impl IntoBlocks, dims: (usize, usize)) -> Self {
        let blocks = blocks.into_blocks();
        if kernels::qgemm_available() {
            Self::packed(blocks, dims)
        } else {
            Self::unpacked(blocks, dims)
        }
    }

    /// `blocks` kept as they are: the portable products (the path of CPUs without VNNI).
    pub(crate) fn unpacked(blocks: impl IntoBlocks, (n, k): (usize, usize)) -> Self {
        QWeight {
            blocks: Arc::new(blocks.into_blocks()),
            n,
            k,
        }
    }

    /// q8_0 and q4_K `blocks` repacked for the int8 GEMM (other formats kept, and every format
    /// where the CPU cannot run the GEMM).
    pub(crate) fn packed(blocks: impl IntoBlocks, (n, k): (usize, usize)) -> Self {
        if !kernels::qgemm_supported() {
            return Self::unpacked(blocks, (n, k));
        }
        let blocks = match blocks.into_blocks() {
            Blocks::Q8_0(rows) => {
                let (qs, d) = rows.parts();
                Blocks::Packed(Packed::q8_0(qs, d, (n, k)))
            }
            Blocks::Q4K(b) => Blocks::Packed(Packed::q4k(&block_bytes(&b), (n, k))),
            other => other,
        };
        QWeight {
            blocks: Arc::new(blocks),
            n,
            k,
        }
    }

    /// Whether the products run on the int8 GEMM.
    pub(crate) fn is_packed(&self) -> bool {
        matches!(&*self.blocks, Blocks::Packed(_))
    }

    /// Quantizes a whole `[n, k]` tensor (models built in memory; checkpoints stream instead).
    pub fn quantize(w: &Tensor, format: GgmlDType) -> candle_core::Result<Self> {
        Ok(Self::new(quantize_blocks(w, format)?, w.dims2()?))
    }

    /// Rows `ids` of the matrix, dequantized: `[..ids, k]` (an embedding lookup).
    pub fn rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let flat = ids.flatten_all()?.to_vec1::<u32>()?;
        if let Some(bad) = flat.iter().find(|&&i| i as usize >= self.n) {
            candle_core::bail!("row {bad} is outside the {} rows", self.n);
        }
        let out = match &*self.blocks {
            Blocks::Q8_0(b) => {
                let (k, kb) = (self.k, self.k / Q8_BLOCK);
                let mut v = Vec::with_capacity(flat.len() * k);
                for &id in &flat {
                    let (qs, d) = (
                        &b.qs[id as usize * k..][..k],
                        &b.d[id as usize * kb..][..kb],
                    );
                    v.extend(
                        qs.iter()
                            .enumerate()
                            .map(|(i, &q)| q as f32 * d[i / Q8_BLOCK]),
                    );
                }
                CpuStorage::F32(v)
            }
            Blocks::Q4K(b) => b.embedding(&flat, self.n, self.k)?,
            Blocks::Q6K(b) => b.embedding(&flat, self.n, self.k)?,
            Blocks::Packed(p) => {
                let mut v = vec![0f32; flat.len() * self.k];
                for (&id, row) in flat.iter().zip(v.chunks_exact_mut(self.k)) {
                    p.dequantize_row(id as usize, row);
                }
                CpuStorage::F32(v)
            }
        };
        let CpuStorage::F32(v) = out else {
            candle_core::bail!("dequantized rows are not f32");
        };
        let mut dims = ids.dims().to_vec();
        dims.push(self.k);
        Tensor::from_vec(v, dims, &Device::Cpu)
    }
}

/// `out[r][c] = w[c] · x[r]` for the `m` rows of `lhs`, laid out `[task][row][COLS_PER_TASK]`.
fn products<T: GgmlType>(w: &[T], (m, k, n): (usize, usize, usize), lhs: &[f32]) -> Vec<f32>
where
    T::VecDotType: Send + Sync,
{
    let kb = k / T::BLCK_SIZE;
    let mut xq = vec![T::VecDotType::zeros(); m * kb];
    if m == 1 {
        T::VecDotType::from_float(lhs, &mut xq);
    } else {
        xq.par_chunks_mut(kb)
            .zip(lhs.par_chunks(k))
            .for_each(|(q, x)| T::VecDotType::from_float(x, q));
    }
    in_tasks(m, n, |first, cols, out| {
        let col = |c: usize| &w[(first + c) * kb..(first + c + 1) * kb];
        for r in 0..m {
            let x = &xq[r * kb..(r + 1) * kb];
            let row = &mut out[r * COLS_PER_TASK..];
            let mut c = 0;
            while c + 4 <= cols {
                let d = T::vec_dot_4(k, col(c), col(c + 1), col(c + 2), col(c + 3), x);
                (row[c], row[c + 1], row[c + 2], row[c + 3]) = d;
                c += 4;
            }
            for (c, v) in row.iter_mut().enumerate().take(cols).skip(c) {
                *v = T::vec_dot(k, col(c), x);
            }
        }
    })
}

impl Module for QWeight {
    /// `x Wᵀ` for f32 `x [..., k]` on the CPU.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let mut dims = x.dims().to_vec();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("input {dims:?} does not end in {} values", self.k);
        }
        let m = x.elem_count() / self.k;
        let mkn = (m, self.k, self.n);
        let dst = {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
                candle_core::bail!("quantized products take f32 input on the CPU");
            };
            let lhs = &data[layout.start_offset()..layout.start_offset() + m * self.k];
            match &*self.blocks {
                Blocks::Q8_0(w) => products_q8(w, mkn, lhs),
                Blocks::Q4K(w) => products(w, mkn, lhs),
                Blocks::Q6K(w) => products(w, mkn, lhs),
                Blocks::Packed(w) => kernels::qgemm(w, &QActs::quantize(w.format, lhs, self.k)),
            }
        };
        *dims.last_mut().expect("checked above") = self.n;
        Tensor::from_vec(dst, dims, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product's relative error against the dense one.
    fn rel_err(ours: &Tensor, dense: &Tensor) -> f32 {
        let num = (ours - dense).unwrap().sqr().unwrap().sum_all().unwrap();
        let den = dense.sqr().unwrap().sum_all().unwrap();
        (num.to_scalar::<f32>().unwrap() / den.to_scalar::<f32>().unwrap()).sqrt()
    }

    /// Both paths, packed for the int8 GEMM (where the CPU has it) and the portable blocks: close
    /// to the dense product, with the same embedding rows, and each row of a batch what it is
    /// alone. Odd shapes: `n` not a multiple of the 16-column group, one block of `k`, edge
    /// inputs (a zero row, a row of one huge value, a constant row).
    #[test]
    fn packed_and_portable_products_are_close_and_rows_do_not_depend_on_the_batch() {
        let dev = Device::Cpu;
        for (format, k, tol) in [
            (GgmlDType::Q8_0, 32, 0.02),
            (GgmlDType::Q8_0, 160, 0.02),
            (GgmlDType::Q4K, 256, 0.15),
            (GgmlDType::Q4K, 512, 0.15),
        ] {
            let n = 37;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
            let mut x = Tensor::randn(0f32, 1.0, (7, k), &dev)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            x[1].fill(0.0);
            x[2].fill(0.0);
            x[2][k / 3] = 3.0e4;
            x[3].fill(-0.75);
            let x = Tensor::new(x, &dev).unwrap();
            let dense = x.matmul(&w.t().unwrap()).unwrap();
            let portable = QWeight::unpacked(quantize_blocks(&w, format).unwrap(), (n, k));
            let packed = QWeight::packed(quantize_blocks(&w, format).unwrap(), (n, k));
            assert!(!portable.is_packed());
            assert_eq!(packed.is_packed(), kernels::qgemm_supported());
            let ids = Tensor::new(&[0u32, 16, 36], &dev).unwrap();
            assert_eq!(
                packed.rows(&ids).unwrap().to_vec2::<f32>().unwrap(),
                portable.rows(&ids).unwrap().to_vec2::<f32>().unwrap(),
                "{format:?}: dequantized rows"
            );
            for q in [&portable, &packed] {
                let ours = q.forward(&x).unwrap();
                let rows = ours.to_vec2::<f32>().unwrap();
                assert!(rows[1].iter().all(|&v| v == 0.0), "{format:?}: a zero row");
                let e = rel_err(&ours, &dense);
                assert!(
                    e < tol,
                    "{format:?} k {k} packed {}: relative error {e}",
                    q.is_packed()
                );
                for (r, row) in rows.iter().enumerate() {
                    let alone = q.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
                    assert_eq!(
                        &alone.to_vec2::<f32>().unwrap()[0],
                        row,
                        "{format:?} row {r}"
                    );
                }
            }
        }
    }
}
