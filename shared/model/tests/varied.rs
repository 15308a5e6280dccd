//! The fixtures that vary every config field the loader reads (models/make_varied_fixtures.py:
//! LLaVA-1.5, LLaVA-NeXT with a Mistral decoder, LLaVA with a GLM-4 decoder, GLM-4.1V): the
//! prompt's token ids, the image rows the decoder receives and the greedy tokens (the first case
//! of each ends at an end-of-sequence id only generation_config.json names) equal transformers'.
//! `field_coverage.rs` checks that these fixtures vary every key.

use candle_core::{Device, Tensor};
use vlm_model::{ImageLimits, Pipeline, SamplingParams, StageTimings};

mod support;
use support::{ids, max_abs_diff, models_dir, references};

/// The varied fixtures, one per family.
pub const VARIED: [&str; 4] = [
    "varied-llava",
    "varied-llava-next",
    "varied-llava-glm",
    "varied-glm4v",
];

fn check(name: &str) {
    let dir = models_dir().join(name);
    let (refs, meta) = references(&dir);
    let p = Pipeline::load(
        &dir,
        candle_core::DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    for case in meta["cases"].as_array().unwrap() {
        let case_name = format!("{name}/{}", case["name"].as_str().unwrap());
        let key = |k: &str| format!("{}.{k}", case["name"].as_str().unwrap());
        let images: Vec<Vec<u8>> = case["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| std::fs::read(dir.join(p.as_str().unwrap())).unwrap())
            .collect();
        let prompt = case["prompt"].as_str().unwrap();
        let greedy: Vec<u32> = case["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let mut rows = Vec::new();
        let mut counts = Vec::new();
        for img in &images {
            let views = p.image_views(img, None).unwrap();
            let r = p
                .embed_views(&views, &mut StageTimings::default())
                .unwrap_or_else(|e| panic!("{case_name}: {e}"));
            counts.push(r.dim(0).unwrap());
            rows.push(r);
        }
        if !rows.is_empty() {
            let ours = Tensor::cat(&rows, 0).unwrap();
            let d = max_abs_diff(&ours, &refs[&key("image_rows")]);
            println!("{case_name}: image rows max diff {d:.2e}");
            assert!(d < 1e-4, "{case_name}: image rows differ by {d}");
        }
        let prepared = p.prompt.prepare(prompt, &counts).unwrap();
        assert_eq!(
            prepared.ids,
            ids(&refs[&key("input_ids")]),
            "{case_name}: input ids"
        );
        let slices: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        let params = SamplingParams {
            max_tokens: 10,
            ..Default::default()
        };
        let out = p
            .generate(&slices, prompt, &params, |_| {})
            .unwrap_or_else(|e| panic!("{case_name}: {e}"));
        assert_eq!(out.token_ids, greedy, "{case_name}: greedy ids");
        println!("{case_name}: {} greedy ids equal", greedy.len());
    }
}

#[test]
fn varied_llava_equals_transformers() {
    check(VARIED[0]);
}

#[test]
fn varied_llava_next_equals_transformers() {
    check(VARIED[1]);
}

#[test]
fn varied_llava_glm_equals_transformers() {
    check(VARIED[2]);
}

#[test]
fn varied_glm4v_equals_transformers() {
    check(VARIED[3]);
}
