//! What happens to each field of a chat-completions request: honoured (read by
//! [`super::convert`]), a label (accepted, not acted on), refused when set (it would change the
//! answer in a way this server cannot), or unknown (logged once per name and accepted, as vLLM
//! does; refused under `--strict-openai`). The README's "OpenAI request fields" table is the same
//! list.

use std::collections::BTreeSet;
use std::sync::Mutex;

use serde_json::Value;

use super::error::ApiError;
use super::types::ChatCompletionRequest;

/// Distinct unknown field names remembered for logging once (a client inventing names cannot
/// grow the set without bound; past it, names are logged at debug level only).
const MAX_LOGGED_NAMES: usize = 256;

fn set(v: &Option<Value>) -> bool {
    !matches!(v, None | Some(Value::Null))
}

/// Refuses the fields this server cannot honour and, under `strict`, unknown ones.
pub(super) fn check(req: &ChatCompletionRequest, strict: bool) -> Result<(), ApiError> {
    let refuse = |field: &str, why: &str| Err(ApiError::invalid(field, format!("{field}: {why}")));
    if set(&req.audio) {
        return refuse("audio", "audio output is not supported (text only)");
    }
    if let Some(m) = req.modalities.as_ref().filter(|m| !m.is_null()) {
        if *m != Value::from(vec!["text"]) {
            return refuse(
                "modalities",
                "only [\"text\"] is supported: this server answers in text",
            );
        }
    }
    if set(&req.prediction) {
        return refuse("prediction", "predicted outputs are not supported");
    }
    if set(&req.reasoning_effort) {
        return refuse(
            "reasoning_effort",
            "not supported: the served model's reasoning cannot be set per request",
        );
    }
    if set(&req.verbosity) {
        return refuse("verbosity", "not supported by this server");
    }
    if set(&req.web_search_options) {
        return refuse("web_search_options", "web search is not supported");
    }
    if set(&req.functions) {
        return refuse("functions", "deprecated and not supported; send tools");
    }
    if set(&req.function_call) {
        return refuse(
            "function_call",
            "deprecated and not supported; send tool_choice",
        );
    }
    if req.logprobs == Some(true) {
        return refuse("logprobs", "logprobs are not supported by this server");
    }
    if let Some(t) = req.top_logprobs.as_ref().filter(|t| !t.is_null()) {
        if t.as_u64() != Some(0) {
            return refuse("top_logprobs", "logprobs are not supported by this server");
        }
    }
    if let Some(name) = req.unknown.keys().next() {
        if strict {
            return Err(ApiError::invalid(
                name.as_str(),
                format!("unknown field {name:?} (this gateway runs with --strict-openai)"),
            ));
        }
        for name in req.unknown.keys() {
            log_once(name);
        }
    }
    Ok(())
}

fn log_once(name: &str) {
    static SEEN: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let mut seen = SEEN.lock().expect("seen field names");
    if seen.contains(name) {
        return;
    }
    if seen.len() < MAX_LOGGED_NAMES {
        seen.insert(name.to_string());
        let shown: String = name.chars().take(64).collect();
        tracing::warn!(
            field = %shown,
            "OpenAI endpoint: ignoring an unknown request field (logged once per name; --strict-openai refuses such requests)"
        );
    } else {
        tracing::debug!("OpenAI endpoint: ignoring an unknown request field");
    }
}
