//! GLM-4.1V split across a real mesh (`vlm-mesh up`: four processes, mTLS): the encoder runs the
//! vision tower to the downsample, the projector the merger, the decoder the text model with 3-D
//! rotary positions built from each image's token grid, which travels with the image's plan.
//! Greedy tokens equal transformers' on every case of models/tiny-glm4v (a non-square image, an
//! upscaled small one, a downscaled large one, two images in one prompt, no image), and equal
//! `generate` in process; the Redis feature cache serves a repeated image; a slot without its
//! token grid is refused.

use std::path::PathBuf;

use tonic::Code;

mod common;
use common::*;

fn model_dir() -> PathBuf {
    repo().join("models/tiny-glm4v")
}

fn cases() -> Vec<serde_json::Value> {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model_dir().join("reference/reference.json")).unwrap(),
    )
    .unwrap();
    meta["cases"].as_array().unwrap().clone()
}

fn images(case: &serde_json::Value) -> Vec<PathBuf> {
    case["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| model_dir().join(p.as_str().unwrap()))
        .collect()
}

/// `ask` (through the mesh) or `generate` (in process) with the case's images and prompt.
fn answer(command: &str, target: &[&str], case: &serde_json::Value) -> serde_json::Value {
    let greedy = case["greedy_ids"].as_array().unwrap().len().to_string();
    let paths = images(case);
    let mut args = vec![command];
    args.extend(target);
    for p in &paths {
        args.extend(["--image", p.to_str().unwrap()]);
    }
    args.extend([
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        &greedy,
        "--json",
    ]);
    run_json(&args)
}

#[test]
fn glm4v_through_the_mesh_equals_transformers_and_generate() {
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model_dir(), &["--redis", &redis.url()], &[]);
    let state = mesh.state.path().to_str().unwrap().to_string();
    let model = model_dir().to_str().unwrap().to_string();
    let all = cases();
    assert_eq!(all.len(), 6);
    for case in &all {
        let name = case["name"].as_str().unwrap();
        let out = answer("ask", &["--state-dir", &state], case);
        assert_eq!(
            out["token_ids"], case["greedy_ids"],
            "{name}: greedy ids through the mesh differ from transformers"
        );
        // Each image's rows are its token grid (grid_thw / merge²).
        for (i, g) in case["image_grid_thw"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let rows = g[1].as_u64().unwrap() * g[2].as_u64().unwrap() / 4;
            assert_eq!(
                out["timings"]["images"][i]["rows"].as_u64(),
                Some(rows),
                "{name}: image {i} rows"
            );
        }
        let local = answer("generate", &["--model", &model], case);
        assert_eq!(local["token_ids"], out["token_ids"], "{name}: generate");
    }
    // The same image again: its features come from the cache, the answer is the same.
    let wide = &all[0];
    let again = answer("ask", &["--state-dir", &state], wide);
    assert_eq!(again["token_ids"], wide["greedy_ids"]);
    assert_eq!(again["timings"]["cache"][0], "hit", "{again}");
    assert_eq!(
        again["timings"]["images"][0]["encoded_views"],
        serde_json::json!([]),
        "{again}"
    );
}

/// A decoder serving an M-RoPE model refuses image slots that do not give their token grid, or
/// give one that is not the slot's rows: INVALID_ARGUMENT naming the slot. (And the model's
/// identity carries the checkpoint's chat template, as the decoder read it.)
#[tokio::test]
async fn slots_without_a_matching_token_grid_are_refused() {
    let mesh = MeshProc::start_with(&model_dir(), &[], &[]);
    let info = mesh
        .client()
        .await
        .get_model_info(vlm_proto::GetModelInfoRequest {})
        .await
        .expect("GetModelInfo")
        .into_inner();
    assert_eq!(info.text_model_type, "glm4v_text");
    let template = info.chat_template.expect("a chat template");
    assert_eq!(
        template.template,
        std::fs::read_to_string(model_dir().join("chat_template.jinja")).unwrap()
    );
    assert_eq!(template.image_token, "<|image|>");
    assert!(
        template.source.ends_with("chat_template.jinja"),
        "{template:?}"
    );
    let prompt =
        "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Hi<|assistant|>\n";
    for (slot, needle) in [
        (
            vlm_proto::ImageSlot {
                rows: 6,
                ..Default::default()
            },
            "token grid",
        ),
        (
            vlm_proto::ImageSlot {
                rows: 6,
                token_rows: 3,
                token_cols: 3,
                ..Default::default()
            },
            "3x3 token grid is not its 6 rows",
        ),
        (
            vlm_proto::ImageSlot {
                rows: 6,
                token_rows: 0,
                token_cols: 6,
                ..Default::default()
            },
            "0x6",
        ),
    ] {
        let setup = vlm_proto::DecodeSetup {
            prompt: prompt.into(),
            params: Some(vlm_proto::SamplingParams {
                max_tokens: Some(2),
                top_p: 1.0,
                ..Default::default()
            }),
            images: vec![slot],
            ..Default::default()
        };
        let err = common::attack::decode_setup(&mesh, setup)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("image slot 0"), "{err:?}");
        assert!(err.message().contains(needle), "{needle}: {err:?}");
    }
}
