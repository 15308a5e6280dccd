//! `--api-key` and `--served-model-name` on the endpoint.

use super::*;

fn with_key(mut req: Request<Body>, key: Option<&str>) -> Request<Body> {
    if let Some(k) = key {
        let v = header::HeaderValue::from_str(&format!("Bearer {k}")).unwrap();
        req.headers_mut().insert(header::AUTHORIZATION, v);
    }
    req
}

/// With a key, a request without it (or with another) is a 401 in OpenAI's shape before any
/// generation starts, on every route; with it, the request is served.
#[tokio::test]
async fn an_api_key_is_required_when_set() {
    let mut h = Harness::with(1 << 20, 8, |e| e.cfg.api_key = Some("k-123".into())).await;
    for key in [None, Some("k-12"), Some("other")] {
        let resp = h.refused(with_key(chat(hello(json!({}))), key)).await;
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
        let (status, body) = json_of(resp).await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key");
        let (status, _) = json_of(h.send(with_key(get("/v1/models"), key)).await).await;
        assert_eq!(status, 401);
    }
    let (pending, call) = h
        .start(with_key(chat(hello(json!({}))), Some("k-123")))
        .await;
    answer(&call, vec![delta("ok", &[5]), last(FinishReason::Stop)]).await;
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = json_of(h.send(with_key(get("/v1/models"), Some("k-123"))).await).await;
    assert_eq!(status, 200);
}

/// Without a key, any key (or none) is accepted, as the OpenAI SDK always sends one.
#[tokio::test]
async fn any_key_is_accepted_when_none_is_set() {
    let mut h = Harness::new().await;
    for key in [None, Some("EMPTY"), Some("sk-whatever")] {
        let (pending, call) = h.start(with_key(chat(hello(json!({}))), key)).await;
        answer(&call, vec![last(FinishReason::Stop)]).await;
        assert_eq!(pending.await.unwrap().status(), StatusCode::OK, "{key:?}");
    }
}

/// Every served name is accepted as `model` and listed; answers carry the first.
#[tokio::test]
async fn served_model_names_are_aliases() {
    let mut h = Harness::with(1 << 20, 8, |e| {
        e.cfg.aliases = vec!["autoglm-phone-9b".into(), "glm".into()]
    })
    .await;
    let (_, list) = json_of(h.send(get("/v1/models")).await).await;
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-llava", "autoglm-phone-9b", "glm"]);
    let (status, one) = json_of(h.send(get("/v1/models/glm")).await).await;
    assert_eq!((status, one["id"].as_str()), (200, Some("glm")));
    let req = chat(json!({"model": "autoglm-phone-9b",
        "messages": [{"role": "user", "content": "hi"}]}));
    let (pending, call) = h.start(req).await;
    answer(&call, vec![delta("ok", &[5]), last(FinishReason::Stop)]).await;
    let (status, body) = json_of(pending.await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "tiny-llava");
    let req = chat(json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}));
    let (status, body) = json_of(h.refused(req).await).await;
    assert_eq!(status, 404);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("autoglm-phone-9b"), "{message}");
}
