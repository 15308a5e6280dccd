//! Normalisation layers with torch's numerics.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use crate::error::Result;

/// LayerNorm computed as torch does: the mean, then the variance of the centred row, in f32.
/// candle's fused `layer_norm` takes E[x²] − E[x]² in one pass, which loses the variance when a
/// row's mean is large next to its spread (the lnproj fixture's probe rows: 1.8e-3 off vs 1.8e-5).
/// Used for every LayerNorm (CLIP's residual stream can carry large means too).
pub(crate) struct TorchLayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl TorchLayerNorm {
    pub(crate) fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(TorchLayerNorm {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        centred
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?
            .to_dtype(dtype)
    }
}

impl candle_core::Module for TorchLayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        TorchLayerNorm::forward(self, x)
    }
}
