//! `vlm-mesh generate` as a user runs it: a real process, real files, JSON on stdout.

use std::process::Command;

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::{repo, OutputWithin};

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(
        repo()
            .join("models")
            .join(name)
            .join("reference/reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn generate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlm-mesh"))
        .arg("generate")
        .args(args)
        .output_within(std::time::Duration::from_secs(600))
}

#[test]
fn generate_json_prints_the_transformers_greedy_ids() {
    for name in ["tiny-llava", "tiny-llava-gqa"] {
        let r = reference(name);
        let dir = repo().join("models").join(name);
        let image = dir.join(r["image"].as_str().unwrap());
        let out = generate(&[
            "--model",
            dir.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            r["prompt"].as_str().unwrap(),
            "--max-tokens",
            "16",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["token_ids"], r["greedy_ids"], "{name}");
        // The text is transformers' decoding of the same ids, without the one space that
        // separates it from the prompt (README, "Answers"); 16 of 16 tokens ends by length.
        let hf = r["greedy_text"].as_str().unwrap();
        assert_eq!(v["text"], hf.strip_prefix(' ').unwrap_or(hf), "{name}");
        assert_eq!(v["finish_reason"], "length", "{name}");
        // Every stage ran, so every stage took some time.
        for key in [
            "preprocess_ms",
            "encode_ms",
            "project_ms",
            "prefill_ms",
            "decode_ms",
        ] {
            let ms = v["timings"][key].as_f64().unwrap();
            assert!(ms > 0.0 && ms < 60_000.0, "{name}: timings.{key} = {ms}");
        }
        assert!(v["prompt_tokens"].as_u64().unwrap() > 0);
    }
}

#[test]
fn errors_print_one_clear_line_and_exit_nonzero() {
    let image = repo().join("models/images/shapes-48x48.png");
    // The random parity model, named explicitly so the default model can change.
    let model = repo().join("models/tiny-llava");
    let model = model.to_str().unwrap();
    let out = generate(&[
        "--model",
        model,
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "USER: hi ASSISTANT:",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("<image>"),
        "{err}"
    );

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), b"\x89PNG\r\n\x1a\ntruncated").unwrap();
    let out = generate(&[
        "--model",
        model,
        "--image",
        bad.path().to_str().unwrap(),
        "--prompt",
        "USER: <image> ASSISTANT:",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid image"), "{err}");
}
