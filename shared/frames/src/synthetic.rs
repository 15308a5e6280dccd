//! A generated clip for benchmarks, tests and the demo: one shape moving across a still
//! background, with stretches of still frames.
//!
//! The scene is drawn the way `models/shapes/dataset.py` draws the bundled demo model's training
//! scenes (a 3×3 grid of named cells, a shape of radius 10.5–17 px anti-aliased by 4× supersampling,
//! a plain grey background), so the model names the shape's cell in every still stretch; and the
//! still stretches are byte-identical, so change detection can skip them entirely.
//! `models/shapes/make_clip.py` writes the same kind of clip as a PNG sequence.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};

/// The shape of a clip. Frame `i` exists for any `i`; `frames` is how many a consumer should
/// play.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClipSpec {
    /// Frames in the clip.
    pub frames: usize,
    /// Frames the shape rests at each cell centre (0 with `moving` 0 is treated as 1).
    pub still: usize,
    /// Frames of movement from one cell centre to the next.
    pub moving: usize,
    /// Canvas side in pixels (the demo model was trained on 128).
    pub size: u32,
}

impl Default for ClipSpec {
    /// 300 frames (10 s at 30 fps): about nine still stretches of 24 frames with 8-frame moves.
    fn default() -> Self {
        ClipSpec {
            frames: 300,
            still: 24,
            moving: 8,
            size: 128,
        }
    }
}

/// The demo model's cell names, row-major over the 3×3 grid.
pub const POSITIONS: [&str; 9] = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
];

/// Cells (indices into [`POSITIONS`]) in visiting order: a snake through the grid so each move is
/// to a neighbouring cell, then the same way back, so the loop never jumps across the canvas.
const ROUTE: [usize; 16] = [0, 1, 2, 5, 4, 3, 6, 7, 8, 7, 6, 3, 4, 5, 2, 1];

/// The shape's colour: dataset.py's "yellow", which stands out on a mid-grey background.
const SHAPE_RGB: [f32; 3] = [245.0, 225.0, 30.0];
/// dataset.py's "mid" plain background level.
const BACKGROUND: f32 = 175.0;
/// Radius at a 128 px canvas, in the middle of the trained range (10.5–17 px).
const RADIUS_AT_128: f32 = 14.0;
/// Samples per pixel side for anti-aliasing, as dataset.py's SUPERSAMPLE.
const SUPERSAMPLE: u32 = 4;

/// Frame `i` of the clip as PNG bytes, and the name of the cell the shape is in (`None` while it
/// moves between cells).
pub fn clip_frame(spec: &ClipSpec, i: usize) -> (Vec<u8>, Option<&'static str>) {
    let (cx, cy, cell) = shape_centre(spec, i);
    let image = draw(spec.size, cx, cy, RADIUS_AT_128 * spec.size as f32 / 128.0);
    let mut png = Cursor::new(Vec::new());
    image
        .write_to(&mut png, ImageFormat::Png)
        .expect("encoding a PNG into memory cannot fail");
    (png.into_inner(), cell.map(|c| POSITIONS[c]))
}

/// Where the shape's centre is in frame `i` (pixels), and its cell index while at rest.
fn shape_centre(spec: &ClipSpec, i: usize) -> (f32, f32, Option<usize>) {
    let still = if spec.still == 0 && spec.moving == 0 {
        1
    } else {
        spec.still
    };
    let period = still + spec.moving;
    let (stop, within) = (i / period, i % period);
    let from = ROUTE[stop % ROUTE.len()];
    let (fx, fy) = cell_centre(from, spec.size);
    if within < still {
        return (fx, fy, Some(from));
    }
    let (tx, ty) = cell_centre(ROUTE[(stop + 1) % ROUTE.len()], spec.size);
    // Steps 1..=moving of moving+1: never exactly at either centre, so a still stretch is
    // followed by a frame that really differs.
    let t = (within - still + 1) as f32 / (spec.moving + 1) as f32;
    (fx + (tx - fx) * t, fy + (ty - fy) * t, None)
}

/// The centre of grid cell `cell` (row-major) on a `size`-pixel canvas.
fn cell_centre(cell: usize, size: u32) -> (f32, f32) {
    let step = size as f32 / 3.0;
    let (row, col) = (cell / 3, cell % 3);
    ((col as f32 + 0.5) * step, (row as f32 + 0.5) * step)
}

/// A circle of radius `r` centred at (`cx`, `cy`) (pixel units, pixel (x, y) spanning
/// [x, x+1) × [y, y+1)) over the plain background, with edge pixels blended by their coverage
/// on a SUPERSAMPLE × SUPERSAMPLE grid of sample points.
fn draw(size: u32, cx: f32, cy: f32, r: f32) -> RgbImage {
    let level = BACKGROUND.round() as u8;
    let mut image = RgbImage::from_pixel(size, size, Rgb([level; 3]));
    // Only pixels near the circle can be covered.
    let lo = |c: f32| ((c - r).floor().max(0.0) as u32).min(size);
    let hi = |c: f32| ((c + r).ceil().max(0.0) as u32 + 1).min(size);
    for y in lo(cy)..hi(cy) {
        for x in lo(cx)..hi(cx) {
            let m = coverage(x, y, cx, cy, r);
            if m > 0.0 {
                let blend = |c: f32| (BACKGROUND * (1.0 - m) + c * m).round() as u8;
                image.put_pixel(x, y, Rgb(SHAPE_RGB.map(blend)));
            }
        }
    }
    image
}

/// Fraction of pixel (x, y)'s sample points inside the circle.
fn coverage(x: u32, y: u32, cx: f32, cy: f32, r: f32) -> f32 {
    let n = SUPERSAMPLE;
    let mut inside = 0u32;
    for sy in 0..n {
        for sx in 0..n {
            let px = x as f32 + (sx as f32 + 0.5) / n as f32 - cx;
            let py = y as f32 + (sy as f32 + 0.5) / n as f32 - cy;
            if px * px + py * py <= r * r {
                inside += 1;
            }
        }
    }
    inside as f32 / (n * n) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{compare, decode, FrameLimits, PixelBox};

    #[test]
    fn still_stretches_are_byte_identical() {
        let spec = ClipSpec::default();
        let (first, cell) = clip_frame(&spec, 0);
        assert_eq!(cell, Some("top left"));
        for i in 1..spec.still {
            assert_eq!(clip_frame(&spec, i), (first.clone(), Some("top left")));
        }
        let (moved, cell) = clip_frame(&spec, spec.still);
        assert_eq!(cell, None);
        assert_ne!(moved, first);
    }

    #[test]
    fn cells_follow_the_route_with_the_right_frame_counts() {
        let spec = ClipSpec {
            frames: 0,
            still: 3,
            moving: 2,
            size: 48,
        };
        let cells: Vec<_> = (0..5 * 18).map(|i| clip_frame(&spec, i).1).collect();
        assert_eq!(cells.iter().filter(|c| c.is_none()).count(), 2 * 18);
        let mut expected = Vec::new();
        for k in 0..18 {
            let name = POSITIONS[ROUTE[k % ROUTE.len()]];
            expected.extend([Some(name); 3]);
            expected.extend([None; 2]);
        }
        assert_eq!(cells, expected);
        // The route's first half is the snake, then back.
        let order: Vec<_> = ROUTE[..9].iter().map(|&c| POSITIONS[c]).collect();
        assert_eq!(
            order,
            [
                "top left",
                "top",
                "top right",
                "right",
                "center",
                "left",
                "bottom left",
                "bottom",
                "bottom right"
            ]
        );
    }

    #[test]
    fn default_clip_has_its_still_frames_where_expected() {
        let spec = ClipSpec::default();
        let still = (0..spec.frames)
            .filter(|&i| shape_centre(&spec, i).2.is_some())
            .count();
        // 300 = 9 full periods of 32 (216 still) + 12 frames of the tenth stretch.
        assert_eq!(still, 9 * 24 + 12);
        assert_eq!(clip_frame(&spec, 9 * 32).1, Some("bottom"));
    }

    #[test]
    fn frames_are_the_specified_size_and_colours() {
        let spec = ClipSpec::default();
        let (png, _) = clip_frame(&spec, 4 * 32); // center
        let frame = decode(&png, &FrameLimits::default()).unwrap();
        assert_eq!((frame.width(), frame.height()), (128, 128));
        let px = |x: usize, y: usize| &frame.rgb()[(y * 128 + x) * 3..][..3];
        assert_eq!(px(64, 64), &[245, 225, 30]);
        assert_eq!(px(0, 0), &[175, 175, 175]);
        assert_eq!(px(64, 64 + 16), &[175, 175, 175]);
    }

    #[test]
    fn consecutive_moving_frames_change_around_the_shape() {
        let spec = ClipSpec::default();
        let limits = FrameLimits::default();
        let r = RADIUS_AT_128;
        for i in spec.still - 1..spec.still + spec.moving {
            let a = decode(&clip_frame(&spec, i).0, &limits).unwrap();
            let b = decode(&clip_frame(&spec, i + 1).0, &limits).unwrap();
            let change = compare(&a, &b, 8, 2.0);
            assert!(!change.is_still(), "frames {i}, {}", i + 1);
            let bbox = change.bbox.unwrap();
            let (cx, cy, _) = shape_centre(&spec, i + 1);
            // The changed blocks contain the shape's new position (its inner disc at least).
            let inner = PixelBox {
                x0: (cx - r + 1.0) as u32,
                y0: (cy - r + 1.0) as u32,
                x1: (cx + r - 1.0).ceil() as u32,
                y1: (cy + r - 1.0).ceil() as u32,
            };
            assert!(
                bbox.x0 <= inner.x0
                    && bbox.y0 <= inner.y0
                    && bbox.x1 >= inner.x1
                    && bbox.y1 >= inner.y1,
                "frames {i}, {}: {bbox:?} does not contain {inner:?}",
                i + 1
            );
        }
    }
}
