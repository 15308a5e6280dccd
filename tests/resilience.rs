//! Resilience end to end: real process trees from `vlm-mesh up --replicas …`, real mTLS, real
//! SIGKILL. Fault hooks (env vars read by the services) stand in only for what cannot be produced
//! on demand: a replica that is slow, a model slow enough to act "mid-stream".

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;
use vlm_model::SamplingParams;

mod common;
use common::*;

/// The tests in this file measure latencies and deadlines on a small machine; run them one at a
/// time so one test's mesh does not eat another's CPU (other test binaries run before or after).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decoder_killed_mid_stream_all_forty_requests_complete_identically_formats_included() {
    let _serial = SERIAL.lock().await;
    // The decode delay makes each stream last long enough that a kill lands mid-stream.
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=2"],
        &[
            ("VLM_FAULT_DECODE_DELAY_MS", "15"),
            ("VLM_HEALTH_INTERVAL_MS", "200"),
            // 40 calls from one client: more than its default share of the gateway's 128.
            ("VLM_MAX_PEER_SHARE", "1"),
        ],
    );
    let decoders = replicas(&mesh, "decoder");
    assert_eq!(decoders.len(), 2, "{decoders:?}");
    let image = std::fs::read(image_path()).unwrap();
    let pipeline = pipeline();
    // Greedy and seeded sampling, mixed; every third held to an output format (a resumed
    // stream's format state is replayed from the tokens already sent).
    let formats = [
        None,
        Some(vlm_model::OutputFormat::Regex("[a-z ]{12,40}\\.".into())),
        Some(vlm_model::OutputFormat::JsonSchema(
            r#"{"type":"object","properties":{"n":{"type":"integer"},"s":{"enum":["a","b"]}},"required":["n","s"]}"#.into(),
        )),
    ];
    let params: Vec<SamplingParams> = (0..40u64)
        .map(|i| SamplingParams {
            max_tokens: 16 + (i as u32 % 5),
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            top_k: if i % 4 == 1 { 20 } else { 0 },
            seed: 7000 + i,
            format: formats[i as usize % 3].clone(),
            ..Default::default()
        })
        .collect();
    let client = mesh.client().await;
    let tokens_seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for p in &params {
        let mut client = client.clone();
        let req = request(&image, p);
        let seen = tokens_seen.clone();
        tasks.push(tokio::spawn(async move {
            generate(&mut client, req, None, || {
                seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await
        }));
    }
    // Kill decoder #1 once tokens are flowing (mid-stream for the requests it serves).
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokens_seen.load(std::sync::atomic::Ordering::Relaxed) < 40 {
        assert!(Instant::now() < deadline, "no tokens flowing");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter, bounded above
    }
    kill9(decoders[1].0);
    let killed_at = tokens_seen.load(std::sync::atomic::Ordering::Relaxed);
    for (p, t) in params.iter().zip(tasks) {
        let got = t
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("request {p:?} failed: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, p), "{p:?}");
    }
    assert!(!pid_alive(decoders[1].0 as u64), "decoder #1 still alive");
    // The kill happened mid-stream: the gateway resumed streams elsewhere, some of them after
    // tokens had already reached the client (`tokens=N` > 0 is what was replayed).
    let resumed: Vec<(usize, String)> = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("resuming on another replica"))
        .filter_map(|l| {
            let n = l
                .split("tokens=")
                .nth(1)?
                .split(|c: char| !c.is_ascii_digit())
                .next()?;
            Some((n.parse().ok()?, l.clone()))
        })
        .collect();
    let total = params.iter().map(|p| p.max_tokens as usize).sum::<usize>();
    eprintln!(
        "killed decoder #1 after {killed_at}/{total} tokens; {} streams resumed, replayed tokens {:?}",
        resumed.len(),
        resumed.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert!(
        resumed.iter().any(|(n, _)| *n > 0),
        "no stream was resumed mid-stream; log: {:?}",
        mesh.log.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_decoder_replica_is_abandoned_after_its_adaptive_timeout_with_unchanged_output() {
    let _serial = SERIAL.lock().await;
    // Replica #1 takes 3 s per token (stuck, for a model that does one in milliseconds). The
    // adaptive timeout is clamped to at most 800 ms, which is also its value before any latency
    // has been observed.
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "decoder=2"],
        &[
            ("VLM_FAULT_DECODE_DELAY_MS", "5,3000"),
            ("VLM_TIMEOUT_MIN_MS", "100"),
            ("VLM_TIMEOUT_MAX_MS", "800"),
        ],
    );
    let image = std::fs::read(image_path()).unwrap();
    let pipeline = pipeline();
    let client = mesh.client().await;
    let params: Vec<SamplingParams> = (0..6u64)
        .map(|i| SamplingParams {
            max_tokens: 8,
            temperature: if i % 2 == 0 { 0.0 } else { 0.9 },
            seed: 300 + i,
            ..Default::default()
        })
        .collect();
    let tasks: Vec<_> = params
        .iter()
        .map(|p| {
            let (mut client, req) = (client.clone(), request(&image, p));
            tokio::spawn(async move {
                let t = Instant::now();
                let r = generate(&mut client, req, Some(Duration::from_secs(30)), || {}).await;
                (r, t.elapsed())
            })
        })
        .collect();
    for (p, t) in params.iter().zip(tasks) {
        let (r, took) = t.await.unwrap();
        let got = r.unwrap_or_else(|s| panic!("{p:?}: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, p), "{p:?}");
        // An outer bound only: waiting for the stuck replica would take 3 s a token, 24 s.
        assert!(took < Duration::from_secs(15), "{p:?} took {took:?}");
    }
    // The mechanism: calls on the stuck replica were abandoned at the adaptive timeout, which
    // is clamped to --timeout-max-ms, and went on on the other replica.
    let abandoned: Vec<u64> = mesh
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("[gateway]") && l.contains("slower than its adaptive timeout"))
        .map(|l| field(l, "limit_ms=").unwrap_or_else(|| panic!("no limit_ms in {l}")))
        .collect();
    eprintln!("decoder calls abandoned on the stuck replica after (ms): {abandoned:?}");
    assert!(
        !abandoned.is_empty(),
        "the stuck replica was never tried or never abandoned"
    );
    assert!(
        abandoned.iter().all(|&ms| (100..=800).contains(&ms)),
        "{abandoned:?}"
    );
    let failovers = counter(
        &scrape(&mesh.metrics_addr("gateway")),
        "vlm_gateway_retries_total",
        &["stage=\"decoder\"", "kind=\"failover\""],
    );
    assert!(
        failovers >= abandoned.len() as f64,
        "{failovers} failovers for {} abandoned calls",
        abandoned.len()
    );
}

/// Encoder calls (successful or not) each replica received, from its own Info.
async fn encoder_requests(mesh: &MeshProc, addr: &str) -> u64 {
    let ch = mesh.stage_channel(addr, "gateway").await;
    vlm_proto::encoder_client::EncoderClient::new(ch)
        .info(vlm_proto::EncoderInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .requests_total
}

/// Latencies of `n` requests, `concurrency` at a time, after `warmup` unmeasured ones.
async fn measure(mesh: &MeshProc, image: &[u8], warmup: usize, n: usize) -> Vec<Duration> {
    let client = mesh.client().await;
    let p = SamplingParams {
        max_tokens: 6,
        ..Default::default()
    };
    let want = reference(&pipeline(), image, &p);
    for _ in 0..warmup {
        let got = generate(&mut client.clone(), request(image, &p), None, || {})
            .await
            .unwrap();
        assert_eq!(got, want);
    }
    let concurrency = 4;
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (mut client, latencies, image, want, p) = (
            client.clone(),
            latencies.clone(),
            image.to_vec(),
            want.clone(),
            p.clone(),
        );
        workers.push(tokio::spawn(async move {
            for _ in 0..n / concurrency {
                let t = Instant::now();
                let got = generate(&mut client, request(&image, &p), None, || {})
                    .await
                    .unwrap_or_else(|s| panic!("request failed: {s:?}"));
                latencies.lock().unwrap().push(t.elapsed());
                assert_eq!(got, want);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let v = latencies.lock().unwrap().clone();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_twenty_times_slower_encoder_gets_few_calls_and_every_answer_is_right() {
    let _serial = SERIAL.lock().await;
    let image = std::fs::read(image_path()).unwrap();
    // The encoders take 20 ms and 400 ms per image; the decoder takes 10 ms per token so a
    // request is a realistic mix of stages. No cache: every request must go to an encoder.
    let mesh = MeshProc::start_with(
        &model(),
        &["--replicas", "encoder=2", "--no-cache"],
        &[
            ("VLM_FAULT_ENCODE_DELAY_MS", "20,400"),
            ("VLM_FAULT_DECODE_DELAY_MS", "10"),
            ("VLM_TIMEOUT_MIN_MS", "50"),
        ],
    );
    let latencies = measure(&mesh, &image, 8, 40).await;
    let encoders = replicas(&mesh, "encoder");
    let fast_calls = encoder_requests(&mesh, &encoders[0].1).await;
    let slow_calls = encoder_requests(&mesh, &encoders[1].1).await;
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    eprintln!("calls fast {fast_calls} slow {slow_calls}; slowest request {slowest:?}");
    // The mechanism: the balancer sends the slow replica few of the 48 calls (round robin
    // would send it half), while still probing it now and then.
    assert!(fast_calls + slow_calls >= 48, "{fast_calls} + {slow_calls}");
    assert!(
        slow_calls * 5 <= fast_calls + slow_calls,
        "slow replica got {slow_calls} of {} calls",
        fast_calls + slow_calls
    );
    // An outer bound only: no request waited on anything like a stuck call.
    assert!(slowest < Duration::from_secs(20), "{slowest:?}");
}

/// A stage process started by the test itself (to bring a replica back on its old address).
struct ServiceProc(Child);

impl ServiceProc {
    fn start(role: &str, listen: &str, certs: &std::path::Path) -> ServiceProc {
        let mut child = Command::new(EXE)
            .args(["serve", role, "--listen", listen, "--model"])
            .arg(model())
            .arg("--tls-dir")
            .arg(certs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Readiness: the process prints `listening ADDR` once it has loaded and bound.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.starts_with("listening "), "{role}: {line:?}");
        ServiceProc(child)
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `up` starts a stage that died again on its address (as Kubernetes restarts a container), the
/// gateway takes it back, and requests that need it succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_dead_stage_again_on_its_address_and_the_gateway_takes_it_back() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshProc::start_with(
        &model(),
        &["--no-cache"],
        &[("VLM_HEALTH_INTERVAL_MS", "200")],
    );
    let image = std::fs::read(image_path()).unwrap();
    let p = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    let want = reference(&pipeline(), &image, &p);
    let (pid, addr) = replicas(&mesh, "encoder")[0].clone();
    kill9(pid);
    let back = mesh
        .wait_for_log(&["the encoder is back: pid"], Duration::from_secs(120))
        .unwrap_or_else(|| panic!("no restart: {:?}", mesh.log.lock().unwrap()));
    let now = replicas(&mesh, "encoder");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now[0].0, pid, "mesh.json still names the dead process");
    assert_eq!(now[0].1, addr, "restarted on another address");
    assert!(back.contains(&format!("pid {}", now[0].0)), "{back}");
    assert!(
        pid_alive(now[0].0 as u64),
        "the restarted encoder is not running"
    );
    assert!(!pid_alive(pid as u64));
    mesh.wait_for_log(&["[gateway]", "healthy again"], Duration::from_secs(30))
        .unwrap_or_else(|| panic!("never re-admitted: {:?}", mesh.log.lock().unwrap()));
    let mut client = mesh.client().await;
    let got = generate(&mut client, request(&image, &p), None, || {})
        .await
        .unwrap();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_encoder_down_is_retried_around_all_down_fail_fast_with_unavailable_then_recover() {
    let _serial = SERIAL.lock().await;
    // The replicas stay down until the test starts one by hand (`up` would restart them).
    let mesh = MeshProc::start_with(
        &model(),
        &[
            "--replicas",
            "encoder=2",
            "--no-cache",
            "--restart",
            "never",
        ],
        &[("VLM_HEALTH_INTERVAL_MS", "200")],
    );
    let image = std::fs::read(image_path()).unwrap();
    let p = SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    let want = reference(&pipeline(), &image, &p);
    let mut client = mesh.client().await;
    assert_eq!(
        generate(&mut client, request(&image, &p), None, || {})
            .await
            .unwrap(),
        want
    );
    let gateway_pid = replicas(&mesh, "gateway")[0].0;
    let encoders = replicas(&mesh, "encoder");
    let reap = |pid: u32| {
        let t = Instant::now();
        while pid_alive(pid as u64) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "encoder survived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10)); // waiting for the kernel to reap
        }
    };
    // One of two down: calls that reach the dead one are retried on the other at once (no
    // waiting for a health check), so every request succeeds.
    kill9(encoders[0].0);
    reap(encoders[0].0);
    for _ in 0..4 {
        let got = generate(
            &mut client,
            request(&image, &p),
            Some(Duration::from_secs(5)),
            || {},
        )
        .await
        .unwrap();
        assert_eq!(got, want);
    }
    // Both down.
    kill9(encoders[1].0);
    reap(encoders[1].0);
    let deadline = Duration::from_secs(5);
    for _ in 0..3 {
        let t = Instant::now();
        let err = generate(&mut client, request(&image, &p), Some(deadline), || {})
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(err.message().contains("encoder"), "{err:?}");
        assert!(took < deadline, "took {took:?}, deadline {deadline:?}");
        eprintln!("all encoders down: {:?} after {took:?}", err.message());
    }
    // One replica comes back on its old address; the same gateway takes it back.
    let _back = ServiceProc::start("encoder", &encoders[0].1, &mesh.certs());
    mesh.wait_for_log(&["[gateway]", "healthy again"], Duration::from_secs(20))
        .unwrap_or_else(|| {
            panic!(
                "gateway never re-admitted the encoder: {:?}",
                mesh.log.lock().unwrap()
            )
        });
    for _ in 0..3 {
        let got = generate(&mut client, request(&image, &p), Some(deadline), || {})
            .await
            .unwrap();
        assert_eq!(got, want);
    }
    assert_eq!(replicas(&mesh, "gateway")[0].0, gateway_pid);
    assert!(pid_alive(gateway_pid as u64), "gateway restarted or died");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_300ms_deadline_ends_a_long_request_in_time_and_the_decoder_stops() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshProc::start(&[("VLM_FAULT_DECODE_DELAY_MS", "25")]);
    let image = std::fs::read(image_path()).unwrap();
    let mut client = mesh.client().await;
    // Warm the path (connections, first-call costs), so the measured call is the deadline's.
    let short = SamplingParams {
        max_tokens: 2,
        ..Default::default()
    };
    generate(&mut client, request(&image, &short), None, || {})
        .await
        .unwrap();
    // 180 tokens × 25 ms: about 4.5 s of work.
    let long = SamplingParams {
        max_tokens: 180,
        ..Default::default()
    };
    let budget = Duration::from_millis(300);
    let t = Instant::now();
    let err = generate(&mut client, request(&image, &long), Some(budget), || {})
        .await
        .unwrap_err();
    let took = t.elapsed();
    eprintln!("deadline 300 ms: {:?} after {took:?}", err.code());
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // An outer bound only (the request is 4.5 s of work): what ended it is checked below.
    assert!(
        took < Duration::from_secs(3),
        "took {took:?} for a {budget:?} deadline"
    );
    // The decoder stopped working on it (its own deadline or the cancelled call), long before the
    // 180 tokens.
    let line = mesh
        .wait_for_log(&["[decoder]", "decoding stopped"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("decoder never stopped; log: {:?}", mesh.log.lock().unwrap()));
    let tokens = tokens_on(&line);
    eprintln!("decoder: {line}");
    assert!(tokens < 40, "{line}");
    // The deadline travelled: the decoder got the remaining budget as its own grpc-timeout
    // (less than the client's 300 ms, after the gateway's share), not an unbounded call.
    let sent = field(&line, "deadline_ms=").unwrap_or_else(|| panic!("no deadline in {line}"));
    assert!(
        (1..=300).contains(&sent),
        "decoder's deadline {sent} ms: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_at_4x_concurrency_sheds_fast_accepts_the_rest_and_memory_stays_bounded() {
    let _serial = SERIAL.lock().await;
    const IN_FLIGHT: usize = 4;
    const QUEUE: usize = 2;
    const RSS_BOUND_KIB: u64 = 512 * 1024;
    let mesh = MeshProc::start(&[
        ("VLM_MAX_IN_FLIGHT", "4"),
        ("VLM_MAX_QUEUE", "2"),
        ("VLM_FAULT_DECODE_DELAY_MS", "40"),
        // All 16 calls come from one client: no per-peer share, the global limits are tested.
        ("VLM_MAX_PEER_SHARE", "1"),
    ]);
    let image = std::fs::read(image_path()).unwrap();
    let p = SamplingParams {
        max_tokens: 25, // ≥ 1 s per request, so all 16 overlap
        ..Default::default()
    };
    let want = reference(&pipeline(), &image, &p);
    let client = mesh.client().await;
    let pids: Vec<u32> = ["encoder", "projector", "decoder", "gateway"]
        .iter()
        .map(|r| replicas(&mesh, r)[0].0)
        .collect();
    let mut peak_rss = vec![0u64; pids.len()];
    let shed_metric = || {
        counter(
            &scrape(&mesh.metrics_addr("gateway")),
            "vlm_admission_shed_total",
            &["service=\"vlm.v1.Gateway\""],
        )
    };
    for round in 0..2 {
        let shed_before = shed_metric();
        let mut tasks = Vec::new();
        for _ in 0..4 * IN_FLIGHT {
            let mut client = client.clone();
            let req = request(&image, &p);
            tasks.push(tokio::spawn(async move {
                let r = generate(&mut client, req, None, || {}).await;
                (r, Instant::now())
            }));
        }
        if round == 0 {
            // While the slots are busy, the queue fills: the gateway's queue-depth gauge shows
            // the calls waiting for a slot.
            let depth = || {
                counter(
                    &scrape(&mesh.metrics_addr("gateway")),
                    "vlm_admission_queue_depth",
                    &["service=\"vlm.v1.Gateway\""],
                )
            };
            let t = Instant::now();
            let mut seen = 0.0f64;
            while seen < QUEUE as f64 && !tasks.iter().all(|t| t.is_finished()) {
                assert!(t.elapsed() < Duration::from_secs(60), "queue never filled");
                seen = seen.max(depth());
                tokio::time::sleep(Duration::from_millis(5)).await; // polling a gauge, bounded
            }
            eprintln!("queue depth seen: {seen}");
            assert!(seen >= 1.0 && seen <= QUEUE as f64, "queue depth {seen}");
        }
        let (mut ok, mut shed) = (0, 0);
        let mut last_shed = None::<Instant>;
        let mut first_ok = None::<Instant>;
        for t in tasks {
            for (i, pid) in pids.iter().enumerate() {
                peak_rss[i] = peak_rss[i].max(rss_kib(*pid));
            }
            match t.await.unwrap() {
                (Ok(ids), at) => {
                    assert_eq!(ids, want);
                    ok += 1;
                    first_ok = Some(first_ok.map_or(at, |t| t.min(at)));
                }
                (Err(s), at) => {
                    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                    assert!(s.message().contains("overloaded"), "{s:?}");
                    shed += 1;
                    last_shed = Some(last_shed.map_or(at, |t| t.max(at)));
                }
            }
        }
        let shed_counted = shed_metric() - shed_before;
        eprintln!(
            "round {round}: {ok} accepted, {shed} shed ({shed_counted} counted by the gateway); peak RSS KiB {peak_rss:?}"
        );
        assert!(ok >= IN_FLIGHT, "only {ok} accepted");
        assert!(ok <= IN_FLIGHT + QUEUE, "{ok} accepted beyond the limits");
        assert_eq!(ok + shed, 4 * IN_FLIGHT);
        // Shed by the gateway's admission (not further down), each one counted.
        assert_eq!(shed_counted, shed as f64);
        // Refused at once, not after waiting for a slot: every refusal came back before the
        // first accepted request (1 s of decoding) finished.
        if let (Some(last_shed), Some(first_ok)) = (last_shed, first_ok) {
            assert!(
                last_shed < first_ok,
                "a refusal came {:?} after the first accepted request finished",
                last_shed - first_ok
            );
        }
    }
    for (i, rss) in peak_rss.iter().enumerate() {
        assert!(*rss > 0, "no RSS read for pid {}", pids[i]);
        assert!(
            *rss < RSS_BOUND_KIB,
            "pid {} peaked at {rss} KiB (bound {RSS_BOUND_KIB} KiB)",
            pids[i]
        );
    }
    // After the overload, the mesh serves normally.
    let got = generate(&mut client.clone(), request(&image, &p), None, || {})
        .await
        .unwrap();
    assert_eq!(got, want);
}
