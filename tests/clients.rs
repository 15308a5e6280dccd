//! End-to-end: clients in other languages, built by their own tools, against `vlm-mesh up` as a
//! real process tree: the Python (grpcio, stubs from protoc) and Node (@grpc/grpc-js +
//! proto-loader) examples, the stock grpcio-reflection client, and the official `openai` SDK
//! against the OpenAI-compatible endpoint. Each answer is compared with `vlm-mesh generate`.
//!
//! The tools are installed from PyPI and npm on first use into `target/tmp/clients/` (a venv and a
//! node_modules), and reinstalled only when `requirements.txt` / `package-lock.json` change.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

mod common;
use common::clients::*;
use common::*;

fn generate(sampling: &[&str]) -> Value {
    generate_json(&model(), &image_path(), PROMPT, sampling)
}

const GREEDY: &[&str] = &["--max-tokens", "16"];
const SAMPLED: &[&str] = &[
    "--max-tokens",
    "16",
    "--temperature",
    "0.8",
    "--top-p",
    "0.9",
    "--seed",
    "42",
];

#[test]
fn python_node_and_reflection_clients_get_the_tokens_of_generate() {
    let installing = std::thread::spawn(tools);
    let mesh = MeshProc::start_with(&model(), &[], &[]);
    installing.join().unwrap();
    let target = mesh.gateway.strip_prefix("https://").unwrap().to_string();
    let ca = mesh.certs().join("ca.pem");
    let image = image_path();

    for sampling in [GREEDY, SAMPLED] {
        let expected = generate(sampling);
        let common_args = |cmd: &mut Command| {
            cmd.args(["--target", &target, "--ca"])
                .arg(&ca)
                .arg("--image")
                .arg(&image)
                .args(["--prompt", PROMPT, "--json"])
                .args(sampling);
        };
        let mut py = python("examples/clients/python/client.py");
        common_args(&mut py);
        let py = client_json(&mut py, "python client");
        let mut node = Command::new("node");
        node.arg(repo().join("examples/clients/node/client.js"))
            .env("NODE_PATH", &tools().node_modules);
        common_args(&mut node);
        let node = client_json(&mut node, "node client");
        for (lang, got) in [("python", &py), ("node", &node)] {
            assert_eq!(
                got["token_ids"], expected["token_ids"],
                "{lang} {sampling:?}"
            );
            assert_eq!(got["text"], expected["text"], "{lang} {sampling:?}");
            assert_eq!(got["prompt_tokens"], expected["prompt_tokens"], "{lang}");
            assert_eq!(got["completion_tokens"], 16, "{lang}");
            assert_eq!(got["trace_id"].as_str().unwrap().len(), 32, "{lang}");
        }
    }

    // A generic client that knows nothing but the reflection protocol.
    let mut reflect = python("examples/clients/python/reflect.py");
    reflect
        .args(["--target", &target, "--ca"])
        .arg(&ca)
        .arg("--image")
        .arg(&image)
        .args(["--prompt", PROMPT, "--max-tokens", "16"]);
    let found = client_json(&mut reflect, "grpcio-reflection client");
    let gateway = found["services"]["vlm.v1.Gateway"]
        .as_array()
        .unwrap_or_else(|| panic!("vlm.v1.Gateway not listed: {found}"));
    let methods: Vec<&str> = gateway
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(methods, ["Generate", "GetModelInfo", "Watch"]);
    assert_eq!(gateway[0]["input"], "vlm.v1.GenerateRequest");
    assert_eq!(gateway[0]["output"], "vlm.v1.GenerateResponse");
    assert_eq!(gateway[0]["server_streaming"], true);
    assert_eq!(gateway[2]["input"], "vlm.v1.WatchRequest");
    assert_eq!(gateway[2]["output"], "vlm.v1.WatchResponse");
    assert_eq!(gateway[2]["server_streaming"], true);
    assert!(found["services"]["grpc.health.v1.Health"].is_array());
    // Only what the gateway's port serves: the stages' services would answer UNIMPLEMENTED there.
    let listed: Vec<&String> = found["services"].as_object().unwrap().keys().collect();
    for stage in ["vlm.v1.Encoder", "vlm.v1.Projector", "vlm.v1.Decoder"] {
        assert!(
            !listed.iter().any(|s| *s == stage),
            "{stage} listed on the gateway's port: {listed:?}"
        );
    }
    // Generate, called with message types learned only through reflection.
    assert_eq!(
        found["generate"]["token_ids"],
        generate(GREEDY)["token_ids"]
    );
    assert_eq!(
        found["generate"]["last"]["final"]["usage"]["completionTokens"],
        16
    );
}

#[test]
fn openai_sdk_gets_the_text_and_usage_of_generate_and_openai_shaped_errors() {
    let installing = std::thread::spawn(tools);
    let mesh = MeshProc::start_with(&model(), &["--http-listen", "127.0.0.1:0"], &[]);
    installing.join().unwrap();
    let base_url = mesh.openai_url();
    assert!(
        base_url.starts_with("https://127.0.0.1:") && base_url.ends_with("/v1"),
        "{base_url}"
    );
    assert_eq!(mesh.mesh_json()["openai_url"], base_url.as_str());
    let ca = mesh.certs().join("ca.pem");
    let image = image_path();
    // The fallback (LLaVA-1.5) chat template turns this question plus one image into PROMPT.
    let question = PROMPT
        .strip_prefix("USER: <image>\n")
        .unwrap()
        .strip_suffix(" ASSISTANT:")
        .unwrap();

    for sampling in [GREEDY, SAMPLED] {
        let expected = generate(sampling);
        let completion_tokens = expected["token_ids"].as_array().unwrap().len() as u64;
        for stream in [false, true] {
            let mut sdk = python("examples/clients/python/openai_chat.py");
            sdk.args(["--base-url", &base_url, "--ca"])
                .arg(&ca)
                .arg("--image")
                .arg(&image)
                .args(["--prompt", question, "--json"])
                .args(sampling);
            if stream {
                sdk.arg("--stream");
            }
            let got = client_json(&mut sdk, "openai SDK");
            let what = format!("{sampling:?} stream={stream}");
            assert_eq!(got["model"], "tiny-llava", "{what}");
            assert_eq!(got["text"], expected["text"], "{what}");
            assert_eq!(
                got["usage"]["prompt_tokens"], expected["prompt_tokens"],
                "{what}"
            );
            assert_eq!(
                got["usage"]["completion_tokens"], completion_tokens,
                "{what}"
            );
            assert_eq!(
                got["usage"]["total_tokens"].as_u64().unwrap(),
                expected["prompt_tokens"].as_u64().unwrap() + completion_tokens,
                "{what}"
            );
            assert_eq!(got["finish_reason"], "length", "{what}");
        }
    }

    let mut checks = python("tests/support/openai_checks.py");
    checks
        .args(["--base-url", &base_url, "--ca"])
        .arg(&ca)
        .args(["--model", "tiny-llava", "--image"])
        .arg(&image)
        .args(["--prompt", question]);
    let out = client_json(&mut checks, "openai checks");
    let errors = &out["errors"];
    for (case, status, class, param) in [
        ("no_image", 400, "BadRequestError", "messages[0].content"),
        (
            "image_part_without_url",
            400,
            "BadRequestError",
            "messages[0].content[1].image_url.url",
        ),
        (
            "malformed_base64",
            400,
            "BadRequestError",
            "messages[0].content[1].image_url.url",
        ),
        ("unknown_model", 404, "NotFoundError", "model"),
        ("n_2", 400, "BadRequestError", "n"),
        (
            "http_url",
            400,
            "BadRequestError",
            "messages[0].content[1].image_url.url",
        ),
    ] {
        let e = &errors[case];
        assert_eq!(e["raised"], class, "{case}: {e}");
        assert_eq!(e["status"], status, "{case}: {e}");
        assert_eq!(e["type"], "invalid_request_error", "{case}: {e}");
        assert_eq!(e["param"], param, "{case}: {e}");
        let body = &e["body"]["error"];
        assert!(
            body["message"].as_str().unwrap().len() > 20,
            "{case}: {body}"
        );
        for key in ["message", "type", "param", "code"] {
            assert!(body.get(key).is_some(), "{case}: no {key} in {body}");
        }
    }
    assert_eq!(errors["unknown_model"]["code"], "model_not_found");
    assert!(errors["malformed_base64"]["message"]
        .as_str()
        .unwrap()
        .contains("base64"));
    assert!(errors["http_url"]["message"]
        .as_str()
        .unwrap()
        .contains("--allow-image-urls"));
    // Bytes that are no image get past the endpoint and are refused by the encoder: its
    // INVALID_ARGUMENT comes back as a 400 that names the stage.
    let e = &errors["not_an_image"];
    assert_eq!(e["status"], 400, "{e}");
    assert!(e["message"].as_str().unwrap().contains("encoder"), "{e}");

    // Still serving after all of that.
    assert_eq!(out["models"], serde_json::json!(["tiny-llava"]));
    let expected = generate(GREEDY);
    assert_eq!(out["after"]["text"], expected["text"]);
    assert_eq!(
        out["after"]["usage"]["prompt_tokens"],
        expected["prompt_tokens"]
    );
    // A repeated request reports the decoder's prefix-cache hits as OpenAI does.
    let again = &out["again"];
    assert_eq!(again["text"], expected["text"]);
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no usage.prompt_tokens_details.cached_tokens: {again}"));
    let prompt = again["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached > 0 && cached < prompt && cached.is_multiple_of(16),
        "cached_tokens {cached} of {prompt}"
    );
}

/// GLM-4.1V's chat template (models/tiny-glm4v/chat_template.jinja) as transformers renders it
/// (`trim_blocks`, `lstrip_blocks`) for what Open-AutoGLM sends: a system string, user turns of
/// image and text parts, assistant strings. The test checks it against the fixture's own
/// transformers rendering before using it.
fn glm4v_prompt(messages: &Value) -> String {
    let mut prompt = String::from("[gMASK]<sop>");
    for m in messages.as_array().unwrap() {
        let role = m["role"].as_str().unwrap();
        assert!(["system", "user", "assistant"].contains(&role), "{m}");
        prompt += &format!("<|{role}|>\n");
        match &m["content"] {
            Value::String(text) => prompt += text,
            parts => {
                for p in parts.as_array().unwrap() {
                    match p["type"].as_str().unwrap() {
                        "image" | "image_url" => {
                            prompt += "<|begin_of_image|><|image|><|end_of_image|>"
                        }
                        "text" => prompt += p["text"].as_str().unwrap(),
                        other => panic!("a {other} part: {m}"),
                    }
                }
            }
        }
    }
    prompt + "<|assistant|>\n"
}

/// `generate --json` on one image with the prompt passed in a file: a random model's answers,
/// carried into the next step's history, may hold characters (NUL) no command line can.
fn generate_from_file(model: &Path, image: &Path, prompt: &str, extra: &[&str]) -> Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), prompt).unwrap();
    let (model, image) = (model.to_str().unwrap(), image.to_str().unwrap());
    let mut args = vec!["generate", "--model", model, "--image", image, "--json"];
    args.extend(["--prompt-file", file.path().to_str().unwrap()]);
    args.extend(extra);
    run_json(&args)
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&bytes[12..16], b"IHDR", "{}", path.display());
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Open-AutoGLM's phone agent (its `openai` SDK calls, stream handling, answer parsing and
/// history, reproduced by tests/support/autoglm_client.py) against a mesh serving GLM-4.1V under
/// the name it asks for, with an API key: the preflight, three agent steps with a fresh
/// screenshot each (one of them 1440×3200, 4.6 megapixels) and the earlier ones dropped from the
/// history. Every streamed answer is the model's own answer in process for the prompt GLM-4.1V's
/// template makes of those messages, with Open-AutoGLM's frequency_penalty applied.
#[test]
fn open_autoglm_phone_agent_client_drives_glm4v_through_the_openai_endpoint() {
    const KEY: &str = "autoglm-test-key";
    const SERVED: &str = "autoglm-phone-9b";
    // Open-AutoGLM's own max_tokens for a step; the tiny model has transformers' default context
    // (32768 positions).
    const MAX_TOKENS: &str = "3000";
    const BEYOND_CONTEXT: &str = "40000";
    const TASK: &str = "打开设置 (open Settings)";
    let glm = repo().join("models/tiny-glm4v");
    let reference: Value =
        serde_json::from_slice(&std::fs::read(glm.join("reference/reference.json")).unwrap())
            .unwrap();
    // The fixture's Open-AutoGLM-shaped history, rendered by transformers.
    let history = &reference["templates"][0];
    assert_eq!(
        glm4v_prompt(&history["messages"]),
        history["prompt"].as_str().unwrap()
    );

    let installing = std::thread::spawn(tools);
    let mesh = MeshProc::start_with(
        &glm,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--served-model-name",
            SERVED,
            "--api-key",
            KEY,
        ],
        &[],
    );
    installing.join().unwrap();
    let base_url = mesh.openai_url();
    let dir = tempfile::tempdir().unwrap();
    let large = dir.path().join("screenshot-1440x3200.png");
    let shots = [
        repo().join("models/images/glm4v_tall_60x130.png"),
        large.clone(),
        repo().join("models/images/glm4v_wide_90x50.png"),
    ];
    let mut agent = python("tests/support/autoglm_client.py");
    // As the README's Open-AutoGLM command runs it: the SDK trusts the dev CA through
    // SSL_CERT_FILE, and the client's code says nothing about certificates.
    agent
        .env("SSL_CERT_FILE", mesh.certs().join("ca.pem"))
        .args(["--base-url", &base_url])
        .args(["--api-key", KEY, "--task", TASK, "--max-tokens", MAX_TOKENS])
        .args(["--beyond-context", BEYOND_CONTEXT])
        .arg("--large-screenshot")
        .arg(&large);
    for shot in &shots {
        agent.arg("--screenshot").arg(shot);
    }
    let out = client_json(&mut agent, "Open-AutoGLM's client");
    // A QHD+ phone screenshot, 4.6 megapixels, went through as step 2's image.
    assert_eq!(png_size(&large), (1440, 3200));

    // main.py's check_model_api: text only, not streamed.
    let pre = &out["preflight"];
    assert_eq!(pre["choices"], 1, "{pre}");
    assert_eq!(pre["model"], SERVED, "{pre}");
    assert!(pre["text"].is_string(), "{pre}");
    let completion = pre["usage"]["completion_tokens"].as_u64().unwrap();
    match pre["finish_reason"].as_str() {
        Some("length") => assert_eq!(completion, 5, "{pre}"),
        Some("stop") => assert!(completion <= 5, "{pre}"),
        other => panic!("preflight finish_reason {other:?}: {pre}"),
    }
    let wrong = &out["wrong_key"];
    assert_eq!(wrong["raised"], "AuthenticationError", "{wrong}");
    assert_eq!(wrong["status"], 401, "{wrong}");

    let steps = out["steps"].as_array().unwrap();
    assert_eq!(steps.len(), shots.len(), "{out}");
    let sampling = |penalty: &'static str| {
        [
            "--max-tokens",
            MAX_TOKENS,
            "--top-p",
            "0.85",
            "--frequency-penalty",
            penalty,
        ]
    };
    let mut expected = vec![];
    for (i, (step, shot)) in steps.iter().zip(&shots).enumerate() {
        let what = format!("step {}", i + 1);
        // What Open-AutoGLM sent: the system prompt, the earlier turns as text only, then this
        // step's screenshot and screen info.
        let sent = step["sent"].as_array().unwrap();
        assert_eq!(sent.len(), 2 + 2 * i, "{what}: {sent:?}");
        let images: Vec<&Value> = sent
            .iter()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|p| p["type"] == "image_url")
            .collect();
        assert_eq!(images.len(), 1, "{what}: {sent:?}");
        assert_eq!(sent[sent.len() - 1]["content"][0], *images[0], "{what}");
        assert_eq!(
            images[0]["image_url"]["url"],
            shot.to_str().unwrap(),
            "{what}"
        );
        // The stream as Open-AutoGLM reads it.
        assert!(
            step["content_chunks"].as_u64().unwrap() >= 1,
            "{what}: {step}"
        );
        assert!(step["ttft_s"].is_f64(), "{what}: {step}");
        assert_eq!(step["models"], serde_json::json!([SERVED]), "{what}");
        // The model's answer, in process, to the prompt the template makes of those messages.
        let local = generate_from_file(&glm, shot, &glm4v_prompt(&step["sent"]), &sampling("0.2"));
        assert_eq!(step["text"], local["text"], "{what}: {step}");
        assert_eq!(step["finish_reason"], local["finish_reason"], "{what}");
        expected.push(local);
    }

    // Step 1 not streamed: the same answer, with the model's token ids and usage.
    let twin = &out["twin"];
    assert_eq!(twin["text"], steps[0]["text"], "{twin}");
    assert_eq!(twin["finish_reason"], steps[0]["finish_reason"], "{twin}");
    assert_eq!(twin["token_ids"], expected[0]["token_ids"], "{twin}");
    assert_eq!(
        twin["usage"]["prompt_tokens"], expected[0]["prompt_tokens"],
        "{twin}"
    );
    assert_eq!(
        twin["usage"]["completion_tokens"].as_u64().unwrap(),
        expected[0]["token_ids"].as_array().unwrap().len() as u64,
        "{twin}"
    );
    // frequency_penalty is applied: without it the answer is the unpenalised one, and on this
    // prompt the two differ.
    let unpenalised = generate_from_file(
        &glm,
        &shots[0],
        &glm4v_prompt(&steps[0]["sent"]),
        &sampling("0"),
    );
    assert_ne!(
        unpenalised["token_ids"], expected[0]["token_ids"],
        "frequency_penalty 0.2 changes nothing on step 1: this check cannot tell it is applied"
    );
    assert_eq!(
        out["unpenalised"]["token_ids"], unpenalised["token_ids"],
        "{}",
        out["unpenalised"]
    );

    // A max_tokens beyond the model's context is refused before the stream starts (as vLLM
    // does), as a 400 the SDK raises, saying why.
    let too_long = &out["beyond_context"];
    assert_eq!(too_long["raised"], "BadRequestError", "{too_long}");
    assert_eq!(too_long["status"], 400, "{too_long}");
    assert!(
        too_long["message"].as_str().unwrap().contains("context"),
        "{too_long}"
    );
}
