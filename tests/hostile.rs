//! Hostile input against a real mesh (`up --replicas encoder=2`): each attack gets its documented
//! status, every stage process survives it with bounded memory (peak RSS read from /proc), and a
//! normal request succeeds during and after it.

use std::time::Duration;

use tonic::Code;
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateRequest, SamplingParams};

mod common;
use common::*;

/// Peak resident memory any stage of the tiny model may reach while being attacked. A healthy
/// tiny-model stage peaks around 100–200 MiB; the attacks below once asked for 2–68 GB.
const STAGE_PEAK_RSS_BOUND_KIB: u64 = 1 << 20;

/// A PNG whose header declares `w`×`h` pixels. Its pixel data is a 4×4 image's, so the forgery
/// is tiny, but every check that matters runs on the header before any pixel is decoded (a real
/// 67,108,864×1 PNG is 195,785 bytes and reaches the same checks).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(4, 4, image::Rgb([200, 30, 30]));
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).unwrap();
    let mut png = png.into_inner();
    // IHDR data starts at byte 16: width, height (big-endian u32); its CRC is at 29..33.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn ask(image: Vec<u8>, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        images: vec![image.into()],
        prompt: PROMPT.into(),
        params: Some(SamplingParams {
            max_tokens: Some(max_tokens),
            top_p: 1.0,
            ..Default::default()
        }),
        monitor_layers: false,
    }
}

/// The request's answer (its token count), or the status it failed with.
async fn run(mesh: &MeshProc, req: GenerateRequest) -> Result<usize, tonic::Status> {
    let mut client = mesh.client().await;
    let mut r = tonic::Request::new(req);
    r.set_timeout(Duration::from_secs(120));
    let mut stream = client.generate(r).await?.into_inner();
    let mut tokens = 0;
    while let Some(msg) = stream.message().await? {
        if let Some(Kind::Delta(d)) = msg.kind {
            tokens += d.token_ids.len();
        }
    }
    Ok(tokens)
}

/// (label, pid) of every service `up` started.
fn services(mesh: &MeshProc) -> Vec<(String, u64)> {
    mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                format!("{}#{}", s["role"].as_str().unwrap(), s["replica"]),
                s["pid"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Peak resident set size (VmHWM) of a live process, in KiB.
fn peak_rss_kib(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmHWM in /proc/PID/status")
}

/// Every service started is still the same live process, and none peaked above the bound.
fn assert_all_alive_and_bounded(mesh: &MeshProc, before: &[(String, u64)]) {
    assert_eq!(services(mesh), before, "a service was restarted");
    for (label, pid) in before {
        assert!(pid_alive(*pid), "{label} (pid {pid}) died");
        let peak = peak_rss_kib(*pid);
        eprintln!("{label}: peak RSS {} MiB", peak / 1024);
        assert!(
            peak < STAGE_PEAK_RSS_BOUND_KIB,
            "{label} peaked at {peak} KiB (bound {STAGE_PEAK_RSS_BOUND_KIB} KiB)"
        );
    }
}

/// Attack 1: extreme aspect ratios, which once made every encoder replica abort in turn (the
/// resize target of 67,108,864×1 was a 68 GB buffer) or spend 22 s and 2 GB each (1×65,535).
/// Now: INVALID_ARGUMENT from the header, no retry on the other replica, nothing allocated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extreme_aspect_ratios_are_refused_and_no_encoder_dies() {
    let mesh = MeshProc::start_with(&model(), &["--replicas", "encoder=2", "--no-cache"], &[]);
    let before = services(&mesh);
    let normal = std::fs::read(image_path()).unwrap();
    let during = tokio::spawn({
        let (gateway, certs) = (mesh.gateway.clone(), mesh.certs());
        let req = ask(normal.clone(), 8);
        async move {
            let files = vlm_net::TlsFiles::for_role(certs, "client");
            let tls = vlm_net::client_tls(&files, "localhost").unwrap();
            let channel = vlm_net::connect(&gateway, Some(tls)).await.unwrap();
            let mut client = vlm_proto::gateway_client::GatewayClient::new(channel);
            let mut stream = client.generate(req).await?.into_inner();
            let mut tokens = 0;
            while let Some(msg) = stream.message().await? {
                if let Some(Kind::Delta(d)) = msg.kind {
                    tokens += d.token_ids.len();
                }
            }
            Ok::<_, tonic::Status>(tokens)
        }
    });
    for (w, h) in [
        (67_108_864, 1),
        (1, 67_108_864),
        (1, 65_535),
        (65_535, 1),
        (201, 1),
    ] {
        for _ in 0..2 {
            let err = run(&mesh, ask(png_declaring(w, h), 4))
                .await
                .expect_err("an extreme aspect ratio was accepted");
            assert_eq!(err.code(), Code::InvalidArgument, "{w}x{h}: {err:?}");
            assert!(err.message().contains("aspect ratio"), "{w}x{h}: {err:?}");
            assert!(err.message().contains(&format!("{w}x{h}")), "{err:?}");
        }
    }
    assert_eq!(
        during.await.unwrap().unwrap(),
        8,
        "a normal request during the attack"
    );
    assert_eq!(
        run(&mesh, ask(normal, 8)).await.unwrap(),
        8,
        "after the attack"
    );
    // The refusal is the caller's fault: the gateway did not try the image on the other replica.
    let retried = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("trying another replica"))
        .cloned()
        .collect::<Vec<_>>();
    assert!(retried.is_empty(), "{retried:?}");
    assert_all_alive_and_bounded(&mesh, &before);
}

/// A message that is not a valid `GenerateRequest`: field 1 (`images`, bytes) sent as a varint.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAGenerateRequest {
    #[prost(uint64, tag = "1")]
    images: u64,
}

/// Attack 7: input that used to come back as the wrong status or grow the server's state: a
/// 100 kB stop string (echoed into the error, past the peer's header limit: a transport error),
/// a request that is not valid protobuf (INTERNAL), made-up method names (one metric series each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clear_statuses_and_bounded_state() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let before = services(&mesh);
    let normal = std::fs::read(image_path()).unwrap();

    let mut huge_stop = ask(normal.clone(), 4);
    huge_stop.params.as_mut().unwrap().stop = vec!["x".repeat(100_000)];
    let err = run(&mesh, huge_stop).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stop[0] is 100000 bytes"), "{err:?}");
    assert!(err.message().len() <= 1024, "{} bytes", err.message().len());

    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "client");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let channel = vlm_net::connect(&mesh.gateway, Some(tls)).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let call = |path: &'static str| {
        let mut grpc = grpc.clone();
        async move {
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<NotAGenerateRequest, vlm_proto::GenerateResponse>::default();
            let req = tonic::Request::new(NotAGenerateRequest { images: 7 });
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            match grpc.server_streaming(req, path, codec).await {
                Ok(resp) => resp.into_inner().message().await.map(|_| ()),
                Err(s) => Err(s),
            }
        }
    };
    let err = call("/vlm.v1.Gateway/Generate").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("decode"), "{err:?}");

    let made_up = [
        "/vlm.v1.Gateway/Aq1",
        "/vlm.v1.Gateway/Bz2",
        "/vlm.v1.Gateway/Cx3",
        "/vlm.v1.Gateway/Dw4",
        "/vlm.v1.Gateway/Ev5",
    ];
    for path in made_up {
        let err = call(path).await.unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{path}: {err:?}");
    }
    grpc.ready().await.unwrap();
    let text = scrape(&mesh.metrics_addr("gateway"));
    for path in made_up {
        let method = path.rsplit('/').next().unwrap();
        assert!(
            !text.contains(&format!("method=\"{method}\"")),
            "{method} has its own series"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("vlm_rpc_server_requests_total")
                && l.contains("method=\"unknown\"")
                && l.contains("code=\"12\"")),
        "no `unknown` series for the made-up methods:\n{text}"
    );
    assert_eq!(
        run(&mesh, ask(normal, 4)).await.unwrap(),
        4,
        "after the attack"
    );
    assert_all_alive_and_bounded(&mesh, &before);
}

/// The decoder's Generate, called directly as a mesh peer would, with this setup; the status it
/// ends with (or OK once it starts answering).
async fn decode_setup(mesh: &MeshProc, setup: vlm_proto::DecodeSetup) -> Result<(), tonic::Status> {
    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "gateway");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let url = format!("https://{}", mesh.service_addr("decoder"));
    let channel = vlm_net::connect(&url, Some(tls)).await.unwrap();
    let mut client = vlm_proto::decoder_client::DecoderClient::new(channel);
    let first = vlm_proto::DecodeRequest {
        kind: Some(vlm_proto::decode_request::Kind::Setup(setup)),
    };
    let mut req = tonic::Request::new(tokio_stream::iter(vec![first]));
    req.set_timeout(Duration::from_secs(60));
    let mut events = client.generate(req).await?.into_inner();
    events.message().await.map(|_| ())
}

/// Attack 4: a mesh peer claiming 4,294,967,295 feature rows for one image (17 GB allocated before
/// the context check), 250,000,000 rows (1 GB), a million image slots, and a 1 MiB prompt
/// (tokenised before admission: 700k tokens, 435 MB). All are refused from their sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_a_peer_sends_the_decoder_are_checked_before_allocation() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let before = services(&mesh);
    let setup = |prompt: String, rows: Vec<u32>| vlm_proto::DecodeSetup {
        prompt,
        params: Some(SamplingParams {
            max_tokens: Some(4),
            top_p: 1.0,
            ..Default::default()
        }),
        images: rows
            .into_iter()
            .map(|rows| vlm_proto::ImageSlot { rows })
            .collect(),
        ..Default::default()
    };
    for rows in [vec![u32::MAX], vec![250_000_000], vec![1; 1_000_000]] {
        let n = rows.len();
        let err = decode_setup(&mesh, setup(PROMPT.into(), rows))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{n} slots: {err:?}");
        assert!(err.message().contains("context"), "{err:?}");
    }
    let huge = format!("USER: <image>\n{} ASSISTANT:", "describe ".repeat(117_000));
    let err = decode_setup(&mesh, setup(huge, vec![0])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("bytes"), "{err:?}");
    let normal = std::fs::read(image_path()).unwrap();
    assert_eq!(
        run(&mesh, ask(normal, 4)).await.unwrap(),
        4,
        "after the attack"
    );
    assert_all_alive_and_bounded(&mesh, &before);
}

/// Attack 2: one TLS connection opens 130 calls that send headers and never a message. They
/// once held all 64 slots and 64 queue places of the gateway for as long as the connection
/// lived; now they hold none (admission happens after the first message), each ends at its
/// deadline (or after the first-message timeout), and other clients are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_that_never_send_a_message_hold_no_slot() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let before = services(&mesh);
    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "client");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let channel = vlm_net::connect(&mesh.gateway, Some(tls)).await.unwrap();
    let (opened_tx, mut opened) = tokio::sync::mpsc::unbounded_channel();
    let mut stalled = Vec::new();
    for _ in 0..130 {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let opened_tx = opened_tx.clone();
        stalled.push(tokio::spawn(async move {
            grpc.ready().await.unwrap();
            let _ = opened_tx.send(());
            let codec =
                tonic_prost::ProstCodec::<GenerateRequest, vlm_proto::GenerateResponse>::default();
            let mut req = tonic::Request::new(futures::stream::pending::<GenerateRequest>());
            req.set_timeout(Duration::from_secs(5));
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/vlm.v1.Gateway/Generate");
            grpc.client_streaming(req, path, codec).await.map(|_| ())
        }));
    }
    for _ in 0..130 {
        opened.recv().await.unwrap();
    }
    // Wait until the gateway has them open (one connection's worth: 128 streams).
    let metrics = mesh.metrics_addr("gateway");
    let open_calls = || {
        scrape(&metrics)
            .lines()
            .find(|l| {
                l.starts_with("vlm_rpc_server_in_flight{") && l.contains("method=\"Generate\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let waited = std::time::Instant::now();
    while open_calls() < 128.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "the stalled calls never opened"
        );
        tokio::task::yield_now().await;
    }
    // Served while the stalled calls are open (a new connection, as another client).
    let normal = std::fs::read(image_path()).unwrap();
    assert_eq!(
        run(&mesh, ask(normal.clone(), 4)).await.unwrap(),
        4,
        "during the attack"
    );
    for call in stalled {
        let err = call
            .await
            .unwrap()
            .expect_err("a call without a message succeeded");
        assert!(
            matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{err:?}"
        );
    }
    assert_eq!(
        run(&mesh, ask(normal, 4)).await.unwrap(),
        4,
        "after the attack"
    );
    assert_all_alive_and_bounded(&mesh, &before);
}

/// The test image with a private ancillary PNG chunk of `extra` bytes before IEND: decoders skip
/// it, so the image is the same, only `extra` bytes larger.
fn padded_png(extra: usize) -> Vec<u8> {
    let png = std::fs::read(image_path()).unwrap();
    let (body, iend) = png.split_at(png.len() - 12);
    let mut chunk = Vec::with_capacity(extra + 12);
    chunk.extend_from_slice(&(extra as u32).to_be_bytes());
    chunk.extend_from_slice(b"vlMp");
    chunk.resize(8 + extra, 0x5a);
    let crc = crc32fast::hash(&chunk[4..]);
    chunk.extend_from_slice(&crc.to_be_bytes());
    [body, &chunk, iend].concat()
}

/// One series' value from a Prometheus text exposition (0 when absent).
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls the gateway's metrics until `ok` holds of them (30 s at most).
async fn wait_for_metrics(mesh: &MeshProc, what: &str, ok: impl Fn(&str) -> bool) {
    let addr = mesh.metrics_addr("gateway");
    let started = std::time::Instant::now();
    loop {
        if ok(&scrape(&addr)) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never saw {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw HTTP/1.1 POST over TLS to the gateway's OpenAI port that declares `declared` body
/// bytes and sends only `sent` of them; the response's status line and body as far as read.
async fn post_declaring(mesh: &MeshProc, declared: usize, sent: usize) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    let addr = mesh
        .ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("openai=https://"))
        .and_then(|u| u.strip_suffix("/v1"))
        .expect("an openai= URL on the ready line")
        .to_string();
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(mesh.certs().join("ca.pem")).unwrap();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and stop reading) before the body is sent: writing may fail then.
    let _ = tls.write_all(&vec![b' '; sent]).await;
    let _ = tls.flush().await;
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&response);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                });
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 30 s");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line in {text:?}"));
    (status, text)
}

/// Attack 3: memory admitted by count, not bytes. Every service now holds request data against a
/// byte budget (`--max-bytes-in-flight`, 128 KiB here): a request larger than the whole budget is
/// refused at once (gRPC message, decoder embeddings, HTTP body, before any of it is read); one
/// that does not fit now waits for room while a slot is free; concurrent 30 MB POSTs that once
/// took the gateway from 16 MB to 723 MB are refused before their bodies are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_is_admitted_by_bytes_not_by_count() {
    const BUDGET: usize = 128 << 10;
    let mesh = MeshProc::start_with(
        &model(),
        &["--no-cache", "--http-listen", "127.0.0.1:0"],
        &[
            ("VLM_MAX_BYTES_IN_FLIGHT", &BUDGET.to_string()),
            // Requests long enough for one to hold memory while another arrives.
            ("VLM_FAULT_ENCODE_DELAY_MS", "1000"),
        ],
    );
    let before = services(&mesh);
    let used = r#"vlm_memory_budget_bytes{service="vlm.v1.Gateway",state="used"}"#;
    let waiting = r#"vlm_memory_budget_waiting{service="vlm.v1.Gateway"}"#;
    wait_for_metrics(&mesh, "the gateway's budget", |m| {
        series(
            m,
            r#"vlm_memory_budget_bytes{service="vlm.v1.Gateway",state="limit"}"#,
        ) == BUDGET as f64
    })
    .await;

    // Larger than the whole budget: refused from its declared length.
    let err = run(&mesh, ask(padded_png(BUDGET + 1024), 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("whole memory budget"), "{err:?}");

    // Two requests of 70 KiB each: the second waits for the first's memory (64 slots are free),
    // then is served.
    let holder = tokio::spawn({
        let mesh_req = ask(padded_png(70 << 10), 40);
        let mut client = mesh.client().await;
        async move {
            let mut stream = client.generate(mesh_req).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(std::time::Instant::now())
        }
    });
    wait_for_metrics(&mesh, "the first request's memory held", |m| {
        series(m, used) >= (70 << 10) as f64
    })
    .await;
    let second = tokio::spawn({
        let req = ask(padded_png(70 << 10), 4);
        let mut client = mesh.client().await;
        async move {
            let mut stream = client.generate(req).await?.into_inner();
            while stream.message().await?.is_some() {}
            Ok::<_, tonic::Status>(std::time::Instant::now())
        }
    });
    wait_for_metrics(&mesh, "the second request waiting for memory", |m| {
        series(m, waiting) == 1.0
    })
    .await;
    assert!(!holder.is_finished(), "the first request ended too soon");
    let (first_done, second_done) = (holder.await.unwrap(), second.await.unwrap());
    let (first_done, second_done) = (first_done.unwrap(), second_done.unwrap());
    assert!(second_done > first_done, "the second ran beside the first");
    wait_for_metrics(&mesh, "the budget given back", |m| series(m, used) == 0.0).await;

    // A peer's decoder setup whose embeddings could never fit the decoder's budget: refused
    // before any embedding is sent (200 rows of 64 floats, twice, plus the prompt's matrix:
    // 157 KB).
    let prompt = format!("USER: {}\nWhat is shown? ASSISTANT:", "<image>".repeat(20));
    let setup = vlm_proto::DecodeSetup {
        prompt,
        params: Some(SamplingParams {
            max_tokens: Some(4),
            top_p: 1.0,
            ..Default::default()
        }),
        images: vec![vlm_proto::ImageSlot { rows: 10 }; 20],
        ..Default::default()
    };
    let err = decode_setup(&mesh, setup).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("whole memory budget"), "{err:?}");

    // Twenty concurrent chat completions declaring 30 MB bodies: each refused (503) before its
    // body is read.
    let posts: Vec<_> = (0..20)
        .map(|_| post_declaring(&mesh, 30_000_000, 64 << 10))
        .collect();
    for (status, text) in futures::future::join_all(posts).await {
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("whole memory budget"), "{text}");
    }

    let normal = std::fs::read(image_path()).unwrap();
    assert_eq!(
        run(&mesh, ask(normal, 4)).await.unwrap(),
        4,
        "after the attack"
    );
    assert_all_alive_and_bounded(&mesh, &before);
}
