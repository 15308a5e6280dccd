//! The gateway orchestrates and never links model code: its normal dependency tree (as `cargo tree`
//! resolves it from the lock file) holds no model crate, no candle and no tokenizers.

use std::process::Command;

#[test]
fn the_gateway_links_no_model_code() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "-p",
            "vlm-gateway",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .args(["--offline", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo tree failed: {stderr}");
    let tree = String::from_utf8(out.stdout).expect("utf-8");
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The tree is the real one: the gateway's own stage plumbing is in it.
    for needed in ["vlm-gateway", "vlm-cache", "vlm-net", "tonic"] {
        assert!(crates.contains(&needed), "{needed} missing from:\n{tree}");
    }
    for banned in [
        "vlm-model",
        "vlm-serving",
        "candle-core",
        "candle-nn",
        "candle-transformers",
        "tokenizers",
        "safetensors",
    ] {
        assert!(
            !crates.contains(&banned),
            "the gateway depends on {banned}:\n{tree}"
        );
    }
}
