//! Hostile input, attack 3 (memory admitted by count, not bytes), against a real mesh: each
//! service holds request data against a byte budget; see `hostile.rs` for the other attacks.

use std::time::Duration;

use tonic::Code;
use vlm_proto::SamplingParams;

mod common;
use common::attack::*;
use common::*;

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

/// Runs `req` in the background; when it has ended, its end time.
async fn finish_time(
    mesh: &MeshProc,
    req: vlm_proto::GenerateRequest,
) -> tokio::task::JoinHandle<Result<std::time::Instant, tonic::Status>> {
    let mut client = mesh.client().await;
    tokio::spawn(async move {
        let mut stream = bounded("the call", client.generate(req))
            .await?
            .into_inner();
        while next_message(&mut stream).await?.is_some() {}
        Ok(std::time::Instant::now())
    })
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
            // The whole budget for one client (hostile_peers.rs checks the per-peer share).
            ("VLM_MAX_PEER_SHARE", "1"),
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
    let refused = r#"vlm_memory_budget_refused_total{service="vlm.v1.Gateway"}"#;
    wait_for_metrics(&mesh, "the refusal counted", |m| series(m, refused) == 1.0).await;

    // Two requests of 70 KiB each: the second waits for the first's memory (64 slots are free),
    // then is served.
    let holder = finish_time(&mesh, ask(padded_png(70 << 10), 40)).await;
    wait_for_metrics(&mesh, "the first request's memory held", |m| {
        series(m, used) >= (70 << 10) as f64
    })
    .await;
    let second = finish_time(&mesh, ask(padded_png(70 << 10), 4)).await;
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
        images: vec![
            vlm_proto::ImageSlot {
                rows: 10,
                ..Default::default()
            };
            20
        ],
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
