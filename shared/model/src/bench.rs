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
