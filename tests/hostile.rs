//! Hostile input against a real mesh (`up --replicas encoder=2`): each attack gets its documented
//! status, every stage process survives it with bounded memory (peak RSS read from /proc), and a
//! normal request succeeds during and after it.

use std::time::Duration;

use tonic::Code;
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateRequest, SamplingParams};

mod common;
use common::attack::*;
use common::*;

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
            let mut stream = bounded("the call", client.generate(req))
                .await?
                .into_inner();
            let mut tokens = 0;
            while let Some(msg) = next_message(&mut stream).await? {
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
                Ok(resp) => next_message(&mut resp.into_inner()).await.map(|_| ()),
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
            .map(|rows| vlm_proto::ImageSlot {
                rows,
                ..Default::default()
            })
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
/// deadline (or after the first-message timeout), and other clients are served meanwhile. The
/// per-peer share is off here (the normal client presents the same certificate):
/// `hostile_peers.rs` checks that one client holds at most its share of these calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_that_never_send_a_message_hold_no_slot() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[("VLM_MAX_PEER_SHARE", "1")]);
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
