//! The views the vision tower encodes for one image: one (single-view models), or LLaVA-NeXT's
//! base view plus tiles ([`crate::anyres`]), each an 8-bit RGB image of the tower's input size.
//! Optionally of a region of the image ([`Region`]) rather than the whole of it.

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::anyres::{patch_output_size, select_best_resolution, ImageLayout, TileGrid};
use crate::config::{NativeResize, ResizeTarget};
use crate::error::{ModelError, Result};
use crate::preprocess::Preprocessor;
use crate::region::Region;
use crate::resize::{resize, resize_torchvision};
use crate::smart_resize::smart_resize;

/// An image cut into views, before rescaling and normalisation.
#[derive(Debug, Clone)]
pub struct ImageViews {
    pub layout: ImageLayout,
    /// Base view first, then the tiles row by row.
    pub views: Vec<RgbImage>,
}

impl ImageViews {
    /// A digest of each view's pixels: what a feature cache keys a view by, so a view whose
    /// pixels did not change (one tile of a screenshot that changed elsewhere) is found again.
    pub fn digests(&self) -> Vec<[u8; 32]> {
        self.views
            .iter()
            .map(|v| {
                let mut h = blake3::Hasher::new();
                h.update(&v.width().to_le_bytes());
                h.update(&v.height().to_le_bytes());
                h.update(v.as_raw());
                *h.finalize().as_bytes()
            })
            .collect()
    }
}

impl Preprocessor {
    /// Encoded bytes → the views of the image, or of `region` of it (cropped at full resolution
    /// and then treated as an image of its own).
    pub fn image_views(&self, bytes: &[u8], region: Option<Region>) -> Result<ImageViews> {
        let img = self.decode(bytes)?;
        let img = match region {
            None => img,
            Some(r) => {
                let crop = r.crop(&img)?;
                self.check_size(crop.width(), crop.height())
                    .map_err(|e| ModelError::InvalidImage(format!("region {r}: {e}")))?;
                crop
            }
        };
        self.views(&img)
    }

    /// The layout [`Self::image_views`] gives the image (or `region` of it), from the image's
    /// header alone: its size, tile grid and token grid, with every size limit checked, and no
    /// pixel decoded. What a request's image rows are, before any work is spent on them.
    pub fn layout_of(&self, bytes: &[u8], region: Option<Region>) -> Result<ImageLayout> {
        let (_, mut w, mut h) = self.header(bytes)?;
        if let Some(r) = region {
            r.check()?;
            let (l, t, right, b) = r.pixel_box(w, h);
            (w, h) = (right - l, b - t);
            self.check_size(w, h)
                .map_err(|e| ModelError::InvalidImage(format!("region {r}: {e}")))?;
        }
        let mut layout = ImageLayout {
            height: h,
            width: w,
            grid: None,
            tokens: None,
        };
        if let Some(n) = &self.config().native {
            let (nh, nw) = smart_resize(n.smart.temporal_factor, h, w, &n.smart)
                .map_err(|e| ModelError::InvalidImage(format!("a {w}x{h} image: {e}")))?;
            self.check_target(w, h, nw, nh, "resized to")?;
            let unit = n.patch_size * n.merge_size;
            layout.tokens = Some(TileGrid {
                rows: nh / unit,
                cols: nw / unit,
            });
        } else if let Some(pins) = &self.config().image_grid_pinpoints {
            let tile = self.config().output_size().0;
            let (bh, bw) = select_best_resolution((h, w), pins);
            self.check_target(w, h, bw, bh, "tiled at")?;
            layout.grid = Some(TileGrid {
                rows: bh / tile,
                cols: bw / tile,
            });
        }
        Ok(layout)
    }

    /// The views of a decoded image, as transformers' image processor cuts them
    /// (`LlavaNextImageProcessor.get_image_patches` for anyres checkpoints).
    pub fn views(&self, img: &RgbImage) -> Result<ImageViews> {
        let (w, h) = img.dimensions();
        if let Some(n) = &self.config().native {
            return self.native_view(img, n);
        }
        let Some(pins) = &self.config().image_grid_pinpoints else {
            return Ok(ImageViews {
                layout: ImageLayout {
                    height: h,
                    width: w,
                    grid: None,
                    tokens: None,
                },
                views: vec![self.resize_and_crop(img)?],
            });
        };
        let tile = self.config().output_size().0;
        let (bh, bw) = select_best_resolution((h, w), pins);
        self.check_target(w, h, bw, bh, "tiled at")?;
        let (nh, nw) = patch_output_size((h, w), (bh, bw));
        let resized = resize(img, nw, nh, self.filter())?;
        // Zero padding around the centred image (`_pad_for_patching`).
        let mut padded = RgbImage::new(bw, bh);
        image::imageops::replace(
            &mut padded,
            &resized,
            ((bw - nw) / 2) as i64,
            ((bh - nh) / 2) as i64,
        );
        let grid = TileGrid {
            rows: bh / tile,
            cols: bw / tile,
        };
        // The base view is resized straight to the square input, aspect ratio not kept.
        let (sh, sw) = match self.config().size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge(s) => (s, s),
        };
        let mut views = Vec::with_capacity(1 + (grid.rows * grid.cols) as usize);
        views.push(self.resize_and_crop(&resize(img, sw, sh, self.filter())?)?);
        for r in 0..grid.rows {
            for c in 0..grid.cols {
                let t = image::imageops::crop_imm(&padded, c * tile, r * tile, tile, tile);
                views.push(self.resize_and_crop(&t.to_image())?);
            }
        }
        Ok(ImageViews {
            layout: ImageLayout {
                height: h,
                width: w,
                grid: Some(grid),
                tokens: None,
            },
            views,
        })
    }

    /// Refuses a `w × h` image that would be `how` (resized, tiled) to `tw × th`, over the
    /// pixel limit.
    fn check_target(&self, w: u32, h: u32, tw: u32, th: u32, how: &str) -> Result<()> {
        if th as u64 * tw as u64 > self.limits().max_pixels {
            return Err(ModelError::InvalidImage(format!(
                "a {w}x{h} image would be {how} {tw}x{th}, over the limit of {} pixels",
                self.limits().max_pixels
            )));
        }
        Ok(())
    }

    /// GLM-4.1V: the image resized by `smart_resize` (as `Glm4vImageProcessor` does), one view of
    /// its own size, and its token grid (one row per merged patch window).
    fn native_view(&self, img: &RgbImage, n: &NativeResize) -> Result<ImageViews> {
        let (w, h) = img.dimensions();
        let (nh, nw) = smart_resize(n.smart.temporal_factor, h, w, &n.smart)
            .map_err(|e| ModelError::InvalidImage(format!("a {w}x{h} image: {e}")))?;
        self.check_target(w, h, nw, nh, "resized to")?;
        let resized = if n.torchvision {
            resize_torchvision(img, nw, nh, self.filter())?
        } else {
            resize(img, nw, nh, self.filter())?
        };
        let unit = n.patch_size * n.merge_size;
        Ok(ImageViews {
            layout: ImageLayout {
                height: h,
                width: w,
                grid: None,
                tokens: Some(TileGrid {
                    rows: nh / unit,
                    cols: nw / unit,
                }),
            },
            views: vec![resized],
        })
    }

    /// Rescaled, normalised views as `pixel_values` `[views, 3, H, W]` (f32).
    pub fn pixel_values(&self, views: &[RgbImage], device: &Device) -> Result<Tensor> {
        let first = views
            .first()
            .ok_or_else(|| ModelError::InvalidInput("no views to encode".into()))?;
        let (w, h) = first.dimensions();
        let mut data = Vec::with_capacity(views.len() * 3 * (w * h) as usize);
        for v in views {
            if v.dimensions() != (w, h) {
                return Err(ModelError::InvalidInput(format!(
                    "views differ in size: {:?} and {:?}",
                    v.dimensions(),
                    (w, h)
                )));
            }
            data.extend(self.normalize(v));
        }
        Ok(Tensor::from_vec(
            data,
            (views.len(), 3, h as usize, w as usize),
            device,
        )?)
    }
}
