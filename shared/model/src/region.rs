//! Regions of interest: boxes in relative coordinates 0–1000 (the convention of GUI agents such as
//! Open-AutoGLM), cropped from the original image at full resolution and then processed as an
//! image of their own.

use std::fmt;

use image::RgbImage;

use crate::error::{ModelError, Result};

/// The coordinate range: `0` is the left/top edge, `1000` the right/bottom edge.
pub const REGION_SCALE: u32 = 1000;

/// A box `(x0, y0)`–`(x1, y1)` in relative coordinates 0–1000, `x0 < x1`, `y0 < y1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    pub x0: u32,
    pub y0: u32,
    pub x1: u32,
    pub y1: u32,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({},{},{},{})", self.x0, self.y0, self.x1, self.y1)
    }
}

impl Region {
    /// A checked box: refuses empty boxes and coordinates beyond the image (over 1000).
    pub fn new(x0: u32, y0: u32, x1: u32, y1: u32) -> Result<Self> {
        let r = Region { x0, y0, x1, y1 };
        r.check()?;
        Ok(r)
    }

    /// Why this box cannot be cropped, if it cannot.
    pub fn check(&self) -> Result<()> {
        if self.x1 > REGION_SCALE || self.y1 > REGION_SCALE {
            return Err(ModelError::InvalidInput(format!(
                "region {self} lies outside the image: coordinates are relative, 0 to {REGION_SCALE}"
            )));
        }
        if self.x0 >= self.x1 || self.y0 >= self.y1 {
            return Err(ModelError::InvalidInput(format!(
                "region {self} is empty: it needs x0 < x1 and y0 < y1"
            )));
        }
        Ok(())
    }

    /// The pixel box `(left, top, right, bottom)` (end-exclusive, as PIL's `Image.crop` takes it)
    /// of this region in a `width × height` image: the start rounds down and the end up, so every
    /// pixel the box touches is kept and the box is never empty.
    pub fn pixel_box(&self, width: u32, height: u32) -> (u32, u32, u32, u32) {
        let lo = |v: u32, size: u32| (v as u64 * size as u64 / REGION_SCALE as u64) as u32;
        let hi = |v: u32, size: u32| (v as u64 * size as u64).div_ceil(REGION_SCALE as u64) as u32;
        (
            lo(self.x0, width),
            lo(self.y0, height),
            hi(self.x1, width),
            hi(self.y1, height),
        )
    }

    /// The region's pixels, copied out of `img` at full resolution.
    pub fn crop(&self, img: &RgbImage) -> Result<RgbImage> {
        self.check()?;
        let (l, t, r, b) = self.pixel_box(img.width(), img.height());
        Ok(image::imageops::crop_imm(img, l, t, r - l, b - t).to_image())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_boxes_round_outwards_and_are_never_empty() {
        let r = Region::new(100, 200, 700, 900).unwrap();
        assert_eq!(r.pixel_box(36, 90), (3, 18, 26, 81));
        let tiny = Region::new(0, 0, 1, 1).unwrap();
        assert_eq!(tiny.pixel_box(10, 10), (0, 0, 1, 1));
        let all = Region::new(0, 0, 1000, 1000).unwrap();
        assert_eq!(all.pixel_box(7, 5), (0, 0, 7, 5));
    }

    #[test]
    fn bad_boxes_name_the_box() {
        let e = Region::new(500, 0, 500, 10).unwrap_err().to_string();
        assert!(e.contains("(500,0,500,10)") && e.contains("empty"), "{e}");
        let e = Region::new(0, 0, 1001, 10).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }

    #[test]
    fn crop_copies_the_pixel_box() {
        let img = RgbImage::from_fn(10, 4, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let c = Region::new(200, 250, 500, 1000)
            .unwrap()
            .crop(&img)
            .unwrap();
        assert_eq!(c.dimensions(), (3, 3));
        assert_eq!(c.get_pixel(0, 0).0, [2, 1, 0]);
    }
}
