//! The README's "What happens when X fails" rows that tests/resilience.rs does not cover, each
//! produced with real processes: a projector killed mid-stream, a decoder killed before its
//! first token, request errors and the retry budget, and `up`'s own lifecycle (a dead gateway,
//! SIGTERM, no orphans). Each asserts on what the mechanism does (counters, log lines, exit
//! statuses, token ids), never on how fast it was.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::Code;
use vlm_model::SamplingParams;

mod common;
use common::*;

/// Greedy and seeded requests, mixed.
fn mixed_params(n: u64, max_tokens: u32) -> Vec<SamplingParams> {
    (0..n)
        .map(|i| SamplingParams {
            max_tokens,
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            seed: 900 + i,
            ..Default::default()
        })
        .collect()
}

/// A metric of the replica `i` of `role`, summed over samples with all `labels`.
fn replica_counter(mesh: &MeshProc, role: &str, i: usize, name: &str, labels: &[&str]) -> f64 {
    let info = &replica_info(mesh, role)[i];
    counter(&scrape(info["metrics"].as_str().unwrap()), name, labels)
}

fn gateway_retries(mesh: &MeshProc, stage: &str, kind: &str) -> f64 {
    counter(
        &scrape(&mesh.metrics_addr("gateway")),
        "vlm_gateway_retries_total",
        &[&format!("stage=\"{stage}\""), &format!("kind=\"{kind}\"")],
    )
}

/// Starts `params.len()` requests at once; the handles resolve to their token ids.
fn spawn_all(
    mesh: &MeshProc,
    client: &vlm_proto::gateway_client::GatewayClient<tonic::transport::Channel>,
    image: &[u8],
    params: &[SamplingParams],
    tokens: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Result<Vec<u32>, tonic::Status>>> {
    let _ = mesh;
    params
        .iter()
        .map(|p| {
            let (mut client, req, tokens) = (client.clone(), request(image, p), tokens.clone());
            tokio::spawn(async move {
                generate(&mut client, req, None, || {
                    tokens.fetch_add(1, Ordering::Relaxed);
                })
                .await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_stream_is_retried_elsewhere_with_identical_output() {
    // Projector #0 pauses a minute after each block it sends: the block has gone to the
    // gateway, which forwarded it to the decoder, but the stream has not ended. Killing it then
    // makes the gateway project the image again on #1. Decoding is slowed (30 ms a token) so
    // the requests are still running when that happens.
    let mut mesh = MeshProc::start_with(
        &model(),
        &[
            "--replicas",
            "projector=2",
            "--no-cache",
            "--restart",
            "never",
        ],
        &[
            ("VLM_FAULT_PROJECT_DELAY_MS", "60000,0"),
            ("VLM_FAULT_DECODE_DELAY_MS", "30"),
            ("VLM_TIMEOUT_MAX_MS", "120000"),
        ],
    );
    let image = std::fs::read(image_path()).unwrap();
    let client = mesh.client().await;
    let params = mixed_params(8, 30);
    let tokens = Arc::new(AtomicUsize::new(0));
    let paused = |mesh: &MeshProc| {
        mesh.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("[projector") && l.contains("fault hook: block sent"))
    };
    let mut tasks = spawn_all(&mesh, &client, &image, &params, &tokens);
    // More rounds until projector #0 has sent a block (the balancer decides who gets what).
    let mut sent = params.clone();
    let t = Instant::now();
    while !paused(&mesh) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "projector #0 never sent a block"
        );
        if tasks.iter().all(|t| t.is_finished()) {
            tasks.extend(spawn_all(&mesh, &client, &image, &params, &tokens));
            sent.extend(params.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // polling the log, bounded
    }
    let projectors = replicas(&mesh, "projector");
    kill9(projectors[0].0);
    let pipeline = pipeline();
    for (p, t) in sent.iter().zip(tasks) {
        let got = t.await.unwrap().unwrap_or_else(|s| panic!("{p:?}: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, p), "{p:?}");
    }
    let retries = gateway_retries(&mesh, "projector", "retry");
    eprintln!("projector retries: {retries}");
    assert!(retries >= 1.0, "no projector call was retried");
    assert!(mesh.wait_exit(Duration::ZERO).is_none(), "up exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decoder_killed_before_its_first_token_is_called_again_elsewhere() {
    // Decoder #0 takes a minute per token (its adaptive timeout is lifted to two minutes, so
    // the gateway waits on it): a request there has no token yet when the decoder dies.
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=2", "--restart", "never"],
        &[
            ("VLM_FAULT_DECODE_DELAY_MS", "60000,0"),
            ("VLM_TIMEOUT_MAX_MS", "120000"),
        ],
    );
    let image = std::fs::read(image_path()).unwrap();
    let client = mesh.client().await;
    let params = mixed_params(6, 5);
    let tokens = Arc::new(AtomicUsize::new(0));
    let held = || {
        replica_counter(
            &mesh,
            "decoder",
            0,
            "vlm_rpc_server_in_flight",
            &["vlm.v1.Decoder"],
        )
    };
    let mut tasks = spawn_all(&mesh, &client, &image, &params, &tokens);
    let mut sent = params.clone();
    let t = Instant::now();
    while held() < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "decoder #0 never got a call"
        );
        if tasks.iter().all(|t| t.is_finished()) {
            tasks.extend(spawn_all(&mesh, &client, &image, &params, &tokens));
            sent.extend(params.clone());
        }
        tokio::time::sleep(Duration::from_millis(10)).await; // polling a gauge, bounded
    }
    kill9(replicas(&mesh, "decoder")[0].0);
    let pipeline = pipeline();
    for (p, t) in sent.iter().zip(tasks) {
        let got = t.await.unwrap().unwrap_or_else(|s| panic!("{p:?}: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, p), "{p:?}");
    }
    // The call was made again elsewhere (decoder #0 had produced no token: its first would take
    // a minute), and no replacement had tokens to replay.
    let again =
        gateway_retries(&mesh, "decoder", "retry") + gateway_retries(&mesh, "decoder", "failover");
    assert!(again >= 1.0, "no decoder call was made again");
    let replayed: Vec<u64> = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("resuming on another replica"))
        .filter_map(|l| field(l, "tokens="))
        .collect();
    assert!(replayed.iter().all(|&n| n == 0), "replayed {replayed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_errors_are_never_retried_and_the_retry_budget_caps_retries() {
    // No budget beyond the fixed reserve (10 retries a second over its 10 s window: 100), and
    // 6 attempts per call, so 40 failing requests want 200 retries at once.
    let mesh = MeshProc::start_with(
        &model(),
        &[
            "--replicas",
            "encoder=2",
            "--no-cache",
            "--restart",
            "never",
        ],
        &[
            // 40 requests at once from one client: no per-peer share here.
            ("VLM_MAX_PEER_SHARE", "1"),
            ("VLM_RETRY_BUDGET_PERCENT", "0"),
            ("VLM_RETRY_ATTEMPTS", "6"),
        ],
    );
    let image = std::fs::read(image_path()).unwrap();
    let mut client = mesh.client().await;
    let encoders = replicas(&mesh, "encoder");
    let encoder_calls = || {
        (0..2)
            .map(|i| {
                replica_counter(
                    &mesh,
                    "encoder",
                    i,
                    "vlm_rpc_server_requests_total",
                    &["method=\"Encode\""],
                )
            })
            .sum::<f64>()
    };
    // An error about the request itself: one encoder call, no retry.
    let before = encoder_calls();
    let corrupt = image[..image.len() / 2].to_vec();
    let p = SamplingParams {
        max_tokens: 3,
        ..Default::default()
    };
    let err = generate(&mut client, request(&corrupt, &p), None, || {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        encoder_calls() - before,
        1.0,
        "the bad image went to more than one encoder"
    );
    assert_eq!(gateway_retries(&mesh, "encoder", "retry"), 0.0);

    // Both encoders dead: 40 requests at once would want 40 × 5 retries; the budget lets
    // through about 100.
    for (pid, _) in &encoders {
        kill9(*pid);
    }
    for (pid, _) in &encoders {
        let t = Instant::now();
        while pid_alive(*pid as u64) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "encoder survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10)); // waiting for the kernel to reap
        }
    }
    let burst = Instant::now();
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let (mut client, req) = (client.clone(), request(&image, &p));
            tokio::spawn(async move {
                generate(&mut client, req, Some(Duration::from_secs(60)), || {}).await
            })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("encoder"), "{err:?}");
    }
    let retries = gateway_retries(&mesh, "encoder", "retry");
    let exhausted = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("retry budget exhausted"))
        .count();
    eprintln!("{retries} encoder retries for 40 failing requests; budget refused {exhausted}");
    assert!(exhausted >= 1, "the retry budget never refused a retry");
    // The reserve is 10 a second over a 10 s window: within one window, at most 100 retries.
    let burst = burst.elapsed();
    assert!(
        burst < Duration::from_secs(10),
        "the 40 failures took {burst:?}, more than the budget's window the bound below assumes"
    );
    assert!(
        retries <= 100.0,
        "{retries} retries: the budget (at most 100 in a burst, README) did not bound them"
    );
}

/// Every service `up` started is gone (reaped or never existed) within 30 s.
fn all_gone(pids: &[(String, u64)]) {
    let t = Instant::now();
    for (what, pid) in pids {
        while pid_alive(*pid) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{what} (pid {pid}) orphaned"
            );
            std::thread::sleep(Duration::from_millis(20)); // polling process exit, bounded
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_stops_every_service_on_sigterm_and_fails_when_the_gateway_dies() {
    // SIGTERM: every service stops and `up` exits 0.
    let mut mesh = MeshProc::start(&[]);
    let services = attack::services(&mesh);
    assert_eq!(services.len(), 4, "{services:?}");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(mesh.pid() as i32, libc::SIGTERM) };
    let status = mesh
        .wait_exit(Duration::from_secs(60))
        .expect("up still running 60 s after SIGTERM");
    assert!(status.success(), "up exited with {status} on SIGTERM");
    all_gone(&services);

    // The gateway dies (SIGKILL, nothing restarts it): `up` exits non-zero and takes the
    // stages with it.
    let mut mesh = MeshProc::start(&[]);
    let services = attack::services(&mesh);
    kill9(replicas(&mesh, "gateway")[0].0);
    let status = mesh
        .wait_exit(Duration::from_secs(60))
        .expect("up still running 60 s after its gateway died");
    assert!(!status.success(), "up exited 0 after its gateway died");
    all_gone(&services);
    let log = mesh.log.lock().unwrap().join("\n");
    assert!(
        log.contains("the gateway exited (signal: 9") && log.contains("stopping the mesh"),
        "up did not say what died: {log}"
    );
}

/// The processes whose parent is `pid`, with their command lines.
fn children_of(pid: u32) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces, so split after its closing paren.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmdline = std::fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            out.push((child, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    out
}

#[test]
fn up_stopped_during_start_up_exits_0_and_leaves_no_service() {
    let state = tempfile::tempdir().unwrap();
    use std::io::Read;
    let mut up = common::own_log_filter(&mut std::process::Command::new(EXE))
        .args(["up", "--listen", "127.0.0.1:0", "--model"])
        .arg(model())
        .arg("--state-dir")
        .arg(state.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Hold start-up: stop the encoder the moment it exists. Whether or not it printed
    // `listening`, `up` cannot be ready while the encoder cannot answer its health check.
    let t = Instant::now();
    let encoder = loop {
        if let Some((pid, _)) = children_of(up.id())
            .into_iter()
            .find(|(_, cmd)| cmd.contains("serve encoder"))
        {
            break pid;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "up started no encoder within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5)); // polling for the child to appear, bounded
    };
    // SAFETY: kill(2) on processes this test started (the encoder is up's child).
    unsafe { libc::kill(encoder as i32, libc::SIGSTOP) };
    let started: Vec<u64> = children_of(up.id()).into_iter().map(|(p, _)| p).collect();
    let read_all = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut r = r;
            let mut buf = String::new();
            let _ = r.read_to_string(&mut buf);
            buf
        })
    };
    let stdout = read_all(Box::new(up.stdout.take().unwrap()));
    let stderr = read_all(Box::new(up.stderr.take().unwrap()));
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(status) = up.try_wait().unwrap() {
            break status;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = up.kill();
            unsafe { libc::kill(encoder as i32, libc::SIGKILL) };
            panic!("up still running 60 s after SIGTERM during start-up");
        }
        std::thread::sleep(Duration::from_millis(20)); // polling process exit, bounded
    };
    // Let the stopped encoder act on the SIGTERM `up` sent it when it gave up.
    unsafe { libc::kill(encoder as i32, libc::SIGCONT) };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.success(),
        "up exited with {status} when stopped during start-up: {stderr}"
    );
    assert!(!stdout.contains("ready"), "start-up was not held: {stdout}");
    assert!(
        stderr.contains("stopped during start-up"),
        "no word of the stop: {stderr}"
    );
    let pids: Vec<(String, u64)> = started
        .into_iter()
        .map(|p| (format!("service pid {p}"), p))
        .collect();
    all_gone(&pids);
}
