//! Concurrency: does the decoder serve N requests at once faster than one at a time, and what does
//! a long shared prompt prefix cost the second time? Through one real mesh (`up`, feature cache on
//! Redis: every measured request's image features are a cache hit, so the encoder does not run and
//! only the decoder's batching is measured), greedy decoding, a fixed `max_tokens`.
//!
//! **Throughput.** For each level N, every round sends N requests at once and, interleaved with
//! that (alternating which goes first), N requests one after another. Every request has its own
//! prompt (a request number at its very start), so no prefix is shared between them. For a set of
//! streams, with *first_i* / *last_i* the arrival times of stream i's first and last token:
//!
//! * **decode tokens/s (steady)**: at once, over the window `[max_i first_i, min_i last_i]` in
//!   which every stream was decoding, the tokens that arrived in it over its length: the batch-N
//!   decode rate, as `llama-batched-bench` reports it. One at a time, Σ_i (tokens_i − 1) /
//!   Σ_i (last_i − first_i): each stream decoding alone. A round in which one stream ended before
//!   another's first token has no steady window; such rounds are counted, not sampled.
//! * **decode tokens/s (busy)**: Σ_i (tokens_i − 1) / |∪_i [first_i, last_i]|, the time any stream
//!   was decoding; at once that includes the arrivals' prefills (every running stream waits for a
//!   prefill chunk), so it shows what a burst of new requests costs.
//! * **inter-token latency**: gaps between consecutive token-carrying deltas of one stream, counted
//!   per token (a delta with k tokens arriving dt after the previous one adds k samples of dt / k):
//!   inside the steady window, and over every gap. The baseline ("alone") is the one-at-a-time
//!   phase of the same level.
//!
//! **Decode step in process** (`step`): one batched forward of N decode rows, timed in this process
//! on the same checkpoint after the mesh has stopped: what batching buys without the network.
//!
//! **Prefix reuse** (`prefix`): a prompt of about `--prefix-tokens` text tokens with the image after
//! it, sent once (cold) and then again, identical (warm); TTFT and `cached_prompt_tokens` of both.

mod prefix;
mod step;
mod streams;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use vlm_proto::gateway_client::GatewayClient;

use super::plot::{LineChart, Series};
use super::{cores, BenchMesh, Input, Spread};
use prefix::{prefix_bench, PrefixReport};
use step::{decode_steps, StepRow};
use streams::{generate, Expect, Phase, Stream};

type Client = GatewayClient<tonic::transport::Channel>;

/// Concurrency levels measured by default.
pub const DEFAULT_LEVELS: [usize; 5] = [1, 2, 4, 8, 16];

/// Tokens per request by default: enough that at 16 at once the streams still decode together
/// after the last one's prefill.
pub const DEFAULT_MAX_TOKENS: u32 = 128;

#[derive(Args, Debug)]
pub struct ConcurrencyBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Redis for the mesh's feature cache (the image's features are cached once, so the encoder
    /// stays out of the measurement); without it the gateway's in-memory cache does the same.
    #[arg(long, env = "VLM_REDIS")]
    pub redis: Option<String>,
    /// Requests in flight to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_LEVELS)]
    pub levels: Vec<usize>,
    /// Rounds: each runs every level at once and one at a time (interleaved), and one cold/warm
    /// pair of the prefix measurement.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens to generate per request (greedy).
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    pub max_tokens: u32,
    /// Text tokens of the prompt in the prefix-reuse measurement (the image's rows come on top).
    #[arg(long, default_value_t = 1000)]
    pub prefix_tokens: u32,
    /// Timed decode steps per batch size in the in-process table.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Write an SVG plot of decode tokens/s against concurrency to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Smoke run: 1 round, levels 1 and 2, 8 tokens, a 100-token prefix, 3 steps (for CI; its
    /// times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of tables.
    #[arg(long)]
    pub json: bool,
}

impl ConcurrencyBenchArgs {
    /// What `--quick` means for this section.
    pub fn apply_quick(&mut self) {
        self.rounds = 1;
        self.levels = vec![1, 2];
        self.max_tokens = 8;
        self.prefix_tokens = 100;
        self.steps = 3;
    }
}

#[derive(serde::Serialize, Debug)]
pub struct ConcurrencyReport {
    bench: &'static str,
    model: String,
    /// The mesh's feature cache: on, every measured request a hit (the encoder does not run).
    cache: &'static str,
    cores: usize,
    rounds: usize,
    max_tokens: u32,
    /// `VLM_MAX_CONCURRENT` as the services inherited it (the decoder's batch cap); null: the
    /// decoder's default.
    decoder_max_concurrent: Option<usize>,
    levels: Vec<LevelRow>,
    /// The decode step in process, per batch size.
    step: Vec<StepRow>,
    prefix: PrefixReport,
    /// Where the SVG plot was written, if it was.
    plot: Option<String>,
}

/// One concurrency level.
#[derive(serde::Serialize, Debug)]
struct LevelRow {
    /// Requests in flight in the at-once phase (and requests per phase).
    concurrency: usize,
    /// Completion tokens of all rounds' requests, per phase (greedy answers to different prompts
    /// may end early, at an end-of-sequence token).
    completion_tokens_at_once: u64,
    completion_tokens_one_at_a_time: u64,
    /// At-once rounds with a steady window (every stream decoding), of `rounds`.
    steady_rounds: usize,
    /// Decode tokens/s in the steady state (see the module doc), one sample per round; null at
    /// once when no round had a steady window.
    at_once_tok_per_s: Option<Spread>,
    one_at_a_time_tok_per_s: Spread,
    /// At once p50 / one at a time p50.
    at_once_over_one_at_a_time_p50: Option<f64>,
    /// Inter-token latency inside the steady windows, and of requests alone.
    itl_at_once_ms: Option<Spread>,
    itl_alone_ms: Spread,
    /// At once p50 / alone p50.
    itl_at_once_over_alone_p50: Option<f64>,
    /// Over every gap of every stream at once, arrivals and prefills included.
    itl_at_once_all_gaps_ms: Spread,
    /// Decode tokens/s over the time any stream was decoding (see the module doc).
    busy_at_once_tok_per_s: Spread,
    /// Time to first token of the requests sent at once, and alone.
    ttft_at_once_ms: Spread,
    ttft_alone_ms: Spread,
}

impl ConcurrencyReport {
    pub fn print(&self) {
        let limit = self
            .decoder_max_concurrent
            .map_or("default".to_string(), |n| n.to_string());
        println!(
            "model: {}  cores: {}  rounds: {} (interleaved)  max tokens: {}  decoder --max-concurrent: {}  cache: hits",
            self.model, self.cores, self.rounds, self.max_tokens, limit
        );
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        println!(
            "{:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9}",
            "in flight",
            "tok/s at",
            "tok/s 1",
            "ratio",
            "ITL ms at",
            "ITL ms",
            "ratio",
            "ITL ms at",
            "busy tok/s",
            "TTFT ms",
            "TTFT ms"
        );
        println!(
            "{:>9} {:>10} {:>10} {:>7} {:>9} {:>9} {:>7} {:>10} {:>10} {:>9} {:>9}",
            "",
            "once",
            "at a time",
            "",
            "once",
            "alone",
            "",
            "all gaps",
            "at once",
            "at once",
            "alone"
        );
        for l in &self.levels {
            println!(
                "{:>9} {:>10} {:>10.1} {:>7} {:>9} {:>9.2} {:>7} {:>10.2} {:>10.1} {:>9.1} {:>9.1}",
                l.concurrency,
                opt(l.at_once_tok_per_s.map(|s| s.p50), 1),
                l.one_at_a_time_tok_per_s.p50,
                opt(l.at_once_over_one_at_a_time_p50, 3),
                opt(l.itl_at_once_ms.map(|s| s.p50), 2),
                l.itl_alone_ms.p50,
                opt(l.itl_at_once_over_alone_p50, 3),
                l.itl_at_once_all_gaps_ms.p50,
                l.busy_at_once_tok_per_s.p50,
                l.ttft_at_once_ms.p50,
                l.ttft_alone_ms.p50,
            );
        }
        println!(
            "(p50s; tok/s and ITL at once: while every stream decoded; busy: any stream decoding, \
             prefills of the arrivals included)"
        );
        println!(
            "\ndecode step in process (context {} positions per sequence):",
            self.step.first().map_or(0, |s| s.context)
        );
        println!(
            "{:>6} {:>10} {:>10} {:>10} {:>12}",
            "batch", "step ms", "tok/s", "step / b1", "tok/s / b1"
        );
        for s in &self.step {
            println!(
                "{:>6} {:>10.2} {:>10.1} {:>10.3} {:>12.3}",
                s.batch, s.step_ms.p50, s.tok_per_s, s.step_over_batch_1, s.tok_per_s_over_batch_1
            );
        }
        self.prefix.print();
        if let Some(plot) = &self.plot {
            println!("plot: {plot}");
        }
    }

    fn plot(&self) -> String {
        let xs: Vec<f64> = self.levels.iter().map(|l| l.concurrency as f64).collect();
        let p50 = |s: Option<Spread>| s.map_or(f64::NAN, |s| s.p50);
        let at_once: Vec<f64> = self
            .levels
            .iter()
            .map(|l| p50(l.at_once_tok_per_s))
            .collect();
        let busy: Vec<f64> = self
            .levels
            .iter()
            .map(|l| l.busy_at_once_tok_per_s.p50)
            .collect();
        let one: Vec<f64> = self
            .levels
            .iter()
            .map(|l| l.one_at_a_time_tok_per_s.p50)
            .collect();
        let title = format!(
            "Decode tokens/s vs concurrency ({}, {} tokens/request, p50 of {} rounds)",
            std::path::Path::new(&self.model)
                .file_name()
                .map_or(self.model.clone(), |n| n.to_string_lossy().into_owned()),
            self.max_tokens,
            self.rounds
        );
        LineChart {
            title: &title,
            x_label: "requests (concurrency N)",
            y_label: "decode tokens/s",
            xs: &xs,
            log2_x: true,
            series: &[
                Series {
                    label: "N at once, all decoding",
                    color: "#1f77b4",
                    ys: &at_once,
                },
                Series {
                    label: "N at once, incl. their prefills",
                    color: "#2ca02c",
                    ys: &busy,
                },
                Series {
                    label: "N one at a time",
                    color: "#d62728",
                    ys: &one,
                },
            ],
        }
        .to_svg()
    }
}

/// The short prompt of request `n`: the number comes first, so no two requests share more than
/// a token or two of prefix.
fn short_prompt(n: usize) -> String {
    format!("Request {n}. USER: <image>\nWhat is shown in this image? ASSISTANT:")
}

/// The part of the report the throughput rounds produce, per level.
fn level_row(n: usize, at_once: &mut Phase, alone: &mut Phase) -> anyhow::Result<LevelRow> {
    let what = |p: &str| format!("concurrency {n}, {p}");
    let optional = |s: &mut Vec<f64>| (!s.is_empty()).then(|| Spread::of(s)).transpose();
    let a_tps = optional(&mut at_once.steady_tok_per_s)?;
    let s_tps =
        Spread::of(&mut alone.steady_tok_per_s).with_context(|| what("tokens/s one at a time"))?;
    let a_itl = optional(&mut at_once.steady_itl_ms)?;
    let s_itl = Spread::of(&mut alone.steady_itl_ms).with_context(|| what("ITL alone"))?;
    Ok(LevelRow {
        concurrency: n,
        completion_tokens_at_once: at_once.tokens,
        completion_tokens_one_at_a_time: alone.tokens,
        steady_rounds: at_once.rounds - at_once.rounds_without_steady_window,
        at_once_over_one_at_a_time_p50: a_tps.map(|a| a.p50 / s_tps.p50),
        at_once_tok_per_s: a_tps,
        one_at_a_time_tok_per_s: s_tps,
        itl_at_once_over_alone_p50: a_itl.map(|a| a.p50 / s_itl.p50),
        itl_at_once_ms: a_itl,
        itl_alone_ms: s_itl,
        itl_at_once_all_gaps_ms: Spread::of(&mut at_once.itl_ms)
            .with_context(|| what("ITL at once"))?,
        busy_at_once_tok_per_s: Spread::of(&mut at_once.busy_tok_per_s)
            .with_context(|| what("busy tokens/s at once"))?,
        ttft_at_once_ms: Spread::of(&mut at_once.ttft_ms)?,
        ttft_alone_ms: Spread::of(&mut alone.ttft_ms)?,
    })
}

/// One phase of one level: `n` requests numbered from `first`, together or one after another.
async fn phase(
    client: &Client,
    image: &[u8],
    first: usize,
    n: usize,
    together: bool,
    max_tokens: u32,
) -> anyhow::Result<Vec<Stream>> {
    let clock = Instant::now();
    let call = |i: usize| {
        generate(
            client.clone(),
            image.to_vec(),
            short_prompt(i),
            max_tokens,
            clock,
            Expect::Hit,
        )
    };
    let mut streams = Vec::with_capacity(n);
    if together {
        for s in futures::future::join_all((first..first + n).map(call)).await {
            streams.push(s?);
        }
    } else {
        for i in first..first + n {
            streams.push(call(i).await?);
        }
    }
    Ok(streams)
}

async fn throughput(
    client: &Client,
    image: &[u8],
    levels: &[usize],
    args: &ConcurrencyBenchArgs,
) -> anyhow::Result<Vec<LevelRow>> {
    let mut phases: Vec<(Phase, Phase)> = levels.iter().map(|_| Default::default()).collect();
    let mut next = 1;
    for round in 0..args.rounds {
        for (li, &n) in levels.iter().enumerate() {
            let (at_once, alone) = &mut phases[li];
            // Alternate which phase goes first, across rounds and levels.
            let first = (round + li) % 2 == 0;
            for together in [first, !first] {
                let streams = phase(client, image, next, n, together, args.max_tokens).await?;
                if together {
                    at_once.add_at_once(&streams)?;
                } else {
                    alone.add_one_at_a_time(&streams)?;
                }
                next += n;
            }
        }
    }
    levels
        .iter()
        .zip(&mut phases)
        .map(|(&n, (at_once, alone))| level_row(n, at_once, alone))
        .collect()
}

pub async fn run(args: &ConcurrencyBenchArgs) -> anyhow::Result<ConcurrencyReport> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        !args.levels.is_empty() && args.levels.iter().all(|&n| (1..=256).contains(&n)),
        "--levels must list concurrency levels from 1 to 256"
    );
    anyhow::ensure!(
        args.max_tokens >= 2,
        "--max-tokens must be at least 2 (inter-token latency needs two tokens)"
    );
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    let mut levels = args.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    let image = std::fs::read(&args.input.image)
        .with_context(|| format!("cannot read {}", args.input.image.display()))?;

    let gateway_args = match &args.redis {
        Some(url) => vec!["--redis".into(), url.clone()],
        None => vec![],
    };
    let bench_mesh = BenchMesh::start(&args.input.model, gateway_args).await?;
    let result = async {
        let client = bench_mesh.gateway.clone();
        // Warm-up: connections, allocator, and the image's features into the cache.
        let clock = Instant::now();
        generate(
            client.clone(),
            image.clone(),
            short_prompt(0),
            2,
            clock,
            Expect::Any,
        )
        .await
        .with_context(|| match &args.redis {
            Some(url) => format!("warm-up request (feature cache on Redis at {url})"),
            None => "warm-up request (the gateway's in-memory feature cache)".to_string(),
        })?;
        let rows = throughput(&client, &image, &levels, args).await?;
        let prefix = prefix_bench(&client, &image, args).await?;
        Ok::<_, anyhow::Error>((rows, prefix))
    }
    .await;
    bench_mesh.mesh.shutdown().await;
    let (rows, prefix) = result?;
    // After the mesh has stopped, so nothing else runs on the cores.
    let mut step_levels = levels.clone();
    if !step_levels.contains(&1) {
        step_levels.insert(0, 1);
    }
    let (model, steps) = (args.input.model.clone(), args.steps);
    let step =
        tokio::task::spawn_blocking(move || decode_steps(&model, &step_levels, steps)).await??;
    let mut report = ConcurrencyReport {
        bench: "concurrency",
        model: args.input.model.display().to_string(),
        cache: "hit",
        cores: cores(),
        rounds: args.rounds,
        max_tokens: args.max_tokens,
        decoder_max_concurrent: std::env::var("VLM_MAX_CONCURRENT")
            .ok()
            .and_then(|v| v.trim().parse().ok()),
        levels: rows,
        step,
        prefix,
        plot: None,
    };
    if let Some(path) = &args.plot {
        std::fs::write(path, report.plot())
            .with_context(|| format!("cannot write the plot to {}", path.display()))?;
        report.plot = Some(path.display().to_string());
    }
    Ok(report)
}
