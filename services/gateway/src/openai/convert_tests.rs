use serde_json::{json, Value};

use super::*;
use crate::openai::types::parse_request;

const PNG_B64: &str = "iVBORw0KGgo=";

fn parse(v: Value) -> Result<ChatRequest, ApiError> {
    let req = parse_request(v.to_string().as_bytes())?;
    ChatRequest::check(req, &["tiny-llava"], "<image>", false)
}

fn user_with_image(url: &str) -> Value {
    json!([{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]}])
}

#[test]
fn a_full_request_maps_to_the_gateway_parameters() {
    let r = parse(json!({
        "model": "tiny-llava",
        "messages": user_with_image(&format!("data:image/png;base64,{PNG_B64}")),
        "max_completion_tokens": 7, "max_tokens": 99,
        "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 42, "stop": "\n",
        "stream": true, "stream_options": {"include_usage": true}, "n": 1,
        "user": "u-7",
    }))
    .unwrap();
    assert_eq!(
        r.session.as_deref(),
        Some("u-7"),
        "user is the affinity key"
    );
    assert_eq!(r.params.max_tokens, Some(7));
    assert_eq!(r.params.temperature, 0.5);
    assert_eq!(r.params.top_p, 0.9);
    assert_eq!(r.params.top_k, 5);
    assert_eq!(r.params.seed, Some(42));
    assert_eq!(r.params.stop, vec!["\n".to_string()]);
    assert!(r.stream && r.include_usage);
    assert_eq!(
        r.images,
        vec![(
            "messages[0].content[1].image_url.url".to_string(),
            ImageSource::Inline(
                base64::engine::general_purpose::STANDARD
                    .decode(PNG_B64)
                    .unwrap()
            )
        )]
    );
    assert_eq!(r.messages[0].content[1], TemplatePart::Image);
}

#[test]
fn defaults_follow_openai() {
    let r = parse(json!({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}))
        .unwrap();
    assert_eq!(r.params.temperature, 1.0);
    assert_eq!(r.params.top_p, 1.0);
    assert_eq!(r.params.max_tokens, None);
    assert_eq!(r.params.seed, None);
    assert!(r.params.stop.is_empty());
    assert!(!r.stream && !r.include_usage);
}

#[test]
fn null_is_absent_and_unknown_fields_are_ignored_at_every_level() {
    let r = parse(json!({
        "model": "tiny-llava", "temperature": null, "max_tokens": 3, "max_completion_tokens": null,
        "stop": ["a", "b"], "tools": [], "logprobs": false, "frequency_penalty": 0.5,
        "response_format": {"type": "text"},
        "messages": [
            {"role": "developer", "content": "Be brief.", "name": "x"},
            {"role": "user", "content": [
                {"type": "text", "text": "hi", "cache_control": {}},
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_B64}"), "detail": "high"}},
                {"type": "image_url", "image_url": "https://example.com/a.png"},
            ]},
            {"role": "assistant", "content": null, "tool_calls": []},
        ],
    }))
    .unwrap();
    assert_eq!(r.params.temperature, 1.0);
    assert_eq!(r.params.max_tokens, Some(3));
    assert_eq!(r.params.stop, ["a", "b"]);
    assert_eq!(r.params.frequency_penalty, 0.5, "passed on to the decoder");
    assert_eq!(r.params.presence_penalty, 0.0);
    assert_eq!(r.messages[0].role, "system");
    assert!(r.messages[2].content.is_empty());
    assert_eq!(r.images.len(), 2);
    assert_eq!(
        r.images[1].1,
        ImageSource::Url("https://example.com/a.png".into())
    );
}

#[test]
fn bad_requests_name_the_parameter() {
    let msgs = user_with_image(&format!("data:image/png;base64,{PNG_B64}"));
    let cases = [
        (json!({"model": "gpt-4o", "messages": msgs}), 404, "model"),
        (json!({"messages": msgs}), 400, "model"),
        (json!({"model": 4, "messages": msgs}), 400, "model"),
        (
            json!({"model": "tiny-llava", "messages": msgs, "n": 2}),
            400,
            "n",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "logprobs": true}),
            400,
            "logprobs",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "tools": [{}]}),
            400,
            "tools[0].type",
        ),
        (
            json!({"model": "tiny-llava", "messages": []}),
            400,
            "messages",
        ),
        (json!({"model": "tiny-llava"}), 400, "messages"),
        (
            json!({"model": "tiny-llava", "messages": ["hi"]}),
            400,
            "messages[0]",
        ),
        (
            json!({"model": "tiny-llava", "messages": [["user", "hi"]]}),
            400,
            "messages[0]",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"content": "hi"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": 5}]}),
            400,
            "messages[0].content",
        ),
        (
            json!({"model": "tiny-llava", "messages": user_with_image("data:image/png;base64,@@@")}),
            400,
            "messages[0].content[1].image_url.url",
        ),
        (
            json!({"model": "tiny-llava", "messages": user_with_image("data:text/plain;base64,aGk=")}),
            400,
            "messages[0].content[1].image_url.url",
        ),
        (
            json!({"model": "tiny-llava", "messages": user_with_image("file:///etc/passwd")}),
            400,
            "messages[0].content[1].image_url.url",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            400,
            "messages[0].content[0].image_url",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            400,
            "messages[0].content[0].image_url.url",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}),
            400,
            "messages[0].content[0].text",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}),
            400,
            "messages[0].content[0].type",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "user", "content": "Describe <image>"}]}),
            400,
            "messages[0].content",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "function", "content": "x"}]}),
            400,
            "messages[0].role",
        ),
        (
            json!({"model": "tiny-llava", "messages": [{"role": "tool", "content": "x"}]}),
            400,
            "messages[0].tool_call_id",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "temperature": "hot"}),
            400,
            "temperature",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "seed": -1}),
            400,
            "seed",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "max_tokens": 5_000_000_000u64}),
            400,
            "max_tokens",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "stop": 3}),
            400,
            "stop",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "stream": "yes"}),
            400,
            "stream",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "stream_options": true}),
            400,
            "stream_options",
        ),
        (
            json!({"model": "tiny-llava", "messages": msgs, "stream_options": {"include_usage": 1}}),
            400,
            "stream_options.include_usage",
        ),
    ];
    for (body, status, param) in cases {
        let e = parse(body.clone()).unwrap_err();
        assert_eq!(e.status.as_u16(), status, "{body}: {e:?}");
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        assert!(e.message.len() > 10, "{body}: {e:?}");
        let field = param.split('.').next().unwrap();
        assert!(e.message.contains(field), "{body}: {e:?}");
    }
}

#[test]
fn bodies_that_are_no_json_object_are_refused_without_a_param() {
    for (body, says) in [
        ("", "not valid JSON"),
        ("{\"model\": ", "not valid JSON"),
        ("{} {}", "not valid JSON"),
        ("[\"tiny-llava\", []]", "must be a JSON object"),
        ("\"hi\"", "must be a JSON object"),
        (
            "{\"model\": \"a\", \"model\": \"b\"}",
            "duplicate field `model`",
        ),
    ] {
        let e = parse_request(body.as_bytes()).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{body}");
        assert_eq!(e.param, None, "{body}");
        assert!(e.message.contains(says), "{body}: {}", e.message);
    }
}

#[test]
fn http_urls_are_kept_for_the_fetch_policy() {
    let r = parse(
        json!({"model": "tiny-llava", "messages": user_with_image("https://example.com/a.png")}),
    )
    .unwrap();
    assert_eq!(
        r.images[0].1,
        ImageSource::Url("https://example.com/a.png".into())
    );
}

#[tokio::test]
async fn image_urls_are_refused_unless_allowed() {
    let images = vec![
        ("a".to_string(), ImageSource::Inline(vec![1, 2])),
        (
            "b".to_string(),
            ImageSource::Url("http://127.0.0.1:9/x.png".into()),
        ),
    ];
    let e = load_images(images, policy(false)).await.unwrap_err();
    assert_eq!(e.param.as_deref(), Some("b"));
    assert!(e.message.contains("--allow-image-urls"), "{}", e.message);
    let inline = vec![("a".to_string(), ImageSource::Inline(vec![1, 2]))];
    assert_eq!(
        load_images(inline, policy(false)).await.unwrap(),
        [vec![1u8, 2]]
    );
}

fn policy(allow_urls: bool) -> FetchPolicy {
    FetchPolicy {
        allow_urls,
        allow_internal: false,
        max_image_bytes: 1024,
        max_images: 2,
        max_total_bytes: 3,
    }
}

/// Images are counted before any URL is fetched (the URL below would be refused if fetched),
/// and their bytes add up against one budget.
#[tokio::test]
async fn images_are_counted_first_and_share_one_byte_budget() {
    let url = || ImageSource::Url("http://127.0.0.1:9/x.png".into());
    let three = vec![
        ("a".to_string(), url()),
        ("b".to_string(), url()),
        ("c".to_string(), url()),
    ];
    let e = load_images(three, policy(true)).await.unwrap_err();
    assert!(
        e.message.contains("3 images in one request; at most 2"),
        "{}",
        e.message
    );
    let big = vec![
        ("a".to_string(), ImageSource::Inline(vec![1, 2])),
        ("b".to_string(), ImageSource::Inline(vec![3, 4])),
    ];
    let e = load_images(big, policy(false)).await.unwrap_err();
    assert_eq!(e.param.as_deref(), Some("b"));
    assert!(
        e.message.contains("exceed 3 bytes in total"),
        "{}",
        e.message
    );
    // A URL gets only what is left of the budget; here the address is refused first.
    let internal = vec![("a".to_string(), url())];
    let e = load_images(internal, policy(true)).await.unwrap_err();
    assert!(e.message.contains("internal address"), "{}", e.message);
}

#[test]
fn image_url_regions_extension_travels_per_image() {
    let url = format!("data:image/png;base64,{PNG_B64}");
    let r = parse(json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, "regions": [[0, 0, 500, 500], [250, 100, 750, 900]]}},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Compare."},
    ]}]}))
    .unwrap();
    assert_eq!(r.images.len(), 2);
    assert_eq!(
        r.regions,
        vec![
            vec![
                vlm_proto::Region {
                    x0: 0,
                    y0: 0,
                    x1: 500,
                    y1: 500
                },
                vlm_proto::Region {
                    x0: 250,
                    y0: 100,
                    x1: 750,
                    y1: 900
                },
            ],
            vec![],
        ]
    );
    // Not four numbers: a 400 naming the field.
    let e = parse(
        json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "regions": [[0, 0, 500]]}},
        ]}]}),
    )
    .unwrap_err();
    assert!(format!("{e:?}").contains("regions"), "{e:?}");
}
