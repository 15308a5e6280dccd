//! A q8_0 / q4_K weight packed for the int8 GEMM while its rows stream in: every whole group of
//! [`GROUP`] rows is quantized and packed as soon as it has arrived, so loading never holds the
//! whole matrix twice (its blocks and their packed copy), only a slice of rows. The packed
//! layout is group-major and quantization is per row, so the result is bit for bit what
//! packing the whole matrix at once gives.

use std::sync::Arc;

use candle_core::quantized::k_quants::{BlockQ4K, GgmlType};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::{block_bytes, Blocks, Q8Rows, QWeight};
use crate::kernels::qpack::{Format, Line, GROUP};
use crate::kernels::Packed;

/// See the module docs.
pub(crate) struct PackedRows {
    format: GgmlDType,
    n: usize,
    k: usize,
    /// f32 rows received but not yet a whole group.
    pending: Vec<f32>,
    lines: Vec<Line>,
    rows: usize,
}

impl PackedRows {
    /// An `[n, k]` weight in `format` (q8_0 or q4_K).
    pub(crate) fn new(format: GgmlDType, (n, k): (usize, usize)) -> candle_core::Result<Self> {
        if !matches!(format, GgmlDType::Q8_0 | GgmlDType::Q4K)
            || !k.is_multiple_of(format.block_size())
        {
            candle_core::bail!("cannot pack [{n}, {k}] as {format:?}");
        }
        let kind = match format {
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => Format::Q4K,
        };
        // Exactly the packed size up front: growing by doubling would leave freed copies behind.
        let lines = n.div_ceil(GROUP) * (k / kind.block()) * kind.lines();
        Ok(PackedRows {
            format,
            n,
            k,
            pending: Vec::new(),
            lines: Vec::with_capacity(lines),
            rows: 0,
        })
    }

    /// Appends whole rows (`x.len()` a multiple of `k`).
    pub(crate) fn push(&mut self, x: &[f32]) -> candle_core::Result<()> {
        if !x.len().is_multiple_of(self.k) || self.rows + x.len() / self.k > self.n {
            candle_core::bail!(
                "{} values are not whole rows of {} within {}",
                x.len(),
                self.k,
                self.n
            );
        }
        self.rows += x.len() / self.k;
        let whole = |values: usize| values / (GROUP * self.k) * (GROUP * self.k);
        if self.pending.is_empty() {
            let w = whole(x.len());
            self.pack(&x[..w]);
            self.pending.extend_from_slice(&x[w..]);
        } else {
            self.pending.extend_from_slice(x);
            let w = whole(self.pending.len());
            if w > 0 {
                let rest = self.pending.split_off(w);
                let done = std::mem::replace(&mut self.pending, rest);
                self.pack(&done);
            }
        }
        Ok(())
    }

    /// The packed weight (the last group padded, as whole-matrix packing pads it).
    pub(crate) fn finish(mut self) -> candle_core::Result<QWeight> {
        if self.rows != self.n {
            candle_core::bail!("{} rows of {} received", self.rows, self.n);
        }
        let rest = std::mem::take(&mut self.pending);
        self.pack(&rest);
        let (n, k) = (self.n, self.k);
        let format = match self.format {
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => Format::Q4K,
        };
        let packed = Packed {
            format,
            n,
            k,
            lines: self.lines,
        };
        Ok(QWeight {
            blocks: Arc::new(Blocks::Packed(packed)),
            n,
            k,
        })
    }

    /// Quantizes and packs `x` (whole groups, or the last rows of the matrix).
    fn pack(&mut self, x: &[f32]) {
        if x.is_empty() {
            return;
        }
        let (rows, k) = (x.len() / self.k, self.k);
        let packed = if self.format == GgmlDType::Q8_0 {
            let mut q = Q8Rows::with_capacity(x.len());
            q.push(x);
            let (qs, d) = q.parts();
            Packed::q8_0(qs, d, (rows, k))
        } else {
            let per_row = k / BlockQ4K::BLCK_SIZE;
            let mut blocks = vec![BlockQ4K::zeros(); rows * per_row];
            x.par_chunks(k)
                .zip(blocks.par_chunks_mut(per_row))
                .for_each(|(x, y)| BlockQ4K::from_float(x, y));
            Packed::q4k(&block_bytes(&blocks), (rows, k))
        };
        self.lines.extend_from_slice(&packed.lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Rows pushed in uneven slices pack to exactly the lines of the whole matrix packed at once.
    #[test]
    fn streamed_packing_equals_whole_matrix_packing() {
        if !crate::kernels::qgemm_supported() {
            return;
        }
        let (n, k) = (45, 512);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        for format in [GgmlDType::Q8_0, GgmlDType::Q4K] {
            let whole = QWeight::packed(super::super::quantize_blocks(&w, format).unwrap(), (n, k));
            let mut b = PackedRows::new(format, (n, k)).unwrap();
            for rows in values.chunks(7 * k) {
                b.push(rows).unwrap();
            }
            let streamed = b.finish().unwrap();
            let (Blocks::Packed(a), Blocks::Packed(b)) = (&*whole.blocks, &*streamed.blocks) else {
                panic!("not packed");
            };
            assert_eq!((a.n, a.k, a.format), (b.n, b.k, b.format));
            assert_eq!(a.lines.len(), b.lines.len(), "{format:?}");
            assert_eq!(b.lines.capacity(), b.lines.len(), "allocated once, exactly");
            assert!(
                a.lines.iter().zip(&b.lines).all(|(x, y)| x.0 == y.0),
                "{format:?}"
            );
        }
    }
}
