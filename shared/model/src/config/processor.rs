//! The image processor settings (`preprocessor_config.json`, or the `image_processor` section of
//! `processor_config.json`), checked against the vision tower they feed.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{read_json, LlavaConfig, VisionConfig};
use crate::error::{ModelError, Result};

/// The image processor settings (`CLIPImageProcessor` fields).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    pub do_convert_rgb: bool,
    pub do_resize: bool,
    pub size: ResizeTarget,
    /// PIL resample filter id (2 = bilinear, 3 = bicubic).
    pub resample: u32,
    pub do_center_crop: bool,
    /// (height, width)
    pub crop_size: (u32, u32),
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// LLaVA-NeXT tiling resolutions (see [`Self::for_model`]); `None`: one view per image.
    pub image_grid_pinpoints: Option<Vec<crate::anyres::Resolution>>,
    /// GLM-4.1V: images keep their own resolution (see [`NativeResize`]); `None` otherwise.
    pub native: Option<NativeResize>,
}

/// GLM-4.1V's `Glm4vImageProcessor`: each image is resized by `smart_resize` to multiples of
/// patch × merge within the pixel bounds and encoded at that size, one row per merged window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NativeResize {
    /// Pixel bounds and side granularity (`size.shortest_edge` / `size.longest_edge`, patch × merge).
    pub smart: crate::smart_resize::SmartResize,
    pub patch_size: u32,
    pub merge_size: u32,
    /// The torchvision backend (transformers 5's default `Glm4vImageProcessor`: uint8 antialiased
    /// bicubic, [`crate::resize::resize_torchvision`]); `false`: the PIL backend
    /// (`Glm4vImageProcessorPil`).
    pub torchvision: bool,
}

/// `size` of the image processor: `{"shortest_edge": n}` or `{"height": h, "width": w}`.
#[derive(Debug, Clone, PartialEq)]
pub enum ResizeTarget {
    ShortestEdge(u32),
    Exact { height: u32, width: u32 },
}

#[derive(Deserialize)]
struct RawImageProcessor {
    do_convert_rgb: Option<bool>,
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<u32>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
    image_grid_pinpoints: Option<Value>,
}

#[derive(Deserialize)]
struct RawNative {
    image_processor_type: Option<String>,
    size: Option<Value>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    patch_size: Option<u32>,
    merge_size: Option<u32>,
    temporal_patch_size: Option<u32>,
}

pub(super) fn image_processor_keys() -> &'static [&'static str] {
    super::keys::keys_of::<RawImageProcessor>()
}

pub(super) fn native_keys() -> &'static [&'static str] {
    super::keys::keys_of::<RawNative>()
}

pub(super) fn size_keys() -> &'static [&'static str] {
    super::keys::keys_of::<RawSize>()
}

impl ImageProcessorConfig {
    /// [`Self::from_dir`] for the checkpoint `cfg` describes: a LLaVA-NeXT checkpoint tiles with
    /// its `image_grid_pinpoints`, which the processor config must not contradict (the model
    /// packs features by the config's grid, so a processor tiling differently would misplace
    /// every tile); a single-view checkpoint never tiles.
    pub fn for_model(dir: &Path, cfg: &LlavaConfig) -> Result<Self> {
        if let Some(g) = &cfg.glm4v {
            return Self::native(dir, cfg, g);
        }
        let mut p = Self::from_dir(dir, &cfg.vision)?;
        p.image_grid_pinpoints = match (&cfg.image_grid_pinpoints, p.image_grid_pinpoints.take()) {
            (None, _) => None,
            (Some(model), Some(proc_)) if &proc_ != model => {
                return Err(ModelError::checkpoint(
                    dir,
                    format!(
                        "the image processor's image_grid_pinpoints {proc_:?} differ from config.json's {model:?}"
                    ),
                ))
            }
            (Some(model), _) => Some(model.clone()),
        };
        Ok(p)
    }

    /// A GLM-4.1V checkpoint's `Glm4vImageProcessor` settings, which must agree with the vision
    /// tower's patch, merge and temporal patch sizes.
    fn native(dir: &Path, cfg: &LlavaConfig, g: &super::Glm4vConfig) -> Result<Self> {
        let (path, value) = read_processor(dir)?;
        let bad = |msg: String| ModelError::checkpoint(&path, msg);
        let raw: RawNative = serde_json::from_value(value.clone())
            .map_err(|e| bad(format!("invalid image processor config: {e}")))?;
        let size: Option<RawSize> = raw
            .size
            .clone()
            .filter(Value::is_object)
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| bad(format!("invalid size: {e}")))?;
        let patch_size = raw.patch_size.unwrap_or(14);
        let merge_size = raw.merge_size.unwrap_or(2);
        let temporal = raw.temporal_patch_size.unwrap_or(2);
        let model = (
            cfg.vision.patch_size as u32,
            g.spatial_merge_size as u32,
            g.temporal_patch_size as u32,
        );
        if (patch_size, merge_size, temporal) != model {
            return Err(bad(format!(
                "the image processor's patch/merge/temporal sizes {:?} differ from the vision tower's {model:?}",
                (patch_size, merge_size, temporal)
            )));
        }
        let smart = crate::smart_resize::SmartResize {
            temporal_factor: temporal,
            factor: patch_size * merge_size,
            min_pixels: size
                .as_ref()
                .and_then(|s| s.shortest_edge)
                .or(raw.min_pixels)
                .unwrap_or(112 * 112),
            max_pixels: size
                .as_ref()
                .and_then(|s| s.longest_edge)
                .or(raw.max_pixels)
                .unwrap_or(28 * 28 * 15000),
        };
        if smart.min_pixels > smart.max_pixels || smart.max_pixels == 0 {
            return Err(bad(format!(
                "size.shortest_edge {} exceeds size.longest_edge {}",
                smart.min_pixels, smart.max_pixels
            )));
        }
        let mut base = Self::parse(&path, value, &cfg.vision)?;
        if !base.do_resize {
            // Glm4vImageProcessor would patchify the image at its own size, which is rarely a
            // multiple of patch × merge; vlm-model always resizes.
            return Err(bad(
                "do_resize false is not supported for glm4v (images are always resized by smart_resize)"
                    .into(),
            ));
        }
        // Glm4vImageProcessor has no centre crop.
        base.do_center_crop = false;
        base.native = Some(NativeResize {
            smart,
            patch_size,
            merge_size,
            torchvision: raw.image_processor_type.as_deref() != Some("Glm4vImageProcessorPil"),
        });
        Ok(base)
    }

    /// Reads `preprocessor_config.json`, or the `image_processor` section of `processor_config.json`
    /// (what transformers 5 writes). Falls back to the vision tower's size with CLIP's constants.
    pub fn from_dir(dir: &Path, vision: &VisionConfig) -> Result<Self> {
        let (path, value) = read_processor(dir)?;
        let cfg = Self::parse(&path, value, vision)?;
        let (h, w) = cfg.output_size();
        if (h as usize, w as usize) != (vision.image_size, vision.image_size) {
            return Err(ModelError::checkpoint(
                &path,
                format!(
                    "the image processor produces {h}x{w} images but the vision tower expects {0}x{0}",
                    vision.image_size
                ),
            ));
        }
        Ok(cfg)
    }

    fn parse(path: &Path, value: Value, vision: &VisionConfig) -> Result<Self> {
        let raw: RawImageProcessor = serde_json::from_value(value).map_err(|e| {
            ModelError::checkpoint(path, format!("invalid image processor config: {e}"))
        })?;
        let bad = |msg: String| ModelError::checkpoint(path, msg);
        let size = match raw.size {
            None => ResizeTarget::ShortestEdge(vision.image_size as u32),
            Some(v) => parse_size(&v).map_err(bad)?,
        };
        let crop_size = match raw.crop_size {
            None => (vision.image_size as u32, vision.image_size as u32),
            Some(v) => match parse_size(&v).map_err(bad)? {
                ResizeTarget::Exact { height, width } => (height, width),
                ResizeTarget::ShortestEdge(s) => (s, s),
            },
        };
        let triple = |v: Option<Vec<f32>>, default: [f32; 3], what: &str| -> Result<[f32; 3]> {
            match v {
                None => Ok(default),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) => Err(bad(format!("{what} has {} entries, expected 3", v.len()))),
            }
        };
        let image_grid_pinpoints = match &raw.image_grid_pinpoints {
            None | Some(Value::Null) => None,
            Some(v) => Some(crate::anyres::parse_pinpoints(v).map_err(bad)?),
        };
        let cfg = ImageProcessorConfig {
            image_grid_pinpoints,
            native: None,
            do_convert_rgb: raw.do_convert_rgb.unwrap_or(true),
            do_resize: raw.do_resize.unwrap_or(true),
            size,
            resample: raw.resample.unwrap_or(3),
            do_center_crop: raw.do_center_crop.unwrap_or(true),
            crop_size,
            do_rescale: raw.do_rescale.unwrap_or(true),
            rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
            do_normalize: raw.do_normalize.unwrap_or(true),
            image_mean: triple(
                raw.image_mean,
                [0.481_454_66, 0.457_827_5, 0.408_210_73],
                "image_mean",
            )?,
            image_std: triple(
                raw.image_std,
                [0.268_629_55, 0.261_302_6, 0.275_777_1],
                "image_std",
            )?,
        };
        Ok(cfg)
    }

    /// Height and width of `pixel_values` this configuration produces.
    pub fn output_size(&self) -> (u32, u32) {
        if self.do_center_crop {
            self.crop_size
        } else {
            match self.size {
                ResizeTarget::Exact { height, width } => (height, width),
                ResizeTarget::ShortestEdge(s) => (s, s),
            }
        }
    }
}

/// `preprocessor_config.json`, or the `image_processor` section of `processor_config.json`.
fn read_processor(dir: &Path) -> Result<(std::path::PathBuf, Value)> {
    let pre = dir.join("preprocessor_config.json");
    let proc_ = dir.join("processor_config.json");
    if pre.exists() {
        Ok((pre.clone(), read_json(&pre)?))
    } else if proc_.exists() {
        let v = read_json(&proc_)?;
        let inner = v.get("image_processor").cloned().unwrap_or(v);
        Ok((proc_.clone(), inner))
    } else {
        Err(ModelError::checkpoint(
            dir,
            "no preprocessor_config.json or processor_config.json (the image processor settings)",
        ))
    }
}

/// An image processor's `size` (or `crop_size`) object: the keys read there.
#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<u64>,
    /// GLM-4.1V: the largest pixel count.
    longest_edge: Option<u64>,
    height: Option<u64>,
    width: Option<u64>,
}

fn parse_size(v: &Value) -> std::result::Result<ResizeTarget, String> {
    if let Some(n) = v.as_u64() {
        return Ok(ResizeTarget::Exact {
            height: n as u32,
            width: n as u32,
        });
    }
    let raw: RawSize = serde_json::from_value(v.clone())
        .map_err(|e| format!("unsupported image size setting {v}: {e}"))?;
    match raw {
        RawSize {
            shortest_edge: Some(s),
            ..
        } => Ok(ResizeTarget::ShortestEdge(s as u32)),
        RawSize {
            height: Some(h),
            width: Some(w),
            ..
        } => Ok(ResizeTarget::Exact {
            height: h as u32,
            width: w as u32,
        }),
        _ => Err(format!("unsupported image size setting {v}")),
    }
}
