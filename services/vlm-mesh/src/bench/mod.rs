//! `vlm-mesh bench`: measurements printed side by side from one run (ratios, not absolute times,
//! are what survive a noisy machine). With no subcommand every section runs and one report comes
//! out; each section also runs alone as a subcommand.

mod cache;
mod concurrency;
mod driver;
mod frames;
mod launch;
mod llama_cpp;
mod mesh;
mod plot;
mod quantized;
mod realsize;
mod scale;
mod stream;
mod structured;
mod transformers;

use std::path::PathBuf;

use clap::{Args, Subcommand};

use launch::{stream, BenchMesh};

/// The checkpoint and image a section runs.
#[derive(Args, Debug, Clone)]
pub struct Input {
    /// Checkpoint to serve (and run in process); `bundled:shapes-llava` is the demo model
    /// compiled into this binary.
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: PathBuf,
    /// Image to ask about (the cache section sends variants of it, one pixel changed per round,
    /// so each round starts cold); `bundled:demo.png` is the demo model's sample image.
    #[arg(long, default_value = crate::bundled::BUNDLED_DEMO_IMAGE)]
    pub image: PathBuf,
}

impl Input {
    /// The bundled names replaced by the files they unpack to.
    fn resolved(mut self) -> anyhow::Result<Input> {
        self.model = crate::bundled::model_dir(&self.model)?;
        self.image = crate::bundled::image_path(&self.image)?;
        Ok(self)
    }
}

/// Progress of `vlm-mesh bench` (every section): one line on stderr per section as it starts,
/// since the whole run takes minutes and prints its report at the end.
fn progress(step: usize, name: &str) {
    eprintln!("bench: [{step}/6] {name} …");
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: Option<BenchCommand>,
    #[command(flatten)]
    pub all: AllArgs,
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Feature cache: time to first token on a hit vs a miss through the mesh (interleaved), and the
    /// Redis fetch time of feature tensors.
    Cache(cache::CacheBenchArgs),
    /// Decoding N requests at once vs one at a time (aggregate tokens/s, inter-token latency) for
    /// N in --levels, interleaved; time to first token of a long prompt sent cold vs again (prefix
    /// reuse); optionally an SVG plot of tokens/s against N.
    Concurrency(concurrency::ConcurrencyBenchArgs),
    /// Frame streams: a synthetic clip through the gateway's Watch stream vs encoding every frame
    /// (encoder seconds, answer latency, identical answers), frame by frame in one run.
    Frames(frames::FramesBenchArgs),
    /// What the mesh costs: time to first token and inter-token latency through `up` (4
    /// processes, mTLS, cache off) vs the same pipeline in this process, interleaved; encoder
    /// throughput with 8 concurrent images vs 1 and batched vs single forwards; peak RSS of every
    /// service.
    Mesh(mesh::MeshBenchArgs),
    /// Quantized stages (--quantize none, q8_0, q4_k) side by side: decode tokens/s and every
    /// service's RSS (loading peak, steady, peak) per mode; optionally llama.cpp on the same
    /// decoder (--llama-cpp-python, --gguf-dir).
    Quantized(quantized::QuantizedBenchArgs),
    /// One pod's decoder vs llama.cpp at real shapes: prefill and decode tokens/s per precision
    /// (ours in process on the step engine, llama.cpp on the same weights as GGUF), against the
    /// machine's measured read bandwidth and peak multiply-add rate; checks the machine is idle.
    Realsize(realsize::RealsizeBenchArgs),
    /// Tensor-chunk streams over mTLS gRPC vs a raw TLS byte stream on the same loopback.
    Stream(stream::StreamBenchArgs),
    /// Scale-out: agent sessions on 1 and N decoder replicas with prefix routing on and off
    /// (cached prefix tokens, TTFT, each replica's share, abandoned calls), and which stage's
    /// vlm_saturation an image-heavy and a long-generation load push over the autoscaling target.
    Scale(scale::ScaleBenchArgs),
    /// Structured output: decode tokens/s of a batch every sequence of which is held to a JSON
    /// schema vs none (in process, on the decoder's step engine), and the compile time of a
    /// 20-tool agent's function-calling schemas, uncached and cached.
    Structured(structured::StructuredBenchArgs),
}

/// Every section in one run (`vlm-mesh bench`).
#[derive(Args, Debug)]
pub struct AllArgs {
    #[command(flatten)]
    pub input: Input,
    /// Redis for the mesh's feature cache in the cache and concurrency sections (keys under
    /// vlm:feat:v1: and vlm:bench:); without it the gateway's in-memory cache, and the cache
    /// section's Redis fetch times are left out.
    #[arg(long, env = "VLM_REDIS")]
    pub redis: Option<String>,
    /// Python with torch and transformers: also compare with Hugging Face transformers on CPU
    /// (scripts/bench_transformers.py). Without it that section is reported as skipped.
    #[arg(long, env = "VLM_BENCH_PYTHON")]
    pub python: Option<PathBuf>,
    /// Rounds (interleaved A/B pairs) of the mesh, cache and transformers sections.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Encoder rounds (each: 8 images one at a time and 8 at once; 8 single vision forwards and
    /// one batch of 8).
    #[arg(long, default_value_t = 5)]
    pub encoder_rounds: usize,
    /// Rounds per tensor size of the stream section (each transfer takes milliseconds).
    #[arg(long, default_value_t = 100)]
    pub stream_rounds: usize,
    /// Rounds of the concurrency section (each: every level at once and one at a time, and one
    /// cold/warm pair of the long prompt).
    #[arg(long, default_value_t = 3)]
    pub concurrency_rounds: usize,
    /// Requests in flight the concurrency section measures, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = concurrency::DEFAULT_LEVELS)]
    pub levels: Vec<usize>,
    /// Tokens per request (greedy) in the concurrency section.
    #[arg(long, default_value_t = concurrency::DEFAULT_MAX_TOKENS)]
    pub concurrency_max_tokens: u32,
    /// Text tokens of the long prompt in the concurrency section's prefix-reuse measurement.
    #[arg(long, default_value_t = 1000)]
    pub prefix_tokens: u32,
    /// Write an SVG plot of the concurrency section's tokens/s against concurrency to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Tokens per request (greedy) in the mesh and transformers sections.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Smoke run: 3 rounds per section (1 encoder round; 1 concurrency round of levels 1 and 2
    /// with a 100-token prefix), 4 tokens (for CI; its times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.cmd {
        Some(BenchCommand::Cache(mut a)) => rt.block_on(async {
            a.input = a.input.resolved()?;
            if a.quick {
                a.rounds = 3;
            }
            let report = cache::run(&a).await?;
            emit(&report, a.json, cache::CacheReport::print)
        }),
        Some(BenchCommand::Concurrency(mut a)) => rt.block_on(async {
            a.input = a.input.resolved()?;
            if a.quick {
                a.apply_quick();
            }
            let report = concurrency::run(&a).await?;
            emit(&report, a.json, concurrency::ConcurrencyReport::print)
        }),
        Some(BenchCommand::Frames(mut a)) => rt.block_on(async {
            a.model = crate::bundled::model_dir(&a.model)?;
            let report = frames::run(&a).await?;
            emit(&report, a.json, frames::FramesReport::print)
        }),
        Some(BenchCommand::Mesh(mut a)) => rt.block_on(async {
            a.input = a.input.resolved()?;
            if a.quick {
                (a.rounds, a.encoder_rounds, a.max_tokens) = (3, 1, 4);
            }
            let report = mesh::run(&a).await?;
            emit(&report, a.json, mesh::MeshReport::print)
        }),
        Some(BenchCommand::Quantized(mut a)) => rt.block_on(async {
            a.input = a.input.resolved()?;
            let report = quantized::run(&a).await?;
            emit(&report, a.json, quantized::QuantizedReport::print)
        }),
        Some(BenchCommand::Stream(mut a)) => rt.block_on(async {
            if a.quick {
                a.rounds = 3;
            }
            let report = stream::run(&a).await?;
            emit(&report, a.json, stream::StreamReport::print)
        }),
        Some(BenchCommand::Scale(mut a)) => rt.block_on(async {
            a.input = a.input.resolved()?;
            scale::run(&a).await?;
            Ok(())
        }),
        Some(BenchCommand::Structured(a)) => structured::run_and_emit(&a),
        Some(BenchCommand::Realsize(a)) => {
            let report = realsize::run(&a, &rt)?;
            emit(&report, a.json, realsize::RealsizeReport::print)
        }
        None => rt.block_on(all(args.all)),
    }
}

fn emit<R: serde::Serialize>(report: &R, json: bool, print: fn(&R)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print(report);
    }
    Ok(())
}

/// The report of `vlm-mesh bench`: every section, measured one after another in this run.
#[derive(serde::Serialize, Debug)]
struct AllReport {
    bench: &'static str,
    /// Seconds since the Unix epoch when the run started.
    started_unix_s: u64,
    cores: usize,
    quick: bool,
    model: String,
    mesh: mesh::MeshReport,
    cache: cache::CacheReport,
    concurrency: concurrency::ConcurrencyReport,
    stream: stream::StreamReport,
    frames: frames::FramesReport,
    transformers: transformers::TransformersReport,
}

async fn all(mut a: AllArgs) -> anyhow::Result<()> {
    a.input = a.input.resolved()?;
    if a.quick {
        (a.rounds, a.encoder_rounds, a.stream_rounds, a.max_tokens) = (3, 1, 3, 4);
    }
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    progress(1, "mesh vs in process");
    let mesh = mesh::run(&mesh::MeshBenchArgs {
        input: a.input.clone(),
        rounds: a.rounds,
        encoder_rounds: a.encoder_rounds,
        max_tokens: a.max_tokens,
        quick: a.quick,
        json: a.json,
    })
    .await?;
    progress(2, "feature cache");
    let cache = cache::run(&cache::CacheBenchArgs {
        redis: a.redis.clone(),
        input: a.input.clone(),
        rounds: a.rounds,
        quick: a.quick,
        json: a.json,
    })
    .await?;
    let mut concurrency_args = concurrency::ConcurrencyBenchArgs {
        input: a.input.clone(),
        redis: a.redis.clone(),
        levels: a.levels.clone(),
        rounds: a.concurrency_rounds,
        max_tokens: a.concurrency_max_tokens,
        prefix_tokens: a.prefix_tokens,
        steps: 20,
        plot: a.plot.clone(),
        quick: a.quick,
        json: a.json,
    };
    if a.quick {
        concurrency_args.apply_quick();
    }
    progress(3, "concurrency and prefix reuse");
    let concurrency = concurrency::run(&concurrency_args).await?;
    progress(4, "tensor-chunk streams");
    let stream = stream::run(&stream::StreamBenchArgs {
        rounds: a.stream_rounds,
        quick: a.quick,
        json: a.json,
    })
    .await?;
    progress(5, "frame streams");
    let frames = frames::run(&frames::FramesBenchArgs {
        model: crate::bundled::model_dir(std::path::Path::new(crate::bundled::BUNDLED_MODEL))?,
        frames: 300,
        still: 48,
        moving: 8,
        every: 10,
        max_tokens: 8,
        quick: a.quick,
        json: a.json,
    })
    .await?;
    progress(6, "vs Hugging Face transformers");
    let transformers = transformers::run(
        a.python.as_deref(),
        &a.input.model,
        &a.input.image,
        a.rounds,
        a.max_tokens,
    )
    .await?;
    let report = AllReport {
        bench: "all",
        started_unix_s,
        cores: cores(),
        quick: a.quick,
        model: a.input.model.display().to_string(),
        mesh,
        cache,
        concurrency,
        stream,
        frames,
        transformers,
    };
    emit(&report, a.json, |r| {
        println!("== mesh vs in process ==");
        r.mesh.print();
        println!("\n== feature cache ==");
        r.cache.print();
        println!("\n== concurrency and prefix reuse ==");
        r.concurrency.print();
        println!("\n== tensor-chunk streams ==");
        r.stream.print();
        println!("\n== frame streams (Watch vs every frame encoded) ==");
        r.frames.print();
        println!("\n== vs Hugging Face transformers ==");
        r.transformers.print();
    })
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Median and 90th percentile.
fn summary(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

/// A greedy request (seed 0) for `max_tokens` tokens about one image: what every bench section sends.
pub(crate) fn greedy_request(
    image: Vec<u8>,
    prompt: String,
    max_tokens: u32,
) -> vlm_proto::GenerateRequest {
    vlm_proto::GenerateRequest {
        image_inputs: vec![],
        images: vec![image.into()],
        prompt,
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(0),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    }
}

/// Median, 90th percentile, minimum and maximum of one measure.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy)]
pub(crate) struct Spread {
    pub p50: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(samples: &mut [f64]) -> anyhow::Result<Spread> {
        anyhow::ensure!(!samples.is_empty(), "no samples");
        anyhow::ensure!(
            samples.iter().all(|s| s.is_finite()),
            "a sample is not finite: {samples:?}"
        );
        let (p50, p90) = summary(samples);
        Ok(Spread {
            p50,
            p90,
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
}

/// A table of spreads, one row per (label, spread); `unit` heads the label column.
fn print_rows(unit: &str, rows: &[(String, Spread)]) {
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}",
        unit, "p50", "p90", "min", "max"
    );
    for (label, s) in rows {
        println!(
            "{:<44} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            label, s.p50, s.p90, s.min, s.max
        );
    }
}

fn print_ratio(label: &str, ratio: f64) {
    println!("{label:<44} {ratio:>10.3}");
}
