//! Shared harness for the cross-process tests: a running `vlm-mesh up`, clients, a private
//! redis-server. Each test file includes it with `mod common;`.
#![allow(dead_code)]

pub mod attack;
pub mod clients;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vlm_proto::gateway_client::GatewayClient;

pub const EXE: &str = env!("CARGO_BIN_EXE_vlm-mesh");
/// Longest a test waits for `up` to print its ready line (a debug build loading the tiny models
/// takes seconds; this only turns a hang into a failure).
pub const MESH_START_TIMEOUT: Duration = Duration::from_secs(300);
pub const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
/// Longest a test waits for a call's response or for the next message of a stream (minutes of
/// headroom on a loaded machine; this only turns a hang into a failure).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// `fut`, failing the test if it has not finished within [`CALL_TIMEOUT`].
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: nothing within {CALL_TIMEOUT:?} (hung)"),
    }
}

/// The next message of a response stream, bounded by [`CALL_TIMEOUT`].
pub async fn next_message<T>(stream: &mut tonic::Streaming<T>) -> Result<Option<T>, tonic::Status> {
    bounded("the next stream message", stream.message()).await
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn model() -> PathBuf {
    repo().join("models/tiny-llava")
}

pub fn image_path() -> PathBuf {
    repo().join("models/images/shapes-48x48.png")
}

/// A running `vlm-mesh up`; stopped with SIGTERM (and waited for) on drop.
pub struct MeshProc {
    child: Child,
    pub state: tempfile::TempDir,
    pub gateway: String,
    /// The whole `ready …` line `up` printed.
    pub ready: String,
    stderr_lines: mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
}

/// The tests read INFO log lines: the services log at the tests' own level, whatever `VLM_LOG` or
/// `RUST_LOG` the caller of `cargo test` has set (a test's own `VLM_LOG` still wins).
pub fn own_log_filter(cmd: &mut Command) -> &mut Command {
    cmd.env("VLM_LOG", "info").env_remove("RUST_LOG")
}

impl MeshProc {
    pub fn start(envs: &[(&str, &str)]) -> MeshProc {
        Self::start_with(&model(), &[], envs)
    }

    /// `up` with another model and extra flags (e.g. `--redis URL`).
    pub fn start_with(model: &Path, args: &[&str], envs: &[(&str, &str)]) -> MeshProc {
        Self::start_in(tempfile::tempdir().unwrap(), model, args, envs)
    }

    /// `up` with `state` as its state directory (prepared by the test, e.g. its `certs/`).
    pub fn start_in(
        state: tempfile::TempDir,
        model: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> MeshProc {
        let mut cmd = Command::new(EXE);
        cmd.args(["up", "--listen", "127.0.0.1:0", "--model"])
            .arg(model)
            .args(args)
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        own_log_filter(&mut cmd);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, stderr_lines) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // A test that panicked while holding the log poisons it; keep collecting anyway.
                log2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(line.clone());
                let _ = tx.send(line);
            }
        });
        // Readiness: `up` prints `ready gateway=…` only after every service answered SERVING.
        // Bounded: a mesh that never gets ready fails the test (with its log) instead of hanging it.
        let stdout = child.stdout.take().unwrap();
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = line_tx.send(line);
        });
        let line = match line_rx.recv_timeout(MESH_START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "the mesh was not ready within {MESH_START_TIMEOUT:?}; log: {:?}",
                    log.lock().unwrap()
                );
            }
        };
        let gateway = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("gateway="))
            .unwrap_or_else(|| {
                panic!(
                    "no ready line; got {line:?}; log: {:?}",
                    log.lock().unwrap()
                )
            })
            .to_string();
        assert!(line.starts_with("ready "), "{line}");
        MeshProc {
            child,
            state,
            gateway,
            ready: line.trim_end().to_string(),
            stderr_lines,
            log,
        }
    }

    /// The `up` process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (bounded) for `up` to exit: its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20)); // polling process exit, bounded
        }
    }

    /// The OpenAI endpoint's base URL (`https://…/v1`), from the ready line's `openai=` (the
    /// mesh was started with `--http-listen`).
    pub fn openai_url(&self) -> String {
        self.ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("openai="))
            .unwrap_or_else(|| panic!("the ready line names no openai= URL: {}", self.ready))
            .to_string()
    }

    pub fn certs(&self) -> PathBuf {
        self.state.path().join("certs")
    }

    pub fn mesh_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.state.path().join("mesh.json")).unwrap())
            .unwrap()
    }

    pub fn service_addr(&self, role: &str) -> String {
        let info = self.mesh_json();
        let s = info["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["role"] == role)
            .unwrap();
        s["addr"].as_str().unwrap().to_string()
    }

    /// The Prometheus address of the first service of `role`.
    pub fn metrics_addr(&self, role: &str) -> String {
        self.mesh_json()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["role"] == role)
            .and_then(|s| s["metrics"].as_str())
            .unwrap_or_else(|| panic!("no metrics address for the {role}"))
            .to_string()
    }

    pub async fn client(&self) -> GatewayClient<tonic::transport::Channel> {
        let files = vlm_net::TlsFiles::for_role(self.certs(), "client");
        let tls = vlm_net::client_tls(&files, "localhost").unwrap();
        let channel = vlm_net::connect(&self.gateway, Some(tls)).await.unwrap();
        GatewayClient::new(channel).max_encoding_message_size(256 << 20)
    }

    /// A channel to `addr` (a stage's `host:port`) presenting `role`'s certificate. The stages
    /// accept only the gateway by default: call them `as_role("gateway")`.
    pub async fn stage_channel(&self, addr: &str, role: &str) -> tonic::transport::Channel {
        let files = vlm_net::TlsFiles::for_role(self.certs(), role);
        let tls = vlm_net::client_tls(&files, "localhost").unwrap();
        vlm_net::connect(&format!("https://{addr}"), Some(tls))
            .await
            .unwrap()
    }

    /// Waits (bounded) for a log line containing all of `needles`.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if needles.iter().all(|n| line.contains(n)) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

impl Drop for MeshProc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new(EXE)
        .args(args)
        .output_within(Duration::from_secs(600));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `vlm-mesh generate --json`: one image and prompt through the model in process (the reference),
/// with extra flags such as sampling settings.
pub fn generate_json(
    model: &Path,
    image: &Path,
    prompt: &str,
    extra: &[&str],
) -> serde_json::Value {
    let (model, image) = (model.to_str().unwrap(), image.to_str().unwrap());
    let mut args = vec![
        "generate", "--model", model, "--image", image, "--prompt", prompt, "--json",
    ];
    args.extend(extra);
    run_json(&args)
}

/// `vlm-mesh ask --json` against the mesh described in `state` (its `--state-dir`).
pub fn ask_json(state: &Path, image: &Path, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let (state, image) = (state.to_str().unwrap(), image.to_str().unwrap());
    let mut args = vec![
        "ask",
        "--state-dir",
        state,
        "--image",
        image,
        "--prompt",
        prompt,
        "--json",
    ];
    args.extend(extra);
    run_json(&args)
}

/// GET `/metrics` over plain HTTP/1.1; the body.
/// `cmd.output()`, killing the process and failing the test if it runs longer than `limit`.
pub fn output_within(cmd: &mut Command, what: &str, limit: Duration) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    wait_output_within(child, what, limit)
}

/// A spawned child's exit status and what is left on its piped stdout and stderr (read as it
/// comes, so a full pipe never stalls it), killing it and failing the test after `limit`.
pub fn wait_output_within(
    mut child: std::process::Child,
    what: &str,
    limit: Duration,
) -> std::process::Output {
    use std::io::Read;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: still running after {limit:?} (killed); stderr: {}",
                String::from_utf8_lossy(&err.join().unwrap_or_default())
            );
        }
        std::thread::sleep(Duration::from_millis(20)); // polling process exit, bounded
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// [`output_within`] as a method of the command: `cmd.args(…).output_within(limit)`.
pub trait OutputWithin {
    fn output_within(&mut self, limit: Duration) -> std::process::Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: Duration) -> std::process::Output {
        let what = format!("{self:?}");
        output_within(self, &what, limit)
    }
}

/// Runs one request to the end (each message bounded by [`CALL_TIMEOUT`], the whole call by
/// `timeout` when given, as its grpc-timeout): the token ids, or the status it failed with.
/// `on_token` runs for every delta.
pub async fn generate(
    client: &mut GatewayClient<tonic::transport::Channel>,
    req: vlm_proto::GenerateRequest,
    timeout: Option<Duration>,
    on_token: impl Fn(),
) -> Result<Vec<u32>, tonic::Status> {
    use vlm_proto::generate_response::Kind;
    let mut req = tonic::Request::new(req);
    if let Some(t) = timeout {
        req.set_timeout(t);
    }
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let mut ids = Vec::new();
    let mut finished = false;
    while let Some(msg) = next_message(&mut stream).await? {
        match msg.kind {
            Some(Kind::Delta(d)) => {
                ids.extend(d.token_ids);
                on_token();
            }
            Some(Kind::Final(_)) => finished = true,
            None => {}
        }
    }
    assert!(finished, "stream ended without a final message");
    Ok(ids)
}

/// The tiny model in-process: what every mesh answer is compared with.
pub fn pipeline() -> vlm_model::Pipeline {
    use vlm_model::{DType, Device, ImageLimits, Pipeline};
    Pipeline::load(model(), DType::F32, &Device::Cpu, ImageLimits::default()).unwrap()
}

/// The in-process answer to [`request`]`(image, p)`.
pub fn reference(
    pipeline: &vlm_model::Pipeline,
    image: &[u8],
    p: &vlm_model::SamplingParams,
) -> Vec<u32> {
    pipeline
        .generate(&[image], PROMPT, p, |_| {})
        .unwrap()
        .token_ids
}

/// `mesh.json`'s entries for every replica of `role`, in replica order.
pub fn replica_info(mesh: &MeshProc, role: &str) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["role"] == role)
        .cloned()
        .collect();
    v.sort_by_key(|s| s["replica"].as_u64().unwrap_or(0));
    v
}

/// (pid, addr) of every replica of `role`, in replica order.
pub fn replicas(mesh: &MeshProc, role: &str) -> Vec<(u32, String)> {
    replica_info(mesh, role)
        .iter()
        .map(|s| {
            (
                s["pid"].as_u64().unwrap() as u32,
                s["addr"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// SIGKILL to a process a test's mesh started.
pub fn kill9(pid: u32) {
    // SAFETY: kill(2) on a service process this test's mesh started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// The number after the last `name` (e.g. `limit_ms=`) in a log line.
pub fn field(line: &str, name: &str) -> Option<u64> {
    let (_, rest) = line.rsplit_once(name)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sum of the samples of metric `name` (exactly that name) whose labels include every one of
/// `labels` (e.g. `stage="decoder"`), in a Prometheus text exposition.
pub fn counter(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && labels.iter().all(|x| l.contains(x))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("no HTTP header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    body.to_string()
}

/// The decoder's token count on a `decoding stopped` or `cancelled` log line (the event's own
/// `tokens=` field, the last one: the span context before it has `gen_ai.request.max_tokens=`
/// and friends).
pub fn tokens_on(line: &str) -> usize {
    line.rsplit("tokens=")
        .next()
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no token count in {line:?}"))
}

pub fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A private redis-server on a free loopback port, killed on drop. Tests that stop and restart
/// Redis, or count its keys, must not share the machine's Redis with other tests.
pub struct RedisProc {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl RedisProc {
    pub fn start() -> RedisProc {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = RedisProc {
            child: None,
            port,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .cmd(&["PING"])
                .map(|o| o.contains("PONG"))
                .unwrap_or(false)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server on port {} never answered PING",
                self.port
            );
            // Readiness poll of a process we just started: bounded, not a synchronisation sleep.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs one redis-cli command against this server.
    pub fn cmd(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn feature_keys(&self) -> Vec<String> {
        let out = self
            .cmd(&["--scan", "--pattern", "vlm:feat:v1:*"])
            .unwrap_or_default();
        let mut keys: Vec<String> = out
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect();
        keys.sort();
        keys
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The gateway request for one image and `PROMPT` with these sampling settings.
pub fn request(image: &[u8], p: &vlm_model::SamplingParams) -> vlm_proto::GenerateRequest {
    vlm_proto::GenerateRequest {
        image_inputs: vec![],
        images: vec![image.to_vec().into()],
        prompt: PROMPT.into(),
        params: Some(vlm_proto::SamplingParams {
            max_tokens: Some(p.max_tokens),
            temperature: p.temperature,
            top_p: 1.0,
            top_k: p.top_k,
            seed: Some(p.seed),
            stop: vec![],
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            logit_bias: p.logit_bias.iter().copied().collect(),
            format: p.format.as_ref().map(vlm_serving::format_to_proto),
        }),
        monitor_layers: false,
        question: String::new(),
    }
}
