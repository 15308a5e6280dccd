//! Block-wise frame differences and the boxes that locate them.

use crate::Frame;

/// Pixels in a box, [x0, x1) × [y0, y1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelBox {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl PixelBox {
    /// The smallest box covering both.
    fn union(self, other: PixelBox) -> PixelBox {
        PixelBox {
            x0: self.x0.min(other.x0),
            y0: self.y0.min(other.y0),
            x1: self.x1.max(other.x1),
            y1: self.y1.max(other.y1),
        }
    }
}

/// How a frame differs from a reference frame, block by block.
#[derive(Clone, Debug)]
pub struct Change {
    /// Grid width in blocks (the last column may be narrower than the block size).
    pub blocks_x: u32,
    /// Grid height in blocks (the last row may be shorter than the block size).
    pub blocks_y: u32,
    /// Blocks whose difference exceeds the threshold.
    pub changed_blocks: u32,
    /// Largest per-block mean absolute difference, in 8-bit levels (0..=255).
    pub max_diff: f32,
    /// Bounding box (pixels) of the changed blocks; `None` if none changed.
    pub bbox: Option<PixelBox>,
    /// The frames differ in size: everything counts as changed (max_diff 255, bbox = whole frame).
    pub resized: bool,
}

impl Change {
    /// Nothing changed beyond the threshold: the previous answer still holds.
    pub fn is_still(&self) -> bool {
        self.changed_blocks == 0
    }
}

/// Compares `next` with `reference` on a grid of `block`×`block` pixel blocks (block >= 1;
/// 0 is treated as 1). A block has changed when the mean absolute difference over its pixels and
/// channels exceeds `threshold` (8-bit levels; threshold 0 means any difference at all counts).
///
/// Blocks rather than a global mean because a small moving object (a cursor, a shape) barely moves
/// the global mean of a large frame but dominates its own block. One pass over the pixels, with
/// integer sums for one row of blocks at a time, so a 16 MP frame costs no extra allocation.
pub fn compare(reference: &Frame, next: &Frame, block: u32, threshold: f32) -> Change {
    let block = block.max(1);
    let (width, height) = (next.width(), next.height());
    let blocks_x = width.div_ceil(block);
    let blocks_y = height.div_ceil(block);
    if (reference.width(), reference.height()) != (width, height) {
        let whole = (width > 0 && height > 0).then_some(PixelBox {
            x0: 0,
            y0: 0,
            x1: width,
            y1: height,
        });
        return Change {
            blocks_x,
            blocks_y,
            changed_blocks: blocks_x * blocks_y,
            max_diff: 255.0,
            bbox: whole,
            resized: true,
        };
    }
    let mut change = Change {
        blocks_x,
        blocks_y,
        changed_blocks: 0,
        max_diff: 0.0,
        bbox: None,
        resized: false,
    };
    let mut sums = vec![0u64; blocks_x as usize];
    for by in 0..blocks_y {
        let y0 = by * block;
        let y1 = (y0 + block).min(height);
        sums.fill(0);
        accumulate_block_row(reference, next, block, y0..y1, &mut sums);
        for (bx, &sum) in sums.iter().enumerate() {
            let x0 = bx as u32 * block;
            let x1 = (x0 + block).min(width);
            let samples = u64::from(x1 - x0) * u64::from(y1 - y0) * 3;
            let mean = (sum as f64 / samples as f64) as f32;
            change.max_diff = change.max_diff.max(mean);
            if mean > threshold {
                change.changed_blocks += 1;
                let b = PixelBox { x0, y0, x1, y1 };
                change.bbox = Some(change.bbox.map_or(b, |acc| acc.union(b)));
            }
        }
    }
    change
}

/// Adds, for each block of one block row, the sum of |reference − next| over its pixel rows
/// `rows` and all three channels into `sums[bx]`.
fn accumulate_block_row(
    reference: &Frame,
    next: &Frame,
    block: u32,
    rows: std::ops::Range<u32>,
    sums: &mut [u64],
) {
    let stride = next.width() as usize * 3;
    let block_bytes = block as usize * 3;
    for y in rows {
        let start = y as usize * stride;
        let a = &reference.rgb()[start..start + stride];
        let b = &next.rgb()[start..start + stride];
        for ((sum, a), b) in sums
            .iter_mut()
            .zip(a.chunks(block_bytes))
            .zip(b.chunks(block_bytes))
        {
            // A block row of at most 8192 px × 3 channels × 255 fits a u32 comfortably; summing
            // in u32 lets the compiler vectorise the inner loop.
            let row: u32 = a
                .iter()
                .zip(b)
                .map(|(&p, &q)| u32::from(p.abs_diff(q)))
                .sum();
            *sum += u64::from(row);
        }
    }
}

/// The smallest box in the 0–1000 relative coordinates GUI agents use (x0,y0 floored, x1,y1
/// ceiled) that covers `b` in a width×height image, so that mapping back to pixels with
/// floor(x0*w/1000), ceil(x1*w/1000) covers at least b. Returns [x0, y0, x1, y1], each in
/// 0..=1000, x0 < x1, y0 < y1.
///
/// `b` is first clipped to the image; an empty box still yields a box one unit wide, and a
/// zero-sized image yields the whole range, so callers always get a usable region.
pub fn relative_box(b: PixelBox, width: u32, height: u32) -> [u32; 4] {
    let (x0, x1) = relative_span(b.x0, b.x1, width);
    let (y0, y1) = relative_span(b.y0, b.y1, height);
    [x0, y0, x1, y1]
}

/// One axis of [`relative_box`]: [lo, hi) of `extent` pixels → [floor, ceil) in thousandths.
fn relative_span(lo: u32, hi: u32, extent: u32) -> (u32, u32) {
    if extent == 0 {
        return (0, 1000);
    }
    let extent = u64::from(extent);
    let hi = u64::from(hi).min(extent);
    let lo = u64::from(lo).min(hi);
    let r0 = (lo * 1000 / extent) as u32;
    let r1 = (hi * 1000).div_ceil(extent) as u32;
    // Degenerate spans (empty box, or one so thin that floor and ceil meet) widen to one unit.
    if r1 > r0 {
        (r0, r1)
    } else if r0 < 1000 {
        (r0, r0 + 1)
    } else {
        (999, 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn solid(width: u32, height: u32, level: u8) -> Frame {
        Frame::from_rgb(width, height, vec![level; (width * height * 3) as usize]).unwrap()
    }

    fn with_pixel(frame: &Frame, x: u32, y: u32, rgb: [u8; 3]) -> Frame {
        let mut bytes = frame.rgb().to_vec();
        let i = ((y * frame.width() + x) * 3) as usize;
        bytes[i..i + 3].copy_from_slice(&rgb);
        Frame::from_rgb(frame.width(), frame.height(), bytes).unwrap()
    }

    #[test]
    fn identical_frames_are_still() {
        let a = solid(50, 30, 120);
        let c = compare(&a, &a.clone(), 16, 0.0);
        assert!(c.is_still());
        assert_eq!((c.blocks_x, c.blocks_y), (4, 2));
        assert_eq!(c.max_diff, 0.0);
        assert_eq!(c.bbox, None);
        assert!(!c.resized);
    }

    #[test]
    fn one_changed_block_is_located_exactly() {
        let a = solid(50, 30, 120);
        // Pixel (37, 20) lies in block (2, 1) of a 16 px grid: x 32..48, y 16..30 (edge row).
        let b = with_pixel(&a, 37, 20, [0, 0, 0]);
        let c = compare(&a, &b, 16, 0.0);
        assert_eq!(c.changed_blocks, 1);
        assert_eq!(
            c.bbox,
            Some(PixelBox {
                x0: 32,
                y0: 16,
                x1: 48,
                y1: 30
            })
        );
        // 3 × 120 levels over 16 × 14 pixels × 3 channels.
        let expected = 360.0 / (16.0 * 14.0 * 3.0);
        assert!((c.max_diff - expected).abs() < 1e-6, "{}", c.max_diff);
    }

    #[test]
    fn bbox_spans_all_changed_blocks_including_a_narrow_edge() {
        let a = solid(50, 30, 10);
        let b = with_pixel(&with_pixel(&a, 1, 1, [200; 3]), 49, 29, [200; 3]);
        let c = compare(&a, &b, 16, 0.0);
        assert_eq!(c.changed_blocks, 2);
        assert_eq!(
            c.bbox,
            Some(PixelBox {
                x0: 0,
                y0: 0,
                x1: 50,
                y1: 30
            })
        );
    }

    #[test]
    fn threshold_is_exclusive() {
        let a = solid(40, 40, 100);
        let b = solid(40, 40, 103);
        let at = compare(&a, &b, 8, 3.0);
        assert!(at.is_still());
        assert_eq!(at.max_diff, 3.0);
        let below = compare(&a, &b, 8, 2.5);
        assert_eq!(below.changed_blocks, 25);
        assert_eq!(
            below.bbox,
            Some(PixelBox {
                x0: 0,
                y0: 0,
                x1: 40,
                y1: 40
            })
        );
        // Threshold 0: a single level in a single channel counts.
        let mut bytes = a.rgb().to_vec();
        bytes[0] = 101;
        let one = Frame::from_rgb(40, 40, bytes).unwrap();
        assert_eq!(compare(&a, &one, 8, 0.0).changed_blocks, 1);
    }

    #[test]
    fn different_sizes_count_as_resized() {
        let c = compare(&solid(10, 10, 0), &solid(20, 12, 0), 8, 50.0);
        assert!(c.resized);
        assert!(!c.is_still());
        assert_eq!((c.blocks_x, c.blocks_y, c.changed_blocks), (3, 2, 6));
        assert_eq!(c.max_diff, 255.0);
        assert_eq!(
            c.bbox,
            Some(PixelBox {
                x0: 0,
                y0: 0,
                x1: 20,
                y1: 12
            })
        );
    }

    #[test]
    fn block_zero_means_one_pixel_blocks_and_empty_frames_are_still() {
        let a = solid(3, 2, 0);
        let c = compare(&a, &with_pixel(&a, 2, 1, [9; 3]), 0, 0.0);
        assert_eq!((c.blocks_x, c.blocks_y, c.changed_blocks), (3, 2, 1));
        let empty = solid(0, 0, 0);
        assert!(compare(&empty, &empty, 8, 0.0).is_still());
    }

    #[test]
    fn relative_box_examples() {
        let whole = PixelBox {
            x0: 0,
            y0: 0,
            x1: 128,
            y1: 128,
        };
        assert_eq!(relative_box(whole, 128, 128), [0, 0, 1000, 1000]);
        let cell = PixelBox {
            x0: 32,
            y0: 0,
            x1: 48,
            y1: 16,
        };
        assert_eq!(relative_box(cell, 128, 128), [250, 0, 375, 125]);
        let thin = PixelBox {
            x0: 3,
            y0: 5,
            x1: 4,
            y1: 5,
        };
        assert_eq!(relative_box(thin, 10_000, 10_000), [0, 0, 1, 1]);
        assert_eq!(relative_box(thin, 0, 0), [0, 0, 1000, 1000]);
    }

    fn pixel_box_in(max: u32) -> impl Strategy<Value = (u32, u32, PixelBox)> {
        (1..=max, 1..=max).prop_flat_map(|(w, h)| {
            ((0..w), (0..h)).prop_flat_map(move |(x0, y0)| {
                ((x0 + 1..=w), (y0 + 1..=h))
                    .prop_map(move |(x1, y1)| (w, h, PixelBox { x0, y0, x1, y1 }))
            })
        })
    }

    proptest! {
        #[test]
        fn relative_box_maps_back_over_the_pixels((w, h, b) in pixel_box_in(10_000)) {
            let [x0, y0, x1, y1] = relative_box(b, w, h);
            prop_assert!(x0 < x1 && y0 < y1 && x1 <= 1000 && y1 <= 1000);
            let back = |r: u32, extent: u32, up: bool| {
                let v = u64::from(r) * u64::from(extent);
                (if up { v.div_ceil(1000) } else { v / 1000 }) as u32
            };
            prop_assert!(back(x0, w, false) <= b.x0);
            prop_assert!(back(y0, h, false) <= b.y0);
            prop_assert!(back(x1, w, true) >= b.x1);
            prop_assert!(back(y1, h, true) >= b.y1);
            // Tight: at most one unit of rounding on each side beyond the exact span.
            let exact = |lo: u32, hi: u32, extent: u32| {
                (u64::from(hi - lo) * 1000).div_ceil(u64::from(extent)) as u32
            };
            prop_assert!(x1 - x0 <= exact(b.x0, b.x1, w) + 1);
            prop_assert!(y1 - y0 <= exact(b.y0, b.y1, h) + 1);
        }
    }
}
