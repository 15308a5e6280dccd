//! LLaVA-NeXT "anyres": an image is resized to the best-fitting resolution among the checkpoint's
//! `image_grid_pinpoints`, padded, cut into tiles of the vision tower's input size and encoded tile by
//! tile beside one downscaled base view. The projected tile features are stitched back into one
//! feature map, the padding is cut off again (`unpad`) and an `image_newline` embedding ends every
//! row, so the number of image tokens depends on the image's size.
//!
//! The arithmetic follows transformers (`select_best_resolution`, `get_patch_output_size`,
//! `unpad_image`, `pack_image_features`, and the processor's `_get_number_of_features`) to the
//! float operation, so that counts and crops agree with it for every size.

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// A resolution `(height, width)` in pixels, as `image_grid_pinpoints` lists them.
pub type Resolution = (u32, u32);

/// Most pinpoints a checkpoint may list, and most tiles per side: real checkpoints list at most a
/// few dozen resolutions of up to 6 tiles per side; the bound keeps a hostile config from sizing
/// anything.
pub const MAX_PINPOINTS: usize = 256;
pub const MAX_TILES_PER_SIDE: u32 = 16;

/// How an image was cut into views: the tile grid (LLaVA-NeXT anyres) or a single view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileGrid {
    pub rows: u32,
    pub cols: u32,
}

/// The size of the image the views came from (after any region crop) and how it was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageLayout {
    pub height: u32,
    pub width: u32,
    /// `None`: one view (LLaVA-1.5 and other single-view models).
    pub grid: Option<TileGrid>,
    /// GLM-4.1V (images at their own resolution): the image's token grid after the spatial
    /// merge, rows × columns; its tokens get 3-D rotary positions from it ([`crate::mrope`]).
    /// `None` for other models.
    pub tokens: Option<TileGrid>,
}

impl ImageLayout {
    /// One view at the tower's own size (LLaVA-1.5): neither a tile grid nor a token grid, so
    /// nothing about the layout matters past the encoder.
    pub fn is_plain(&self) -> bool {
        self.grid.is_none() && self.tokens.is_none()
    }

    /// Views the encoder runs: the base view, then the tiles row by row.
    pub fn num_views(&self) -> usize {
        match self.grid {
            None => 1,
            Some(g) => 1 + (g.rows * g.cols) as usize,
        }
    }

    /// Rows the projector emits for this image when every view has `view_rows` feature rows
    /// from a `side × side` patch grid: one view's rows, or the base view's and then the unpadded
    /// tile feature map with one newline per row. Equal to transformers'
    /// `LlavaNextProcessor._get_number_of_features` (minus the CLS token, which the `default`
    /// strategy that tiling requires drops).
    pub fn packed_rows(&self, side: usize, view_rows: usize) -> usize {
        if let Some(t) = self.tokens {
            return (t.rows * t.cols) as usize;
        }
        match self.grid {
            None => view_rows,
            Some(_) => {
                let ((top, bottom), (left, right)) = self.unpadded(side);
                view_rows + (bottom - top) * (right - left + 1)
            }
        }
    }

    /// The rows `[top, bottom)` and columns `[left, right)` of the stitched `grid × side` feature
    /// map that hold the image rather than padding (`unpad_image`).
    pub fn unpadded(&self, side: usize) -> ((usize, usize), (usize, usize)) {
        let g = self.grid.unwrap_or(TileGrid { rows: 1, cols: 1 });
        let (cur_h, cur_w) = (g.rows as usize * side, g.cols as usize * side);
        unpad_range((self.height as usize, self.width as usize), (cur_h, cur_w))
    }
}

/// transformers' `select_best_resolution`: the pinpoint that keeps the most of the image's pixels
/// when it is scaled to fit, then the one that wastes the least.
pub fn select_best_resolution(original: Resolution, pinpoints: &[Resolution]) -> Resolution {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let original_area = original.0 as u64 * original.1 as u64;
    let mut best = pinpoints[0];
    let mut max_effective = 0u64;
    let mut min_wasted = u64::MAX;
    for &(h, w) in pinpoints {
        let scale = (w as f64 / ow).min(h as f64 / oh);
        // Python's int() truncates.
        let dw = (ow * scale) as u64;
        let dh = (oh * scale) as u64;
        let effective = (dw * dh).min(original_area);
        let wasted = (w as u64 * h as u64).saturating_sub(effective);
        if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
            max_effective = effective;
            min_wasted = wasted;
            best = (h, w);
        }
    }
    best
}

/// transformers' `get_patch_output_size`: the size the image is resized to inside `target`,
/// keeping its aspect ratio (the rest is padding).
pub fn patch_output_size(original: Resolution, target: Resolution) -> Resolution {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as u32).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as u32).min(tw))
    }
}

/// Python's `int(round(x, 7))` for non-negative `x`: rounding to 7 decimals first keeps values a
/// hair below an integer (float error) from truncating one short.
fn int_round7(x: f64) -> usize {
    ((x * 1e7).round() / 1e7) as usize
}

/// `unpad_image`'s crop of a `current` feature map holding an `original`-sized image:
/// `((top, bottom), (left, right))`, end-exclusive.
pub fn unpad_range(
    original: (usize, usize),
    current: (usize, usize),
) -> ((usize, usize), (usize, usize)) {
    let (oh, ow) = (original.0 as f64, original.1 as f64);
    let (ch, cw) = current;
    if ow / oh > cw as f64 / ch as f64 {
        let new_h = int_round7(oh * (cw as f64 / ow));
        let pad = ch.saturating_sub(new_h) / 2;
        ((pad, ch - pad), (0, cw))
    } else {
        let new_w = int_round7(ow * (ch as f64 / oh));
        let pad = cw.saturating_sub(new_w) / 2;
        ((0, ch), (pad, cw - pad))
    }
}

/// Checks a checkpoint's pinpoints: each a whole number of `tile`-sized tiles, within bounds.
pub fn check_pinpoints(pinpoints: &[Resolution], tile: u32) -> std::result::Result<(), String> {
    if pinpoints.is_empty() {
        return Err("image_grid_pinpoints is empty".into());
    }
    if pinpoints.len() > MAX_PINPOINTS {
        return Err(format!(
            "image_grid_pinpoints lists {} resolutions; at most {MAX_PINPOINTS} are supported",
            pinpoints.len()
        ));
    }
    for &(h, w) in pinpoints {
        if h == 0 || w == 0 || h % tile != 0 || w % tile != 0 {
            return Err(format!(
                "image_grid_pinpoints entry [{h}, {w}] is not a whole number of {tile}x{tile} tiles \
                 (the vision tower's input size)"
            ));
        }
        if h / tile > MAX_TILES_PER_SIDE || w / tile > MAX_TILES_PER_SIDE {
            return Err(format!(
                "image_grid_pinpoints entry [{h}, {w}] has more than {MAX_TILES_PER_SIDE} tiles per side"
            ));
        }
    }
    Ok(())
}

/// Parses `image_grid_pinpoints` (`[[h, w], …]`) from a config value.
pub fn parse_pinpoints(v: &serde_json::Value) -> std::result::Result<Vec<Resolution>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| format!("image_grid_pinpoints {v} is not a list of [height, width]"))?;
    items
        .iter()
        .map(|p| match p.as_array().map(Vec::as_slice) {
            Some([h, w]) => match (h.as_u64(), w.as_u64()) {
                (Some(h), Some(w)) if h <= u32::MAX as u64 && w <= u32::MAX as u64 => {
                    Ok((h as u32, w as u32))
                }
                _ => Err(format!(
                    "image_grid_pinpoints entry {p} is not [height, width]"
                )),
            },
            _ => Err(format!(
                "image_grid_pinpoints entry {p} is not [height, width]"
            )),
        })
        .collect()
}

/// `pack_image_features` for one image: `views` `[1 + tiles, side², D]` (base view first, tiles row
/// by row) → `[packed_rows, D]`: the base view's rows, then the unpadded tile feature map row by
/// row, each row followed by `newline` `[D]`. A single-view layout passes the base view through.
pub fn pack(views: &Tensor, layout: &ImageLayout, side: usize, newline: &Tensor) -> Result<Tensor> {
    let (n, t, d) = views.dims3()?;
    if n != layout.num_views() || t != side * side {
        return Err(ModelError::InvalidInput(format!(
            "an image laid out as {layout:?} needs [{}, {}, D] view features, got {:?}",
            layout.num_views(),
            side * side,
            views.dims()
        )));
    }
    let base = views.get(0)?;
    let Some(g) = layout.grid else {
        return Ok(base);
    };
    let (rows, cols) = (g.rows as usize, g.cols as usize);
    let map = views
        .narrow(0, 1, rows * cols)?
        .reshape((rows, cols, side, side, d))?
        .permute((0, 2, 1, 3, 4))?
        .reshape((rows * side, cols * side, d))?;
    let ((top, bottom), (left, right)) = layout.unpadded(side);
    let map = map
        .narrow(0, top, bottom - top)?
        .narrow(1, left, right - left)?;
    let h = bottom - top;
    let nl = newline
        .to_dtype(map.dtype())?
        .reshape((1, 1, d))?
        .broadcast_as((h, 1, d))?;
    let packed = Tensor::cat(&[&map, &nl], 1)?.reshape((h * (right - left + 1), d))?;
    Ok(Tensor::cat(&[&base, &packed], 0)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const PINS: &[Resolution] = &[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_matches_transformers_examples() {
        // Values computed with transformers.image_processing_utils.select_best_resolution.
        assert_eq!(select_best_resolution((2400, 1080), PINS), (1008, 336));
        assert_eq!(select_best_resolution((480, 640), PINS), (672, 672));
        assert_eq!(select_best_resolution((100, 1000), PINS), (336, 1008));
        assert_eq!(select_best_resolution((14, 20), PINS), (336, 672));
    }

    #[test]
    fn packed_rows_count_base_unpadded_map_and_newlines() {
        // 336-pixel tiles of 24x24 features; a 480x640 (h, w) image on a 2x2 grid: the map is
        // 48x48, the image fills 48 columns and 36 rows (padding 6 above and below).
        let l = ImageLayout {
            height: 480,
            width: 640,
            grid: Some(TileGrid { rows: 2, cols: 2 }),
            tokens: None,
        };
        assert_eq!(l.unpadded(24), ((6, 42), (0, 48)));
        assert_eq!(l.packed_rows(24, 576), 576 + 36 * 49);
        let single = ImageLayout {
            height: 5,
            width: 7,
            grid: None,
            tokens: None,
        };
        assert_eq!(single.packed_rows(24, 577), 577);
    }

    #[test]
    fn pack_stitches_tiles_row_major_and_appends_newlines() {
        // side 1: each view is one feature row whose value is its view index.
        let views = Tensor::new(&[[[0f32]], [[1.]], [[2.]], [[3.]], [[4.]]], &Device::Cpu).unwrap();
        let l = ImageLayout {
            height: 10,
            width: 10,
            grid: Some(TileGrid { rows: 2, cols: 2 }),
            tokens: None,
        };
        let nl = Tensor::new(&[9f32], &Device::Cpu).unwrap();
        let p = pack(&views, &l, 1, &nl).unwrap();
        let v: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0., 1., 2., 9., 3., 4., 9.]);
    }

    #[test]
    fn bad_pinpoints_are_refused() {
        assert!(check_pinpoints(&[], 336).is_err());
        assert!(check_pinpoints(&[(336, 500)], 336).is_err());
        assert!(check_pinpoints(&[(336 * 17, 336)], 336).is_err());
        assert!(check_pinpoints(PINS, 336).is_ok());
    }
}
