//! Checkpoint configuration in the llava-hf layout (`config.json`, `preprocessor_config.json` /
//! `processor_config.json`, `generation_config.json`). Missing keys take the defaults of the
//! transformers config classes, because real checkpoints (e.g. llava-hf/llava-1.5-7b-hf) only store
//! the keys that differ from them.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

mod glm4v;
mod processor;
pub use glm4v::Glm4vConfig;
pub use processor::{ImageProcessorConfig, NativeResize, ResizeTarget};

/// Activation functions named by `hidden_act` / `projector_hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (erf), transformers' `gelu`.
    Gelu,
    /// Tanh-approximated GELU: `gelu_pytorch_tanh`, `gelu_new`, `gelu_fast`.
    GeluTanh,
    /// `x * sigmoid(1.702 x)`, CLIP's `quick_gelu`.
    QuickGelu,
    Silu,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "activation '{other}' (supported: gelu, gelu_pytorch_tanh, gelu_new, quick_gelu, silu, relu)"
                )))
            }
        })
    }

    pub fn apply(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Silu => x.silu(),
            Activation::Relu => x.relu(),
        }
    }
}

/// Which vision tokens feed the projector (`vision_feature_select_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the CLS token (LLaVA-1.5).
    Default,
    /// Keep every token including CLS.
    Full,
}

/// CLIP vision tower (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

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
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// GLM-4.1V's M-RoPE: the rotary frequencies, in order, split into sections that follow the
    /// temporal, height and width position (`rope_parameters.mrope_section`, section i follows
    /// axis i % 3). `None`: one position per token.
    pub mrope_section: Option<Vec<usize>>,
}

/// The whole `config.json` of a `LlavaForConditionalGeneration` checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_id: u32,
    pub projector_hidden_act: Activation,
    pub projector_bias: bool,
    /// Indices into transformers' `hidden_states` (embedding output first; negative from the end).
    /// More than one means the selected layers are concatenated along the hidden dimension.
    pub vision_feature_layers: Vec<i64>,
    pub select_strategy: SelectStrategy,
    /// LLaVA-NeXT (`model_type: llava_next`): the resolutions `(height, width)` an image may be
    /// tiled at ([`crate::anyres`]); `None` for single-view LLaVA.
    pub image_grid_pinpoints: Option<Vec<crate::anyres::Resolution>>,
    /// GLM-4.1V (`model_type: glm4v`): its own vision tower and merger, images at their own
    /// resolution ([`crate::glm4v`]); `None` for LLaVA.
    pub glm4v: Option<Glm4vConfig>,
}

impl LlavaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::checkpoint(path, format!("cannot read: {e}")))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Checkpoint { msg, .. } => ModelError::checkpoint(path, msg),
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |msg: String| ModelError::checkpoint("config.json", msg);
        let raw: RawLlava = serde_json::from_str(text).map_err(|e| bad(format!("invalid: {e}")))?;
        let next = match raw.model_type.as_deref() {
            None | Some("llava") => false,
            Some("llava_next") => true,
            Some("glm4v") => return Self::glm4v(raw, text),
            Some(mt) => {
                return Err(ModelError::Unsupported(format!(
                    "checkpoint model_type '{mt}' (supported: llava, llava_next, glm4v)"
                )))
            }
        };
        let vision: RawVision = serde_json::from_value(raw.vision_config)
            .map_err(|e| bad(format!("vision_config: invalid: {e}")))?;
        let vision = vision.resolve()?;
        let text = raw.text_config.resolve()?;
        let image_token_id = raw
            .image_token_id
            .or(raw.image_token_index)
            .ok_or_else(|| bad("neither image_token_index nor image_token_id is set".into()))?;
        let vision_feature_layers = match raw.vision_feature_layer {
            None => vec![-2],
            Some(Value::Number(n)) => vec![n
                .as_i64()
                .ok_or_else(|| bad(format!("vision_feature_layer {n} is not an integer")))?],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| {
                        bad(format!("vision_feature_layer entry {v} is not an integer"))
                    })
                })
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(bad(format!(
                    "vision_feature_layer {other} is not an integer"
                )))
            }
        };
        let n = vision.num_hidden_layers as i64;
        for &l in &vision_feature_layers {
            if l > n || l < -(n + 1) {
                return Err(bad(format!(
                    "vision_feature_layer {l} is outside the {} hidden states of a {n}-layer vision tower",
                    n + 1
                )));
            }
        }
        let select_strategy = match raw
            .vision_feature_select_strategy
            .as_deref()
            .unwrap_or("default")
        {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "vision_feature_select_strategy '{other}' (supported: default, full)"
                )))
            }
        };
        let image_grid_pinpoints = if next {
            // LlavaNextConfig's default.
            let pins = match &raw.image_grid_pinpoints {
                None => vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
                Some(v) => crate::anyres::parse_pinpoints(v).map_err(bad)?,
            };
            crate::anyres::check_pinpoints(&pins, vision.image_size as u32).map_err(bad)?;
            if select_strategy == SelectStrategy::Full {
                // transformers cannot pack CLS rows into the tile grid either.
                return Err(ModelError::Unsupported(
                    "vision_feature_select_strategy 'full' with llava_next (anyres needs 'default')"
                        .into(),
                ));
            }
            Some(pins)
        } else {
            None
        };
        Ok(LlavaConfig {
            image_grid_pinpoints,
            vision,
            text,
            image_token_id,
            projector_hidden_act: Activation::parse(
                raw.projector_hidden_act.as_deref().unwrap_or("gelu"),
            )?,
            projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
            vision_feature_layers,
            select_strategy,
            glm4v: None,
        })
    }

    /// A `glm4v` checkpoint: GLM-4.1V's vision tower and merger over a `glm4v_text` decoder.
    fn glm4v(raw: RawLlava, json: &str) -> Result<Self> {
        let bad = |msg: String| ModelError::checkpoint("config.json", msg);
        let top: Value = serde_json::from_str(json).map_err(|e| bad(format!("invalid: {e}")))?;
        let (vision, g) = glm4v::parse_vision(&raw.vision_config, &top)?;
        let text = raw.text_config.resolve()?;
        if text.model_type != "glm4v_text" || text.mrope_section.is_none() {
            return Err(ModelError::Unsupported(format!(
                "text_config.model_type '{}' in a glm4v checkpoint (supported: glm4v_text)",
                text.model_type
            )));
        }
        if g.out_hidden_size != text.hidden_size {
            return Err(bad(format!(
                "vision_config.out_hidden_size {} differs from text_config.hidden_size {}",
                g.out_hidden_size, text.hidden_size
            )));
        }
        let image_token_id = raw
            .image_token_id
            .or(raw.image_token_index)
            .unwrap_or(151343);
        Ok(LlavaConfig {
            projector_hidden_act: vision.hidden_act,
            vision,
            text,
            image_token_id,
            projector_bias: false,
            vision_feature_layers: vec![-1],
            select_strategy: SelectStrategy::Full,
            image_grid_pinpoints: None,
            glm4v: Some(g),
        })
    }

    /// Number of feature rows the vision tower produces per image (= `<image>` expansion length).
    pub fn image_tokens(&self) -> usize {
        self.vision.num_patches()
            + match self.select_strategy {
                SelectStrategy::Default => 0,
                SelectStrategy::Full => 1,
            }
    }

    /// Width of one vision feature row (the projector's input).
    pub fn vision_feature_dim(&self) -> usize {
        self.vision.hidden_size * self.vision_feature_layers.len()
    }
}

#[derive(Deserialize)]
struct RawLlava {
    model_type: Option<String>,
    vision_config: Value,
    text_config: RawText,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
    projector_hidden_act: Option<String>,
    multimodal_projector_bias: Option<bool>,
    vision_feature_layer: Option<Value>,
    vision_feature_select_strategy: Option<String>,
    image_grid_pinpoints: Option<Value>,
}

/// Defaults are transformers' `CLIPVisionConfig` defaults.
#[derive(Deserialize)]
struct RawVision {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

impl RawVision {
    fn resolve(self) -> Result<VisionConfig> {
        if let Some(mt) = &self.model_type {
            if mt != "clip_vision_model" {
                return Err(ModelError::Unsupported(format!(
                    "vision_config.model_type '{mt}' (supported: clip_vision_model)"
                )));
            }
        }
        let c = VisionConfig {
            hidden_size: self.hidden_size.unwrap_or(768),
            intermediate_size: self.intermediate_size.unwrap_or(3072),
            num_hidden_layers: self.num_hidden_layers.unwrap_or(12),
            num_attention_heads: self.num_attention_heads.unwrap_or(12),
            num_channels: self.num_channels.unwrap_or(3),
            image_size: self.image_size.unwrap_or(224),
            patch_size: self.patch_size.unwrap_or(32),
            hidden_act: Activation::parse(self.hidden_act.as_deref().unwrap_or("quick_gelu"))?,
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-5),
        };
        let bad = |msg: String| {
            Err(ModelError::checkpoint(
                "config.json",
                format!("vision_config: {msg}"),
            ))
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            ));
        }
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
                c.image_size, c.patch_size
            ));
        }
        if c.num_channels != 3 {
            return bad(format!(
                "num_channels {} (only RGB is supported)",
                c.num_channels
            ));
        }
        Ok(c)
    }
}

/// Missing keys take the defaults of the family's transformers config class (`LlamaConfig`,
/// `GlmConfig`, `Glm4Config`).
#[derive(Deserialize)]
struct RawText {
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
    bos_token_id: Option<u32>,
    eos_token_id: Option<Value>,
}

impl RawText {
    fn resolve(self) -> Result<TextConfig> {
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
        // Glm4vTextAttention's head width is always hidden_size / heads.
        let head_dim = if glm4v {
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
        let rope = self
            .rope_parameters
            .or(self.rope_scaling)
            .filter(|v| !v.is_null());
        let rope_theta = rope
            .as_ref()
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10000.0);
        let rope_scaling = match &rope {
            None => RopeScaling::None,
            Some(r) => parse_rope_scaling(r).map_err(bad)?,
        };
        let rope_dim = match family {
            // LlamaRotaryEmbedding's default init ignores partial_rotary_factor.
            DecoderFamily::Llama => head_dim,
            DecoderFamily::Glm | DecoderFamily::Glm4 => {
                let factor = rope
                    .as_ref()
                    .and_then(|r| r.get("partial_rotary_factor"))
                    .and_then(Value::as_f64)
                    .or(self.partial_rotary_factor)
                    .unwrap_or(0.5);
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
            .then(|| glm4v::mrope_section(rope.as_ref(), rope_dim).map_err(bad))
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
            attention_bias: self.attention_bias.unwrap_or(d.attention_bias),
            // GLM's MLP never has biases (no such key in GlmConfig).
            mlp_bias: family == DecoderFamily::Llama && self.mlp_bias.unwrap_or(false),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(false),
            bos_token_id: self.bos_token_id.or(d.bos_token_id),
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
    bos_token_id: Option<u32>,
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
                bos_token_id: Some(1),
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
                bos_token_id: None,
                eos: &[151329, 151336, 151338],
            },
        }
    }
}

fn parse_rope_scaling(r: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |k: &str| {
        r.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope '{kind}' needs '{k}'"))
    };
    match kind {
        // transformers 4's Qwen2-VL-style configs say "mrope" for M-RoPE, which it reads as
        // "default" frequencies (the sections are `TextConfig::mrope_section`).
        "default" | "mrope" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(format!(
            "rope type '{other}' is not supported (supported: default, linear, llama3)"
        )),
    }
}

pub(crate) fn token_id_list(v: &Value) -> std::result::Result<Vec<u32>, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(|x| vec![x as u32])
            .ok_or_else(|| format!("token id {n} is not a non-negative integer")),
        Value::Array(items) => items
            .iter()
            .map(|i| token_id_list(i).map(|v| v[0]))
            .collect(),
        Value::Null => Ok(vec![]),
        other => Err(format!("token id {other} is not an integer")),
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ModelError::checkpoint(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::checkpoint(path, format!("invalid JSON: {e}")))
}
