//! `serve_grpc` end to end over mTLS, plus the small URL/deadline helpers.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use vlm_net::certs::generate_dev_certs;
use vlm_net::TlsFiles;
use vlm_proto::encoder_client::EncoderClient;
use vlm_proto::encoder_server::{Encoder, EncoderServer};
use vlm_proto::{EncodeRequest, EncodeResponse, EncodeStats};

struct StubEncoder;

#[tonic::async_trait]
impl Encoder for StubEncoder {
    type EncodeStream = tokio_stream::Iter<std::vec::IntoIter<Result<EncodeResponse, Status>>>;

    async fn encode(
        &self,
        req: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        // Echo the image size so the test can see the request went through.
        let stats = EncodeStats {
            preprocess_ms: req.into_inner().image.len() as f64,
            ..Default::default()
        };
        let msg = EncodeResponse {
            kind: Some(vlm_proto::encode_response::Kind::Stats(stats)),
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

#[tokio::test]
async fn serve_grpc_serves_health_and_the_service_then_drains() {
    let d = tempfile::tempdir().unwrap();
    generate_dev_certs(d.path(), &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let tls = vlm_net::server_tls(&TlsFiles::for_role(d.path(), "encoder")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vlm_net::serve_grpc(
        listener,
        Some(tls),
        EncoderServer::new(StubEncoder),
        async {
            let _ = stop_rx.await;
        },
    ));

    let client =
        || vlm_net::client_tls(&TlsFiles::for_role(d.path(), "client"), "encoder").unwrap();
    vlm_net::wait_until_serving_url(
        &url,
        Some(client()),
        "vlm.v1.Encoder",
        Duration::from_secs(10),
    )
    .await
    .unwrap();

    let ch = vlm_net::connect(&url, Some(client())).await.unwrap();
    let mut stream = EncoderClient::new(ch)
        .encode(EncodeRequest {
            region: None,
            views: vec![],
            image: vec![0u8; 7].into(),
            options: None,
            layout_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    let Some(EncodeResponse {
        kind: Some(vlm_proto::encode_response::Kind::Stats(s)),
    }) = stream.message().await.unwrap()
    else {
        panic!("expected stats");
    };
    assert_eq!(s.preprocess_ms, 7.0);

    stop_tx.send(()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not stop");
    res.unwrap().unwrap();
}

#[test]
fn a_bad_tls_config_is_refused_before_serving() {
    // A key that is not a key, and a key that is not the certificate's: errors, not panics.
    let pki = vlm_net::certs::generate_dev_pki(&[]).unwrap();
    let mut pems = pki.tls_pems("encoder").unwrap();
    pems.key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec();
    let err = pems
        .server_config(vlm_net::ClientAuth::Required)
        .expect_err("a broken key must not serve");
    assert!(err.to_string().contains("private key"), "{err}");
    let mut pems = pki.tls_pems("encoder").unwrap();
    pems.key = pki.tls_pems("decoder").unwrap().key;
    let err = pems
        .server_config(vlm_net::ClientAuth::Required)
        .expect_err("another certificate's key must not serve");
    assert!(err.to_string().contains("does not go with"), "{err}");
}

#[test]
fn url_host_strips_scheme_port_and_brackets() {
    assert_eq!(
        vlm_net::url_host("https://decoder.vlm:9000").unwrap(),
        "decoder.vlm"
    );
    assert_eq!(
        vlm_net::url_host("https://127.0.0.1:1").unwrap(),
        "127.0.0.1"
    );
    assert_eq!(vlm_net::url_host("https://[::1]:50051/").unwrap(), "::1");
    assert!(vlm_net::url_host("not a url").is_err());
    assert!(vlm_net::url_host("/just/a/path").is_err());
}

#[test]
fn grpc_timeout_header_values() {
    let p = vlm_net::parse_grpc_timeout;
    assert_eq!(p("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(p("2M"), Some(Duration::from_secs(120)));
    assert_eq!(p("3S"), Some(Duration::from_secs(3)));
    assert_eq!(p("250m"), Some(Duration::from_millis(250)));
    assert_eq!(p("99999999u"), Some(Duration::from_micros(99_999_999)));
    assert_eq!(p("5n"), Some(Duration::from_nanos(5)));
    for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S", "１S"] {
        assert_eq!(p(bad), None, "{bad:?}");
    }
}

#[test]
fn request_ids_are_distinct_trace_id_shaped() {
    let ids: std::collections::HashSet<String> =
        (0..1000).map(|_| vlm_net::new_request_id()).collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_eq!(id.len(), 32);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "{id}"
        );
        assert_ne!(id, &"0".repeat(32));
    }
}

/// Holds every encode call until `release` has a permit; counts the calls that entered.
#[derive(Clone)]
struct HeldEncoder {
    entered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    release: std::sync::Arc<tokio::sync::Semaphore>,
}

#[tonic::async_trait]
impl Encoder for HeldEncoder {
    type EncodeStream = tokio_stream::Iter<std::vec::IntoIter<Result<EncodeResponse, Status>>>;

    async fn encode(
        &self,
        _req: Request<EncodeRequest>,
    ) -> Result<Response<Self::EncodeStream>, Status> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _permit = self.release.acquire().await.expect("semaphore open");
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

/// The serving status on `url`'s health service for the whole server ("").
async fn health(url: &str) -> Result<ServingStatus, Status> {
    let ch = vlm_net::connect(url, None)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut client = HealthClient::new(ch);
    let check = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(10), check).await {
        Ok(r) => Ok(r?.into_inner().status()),
        Err(_) => Err(Status::deadline_exceeded("health check took over 10 s")),
    }
}

/// Polls `cond` every 10 ms until it holds, failing after 10 s.
async fn until(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let t = tokio::time::Instant::now();
    while !cond().await {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}: never");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling a condition, bounded
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_says_not_serving_while_open_calls_drain() {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let probe_url = format!("http://{}", probe.local_addr().unwrap());
    let held = HeldEncoder {
        entered: Default::default(),
        release: std::sync::Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vlm_net::serve_grpc_with_health_port(
        listener,
        Some(probe),
        None,
        EncoderServer::new(held.clone()),
        vlm_net::AllowedCallers::Any,
        async {
            let _ = stop_rx.await;
        },
    ));
    until("the probe port says SERVING", async || {
        health(&probe_url).await.ok() == Some(ServingStatus::Serving)
    })
    .await;
    // A call in flight, held inside the service.
    let ch = vlm_net::connect(&url, None).await.unwrap();
    let call = tokio::spawn(async move {
        EncoderClient::new(ch)
            .encode(EncodeRequest::default())
            .await
            .map(|r| r.into_inner())
    });
    until("the call reached the service", async || {
        held.entered.load(Ordering::SeqCst) == 1
    })
    .await;
    // Shutdown begins: while the open call drains, the probe port answers NOT_SERVING.
    stop_tx.send(()).unwrap();
    until("the probe port says NOT_SERVING", async || {
        health(&probe_url).await.ok() == Some(ServingStatus::NotServing)
    })
    .await;
    assert!(
        !server.is_finished(),
        "the server stopped before its open call ended"
    );
    assert!(
        !call.is_finished(),
        "the open call ended before it was released"
    );
    // The open call completes normally, then the server stops and the probe port closes.
    held.release.add_permits(1);
    let mut stream = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the drained call never completed")
        .unwrap()
        .expect("the drained call failed");
    assert!(stream.message().await.unwrap().is_some());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server did not stop after its last call")
        .unwrap()
        .unwrap();
    assert!(
        health(&probe_url).await.is_err(),
        "probe port open after exit"
    );
}
