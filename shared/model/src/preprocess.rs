//! Image preprocessing equal to transformers' `CLIPImageProcessor` (PIL backend): decode, RGB,
//! shortest-edge resize (PIL bicubic, see [`crate::resize`]), centre crop, rescale, normalise.

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{ImageFormat, ImageReader, RgbImage};

use crate::config::{ImageProcessorConfig, ResizeTarget};
use crate::error::{ModelError, Result};
use crate::resize::{resize, Filter};

/// Limits checked against the image header before any pixel is decoded, and against the resize
/// target before anything is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest width × height accepted, for the decoded image and for its resized copy.
    pub max_pixels: u64,
    /// Largest long side : short side ratio accepted. Resizing scales the short side to the
    /// vision tower's size, so without this bound a 67,108,864×1 image asks for a resize target
    /// of billions of pixels.
    pub max_aspect_ratio: u32,
}

/// The default [`ImageLimits::max_aspect_ratio`]: transformers' GLM-4V processor refuses ratios
/// over 200 too.
pub const DEFAULT_MAX_ASPECT_RATIO: u32 = 200;

impl Default for ImageLimits {
    fn default() -> Self {
        // 64 MP: larger than any camera photo, small enough that a decoded RGBA frame stays < 256 MiB.
        ImageLimits {
            max_pixels: 64 << 20,
            max_aspect_ratio: DEFAULT_MAX_ASPECT_RATIO,
        }
    }
}

/// Turns encoded image bytes into `pixel_values` `[1, 3, H, W]` (f32).
#[derive(Debug, Clone)]
pub struct Preprocessor {
    cfg: ImageProcessorConfig,
    filter: Filter,
    limits: ImageLimits,
}

impl Preprocessor {
    pub fn new(cfg: ImageProcessorConfig, limits: ImageLimits) -> Result<Self> {
        let filter = Filter::from_pil_id(cfg.resample).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "image processor resample={} (supported: 2 bilinear, 3 bicubic)",
                cfg.resample
            ))
        })?;
        Ok(Preprocessor {
            cfg,
            filter,
            limits,
        })
    }

    pub fn config(&self) -> &ImageProcessorConfig {
        &self.cfg
    }

    pub fn limits(&self) -> ImageLimits {
        self.limits
    }

    pub(crate) fn filter(&self) -> Filter {
        self.filter
    }

    /// Decodes PNG, JPEG or WebP bytes into 8-bit RGB (alpha dropped as PIL's `convert("RGB")` does;
    /// EXIF orientation is ignored, as transformers ignores it). With the processor's
    /// `do_convert_rgb` false, only images that are 8-bit RGB already are accepted.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage> {
        let (format, _, _) = self.header(bytes)?;
        let reader = || ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        // The header was checked; this bounds what a lying header could make the decoder allocate.
        limits.max_alloc = Some(self.limits.max_pixels.saturating_mul(8).max(1 << 20));
        let mut r = reader();
        r.limits(limits);
        let img = r.decode().map_err(|e| {
            ModelError::InvalidImage(format!("corrupt or truncated {format:?} image: {e}"))
        })?;
        if !self.cfg.do_convert_rgb && img.color() != image::ColorType::Rgb8 {
            // transformers would feed the image's own channels to a 3-channel tower and fail.
            return Err(ModelError::InvalidImage(format!(
                "a {:?} image, but the checkpoint's image processor has do_convert_rgb false \
                 (only 8-bit RGB images are accepted then)",
                img.color()
            )));
        }
        Ok(img.to_rgb8())
    }

    /// The image's format and size from its header alone, checked against the limits.
    pub(crate) fn header(&self, bytes: &[u8]) -> Result<(ImageFormat, u32, u32)> {
        if bytes.is_empty() {
            return Err(ModelError::InvalidImage("empty image (0 bytes)".into()));
        }
        let format = image::guess_format(bytes).map_err(|_| {
            ModelError::InvalidImage(
                "unrecognised image format (supported: PNG, JPEG, WebP)".into(),
            )
        })?;
        if !matches!(
            format,
            ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
        ) {
            return Err(ModelError::InvalidImage(format!(
                "{format:?} images are not supported (supported: PNG, JPEG, WebP)"
            )));
        }
        let reader = ImageReader::with_format(Cursor::new(bytes), format);
        let (width, height) = reader.into_dimensions().map_err(|e| {
            ModelError::InvalidImage(format!("cannot read the {format:?} header: {e}"))
        })?;
        self.check_size(width, height)?;
        Ok((format, width, height))
    }

    /// Refuses an image (or a region of one) the limits do not allow, before any work is sized by it.
    pub(crate) fn check_size(&self, width: u32, height: u32) -> Result<()> {
        let pixels = width as u64 * height as u64;
        if pixels == 0 {
            return Err(ModelError::InvalidImage(format!(
                "image has no pixels ({width}x{height})"
            )));
        }
        if pixels > self.limits.max_pixels {
            return Err(ModelError::ImageTooLarge {
                width,
                height,
                pixels,
                limit: self.limits.max_pixels,
            });
        }
        let (long, short) = (width.max(height) as u64, width.min(height) as u64);
        if long > short * self.limits.max_aspect_ratio as u64 {
            return Err(ModelError::ImageAspect {
                width,
                height,
                limit: self.limits.max_aspect_ratio,
            });
        }
        Ok(())
    }

    /// Resize + centre crop (still 8-bit), exactly as the HF processor does before rescaling.
    /// The resize target is checked against [`ImageLimits::max_pixels`] before anything is
    /// allocated, and allocation failures are errors, not aborts.
    pub fn resize_and_crop(&self, img: &RgbImage) -> Result<RgbImage> {
        let c = &self.cfg;
        let mut img = if c.do_resize {
            let (w, h) = img.dimensions();
            let (nw, nh) = match c.size {
                ResizeTarget::Exact { height, width } => (width as u64, height as u64),
                ResizeTarget::ShortestEdge(s) => shortest_edge_size_u64(w, h, s),
            };
            let limit = self.limits.max_pixels;
            match (u32::try_from(nw), u32::try_from(nh)) {
                (Ok(nw), Ok(nh)) if nw as u64 * nh as u64 <= limit && nw > 0 && nh > 0 => {
                    resize(img, nw, nh, self.filter)?
                }
                _ => {
                    return Err(ModelError::InvalidImage(format!(
                        "a {w}x{h} image would be resized to {nw}x{nh} for the vision tower, \
                         over the limit of {limit} pixels"
                    )))
                }
            }
        } else {
            img.clone()
        };
        if c.do_center_crop {
            img = center_crop(&img, c.crop_size.0, c.crop_size.1);
        }
        Ok(img)
    }

    /// Rescale and normalise into CHW f32, with transformers' arithmetic (rescale in f64, cast to f32,
    /// then `(x - mean) / std` in f32).
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let c = &self.cfg;
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, p) in img.pixels().enumerate() {
            for ch in 0..3 {
                let mut x = p.0[ch] as f32;
                if c.do_rescale {
                    x = (p.0[ch] as f64 * c.rescale_factor) as f32;
                }
                if c.do_normalize {
                    x = (x - c.image_mean[ch]) / c.image_std[ch];
                }
                out[ch * plane + i] = x;
            }
        }
        out
    }

    /// Full pipeline: bytes → `pixel_values` `[1, 3, H, W]` f32.
    pub fn preprocess(&self, bytes: &[u8], device: &Device) -> Result<Tensor> {
        let img = self.decode(bytes)?;
        let img = self.resize_and_crop(&img)?;
        let (w, h) = img.dimensions();
        let data = self.normalize(&img);
        Ok(Tensor::from_vec(
            data,
            (1, 3, h as usize, w as usize),
            device,
        )?)
    }
}

/// transformers' `get_resize_output_image_size(default_to_square=False)`: the short side becomes `size`,
/// the long side `int(size * long / short)` (truncated).
/// Saturates at `u32::MAX`; [`Preprocessor`] uses the exact `u64` size and refuses what does
/// not fit its limits.
pub fn shortest_edge_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (w, h) = shortest_edge_size_u64(width, height, size);
    (w.min(u32::MAX as u64) as u32, h.min(u32::MAX as u64) as u32)
}

fn shortest_edge_size_u64(width: u32, height: u32, size: u32) -> (u64, u64) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = ((size as u64 * long as u64) as f64 / short.max(1) as f64) as u64;
    if width <= height {
        (size as u64, new_long)
    } else {
        (new_long, size as u64)
    }
}

/// transformers' `center_crop`: offsets `(orig - crop) // 2` (floor), zero padding when the image is
/// smaller than the crop.
pub fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    let mut out = RgbImage::new(crop_w, crop_h);
    for y in 0..ch {
        let sy = top + y;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = left + x;
            if sx < 0 || sx >= w {
                continue;
            }
            out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
        }
    }
    out
}
