//! End-to-end: `vlm-mesh up` as a real process tree (four services, real mTLS on loopback), driven
//! by the real `ask` binary and by a gRPC client, compared with the in-process pipeline.

use std::time::Duration;

use tonic::Code;
use vlm_model::{DType, Device, ImageLimits, Pipeline, SamplingParams};
use vlm_proto::gateway_client::GatewayClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::GenerateRequest;

mod common;
use common::*;

#[test]
fn ask_over_mtls_equals_generate_and_services_are_separate_processes() {
    let mesh = MeshProc::start(&[]);
    let info = mesh.mesh_json();
    let mut pids: Vec<u64> = info["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    let roles: Vec<&str> = info["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["encoder", "projector", "decoder", "gateway"]);
    assert!(pids.iter().all(|&p| pid_alive(p)));
    pids.push(info["launcher_pid"].as_u64().unwrap());
    pids.sort();
    pids.dedup();
    assert_eq!(
        pids.len(),
        5,
        "four services and the launcher are distinct processes"
    );

    let image = image_path();
    let model = model();
    let mut seen_cache = vec![];
    for sampling in [
        vec!["--max-tokens", "16"],
        vec![
            "--max-tokens",
            "16",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "42",
        ],
    ] {
        let mesh_out = ask_json(mesh.state.path(), &image, PROMPT, &sampling);
        let local_out = generate_json(&model, &image, PROMPT, &sampling);
        assert_eq!(
            mesh_out["token_ids"], local_out["token_ids"],
            "{sampling:?}"
        );
        assert_eq!(mesh_out["token_ids"].as_array().unwrap().len(), 16);
        assert_eq!(mesh_out["text"], local_out["text"], "{sampling:?}");
        assert_eq!(mesh_out["prompt_tokens"], local_out["prompt_tokens"]);
        assert_eq!(mesh_out["trace_id"].as_str().unwrap().len(), 32);
        // The first request encodes; the second sends the same image and hits the feature cache.
        let cache = mesh_out["timings"]["cache"][0]
            .as_str()
            .unwrap()
            .to_string();
        let encode_ms = mesh_out["timings"]["encode_ms"].as_f64().unwrap();
        match cache.as_str() {
            "miss" => assert!(encode_ms > 0.0),
            "hit" => assert_eq!(encode_ms, 0.0),
            other => panic!("unexpected cache status {other}"),
        }
        seen_cache.push(cache);
        assert!(mesh_out["timings"]["prefill_ms"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(seen_cache, ["miss", "hit"]);

    // Frequency and presence penalties (vLLM's semantics, over the generated tokens): the mesh
    // equals the in-process run, and they change what greedy decoding repeats.
    let plain = ask_json(mesh.state.path(), &image, PROMPT, &["--max-tokens", "16"]);
    let ids = |v: &serde_json::Value| -> Vec<u64> {
        v["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect()
    };
    let mut distinct = ids(&plain);
    distinct.sort();
    distinct.dedup();
    assert!(
        distinct.len() < 16,
        "the plain answer repeats a token: {plain}"
    );
    let penalties = [
        "--max-tokens",
        "16",
        "--frequency-penalty",
        "2",
        "--presence-penalty",
        "2",
    ];
    let mesh_out = ask_json(mesh.state.path(), &image, PROMPT, &penalties);
    let local_out = generate_json(&model, &image, PROMPT, &penalties);
    assert_eq!(mesh_out["token_ids"], local_out["token_ids"]);
    assert_ne!(ids(&mesh_out), ids(&plain), "the penalties changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_each_equal_their_in_process_answer() {
    let mesh = MeshProc::start(&[]);
    let image = std::fs::read(image_path()).unwrap();
    let pipeline =
        Pipeline::load(model(), DType::F32, &Device::Cpu, ImageLimits::default()).unwrap();
    let params: Vec<SamplingParams> = (0..16u64)
        .map(|i| SamplingParams {
            max_tokens: 6 + (i as u32 % 5),
            temperature: if i % 2 == 0 { 0.0 } else { 0.7 },
            top_k: if i % 3 == 0 { 20 } else { 0 },
            seed: 1000 + i,
            ..Default::default()
        })
        .collect();
    let client = mesh.client().await;
    let calls = params.iter().map(|p| {
        let mut client = client.clone();
        let req = common::request(&image, p);
        async move {
            let mut stream = bounded("the call", client.generate(req))
                .await?
                .into_inner();
            let mut ids = Vec::new();
            let mut finished = false;
            while let Some(msg) = next_message(&mut stream).await? {
                match msg.kind {
                    Some(Kind::Delta(d)) => ids.extend(d.token_ids),
                    Some(Kind::Final(_)) => finished = true,
                    None => {}
                }
            }
            assert!(finished, "stream ended without a final message");
            Ok::<_, tonic::Status>(ids)
        }
    });
    let results = futures::future::join_all(calls).await;
    for (p, got) in params.iter().zip(results) {
        let got = got.unwrap_or_else(|s| panic!("request {p:?} failed: {s:?}"));
        let want = pipeline
            .generate(&[&image], PROMPT, p, |_| {})
            .unwrap()
            .token_ids;
        assert_eq!(got, want, "{p:?}");
    }
}

async fn health(url: &str, tls: Option<tonic::transport::ClientTlsConfig>) -> Result<(), String> {
    let channel = vlm_net::connect(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    match resp.into_inner().status() {
        tonic_health::pb::health_check_response::ServingStatus::Serving => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_services_require_a_mesh_client_certificate() {
    let mesh = MeshProc::start(&[]);
    let other_ca = tempfile::tempdir().unwrap();
    vlm_net::certs::generate_dev_certs(other_ca.path(), &[]).unwrap();
    let mesh_client = vlm_net::TlsFiles::for_role(mesh.certs(), "client");
    let foreign_client = vlm_net::TlsFiles {
        ca: mesh.certs().join("ca.pem"), // trusts the mesh's server, presents a foreign identity
        cert: other_ca.path().join("client.pem"),
        key: other_ca.path().join("client.key"),
    };
    for role in ["encoder", "projector", "decoder"] {
        let addr = mesh.service_addr(role);
        let https = format!("https://{addr}");
        // (a) plaintext
        assert!(
            health(&format!("http://{addr}"), None).await.is_err(),
            "{role}: plaintext accepted"
        );
        // (b) TLS without a client certificate
        let no_cert =
            vlm_net::client_tls_without_identity(&mesh.certs().join("ca.pem"), "localhost")
                .unwrap();
        assert!(
            health(&https, Some(no_cert)).await.is_err(),
            "{role}: no client cert accepted"
        );
        // (c) a client certificate from another CA
        let foreign = vlm_net::client_tls(&foreign_client, "localhost").unwrap();
        assert!(
            health(&https, Some(foreign)).await.is_err(),
            "{role}: foreign client cert accepted"
        );
        // (d) the mesh's client certificate
        let ok = vlm_net::client_tls(&mesh_client, "localhost").unwrap();
        health(&https, Some(ok))
            .await
            .unwrap_or_else(|e| panic!("{role}: mesh cert refused: {e}"));
    }
}

async fn call(
    client: &mut GatewayClient<tonic::transport::Channel>,
    images: Vec<Vec<u8>>,
    prompt: &str,
    max_tokens: Option<u32>,
) -> Result<Vec<u32>, tonic::Status> {
    let req = GenerateRequest {
        image_inputs: vec![],
        images: images.into_iter().map(Into::into).collect(),
        prompt: prompt.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    };
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let mut ids = Vec::new();
    while let Some(msg) = next_message(&mut stream).await? {
        if let Some(Kind::Delta(d)) = msg.kind {
            ids.extend(d.token_ids);
        }
    }
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_documented_codes_and_the_mesh_keeps_serving() {
    let mesh = MeshProc::start(&[]);
    let mut client = mesh.client().await;
    let good = std::fs::read(image_path()).unwrap();
    let code = |r: Result<Vec<u32>, tonic::Status>| r.map(|_| ()).unwrap_err().code();

    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    // (what, images, prompt, max_tokens, expected code)
    type Case<'a> = (&'a str, Vec<Vec<u8>>, &'a str, Option<u32>, Code);
    let cases: Vec<Case> = vec![
        (
            "corrupt image",
            vec![truncated],
            PROMPT,
            Some(4),
            Code::InvalidArgument,
        ),
        (
            "garbage image",
            vec![b"not an image at all".to_vec()],
            PROMPT,
            Some(4),
            Code::InvalidArgument,
        ),
        (
            "empty prompt",
            vec![good.clone()],
            "",
            Some(4),
            Code::InvalidArgument,
        ),
        (
            "prompt without <image>",
            vec![good.clone()],
            "USER: hi ASSISTANT:",
            Some(4),
            Code::InvalidArgument,
        ),
        (
            "two <image> one image",
            vec![good.clone()],
            "USER: <image><image> ASSISTANT:",
            Some(4),
            Code::InvalidArgument,
        ),
        (
            "max_tokens 0",
            vec![good.clone()],
            PROMPT,
            Some(0),
            Code::InvalidArgument,
        ),
        (
            "max_tokens 1e9",
            vec![good.clone()],
            PROMPT,
            Some(1_000_000_000),
            Code::InvalidArgument,
        ),
        (
            "50 MB image",
            vec![vec![0u8; 50 << 20]],
            PROMPT,
            Some(4),
            Code::ResourceExhausted,
        ),
    ];
    for (what, images, prompt, max_tokens, want) in cases {
        let got = code(call(&mut client, images, prompt, max_tokens).await);
        assert_eq!(got, want, "{what}");
        // The mesh keeps serving: a good request right after each bad one succeeds.
        let ids = call(&mut client, vec![good.clone()], PROMPT, Some(3))
            .await
            .unwrap();
        assert_eq!(ids.len(), 3, "after {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_stops_decoding() {
    // Fault hook: the tiny model decodes a token in about a millisecond, faster than any client
    // can hang up, so the decoder is slowed down to make "mid-stream" a window that exists.
    let mesh = MeshProc::start(&[("VLM_FAULT_DECODE_DELAY_MS", "25")]);
    let mut client = mesh.client().await;
    let image = std::fs::read(image_path()).unwrap();
    let req = GenerateRequest {
        image_inputs: vec![],
        images: vec![image.into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(180),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    };
    let mut stream = bounded("the call", client.generate(req))
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    while received < 3 {
        if let Some(Kind::Delta(d)) = next_message(&mut stream).await.unwrap().unwrap().kind {
            received += d.token_ids.len();
        }
    }
    drop(stream);
    drop(client);
    let line = mesh
        .wait_for_log(&["[decoder]", "cancelled"], Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "decoder never logged a cancellation; log: {:?}",
                mesh.log.lock().unwrap()
            )
        });
    // It stopped early: far fewer than the 180 requested tokens were decoded.
    let tokens = tokens_on(&line);
    eprintln!("decoder: {line}");
    // At 25 ms a token, 60 tokens are 1.5 s of decoding after the client hung up (the cancel
    // reaches the decoder in milliseconds); without cancellation all 180 would be decoded.
    assert!(
        (3..=60).contains(&tokens),
        "{tokens} tokens decoded for a client that left after 3: {line}"
    );
}
