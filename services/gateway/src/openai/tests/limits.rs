//! The layers around the handler: body size and time, shape errors, concurrency, routes.

use super::*;

#[tokio::test]
async fn an_over_limit_body_gets_413_in_openais_shape() {
    let mut h = Harness::with(256, 8, |_| {}).await;
    let big = hello(json!({"user": "x".repeat(1024)}));
    let (status, body) = json_of(h.refused(chat(big.clone())).await).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("256 bytes"));
    // Without a Content-Length (chunked), the same once 256 bytes have arrived.
    let chunks = futures::stream::iter(
        big.to_string()
            .into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
            .collect::<Vec<_>>(),
    );
    let req = Request::post("/v1/chat/completions")
        .body(Body::from_stream(chunks))
        .unwrap();
    let (status, _) = json_of(h.refused(req).await).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let mut h = Harness::with(1 << 20, 8, |e| {
        e.body.read_timeout = Duration::from_millis(50);
    })
    .await;
    let never = futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>();
    let req = Request::post("/v1/chat/completions")
        .body(Body::from_stream(never))
        .unwrap();
    let (status, body) = json_of(h.refused(req).await).await;
    assert_eq!(status, 408, "{body}");
}

#[tokio::test]
async fn unknown_top_level_fields_are_ignored_as_before() {
    let mut h = Harness::new().await;
    let req = hello(json!({"frobnicate": {"x": [1]}, "user": "u", "presence_penalty": 0}));
    let (pending, call) = h.start(chat(req)).await;
    answer(&call, vec![last(FinishReason::Stop)]).await;
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn malformed_bodies_get_400_in_openais_shape_not_axums_text() {
    let mut h = Harness::new().await;
    let no_json = Request::post("/v1/chat/completions")
        .body(Body::from("model=tiny-llava"))
        .unwrap();
    let (status, body) = json_of(h.refused(no_json).await).await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let wrong = json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]});
    let (status, body) = json_of(h.refused(chat(wrong)).await).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "messages[0].content[0].text");
    let (status, body) = json_of(h.refused(chat(hello(json!({"model": "gpt-4o"})))).await).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("model_not_found"))
    );
}

#[tokio::test]
async fn the_concurrency_limit_refuses_with_503_while_requests_are_held_open() {
    let mut h = Harness::with(1 << 20, 2, |_| {}).await;
    let (answered, a) = h.start(chat(hello(json!({})))).await;
    let (streamed, b) = h.start(chat(hello(json!({"stream": true})))).await;
    // B's headers are out, but its stream holds its slot.
    let b_body = streamed.await.unwrap().into_body();
    let refused = h.refused(chat(hello(json!({})))).await;
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let (status, body) = json_of(refused).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "overloaded");
    // Listing models is not a chat completion.
    assert_eq!(h.send(get("/v1/models")).await.status(), StatusCode::OK);
    // B's client goes away: its slot is free for C, and B's generation is cancelled.
    drop(b_body);
    cancelled(&b).await;
    let (c_pending, c) = h.start(chat(hello(json!({})))).await;
    for (pending, call) in [(answered, a), (c_pending, c)] {
        answer(&call, vec![last(FinishReason::Stop)]).await;
        assert_eq!(pending.await.unwrap().status(), StatusCode::OK);
    }
    // Both answered: two slots again.
    let (_d, _) = h.start(chat(hello(json!({})))).await;
    let (_e, _) = h.start(chat(hello(json!({})))).await;
}

#[tokio::test]
async fn chat_completions_share_the_grpc_ports_slots() {
    let mut h = Harness::with(1 << 20, 1, |_| {}).await;
    // A gRPC call holds the only slot: a chat completion is refused, as a gRPC call would be.
    let grpc_call = h.gate.admit(None).await.unwrap();
    let (status, body) = json_of(h.refused(chat(hello(json!({})))).await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "overloaded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight"),
        "{body}"
    );
    drop(grpc_call);
    let _served = h.start(chat(hello(json!({})))).await;
}

#[tokio::test]
async fn a_body_larger_than_the_memory_budget_is_refused_before_it_is_read() {
    // 64 KiB of budget; the body declares 40 KiB, which with its parsed copy needs 80 KiB.
    let mut h = Harness::with_budget(1 << 20, 8, 64 << 10, |_| {}).await;
    let padding = "x".repeat(40 << 10);
    let req = chat(hello(json!({"user": padding})));
    let (status, body) = json_of(h.refused(req).await).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("whole memory budget"),
        "{body}"
    );
    assert_eq!(h.gate.memory().used(), 0);
    // A small request fits.
    let _served = h.start(chat(hello(json!({})))).await;
}

#[tokio::test]
async fn a_body_without_a_length_is_held_as_it_arrives_and_refused_when_the_budget_is_full() {
    let mut h = Harness::with_budget(1 << 20, 8, 64 << 10, |_| {}).await;
    let body = hello(json!({"user": "x".repeat(100 << 10)})).to_string();
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(futures::stream::iter(
            body.into_bytes()
                .chunks(8 << 10)
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )))
        .unwrap();
    let (status, body) = json_of(h.refused(req).await).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory budget"),
        "{body}"
    );
    assert_eq!(h.gate.memory().used(), 0);
}

#[tokio::test]
async fn routes_and_their_errors() {
    let h = Harness::new().await;
    for uri in ["/v1/models", "/v1/models/"] {
        let (status, body) = json_of(h.send(get(uri)).await).await;
        assert_eq!(status, 200, "{uri}");
        assert_eq!(body["object"], "list");
        assert_eq!(body["data"][0]["id"], "tiny-llava");
        assert_eq!(body["data"][0]["owned_by"], "vlm-mesh");
    }
    let (status, body) = json_of(h.send(get("/v1/models/tiny-llava")).await).await;
    assert_eq!((status, &body["object"]), (200, &json!("model")));
    let cases = [
        (get("/v1/models/gpt-4o"), 404, "model_not_found", "gpt-4o"),
        (
            Request::delete("/v1/models").body(Body::empty()).unwrap(),
            405,
            "",
            "DELETE is not allowed on /v1/models",
        ),
        (
            get("/v1/chat/completions/"),
            405,
            "",
            "GET is not allowed on /v1/chat/completions",
        ),
        (get("/v2/things"), 404, "unknown_url", "GET /v2/things"),
        (
            Request::post("/v1/models/x").body(Body::empty()).unwrap(),
            404,
            "unknown_url",
            "POST /v1/models/x",
        ),
    ];
    for (req, status, code, says) in cases {
        let uri = req.uri().clone();
        let (got, body) = json_of(h.send(req).await).await;
        assert_eq!(got, status, "{uri}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{uri}: {message}");
        if !code.is_empty() {
            assert_eq!(body["error"]["code"], code, "{uri}");
        }
    }
}
