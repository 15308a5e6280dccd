//! Concurrency: does the decoder serve N requests at once faster than one at a time, and what does
//! a long shared prompt prefix cost the second time? Through one real mesh (`up`, cache off),
//! greedy decoding, a fixed `max_tokens`.
//!
//! **Throughput.** For each level N, every round sends N requests at once and, interleaved with
//! that (alternating which goes first), N requests one after another. Every request has its own
//! prompt (a request number at its very start), so no prefix is shared between them. For a set of
//! streams, with *first_i* / *last_i* the arrival times of stream i's first and last token:
//!
//! * **aggregate decode tokens/s** = Σ_i (tokens_i − 1) / |∪_i [first_i, last_i]|: the tokens
//!   after each stream's first one (the first token is the prefill's; its time is the TTFT) over
//!   the wall time during which at least one stream was decoding. At once that is (nearly)
//!   `max last_i − min first_i`; one at a time it is Σ (last_i − first_i), i.e. the gaps in which
//!   the next request is being encoded and prefilled count for neither. At N = 1 both phases
//!   measure the same thing, so their ratio is ~1.
//! * **inter-token latency**: every gap between consecutive token-carrying deltas of one stream,
//!   pooled over all streams and rounds, counted per token: a delta with k tokens arriving dt after
//!   the previous one adds k samples of dt / k. The baseline ("alone") is the one-at-a-time phase
//!   of the same level: each of those requests had the mesh to itself.
//!
//! **Prefix reuse.** A prompt of about `--prefix-tokens` text tokens (its length measured from the
//! responses' `usage.prompt_tokens`, minus the image's rows) with the image after it. Every round
//! uses a new prompt whose very start differs (so nothing is shared with earlier rounds), sends it
//! once (cold) and then again, identical (warm); TTFT and `usage.cached_prompt_tokens` of both are
//! reported.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{CacheStatus, GenerateRequest, GetModelInfoRequest};

use super::plot::{LineChart, Series};
use super::{cores, print_ratio, print_rows, BenchMesh, Input, Spread};

type Client = GatewayClient<tonic::transport::Channel>;

/// Concurrency levels measured by default.
pub const DEFAULT_LEVELS: [usize; 5] = [1, 2, 4, 8, 16];

#[derive(Args, Debug)]
pub struct ConcurrencyBenchArgs {
    #[command(flatten)]
    pub input: Input,
    /// Requests in flight to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_LEVELS)]
    pub levels: Vec<usize>,
    /// Rounds: each runs every level at once and one at a time (interleaved), and one cold/warm
    /// pair of the prefix measurement.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Tokens to generate per request (greedy).
    #[arg(long, default_value_t = 32)]
    pub max_tokens: u32,
    /// Text tokens of the prompt in the prefix-reuse measurement (the image's rows come on top).
    #[arg(long, default_value_t = 1000)]
    pub prefix_tokens: u32,
    /// Write an SVG plot of aggregate tokens/s against concurrency to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Smoke run: 1 round, levels 1 and 2, 4 tokens, a 100-token prefix (for CI; its times mean
    /// little).
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
        self.max_tokens = 4;
        self.prefix_tokens = 100;
    }
}

#[derive(serde::Serialize, Debug)]
pub struct ConcurrencyReport {
    bench: &'static str,
    model: String,
    /// The mesh's feature cache (always off here: each request runs the encoder).
    cache: &'static str,
    cores: usize,
    rounds: usize,
    max_tokens: u32,
    /// `VLM_MAX_CONCURRENT` as the services inherited it (the decoder's limit on sequences
    /// decoded at once); null: the decoder's default.
    decoder_max_concurrent: Option<usize>,
    levels: Vec<LevelRow>,
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
    /// Aggregate decode tokens/s (see the module doc), one sample per round.
    at_once_tok_per_s: Spread,
    one_at_a_time_tok_per_s: Spread,
    /// At once p50 / one at a time p50.
    at_once_over_one_at_a_time_p50: f64,
    /// Inter-token latency of every token of every stream.
    itl_at_once_ms: Spread,
    /// The same for requests sent one at a time (each alone on the mesh).
    itl_alone_ms: Spread,
    /// At once p50 / alone p50.
    itl_at_once_over_alone_p50: f64,
    /// Time to first token of the requests sent at once, and alone.
    ttft_at_once_ms: Spread,
    ttft_alone_ms: Spread,
}

/// Time to first token with a long prompt, sent cold and then again (warm).
#[derive(serde::Serialize, Debug)]
struct PrefixReport {
    /// Text tokens asked for (`--prefix-tokens`)…
    prefix_tokens_asked: u32,
    /// …and aimed at: the same, or less where the model's context is too short for it (with the
    /// image's rows and the answer).
    prefix_tokens: u32,
    /// `usage.prompt_tokens` of the measured requests (text and image rows), smallest and largest.
    prompt_tokens_min: u32,
    prompt_tokens_max: u32,
    /// Rows one image expands to in the prompt (from GetModelInfo).
    image_tokens: u32,
    /// The model's context length (from GetModelInfo).
    context_length: u32,
    /// Cold/warm pairs measured.
    rounds: usize,
    ttft_cold_ms: Spread,
    ttft_warm_ms: Spread,
    /// Warm p50 / cold p50.
    warm_over_cold_p50: f64,
    /// The decoder's own prefill time, as the final message's timings report it.
    prefill_cold_ms: Spread,
    prefill_warm_ms: Spread,
    /// `usage.cached_prompt_tokens` of each round's cold and warm request.
    cached_prompt_tokens_cold: Vec<u32>,
    cached_prompt_tokens_warm: Vec<u32>,
}

impl ConcurrencyReport {
    pub fn print(&self) {
        let limit = self
            .decoder_max_concurrent
            .map_or("default".to_string(), |n| n.to_string());
        println!(
            "model: {}  cores: {}  rounds: {} (interleaved)  max tokens: {}  decoder --max-concurrent: {}",
            self.model, self.cores, self.rounds, self.max_tokens, limit
        );
        println!(
            "{:>9} {:>12} {:>12} {:>8} {:>11} {:>11} {:>8} {:>11} {:>11}",
            "in flight",
            "tok/s at",
            "tok/s 1",
            "ratio",
            "ITL ms at",
            "ITL ms",
            "ratio",
            "TTFT ms at",
            "TTFT ms"
        );
        println!(
            "{:>9} {:>12} {:>12} {:>8} {:>11} {:>11} {:>8} {:>11} {:>11}",
            "", "once", "at a time", "", "once", "alone", "", "once", "alone"
        );
        for l in &self.levels {
            println!(
                "{:>9} {:>12.1} {:>12.1} {:>8.3} {:>11.2} {:>11.2} {:>8.3} {:>11.2} {:>11.2}",
                l.concurrency,
                l.at_once_tok_per_s.p50,
                l.one_at_a_time_tok_per_s.p50,
                l.at_once_over_one_at_a_time_p50,
                l.itl_at_once_ms.p50,
                l.itl_alone_ms.p50,
                l.itl_at_once_over_alone_p50,
                l.ttft_at_once_ms.p50,
                l.ttft_alone_ms.p50,
            );
        }
        println!("(p50s; tokens/s: decode tokens after each stream's first over the time any stream was decoding)");
        let p = &self.prefix;
        println!(
            "\nprefix reuse: {} text tokens ({} asked), prompt_tokens {}..{} (image {} rows, context {}), {} cold/warm pairs",
            p.prefix_tokens,
            p.prefix_tokens_asked,
            p.prompt_tokens_min,
            p.prompt_tokens_max,
            p.image_tokens,
            p.context_length,
            p.rounds
        );
        print_rows(
            "ms",
            &[
                ("TTFT, cold (new prompt)".to_string(), p.ttft_cold_ms),
                ("TTFT, warm (same prompt again)".to_string(), p.ttft_warm_ms),
                ("decoder prefill, cold".to_string(), p.prefill_cold_ms),
                ("decoder prefill, warm".to_string(), p.prefill_warm_ms),
            ],
        );
        print_ratio("TTFT warm / cold (p50)", p.warm_over_cold_p50);
        println!(
            "{:<44} cold {:?}  warm {:?}",
            "cached_prompt_tokens", p.cached_prompt_tokens_cold, p.cached_prompt_tokens_warm
        );
        if let Some(plot) = &self.plot {
            println!("plot: {plot}");
        }
    }

    fn plot(&self) -> String {
        let xs: Vec<f64> = self.levels.iter().map(|l| l.concurrency as f64).collect();
        let at_once: Vec<f64> = self
            .levels
            .iter()
            .map(|l| l.at_once_tok_per_s.p50)
            .collect();
        let one: Vec<f64> = self
            .levels
            .iter()
            .map(|l| l.one_at_a_time_tok_per_s.p50)
            .collect();
        let title = format!(
            "Aggregate decode tokens/s vs concurrency ({}, {} tokens/request, p50 of {} rounds)",
            std::path::Path::new(&self.model)
                .file_name()
                .map_or(self.model.clone(), |n| n.to_string_lossy().into_owned()),
            self.max_tokens,
            self.rounds
        );
        LineChart {
            title: &title,
            x_label: "requests (concurrency N)",
            y_label: "aggregate decode tokens/s",
            xs: &xs,
            log2_x: true,
            series: &[
                Series {
                    label: "N at once",
                    color: "#1f77b4",
                    ys: &at_once,
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

/// One streamed request, timed against a phase's clock (seconds).
struct Stream {
    sent: f64,
    /// Arrival time and token count of every delta that carries tokens.
    arrivals: Vec<(f64, usize)>,
    /// When the final message arrived.
    done: f64,
    usage: vlm_proto::Usage,
    prefill_ms: f64,
}

impl Stream {
    fn tokens(&self) -> usize {
        self.arrivals.iter().map(|a| a.1).sum()
    }

    /// Seconds to the first token; a stream that produced none (end-of-sequence first) counts
    /// its end, when prefill was over too.
    fn ttft(&self) -> f64 {
        self.arrivals.first().map_or(self.done, |a| a.0) - self.sent
    }

    /// [first token, last token], if there was a token.
    fn decoding(&self) -> Option<(f64, f64)> {
        Some((self.arrivals.first()?.0, self.arrivals.last()?.0))
    }

    /// Per-token gaps in ms (see the module doc).
    fn gaps_ms(&self, out: &mut Vec<f64>) {
        for w in self.arrivals.windows(2) {
            let (dt, k) = (w[1].0 - w[0].0, w[1].1);
            out.extend(std::iter::repeat_n(dt * 1e3 / k as f64, k));
        }
    }
}

async fn generate(
    mut client: Client,
    image: Vec<u8>,
    prompt: String,
    max_tokens: u32,
    clock: Instant,
) -> anyhow::Result<Stream> {
    let req = GenerateRequest {
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
    };
    let sent = clock.elapsed().as_secs_f64();
    let mut stream = client.generate(req).await?.into_inner();
    let mut arrivals = Vec::new();
    let mut fin = None;
    while let Some(msg) = stream.message().await? {
        let now = clock.elapsed().as_secs_f64();
        match msg.kind {
            Some(Kind::Delta(d)) if !d.token_ids.is_empty() => {
                arrivals.push((now, d.token_ids.len()))
            }
            Some(Kind::Final(f)) => fin = Some((now, f)),
            _ => {}
        }
    }
    let (done, f) = fin.context("the stream ended without a final message")?;
    let timings = f.timings.unwrap_or_default();
    let cache: Vec<CacheStatus> = timings.cache().collect();
    // Every request must run the encoder: a cached feature would make later requests cheaper.
    anyhow::ensure!(
        !cache.is_empty() && cache.iter().all(|c| *c == CacheStatus::Off),
        "the mesh reported cache statuses {cache:?}; this benchmark needs the cache off"
    );
    Ok(Stream {
        sent,
        arrivals,
        done,
        usage: f.usage.context("the final message has no usage")?,
        prefill_ms: timings.prefill_ms,
    })
}

/// The short prompt of request `n`: the number comes first, so no two requests share more than
/// a token or two of prefix.
fn short_prompt(n: usize) -> String {
    format!("Request {n}. USER: <image>\nWhat is shown in this image? ASSISTANT:")
}

/// Length of the union of intervals.
fn union_len(mut spans: Vec<(f64, f64)>) -> f64 {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut cur: Option<(f64, f64)> = None;
    for (a, b) in spans {
        match cur {
            Some((ca, cb)) if a <= cb => cur = Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total += cb - ca;
                cur = Some((a, b));
            }
            None => cur = Some((a, b)),
        }
    }
    total + cur.map_or(0.0, |(a, b)| b - a)
}

/// Samples of one phase (at once, or one at a time) of one level, over all rounds.
#[derive(Default)]
struct Phase {
    tok_per_s: Vec<f64>,
    itl_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
    tokens: u64,
}

impl Phase {
    fn add(&mut self, streams: &[Stream]) -> anyhow::Result<()> {
        let decode_tokens: usize = streams.iter().map(|s| s.tokens().saturating_sub(1)).sum();
        let busy = union_len(streams.iter().filter_map(Stream::decoding).collect());
        anyhow::ensure!(
            decode_tokens > 0 && busy > 0.0,
            "no stream produced a second token (every answer ended at once); \
             this measurement needs --max-tokens ≥ 2 and answers that do not end at the first token"
        );
        self.tok_per_s.push(decode_tokens as f64 / busy);
        for s in streams {
            s.gaps_ms(&mut self.itl_ms);
            self.ttft_ms.push(s.ttft() * 1e3);
            self.tokens += s.tokens() as u64;
        }
        Ok(())
    }
}

/// The part of the report the throughput rounds produce, per level.
fn level_row(n: usize, at_once: &mut Phase, alone: &mut Phase) -> anyhow::Result<LevelRow> {
    let what = |p: &str| format!("concurrency {n}, {p}");
    let a_tps = Spread::of(&mut at_once.tok_per_s).with_context(|| what("tokens/s at once"))?;
    let s_tps = Spread::of(&mut alone.tok_per_s).with_context(|| what("tokens/s one at a time"))?;
    let a_itl = Spread::of(&mut at_once.itl_ms).with_context(|| what("ITL at once"))?;
    let s_itl = Spread::of(&mut alone.itl_ms).with_context(|| what("ITL alone"))?;
    Ok(LevelRow {
        concurrency: n,
        completion_tokens_at_once: at_once.tokens,
        completion_tokens_one_at_a_time: alone.tokens,
        at_once_over_one_at_a_time_p50: a_tps.p50 / s_tps.p50,
        at_once_tok_per_s: a_tps,
        one_at_a_time_tok_per_s: s_tps,
        itl_at_once_over_alone_p50: a_itl.p50 / s_itl.p50,
        itl_at_once_ms: a_itl,
        itl_alone_ms: s_itl,
        ttft_at_once_ms: Spread::of(&mut at_once.ttft_ms)?,
        ttft_alone_ms: Spread::of(&mut alone.ttft_ms)?,
    })
}

/// Words the long prompt is made of (cycled), ordinary English so a byte-level BPE tokenizer
/// splits it as it would real text.
const FILLER: &str = "The museum keeps a careful record of every painting, sculpture and drawing \
    it holds, noting where each piece came from, who restored it and when, which rooms it has hung \
    in, how the light falls on it through the seasons, and what visitors most often ask about it. \
    Guides read these notes before each tour so that their answers stay accurate and consistent.";

/// The long prompt: a per-round marker at the very start, `words` filler words, then the image
/// and the question.
fn long_prompt(marker: usize, words: usize) -> String {
    let filler: Vec<&str> = FILLER.split_whitespace().cycle().take(words).collect();
    format!(
        "Session {marker}. {}\nUSER: <image>\nWhat is shown in this image? ASSISTANT:",
        filler.join(" ")
    )
}

/// Text tokens (usage.prompt_tokens minus the image's rows) of [`long_prompt`] with `words` words.
async fn text_tokens(
    client: &Client,
    image: &[u8],
    marker: usize,
    words: usize,
    image_tokens: u32,
) -> anyhow::Result<i64> {
    let s = generate(
        client.clone(),
        image.to_vec(),
        long_prompt(marker, words),
        1,
        Instant::now(),
    )
    .await?;
    Ok(s.usage.prompt_tokens as i64 - image_tokens as i64)
}

/// The number of filler words whose prompt has about `target` text tokens, found by asking the
/// mesh (each probe with its own marker, so probes warm nothing the measurement uses).
async fn calibrate(
    client: &Client,
    image: &[u8],
    target: u32,
    image_tokens: u32,
    marker: &mut usize,
) -> anyhow::Result<usize> {
    let target = target as i64;
    let mut probe = |words: usize| {
        *marker += 1;
        text_tokens(client, image, *marker, words, image_tokens)
    };
    let base = probe(0).await?;
    anyhow::ensure!(
        base < target,
        "--prefix-tokens {target} is below the {base} tokens the prompt has without filler"
    );
    let (mut words, mut got) = (16usize, probe(16).await?);
    let tolerance = (target / 50).max(2);
    for _ in 0..6 {
        if (got - target).abs() <= tolerance {
            break;
        }
        let per_word = (got - base).max(1) as f64 / words as f64;
        words = (((target - base) as f64 / per_word).round() as usize).max(1);
        got = probe(words).await?;
    }
    Ok(words)
}

async fn prefix_bench(
    client: &Client,
    image: &[u8],
    args: &ConcurrencyBenchArgs,
) -> anyhow::Result<PrefixReport> {
    let info = client
        .clone()
        .get_model_info(GetModelInfoRequest {})
        .await?
        .into_inner();
    // Room for the text, the image rows and the answer (2 tokens here), plus a little slack for
    // the marker's length varying with the round number.
    let fits = info
        .context_length
        .saturating_sub(info.image_tokens + 2 + 8);
    anyhow::ensure!(
        fits >= 50,
        "the model's context ({} tokens) leaves no room for a long prompt beside an image of {} rows",
        info.context_length,
        info.image_tokens
    );
    let target = args.prefix_tokens.min(fits);
    if target < args.prefix_tokens {
        eprintln!(
            "warning: --prefix-tokens {} does not fit the model's context of {} tokens with the \
             image's {} rows; measuring {target} instead",
            args.prefix_tokens, info.context_length, info.image_tokens
        );
    }
    // Markers well away from the throughput requests' numbers.
    let mut marker = 1_000_000;
    let words = calibrate(client, image, target, info.image_tokens, &mut marker).await?;
    let (mut cold, mut warm, mut pre_cold, mut pre_warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut cached_cold, mut cached_warm, mut prompt_tokens) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        marker += 1;
        let prompt = long_prompt(marker, words);
        // Only the first token matters here; 2 so that an answer is more than its prefill.
        let clock = Instant::now();
        let c = generate(client.clone(), image.to_vec(), prompt.clone(), 2, clock).await?;
        let w = generate(client.clone(), image.to_vec(), prompt, 2, clock).await?;
        anyhow::ensure!(
            c.usage.prompt_tokens == w.usage.prompt_tokens,
            "the same prompt counted {} and then {} tokens",
            c.usage.prompt_tokens,
            w.usage.prompt_tokens
        );
        cold.push(c.ttft() * 1e3);
        warm.push(w.ttft() * 1e3);
        pre_cold.push(c.prefill_ms);
        pre_warm.push(w.prefill_ms);
        cached_cold.push(c.usage.cached_prompt_tokens);
        cached_warm.push(w.usage.cached_prompt_tokens);
        prompt_tokens.push(c.usage.prompt_tokens);
    }
    let (ttft_cold_ms, ttft_warm_ms) = (Spread::of(&mut cold)?, Spread::of(&mut warm)?);
    Ok(PrefixReport {
        prefix_tokens_asked: args.prefix_tokens,
        prefix_tokens: target,
        prompt_tokens_min: prompt_tokens.iter().copied().min().unwrap_or(0),
        prompt_tokens_max: prompt_tokens.iter().copied().max().unwrap_or(0),
        image_tokens: info.image_tokens,
        context_length: info.context_length,
        rounds: args.rounds,
        warm_over_cold_p50: ttft_warm_ms.p50 / ttft_cold_ms.p50,
        ttft_cold_ms,
        ttft_warm_ms,
        prefill_cold_ms: Spread::of(&mut pre_cold)?,
        prefill_warm_ms: Spread::of(&mut pre_warm)?,
        cached_prompt_tokens_cold: cached_cold,
        cached_prompt_tokens_warm: cached_warm,
    })
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
    let mut levels = args.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    let image = std::fs::read(&args.input.image)
        .with_context(|| format!("cannot read {}", args.input.image.display()))?;

    // Cache off: every request pays for the encoder, at once as one at a time.
    let bench_mesh = BenchMesh::start(&args.input.model, vec!["--no-cache".into()]).await?;
    let result = async {
        let client = bench_mesh.gateway.clone();
        // Warm-up: connections, allocator, lazily loaded weights.
        generate(
            client.clone(),
            image.clone(),
            short_prompt(0),
            args.max_tokens,
            Instant::now(),
        )
        .await?;
        let mut phases: Vec<(Phase, Phase)> = levels.iter().map(|_| Default::default()).collect();
        let mut next = 1;
        for round in 0..args.rounds {
            for (li, &n) in levels.iter().enumerate() {
                let (at_once, alone) = &mut phases[li];
                // Alternate which phase goes first, across rounds and levels.
                let first = (round + li) % 2;
                for phase in [first, 1 - first] {
                    let clock = Instant::now();
                    let mut streams = Vec::with_capacity(n);
                    if phase == 0 {
                        let calls = (next..next + n).map(|i| {
                            generate(
                                client.clone(),
                                image.clone(),
                                short_prompt(i),
                                args.max_tokens,
                                clock,
                            )
                        });
                        for s in futures::future::join_all(calls).await {
                            streams.push(s?);
                        }
                        at_once.add(&streams)?;
                    } else {
                        for i in next..next + n {
                            streams.push(
                                generate(
                                    client.clone(),
                                    image.clone(),
                                    short_prompt(i),
                                    args.max_tokens,
                                    clock,
                                )
                                .await?,
                            );
                        }
                        alone.add(&streams)?;
                    }
                    next += n;
                }
            }
        }
        let mut rows = Vec::new();
        for (&n, (at_once, alone)) in levels.iter().zip(&mut phases) {
            rows.push(level_row(n, at_once, alone)?);
        }
        let prefix = prefix_bench(&client, &image, args).await?;
        Ok::<_, anyhow::Error>((rows, prefix))
    }
    .await;
    bench_mesh.mesh.shutdown().await;
    let (rows, prefix) = result?;
    let mut report = ConcurrencyReport {
        bench: "concurrency",
        model: args.input.model.display().to_string(),
        cache: "off",
        cores: cores(),
        rounds: args.rounds,
        max_tokens: args.max_tokens,
        decoder_max_concurrent: std::env::var("VLM_MAX_CONCURRENT")
            .ok()
            .and_then(|v| v.trim().parse().ok()),
        levels: rows,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(arrivals: &[(f64, usize)]) -> Stream {
        Stream {
            sent: 0.0,
            arrivals: arrivals.to_vec(),
            done: 10.0,
            usage: Default::default(),
            prefill_ms: 0.0,
        }
    }

    #[test]
    fn union_of_spans() {
        assert_eq!(union_len(vec![]), 0.0);
        assert_eq!(union_len(vec![(0.0, 1.0), (2.0, 3.0)]), 2.0);
        assert_eq!(union_len(vec![(2.0, 4.0), (0.0, 3.0), (5.0, 5.5)]), 4.5);
    }

    #[test]
    fn gaps_count_tokens_not_messages() {
        let s = stream(&[(1.0, 1), (1.5, 1), (2.5, 2)]);
        let mut gaps = Vec::new();
        s.gaps_ms(&mut gaps);
        assert_eq!(gaps, [500.0, 500.0, 500.0]);
        assert_eq!(s.tokens(), 4);
        assert_eq!(s.ttft(), 1.0);
    }

    #[test]
    fn throughput_is_decode_tokens_over_busy_time() {
        // Two streams one after the other: 3 + 1 decode tokens over 1 + 1 s busy.
        let mut p = Phase::default();
        p.add(&[
            stream(&[(0.0, 1), (0.5, 1), (1.0, 2)]),
            stream(&[(3.0, 1), (4.0, 1)]),
        ])
        .unwrap();
        assert_eq!(p.tok_per_s, [2.0]);
        assert_eq!(p.tokens, 6);
        // A phase in which no stream got past its first token cannot be measured.
        assert!(Phase::default().add(&[stream(&[(1.0, 1)])]).is_err());
    }

    #[test]
    fn long_prompt_grows_with_words_and_differs_at_its_start() {
        let (a, b) = (long_prompt(1, 10), long_prompt(2, 10));
        assert_ne!(a.split_whitespace().nth(1), b.split_whitespace().nth(1));
        assert!(long_prompt(1, 500).len() > long_prompt(1, 100).len() * 4);
        assert!(a.contains("<image>") && a.ends_with("ASSISTANT:"));
    }
}
