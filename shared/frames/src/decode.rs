//! Bounded decoding of PNG/JPEG/WebP frames into 8-bit RGB.

use std::io::Cursor;

use image::error::LimitErrorKind;
use image::{DynamicImage, ImageError, ImageReader, Limits};

/// Bounds on one frame, checked from the header before any pixel buffer is allocated.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Most pixels (width × height) one frame may have.
    pub max_pixels: u64,
    /// Longest side, in pixels, one frame may have.
    pub max_side: u32,
}

impl Default for FrameLimits {
    /// 16 MP and 8192 px a side: above 4K video frames and full-screen captures of large
    /// displays, well below what would let one stream exhaust the gateway's memory.
    fn default() -> Self {
        FrameLimits {
            max_pixels: 16_777_216,
            max_side: 8192,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Not a PNG/JPEG/WebP the decoder can read (message says why).
    #[error("undecodable frame: {0}")]
    Undecodable(String),
    /// Dimensions beyond the limits (message gives WxH and the limit).
    #[error("frame too large: {0}")]
    TooLarge(String),
}

/// A decoded frame, 8-bit RGB, row-major.
#[derive(Clone, Debug)]
pub struct Frame {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Frame {
    /// A frame from raw RGB bytes (3 per pixel, row-major); `None` if the length does not match
    /// `width × height × 3`. Lets tests and generators build frames without encoding them.
    pub fn from_rgb(width: u32, height: u32, rgb: Vec<u8>) -> Option<Frame> {
        let expected = u64::from(width) * u64::from(height) * 3;
        (rgb.len() as u64 == expected).then_some(Frame { width, height, rgb })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels: `width × height × 3` bytes, row-major, R, G, B.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }
}

/// Bytes per pixel of the widest layout a decoder may produce (16-bit RGBA). The decoder's own
/// allocation limit is sized from it, so a frame within [`FrameLimits`] always fits.
const MAX_BYTES_PER_PIXEL: u64 = 8;
/// Headroom for decoder-internal buffers (row buffers, metadata chunks) beside the image itself.
const DECODER_SLACK_BYTES: u64 = 64 << 20;

/// Decodes a PNG, JPEG or WebP frame to 8-bit RGB.
///
/// The format is guessed from the content, never trusted from a caller's label. Dimensions are
/// read from the header by a first decoder and checked against `limits`; only then does a second
/// decoder, itself bounded by `image`'s strict side limits and an allocation cap, read the pixels.
/// So a tiny file whose header claims 100000×100000 is refused without allocating its buffer.
pub fn decode(bytes: &[u8], limits: &FrameLimits) -> Result<Frame, FrameError> {
    let FrameHeader { width, height, .. } = header(bytes, limits)?;
    let image = reader(bytes, decode_limits(limits))?
        .decode()
        .map_err(map_image_error)?;
    // A decoder that reports one size in the header and delivers another would break every
    // indexing assumption downstream; treat it as a corrupt file.
    if (image.width(), image.height()) != (width, height) {
        return Err(FrameError::Undecodable(format!(
            "header says {width}x{height}, pixels are {}x{}",
            image.width(),
            image.height()
        )));
    }
    let rgb = match image {
        DynamicImage::ImageRgb8(buf) => buf.into_raw(),
        other => other.into_rgb8().into_raw(),
    };
    Ok(Frame { width, height, rgb })
}

/// What a frame's header says, checked against the limits before anything is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoder's own buffer (3 for 8-bit RGB, 8 for 16-bit RGBA).
    pub bytes_per_pixel: u8,
}

impl FrameHeader {
    /// The most memory decoding the frame holds at once: the decoder's pixels, plus their 8-bit
    /// RGB copy when the frame is not 8-bit RGB already.
    pub fn decode_peak_bytes(&self) -> u64 {
        let pixels = u64::from(self.width) * u64::from(self.height);
        let copy = if self.bytes_per_pixel == 3 { 0 } else { 3 };
        pixels * (u64::from(self.bytes_per_pixel) + copy)
    }
}

/// A frame's header, read and checked against `limits` (no pixel is decoded).
pub fn header(bytes: &[u8], limits: &FrameLimits) -> Result<FrameHeader, FrameError> {
    let decoder = reader(bytes, header_limits(limits))?
        .into_decoder()
        .map_err(map_image_error)?;
    let (width, height) = image::ImageDecoder::dimensions(&decoder);
    check_dimensions(width, height, limits)?;
    let bytes_per_pixel = image::ImageDecoder::color_type(&decoder).bytes_per_pixel();
    Ok(FrameHeader {
        width,
        height,
        bytes_per_pixel,
    })
}

/// An image reader over `bytes` with its format guessed from the magic bytes.
fn reader(bytes: &[u8], limits: Limits) -> Result<ImageReader<Cursor<&[u8]>>, FrameError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| FrameError::Undecodable(e.to_string()))?;
    if reader.format().is_none() {
        return Err(FrameError::Undecodable(
            "not a PNG, JPEG or WebP image".to_string(),
        ));
    }
    reader.limits(limits);
    Ok(reader)
}

/// Limits for the header-only pass: no side limits (so our own check can name the size), but
/// still an allocation cap in case a decoder buffers more than the header.
fn header_limits(limits: &FrameLimits) -> Limits {
    let mut l = Limits::default();
    l.max_alloc = Some(alloc_cap(limits));
    l
}

/// Limits for the pixel pass: the strict side limits too, as a second line of defence.
fn decode_limits(limits: &FrameLimits) -> Limits {
    let mut l = header_limits(limits);
    l.max_image_width = Some(limits.max_side);
    l.max_image_height = Some(limits.max_side);
    l
}

fn alloc_cap(limits: &FrameLimits) -> u64 {
    limits
        .max_pixels
        .saturating_mul(MAX_BYTES_PER_PIXEL)
        .saturating_add(DECODER_SLACK_BYTES)
}

/// Checks header dimensions against the limits, before anything is allocated for the pixels.
fn check_dimensions(width: u32, height: u32, limits: &FrameLimits) -> Result<(), FrameError> {
    if width == 0 || height == 0 {
        return Err(FrameError::Undecodable(format!(
            "empty image ({width}x{height})"
        )));
    }
    if width > limits.max_side || height > limits.max_side {
        return Err(FrameError::TooLarge(format!(
            "{width}x{height} exceeds the {} px side limit",
            limits.max_side
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(FrameError::TooLarge(format!(
            "{width}x{height} ({pixels} pixels) exceeds the {} pixel limit",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// The decoder's own limit errors mean "too large"; everything else means the bytes are bad.
fn map_image_error(err: ImageError) -> FrameError {
    match &err {
        ImageError::Limits(limit) => match limit.kind() {
            LimitErrorKind::DimensionError | LimitErrorKind::InsufficientMemory => {
                FrameError::TooLarge(err.to_string())
            }
            // Our limits asked for something the decoder cannot enforce: a bug here, not a large
            // frame, but still a frame we cannot safely decode.
            _ => FrameError::Undecodable(err.to_string()),
        },
        _ => FrameError::Undecodable(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::error::LimitError;
    use image::{ImageFormat, RgbImage};
    use std::time::{Duration, Instant};

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A real small PNG whose IHDR claims `width`×`height`, with the chunk CRC fixed so the
    /// decoder reads the header as valid.
    fn forged_png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png(2, 2);
        // 8-byte signature, then IHDR: length (4), type (4) at 12, data (13) at 16, CRC at 29.
        assert_eq!(&bytes[12..16], b"IHDR");
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32fast::hash(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    #[test]
    fn decodes_a_png_to_rgb() {
        let frame = decode(&png(5, 3), &FrameLimits::default()).unwrap();
        assert_eq!((frame.width(), frame.height()), (5, 3));
        assert_eq!(frame.rgb().len(), 5 * 3 * 3);
        // Pixel (4, 2) is [4, 2, 7].
        let i = (2 * 5 + 4) * 3;
        assert_eq!(&frame.rgb()[i..i + 3], &[4, 2, 7]);
    }

    #[test]
    fn decodes_rgba_and_grey_by_converting() {
        let img = image::GrayImage::from_pixel(2, 2, image::Luma([90]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        let frame = decode(out.get_ref(), &FrameLimits::default()).unwrap();
        assert_eq!(frame.rgb(), &[90; 12]);
    }

    #[test]
    fn garbage_is_undecodable() {
        for bytes in [&b""[..], b"hello, world", &[0xff; 64]] {
            let err = decode(bytes, &FrameLimits::default()).unwrap_err();
            assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        }
        // A PNG signature followed by nonsense.
        let mut bytes = png(4, 4);
        bytes.truncate(20);
        let err = decode(&bytes, &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
    }

    #[test]
    fn forged_huge_header_is_refused_fast() {
        let bytes = forged_png(100_000, 100_000);
        let start = Instant::now();
        let err = decode(&bytes, &FrameLimits::default()).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1));
        match err {
            FrameError::TooLarge(msg) => assert!(msg.contains("100000x100000"), "{msg}"),
            other => panic!("expected TooLarge, got {other}"),
        }
    }

    #[test]
    fn too_many_pixels_within_the_side_limit_is_too_large() {
        let err = decode(&forged_png(8000, 8000), &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)), "{err}");
        let tight = FrameLimits {
            max_pixels: 14,
            max_side: 100,
        };
        assert!(matches!(
            decode(&png(5, 3), &tight),
            Err(FrameError::TooLarge(_))
        ));
        let exact = FrameLimits {
            max_pixels: 15,
            max_side: 5,
        };
        assert!(decode(&png(5, 3), &exact).is_ok());
    }

    #[test]
    fn zero_size_is_undecodable() {
        let err = check_dimensions(0, 10, &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
        let err = decode(&forged_png(0, 10), &FrameLimits::default()).unwrap_err();
        assert!(matches!(err, FrameError::Undecodable(_)), "{err}");
    }

    #[test]
    fn decoder_limit_errors_are_too_large() {
        let err = ImageError::Limits(LimitError::from_kind(LimitErrorKind::InsufficientMemory));
        assert!(matches!(map_image_error(err), FrameError::TooLarge(_)));
        let err = ImageError::Limits(LimitError::from_kind(LimitErrorKind::DimensionError));
        assert!(matches!(map_image_error(err), FrameError::TooLarge(_)));
    }

    #[test]
    fn from_rgb_checks_the_length() {
        assert!(Frame::from_rgb(2, 2, vec![0; 12]).is_some());
        assert!(Frame::from_rgb(2, 2, vec![0; 11]).is_none());
        assert!(Frame::from_rgb(0, 0, vec![]).is_some());
    }
}
