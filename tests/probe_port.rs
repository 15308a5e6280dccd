//! `serve <role> --health-listen ADDR`: the plaintext port that Kubernetes' gRPC probes use
//! (the kubelet cannot present a client certificate). A real `serve projector` process with real
//! mTLS on its main port: the probe port answers grpc.health.v1 without TLS and serves nothing
//! else, and the main port still refuses plaintext.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

mod common;
use common::{model, OutputWithin, EXE};

const STARTUP: Duration = Duration::from_secs(120);

struct Serve {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Serve {
    fn next_line(&self) -> String {
        self.lines
            .recv_timeout(STARTUP)
            .expect("serve printed no line in time (or exited)")
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_after<'a>(line: &'a str, prefix: &str) -> &'a str {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected `{prefix}<addr>`, got {line:?}"))
        .trim()
}

async fn check(url: &str, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = vlm_net::connect(url, None)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        HealthClient::new(channel).check(HealthCheckRequest {
            service: service.to_string(),
        }),
    )
    .await
    .map_err(|_| tonic::Status::deadline_exceeded("health check took over 10 s"))??;
    Ok(resp.into_inner().status())
}

#[tokio::test]
async fn probe_port_serves_health_without_tls_and_main_port_stays_mtls() {
    let certs = tempfile::tempdir().unwrap();
    let made = Command::new(EXE)
        .args(["certs", "--out"])
        .arg(certs.path())
        .output_within(Duration::from_secs(120));
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let mut child = Command::new(EXE)
        .args([
            "serve",
            "projector",
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--model",
        ])
        .arg(model())
        .arg("--tls-dir")
        .arg(certs.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut serve = Serve { child, lines };
    // The launcher contract: `listening` stays the first line, the probe port follows.
    let main = addr_after(&serve.next_line(), "listening ").to_string();
    let probe = addr_after(&serve.next_line(), "health-listening ").to_string();
    assert_ne!(main, probe);

    let probe_url = format!("http://{probe}");
    for service in ["", "vlm.v1.Projector"] {
        let status = check(&probe_url, service).await;
        assert_eq!(
            status.as_ref().ok(),
            Some(&ServingStatus::Serving),
            "probe port, service {service:?}: {status:?}"
        );
    }
    // Health reports only services that exist.
    let unknown = check(&probe_url, "vlm.v1.Nope").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // The probe port carries health only: the projector's own API is not there.
    let channel = vlm_net::connect(&probe_url, None).await.unwrap();
    let mut projector = vlm_proto::projector_client::ProjectorClient::new(channel);
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        projector.project(futures::stream::empty::<vlm_proto::TensorChunk>()),
    )
    .await
    .expect("the probe port did not answer a Project call within 10 s")
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    // The main port still requires TLS: plaintext gets no health answer at all.
    let plain = check(&format!("http://{main}"), "").await;
    assert!(plain.is_err(), "main port answered plaintext: {plain:?}");
    // …and answers over mTLS, as before.
    let files = vlm_net::TlsFiles::for_role(certs.path(), "client");
    let tls = vlm_net::client_tls(&files, "localhost").unwrap();
    vlm_net::wait_until_serving_url(
        &format!("https://{main}"),
        Some(tls),
        "vlm.v1.Projector",
        Duration::from_secs(30),
    )
    .await
    .unwrap();

    // SIGTERM: the process drains and exits cleanly, probe port included.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(serve.child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = serve.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling process exit, bounded
    };
    assert!(status.success(), "serve exited with {status}");
    let after = check(&probe_url, "").await;
    assert!(
        after.is_err(),
        "probe port still answers after exit: {after:?}"
    );
}
