//! Intermediate-state monitoring: summary statistics of a layer's hidden state, so a request can
//! show where activations blow up or turn NaN without dumping tensors. Computed only when asked
//! for (`Option<&mut Vec<LayerStats>>` is `None` otherwise), so the normal path pays nothing.

use candle_core::{DType, Tensor};

use crate::Result;

/// Statistics of one layer's output. Mean, standard deviation (population) and absolute maximum
/// are over the finite elements; NaN and ±Inf elements are counted instead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerStats {
    /// 0-based index of the layer whose output this is.
    pub layer: usize,
    pub mean: f64,
    pub std: f64,
    pub abs_max: f64,
    pub nan_count: u64,
    pub inf_count: u64,
}

impl LayerStats {
    /// Statistics of `hidden` (any shape, any float dtype), accumulated in f64.
    pub fn of(layer: usize, hidden: &Tensor) -> Result<LayerStats> {
        let values = hidden
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let (mut n, mut sum, mut sq, mut abs_max) = (0u64, 0f64, 0f64, 0f64);
        let (mut nan_count, mut inf_count) = (0u64, 0u64);
        for v in values {
            if v.is_nan() {
                nan_count += 1;
            } else if v.is_infinite() {
                inf_count += 1;
            } else {
                n += 1;
                sum += v;
                sq += v * v;
                abs_max = abs_max.max(v.abs());
            }
        }
        let mean = if n == 0 { 0.0 } else { sum / n as f64 };
        let var = if n == 0 {
            0.0
        } else {
            (sq / n as f64 - mean * mean).max(0.0)
        };
        Ok(LayerStats {
            layer,
            mean,
            std: var.sqrt(),
            abs_max,
            nan_count,
            inf_count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn counts_non_finite_values_apart() {
        let t = Tensor::new(&[1.0f32, -3.0, f32::NAN, f32::INFINITY, 2.0], &Device::Cpu).unwrap();
        let s = LayerStats::of(4, &t).unwrap();
        assert_eq!(s.layer, 4);
        assert_eq!((s.nan_count, s.inf_count), (1, 1));
        assert!((s.mean - 0.0).abs() < 1e-12);
        // population std of [1, -3, 2]: sqrt((1 + 9 + 4) / 3)
        assert!((s.std - (14.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.abs_max, 3.0);
    }
}
