//! `vlm-mesh bench structured`: what constrained decoding costs, in process on the decoder's own
//! step engine. (a) Decode tokens/s of 8 sequences batched together, every one held to a JSON
//! schema vs none constrained, interleaved rounds; end-of-sequence is biased away in both, and
//! the schema's one string field is longer than the run, so every sequence decodes the same
//! number of tokens. (b) Compile time of the function-calling schemas of a 20-tool agent, each
//! round a new set (uncached), then the same set again (from the compiled-format cache).

use std::time::Instant;

use clap::Args;
use serde_json::json;
use vlm_model::{
    Admission, Device, Engine, EngineConfig, ImageLimits, OutputFormat, Pipeline, SamplingParams,
    SeqRequest, StepEvent,
};

use super::{emit, print_rows, Input, Spread};

#[derive(Args, Debug)]
pub struct StructuredBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Interleaved rounds (each: one constrained and one unconstrained batch).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Sequences decoded at once.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens each sequence decodes.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Uncached compiles of the 20-tool agent's schemas.
    #[arg(long, default_value_t = 20)]
    pub compile_rounds: usize,
    /// Smoke run: 1 round of 8 tokens, 3 compiles (for CI; its times mean little).
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize, Debug)]
pub struct StructuredReport {
    bench: &'static str,
    model: String,
    batch: usize,
    tokens_per_sequence: u32,
    /// Aggregate decode tokens/s of the batch, per round.
    unconstrained_tok_s: Spread,
    constrained_tok_s: Spread,
    /// Constrained p50 / unconstrained p50.
    constrained_vs_unconstrained: f64,
    tools: usize,
    compile_ms: Percentiles,
    cached_compile_ms: Percentiles,
}

#[derive(serde::Serialize, Debug, Clone, Copy)]
pub struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> anyhow::Result<Self> {
        anyhow::ensure!(!v.is_empty(), "no samples");
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
        Ok(Percentiles {
            p50: at(0.5),
            p99: at(0.99),
            max: v[v.len() - 1],
        })
    }
}

impl StructuredReport {
    fn print(&self) {
        println!(
            "structured output: {} sequences x {} tokens, {}",
            self.batch, self.tokens_per_sequence, self.model
        );
        print_rows(
            "decode tokens/s (batch)",
            &[
                ("unconstrained".into(), self.unconstrained_tok_s),
                (
                    "every sequence held to a JSON schema".into(),
                    self.constrained_tok_s,
                ),
            ],
        );
        println!(
            "constrained / unconstrained (p50): {:.2}x",
            self.constrained_vs_unconstrained
        );
        println!(
            "compile, {} tools' schemas: p50 {:.2} ms, p99 {:.2} ms; cached: p50 {:.3} ms, p99 {:.3} ms",
            self.tools,
            self.compile_ms.p50,
            self.compile_ms.p99,
            self.cached_compile_ms.p50,
            self.cached_compile_ms.p99
        );
    }
}

/// The decode run's format: an object whose one string is longer than any run.
const LONG_SCHEMA: &str = r#"{"type":"object","properties":{"text":{"type":"string","minLength":4096}},"required":["text"]}"#;

/// The function-calling schemas of a 20-tool agent, as one call's schema (any of the tools,
/// each with its parameters); `round` goes into the descriptions so each round is a new format.
pub fn agent_tools_schema(round: usize) -> String {
    let tools: Vec<serde_json::Value> = (0..20)
        .map(|i| {
            let params = match i % 4 {
                0 => json!({"type": "object", "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 999},
                    "y": {"type": "integer", "minimum": 0, "maximum": 999}},
                    "required": ["x", "y"], "additionalProperties": false}),
                1 => json!({"type": "object", "properties": {
                    "text": {"type": "string", "maxLength": 200},
                    "submit": {"type": "boolean"}},
                    "required": ["text"], "additionalProperties": false}),
                2 => json!({"type": "object", "properties": {
                    "app": {"enum": ["Settings", "Camera", "Maps", "Mail", "Browser", "Phone"]},
                    "mode": {"enum": ["open", "close", "restart"]}},
                    "required": ["app"], "additionalProperties": false}),
                _ => json!({"type": "object", "properties": {
                    "steps": {"type": "array", "maxItems": 5, "items": {"type": "object", "properties": {
                        "direction": {"enum": ["up", "down", "left", "right"]},
                        "distance": {"type": "number", "minimum": 0, "maximum": 1}},
                        "required": ["direction"]}},
                    "note": {"type": ["string", "null"]}},
                    "required": ["steps"], "additionalProperties": false}),
            };
            json!({
                "type": "object",
                "description": format!("tool {i}, round {round}"),
                "properties": {"name": {"const": format!("tool_{i}")}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    json!({"anyOf": tools}).to_string()
}

/// One batch of `batch` sequences, all with `params`: aggregate decode tokens/s from the step at
/// which every sequence has its first token to the last.
fn decode_batch(p: &Pipeline, req: &SeqRequest, batch: usize) -> anyhow::Result<f64> {
    let cfg = EngineConfig::with_budget(&p.decoder, 256 << 20, batch, 256);
    let mut engine = Engine::new(&p.decoder, &p.prompt, cfg);
    for id in 0..batch as u64 {
        match engine.try_admit(id, req.clone())? {
            Admission::Admitted { .. } => {}
            Admission::Wait(_) => anyhow::bail!("the batch does not fit its KV budget"),
        }
    }
    let (mut started, mut first) = (None, vec![false; batch]);
    let mut tokens_after = 0usize;
    while !engine.is_idle() {
        for ev in engine.step()? {
            match ev {
                StepEvent::Token { id, .. } => {
                    if started.is_some() {
                        tokens_after += 1;
                    }
                    first[id as usize] = true;
                }
                StepEvent::Failed { error, .. } => return Err(error.into()),
                StepEvent::Prefilled { .. } => {}
            }
        }
        if started.is_none() && first.iter().all(|&f| f) {
            started = Some(Instant::now());
        }
    }
    let secs = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    anyhow::ensure!(tokens_after > 0 && secs > 0.0, "no decode steps measured");
    Ok(tokens_after as f64 / secs)
}

pub fn run(a: &StructuredBenchArgs) -> anyhow::Result<StructuredReport> {
    let input = a.input.clone().resolved()?;
    let (rounds, max_tokens, compile_rounds) = if a.quick {
        (1, 8, 3)
    } else {
        (a.rounds, a.max_tokens, a.compile_rounds)
    };
    let p = Pipeline::load(
        &input.model,
        vlm_model::DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
    )?;
    let image = std::fs::read(&input.image)?;
    let pv = p.preprocessor.preprocess(&image, &Device::Cpu)?;
    let feats = p.vision.forward(&pv)?.squeeze(0)?;
    let proj = p.projector.forward(&feats)?;
    let prompt = format!(
        "USER: {}\nDescribe the image as JSON. ASSISTANT:",
        p.prompt.image_token()
    );
    let prepared = p.prompt.prepare(&prompt, &[proj.dim(0)?])?;
    let no_eos: Vec<(u32, f32)> = p.prompt.eos_ids().iter().map(|&t| (t, -100.0)).collect();
    let request = |format: Option<OutputFormat>| -> anyhow::Result<SeqRequest> {
        Ok(SeqRequest {
            embeds: prepared.embeddings(&p.decoder, std::slice::from_ref(&proj))?,
            keys: prepared.position_keys(std::slice::from_ref(&proj), None)?,
            params: SamplingParams {
                max_tokens,
                logit_bias: no_eos.clone(),
                format,
                ..Default::default()
            },
            resume: vec![],
            monitor: false,
            rope: None,
            constraint: None,
        })
    };
    let free = request(None)?;
    let held = request(Some(OutputFormat::JsonSchema(LONG_SCHEMA.into())))?;
    let (mut plain, mut constrained) = (vec![], vec![]);
    for r in 0..rounds {
        // Alternate which goes first.
        for which in [r % 2, 1 - r % 2] {
            let req = if which == 0 { &free } else { &held };
            let tok_s = decode_batch(&p, req, a.batch)?;
            if which == 0 {
                &mut plain
            } else {
                &mut constrained
            }
            .push(tok_s);
        }
    }
    let grammars = p.prompt.grammars()?;
    let (mut compile, mut cached) = (vec![], vec![]);
    for r in 0..compile_rounds {
        let f = OutputFormat::JsonSchema(agent_tools_schema(r));
        let t = Instant::now();
        grammars.compile(&f)?;
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        grammars.compile(&f)?;
        cached.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let unconstrained_tok_s = Spread::of(&mut plain)?;
    let constrained_tok_s = Spread::of(&mut constrained)?;
    Ok(StructuredReport {
        bench: "structured",
        model: input.model.display().to_string(),
        batch: a.batch,
        tokens_per_sequence: max_tokens,
        constrained_vs_unconstrained: constrained_tok_s.p50 / unconstrained_tok_s.p50,
        unconstrained_tok_s,
        constrained_tok_s,
        tools: 20,
        compile_ms: Percentiles::of(compile)?,
        cached_compile_ms: Percentiles::of(cached)?,
    })
}

pub fn run_and_emit(a: &StructuredBenchArgs) -> anyhow::Result<()> {
    let report = run(a)?;
    emit(&report, a.json, StructuredReport::print)
}
