//! Weights quantized straight out of the mapped checkpoint, a slice of rows at a time (the f32
//! matrix never exists whole): packed for the int8 GEMM as the rows arrive where the CPU runs
//! it, else kept as blocks.

use candle_core::quantized::k_quants::{BlockQ4K, BlockQ6K};
use candle_core::quantized::GgmlDType;
use candle_core::safetensors::Load;
use candle_core::{DType, Device};

use super::{stream, PartBackend};
use crate::quant::QuantSource;
use crate::qweight::{PackedRows, QWeight};

impl QuantSource for PartBackend {
    fn quantized(
        &self,
        name: &str,
        (n, k): (usize, usize),
        format: GgmlDType,
    ) -> candle_core::Result<QWeight> {
        let physical = self.physical(name)?;
        let view = self.st.get(&physical)?;
        if view.shape() != [n, k] {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {}.{name}", self.kind.name()),
                expected: (n, k).into(),
                got: view.shape().into(),
            }
            .bt());
        }
        let data = view.data();
        let (q, digest) = match (stream::Dtype::of(view.dtype()), format) {
            (None, _) => {
                let t = view.load(&Device::Cpu)?.to_dtype(DType::F32)?;
                (QWeight::quantize(&t, format)?, blake3::hash(data))
            }
            // Packed for the int8 GEMM a group of rows at a time: the matrix never twice.
            (Some(src), GgmlDType::Q8_0 | GgmlDType::Q4K) if crate::kernels::qgemm_available() => {
                let mut rows = PackedRows::new(format, (n, k))?;
                let h = stream::stream_rows(data, src, k, |_, x| rows.push(x))?;
                (rows.finish()?, h)
            }
            (Some(src), GgmlDType::Q8_0) => {
                let (b, h) = stream::quantize_q8(data, src, (n, k))?;
                (QWeight::new(b, (n, k)), h)
            }
            (Some(src), GgmlDType::Q4K) => {
                let (b, h) = stream::quantize_rows::<BlockQ4K>(data, src, (n, k))?;
                (QWeight::new(b, (n, k)), h)
            }
            (Some(src), GgmlDType::Q6K) => {
                let (b, h) = stream::quantize_rows::<BlockQ6K>(data, src, (n, k))?;
                (QWeight::new(b, (n, k)), h)
            }
            (_, other) => candle_core::bail!("no streaming quantization to {other:?}"),
        };
        self.record(physical, data.len() as u64, digest);
        Ok(q)
    }
}
