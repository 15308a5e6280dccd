//! The OpenAI-compatible endpoint through a real mesh (`vlm-mesh up --http-listen`, real
//! processes, TLS from the mesh's CA): what README "OpenAI-compatible endpoint" promises about
//! limits (413, 503 + Retry-After, 504), streams (`[DONE]` framing, an error mid-stream, client
//! disconnect), refused parameters and `/v1/models`. `tests/clients.rs` drives the same endpoint
//! with the official SDK; the in-process unit tests are in services/gateway/src/openai/tests.

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tokio_rustls::rustls;

mod common;
use common::*;

/// The served model's id: the checkpoint directory's name.
const MODEL_ID: &str = "tiny-llava";
/// Outer bound on one whole HTTP exchange (a hang becomes a failure).
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// Outer bound on waiting for the next piece of a streamed answer.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// A mesh with the OpenAI port on a free port.
fn start(envs: &[(&str, &str)], args: &[&str]) -> MeshProc {
    let mut all = vec!["--http-listen", "127.0.0.1:0"];
    all.extend(args);
    MeshProc::start_with(&model(), &all, envs)
}

/// An HTTP client for one mesh's OpenAI port, trusting the mesh's CA.
struct OpenAi {
    /// `https://127.0.0.1:PORT/v1`, as the ready line names it.
    base: String,
    http: reqwest::Client,
}

impl OpenAi {
    fn new(mesh: &MeshProc) -> OpenAi {
        let base = mesh.openai_url();
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(mesh.certs().join("ca.pem")).unwrap();
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .timeout(HTTP_TIMEOUT)
            .build()
            .unwrap();
        OpenAi { base, http }
    }

    /// POST /v1/chat/completions with this body; the response once its headers have arrived.
    async fn chat(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(format!("{}/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        json_of(resp).await
    }
}

/// Status and JSON body of a whole (not streamed) response.
async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("the response body");
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{status}: the body is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, body)
}

/// The question that, with one image, the fallback (LLaVA-1.5) chat template turns into PROMPT.
fn question() -> &'static str {
    PROMPT
        .strip_prefix("USER: <image>\n")
        .unwrap()
        .strip_suffix(" ASSISTANT:")
        .unwrap()
}

/// A greedy chat request for the test image, with `extra` fields merged in.
fn chat_request(max_tokens: u32, stream: bool, extra: Value) -> Value {
    let png = std::fs::read(image_path()).unwrap();
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let mut req = json!({
        "model": MODEL_ID,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question()},
            {"type": "image_url", "image_url": {"url": url}},
        ]}],
    });
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    req
}

/// Asserts `body` is an error in OpenAI's shape, `{"error": {"message", "type", "param",
/// "code"}}`, of `kind` and `code`; its message.
fn assert_openai_error(body: &Value, kind: &str, code: Option<&str>) -> String {
    let e = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "no error.{key} in {body}");
    }
    assert_eq!(e["type"], kind, "{body}");
    assert_eq!(e["code"], json!(code), "{body}");
    let message = e["message"].as_str().unwrap_or_default().to_string();
    assert!(!message.is_empty(), "{body}");
    message
}

/// A streamed answer read event by event (Server-Sent Events: blocks ending in a blank line).
struct Events {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// Every byte of the body read so far.
    raw: Vec<u8>,
}

impl Events {
    fn new(resp: reqwest::Response) -> Events {
        assert_eq!(resp.status(), 200, "a stream starts with 200");
        let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        Events {
            resp,
            buf: vec![],
            raw: vec![],
        }
    }

    /// The next event's text (without the blank line that ends it), or None at the end of the
    /// body. Each wait for data is bounded.
    async fn next(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Some(String::from_utf8(block[..i].to_vec()).expect("UTF-8 events"));
            }
            let chunk = tokio::time::timeout(CHUNK_TIMEOUT, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no stream data within {CHUNK_TIMEOUT:?}"))
                .expect("reading the stream");
            match chunk {
                Some(bytes) => {
                    self.raw.extend_from_slice(&bytes);
                    self.buf.extend_from_slice(&bytes);
                }
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "the stream ended inside an event: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                    return None;
                }
            }
        }
    }

    /// Every remaining event, until the body ends.
    async fn rest(&mut self) -> Vec<String> {
        let mut all = vec![];
        while let Some(e) = self.next().await {
            all.push(e);
        }
        all
    }
}

/// The payload of an event that is exactly one `data: …` line.
fn data(event: &str) -> &str {
    assert!(
        !event.contains('\n'),
        "an event of more than one line: {event:?}"
    );
    event
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("not a data line: {event:?}"))
}

/// The text a chunk adds (empty for the role and finish chunks).
fn content(chunk: &Value) -> &str {
    chunk["choices"][0]["delta"]["content"]
        .as_str()
        .unwrap_or_default()
}

/// A normal stream: every event is one `data:` line of a `chat.completion.chunk` JSON object,
/// then exactly one final `data: [DONE]`; the text equals the non-streamed answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_json_chunks_then_exactly_one_done() {
    let mesh = start(&[], &[]);
    let api = OpenAi::new(&mesh);
    let (status, whole) = json_of(
        api.chat(chat_request(12, false, json!({})).to_string())
            .await,
    )
    .await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let want = whole["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(whole["usage"]["completion_tokens"], 12);

    let body = chat_request(12, true, json!({"stream_options": {"include_usage": true}}));
    let mut events = Events::new(api.chat(body.to_string()).await);
    let all = events.rest().await;
    let raw = String::from_utf8(events.raw.clone()).unwrap();
    assert!(
        raw.ends_with("data: [DONE]\n\n"),
        "the body ends with [DONE]: {raw:?}"
    );
    assert_eq!(raw.matches("[DONE]").count(), 1, "{raw:?}");
    let (last, chunks) = all.split_last().expect("events");
    assert_eq!(data(last), "[DONE]");
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|e| {
            serde_json::from_str(data(e)).unwrap_or_else(|err| panic!("not JSON ({err}): {e:?}"))
        })
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(c["model"], MODEL_ID, "{c}");
        assert!(c.get("error").is_none(), "{c}");
    }
    // First the role; then text; one chunk with the finish reason; then the usage chunk.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let finish: Vec<&Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1, "one chunk has a finish reason");
    assert_eq!(finish[0]["choices"][0]["finish_reason"], "length");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 12, "{usage}");
    let text: String = chunks.iter().map(content).collect();
    assert_eq!(text, want, "streamed and whole answers agree");
    assert!(chunks.len() >= 4, "{chunks:?}");
}

/// `logprobs` and `prediction` (fields this server cannot honour) are refused with 400 in
/// OpenAI's error shape naming the parameter;
/// `/v1/models` lists the served id, `/v1/models/{id}` answers 200 for it and 404 (OpenAI's
/// shape, `model_not_found`) for another; the endpoint serves normally after all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_prediction_are_refused_and_models_are_listed() {
    let mesh = start(&[], &[]);
    let api = OpenAi::new(&mesh);
    for (param, extra) in [
        ("logprobs", json!({"logprobs": true, "top_logprobs": 2})),
        (
            "prediction",
            json!({"prediction": {"type": "content", "content": "a star"}}),
        ),
    ] {
        for stream in [false, true] {
            let (status, body) = json_of(
                api.chat(chat_request(4, stream, extra.clone()).to_string())
                    .await,
            )
            .await;
            assert_eq!(status, 400, "{param} stream={stream}: {body}");
            assert_openai_error(&body, "invalid_request_error", None);
            assert_eq!(body["error"]["param"], param, "{body}");
            assert!(
                body["error"]["message"].as_str().unwrap().contains(param),
                "{body}"
            );
        }
    }

    let (status, list) = api.get("/models").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [MODEL_ID]);

    let (status, one) = api.get(&format!("/models/{MODEL_ID}")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["object"], "model");
    assert_eq!(one["id"], MODEL_ID);
    assert_eq!(one, list["data"][0], "the same object as in the list");

    let (status, other) = api.get("/models/gpt-4o").await;
    assert_eq!(status, 404, "{other}");
    let message = assert_openai_error(&other, "invalid_request_error", Some("model_not_found"));
    assert!(message.contains("gpt-4o"), "{other}");

    let (status, ok) = json_of(
        api.chat(chat_request(4, false, json!({})).to_string())
            .await,
    )
    .await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["usage"]["completion_tokens"], 4);
}

/// The `image_url.regions` extension: each region adds one image's rows after the image's (25 for
/// the tiny fixture's 5x5 patches); a bad box is a 400 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_url_regions_add_a_slot_per_region_and_bad_boxes_get_400() {
    let mesh = start(&[], &[]);
    let api = OpenAi::new(&mesh);
    let plain = chat_request(2, false, json!({}));
    let with_regions = |boxes: Value| {
        let mut r = plain.clone();
        r["messages"][0]["content"][1]["image_url"]["regions"] = boxes;
        r
    };
    let (status, base) = json_of(api.chat(plain.to_string()).await).await;
    assert_eq!(status, 200, "{base}");
    let (status, two) = json_of(
        api.chat(with_regions(json!([[0, 0, 500, 500], [500, 500, 1000, 1000]])).to_string())
            .await,
    )
    .await;
    assert_eq!(status, 200, "{two}");
    assert_eq!(
        two["usage"]["prompt_tokens"].as_u64().unwrap(),
        base["usage"]["prompt_tokens"].as_u64().unwrap() + 2 * 25,
        "{two}"
    );
    let (status, bad) = json_of(
        api.chat(with_regions(json!([[600, 0, 500, 10]])).to_string())
            .await,
    )
    .await;
    assert_eq!(status, 400, "{bad}");
    let message = assert_openai_error(&bad, "invalid_request_error", Some("invalid_argument"));
    assert!(message.contains("(600,0,500,10) is empty"), "{bad}");
}

/// A request body over the 64 MiB limit gets 413 in OpenAI's shape (here a valid request padded
/// with whitespace, so only its size is wrong); the endpoint serves normally afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_64_mib_gets_413() {
    const LIMIT: usize = 64 << 20;
    let mesh = start(&[], &[]);
    let api = OpenAi::new(&mesh);
    let mut body = chat_request(4, false, json!({})).to_string().into_bytes();
    body.resize(LIMIT + 1, b' ');
    let (status, err) = json_of(api.chat(body).await).await;
    assert_eq!(status, 413, "{err}");
    let message = assert_openai_error(&err, "invalid_request_error", Some("request_too_large"));
    assert!(message.contains(&LIMIT.to_string()), "{message}");

    // The same request, just under the limit, is served.
    let mut body = chat_request(4, false, json!({})).to_string().into_bytes();
    body.resize(LIMIT - 1024, b' ');
    let (status, ok) = json_of(api.chat(body).await).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(ok["usage"]["completion_tokens"], 4);
}

/// With the gateway's one slot held by an open stream and no queue, a chat completion is refused
/// at once with 503, `Retry-After` and `code: overloaded` (and a gRPC call too: the slots are
/// shared); once the stream is closed, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_slots_get_503_with_retry_after() {
    let mesh = start(
        &[
            ("VLM_MAX_IN_FLIGHT", "1"),
            ("VLM_MAX_QUEUE", "0"),
            // 150 tokens × 100 ms: the held stream lasts 15 s unless closed.
            ("VLM_FAULT_DECODE_DELAY_MS", "100"),
        ],
        &[],
    );
    let api = OpenAi::new(&mesh);
    let mut held = Events::new(
        api.chat(chat_request(150, true, json!({})).to_string())
            .await,
    );
    // Until the first text arrives: decoding has started, the slot is taken.
    loop {
        let e = held.next().await.expect("the held stream ended early");
        if !content(&serde_json::from_str(data(&e)).unwrap()).is_empty() {
            break;
        }
    }

    let t = Instant::now();
    let refused = api
        .chat(chat_request(4, false, json!({})).to_string())
        .await;
    assert_eq!(refused.status(), 503);
    let retry_after = refused
        .headers()
        .get("retry-after")
        .expect("a Retry-After header")
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(retry_after, "1");
    let (_, body) = json_of(refused).await;
    let message = assert_openai_error(&body, "server_error", Some("overloaded"));
    assert!(message.contains("overloaded"), "{message}");
    // Outer bound only: refused, not queued behind the 15 s stream.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // gRPC goes through the same slots.
    let mut client = mesh.client().await;
    let png = std::fs::read(image_path()).unwrap();
    let p = vlm_model::SamplingParams {
        max_tokens: 4,
        ..Default::default()
    };
    let err = match bounded("the call", client.generate(request(&png, &p))).await {
        Err(s) => s,
        Ok(r) => {
            let mut s = r.into_inner();
            loop {
                match next_message(&mut s).await {
                    Err(e) => break e,
                    Ok(None) => panic!("a gRPC call was served beside the held stream"),
                    Ok(Some(_)) => {}
                }
            }
        }
    };
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("overloaded"), "{err:?}");

    // Closing the stream gives the slot back: a request is served again (the close reaches the
    // gateway asynchronously, so poll, within an outer bound).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let resp = api
            .chat(chat_request(4, false, json!({})).to_string())
            .await;
        let (status, body) = json_of(resp).await;
        if status == 200 {
            assert_eq!(body["usage"]["completion_tokens"], 4);
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(Instant::now() < deadline, "the slot was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--request-timeout` (here through `VLM_REQUEST_TIMEOUT`, which `up` passes on) is a chat
/// completion's deadline: a generation that would take 15 s gets 504 `deadline_exceeded`, and the
/// decoder stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_timeout_is_a_deadline_and_gets_504() {
    let mesh = start(
        &[
            ("VLM_REQUEST_TIMEOUT", "2"),
            // 150 tokens × 100 ms = 15 s of decoding.
            ("VLM_FAULT_DECODE_DELAY_MS", "100"),
        ],
        &[],
    );
    let api = OpenAi::new(&mesh);
    let t = Instant::now();
    let (status, body) = json_of(
        api.chat(chat_request(150, false, json!({})).to_string())
            .await,
    )
    .await;
    let took = t.elapsed();
    assert_eq!(status, 504, "{body}");
    assert_openai_error(&body, "server_error", Some("deadline_exceeded"));
    // The answer comes at the 2 s deadline (not before it, and not at the 15 s the whole
    // generation would take), with up to 2 s of slack for a loaded machine.
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let line = mesh
        .wait_for_log(&["[decoder]", "decoding stopped"], Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the decoder never stopped: {:?}", mesh.log.lock().unwrap()));
    // 2 s at 100 ms a token is 20 tokens; the cancellation may take up to 5 more to arrive.
    assert!(tokens_on(&line) <= 25, "{line}");
}

/// The only decoder killed mid-stream (and not restarted): the stream ends with exactly one
/// `data: {"error": …}` event in OpenAI's shape and no `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_killed_mid_stream_ends_it_with_one_error_event_and_no_done() {
    let mesh = start(
        &[("VLM_FAULT_DECODE_DELAY_MS", "50")],
        &["--restart", "never"],
    );
    let api = OpenAi::new(&mesh);
    let mut events = Events::new(
        api.chat(chat_request(150, true, json!({})).to_string())
            .await,
    );
    let mut texts = 0;
    while texts < 2 {
        let e = events.next().await.expect("the stream ended early");
        let chunk: Value = serde_json::from_str(data(&e)).unwrap();
        if !content(&chunk).is_empty() {
            texts += 1;
        }
    }
    let decoder = mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == "decoder")
        .unwrap()["pid"]
        .as_u64()
        .unwrap();
    // SAFETY: kill(2) on the decoder process this test's mesh started.
    assert_eq!(unsafe { libc::kill(decoder as i32, libc::SIGKILL) }, 0);

    let rest = events.rest().await;
    let raw = String::from_utf8_lossy(&events.raw).into_owned();
    assert!(!raw.contains("[DONE]"), "no [DONE] after an error: {raw}");
    let payloads: Vec<Value> = rest
        .iter()
        .map(|e| serde_json::from_str(data(e)).unwrap_or_else(|err| panic!("{err}: {e:?}")))
        .collect();
    let errors: Vec<&Value> = payloads
        .iter()
        .filter(|p| p.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 1, "one error event: {raw}");
    assert_eq!(
        payloads.last(),
        Some(errors[0]),
        "the error is the last event: {raw}"
    );
    let message = assert_openai_error(errors[0], "server_error", Some("unavailable"));
    assert!(message.contains("decoder"), "names the stage: {message}");
    for p in &payloads[..payloads.len() - 1] {
        assert_eq!(p["object"], "chat.completion.chunk", "{p}");
    }
}

/// A client that hangs up mid-stream cancels the generation: the decoder logs
/// `generation cancelled by the client; decoding stopped` having decoded far fewer than the 180
/// tokens asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_generation() {
    // 180 tokens × 50 ms = 9 s of decoding if nobody stops it.
    let mesh = start(&[("VLM_FAULT_DECODE_DELAY_MS", "50")], &[]);
    let api = OpenAi::new(&mesh);
    let mut events = Events::new(
        api.chat(chat_request(180, true, json!({})).to_string())
            .await,
    );
    let mut texts = 0;
    while texts < 3 {
        let e = events.next().await.expect("the stream ended early");
        let chunk: Value = serde_json::from_str(data(&e)).unwrap();
        if !content(&chunk).is_empty() {
            texts += 1;
        }
    }
    drop(events); // closes the connection mid-body
    drop(api);
    let line = mesh
        .wait_for_log(
            &[
                "[decoder]",
                "generation cancelled by the client; decoding stopped",
            ],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|| {
            panic!(
                "the decoder never logged a cancellation: {:?}",
                mesh.log.lock().unwrap()
            )
        });
    let tokens = tokens_on(&line);
    eprintln!("decoder: {line}");
    // 60 tokens are 3 s of decoding after the client left (the cancel takes milliseconds);
    // without cancellation all 180 would be decoded.
    assert!((3..=60).contains(&tokens), "{tokens} tokens: {line}");
}

/// What Open-AutoGLM's client needs besides the model: its text-only preflight (`"Hi"`,
/// `max_tokens` 5, not streamed) under a `--served-model-name` alias, with the key `up` was given
/// (401 without it), and the penalties it sends, on a request with an image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_only_preflight_alias_api_key_and_penalties() {
    let mesh = start(
        &[],
        &[
            "--served-model-name",
            "autoglm-phone-9b",
            "--api-key",
            "k-xyz",
        ],
    );
    let api = OpenAi::new(&mesh);
    let preflight = json!({"model": "autoglm-phone-9b", "max_tokens": 5,
        "messages": [{"role": "user", "content": "Hi"}]});
    let post = |key: Option<&'static str>, body: &Value| {
        let mut req = api
            .http
            .post(format!("{}/chat/completions", api.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send()
    };
    let (status, body) = json_of(post(None, &preflight).await.unwrap()).await;
    assert_eq!(status, 401, "{body}");
    assert_openai_error(&body, "invalid_request_error", Some("invalid_api_key"));
    let (status, body) = json_of(post(Some("k-xyz"), &preflight).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "autoglm-phone-9b");
    assert_eq!(body["usage"]["completion_tokens"], 5, "{body}");
    // Not on the gateway's command line: `up` hands the key over in the environment.
    let gateway = mesh.mesh_json()["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == "gateway")
        .and_then(|s| s["pid"].as_u64())
        .unwrap();
    let cmdline = std::fs::read_to_string(format!("/proc/{gateway}/cmdline")).unwrap();
    assert!(cmdline.contains("--served-model-name"), "{cmdline}");
    assert!(!cmdline.contains("k-xyz"), "{cmdline}");
    // The client's sampling: temperature 0, top_p 0.85, frequency_penalty 0.2.
    let mut req = chat_request(8, false, json!({"top_p": 0.85, "frequency_penalty": 0.2}));
    req["model"] = json!("autoglm-phone-9b");
    let (status, body) = json_of(post(Some("k-xyz"), &req).await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    req["frequency_penalty"] = json!(2.5);
    let (status, body) = json_of(post(Some("k-xyz"), &req).await.unwrap()).await;
    assert_eq!(status, 400, "{body}");
    let message = assert_openai_error(&body, "invalid_request_error", Some("invalid_argument"));
    assert!(message.contains("frequency_penalty"), "{message}");
}
