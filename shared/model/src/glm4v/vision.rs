//! GLM-4.1V's vision tower up to the downsample (transformers' `Glm4vVisionModel` without its
//! merger): patch embedding, RMSNorm, the learned position table resampled bicubically to the
//! image's patch grid, 2-D rotary attention blocks, RMSNorm and the `m × m` downsample
//! convolution, giving one row per merged window of patches.
//!
//! Patches run in transformers' merge-window order (`get_vision_position_ids`: block-major over
//! `m × m` windows, row-major inside a window), so every `m²` consecutive rows are one window and
//! the downsample is one product. Each image attends only to its own patches.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::cancel::Cancel;
use crate::config::{Activation, Glm4vConfig, LlavaConfig, VisionConfig};
use crate::error::{ModelError, Result};
use crate::grid_sample::grid_sample_bicubic;
use crate::linear::Linear;
use crate::monitor::LayerStats;
use crate::quant::QuantPlan;
use crate::vision::softmax_f32;

/// The GLM-4.1V part of `cfg`, or an error for a checkpoint of another architecture.
pub(crate) fn glm4v_config(cfg: &LlavaConfig) -> Result<&Glm4vConfig> {
    cfg.glm4v.as_ref().ok_or_else(|| {
        ModelError::Unsupported("a GLM-4.1V stage needs a glm4v checkpoint".to_string())
    })
}

/// `Glm4vRMSNorm`: the row normalised in f32, rounded back to the input dtype, then scaled.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (var + self.eps)?.sqrt()?.recip()?;
        x32.broadcast_mul(&inv)?
            .to_dtype(x.dtype())?
            .broadcast_mul(&self.weight)
    }
}

/// Full (non-causal) attention over one image's patches with the 2-D rope.
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &VisionConfig, g: &Glm4vConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let d = c.hidden_size;
        let head_dim = d / c.num_attention_heads;
        Ok(Attention {
            qkv: q.linear_plain(d, 3 * d, g.attention_bias, vb.pp("qkv"))?,
            proj: q.linear_plain(d, d, false, vb.pp("proj"))?,
            heads: c.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// `x [N, D]`; `cos`/`sin` `[N, head_dim / 2]` in f32.
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let (n, d) = x.dims2()?;
        let dtype = x.dtype();
        // [N, 3, heads, hd] -> [3, heads, N, hd]
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((n, 3, self.heads, self.head_dim))?
            .permute((1, 2, 0, 3))?;
        let rotate = |t: Tensor| -> candle_core::Result<Tensor> {
            let t = t.unsqueeze(0)?.to_dtype(DType::F32)?.contiguous()?;
            candle_nn::rotary_emb::rope(&t, cos, sin)?.to_dtype(dtype)
        };
        let q = rotate(qkv.get(0)?)?;
        let k = rotate(qkv.get(1)?)?;
        let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
        let y = attend(&q, &k, &v, self.scale, SCORE_BUDGET)?;
        let y = y.transpose(1, 2)?.reshape((n, d))?;
        self.proj.forward(&y)
    }
}

/// Attention scores held at once by one vision attention (elements: 64 MiB in f32).
const SCORE_BUDGET: usize = 1 << 24;

/// `softmax(q kᵀ · scale) v` for `q`, `k`, `v` `[1, heads, N, hd]`, the query rows taken in chunks
/// so that at most `budget` scores are held at once whatever the image's patch count (a
/// screenshot at a checkpoint's largest size has tens of thousands of patches: its whole score
/// matrix would take tens of GB). Every row's softmax is its own, so chunking changes nothing.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    budget: usize,
) -> candle_core::Result<Tensor> {
    let (_, heads, n, _) = q.dims4()?;
    let kt = k.t()?;
    let rows = (budget / (heads * n).max(1)).clamp(1, n.max(1));
    let mut ys = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let q = q.narrow(2, start, rows.min(n - start))?;
        let scores = (q.matmul(&kt)? * scale)?;
        ys.push(softmax_f32(&scores)?.matmul(v)?);
    }
    Tensor::cat(&ys, 2)
}

/// `x + attn(norm1(x))`, then `x + down(act(gate(x')) * up(x'))` with `x' = norm2(x)`.
struct Block {
    norm1: RmsNorm,
    attn: Attention,
    norm2: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl Block {
    fn new(c: &VisionConfig, g: &Glm4vConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let (h, i, eps) = (c.hidden_size, c.intermediate_size, g.rms_norm_eps);
        let mlp = vb.pp("mlp");
        Ok(Block {
            norm1: RmsNorm::new(h, eps, vb.pp("norm1"))?,
            attn: Attention::new(c, g, vb.pp("attn"), q)?,
            norm2: RmsNorm::new(h, eps, vb.pp("norm2"))?,
            gate: q.linear_plain(h, i, false, mlp.pp("gate_proj"))?,
            up: q.linear_plain(h, i, false, mlp.pp("up_proj"))?,
            down: q.linear_plain(i, h, false, mlp.pp("down_proj"))?,
            act: c.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?, cos, sin)?)?;
        let h = self.norm2.forward(&x)?;
        let h = (self.act.apply(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?;
        x + self.down.forward(&h)?
    }
}

/// GLM-4.1V's vision tower: one image `[1, 3, H, W]` → `[(H/p/m)·(W/p/m), out_hidden_size]`.
pub struct Glm4vVision {
    /// The Conv3d patch weight summed over its temporal axis, as `[3·p·p, hidden]`.
    patch_weight: Tensor,
    patch_bias: Tensor,
    post_conv_norm: RmsNorm,
    /// The position table channel-major, `[hidden, side, side]`, in f32.
    position_table: Vec<f32>,
    position_side: usize,
    /// `1 / theta^(2i / (head_dim / 2))`, `head_dim / 4` frequencies.
    inv_freq: Vec<f32>,
    blocks: Vec<Block>,
    post_norm: RmsNorm,
    /// The downsample convolution as `[hidden·m·m, out_hidden]` (flattened in (hidden, r, c)).
    down_weight: Tensor,
    down_bias: Tensor,
    hidden: usize,
    patch: usize,
    merge: usize,
    out_dim: usize,
    dtype: DType,
    device: Device,
}

impl Glm4vVision {
    /// Builds the tower from `vb` holding its tensors under their logical names
    /// (`patch_embed.proj.weight`, `post_conv_layernorm.weight`,
    /// `embeddings.position_embedding.weight`, `blocks.N.…`, `post_layernorm.weight`,
    /// `downsample.weight` / `bias`); the merger's tensors are not read.
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let g = glm4v_config(cfg)?;
        let c = &cfg.vision;
        let (hidden, p, m) = (c.hidden_size, c.patch_size, g.spatial_merge_size);
        let heads = c.num_attention_heads;
        let head_ok =
            heads > 0 && hidden.is_multiple_of(heads) && (hidden / heads).is_multiple_of(4);
        if !head_ok || p == 0 || m == 0 {
            return Err(ModelError::Unsupported(format!(
                "GLM-4.1V vision: hidden {hidden}, heads {heads}, patch {p}, merge {m}"
            )));
        }
        let (patch_weight, patch_bias) = Self::patch_embed(c, g, vb.pp("patch_embed").pp("proj"))?;
        let (position_table, position_side) = Self::position_table(c, vb.pp("embeddings"))?;
        let blocks = (0..c.num_hidden_layers)
            .map(|i| Block::new(c, g, vb.pp("blocks").pp(i), q))
            .collect::<Result<Vec<_>>>()?;
        let out = g.out_hidden_size;
        let down = vb.pp("downsample");
        let down_weight = down
            .get((out, hidden, m, m), "weight")?
            .reshape((out, hidden * m * m))?
            .t()?
            .contiguous()?;
        let spatial = hidden / heads / 2;
        let inv_freq = (0..spatial / 2)
            .map(|i| 1.0 / (g.rope_theta as f32).powf((2 * i) as f32 / spatial as f32))
            .collect();
        Ok(Glm4vVision {
            patch_weight,
            patch_bias,
            post_conv_norm: RmsNorm::new(hidden, g.rms_norm_eps, vb.pp("post_conv_layernorm"))?,
            position_table,
            position_side,
            inv_freq,
            blocks,
            post_norm: RmsNorm::new(hidden, g.rms_norm_eps, vb.pp("post_layernorm"))?,
            down_weight,
            down_bias: down.get(out, "bias")?,
            hidden,
            patch: p,
            merge: m,
            out_dim: out,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The Conv3d weight `[hidden, 3, T, p, p]` summed over `T` (a still image fills every
    /// temporal slot with the same frame) as `[3·p·p, hidden]`, and its bias.
    fn patch_embed(c: &VisionConfig, g: &Glm4vConfig, vb: VarBuilder) -> Result<(Tensor, Tensor)> {
        let (h, p, t) = (c.hidden_size, c.patch_size, g.temporal_patch_size);
        let w = vb.get((h, 3, t, p, p), "weight")?;
        let folded = w
            .to_dtype(DType::F32)?
            .sum(2)?
            .reshape((h, 3 * p * p))?
            .t()?
            .contiguous()?
            .to_dtype(vb.dtype())?;
        Ok((folded, vb.get(h, "bias")?))
    }

    /// The `[side², hidden]` position table as channel-major `[hidden, side, side]` f32 values.
    fn position_table(c: &VisionConfig, vb: VarBuilder) -> Result<(Vec<f32>, usize)> {
        let side = c.image_size / c.patch_size;
        let h = c.hidden_size;
        let table = vb
            .pp("position_embedding")
            .get((side * side, h), "weight")?
            .to_dtype(DType::F32)?
            .reshape((side, side, h))?
            .permute((2, 0, 1))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((table, side))
    }

    /// Width of an output row (`out_hidden_size`).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `pixel_values [B, 3, H, W]` (normalised; f32 or the model dtype), `H` and `W` multiples of
    /// `patch_size · spatial_merge_size` → `[Σ (H/p/m)·(W/p/m), out_hidden_size]` in the model
    /// dtype: each image's merged windows in row-major order, images one after another. Equals
    /// transformers' `last_hidden_state` of `Glm4vVisionModel` for those images.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.forward_monitored(pixel_values, None, &Cancel::never())
    }

    /// [`Self::forward`], also pushing the statistics of every block's output to `monitor` when
    /// given (one row per block, `layer` = block index; for several images, each image's rows in
    /// turn). `cancel` is checked before every block: a large image takes seconds.
    pub fn forward_monitored(
        &self,
        pixel_values: &Tensor,
        mut monitor: Option<&mut Vec<LayerStats>>,
        cancel: &Cancel,
    ) -> Result<Tensor> {
        let (b, gh, gw) = self.check_input(pixel_values)?;
        let pixels = pixel_values.to_dtype(self.dtype)?;
        let rows = (0..b)
            .map(|i| self.encode_one(&pixels.get(i)?, (gh, gw), monitor.as_deref_mut(), cancel))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// The batch size and the patch grid `(gh, gw)`, or why the input cannot be encoded.
    fn check_input(&self, pixel_values: &Tensor) -> Result<(usize, usize, usize)> {
        let unit = self.patch * self.merge;
        let fits = |n: usize| n > 0 && n.is_multiple_of(unit);
        match *pixel_values.dims() {
            [b, 3, h, w] if b > 0 && fits(h) && fits(w) && pixel_values.dtype().is_float() => {
                Ok((b, h / self.patch, w / self.patch))
            }
            _ => Err(ModelError::InvalidInput(format!(
                "pixel_values must be float [B, 3, H, W] with B > 0 and H, W positive multiples \
                 of {unit}, got {:?} {:?}",
                pixel_values.dims(),
                pixel_values.dtype()
            ))),
        }
    }

    /// One image `[3, H, W]` on a `gh × gw` patch grid → its merged rows.
    fn encode_one(
        &self,
        image: &Tensor,
        (gh, gw): (usize, usize),
        mut monitor: Option<&mut Vec<LayerStats>>,
        cancel: &Cancel,
    ) -> Result<Tensor> {
        let positions = self.patch_positions(gh, gw);
        let x = self.patchify(image, gh, gw)?;
        let x = x
            .matmul(&self.patch_weight)?
            .broadcast_add(&self.patch_bias)?;
        let x = self.post_conv_norm.forward(&x)?;
        let mut x = (x + self.position_embedding(&positions, gh, gw)?)?;
        let (cos, sin) = self.rope(&positions)?;
        for (i, block) in self.blocks.iter().enumerate() {
            cancel.check()?;
            x = block.forward(&x, &cos, &sin)?;
            if let Some(m) = monitor.as_deref_mut() {
                m.push(LayerStats::of(i, &x)?);
            }
        }
        let x = self.post_norm.forward(&x)?;
        self.downsample(&x)
    }

    /// `(h, w)` of every patch in merge-window order: windows row-major, patches row-major
    /// inside a window.
    fn patch_positions(&self, gh: usize, gw: usize) -> Vec<(usize, usize)> {
        let m = self.merge;
        let mut out = Vec::with_capacity(gh * gw);
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for r in 0..m {
                    for c in 0..m {
                        out.push((bh * m + r, bw * m + c));
                    }
                }
            }
        }
        out
    }

    /// `[3, H, W]` → patch rows `[gh·gw, 3·p·p]` in merge-window order, each flattened in
    /// (channel, row, column) order.
    fn patchify(&self, image: &Tensor, gh: usize, gw: usize) -> candle_core::Result<Tensor> {
        let (p, m) = (self.patch, self.merge);
        image
            .reshape(vec![3, gh / m, m, p, gw / m, m, p])?
            .permute([1, 4, 2, 5, 0, 3, 6])?
            .contiguous()?
            .reshape((gh * gw, 3 * p * p))
    }

    /// The position table sampled bicubically (torch's `grid_sample`, border padding) at the
    /// centre of every patch, `[gh·gw, hidden]` in the model dtype.
    fn position_embedding(
        &self,
        positions: &[(usize, usize)],
        gh: usize,
        gw: usize,
    ) -> candle_core::Result<Tensor> {
        let (th, tw) = (gh as f32, gw as f32);
        let points: Vec<(f32, f32)> = positions
            .iter()
            .map(|&(h, w)| {
                let x = ((w as f32 + 0.5) / tw) * 2.0 - 1.0;
                let y = ((h as f32 + 0.5) / th) * 2.0 - 1.0;
                (x, y)
            })
            .collect();
        let side = self.position_side;
        let values = grid_sample_bicubic(&self.position_table, self.hidden, side, side, &points);
        Tensor::from_vec(values, (positions.len(), self.hidden), &self.device)?.to_dtype(self.dtype)
    }

    /// cos and sin `[N, head_dim / 2]` (f32) of the 2-D rope: `h · inv_freq` then `w · inv_freq`.
    fn rope(&self, positions: &[(usize, usize)]) -> candle_core::Result<(Tensor, Tensor)> {
        let f = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * f);
        let mut sin = Vec::with_capacity(positions.len() * 2 * f);
        for &(h, w) in positions {
            for pos in [h, w] {
                for &inv in &self.inv_freq {
                    let angle = pos as f32 * inv;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (positions.len(), 2 * f);
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?,
            Tensor::from_vec(sin, shape, &self.device)?,
        ))
    }

    /// The `m × m` stride-`m` convolution over each window of `m²` consecutive rows:
    /// `[N, hidden]` → `[N / m², out_hidden]`.
    fn downsample(&self, x: &Tensor) -> Result<Tensor> {
        let m = self.merge;
        let (n, d) = x.dims2()?;
        let windows = x
            .reshape((n / (m * m), m, m, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((n / (m * m), d * m * m))?;
        Ok(windows
            .matmul(&self.down_weight)?
            .broadcast_add(&self.down_bias)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunked attention equals the whole score matrix's, for chunks that divide the rows and
    /// chunks that leave a remainder, down to one row at a time.
    #[test]
    fn chunked_attention_equals_whole() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (heads, n, hd) = (3, 37, 8);
        let q = Tensor::randn(0f32, 1.0, (1, heads, n, hd), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, heads, n, hd), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, heads, n, hd), &dev)?;
        let whole = attend(&q, &k, &v, 0.35, usize::MAX)?;
        assert_eq!(whole.dims(), &[1, heads, n, hd]);
        for budget in [0, heads * n, 5 * heads * n, 36 * heads * n] {
            let got = attend(&q, &k, &v, 0.35, budget)?;
            let diff: f32 = (got - &whole)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            assert!(diff < 1e-6, "budget {budget}: differs by {diff}");
        }
        Ok(())
    }
}
