//! Structured output and tool calls through a real mesh (`vlm-mesh up`): over gRPC (the
//! `format` field) the answer equals the model's constrained answer in process and a format the
//! decoder cannot compile is INVALID_ARGUMENT naming its field; over the OpenAI endpoint, the
//! official `openai` SDK gets `response_format` answers valid under their schema where the same
//! random-weight model's free text is not, and `tool_calls` it parses (required, named, single,
//! streamed or not), with errors naming the request field.

use serde_json::Value;
use tonic::Code;
use vlm_model::{OutputFormat, SamplingParams};

mod common;
use common::clients::*;
use common::*;

const SCHEMA: &str = r#"{"type":"object","properties":{"color":{"enum":["red","green"]},"n":{"type":"integer","minimum":0,"maximum":99}},"required":["color","n"],"additionalProperties":false}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_format_equals_in_process_and_bad_formats_name_the_field() {
    let mesh = MeshProc::start_with(&model(), &["--no-cache"], &[]);
    let image = std::fs::read(image_path()).unwrap();
    let pipeline = pipeline();
    let mut client = mesh.client().await;
    for (format, temperature) in [
        (OutputFormat::JsonSchema(SCHEMA.into()), 0.0),
        (OutputFormat::JsonSchema(SCHEMA.into()), 0.9),
        (OutputFormat::Regex("(yes|no), [0-9]{2}".into()), 0.0),
        (
            OutputFormat::Lark("start: \"<\" /[a-z]{1,8}/ \">\"".into()),
            0.7,
        ),
    ] {
        let p = SamplingParams {
            max_tokens: 40,
            temperature,
            seed: 3,
            format: Some(format.clone()),
            ..Default::default()
        };
        let got = generate(&mut client, request(&image, &p), None, || {})
            .await
            .unwrap_or_else(|s| panic!("{format:?}: {s:?}"));
        assert_eq!(got, reference(&pipeline, &image, &p), "{format:?}");
        let text = pipeline.prompt.decode(&got).unwrap();
        if let OutputFormat::JsonSchema(_) = format {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert!(
                matches!(v["color"].as_str(), Some("red" | "green")),
                "{text}"
            );
            assert!(v["n"].as_u64().is_some_and(|n| n <= 99), "{text}");
        }
    }
    for (format, field) in [
        (
            OutputFormat::JsonSchema(r#"{"type":"florp"}"#.into()),
            "format.json_schema",
        ),
        (OutputFormat::Regex("(".into()), "format.regex"),
        (OutputFormat::Lark("start: nowhere".into()), "format.lark"),
    ] {
        let p = SamplingParams {
            max_tokens: 8,
            format: Some(format),
            ..Default::default()
        };
        let err = generate(&mut client, request(&image, &p), None, || {})
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    // Hostile formats within the size limit: compiled or refused within the compile bound, and
    // the mesh goes on, every service the same live process with bounded memory.
    let before = common::attack::services(&mesh);
    let deep = (0..70).fold(r#"{"type":"integer"}"#.to_string(), |s, _| {
        format!(r#"{{"type":"array","items":{s}}}"#)
    });
    let big_enum = format!(
        r#"{{"enum":[{}]}}"#,
        (0..20_000)
            .map(|i| format!("\"v{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    for format in [
        OutputFormat::JsonSchema(deep),
        OutputFormat::JsonSchema(big_enum),
        OutputFormat::Regex("((a{1,100}){1,100}){1,100}".into()),
        OutputFormat::Lark("start: x\nx: x x | x x x | \"a\" | \"\"".into()),
        OutputFormat::Regex("a".repeat(300 << 10)),
    ] {
        let p = SamplingParams {
            max_tokens: 4,
            format: Some(format),
            ..Default::default()
        };
        let t = std::time::Instant::now();
        match generate(&mut client, request(&image, &p), None, || {}).await {
            Ok(_) => {}
            Err(e) => assert_eq!(e.code(), Code::InvalidArgument, "{e:?}"),
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "{:?}",
            t.elapsed()
        );
    }
    common::attack::assert_all_alive_and_bounded(&mesh, &before);
    // An empty format message is refused too.
    let mut req = request(&image, &SamplingParams::default());
    req.params.as_mut().unwrap().format = Some(vlm_proto::OutputFormat { kind: None });
    let err = generate(&mut client, req, None, || {})
        .await
        .expect_err("empty");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("format"), "{err:?}");
}

#[test]
fn openai_sdk_gets_valid_structured_output_and_tool_calls() {
    let glm = repo().join("models/tiny-glm4v");
    let installing = std::thread::spawn(tools);
    let mesh = MeshProc::start_with(&glm, &["--http-listen", "127.0.0.1:0"], &[]);
    installing.join().unwrap();
    let mut checks = python("tests/support/structured_checks.py");
    checks
        .env("SSL_CERT_FILE", mesh.certs().join("ca.pem"))
        .args(["--base-url", &mesh.openai_url(), "--model", "tiny-glm4v"])
        .arg("--image")
        .arg(repo().join("models/images/glm4v_wide_90x50.png"));
    // The fixture's end-of-sequence ids (generation_config.json).
    let gen: Value =
        serde_json::from_slice(&std::fs::read(glm.join("generation_config.json")).unwrap())
            .unwrap();
    for id in gen["eos_token_id"].as_array().unwrap() {
        checks.args(["--eos", &id.to_string()]);
    }
    checks
        .arg("--agent-grammar")
        .arg(repo().join("examples/grammars/autoglm_actions.lark"));
    let out = client_json(&mut checks, "structured_checks.py");
    eprintln!("{out}");
    assert_eq!(out["free_text_valid"], false, "{out}");
    assert_eq!(out["json_schema_finish"], "stop", "{out}");
    assert_eq!(out["json_schema_streamed_equal"], true, "{out}");
    assert_eq!(out["json_object_starts"], "{", "{out}");
    let calls = &out["tool_calls"];
    assert_eq!(
        calls["required_single"].as_array().unwrap().len(),
        1,
        "{out}"
    );
    assert!(
        calls["named"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c[0] == "press"),
        "{out}"
    );
    // At most 8 calls in one answer (README, "Tool calls"); one when parallel calls are off.
    assert_eq!(out["parallel"], 8, "{out}");
    assert_eq!(out["parallel_off"], 1, "{out}");
    let tokens = out["tool_result_prompt_tokens"].as_array().unwrap();
    let (short, long) = (tokens[0].as_u64().unwrap(), tokens[1].as_u64().unwrap());
    assert!(
        long >= short + 40,
        "the tool result reaches the prompt: {out}"
    );
    // Open-AutoGLM's answers under the example grammar: 8 sampled answers, each parsed by the
    // agent's own parsers (the script asserts that), of more than one kind.
    let actions = out["agent_actions"].as_array().unwrap();
    assert_eq!(actions.len(), 8, "{out}");
    let kinds: std::collections::BTreeSet<&str> =
        actions.iter().map(|a| a.as_str().unwrap()).collect();
    assert!(kinds.len() > 1, "{out}");
    let errors = &out["errors"];
    for (case, param) in [
        ("bad_schema", "response_format.json_schema.schema"),
        ("bad_schema_streamed", "response_format.json_schema.schema"),
        ("no_schema", "response_format.json_schema.schema"),
        ("unknown_tool", "tool_choice"),
        ("two_formats", "tools"),
        ("prediction", "prediction"),
        ("audio", "audio"),
    ] {
        assert_eq!(errors[case], param, "{case}: {out}");
    }
}
