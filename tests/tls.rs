//! Certificates that change under a running mesh (real processes, real TLS): a CA and leaf
//! rotation under load with the CA bundle overlap, a bad key/certificate pair refused, the
//! gateway's public certificate apart from its mesh identity, the plaintext OpenAI port, and
//! `vlm-mesh certs --days` with per-role names. Waits poll a condition (the expiry metric, the
//! reload counter, a port's answer) with a deadline; nothing sleeps to synchronise.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vlm_net::certs::{generate_dev_pki, generate_dev_pki_for, DevPki};
use vlm_proto::gateway_client::GatewayClient;

mod common;
use common::tls::*;
use common::*;

/// Services re-read their certificate files this often in these tests.
const RELOAD_ENV: (&str, &str) = ("VLM_TLS_RELOAD_INTERVAL_SECS", "1");
/// Longest a test waits for a reload to show (a few poll intervals on a loaded machine).
const RELOAD_DEADLINE: Duration = Duration::from_secs(60);
const ROLES: [&str; 4] = ["gateway", "encoder", "projector", "decoder"];

/// Polls `cond` until it returns `Some`, failing after `limit`.
fn poll<T>(what: &str, limit: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100)); // bounded poll of a condition
    }
}

/// `vlm_tls_certificate_expiry_seconds` of `role`'s `kind` certificate, scraped now.
fn expiry(mesh: &MeshProc, role: &str, kind: &str) -> Option<i64> {
    let text = scrape(&mesh.metrics_addr(role));
    let service = format!("service=\"{role}\"");
    let kind = format!("kind=\"{kind}\"");
    text.lines()
        .find(|l| {
            l.starts_with("vlm_tls_certificate_expiry_seconds{")
                && l.contains(&service)
                && l.contains(&kind)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as i64)
}

/// A mesh whose `certs/` is a Secret-like directory holding `pki`.
fn mesh_with(pki: &DevPki, args: &[&str]) -> (MeshProc, SecretDir) {
    let state = tempfile::tempdir().unwrap();
    let secret = SecretDir::create(
        &state.path().join("certs"),
        &pki_files(pki, &pki.ca_cert_pem),
    );
    let mesh = MeshProc::start_in(state, &model(), args, &[RELOAD_ENV]);
    (mesh, secret)
}

fn leaf(pki: &DevPki, role: &str) -> (String, i64) {
    leaf_of_pem(&pki.tls_pems(role).unwrap().cert)
}

fn small_request() -> vlm_proto::GenerateRequest {
    let image = std::fs::read(image_path()).unwrap();
    let p = vlm_model::SamplingParams {
        max_tokens: 3,
        ..Default::default()
    };
    request(&image, &p)
}

/// One Generate over a new connection trusting `ca` and presenting the client leaf of `pki`.
async fn fresh_call(gateway: &str, ca: &str, pki: &DevPki) -> Result<(), String> {
    let mut pems = pki.tls_pems("client").unwrap();
    pems.ca = ca.as_bytes().to_vec();
    let ch = vlm_net::connect(gateway, Some(pems.client_config("localhost")))
        .await
        .map_err(|e| e.to_string())?;
    let mut client = GatewayClient::new(ch);
    generate(&mut client, small_request(), None, || {})
        .await
        .map(|_| ())
        .map_err(|s| format!("{s:?}"))
}

/// Requests without pause until `stop`: on a connection opened before the rotation (trusting
/// only the old CA) and on a new connection each time (trusting both). Counts both outcomes.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    async fn start(mesh: &MeshProc, old: &DevPki, bundle: String) -> Load {
        let (stop, ok) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut kept = mesh.client().await;
        let (gateway, old) = (mesh.gateway.clone(), old.clone());
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let kept_call = generate(&mut kept, small_request(), None, || {}).await;
                let fresh = fresh_call(&gateway, &bundle, &old).await;
                for r in [kept_call.map(|_| ()).map_err(|s| format!("{s:?}")), fresh] {
                    match r {
                        Ok(()) => o.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            f.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            }
        });
        Load {
            stop,
            ok,
            failed,
            task,
        }
    }

    /// Waits (bounded) until `n` more requests succeeded.
    async fn wait_for(&self, n: usize) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let end = Instant::now() + CALL_TIMEOUT;
        while self.ok.load(Ordering::SeqCst) < target {
            assert!(
                Instant::now() < end,
                "load: {n} more requests not within {CALL_TIMEOUT:?}"
            );
            assert!(!self.task.is_finished(), "the load stopped");
            tokio::time::sleep(Duration::from_millis(20)).await; // bounded poll of a counter
        }
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        bounded("the load's last requests", self.task)
            .await
            .unwrap();
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failed)
    }
}

/// (a) A new CA and new leaves (30 days) replace the old ones while requests flow, with the CA
/// file holding both CAs: every service reloads (its expiry metric moves), a client trusting only
/// the new CA is shown the new leaves, and no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_and_leaves_rotate_under_load_without_a_failed_request() {
    let old = generate_dev_pki(&[]).unwrap();
    let new = generate_dev_pki_for(&[], 30).unwrap();
    let (mesh, mut secret) = mesh_with(&old, &[]);
    for role in ROLES {
        let want = leaf(&old, role).1;
        poll("the first expiry", RELOAD_DEADLINE, || {
            (expiry(&mesh, role, "mesh") == Some(want)).then_some(())
        });
    }
    let bundle = format!("{}{}", old.ca_cert_pem, new.ca_cert_pem);
    let load = Load::start(&mesh, &old, bundle.clone()).await;
    load.wait_for(4).await;

    secret.publish(&pki_files(&new, &bundle));
    for role in ROLES {
        let want = leaf(&new, role).1;
        poll(&format!("the {role}'s reload"), RELOAD_DEADLINE, || {
            (expiry(&mesh, role, "mesh") == Some(want)).then_some(())
        });
    }
    let line = mesh.wait_for_log(&["[gateway]", "TLS certificate reloaded"], RELOAD_DEADLINE);
    assert!(line.is_some(), "no reload line from the gateway");
    load.wait_for(6).await;

    // New connections: a client trusting only the new CA sees the new leaves.
    let gw = mesh.gateway.trim_start_matches("https://").to_string();
    let ca = new.ca_cert_pem.as_bytes();
    let shown = served_leaf(&gw, ca, "localhost", b"h2", None)
        .await
        .unwrap();
    assert_eq!((shown.serial, shown.not_after), leaf(&new, "gateway"));
    let gw_id = new.tls_pems("gateway").unwrap();
    let encoder = mesh.service_addr("encoder");
    let id = Some((&gw_id.cert[..], &gw_id.key[..]));
    let shown = served_leaf(&encoder, ca, "localhost", b"h2", id)
        .await
        .unwrap();
    assert_eq!((shown.serial, shown.not_after), leaf(&new, "encoder"));
    assert!(fresh_call(&mesh.gateway, &new.ca_cert_pem, &new)
        .await
        .is_ok());

    let (ok, failed) = load.finish().await;
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    let text = scrape(&mesh.metrics_addr("encoder"));
    let loaded = counter(
        &text,
        "vlm_tls_reloads_total",
        &["service=\"encoder\"", "result=\"loaded\""],
    );
    assert!(loaded >= 1.0, "{text}");
}

/// (b) A key that does not go with its certificate is refused: the service logs why, naming the
/// file, counts the refusal and keeps serving its previous certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatched_key_is_refused_and_the_previous_pair_serves_on() {
    let pki = generate_dev_pki(&[]).unwrap();
    let (mesh, mut secret) = mesh_with(&pki, &[]);
    let other = generate_dev_pki(&[]).unwrap();
    let mut files = pki_files(&pki, &pki.ca_cert_pem);
    for (name, data) in files.iter_mut() {
        if name == "encoder.key" {
            *data = other.tls_pems("encoder").unwrap().key;
        }
    }
    secret.publish(&files);
    let refused = || {
        let text = scrape(&mesh.metrics_addr("encoder"));
        let labels = ["service=\"encoder\"", "kind=\"mesh\"", "result=\"refused\""];
        (counter(&text, "vlm_tls_reloads_total", &labels) >= 1.0).then_some(())
    };
    poll("the refusal", RELOAD_DEADLINE, refused);
    let line = mesh
        .wait_for_log(
            &["[encoder]", "TLS reload refused", "encoder.pem"],
            RELOAD_DEADLINE,
        )
        .expect("no refusal line naming the certificate");
    assert!(line.contains("encoder.key"), "{line}");
    assert_eq!(
        expiry(&mesh, "encoder", "mesh"),
        Some(leaf(&pki, "encoder").1)
    );

    let gw = pki.tls_pems("gateway").unwrap();
    let id = Some((&gw.cert[..], &gw.key[..]));
    let addr = mesh.service_addr("encoder");
    let ca = pki.ca_cert_pem.as_bytes();
    let shown = served_leaf(&addr, ca, "localhost", b"h2", id)
        .await
        .unwrap();
    assert_eq!(shown.serial, leaf(&pki, "encoder").0);
    fresh_call(&mesh.gateway, &pki.ca_cert_pem, &pki)
        .await
        .unwrap();
}

/// A `serve gateway` beside a mesh's stages, stopped (SIGTERM) on drop.
struct Gateway {
    child: Child,
    /// The `listening …` line.
    line: String,
    _log: tempfile::NamedTempFile,
}

impl Gateway {
    fn start(mesh: &MeshProc, extra: &[&str]) -> Gateway {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(EXE);
        cmd.args(["serve", "gateway", "--listen", "127.0.0.1:0", "--model"])
            .arg(model())
            .arg("--tls-dir")
            .arg(mesh.certs());
        for role in ["encoder", "projector", "decoder"] {
            let url = format!("https://{}", mesh.service_addr(role));
            cmd.args([&format!("--{role}"), &url]);
        }
        let stderr = Stdio::from(log.reopen().unwrap());
        cmd.args(extra).stdout(Stdio::piped()).stderr(stderr);
        own_log_filter(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(MESH_START_TIMEOUT).unwrap_or_default();
        let log_text = || std::fs::read_to_string(log.path()).unwrap_or_default();
        assert!(
            line.starts_with("listening "),
            "{line:?}; log: {}",
            log_text()
        );
        Gateway {
            child,
            line,
            _log: log,
        }
    }

    /// The address after `label=` on the listening line (the gRPC one for `""`).
    fn addr(&self, label: &str) -> String {
        let mut words = self.line.split_whitespace().skip(1);
        if label.is_empty() {
            return words.next().unwrap().to_string();
        }
        let prefix = format!("{label}=");
        words
            .find_map(|w| w.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {label}= in {:?}", self.line))
            .to_string()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A chat completion over plain HTTP/1.1 to `addr`: the status line and body.
fn plain_chat(addr: &str) -> (String, String) {
    use base64::Engine as _;
    let png = std::fs::read(image_path()).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let body = serde_json::json!({
        "model": "tiny-llava", "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is shown in this image?"},
            {"type": "image_url", "image_url": {"url": url}}]}],
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("no HTTP header end");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// (c) `--public-cert/--public-key`: both public ports show the public certificate, to a client
/// that trusts only the public CA, while the stages still see the mesh identity; (e)
/// `--http-plaintext-listen` answers a chat completion over plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ports_show_the_public_certificate_and_plaintext_http_answers() {
    let mesh = MeshProc::start(&[]);
    let public = generate_dev_pki_for(&["public.example".into()], 30).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public_pems = public.tls_pems("gateway").unwrap();
    let (cert, key) = (dir.path().join("public.pem"), dir.path().join("public.key"));
    std::fs::write(&cert, &public_pems.cert).unwrap();
    std::fs::write(&key, &public_pems.key).unwrap();
    let gw = Gateway::start(
        &mesh,
        &[
            "--public-cert",
            cert.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
            "--http-listen",
            "127.0.0.1:0",
            "--http-plaintext-listen",
            "127.0.0.1:0",
        ],
    );
    let ca = public.ca_cert_pem.as_bytes();
    let want = leaf_of_pem(&public_pems.cert);
    for (addr, alpn) in [
        (gw.addr(""), &b"h2"[..]),
        (gw.addr("http"), &b"http/1.1"[..]),
    ] {
        let shown = served_leaf(&addr, ca, "public.example", alpn, None)
            .await
            .unwrap();
        assert_eq!((shown.serial.clone(), shown.not_after), want, "{addr}");
        assert!(
            shown.names.contains(&"public.example".to_string()),
            "{shown:?}"
        );
        // The mesh CA does not vouch for it.
        let mesh_ca = std::fs::read(mesh.certs().join("ca.pem")).unwrap();
        assert!(served_leaf(&addr, &mesh_ca, "localhost", alpn, None)
            .await
            .is_err());
    }
    // A real call through the public gRPC port, trusting only the public CA: the gateway still
    // reaches the stages with its mesh identity.
    let mut pems = mesh_client_pems(&mesh);
    pems.ca = public.ca_cert_pem.clone().into_bytes();
    let url = format!("https://{}", gw.addr(""));
    let ch = vlm_net::connect(&url, Some(pems.client_config("public.example")))
        .await
        .unwrap();
    generate(&mut GatewayClient::new(ch), small_request(), None, || {})
        .await
        .unwrap();

    let (status, body) = plain_chat(&gw.addr("http-plaintext"));
    assert!(status.contains(" 200 "), "{status}: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["object"], "chat.completion", "{body}");
}

fn mesh_client_pems(mesh: &MeshProc) -> vlm_net::TlsPems {
    vlm_net::TlsFiles::for_role(mesh.certs(), "client")
        .load()
        .unwrap()
}

/// (d) `certs --days 30`: leaves expire in 30 days (±1), the CA in about ten years, and a leaf
/// names only its own role (plus the names for every role).
#[test]
fn certs_days_sets_the_validity_and_each_leaf_names_only_its_role() {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(EXE)
        .args(["certs", "--days", "30", "--out"])
        .arg(out.path())
        .args([
            "--hosts",
            "encoder=enc.example,decoder=dec.example,all.example",
        ])
        .output_within(Duration::from_secs(60));
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let day = 86_400;
    let read = |name: &str| std::fs::read(out.path().join(name)).unwrap();
    for role in ["gateway", "encoder", "projector", "decoder", "client"] {
        let (_, not_after) = leaf_of_pem(&read(&format!("{role}.pem")));
        assert!(
            (not_after - (now + 30 * day)).abs() <= day,
            "{role}: {not_after}"
        );
    }
    let (_, ca_not_after) = leaf_of_pem(&read("ca.pem"));
    assert!(ca_not_after > now + 9 * 365 * day, "CA: {ca_not_after}");
    let names = |role: &str| {
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&read(&format!("{role}.pem")));
        let der: rustls_pki_types::CertificateDer = der.unwrap();
        vlm_net::certs::certificate_names(&der).unwrap()
    };
    let encoder = names("encoder");
    for n in [
        "encoder",
        "enc.example",
        "all.example",
        "localhost",
        "127.0.0.1",
    ] {
        assert!(encoder.contains(&n.to_string()), "{n} not in {encoder:?}");
    }
    for n in ["dec.example", "decoder", "gateway", "projector"] {
        assert!(!encoder.contains(&n.to_string()), "{n} in {encoder:?}");
    }
    let decoder = names("decoder");
    assert!(
        decoder.contains(&"dec.example".to_string())
            && !decoder.contains(&"enc.example".to_string())
    );

    let bad = Command::new(EXE)
        .args(["certs", "--force", "--out"])
        .arg(out.path())
        .args(["--hosts", "cache=x.example"])
        .output_within(Duration::from_secs(60));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a role"));
}
