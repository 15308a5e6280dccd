//! LLaVA-NeXT (anyres) and regions of interest: parity with transformers on the tiny random
//! checkpoints models/make_llava_next_fixtures.py wrote (two pinpoint sets; tall, wide, square and
//! smaller-than-a-tile images; region crops). References are committed; no Python runs here.

use candle_core::{DType, Device, Tensor};
use vlm_model::{ImageInput, ImageLimits, Pipeline, Region, SamplingParams, StageTimings};

mod support;
use support::{max_abs_diff, models_dir, references};

struct Case {
    name: String,
    image: Vec<u8>,
    region: Option<Region>,
    grid: (u32, u32),
    num_views: usize,
    num_image_tokens: usize,
    greedy: Vec<u32>,
    pixel_box: Option<Vec<u32>>,
}

struct Fixture {
    pipeline: Pipeline,
    refs: std::collections::HashMap<String, Tensor>,
    prompt: String,
    cases: Vec<Case>,
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn fixture(name: &str) -> Fixture {
    let dir = models_dir().join(name);
    let (refs, meta) = references(&dir);
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let region = c["region"].as_array().map(|_| {
                let r = u32s(&c["region"]);
                Region::new(r[0], r[1], r[2], r[3]).unwrap()
            });
            let grid = u32s(&c["grid"]);
            Case {
                name: c["name"].as_str().unwrap().into(),
                image: std::fs::read(dir.join(c["image"].as_str().unwrap())).unwrap(),
                region,
                grid: (grid[0], grid[1]),
                num_views: c["num_views"].as_u64().unwrap() as usize,
                num_image_tokens: c["num_image_tokens"].as_u64().unwrap() as usize,
                greedy: u32s(&c["greedy_ids"]),
                pixel_box: c["pixel_box"].as_array().map(|_| u32s(&c["pixel_box"])),
            }
        })
        .collect();
    Fixture {
        pipeline: Pipeline::load(&dir, DType::F32, &Device::Cpu, ImageLimits::default()).unwrap(),
        refs,
        prompt: meta["prompt"].as_str().unwrap().into(),
        cases,
    }
}

/// Views, counts, packed features and greedy tokens of every case of one checkpoint.
fn check(name: &str) {
    let f = fixture(name);
    let p = &f.pipeline;
    assert!(!f.cases.is_empty());
    for c in &f.cases {
        let views = p.image_views(&c.image, c.region).unwrap();
        assert_eq!(
            p.preprocessor.layout_of(&c.image, c.region).unwrap(),
            views.layout,
            "{name}/{}: the layout from the header alone differs from the decoded image's",
            c.name
        );
        let g = views.layout.grid.expect("llava_next tiles every image");
        assert_eq!((g.rows, g.cols), c.grid, "{name}/{}: grid", c.name);
        assert_eq!(views.views.len(), c.num_views, "{name}/{}: views", c.name);
        assert_eq!(
            p.projector.packed_rows(&views.layout),
            c.num_image_tokens,
            "{name}/{}: image tokens differ from LlavaNextProcessor's count",
            c.name
        );

        // Pixels: the PIL-exact resampler makes every view identical up to float rounding.
        let pv = p
            .preprocessor
            .pixel_values(&views.views, &Device::Cpu)
            .unwrap();
        let want_pv = &f.refs[&format!("{}.pixel_values", c.name)];
        let d = max_abs_diff(&pv, want_pv);
        assert!(d <= 1e-5, "{name}/{}: pixel_values differ by {d}", c.name);

        // Per-view projected features from the reference pixels, then the packing.
        let feats = p.vision.forward(want_pv).unwrap();
        let proj = p.projector.forward(&feats).unwrap();
        let d = max_abs_diff(&proj, &f.refs[&format!("{}.views_features", c.name)]);
        assert!(d <= 1e-4, "{name}/{}: view features differ by {d}", c.name);
        let packed = p.projector.pack(&proj, &views.layout).unwrap();
        let d = max_abs_diff(&packed, &f.refs[&format!("{}.packed", c.name)]);
        eprintln!("{name}/{}: packed max diff {d:.2e}", c.name);
        assert!(
            d <= 1e-4,
            "{name}/{}: packed features differ by {d}",
            c.name
        );

        // And from the file, in one call.
        let mut t = StageTimings::default();
        let from_file = p.embed_views(&views, &mut t).unwrap();
        let d = max_abs_diff(&from_file, &f.refs[&format!("{}.packed", c.name)]);
        assert!(
            d <= 1e-4,
            "{name}/{}: packed from file differs by {d}",
            c.name
        );

        // The prompt expands to the processor's ids.
        let prepared = p.prompt.prepare(&f.prompt, &[c.num_image_tokens]).unwrap();
        let want_ids: Vec<u32> = f.refs[&format!("{}.input_ids", c.name)]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(prepared.ids, want_ids, "{name}/{}: prompt ids", c.name);
    }
}

#[test]
fn views_counts_and_packed_features_match_transformers_pinpoints_a() {
    check("tiny-llava-next");
}

#[test]
fn views_counts_and_packed_features_match_transformers_pinpoints_b() {
    check("tiny-llava-next-b");
}

/// Greedy tokens end to end from the image file (a region case crops the file's image).
fn greedy(name: &str) {
    let f = fixture(name);
    let params = SamplingParams {
        max_tokens: 8,
        ..Default::default()
    };
    for c in &f.cases {
        let regions: Vec<Region> = c.region.into_iter().collect();
        let out = if regions.is_empty() {
            f.pipeline
                .generate(&[&c.image], &f.prompt, &params, |_| {})
                .unwrap()
        } else {
            // The reference processed the crop as the image: send our crop (PIL-equal, see
            // region_crops_equal_pil_crops) as the image.
            let crop = crop_png(&c.image, c.region.unwrap());
            f.pipeline
                .generate(&[&crop], &f.prompt, &params, |_| {})
                .unwrap()
        };
        assert_eq!(out.token_ids, c.greedy, "{name}/{}: greedy ids", c.name);
        assert_eq!(
            out.prompt_tokens,
            f.refs[&format!("{}.input_ids", c.name)].dim(0).unwrap(),
            "{name}/{}",
            c.name
        );
    }
}

fn crop_png(bytes: &[u8], r: Region) -> Vec<u8> {
    let img = image::load_from_memory(bytes).unwrap().to_rgb8();
    let crop = r.crop(&img).unwrap();
    let mut out = Vec::new();
    crop.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

#[test]
fn greedy_tokens_match_transformers_pinpoints_a() {
    greedy("tiny-llava-next");
}

#[test]
fn greedy_tokens_match_transformers_pinpoints_b() {
    greedy("tiny-llava-next-b");
}

/// Region crops are PIL's `Image.crop` of the documented pixel box, pixel for pixel.
#[test]
fn region_crops_equal_pil_crops() {
    let f = fixture("tiny-llava-next");
    let mut seen = 0;
    for c in f.cases.iter().filter(|c| c.region.is_some()) {
        let r = c.region.unwrap();
        let img = image::load_from_memory(&c.image).unwrap().to_rgb8();
        let b = r.pixel_box(img.width(), img.height());
        assert_eq!(
            vec![b.0, b.1, b.2, b.3],
            c.pixel_box.clone().unwrap(),
            "{}: pixel box",
            c.name
        );
        let crop = r.crop(&img).unwrap();
        let want = &f.refs[&format!("{}.crop", c.name)];
        assert_eq!(
            want.dims(),
            &[crop.height() as usize, crop.width() as usize, 3],
            "{}",
            c.name
        );
        let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(crop.as_raw(), &want, "{}: crop pixels", c.name);
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} region cases");
}

/// A region given with its image equals the same crop sent as a second image: the image's
/// placeholder expands to the image's rows, then the region's.
#[test]
fn a_region_equals_its_crop_sent_as_an_image() {
    let f = fixture("tiny-llava-next");
    let c = f.cases.iter().find(|c| c.name == "tall_roi_a").unwrap();
    let full = f.cases.iter().find(|c| c.name == "tall").unwrap();
    let r = c.region.unwrap();
    let params = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let regions = [r];
    let with_region = f
        .pipeline
        .generate_inputs(
            &[ImageInput {
                bytes: &full.image,
                regions: &regions,
            }],
            &f.prompt,
            &params,
            |_| {},
        )
        .unwrap();
    let crop = crop_png(&full.image, r);
    let two_images = f
        .pipeline
        .generate(
            &[&full.image, &crop],
            &f.prompt.replace("<image>", "<image><image>"),
            &params,
            |_| {},
        )
        .unwrap();
    assert_eq!(with_region.token_ids, two_images.token_ids);
    // The image's rows, then the region's, where the one placeholder was.
    assert_eq!(
        with_region.prompt_tokens,
        f.refs["tall.input_ids"].dim(0).unwrap() + c.num_image_tokens
    );
    assert_eq!(with_region.prompt_tokens, two_images.prompt_tokens);
}

/// Bad boxes are refused naming the box; a region too thin for the aspect limit is refused too.
#[test]
fn bad_regions_are_refused_with_the_box() {
    assert!(Region::new(10, 10, 10, 20).is_err());
    assert!(Region::new(0, 0, 1000, 1001).is_err());
    let dir = models_dir().join("tiny-llava-next");
    let limits = ImageLimits {
        max_aspect_ratio: 10,
        ..ImageLimits::default()
    };
    let p = Pipeline::load(&dir, DType::F32, &Device::Cpu, limits).unwrap();
    let tall = std::fs::read(models_dir().join("images/next-tall-36x90.png")).unwrap();
    // 36x90 is within 10:1; its 1x90 left edge is not.
    assert!(p.image_views(&tall, None).is_ok());
    let thin = Region::new(0, 0, 1, 1000).unwrap();
    let e = p.image_views(&tall, Some(thin)).unwrap_err().to_string();
    assert!(e.contains("(0,0,1,1000)"), "{e}");
}
