//! The feature cache's policy flags end to end (README "Feature cache"): `--no-cache`,
//! `--cache-ttl` (Redis and in memory), `--cache-max-bytes` eviction of the in-memory cache, and
//! a Redis that stops answering (lookups are bounded; requests go on as misses). Real `vlm-mesh up`
//! process trees; Redis is a private redis-server per test.

use std::time::{Duration, Instant};

use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::generate_response::Kind;
use vlm_proto::{CacheStatus, EncoderInfoRequest, GenerateRequest};

mod common;
use common::*;

/// Longest any one request in these tests may take (an outer bound that turns a hang into a
/// failure; a request of 8 tokens takes well under a second).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

struct Answer {
    ids: Vec<u32>,
    cache: Vec<CacheStatus>,
    encode_ms: f64,
    /// The gateway's own time for the cache lookup(s).
    cache_ms: f64,
}

fn image_a() -> Vec<u8> {
    std::fs::read(image_path()).unwrap()
}

fn image_b() -> Vec<u8> {
    std::fs::read(repo().join("models/images/shapes-64x40.png")).unwrap()
}

/// One request of 8 greedy tokens for `image`, with a deadline of `timeout`.
async fn try_generate(
    mesh: &MeshProc,
    image: &[u8],
    timeout: Duration,
) -> Result<Answer, tonic::Status> {
    let mut client = mesh.client().await;
    let mut req = tonic::Request::new(GenerateRequest {
        image_inputs: vec![],
        images: vec![image.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(8),
            ..Default::default()
        }),
        monitor_layers: false,
        question: String::new(),
    });
    req.set_timeout(timeout);
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let mut answer = Answer {
        ids: vec![],
        cache: vec![],
        encode_ms: -1.0,
        cache_ms: -1.0,
    };
    while let Some(msg) = next_message(&mut stream).await? {
        match msg.kind {
            Some(Kind::Delta(d)) => answer.ids.extend(d.token_ids),
            Some(Kind::Final(f)) => {
                let t = f.timings.unwrap();
                answer.cache = t.cache().collect();
                answer.encode_ms = t.encode_ms;
                answer.cache_ms = t.cache_ms;
            }
            None => {}
        }
    }
    assert_eq!(answer.ids.len(), 8, "a whole answer");
    Ok(answer)
}

async fn generate(mesh: &MeshProc, image: &[u8]) -> Answer {
    try_generate(mesh, image, REQUEST_TIMEOUT)
        .await
        .expect("generate")
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

/// Stores run off the request path; waits (bounded) until Redis holds `n` feature keys.
fn wait_for_keys(redis: &RedisProc, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let keys = redis.feature_keys();
        if keys.len() >= n {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "redis never held {n} feature keys: {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `--no-cache`: every image is reported `off` (in the gRPC answer and by `ask --json`), and
/// every request, the same image again included, is encoded by the encoder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cache_reports_off_and_every_request_reaches_the_encoder() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let img = image_a();
    let mut first_ids = None;
    for n in 1..=3u64 {
        let a = generate(&mesh, &img).await;
        assert_eq!(a.cache, [CacheStatus::Off], "request {n}: per image, off");
        assert!(
            a.encode_ms > 0.0,
            "request {n}: encoded, {} ms",
            a.encode_ms
        );
        assert_eq!(&a.ids, first_ids.get_or_insert(a.ids.clone()));
        assert_eq!(
            encoder_requests(&mesh).await,
            n,
            "request {n} of the same image reached the encoder"
        );
    }

    let state = mesh.state.path().to_str().unwrap().to_string();
    let img_path = image_path();
    let out = run_json(&[
        "ask",
        "--state-dir",
        &state,
        "--image",
        img_path.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert_eq!(out["timings"]["cache"], serde_json::json!(["off"]), "{out}");
    assert!(out["timings"]["encode_ms"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(encoder_requests(&mesh).await, 4);
}

/// `--cache-ttl` reaches Redis: the stored key's TTL (Redis's own `TTL`) is the flag's value, not
/// the default of 3600 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_expire_after_cache_ttl() {
    const TTL: u64 = 777;
    let redis = RedisProc::start();
    let mesh = MeshProc::start_with(
        &model(),
        &["--redis", &redis.url(), "--cache-ttl", &TTL.to_string()],
        &[],
    );
    assert_eq!(generate(&mesh, &image_a()).await.cache, [CacheStatus::Miss]);
    let key = wait_for_keys(&redis, 1).remove(0);
    let ttl: i64 = redis
        .cmd(&["TTL", &key])
        .expect("TTL")
        .trim()
        .parse()
        .expect("TTL answers an integer");
    // Seconds left: at most TTL, and only the seconds since the store have passed (a generous
    // 120 s of them).
    assert!(
        ttl <= TTL as i64 && ttl > TTL as i64 - 120,
        "key {key} has TTL {ttl}, want about {TTL}"
    );
}

/// `--cache-ttl` bounds how long the in-memory (moka) cache keeps features: right after the first
/// request the image is a hit, and once the TTL has passed it is a miss again and re-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_entries_expire_after_cache_ttl() {
    const TTL: Duration = Duration::from_secs(8);
    let mesh = MeshProc::start_with(&model(), &["--cache-ttl", &TTL.as_secs().to_string()], &[]);
    let img = image_a();
    let started = Instant::now();
    let first = generate(&mesh, &img).await;
    assert_eq!(first.cache, [CacheStatus::Miss]);
    // Well within the TTL (a request takes well under a second; 8 s is the margin for a loaded
    // machine): still cached.
    let second = generate(&mesh, &img).await;
    assert_eq!(second.cache, [CacheStatus::Hit], "within the TTL");
    assert_eq!(second.ids, first.ids);
    assert_eq!(encoder_requests(&mesh).await, 1);

    // Poll until the entry has expired (outer bound: the TTL plus a minute).
    let expired = loop {
        let a = generate(&mesh, &img).await;
        assert_eq!(a.ids, first.ids);
        if a.cache == [CacheStatus::Miss] {
            break started.elapsed();
        }
        assert_eq!(a.cache, [CacheStatus::Hit]);
        assert!(
            started.elapsed() < TTL + Duration::from_secs(60),
            "still a hit {:?} after a TTL of {TTL:?}",
            started.elapsed()
        );
        // Poll interval (not a synchronisation: the loop ends on the observed miss).
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // The features were stored after the first request started, so they cannot have expired
    // before a whole TTL had passed since then.
    assert!(expired >= TTL, "expired after only {expired:?}");
    assert_eq!(encoder_requests(&mesh).await, 2, "re-encoded once expired");
}

/// `--cache-max-bytes` bounds the in-memory cache: sized so one image's features fit but not
/// two, caching a second image evicts the first (least recently used), which is a miss again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cache_evicts_beyond_cache_max_bytes() {
    // tiny-llava's vision tower: (30 / 6)² = 25 patches of 32 floats (f32 on the wire), 3,200
    // bytes, plus a header and tag of well under 200 bytes per value. 5,000 bytes hold one value,
    // not two.
    const MAX_BYTES: &str = "5000";
    let mesh = MeshProc::start_with(
        &model(),
        &["--cache-max-bytes", MAX_BYTES],
        // moka applies its pending writes (and so evicts) during a cache operation at least
        // 300 ms after its last maintenance. 8 tokens × 50 ms keep every request's own lookup
        // that long after the previous request's store, whatever the machine's speed.
        &[("VLM_FAULT_DECODE_DELAY_MS", "50")],
    );
    let (a, b) = (image_a(), image_b());
    let first_a = generate(&mesh, &a).await;
    assert_eq!(first_a.cache, [CacheStatus::Miss]);
    let hit_a = generate(&mesh, &a).await;
    assert_eq!(hit_a.cache, [CacheStatus::Hit], "one image's features fit");
    assert_eq!(hit_a.ids, first_a.ids);

    assert_eq!(generate(&mesh, &b).await.cache, [CacheStatus::Miss]);
    assert_eq!(
        generate(&mesh, &b).await.cache,
        [CacheStatus::Hit],
        "the second image is cached in its turn"
    );
    assert_eq!(encoder_requests(&mesh).await, 2);

    let again_a = generate(&mesh, &a).await;
    assert_eq!(
        again_a.cache,
        [CacheStatus::Miss],
        "the first image was evicted to make room for the second"
    );
    assert_eq!(again_a.ids, first_a.ids);
    assert_eq!(encoder_requests(&mesh).await, 3, "re-encoded");
}

/// A Redis that stops answering (its process stopped with SIGSTOP, holding the features) does
/// not hold requests: the lookup gives up after its bound, the request succeeds with
/// `cache: error` and the same answer, without waiting for Redis; caching resumes once Redis
/// answers again (SIGCONT). (`CLIENT PAUSE` would do too, but on Redis 7.0 even the pausing
/// connection's `CLIENT UNPAUSE` waits behind the paused clients, so it could only be waited out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_redis_is_an_error_not_a_wait_and_caching_resumes() {
    /// The paused request's own deadline: it fails (DEADLINE_EXCEEDED) if it waits for Redis.
    const DEADLINE: Duration = Duration::from_secs(30);
    let redis = RedisProc::start();
    let pid: i32 = redis
        .cmd(&["INFO", "server"])
        .expect("INFO server")
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|p| p.trim().parse().ok())
        .expect("redis-server's process_id");
    let mesh = MeshProc::start_with(&model(), &["--redis", &redis.url()], &[]);
    let img = image_a();
    let first = generate(&mesh, &img).await;
    assert_eq!(first.cache, [CacheStatus::Miss]);
    wait_for_keys(&redis, 1);
    assert_eq!(generate(&mesh, &img).await.cache, [CacheStatus::Hit]);

    /// Resumes the stopped server however the test ends (a stopped process also dies of the
    /// SIGKILL RedisProc sends on drop).
    struct Stopped(i32);
    impl Drop for Stopped {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the redis-server this test started.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    // SAFETY: kill(2) on the redis-server this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let stopped = Stopped(pid);
    let t = Instant::now();
    let slow = try_generate(&mesh, &img, DEADLINE)
        .await
        .expect("a request while Redis does not answer must succeed");
    let took = t.elapsed();
    assert_eq!(
        slow.cache,
        [CacheStatus::Error],
        "the lookup was given up (the features are in Redis)"
    );
    assert_eq!(slow.ids, first.ids, "the answer is unchanged");
    assert!(slow.encode_ms > 0.0, "encoded instead");
    // The gateway gives the lookup 250 ms (README): it waited that long (Redis never answered)
    // and stopped within 250 ms more of scheduling slack on a loaded machine (the Redis
    // connection's own response timeout, 2 s, is what a lookup without its bound would end at).
    // The whole request: far below the deadline a request waiting for Redis would run into.
    eprintln!(
        "while Redis was stopped: lookup {} ms, request {took:?}",
        slow.cache_ms
    );
    assert!(
        (249.0..500.0).contains(&slow.cache_ms),
        "lookup took {} ms",
        slow.cache_ms
    );
    assert!(took < DEADLINE / 2, "{took:?} while Redis was stopped");
    let line = mesh
        .wait_for_log(
            &["[gateway]", "feature cache lookup failed", "timed out"],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no log line: {:?}", mesh.log.lock().unwrap()));
    eprintln!("{line}");

    drop(stopped); // SIGCONT
                   // Caching resumes by itself (the gateway's connection may first have to catch up).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = generate(&mesh, &img).await;
        assert_eq!(a.ids, first.ids);
        if a.cache == [CacheStatus::Hit] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never a hit again: {:?}",
            a.cache
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
