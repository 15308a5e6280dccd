//! `vlm-mesh up` / `demo`: the whole mesh on loopback, each service its own OS process.
//!
//! The launcher starts the stages with `--listen 127.0.0.1:0`, learns their ports from the
//! `listening <addr>` line each prints, starts the gateway pointing at them, and waits until every
//! service answers SERVING on grpc.health.v1 over mTLS. Children die with the launcher: they get
//! SIGTERM on shutdown, and the kernel sends them SIGTERM if the launcher itself is killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;

mod startup;
pub mod state;
use serde::Serialize;
pub use startup::StoppedDuringStartup;
use startup::{ended_during_startup, gateway_plaintext};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use vlm_model::Quantization;

/// How long a service may take to load its weights and report SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a service gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub const STAGES: [&str; 3] = ["encoder", "projector", "decoder"];

/// The state directory `up` and `ask` share by default.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("vlm-mesh");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/state/vlm-mesh");
    }
    std::env::temp_dir().join("vlm-mesh")
}

pub fn certs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("certs")
}

pub fn mesh_file(state_dir: &Path) -> PathBuf {
    state_dir.join("mesh.json")
}

#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub model: PathBuf,
    pub state_dir: PathBuf,
    pub listen: SocketAddr,
    pub dtype: String,
    /// Extra arguments for `serve gateway`.
    pub gateway_args: Vec<String>,
    /// Log filter for the services (`VLM_LOG`); None keeps the caller's, else `info`.
    pub service_log: Option<String>,
    /// Processes per stage, in [`STAGES`] order.
    pub replicas: [usize; 3],
    /// `--quantize` of each stage, in [`STAGES`] order.
    pub quantize: [Quantization; 3],
}

/// Parses `up --quantize`: one mode for every stage (`q8_0`), or stages by name
/// (`decoder=q4_k,encoder=q8_0`; stages not named stay unquantized).
pub fn parse_quantize(spec: &str) -> Result<[Quantization; 3], String> {
    let choices = Quantization::NAMES.join(", ");
    let mode = |s: &str| {
        s.trim()
            .parse::<Quantization>()
            .map_err(|_| format!("unknown quantization {s:?} (possible values: {choices})"))
    };
    if !spec.contains('=') {
        return Ok([mode(spec)?; 3]);
    }
    let mut out = [Quantization::None; 3];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (stage, m) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} is not STAGE=MODE"))?;
        let i = STAGES
            .iter()
            .position(|s| *s == stage.trim())
            .ok_or_else(|| format!("unknown stage {stage:?} (encoder, projector, decoder)"))?;
        out[i] = mode(m)?;
    }
    Ok(out)
}

/// Parses `encoder=2,projector=1,decoder=2` (stages not named keep 1 replica).
pub fn parse_replicas(spec: &str) -> anyhow::Result<[usize; 3]> {
    let mut out = [1; 3];
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (stage, n) = item
            .split_once('=')
            .with_context(|| format!("--replicas: {item:?} is not STAGE=N"))?;
        let i = STAGES
            .iter()
            .position(|s| *s == stage.trim())
            .with_context(|| {
                format!("--replicas: unknown stage {stage:?} (encoder, projector, decoder)")
            })?;
        let n: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--replicas: {n:?} is not a number"))?;
        anyhow::ensure!(
            (1..=16).contains(&n),
            "--replicas: {stage} must have 1 to 16 replicas"
        );
        out[i] = n;
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServiceInfo {
    pub role: String,
    /// Index among the replicas of `role` (0 for the gateway).
    #[serde(default)]
    pub replica: usize,
    pub pid: u32,
    pub addr: SocketAddr,
    /// Its Prometheus metrics endpoint (plain HTTP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

impl ServiceInfo {
    /// `decoder` for the first replica, `decoder#1`… for the others (log prefixes, messages).
    pub fn label(&self) -> String {
        label(&self.role, self.replica)
    }
}

fn label(role: &str, replica: usize) -> String {
    if replica == 0 {
        role.to_string()
    } else {
        format!("{role}#{replica}")
    }
}

/// `--cache-secret-file <state-dir>/cache-secret` (made once, kept across restarts) when the
/// gateway gets `--redis` without a secret of its own and without `--cache-unkeyed`: a mesh that
/// `up` starts never serves forgeable cached features.
fn cache_secret_args(state_dir: &Path, gateway_args: &[String]) -> anyhow::Result<Vec<String>> {
    let has = |flag: &str| gateway_args.iter().any(|a| a == flag);
    if !has("--redis") || has("--cache-secret-file") || has("--cache-unkeyed") {
        return Ok(vec![]);
    }
    let path = state_dir.join("cache-secret");
    if vlm_net::certs::ensure_secret_file(&path)? {
        tracing::info!(path = %path.display(), "made the feature cache's secret");
    }
    Ok(vec![
        "--cache-secret-file".into(),
        path.display().to_string(),
    ])
}

/// What `up` writes to `<state-dir>/mesh.json` for `ask` and tests.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MeshInfo {
    pub gateway_url: String,
    /// Base URL of the gateway's OpenAI-compatible endpoint (`…/v1`), when `--http-listen` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openai_url: Option<String>,
    pub launcher_pid: u32,
    pub services: Vec<ServiceInfo>,
}

struct Running {
    info: ServiceInfo,
    /// Its `serve <role>` arguments, to start it again on the same address.
    args: Vec<String>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

pub struct Mesh {
    running: Vec<Running>,
    exit_tx: mpsc::UnboundedSender<(String, ExitStatus)>,
    exits: mpsc::UnboundedReceiver<(String, ExitStatus)>,
    pub info: MeshInfo,
    state_dir: PathBuf,
    service_log: Option<String>,
    /// The gateway's HTTP address, from the ` http=<addr>` its `listening` line carries.
    gateway_http: Option<SocketAddr>,
}

fn spawn_service(
    role: &str,
    replica: usize,
    args: &[String],
    log: Option<&str>,
) -> anyhow::Result<(Child, u32)> {
    let exe = std::env::current_exe().context("cannot find the vlm-mesh executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg(role).args(args);
    // Which replica this is; test fault hooks can single one out by it.
    cmd.env("VLM_REPLICA", replica.to_string());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match log {
        Some(filter) => {
            cmd.env("VLM_LOG", filter);
        }
        None if std::env::var_os("VLM_LOG").is_none() => {
            cmd.env("VLM_LOG", "info");
        }
        None => {}
    }
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal this child when the
    // launcher thread that spawned it dies, so no service outlives a killed launcher.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start the {role}"))?;
    let pid = child.id().context("child has no pid")?;
    Ok((child, pid))
}

/// Relays a child's output lines to our stderr, prefixed with its role.
fn relay_lines<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    role: String,
    reader: BufReader<R>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = reader.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{role}] {line}");
        }
    })
}

impl Mesh {
    pub async fn start(opts: &MeshOptions) -> anyhow::Result<Mesh> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create state dir {}", opts.state_dir.display()))?;
        state::claim(&opts.state_dir, &opts.listen.to_string())?;
        let certs = certs_dir(&opts.state_dir);
        vlm_net::certs::ensure_dev_certs(&certs, &[])?;
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let mut mesh = Mesh {
            running: Vec::new(),
            exit_tx,
            exits,
            info: MeshInfo {
                gateway_url: String::new(),
                openai_url: None,
                launcher_pid: std::process::id(),
                services: vec![],
            },
            state_dir: opts.state_dir.clone(),
            service_log: opts.service_log.clone(),
            gateway_http: None,
        };
        let common = |listen: String| {
            vec![
                "--listen".to_string(),
                listen,
                "--model".into(),
                opts.model.display().to_string(),
                "--tls-dir".into(),
                certs.display().to_string(),
                "--dtype".into(),
                opts.dtype.clone(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
            ]
        };
        let mut gw_args = common(opts.listen.to_string());
        for ((role, &n), q) in STAGES.iter().zip(&opts.replicas).zip(&opts.quantize) {
            let mut urls = Vec::new();
            for replica in 0..n.max(1) {
                let mut args = common("127.0.0.1:0".into());
                args.extend(["--quantize".to_string(), q.name().to_string()]);
                let addr = mesh.launch(role, replica, &args).await?;
                urls.push(format!("https://{addr}"));
            }
            gw_args.push(format!("--{role}"));
            gw_args.push(urls.join(","));
        }
        gw_args.extend(opts.gateway_args.iter().cloned());
        gw_args.extend(cache_secret_args(&opts.state_dir, &opts.gateway_args)?);
        let gw = mesh.launch("gateway", 0, &gw_args).await?;
        // VLM_PLAINTEXT (inherited by the gateway) serves its public ports without TLS; the
        // stages stay on mTLS.
        let public = if gateway_plaintext() { "http" } else { "https" };
        mesh.info.gateway_url = format!("{public}://{gw}");
        mesh.info.openai_url = mesh.gateway_http.map(|a| format!("{public}://{a}/v1"));

        // Every service must answer SERVING (over mTLS, the gateway as it serves) before the mesh
        // is declared ready.
        let files = vlm_net::TlsFiles::for_role(&certs, "client");
        for s in mesh.info.services.clone() {
            let (url, tls) = if s.role == "gateway" && public == "http" {
                (format!("http://{}", s.addr), None)
            } else {
                let tls = vlm_net::client_tls(&files, "localhost")?;
                (format!("https://{}", s.addr), Some(tls))
            };
            tokio::select! {
                r = vlm_net::wait_until_serving_url(&url, tls, "", START_TIMEOUT) => {
                    r.with_context(|| format!("the {} did not become ready", s.label()))?;
                }
                Some((role, status)) = mesh.exits.recv() => {
                    return Err(ended_during_startup(&role, status, "exited during start-up"));
                }
            }
        }
        mesh.write_mesh_file()?;
        let _ = std::fs::remove_file(state::starting_file(&opts.state_dir));
        Ok(mesh)
    }

    /// `mesh.json`, written atomically: a reader sees the old file or the new one.
    fn write_mesh_file(&self) -> anyhow::Result<()> {
        state::write_atomic(
            &mesh_file(&self.state_dir),
            &serde_json::to_vec_pretty(&self.info)?,
        )
    }

    /// Starts the service `label` (`encoder`, `decoder#1`…) that exited again, on the address it
    /// had, so the gateway's health checks take it back; `mesh.json` gets its new pid. Returns
    /// once it listens.
    pub async fn restart(&mut self, label: &str) -> anyhow::Result<ServiceInfo> {
        let i = self
            .running
            .iter()
            .position(|r| r.info.label() == label)
            .with_context(|| format!("no service {label}"))?;
        let old = &self.running[i];
        let (role, replica, addr) = (old.info.role.clone(), old.info.replica, old.info.addr);
        let mut args = old.args.clone();
        if let Some(at) = args.iter().position(|a| a == "--listen") {
            args[at + 1] = addr.to_string();
        }
        self.launch(&role, replica, &args).await?;
        // launch() appended it; put it back in its place (shutdown order is start order reversed).
        let new = self.running.pop().expect("launch pushed it");
        let info = new.info.clone();
        self.running[i] = new;
        let j = self
            .info
            .services
            .iter()
            .position(|s| s.label() == label)
            .expect("listed at start");
        self.info.services.pop();
        self.info.services[j] = info.clone();
        self.write_mesh_file()?;
        Ok(info)
    }

    async fn launch(
        &mut self,
        role: &str,
        replica: usize,
        args: &[String],
    ) -> anyhow::Result<SocketAddr> {
        let (mut child, pid) = spawn_service(role, replica, args, self.service_log.as_deref())?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let role_label = label(role, replica);
        let role = role_label.as_str();
        let stderr_relay = relay_lines(
            role.to_string(),
            BufReader::new(child.stderr.take().expect("piped stderr")),
        );
        let mut lines = stdout.lines();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let mut metrics = None;
        let addr = match first {
            Ok(Ok(Some(line))) => {
                let mut words = line
                    .strip_prefix("listening ")
                    .unwrap_or_default()
                    .split_whitespace();
                let addr = words.next().and_then(|a| a.parse::<SocketAddr>().ok());
                for w in words {
                    if let Some(http) = w.strip_prefix("http=") {
                        self.gateway_http = http.parse().ok();
                    }
                    if let Some(m) = w.strip_prefix("metrics=") {
                        metrics = m.parse().ok();
                    }
                }
                addr.with_context(|| {
                    format!("the {role} printed {line:?} instead of `listening <addr>`")
                })
            }
            Ok(Ok(None)) => {
                let status = child.wait().await?;
                // Let its last words (why it failed) reach our stderr before we report.
                let _ = tokio::time::timeout(Duration::from_secs(5), stderr_relay).await;
                Err(ended_during_startup(
                    role,
                    status,
                    "exited before listening",
                ))
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow::anyhow!(
                "the {role} did not start listening within {START_TIMEOUT:?}"
            )),
        };
        let addr = match addr {
            Ok(a) => a,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        let remaining = BufReader::new(lines.into_inner().into_inner());
        drop(relay_lines(role.to_string(), remaining)); // runs until the child closes stdout
        let role_s = role.to_string();
        let exit_tx = self.exit_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                status = child.wait() => {
                    if let Ok(status) = status {
                        let _ = exit_tx.send((role_s, status));
                    }
                }
                _ = stop_rx => {
                    // SAFETY: plain kill(2) on our own child's pid.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                        let _ = child.kill().await;
                    }
                }
            }
            let _ = done_tx.send(());
        });
        let info = ServiceInfo {
            role: role.split('#').next().unwrap_or(role).to_string(),
            replica,
            pid,
            addr,
            metrics,
        };
        self.info.services.push(info.clone());
        self.running.push(Running {
            info,
            args: args.to_vec(),
            stop: Some(stop_tx),
            done: Some(done_rx),
        });
        Ok(addr)
    }

    /// Resolves when a service exits on its own, with its label (`decoder#1`, `gateway`…).
    pub async fn child_exited(&mut self) -> (String, ExitStatus) {
        match self.exits.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    /// Stops every service (gateway first, so no new work reaches the stages) and waits for them.
    pub async fn shutdown(mut self) {
        for r in self.running.iter_mut().rev() {
            if let Some(stop) = r.stop.take() {
                let _ = stop.send(());
            }
            if let Some(done) = r.done.take() {
                let _ = done.await;
            }
            tracing::debug!(role = %r.info.role, "stopped");
        }
        let _ = std::fs::remove_file(mesh_file(&self.state_dir));
        let _ = std::fs::remove_file(state::starting_file(&self.state_dir));
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Best effort if shutdown() was not awaited: never leave services behind.
        for r in &self.running {
            if r.stop.is_some() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(r.info.pid as i32, libc::SIGTERM) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_spec() {
        assert_eq!(parse_replicas("").unwrap(), [1, 1, 1]);
        assert_eq!(parse_replicas("encoder=2, decoder=3").unwrap(), [2, 1, 3]);
        assert!(parse_replicas("encoder").is_err());
        assert!(parse_replicas("gateway=2").is_err());
        assert!(parse_replicas("decoder=0").is_err());
        assert!(parse_replicas("decoder=x").is_err());
    }
}
