//! GLM-4.1V's merger (transformers' `Glm4vVisionPatchMerger`): the projector stage. Each
//! downsampled row goes through `proj` → LayerNorm → exact GELU → SwiGLU
//! (`down(act(gate(x)) · up(x))`, `act` the vision tower's `hidden_act`), all without biases.
//! Row-wise, so any grouping of rows gives the same result.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::vision::glm4v_config;
use crate::config::{Activation, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::norm::TorchLayerNorm;
use crate::quant::QuantPlan;

/// torch's `nn.LayerNorm` default epsilon (the merger's `post_projection_norm`).
const LAYER_NORM_EPS: f64 = 1e-5;

/// The merger: rows `[N, out_hidden_size]` → `[N, out_hidden_size]`.
pub struct Glm4vMerger {
    proj: Linear,
    norm: TorchLayerNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
    dim: usize,
}

impl Glm4vMerger {
    /// Builds the merger from `vb` holding `proj.weight`, `post_projection_norm.weight` / `bias`,
    /// `gate_proj.weight`, `up_proj.weight` and `down_proj.weight`.
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let g = glm4v_config(cfg)?;
        let (dim, ctx) = (g.out_hidden_size, g.merger_intermediate_size);
        Ok(Glm4vMerger {
            proj: q.linear_plain(dim, dim, false, vb.pp("proj"))?,
            norm: TorchLayerNorm::new(dim, LAYER_NORM_EPS, vb.pp("post_projection_norm"))?,
            gate: q.linear_plain(dim, ctx, false, vb.pp("gate_proj"))?,
            up: q.linear_plain(dim, ctx, false, vb.pp("up_proj"))?,
            down: q.linear_plain(ctx, dim, false, vb.pp("down_proj"))?,
            act: cfg.vision.hidden_act,
            dim,
        })
    }

    /// Width of an input and output row (`out_hidden_size`).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// `rows [N, dim]` → `[N, dim]`, in the dtype of `rows`.
    pub fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        match rows.dims() {
            &[_, d] if d == self.dim => {}
            dims => {
                return Err(ModelError::InvalidInput(format!(
                    "merger input must be [N, {}], got {dims:?}",
                    self.dim
                )))
            }
        }
        let h = self.proj.forward(rows)?;
        let h = self.norm.forward(&h)?.gelu_erf()?;
        let h = (self.act.apply(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        Ok(self.down.forward(&h)?)
    }
}
