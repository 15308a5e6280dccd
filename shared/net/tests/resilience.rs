//! The resilience mechanisms on real servers (in-process, real sockets): load shedding, health
//! ejection and re-admission, balancing away from a slow replica, DNS discovery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use vlm_net::{Admission, AdmissionLimits, ReplicaOptions, ReplicaSet, TlsForHost};
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncodeStats};

/// Answers after `delay` (and, when `hold` is set, once it gets one of its permits); counts
/// calls.
#[derive(Clone)]
struct SlowEncoder {
    delay: Duration,
    hold: Option<Arc<Semaphore>>,
    calls: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Encoder for SlowEncoder {
    type EncodeStream = tokio_stream::Iter<std::vec::IntoIter<Result<EncodeResponse, Status>>>;

    async fn encode(
        &self,
        _req: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(hold) = &self.hold {
            hold.acquire().await.expect("semaphore open").forget();
        }
        tokio::time::sleep(self.delay).await;
        let msg = EncodeResponse {
            kind: Some(vlm_proto::encode_response::Kind::Stats(
                EncodeStats::default(),
            )),
        };
        Ok(Response::new(tokio_stream::iter(vec![Ok(msg)])))
    }

    async fn plan(
        &self,
        _req: Request<EncodeRequest>,
    ) -> Result<Response<vlm_proto::ImagePlan>, Status> {
        Err(Status::unimplemented("stub"))
    }

    async fn info(
        &self,
        _req: Request<vlm_proto::EncoderInfoRequest>,
    ) -> Result<Response<vlm_proto::EncoderInfo>, Status> {
        Err(Status::unimplemented("stub"))
    }
}

struct Server {
    url: String,
    calls: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(delay: Duration, limits: Option<AdmissionLimits>) -> Server {
        Self::start_on("127.0.0.1:0", delay, limits).await
    }

    /// A server whose calls wait inside the service until `hold` gives them a permit.
    async fn held(hold: Arc<Semaphore>, limits: AdmissionLimits) -> Server {
        Self::start_with("127.0.0.1:0", Duration::ZERO, Some(hold), Some(limits)).await
    }

    async fn start_on(addr: &str, delay: Duration, limits: Option<AdmissionLimits>) -> Server {
        Self::start_with(addr, delay, None, limits).await
    }

    async fn start_with(
        addr: &str,
        delay: Duration,
        hold: Option<Arc<Semaphore>>,
        limits: Option<AdmissionLimits>,
    ) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let svc = EncoderServer::new(SlowEncoder {
            delay,
            hold,
            calls: calls.clone(),
        });
        let limits = limits.unwrap_or(AdmissionLimits {
            max_in_flight: 1000,
            max_queue: 0,
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            vlm_net::serve_grpc(listener, None, Admission::new(svc, limits), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            url,
            calls,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

fn plaintext() -> TlsForHost {
    Arc::new(|_host: &str| Ok(None))
}

async fn call(url: &str, timeout: Duration) -> Result<(), Status> {
    let ch = vlm_net::connect(url, None).await.unwrap();
    let mut req = Request::new(EncodeRequest::default());
    // The header only: tonic's client-side timer would race the server's answer.
    let header = format!("{}m", timeout.as_millis());
    req.metadata_mut()
        .insert("grpc-timeout", header.parse().unwrap());
    EncoderClient::new(ch).encode(req).await.map(|_| ())
}

/// Waits (bounded: this only turns a hang into a failure) for the next finished call.
async fn next_result(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<(), Status>>,
) -> Result<(), Status> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("no call finished within 30 s")
        .expect("callers alive")
}

fn shed_total() -> f64 {
    vlm_telemetry::metrics::MeshMetrics::global()
        .encode()
        .lines()
        .filter(|l| l.starts_with("vlm_admission_shed_total{") && l.contains("vlm.v1.Encoder"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_sheds_beyond_in_flight_plus_queue_at_once() {
    // Every admitted call is held inside the service until the test releases it, so "at once"
    // is an order, not a time: refusals come back while the admitted calls are still held.
    let hold = Arc::new(Semaphore::new(0));
    let limits = AdmissionLimits {
        max_in_flight: 2,
        max_queue: 1,
    };
    let server = Server::held(hold.clone(), limits).await;
    vlm_net::wait_until_serving_url(&server.url, None, "", Duration::from_secs(10))
        .await
        .unwrap();
    let shed_before = shed_total();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..6 {
        let (url, tx) = (server.url.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(call(&url, Duration::from_secs(60)).await);
        });
    }
    // Two admitted (held), one queued, three refused: the refusals are the first to finish.
    for _ in 0..3 {
        let err = next_result(&mut rx).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        assert!(err.message().contains("overloaded"), "{err:?}");
    }
    assert_eq!(server.calls.load(Ordering::Relaxed), 2, "admitted calls");
    assert_eq!(shed_total() - shed_before, 3.0, "shed calls counted");
    hold.add_permits(3);
    for _ in 0..3 {
        next_result(&mut rx).await.unwrap();
    }
    assert_eq!(server.calls.load(Ordering::Relaxed), 3);

    // A queued call whose deadline passes while it waits gets DEADLINE_EXCEEDED, not a hang,
    // while both slots are still held: it ended at its own deadline, not when a slot freed.
    for _ in 0..2 {
        let (url, tx) = (server.url.clone(), tx.clone());
        tokio::spawn(async move {
            let _ = tx.send(call(&url, Duration::from_secs(60)).await);
        });
    }
    let t = Instant::now();
    while server.calls.load(Ordering::Relaxed) < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the two calls never entered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await; // polling a counter, bounded
    }
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        call(&server.url, Duration::from_millis(200)),
    )
    .await
    .expect("the queued call outlived its deadline by 30 s")
    .unwrap_err();
    // tonic's server enforces grpc-timeout on the response future too and reports its own expiry
    // as CANCELLED "Timeout expired"; whichever fires first, the queued call ends at its deadline.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert_eq!(
        server.calls.load(Ordering::Relaxed),
        5,
        "the queued call ran"
    );
    hold.add_permits(2);
    for _ in 0..2 {
        next_result(&mut rx).await.unwrap();
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_eject_a_dead_replica_and_readmit_it_when_back() {
    let a = Server::start(Duration::ZERO, None).await;
    let b = Server::start(Duration::ZERO, None).await;
    let b_addr = b.url.trim_start_matches("http://").to_string();
    let opts = ReplicaOptions {
        health_interval: Duration::from_millis(50),
        ..Default::default()
    };
    let set = ReplicaSet::new(
        "encoder",
        &format!("{},{}", a.url, b.url),
        plaintext(),
        opts,
    )
    .unwrap();
    let healthy = |set: &ReplicaSet| {
        set.replicas()
            .iter()
            .filter(|r| r.is_healthy())
            .map(|r| r.url.clone())
            .collect::<Vec<_>>()
    };
    let wait_until = |cond: &dyn Fn() -> bool| {
        let t = std::time::Instant::now();
        while !cond() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "condition never held"
            );
            std::thread::sleep(Duration::from_millis(10)); // polling a readiness condition
        }
    };
    b.stop().await;
    wait_until(&|| healthy(&set) == vec![a.url.clone()]);
    // Every pick now goes to the healthy replica.
    for _ in 0..20 {
        assert_eq!(set.pick(&[]).unwrap().url(), a.url);
    }
    // Excluding the only healthy replica falls back to the ejected one (it might be back).
    let a_id = set.replicas()[0].id;
    assert_eq!(set.pick(&[a_id]).unwrap().url(), format!("http://{b_addr}"));
    let b2 = Server::start_on(&b_addr, Duration::ZERO, None).await;
    wait_until(&|| healthy(&set).len() == 2);
    b2.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_over_peak_ewma_sends_few_calls_to_a_slow_replica() {
    // 100× slower, so a loaded machine stretching the fast replica's answers by tens of ms
    // cannot make the two look alike.
    let fast = Server::start(Duration::from_millis(5), None).await;
    let slow = Server::start(Duration::from_millis(500), None).await;
    let set = ReplicaSet::new(
        "encoder",
        &format!("{},{}", fast.url, slow.url),
        plaintext(),
        ReplicaOptions::default(),
    )
    .unwrap();
    for _ in 0..60 {
        let lease = set.pick(&[]).unwrap();
        EncoderClient::new(lease.channel())
            .encode(EncodeRequest::default())
            .await
            .unwrap();
        lease.success();
    }
    let (f, s) = (
        fast.calls.load(Ordering::Relaxed),
        slow.calls.load(Ordering::Relaxed),
    );
    eprintln!("fast {f} slow {s}");
    assert_eq!(f + s, 60);
    assert!(s <= 3, "slow replica got {s} of 60 sequential calls");
    fast.stop().await;
    slow.stop().await;
}

#[tokio::test]
async fn dns_names_resolve_to_replicas() {
    // A port of our own (nothing needs to listen: only the name is resolved).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let set = ReplicaSet::new(
        "decoder",
        &format!("dns://localhost:{port}"),
        plaintext(),
        ReplicaOptions::default(),
    )
    .unwrap();
    let t = Instant::now();
    while set.replicas().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "localhost never resolved"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // polling the first resolution
    }
    let urls: Vec<String> = set.replicas().iter().map(|r| r.url.clone()).collect();
    assert!(
        urls.iter()
            .any(|u| *u == format!("http://127.0.0.1:{port}")
                || *u == format!("http://[::1]:{port}")),
        "{urls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_names_are_re_resolved_and_calls_follow_the_answer() {
    // A name whose answer the test changes (a real DNS server cannot on demand): first one
    // replica, then two, then only the second. Each answer is real servers.
    let a = Server::start(Duration::ZERO, None).await;
    let b = Server::start(Duration::ZERO, None).await;
    let addr = |s: &Server| -> std::net::SocketAddr {
        s.url.trim_start_matches("http://").parse().unwrap()
    };
    let answer = Arc::new(std::sync::Mutex::new(vec![addr(&a)]));
    let lookups = Arc::new(AtomicU64::new(0));
    let (answer2, lookups2) = (answer.clone(), lookups.clone());
    let opts = ReplicaOptions {
        dns_refresh: Duration::from_millis(50),
        resolver: vlm_net::Resolver::new(move |host, _port| {
            assert_eq!(host, "encoders.test");
            lookups2.fetch_add(1, Ordering::SeqCst);
            let addrs = answer2.lock().unwrap().clone();
            async move {
                if addrs.is_empty() {
                    Err(std::io::Error::other("SERVFAIL"))
                } else {
                    Ok(addrs)
                }
            }
        }),
        ..Default::default()
    };
    let set = ReplicaSet::new("encoder", "dns://encoders.test:1", plaintext(), opts).unwrap();
    let urls = |set: &ReplicaSet| {
        let mut v: Vec<String> = set.replicas().iter().map(|r| r.url.clone()).collect();
        v.sort();
        v
    };
    let wait_for = |want: Vec<String>| {
        let set = &set;
        async move {
            let t = Instant::now();
            while urls(set) != want {
                assert!(
                    t.elapsed() < Duration::from_secs(10),
                    "replicas {:?}, want {want:?}",
                    urls(set)
                );
                tokio::time::sleep(Duration::from_millis(10)).await; // polling the refresh
            }
        }
    };
    wait_for(vec![a.url.clone()]).await;
    let first_id = set.replicas()[0].id;
    *answer.lock().unwrap() = vec![addr(&a), addr(&b)];
    let mut both = vec![a.url.clone(), b.url.clone()];
    both.sort();
    wait_for(both).await;
    // The replica that stayed is the same one (its channel and load estimate kept).
    assert!(set
        .replicas()
        .iter()
        .any(|r| r.id == first_id && r.url == a.url));
    *answer.lock().unwrap() = vec![addr(&b)];
    wait_for(vec![b.url.clone()]).await;
    // Calls now reach only the replica the name resolves to.
    let before = a.calls.load(Ordering::Relaxed);
    for _ in 0..5 {
        let lease = set.pick(&[]).unwrap();
        EncoderClient::new(lease.channel())
            .encode(EncodeRequest::default())
            .await
            .unwrap();
        lease.success();
    }
    assert_eq!(b.calls.load(Ordering::Relaxed), 5);
    assert_eq!(a.calls.load(Ordering::Relaxed), before);
    // A failing lookup keeps the last answer rather than emptying the set.
    answer.lock().unwrap().clear();
    let failed_from = lookups.load(Ordering::SeqCst);
    let t = Instant::now();
    while lookups.load(Ordering::SeqCst) < failed_from + 3 {
        assert!(t.elapsed() < Duration::from_secs(10), "no more lookups");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling the refresh
    }
    assert_eq!(urls(&set), vec![b.url.clone()]);
    a.stop().await;
    b.stop().await;
}
