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
    let mut client = mesh.client().await;
    let req = GenerateRequest {
        images: vec![image.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(8),
            ..Default::default()
        }),
        monitor_layers: false,
    };
    let mut stream = client.generate(req).await.expect("generate").into_inner();
    let mut answer = Answer {
        ids: vec![],
        cache: vec![],
        encode_ms: -1.0,
    };
    while let Some(msg) = stream.message().await.expect("stream") {
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
    assert_eq!(answer.ids.len(), 8);
    answer
}

/// Encode calls the mesh's encoder has accepted (its own counter, read over mTLS).
async fn encoder_requests(mesh: &MeshProc) -> u64 {
    let files = vlm_net::TlsFiles::for_role(mesh.certs(), "client");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    let url = format!("https://{}", mesh.service_addr("encoder"));
    let channel = vlm_net::connect(&url, Some(tls)).await.unwrap();
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
    let b = MeshProc::start_with(
        &repo().join("models/tiny-llava-gqa"),
        &["--redis", &redis.url()],
        &[],
    );
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
