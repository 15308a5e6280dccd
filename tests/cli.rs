//! What a new user trips over on the command line: `certs` never destroys certificates that work,
//! connection mistakes get messages that say what to do, `up` with `VLM_PLAINTEXT` works, and
//! answers and finish reasons look the same in every client (README: "Answers", "Finish reasons").

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{ask_json, generate_json, MeshProc, OutputWithin, EXE};

const DESCRIBE: &str = "USER: <image>\nDescribe the image. ASSISTANT:";
const DEMO_ANSWER: &str = "a white star and a yellow circle";

fn shapes() -> PathBuf {
    common::repo().join("models/shapes-llava")
}

fn demo_image() -> PathBuf {
    shapes().join("samples/demo.png")
}

fn vlm(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .output_within(Duration::from_secs(120))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn certs_refuses_to_replace_certificates_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let first = vlm(&["certs", "--out", out_dir]);
    assert!(first.status.success(), "{}", stderr(&first));
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let key = std::fs::read(dir.path().join("gateway.key")).unwrap();

    let again = vlm(&["certs", "--out", out_dir]);
    assert!(
        !again.status.success(),
        "certs replaced existing certificates"
    );
    let msg = stderr(&again);
    assert!(
        msg.contains("--force") && msg.contains(out_dir) && msg.contains("ca.pem"),
        "{msg}"
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
    assert_eq!(std::fs::read(dir.path().join("gateway.key")).unwrap(), key);

    let forced = vlm(&["certs", "--out", out_dir, "--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca);
}

fn ask_err(args: &[&str]) -> String {
    let image = demo_image();
    let mut all = vec![
        "ask",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        DESCRIBE,
    ];
    all.extend(args);
    let out = vlm(&all);
    assert!(!out.status.success(), "ask {args:?} succeeded");
    let msg = stderr(&out);
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    msg
}

#[test]
fn a_missing_ca_is_named_with_what_to_do() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path().to_str().unwrap();
    let msg = ask_err(&["--state-dir", s, "--gateway", "https://127.0.0.1:9"]);
    let ca = Path::new(s).join("certs/ca.pem");
    assert!(msg.contains(&ca.display().to_string()), "{msg}");
    for hint in ["vlm-mesh up", "--state-dir", "--ca"] {
        assert!(msg.contains(hint), "no {hint:?} in: {msg}");
    }
    // The OS error is not said twice.
    assert!(!msg.contains("(os error"), "{msg}");

    let msg = ask_err(&[
        "--ca",
        "/nonexistent/ca.pem",
        "--gateway",
        "https://127.0.0.1:9",
    ]);
    assert!(
        msg.contains("--ca") && msg.contains("/nonexistent/ca.pem"),
        "{msg}"
    );
}

#[test]
fn a_gateway_without_scheme_gets_the_url_to_use() {
    let msg = ask_err(&["--gateway", "127.0.0.1:50051"]);
    assert!(msg.contains("https://127.0.0.1:50051"), "{msg}");
    assert!(msg.contains("needs a scheme"), "{msg}");
}

#[test]
fn http_against_the_tls_gateway_says_use_https() {
    let mesh = MeshProc::start(&[]);
    let addr = mesh.gateway.strip_prefix("https://").unwrap().to_string();
    let state = mesh.state.path().to_str().unwrap();
    let msg = ask_err(&["--state-dir", state, "--gateway", &format!("http://{addr}")]);
    assert!(
        msg.contains("speaks TLS") && msg.contains(&format!("use https://{addr}")),
        "{msg}"
    );
}

/// `VLM_PLAINTEXT=true up`: the gateway's public port has no TLS, `up` says `http://` and `ask`
/// follows; and through it, the answer and finish-reason spellings every client shares.
#[test]
fn plaintext_up_answers_and_finish_reasons_are_spelled_one_way() {
    let mesh = MeshProc::start_with(&shapes(), &[], &[("VLM_PLAINTEXT", "true")]);
    assert!(mesh.gateway.starts_with("http://"), "{}", mesh.ready);
    let state = mesh.state.path();
    let img = demo_image();

    // End of sequence: `stop`, and the answer with no leading space.
    let eos = ask_json(state, &img, DESCRIBE, &["--max-tokens", "24"]);
    assert_eq!(eos["text"], DEMO_ANSWER, "{eos}");
    assert_eq!(eos["finish_reason"], "stop", "{eos}");
    // max_tokens: `length`.
    let cut = ask_json(state, &img, DESCRIBE, &["--max-tokens", "2"]);
    assert_eq!(cut["finish_reason"], "length", "{cut}");
    // A stop string: `stop` too, the text ending before it.
    let stopped = ask_json(state, &img, DESCRIBE, &["--stop", " and"]);
    assert_eq!(stopped["text"], "a white star", "{stopped}");
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");

    // In process, the same spellings and text.
    let model = shapes();
    for (extra, reason) in [
        (&["--max-tokens", "24"][..], "stop"),
        (&["--max-tokens", "2"], "length"),
    ] {
        let local = generate_json(&model, &img, DESCRIBE, extra);
        assert_eq!(local["finish_reason"], reason, "{local}");
        if reason == "stop" {
            assert_eq!(local["text"], DEMO_ANSWER, "{local}");
        }
    }
}

/// `ask` and `wait` against a state directory whose `up` is starting (a live process named in
/// `starting.json`: here a `sleep` standing in for an `up` still loading weights), that then
/// becomes ready (its `mesh.json` names a real running mesh), and whose launcher then dies
/// (the files a killed `up` leaves): `ask` says it waits and then answers, `wait` prints the
/// gateway URL, and afterwards the stale `mesh.json` is reported as such, not dialled.
#[test]
fn ask_and_wait_wait_for_a_starting_mesh_and_a_dead_ups_files_are_stale() {
    let mesh = MeshProc::start_with(&shapes(), &[], &[]);
    let state = tempfile::tempdir().unwrap();
    copy_dir(&mesh.certs(), &state.path().join("certs"));
    let mut launcher = Command::new("sleep").arg("600").spawn().unwrap();
    let starting = serde_json::json!({
        "launcher_pid": launcher.id(),
        "gateway_listen": "127.0.0.1:0",
    });
    let write = |name: &str, v: &serde_json::Value| {
        let tmp = state.path().join(format!("{name}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(v).unwrap()).unwrap();
        std::fs::rename(&tmp, state.path().join(name)).unwrap();
    };
    write("starting.json", &starting);
    let dir = state.path().to_str().unwrap().to_string();
    let image = demo_image();
    let mut ask = Command::new(EXE)
        .args([
            "ask",
            "--state-dir",
            &dir,
            "--question",
            "Describe the image.",
            "--timeout",
            "120",
        ])
        .arg("--image")
        .arg(&image)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until `ask` says it is waiting for the starting mesh.
    let ask_err = ask.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(ask_err)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let said = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("ask said nothing while the mesh was starting");
    assert!(
        said.contains("the mesh is starting") && said.contains(&format!("pid {}", launcher.id())),
        "{said}"
    );
    let wait = Command::new(EXE)
        .args(["wait", "--state-dir", &dir, "--timeout", "120"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The mesh becomes ready: its description names the running gateway and the live launcher.
    let mut info = mesh.mesh_json();
    info["launcher_pid"] = launcher.id().into();
    write("mesh.json", &info);
    std::fs::remove_file(state.path().join("starting.json")).unwrap();
    let answer = common::wait_output_within(ask, "ask", Duration::from_secs(120));
    assert!(answer.status.success(), "ask failed: {:?}", answer);
    assert!(
        String::from_utf8_lossy(&answer.stdout).contains(DEMO_ANSWER),
        "{:?}",
        String::from_utf8_lossy(&answer.stdout)
    );
    let waited = common::wait_output_within(wait, "wait", Duration::from_secs(120));
    assert!(waited.status.success(), "wait failed: {waited:?}");
    assert_eq!(String::from_utf8_lossy(&waited.stdout).trim(), mesh.gateway);

    // The launcher dies: its mesh.json is stale, whatever still answers at that address.
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let out = vlm(&[
        "ask",
        "--state-dir",
        &dir,
        "--image",
        image.to_str().unwrap(),
        "--question",
        "Describe the image.",
    ]);
    assert!(!out.status.success(), "ask used a dead up's mesh.json");
    let msg = stderr(&out);
    assert!(
        msg.contains("is no longer running") && msg.contains("mesh.json"),
        "{msg}"
    );
    // `wait` takes it for an `up` about to replace it, and gives up at its limit.
    let out = vlm(&["wait", "--state-dir", &dir, "--timeout", "1"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("was not ready within 1 s"),
        "{}",
        stderr(&out)
    );
}

/// A second `up` on a state directory a running `up` uses is refused, naming it; listen
/// addresses take `localhost:PORT`, and other host names are refused with examples.
#[test]
fn a_state_dir_in_use_is_refused_and_listen_takes_localhost() {
    let mesh = MeshProc::start_with(&shapes(), &[], &[]);
    let dir = mesh.state.path().to_str().unwrap();
    let out = vlm(&["up", "--state-dir", dir, "--listen", "localhost:0"]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains(&format!("another `vlm-mesh up` (pid {})", mesh.pid()))
            && msg.contains("--state-dir"),
        "{msg}"
    );
    assert!(mesh.state.path().join("mesh.json").exists());
    let out = vlm(&["up", "--listen", "example.com:50051"]);
    assert!(!out.status.success());
    let msg = stderr(&out);
    assert!(
        msg.contains("is not IP:PORT") && msg.contains("localhost:50051"),
        "{msg}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
