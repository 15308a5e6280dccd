//! `vlm-mesh bench`: measurements printed side by side from one run (ratios, not absolute times,
//! are what survive a noisy machine).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use vlm_cache::{FeatureCache, RedisCache};
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{CacheStatus, GenerateRequest};
use vlm_tensor::{TensorLimits, TensorValue, WireDType};

use crate::mesh::{certs_dir, Mesh, MeshOptions};

/// A path under the repository's `models/` folder.
fn bundled(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(rel)
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Feature cache: time to first token on a hit vs a miss through the mesh (interleaved), and the
    /// Redis fetch time of feature tensors.
    Cache(CacheBenchArgs),
    /// What the mesh costs: time to first token and inter-token latency through `up` (4
    /// processes, mTLS, cache off) vs the same pipeline in this process, interleaved.
    Mesh(MeshBenchArgs),
}

#[derive(Args, Debug)]
pub struct MeshBenchArgs {
    /// Checkpoint to serve and run in process.
    #[arg(long, env = "VLM_MODEL", default_value_os_t = bundled("tiny-llava"))]
    pub model: PathBuf,
    /// Image to ask about.
    #[arg(long, default_value_os_t = bundled("images/shapes-48x48.png"))]
    pub image: PathBuf,
    /// Interleaved in-process/mesh pairs to measure.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Tokens to generate per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Smoke run: 3 rounds of 4 tokens (for CI; its times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CacheBenchArgs {
    /// Redis to use (the benchmark writes keys under vlm:feat:v1: and vlm:bench:).
    #[arg(long, env = "VLM_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Checkpoint to serve.
    #[arg(long, env = "VLM_MODEL", default_value_os_t = bundled("tiny-llava"))]
    pub model: PathBuf,
    /// Image whose variants are sent (one pixel changed per round, so each round starts cold).
    #[arg(long, default_value_os_t = bundled("images/shapes-48x48.png"))]
    pub image: PathBuf,
    /// Miss/hit pairs to measure.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cmd {
        BenchCommand::Cache(args) => rt.block_on(cache_bench(args)),
        BenchCommand::Mesh(args) => rt.block_on(mesh_bench(args)),
    }
}

/// Median and 90th percentile in milliseconds.
fn summary(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9))
}

fn variant(base: &image::RgbImage, round: usize) -> anyhow::Result<Vec<u8>> {
    let mut img = base.clone();
    let p = img.get_pixel_mut(0, 0);
    p.0 = [(round % 256) as u8, (round / 256 % 256) as u8, 77];
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Time to the first token and the image's cache status.
async fn ttft(
    client: &mut GatewayClient<tonic::transport::Channel>,
    image: Vec<u8>,
) -> anyhow::Result<(f64, CacheStatus)> {
    let req = GenerateRequest {
        images: vec![image.into()],
        prompt: "USER: <image>\nWhat is shown in this image? ASSISTANT:".into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(4),
            ..Default::default()
        }),
        monitor_layers: false,
    };
    let t = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut first = None;
    let mut status = CacheStatus::Unspecified;
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Delta(_)) if first.is_none() => {
                first = Some(t.elapsed().as_secs_f64() * 1e3)
            }
            Some(Kind::Final(f)) => {
                status = f
                    .timings
                    .unwrap_or_default()
                    .cache()
                    .next()
                    .unwrap_or_default();
            }
            _ => {}
        }
    }
    Ok((first.context("no token")?, status))
}

async fn redis_fetch(
    cache: &RedisCache,
    rows: usize,
    dim: usize,
    dtype: WireDType,
) -> anyhow::Result<(usize, f64, f64)> {
    let values: Vec<f32> = (0..rows * dim).map(|i| (i % 97) as f32 * 0.01).collect();
    let value = TensorValue::from_f32(&values, &[rows, dim], dtype)?.encode();
    let key = format!("vlm:bench:{rows}x{dim}:{}", dtype.name());
    cache
        .put(&key, value.clone().into(), Duration::from_secs(300))
        .await?;
    let mut samples = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let got = cache.get(&key).await?.context("benchmark value vanished")?;
        // A fetch is only useful once verified: include the checksum pass.
        TensorValue::decode(got, &TensorLimits::default())?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    cache.delete(&key).await?;
    let (p50, p90) = summary(&mut samples);
    Ok((value.len(), p50, p90))
}

async fn cache_bench(args: CacheBenchArgs) -> anyhow::Result<()> {
    let cache = RedisCache::new(&args.redis, Default::default())?;
    cache
        .get("vlm:bench:ping")
        .await
        .with_context(|| format!("cannot reach Redis at {}", args.redis))?;
    let base = image::open(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?
        .to_rgb8();

    let state = tempfile::tempdir()?;
    let opts = MeshOptions {
        model: args.model.clone(),
        state_dir: state.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        dtype: "f32".into(),
        gateway_args: vec!["--redis".into(), args.redis.clone()],
        service_log: Some("warn".into()),
        replicas: [1; 3],
    };
    let mesh = Mesh::start(&opts).await?;
    let result = async {
        let files = vlm_net::TlsFiles::for_role(certs_dir(state.path()), "client");
        let channel = vlm_net::connect(
            &mesh.info.gateway_url,
            Some(vlm_net::client_tls(&files, "localhost")?),
        )
        .await?;
        let mut client = GatewayClient::new(channel);
        // Warm-up: connections, allocator, encoder info.
        ttft(&mut client, variant(&base, 65_000)?).await?;
        let salt = std::process::id() as usize * 1000;
        let (mut miss, mut hit) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let img = variant(&base, salt + round)?;
            let (t_miss, s1) = ttft(&mut client, img.clone()).await?;
            let (t_hit, s2) = ttft(&mut client, img).await?;
            if s1 == CacheStatus::Miss && s2 == CacheStatus::Hit {
                miss.push(t_miss);
                hit.push(t_hit);
            }
        }
        anyhow::ensure!(
            !miss.is_empty(),
            "no round produced a miss followed by a hit"
        );
        let n = miss.len();
        let (miss50, miss90) = summary(&mut miss);
        let (hit50, hit90) = summary(&mut hit);
        println!(
            "model: {}  redis: {}  rounds: {n} (interleaved miss/hit pairs)",
            args.model.display(),
            args.redis
        );
        println!("{:<34} {:>10} {:>10}", "", "p50 ms", "p90 ms");
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "TTFT, cache miss (encoder)", miss50, miss90
        );
        println!(
            "{:<34} {:>10.2} {:>10.2}",
            "TTFT, cache hit (Redis)", hit50, hit90
        );
        println!("{:<34} {:>10.2}", "hit / miss (p50)", hit50 / miss50);
        for (rows, dim, dtype) in [
            (25, 32, WireDType::F32),
            (576, 1024, WireDType::F16),
            (576, 1024, WireDType::F32),
        ] {
            let (bytes, p50, p90) = redis_fetch(&cache, rows, dim, dtype).await?;
            println!(
                "{:<34} {:>10.2} {:>10.2}   ({} bytes, {:.0} MB/s at p50)",
                format!("Redis fetch {rows}x{dim} {}", dtype.name()),
                p50,
                p90,
                bytes,
                bytes as f64 / p50 / 1e3
            );
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    mesh.shutdown().await;
    result
}

/// Median, 90th percentile, minimum and maximum of one measure, in milliseconds.
#[derive(serde::Serialize, Debug, Clone, Copy)]
struct Spread {
    p50: f64,
    p90: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(samples: &mut [f64]) -> anyhow::Result<Spread> {
        anyhow::ensure!(!samples.is_empty(), "no samples");
        let (p50, p90) = summary(samples);
        Ok(Spread {
            p50,
            p90,
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
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
struct MeshReport {
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
    let req = GenerateRequest {
        images: vec![image.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: 0.0,
            top_p: 1.0,
            seed: Some(0),
            ..Default::default()
        }),
        monitor_layers: false,
    };
    let t = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let (mut first, mut last) = (None, 0.0);
    let mut ids = Vec::new();
    let mut cache = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Delta(d)) if !d.token_ids.is_empty() => {
                let now = t.elapsed().as_secs_f64() * 1e3;
                first.get_or_insert(now);
                last = now;
                ids.extend(d.token_ids);
            }
            Some(Kind::Final(f)) => cache = f.timings.unwrap_or_default().cache().collect(),
            _ => {}
        }
    }
    // Every image must have gone through the encoder: a cached feature would flatter the mesh.
    anyhow::ensure!(
        !cache.is_empty() && cache.iter().all(|c| *c == CacheStatus::Off),
        "the mesh reported cache statuses {cache:?}; this benchmark needs the cache off"
    );
    let first = first.context("no token")?;
    let (ttft, itl) = timing(first, last, ids.len());
    Ok((ttft, itl, ids))
}

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

async fn mesh_bench(mut args: MeshBenchArgs) -> anyhow::Result<()> {
    if args.quick {
        args.rounds = 3;
        args.max_tokens = 4;
    }
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let image = std::fs::read(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?;
    let pipeline = vlm_model::Pipeline::load(
        &args.model,
        vlm_model::parse_dtype("f32")?,
        &vlm_model::Device::Cpu,
        Default::default(),
    )
    .with_context(|| format!("cannot load model from {}", args.model.display()))?;
    let params = vlm_model::SamplingParams {
        max_tokens: args.max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        stop: vec![],
    };

    let state = tempfile::tempdir()?;
    let opts = MeshOptions {
        model: args.model.clone(),
        state_dir: state.path().to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        dtype: "f32".into(),
        // Cache off: every request pays for the encoder, as in process.
        gateway_args: vec!["--no-cache".into()],
        service_log: Some("warn".into()),
        replicas: [1; 3],
    };
    let mesh = Mesh::start(&opts).await?;
    let result = async {
        let files = vlm_net::TlsFiles::for_role(certs_dir(state.path()), "client");
        let channel = vlm_net::connect(
            &mesh.info.gateway_url,
            Some(vlm_net::client_tls(&files, "localhost")?),
        )
        .await?;
        let mut client = GatewayClient::new(channel);
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
        let report = MeshReport {
            bench: "mesh",
            cache: "off",
            model: args.model.display().to_string(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rounds: args.rounds,
            max_tokens: args.max_tokens,
            tokens: reference.len(),
            ttft_ms: AbRow::new(&mut ttft_a, &mut ttft_b)?,
            itl_ms: AbRow::new(&mut itl_a, &mut itl_b)?,
        };
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "model: {}  cores: {}  rounds: {} (interleaved)  tokens/request: {}",
                report.model, report.cores, report.rounds, report.tokens
            );
            println!(
                "{:<28} {:>9} {:>9} {:>9} {:>9}",
                "", "p50 ms", "p90 ms", "min ms", "max ms"
            );
            for (name, row) in [("TTFT", &report.ttft_ms), ("inter-token", &report.itl_ms)] {
                for (side, s) in [("in-process", row.in_process), ("mesh", row.mesh)] {
                    println!(
                        "{:<28} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                        format!("{name}, {side}"),
                        s.p50,
                        s.p90,
                        s.min,
                        s.max
                    );
                }
                println!(
                    "{:<28} {:>9.3}",
                    format!("{name}, mesh / in-process"),
                    row.ratio_p50
                );
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    mesh.shutdown().await;
    result
}
