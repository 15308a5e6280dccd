//! Structured output, tools and the request-field policy, from the request's JSON to what the
//! gateway sends the decoder and the prompt the template makes.

use serde_json::{json, Value};
use vlm_proto::output_format::Kind;

use crate::chat_template::ChatTemplate;
use crate::openai::convert::ChatRequest;
use crate::openai::error::ApiError;
use crate::openai::tools::written_into_text;
use crate::openai::types::parse_request;

fn check(v: Value, strict: bool) -> Result<ChatRequest, ApiError> {
    let mut v = v;
    v["model"] = json!("m");
    if v.get("messages").is_none() {
        v["messages"] = json!([{"role": "user", "content": "hi"}]);
    }
    ChatRequest::check(
        parse_request(v.to_string().as_bytes())?,
        &["m"],
        "<image>",
        strict,
    )
}

fn kind(v: Value) -> Option<Kind> {
    check(v, false).unwrap().params.format.and_then(|f| f.kind)
}

fn refused(v: Value, strict: bool) -> String {
    let e = check(v.clone(), strict).expect_err(&v.to_string());
    assert_eq!(e.status, 400, "{v}: {e:?}");
    let msg = format!("{e:?}");
    e.param.unwrap_or_else(|| panic!("{v}: no param: {msg}"))
}

#[test]
fn formats_come_from_one_field() {
    let schema = json!({"type": "object"});
    assert_eq!(
        kind(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}}})
        ),
        Some(Kind::JsonSchema(schema.to_string()))
    );
    assert_eq!(
        kind(json!({"response_format": {"type": "json_object"}})),
        Some(Kind::JsonObject(true))
    );
    assert_eq!(kind(json!({"response_format": {"type": "text"}})), None);
    assert_eq!(
        kind(json!({"structured_outputs": {"grammar": "start: \"a\""}})),
        Some(Kind::Lark("start: \"a\"".into()))
    );
    assert_eq!(
        kind(json!({"guided_regex": "[0-9]+"})),
        Some(Kind::Regex("[0-9]+".into()))
    );
    assert_eq!(
        kind(json!({"guided_choice": ["yes", "a.b"]})),
        Some(Kind::Regex("yes|a\\.b".into()))
    );
    assert_eq!(
        refused(
            json!({"response_format": {"type": "json_object"}, "guided_regex": "x"}),
            false
        ),
        "guided_regex"
    );
    assert_eq!(
        refused(json!({"response_format": {"type": "yaml"}}), false),
        "response_format.type"
    );
    assert_eq!(
        refused(json!({"structured_outputs": {"choice": []}}), false),
        "structured_outputs.choice"
    );
}

#[test]
fn logit_bias_keys_are_token_ids() {
    let r = check(json!({"logit_bias": {"5": 2.5, "17": -100}}), false).unwrap();
    assert_eq!(r.params.logit_bias.get(&5), Some(&2.5));
    assert_eq!(r.params.logit_bias.get(&17), Some(&-100.0));
    assert_eq!(
        refused(json!({"logit_bias": {"x": 1}}), false),
        "logit_bias"
    );
}

#[test]
fn every_field_is_honoured_labelled_or_refused() {
    for (field, value) in [
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("reasoning_effort", json!("low")),
        ("verbosity", json!("low")),
        ("web_search_options", json!({})),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("top_logprobs", json!(3)),
    ] {
        assert_eq!(refused(json!({ field: value }), false), field);
    }
    // Labels, the text modality and null are accepted, strict or not.
    let labels = json!({
        "metadata": {"k": "v"}, "store": true, "service_tier": "auto", "safety_identifier": "s",
        "user": "u", "prompt_cache_retention": "24h", "modalities": ["text"], "audio": null,
        "top_logprobs": 0,
    });
    check(labels.clone(), false).unwrap();
    check(labels, true).unwrap();
    // Unknown fields: accepted (and logged once), or refused naming them under --strict-openai.
    check(json!({"frobnicate": {"x": 1}}), false).unwrap();
    assert_eq!(refused(json!({"frobnicate": 1}), true), "frobnicate");
}

fn tools_body(choice: Value) -> Value {
    json!({
        "tools": [{"type": "function", "function": {"name": "tap", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}],
        "tool_choice": choice,
    })
}

#[test]
fn tools_become_a_grammar_and_bad_ones_are_named() {
    let Some(Kind::Lark(g)) = kind(tools_body(json!("required"))) else {
        panic!("no grammar")
    };
    assert!(
        g.contains("%json") && g.contains("\"const\":\"tap\""),
        "{g}"
    );
    assert!(matches!(kind(tools_body(json!("auto"))), Some(Kind::Lark(g)) if g.contains("| text")));
    assert_eq!(kind(tools_body(json!("none"))), None);
    assert_eq!(
        refused(
            tools_body(json!({"type": "function", "function": {"name": "fly"}})),
            false
        ),
        "tool_choice"
    );
    assert_eq!(
        refused(tools_body(json!("sometimes")), false),
        "tool_choice"
    );
    assert_eq!(
        refused(
            json!({"tools": [{"type": "function", "function": {"name": "a b"}}]}),
            false
        ),
        "tools[0].function.name"
    );
    assert_eq!(
        refused(json!({"tool_choice": "required"}), false),
        "tool_choice"
    );
}

fn history() -> Value {
    json!([
        {"role": "user", "content": "Tap it."},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "tap", "arguments": "{\"x\": 4}"}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "tapped"},
    ])
}

#[test]
fn a_template_without_tools_gets_them_in_the_text() {
    let mut body = tools_body(json!("auto"));
    body["messages"] = history();
    let r = check(body, false).unwrap();
    assert_eq!(
        r.messages[1].tool_calls.as_ref().unwrap()[0]["function"]["arguments"],
        json!({"x": 4})
    );
    let llava = ChatTemplate::new(
        include_str!("../../../../../shared/model/src/llava_1_5_chat_template.jinja"),
        "t".into(),
        "<image>".into(),
        "<s>".into(),
        "</s>".into(),
    )
    .unwrap();
    assert!(!llava.takes_tools());
    let messages = written_into_text(r.messages, r.tools.as_ref(), llava.has_system_turns());
    let prompt = llava.render(&messages).unwrap();
    assert!(
        prompt.contains("<tools>") && prompt.contains("\"name\":\"tap\""),
        "{prompt}"
    );
    assert!(
        prompt.contains(
            "ASSISTANT: <tool_call>{\"name\":\"tap\",\"arguments\":{\"x\":4}}</tool_call>"
        ),
        "{prompt}"
    );
    assert!(
        prompt.contains("USER: <tool_response>\ntapped\n</tool_response>"),
        "{prompt}"
    );
}

#[test]
fn a_template_with_a_tool_section_renders_tools_calls_and_results() {
    // The shape of Qwen2.5's tool sections.
    let qwen = "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}\
        {% for m in messages %}<|{{ m.role }}|>{% if m.content is string %}{{ m.content }}{% endif %}\
        {% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }}({{ c.function.arguments.x }})</call>{% endfor %}{% endif %}\
        {% if m.role == 'tool' %}[{{ m.tool_call_id }}]{% endif %}{% endfor %}<|assistant|>";
    let t = ChatTemplate::new(qwen, "t".into(), "<image>".into(), "".into(), "".into()).unwrap();
    assert!(t.takes_tools());
    let mut body = tools_body(json!("auto"));
    body["messages"] = history();
    let r = check(body, false).unwrap();
    let tools = r.tools.as_ref().unwrap().template_value();
    let prompt = t.render_with_tools(&r.messages, Some(&tools)).unwrap();
    assert_eq!(
        prompt,
        "<tools>tap;</tools><|user|>Tap it.<|assistant|><call>tap(4)</call><|tool|>tapped[call_1]<|assistant|>"
    );
}
