//! GLM-4.1V end to end in one process: parity with transformers on the tiny random
//! `Glm4vForConditionalGeneration` that models/make_glm4v_fixtures.py wrote (a non-square image,
//! one smaller than the minimum area, one larger than the maximum, two images in one prompt, and
//! a text-only prompt). The processor's pixel values and grid, the prompt's token ids and 3-D
//! rotary positions, the merged image rows and the greedy tokens are compared with the committed
//! references; no Python runs here.

use candle_core::{Device, Tensor};
use vlm_model::{
    ImageLimits, LlavaConfig, Pipeline, RopePositions, SamplingParams, StageTimings, TileGrid,
};

mod support;
use support::{ids, max_abs_diff, models_dir, references};

struct Case {
    name: String,
    images: Vec<Vec<u8>>,
    prompt: String,
    grids: Vec<(u32, u32)>,
    greedy: Vec<u32>,
}

fn fixture() -> (
    Pipeline,
    std::collections::HashMap<String, Tensor>,
    Vec<Case>,
) {
    let dir = models_dir().join("tiny-glm4v");
    let (refs, meta) = references(&dir);
    let cases = meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().into(),
            images: c["images"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| std::fs::read(dir.join(p.as_str().unwrap())).unwrap())
                .collect(),
            prompt: c["prompt"].as_str().unwrap().into(),
            grids: c["image_grid_thw"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| (g[1].as_u64().unwrap() as u32, g[2].as_u64().unwrap() as u32))
                .collect(),
            greedy: c["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect(),
        })
        .collect();
    let p = Pipeline::load(
        &dir,
        candle_core::DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap();
    (p, refs, cases)
}

/// transformers' patchify of one normalised image `[1, 3, H, W]`: patches in merge-window order,
/// each `(channel, temporal, row, col)` with the still image repeated over the temporal patch.
fn patchify(pv: &Tensor, patch: usize, merge: usize) -> Tensor {
    let (_, c, h, w) = pv.dims4().unwrap();
    let x = pv.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (gh, gw) = (h / patch, w / patch);
    let mut out = Vec::with_capacity(x.len() * 2);
    for br in 0..gh / merge {
        for bc in 0..gw / merge {
            for r in 0..merge {
                for cc in 0..merge {
                    let (pr, pc) = (br * merge + r, bc * merge + cc);
                    for ch in 0..c {
                        for _t in 0..2 {
                            for y in 0..patch {
                                let row = (ch * h + pr * patch + y) * w + pc * patch;
                                out.extend_from_slice(&x[row..row + patch]);
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor::from_vec(out, (gh * gw, c * 2 * patch * patch), &Device::Cpu).unwrap()
}

#[test]
fn processor_prompt_and_positions_equal_transformers() {
    let (p, refs, cases) = fixture();
    for case in &cases {
        let mut pixels = Vec::new();
        let mut grids = Vec::new();
        for img in &case.images {
            let views = p.image_views(img, None).unwrap();
            assert_eq!(views.views.len(), 1, "{}: one view per image", case.name);
            assert_eq!(
                p.preprocessor.layout_of(img, None).unwrap(),
                views.layout,
                "{}: the layout from the header alone differs from the decoded image's",
                case.name
            );
            let pv = p
                .preprocessor
                .pixel_values(&views.views, &Device::Cpu)
                .unwrap();
            pixels.push(patchify(&pv, 14, 2));
            grids.push(views.layout.tokens.unwrap());
        }
        let want: Vec<TileGrid> = case
            .grids
            .iter()
            .map(|&(h, w)| TileGrid {
                rows: h / 2,
                cols: w / 2,
            })
            .collect();
        assert_eq!(grids, want, "{}: token grids", case.name);
        if !pixels.is_empty() {
            let ours = Tensor::cat(&pixels, 0).unwrap();
            let d = max_abs_diff(&ours, &refs[&format!("{}.pixel_values", case.name)]);
            println!("{}: pixel_values max diff {d:.2e}", case.name);
            assert!(d < 1e-5, "{}: pixel values differ by {d}", case.name);
        }
        let rows: Vec<usize> = grids.iter().map(|g| (g.rows * g.cols) as usize).collect();
        let prepared = p.prompt.prepare(&case.prompt, &rows).unwrap();
        assert_eq!(
            prepared.ids,
            ids(&refs[&format!("{}.input_ids", case.name)]),
            "{}: input ids",
            case.name
        );
        let rope = RopePositions::for_prompt(&prepared, &grids).unwrap();
        let want = refs[&format!("{}.position_ids", case.name)]
            .to_vec2::<i64>()
            .unwrap();
        assert_eq!(rope.len(), want[0].len(), "{}: positions", case.name);
        for (i, ((t, h), w)) in want[0].iter().zip(&want[1]).zip(&want[2]).enumerate() {
            let exp = [*t as u32, *h as u32, *w as u32];
            assert_eq!(rope.at(i), exp, "{}: position {i}", case.name);
        }
    }
}

#[test]
fn merged_rows_and_greedy_tokens_equal_transformers() {
    let (p, refs, cases) = fixture();
    for case in &cases {
        if !case.images.is_empty() {
            let mut timings = StageTimings::default();
            let rows: Vec<Tensor> = case
                .images
                .iter()
                .map(|img| {
                    let views = p.image_views(img, None).unwrap();
                    p.embed_views(&views, &mut timings).unwrap()
                })
                .collect();
            let ours = Tensor::cat(&rows, 0).unwrap();
            let d = max_abs_diff(&ours, &refs[&format!("{}.merged", case.name)]);
            println!("{}: merged rows max diff {d:.2e}", case.name);
            assert!(d < 1e-4, "{}: merged rows differ by {d}", case.name);
        }
        let images: Vec<&[u8]> = case.images.iter().map(Vec::as_slice).collect();
        let params = SamplingParams {
            max_tokens: case.greedy.len() as u32,
            ..Default::default()
        };
        let out = p.generate(&images, &case.prompt, &params, |_| {}).unwrap();
        assert_eq!(out.token_ids, case.greedy, "{}: greedy ids", case.name);
    }
}

#[test]
fn a_prompt_without_the_image_placeholder_is_refused_with_the_checkpoint_token() {
    let (p, _, cases) = fixture();
    let img = &cases[0].images[0];
    let err = p
        .generate(
            &[img],
            "[gMASK]<sop><|user|>\nno image here<|assistant|>\n",
            &SamplingParams::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("<|image|>"), "{err}");
}

/// A GLM-4.1V config as transformers 4 wrote them (GLM-4.1V-9B-Thinking's layout: `rope_theta` and
/// `partial_rotary_factor` beside `rope_scaling`, which holds `mrope_section`, its type "default"
/// or Qwen2-VL's "mrope") reads as the fixture's transformers 5 config does.
#[test]
fn transformers_4_config_layout_reads_the_same() {
    let dir = models_dir().join("tiny-glm4v");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let want = LlavaConfig::from_json(&text).unwrap();
    let v5: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rope = &v5["text_config"]["rope_parameters"];
    for kind in ["default", "mrope"] {
        let mut json = v5.clone();
        let tc = json["text_config"].as_object_mut().unwrap();
        tc.remove("rope_parameters");
        tc.insert("rope_theta".into(), rope["rope_theta"].clone());
        tc.insert(
            "partial_rotary_factor".into(),
            rope["partial_rotary_factor"].clone(),
        );
        tc.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": kind, "mrope_section": rope["mrope_section"]}),
        );
        let got = LlavaConfig::from_json(&json.to_string()).unwrap();
        assert_eq!(got.text, want.text, "rope_scaling type {kind}");
        assert_eq!(got.text.mrope_section, Some(vec![2, 3, 3]));
    }
}
