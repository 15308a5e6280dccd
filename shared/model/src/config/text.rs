//! `text_config`: the decoder's family, sizes, RoPE and special tokens, with the defaults of the
//! family's transformers config class for the keys a checkpoint omits.

use serde::Deserialize;
use serde_json::Value;

use super::{glm4v, token_id_list, Activation};
use crate::error::{ModelError, Result};

/// RoPE frequency scaling (`rope_scaling` in transformers 4, `rope_parameters` in 5).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Decoder architecture, chosen by `text_config.model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFamily {
    /// `LlamaForCausalLM` (also `mistral`, `vicuna`): split gate/up MLP, rotate-half RoPE on the
    /// whole head, `attention_bias` on q/k/v/o.
    Llama,
    /// `GlmForCausalLM` (GLM-4-9B-chat-hf layout): q/k/v biases (never o), fused `gate_up_proj`,
    /// RoPE on interleaved pairs of the first `partial_rotary_factor` of each head.
    Glm,
    /// `Glm4ForCausalLM` (GLM-4-0414 layout): GLM plus RMSNorms after attention and after the MLP.
    Glm4,
}

impl DecoderFamily {
    /// The `text_config.model_type` values this build serves.
    pub const SUPPORTED: &'static str = "llama, mistral, vicuna, glm, glm4, glm4v_text";

    pub fn from_model_type(model_type: &str) -> Result<Self> {
        match model_type {
            "llama" | "mistral" | "vicuna" => Ok(DecoderFamily::Llama),
            "glm" => Ok(DecoderFamily::Glm),
            // GLM-4.1V's text model is GLM-4's layer with 3-D rotary positions
            // (`TextConfig::mrope_section`).
            "glm4" | "glm4v_text" => Ok(DecoderFamily::Glm4),
            other => Err(ModelError::Unsupported(format!(
                "decoder text_config.model_type '{other}' (supported decoders: {})",
                Self::SUPPORTED
            ))),
        }
    }

    /// GLM rotates interleaved pairs (x0,x1),(x2,x3)…; LLaMA rotates the two halves of the head.
    pub fn interleaved_rope(self) -> bool {
        matches!(self, DecoderFamily::Glm | DecoderFamily::Glm4)
    }
}

/// Decoder (`text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub model_type: String,
    pub family: DecoderFamily,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// transformers' `int(head_dim * partial_rotary_factor)`: the width the RoPE frequencies are
    /// computed for. RoPE rotates the first `2 * ceil(rope_dim / 2)` values of each head and passes
    /// the rest through (`head_dim` for LLaMA, which ignores `partial_rotary_factor`).
    pub rope_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub hidden_act: Activation,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    pub eos_token_ids: Vec<u32>,
    /// GLM-4.1V's M-RoPE: the rotary frequencies, in order, split into sections that follow the
    /// temporal, height and width position (`rope_parameters.mrope_section`, section i follows
    /// axis i % 3). `None`: one position per token.
    pub mrope_section: Option<Vec<usize>>,
}

/// Missing keys take the defaults of the family's transformers config class (`LlamaConfig`,
/// `GlmConfig`, `Glm4Config`).
#[derive(Deserialize)]
pub(super) struct RawText {
    model_type: Option<String>,
    partial_rotary_factor: Option<f64>,
    /// Missing (mistral default 4096) and `null` (no window) differ: `Some(Value::Null)` is `null`.
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Value>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<Value>,
}

impl RawText {
    pub(super) fn resolve(self) -> Result<TextConfig> {
        let bad =
            |msg: String| ModelError::checkpoint("config.json", format!("text_config: {msg}"));
        let model_type = self.model_type.unwrap_or_else(|| "llama".into());
        let family = DecoderFamily::from_model_type(&model_type)?;
        let glm4v = model_type == "glm4v_text";
        let mut d = TextDefaults::of(family);
        if glm4v {
            // Glm4vTextConfig's own defaults.
            d.rms_norm_eps = 1e-5;
            d.max_position_embeddings = 32768;
            // Its rotary init reads rope_parameters.partial_rotary_factor with default 1.0.
            d.partial_rotary_factor = 1.0;
        }
        let hidden_size = self.hidden_size.unwrap_or(d.hidden_size);
        let heads = self.num_attention_heads.unwrap_or(d.heads);
        if heads == 0 {
            return Err(bad("num_attention_heads is 0".into()));
        }
        let kv_heads = self
            .num_key_value_heads
            .unwrap_or(d.kv_heads.unwrap_or(heads));
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        // Glm4vTextAttention's head width is always hidden_size / heads (its rotary init would
        // read a `head_dim` key, so one that differs cannot describe a working checkpoint).
        let head_dim = if glm4v {
            if let Some(h) = self.head_dim.filter(|&h| h != hidden_size / heads) {
                return Err(bad(format!(
                    "head_dim {h} differs from hidden_size / num_attention_heads ({}), which \
                     glm4v_text attention always uses",
                    hidden_size / heads
                )));
            }
            hidden_size / heads
        } else {
            self.head_dim
                .unwrap_or(d.head_dim.unwrap_or(hidden_size / heads))
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and non-zero"
            )));
        }
        // transformers 5 keeps rope_theta (and partial_rotary_factor) inside rope_parameters;
        // 4.x at the top level.
        let rope: Option<RawRope> = self
            .rope_parameters
            .or(self.rope_scaling)
            .filter(|v| !v.is_null())
            .map(|v| {
                serde_json::from_value(v).map_err(|e| bad(format!("rope_parameters: invalid: {e}")))
            })
            .transpose()?;
        let rope = rope.unwrap_or_default();
        let rope_theta = rope.rope_theta.or(self.rope_theta).unwrap_or(10000.0);
        let rope_scaling = rope.scaling().map_err(bad)?;
        let partial_rotary_factor = rope.partial_rotary_factor.or(self.partial_rotary_factor);
        let rope_dim = match (family, &rope_scaling) {
            // LlamaRotaryEmbedding's default init ignores partial_rotary_factor; the scaled
            // inits (linear, llama3) apply it, as GLM's always do.
            (DecoderFamily::Llama, RopeScaling::None) => head_dim,
            _ => {
                let factor = partial_rotary_factor.unwrap_or(d.partial_rotary_factor);
                // Python's int() truncates, as `as` does.
                let dim = (head_dim as f64 * factor) as usize;
                if !(factor > 0.0 && dim > 0 && dim.div_ceil(2) * 2 <= head_dim) {
                    return Err(bad(format!(
                        "partial_rotary_factor {factor} of head_dim {head_dim} leaves no valid rotary width"
                    )));
                }
                dim
            }
        };
        let mrope_section = glm4v
            .then(|| glm4v::mrope_section(rope.mrope_section.as_ref(), rope_dim).map_err(bad))
            .transpose()?;
        let eos_token_ids = match self.eos_token_id {
            None => d.eos.to_vec(),
            Some(v) => token_id_list(&v).map_err(bad)?,
        };
        let mut max_position_embeddings = self
            .max_position_embeddings
            .unwrap_or(d.max_position_embeddings);
        // The decoder attends to the whole context. Mistral's sliding window (transformers default
        // 4096, `null` = none) only changes results beyond the window, so the usable context is
        // capped there rather than silently computing something else past it.
        if model_type == "mistral" {
            let window = match self.sliding_window {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    bad(format!("sliding_window {v} is not a non-negative integer"))
                })? as usize),
            };
            if let Some(w) = window.filter(|&w| w > 0) {
                max_position_embeddings = max_position_embeddings.min(w);
            }
        }
        // Glm4vTextAttention always has q/k/v biases (its config has no attention_bias key).
        let attention_bias = self.attention_bias.unwrap_or(d.attention_bias);
        if glm4v && !attention_bias {
            return Err(bad(
                "attention_bias false in a glm4v_text config: transformers' Glm4vTextAttention \
                 always has q/k/v biases"
                    .into(),
            ));
        }
        Ok(TextConfig {
            model_type,
            family,
            vocab_size: self.vocab_size.unwrap_or(d.vocab_size),
            hidden_size,
            intermediate_size: self.intermediate_size.unwrap_or(d.intermediate_size),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(d.layers),
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rope_dim,
            max_position_embeddings,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(d.rms_norm_eps),
            rope_theta,
            rope_scaling,
            hidden_act: Activation::parse(self.hidden_act.as_deref().unwrap_or("silu"))?,
            attention_bias,
            // GLM's MLP never has biases (no such key in GlmConfig).
            mlp_bias: family == DecoderFamily::Llama && self.mlp_bias.unwrap_or(false),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            eos_token_ids,
            mrope_section,
        })
    }
}

/// Keeps an explicit JSON `null` as `Some(Value::Null)` (plain `Option<Value>` folds it into `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The defaults of transformers' config classes for the keys a checkpoint may omit.
struct TextDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    layers: usize,
    heads: usize,
    /// `None`: as many as attention heads.
    kv_heads: Option<usize>,
    /// `None`: hidden_size / heads.
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    attention_bias: bool,
    /// Of the rotary width, for the inits that read it (GLM's; LLaMA's scaled ones).
    partial_rotary_factor: f64,
    eos: &'static [u32],
}

impl TextDefaults {
    fn of(family: DecoderFamily) -> Self {
        match family {
            DecoderFamily::Llama => TextDefaults {
                vocab_size: 32000,
                hidden_size: 4096,
                intermediate_size: 11008,
                layers: 32,
                heads: 32,
                kv_heads: None,
                head_dim: None,
                max_position_embeddings: 2048,
                rms_norm_eps: 1e-6,
                attention_bias: false,
                partial_rotary_factor: 1.0,
                eos: &[2],
            },
            // GlmConfig and Glm4Config share their defaults (THUDM/glm-4-9b-chat).
            DecoderFamily::Glm | DecoderFamily::Glm4 => TextDefaults {
                vocab_size: 151552,
                hidden_size: 4096,
                intermediate_size: 13696,
                layers: 40,
                heads: 32,
                kv_heads: Some(2),
                head_dim: Some(128),
                max_position_embeddings: 131072,
                rms_norm_eps: 1.5625e-7,
                attention_bias: true,
                partial_rotary_factor: 0.5,
                eos: &[151329, 151336, 151338],
            },
        }
    }
}

/// `rope_parameters` (transformers 5) or `rope_scaling` (transformers 4): the keys read there.
#[derive(Deserialize, Default)]
pub(super) struct RawRope {
    rope_type: Option<String>,
    /// transformers 4's name for `rope_type`.
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
    partial_rotary_factor: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    /// GLM-4.1V's M-RoPE sections ([`glm4v::mrope_section`]).
    mrope_section: Option<Value>,
}

impl RawRope {
    fn rope_type(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.kind.as_deref())
            .unwrap_or("default")
    }

    fn scaling(&self) -> std::result::Result<RopeScaling, String> {
        let kind = self.rope_type();
        let num = |v: Option<f64>, k: &str| v.ok_or_else(|| format!("rope '{kind}' needs '{k}'"));
        match kind {
            // transformers 4's Qwen2-VL-style configs say "mrope" for M-RoPE, which it reads as
            // "default" frequencies (the sections are `TextConfig::mrope_section`).
            "default" | "mrope" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear {
                factor: num(self.factor, "factor")?,
            }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num(self.factor, "factor")?,
                low_freq_factor: num(self.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: num(self.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: num(
                    self.original_max_position_embeddings,
                    "original_max_position_embeddings",
                )? as usize,
            }),
            other => Err(format!(
                "rope type '{other}' is not supported (supported: default, linear, llama3)"
            )),
        }
    }
}
