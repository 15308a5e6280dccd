//! CLIP vision tower returning the hidden state(s) LLaVA selects.
//!
//! Written out rather than taken from candle-transformers' `clip::vision_model`: that module's
//! `output_hidden_states` omits the embedding output that transformers puts first in `hidden_states`,
//! so "layer −2" would select a different layer, and it always runs every layer. Here layer indices
//! follow transformers exactly and layers after the last selected one are never loaded or run.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{conv2d_no_bias, embedding, Conv2d, Conv2dConfig, Embedding, VarBuilder};

use crate::cancel::Cancel;
use crate::checkpoint::{Checkpoint, PartKind};
use crate::config::{Activation, LlavaConfig, SelectStrategy, VisionConfig};
use crate::error::{ModelError, Result};
use crate::glm4v::Glm4vVision;
use crate::linear::Linear;
use crate::monitor::LayerStats;
use crate::norm::TorchLayerNorm as LayerNorm;
use crate::quant::{QuantPlan, Quantization};

/// Softmax over the last dimension, in f32 when the compute dtype is half precision (as torch does
/// for attention scores), so f16/bf16 models do not lose the distribution's tail.
pub(crate) fn softmax_f32(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        candle_nn::ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
    }
}

struct Embeddings {
    patch: Conv2d,
    class: Tensor,
    position: Embedding,
    num_positions: usize,
}

impl Embeddings {
    fn new(c: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let conv = Conv2dConfig {
            stride: c.patch_size,
            ..Default::default()
        };
        let num_positions = c.num_patches() + 1;
        Ok(Embeddings {
            patch: conv2d_no_bias(
                c.num_channels,
                c.hidden_size,
                c.patch_size,
                conv,
                vb.pp("patch_embedding"),
            )?,
            class: vb.get(c.hidden_size, "class_embedding")?,
            position: embedding(num_positions, c.hidden_size, vb.pp("position_embedding"))?,
            num_positions,
        })
    }

    fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let b = pixel_values.dim(0)?;
        let patches = self
            .patch
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let d = self.class.dim(0)?;
        let class = self.class.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&class, &patches], 1)?;
        x.broadcast_add(
            &self
                .position
                .embeddings()
                .narrow(0, 0, self.num_positions)?
                .unsqueeze(0)?,
        )
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &VisionConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let d = c.hidden_size;
        let head_dim = d / c.num_attention_heads;
        Ok(Attention {
            q: q.linear_plain(d, d, true, vb.pp("q_proj"))?,
            k: q.linear_plain(d, d, true, vb.pp("k_proj"))?,
            v: q.linear_plain(d, d, true, vb.pp("v_proj"))?,
            out: q.linear_plain(d, d, true, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * self.scale)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let attn = softmax_f32(&q.matmul(&k.t()?)?)?;
        let y = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&y)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(c: &VisionConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(EncoderLayer {
            ln1: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(c, vb.pp("self_attn"), q)?,
            ln2: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: q.linear_plain(h, i, true, vb.pp("mlp").pp("fc1"))?,
            fc2: q.linear_plain(i, h, true, vb.pp("mlp").pp("fc2"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?)?)?;
        let h = self
            .fc2
            .forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?)?;
        x + h
    }
}

/// LLaVA's CLIP tower and the layers it selects.
struct ClipTower {
    embeddings: Embeddings,
    pre_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    /// Non-negative indices into `hidden_states` (0 = after `pre_layrnorm`).
    selected: Vec<usize>,
    strategy: SelectStrategy,
}

enum Tower {
    Clip(ClipTower),
    /// GLM-4.1V's tower up to the downsample ([`crate::glm4v`]), and its spatial merge size.
    Glm4v(Glm4vVision, usize),
}

/// The vision stage: `pixel_values [B, 3, H, W]` → selected features `[B, N, D]`.
pub struct VisionEncoder {
    tower: Tower,
    cfg: VisionConfig,
    dtype: DType,
    fingerprint: String,
    quantization: Quantization,
}

impl VisionEncoder {
    /// Builds the tower from a `vision_tower` variable builder (see [`Checkpoint::part`]).
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with(cfg, vb, &QuantPlan::none())
    }

    /// [`Self::new`] with the linear layers quantized as `q` says (see [`crate::quant`]).
    pub fn new_with(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let c = &cfg.vision;
        let tower = if let Some(g) = &cfg.glm4v {
            Tower::Glm4v(Glm4vVision::new(cfg, vb.clone(), q)?, g.spatial_merge_size)
        } else {
            Tower::Clip(ClipTower::new(cfg, vb.clone(), q)?)
        };
        Ok(VisionEncoder {
            tower,
            cfg: c.clone(),
            dtype: vb.dtype(),
            fingerprint: String::new(),
            quantization: q.mode(),
        })
    }
}

impl ClipTower {
    fn new(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let c = &cfg.vision;
        let n = c.num_hidden_layers as i64;
        let selected: Vec<usize> = cfg
            .vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (n + 1 + l) as usize
                } else {
                    l as usize
                }
            })
            .collect();
        let depth = selected.iter().copied().max().unwrap_or(0);
        let layers = (0..depth)
            .map(|i| EncoderLayer::new(c, vb.pp("encoder").pp("layers").pp(i), q))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTower {
            embeddings: Embeddings::new(c, vb.pp("embeddings"))?,
            pre_ln: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            selected,
            strategy: cfg.select_strategy,
        })
    }
}

impl VisionEncoder {
    /// Loads the vision tower (and nothing else) from a checkpoint.
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
        let part = ckpt.part(PartKind::Vision, dtype, device)?;
        let plan = part.quant_plan(quant);
        plan.check(dtype, device)?;
        let mut enc = Self::new_with(ckpt.config(), part.vb(), &plan)?;
        let c = ckpt.config();
        enc.fingerprint = part.fingerprint(&format!(
            "{:?}|{:?}|{:?}|{:?}|{dtype:?}{}",
            c.vision,
            c.glm4v,
            c.vision_feature_layers,
            c.select_strategy,
            quant.fingerprint_suffix()
        ))?;
        plan.report(PartKind::Vision.name());
        part.finish();
        Ok(enc)
    }

    /// How the weights are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Digest of the loaded weights and vision config (empty when built with [`Self::new`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Feature rows per view. GLM-4.1V encodes each image at its own size: its rows are in the
    /// image's layout ([`crate::ImageLayout::tokens`]); this is the count of an image of the
    /// tower's nominal `image_size`.
    pub fn num_features(&self) -> usize {
        match &self.tower {
            Tower::Clip(t) => {
                self.cfg.num_patches() + usize::from(t.strategy == SelectStrategy::Full)
            }
            Tower::Glm4v(_, m) => self.cfg.num_patches() / (m * m),
        }
    }

    /// Width of a feature row.
    pub fn feature_dim(&self) -> usize {
        match &self.tower {
            Tower::Clip(t) => self.cfg.hidden_size * t.selected.len(),
            Tower::Glm4v(g, _) => g.out_dim(),
        }
    }

    /// Whether views have their own size (GLM-4.1V) rather than the tower's `image_size`.
    pub fn native_resolution(&self) -> bool {
        matches!(self.tower, Tower::Glm4v(..))
    }

    /// Patches per side of one view (`image_size / patch_size`).
    pub fn patches_per_side(&self) -> usize {
        self.cfg.image_size / self.cfg.patch_size
    }

    pub fn image_size(&self) -> usize {
        self.cfg.image_size
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `pixel_values [B, 3, S, S]` (any float dtype) → features `[B, N, D]` in the compute dtype.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_monitored(pixel_values, None, &Cancel::never())
    }

    /// [`Self::forward`], also pushing the statistics of every encoder layer's output (layers
    /// that run; those after the last selected one never do) to `monitor` when given, and
    /// stopping with [`ModelError::Cancelled`] before the next layer once `cancel` is set.
    pub fn forward_monitored(
        &self,
        pixel_values: &Tensor,
        monitor: Option<&mut Vec<LayerStats>>,
        cancel: &Cancel,
    ) -> Result<Tensor> {
        let t = match &self.tower {
            Tower::Clip(t) => t,
            Tower::Glm4v(g, _) => {
                let rows =
                    g.forward_monitored(&pixel_values.to_dtype(self.dtype)?, monitor, cancel)?;
                return Ok(rows.unsqueeze(0)?);
            }
        };
        t.forward(pixel_values, &self.cfg, self.dtype, monitor, cancel)
    }
}

impl ClipTower {
    fn forward(
        &self,
        pixel_values: &Tensor,
        cfg: &VisionConfig,
        dtype: DType,
        mut monitor: Option<&mut Vec<LayerStats>>,
        cancel: &Cancel,
    ) -> Result<Tensor> {
        let (_, ch, h, w) = pixel_values.dims4()?;
        let s = cfg.image_size;
        if (ch, h, w) != (3, s, s) {
            return Err(ModelError::InvalidInput(format!(
                "pixel_values must be [B, 3, {s}, {s}], got {:?}",
                pixel_values.dims()
            )));
        }
        let x = self.embeddings.forward(&pixel_values.to_dtype(dtype)?)?;
        let mut x = self.pre_ln.forward(&x)?;
        let mut states = Vec::with_capacity(self.selected.len());
        let mut take = |i: usize, x: &Tensor| {
            for (slot, &sel) in self.selected.iter().enumerate() {
                if sel == i {
                    states.push((slot, x.clone()));
                }
            }
        };
        take(0, &x);
        for (i, layer) in self.layers.iter().enumerate() {
            cancel.check()?;
            x = layer.forward(&x)?;
            if let Some(m) = monitor.as_deref_mut() {
                m.push(LayerStats::of(i, &x)?);
            }
            take(i + 1, &x);
        }
        states.sort_by_key(|(slot, _)| *slot);
        let states: Vec<Tensor> = states.into_iter().map(|(_, t)| t).collect();
        let feats = if states.len() == 1 {
            states[0].clone()
        } else {
            Tensor::cat(&states, D::Minus1)?
        };
        Ok(match self.strategy {
            SelectStrategy::Default => feats.narrow(1, 1, feats.dim(1)? - 1)?,
            SelectStrategy::Full => feats,
        })
    }
}

#[cfg(test)]
pub(crate) mod monitor_tests {
    use super::*;

    /// Mean, population std and absolute maximum with candle's own reductions, independent of
    /// `LayerStats::of`.
    pub(crate) fn direct_stats(t: &Tensor) -> (f64, f64, f64) {
        let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let mean = t.mean_all().unwrap().to_scalar::<f64>().unwrap();
        let var = t
            .broadcast_sub(&Tensor::new(mean, t.device()).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let abs_max = t.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        (mean, var.sqrt(), abs_max)
    }

    /// Asserts that `row` is layer `i`'s statistics of `hidden`, computed here directly in f64.
    pub(crate) fn assert_row_matches(i: usize, row: &crate::LayerStats, hidden: &Tensor) {
        let (mean, std, abs_max) = direct_stats(hidden);
        assert_eq!(row.layer, i);
        assert!(
            (row.mean - mean).abs() < 1e-9,
            "layer {i}: {row:?} vs mean {mean}"
        );
        assert!(
            (row.std - std).abs() < 1e-6 * std.max(1.0),
            "layer {i}: {row:?} vs std {std}"
        );
        assert_eq!(row.abs_max, abs_max, "layer {i}");
        assert_eq!((row.nan_count, row.inf_count), (0, 0));
    }

    #[test]
    fn monitor_gives_one_row_per_layer_matching_the_layer_outputs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let enc = VisionEncoder::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let s = enc.cfg.image_size;
        let v = match &enc.tower {
            Tower::Clip(t) => t,
            Tower::Glm4v(..) => unreachable!("tiny-llava has a CLIP tower"),
        };
        let pixels = Tensor::randn(0f32, 1.0, (1, 3, s, s), &Device::Cpu).unwrap();
        let mut rows = Vec::new();
        let monitored = enc
            .forward_monitored(&pixels, Some(&mut rows), &Cancel::never())
            .unwrap();
        // Monitoring does not change the result.
        let plain = enc.forward(&pixels).unwrap();
        let diff = (monitored - plain)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert_eq!(rows.len(), v.layers.len());
        assert!(!rows.is_empty());
        // The same layers run by hand give the same statistics.
        let mut x = v
            .pre_ln
            .forward(&v.embeddings.forward(&pixels).unwrap())
            .unwrap();
        for (i, layer) in v.layers.iter().enumerate() {
            x = layer.forward(&x).unwrap();
            assert_row_matches(i, &rows[i], &x);
        }
    }
}
