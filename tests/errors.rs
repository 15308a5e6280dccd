//! The README's error table end to end: each documented refusal, produced over gRPC against a
//! real mesh (`vlm-mesh up`, mTLS, separate processes), gets its documented code and a message
//! that names the stage and the problem. The mesh keeps serving after each one.

use std::time::Duration;

use tonic::Code;
use vlm_proto::generate_response::Kind;
use vlm_proto::{GenerateRequest, SamplingParams};

mod common;
use common::*;

type Client = vlm_proto::gateway_client::GatewayClient<tonic::transport::Channel>;

/// Runs one request to the end: the number of tokens, or the status it failed with.
async fn run(client: &mut Client, req: GenerateRequest) -> Result<usize, tonic::Status> {
    let mut stream = bounded("the call", client.generate(req))
        .await?
        .into_inner();
    let mut tokens = 0;
    while let Some(msg) = next_message(&mut stream).await? {
        if let Some(Kind::Delta(d)) = msg.kind {
            tokens += d.token_ids.len();
        }
    }
    Ok(tokens)
}

fn ask(images: Vec<Vec<u8>>, prompt: &str, params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        image_inputs: vec![],
        images: images.into_iter().map(Into::into).collect(),
        prompt: prompt.into(),
        params: Some(params),
        monitor_layers: false,
        question: String::new(),
    }
}

fn tokens(n: u32) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        top_p: 1.0,
        ..Default::default()
    }
}

/// A real `w`×`h` PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_refusal_gets_its_code_and_a_message_naming_stage_and_problem() {
    // Small limits so that small inputs cross them: 5,000 pixels, 2 images per request.
    let mesh = MeshProc::start(&[("VLM_MAX_IMAGE_PIXELS", "5000"), ("VLM_MAX_IMAGES", "2")]);
    let mut client = mesh.client().await;
    let good = std::fs::read(image_path()).unwrap(); // 48×48: 2,304 pixels, resized to 30×30
    let mut long_prompt = PROMPT.to_string();
    long_prompt.push_str(&"x".repeat((1 << 20) + 1 - long_prompt.len() + 1));
    let with = |f: &dyn Fn(&mut SamplingParams)| {
        let mut p = tokens(4);
        f(&mut p);
        p
    };
    // (what, request, code, every fragment the message must contain)
    let cases: Vec<(&str, GenerateRequest, Code, Vec<&str>)> = vec![
        (
            "header over --max-image-pixels",
            ask(vec![png(100, 100)], PROMPT, tokens(4)),
            Code::ResourceExhausted,
            vec!["encoder", "10000", "5000"],
        ),
        (
            // 10×200 is 2,000 pixels, but its short side is resized to 30: 30×600 = 18,000.
            "resize target over --max-image-pixels",
            ask(vec![png(10, 200)], PROMPT, tokens(4)),
            Code::InvalidArgument,
            vec!["encoder", "5000"],
        ),
        (
            "prompt over 1 MiB",
            ask(vec![good.clone()], &long_prompt, tokens(4)),
            Code::ResourceExhausted,
            vec!["gateway: prompt", "1048576"],
        ),
        (
            "more images than --max-images",
            ask(
                vec![good.clone(), good.clone(), good.clone()],
                "USER: <image><image><image> ASSISTANT:",
                tokens(4),
            ),
            Code::InvalidArgument,
            vec!["gateway: 3 images", "at most 2"],
        ),
        (
            "a 0-byte image",
            ask(vec![Vec::new()], PROMPT, tokens(4)),
            Code::InvalidArgument,
            vec!["gateway: image 0 is empty", "count from 0"],
        ),
        (
            "negative temperature",
            ask(vec![good.clone()], PROMPT, with(&|p| p.temperature = -1.0)),
            Code::InvalidArgument,
            vec!["decoder", "temperature"],
        ),
        (
            "top_p over 1",
            ask(vec![good.clone()], PROMPT, with(&|p| p.top_p = 1.5)),
            Code::InvalidArgument,
            vec!["decoder", "top_p"],
        ),
        (
            "17 stop strings",
            ask(
                vec![good.clone()],
                PROMPT,
                with(&|p| p.stop = vec!["s".into(); 17]),
            ),
            Code::InvalidArgument,
            vec!["decoder", "stop strings"],
        ),
        (
            "an empty stop string",
            ask(
                vec![good.clone()],
                PROMPT,
                with(&|p| p.stop = vec!["ok".into(), String::new()]),
            ),
            Code::InvalidArgument,
            vec!["decoder", "stop[1]"],
        ),
        (
            "a corrupt image",
            ask(vec![good[..good.len() / 2].to_vec()], PROMPT, tokens(4)),
            Code::InvalidArgument,
            vec!["encoder"],
        ),
        (
            "a prompt without <image>",
            ask(vec![good.clone()], "USER: hi ASSISTANT:", tokens(4)),
            Code::InvalidArgument,
            vec!["decoder: invalid prompt", "<image>"],
        ),
        (
            "a request over 64 MiB",
            ask(vec![vec![7u8; 65 << 20]], PROMPT, tokens(4)),
            Code::OutOfRange,
            vec!["message length too large"],
        ),
    ];
    for (what, req, code, fragments) in cases {
        let err = run(&mut client, req)
            .await
            .map(|n| panic!("{what}: answered with {n} tokens"))
            .unwrap_err();
        eprintln!("{what}: {:?} {:?}", err.code(), err.message());
        assert_eq!(err.code(), code, "{what}: {err:?}");
        for f in fragments {
            assert!(err.message().contains(f), "{what}: {f:?} not in {err:?}");
        }
        assert!(
            err.message().len() <= 1024 + 3,
            "{what}: message over 1 KiB"
        );
        // The mesh keeps serving: a good request right after each bad one succeeds.
        let n = run(&mut client, ask(vec![good.clone()], PROMPT, tokens(3)))
            .await
            .unwrap_or_else(|s| panic!("after {what}: {s:?}"));
        assert_eq!(n, 3, "after {what}");
    }
}

/// `--request-timeout` caps the deadline of a request that sets none (and a longer one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_caps_requests_without_a_deadline() {
    // 1 s cap; 180 tokens at 25 ms are 4.5 s of decoding.
    let mesh = MeshProc::start(&[
        ("VLM_REQUEST_TIMEOUT", "1"),
        ("VLM_FAULT_DECODE_DELAY_MS", "25"),
    ]);
    let mut client = mesh.client().await;
    let good = std::fs::read(image_path()).unwrap();
    for client_deadline in [None, Some(Duration::from_secs(60))] {
        let mut req = tonic::Request::new(ask(vec![good.clone()], PROMPT, tokens(180)));
        if let Some(d) = client_deadline {
            req.set_timeout(d);
        }
        let err = async {
            let mut stream = client.generate(req).await?.into_inner();
            while next_message(&mut stream).await?.is_some() {}
            Ok::<(), tonic::Status>(())
        }
        .await
        .expect_err("a 4.5 s request finished under a 1 s cap");
        assert_eq!(
            err.code(),
            Code::DeadlineExceeded,
            "{client_deadline:?}: {err:?}"
        );
        // The decoder was given the capped deadline, not the client's 60 s.
        let line = mesh
            .wait_for_log(&["[decoder]", "decoding stopped"], Duration::from_secs(30))
            .unwrap_or_else(|| panic!("decoder never stopped: {:?}", mesh.log.lock().unwrap()));
        let sent = field(&line, "deadline_ms=").unwrap_or_else(|| panic!("{line}"));
        assert!((1..=1000).contains(&sent), "{client_deadline:?}: {line}");
    }
}
