//! llama.cpp's side of a comparison: `scripts/bench_llama_cpp.py --serve` under a Python with
//! llama-cpp-python (`scripts/setup_llama_cpp.sh`), one long-lived process, one generation per
//! request line.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::Context;
use vlm_model::Quantization;

use super::cores;

/// One generation's times, measured as ours are.
#[derive(Debug, Clone, Copy)]
pub struct LlamaRun {
    /// From the prompt's first token in to the first generated token out.
    pub prefill_ms: f64,
    /// (tokens − 1) / time from the first token to the last.
    pub decode_tok_s: f64,
}

pub struct LlamaCpp {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

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
        let mut child = Command::new(python)
            .arg(script)
            .arg("--gguf-dir")
            .arg(dir)
            .args([
                "--threads",
                &cores().to_string(),
                "--prompt-tokens",
                &prompt.to_string(),
                "--max-tokens",
                &tokens.to_string(),
                "--n-ctx",
                &n_ctx.to_string(),
                "--serve",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start scripts/bench_llama_cpp.py")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(LlamaCpp {
            child,
            stdin,
            stdout,
        })
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
        writeln!(self.stdin, "{line}")?;
        self.stdin.flush()?;
        let mut answer = String::new();
        self.stdout.read_line(&mut answer)?;
        anyhow::ensure!(
            !answer.is_empty(),
            "scripts/bench_llama_cpp.py exited (status {:?}) on {line}",
            self.child.try_wait().ok().flatten()
        );
        let v: serde_json::Value = serde_json::from_str(&answer)
            .with_context(|| format!("bench_llama_cpp.py answered {answer:?}"))?;
        if let Some(e) = v["error"].as_str() {
            anyhow::bail!("llama.cpp: {e}");
        }
        Ok(LlamaRun {
            prefill_ms: v["prefill_ms"].as_f64().context("no prefill_ms")?,
            decode_tok_s: v["decode_tok_s"].as_f64().context("no decode_tok_s")?,
        })
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
