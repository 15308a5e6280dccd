//! What a generation becomes: a completion, SSE chunks, errors, cancellation.

use super::*;

#[tokio::test]
async fn a_completion_carries_the_text_usage_and_trace_of_the_generation() {
    let mut h = Harness::new().await;
    let (pending, call) = h
        .start(chat(hello(json!({"max_tokens": 2, "seed": 7}))))
        .await;
    assert_eq!(call.request.prompt, "USER: hi ASSISTANT:");
    let params = call.request.params.clone().unwrap();
    assert_eq!((params.max_tokens, params.seed), (Some(2), Some(7)));
    let done = vec![delta("Hel", &[1]), delta("", &[]), delta("lo", &[2])];
    answer(&call, done).await;
    answer(&call, vec![last(FinishReason::Length)]).await;
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let trace = "ab".repeat(16);
    assert_eq!(body["id"], format!("chatcmpl-{trace}"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-llava");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "logprobs": null, "finish_reason": "length",
                "message": {"role": "assistant", "content": "Hello", "refusal": null}}])
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
               "prompt_tokens_details": {"cached_tokens": 4}})
    );
    assert_eq!(body["vlm"], json!({"token_ids": [1, 2], "trace_id": trace}));
    assert!(body["system_fingerprint"].is_null() && body["created"].as_u64().unwrap() > 0);
}

/// The `data:` payloads of an SSE body, which must be nothing but `data: …\n\n` events.
fn events(sse: &str) -> Vec<&str> {
    let body = sse.strip_suffix("\n\n").unwrap();
    body.split("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}")))
        .collect()
}

#[tokio::test]
async fn a_streamed_completion_is_openai_chunks_ending_with_done() {
    let mut h = Harness::new().await;
    let req = hello(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (pending, call) = h.start(chat(req)).await;
    let done = vec![delta("Hel", &[1]), delta("", &[]), delta("lo", &[2])];
    answer(&call, done).await;
    answer(&call, vec![last(FinishReason::Stop)]).await;
    let resp = pending.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-cache");
    let sse = text_of(resp).await;
    assert!(sse.ends_with("\n\ndata: [DONE]\n\n"), "{sse}");
    let events = events(&sse);
    assert_eq!(events.len(), 6, "{sse}");
    assert_eq!(events[5], "[DONE]");
    let chunks: Vec<Value> = events[..5]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"), "{id}");
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let expected = [
        choice(json!({"role": "assistant", "content": ""}), Value::Null),
        choice(json!({"content": "Hel"}), Value::Null),
        choice(json!({"content": "lo"}), Value::Null),
        choice(json!({}), json!("stop")),
    ];
    for (chunk, choices) in chunks.iter().zip(expected) {
        assert_eq!(chunk["choices"], choices, "{chunk}");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "tiny-llava");
        assert!(chunk["system_fingerprint"].is_null());
        assert!(
            chunk["usage"].is_null() && chunk.get("usage").is_some(),
            "{chunk}"
        );
    }
    assert_eq!(chunks[4]["choices"], json!([]));
    assert_eq!(chunks[4]["usage"]["total_tokens"], 12);
    assert_eq!(
        chunks[4]["usage"]["prompt_tokens_details"]["cached_tokens"],
        4
    );
}

#[tokio::test]
async fn chunks_have_no_usage_key_unless_asked_for() {
    let mut h = Harness::new().await;
    let (pending, call) = h.start(chat(hello(json!({"stream": true})))).await;
    answer(&call, vec![delta("a", &[1]), last(FinishReason::Stop)]).await;
    let sse = text_of(pending.await.unwrap()).await;
    let events = events(&sse);
    assert_eq!(events.len(), 4, "{sse}");
    for e in &events[..3] {
        let chunk: Value = serde_json::from_str(e).unwrap();
        assert!(chunk.get("usage").is_none(), "{chunk}");
    }
}

#[tokio::test]
async fn a_failure_after_the_start_is_one_error_event_without_done() {
    let mut h = Harness::new().await;
    let (pending, call) = h.start(chat(hello(json!({"stream": true})))).await;
    answer(
        &call,
        vec![delta("a", &[1]), Err(Status::unavailable("decoder: gone"))],
    )
    .await;
    let sse = text_of(pending.await.unwrap()).await;
    let events = events(&sse);
    assert_eq!(events.len(), 3, "{sse}");
    let error: Value = serde_json::from_str(events[2]).unwrap();
    assert_eq!(
        error,
        json!({"error": {"message": "decoder: gone", "type": "server_error", "param": null,
                         "code": "unavailable"}})
    );
}

#[tokio::test]
async fn a_failed_or_unfinished_generation_is_an_error_response() {
    let mut h = Harness::new().await;
    let (pending, call) = h.start(chat(hello(json!({})))).await;
    answer(&call, vec![Err(Status::deadline_exceeded("too slow"))]).await;
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (504, &json!("deadline_exceeded"))
    );
    // The gateway's stream ends without its final message.
    let (pending, call) = h.start(chat(hello(json!({})))).await;
    answer(&call, vec![delta("a", &[1])]).await;
    drop(call);
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(status, 500, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("final"));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_the_generation() {
    let mut h = Harness::new().await;
    let (pending, call) = h.start(chat(hello(json!({"stream": true})))).await;
    answer(&call, vec![delta("a", &[1])]).await;
    let mut body = pending.await.unwrap().into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"));
    assert!(!call.reply.is_closed());
    drop(body);
    cancelled(&call).await;
    // The same before the response has started.
    let (pending, call) = h.start(chat(hello(json!({})))).await;
    pending.abort();
    cancelled(&call).await;
}
