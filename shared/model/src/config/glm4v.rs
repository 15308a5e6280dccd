//! `config.json` of a GLM-4.1V checkpoint (`model_type: glm4v`, transformers'
//! `Glm4vForConditionalGeneration`; AutoGLM-Phone-9B has this layout). The vision tower's shared
//! fields land in [`VisionConfig`]; what only GLM-4.1V has is [`Glm4vConfig`]. The text model is
//! GLM-4's layer with 3-D rotary positions (`text_config.model_type: glm4v_text`, parsed by the
//! common text path).

use serde::Deserialize;
use serde_json::Value;

use super::{Activation, VisionConfig};
use crate::error::{ModelError, Result};

/// What a GLM-4.1V vision tower and merger need beyond [`VisionConfig`].
#[derive(Debug, Clone, PartialEq)]
pub struct Glm4vConfig {
    /// Width of the downsampled rows (the merger's input and output: the text hidden size).
    pub out_hidden_size: usize,
    /// The merger's SwiGLU width (`vision_config.intermediate_size`).
    pub merger_intermediate_size: usize,
    /// Patches per side merged into one token (2: a 2×2 window becomes one row).
    pub spatial_merge_size: usize,
    /// Frames per temporal patch (2): a still image is repeated to fill it.
    pub temporal_patch_size: usize,
    /// Bias on the blocks' qkv projection.
    pub attention_bias: bool,
    /// Base of the 2-D vision rope.
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
}

/// transformers' `Glm4vVisionConfig` defaults for missing keys.
#[derive(Deserialize)]
struct RawGlm4vVision {
    model_type: Option<String>,
    depth: Option<usize>,
    hidden_size: Option<usize>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    num_heads: Option<usize>,
    in_channels: Option<usize>,
    image_size: Option<usize>,
    patch_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    spatial_merge_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    out_hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    rope_parameters: Option<Value>,
    rope_theta: Option<f64>,
}

/// `vision_config.rope_parameters`: the 2-D rope has a base and no scaling.
#[derive(Deserialize, Default)]
struct RawAxialRope {
    rope_type: Option<String>,
    /// transformers 4's name for `rope_type`.
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_theta: Option<f64>,
}

/// The keys a `glm4v` checkpoint's `vision_config` is read for.
pub(super) fn vision_keys() -> &'static [&'static str] {
    super::keys::keys_of::<RawGlm4vVision>()
}

/// The keys its `vision_config.rope_parameters` is read for.
pub(super) fn vision_rope_keys() -> &'static [&'static str] {
    super::keys::keys_of::<RawAxialRope>()
}

/// `vision_config` of a `glm4v` checkpoint .
pub(super) fn parse_vision(v: &Value) -> Result<(VisionConfig, Glm4vConfig)> {
    let bad = |msg: String| ModelError::checkpoint("config.json", format!("vision_config: {msg}"));
    let raw: RawGlm4vVision =
        serde_json::from_value(v.clone()).map_err(|e| bad(format!("invalid: {e}")))?;
    if let Some(mt) = &raw.model_type {
        if mt != "glm4v_vision" && mt != "glm4v" {
            return Err(ModelError::Unsupported(format!(
                "vision_config.model_type '{mt}' in a glm4v checkpoint (supported: glm4v_vision)"
            )));
        }
    }
    let hidden = raw.hidden_size.unwrap_or(1536);
    let heads = raw.num_heads.unwrap_or(12);
    let out_hidden_size = raw.out_hidden_size.unwrap_or(4096);
    let vision = VisionConfig {
        hidden_size: hidden,
        // The blocks' SwiGLU is out_hidden_size wide (Glm4VisionMlp).
        intermediate_size: out_hidden_size,
        num_hidden_layers: raw.depth.unwrap_or(24),
        num_attention_heads: heads,
        num_channels: raw.in_channels.unwrap_or(3),
        image_size: raw.image_size.unwrap_or(336),
        patch_size: raw.patch_size.unwrap_or(14),
        hidden_act: Activation::parse(raw.hidden_act.as_deref().unwrap_or("silu"))?,
        layer_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
    };
    let rope: RawAxialRope = match raw.rope_parameters.clone().filter(|v| !v.is_null()) {
        None => RawAxialRope::default(),
        Some(v) => {
            serde_json::from_value(v).map_err(|e| bad(format!("rope_parameters: invalid: {e}")))?
        }
    };
    // Glm4vVisionRotaryEmbedding raises for any other type.
    let kind = rope.rope_type.as_deref().or(rope.kind.as_deref());
    if !matches!(kind, None | Some("axial" | "default")) {
        return Err(ModelError::Unsupported(format!(
            "vision_config rope type '{}' (supported: axial)",
            kind.unwrap_or_default()
        )));
    }
    let rope_theta = rope.rope_theta.or(raw.rope_theta).unwrap_or(10000.0);
    let g = Glm4vConfig {
        out_hidden_size,
        merger_intermediate_size: raw.intermediate_size.unwrap_or(13696),
        spatial_merge_size: raw.spatial_merge_size.unwrap_or(2),
        temporal_patch_size: raw.temporal_patch_size.unwrap_or(2),
        attention_bias: raw.attention_bias.unwrap_or(false),
        rope_theta,
        rms_norm_eps: vision.layer_norm_eps,
    };
    if heads == 0 || !hidden.is_multiple_of(heads) || !(hidden / heads).is_multiple_of(4) {
        return Err(bad(format!(
            "hidden_size {hidden} over num_heads {heads} must give a head width divisible by 4 (2-D rope)"
        )));
    }
    if vision.num_channels != 3 {
        return Err(bad(format!(
            "in_channels {} (only RGB is supported)",
            vision.num_channels
        )));
    }
    if vision.patch_size == 0 || !vision.image_size.is_multiple_of(vision.patch_size) {
        return Err(bad(format!(
            "image_size {} is not a multiple of patch_size {}",
            vision.image_size, vision.patch_size
        )));
    }
    if !(1..=8).contains(&g.spatial_merge_size) || !(1..=8).contains(&g.temporal_patch_size) {
        return Err(bad(format!(
            "spatial_merge_size {} and temporal_patch_size {} must be 1..8",
            g.spatial_merge_size, g.temporal_patch_size
        )));
    }
    Ok((vision, g))
}

/// `rope_parameters.mrope_section` of a `glm4v_text` config (transformers' default `[8, 12, 12]`):
/// how many of the rotary frequencies follow the temporal, height and width position. They must
/// add up to the frequencies there are (`rope_dim / 2`), as torch's `split` requires.
pub(super) fn mrope_section(
    section: Option<&Value>,
    rope_dim: usize,
) -> std::result::Result<Vec<usize>, String> {
    let section = match section {
        None | Some(Value::Null) => vec![8, 12, 12],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| format!("mrope_section entry {i} is not an integer"))
            })
            .collect::<std::result::Result<_, _>>()?,
        Some(other) => return Err(format!("mrope_section {other} is not a list")),
    };
    let sum: usize = section.iter().sum();
    if section.is_empty() || sum != rope_dim / 2 {
        return Err(format!(
            "mrope_section {section:?} adds up to {sum}, but the rotary width {rope_dim} has {} frequencies",
            rope_dim / 2
        ));
    }
    Ok(section)
}
