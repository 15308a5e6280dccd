//! The shared feature cache end to end: a real mesh (`vlm-mesh up --redis …`) against a private
//! real redis-server that the tests stop, restart and tamper with.

use std::time::Duration;

use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{CacheStatus, EncoderInfoRequest, GenerateRequest};

mod common;
use common::*;

struct Answer {
    ids: Vec<u32>,
    cache: Vec<CacheStatus>,
    encode_ms: f64,
}

async fn generate(mesh: &MeshProc, image: &[u8]) -> Answer {
    let answer = try_generate(mesh, image).await.expect("generate");
    assert_eq!(answer.ids.len(), 8);
    answer
}

async fn try_generate(mesh: &MeshProc, image: &[u8]) -> Result<Answer, tonic::Status> {
    let mut client = mesh.client().await;
    let req = GenerateRequest {
        image_inputs: vec![],
        images: vec![image.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(8),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    };
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let mut answer = Answer {
        ids: vec![],
        cache: vec![],
        encode_ms: -1.0,
    };
    while let Some(msg) = next_message(&mut stream).await? {
        match msg.kind {
            Some(Kind::Delta(d)) => answer.ids.extend(d.token_ids),
            Some(Kind::Final(f)) => {
                let t = f.timings.unwrap();
                answer.cache = t.cache().collect();
                answer.encode_ms = t.encode_ms;
            }
            None => {}
        }
    }
    Ok(answer)
}

/// Encode calls the mesh's encoder has accepted (its own counter, read over mTLS as the gateway).
async fn encoder_requests(mesh: &MeshProc) -> u64 {
    let channel = mesh
        .stage_channel(&mesh.service_addr("encoder"), "gateway")
        .await;
    EncoderClient::new(channel)
        .info(EncoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests_total
}

/// Stores happen off the request path; wait (bounded) until Redis holds `n` feature keys.
fn wait_for_keys(redis: &RedisProc, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let keys = redis.feature_keys();
        if keys.len() >= n {
            return keys;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "redis never held {n} feature keys: {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn image() -> Vec<u8> {
    std::fs::read(image_path()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_request_is_a_hit_and_never_reaches_the_encoder() {
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let first = generate(&mesh, &image()).await;
    assert_eq!(first.cache, [CacheStatus::Miss]);
    assert!(first.encode_ms > 0.0);
    wait_for_keys(&redis, 1);
    let calls = encoder_requests(&mesh).await;
    assert_eq!(calls, 1);

    let second = generate(&mesh, &image()).await;
    assert_eq!(second.cache, [CacheStatus::Hit]);
    assert_eq!(second.encode_ms, 0.0);
    assert_eq!(
        second.ids, first.ids,
        "features from the cache must give the same tokens"
    );
    assert_eq!(
        encoder_requests(&mesh).await,
        calls,
        "a hit must not call the encoder"
    );

    // `ask --json` reports it too.
    let state = mesh.state.path().to_str().unwrap().to_string();
    let img = image_path();
    let out = run_json(&[
        "ask",
        "--state-dir",
        &state,
        "--image",
        img.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(out["timings"]["cache"], serde_json::json!(["hit"]));
    assert_eq!(out["timings"]["encode_ms"], 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_never_share_features() {
    let redis = RedisProc::start();
    let a = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    // The same model with one vision weight changed: the same preprocessing and shapes, so the two
    // keys can differ only through the encoder's fingerprint.
    let other = model_with_other_vision_weights();
    let b = MeshProc::start_with(other.path(), &["--redis", &redis.url()], &[]);
    let img = image();
    assert_eq!(generate(&a, &img).await.cache, [CacheStatus::Miss]);
    wait_for_keys(&redis, 1);
    // Same image bytes, another model: must not hit model A's features.
    let prompt_b = generate(&b, &img).await;
    assert_eq!(prompt_b.cache, [CacheStatus::Miss]);
    let keys = wait_for_keys(&redis, 2);
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_ne!(keys[0], keys[1]);
    assert_eq!(generate(&a, &img).await.cache, [CacheStatus::Hit]);
    assert_eq!(generate(&b, &img).await.cache, [CacheStatus::Hit]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_degrades_to_error_and_caching_resumes_after_restart() {
    let mut redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let img = image();
    let first = generate(&mesh, &img).await;
    wait_for_keys(&redis, 1);

    redis.kill();
    for _ in 0..3 {
        let a = generate(&mesh, &img).await;
        assert_eq!(a.cache, [CacheStatus::Error], "Redis is down");
        assert_eq!(a.ids, first.ids);
    }
    assert!(mesh
        .wait_for_log(
            &["[gateway]", "feature cache lookup failed"],
            Duration::from_secs(10)
        )
        .is_some());

    // Same port, empty (no persistence). The gateway reconnects on its own: the first request may
    // still see the dead connection (error), after that the cache works again.
    redis.restart();
    assert!(redis.feature_keys().is_empty());
    let mut statuses = vec![];
    for _ in 0..20 {
        let a = generate(&mesh, &img).await;
        assert_eq!(a.ids, first.ids);
        statuses.push(a.cache[0]);
        if a.cache[0] != CacheStatus::Error {
            break;
        }
    }
    assert_ne!(
        statuses.last(),
        Some(&CacheStatus::Error),
        "caching never resumed: {statuses:?}"
    );
    wait_for_keys(&redis, 1);
    assert_eq!(
        generate(&mesh, &img).await.cache,
        [CacheStatus::Hit],
        "after {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_value_is_deleted_and_recomputed() {
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let img = image();
    let first = generate(&mesh, &img).await;
    let key = wait_for_keys(&redis, 1).remove(0);
    let calls = encoder_requests(&mesh).await;

    redis
        .cmd(&["SET", &key, "VLMT-this-is-not-a-tensor"])
        .unwrap();
    let second = generate(&mesh, &img).await;
    assert_eq!(
        second.cache,
        [CacheStatus::Miss],
        "a corrupt value is a miss"
    );
    assert_eq!(second.ids, first.ids, "the answer stays correct");
    assert_eq!(
        encoder_requests(&mesh).await,
        calls + 1,
        "recomputed by the encoder"
    );

    // The recomputed value replaces the corrupt one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while redis
        .cmd(&["GET", &key])
        .unwrap()
        .contains("this-is-not-a-tensor")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "corrupt value never replaced"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let third = generate(&mesh, &img).await;
    assert_eq!(third.cache, [CacheStatus::Hit]);
    assert_eq!(third.ids, first.ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_misses_call_the_encoder_once() {
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let img = image();
    let answers = futures::future::join_all((0..32).map(|_| generate(&mesh, &img))).await;
    assert_eq!(
        encoder_requests(&mesh).await,
        1,
        "32 identical cold requests must encode once"
    );
    for a in &answers[1..] {
        assert_eq!(a.ids, answers[0].ids);
    }
    let misses = answers
        .iter()
        .filter(|a| a.cache == [CacheStatus::Miss])
        .count();
    assert_eq!(
        misses, 1,
        "exactly one request encoded; the others shared its features"
    );
}

/// A copy of `model()` with one vision weight changed: an encoder of other weights, same shapes,
/// same preprocessing (so a feature key can differ only through the encoder's fingerprint).
fn model_with_other_vision_weights() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let path = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let name = "vision_tower.embeddings.patch_embedding.weight";
    let start = header[name]["data_offsets"][0]
        .as_u64()
        .unwrap_or_else(|| panic!("{name} not in the checkpoint")) as usize;
    assert_eq!(header[name]["dtype"], "F32");
    let at = 8 + header_len + start;
    let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) + 0.5;
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    dir
}

/// Each stage's own `Info` fingerprint, asked over mTLS as the gateway.
async fn stage_fingerprints(mesh: &MeshProc) -> [String; 3] {
    use vlm_proto::decoder_client::DecoderClient;
    use vlm_proto::projector_client::ProjectorClient;
    let channel = |role: &str| {
        let addr = mesh.service_addr(role);
        async move { mesh.stage_channel(&addr, "gateway").await }
    };
    let encoder = EncoderClient::new(channel("encoder").await)
        .info(EncoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_fingerprint;
    let projector = ProjectorClient::new(channel("projector").await)
        .info(vlm_proto::ProjectorInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_fingerprint;
    let decoder = DecoderClient::new(channel("decoder").await)
        .info(vlm_proto::DecoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model_fingerprint;
    [encoder, projector, decoder]
}

async fn model_info(mesh: &MeshProc) -> vlm_proto::ModelInfo {
    let mut client = mesh.client().await;
    client
        .get_model_info(vlm_proto::GetModelInfoRequest {})
        .await
        .expect("GetModelInfo")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_swapped_for_other_weights_never_gets_the_old_features() {
    let redis = RedisProc::start();
    // The test replaces the encoder itself (`up` would restart the old one on its address).
    let mesh = MeshProc::start_with(
        &model(),
        &["--redis", &redis.url(), "--restart", "never"],
        &[("VLM_HEALTH_INTERVAL_MS", "100")],
    );
    // GetModelInfo reports the stages' own fingerprints.
    let [enc, proj, dec] = stage_fingerprints(&mesh).await;
    let info = model_info(&mesh).await;
    for (got, want) in [
        (&info.encoder_fingerprint, &enc),
        (&info.projector_fingerprint, &proj),
        (&info.decoder_fingerprint, &dec),
    ] {
        assert_eq!(got.len(), 64, "{info:?}");
        assert_eq!(got, want);
    }
    assert_eq!(info.fingerprint.len(), 64);
    assert!(info.context_length > 0 && info.image_tokens > 0, "{info:?}");

    let img = image();
    assert_eq!(generate(&mesh, &img).await.cache, [CacheStatus::Miss]);
    wait_for_keys(&redis, 1);
    assert_eq!(generate(&mesh, &img).await.cache, [CacheStatus::Hit]);

    // Swap the encoder under the running gateway: same address, other weights.
    let other = model_with_other_vision_weights();
    let addr = mesh.service_addr("encoder");
    let pid = mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == "encoder")
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    // SAFETY: kill(2) on the encoder process this test's mesh started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    while pid_alive(pid) {
        std::thread::yield_now(); // until the kernel has reaped it and freed the port
    }
    let mut swapped = std::process::Command::new(EXE)
        .args(["serve", "encoder", "--listen", &addr, "--model"])
        .arg(other.path())
        .arg("--tls-dir")
        .arg(mesh.certs())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(swapped.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("listening "), "{line:?}");

    // The gateway may first see the dead connection (UNAVAILABLE) until it re-admits the
    // replica; every answer it gives must come from the new encoder's features.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let first = loop {
        match try_generate(&mesh, &img).await {
            Ok(a) => break a,
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(std::time::Instant::now() < deadline, "{s:?}");
                mesh.wait_for_log(&["[gateway]", "healthy again"], Duration::from_secs(2));
            }
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(
        first.cache,
        [CacheStatus::Miss],
        "the old encoder's features must not be used"
    );
    assert!(first.encode_ms > 0.0);
    assert_eq!(generate(&mesh, &img).await.cache, [CacheStatus::Hit]);
    let keys = wait_for_keys(&redis, 2);
    assert_eq!(keys.len(), 2, "a second key, for the new weights: {keys:?}");
    assert_eq!(
        encoder_requests(&mesh).await,
        1,
        "the new encoder encoded the image once (the old features were not used)"
    );
    let info = model_info(&mesh).await;
    let [new_enc, _, _] = stage_fingerprints(&mesh).await;
    assert_ne!(new_enc, enc);
    assert_eq!(info.encoder_fingerprint, new_enc, "identity asked again");
    let _ = swapped.kill();
    let _ = swapped.wait();
}

/// A value moved under another image's key (what a writer to Redis could do) verifies for the
/// key it was computed for only: the other image's request is a miss, recomputed, answered
/// correctly, and the moved value is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_moved_under_another_key_are_refused_and_replaced() {
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let a = image();
    let b = std::fs::read(repo().join("models/images/shapes-64x40.png")).unwrap();
    generate(&mesh, &a).await;
    let key_a = wait_for_keys(&redis, 1).remove(0);
    let first_b = generate(&mesh, &b).await;
    let key_b = wait_for_keys(&redis, 2)
        .into_iter()
        .find(|k| *k != key_a)
        .unwrap();
    let calls = encoder_requests(&mesh).await;
    redis
        .cmd(&["COPY", &key_a, &key_b, "REPLACE"])
        .expect("COPY");
    let again = generate(&mesh, &b).await;
    assert_eq!(
        again.cache,
        [CacheStatus::Miss],
        "a moved value is not a hit"
    );
    assert_eq!(again.ids, first_b.ids, "the answer stays correct");
    assert_eq!(encoder_requests(&mesh).await, calls + 1, "recomputed");
    assert!(
        mesh.wait_for_log(
            &["[gateway]", "untrusted cached features"],
            Duration::from_secs(10)
        )
        .is_some(),
        "no log line about the refused value"
    );
    // The recomputed value verifies again: the next request is a hit.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = generate(&mesh, &b).await;
        if next.cache == [CacheStatus::Hit] {
            assert_eq!(next.ids, first_b.ids);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never a hit again");
    }
}

/// With --cache-secret-file, values are MAC-tagged: a gateway with another secret (or a writer
/// with none) can neither use nor plant features. Two meshes share one Redis with different
/// secrets; each refuses the other's value and recomputes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_with_another_secret_neither_use_nor_plant_features() {
    let redis = RedisProc::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (ours, theirs) = (
        secret("ours", "the mesh's shared cache secret\n"),
        secret("theirs", "someone else's secret value"),
    );
    let a = MeshProc::start_with(
        &model(),
        &["--redis", &redis.url(), "--cache-secret-file", &ours],
        &[],
    );
    let img = image();
    let first = generate(&a, &img).await;
    assert_eq!(first.cache, [CacheStatus::Miss]);
    wait_for_keys(&redis, 1);
    let hit = generate(&a, &img).await;
    assert_eq!(hit.cache, [CacheStatus::Hit], "its own value verifies");

    let b = MeshProc::start_with(
        &model(),
        &["--redis", &redis.url(), "--cache-secret-file", &theirs],
        &[],
    );
    let other = generate(&b, &img).await;
    assert_eq!(
        other.cache,
        [CacheStatus::Miss],
        "another secret's value is refused"
    );
    assert_eq!(other.ids, first.ids);
    // b replaced the value with its own; a refuses that one in turn.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if generate(&b, &img).await.cache == [CacheStatus::Hit] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "b never stored its value"
        );
    }
    let back = generate(&a, &img).await;
    assert_eq!(
        back.cache,
        [CacheStatus::Miss],
        "a value planted with another secret"
    );
    assert_eq!(back.ids, first.ids);
}

/// Attack 6, a forged cache value. Anyone who can write to Redis can compute an unkeyed tag: a
/// gateway run with `--cache-unkeyed` serves image B's features as image A's once they are
/// planted under A's key (the forgery works). The default `up --redis` makes a secret in its
/// state directory and keys every value with it, so the same planted value is refused there:
/// A's request is a miss and answers about A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_cache_never_serves_a_forged_value() {
    use vlm_cache::CacheBackend;
    let redis = RedisProc::start();
    let unkeyed =
        MeshProc::start_with(&model(), &["--redis", &redis.url(), "--cache-unkeyed"], &[]);
    assert!(
        unkeyed
            .wait_for_log(
                &["[gateway]", "are not authenticated"],
                Duration::from_secs(10)
            )
            .is_some(),
        "no warning about the unkeyed cache"
    );
    let a = image();
    let b = std::fs::read(repo().join("models/images/next-wide-100x40.png")).unwrap();
    let answer_a = generate(&unkeyed, &a).await;
    let key_a = wait_for_keys(&redis, 1)[0].clone();
    let answer_b = generate(&unkeyed, &b).await;
    assert_ne!(answer_a.ids, answer_b.ids, "the two images answer alike");
    let key_b = wait_for_keys(&redis, 2)
        .into_iter()
        .find(|k| *k != key_a)
        .unwrap();
    // The forgery: B's features under A's key, with the tag anyone can compute.
    let store = vlm_cache::RedisCache::new(&redis.url(), Default::default()).unwrap();
    let anyone = vlm_cache::Sealer::new(None);
    let limits = vlm_tensor::TensorLimits::default();
    let stored_b = store.get(&key_b).await.unwrap().expect("B's value");
    let features_b = anyone.open(&key_b, stored_b, &limits).unwrap();
    let forged = anyone.seal(&key_a, &features_b);
    store
        .put(&key_a, forged.clone(), Duration::from_secs(600))
        .await
        .unwrap();
    let fooled = generate(&unkeyed, &a).await;
    assert_eq!(fooled.cache, [CacheStatus::Hit]);
    assert_eq!(
        fooled.ids, answer_b.ids,
        "the unkeyed gateway served the forgery"
    );

    store
        .put(&key_a, forged, Duration::from_secs(600))
        .await
        .unwrap();
    let keyed = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let secret = keyed.state.path().join("cache-secret");
    assert!(
        std::fs::read(&secret).unwrap().len() >= 32,
        "`up` made no secret"
    );
    let got = generate(&keyed, &a).await;
    assert_eq!(
        got.cache,
        [CacheStatus::Miss],
        "the forged value was served"
    );
    assert_eq!(got.ids, answer_a.ids);
}

/// A redis-server that speaks only TLS (`--port 0 --tls-port P`), with the certificate of
/// `certs`' encoder leaf (its names include localhost); it asks clients for a certificate of the
/// same CA when `auth_clients`.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start(certs: &std::path::Path, auth_clients: bool) -> TlsRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| certs.join(name).to_str().unwrap().to_string();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--tls-cert-file", &file("encoder.pem")])
            .args(["--tls-key-file", &file("encoder.key")])
            .args(["--tls-ca-cert-file", &file("ca.pem")])
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (with TLS) must be installed");
        // Ready when its TLS port accepts connections (bounded).
        let started = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server never listened"
            );
            std::thread::sleep(Duration::from_millis(20)); // polling a port, bounded above
        }
        TlsRedis {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vlm-mesh certs` into a new directory: a CA and a leaf per role.
fn dev_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = output_within(
        std::process::Command::new(EXE)
            .args(["certs", "--out"])
            .arg(dir.path()),
        "vlm-mesh certs",
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{out:?}");
    dir
}

/// Managed Redis speaks TLS: `rediss://` with `--redis-ca` (a private CA) and a client
/// certificate (`--redis-cert`/`--redis-key`, which this Redis requires) caches features like
/// plain Redis: the second request is a hit that never reaches the encoder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_client_certificate_caches_features() {
    let certs = dev_certs();
    let redis = TlsRedis::start(certs.path(), true);
    let file = |name: &str| certs.path().join(name).to_str().unwrap().to_string();
    let mesh = MeshProc::start_with(
        &model(),
        &[
            "--redis",
            &redis.url(),
            "--redis-ca",
            &file("ca.pem"),
            "--redis-cert",
            &file("client.pem"),
            "--redis-key",
            &file("client.key"),
        ],
        &[],
    );
    let first = generate(&mesh, &image()).await;
    assert_eq!(first.cache, [CacheStatus::Miss]);
    let second = generate(&mesh, &image()).await;
    assert_eq!(second.cache, [CacheStatus::Hit]);
    assert_eq!(second.ids, first.ids);
    assert_eq!(
        encoder_requests(&mesh).await,
        1,
        "a hit must not call the encoder"
    );
}

/// A gateway given the wrong CA for its Redis refuses to start, naming --redis-ca (a TLS failure
/// is configuration, not an outage); without its client certificate, likewise.
#[test]
fn a_wrong_redis_ca_or_a_missing_client_certificate_stops_the_gateway() {
    let certs = dev_certs();
    let other = dev_certs();
    let redis = TlsRedis::start(certs.path(), true);
    let secret = certs.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let file =
        |d: &tempfile::TempDir, name: &str| d.path().join(name).to_str().unwrap().to_string();
    let gateway = |extra: &[String]| {
        let mut cmd = std::process::Command::new(EXE);
        cmd.args(["serve", "gateway", "--listen", "127.0.0.1:0", "--model"])
            .arg(model())
            .arg("--tls-dir")
            .arg(certs.path())
            .args([
                "--encoder",
                "https://127.0.0.1:1",
                "--projector",
                "https://127.0.0.1:1",
            ])
            .args(["--decoder", "https://127.0.0.1:1", "--redis", &redis.url()])
            .arg("--cache-secret-file")
            .arg(&secret)
            .args(extra);
        own_log_filter(&mut cmd);
        output_within(&mut cmd, "serve gateway", Duration::from_secs(60))
    };
    let client = [
        "--redis-cert".to_string(),
        file(&certs, "client.pem"),
        "--redis-key".to_string(),
        file(&certs, "client.key"),
    ];
    let wrong_ca = [
        &["--redis-ca".to_string(), file(&other, "ca.pem")][..],
        &client,
    ]
    .concat();
    let no_client = ["--redis-ca".to_string(), file(&certs, "ca.pem")];
    for extra in [&wrong_ca[..], &no_client[..]] {
        let out = gateway(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} started: {stderr}");
        assert!(
            stderr.contains("--redis-ca") && stderr.contains("TLS"),
            "{extra:?}: {stderr}"
        );
    }
}
