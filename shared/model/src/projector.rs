//! The multimodal projector: `[LayerNorm →] linear_1 → act → linear_2`, applied row by row, so the
//! projector service can project each chunk of feature rows as it arrives.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::anyres::ImageLayout;
use crate::checkpoint::{Checkpoint, PartKind};
use crate::config::{Activation, LlavaConfig};
use crate::error::{ModelError, Result};
use crate::glm4v::Glm4vMerger;
use crate::linear::Linear;
use crate::norm::TorchLayerNorm;
use crate::quant::{QuantPlan, Quantization};

/// InternVL's projector LayerNorm is a plain `nn.LayerNorm`, so torch's default eps.
const LAYER_NORM_EPS: f64 = 1e-5;

/// LLaVA's `[LayerNorm →] linear_1 → act → linear_2`.
struct Mlp {
    layer_norm: Option<TorchLayerNorm>,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

enum Head {
    Mlp(Mlp),
    /// GLM-4.1V's merger ([`crate::glm4v`]).
    Merger(Glm4vMerger),
}

pub struct Projector {
    head: Head,
    /// LLaVA-NeXT's `image_newline` `[out_dim]`, which ends every row of a packed tile grid.
    newline: Option<Tensor>,
    /// Feature rows per side of one view (`image_size / patch_size`).
    side: usize,
    /// Feature rows of one view (the patches, plus CLS under the `full` strategy).
    view_rows: usize,
    in_dim: usize,
    out_dim: usize,
    dtype: DType,
    fingerprint: String,
    quantization: Quantization,
}

impl Mlp {
    fn new(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan, dims: (usize, usize)) -> Result<Self> {
        let (in_dim, out_dim) = dims;
        let bias = cfg.projector_bias;
        let layer_norm = if vb.contains_tensor("layer_norm.weight") {
            Some(TorchLayerNorm::new(
                in_dim,
                LAYER_NORM_EPS,
                vb.pp("layer_norm"),
            )?)
        } else {
            None
        };
        Ok(Mlp {
            layer_norm,
            linear_1: q.linear_plain(in_dim, out_dim, bias, vb.pp("linear_1"))?,
            act: cfg.projector_hidden_act,
            linear_2: q.linear_plain(out_dim, out_dim, bias, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        if let Some(ln) = &self.layer_norm {
            x = ln.forward(&x)?;
        }
        let x = self.act.apply(&self.linear_1.forward(&x)?)?;
        Ok(self.linear_2.forward(&x)?)
    }
}

impl Projector {
    /// Builds from a `multi_modal_projector` variable builder (GLM-4.1V: its `merger`). A
    /// `layer_norm` tensor pair, when present, selects the LayerNorm variant.
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with(cfg, vb, &QuantPlan::none())
    }

    /// [`Self::new`] with the linear layers quantized as `q` says (see [`crate::quant`]).
    pub fn new_with(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let out_dim = cfg.text.hidden_size;
        let (head, in_dim) = match &cfg.glm4v {
            Some(g) => (
                Head::Merger(Glm4vMerger::new(cfg, vb.clone(), q)?),
                g.out_hidden_size,
            ),
            None => {
                let in_dim = cfg.vision_feature_dim();
                (
                    Head::Mlp(Mlp::new(cfg, vb.clone(), q, (in_dim, out_dim))?),
                    in_dim,
                )
            }
        };
        let newline = if cfg.image_grid_pinpoints.is_some() {
            Some(vb.get(out_dim, "image_newline").map_err(|e| {
                ModelError::checkpoint(
                    "model.safetensors",
                    format!("a llava_next checkpoint needs image_newline [{out_dim}]: {e}"),
                )
            })?)
        } else {
            None
        };
        Ok(Projector {
            head,
            newline,
            side: cfg.vision.image_size / cfg.vision.patch_size,
            view_rows: cfg.image_tokens(),
            in_dim,
            out_dim,
            dtype: vb.dtype(),
            fingerprint: String::new(),
            quantization: q.mode(),
        })
    }

    /// Loads the projector (and nothing else) from a checkpoint.
    pub fn load(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(ckpt, dtype, device, Quantization::None)
    }

    /// [`Self::load`] with the linear layers quantized to `quant` as they are read.
    pub fn load_quantized(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        quant: Quantization,
    ) -> Result<Self> {
        let part = ckpt.part(PartKind::Projector, dtype, device)?;
        let plan = part.quant_plan(quant);
        plan.check(dtype, device)?;
        let mut p = Self::new_with(ckpt.config(), part.vb(), &plan)?;
        let c = ckpt.config();
        p.fingerprint = part.fingerprint(&format!(
            "{}|{}|{:?}|{}|{dtype:?}{}",
            p.in_dim,
            p.out_dim,
            c.projector_hidden_act,
            c.projector_bias,
            quant.fingerprint_suffix()
        ))?;
        plan.report(PartKind::Projector.name());
        part.finish();
        Ok(p)
    }

    /// How the weights are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Digest of the loaded weights and projector config (empty when built with [`Self::new`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Projects feature rows `[..., in_dim]` → `[..., out_dim]`. Rows are independent.
    pub fn forward(&self, rows: &Tensor) -> Result<Tensor> {
        let last = rows.dims().last().copied().unwrap_or(0);
        if last != self.in_dim {
            return Err(ModelError::InvalidInput(format!(
                "projector input rows have {last} values, the model expects {}",
                self.in_dim
            )));
        }
        let x = rows.to_dtype(self.dtype)?;
        match &self.head {
            Head::Mlp(m) => m.forward(&x),
            Head::Merger(g) => {
                // Row-wise: any leading dimensions are rows.
                let dims = x.dims().to_vec();
                let rows = g.forward(&x.reshape(((), self.in_dim))?)?;
                let mut out = dims;
                *out.last_mut().expect("a row dimension") = self.out_dim;
                Ok(rows.reshape(out)?)
            }
        }
    }

    /// Whether this projector can pack tile grids (it loaded `image_newline`).
    pub fn packs_tiles(&self) -> bool {
        self.newline.is_some()
    }

    /// Rows one image of `layout` becomes after [`Self::pack`].
    pub fn packed_rows(&self, layout: &ImageLayout) -> usize {
        layout.packed_rows(self.side, self.view_rows)
    }

    /// Packs one image's projected views `[views, side², out_dim]` into its prompt rows
    /// ([`crate::anyres::pack`]); a single-view layout is its one view.
    pub fn pack(&self, views: &Tensor, layout: &ImageLayout) -> Result<Tensor> {
        match (&self.newline, layout.grid) {
            (_, None) => Ok(views.squeeze(0)?),
            (Some(nl), Some(_)) => crate::anyres::pack(views, layout, self.side, nl),
            (None, Some(g)) => Err(ModelError::InvalidInput(format!(
                "features tiled {}x{} need a llava_next projector (this checkpoint has no image_newline)",
                g.rows, g.cols
            ))),
        }
    }
}
