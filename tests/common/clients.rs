//! Client tools for end-to-end tests, built by their own package managers: a Python venv
//! (grpcio, the `openai` SDK) and Node's node_modules, installed from PyPI and npm on first use
//! into `target/tmp/clients/` and reinstalled only when `requirements.txt` /
//! `package-lock.json` change.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::{output_within, repo, CALL_TIMEOUT};

pub struct Tools {
    pub python: PathBuf,
    pub node_modules: PathBuf,
}

pub fn run_checked(cmd: &mut Command, what: &str) {
    // Package installs from PyPI/npm: minutes on a slow mirror, never forever.
    let out = output_within(cmd, what, Duration::from_secs(900));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs `manifest`'s packages with `install` into `dir` unless `dir` already holds exactly that
/// manifest's install (a stamp file carries the manifest's contents).
pub fn install_once(dir: &Path, manifest: &Path, install: impl FnOnce(&Path)) {
    let want = std::fs::read_to_string(manifest).unwrap();
    let stamp = dir.join(".installed-from");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    install(dir);
    std::fs::write(stamp, want).unwrap();
}

pub fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("clients");
        let examples = repo().join("examples/clients");
        let venv = root.join("venv");
        let node = root.join("node");
        std::thread::scope(|s| {
            s.spawn(|| {
                let req = examples.join("python/requirements.txt");
                install_once(&venv, &req, |dir| {
                    run_checked(
                        Command::new("python3").args(["-m", "venv"]).arg(dir),
                        "python3 -m venv",
                    );
                    run_checked(
                        Command::new(dir.join("bin/pip"))
                            .args(["install", "--disable-pip-version-check", "-q", "-r"])
                            .arg(&req),
                        "pip install -r examples/clients/python/requirements.txt",
                    );
                });
            });
            s.spawn(|| {
                let lock = examples.join("node/package-lock.json");
                install_once(&node, &lock, |dir| {
                    for f in ["package.json", "package-lock.json"] {
                        std::fs::copy(examples.join("node").join(f), dir.join(f)).unwrap();
                    }
                    run_checked(
                        Command::new("npm")
                            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
                            .current_dir(dir),
                        "npm ci (examples/clients/node)",
                    );
                });
            });
        });
        Tools {
            python: venv.join("bin/python"),
            node_modules: node.join("node_modules"),
        }
    })
}

/// Runs a client; its stdout must be one JSON object.
pub fn client_json(cmd: &mut Command, what: &str) -> Value {
    let out = output_within(cmd, what, CALL_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

pub fn python(script: &str) -> Command {
    let mut cmd = Command::new(&tools().python);
    cmd.arg(repo().join(script));
    cmd
}
