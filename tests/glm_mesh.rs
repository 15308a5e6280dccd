//! End-to-end on the GLM-family fixtures: `vlm-mesh up` (four processes, mTLS) driven by the real
//! `ask` binary gives the same ids as `vlm-mesh generate` and as transformers; a checkpoint whose
//! decoder type is unsupported stops `up` before anything is declared ready.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;
use common::{ask_json, generate_json, repo, MeshProc, EXE};

struct Reference {
    image: PathBuf,
    prompt: String,
    greedy: Vec<u64>,
}

fn reference(model: &Path) -> Reference {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("reference/reference.json")).unwrap())
            .unwrap();
    Reference {
        image: model.join(meta["image"].as_str().unwrap()),
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        greedy: meta["greedy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect(),
    }
}

/// `ask` through the mesh and `generate` in one process agree, greedy and sampled, and greedy
/// equals transformers' 16 ids.
fn mesh_equals_generate(fixture: &str) {
    let model = repo().join("models").join(fixture);
    let r = reference(&model);
    let mesh = MeshProc::start_with(&model, &[], &[]);
    for sampling in [
        vec!["--max-tokens", "16"],
        vec![
            "--max-tokens",
            "16",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "7",
        ],
    ] {
        let mesh_out = ask_json(mesh.state.path(), &r.image, &r.prompt, &sampling);
        let local_out = generate_json(&model, &r.image, &r.prompt, &sampling);
        eprintln!(
            "{fixture} {sampling:?}: mesh {} generate {}",
            mesh_out["token_ids"], local_out["token_ids"]
        );
        assert_eq!(
            mesh_out["token_ids"], local_out["token_ids"],
            "{fixture} {sampling:?}"
        );
        assert_eq!(
            mesh_out["text"], local_out["text"],
            "{fixture} {sampling:?}"
        );
        assert_eq!(mesh_out["prompt_tokens"], local_out["prompt_tokens"]);
        let ids: Vec<u64> = mesh_out["token_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids.len(), 16, "{fixture} {sampling:?}");
        if sampling.len() == 2 {
            assert_eq!(
                ids, r.greedy,
                "{fixture}: greedy ids differ from transformers"
            );
        }
    }
}

#[test]
fn glm_mesh_ask_equals_generate_and_transformers() {
    mesh_equals_generate("tiny-llava-glm");
}

#[test]
fn glm4_mesh_ask_equals_generate_and_transformers() {
    mesh_equals_generate("tiny-llava-glm4");
}

#[test]
fn layer_norm_projector_mesh_ask_equals_generate_and_reference() {
    mesh_equals_generate("tiny-llava-lnproj");
}

/// A copy of the GLM fixture whose decoder type is one this build does not serve.
fn unsupported_copy() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = repo().join("models/tiny-llava-glm");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    assert_eq!(cfg["text_config"]["model_type"], "glm");
    cfg["text_config"]["model_type"] = "chatglm".into();
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    tmp
}

fn assert_names_supported_decoders(what: &str, stderr: &str) {
    for needle in ["'chatglm'", "supported decoders", "llama", "glm4"] {
        assert!(
            stderr.contains(needle),
            "{what}: {needle} missing in {stderr}"
        );
    }
}

/// Output of a command that must exit by itself.
struct Exited {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion. The limit is a bound, not a synchronisation: a command that should
/// have refused to start but keeps running (serving) is killed and the test fails.
fn run_bounded(what: &str, cmd: &mut Command) -> Exited {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on our own child, not yet reaped (its wait() is still pending).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{what} did not exit by itself on an unsupported decoder type");
        }
    };
    let out = Exited {
        success: status.success(),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    eprintln!("{what}: {status}; stderr:\n{}", out.stderr);
    out
}

#[test]
fn unsupported_decoder_type_fails_up_before_ready() {
    let model = unsupported_copy();
    let state = tempfile::tempdir().unwrap();
    let up = run_bounded(
        "up",
        Command::new(EXE)
            .args(["up", "--listen", "127.0.0.1:0", "--model"])
            .arg(model.path())
            .arg("--state-dir")
            .arg(state.path()),
    );
    assert!(!up.success, "up succeeded: {}", up.stdout);
    assert!(!up.stdout.contains("ready"), "up printed: {}", up.stdout);
    assert!(
        !state.path().join("mesh.json").exists(),
        "up wrote mesh.json (it only does so once every service is SERVING)"
    );
    assert!(up.stderr.contains("exited"), "{}", up.stderr);

    // `up` relays each service's stderr, but may exit before its relay has copied the service's
    // last line (a race in the launcher), so the reason is checked on the services themselves:
    // the decoder (which picks the family) and the encoder (the first one `up` starts) refuse the
    // checkpoint at load, before listening, let alone serving.
    let certs = tempfile::tempdir().unwrap();
    let made = run_bounded(
        "certs",
        Command::new(EXE).args(["certs", "--out"]).arg(certs.path()),
    );
    assert!(made.success, "{}", made.stderr);
    for role in ["decoder", "encoder"] {
        let serve = run_bounded(
            role,
            Command::new(EXE)
                .args(["serve", role, "--listen", "127.0.0.1:0", "--model"])
                .arg(model.path())
                .arg("--tls-dir")
                .arg(certs.path()),
        );
        assert!(!serve.success, "{role} started: {}", serve.stdout);
        assert!(
            !serve.stdout.contains("listening"),
            "{role} listened: {}",
            serve.stdout
        );
        assert_names_supported_decoders(role, &serve.stderr);
    }

    // The in-process path refuses it the same way.
    let image = repo().join("models/images/shapes-48x48.png");
    let generate = run_bounded(
        "generate",
        Command::new(EXE)
            .args(["generate", "--model"])
            .arg(model.path())
            .arg("--image")
            .arg(image)
            .args(["--prompt", "USER: <image>\nWhat? ASSISTANT:", "--json"]),
    );
    assert!(!generate.success, "{}", generate.stdout);
    assert!(generate.stdout.is_empty(), "{}", generate.stdout);
    assert_names_supported_decoders("generate", &generate.stderr);
}
