//! Hostile input, round 3, against a real mesh (`vlm-mesh up`): one peer — however many
//! connections it opens — holds at most its share (`--max-peer-share`, a quarter by default) of
//! the gateway's shared limits, `Watch` streams live inside the memory budget, every question on
//! a stream gets its outcome, and a request that can never fit the context is refused before any
//! image is encoded. Each attack checks the documented status, that other clients are served
//! during it, and that every service is the same live process afterwards.
//!
//! The attacker connects without a client certificate (a public client: its identity is its
//! address, 127.0.0.1); the other client presents the mesh's `client` certificate (another
//! identity), as `ask` does.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::Bytes;
use tonic::Code;
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::watch_answer::Kind as AnswerKind;
use vlm_proto::watch_request::Kind as RequestKind;
use vlm_proto::watch_response::Kind as ResponseKind;
use vlm_proto::{
    GenerateRequest, ImageInput, Region, SamplingParams, WatchFrame, WatchQuestion, WatchRequest,
};

mod common;
use common::attack::*;
use common::*;

/// A channel to the gateway with no client certificate: a new TLS connection each time.
async fn attacker_channel(mesh: &MeshProc) -> tonic::transport::Channel {
    let tls =
        vlm_net::client_tls_without_identity(&mesh.certs().join("ca.pem"), "localhost").unwrap();
    vlm_net::connect(&mesh.gateway, Some(tls)).await.unwrap()
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A Watch stream of the mesh's client (its certificate) that has sent one 64×48 frame of
/// `color`: the sender and the events.
async fn watch_with_a_frame(
    mesh: &MeshProc,
    color: [u8; 3],
) -> (
    mpsc::Sender<WatchRequest>,
    tonic::Streaming<vlm_proto::WatchResponse>,
) {
    let mut client = mesh.client().await;
    let (tx, rx) = mpsc::channel(8);
    let events = bounded("open", client.watch(ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    let frame = png(&image::RgbImage::from_pixel(64, 48, image::Rgb(color)));
    tx.send(WatchRequest {
        kind: Some(RequestKind::Frame(WatchFrame {
            data: frame.into(),
            timestamp: 0,
        })),
    })
    .await
    .unwrap();
    (tx, events)
}

/// Attack 1: 256 calls that send headers and never a message, over two TLS connections of one
/// client. The client holds at most a quarter of the 256 calls that may be reading their first
/// message (64); the other 192 are refused at once naming --max-peer-share, and another client
/// is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_connections_cannot_lock_out_generate() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let before = services(&mesh);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut calls = Vec::new();
    for _ in 0..2 {
        let channel = attacker_channel(&mesh).await;
        for _ in 0..128 {
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            let done_tx = done_tx.clone();
            calls.push(tokio::spawn(async move {
                grpc.ready().await.unwrap();
                let codec = tonic_prost::ProstCodec::<GenerateRequest, vlm_proto::GenerateResponse>::default();
                let mut req = tonic::Request::new(futures::stream::pending::<GenerateRequest>());
                req.set_timeout(Duration::from_secs(120));
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/vlm.v1.Gateway/Generate",
                );
                let r = grpc.client_streaming(req, path, codec).await.map(|_| ());
                let _ = done_tx.send(r);
            }));
        }
    }
    let started = Instant::now();
    for i in 0..192 {
        let r = bounded("a refusal", done.recv()).await.unwrap();
        let err = r.expect_err("a call without a message succeeded");
        assert_eq!(err.code(), Code::ResourceExhausted, "call {i}: {err:?}");
        assert!(
            err.message().contains("--max-peer-share"),
            "call {i}: {err:?}"
        );
    }
    eprintln!("192 refusals in {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refusals took {:?}",
        started.elapsed()
    );
    // Another client is served while the attacker's 64 calls are open.
    let normal = std::fs::read(image_path()).unwrap();
    assert_eq!(run(&mesh, ask(normal.clone(), 4)).await.unwrap(), 4);
    assert!(
        done.try_recv().is_err(),
        "more than the attacker's share was refused, or a held call ended early"
    );
    for c in &calls {
        c.abort();
    }
    assert_eq!(run(&mesh, ask(normal, 4)).await.unwrap(), 4, "after");
    assert_all_alive_and_bounded(&mesh, &before);
}

/// Attack 2: 16 Watch streams that never send a message. The client gets a quarter of
/// --max-watch-streams (4; the others are refused naming --max-peer-share), another client
/// opens a stream meanwhile, and the idle streams end with DEADLINE_EXCEEDED within the
/// first-message bound (here the 3 s idle timeout, which is shorter than 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_watch_streams_hold_their_share_and_end_soon() {
    let mesh = MeshProc::start(&[("VLM_WATCH_IDLE_TIMEOUT", "3")]);
    let before = services(&mesh);
    let channel = attacker_channel(&mesh).await;
    let opened_at = Instant::now();
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..16 {
        let mut client = GatewayClient::new(channel.clone());
        match bounded(
            "open",
            client.watch(futures::stream::pending::<WatchRequest>()),
        )
        .await
        {
            Ok(stream) => open.push(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("--max-peer-share"), "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((open.len(), refused), (4, 12));
    // Another client: a stream that answers a frame.
    let (_tx, mut events) = watch_with_a_frame(&mesh, [90, 90, 90]).await;
    let event = next_message(&mut events).await.unwrap().unwrap();
    assert!(
        matches!(event.kind, Some(ResponseKind::Frame(ref f)) if f.error.is_none()),
        "{event:?}"
    );
    for mut idle in open {
        let err = next_message(&mut idle).await.expect_err("an idle stream");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(
            err.message().contains("sent no message within 3 s"),
            "{err:?}"
        );
    }
    let took = opened_at.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "idle streams ended after {took:?}"
    );
    assert_all_alive_and_bounded(&mesh, &before);
}

/// Attack 3: 200 questions on one stream while the client reads. Most are beyond
/// --max-watch-questions and refused, but every one gets exactly one outcome (a final answer or
/// an error), none is discarded, and the stream ends OK once all are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_question_gets_an_outcome() {
    let mesh = MeshProc::start(&[]);
    let (tx, mut events) = watch_with_a_frame(&mesh, [20, 200, 40]).await;
    let msg = |kind| WatchRequest { kind: Some(kind) };
    let sender = tokio::spawn(async move {
        for i in 0..200 {
            let q = WatchQuestion {
                id: format!("q{i}"),
                prompt: "What is shown in this image?".into(),
                params: Some(SamplingParams {
                    max_tokens: Some(2),
                    ..Default::default()
                }),
                ..Default::default()
            };
            tx.send(msg(RequestKind::Question(q))).await.unwrap();
        }
        // Dropping `tx` half-closes the stream: the questions asked are still answered.
    });
    let mut outcomes = std::collections::HashMap::<String, usize>::new();
    let (mut finals, mut errors) = (0, 0);
    while let Some(m) = next_message(&mut events).await.unwrap() {
        if let Some(ResponseKind::Answer(a)) = m.kind {
            match a.kind {
                Some(AnswerKind::Final(_)) => finals += 1,
                Some(AnswerKind::Error(e)) => {
                    assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}");
                    errors += 1;
                }
                _ => continue,
            }
            *outcomes.entry(a.question_id).or_default() += 1;
        }
    }
    sender.await.unwrap();
    eprintln!("{finals} answered, {errors} refused");
    assert_eq!(outcomes.len(), 200, "questions with an outcome");
    assert!(outcomes.values().all(|&n| n == 1), "one outcome each");
    assert!(finals >= 1, "no question was answered");
    let m = scrape(&mesh.metrics_addr("gateway"));
    eprintln!(
        "frame events discarded: {}",
        counter(&m, "vlm_watch_events_discarded_total", &[])
    );
}

/// A body frame of a raw HTTP/2 request.
type BodyFrame = Result<hyper::body::Frame<Bytes>, std::io::Error>;

/// The request side of a raw HTTP/2 connection.
type H2Sender =
    hyper::client::conn::http2::SendRequest<http_body_util::StreamBody<ReceiverStream<BodyFrame>>>;

/// The TLS stream of a raw HTTP/2 connection to the gateway, without a client certificate, from
/// `source` (any 127.0.0.0/8 address: another identity per address).
async fn raw_h2(mesh: &MeshProc, source: std::net::Ipv4Addr) -> H2Sender {
    use tokio_rustls::rustls;
    let addr: std::net::SocketAddr = mesh.gateway.trim_start_matches("https://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(mesh.certs().join("ca.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// Opens a Watch stream over `send` whose first message declares `declared` bytes and sends
/// `sent` of them (then nothing more, keeping the request open while the returned sender
/// lives). The first task yields the response's status: the grpc-status header of a
/// trailers-only answer, else the trailers' once the stream ends; `None` if the stream broke
/// without one. The second yields whether all `sent` bytes were taken by the connection (which
/// takes them only as the server's flow-control window lets it send them).
async fn partial_watch_message(
    send: &mut H2Sender,
    declared: u32,
    sent: usize,
) -> (
    mpsc::Sender<BodyFrame>,
    tokio::task::JoinHandle<Option<String>>,
    tokio::task::JoinHandle<bool>,
) {
    let (tx, rx) = mpsc::channel(4);
    let req = hyper::Request::post("https://localhost/vlm.v1.Gateway/Watch")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    send.ready().await.unwrap();
    let response = send.send_request(req);
    let mut head = vec![0u8];
    head.extend_from_slice(&declared.to_be_bytes());
    tx.send(Ok(hyper::body::Frame::data(Bytes::from(head))))
        .await
        .unwrap();
    let body_tx = tx.clone();
    let sending = tokio::spawn(async move {
        let chunk = Bytes::from(vec![0x42u8; 1 << 20]);
        for _ in 0..sent >> 20 {
            if body_tx
                .send(Ok(hyper::body::Frame::data(chunk.clone())))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    });
    let status = tokio::spawn(async move {
        use http_body_util::BodyExt;
        let resp = response.await.ok()?;
        if let Some(s) = resp.headers().get("grpc-status") {
            let msg = resp.headers().get("grpc-message");
            return Some(format!("{s:?} {msg:?}"));
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.ok()?;
            if let Some(t) = frame.trailers_ref() {
                return Some(format!(
                    "{:?} {:?}",
                    t.get("grpc-status"),
                    t.get("grpc-message")
                ));
            }
        }
        None
    });
    (tx, status, sending)
}

/// Attack 4: Watch messages inside the memory budget. Two clients each open four streams whose
/// first message declares 64 MB and sends 60 MB of it, never finishing. A message is charged to
/// the budget from its header, within the client's quarter of it (64 MiB of 256 MiB): each
/// client's first message fits, its other three are refused (RESOURCE_EXHAUSTED naming
/// --max-peer-share) before their data is buffered, another client is served, and the gateway's
/// peak RSS stays within the budget plus a fixed overhead (eight such messages once took it to
/// 931 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_watch_messages_are_charged_from_their_header() {
    const BUDGET: u64 = 256 << 20;
    const OVERHEAD_KIB: u64 = 160 << 10;
    let mesh = MeshProc::start(&[("VLM_MAX_BYTES_IN_FLIGHT", &BUDGET.to_string())]);
    let before = services(&mesh);
    let declared = (64 << 20) - 64;
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut held = Vec::new();
    let mut senders = Vec::new();
    for client in 2..4u8 {
        let mut send = raw_h2(&mesh, std::net::Ipv4Addr::new(127, 0, 0, client)).await;
        for _ in 0..4 {
            let (tx, status, sending) = partial_watch_message(&mut send, declared, 60 << 20).await;
            senders.push(sending);
            let done_tx = done_tx.clone();
            tokio::spawn(async move {
                let _ = done_tx.send(status.await.ok().flatten());
            });
            held.push((tx, send.clone()));
        }
    }
    for i in 0..6 {
        let status = bounded("a refusal", done.recv()).await.unwrap();
        let status = status.unwrap_or_else(|| panic!("message {i}: the stream broke"));
        assert!(status.contains("\"8\""), "{status}"); // RESOURCE_EXHAUSTED
        assert!(status.contains("max-peer-share"), "{status}");
    }
    let normal = std::fs::read(image_path()).unwrap();
    assert_eq!(run(&mesh, ask(normal, 4)).await.unwrap(), 4, "during");
    assert!(done.try_recv().is_err(), "a first message was refused");
    // The two admitted messages' 60 MB were sent (and so read by the gateway): the peak below
    // is measured with them buffered.
    let mut delivered = 0;
    for s in senders {
        delivered += bounded("sending", s).await.unwrap() as usize;
    }
    assert_eq!(delivered, 2, "admitted messages whose data was all sent");
    let peak = peak_rss_kib(gateway_pid(&mesh));
    eprintln!("gateway peak RSS {} MiB", peak >> 10);
    assert!(
        peak < (BUDGET >> 10) + OVERHEAD_KIB,
        "gateway peaked at {peak} KiB"
    );
    drop(held);
    assert_all_alive_and_bounded(&mesh, &before);
}

fn gateway_pid(mesh: &MeshProc) -> u64 {
    services(mesh)
        .into_iter()
        .find(|(label, _)| label.starts_with("gateway"))
        .expect("a gateway")
        .1
}

/// Attack 5: decoded frames inside the memory budget. Sixteen streams (no per-peer share here:
/// the budget alone is tested) each send a 16-Mi-pixel frame (a few kB of PNG): decoding is
/// charged from the header's size before a pixel is decoded, now or never, so at most the
/// budget's worth is decoded or kept at once (the others fail with RESOURCE_EXHAUSTED), the
/// gateway's peak RSS stays within the budget plus a fixed overhead (it once reached 1.8 GB),
/// and another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoded_frames_are_charged_before_decoding() {
    const BUDGET: u64 = 256 << 20;
    const OVERHEAD_KIB: u64 = 160 << 10;
    let mesh = MeshProc::start(&[
        ("VLM_MAX_BYTES_IN_FLIGHT", &BUDGET.to_string()),
        ("VLM_MAX_PEER_SHARE", "1"),
    ]);
    let before = services(&mesh);
    let big = png(&image::RgbImage::from_pixel(
        4096,
        4096,
        image::Rgb([7, 7, 7]),
    ));
    eprintln!("a 16-Mi-pixel frame is {} bytes of PNG", big.len());
    let mut streams = Vec::new();
    for _ in 0..16 {
        let mut client = GatewayClient::new(attacker_channel(&mesh).await);
        let (tx, rx) = mpsc::channel(4);
        let events = bounded("open", client.watch(ReceiverStream::new(rx)))
            .await
            .unwrap()
            .into_inner();
        tx.send(WatchRequest {
            kind: Some(RequestKind::Frame(WatchFrame {
                data: big.clone().into(),
                timestamp: 0,
            })),
        })
        .await
        .unwrap();
        streams.push((tx, events));
    }
    let normal = std::fs::read(image_path()).unwrap();
    let t = Instant::now();
    assert_eq!(run(&mesh, ask(normal, 4)).await.unwrap(), 4, "during");
    eprintln!("a normal request during the attack took {:?}", t.elapsed());
    // Every frame was handled: decoded within the budget (or refused for want of it).
    for (_, events) in streams.iter_mut() {
        let e = next_message(events).await.unwrap().unwrap();
        let Some(ResponseKind::Frame(f)) = e.kind else {
            panic!("{e:?}")
        };
        if let Some(err) = &f.error {
            assert_eq!(err.code, Code::ResourceExhausted as i32, "{err:?}");
        }
    }
    let peak = peak_rss_kib(gateway_pid(&mesh));
    eprintln!("gateway peak RSS {} MiB", peak >> 10);
    assert!(
        peak < (BUDGET >> 10) + OVERHEAD_KIB,
        "gateway peaked at {peak} KiB"
    );
    drop(streams);
    assert_all_alive_and_bounded(&mesh, &before);
}

/// Attack 7: on a tiled model, 8 images of 8192×8192 with 4 regions each cannot fit the
/// 512-position context. The image rows are known from the images' headers, so the request is
/// refused (INVALID_ARGUMENT naming the rows and the context) in well under a second, with no
/// Encode call, and a normal request is served right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_that_cannot_fit_is_refused_before_any_encode() {
    let mesh = MeshProc::start_with(&repo().join("models/tiny-llava-next"), &["--no-cache"], &[]);
    let before = services(&mesh);
    let huge = png(&image::RgbImage::from_pixel(
        8192,
        8192,
        image::Rgb([200, 10, 10]),
    ));
    eprintln!("an 8192x8192 image is {} bytes of PNG", huge.len());
    let huge: Bytes = huge.into();
    let regions = vec![
        Region {
            x0: 0,
            y0: 0,
            x1: 500,
            y1: 500,
        },
        Region {
            x0: 500,
            y0: 0,
            x1: 1000,
            y1: 500,
        },
        Region {
            x0: 0,
            y0: 500,
            x1: 500,
            y1: 1000,
        },
        Region {
            x0: 500,
            y0: 500,
            x1: 1000,
            y1: 1000,
        },
    ];
    let req = GenerateRequest {
        image_inputs: (0..8)
            .map(|_| ImageInput {
                data: huge.clone(),
                regions: regions.clone(),
            })
            .collect(),
        prompt: format!("USER: {}\nDescribe. ASSISTANT:", "<image>".repeat(8)),
        params: Some(SamplingParams {
            max_tokens: Some(4),
            ..Default::default()
        }),
        ..Default::default()
    };
    let encodes = || {
        counter(
            &scrape(&mesh.metrics_addr("encoder")),
            "vlm_rpc_server_requests_total",
            &["method=\"Encode\""],
        )
    };
    let t = Instant::now();
    let err = run(&mesh, req)
        .await
        .expect_err("a request that cannot fit");
    let took = t.elapsed();
    eprintln!("refused in {took:?}: {}", err.message());
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("40 images and regions") && err.message().contains("512"),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    assert_eq!(encodes(), 0.0, "an Encode call for a refused request");
    let normal = std::fs::read(repo().join("models/images/next-wide-100x40.png")).unwrap();
    let mut ok = ask(normal, 4);
    ok.prompt = "USER: <image>\nDescribe. ASSISTANT:".into();
    assert_eq!(run(&mesh, ok).await.unwrap(), 4);
    assert_all_alive_and_bounded(&mesh, &before);
}
