//! `vlm-mesh bench scale`: what the mesh around the pods gains or loses with more replicas.
//!
//! (a) **Agent sessions**, as Open-AutoGLM's phone agent sends them: every step resends the
//! system prompt and the session's text history plus one new image. Run on one decoder, then on
//! each of `--decoders` replicas with prefix routing on and off (`--decoder-routing prefix |
//! balance`): prompt positions served from the decoders' prefix caches on steps ≥ 2, TTFT of
//! steps ≥ 2, each replica's share of requests, calls abandoned for slowness; then on the first
//! N again with busy threads saturating every core, the gateway's outlier rule against
//! abandonment turned off (steps per second, abandoned calls).
//! (b) **Image-heavy** (a different screenshot-sized image per request, 2-token answers) and (c) **long
//! generation** (one image, long answers), on one replica per stage: the largest and mean
//! `vlm_saturation` of the encoder and the decoder while it runs, and which crosses the 0.7 an
//! autoscaler aims at.

use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vlm_proto::generate_response::Kind;

use super::{emit, greedy_request, BenchMesh, Input, Spread};

mod signals;
use signals::signals;

/// What autoscalers aim `vlm_saturation` at (docs/kubernetes.md).
const TARGET: f64 = 0.7;

#[derive(Args, Debug, Clone)]
pub struct ScaleBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Decoder replica counts compared with one replica, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4usize, 8])]
    pub decoders: Vec<usize>,
    /// Agent sessions run side by side.
    #[arg(long, default_value_t = 8)]
    pub sessions: usize,
    /// Steps per session.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Tokens per agent step's answer.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// Seconds each of the image-heavy and long-generation workloads runs.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Tokens per answer of the long-generation workload.
    #[arg(long, default_value_t = 128)]
    pub long_tokens: u32,
    /// Smoke run: 2 decoders, 3 sessions × 3 steps, workloads of 1 s with 16-token answers.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// One agent run: a mesh with `decoders` replicas and a routing mode.
#[derive(serde::Serialize, Debug)]
pub struct AgentRun {
    pub decoders: usize,
    pub routing: &'static str,
    /// Whether busy threads (one per core) competed with the mesh for the CPU.
    pub outside_load: bool,
    /// `outliers` (the gateway's rule) or `off` (limits so high that nothing is abandoned).
    pub abandonment: &'static str,
    /// Agent steps finished per second, all sessions together.
    pub steps_per_s: f64,
    /// Prompt positions the decoders served from their prefix caches, steps ≥ 2.
    pub cached_tokens: u64,
    /// `cached_tokens` over the single replica's.
    pub cached_vs_one: f64,
    /// Time to first token of steps ≥ 2, ms.
    pub ttft_ms: Spread,
    /// Each replica's requests over the mean.
    pub max_share_over_mean: f64,
    pub requests_per_replica: Vec<f64>,
    pub abandoned: f64,
}

/// One workload's saturation signals.
#[derive(serde::Serialize, Debug)]
pub struct Signals {
    pub workload: &'static str,
    pub encoder_max: f64,
    pub encoder_mean: f64,
    pub decoder_max: f64,
    pub decoder_mean: f64,
    pub seconds: f64,
}

#[derive(serde::Serialize, Debug)]
pub struct ScaleReport {
    pub bench: &'static str,
    pub sessions: usize,
    pub steps: usize,
    pub agent: Vec<AgentRun>,
    pub signals: Vec<Signals>,
}

impl ScaleReport {
    pub fn print(&self) {
        println!(
            "agent sessions: {} × {} steps (steps ≥ 2 counted)",
            self.sessions, self.steps
        );
        println!(
            "{:>8} {:>8} {:>13} {:>10} {:>8} {:>10} {:>10} {:>10} {:>9} {:>8}",
            "decoders",
            "routing",
            "outside load",
            "cached",
            "vs one",
            "TTFT p50",
            "TTFT p90",
            "max share",
            "abandoned",
            "steps/s"
        );
        for r in &self.agent {
            let load = match (r.outside_load, r.abandonment) {
                (false, _) => "-",
                (true, "off") => "yes, abandon off",
                (true, _) => "yes",
            };
            println!(
                "{:>8} {:>8} {:>13} {:>10} {:>7.2}× {:>8.1}ms {:>8.1}ms {:>9.2}× {:>9} {:>8.2}",
                r.decoders,
                r.routing,
                load,
                r.cached_tokens,
                r.cached_vs_one,
                r.ttft_ms.p50,
                r.ttft_ms.p90,
                r.max_share_over_mean,
                r.abandoned,
                r.steps_per_s
            );
        }
        let mut counts: Vec<usize> = self.agent.iter().map(|r| r.decoders).collect();
        counts.sort_unstable();
        counts.dedup();
        for n in counts.into_iter().filter(|n| *n > 1) {
            let of = |routing| {
                self.agent
                    .iter()
                    .find(|r| r.decoders == n && r.routing == routing && !r.outside_load)
            };
            if let (Some(on), Some(off)) = (of("prefix"), of("balance")) {
                println!(
                    "{n} decoders: TTFT p50 prefix / balance = {:.2}×",
                    on.ttft_ms.p50 / off.ttft_ms.p50
                );
            }
        }
        let loaded = |abandonment| {
            self.agent
                .iter()
                .find(|r| r.outside_load && r.abandonment == abandonment)
        };
        if let (Some(on), Some(off)) = (loaded("outliers"), loaded("off")) {
            println!(
                "outside load: steps/s with the outlier rule / with abandonment off = {:.2}×",
                on.steps_per_s / off.steps_per_s
            );
        }
        println!("\nscaling signals (vlm_saturation, target {TARGET}):");
        for s in &self.signals {
            let over = |max: f64| if max > TARGET { "over" } else { "under" };
            println!(
                "{:>16}: encoder max {:.2} mean {:.2} ({}), decoder max {:.2} mean {:.2} ({}), {:.1} s",
                s.workload,
                s.encoder_max,
                s.encoder_mean,
                over(s.encoder_max),
                s.decoder_max,
                s.decoder_mean,
                over(s.decoder_max),
                s.seconds
            );
        }
    }
}

pub async fn run(a: &ScaleBenchArgs) -> anyhow::Result<ScaleReport> {
    let mut a = a.clone();
    if a.quick {
        (a.decoders, a.sessions, a.steps, a.seconds, a.long_tokens) = (vec![2], 3, 3, 1.0, 16);
        a.max_tokens = a.max_tokens.min(4);
    }
    let base = image::open(&a.input.image)?.to_rgb8();
    let quiet = Run {
        routing: "prefix",
        outside_load: false,
        abandonment: "outliers",
    };
    let mut agent = vec![agent_run(&a, &base, 1, quiet).await?];
    for &n in &a.decoders {
        for routing in ["prefix", "balance"] {
            agent.push(agent_run(&a, &base, n, Run { routing, ..quiet }).await?);
        }
    }
    // Every core saturated by busy threads: the outlier rule against no abandonment at all.
    let n = a.decoders.first().copied().unwrap_or(2);
    for abandonment in ["outliers", "off"] {
        let run = Run {
            outside_load: true,
            abandonment,
            ..quiet
        };
        agent.push(agent_run(&a, &base, n, run).await?);
    }
    let one = agent[0].cached_tokens.max(1) as f64;
    for r in &mut agent {
        r.cached_vs_one = r.cached_tokens as f64 / one;
    }
    let signals = vec![
        signals(&a, &base, "image-heavy").await?,
        signals(&a, &base, "long-generation").await?,
    ];
    let report = ScaleReport {
        bench: "scale",
        sessions: a.sessions,
        steps: a.steps,
        agent,
        signals,
    };
    emit(&report, a.json, ScaleReport::print)?;
    Ok(report)
}

/// Step `step`'s prompt of `session`: the agent's system prompt (the same for every session),
/// the session's task, its earlier steps' answers, and this step's screen.
fn agent_prompt(session: usize, answers: &[String], step: usize) -> String {
    let mut p = format!(
        "USER: You are a phone agent. Look at the screen and answer with one action. \
         Task {session}: open the settings."
    );
    for (i, a) in answers.iter().enumerate() {
        p.push_str(&format!(" Step {}: {}", i + 1, a.trim()));
    }
    p.push_str(&format!(" Step {step}: <image>\nNext action? ASSISTANT:"));
    p
}

/// One streamed answer: its text, time to first token and cached prompt positions.
async fn answer(
    bm: &BenchMesh,
    req: vlm_proto::GenerateRequest,
) -> anyhow::Result<(String, f64, u32)> {
    let mut client = bm.gateway.clone();
    let t = Instant::now();
    let mut stream = client.generate(req).await?.into_inner();
    let (mut text, mut ttft, mut cached) = (String::new(), None, 0);
    while let Some(msg) = stream.message().await? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                ttft.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
                text.push_str(&d.text);
            }
            Some(Kind::Final(f)) => cached = f.usage.map_or(0, |u| u.cached_prompt_tokens),
            None => {}
        }
    }
    // No text at all (an end token first): the whole call is its time to first token.
    let ttft = ttft.unwrap_or_else(|| t.elapsed().as_secs_f64() * 1e3);
    Ok((text, ttft, cached))
}

/// How one agent run is set up.
#[derive(Clone, Copy)]
struct Run {
    routing: &'static str,
    outside_load: bool,
    abandonment: &'static str,
}

/// Busy threads, one per core, until dropped.
struct OutsideLoad(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl OutsideLoad {
    fn start() -> OutsideLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 0..super::cores() {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            });
        }
        OutsideLoad(stop)
    }
}

impl Drop for OutsideLoad {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn agent_run(
    a: &ScaleBenchArgs,
    base: &image::RgbImage,
    decoders: usize,
    run: Run,
) -> anyhow::Result<AgentRun> {
    let mut args: Vec<String> = vec!["--decoder-routing".into(), run.routing.into()];
    if run.abandonment == "off" {
        for (flag, v) in [
            ("--timeout-factor", "1000000"),
            ("--timeout-min-ms", "600000"),
            ("--timeout-max-ms", "600000"),
        ] {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    let bm = BenchMesh::start_replicas(&a.input.model, args, [1, 1, decoders]).await?;
    let _load = run.outside_load.then(OutsideLoad::start);
    let started = Instant::now();
    let result = async {
        let before = decoder_requests(&bm).await?;
        let abandoned_before = gateway_sum(&bm, "vlm_gateway_abandoned_calls_total").await?;
        let sessions = (0..a.sessions).map(|s| {
            let bm = &bm;
            async move {
                let (mut answers, mut later) = (Vec::new(), Vec::new());
                for step in 1..=a.steps {
                    let image = super::cache::variant(base, s * 1000 + step)?;
                    let prompt = agent_prompt(s, &answers, step);
                    let (text, ttft, cached) =
                        answer(bm, greedy_request(image, prompt, a.max_tokens)).await?;
                    if step >= 2 {
                        later.push((ttft, cached));
                    }
                    answers.push(text);
                }
                Ok::<_, anyhow::Error>(later)
            }
        });
        let later: Vec<(f64, u32)> = futures::future::try_join_all(sessions)
            .await?
            .into_iter()
            .flatten()
            .collect();
        let after = decoder_requests(&bm).await?;
        let served: Vec<f64> = after.iter().zip(&before).map(|(x, y)| x - y).collect();
        let mean = served.iter().sum::<f64>() / served.len().max(1) as f64;
        let abandoned = gateway_sum(&bm, "vlm_gateway_abandoned_calls_total").await?;
        let mut ttft: Vec<f64> = later.iter().map(|l| l.0).collect();
        Ok::<_, anyhow::Error>(AgentRun {
            decoders,
            routing: run.routing,
            outside_load: run.outside_load,
            abandonment: run.abandonment,
            steps_per_s: (a.sessions * a.steps) as f64 / started.elapsed().as_secs_f64(),
            cached_tokens: later.iter().map(|l| u64::from(l.1)).sum(),
            cached_vs_one: 0.0,
            ttft_ms: Spread::of(&mut ttft)?,
            max_share_over_mean: served.iter().copied().fold(0.0, f64::max) / mean.max(1e-9),
            requests_per_replica: served,
            abandoned: abandoned - abandoned_before,
        })
    }
    .await;
    bm.mesh.shutdown().await;
    result
}

/// Finished `Generate` calls of each decoder replica.
async fn decoder_requests(bm: &BenchMesh) -> anyhow::Result<Vec<f64>> {
    let mut out = vec![];
    for s in bm.mesh.info.services.iter().filter(|s| s.role == "decoder") {
        let text = scrape(s.metrics).await?;
        out.push(sum(
            &text,
            "vlm_rpc_server_requests_total",
            "method=\"Generate\"",
        ));
    }
    Ok(out)
}

async fn gateway_sum(bm: &BenchMesh, name: &str) -> anyhow::Result<f64> {
    stage_sum(bm, "gateway", name).await
}

/// The sum of `name`'s samples over every replica of `role`.
async fn stage_sum(bm: &BenchMesh, role: &str, name: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for s in bm.mesh.info.services.iter().filter(|s| s.role == role) {
        total += sum(&scrape(s.metrics).await?, name, "");
    }
    Ok(total)
}

/// The sum of the samples of `name` whose labels contain `label`.
fn sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
                && l.contains(label)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A service's Prometheus text (plain HTTP on loopback).
async fn scrape(addr: Option<std::net::SocketAddr>) -> anyhow::Result<String> {
    let addr = addr.ok_or_else(|| anyhow::anyhow!("a service without a metrics port"))?;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body)).await??;
    Ok(body)
}
