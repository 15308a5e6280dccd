//! Prompt validation, sampling reproducibility, resume and dtype handling on the bundled tiny model.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vlm_model::{Generation, ImageLimits, ModelError, Pipeline, SamplingParams};

mod support;
use support::max_abs_diff;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llava")
}

fn image() -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/images/shapes-48x48.png"),
    )
    .unwrap()
}

fn pipeline() -> Pipeline {
    Pipeline::load(
        model_dir(),
        DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap()
}

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

#[test]
fn prompt_without_image_placeholder_is_rejected_clearly() {
    let p = pipeline();
    let img = image();
    let err = p
        .generate(
            &[&img],
            "USER: hello ASSISTANT:",
            &SamplingParams::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidPrompt(_)), "{err}");
    assert!(err.to_string().contains("no <image> placeholder"), "{err}");
}

#[test]
fn two_placeholders_with_one_image_are_rejected_clearly() {
    let p = pipeline();
    let img = image();
    let err = p
        .generate(
            &[&img],
            "USER: <image> and <image> ASSISTANT:",
            &SamplingParams::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidPrompt(_)), "{err}");
    assert!(
        err.to_string()
            .contains("2 <image> placeholders but 1 image"),
        "{err}"
    );
}

#[test]
fn empty_prompt_and_bad_params_are_rejected() {
    let p = pipeline();
    let img = image();
    let err = p
        .generate(&[&img], "  ", &SamplingParams::default(), |_| {})
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidPrompt(_)), "{err}");
    let params = SamplingParams {
        max_tokens: 0,
        ..Default::default()
    };
    let err = p.generate(&[&img], PROMPT, &params, |_| {}).unwrap_err();
    assert!(matches!(err, ModelError::InvalidParams(_)), "{err}");
    let params = SamplingParams {
        max_tokens: 1_000_000_000,
        ..Default::default()
    };
    let err = p.generate(&[&img], PROMPT, &params, |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("exceeds the model's context"),
        "{err}"
    );
}

#[test]
fn corrupt_image_is_rejected_before_any_model_work() {
    let p = pipeline();
    let err = p
        .generate(
            &[b"\x89PNG\r\n\x1a\n"],
            PROMPT,
            &SamplingParams::default(),
            |_| {},
        )
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidImage(_)), "{err}");
}

fn embeds(p: &Pipeline) -> Tensor {
    let pv = p.preprocessor.preprocess(&image(), &Device::Cpu).unwrap();
    let feats = p.vision.forward(&pv).unwrap().squeeze(0).unwrap();
    let proj = p.projector.forward(&feats).unwrap();
    let prepared = p
        .prompt
        .prepare(PROMPT, &[p.vision.num_features()])
        .unwrap();
    prepared.embeddings(&p.decoder, &[proj]).unwrap()
}

fn run(p: &Pipeline, params: &SamplingParams, resume: &[u32]) -> (Vec<u32>, String) {
    let e = embeds(p);
    let mut g = Generation::start(&p.decoder, &p.prompt, &e, params, resume).unwrap();
    let mut text = String::new();
    while let Some(ev) = g.next_token().unwrap() {
        text.push_str(&ev.text);
    }
    (g.token_ids().to_vec(), text)
}

/// A stream resumed from any point (prompt + tokens so far, as a failover replica does) continues
/// with exactly the tokens and text of an uninterrupted run, greedy and seeded, with and without
/// penalties.
#[test]
fn resumed_generation_equals_uninterrupted_run() {
    let p = pipeline();
    for params in [
        SamplingParams {
            max_tokens: 12,
            ..Default::default()
        },
        SamplingParams {
            max_tokens: 12,
            temperature: 0.9,
            top_p: 0.95,
            top_k: 50,
            seed: 1234,
            ..Default::default()
        },
        // Penalties depend on the tokens generated so far, resumed ones included.
        SamplingParams {
            max_tokens: 12,
            frequency_penalty: 1.5,
            presence_penalty: 0.5,
            ..Default::default()
        },
        SamplingParams {
            max_tokens: 12,
            temperature: 0.9,
            seed: 99,
            frequency_penalty: -0.5,
            presence_penalty: 1.0,
            ..Default::default()
        },
    ] {
        let (full, full_text) = run(&p, &params, &[]);
        assert_eq!(full.len(), 12);
        for cut in [1, 5, 11] {
            let (resumed, tail_text) = run(&p, &params, &full[..cut]);
            assert_eq!(resumed, full, "resume at {cut} with {params:?}");
            // What the first replica had streamed by then: settled text, no dangling partial UTF-8.
            let head = p.prompt.decode(&full[..cut]).unwrap();
            let head = head.trim_end_matches('\u{FFFD}');
            assert_eq!(format!("{head}{tail_text}"), full_text, "resume at {cut}");
        }
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let p = pipeline();
    let params = SamplingParams {
        max_tokens: 12,
        temperature: 1.0,
        seed: 7,
        ..Default::default()
    };
    let (a, _) = run(&p, &params, &[]);
    let (b, _) = run(&p, &params, &[]);
    assert_eq!(a, b);
    let (c, _) = run(
        &p,
        &SamplingParams {
            seed: 8,
            ..params.clone()
        },
        &[],
    );
    assert_ne!(a, c, "different seeds gave identical samples");
    let (greedy, _) = run(
        &p,
        &SamplingParams {
            max_tokens: 12,
            ..Default::default()
        },
        &[],
    );
    assert_ne!(a, greedy, "temperature 1.0 sampled exactly the greedy path");
}

#[test]
fn stop_string_ends_text_before_it() {
    let p = pipeline();
    let (ids, text) = run(
        &p,
        &SamplingParams {
            max_tokens: 16,
            ..Default::default()
        },
        &[],
    );
    assert!(text.len() > 4, "need some text to cut: {text:?}");
    // Pick a stop string from the middle of the greedy text.
    let mid = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[mid..].chars().take(2).collect();
    let cut = text.find(&stop).unwrap();
    let params = SamplingParams {
        max_tokens: 16,
        stop: vec![stop.clone()],
        ..Default::default()
    };
    let (stopped_ids, stopped_text) = run(&p, &params, &[]);
    assert_eq!(stopped_text, text[..cut], "stop {stop:?}");
    assert!(stopped_ids.len() < ids.len());
    assert_eq!(stopped_ids[..], ids[..stopped_ids.len()]);
}

/// A generated `<image>` id (or one resumed from another replica) is just a token to the decoder.
#[test]
fn image_token_as_generated_token_does_not_crash() {
    let p = pipeline();
    let img_id = p.prompt.image_token_id();
    let params = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let (ids, _) = run(&p, &params, &[img_id, img_id]);
    assert_eq!(&ids[..2], &[img_id, img_id]);
    assert_eq!(ids.len(), 6);
}

/// Weights stored as f16 load into an f32 model (and f32 weights into an f16/bf16 model).
#[test]
fn half_precision_weights_load_into_compute_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(model_dir()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() && f.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let tensors =
        candle_core::safetensors::load(model_dir().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let half: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&half, dir.path().join("model.safetensors")).unwrap();

    let reference = pipeline();
    let from_half =
        Pipeline::load(dir.path(), DType::F32, &Device::Cpu, ImageLimits::default()).unwrap();
    let pv = reference
        .preprocessor
        .preprocess(&image(), &Device::Cpu)
        .unwrap();
    let a = reference.vision.forward(&pv).unwrap();
    let b = from_half.vision.forward(&pv).unwrap();
    assert_eq!(b.dtype(), DType::F32);
    let d = max_abs_diff(&a, &b);
    assert!(d > 0.0 && d < 0.05, "f16-stored weights: feature diff {d}");

    // f16 compute: the vision features stay within f16 rounding of f32's, and the greedy
    // tokens are f32's.
    let p = Pipeline::load(
        model_dir(),
        DType::F16,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .unwrap();
    let half = p.vision.forward(&pv.to_dtype(DType::F16).unwrap()).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    let d = max_abs_diff(&a, &half.to_dtype(DType::F32).unwrap());
    assert!(d > 0.0 && d < 0.05, "f16 compute: feature diff {d}");
    let greedy = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let out = p.generate(&[&image()], PROMPT, &greedy, |_| {}).unwrap();
    let want = reference
        .generate(&[&image()], PROMPT, &greedy, |_| {})
        .unwrap();
    assert_eq!(
        out.token_ids, want.token_ids,
        "f16 greedy tokens differ from f32's"
    );
    // candle has no bf16 matmul on CPU: refused at load with a clear message, not mid-request.
    let err = Pipeline::load(
        model_dir(),
        DType::BF16,
        &Device::Cpu,
        ImageLimits::default(),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("bf16"), "{err}");
}
