//! The decoder (LLaMA, GLM and GLM-4 families) with an input-embedding forward and a per-sequence KV
//! cache.
//!
//! The forward takes embeddings rather than token ids because LLaVA splices projected image rows into
//! the prompt. [`Decoder::forward_batch`] runs the rows of many sequences in one forward over the
//! paged KV cache ([`crate::kv`]), as the step engine ([`crate::engine`]) schedules them;
//! [`Decoder::forward_embeds`] runs one sequence with its own [`KvCache`] of growing tensors, the
//! plain reference the batched path is tested against.
//! The families share one pre-norm transformer; where they differ (RoPE layout and width, biases,
//! fused MLP, GLM-4's extra norms) the layer parts branch on [`DecoderFamily`], chosen by
//! `text_config.model_type`, so callers never know which family they hold.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{rms_norm, RmsNorm, VarBuilder};
use candle_transformers::utils::repeat_kv;

use crate::checkpoint::{Checkpoint, PartKind};
use crate::config::{Activation, DecoderFamily, LlavaConfig, TextConfig};
use crate::error::{ModelError, Result};
use crate::kv::{KvPool, KvShape};
use crate::linear::Linear;
use crate::monitor::LayerStats;
use crate::quant::{QuantPlan, Quantization, TokenEmbedding};
use crate::vision::softmax_f32;

mod paged;
mod rope;
pub use paged::BatchSeq;
use rope::Rope;

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(c: &TextConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let (h, kv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        // LLaMA's attention_bias covers o_proj too; GLM's only q/k/v.
        let o_bias = c.attention_bias && c.family == DecoderFamily::Llama;
        let bias = c.attention_bias;
        Ok(Attention {
            q: q.linear(c.hidden_size, h * d, bias, vb.pp("q_proj"))?,
            k: q.linear(c.hidden_size, kv * d, bias, vb.pp("k_proj"))?,
            v: q.linear(c.hidden_size, kv * d, bias, vb.pp("v_proj"))?,
            o: q.linear(h * d, c.hidden_size, o_bias, vb.pp("o_proj"))?,
            heads: h,
            kv_heads: kv,
            head_dim: d,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let split = |y: Tensor, n: usize| y.reshape((b, t, n, self.head_dim))?.transpose(1, 2);
        let q = rope.apply(&split(self.q.forward(x)?, self.heads)?, pos)?;
        let k = rope.apply(&split(self.k.forward(x)?, self.kv_heads)?, pos)?;
        let v = split(self.v.forward(x)?, self.kv_heads)?.contiguous()?;
        let (k, v) = match cache.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *cache = Some((k.clone(), v.clone()));
        let rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, rep)?.contiguous()?;
        let v = repeat_kv(v, rep)?.contiguous()?;
        let mut scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        if t > 1 {
            scores = scores.broadcast_add(&causal_mask(t, pos, scores.dtype(), x.device())?)?;
        }
        let y = softmax_f32(&scores)?.matmul(&v)?;
        self.o.forward(
            &y.transpose(1, 2)?
                .reshape((b, t, self.heads * self.head_dim))?,
        )
    }
}

/// `[T, past+T]`: query i (absolute position past+i) sees keys 0..=past+i.
fn causal_mask(
    t: usize,
    past: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = past + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..total).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)
}

/// How the gated MLP stores its input projections.
enum GateUp {
    /// LLaMA: `gate_proj` and `up_proj`.
    Split { gate: Linear, up: Linear },
    /// GLM: one `gate_up_proj` whose output is `[gate | up]`.
    Fused(Linear),
}

struct Mlp {
    gate_up: GateUp,
    down: Linear,
    act: Activation,
    intermediate: usize,
}

impl Mlp {
    fn new(c: &TextConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        let gate_up = match c.family {
            DecoderFamily::Llama => GateUp::Split {
                gate: q.linear(h, i, bias, vb.pp("gate_proj"))?,
                up: q.linear(h, i, bias, vb.pp("up_proj"))?,
            },
            DecoderFamily::Glm | DecoderFamily::Glm4 => {
                GateUp::Fused(q.linear(h, 2 * i, false, vb.pp("gate_up_proj"))?)
            }
        };
        Ok(Mlp {
            gate_up,
            down: q.linear(i, h, bias, vb.pp("down_proj"))?,
            act: c.hidden_act,
            intermediate: i,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUp::Split { gate, up } => (gate.forward(x)?, up.forward(x)?),
            GateUp::Fused(gate_up) => {
                let y = gate_up.forward(x)?;
                let gate = y.narrow(D::Minus1, 0, self.intermediate)?;
                let up = y.narrow(D::Minus1, self.intermediate, self.intermediate)?;
                (gate, up)
            }
        };
        self.down.forward(&(self.act.apply(&gate)? * up)?)
    }
}

struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    /// GLM-4 only: normalises the attention output before the residual add.
    post_attn_out_norm: Option<RmsNorm>,
    post_norm: RmsNorm,
    mlp: Mlp,
    /// GLM-4 only: normalises the MLP output before the residual add.
    post_mlp_norm: Option<RmsNorm>,
}

impl Layer {
    fn new(c: &TextConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let norm = |name: &str| rms_norm(c.hidden_size, c.rms_norm_eps, vb.pp(name));
        let glm4 = c.family == DecoderFamily::Glm4;
        Ok(Layer {
            input_norm: norm("input_layernorm")?,
            attn: Attention::new(c, vb.pp("self_attn"), q)?,
            post_attn_out_norm: glm4.then(|| norm("post_self_attn_layernorm")).transpose()?,
            post_norm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(c, vb.pp("mlp"), q)?,
            post_mlp_norm: glm4.then(|| norm("post_mlp_layernorm")).transpose()?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        pos: usize,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        self.around(x, |h| self.attn.forward(h, rope, pos, cache))
    }

    /// The pre-norm block around an attention: norm, attention, (GLM-4 norm,) residual, norm, MLP,
    /// (GLM-4 norm,) residual.
    fn around(
        &self,
        x: &Tensor,
        attend: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut h = attend(&self.input_norm.forward(x)?)?;
        if let Some(n) = &self.post_attn_out_norm {
            h = n.forward(&h)?;
        }
        let x = (x + h)?;
        let mut h = self.mlp.forward(&self.post_norm.forward(&x)?)?;
        if let Some(n) = &self.post_mlp_norm {
            h = n.forward(&h)?;
        }
        x + h
    }
}

/// Per-sequence attention cache of [`Decoder::forward_embeds`], the single-sequence reference
/// path. Create one per sequence with [`Decoder::new_cache`].
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The language model stage.
pub struct Decoder {
    embed: TokenEmbedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    cfg: TextConfig,
    dtype: DType,
    device: Device,
    fingerprint: String,
    quantization: Quantization,
}

impl Decoder {
    /// Builds from a `language_model` variable builder with HF `LlamaForCausalLM` /
    /// `GlmForCausalLM` / `Glm4ForCausalLM` names (`model.layers.…`, `lm_head.weight`); the family
    /// comes from `cfg.text.family`.
    pub fn new(cfg: &LlavaConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_with(cfg, vb, &QuantPlan::none())
    }

    /// [`Self::new`] with the weights quantized as `q` says (see [`crate::quant`]).
    pub fn new_with(cfg: &LlavaConfig, vb: VarBuilder, q: &QuantPlan) -> Result<Self> {
        let c = &cfg.text;
        let m = vb.pp("model");
        let embed = q.embedding(c.vocab_size, c.hidden_size, m.pp("embed_tokens"))?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(c, m.pp("layers").pp(i), q))
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if c.tie_word_embeddings {
            match (embed.dense(), embed.quantized()) {
                (Some(w), _) => Linear::new(w.clone(), None),
                (None, Some(w)) => Linear::quantized(w.clone(), None),
                (None, None) => unreachable!("an embedding is dense or quantized"),
            }
        } else if vb.contains_tensor("lm_head.weight") {
            q.head(c.hidden_size, c.vocab_size, vb.pp("lm_head"))?
        } else {
            return Err(ModelError::Checkpoint {
                path: "language_model".into(),
                msg: "tie_word_embeddings is false but there is no lm_head.weight".into(),
            });
        };
        Ok(Decoder {
            norm: rms_norm(c.hidden_size, c.rms_norm_eps, m.pp("norm"))?,
            rope: Rope::new(c, vb.dtype(), vb.device())?,
            embed,
            layers,
            lm_head,
            cfg: c.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            fingerprint: String::new(),
            quantization: q.mode(),
        })
    }

    /// Loads the language model (and nothing else) from a checkpoint.
    pub fn load(ckpt: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_quantized(ckpt, dtype, device, Quantization::None)
    }

    /// [`Self::load`] with the weights quantized to `quant` as they are read.
    pub fn load_quantized(
        ckpt: &Checkpoint,
        dtype: DType,
        device: &Device,
        quant: Quantization,
    ) -> Result<Self> {
        let part = ckpt.part(PartKind::Decoder, dtype, device)?;
        let plan = part.quant_plan(quant);
        plan.check(dtype, device)?;
        let mut d = Self::new_with(ckpt.config(), part.vb(), &plan)?;
        d.fingerprint = part.fingerprint(&format!(
            "{:?}|{dtype:?}{}",
            ckpt.config().text,
            quant.fingerprint_suffix()
        ))?;
        plan.report(PartKind::Decoder.name());
        part.finish();
        Ok(d)
    }

    /// How the weights are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// Digest of the loaded weights and text config (empty when built with [`Self::new`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Token ids → embeddings `[T, hidden]`.
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let ids = Tensor::new(ids, &self.device)?;
        Ok(self.embed.forward(&ids)?)
    }

    /// Runs `embeds [T, hidden]` at the cache's next positions and returns the logits of the last
    /// position as f32 `[vocab]`.
    pub fn forward_embeds(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_embeds_monitored(embeds, cache, None)
    }

    /// [`Self::forward_embeds`], also pushing the statistics of every decoder layer's output
    /// (all positions of this call) to `monitor` when given.
    pub fn forward_embeds_monitored(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        mut monitor: Option<&mut Vec<LayerStats>>,
    ) -> Result<Tensor> {
        let (t, h) = embeds.dims2().map_err(|_| {
            ModelError::InvalidInput(format!(
                "decoder input must be [T, hidden], got {:?}",
                embeds.dims()
            ))
        })?;
        if h != self.cfg.hidden_size || t == 0 {
            return Err(ModelError::InvalidInput(format!(
                "decoder input must be [T>0, {}], got [{t}, {h}]",
                self.cfg.hidden_size
            )));
        }
        let pos = cache.len;
        if pos + t > self.cfg.max_position_embeddings {
            return Err(ModelError::InvalidParams(format!(
                "sequence of {} positions exceeds the model's context of {}",
                pos + t,
                self.cfg.max_position_embeddings
            )));
        }
        let mut x = embeds.to_dtype(self.dtype)?.unsqueeze(0)?;
        for (i, (layer, slot)) in self.layers.iter().zip(cache.layers.iter_mut()).enumerate() {
            x = layer.forward(&x, &self.rope, pos, slot)?;
            if let Some(m) = monitor.as_deref_mut() {
                m.push(LayerStats::of(i, &x)?);
            }
        }
        cache.len = pos + t;
        let last = x.narrow(1, t - 1, 1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)?)
    }

    /// Shape of this model's paged KV cache with `block_size` positions per block.
    pub fn kv_shape(&self, block_size: usize) -> KvShape {
        KvShape {
            layers: self.layers.len(),
            kv_heads: self.cfg.num_key_value_heads,
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// Runs the rows of several sequences in one forward: `embeds [N, hidden]` holds each
    /// sequence's rows in `seqs` order, its keys and values go into its blocks in `pool`, and the
    /// result is the f32 logits `[S, vocab]` of each sequence's last row. The linear layers see all
    /// N rows at once (the weights are read once); attention is per sequence. `monitor` gets the
    /// statistics of every layer's output over all N rows.
    pub fn forward_batch(
        &self,
        embeds: &Tensor,
        seqs: &[BatchSeq],
        pool: &mut KvPool,
        mut monitor: Option<&mut Vec<LayerStats>>,
    ) -> Result<Tensor> {
        let (n, h) = embeds.dims2()?;
        let total: usize = seqs.iter().map(|s| s.rows).sum();
        if h != self.cfg.hidden_size || n == 0 || n != total || seqs.iter().any(|s| s.rows == 0) {
            return Err(ModelError::InvalidInput(format!(
                "batched decoder input [{n}, {h}] for {} sequences of {total} rows; expected [N>0, {}]",
                seqs.len(),
                self.cfg.hidden_size
            )));
        }
        let bs = pool.shape().block_size;
        let mut positions = Vec::with_capacity(n);
        let mut last = Vec::with_capacity(seqs.len());
        for s in seqs {
            let end = s.pos + s.rows;
            if end > self.cfg.max_position_embeddings || s.blocks.len() * bs < end {
                return Err(ModelError::InvalidParams(format!(
                    "sequence of {end} positions exceeds the model's context of {} or its {} KV blocks",
                    self.cfg.max_position_embeddings,
                    s.blocks.len()
                )));
            }
            match s.rope {
                // Rotary positions never exceed cache indices (images take fewer positions
                // than rows), so the context check above covers them.
                Some(r) => positions.extend((s.pos..end).map(|i| r.at(i))),
                None => positions.extend((s.pos..end).map(|p| [p as u32; 3])),
            }
            last.push(positions.len() as u32 - 1);
        }
        if !self.rope.is_mrope() && seqs.iter().any(|s| s.rope.is_some()) {
            return Err(ModelError::InvalidInput(
                "3-D rotary positions given to a model without M-RoPE".into(),
            ));
        }
        let (cos, sin) = self.rope.at_3d(&positions, &self.device)?;
        let mut x = embeds.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward_batch(&x, (&self.rope, &cos, &sin), i, seqs, pool)?;
            if let Some(m) = monitor.as_deref_mut() {
                m.push(LayerStats::of(i, &x)?);
            }
        }
        let last = x.index_select(&Tensor::from_vec(last, seqs.len(), &self.device)?, 0)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Convenience: the index of the largest logit (first on ties, as torch.argmax).
    pub fn argmax(logits: &Tensor) -> Result<u32> {
        Ok(logits.argmax(D::Minus1)?.to_scalar::<u32>()?)
    }
}

#[cfg(test)]
mod monitor_tests {
    use super::*;
    use crate::vision::monitor_tests::assert_row_matches;

    #[test]
    fn monitor_gives_one_row_per_layer_matching_the_layer_outputs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let d = Decoder::load(&ckpt, DType::F32, &Device::Cpu).unwrap();
        let embeds = d.embed_tokens(&[1, 5, 9, 12, 3]).unwrap();
        let mut rows = Vec::new();
        let mut cache = d.new_cache();
        let logits = d
            .forward_embeds_monitored(&embeds, &mut cache, Some(&mut rows))
            .unwrap();
        let plain = d.forward_embeds(&embeds, &mut d.new_cache()).unwrap();
        let diff = (logits - plain)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "monitoring changed the logits");
        assert_eq!(rows.len(), d.layers.len());
        let mut by_hand = d.new_cache();
        let mut x = embeds.unsqueeze(0).unwrap();
        for (i, (layer, slot)) in d.layers.iter().zip(by_hand.layers.iter_mut()).enumerate() {
            x = layer.forward(&x, &d.rope, 0, slot).unwrap();
            assert_row_matches(i, &rows[i], &x);
        }
    }
}
