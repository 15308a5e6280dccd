//! Quantized stages side by side: one mesh per `--quantize` mode (every stage in that mode), the
//! same greedy request sent to each in turn (the order rotating every round), decode tokens/s
//! from the client's token arrival times; each service's RSS when it was ready (and its peak
//! while loading), after the run (steady) and its peak over the whole run. Optionally llama.cpp
//! (`scripts/bench_llama_cpp.py` under a Python with `llama_cpp`) on the same decoder converted to
//! GGUF, interleaved with ours: same threads, prompt length and tokens generated.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use vlm_model::Quantization;

use super::llama_cpp::{gguf_name, LlamaCpp};
use super::{cores, print_rows, BenchMesh, Input, Spread};
use crate::serve::quantize_parser;

#[derive(Args, Debug)]
pub struct QuantizedBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Interleaved rounds (each: one request per mode, and per llama.cpp model).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Tokens to generate per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Modes to compare, comma separated.
    #[arg(long, value_delimiter = ',', default_values = Quantization::NAMES, value_parser = quantize_parser())]
    pub modes: Vec<Quantization>,
    /// A Python with llama-cpp-python (scripts/setup_llama_cpp.sh): also run llama.cpp.
    #[arg(long)]
    pub llama_cpp_python: Option<PathBuf>,
    /// GGUF files of the decoder, `lm-<mode>.gguf` (scripts/setup_llama_cpp.sh writes them).
    #[arg(long, requires = "llama_cpp_python")]
    pub gguf_dir: Option<PathBuf>,
    /// Smoke run: 2 rounds of 4 tokens.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One service's memory, MiB.
#[derive(serde::Serialize, Debug, Clone)]
struct Memory {
    /// VmHWM when the mesh was ready: the peak of loading.
    load_peak: f64,
    /// VmRSS when the mesh was ready.
    ready: f64,
    /// VmRSS after the run.
    steady: f64,
    /// VmHWM after the run.
    peak: f64,
    /// peak / steady.
    peak_over_steady: f64,
}

#[derive(serde::Serialize, Debug)]
struct ModeReport {
    mode: String,
    decode_tok_s: Spread,
    /// p50 tokens/s over the unquantized mode's (when measured).
    vs_none: Option<f64>,
    /// Per service (encoder, projector, decoder, gateway).
    memory_mib: BTreeMap<String, Memory>,
    /// The first request's token ids.
    tokens: Vec<u32>,
    llama_cpp: Option<LlamaRow>,
}

#[derive(serde::Serialize, Debug)]
struct LlamaRow {
    gguf: String,
    decode_tok_s: Spread,
    /// Our p50 tokens/s over llama.cpp's.
    ours_over_llama_cpp: f64,
}

#[derive(serde::Serialize, Debug)]
pub struct QuantizedReport {
    bench: &'static str,
    model: String,
    cores: usize,
    rounds: usize,
    max_tokens: u32,
    prompt_tokens: u64,
    modes: Vec<ModeReport>,
}

impl QuantizedReport {
    pub fn print(&self) {
        println!(
            "{} rounds, {} tokens, {} prompt positions, {} cores, model {}",
            self.rounds, self.max_tokens, self.prompt_tokens, self.cores, self.model
        );
        let mut rows = Vec::new();
        for m in &self.modes {
            rows.push((format!("ours {} decode tok/s", m.mode), m.decode_tok_s));
            if let Some(l) = &m.llama_cpp {
                rows.push((format!("llama.cpp {} decode tok/s", l.gguf), l.decode_tok_s));
            }
        }
        print_rows("measure", &rows);
        for m in &self.modes {
            let vs = m.vs_none.map_or("-".into(), |r| format!("{r:.2}x"));
            let llama = m
                .llama_cpp
                .as_ref()
                .map_or("-".into(), |l| format!("{:.2}x", l.ours_over_llama_cpp));
            println!("{:<6} vs none {vs:>7}  ours/llama.cpp {llama:>7}", m.mode);
            println!(
                "       {:<10} {:>10} {:>10} {:>10} {:>10} {:>12}",
                "MiB", "load peak", "ready", "steady", "peak", "peak/steady"
            );
            for (who, mem) in &m.memory_mib {
                println!(
                    "       {:<10} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.3}",
                    who, mem.load_peak, mem.ready, mem.steady, mem.peak, mem.peak_over_steady
                );
            }
        }
    }
}

/// Decode tokens/s of one greedy request through a mesh, its token ids and prompt positions.
async fn once(
    mesh: &BenchMesh,
    image: &[u8],
    max_tokens: u32,
) -> anyhow::Result<(f64, Vec<u32>, u64)> {
    let mut client = mesh.gateway.clone();
    // A question the checkpoint's chat template renders: any model family.
    let mut req = super::greedy_request(image.to_vec(), String::new(), max_tokens);
    req.question = QUESTION.into();
    let s = super::stream(&mut client, req).await?;
    let prompt = s
        .fin
        .and_then(|f| f.usage)
        .map_or(0, |u| u.prompt_tokens as u64);
    anyhow::ensure!(
        s.ids.len() > 1,
        "only {} token(s): cannot time decoding",
        s.ids.len()
    );
    let secs = (s.last_ms - s.first_ms) / 1e3;
    Ok(((s.ids.len() - 1) as f64 / secs, s.ids, prompt))
}

const QUESTION: &str = "What is shown in this image?";

/// VmHWM and VmRSS (MiB) of every service of a mesh, by label.
fn memory(mesh: &BenchMesh) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
    let mut out = BTreeMap::new();
    for s in &mesh.mesh.info.services {
        // The resident set first: the high-water mark read after it is at least that, however
        // the process grows between the two reads.
        let rss = super::mesh::status_mib(s.pid, "VmRSS")?;
        let hwm = super::mesh::status_mib(s.pid, "VmHWM")?;
        out.insert(s.label(), (hwm, rss));
    }
    Ok(out)
}

pub async fn run(args: &QuantizedBenchArgs) -> anyhow::Result<QuantizedReport> {
    let (rounds, max_tokens) = if args.quick {
        (2, 4)
    } else {
        (args.rounds, args.max_tokens)
    };
    anyhow::ensure!(
        rounds > 0 && !args.modes.is_empty(),
        "--rounds and --modes must not be empty"
    );
    let image = std::fs::read(&args.input.image)
        .with_context(|| format!("cannot read {}", args.input.image.display()))?;
    let mut meshes = Vec::new();
    let mut at_ready = Vec::new();
    for &mode in &args.modes {
        let mesh = BenchMesh::start_quantized(&args.input.model, vec![], [mode; 3]).await?;
        at_ready.push(memory(&mesh)?);
        meshes.push(mesh);
    }
    let result = measure(args, &meshes, &at_ready, &image, rounds, max_tokens).await;
    for m in meshes {
        m.mesh.shutdown().await;
    }
    result
}

async fn measure(
    args: &QuantizedBenchArgs,
    meshes: &[BenchMesh],
    at_ready: &[BTreeMap<String, (f64, f64)>],
    image: &[u8],
    rounds: usize,
    max_tokens: u32,
) -> anyhow::Result<QuantizedReport> {
    let mut tokens = Vec::new();
    let mut prompt_tokens = 0;
    for m in meshes {
        let (_, ids, prompt) = once(m, image, max_tokens).await?;
        tokens.push(ids);
        prompt_tokens = prompt;
    }
    let mut llama = match (&args.llama_cpp_python, &args.gguf_dir) {
        (Some(py), Some(dir)) => Some(LlamaCpp::start(py, dir, prompt_tokens, max_tokens, 0)?),
        _ => None,
    };
    let n = meshes.len();
    let (mut ours, mut theirs) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for round in 0..rounds {
        for k in 0..n {
            let i = (round + k) % n;
            ours[i].push(once(&meshes[i], image, max_tokens).await?.0);
            if let Some(l) = llama.as_mut() {
                theirs[i].push(l.run(gguf_name(args.modes[i]))?);
            }
        }
    }
    let none_p50 = args
        .modes
        .iter()
        .position(|m| m.is_none())
        .map(|i| Spread::of(&mut ours[i].clone()).map(|s| s.p50))
        .transpose()?;
    let mut modes = Vec::new();
    for i in 0..n {
        let decode_tok_s = Spread::of(&mut ours[i])?;
        let now = memory(&meshes[i])?;
        let memory_mib = now
            .iter()
            .map(|(who, &(peak, steady))| {
                let (load_peak, ready) = at_ready[i].get(who).copied().unwrap_or((0.0, 0.0));
                let mem = Memory {
                    load_peak,
                    ready,
                    steady,
                    peak,
                    peak_over_steady: peak / steady,
                };
                (who.clone(), mem)
            })
            .collect();
        let llama_cpp = if theirs[i].is_empty() {
            None
        } else {
            let s = Spread::of(&mut theirs[i])?;
            Some(LlamaRow {
                gguf: gguf_name(args.modes[i]).into(),
                ours_over_llama_cpp: decode_tok_s.p50 / s.p50,
                decode_tok_s: s,
            })
        };
        modes.push(ModeReport {
            mode: args.modes[i].to_string(),
            vs_none: none_p50.map(|b| decode_tok_s.p50 / b),
            decode_tok_s,
            memory_mib,
            tokens: tokens[i].clone(),
            llama_cpp,
        });
    }
    Ok(QuantizedReport {
        bench: "quantized",
        model: args.input.model.display().to_string(),
        cores: cores(),
        rounds,
        max_tokens,
        prompt_tokens,
        modes,
    })
}
