//! Entry points for `examples/kernel_bench.rs`: the quantized products on either path, old and
//! new, through the crate's own types. Not an API: hidden from the docs and free to change.

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
