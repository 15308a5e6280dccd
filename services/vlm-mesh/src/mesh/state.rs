//! What `up` leaves in its state directory for `ask`, `watch` and scripts: `starting.json` while
//! the services start (the launcher's pid and the gateway address it was given), `mesh.json` once
//! every service answers SERVING. Both are written atomically (a temporary file renamed into
//! place), so a reader never sees half a file. A file whose launcher process is gone is stale: a
//! new `up` replaces it, and `ask` says so instead of dialling an address nobody serves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{mesh_file, MeshInfo};

/// `<state-dir>/starting.json`: present while `up` starts the services.
pub fn starting_file(state_dir: &Path) -> PathBuf {
    state_dir.join("starting.json")
}

/// What `up` writes to `starting.json` before it starts anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Starting {
    pub launcher_pid: u32,
    /// The gateway's `--listen` as `up` was given it (port 0: the port is chosen later).
    pub gateway_listen: String,
}

/// The mesh a state directory describes.
#[derive(Debug)]
pub enum MeshState {
    /// `mesh.json`, its launcher alive: every service answered SERVING.
    Ready(MeshInfo),
    /// `starting.json`, its launcher alive.
    Starting(Starting),
    /// A file left by a launcher that is no longer running (killed, or the machine restarted).
    Stale { file: PathBuf, pid: u32 },
    /// Neither file.
    Absent,
}

/// Whether process `pid` exists (signal 0 checks without sending anything).
fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill(2) with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not what `vlm-mesh up` writes", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Reads the state directory; see [`MeshState`].
pub fn read_state(state_dir: &Path) -> anyhow::Result<MeshState> {
    let mut stale = None;
    let ready = mesh_file(state_dir);
    if let Some(info) = read_json::<MeshInfo>(&ready)? {
        if alive(info.launcher_pid) {
            return Ok(MeshState::Ready(info));
        }
        stale = Some(MeshState::Stale {
            file: ready,
            pid: info.launcher_pid,
        });
    }
    let starting = starting_file(state_dir);
    if let Some(s) = read_json::<Starting>(&starting)? {
        if alive(s.launcher_pid) {
            return Ok(MeshState::Starting(s));
        }
        stale = stale.or(Some(MeshState::Stale {
            file: starting,
            pid: s.launcher_pid,
        }));
    }
    Ok(stale.unwrap_or(MeshState::Absent))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Called by `up` before it starts anything: refuses a state directory another live `up` uses,
/// removes what a dead one left, and writes `starting.json`.
pub fn claim(state_dir: &Path, gateway_listen: &str) -> anyhow::Result<()> {
    let me = std::process::id();
    match read_state(state_dir)? {
        MeshState::Ready(MeshInfo { launcher_pid, .. })
        | MeshState::Starting(Starting { launcher_pid, .. })
            if launcher_pid != me =>
        {
            anyhow::bail!(
                "another `vlm-mesh up` (pid {launcher_pid}) is running with the state directory {}: \
                 stop it first, or give this one its own --state-dir",
                state_dir.display()
            )
        }
        MeshState::Stale { file, pid } => {
            eprintln!(
                "up: removing {} (and any mesh.json/starting.json) left by an `up` (pid {pid}) that is no longer running",
                file.display()
            );
        }
        _ => {}
    }
    for f in [mesh_file(state_dir), starting_file(state_dir)] {
        match std::fs::remove_file(&f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", f.display())),
        }
    }
    let starting = Starting {
        launcher_pid: me,
        gateway_listen: gateway_listen.to_string(),
    };
    write_atomic(
        &starting_file(state_dir),
        &serde_json::to_vec_pretty(&starting)?,
    )
}

/// Waits until the mesh `up` is starting under `state_dir` is ready, at most `timeout`. With
/// `for_new_up`, nothing there yet (or only a dead `up`'s files) means an `up` about to start:
/// it is waited for too; without, that fails at once. Fails as soon as a starting `up` exits.
pub async fn wait_ready(
    state_dir: &Path,
    timeout: Duration,
    for_new_up: bool,
) -> anyhow::Result<MeshInfo> {
    let deadline = Instant::now() + timeout;
    let mut seen_starting = None;
    loop {
        let waiting_for = match read_state(state_dir)? {
            MeshState::Ready(info) => return Ok(info),
            MeshState::Starting(s) => {
                seen_starting = Some(s.launcher_pid);
                format!(
                    "the mesh `vlm-mesh up` (pid {}) is starting",
                    s.launcher_pid
                )
            }
            MeshState::Stale { .. } | MeshState::Absent if seen_starting.is_some() => {
                let pid = seen_starting.unwrap_or(0);
                anyhow::bail!(
                    "`vlm-mesh up` (pid {pid}) exited before its mesh was ready: see its output"
                )
            }
            MeshState::Stale { pid, .. } if !for_new_up => anyhow::bail!(
                "`vlm-mesh up` (pid {pid}) exited before its mesh was ready: see its output"
            ),
            MeshState::Absent if !for_new_up => anyhow::bail!(
                "no mesh is starting or running with the state directory {}",
                state_dir.display()
            ),
            _ => format!(
                "a `vlm-mesh up` with the state directory {}",
                state_dir.display()
            ),
        };
        if Instant::now() >= deadline {
            anyhow::bail!("{waiting_for} was not ready within {} s", timeout.as_secs());
        }
        // Polling two small files until `up` renames mesh.json into place, bounded above.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(pid: u32) -> MeshInfo {
        MeshInfo {
            gateway_url: "https://127.0.0.1:1".into(),
            openai_url: None,
            launcher_pid: pid,
            services: vec![],
        }
    }

    /// A pid that is not running: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid));
        pid
    }

    #[test]
    fn live_files_are_ready_or_starting_and_a_dead_launchers_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(read_state(dir.path()).unwrap(), MeshState::Absent));
        let me = std::process::id();
        claim(dir.path(), "127.0.0.1:0").unwrap();
        assert!(
            matches!(read_state(dir.path()).unwrap(), MeshState::Starting(s) if s.launcher_pid == me)
        );
        write_atomic(
            &mesh_file(dir.path()),
            &serde_json::to_vec(&info(me)).unwrap(),
        )
        .unwrap();
        assert!(
            matches!(read_state(dir.path()).unwrap(), MeshState::Ready(i) if i.launcher_pid == me)
        );
        let dead = dead_pid();
        write_atomic(
            &mesh_file(dir.path()),
            &serde_json::to_vec(&info(dead)).unwrap(),
        )
        .unwrap();
        std::fs::remove_file(starting_file(dir.path())).unwrap();
        assert!(
            matches!(read_state(dir.path()).unwrap(), MeshState::Stale { pid, .. } if pid == dead)
        );
        // A new `up` removes the stale file and writes its own starting.json.
        claim(dir.path(), "127.0.0.1:7").unwrap();
        assert!(!mesh_file(dir.path()).exists());
        assert!(
            matches!(read_state(dir.path()).unwrap(), MeshState::Starting(s) if s.gateway_listen == "127.0.0.1:7")
        );
    }

    #[test]
    fn a_state_dir_in_use_by_another_live_up_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        // The parent of this test process stands in for another live `up`.
        let other = std::os::unix::process::parent_id();
        write_atomic(
            &mesh_file(dir.path()),
            &serde_json::to_vec(&info(other)).unwrap(),
        )
        .unwrap();
        let e = claim(dir.path(), "127.0.0.1:0").unwrap_err().to_string();
        assert!(
            e.contains(&format!("pid {other}")) && e.contains("--state-dir"),
            "{e}"
        );
        assert!(
            mesh_file(dir.path()).exists(),
            "the other mesh's file was removed"
        );
    }

    #[tokio::test]
    async fn waiting_ends_when_ready_and_fails_fast_when_nothing_or_a_dead_up_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let e = wait_ready(dir.path(), Duration::from_secs(5), false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no mesh is starting"), "{e}");
        // Waiting for a new `up`: nothing there is waited for, up to the limit.
        let e = wait_ready(dir.path(), Duration::from_millis(250), true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not ready within"), "{e}");
        claim(dir.path(), "127.0.0.1:0").unwrap();
        let e = wait_ready(dir.path(), Duration::from_millis(250), false)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("is starting was not ready within"),
            "{e}"
        );
        let path = dir.path().to_path_buf();
        let writer = tokio::spawn(async move {
            // The mesh becomes ready while the reader waits.
            tokio::task::yield_now().await;
            write_atomic(
                &mesh_file(&path),
                &serde_json::to_vec(&info(std::process::id())).unwrap(),
            )
            .unwrap();
        });
        let got = wait_ready(dir.path(), Duration::from_secs(5), false)
            .await
            .unwrap();
        assert_eq!(got.launcher_pid, std::process::id());
        writer.await.unwrap();
        let dead = dead_pid();
        let starting = Starting {
            launcher_pid: dead,
            gateway_listen: "127.0.0.1:0".into(),
        };
        std::fs::remove_file(mesh_file(dir.path())).unwrap();
        write_atomic(
            &starting_file(dir.path()),
            &serde_json::to_vec(&starting).unwrap(),
        )
        .unwrap();
        for for_new_up in [false, true] {
            let e = wait_ready(dir.path(), Duration::from_millis(500), for_new_up).await;
            let e = e.unwrap_err().to_string();
            if for_new_up {
                // A dead `up`'s file: a new one may be on its way.
                assert!(e.contains("not ready within"), "{e}");
            } else {
                assert!(e.contains("exited before its mesh was ready"), "{e}");
            }
        }
    }
}
