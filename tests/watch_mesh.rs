//! Live frame streams (`Gateway/Watch`) through a real mesh (`vlm-mesh up`: four processes, mTLS):
//! still frames cost no encoder call and answer exactly like a fresh encode, a changed block is
//! re-encoded and becomes the motion box (dynamic ROI), a changed tile of a tiled model is a
//! partial encode, bad frames fail alone, a client that stops reading stalls nothing, a client
//! that leaves cancels its answers, and the stream limit holds. `vlm-mesh watch` on the demo
//! model follows a shape across the grid.

use std::time::Duration;

use image::{ImageEncoder, Rgb, RgbImage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vlm_proto::watch_answer::Kind as AnswerKind;
use vlm_proto::watch_request::Kind as RequestKind;
use vlm_proto::watch_response::Kind as ResponseKind;
use vlm_proto::{
    FrameEncode, FrameEvent, GenerateRequest, ImageInput, Region, SamplingParams, WatchAnswer,
    WatchFrame, WatchQuestion, WatchRequest, WatchResponse,
};

mod common;
use common::{bounded, counter, next_message, repo, scrape, tokens_on, MeshProc};

const GREY: Rgb<u8> = Rgb([120, 130, 140]);

/// A 128x96 frame (4x3 blocks of 32 pixels): grey, with `paint` applied.
fn frame(paint: impl Fn(&mut RgbImage)) -> RgbImage {
    let mut img = RgbImage::from_pixel(128, 96, GREY);
    paint(&mut img);
    img
}

fn fill(img: &mut RgbImage, x: std::ops::Range<u32>, y: std::ops::Range<u32>, c: Rgb<u8>) {
    for yy in y {
        for xx in x.clone() {
            img.put_pixel(xx, yy, c);
        }
    }
}

/// PNG bytes; `fast` picks another compression, so the same pixels give other bytes.
fn png(img: &RgbImage, fast: bool) -> Vec<u8> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    let (c, f) = if fast {
        (CompressionType::Fast, FilterType::NoFilter)
    } else {
        (CompressionType::Best, FilterType::Adaptive)
    };
    PngEncoder::new_with_quality(&mut out, c, f)
        .write_image(
            img.as_raw(),
            img.width(),
            img.height(),
            image::ExtendedColorType::Rgb8,
        )
        .unwrap();
    out
}

fn params(max_tokens: u32) -> Option<SamplingParams> {
    Some(SamplingParams {
        max_tokens: Some(max_tokens),
        ..Default::default()
    })
}

/// One open Watch stream: what the test sends, and what comes back.
struct Watch {
    tx: mpsc::Sender<WatchRequest>,
    rx: tonic::Streaming<WatchResponse>,
    sent: u64,
}

impl Watch {
    async fn open(mesh: &MeshProc) -> Result<Watch, tonic::Status> {
        let mut client = mesh.client().await;
        let (tx, rx) = mpsc::channel(8);
        let rx = bounded("open Watch", client.watch(ReceiverStream::new(rx)))
            .await?
            .into_inner();
        Ok(Watch { tx, rx, sent: 0 })
    }

    async fn frame(&mut self, data: Vec<u8>) -> u64 {
        let f = WatchFrame {
            data: data.into(),
            timestamp: self.sent as i64 * 40,
        };
        let msg = WatchRequest {
            kind: Some(RequestKind::Frame(f)),
        };
        bounded("send a frame", self.tx.send(msg)).await.unwrap();
        self.sent += 1;
        self.sent - 1
    }

    async fn ask(&mut self, q: WatchQuestion) {
        let msg = WatchRequest {
            kind: Some(RequestKind::Question(q)),
        };
        bounded("send a question", self.tx.send(msg)).await.unwrap();
    }

    /// The next frame event (answers must not come first here).
    async fn event(&mut self) -> FrameEvent {
        match next_message(&mut self.rx).await.unwrap().unwrap().kind {
            Some(ResponseKind::Frame(f)) => f,
            other => panic!("expected a frame event, got {other:?}"),
        }
    }

    /// Sends a frame and returns its event.
    async fn handled(&mut self, data: Vec<u8>) -> FrameEvent {
        let index = self.frame(data).await;
        let e = self.event().await;
        assert_eq!(e.frame, index);
        e
    }

    /// Asks and collects the answer: (token ids, the last message).
    async fn answer(&mut self, q: WatchQuestion) -> (Vec<u32>, WatchAnswer) {
        let id = q.id.clone();
        self.ask(q).await;
        let mut ids = Vec::new();
        loop {
            let msg = next_message(&mut self.rx).await.unwrap().unwrap();
            let Some(ResponseKind::Answer(a)) = msg.kind else {
                panic!("a frame event while only a question was pending: {msg:?}");
            };
            assert_eq!(a.question_id, id);
            match &a.kind {
                Some(AnswerKind::Delta(d)) => ids.extend(&d.token_ids),
                Some(AnswerKind::Final(_)) | Some(AnswerKind::Error(_)) => return (ids, a),
                None => panic!("empty answer message"),
            }
        }
    }
}

fn question(id: &str, max_tokens: u32) -> WatchQuestion {
    WatchQuestion {
        id: id.into(),
        prompt: "USER: <image>\nWhat is shown in this image? ASSISTANT:".into(),
        params: params(max_tokens),
        last_frames: 1,
        dynamic_roi: false,
        question: String::new(),
    }
}

/// Scrapes `addr` until `ok` holds (failing after a minute); returns that exposition.
fn metrics_until(addr: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = scrape(addr);
        if ok(&m) {
            return m;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {m}");
        std::thread::sleep(Duration::from_millis(20)); // poll interval
    }
}

fn encodes(mesh: &MeshProc) -> f64 {
    let metrics = scrape(&mesh.metrics_addr("encoder"));
    counter(
        &metrics,
        "vlm_rpc_server_requests_total",
        &["method=\"Encode\""],
    )
}

/// Token ids of an ordinary Generate call (the gateway's shared cache has never seen these
/// pixels: a fresh encode).
async fn generate_ids(mesh: &MeshProc, image_inputs: Vec<ImageInput>, max_tokens: u32) -> Vec<u32> {
    let req = GenerateRequest {
        image_inputs,
        prompt: "USER: <image>\nWhat is shown in this image? ASSISTANT:".into(),
        params: params(max_tokens),
        ..Default::default()
    };
    request_ids(mesh, req).await
}

/// Token ids of the answer to `req`.
async fn request_ids(mesh: &MeshProc, req: GenerateRequest) -> Vec<u32> {
    let mut stream = bounded("generate", mesh.client().await.generate(req))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = next_message(&mut stream).await.unwrap() {
        if let Some(vlm_proto::generate_response::Kind::Delta(d)) = m.kind {
            ids.extend(d.token_ids);
        }
    }
    ids
}

/// Still frames (the same bytes, the same pixels in other bytes, one pixel one level off) cost
/// one encode in all and answer exactly like a fresh encode; a changed block is encoded again and
/// is the motion box, which dynamic_roi adds as a region (answering like that region sent with
/// Generate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn still_frames_reuse_features_and_a_changed_block_is_the_motion() {
    let mesh = MeshProc::start(&[]);
    let mut w = Watch::open(&mesh).await.unwrap();
    let base = frame(|_| {});
    let first = w.handled(png(&base, false)).await;
    assert_eq!(first.encode(), FrameEncode::Full, "{first:?}");
    assert_eq!(first.views, 1);
    for _ in 0..3 {
        let e = w.handled(png(&base, false)).await;
        assert_eq!(e.encode(), FrameEncode::Reused, "{e:?}");
    }
    let e = w.handled(png(&base, true)).await;
    assert_eq!(
        e.encode(),
        FrameEncode::Reused,
        "same pixels, other bytes: {e:?}"
    );
    let nudged = frame(|img| img.put_pixel(5, 5, Rgb([121, 130, 140])));
    let e = w.handled(png(&nudged, false)).await;
    assert_eq!(e.encode(), FrameEncode::Reused, "{e:?}");
    assert_eq!((e.changed_blocks, e.blocks), (0, 12));
    assert!(e.max_diff > 0.0 && e.max_diff < 1.0, "{e:?}");
    assert_eq!(encodes(&mesh), 1.0, "six still frames, one encoder call");
    let saved = counter(
        &scrape(&mesh.metrics_addr("gateway")),
        "vlm_watch_encoder_calls_saved_total",
        &[],
    );
    assert_eq!(saved, 5.0, "five reused frames, five encoder calls saved");

    // A question about the latest (reused) frame: no encoder call, the answer of a fresh encode.
    let (ids, end) = w.answer(question("still", 6)).await;
    assert!(matches!(end.kind, Some(AnswerKind::Final(_))), "{end:?}");
    assert_eq!((end.frame, end.frames.clone()), (5, vec![5]));
    assert_eq!(ids.len(), 6);
    assert_eq!(encodes(&mesh), 1.0, "the answer used the stream's features");
    let fresh = generate_ids(
        &mesh,
        vec![ImageInput {
            data: png(&nudged, false).into(),
            regions: vec![],
        }],
        6,
    )
    .await;
    assert_eq!(encodes(&mesh), 2.0, "the Generate call encoded afresh");
    let fresh_base = generate_ids(
        &mesh,
        vec![ImageInput {
            data: png(&base, false).into(),
            regions: vec![],
        }],
        6,
    )
    .await;
    assert_eq!(
        ids, fresh_base,
        "a reused frame answers like its features' frame"
    );
    let _ = fresh; // the nudged frame's own answer may differ: its pixels do

    // One block (x 32..64, y 32..64 of 128x96) changes: encoded again, and it is the motion.
    let moved = frame(|img| fill(img, 32..64, 32..64, Rgb([250, 40, 40])));
    let e = w.handled(png(&moved, false)).await;
    assert_eq!(e.encode(), FrameEncode::Full, "{e:?}");
    assert_eq!(e.changed_blocks, 1);
    let motion = Region {
        x0: 250,
        y0: 333,
        x1: 500,
        y1: 667,
    };
    assert_eq!(e.motion, Some(motion), "{e:?}");
    let mut q = question("roi", 4);
    q.dynamic_roi = true;
    q.prompt = "USER: <image>\nWhat is in the box? ASSISTANT:".into();
    let (ids, end) = w.answer(q).await;
    let Some(AnswerKind::Final(f)) = &end.kind else {
        panic!("{end:?}")
    };
    assert_eq!(end.roi, Some(motion));
    let slots = &f.timings.as_ref().unwrap().images;
    assert_eq!(slots.len(), 2, "the frame, then the motion region");
    assert_eq!(slots[1].region, Some(motion));
    let req = GenerateRequest {
        image_inputs: vec![ImageInput {
            data: png(&moved, false).into(),
            regions: vec![motion],
        }],
        prompt: "USER: <image>\nWhat is in the box? ASSISTANT:".into(),
        params: params(4),
        ..Default::default()
    };
    let mut stream = mesh
        .client()
        .await
        .generate(req)
        .await
        .unwrap()
        .into_inner();
    let mut direct = Vec::new();
    while let Some(m) = next_message(&mut stream).await.unwrap() {
        if let Some(vlm_proto::generate_response::Kind::Delta(d)) = m.kind {
            direct.extend(d.token_ids);
        }
    }
    assert_eq!(
        ids, direct,
        "dynamic ROI = the frame with that region, asked directly"
    );

    // Half-closing ends the stream once everything is answered.
    drop(w.tx);
    assert!(next_message(&mut w.rx).await.unwrap().is_none());
}

/// Undecodable, empty and oversized frames fail alone with their codes; the stream goes on. A
/// question before any usable frame, or about more frames than a request may carry, fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_questions_fail_alone() {
    let mesh = MeshProc::start(&[]);
    let mut w = Watch::open(&mesh).await.unwrap();
    let (_, end) = w.answer(question("early", 2)).await;
    match end.kind {
        Some(AnswerKind::Error(e)) => assert_eq!(e.code, tonic::Code::FailedPrecondition as i32),
        other => panic!("{other:?}"),
    }
    let e = w.handled(b"not an image at all".to_vec()).await;
    assert_eq!(e.encode(), FrameEncode::Failed);
    let err = e.error.unwrap();
    assert_eq!(err.code, tonic::Code::InvalidArgument as i32, "{err:?}");
    assert!(err.message.contains("frame 0"), "{err:?}");
    let e = w.handled(vec![]).await;
    assert_eq!(e.error.unwrap().code, tonic::Code::InvalidArgument as i32);
    // 5000x4000 is 20 MP, over the default 16 MP: refused from the header (the PNG is small).
    let huge = RgbImage::from_pixel(5000, 4000, GREY);
    let e = w.handled(png(&huge, true)).await;
    assert_eq!(e.encode(), FrameEncode::Failed);
    let err = e.error.unwrap();
    assert_eq!(err.code, tonic::Code::ResourceExhausted as i32, "{err:?}");
    let good = w.handled(png(&frame(|_| {}), false)).await;
    assert_eq!(good.encode(), FrameEncode::Full, "{good:?}");
    let mut q = question("too-many", 2);
    q.last_frames = 1000;
    let (_, end) = w.answer(q).await;
    match end.kind {
        Some(AnswerKind::Error(e)) => assert_eq!(e.code, tonic::Code::InvalidArgument as i32),
        other => panic!("{other:?}"),
    }
    let (ids, end) = w.answer(question("fine", 2)).await;
    assert!(matches!(end.kind, Some(AnswerKind::Final(_))), "{end:?}");
    assert_eq!((ids.len(), end.frame), (2, 3));
}

/// A client that sends frames and questions but reads nothing: every frame is still taken in
/// (frame events it does not read are discarded once its queue is full, counted), and when it
/// leaves, the stream and everything it started end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_stalls_nothing_and_leaving_cancels_everything() {
    let mesh = MeshProc::start(&[("VLM_FAULT_DECODE_DELAY_MS", "25")]);
    // A tiny receive window, so the server's sends back up at once.
    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "client");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(65_535))
        .connect()
        .await
        .unwrap();
    let mut client = vlm_proto::gateway_client::GatewayClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let resp = bounded("open", client.watch(ReceiverStream::new(rx)))
        .await
        .unwrap();
    let frames = 400u64;
    for i in 0..frames {
        let img = frame(|img| {
            fill(
                img,
                (i % 4) as u32 * 32..(i % 4) as u32 * 32 + 32,
                0..32,
                Rgb([0, 0, 0]),
            )
        });
        let msg = WatchRequest {
            kind: Some(RequestKind::Frame(WatchFrame {
                data: png(&img, true).into(),
                timestamp: i as i64,
            })),
        };
        bounded("send a frame to a stream nobody reads", tx.send(msg))
            .await
            .unwrap();
        if i % 50 == 0 {
            let q = question(&format!("q{i}"), 150);
            let msg = WatchRequest {
                kind: Some(RequestKind::Question(q)),
            };
            bounded("send a question", tx.send(msg)).await.unwrap();
        }
    }
    let gateway = mesh.metrics_addr("gateway");
    let handled = |m: &str| {
        ["reused", "partial", "full", "dropped", "failed"]
            .iter()
            .map(|r| counter(m, "vlm_watch_frames_total", &[&format!("result=\"{r}\"")]))
            .sum::<f64>()
    };
    let m = metrics_until(&gateway, "every frame taken in and handled", |m| {
        handled(m) == frames as f64
    });
    assert_eq!(
        counter(&m, "vlm_watch_frames_total", &["result=\"received\""]),
        frames as f64
    );
    assert!(
        counter(&m, "vlm_watch_frames_total", &["result=\"dropped\""]) > 0.0,
        "frames arriving while one was encoded replace the waiting one"
    );
    assert!(
        counter(&m, "vlm_watch_events_discarded_total", &[]) > 0.0,
        "the unread events are bounded by the stream's queue"
    );
    assert_eq!(counter(&m, "vlm_watch_streams", &[]), 1.0);
    // Leaving ends the stream and every task it started.
    drop(resp);
    drop(tx);
    drop(client);
    metrics_until(&gateway, "the stream closed", |m| {
        counter(m, "vlm_watch_streams", &[]) == 0.0
    });

    // A reader that leaves mid-answer cancels the decode (25 ms a token: 180 would take 4.5 s).
    // On a mesh of its own, so that the cancellation line read below cannot be one of the
    // questions the stream above left behind.
    drop(mesh);
    let mesh = MeshProc::start(&[("VLM_FAULT_DECODE_DELAY_MS", "25")]);
    let mut w = Watch::open(&mesh).await.unwrap();
    w.handled(png(&frame(|_| {}), false)).await;
    w.ask(question("long", 180)).await;
    let mut got = 0;
    while got < 3 {
        let msg = next_message(&mut w.rx).await.unwrap().unwrap();
        if let Some(ResponseKind::Answer(WatchAnswer {
            kind: Some(AnswerKind::Delta(d)),
            ..
        })) = msg.kind
        {
            got += d.token_ids.len();
        }
    }
    drop(w);
    let line = mesh
        .wait_for_log(&["[decoder]", "cancelled"], Duration::from_secs(30))
        .expect("the decoder never logged a cancellation");
    let tokens = tokens_on(&line);
    assert!(
        (3..=60).contains(&tokens),
        "{tokens} tokens decoded: {line}"
    );
}

/// More streams than --max-watch-streams are refused; closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_the_limit_are_refused() {
    // One client opens them all: no per-peer share, so the global limit is what refuses.
    let mesh = MeshProc::start(&[("VLM_MAX_WATCH_STREAMS", "2"), ("VLM_MAX_PEER_SHARE", "1")]);
    let mut a = Watch::open(&mesh).await.unwrap();
    let mut b = Watch::open(&mesh).await.unwrap();
    // Both are open (each has answered a frame).
    a.handled(png(&frame(|_| {}), false)).await;
    b.handled(png(&frame(|_| {}), false)).await;
    let status = Watch::open(&mesh).await.err().expect("a third stream");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watch-streams"),
        "{status:?}"
    );
    drop(a);
    metrics_until(
        &mesh.metrics_addr("gateway"),
        "the closed stream ended",
        |m| counter(m, "vlm_watch_streams", &[]) == 1.0,
    );
    let mut c = Watch::open(&mesh).await.unwrap();
    assert_eq!(
        c.handled(png(&frame(|_| {}), false)).await.encode(),
        FrameEncode::Full
    );
}

/// A tiled model: a frame changed inside one tile re-encodes that tile and the base view only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_tile_is_a_partial_encode() {
    let model = repo().join("models/tiny-llava-next");
    let mesh = MeshProc::start_with(&model, &[], &[]);
    let wide = image::open(repo().join("models/images/next-wide-100x40.png"))
        .unwrap()
        .to_rgb8();
    let mut w = Watch::open(&mesh).await.unwrap();
    let e = w.handled(png(&wide, false)).await;
    assert_eq!(e.encode(), FrameEncode::Full, "{e:?}");
    assert_eq!((e.views, e.encoded_views.clone()), (4, vec![0, 1, 2, 3]));
    let mut changed = wide.clone();
    fill(&mut changed, 42..58, 12..28, Rgb([255, 255, 0]));
    let e = w.handled(png(&changed, false)).await;
    assert_eq!(e.encode(), FrameEncode::Partial, "{e:?}");
    assert_eq!(
        e.encoded_views,
        vec![0, 2],
        "the base view and the middle tile"
    );
    let (ids, end) = w.answer(question("tiled", 4)).await;
    assert!(matches!(end.kind, Some(AnswerKind::Final(_))), "{end:?}");
    let fresh = generate_ids(
        &mesh,
        vec![ImageInput {
            data: png(&changed, false).into(),
            regions: vec![],
        }],
        4,
    )
    .await;
    assert_eq!(ids, fresh);
}

/// `vlm-mesh watch --sync --json` on the demo model and a generated clip of a circle moving
/// through the 3x3 grid: still frames are reused, frames with new pixels are encoded, and each
/// answer names the cell the circle is in.
#[test]
fn watch_cli_follows_the_shape_across_the_grid() {
    let spec = vlm_frames::synthetic::ClipSpec {
        frames: 46,
        still: 3,
        moving: 2,
        size: 128,
    };
    let dir = tempfile::tempdir().unwrap();
    // From the clip's second frame, so that every 5th file is the first still frame of a cell.
    let (mut expected, mut repeats) = (Vec::new(), Vec::new());
    let mut earlier = std::collections::HashSet::new();
    for (n, i) in (1..spec.frames).enumerate() {
        let (bytes, cell) = vlm_frames::synthetic::clip_frame(&spec, i);
        std::fs::write(dir.path().join(format!("frame-{n:04}.png")), &bytes).unwrap();
        expected.push(cell);
        // The same pixels as an earlier frame: still, or back where the circle was.
        repeats.push(!earlier.insert(bytes));
    }
    let mesh = MeshProc::start_with(&repo().join("models/shapes-llava"), &[], &[]);
    let out = common::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_vlm-mesh")).args([
            "watch",
            "--state-dir",
            mesh.state.path().to_str().unwrap(),
            "--frames",
            dir.path().to_str().unwrap(),
            "--ask",
            "USER: <image>\nWhere is the circle? ASSISTANT:",
            "--every",
            "5",
            "--fps",
            "0",
            "--sync",
            "--json",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
        ]),
        "watch",
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let frames: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("encode").is_some()).collect();
    let answers: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("text").is_some()).collect();
    assert_eq!(frames.len(), expected.len(), "one event per frame");
    for (n, f) in frames.iter().enumerate() {
        assert_eq!(f["frame"], n as u64);
        // Still frames reuse the current features; a frame seen before (the clip comes back)
        // is a hit in the stream's cache; only new pixels are encoded.
        let want = if repeats[n] { "reused" } else { "full" };
        assert_eq!(f["encode"], want, "frame {n}: {f}");
    }
    let mut seen = Vec::new();
    for a in &answers {
        let n = a["frame"].as_u64().unwrap() as usize;
        let cell = expected[n].expect("answers are asked on still frames");
        assert_eq!(
            a["question"],
            "USER: <image>\nWhere is the circle? ASSISTANT:"
        );
        assert_eq!(a["question_id"], format!("q{n}"));
        assert_eq!(a["frames"], serde_json::json!([n]));
        assert_eq!(a["text"].as_str().unwrap().trim(), cell, "frame {n}: {a}");
        seen.push(cell);
    }
    assert_eq!(answers.len(), expected.len() / 5);
    seen.dedup();
    assert!(seen.len() >= 8, "the answers follow the circle: {seen:?}");
}

/// A stream with nothing to do ends after --watch-idle-timeout with DEADLINE_EXCEEDED; a question
/// being answered (here 2 s of decoding against a 1 s idle limit) keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_ends_but_not_while_it_answers() {
    let mesh = MeshProc::start(&[
        ("VLM_WATCH_IDLE_TIMEOUT", "1"),
        ("VLM_FAULT_DECODE_DELAY_MS", "25"),
    ]);
    let mut w = Watch::open(&mesh).await.unwrap();
    w.handled(png(&frame(|_| {}), false)).await;
    let (ids, end) = w.answer(question("slow", 80)).await;
    assert!(matches!(end.kind, Some(AnswerKind::Final(_))), "{end:?}");
    assert_eq!(ids.len(), 80);
    let status = next_message(&mut w.rx).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("--watch-idle-timeout"),
        "{status:?}"
    );
}

/// A plain question (the `question` field, rendered with the model's chat template).
const WHERE: &str = "Where is the circle?";

/// Token ids of a `Generate` with `question` (the gateway's shared cache: a fresh encode, or
/// the features of the same bytes).
async fn generate_question_ids(mesh: &MeshProc, image_inputs: Vec<ImageInput>) -> Vec<u32> {
    let req = GenerateRequest {
        image_inputs,
        question: WHERE.into(),
        params: params(3),
        ..Default::default()
    };
    request_ids(mesh, req).await
}

/// Streams `frames` (PNG bytes) into one Watch stream, handled one by one, and asks [`WHERE`]
/// as a plain `question` after every `every`-th frame, cycling through the settings (latest
/// frame or last 2) × (dynamic ROI off or on). Every answer's token ids must equal a `Generate`
/// with the same question on the frames the answer names: each frame as the bytes of the frame
/// whose features it uses (its own, or for a still frame the frame whose features it reused, as
/// the proto says), and the region the final answer reports in `roi` on the latest. Returns the
/// frame events and the answers.
async fn answers_equal_generate(
    mesh: &MeshProc,
    clip: &str,
    frames: &[Vec<u8>],
    every: usize,
) -> (Vec<FrameEvent>, Vec<Vec<u32>>) {
    let mut w = Watch::open(mesh).await.unwrap();
    let (mut events, mut features) = (Vec::new(), Vec::<usize>::new());
    let mut answers = Vec::new();
    for (i, data) in frames.iter().enumerate() {
        let e = w.handled(data.clone()).await;
        let used = match e.encode() {
            // Still: the current features (and the bytes they came from) stay.
            FrameEncode::Reused if e.changed_blocks == 0 => features[i - 1],
            // Changed, but every view was in the stream's cache: its own bytes (seen before).
            FrameEncode::Reused | FrameEncode::Full | FrameEncode::Partial => i,
            other => panic!("{clip}: frame {i} {other:?}: {e:?}"),
        };
        features.push(used);
        events.push(e);
        if (i + 1) % every != 0 {
            continue;
        }
        let asked = answers.len();
        let (last_frames, dynamic_roi) = (1 + (asked / 2) % 2, asked % 2 == 1);
        let q = WatchQuestion {
            id: format!("{clip}-{i}"),
            question: WHERE.into(),
            params: params(3),
            last_frames: last_frames as u32,
            dynamic_roi,
            ..Default::default()
        };
        let (ids, end) = w.answer(q).await;
        assert!(
            matches!(end.kind, Some(AnswerKind::Final(_))),
            "{clip}: {end:?}"
        );
        let first = (i + 1).saturating_sub(last_frames);
        let named: Vec<u64> = (first..=i).map(|f| f as u64).collect();
        assert_eq!(end.frames, named, "{clip}: frames of the answer at {i}");
        assert_eq!(end.frame, i as u64);
        assert!(!ids.is_empty(), "{clip}: no tokens at frame {i}");
        let mut inputs: Vec<ImageInput> = named
            .iter()
            .map(|&f| ImageInput {
                data: frames[features[f as usize]].clone().into(),
                regions: vec![],
            })
            .collect();
        if dynamic_roi {
            match end.roi {
                Some(roi) => inputs.last_mut().unwrap().regions.push(roi),
                // No box only while no frame has changed enough to be encoded.
                None => assert!(
                    events[1..].iter().all(|e| e.changed_blocks == 0),
                    "{clip}: dynamic ROI at frame {i} without a box: {events:?}"
                ),
            }
        } else {
            assert_eq!(end.roi, None, "{clip}");
        }
        let direct = generate_question_ids(mesh, inputs).await;
        let used: Vec<usize> = named.iter().map(|&f| features[f as usize]).collect();
        assert_eq!(
            ids, direct,
            "{clip}: the answer at frame {i} (last {last_frames}, dynamic ROI {dynamic_roi}) \
             differs from Generate on frames {named:?} (the bytes of {used:?}), roi {:?}",
            end.roi
        );
        answers.push(ids);
    }
    assert!(answers.len() >= 4, "{clip}: every setting asked");
    (events, answers)
}

/// How many different answers there are (the comparisons mean something only where the answers
/// depend on the frames).
fn distinct(answers: &[Vec<u32>]) -> usize {
    answers
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len()
}

fn clip(spec: vlm_frames::synthetic::ClipSpec, frames: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    frames
        .map(|i| vlm_frames::synthetic::clip_frame(&spec, i).0)
        .collect()
}

/// Plain questions on still, jumping and slowly drifting clips, with dynamic ROI off and on and
/// one or two frames: every answer equals `Generate` with the same question on the frames it
/// names. The demo model, whose answers say where the circle is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_answer_like_generate_on_the_frames_they_name() {
    use vlm_frames::synthetic::ClipSpec;
    let mesh = MeshProc::start_with(&repo().join("models/shapes-llava"), &[], &[]);
    // Still: one frame's bytes over and over, after a first different frame (so that dynamic
    // ROI has a motion box).
    let mut still = clip(ClipSpec::default(), 30..31);
    still.extend(clip(ClipSpec::default(), 0..8));
    let (events, _) = answers_equal_generate(&mesh, "still", &still, 2).await;
    assert!(events[2..]
        .iter()
        .all(|e| e.encode() == FrameEncode::Reused));

    // Jumping: the circle jumps to the next cell every two frames.
    let jumping = ClipSpec {
        frames: 0,
        still: 2,
        moving: 0,
        size: 128,
    };
    let (events, answers) = answers_equal_generate(&mesh, "jumping", &clip(jumping, 0..8), 2).await;
    let kinds: Vec<FrameEncode> = events.iter().map(FrameEvent::encode).collect();
    assert_eq!(
        kinds,
        [FrameEncode::Full, FrameEncode::Reused].repeat(4),
        "{events:?}"
    );
    assert!(distinct(&answers) >= 3, "the circle moved: {answers:?}");

    // Drifting: a third of a pixel a frame, so changes stay under --frame-threshold for a few
    // frames (the features of an older frame are reused) until they add up past it.
    let drifting = ClipSpec {
        frames: 0,
        still: 1,
        moving: 120,
        size: 128,
    };
    let (events, _) = answers_equal_generate(&mesh, "drifting", &clip(drifting, 0..16), 2).await;
    let full = events[1..]
        .iter()
        .filter(|e| e.encode() == FrameEncode::Full)
        .count();
    let reused = events
        .iter()
        .filter(|e| e.encode() == FrameEncode::Reused)
        .count();
    assert!(full >= 1 && reused >= 4, "{events:?}");
}

/// The same on a tiled model (LLaVA-NeXT), where a change inside one tile is a partial encode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn questions_on_a_tiled_model_answer_like_generate() {
    let mesh = MeshProc::start_with(&repo().join("models/tiny-llava-next"), &[], &[]);
    let wide = image::open(repo().join("models/images/next-wide-100x40.png"))
        .unwrap()
        .to_rgb8();
    let with_square = |x: u32| {
        let mut f = wide.clone();
        fill(&mut f, x..x + 12, 14..26, Rgb([255, 255, 0]));
        png(&f, false)
    };
    let other = |name: &str| std::fs::read(repo().join("models/images").join(name)).unwrap();
    // A yellow square that jumps between tiles and rests; other pictures (other sizes, other
    // grids) in between, about which this random model says something else.
    let frames = vec![
        png(&wide, false),
        with_square(44),
        with_square(44),
        other("next-tall-36x90.png"),
        other("next-tall-36x90.png"),
        with_square(10),
        with_square(76),
        other("next-small-20x14.png"),
    ];
    let (events, answers) = answers_equal_generate(&mesh, "tiled", &frames, 2).await;
    assert!(
        events.iter().any(|e| e.encode() == FrameEncode::Partial),
        "{events:?}"
    );
    assert!(distinct(&answers) >= 2, "{answers:?}");
}
