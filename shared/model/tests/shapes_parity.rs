//! The trained demo checkpoint `models/shapes-llava` answers exactly as transformers does: greedy
//! token ids for every question about 20 held-out images, as models/shapes/make_fixtures.py recorded
//! them from `LlavaForConditionalGeneration.generate`. These tests never run Python.

use std::collections::BTreeSet;
use std::path::PathBuf;

use vlm_model::{DType, Device, ImageLimits, Pipeline, SamplingParams};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes-llava")
}

struct Case {
    image: PathBuf,
    prompt: String,
    greedy_ids: Vec<u32>,
    greedy_text: String,
}

fn reference() -> (u32, Vec<Case>) {
    let path = model_dir().join("reference/greedy.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let cases = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            image: model_dir().join(c["image"].as_str().unwrap()),
            prompt: c["prompt"].as_str().unwrap().to_string(),
            greedy_ids: c["greedy_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect(),
            greedy_text: c["greedy_text"].as_str().unwrap().to_string(),
        })
        .collect();
    (v["max_new_tokens"].as_u64().unwrap() as u32, cases)
}

#[test]
fn greedy_answers_equal_transformers_on_20_held_out_images() {
    let (max_tokens, cases) = reference();
    let images: BTreeSet<_> = cases.iter().map(|c| c.image.clone()).collect();
    assert_eq!(images.len(), 20, "the fixture covers 20 images");
    let pipeline = Pipeline::load(
        model_dir(),
        DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap();
    let params = SamplingParams {
        max_tokens,
        ..Default::default()
    };
    let mut mismatches = Vec::new();
    for c in &cases {
        let bytes = std::fs::read(&c.image).unwrap();
        let out = pipeline
            .generate(&[&bytes], &c.prompt, &params, |_| {})
            .unwrap();
        // Our text is transformers' decoding of the same ids without the one space that
        // separates it from the prompt (README, "Answers").
        let want_text = c.greedy_text.strip_prefix(' ').unwrap_or(&c.greedy_text);
        if out.token_ids != c.greedy_ids || out.text != want_text {
            mismatches.push(format!(
                "{} {:?}: transformers {:?} {:?}, vlm-model {:?} {:?}",
                c.image.display(),
                c.prompt,
                c.greedy_ids,
                c.greedy_text,
                out.token_ids,
                out.text
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} answers differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}
