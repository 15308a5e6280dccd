//! The decoder's continuous batching, prefix cache and KV admission through a real mesh (`up`:
//! real processes, mTLS): concurrent requests share decode steps and each still equals
//! `generate`; a repeated prompt is served from the prefix cache with the same tokens; a full KV
//! budget queues, then serves, or refuses with RESOURCE_EXHAUSTED before the caller's deadline; a
//! request larger than the budget is refused at once; a budget larger than the machine is refused
//! at start-up.

use std::io::Read;
use std::time::{Duration, Instant};

use tonic::Code;
use vlm_model::{DType, Device, ImageLimits, Pipeline, SamplingParams};
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateFinal, GenerateRequest};

mod common;
use common::*;

type Client = vlm_proto::gateway_client::GatewayClient<tonic::transport::Channel>;

/// Runs one request to its end: the token ids, the final message, and when the first and last
/// tokens arrived.
async fn run(
    client: &mut Client,
    req: GenerateRequest,
    timeout: Option<Duration>,
) -> Result<(Vec<u32>, GenerateFinal, Instant, Instant), tonic::Status> {
    run_notify(client, req, timeout, None).await
}

/// [`run`], saying on `first_token` when the first token arrived.
async fn run_notify(
    client: &mut Client,
    req: GenerateRequest,
    timeout: Option<Duration>,
    mut first_token: Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(Vec<u32>, GenerateFinal, Instant, Instant), tonic::Status> {
    let mut req = tonic::Request::new(req);
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let (mut ids, mut first, mut last) = (Vec::new(), None, None);
    while let Some(msg) = next_message(&mut stream).await? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                if !d.token_ids.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    if let Some(tx) = first_token.take() {
                        let _ = tx.send(());
                    }
                    last = Some(Instant::now());
                }
                ids.extend(d.token_ids);
            }
            Some(Kind::Final(f)) => {
                return Ok((ids, f, first.expect("no token"), last.expect("no token")));
            }
            None => {}
        }
    }
    panic!("stream ended without a final message");
}

fn pipeline() -> Pipeline {
    Pipeline::load(model(), DType::F32, &Device::Cpu, ImageLimits::default()).unwrap()
}

fn params(max_tokens: u32, temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature,
        seed,
        ..SamplingParams::default()
    }
}

/// The decoder's Prometheus text.
fn decoder_metrics(mesh: &MeshProc) -> String {
    scrape(&mesh.metrics_addr("decoder"))
}

/// The value of one sample line (`name{labels} value`), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// Eight requests at once (greedy and seeded, different lengths) share decode steps, and each
/// one's tokens equal the in-process pipeline's for the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_requests_at_once_share_decode_steps_and_each_equals_generate() {
    // A few ms per step keeps the eight streams overlapping on a model that is otherwise faster
    // than the requests can arrive.
    let mesh = MeshProc::start(&[("VLM_FAULT_DECODE_DELAY_MS", "3")]);
    let image = std::fs::read(image_path()).unwrap();
    let p = pipeline();
    let cases: Vec<SamplingParams> = (0..8u32)
        .map(|i| {
            params(
                20 + 3 * i,
                if i % 2 == 0 { 0.0 } else { 0.8 },
                100 + i as u64,
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for c in &cases {
        let mut client = mesh.client().await;
        let req = request(&image, c);
        tasks.push(tokio::spawn(async move {
            run(&mut client, req, None).await.unwrap()
        }));
    }
    for (c, t) in cases.iter().zip(tasks) {
        let (ids, fin, _, _) = t.await.unwrap();
        let want = p.generate(&[&image], PROMPT, c, |_| {}).unwrap();
        assert_eq!(ids, want.token_ids, "{c:?}");
        assert_eq!(fin.usage.unwrap().completion_tokens as usize, ids.len());
    }
    let m = decoder_metrics(&mesh);
    let steps = sample(&m, "vlm_decoder_batch_size_count");
    let single = sample(&m, "vlm_decoder_batch_size_bucket{le=\"1\"}");
    let up_to_4 = sample(&m, "vlm_decoder_batch_size_bucket{le=\"4\"}");
    eprintln!("decode steps {steps}, of 1 sequence {single}, of <= 4 {up_to_4}");
    assert!(steps > 0.0, "no batch sizes recorded:\n{m}");
    assert!(
        up_to_4 < steps,
        "no decode step carried more than 4 sequences:\n{m}"
    );
}

/// The same long prompt twice: the second reuses the first's KV blocks (reported as
/// cached_prompt_tokens, counted as prefix hits) and gives the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_tokens() {
    let mesh = MeshProc::start(&[]);
    let image = std::fs::read(image_path()).unwrap();
    let mut client = mesh.client().await;
    let mut req = request(&image, &params(8, 0.0, 1));
    req.prompt = format!(
        "USER: <image>\n{} What is shown in this image? ASSISTANT:",
        "You are a careful assistant that describes shapes. ".repeat(2)
    );
    let (cold, f1, _, _) = run(&mut client, req.clone(), None).await.unwrap();
    let (warm, f2, _, _) = run(&mut client, req.clone(), None).await.unwrap();
    let (u1, u2) = (f1.usage.unwrap(), f2.usage.unwrap());
    assert_eq!(u1.cached_prompt_tokens, 0, "{u1:?}");
    assert!(u2.cached_prompt_tokens >= 32, "{u2:?}");
    assert!(u2.cached_prompt_tokens < u2.prompt_tokens, "{u2:?}");
    assert_eq!(
        warm, cold,
        "tokens changed when the prefix came from the cache"
    );
    let p = pipeline();
    let want = p
        .generate(&[&image], &req.prompt, &params(8, 0.0, 1), |_| {})
        .unwrap();
    assert_eq!(cold, want.token_ids);
    let m = decoder_metrics(&mesh);
    let hits = sample(&m, "vlm_prefix_cache_tokens_total{result=\"hit\"}");
    assert_eq!(hits, u2.cached_prompt_tokens as f64, "{m}");
}

/// A KV budget that holds one request at a time: a second waits and is served after the first;
/// a third whose deadline passes while it waits gets RESOURCE_EXHAUSTED naming the budget; one
/// larger than the whole budget is refused at once with INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_kv_budget_queues_then_serves_or_refuses_and_never_hangs() {
    let p = pipeline();
    let prompt_tokens = p
        .prompt
        .prepare(PROMPT, &[p.vision.num_features()])
        .unwrap()
        .ids
        .len();
    let max_tokens = 60u32;
    let block_bytes = p.decoder.kv_shape(16).block_bytes();
    let blocks = (prompt_tokens + max_tokens as usize).div_ceil(16);
    // One such request fits; two do not.
    let budget = (blocks + blocks / 2) * block_bytes;
    let mesh = MeshProc::start(&[
        ("VLM_KV_CACHE_BYTES", &budget.to_string()),
        // Slow enough that the first still holds the budget when the third's 2 s deadline
        // passes (60 steps of at least 40 ms), however loaded the machine.
        ("VLM_FAULT_DECODE_DELAY_MS", "40"),
    ]);
    let image = std::fs::read(image_path()).unwrap();
    let c = params(max_tokens, 0.0, 1);
    let want = p.generate(&[&image], PROMPT, &c, |_| {}).unwrap().token_ids;

    let mut a_client = mesh.client().await;
    let a_req = request(&image, &c);
    let (decoding, a_decoding) = tokio::sync::oneshot::channel();
    let a = tokio::spawn(async move {
        run_notify(&mut a_client, a_req, None, Some(decoding))
            .await
            .unwrap()
    });
    // The second and third are sent once the first is decoding.
    a_decoding.await.unwrap();
    let mut b_client = mesh.client().await;
    let b_req = request(&image, &c);
    let b = tokio::spawn(async move { run(&mut b_client, b_req, None).await.unwrap() });
    let mut c_client = mesh.client().await;
    let started = Instant::now();
    let err = run(
        &mut c_client,
        request(&image, &c),
        Some(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    eprintln!(
        "queued past its deadline: {err:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("KV cache budget"), "{err:?}");

    let (a_ids, _, _, a_last) = a.await.unwrap();
    let (b_ids, _, b_first, _) = b.await.unwrap();
    assert_eq!(a_ids, want);
    assert_eq!(b_ids, want);
    assert!(
        b_first >= a_last,
        "the second request decoded before the first finished: the budget did not hold it back"
    );

    let mut client = mesh.client().await;
    let huge = params((p.decoder.max_positions() - prompt_tokens) as u32, 0.0, 1);
    let err = run(&mut client, request(&image, &huge), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("budget"), "{err:?}");
    // And the mesh still serves.
    let (ids, _, _, _) = run(&mut client, request(&image, &c), None).await.unwrap();
    assert_eq!(ids, want);
}

/// An explicit KV budget larger than the memory the decoder can get stops `up` at start-up with a
/// message naming the flag (not an allocation abort, nor a pool that is OOM-killed once filled).
#[test]
fn a_kv_budget_larger_than_the_machine_is_refused_at_start_up() {
    let state = tempfile::tempdir().unwrap();
    let mut child = common::own_log_filter(&mut std::process::Command::new(EXE))
        .args(["up", "--listen", "127.0.0.1:0", "--model"])
        .arg(model())
        .arg("--state-dir")
        .arg(state.path())
        // 1 EiB: more than any machine this runs on.
        .env("VLM_KV_CACHE_BYTES", (1u64 << 60).to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        let _ = tx.send(log);
    });
    // stderr closes when `up` exits; it must exit on its own, well before any request timeout.
    let log = rx
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            let _ = child.kill();
            panic!("`up` with an impossible KV budget did not exit within 120 s")
        });
    let status = child.wait().unwrap();
    assert!(!status.success(), "{status}: {log}");
    assert!(
        log.contains("--kv-cache-bytes 1152921504606846976")
            && log.contains("more than the memory this process can get"),
        "{log}"
    );
    assert!(log.contains("the decoder exited"), "{log}");
}
