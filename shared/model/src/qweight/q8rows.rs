//! q8_0 weights as two arrays, the form their dot products and the packer read.

use super::Q8_BLOCK;

/// q8_0 weights kept as two arrays: the int8 values row-major and one f32 scale per block of 32
/// (GGML's f16 scale, widened once at load), multiplied with f32 input rows directly: the
/// values are widened to f32 in registers, so the input is not rounded to 8 bits (what
/// candle's q8_0 kernel does, and slower here: its per-block f16 scale conversions and
/// sign tricks cost more than the memory they save on this CPU).
pub(crate) struct Q8Rows {
    pub(super) qs: Vec<i8>,
    pub(super) d: Vec<f32>,
}

impl Q8Rows {
    pub fn with_capacity(values: usize) -> Self {
        Q8Rows {
            qs: Vec::with_capacity(values),
            d: Vec::with_capacity(values / Q8_BLOCK),
        }
    }

    /// Appends `x` (whole blocks) quantized as GGML's q8_0: per block of 32, scale =
    /// max |x| / 127 (rounded to f16), values round(x / scale).
    /// The values (row-major) and the scales (one per block of 32, row by row).
    pub(crate) fn parts(&self) -> (&[i8], &[f32]) {
        (&self.qs, &self.d)
    }

    pub fn push(&mut self, x: &[f32]) {
        for b in x.chunks_exact(Q8_BLOCK) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            self.qs.extend(b.iter().map(|v| (v * id).round() as i8));
            self.d.push(half::f16::from_f32(d).to_f32());
        }
    }
}
