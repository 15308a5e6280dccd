//! Decoder routing and overload through real meshes with several decoder replicas (`vlm-mesh up
//! --replicas decoder=N`): a session's later steps land on the replica that holds its prefix and
//! report cached tokens, a skewed load spills to other replicas, killing a session's replica moves
//! it with identical answers, uniform slowness abandons nothing, and the stages' gauges return to
//! zero when idle.

use std::time::Duration;

use tokio::time::Instant;
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateRequest, SamplingParams};

mod common;
use common::*;

/// A session's prompt at `step` (from 1): a system prompt unique to the session (so no two
/// sessions share a prefix), the earlier steps' questions and answers, then this step's image
/// and question. Each step's prompt extends the previous one's, as an agent's does.
fn session_prompt(session: usize, answers: &[String], step: usize) -> String {
    let mut p = format!(
        "USER: Session {session}. You operate a phone; answer each step with one short action \
         for the screen you are shown."
    );
    for (i, a) in answers.iter().enumerate().take(step - 1) {
        p.push_str(&format!(" Step {}: what should I tap next? {a}", i + 1));
    }
    p.push_str(&format!(
        " Step {step}: <image>\nwhat should I tap next? ASSISTANT:"
    ));
    p
}

fn greedy(max_tokens: u32) -> Option<SamplingParams> {
    Some(SamplingParams {
        max_tokens: Some(max_tokens),
        top_p: 1.0,
        ..Default::default()
    })
}

/// One request's generated ids, text and cached prompt positions.
struct Answer {
    ids: Vec<u32>,
    text: String,
    cached: u32,
}

async fn ask(mesh: &MeshProc, prompt: String, image: &[u8], max_tokens: u32) -> Answer {
    let req = GenerateRequest {
        prompt,
        images: vec![image.to_vec().into()],
        params: greedy(max_tokens),
        ..Default::default()
    };
    let mut client = mesh.client().await;
    let mut stream = bounded("the call", client.generate(req))
        .await
        .unwrap()
        .into_inner();
    let mut answer = Answer {
        ids: vec![],
        text: String::new(),
        cached: 0,
    };
    let mut finished = false;
    while let Some(msg) = next_message(&mut stream).await.unwrap() {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                answer.ids.extend(d.token_ids);
                answer.text.push_str(&d.text);
            }
            Some(Kind::Final(f)) => {
                answer.cached = f.usage.unwrap().cached_prompt_tokens;
                finished = true;
            }
            None => {}
        }
    }
    assert!(finished, "no final message");
    answer
}

/// `Generate` calls each decoder replica has finished, in replica order.
fn decoder_calls(mesh: &MeshProc) -> Vec<f64> {
    replica_info(mesh, "decoder")
        .iter()
        .map(|s| {
            let m = scrape(s["metrics"].as_str().unwrap());
            counter(
                &m,
                "vlm_rpc_server_requests_total",
                &["service=\"vlm.v1.Decoder\"", "method=\"Generate\""],
            )
        })
        .collect()
}

fn gateway_counter(mesh: &MeshProc, name: &str, labels: &[&str]) -> f64 {
    counter(&scrape(&mesh.metrics_addr("gateway")), name, labels)
}

/// Four sessions of three steps, run side by side on three decoders: every later step is served
/// from the prefix cache of the replica its session used (its cached positions cover the
/// session's system prompt at least), and the gateway counts prefix decisions and their cached
/// tokens. Sessions share no prefix, so a step routed anywhere else would cache nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn later_steps_land_on_the_replica_holding_their_prefix() {
    let mesh = MeshProc::start_with(&model(), &["--replicas", "decoder=3", "--no-cache"], &[]);
    let image = std::fs::read(image_path()).unwrap();
    let sessions = (0..4).map(|s| {
        let (mesh, image) = (&mesh, image.clone());
        async move {
            let mut answers: Vec<String> = vec![];
            let mut cached = vec![];
            for step in 1..=3 {
                let a = ask(mesh, session_prompt(s, &answers, step), &image, 4).await;
                answers.push(a.text);
                cached.push(a.cached);
            }
            cached
        }
    });
    let cached = futures::future::join_all(sessions).await;
    for (s, c) in cached.iter().enumerate() {
        assert_eq!(c[0], 0, "session {s}'s first step shares nothing: {c:?}");
        // The system prompt alone is over 100 bytes: at least one full 16-position block.
        assert!(
            c[1] >= 16 && c[2] > c[1],
            "session {s}'s later steps missed their prefix: {c:?}"
        );
    }
    let prefix = gateway_counter(
        &mesh,
        "vlm_gateway_routing_decisions_total",
        &["reason=\"prefix\""],
    );
    assert!(prefix >= 8.0, "{prefix} prefix decisions");
    let tokens = gateway_counter(
        &mesh,
        "vlm_gateway_routed_cached_tokens_total",
        &["reason=\"prefix\""],
    );
    let reported: u32 = cached.iter().flatten().sum();
    assert_eq!(tokens, f64::from(reported));
}

/// Twelve requests with one prompt at once, on three slow decoders: the replica that holds the
/// prompt takes what its load bound allows and the rest spill to the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_skewed_load_spills_to_other_replicas() {
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=3", "--no-cache"],
        &[("VLM_FAULT_DECODE_DELAY_MS", "40")],
    );
    let image = std::fs::read(image_path()).unwrap();
    let prompt = session_prompt(0, &[], 1);
    // The first call puts the prompt on one replica.
    ask(&mesh, prompt.clone(), &image, 2).await;
    let before = decoder_calls(&mesh);
    let all = (0..12).map(|_| ask(&mesh, prompt.clone(), &image, 12));
    let answers = futures::future::join_all(all).await;
    assert!(answers.iter().all(|a| a.ids == answers[0].ids));
    let after = decoder_calls(&mesh);
    let served: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(served.iter().sum::<f64>(), 12.0, "{served:?}");
    assert!(
        served.iter().all(|&n| n >= 1.0),
        "some replica got none: {served:?}"
    );
    let spilled = gateway_counter(
        &mesh,
        "vlm_gateway_routing_decisions_total",
        &["reason=\"spilled\""],
    );
    assert!(spilled >= 1.0, "{spilled} spilled, served {served:?}");
}

/// A session's replica is killed between steps: the next step goes to another replica and its
/// answer is the one the model gives in process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_sessions_replica_moves_it_with_identical_answers() {
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=3", "--no-cache"],
        &[("VLM_HEALTH_INTERVAL_MS", "200")],
    );
    let image = std::fs::read(image_path()).unwrap();
    let mut answers = vec![];
    let before = decoder_calls(&mesh);
    for step in 1..=2 {
        let a = ask(&mesh, session_prompt(7, &answers, step), &image, 4).await;
        answers.push(a.text);
    }
    let after = decoder_calls(&mesh);
    let affine: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(
        affine.len(),
        1,
        "the session's steps split: {before:?} → {after:?}"
    );
    let (pid, _) = replicas(&mesh, "decoder")[affine[0]].clone();
    kill9(pid);
    let prompt = session_prompt(7, &answers, 3);
    let got = ask(&mesh, prompt.clone(), &image, 6).await;
    let p = vlm_model::SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let expected = pipeline()
        .generate(&[&image[..]], &prompt, &p, |_| {})
        .unwrap()
        .token_ids;
    assert_eq!(got.ids, expected);
}

/// Every decoder stops (SIGSTOP) for 600 ms in the middle of six streams, with an adaptive
/// inter-token limit of 100 ms: every replica is equally slow, so no call is abandoned (each
/// would only have redone its prefill elsewhere), and every answer is the in-process one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uniform_slowness_abandons_nothing() {
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=2", "--no-cache"],
        &[
            ("VLM_FAULT_DECODE_DELAY_MS", "20"),
            ("VLM_TIMEOUT_MIN_MS", "100"),
            ("VLM_TIMEOUT_FACTOR", "2"),
            // Replicas stay healthy through the stall (checks wait up to 1 s).
            ("VLM_HEALTH_INTERVAL_MS", "1000"),
        ],
    );
    let image = std::fs::read(image_path()).unwrap();
    let pipeline = pipeline();
    let params: Vec<vlm_model::SamplingParams> = (0..6u64)
        .map(|i| vlm_model::SamplingParams {
            max_tokens: 60,
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            seed: 40 + i,
            ..Default::default()
        })
        .collect();
    let tokens = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = mesh.client().await;
    let tasks: Vec<_> = params
        .iter()
        .map(|p| {
            let req = request(&image, p);
            let (mut client, tokens) = (client.clone(), tokens.clone());
            tokio::spawn(async move {
                generate(&mut client, req, Some(Duration::from_secs(60)), || {
                    tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                })
                .await
            })
        })
        .collect();
    // Once every stream is decoding (some tokens each), stop every decoder at once.
    let started = Instant::now();
    while tokens.load(std::sync::atomic::Ordering::Relaxed) < 60 {
        assert!(started.elapsed() < Duration::from_secs(60), "no tokens");
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter, bounded above
    }
    let pids: Vec<i32> = replicas(&mesh, "decoder")
        .iter()
        .map(|(p, _)| *p as i32)
        .collect();
    for &pid in &pids {
        // SAFETY: kill(2) on a decoder this test's mesh started.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    }
    tokio::time::sleep(Duration::from_millis(600)).await; // the stall itself, not a wait
    for &pid in &pids {
        // SAFETY: as above.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    }
    for (p, t) in params.iter().zip(tasks) {
        let got = t.await.unwrap().unwrap_or_else(|s| panic!("{p:?}: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, p), "{p:?}");
    }
    let abandoned = gateway_counter(&mesh, "vlm_gateway_abandoned_calls_total", &[]);
    assert_eq!(abandoned, 0.0);
    let log = mesh.log.lock().unwrap().join("\n");
    assert!(!log.contains("call abandoned"), "{log}");
}

/// After requests, every stage's `vlm_saturation` and the decoder's batch and KV gauges return
/// to zero (they once kept their last busy values).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_gauges_return_to_zero() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let image = std::fs::read(image_path()).unwrap();
    let all = (0..4).map(|s| ask(&mesh, session_prompt(s, &[], 1), &image, 8));
    futures::future::join_all(all).await;
    let idle = |role: &str, series: &[(&str, &[&str])]| {
        let addr = mesh.metrics_addr(role);
        let started = std::time::Instant::now();
        loop {
            let m = scrape(&addr);
            let values: Vec<f64> = series.iter().map(|(n, l)| counter(&m, n, l)).collect();
            let present = series
                .iter()
                .all(|(n, _)| m.lines().any(|line| line.starts_with(n)));
            if present && values.iter().all(|v| *v == 0.0) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{role} never went idle: {series:?} = {values:?}"
            );
            std::thread::sleep(Duration::from_millis(50)); // polling metrics, bounded above
        }
    };
    idle(
        "decoder",
        &[
            ("vlm_decoder_running_sequences", &[]),
            ("vlm_kv_cache_blocks", &["state=\"used\""]),
            ("vlm_saturation", &[]),
        ],
    );
    idle("encoder", &[("vlm_saturation", &[])]);
    idle("projector", &[("vlm_saturation", &[])]);
}
