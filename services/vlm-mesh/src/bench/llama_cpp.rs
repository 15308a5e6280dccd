//! llama.cpp's side of a comparison: `scripts/bench_llama_cpp.py --serve` under a Python with
//! llama-cpp-python (`scripts/setup_llama_cpp.sh`), one long-lived process, one generation per
//! request line.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use vlm_model::Quantization;

use super::cores;
use super::driver::LineDriver;

/// One generation's times, measured as ours are.
#[derive(Debug, Clone, Copy)]
pub struct LlamaRun {
    /// From the prompt's first token in to the first generated token out.
    pub prefill_ms: f64,
    /// (tokens − 1) / time from the first token to the last.
    pub decode_tok_s: f64,
}

pub struct LlamaCpp(LineDriver);

impl LlamaCpp {
    /// Starts the driver for the GGUF files in `dir`: `prompt` tokens and `tokens` generated
    /// unless a request says otherwise, a context of at least `n_ctx` positions.
    pub fn start(
        python: &PathBuf,
        dir: &Path,
        prompt: u64,
        tokens: u32,
        n_ctx: usize,
    ) -> anyhow::Result<Self> {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_llama_cpp.py");
        let mut cmd = Command::new(python);
        cmd.arg(script).arg("--gguf-dir").arg(dir).args([
            "--threads",
            &cores().to_string(),
            "--prompt-tokens",
            &prompt.to_string(),
            "--max-tokens",
            &tokens.to_string(),
            "--n-ctx",
            &n_ctx.to_string(),
            "--serve",
        ]);
        Ok(LlamaCpp(LineDriver::start(
            cmd,
            "scripts/bench_llama_cpp.py",
        )?))
    }

    /// Decode tokens/s of one generation with `gguf` (a file name in the GGUF directory) at the
    /// driver's default prompt and token counts.
    pub fn run(&mut self, gguf: &str) -> anyhow::Result<f64> {
        self.ask(gguf).map(|r| r.decode_tok_s)
    }

    /// One generation of `tokens` after a prompt of `prompt` tokens.
    pub fn generate(
        &mut self,
        gguf: &str,
        prompt: usize,
        tokens: usize,
    ) -> anyhow::Result<LlamaRun> {
        let req = serde_json::json!({"gguf": gguf, "prompt_tokens": prompt, "max_tokens": tokens});
        self.ask(&req.to_string())
    }

    fn ask(&mut self, line: &str) -> anyhow::Result<LlamaRun> {
        let v = self.0.ask(line)?;
        if let Some(e) = v["error"].as_str() {
            anyhow::bail!("llama.cpp: {e}");
        }
        Ok(LlamaRun {
            prefill_ms: v["prefill_ms"].as_f64().context("no prefill_ms")?,
            decode_tok_s: v["decode_tok_s"].as_f64().context("no decode_tok_s")?,
        })
    }
}

/// The llama.cpp model compared with our `mode` (q4_k: Q4_K_M, which also keeps its output
/// projection in q6_K, as ours does).
pub fn gguf_name(mode: Quantization) -> &'static str {
    match mode {
        Quantization::None => "lm-f32.gguf",
        Quantization::Q8_0 => "lm-q8_0.gguf",
        Quantization::Q4K => "lm-q4_k_m.gguf",
    }
}
