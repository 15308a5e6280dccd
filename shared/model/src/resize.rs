//! PIL's resampler, reproduced exactly (Pillow `libImaging/Resample.c`).
//!
//! Transformers' image processors resize with `PIL.Image.resize(..., BICUBIC)`. General-purpose resize
//! crates use other kernels or float pipelines and differ from PIL by up to 25 levels on noisy images
//! (measured with fast_image_resize 5), which moves vision features far beyond parity tolerances. PIL's
//! algorithm is a separable convolution: horizontal pass then vertical pass, each rounded and clipped to
//! 8 bits, with kernel support widened by the scale factor when downscaling and per-pixel normalised
//! coefficients converted to 22-bit fixed point. We follow it step by step so results are bit-identical.

use image::RgbImage;

use crate::error::{ModelError, Result};

/// Fixed-point precision of PIL's 8-bit resampling coefficients (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL resampling filters we support (PIL's numeric ids in the image processor config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2): triangle kernel, support 1.
    Bilinear,
    /// `Image.BICUBIC` (3): cubic convolution with a = −0.5, support 2.
    Bicubic,
}

impl Filter {
    pub fn from_pil_id(id: u32) -> Option<Self> {
        match id {
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per-output-pixel taps: first input index, and fixed-point weights of `precision` bits.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    precision: u32,
}

/// How the normalised weights become fixed point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fixed {
    /// PIL: always [`PRECISION_BITS`] (22) bits.
    Pil,
    /// torchvision's uint8 antialiased path (`_compute_index_ranges_int16_weights`): the most
    /// bits (below 22) for which the largest weight still fits an int16.
    Int16,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the full input range `[0, in_size)`.
fn precompute(in_size: usize, out_size: usize, filter: Filter, fixed: Fixed) -> Result<Coeffs> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = zeroed::<(usize, usize)>(out_size, "resize bounds")?;
    bounds.clear();
    let weight_count = out_size.saturating_mul(ksize);
    let mut weights = zeroed::<i32>(weight_count, "resize coefficients")?;
    let mut k = zeroed::<f64>(ksize, "resize kernel")?;
    let mut normalised = zeroed::<f64>(weight_count, "resize coefficients")?;
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; the clamp to 0 makes that equal to floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            normalised[xx * ksize + x] = if x < xmax && ww != 0.0 {
                k[x] / ww
            } else if x < xmax {
                k[x]
            } else {
                0.0
            };
        }
        bounds.push((xmin, xmax));
    }
    let precision = match fixed {
        Fixed::Pil => PRECISION_BITS,
        Fixed::Int16 => int16_precision(&normalised),
    };
    for (w, &n) in weights.iter_mut().zip(&normalised) {
        let scaled = n * (1u32 << precision) as f64;
        *w = if n < 0.0 {
            (scaled - 0.5) as i32
        } else {
            (scaled + 0.5) as i32
        };
    }
    Ok(Coeffs {
        ksize,
        bounds,
        weights,
        precision,
    })
}

/// torchvision's choice of fixed-point bits for int16 weights: counting up from 0, stop at the
/// first precision whose next step would round the largest weight to 2^15 or more (at most 22).
fn int16_precision(weights: &[f64]) -> u32 {
    let max = weights.iter().copied().fold(weights[0], f64::max);
    let mut precision = 0;
    while precision < 22 {
        let next = (0.5 + max * (1u32 << (precision + 1)) as f64) as i32;
        if next >= 1 << 15 {
            break;
        }
        precision += 1;
    }
    precision
}

/// `n` default values, or [`ModelError::OutOfMemory`] when they cannot be allocated (instead of
/// the abort a failed `vec!` is).
fn zeroed<T: Clone + Default>(n: usize, what: &'static str) -> Result<Vec<T>> {
    let oom = || ModelError::OutOfMemory {
        what,
        bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
    };
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| oom())?;
    v.resize(n, T::default());
    Ok(v)
}

/// A black `width` × `height` image, allocated fallibly.
fn blank(width: u32, height: u32) -> Result<RgbImage> {
    let bytes = (width as usize)
        .saturating_mul(height as usize)
        .saturating_mul(3);
    let raw = zeroed::<u8>(bytes, "resized image")?;
    RgbImage::from_raw(width, height, raw).ok_or(ModelError::OutOfMemory {
        what: "resized image",
        bytes: bytes as u64,
    })
}

#[inline]
fn clip8(v: i64, precision: u32) -> u8 {
    if v >= (1i64 << precision << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> precision) as u8
    }
}

/// The rounding term added before the shift (0 with no fractional bits).
#[inline]
fn half(precision: u32) -> i64 {
    if precision == 0 {
        0
    } else {
        1i64 << (precision - 1)
    }
}

fn horizontal(src: &RgbImage, out_w: u32, c: &Coeffs) -> Result<RgbImage> {
    let h = src.height();
    let mut out = blank(out_w, h)?;
    let sraw = src.as_raw();
    let stride = src.width() as usize * 3;
    let oraw: &mut [u8] = &mut out;
    for y in 0..h as usize {
        let row = &sraw[y * stride..(y + 1) * stride];
        for xx in 0..out_w as usize {
            let (xmin, xmax) = c.bounds[xx];
            let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
            let mut ss = [half(c.precision); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                for ch in 0..3 {
                    ss[ch] += p[ch] as i64 * kx as i64;
                }
            }
            let o = (y * out_w as usize + xx) * 3;
            for ch in 0..3 {
                oraw[o + ch] = clip8(ss[ch], c.precision);
            }
        }
    }
    Ok(out)
}

fn vertical(src: &RgbImage, out_h: u32, c: &Coeffs) -> Result<RgbImage> {
    let w = src.width() as usize;
    let mut out = blank(w as u32, out_h)?;
    let sraw = src.as_raw();
    let stride = w * 3;
    let oraw: &mut [u8] = &mut out;
    for yy in 0..out_h as usize {
        let (ymin, ymax) = c.bounds[yy];
        let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
        for x in 0..w {
            let mut ss = [half(c.precision); 3];
            for (y, &ky) in k.iter().enumerate() {
                let o = (ymin + y) * stride + x * 3;
                for ch in 0..3 {
                    ss[ch] += sraw[o + ch] as i64 * ky as i64;
                }
            }
            let o = yy * stride + x * 3;
            for ch in 0..3 {
                oraw[o + ch] = clip8(ss[ch], c.precision);
            }
        }
    }
    Ok(out)
}

/// Resizes exactly as `PIL.Image.resize((width, height), resample=filter)` does for RGB images.
/// Buffers are allocated fallibly: a size the process cannot hold is [`ModelError::OutOfMemory`].
/// Callers bound `width` × `height` first (see [`crate::ImageLimits`]).
pub fn resize(src: &RgbImage, width: u32, height: u32, filter: Filter) -> Result<RgbImage> {
    separable(src, width, height, filter, Fixed::Pil)
}

/// Resizes exactly as torchvision's `resize(uint8 tensor, size, BICUBIC | BILINEAR,
/// antialias=True)` does on the CPU: PIL's algorithm and kernels (bicubic a = −0.5), horizontal
/// pass first, but with int16
/// weights whose fixed-point precision depends on the largest weight (the uint8 path torchvision
/// took over from Pillow-SIMD). transformers' torchvision-backed image processors (GLM-4.1V's
/// default one) resize this way; PIL's 22-bit weights differ from it by a level here and there.
pub fn resize_torchvision(
    src: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
) -> Result<RgbImage> {
    separable(src, width, height, filter, Fixed::Int16)
}

fn separable(
    src: &RgbImage,
    width: u32,
    height: u32,
    filter: Filter,
    fixed: Fixed,
) -> Result<RgbImage> {
    let (w, h) = src.dimensions();
    if (w, h) == (width, height) {
        return Ok(src.clone());
    }
    // PIL runs the horizontal pass first and skips a pass whose size does not change.
    let tmp = if width != w {
        horizontal(
            src,
            width,
            &precompute(w as usize, width as usize, filter, fixed)?,
        )?
    } else {
        src.clone()
    };
    if height != h {
        vertical(
            &tmp,
            height,
            &precompute(h as usize, height as usize, filter, fixed)?,
        )
    } else {
        Ok(tmp)
    }
}
