//! What the mesh costs: time to first token and inter-token latency through `up` (4 processes, mTLS,
//! cache off) vs the same pipeline in this process, interleaved. On the same mesh: the encoder's
//! throughput with 8 concurrent images vs 1, one batched forward of 8 images vs 8 single ones in
//! process (does batching pay?), and the peak RSS of every service.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::{CacheStatus, EncodeRequest};

use super::{cores, print_ratio, print_rows, BenchMesh, Input, Spread};

#[derive(Args, Debug)]
pub struct MeshBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Interleaved in-process/mesh pairs to measure.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Encoder rounds: each sends 8 images one at a time and 8 at once, and runs 8 single vision
    /// forwards and one batch of 8 in process.
    #[arg(long, default_value_t = 5)]
    pub encoder_rounds: usize,
    /// Tokens to generate per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Smoke run: 3 rounds of 4 tokens, 1 encoder round (for CI; its times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One A/B comparison: `ratio` is mesh p50 / in-process p50.
#[derive(serde::Serialize, Debug)]
struct AbRow {
    in_process: Spread,
    mesh: Spread,
    ratio_p50: f64,
}

impl AbRow {
    fn new(a: &mut [f64], b: &mut [f64]) -> anyhow::Result<AbRow> {
        let in_process = Spread::of(a)?;
        let mesh = Spread::of(b)?;
        Ok(AbRow {
            in_process,
            mesh,
            ratio_p50: mesh.p50 / in_process.p50,
        })
    }
}

#[derive(serde::Serialize, Debug)]
pub struct MeshReport {
    bench: &'static str,
    model: String,
    /// The mesh's feature cache (always off here: each request runs the encoder).
    cache: &'static str,
    cores: usize,
    rounds: usize,
    max_tokens: u32,
    /// Tokens generated per request (the same greedy answer on both sides).
    tokens: usize,
    ttft_ms: AbRow,
    /// Mean gap between consecutive tokens of one request.
    itl_ms: AbRow,
    encoder: EncoderReport,
    /// Peak resident set (VmHWM) of each service process after all of the above, and of this
    /// process (which holds the whole pipeline in process), in MiB.
    peak_rss_mib: BTreeMap<String, f64>,
    /// Resident set (VmRSS) of the same processes at the end: what stays once loading is over.
    rss_mib: BTreeMap<String, f64>,
}

/// The encoder service's throughput, and whether batching would raise it.
#[derive(serde::Serialize, Debug)]
struct EncoderReport {
    rounds: usize,
    /// Images per phase.
    images: usize,
    /// Requests in flight in the concurrent phase.
    concurrency: usize,
    /// The encoder's `--max-concurrent` (model runs at once).
    max_concurrent: usize,
    /// Images/s through the encoder service (gRPC over mTLS), one request at a time.
    sequential_img_per_s: Spread,
    /// Images/s with `concurrency` requests in flight.
    concurrent_img_per_s: Spread,
    /// Concurrent p50 / sequential p50.
    concurrent_over_sequential_p50: f64,
    /// In process: one vision forward of `concurrency` images stacked as a batch vs as many
    /// single-image forwards, ms for all of them.
    single_forwards_ms: Spread,
    batched_forward_ms: Spread,
    /// Single p50 / batched p50: above 1 means batching is faster.
    batching_speedup_p50: f64,
}

impl MeshReport {
    pub fn print(&self) {
        println!(
            "model: {}  cores: {}  rounds: {} (interleaved)  tokens/request: {}",
            self.model, self.cores, self.rounds, self.tokens
        );
        let mut rows = Vec::new();
        for (name, row) in [("TTFT", &self.ttft_ms), ("inter-token", &self.itl_ms)] {
            rows.push((format!("{name}, in process"), row.in_process));
            rows.push((format!("{name}, mesh"), row.mesh));
        }
        print_rows("ms", &rows);
        print_ratio("TTFT, mesh / in process (p50)", self.ttft_ms.ratio_p50);
        print_ratio(
            "inter-token, mesh / in process (p50)",
            self.itl_ms.ratio_p50,
        );
        let e = &self.encoder;
        println!(
            "\nencoder service: {} rounds of {} images per phase, {} in flight vs 1, --max-concurrent {}",
            e.rounds, e.images, e.concurrency, e.max_concurrent
        );
        print_rows(
            "images/s",
            &[
                ("1 in flight".to_string(), e.sequential_img_per_s),
                (
                    format!("{} in flight", e.concurrency),
                    e.concurrent_img_per_s,
                ),
            ],
        );
        print_ratio(
            &format!("{} in flight / 1 (p50)", e.concurrency),
            e.concurrent_over_sequential_p50,
        );
        print_rows(
            "ms (in process, vision forward)",
            &[
                (
                    format!("{} single-image forwards", e.concurrency),
                    e.single_forwards_ms,
                ),
                (
                    format!("one batch of {}", e.concurrency),
                    e.batched_forward_ms,
                ),
            ],
        );
        print_ratio("batching speed-up (p50)", e.batching_speedup_p50);
        println!("\n{:<44} {:>10} {:>10}", "memory, MiB", "peak", "at end");
        for (who, peak) in &self.peak_rss_mib {
            let now = self.rss_mib.get(who).copied().unwrap_or(f64::NAN);
            println!("{who:<44} {peak:>10.1} {now:>10.1}");
        }
    }
}

/// Time to the first token and the mean inter-token gap (ms), and the tokens generated.
fn timing(first: f64, last: f64, tokens: usize) -> (f64, f64) {
    let itl = if tokens > 1 {
        (last - first) / (tokens - 1) as f64
    } else {
        0.0
    };
    (first, itl)
}

fn in_process_once(
    pipeline: &vlm_model::Pipeline,
    image: &[u8],
    params: &vlm_model::SamplingParams,
) -> anyhow::Result<(f64, f64, Vec<u32>)> {
    let t = Instant::now();
    let (mut first, mut last) = (None, 0.0);
    let out = pipeline.generate(&[image], PROMPT, params, |_| {
        let now = t.elapsed().as_secs_f64() * 1e3;
        first.get_or_insert(now);
        last = now;
    })?;
    let first = first.context("no token")?;
    let (ttft, itl) = timing(first, last, out.token_ids.len());
    Ok((ttft, itl, out.token_ids))
}

async fn mesh_once(
    client: &mut GatewayClient<tonic::transport::Channel>,
    image: &[u8],
    max_tokens: u32,
) -> anyhow::Result<(f64, f64, Vec<u32>)> {
    let req = super::greedy_request(image.to_vec(), PROMPT.into(), max_tokens);
    let s = super::stream(client, req).await?;
    let cache: Vec<CacheStatus> = s
        .fin
        .and_then(|f| f.timings)
        .map_or(vec![], |t| t.cache().collect());
    // Every image must have gone through the encoder: a cached feature would flatter the mesh.
    anyhow::ensure!(
        !cache.is_empty() && cache.iter().all(|c| *c == CacheStatus::Off),
        "the mesh reported cache statuses {cache:?}; this benchmark needs the cache off"
    );
    let (ttft, itl) = timing(s.first_ms, s.last_ms, s.ids.len());
    Ok((ttft, itl, s.ids))
}

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

/// Images in flight in the encoder's concurrent phase (and the batch size compared in process).
const CONCURRENCY: usize = 8;

pub async fn run(args: &MeshBenchArgs) -> anyhow::Result<MeshReport> {
    anyhow::ensure!(
        args.rounds > 0 && args.encoder_rounds > 0,
        "--rounds and --encoder-rounds must be at least 1"
    );
    let image = std::fs::read(&args.input.image)
        .with_context(|| format!("cannot read {}", args.input.image.display()))?;
    let pipeline = vlm_model::Pipeline::load(
        &args.input.model,
        vlm_model::parse_dtype("f32")?,
        &vlm_model::Device::Cpu,
        Default::default(),
    )
    .with_context(|| format!("cannot load model from {}", args.input.model.display()))?;
    let params = vlm_model::SamplingParams {
        max_tokens: args.max_tokens,
        ..Default::default()
    };

    // Cache off: every request pays for the encoder, as in process.
    let bench_mesh = BenchMesh::start(&args.input.model, vec!["--no-cache".into()]).await?;
    let mesh = &bench_mesh.mesh;
    let result = async {
        let mut client = bench_mesh.gateway.clone();
        // Warm-up both sides (connections, allocator, lazily loaded weights), and check that
        // they answer the same: a comparison of different work would mean nothing.
        let (_, _, reference) = in_process_once(&pipeline, &image, &params)?;
        let (_, _, via_mesh) = mesh_once(&mut client, &image, args.max_tokens).await?;
        anyhow::ensure!(
            reference == via_mesh,
            "the mesh answered {via_mesh:?}, in process {reference:?}"
        );
        let (mut ttft_a, mut ttft_b, mut itl_a, mut itl_b) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds {
            // Alternate which side goes first so drift and cache warmth favour neither.
            for side in [round % 2, 1 - round % 2] {
                if side == 0 {
                    let (t, i, _) = in_process_once(&pipeline, &image, &params)?;
                    ttft_a.push(t);
                    itl_a.push(i);
                } else {
                    let (t, i, _) = mesh_once(&mut client, &image, args.max_tokens).await?;
                    ttft_b.push(t);
                    itl_b.push(i);
                }
            }
        }
        let encoder = encoder_bench(
            bench_mesh.encoder().await?,
            &pipeline,
            &image,
            args.encoder_rounds,
        )
        .await?;
        let (mut peak_rss_mib, mut rss_mib) = (BTreeMap::new(), BTreeMap::new());
        let processes = mesh
            .info
            .services
            .iter()
            .map(|s| (s.label(), s.pid))
            .chain([(
                "bench process (whole pipeline in process)".to_string(),
                std::process::id(),
            )]);
        for (who, pid) in processes {
            peak_rss_mib.insert(who.clone(), status_mib(pid, "VmHWM")?);
            rss_mib.insert(who, status_mib(pid, "VmRSS")?);
        }
        Ok(MeshReport {
            bench: "mesh",
            cache: "off",
            model: args.input.model.display().to_string(),
            cores: cores(),
            rounds: args.rounds,
            max_tokens: args.max_tokens,
            tokens: reference.len(),
            ttft_ms: AbRow::new(&mut ttft_a, &mut ttft_b)?,
            itl_ms: AbRow::new(&mut itl_a, &mut itl_b)?,
            encoder,
            peak_rss_mib,
            rss_mib,
        })
    }
    .await;
    bench_mesh.mesh.shutdown().await;
    result
}

/// A `kB` field (`VmHWM`, `VmRSS`) of a live process's `/proc/PID/status`, in MiB.
pub(super) fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .with_context(|| format!("no {field} line in {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("bad {field} in {path}"))?;
    Ok(kib / 1024.0)
}

/// One Encode call, drained; errors if the stream carries no chunk or no stats.
async fn encode_once(
    mut client: EncoderClient<tonic::transport::Channel>,
    image: Vec<u8>,
) -> anyhow::Result<()> {
    use vlm_proto::encode_response::Kind;
    let mut stream = client
        .encode(EncodeRequest {
            region: None,
            views: vec![],
            image: image.into(),
            options: None,
            layout_only: false,
        })
        .await?
        .into_inner();
    let (mut chunks, mut stats) = (0, false);
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Chunk(_)) => chunks += 1,
            Some(Kind::Stats(_)) => stats = true,
            None => {}
        }
    }
    anyhow::ensure!(chunks > 0 && stats, "an Encode stream ended early");
    Ok(())
}

/// Images/s through the encoder service with 1 and with [`CONCURRENCY`] requests in flight
/// (alternating which phase goes first), then batched vs single vision forwards in process.
async fn encoder_bench(
    client: EncoderClient<tonic::transport::Channel>,
    pipeline: &vlm_model::Pipeline,
    image: &[u8],
    rounds: usize,
) -> anyhow::Result<EncoderReport> {
    let images = CONCURRENCY;
    encode_once(client.clone(), image.to_vec()).await?;
    let (mut seq, mut conc) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for phase in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if phase == 0 {
                for _ in 0..images {
                    encode_once(client.clone(), image.to_vec()).await?;
                }
            } else {
                let calls = (0..images).map(|_| encode_once(client.clone(), image.to_vec()));
                for r in futures::future::join_all(calls).await {
                    r?;
                }
            }
            let rate = images as f64 / t.elapsed().as_secs_f64();
            if phase == 0 { &mut seq } else { &mut conc }.push(rate);
        }
    }
    let pixels = pipeline
        .preprocessor
        .preprocess(image, &vlm_model::Device::Cpu)?;
    let batch = vlm_model::Tensor::cat(&vec![&pixels; images], 0)?;
    let single_out = pipeline.vision.forward(&pixels)?;
    let batch_out = pipeline.vision.forward(&batch)?;
    // The batch must compute what the single forwards do, or the comparison means nothing.
    let diff = (batch_out.narrow(0, images - 1, 1)? - &single_out)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    anyhow::ensure!(
        diff < 1e-3,
        "batched features differ from single ones by {diff}"
    );
    let (mut single, mut batched) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for phase in [round % 2, 1 - round % 2] {
            let t = Instant::now();
            if phase == 0 {
                for _ in 0..images {
                    pipeline.vision.forward(&pixels)?;
                }
                single.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                pipeline.vision.forward(&batch)?;
                batched.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    let (seq, conc) = (Spread::of(&mut seq)?, Spread::of(&mut conc)?);
    let (single, batched) = (Spread::of(&mut single)?, Spread::of(&mut batched)?);
    Ok(EncoderReport {
        rounds,
        images,
        concurrency: CONCURRENCY,
        max_concurrent: crate::serve::ENCODER_MAX_CONCURRENT,
        sequential_img_per_s: seq,
        concurrent_img_per_s: conc,
        concurrent_over_sequential_p50: conc.p50 / seq.p50,
        single_forwards_ms: single,
        batched_forward_ms: batched,
        batching_speedup_p50: single.p50 / batched.p50,
    })
}
