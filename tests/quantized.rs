//! Quantized stages through the mesh: `up --quantize …` as real processes, real mTLS, a real
//! redis-server and a real SIGKILL.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vlm_model::{DType, Device, ImageLimits, Pipeline, Quantization, SamplingParams};
use vlm_proto::generate_response::Kind;
use vlm_proto::CacheStatus;

mod common;
use common::*;

fn shapes_model() -> std::path::PathBuf {
    repo().join("models/shapes-llava")
}

/// One request to its end: the token ids and each image's cache status.
async fn generate(
    mesh: &MeshProc,
    req: vlm_proto::GenerateRequest,
    on_token: impl Fn(),
) -> Result<(Vec<u32>, Vec<CacheStatus>), tonic::Status> {
    let mut client = mesh.client().await;
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let (mut ids, mut cache) = (Vec::new(), Vec::new());
    while let Some(msg) = next_message(&mut stream).await? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                ids.extend(d.token_ids);
                on_token();
            }
            Some(Kind::Final(f)) => cache = f.timings.unwrap().cache().collect(),
            None => {}
        }
    }
    Ok((ids, cache))
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_q8_0_answers_the_demo_correctly_and_reports_its_quantization() {
    let mesh = MeshProc::start_with(&shapes_model(), &["--quantize", "q8_0"], &[]);
    let samples: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shapes_model().join("samples/samples.json")).unwrap(),
    )
    .unwrap();
    let want = samples["samples"][0]["description"].as_str().unwrap();
    let image = shapes_model().join("samples/demo.png");
    let prompt = "USER: <image>\nDescribe the image. ASSISTANT:";
    let answer = ask_json(mesh.state.path(), &image, prompt, &["--max-tokens", "24"]);
    assert_eq!(answer["text"].as_str().unwrap().trim(), want, "{answer}");
    // The same tokens as the quantized model in one process.
    let model = shapes_model();
    let local = generate_json(
        &model,
        &image,
        prompt,
        &["--quantize", "q8_0", "--max-tokens", "24"],
    );
    assert_eq!(answer["token_ids"], local["token_ids"]);

    let info = mesh
        .client()
        .await
        .get_model_info(vlm_proto::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.encoder_quantization, "q8_0");
    assert_eq!(info.projector_quantization, "q8_0");
    assert_eq!(info.decoder_quantization, "q8_0");
    // Mixed modes are per stage; an unknown mode is a CLI error that lists the choices.
    let out = std::process::Command::new(EXE)
        .args(["up", "--quantize", "decoder=q5_k"])
        .output_within(std::time::Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("none, q8_0, q4_k"), "{stderr}");
    let out = std::process::Command::new(EXE)
        .args([
            "serve",
            "decoder",
            "--listen",
            "127.0.0.1:0",
            "--quantize",
            "int8",
        ])
        .output_within(std::time::Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("invalid value 'int8'") && stderr.contains("none, q8_0, q4_k"),
        "{stderr}"
    );
}

/// An f32 encoder and a q8_0 encoder of the same checkpoint, sharing one Redis: the same image
/// bytes and preprocessing, so their features' keys can differ only by the encoders'
/// fingerprints, which name the quantization. Neither may use the other's features.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_of_a_quantized_encoder_are_never_served_to_another_quantization() {
    let redis = RedisProc::start();
    let f32_mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let q8_mesh = MeshProc::start_with(
        &model(),
        &["--redis", &redis.url(), "--quantize", "encoder=q8_0"],
        &[],
    );
    let image = std::fs::read(image_path()).unwrap();
    let req = || request(&image, &greedy(6));
    let (_, cache) = generate(&f32_mesh, req(), || {}).await.unwrap();
    assert_eq!(cache, [CacheStatus::Miss]);
    wait_for_keys(&redis, 1);
    let (_, cache) = generate(&q8_mesh, req(), || {}).await.unwrap();
    assert_eq!(
        cache,
        [CacheStatus::Miss],
        "q8_0 got the f32 encoder's features"
    );
    let keys = wait_for_keys(&redis, 2);
    assert_eq!(keys.len(), 2, "{keys:?}");
    // Each now hits its own entry.
    assert_eq!(
        generate(&f32_mesh, req(), || {}).await.unwrap().1,
        [CacheStatus::Hit]
    );
    assert_eq!(
        generate(&q8_mesh, req(), || {}).await.unwrap().1,
        [CacheStatus::Hit]
    );
}

/// Stores happen off the request path; waits (bounded) until Redis holds `n` feature keys.
fn wait_for_keys(redis: &RedisProc, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let keys = redis.feature_keys();
        if keys.len() >= n {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "redis never held {n} keys: {keys:?}"
        );
        // Polling an external process's state, bounded above; not a synchronisation sleep.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two q8_0 decoder replicas, one killed mid-stream: every request still ends with exactly the
/// tokens of the q8_0 model in one process (the replacement replays the streamed tokens on the
/// same quantized weights).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoder_failover_between_quantized_replicas_keeps_identical_output() {
    let mesh = MeshProc::start_with(
        &model(),
        &["--quantize", "q8_0", "--replicas", "decoder=2"],
        &[
            ("VLM_FAULT_DECODE_DELAY_MS", "15"),
            ("VLM_HEALTH_INTERVAL_MS", "200"),
        ],
    );
    let decoders: Vec<u64> = mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["role"] == "decoder" && s["replica"] == 1)
        .map(|s| s["pid"].as_u64().unwrap())
        .collect();
    assert_eq!(decoders.len(), 1);
    let image = std::fs::read(image_path()).unwrap();
    let local = Pipeline::load_quantized(
        model(),
        DType::F32,
        &Device::Cpu,
        ImageLimits::default(),
        Quantization::Q8_0,
    )
    .unwrap();
    let params: Vec<SamplingParams> = (0..16u64)
        .map(|i| SamplingParams {
            max_tokens: 16 + (i as u32 % 4),
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            seed: 9100 + i,
            ..Default::default()
        })
        .collect();
    let seen = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in &params {
        let (req, seen) = (request(&image, p), seen.clone());
        let mesh = &mesh;
        tasks.push(async move {
            generate(mesh, req, || {
                seen.fetch_add(1, Ordering::Relaxed);
            })
            .await
        });
    }
    let all = futures::future::join_all(tasks);
    let kill = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.load(Ordering::Relaxed) < 16 {
            assert!(Instant::now() < deadline, "no tokens flowing");
            // Polling a counter the streams advance, bounded above.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // SAFETY: kill(2) on a decoder this test's mesh started.
        assert_eq!(unsafe { libc::kill(decoders[0] as i32, libc::SIGKILL) }, 0);
    };
    let (results, ()) = tokio::join!(all, kill);
    for (p, r) in params.iter().zip(results) {
        let (ids, _) = r.unwrap_or_else(|s| panic!("{p:?} failed: {s:?}"));
        let want = local
            .generate(&[&image], PROMPT, p, |_| {})
            .unwrap()
            .token_ids;
        assert_eq!(ids, want, "{p:?}");
    }
    let resumed = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("resuming on another replica"))
        .filter(|l| !l.contains("tokens=0"))
        .count();
    assert!(
        resumed > 0,
        "no stream was resumed mid-stream; log: {:?}",
        mesh.log.lock().unwrap()
    );
}
