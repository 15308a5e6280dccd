//! Feature cache: time to first token on a hit vs a miss through the mesh, and the Redis fetch time
//! of feature tensors.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use vlm_cache::{CacheBackend, RedisCache};
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{CacheStatus, GenerateRequest};
use vlm_tensor::{TensorLimits, TensorValue, WireDType};

use super::{print_ratio, print_rows, BenchMesh, Input, Spread};

#[derive(Args, Debug)]
pub struct CacheBenchArgs {
    /// Redis for the mesh's feature cache (the benchmark writes keys under vlm:feat:v1: and
    /// vlm:bench:); without it the gateway's in-memory cache, and no Redis fetch times.
    #[arg(long, env = "VLM_REDIS")]
    pub redis: Option<String>,
    #[command(flatten)]
    pub input: Input,
    /// Miss/hit pairs to measure.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Smoke run: 3 rounds (its times mean little).
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize, Debug)]
pub struct CacheReport {
    bench: &'static str,
    model: String,
    /// The Redis the mesh's cache was on, or "in-memory".
    redis: String,
    /// Rounds whose two requests reported exactly miss, then hit (only those count).
    rounds: usize,
    ttft_miss_ms: Spread,
    ttft_hit_ms: Spread,
    /// Hit p50 / miss p50.
    hit_over_miss_p50: f64,
    /// The encoder's own time (preprocess + forward) on the misses, as the gateway reports it:
    /// the most a hit can save.
    encode_ms: Spread,
    redis_fetch: Vec<FetchRow>,
}

#[derive(serde::Serialize, Debug)]
struct FetchRow {
    rows: usize,
    dim: usize,
    dtype: &'static str,
    bytes: usize,
    /// GET + checksum-verified decode.
    fetch_ms: Spread,
    mb_per_s_p50: f64,
}

impl CacheReport {
    /// Where a hit's features come from.
    fn source(&self) -> &str {
        if self.redis == "in-memory" {
            "the gateway's memory"
        } else {
            "Redis"
        }
    }

    pub fn print(&self) {
        println!(
            "model: {}  redis: {}  rounds: {} (interleaved miss/hit pairs)",
            self.model, self.redis, self.rounds
        );
        let mut rows = vec![
            (
                "TTFT, cache miss (encoder runs)".to_string(),
                self.ttft_miss_ms,
            ),
            (
                format!("TTFT, cache hit (features from {})", self.source()),
                self.ttft_hit_ms,
            ),
            (
                "encoder (preprocess + forward) on the misses".to_string(),
                self.encode_ms,
            ),
        ];
        for f in &self.redis_fetch {
            rows.push((
                format!(
                    "Redis fetch {}x{} {} ({} B)",
                    f.rows, f.dim, f.dtype, f.bytes
                ),
                f.fetch_ms,
            ));
        }
        print_rows("ms", &rows);
        print_ratio("TTFT hit / miss (p50)", self.hit_over_miss_p50);
    }
}

/// `base` as a PNG with its centre pixel set from `round`: another image per round (the centre
/// survives a centre crop; a corner may not).
pub(super) fn variant(base: &image::RgbImage, round: usize) -> anyhow::Result<Vec<u8>> {
    let mut img = base.clone();
    let (w, h) = img.dimensions();
    let p = img.get_pixel_mut(w / 2, h / 2);
    p.0 = [(round % 256) as u8, (round / 256 % 256) as u8, 77];
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Time to the first token, the image's cache status and the encoder's time (0 on a hit).
async fn ttft(
    client: &mut GatewayClient<tonic::transport::Channel>,
    image: Vec<u8>,
) -> anyhow::Result<(f64, CacheStatus, f64)> {
    let req = GenerateRequest {
        image_inputs: vec![],
        images: vec![image.into()],
        prompt: "USER: <image>\nWhat is shown in this image? ASSISTANT:".into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(4),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    };
    let t = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let mut first = None;
    let (mut status, mut encode_ms) = (CacheStatus::Unspecified, 0.0);
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Delta(_)) if first.is_none() => {
                first = Some(t.elapsed().as_secs_f64() * 1e3)
            }
            Some(Kind::Final(f)) => {
                let timings = f.timings.unwrap_or_default();
                status = timings.cache().next().unwrap_or_default();
                encode_ms = timings.preprocess_ms + timings.encode_ms;
            }
            _ => {}
        }
    }
    Ok((first.context("no token")?, status, encode_ms))
}

async fn redis_fetch(
    cache: &RedisCache,
    rows: usize,
    dim: usize,
    dtype: WireDType,
) -> anyhow::Result<FetchRow> {
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
    let fetch_ms = Spread::of(&mut samples)?;
    Ok(FetchRow {
        rows,
        dim,
        dtype: dtype.name(),
        bytes: value.len(),
        fetch_ms,
        mb_per_s_p50: value.len() as f64 / fetch_ms.p50 / 1e3,
    })
}

pub async fn run(args: &CacheBenchArgs) -> anyhow::Result<CacheReport> {
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let cache = match &args.redis {
        Some(url) => {
            let cache = RedisCache::new(url, Default::default())?;
            cache
                .get("vlm:bench:ping")
                .await
                .with_context(|| format!("cannot reach Redis at {url}"))?;
            Some(cache)
        }
        None => None,
    };
    let base = image::open(&args.input.image)
        .with_context(|| format!("cannot read {}", args.input.image.display()))?
        .to_rgb8();

    let gateway_args = match &args.redis {
        Some(url) => vec!["--redis".into(), url.clone()],
        None => vec![],
    };
    let bench_mesh = BenchMesh::start(&args.input.model, gateway_args).await?;
    let result = async {
        let mut client = bench_mesh.gateway.clone();
        // Warm-up: connections, allocator, encoder info.
        ttft(&mut client, variant(&base, 65_000)?).await?;
        let salt = std::process::id() as usize * 1000;
        let (mut miss, mut hit, mut encode) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let img = variant(&base, salt + round)?;
            let (t_miss, s1, e) = ttft(&mut client, img.clone()).await?;
            let (t_hit, s2, _) = ttft(&mut client, img).await?;
            if s1 == CacheStatus::Miss && s2 == CacheStatus::Hit {
                miss.push(t_miss);
                hit.push(t_hit);
                encode.push(e);
            }
        }
        anyhow::ensure!(
            !miss.is_empty(),
            "no round produced a miss followed by a hit"
        );
        let rounds = miss.len();
        let (ttft_miss_ms, ttft_hit_ms) = (Spread::of(&mut miss)?, Spread::of(&mut hit)?);
        let mut redis_fetch_rows = Vec::new();
        for (rows, dim, dtype) in [
            (25, 32, WireDType::F32),
            (576, 1024, WireDType::F16),
            (576, 1024, WireDType::F32),
        ] {
            if let Some(cache) = &cache {
                redis_fetch_rows.push(redis_fetch(cache, rows, dim, dtype).await?);
            }
        }
        Ok(CacheReport {
            bench: "cache",
            model: args.input.model.display().to_string(),
            redis: args.redis.clone().unwrap_or_else(|| "in-memory".into()),
            rounds,
            hit_over_miss_p50: ttft_hit_ms.p50 / ttft_miss_ms.p50,
            ttft_miss_ms,
            ttft_hit_ms,
            encode_ms: Spread::of(&mut encode)?,
            redis_fetch: redis_fetch_rows,
        })
    }
    .await;
    bench_mesh.mesh.shutdown().await;
    result
}
