//! End-to-end with the trained demo model: `vlm-mesh up --model models/shapes-llava` as a real
//! process tree, `vlm-mesh eval` through its gateway on the committed held-out set, and `vlm-mesh
//! demo` with its defaults.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{MeshProc, OutputWithin, EXE};

fn model() -> PathBuf {
    common::repo().join("models/shapes-llava")
}

fn eval_json(extra: &[&str]) -> serde_json::Value {
    let set = model().join("heldout");
    let out = Command::new(EXE)
        .args(["eval", "--json", "--model"])
        .arg(model())
        .arg("--set")
        .arg(&set)
        .args(extra)
        .output_within(std::time::Duration::from_secs(600));
    assert!(
        out.status.success(),
        "eval {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn accuracy(report: &serde_json::Value, kind: &str) -> f64 {
    let s = &report["accuracy"][kind];
    assert!(s["total"].as_u64().unwrap() >= 15, "{kind}: {s}");
    s["accuracy"].as_f64().unwrap()
}

#[test]
fn held_out_accuracy_through_the_mesh_meets_the_bar_and_equals_in_process() {
    let up = MeshProc::start_with(&model(), &[], &[]);
    let state = up.state.path().to_str().unwrap();
    let mesh = eval_json(&["--gateway", &up.gateway, "--state-dir", state]);
    let local = eval_json(&[]);
    assert_eq!(mesh["mode"], "mesh");
    assert_eq!(local["mode"], "in-process");

    let lines = std::fs::read_to_string(model().join("heldout/questions.jsonl")).unwrap();
    let questions = lines.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(mesh["questions"].as_u64().unwrap() as usize, questions);
    eprintln!(
        "mesh accuracy: {}",
        serde_json::to_string(&mesh["accuracy"]).unwrap()
    );
    let (colour, shape, position) = (
        accuracy(&mesh, "colour"),
        accuracy(&mesh, "shape"),
        accuracy(&mesh, "position"),
    );
    assert!(colour >= 0.9, "colour accuracy {colour}");
    assert!(shape >= 0.9, "shape accuracy {shape}");
    assert!(position >= 0.8, "position accuracy {position}");

    // The mesh is the in-process pipeline, split: the same tokens for every question.
    let ids = |r: &serde_json::Value| -> Vec<serde_json::Value> {
        r["answers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["token_ids"].clone())
            .collect()
    };
    assert_eq!(ids(&mesh), ids(&local));
    assert_eq!(mesh["accuracy"], local["accuracy"]);
}

#[test]
fn demo_describes_the_bundled_sample_correctly() {
    let samples: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model().join("samples/samples.json")).unwrap(),
    )
    .unwrap();
    let demo = samples["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["image"] == "demo.png")
        .expect("samples.json describes demo.png");
    let want = demo["description"].as_str().unwrap();
    assert!(
        want.contains(" and "),
        "the demo image has two shapes: {want}"
    );

    // No flags, and a copy of the binary run from an empty directory far from the checkout (as
    // after `cargo install`, or in the container): the bundled model and image must come from
    // the binary itself.
    let place = tempfile::tempdir().unwrap();
    let (bin, cwd, home) = (
        place.path().join("bin"),
        place.path().join("work"),
        place.path().join("home"),
    );
    for d in [&bin, &cwd, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    let exe = bin.join("vlm-mesh");
    std::fs::copy(EXE, &exe).unwrap();
    let out = Command::new(&exe)
        .arg("demo")
        .current_dir(&cwd)
        .env("HOME", &home)
        .env_remove("VLM_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env_remove("VLM_MODEL")
        .env_remove("VLM_IMAGE")
        .env_remove("VLM_PROMPT")
        .output_within(std::time::Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}");
    assert!(
        stderr.contains("samples/demo.png") && stderr.contains(&home.display().to_string()),
        "demo asked about another image than the bundled one (unpacked under HOME): {stderr}"
    );
    assert!(
        !stderr.contains(&common::repo().canonicalize().unwrap().display().to_string()),
        "the copied binary used the checkout: {stderr}"
    );
    // The answer exactly, with no space before it (README: "Answers").
    assert_eq!(stdout.trim_end(), want, "stderr: {stderr}");
}
