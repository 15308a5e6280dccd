//! Ours vs Hugging Face transformers on CPU: runs `scripts/bench_transformers.py` (same checkpoint,
//! image, prompt and thread count, greedy, interleaved) with the Python the user names, and keeps
//! its report.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{cores, print_ratio, print_rows, Spread};

/// The script's report, or why the section did not run.
#[derive(Serialize, Debug)]
#[serde(untagged)]
pub enum TransformersReport {
    Ran(Box<Compared>),
    Skipped { skipped: String },
}

/// What scripts/bench_transformers.py prints with `--json` (the fields used here).
#[derive(Serialize, Deserialize, Debug)]
pub struct Compared {
    ours_prefill_ms: Spread3,
    theirs_prefill_ms: Spread3,
    ours_tok_s: Spread3,
    theirs_tok_s: Spread3,
    threads: usize,
    rounds: usize,
    max_tokens: u32,
    torch: String,
    /// Both produced the same greedy token ids.
    same_tokens: bool,
    /// Ours / theirs prefill p50 (lower is better).
    prefill_ratio: f64,
    /// Ours / theirs decode tokens/s p50 (higher is better).
    decode_ratio: f64,
}

/// The script reports median, min and max.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Spread3 {
    p50: f64,
    min: f64,
    max: f64,
}

impl From<Spread3> for Spread {
    fn from(s: Spread3) -> Spread {
        Spread {
            p50: s.p50,
            p90: f64::NAN,
            min: s.min,
            max: s.max,
        }
    }
}

impl TransformersReport {
    pub fn print(&self) {
        match self {
            TransformersReport::Skipped { skipped } => println!("skipped: {skipped}"),
            TransformersReport::Ran(c) => {
                println!(
                    "threads: {}  rounds: {} (interleaved)  tokens: {}  torch {}  same greedy tokens: {}",
                    c.threads, c.rounds, c.max_tokens, c.torch, c.same_tokens
                );
                print_rows(
                    "ms | tokens/s (p90 not reported)",
                    &[
                        ("prefill ms, ours".into(), c.ours_prefill_ms.into()),
                        (
                            "prefill ms, transformers".into(),
                            c.theirs_prefill_ms.into(),
                        ),
                        ("decode tokens/s, ours".into(), c.ours_tok_s.into()),
                        (
                            "decode tokens/s, transformers".into(),
                            c.theirs_tok_s.into(),
                        ),
                    ],
                );
                print_ratio(
                    "prefill time, ours / theirs (lower is better)",
                    c.prefill_ratio,
                );
                print_ratio("decode tokens/s, ours / theirs", c.decode_ratio);
            }
        }
    }
}

pub async fn run(
    python: Option<&Path>,
    model: &Path,
    image: &Path,
    rounds: usize,
    max_tokens: u32,
) -> anyhow::Result<TransformersReport> {
    let Some(python) = python else {
        return Ok(TransformersReport::Skipped {
            skipped: "no --python (a Python with torch and transformers) was given".into(),
        });
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_transformers.py");
    let exe = std::env::current_exe().context("cannot find the vlm-mesh executable")?;
    let out = tokio::process::Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--image")
        .arg(image)
        .arg("--exe")
        .arg(&exe)
        .args(["--rounds", &rounds.to_string()])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(["--threads", &cores().to_string()])
        .arg("--json")
        .output()
        .await
        .with_context(|| format!("cannot run {}", python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{} {} failed ({}):\n{}",
        python.display(),
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let last = stdout
        .lines()
        .last()
        .context("the script printed nothing")?;
    let compared: Compared = serde_json::from_str(last)
        .with_context(|| format!("the script's report is not what was expected: {last}"))?;
    anyhow::ensure!(
        compared.same_tokens,
        "transformers and vlm-mesh produced different greedy tokens: the timings compare different work"
    );
    Ok(TransformersReport::Ran(Box::new(compared)))
}
