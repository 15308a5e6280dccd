//! GLM-4.1V's `smart_resize` (transformers `image_processing_glm4v.py`): the size an image is
//! resized to before patching, a multiple of patch × merge (`factor`, 28) on both sides, whose
//! area (times the temporal patch) lies within `[min_pixels, max_pixels]`, keeping the aspect
//! ratio as closely as that allows. Reproduced operation for operation, Python's rounding
//! included (`round` ties to even; `int` truncates), so the patch grid, and with it the number of
//! image tokens, is transformers' for every size.

/// The processor settings `smart_resize` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmartResize {
    /// Frames per temporal patch (2; a still image counts as that many frames).
    pub temporal_factor: u32,
    /// Side granularity in pixels: patch size × spatial merge size.
    pub factor: u32,
    /// Least `frames × height × width` (`size.shortest_edge`).
    pub min_pixels: u64,
    /// Most `frames × height × width` (`size.longest_edge`).
    pub max_pixels: u64,
}

impl Default for SmartResize {
    /// The GLM-4.1V processor's defaults.
    fn default() -> Self {
        SmartResize {
            temporal_factor: 2,
            factor: 28,
            min_pixels: 112 * 112,
            max_pixels: 28 * 28 * 15000,
        }
    }
}

/// Most `max(h, w) / min(h, w)` transformers accepts.
pub const MAX_ASPECT_RATIO: f64 = 200.0;

/// `(height, width)` to resize a `frames`-frame image of `height` × `width` to; an error (the
/// message transformers gives) for fewer frames than the temporal patch, an empty image or an
/// aspect ratio over 200.
pub fn smart_resize(
    frames: u32,
    height: u32,
    width: u32,
    s: &SmartResize,
) -> Result<(u32, u32), String> {
    if frames < s.temporal_factor {
        return Err(format!(
            "t:{frames} must be larger than temporal_factor:{}",
            s.temporal_factor
        ));
    }
    if height == 0 || width == 0 || s.factor == 0 {
        return Err(format!("an image of {width}x{height} has no pixels"));
    }
    let factor = f64::from(s.factor);
    let (mut h, mut w) = (f64::from(height), f64::from(width));
    if h < factor || w < factor {
        let scale = (factor / h).max(factor / w);
        h = (h * scale).trunc();
        w = (w * scale).trunc();
    }
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio}"
        ));
    }
    let mut h_bar = (h / factor).round_ties_even() * factor;
    let mut w_bar = (w / factor).round_ties_even() * factor;
    let t = f64::from(frames);
    let t_bar = (t / f64::from(s.temporal_factor)).round_ties_even() * f64::from(s.temporal_factor);
    let (min, max) = (s.min_pixels as f64, s.max_pixels as f64);
    if t_bar * h_bar * w_bar > max {
        let beta = ((t * h * w) / max).sqrt();
        h_bar = factor.max((h / beta / factor).floor() * factor);
        w_bar = factor.max((w / beta / factor).floor() * factor);
    } else if t_bar * h_bar * w_bar < min {
        let beta = (min / (t * h * w)).sqrt();
        h_bar = (h * beta / factor).ceil() * factor;
        w_bar = (w * beta / factor).ceil() * factor;
    }
    Ok((h_bar as u32, w_bar as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_to_multiples_of_28() {
        let s = SmartResize::default();
        assert_eq!(smart_resize(2, 2400, 1080, &s), Ok((2408, 1092)));
        // 42 / 28 = 1.5 rounds to even: 2 × 28.
        assert_eq!(smart_resize(2, 42, 70, &s).unwrap().0 % 28, 0);
        assert!(smart_resize(2, 1, 300, &s).is_err());
        assert!(smart_resize(1, 100, 100, &s).is_err());
        assert!(smart_resize(2, 0, 100, &s).is_err());
    }
}
