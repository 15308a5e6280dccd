//! Entry points for `examples/kernel_bench.rs`: the quantized and f32 products on either path,
//! old and new, through the crate's own types. Not an API: hidden from the docs and free to change.

use candle_core::quantized::GgmlDType;
use candle_core::{Module, Tensor};

use crate::qweight::{quantize_blocks, QWeight};

/// A quantized `[n, k]` weight on a chosen path.
pub struct QuantMatrix(QWeight);

impl QuantMatrix {
    /// `w` quantized to `format` (q8_0 or q4_K): repacked for the int8 GEMM when `packed` (and
    /// the CPU has AVX-512 VNNI), else the portable blocks and products.
    pub fn new(w: &Tensor, format: GgmlDType, packed: bool) -> candle_core::Result<Self> {
        let dims = w.dims2()?;
        let blocks = quantize_blocks(w, format)?;
        Ok(QuantMatrix(
            if packed && crate::kernels::qgemm_available() {
                QWeight::packed(blocks, dims)
            } else {
                QWeight::unpacked(blocks, dims)
            },
        ))
    }

    pub fn is_packed(&self) -> bool {
        self.0.is_packed()
    }

    /// `x Wᵀ`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.0.forward(x)
    }
}

/// An f32 `[n, k]` weight multiplied by the crate's f32 GEMM (candle's matmul where the CPU
/// lacks AVX-512).
pub struct F32Matrix {
    w: Vec<f32>,
    n: usize,
    k: usize,
}

impl F32Matrix {
    pub fn new(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        Ok(F32Matrix {
            w: w.flatten_all()?.to_vec1()?,
            n,
            k,
        })
    }

    /// `x Wᵀ` for `x [m, k]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (m, k) = x.dims2()?;
        if !crate::kernels::sgemm::available() || crate::kernels::gemm_disabled() {
            let w = Tensor::from_slice(&self.w, (self.n, self.k), x.device())?;
            return x.matmul(&w.t()?);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let out = crate::kernels::sgemm::gemm(&self.w, self.n, &xs, m, k);
        Tensor::from_vec(out, (m, self.n), x.device())
    }
}

/// Bytes one decode step of `cfg`'s decoder reads with its weights in `mode`: every layer's
/// matrices and the LM head (norms and the one embedding row are noise), and separately the KV
/// cache at `context` positions (keys and values, `dense_bytes` per value).
pub fn decode_bytes(
    cfg: &crate::config::TextConfig,
    mode: crate::Quantization,
    context: usize,
    dense_bytes: usize,
) -> (u64, u64) {
    let (h, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let layer: u64 = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
        .into_iter()
        .map(|dims| mode.matrix_bytes(dims, false, dense_bytes))
        .sum();
    let head = mode.matrix_bytes((cfg.vocab_size, h), true, dense_bytes);
    let weights = layer * cfg.num_hidden_layers as u64 + head;
    let kv_bytes = (2 * cfg.num_hidden_layers * kv * context * dense_bytes) as u64;
    (weights, kv_bytes)
}

/// Floating-point operations (2 per multiply-add) of a prefill of `rows` positions from an
/// empty cache: every layer's matrices on every row, causal attention (scores and the weighted
/// sum over the positions before each row), and the LM head on the last row.
pub fn prefill_flops(cfg: &crate::config::TextConfig, rows: usize) -> f64 {
    let (h, hd, i) = (
        cfg.hidden_size as f64,
        cfg.head_dim as f64,
        cfg.intermediate_size as f64,
    );
    let (q, kv) = (
        cfg.num_attention_heads as f64 * hd,
        cfg.num_key_value_heads as f64 * hd,
    );
    let r = rows as f64;
    let matrices = r * (q * h + 2.0 * kv * h + h * q + 3.0 * i * h);
    // Row t attends to t + 1 positions: QKᵀ and AV, q-width each.
    let attention = 2.0 * q * r * (r + 1.0) / 2.0;
    let layers = cfg.num_hidden_layers as f64;
    2.0 * (layers * (matrices + attention) + cfg.vocab_size as f64 * h)
}

/// STREAM-style read bandwidth in GB/s: `threads` threads sum disjoint parts of a buffer of
/// `bytes` (far larger than the caches), best of `rounds`.
pub fn read_bandwidth_gbs(bytes: usize, threads: usize, rounds: usize) -> f64 {
    let n = bytes / 4;
    let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let part = n.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let t = std::time::Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data.chunks(part).map(|c| s.spawn(move || sum(c))).collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (n * 4) as f64 / best / 1e9
}

/// The sum of `xs`: on AVX-512 with 64-byte loads and 8 independent sums (so the loads, not the
/// adds, limit it), else the portable code.
fn sum(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            return unsafe { sum_avx512(xs) };
        }
    }
    sum_portable(xs)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_avx512(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = xs.chunks_exact(128);
    let tail = sum_portable(chunks.remainder());
    let mut acc = [_mm512_setzero_ps(); 8];
    for c in chunks {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` holds 128 floats: 8 loads of 16.
            let v = unsafe { _mm512_loadu_ps(c.as_ptr().add(16 * j)) };
            *a = _mm512_add_ps(*a, v);
        }
    }
    acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum::<f32>() + tail
}

/// A sum the compiler vectorises (16 independent lanes).
fn sum_portable(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Iterations per second of `run(iters)` on `threads` threads at once, each running about
/// `millis` ms (the iteration count calibrated on one thread first).
fn iterations_per_s(threads: usize, millis: u64, run: impl Fn(usize) + Sync) -> f64 {
    let threads = threads.max(1);
    let mut iters = 1usize << 16;
    loop {
        let t = std::time::Instant::now();
        run(iters);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if ms > millis as f64 / 4.0 || iters > 1 << 34 {
            iters = ((iters as f64) * millis as f64 / ms.max(1e-3)) as usize;
            break;
        }
        iters *= 4;
    }
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| run(iters));
        }
    });
    (threads * iters) as f64 / t.elapsed().as_secs_f64()
}

/// The measured peak f32 multiply-add rate in GFLOP/s (2 per multiply-add) of `threads`
/// threads, each running independent fused multiply-adds on registers (AVX-512 where the CPU
/// has it, else AVX2/FMA, else scalar `mul_add`) for about `millis` ms. Returns the rate and
/// the instruction set used.
pub fn peak_fma_gflops(threads: usize, millis: u64) -> (f64, &'static str) {
    let isa = fma::isa();
    let per_s = iterations_per_s(threads, millis, |iters| {
        std::hint::black_box(fma::run(isa, iters));
    });
    (per_s * fma::flops_per_iter(isa) / 1e9, isa.name())
}

/// The measured peak int8 multiply-add rate in GOP/s (2 per multiply-add) of `threads` threads
/// running independent `vpdpbusd` (AVX-512 VNNI: 64 u8×i8 products a lane group) for about
/// `millis` ms, the instruction the quantized GEMMs run; `None` without AVX-512 VNNI.
pub fn peak_int8_gops(threads: usize, millis: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        if !is_x86_feature_detected!("avx512vnni") {
            return None;
        }
        let per_s = iterations_per_s(threads, millis, |iters| {
            // SAFETY: the CPU has AVX-512 VNNI (checked above).
            std::hint::black_box(unsafe { fma::x86::vnni(iters) });
        });
        // Each vpdpbusd: 16 lanes × 4 products, each a multiply and an add.
        Some(per_s * (fma::ACC * 16 * 4 * 2) as f64 / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, millis);
        None
    }
}

mod fma {
    #[derive(Clone, Copy)]
    pub enum Isa {
        Avx512,
        Avx2,
        Scalar,
    }

    impl Isa {
        pub fn name(self) -> &'static str {
            match self {
                Isa::Avx512 => "avx512f",
                Isa::Avx2 => "avx2+fma",
                Isa::Scalar => "scalar",
            }
        }
    }

    /// Independent accumulators: enough to cover the FMA latency times the FMA ports.
    pub const ACC: usize = 12;

    pub fn isa() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn flops_per_iter(isa: Isa) -> f64 {
        let lanes = match isa {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Scalar => 1,
        };
        (2 * ACC * lanes) as f64
    }

    pub fn run(isa: Isa, iters: usize) -> f32 {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa()` chose these only where the CPU has the features.
            Isa::Avx512 => unsafe { x86::avx512(iters) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { x86::avx2(iters) },
            _ => scalar(iters),
        }
    }

    fn scalar(iters: usize) -> f32 {
        let mut acc = [0f32; ACC];
        let (a, b) = (
            std::hint::black_box(0.999f32),
            std::hint::black_box(0.001f32),
        );
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = r.mul_add(a, b);
            }
        }
        acc.iter().sum()
    }

    #[cfg(target_arch = "x86_64")]
    pub mod x86 {
        use super::ACC;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub unsafe fn avx512(iters: usize) -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999), _mm512_set1_ps(0.001));
            let mut acc = [_mm512_setzero_ps(); ACC];
            for _ in 0..iters {
                for r in acc.iter_mut() {
                    *r = _mm512_fmadd_ps(*r, a, b);
                }
            }
            acc.iter().map(|&r| _mm512_reduce_add_ps(r)).sum()
        }

        #[target_feature(enable = "avx512f,avx512vnni")]
        pub unsafe fn vnni(iters: usize) -> i32 {
            let (a, b) = (_mm512_set1_epi8(3), _mm512_set1_epi8(-2));
            let mut acc = [_mm512_setzero_si512(); ACC];
            for _ in 0..iters {
                for r in acc.iter_mut() {
                    *r = _mm512_dpbusd_epi32(*r, a, b);
                }
            }
            acc.iter()
                .map(|&r| _mm512_reduce_add_epi32(r))
                .fold(0i32, i32::wrapping_add)
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn avx2(iters: usize) -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999), _mm256_set1_ps(0.001));
            let mut acc = [_mm256_setzero_ps(); ACC];
            for _ in 0..iters {
                for r in acc.iter_mut() {
                    *r = _mm256_fmadd_ps(*r, a, b);
                }
            }
            let mut out = [0f32; 8];
            let mut total = 0.0;
            for r in acc {
                _mm256_storeu_ps(out.as_mut_ptr(), r);
                total += out.iter().sum::<f32>();
            }
            total
        }
    }
}
