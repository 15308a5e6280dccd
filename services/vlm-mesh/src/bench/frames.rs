//! Frame streams: a synthetic clip (one shape moving across a still background, with stretches
//! of still frames) fed to the gateway's Watch stream, side by side with the naive way (every
//! frame encoded, every question a fresh request), frame by frame in one run: encoder seconds,
//! answer latency, and whether the answers agree.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vlm_frames::synthetic::{clip_frame, ClipSpec};
use vlm_proto::encode_response::Kind as EncodeKind;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::generate_response::Kind as GenerateKind;
use vlm_proto::watch_answer::Kind as AnswerKind;
use vlm_proto::watch_request::Kind as RequestKind;
use vlm_proto::watch_response::Kind as ResponseKind;
use vlm_proto::{
    EncodeRequest, FrameEncode, GenerateRequest, SamplingParams, WatchFrame, WatchQuestion,
    WatchRequest, WatchResponse,
};

use super::{print_ratio, print_rows, BenchMesh, Spread};

const PROMPT: &str = "USER: <image>\nWhere is the circle? ASSISTANT:";

#[derive(Args, Debug, Clone)]
pub struct FramesBenchArgs {
    /// Checkpoint to serve (the demo model knows where the clip's circle is).
    #[arg(long, env = "VLM_MODEL", default_value = crate::bundled::BUNDLED_MODEL)]
    pub model: std::path::PathBuf,
    /// Frames of the clip.
    #[arg(long, default_value_t = 300)]
    pub frames: usize,
    /// Still frames between two moves of the shape (a camera watching a scene where something
    /// moves now and then). Encoder seconds saved are bounded by frames / frames that changed.
    #[arg(long, default_value_t = 48)]
    pub still: usize,
    /// Frames the shape takes to move to the next cell.
    #[arg(long, default_value_t = 8)]
    pub moving: usize,
    /// Ask after every N-th frame.
    #[arg(long, default_value_t = 10)]
    pub every: usize,
    /// Tokens per answer (greedy).
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    /// Smoke run: 40 frames.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object (the report) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize, Debug)]
pub struct FramesReport {
    bench: &'static str,
    model: String,
    frames: usize,
    /// The clip: still frames between moves, frames per move.
    still: usize,
    moving: usize,
    questions: usize,
    /// Watch: frames reused (no encoder call), partially and fully encoded.
    reused: usize,
    partial: usize,
    full: usize,
    /// Encoder time (measured inside the encoder) over the clip.
    watch_encoder_s: f64,
    naive_encoder_s: f64,
    /// naive / watch.
    encoder_seconds_saved_ratio: f64,
    /// Per frame, watch (0 for reused frames) and naive.
    watch_encode_ms: Spread,
    naive_encode_ms: Spread,
    /// From sending the question to the last answer message.
    watch_answer_ms: Spread,
    naive_answer_ms: Spread,
    /// Questions asked on reused frames, and how many of their answers equal the naive path's.
    asked_on_reused: usize,
    identical_on_reused: usize,
    /// Answers equal to the naive path's, over all questions.
    identical: usize,
}

impl FramesReport {
    pub fn print(&self) {
        println!(
            "{} frames (still {} / moving {}): {} reused, {} partial, {} full; {} questions; model {}",
            self.frames,
            self.still,
            self.moving,
            self.reused,
            self.partial,
            self.full,
            self.questions,
            self.model
        );
        print_rows(
            "ms",
            &[
                ("encode per frame: watch".into(), self.watch_encode_ms),
                (
                    "encode per frame: naive (every frame)".into(),
                    self.naive_encode_ms,
                ),
                ("answer latency: watch".into(), self.watch_answer_ms),
                (
                    "answer latency: naive (fresh request)".into(),
                    self.naive_answer_ms,
                ),
            ],
        );
        println!(
            "encoder seconds: watch {:.3} s, naive {:.3} s",
            self.watch_encoder_s, self.naive_encoder_s
        );
        print_ratio(
            "encoder seconds naive / watch",
            self.encoder_seconds_saved_ratio,
        );
        print_ratio(
            "answer p50 watch / naive",
            self.watch_answer_ms.p50 / self.naive_answer_ms.p50,
        );
        println!(
            "answers identical to naive: {}/{} (on reused frames: {}/{})",
            self.identical, self.questions, self.identical_on_reused, self.asked_on_reused
        );
    }
}

/// The Watch side: one stream, fed one frame at a time.
struct Stream {
    tx: mpsc::Sender<WatchRequest>,
    rx: tonic::Streaming<WatchResponse>,
}

impl Stream {
    async fn send(&self, kind: RequestKind) -> anyhow::Result<()> {
        let msg = WatchRequest { kind: Some(kind) };
        self.tx
            .send(msg)
            .await
            .ok()
            .context("the Watch stream ended")
    }

    async fn next(&mut self) -> anyhow::Result<ResponseKind> {
        let msg = self.rx.message().await?.context("the Watch stream ended")?;
        msg.kind.context("an empty Watch message")
    }

    /// Feeds one frame; its encoding and encoder time.
    async fn frame(&mut self, data: Vec<u8>) -> anyhow::Result<(FrameEncode, f64)> {
        let frame = WatchFrame {
            data: data.into(),
            timestamp: 0,
        };
        self.send(RequestKind::Frame(frame)).await?;
        match self.next().await? {
            ResponseKind::Frame(e) => Ok((e.encode(), e.encode_ms)),
            other => anyhow::bail!("expected a frame event, got {other:?}"),
        }
    }

    /// Asks about the latest frame; the answer's token ids.
    async fn ask(&mut self, id: String, max_tokens: u32) -> anyhow::Result<Vec<u32>> {
        let q = WatchQuestion {
            id,
            prompt: PROMPT.into(),
            params: Some(params(max_tokens)),
            last_frames: 1,
            dynamic_roi: false,
            question: String::new(),
        };
        self.send(RequestKind::Question(q)).await?;
        let mut ids = Vec::new();
        loop {
            let ResponseKind::Answer(a) = self.next().await? else {
                anyhow::bail!("a frame event while a question was pending");
            };
            match a.kind {
                Some(AnswerKind::Delta(d)) => ids.extend(d.token_ids),
                Some(AnswerKind::Final(_)) => return Ok(ids),
                Some(AnswerKind::Error(e)) => anyhow::bail!("question failed: {}", e.message),
                None => {}
            }
        }
    }
}

fn params(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(max_tokens),
        seed: Some(0),
        ..Default::default()
    }
}

pub async fn run(args: &FramesBenchArgs) -> anyhow::Result<FramesReport> {
    let spec = ClipSpec {
        frames: if args.quick { 40 } else { args.frames },
        still: args.still.max(1),
        moving: args.moving.max(1),
        ..ClipSpec::default()
    };
    // The naive side's questions must encode afresh: no shared feature cache.
    let bench = BenchMesh::start(&args.model, vec!["--no-cache".into()]).await?;
    let result = measure(&bench, &spec, args).await;
    bench.mesh.shutdown().await;
    result
}

/// Per-frame measurements of both sides.
#[derive(Default)]
struct Tally {
    watch_ms: Vec<f64>,
    naive_ms: Vec<f64>,
    watch_answer_ms: Vec<f64>,
    naive_answer_ms: Vec<f64>,
    counts: [usize; 3],
    asked_on_reused: usize,
    identical_on_reused: usize,
    identical: usize,
}

async fn measure(
    bench: &BenchMesh,
    spec: &ClipSpec,
    args: &FramesBenchArgs,
) -> anyhow::Result<FramesReport> {
    let mut encoder = bench.encoder().await?;
    let mut gateway = bench.gateway.clone();
    let (tx, rx) = mpsc::channel(4);
    let rx = gateway.watch(ReceiverStream::new(rx)).await?.into_inner();
    let mut stream = Stream { tx, rx };
    let mut t = Tally::default();
    let every = args.every.max(1);
    for i in 0..spec.frames {
        let (png, _) = clip_frame(spec, i);
        let (encode, ms) = stream.frame(png.clone()).await?;
        match encode {
            FrameEncode::Reused => t.counts[0] += 1,
            FrameEncode::Partial => t.counts[1] += 1,
            FrameEncode::Full => t.counts[2] += 1,
            other => anyhow::bail!("frame {i}: {other:?}"),
        }
        t.watch_ms.push(ms);
        t.naive_ms.push(naive_encode(&mut encoder, &png).await?);
        if (i + 1) % every == 0 {
            let started = Instant::now();
            let ids = stream.ask(format!("q{i}"), args.max_tokens).await?;
            t.watch_answer_ms
                .push(started.elapsed().as_secs_f64() * 1e3);
            let started = Instant::now();
            let naive = naive_answer(&mut gateway, &png, args.max_tokens).await?;
            t.naive_answer_ms
                .push(started.elapsed().as_secs_f64() * 1e3);
            let same = ids == naive;
            t.identical += same as usize;
            if encode == FrameEncode::Reused {
                t.asked_on_reused += 1;
                t.identical_on_reused += same as usize;
            }
        }
    }
    let watch_s: f64 = t.watch_ms.iter().sum::<f64>() / 1e3;
    let naive_s: f64 = t.naive_ms.iter().sum::<f64>() / 1e3;
    Ok(FramesReport {
        bench: "frames",
        model: args.model.display().to_string(),
        frames: spec.frames,
        still: spec.still,
        moving: spec.moving,
        questions: t.watch_answer_ms.len(),
        reused: t.counts[0],
        partial: t.counts[1],
        full: t.counts[2],
        watch_encoder_s: watch_s,
        naive_encoder_s: naive_s,
        encoder_seconds_saved_ratio: naive_s / watch_s.max(1e-9),
        watch_encode_ms: Spread::of(&mut t.watch_ms)?,
        naive_encode_ms: Spread::of(&mut t.naive_ms)?,
        watch_answer_ms: Spread::of(&mut t.watch_answer_ms)?,
        naive_answer_ms: Spread::of(&mut t.naive_answer_ms)?,
        asked_on_reused: t.asked_on_reused,
        identical_on_reused: t.identical_on_reused,
        identical: t.identical,
    })
}

/// The naive way to follow a stream: the encoder runs on every frame. Its own encode time.
async fn naive_encode(
    encoder: &mut EncoderClient<tonic::transport::Channel>,
    png: &[u8],
) -> anyhow::Result<f64> {
    let req = EncodeRequest {
        image: png.to_vec().into(),
        ..Default::default()
    };
    let mut stream = encoder.encode(req).await?.into_inner();
    let mut ms = None;
    while let Some(msg) = stream.message().await? {
        if let Some(EncodeKind::Stats(s)) = msg.kind {
            ms = Some(s.encode_ms);
        }
    }
    ms.context("the encoder sent no stats")
}

/// The naive way to ask: a fresh Generate request with the frame.
async fn naive_answer(
    gateway: &mut vlm_proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    png: &[u8],
    max_tokens: u32,
) -> anyhow::Result<Vec<u32>> {
    let req = GenerateRequest {
        images: vec![png.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(params(max_tokens)),
        ..Default::default()
    };
    let mut stream = gateway.generate(req).await?.into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = stream.message().await? {
        if let Some(GenerateKind::Delta(d)) = msg.kind {
            ids.extend(d.token_ids);
        }
    }
    Ok(ids)
}
