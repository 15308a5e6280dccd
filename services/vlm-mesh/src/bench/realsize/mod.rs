//! `bench realsize`: one pod's decoder against llama.cpp on the same weights and threads, at the
//! shapes users run, and against the machine's physical limits, in one interleaved run.
//!
//! Ours runs in this process on the decoder's step engine (the serving path: paged KV cache,
//! chunked prefill); llama.cpp through `scripts/bench_llama_cpp.py` on the same decoder converted
//! to GGUF by llama.cpp's own tools (`scripts/setup_llama_cpp.sh`), in its default configuration
//! (weight repacking on). Both sides get the same token ids: a prefill of P tokens, and decode
//! at a context of C tokens. Decode is read against the memory-bandwidth limit (weights + KV
//! bytes per token ÷ the read bandwidth measured here), prefill against the measured peak
//! multiply-add rate.

mod machine;
mod mesh;
mod vision;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use vlm_model::{
    Admission, Checkpoint, DType, Decoder, Device, Engine, EngineConfig, PosKey, PromptBuilder,
    Quantization, SamplingParams, SeqRequest, StepEvent,
};

use super::llama_cpp::{gguf_name, LlamaCpp};
use super::Spread;
use crate::serve::quantize_parser;

#[derive(Args, Debug)]
pub struct RealsizeBenchArgs {
    /// Checkpoint (llava-hf layout; `bundled:shapes-llava` is the demo model in this binary).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: PathBuf,
    /// Precisions, comma separated (a 7B decoder does not fit 24 GiB in f32: `q8_0,q4_k`).
    #[arg(long, value_delimiter = ',', default_value = "none,q8_0,q4_k", value_parser = quantize_parser())]
    pub quantize: Vec<Quantization>,
    /// Prompt lengths whose prefill is timed (576 image rows + 64 text = 640; a long prompt).
    #[arg(long, value_delimiter = ',', default_values_t = [640usize, 2000])]
    pub prefill: Vec<usize>,
    /// Contexts at which decode tokens/s is measured.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 4096])]
    pub contexts: Vec<usize>,
    /// Tokens decoded at each context.
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Interleaved rounds (each: every precision, ours and llama.cpp's, order alternating).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// A Python with llama-cpp-python (scripts/setup_llama_cpp.sh): also run llama.cpp.
    #[arg(long)]
    pub llama_cpp_python: Option<PathBuf>,
    /// GGUF files of the decoder, `lm-f32.gguf`, `lm-q8_0.gguf`, `lm-q4_k_m.gguf`.
    #[arg(long, requires = "llama_cpp_python")]
    pub gguf_dir: Option<PathBuf>,
    /// A Python with torch and transformers: also time transformers' vision tower and projector
    /// (scripts/bench_vision.py) against ours.
    #[arg(long, env = "VLM_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// The image of the request through the mesh (`bundled:demo.png`: the demo model's sample).
    #[arg(long, default_value = crate::bundled::BUNDLED_DEMO_IMAGE)]
    pub image: PathBuf,
    /// Precision of the mesh (`up --quantize`) the one request goes through.
    #[arg(long, default_value = "q4_k", value_parser = quantize_parser())]
    pub mesh_quantize: Quantization,
    /// Leave out the request through the mesh.
    #[arg(long)]
    pub no_mesh: bool,
    /// Smoke run (for CI; its times mean little): 1 round, prefill 32 and 96, contexts 64 and
    /// 128, 4 tokens, small probe buffers.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct RealsizeReport {
    bench: &'static str,
    model: String,
    machine: machine::Machine,
    /// llama.cpp's GGUF directory, or why it was not run.
    llama_cpp: String,
    rounds: usize,
    rows: Vec<Row>,
    /// Vision tower + projector per precision, or why not measured.
    vision: Result<Vec<vision::VisionRow>, String>,
    /// One request through the mesh, or why not.
    mesh: Result<mesh::MeshRun, String>,
}

/// One measurement at one precision, ours and (when run) llama.cpp's.
#[derive(Serialize, Debug)]
pub struct Row {
    precision: String,
    /// `prefill` (tokens/s of a P-token prompt) or `decode` (tokens/s of the last D tokens up to
    /// a context of C).
    kind: &'static str,
    tokens: usize,
    ours_tok_s: Spread,
    llama_cpp_tok_s: Option<Spread>,
    ours_over_llama_cpp: Option<f64>,
    /// Decode: bytes one token reads (weights + KV); prefill: FLOPs of the prompt.
    work: f64,
    /// Decode: ours as a fraction of bandwidth ÷ bytes per token; prefill: of the peak rate
    /// (f32 multiply-adds for `none`, int8 `vpdpbusd` for the quantized precisions where the CPU
    /// has AVX-512 VNNI).
    of_limit: f64,
    /// The limit `of_limit` is read against: `bandwidth`, `f32 peak` or `int8 peak`.
    limit: &'static str,
}

/// Our decoder at one precision with what it needs to run.
struct Ours {
    mode: Quantization,
    decoder: Decoder,
}

/// One sequence of `prompt` token ids, `tokens` generated: (prefill ms, decode tokens/s).
fn ours_once(
    d: &Decoder,
    pb: &PromptBuilder,
    prompt: usize,
    tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    // Ids spread over the vocabulary, as bench_llama_cpp.py sends (speed does not depend on them).
    let vocab = d.config().vocab_size as u32;
    let base = 100.min(vocab / 2);
    let ids: Vec<u32> = (0..prompt as u32)
        .map(|i| base + (i * 37) % (vocab - base).min(20000))
        .collect();
    let no_eos = pb.eos_ids().iter().map(|&t| (t, -100.0)).collect();
    let req = SeqRequest {
        embeds: d.embed_tokens(&ids)?,
        keys: ids.iter().map(|&t| PosKey::Token(t)).collect(),
        params: SamplingParams {
            max_tokens: tokens as u32,
            logit_bias: no_eos,
            ..Default::default()
        },
        resume: vec![],
        monitor: false,
        rope: None,
        constraint: None,
    };
    let mut engine = Engine::new(d, pb, EngineConfig::for_one(prompt + tokens + 1));
    let start = Instant::now();
    match engine.try_admit(0, req)? {
        Admission::Admitted { .. } => {}
        Admission::Wait(_) => anyhow::bail!("one sequence does not fit its own KV blocks"),
    }
    let (mut first, mut last, mut n) = (None, start, 0usize);
    while !engine.is_idle() {
        for ev in engine.step()? {
            match ev {
                StepEvent::Token { .. } => {
                    last = Instant::now();
                    first.get_or_insert(last);
                    n += 1;
                }
                StepEvent::Failed { error, .. } => return Err(error.into()),
                StepEvent::Prefilled { .. } => {}
            }
        }
    }
    let first = first.context("no token")?;
    anyhow::ensure!(n == tokens, "{n} tokens of {tokens}: the run ended early");
    let prefill_ms = (first - start).as_secs_f64() * 1e3;
    let decode = (last - first).as_secs_f64();
    Ok((
        prefill_ms,
        if n > 1 { (n - 1) as f64 / decode } else { 0.0 },
    ))
}

/// A measurement: its key and the samples of both sides.
struct Cell {
    mode: Quantization,
    kind: &'static str,
    tokens: usize,
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

pub fn run(a: &RealsizeBenchArgs, rt: &tokio::runtime::Runtime) -> anyhow::Result<RealsizeReport> {
    let model = crate::bundled::model_dir(&a.model)?;
    let image = std::fs::read(crate::bundled::image_path(&a.image)?)?;
    let (rounds, prefill, contexts, decode_tokens) = if a.quick {
        (1, vec![32, 96], vec![64, 128], 4)
    } else {
        (
            a.rounds,
            a.prefill.clone(),
            a.contexts.clone(),
            a.decode_tokens,
        )
    };
    anyhow::ensure!(decode_tokens >= 2, "--decode-tokens must be at least 2");
    anyhow::ensure!(!a.quantize.is_empty(), "--quantize names no precision");
    anyhow::ensure!(
        !prefill.is_empty() && prefill.iter().all(|&p| p > 0),
        "--prefill needs at least one prompt length above 0"
    );
    anyhow::ensure!(
        !contexts.is_empty(),
        "--contexts needs at least one context"
    );
    let ckpt = Checkpoint::open(&model)?;
    let pb = PromptBuilder::from_dir(&model, ckpt.config())?;
    // A decode "at context C" decodes the last `decode_tokens` positions up to C.
    anyhow::ensure!(
        contexts.iter().all(|&c| c > decode_tokens),
        "every --contexts value must exceed --decode-tokens ({decode_tokens})"
    );
    let longest = prefill
        .iter()
        .map(|p| p + 1)
        .chain(contexts.iter().copied())
        .max()
        .unwrap_or(0);
    let max_pos = ckpt.config().text.max_position_embeddings;
    anyhow::ensure!(
        longest <= max_pos,
        "--prefill/--contexts need {longest} positions; the model's context is {max_pos}"
    );
    let mut machine = machine::probe(a.quick);
    let ours: Vec<Ours> = a
        .quantize
        .iter()
        .map(|&mode| {
            Ok(Ours {
                mode,
                decoder: Decoder::load_quantized(&ckpt, DType::F32, &Device::Cpu, mode)?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let (mut llama, llama_note) = match (&a.llama_cpp_python, &a.gguf_dir) {
        (Some(py), Some(dir)) => (
            Some(LlamaCpp::start(py, dir, 16, 2, longest + 16)?),
            dir.display().to_string(),
        ),
        _ => (None, "not run (no --llama-cpp-python/--gguf-dir)".into()),
    };
    let cells = measure(
        &ours,
        &pb,
        llama.as_mut(),
        (&prefill, &contexts),
        decode_tokens,
        rounds,
    )?;
    drop(llama);
    // The second bandwidth sample before the limits are read.
    machine.finish(a.quick);
    let rows = cells
        .into_iter()
        .map(|c| row(c, &ours, &machine, decode_tokens))
        .collect::<anyhow::Result<_>>()?;
    drop(ours);
    let vision = vision::run(&ckpt, &model, &a.quantize, a.python.as_ref(), rounds.max(3))?;
    let mesh = if a.no_mesh {
        Err("not run (--no-mesh)".into())
    } else {
        let tokens = if a.quick { 4 } else { decode_tokens as u32 };
        Ok(rt.block_on(mesh::run(&model, &image, a.mesh_quantize, tokens))?)
    };
    machine.load_after = machine::load_average();
    Ok(RealsizeReport {
        bench: "realsize",
        model: model.display().to_string(),
        machine,
        llama_cpp: llama_note,
        rounds,
        rows,
        vision,
        mesh,
    })
}

/// Every precision's prefill and decode cells, `rounds` interleaved rounds of ours and (with
/// `llama`) llama.cpp's, the side that goes first alternating, after one warm-up each.
fn measure(
    ours: &[Ours],
    pb: &PromptBuilder,
    mut llama: Option<&mut LlamaCpp>,
    (prefill, contexts): (&[usize], &[usize]),
    decode_tokens: usize,
    rounds: usize,
) -> anyhow::Result<Vec<Cell>> {
    let mut cells: Vec<Cell> = vec![];
    for o in ours {
        for &p in prefill {
            cells.push(cell(o.mode, "prefill", p));
        }
        for &c in contexts {
            cells.push(cell(o.mode, "decode", c));
        }
    }
    let warm = prefill[0].min(contexts[0]);
    for o in ours {
        ours_once(&o.decoder, pb, warm, 2)?;
        if let Some(l) = llama.as_deref_mut() {
            l.generate(gguf_name(o.mode), warm, 2)?;
        }
    }
    for r in 0..rounds {
        for (i, c) in cells.iter_mut().enumerate() {
            let o = ours.iter().find(|o| o.mode == c.mode).expect("loaded");
            let (prompt, tokens) = if c.kind == "prefill" {
                (c.tokens, 1)
            } else {
                (c.tokens - decode_tokens, decode_tokens)
            };
            for side in if (r + i) % 2 == 0 { [0, 1] } else { [1, 0] } {
                if side == 0 {
                    let (ms, tok_s) = ours_once(&o.decoder, pb, prompt, tokens)?;
                    c.ours.push(rate(c.kind, prompt, ms, tok_s));
                } else if let Some(l) = llama.as_deref_mut() {
                    let run = l.generate(gguf_name(c.mode), prompt, tokens)?;
                    c.theirs
                        .push(rate(c.kind, prompt, run.prefill_ms, run.decode_tok_s));
                }
            }
        }
    }
    Ok(cells)
}

fn cell(mode: Quantization, kind: &'static str, tokens: usize) -> Cell {
    Cell {
        mode,
        kind,
        tokens,
        ours: vec![],
        theirs: vec![],
    }
}

/// The tokens/s a measurement reports: prompt tokens per second of prefill, or decode tokens/s.
fn rate(kind: &str, tokens: usize, prefill_ms: f64, decode_tok_s: f64) -> f64 {
    if kind == "prefill" {
        tokens as f64 / (prefill_ms / 1e3)
    } else {
        decode_tok_s
    }
}

fn row(mut c: Cell, ours: &[Ours], m: &machine::Machine, decoded: usize) -> anyhow::Result<Row> {
    let d = &ours
        .iter()
        .find(|o| o.mode == c.mode)
        .expect("loaded")
        .decoder;
    let ours_tok_s = Spread::of(&mut c.ours)?;
    let llama_cpp_tok_s = if c.theirs.is_empty() {
        None
    } else {
        Some(Spread::of(&mut c.theirs)?)
    };
    let (work, of_limit, limit) = if c.kind == "decode" {
        // The KV cache at the decode steps' mean context.
        let mean = c.tokens - decoded / 2;
        let (w, kv) = vlm_model::bench::decode_bytes(d.config(), c.mode, mean, 4);
        let bytes = (w + kv) as f64;
        let of = ours_tok_s.p50 / (m.read_bandwidth_gb_s * 1e9 / bytes);
        (bytes, of, "bandwidth")
    } else {
        // Quantized products run on int8 multiply-adds where the CPU has VNNI: their peak.
        let (peak, limit) = match (c.mode, m.peak_int8_gop_s) {
            (Quantization::None, _) | (_, None) => (m.peak_gflop_s, "f32 peak"),
            (_, Some(int8)) => (int8, "int8 peak"),
        };
        let flops = vlm_model::bench::prefill_flops(d.config(), c.tokens);
        let of = ours_tok_s.p50 / c.tokens as f64 * flops / (peak * 1e9);
        (flops, of, limit)
    };
    Ok(Row {
        precision: c.mode.to_string(),
        kind: c.kind,
        tokens: c.tokens,
        ours_over_llama_cpp: llama_cpp_tok_s.as_ref().map(|l| ours_tok_s.p50 / l.p50),
        ours_tok_s,
        llama_cpp_tok_s,
        work,
        of_limit,
        limit,
    })
}

impl RealsizeReport {
    pub fn print(&self) {
        println!(
            "realsize: {}  ({} rounds, interleaved)",
            self.model, self.rounds
        );
        self.machine.print();
        println!("llama.cpp: {}", self.llama_cpp);
        println!(
            "{:<6} {:<24} {:>12} {:>12} {:>9} {:>16}",
            "prec", "measurement", "ours tok/s", "llama.cpp", "ours/l", "of the limit"
        );
        for r in &self.rows {
            let what = match r.kind {
                "prefill" => format!("prefill {} tokens", r.tokens),
                _ => format!("decode at context {}", r.tokens),
            };
            let limit = format!("{:.0} % {}", r.of_limit * 100.0, r.limit);
            println!(
                "{:<6} {:<24} {:>12.1} {:>12} {:>9} {:>16}",
                r.precision,
                what,
                r.ours_tok_s.p50,
                r.llama_cpp_tok_s
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1}", l.p50)),
                r.ours_over_llama_cpp
                    .map_or("-".into(), |x| format!("{x:.2}x")),
                limit
            );
        }
        match &self.vision {
            Err(why) => println!("vision encode: {why}"),
            Ok(rows) => {
                println!(
                    "{:<6} {:<24} {:>12} {:>12} {:>9}",
                    "prec", "vision tower + projector", "ours ms", "transformers", "ours/t"
                );
                for v in rows {
                    println!(
                        "{:<6} {:<24} {:>12.1} {:>12} {:>9}",
                        v.precision,
                        format!("{} image rows", v.features),
                        v.ours_ms.p50,
                        v.transformers_ms
                            .as_ref()
                            .map_or("-".into(), |t| format!("{:.1}", t.p50)),
                        v.ours_over_transformers
                            .map_or("-".into(), |x| format!("{x:.2}x"))
                    );
                }
            }
        }
        match &self.mesh {
            Err(why) => println!("through the mesh: {why}"),
            Ok(m) => {
                println!(
                    "through the mesh (up --quantize {}, {} prompt tokens, {} from the prefix cache): TTFT {:.1} ms; preprocess {:.1}, encode {:.1}, project {:.1} (overlaps encode), prefill {:.1}; inter-token {:.1} ms",
                    m.quantize, m.prompt_tokens, m.cached_prompt_tokens, m.ttft_ms, m.preprocess_ms, m.encode_ms, m.project_ms, m.prefill_ms, m.inter_token_ms
                );
                let rss: Vec<String> = m
                    .peak_rss_mib
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0} MiB"))
                    .collect();
                println!("peak RSS: {}", rss.join(", "));
            }
        }
    }
}
