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
