//! `vlm-mesh watch`: feeds a frame sequence to the gateway's Watch stream at a given rate, asks a
//! question every N frames, and prints the answers as they come (`--json`: one object per line
//! for every frame and every answer).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::watch_answer::Kind as AnswerKind;
use vlm_proto::watch_request::Kind as RequestKind;
use vlm_proto::watch_response::Kind as ResponseKind;
use vlm_proto::{FrameEncode, FrameEvent, WatchAnswer, WatchFrame, WatchQuestion, WatchRequest};

use crate::ask::{connect, status_error, GatewayConn};
use crate::generate::SamplingArgs;

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    #[command(flatten)]
    pub conn: GatewayConn,
    /// The frames: a folder (its PNG, JPEG and WebP files in file-name order), a pattern with
    /// `*`/`?` in the file name (`clip/frame-*.png`, matches in file-name order) or a numbered
    /// sequence (`clip/frame-%04d.png`, from the first of 0..4 that exists until one is missing).
    #[arg(long, env = "VLM_FRAMES")]
    pub frames: String,
    /// The question in plain text, asked after every --every-th frame; the gateway renders it
    /// with the model's chat template, one image placeholder per frame asked about (see
    /// --last-frames). Give this or --ask.
    #[arg(long, env = "VLM_QUESTION", required_unless_present = "ask")]
    pub question: Option<String>,
    /// A raw prompt instead of --question, sent as it is (in the model's chat format; the frames
    /// asked about are put in front of it as `<image>` lines unless it places `<image>` itself).
    /// Without the chat template's turn markers it gets a warning on stderr.
    #[arg(long, env = "VLM_ASK", conflicts_with = "question")]
    pub ask: Option<String>,
    /// Ask after every N-th frame; 0: once, after the last frame.
    #[arg(long, env = "VLM_EVERY", default_value_t = 0)]
    pub every: usize,
    /// Frames per second to feed (0: as fast as the stream takes them).
    #[arg(long, env = "VLM_FPS", default_value_t = 10.0)]
    pub fps: f64,
    /// Wait for each frame to be handled, and for each answer, before feeding on: nothing is
    /// dropped and answers are reproducible.
    #[arg(long, env = "VLM_SYNC")]
    pub sync: bool,
    /// Each question looks at the last N frames (default: the latest).
    #[arg(long, env = "VLM_LAST_FRAMES", default_value_t = 1)]
    pub last_frames: u32,
    /// Also look closer at where the picture last changed (the motion box, added as a region).
    #[arg(long, env = "VLM_DYNAMIC_ROI")]
    pub dynamic_roi: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Give up after this many seconds in all (sent to the gateway as the stream's deadline).
    #[arg(long, env = "VLM_TIMEOUT", default_value_t = 3600)]
    pub timeout: u64,
    /// Print one JSON object per line for every frame and every answer.
    #[arg(long, env = "VLM_JSON")]
    pub json: bool,
}

/// What the reader has seen so far, for a --sync feeder to wait on.
#[derive(Clone, Copy, Default)]
struct Seen {
    frames: u64,
    answers: u64,
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let files = frame_files(&args.frames)?;
    anyhow::ensure!(
        !files.is_empty(),
        "--frames {}: no frames found",
        args.frames
    );
    let (url, channel) = connect(&args.conn, Duration::from_secs(args.timeout)).await?;
    let mut client = GatewayClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(256 << 20);
    let unchecked = match &args.ask {
        Some(prompt) => crate::chat::check_raw_prompt(&mut client, prompt).await,
        None => None,
    };
    let (tx, rx) = mpsc::channel::<WatchRequest>(4);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.set_timeout(Duration::from_secs(args.timeout));
    let stream = match client.watch(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(crate::ask::explain_plaintext(&url, status_error(s)).await),
    };
    if let Some(w) = unchecked {
        eprintln!("{w}");
    }
    let (seen_tx, seen_rx) = watch::channel(Seen::default());
    let json = args.json;
    let asked = args
        .question
        .clone()
        .or(args.ask.clone())
        .unwrap_or_default();
    let reader = tokio::spawn(read_events(stream, seen_tx, json, asked));
    let fed = feed(&args, &files, tx, seen_rx).await;
    let failed_answers = reader.await.context("reading the stream")??;
    fed?;
    anyhow::ensure!(
        failed_answers == 0,
        "{failed_answers} question(s) failed (see above)"
    );
    Ok(())
}

/// Sends the frames (and questions) in order; dropping `tx` at the end half-closes the stream.
async fn feed(
    args: &WatchArgs,
    files: &[PathBuf],
    tx: mpsc::Sender<WatchRequest>,
    mut seen: watch::Receiver<Seen>,
) -> anyhow::Result<()> {
    let pace = (args.fps > 0.0).then(|| Duration::from_secs_f64(1.0 / args.fps));
    let mut asked = 0u64;
    let started = tokio::time::Instant::now();
    for (i, path) in files.iter().enumerate() {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let frame = WatchFrame {
            data: data.into(),
            timestamp: started.elapsed().as_millis() as i64,
        };
        if tx.send(request(RequestKind::Frame(frame))).await.is_err() {
            return Ok(()); // the stream ended; the reader reports why
        }
        if args.sync {
            let want = i as u64 + 1;
            let _ = seen.wait_for(|s| s.frames >= want).await;
        }
        let last = i + 1 == files.len();
        let due = if args.every == 0 {
            last
        } else {
            (i + 1) % args.every == 0
        };
        if due {
            let q = WatchQuestion {
                id: format!("q{i}"),
                prompt: args.ask.clone().unwrap_or_default(),
                question: args.question.clone().unwrap_or_default(),
                params: Some(args.sampling.to_request_params()),
                last_frames: args.last_frames,
                dynamic_roi: args.dynamic_roi,
            };
            if tx.send(request(RequestKind::Question(q))).await.is_err() {
                return Ok(());
            }
            asked += 1;
            if args.sync {
                let _ = seen.wait_for(|s| s.answers >= asked).await;
            }
        }
        if let Some(p) = pace {
            tokio::time::sleep_until(started + p * (i as u32 + 1)).await;
        }
    }
    Ok(())
}

fn request(kind: RequestKind) -> WatchRequest {
    WatchRequest { kind: Some(kind) }
}

/// Prints every event until the stream ends; returns how many questions failed.
async fn read_events(
    mut stream: tonic::Streaming<vlm_proto::WatchResponse>,
    seen: watch::Sender<Seen>,
    json: bool,
    question: String,
) -> anyhow::Result<u64> {
    let mut text: std::collections::HashMap<String, (String, Vec<u32>)> = Default::default();
    let mut failed = 0;
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        match msg.kind {
            Some(ResponseKind::Frame(f)) => {
                if json {
                    writeln!(out, "{}", frame_json(&f))?;
                } else if let Some(e) = &f.error {
                    eprintln!("frame {}: {}", f.frame, e.message);
                }
                seen.send_modify(|s| s.frames += 1);
            }
            Some(ResponseKind::Answer(a)) => {
                let end = answer(&mut out, a, &question, &mut text, json, &mut failed)?;
                if end {
                    seen.send_modify(|s| s.answers += 1);
                }
            }
            None => {}
        }
        out.flush()?;
    }
    Ok(failed)
}

/// One answer message; true when it ended its question. JSON lines name the question as asked
/// (--question or --ask) and its id (`q<frame>`).
fn answer(
    out: &mut impl Write,
    a: WatchAnswer,
    question: &str,
    text: &mut std::collections::HashMap<String, (String, Vec<u32>)>,
    json: bool,
    failed: &mut u64,
) -> anyhow::Result<bool> {
    match a.kind {
        Some(AnswerKind::Delta(d)) => {
            let t = text.entry(a.question_id).or_default();
            t.0.push_str(&d.text);
            t.1.extend(d.token_ids);
            Ok(false)
        }
        Some(AnswerKind::Final(_)) => {
            let (t, ids) = text.remove(&a.question_id).unwrap_or_default();
            if json {
                let mut line = json!({"frame": a.frame, "question": question,
                    "question_id": a.question_id, "text": t, "token_ids": ids,
                    "frames": a.frames});
                if let Some(r) = a.roi {
                    line["roi"] = json!([r.x0, r.y0, r.x1, r.y1]);
                }
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "[frame {}] {}", a.frame, t.trim())?;
            }
            Ok(true)
        }
        Some(AnswerKind::Error(e)) => {
            text.remove(&a.question_id);
            *failed += 1;
            if json {
                let line = json!({"frame": a.frame, "question": question,
                    "question_id": a.question_id,
                    "error": {"code": e.code, "message": e.message}});
                writeln!(out, "{line}")?;
            }
            eprintln!("question {} failed: {}", a.question_id, e.message);
            Ok(true)
        }
        None => Ok(false),
    }
}

fn frame_json(f: &FrameEvent) -> serde_json::Value {
    let encode = match f.encode() {
        FrameEncode::Reused => "reused",
        FrameEncode::Partial => "partial",
        FrameEncode::Full => "full",
        FrameEncode::Dropped => "dropped",
        FrameEncode::Failed => "failed",
        FrameEncode::Unspecified => "unspecified",
    };
    let mut v = json!({"frame": f.frame, "encode": encode});
    if f.encode() == FrameEncode::Partial || f.encode() == FrameEncode::Full {
        v["encode_ms"] = json!(f.encode_ms);
        v["encoded_views"] = json!(f.encoded_views);
    }
    if let Some(m) = f.motion {
        v["motion"] = json!([m.x0, m.y0, m.x1, m.y1]);
    }
    if let Some(e) = &f.error {
        v["error"] = json!({"code": e.code, "message": e.message});
    }
    v
}

/// The frame files `spec` names, in frame order.
fn frame_files(spec: &str) -> anyhow::Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    if path.is_dir() {
        return sorted_matching(path, |name| {
            let lower = name.to_ascii_lowercase();
            [".png", ".jpg", ".jpeg", ".webp"]
                .iter()
                .any(|ext| lower.ends_with(ext))
        });
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("--frames {spec}: not a folder or a file pattern"))?;
    if let Some((head, width, tail)) = numbered(name) {
        let file = |n: usize| dir.join(format!("{head}{n:0width$}{tail}"));
        let Some(first) = (0..5).find(|&n| file(n).exists()) else {
            anyhow::bail!("--frames {spec}: no file for numbers 0 to 4");
        };
        return Ok((first..).map(file).take_while(|p| p.exists()).collect());
    }
    if name.contains(['*', '?']) {
        return sorted_matching(dir, |n| wildcard(name.as_bytes(), n.as_bytes()));
    }
    anyhow::bail!("--frames {spec}: not a folder, a `*` pattern or a `%04d` sequence")
}

fn sorted_matching(dir: &Path, keep: impl Fn(&str) -> bool) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    files.sort();
    Ok(files)
}

/// `frame-%04d.png` → ("frame-", 4, ".png"); `%d` has width 0.
fn numbered(name: &str) -> Option<(&str, usize, &str)> {
    let at = name.find('%')?;
    let rest = &name[at + 1..];
    let d = rest.find('d')?;
    let width = if d == 0 { 0 } else { rest[..d].parse().ok()? };
    Some((&name[..at], width, &rest[d + 1..]))
}

/// Shell-style `*` and `?` matching of a whole file name.
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && wildcard(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_name_frames_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for n in [2, 1, 3, 10] {
            std::fs::write(dir.path().join(format!("f-{n:04}.png")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let names = |spec: &str| -> Vec<String> {
            frame_files(spec)
                .unwrap()
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let d = dir.path().display();
        let all = ["f-0001.png", "f-0002.png", "f-0003.png", "f-0010.png"];
        assert_eq!(names(&d.to_string()), all);
        assert_eq!(names(&format!("{d}/f-*.png")), all);
        assert_eq!(names(&format!("{d}/f-000?.png")), all[..3]);
        // A numbered sequence stops at the first gap.
        assert_eq!(names(&format!("{d}/f-%04d.png")), all[..3]);
        assert!(frame_files(&format!("{d}/g-%04d.png")).is_err());
    }
}
