//! Bicubic sampling of a feature map at fractional points, as torch's
//! `F.grid_sample(input, grid, mode="bicubic", align_corners=False, padding_mode="border")`
//! computes it. GLM-4.1V resamples its learned position table (a square grid of embeddings) to
//! every image's patch grid this way; candle has no bicubic sampling.
//!
//! torch's kernel: a normalised coordinate g in [-1, 1] maps to the pixel coordinate
//! `((g + 1) · size − 1) / 2` (align_corners=False); the 4×4 neighbours around it are weighted by
//! the cubic convolution kernel with A = −0.75 (`get_cubic_upsample_coefficients`), and a
//! neighbour outside the map takes the value of the nearest border pixel (padding "border").

/// torch's cubic convolution constant for upsampling.
const A: f64 = -0.75;

/// The weights of the neighbours at offsets −1, 0, 1, 2 from `floor(x)` for fractional part `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    // |x| <= 1 and 1 < |x| < 2 branches of the Keys kernel.
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Samples `input` (`channels` maps of `height` × `width`, channel-major) at each point
/// `(x, y)` of `points`, in grid_sample's normalised coordinates (−1 and 1 are the outer edges of
/// the first and last pixels; points beyond them are allowed). Returns one row of `channels`
/// values per point, `[points.len(), channels]`.
///
/// # Panics
/// If `input.len() != channels * height * width` or a dimension is 0.
pub fn grid_sample_bicubic(
    input: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    points: &[(f32, f32)],
) -> Vec<f32> {
    assert!(channels > 0 && height > 0 && width > 0, "an empty map");
    assert_eq!(input.len(), channels * height * width, "map size");
    let mut out = Vec::with_capacity(points.len() * channels);
    for &(gx, gy) in points {
        let (ix, wx) = taps(gx, width);
        let (iy, wy) = taps(gy, height);
        for c in 0..channels {
            let plane = &input[c * height * width..(c + 1) * height * width];
            let mut acc = 0.0f64;
            for (row, wr) in iy.iter().zip(wy) {
                let line = &plane[row * width..(row + 1) * width];
                let mut across = 0.0f64;
                for (col, wc) in ix.iter().zip(wx) {
                    across += f64::from(line[*col]) * wc;
                }
                acc += across * wr;
            }
            out.push(acc as f32);
        }
    }
    out
}

/// The four neighbour indices along one axis (clamped to the map: border padding) and their
/// weights, for normalised coordinate `g` on an axis of `size` pixels.
fn taps(g: f32, size: usize) -> ([usize; 4], [f64; 4]) {
    let x = ((f64::from(g) + 1.0) * size as f64 - 1.0) / 2.0;
    let base = x.floor();
    let weights = cubic_weights(x - base);
    let last = size as f64 - 1.0;
    // Infinite coordinates clamp like any other; a NaN one gives NaN weights, so NaN out.
    let index = |k: f64| (base + k).clamp(0.0, last.max(0.0)) as usize;
    ([index(-1.0), index(0.0), index(1.0), index(2.0)], weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_interpolate_at_integers() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_weights(t);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{t}: {w:?}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn pixel_centres_return_the_pixel_and_constant_maps_stay_constant() {
        // 1 x 2 x 3 map; the centre of pixel (row 1, col 2) is x = (2 + 0.5) / 3 * 2 - 1.
        let input = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let x = (2.5f32 / 3.0) * 2.0 - 1.0;
        let y = (1.5f32 / 2.0) * 2.0 - 1.0;
        let v = grid_sample_bicubic(&input, 1, 2, 3, &[(x, y)]);
        assert!((v[0] - 6.0).abs() < 1e-6, "{v:?}");
        let flat = [7.0f32; 12];
        let v = grid_sample_bicubic(&flat, 2, 2, 3, &[(0.3, -0.7), (5.0, -9.0)]);
        assert!(v.iter().all(|&x| (x - 7.0).abs() < 1e-6), "{v:?}");
        let v = grid_sample_bicubic(&flat, 2, 2, 3, &[(f32::NAN, 0.0)]);
        assert!(v.iter().all(|x| x.is_nan()), "{v:?}");
    }
}
