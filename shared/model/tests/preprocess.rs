//! Preprocessing against PIL and against hostile input.

use std::path::PathBuf;

use vlm_model::config::{ImageProcessorConfig, ResizeTarget};
use vlm_model::resize::{resize, Filter};
use vlm_model::{ImageLimits, ModelError, Preprocessor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize")
}

fn load_png(name: &str) -> image::RgbImage {
    image::open(fixtures().join(name)).unwrap().to_rgb8()
}

/// Every case was resized by PIL (`Image.resize(size, BICUBIC)`): up and down, noisy and smooth.
#[test]
fn bicubic_resize_equals_pil_exactly() {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json")).unwrap())
            .unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let src = load_png(c["source"].as_str().unwrap());
        let want = load_png(c["expected"].as_str().unwrap());
        let (w, h) = (
            c["width"].as_u64().unwrap() as u32,
            c["height"].as_u64().unwrap() as u32,
        );
        let got = resize(&src, w, h, Filter::Bicubic).unwrap();
        assert_eq!(got.dimensions(), want.dimensions());
        let max = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert_eq!(
            max, 0,
            "{}: differs from PIL by up to {max} levels",
            c["expected"]
        );
    }
}

fn clip_preprocessor(max_pixels: u64) -> Preprocessor {
    shortest_edge_preprocessor(30, max_pixels)
}

fn shortest_edge_preprocessor(size: u32, max_pixels: u64) -> Preprocessor {
    let cfg = ImageProcessorConfig {
        image_grid_pinpoints: None,
        native: None,
        do_convert_rgb: true,
        do_resize: true,
        size: ResizeTarget::ShortestEdge(size),
        resample: 3,
        do_center_crop: true,
        crop_size: (30, 30),
        do_rescale: true,
        rescale_factor: 1.0 / 255.0,
        do_normalize: true,
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
    };
    let limits = ImageLimits {
        max_pixels,
        ..ImageLimits::default()
    };
    Preprocessor::new(cfg, limits).unwrap()
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 9]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn valid_png_jpeg_webp_decode_to_pixel_values() {
    let p = clip_preprocessor(1 << 20);
    let png = png_bytes(40, 20);
    let img = image::load_from_memory(&png).unwrap();
    let values = |bytes: &[u8]| -> Vec<f32> {
        let t = p.preprocess(bytes, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 30, 30]);
        t.flatten_all().unwrap().to_vec1().unwrap()
    };
    let reference = values(&png);
    // The pixels matter, not just the shape: a gradient spans many normalised values.
    let (lo, hi) = reference
        .iter()
        .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 1.0, "a flat tensor: {lo}..{hi}");
    // WebP as the `image` crate writes it is lossless: the same values. JPEG is lossy: close.
    for (fmt, max_abs, max_mean) in [
        (image::ImageFormat::WebP, 0.0, 0.0),
        (image::ImageFormat::Jpeg, 0.15, 0.03),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        let got = values(out.get_ref());
        let diffs: Vec<f32> = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let worst = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        eprintln!("{fmt:?}: max |diff| {worst}, mean {mean}");
        assert!(
            worst <= max_abs && mean <= max_mean,
            "{fmt:?}: max |diff| {worst}, mean {mean}"
        );
    }
}

#[test]
fn zero_byte_image_is_invalid() {
    let err = clip_preprocessor(1 << 20).decode(&[]).unwrap_err();
    assert!(matches!(err, ModelError::InvalidImage(_)), "{err}");
    assert!(err.is_invalid_input());
    assert!(err.to_string().contains("empty"), "{err}");
}

#[test]
fn truncated_png_is_invalid() {
    let png = png_bytes(64, 64);
    for cut in [8, 33, png.len() / 2, png.len() - 13] {
        let err = clip_preprocessor(1 << 20).decode(&png[..cut]).unwrap_err();
        assert!(
            matches!(err, ModelError::InvalidImage(_)),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn garbage_bytes_are_invalid() {
    let err = clip_preprocessor(1 << 20)
        .decode(b"definitely not an image")
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidImage(_)), "{err}");
    assert!(err.to_string().contains("format"), "{err}");
}

/// A small PNG whose header claims `w`×`h` (its pixel data is a 4×4 image's).
fn forged_png(w: u32, h: u32) -> Vec<u8> {
    let mut png = png_bytes(4, 4);
    // IHDR data starts at byte 16: width and height as big-endian u32, then the chunk CRC at 29..33.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A PNG whose header claims 100000×100000 is refused from the header alone, before decoding.
#[test]
fn huge_header_is_rejected_before_decoding() {
    let png = forged_png(100_000, 100_000);
    let err = clip_preprocessor(64 << 20).decode(&png).unwrap_err();
    match err {
        ModelError::ImageTooLarge { width, height, .. } => {
            assert_eq!((width, height), (100_000, 100_000))
        }
        other => panic!("expected ImageTooLarge, got {other}"),
    }
}

#[test]
fn pixel_limit_is_configurable() {
    let png = png_bytes(40, 20);
    assert!(clip_preprocessor(800).decode(&png).is_ok());
    assert!(matches!(
        clip_preprocessor(799).decode(&png),
        Err(ModelError::ImageTooLarge { .. })
    ));
}

/// 67,108,864×1 is exactly the default pixel limit, and resizing its short side to the tower's
/// size once asked for a 68 GB buffer (and 1×67,108,864 for 19 GB), killing the encoder. The
/// aspect ratio is refused from the header, before decoding or resizing.
#[test]
fn extreme_aspect_ratios_are_refused_from_the_header() {
    let pre = shortest_edge_preprocessor(336, ImageLimits::default().max_pixels);
    for (w, h) in [
        (67_108_864, 1),
        (1, 67_108_864),
        (1, 65_535),
        (201, 1),
        (2, 401),
    ] {
        match pre.decode(&forged_png(w, h)).unwrap_err() {
            ModelError::ImageAspect {
                width,
                height,
                limit,
            } => assert_eq!((width, height, limit), (w, h, 200)),
            other => panic!("{w}x{h}: expected ImageAspect, got {other}"),
        }
    }
    let err = pre.decode(&forged_png(1, 65_535)).unwrap_err();
    assert!(err.is_invalid_input(), "{err}");
    assert!(err.to_string().contains("200:1"), "{err}");
}

/// At the limit an image is decoded and resized (a 200:1 strip becomes 6,000×30, then its crop).
#[test]
fn an_aspect_ratio_at_the_limit_is_encoded() {
    let pre = clip_preprocessor(ImageLimits::default().max_pixels);
    let img = pre.decode(&png_bytes(400, 2)).unwrap();
    let out = pre.resize_and_crop(&img).unwrap();
    assert_eq!(out.dimensions(), (30, 30));
    let narrow = Preprocessor::new(
        pre.config().clone(),
        ImageLimits {
            max_aspect_ratio: 199,
            ..ImageLimits::default()
        },
    )
    .unwrap();
    assert!(matches!(
        narrow.decode(&png_bytes(400, 2)),
        Err(ModelError::ImageAspect { .. })
    ));
}

/// A resize target over the pixel limit is refused before anything is allocated, even when the
/// image itself is within every limit (a processor config with a huge shortest edge).
#[test]
fn a_resize_target_over_the_pixel_limit_is_refused() {
    let pre = shortest_edge_preprocessor(100_000, 64 << 20);
    let img = pre.decode(&png_bytes(100, 1)).unwrap();
    let err = pre.resize_and_crop(&img).unwrap_err();
    assert!(matches!(err, ModelError::InvalidImage(_)), "{err}");
    assert!(err.to_string().contains("10000000x100000"), "{err}");
}

/// The PNG CRC (ISO-HDLC), so the forged header is otherwise well-formed.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
