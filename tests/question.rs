//! Plain questions, rendered with the checkpoint's chat template (issue 38, defect 2): `demo`
//! works on every bundled model family; `ask --question` (the gateway renders the template the
//! decoder reports) gives exactly the tokens of `generate --question` (the CLI renders the same
//! template in process) and of the raw prompt that rendering makes; raw prompts that lack the
//! template's turn markers get a warning on stderr, correct ones none.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{repo, run_json, MeshProc, OutputWithin, EXE};

const DESCRIBE: &str = "Describe the image.";

fn model(name: &str) -> PathBuf {
    repo().join("models").join(name)
}

/// The bundled demo image (what `demo` asks about by default).
fn demo_image() -> PathBuf {
    model("shapes-llava").join("samples/demo.png")
}

fn vlm(args: &[&str]) -> Output {
    Command::new(EXE)
        .args(args)
        .env_remove("VLM_PROMPT")
        .env_remove("VLM_QUESTION")
        .output_within(Duration::from_secs(600))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `args` with `--image` for each of `images`.
fn with_images<'a>(mut args: Vec<&'a str>, images: &'a [PathBuf]) -> Vec<&'a str> {
    for i in images {
        args.extend(["--image", i.to_str().unwrap()]);
    }
    args
}

/// `generate --json` in process: the reference.
fn generate(
    model: &Path,
    images: &[PathBuf],
    text: (&str, &str),
    max_tokens: &str,
) -> serde_json::Value {
    let m = model.to_str().unwrap();
    let mut args = with_images(vec!["generate", "--model", m], images);
    args.extend([text.0, text.1, "--max-tokens", max_tokens, "--json"]);
    run_json(&args)
}

/// `ask --json` through the mesh in `state`; the JSON and stderr.
fn ask(
    state: &Path,
    images: &[PathBuf],
    text: (&str, &str),
    max_tokens: &str,
) -> (serde_json::Value, String) {
    let s = state.to_str().unwrap();
    let mut args = with_images(vec!["ask", "--state-dir", s], images);
    args.extend([text.0, text.1, "--max-tokens", max_tokens, "--json"]);
    let out = vlm(&args);
    assert!(out.status.success(), "ask {args:?}: {}", stderr(&out));
    (serde_json::from_slice(&out.stdout).unwrap(), stderr(&out))
}

/// `demo --model M` on every bundled family (GLM-4.1V first: its chat format is not LLaVA's, so
/// a LLaVA-style prompt fails there) succeeds, and its answer is `generate --question`'s with
/// the demo's question on the same image.
#[test]
fn demo_works_on_every_family_and_answers_as_generate_question() {
    for name in [
        "tiny-glm4v",
        "tiny-llava",
        "tiny-llava-next",
        "tiny-llava-glm",
        "shapes-llava",
    ] {
        let dir = model(name);
        let out = vlm(&[
            "demo",
            "--model",
            dir.to_str().unwrap(),
            "--max-tokens",
            "6",
        ]);
        assert!(
            out.status.success(),
            "{name}: demo failed: {}",
            stderr(&out)
        );
        assert!(
            !stderr(&out).contains("warning"),
            "{name}: the demo's own question warned: {}",
            stderr(&out)
        );
        let local = generate(&dir, &[demo_image()], ("--question", DESCRIBE), "6");
        assert_eq!(
            local["token_ids"].as_array().unwrap().len(),
            6,
            "{name}: {local}"
        );
        let answer = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            answer.strip_suffix('\n').unwrap_or(&answer),
            local["text"].as_str().unwrap(),
            "{name}: demo and generate --question differ"
        );
    }
}

/// GLM-4.1V through the mesh, with one image, two and none: `ask --question` gives the tokens of
/// `generate --question` and of the raw prompt GLM's template makes; that raw prompt gets no
/// warning, a LLaVA-style one does (in `ask` and `generate`).
#[test]
fn glm4v_questions_equal_generate_and_raw_prompts_warn() {
    let dir = model("tiny-glm4v");
    let mesh = MeshProc::start_with(&dir, &[], &[]);
    let state = mesh.state.path();
    let wide = repo().join("models/images/glm4v_wide_90x50.png");
    let tall = repo().join("models/images/glm4v_tall_60x130.png");
    let image = "<|begin_of_image|><|image|><|end_of_image|>";
    for images in [vec![wide.clone()], vec![wide.clone(), tall], vec![]] {
        let n = images.len();
        let rendered = format!(
            "[gMASK]<sop><|user|>\n{}{DESCRIBE}<|assistant|>\n",
            image.repeat(n)
        );
        let (asked, err) = ask(state, &images, ("--question", DESCRIBE), "6");
        assert!(!err.contains("warning"), "{n} images: {err}");
        let local = generate(&dir, &images, ("--question", DESCRIBE), "6");
        let raw = generate(&dir, &images, ("--prompt", &rendered), "6");
        assert_eq!(asked["token_ids"], local["token_ids"], "{n} images");
        assert_eq!(local["token_ids"], raw["token_ids"], "{n} images");
        assert_eq!(asked["prompt_tokens"], raw["prompt_tokens"], "{n} images");
        let (asked_raw, err) = ask(state, &images, ("--prompt", &rendered), "6");
        assert!(!err.contains("warning"), "{n} images: {err}");
        assert_eq!(asked_raw["token_ids"], asked["token_ids"], "{n} images");
    }
    let want = r#"warning: the prompt has no "<|user|>" and no "<|assistant|>" (the model's chat template marks its turns with "<|user|>" … "<|assistant|>"); the model may answer nonsense. Use --question for plain text."#;
    let llava_style = "USER: <|image|>\nDescribe the image. ASSISTANT:";
    let (_, err) = ask(
        state,
        std::slice::from_ref(&wide),
        ("--prompt", llava_style),
        "2",
    );
    assert!(err.contains(want), "{err}");
    let out = vlm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        wide.to_str().unwrap(),
        "--prompt",
        llava_style,
        "--max-tokens",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(want), "{}", stderr(&out));
}

/// `ask` takes exactly one of `--prompt` and `--question`, and says so before connecting.
#[test]
fn ask_wants_a_prompt_or_a_question_not_both() {
    let image = demo_image();
    let img = image.to_str().unwrap();
    let both = vlm(&[
        "ask",
        "--image",
        img,
        "--prompt",
        "USER: hi ASSISTANT:",
        "--question",
        "hi",
    ]);
    assert!(!both.status.success());
    assert!(
        stderr(&both).contains("--prompt") && stderr(&both).contains("--question"),
        "{}",
        stderr(&both)
    );
    let neither = vlm(&["ask", "--image", img]);
    assert!(!neither.status.success());
    assert!(
        stderr(&neither).contains("--question"),
        "{}",
        stderr(&neither)
    );
}

/// A LLaVA model (the demo model, whose answers depend on the prompt and image; it has the
/// LLaVA-1.5 fallback template) through the mesh: `ask --question` gives the tokens of `generate
/// --question` and of `USER: <image>\n… ASSISTANT:`; raw prompts without
/// `USER:`/`ASSISTANT:` warn in `ask`, `generate` and `watch --ask`; `watch --question` answers
/// like `ask --question` on the frame it names. Through gRPC: `prompt` and `question` together
/// are INVALID_ARGUMENT naming both (Generate and Watch), a text-only question works.
#[test]
fn llava_questions_equal_generate_and_the_gateway_checks_the_fields() {
    let dir = model("shapes-llava");
    let mesh = MeshProc::start_with(&dir, &[], &[]);
    let state = mesh.state.path();
    let images = [demo_image()];
    let (asked, err) = ask(state, &images, ("--question", DESCRIBE), "24");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(asked["text"], "a white star and a yellow circle", "{asked}");
    let local = generate(&dir, &images, ("--question", DESCRIBE), "24");
    let llava = "USER: <image>\nDescribe the image. ASSISTANT:";
    let (raw, err) = ask(state, &images, ("--prompt", llava), "24");
    assert!(!err.contains("warning"), "{err}");
    assert_eq!(asked["token_ids"], local["token_ids"]);
    assert_eq!(asked["token_ids"], raw["token_ids"]);
    assert_eq!(asked["prompt_tokens"], raw["prompt_tokens"]);

    // The prompt of the issue: answered (exit 0) with something else, and a warning.
    let want = r#"warning: the prompt has no "USER:" and no "ASSISTANT:" (the model's chat template marks its turns with "USER:" … "ASSISTANT:"); the model may answer nonsense. Use --question for plain text."#;
    let (bare, err) = ask(
        state,
        &images,
        ("--prompt", "<image> Describe the image."),
        "24",
    );
    assert!(err.contains(want), "{err}");
    assert_ne!(bare["token_ids"], asked["token_ids"]);
    let (_, err) = ask(
        state,
        &images,
        ("--prompt", "USER: <image>\nDescribe it."),
        "2",
    );
    assert!(
        err.contains(r#"warning: the prompt has no "ASSISTANT:" ("#),
        "{err}"
    );
    let out = vlm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        images[0].to_str().unwrap(),
        "--prompt",
        "<image> Describe the image.",
        "--max-tokens",
        "2",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(want), "{}", stderr(&out));

    // `watch --question` on a clip: each answer is `ask --question`'s on the frame it names
    // (asked on frames whose pixels are new or repeat an earlier frame's exactly).
    let spec = vlm_frames::synthetic::ClipSpec {
        frames: 0,
        still: 3,
        moving: 2,
        size: 128,
    };
    let clip = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for n in 0..10 {
        let (bytes, _) = vlm_frames::synthetic::clip_frame(&spec, n + 1);
        let f = clip.path().join(format!("frame-{n:04}.png"));
        std::fs::write(&f, bytes).unwrap();
        files.push(f);
    }
    let watch = |text: (&str, &str)| {
        let s = state.to_str().unwrap();
        let frames = clip.path().to_str().unwrap();
        vlm(&[
            "watch",
            "--state-dir",
            s,
            "--frames",
            frames,
            text.0,
            text.1,
            "--every",
            "5",
            "--fps",
            "0",
            "--sync",
            "--json",
            "--max-tokens",
            "4",
        ])
    };
    let where_ = "Where is the circle?";
    let out = watch(("--question", where_));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l.get("text").is_some())
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    for a in &answers {
        let n = a["frame"].as_u64().unwrap() as usize;
        assert_eq!(a["frames"], serde_json::json!([n]));
        assert_eq!(a["question"], where_);
        let (direct, _) = ask(state, &files[n..=n], ("--question", where_), "4");
        assert_eq!(a["token_ids"], direct["token_ids"], "frame {n}");
    }
    let out = watch(("--ask", where_));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(r#"warning: the prompt has no "USER:" and no "ASSISTANT:""#),
        "{}",
        stderr(&out)
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(gateway_checks(&mesh, &dir));
}

async fn gateway_checks(mesh: &MeshProc, dir: &Path) {
    use vlm_proto::watch_answer::Kind as AnswerKind;
    use vlm_proto::watch_request::Kind as RequestKind;
    use vlm_proto::watch_response::Kind as ResponseKind;
    use vlm_proto::{GenerateRequest, SamplingParams, WatchQuestion, WatchRequest};

    let params = Some(SamplingParams {
        max_tokens: Some(4),
        ..Default::default()
    });
    let image = std::fs::read(demo_image()).unwrap();
    let mut client = mesh.client().await;
    let both = GenerateRequest {
        images: vec![image.clone().into()],
        prompt: "USER: <image>\nHi ASSISTANT:".into(),
        question: "Hi".into(),
        params: params.clone(),
        ..Default::default()
    };
    let err = common::generate(&mut client, both, None, || {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("`prompt`") && err.message().contains("`question`"),
        "{err:?}"
    );
    let blank = GenerateRequest {
        question: "  ".into(),
        params: params.clone(),
        ..Default::default()
    };
    let err = common::generate(&mut client, blank, None, || {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // Beyond the prompt limit (1 MiB): RESOURCE_EXHAUSTED before it is rendered, naming it.
    let huge = GenerateRequest {
        question: "x".repeat((1 << 20) + 1),
        params: params.clone(),
        ..Default::default()
    };
    let err = common::generate(&mut client, huge, None, || {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message()
            .contains("question of 1048577 bytes exceeds the prompt limit"),
        "{err:?}"
    );

    // Text only: the question is the LLaVA-1.5 prompt without an image.
    let text = |prompt: &str, question: &str| GenerateRequest {
        prompt: prompt.into(),
        question: question.into(),
        params: params.clone(),
        ..Default::default()
    };
    let q = common::generate(&mut client, text("", "Hi"), None, || {})
        .await
        .unwrap();
    let p = common::generate(&mut client, text("USER: Hi ASSISTANT:", ""), None, || {})
        .await
        .unwrap();
    assert_eq!(q, p);
    assert!(!q.is_empty());
    let local = run_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--question",
        "Hi",
        "--max-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(local["token_ids"], serde_json::json!(q));

    // Watch: both fields in one question fail that question alone, naming both.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut stream = common::bounded(
        "open Watch",
        client.watch(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap()
    .into_inner();
    let frame = vlm_proto::WatchFrame {
        data: image.into(),
        timestamp: 0,
    };
    let send = |kind| WatchRequest { kind: Some(kind) };
    tx.send(send(RequestKind::Frame(frame))).await.unwrap();
    let q = WatchQuestion {
        id: "both".into(),
        prompt: "USER: <image>\nHi ASSISTANT:".into(),
        question: "Hi".into(),
        params,
        ..Default::default()
    };
    tx.send(send(RequestKind::Question(q))).await.unwrap();
    drop(tx);
    let mut error = None;
    while let Some(msg) = common::next_message(&mut stream).await.unwrap() {
        if let Some(ResponseKind::Answer(a)) = msg.kind {
            assert_eq!(a.question_id, "both");
            match a.kind {
                Some(AnswerKind::Error(e)) => error = Some(e),
                other => panic!("{other:?}"),
            }
        }
    }
    let e = error.expect("an error answer");
    assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
    assert!(
        e.message.contains("`prompt`") && e.message.contains("`question`"),
        "{e:?}"
    );
}
