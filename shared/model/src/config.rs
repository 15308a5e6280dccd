//! Checkpoint configuration in the llava-hf layout (`config.json`, `preprocessor_config.json` /
//! `processor_config.json`, `generation_config.json`). Missing keys take the defaults of the
//! transformers config classes, because real checkpoints (e.g. llava-hf/llava-1.5-7b-hf) only store
//! the keys that differ from them.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

mod glm4v;
pub(crate) mod keys;
mod processor;
mod text;
pub use glm4v::Glm4vConfig;
pub use keys::ConfigSection;
pub use processor::{ImageProcessorConfig, NativeResize, ResizeTarget};
use text::RawText;
pub use text::{DecoderFamily, RopeScaling, TextConfig};

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
            Some("glm4v") => return Self::glm4v(raw),
            Some(mt) => {
                return Err(ModelError::Unsupported(format!(
                    "checkpoint model_type '{mt}' (supported: llava, llava_next, glm4v)"
                )))
            }
        };
        let vision: RawVision = serde_json::from_value(raw.vision_config)
            .map_err(|e| bad(format!("vision_config: invalid: {e}")))?;
        let vision = vision.resolve()?;
        let mut text = raw.text_config.resolve()?;
        text.tie_word_embeddings |= raw.tie_word_embeddings.unwrap_or(false);
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
    fn glm4v(raw: RawLlava) -> Result<Self> {
        let bad = |msg: String| ModelError::checkpoint("config.json", msg);
        let (vision, g) = glm4v::parse_vision(&raw.vision_config)?;
        let mut text = raw.text_config.resolve()?;
        text.tie_word_embeddings |= raw.tie_word_embeddings.unwrap_or(false);
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

/// Every section of a checkpoint's files the loader reads, with the keys it reads there (taken
/// from the loader's own structs). `tests/field_coverage.rs` checks that the varied fixtures set
/// each of them away from its default.
pub fn read_sections() -> Vec<ConfigSection> {
    use keys::keys_of;
    const ALL: &[&str] = &["llava", "llava_next", "glm4v"];
    const CLIP: &[&str] = &["llava", "llava_next"];
    const GLM4V: &[&str] = &["glm4v"];
    let s = |file, path, families, keys| ConfigSection {
        file,
        path,
        families,
        keys,
    };
    vec![
        s("config.json", &[], ALL, keys_of::<RawLlava>()),
        s(
            "config.json",
            &["vision_config"],
            CLIP,
            keys_of::<RawVision>(),
        ),
        s(
            "config.json",
            &["vision_config"],
            GLM4V,
            glm4v::vision_keys(),
        ),
        s(
            "config.json",
            &["vision_config", "rope_parameters"],
            GLM4V,
            glm4v::vision_rope_keys(),
        ),
        s("config.json", &["text_config"], ALL, keys_of::<RawText>()),
        s(
            "config.json",
            &["text_config", "rope_parameters"],
            ALL,
            keys_of::<text::RawRope>(),
        ),
        s(
            "processor_config.json",
            &["image_processor"],
            ALL,
            processor::image_processor_keys(),
        ),
        s(
            "processor_config.json",
            &["image_processor"],
            GLM4V,
            processor::native_keys(),
        ),
        s(
            "processor_config.json",
            &["image_processor", "size"],
            ALL,
            processor::size_keys(),
        ),
        s(
            "generation_config.json",
            &[],
            ALL,
            crate::prompt::generation_keys(),
        ),
        s(
            "tokenizer_config.json",
            &[],
            ALL,
            crate::chat_template::tokenizer_config_keys(),
        ),
    ]
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
    /// transformers 5 reads it here; checkpoints written before it, in `text_config`. Either
    /// ties the head.
    tie_word_embeddings: Option<bool>,
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
