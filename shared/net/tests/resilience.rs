//! The resilience mechanisms on real servers (in-process, real sockets): load shedding, health
//! ejection and re-admission, balancing away from a slow replica, DNS discovery.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tonic::{Code, Request, Response, Status};
use vlm_net::{Admission, AdmissionLimits, ReplicaOptions, ReplicaSet, TlsForHost};
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncodeStats};

/// Answers after `delay`; counts calls.
#[derive(Clone)]
struct SlowEncoder {
    delay: Duration,
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
        tokio::time::sleep(self.delay).await;
        let msg = EncodeResponse {
            kind: Some(vlm_proto::encode_response::Kind::Stats(
                EncodeStats::default(),
            )),
        };
        Ok(Response::new(tokio_stream::iter(vec![Ok(msg)])))
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

    async fn start_on(addr: &str, delay: Duration, limits: Option<AdmissionLimits>) -> Server {
        let listener = TcpListener::bind(addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let calls = Arc::new(AtomicU64::new(0));
        let svc = EncoderServer::new(SlowEncoder {
            delay,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_sheds_beyond_in_flight_plus_queue_at_once() {
    let server = Server::start(
        Duration::from_millis(800),
        Some(AdmissionLimits {
            max_in_flight: 2,
            max_queue: 1,
        }),
    )
    .await;
    vlm_net::wait_until_serving_url(&server.url, None, "", Duration::from_secs(10))
        .await
        .unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let url = server.url.clone();
            tokio::spawn(async move {
                let r = call(&url, Duration::from_secs(30)).await;
                (r, started.elapsed())
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            (Ok(()), _) => ok += 1,
            (Err(s), took) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(took < Duration::from_millis(400), "shed after {took:?}");
                shed += 1;
            }
        }
    }
    // Two served at once, one queued (served after them), three refused.
    assert_eq!((ok, shed), (3, 3));
    assert_eq!(server.calls.load(Ordering::Relaxed), 3);
    // A queued call whose deadline passes while it waits gets DEADLINE_EXCEEDED, not a hang.
    let url = server.url.clone();
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { call(&url, Duration::from_secs(30)).await })
        })
        .collect();
    // Readiness: both are inside the service (holding the two slots).
    let t = Instant::now();
    while server.calls.load(Ordering::Relaxed) < 5 {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    let err = call(&url, Duration::from_millis(200)).await.unwrap_err();
    // tonic's server enforces grpc-timeout on the response future too and reports its own expiry
    // as CANCELLED "Timeout expired"; whichever fires first, the queued call ends at its deadline.
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert!(t.elapsed() < Duration::from_millis(700));
    for b in busy {
        b.await.unwrap().unwrap();
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
    let fast = Server::start(Duration::from_millis(5), None).await;
    let slow = Server::start(Duration::from_millis(200), None).await;
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
