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
