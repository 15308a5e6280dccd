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

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

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
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ServiceInfo {
    pub role: String,
    pub pid: u32,
    pub addr: SocketAddr,
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
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

pub struct Mesh {
    running: Vec<Running>,
    exits: mpsc::UnboundedReceiver<(String, ExitStatus)>,
    pub info: MeshInfo,
    state_dir: PathBuf,
    service_log: Option<String>,
    /// The gateway's HTTP address, from the ` http=<addr>` its `listening` line carries.
    gateway_http: Option<SocketAddr>,
}

fn spawn_service(role: &str, args: &[String], log: Option<&str>) -> anyhow::Result<(Child, u32)> {
    let exe = std::env::current_exe().context("cannot find the vlm-mesh executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg(role).args(args);
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
        let certs = certs_dir(&opts.state_dir);
        vlm_net::certs::ensure_dev_certs(&certs, &[])?;
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let mut mesh = Mesh {
            running: Vec::new(),
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
            ]
        };
        let mut addrs = Vec::new();
        for role in STAGES {
            let addr = mesh
                .launch(role, &common("127.0.0.1:0".into()), &exit_tx)
                .await?;
            addrs.push(addr);
        }
        let mut gw_args = common(opts.listen.to_string());
        for (role, addr) in STAGES.iter().zip(&addrs) {
            gw_args.push(format!("--{role}"));
            gw_args.push(format!("https://{addr}"));
        }
        gw_args.extend(opts.gateway_args.iter().cloned());
        let gw = mesh.launch("gateway", &gw_args, &exit_tx).await?;
        mesh.info.gateway_url = format!("https://{gw}");
        mesh.info.openai_url = mesh.gateway_http.map(|a| format!("https://{a}/v1"));

        // Every service must answer SERVING over mTLS before the mesh is declared ready.
        let files = vlm_net::TlsFiles::for_role(&certs, "client");
        for s in mesh.info.services.clone() {
            let tls = vlm_net::client_tls(&files, "localhost")?;
            let url = format!("https://{}", s.addr);
            tokio::select! {
                r = vlm_net::wait_until_serving_url(&url, Some(tls), "", START_TIMEOUT) => {
                    r.with_context(|| format!("the {} did not become ready", s.role))?;
                }
                Some((role, status)) = mesh.exits.recv() => bail!("the {role} exited during start-up ({status})"),
            }
        }
        std::fs::write(
            mesh_file(&opts.state_dir),
            serde_json::to_vec_pretty(&mesh.info)?,
        )?;
        Ok(mesh)
    }

    async fn launch(
        &mut self,
        role: &str,
        args: &[String],
        exit_tx: &mpsc::UnboundedSender<(String, ExitStatus)>,
    ) -> anyhow::Result<SocketAddr> {
        let (mut child, pid) = spawn_service(role, args, self.service_log.as_deref())?;
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let stderr_relay = relay_lines(
            role.to_string(),
            BufReader::new(child.stderr.take().expect("piped stderr")),
        );
        let mut lines = stdout.lines();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let addr = match first {
            Ok(Ok(Some(line))) => {
                let mut words = line
                    .strip_prefix("listening ")
                    .unwrap_or_default()
                    .split_whitespace();
                let addr = words.next().and_then(|a| a.parse::<SocketAddr>().ok());
                if let Some(http) = words.find_map(|w| w.strip_prefix("http=")) {
                    self.gateway_http = http.parse().ok();
                }
                addr.with_context(|| {
                    format!("the {role} printed {line:?} instead of `listening <addr>`")
                })
            }
            Ok(Ok(None)) => {
                let status = child.wait().await?;
                // Let its last words (why it failed) reach our stderr before we report.
                let _ = tokio::time::timeout(Duration::from_secs(5), stderr_relay).await;
                Err(anyhow::anyhow!(
                    "the {role} exited before listening ({status}); see its log above"
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
        let exit_tx = exit_tx.clone();
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
            role: role.to_string(),
            pid,
            addr,
        };
        self.info.services.push(info.clone());
        self.running.push(Running {
            info,
            stop: Some(stop_tx),
            done: Some(done_rx),
        });
        Ok(addr)
    }

    /// Resolves when a service exits on its own (an error: the mesh is broken).
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
