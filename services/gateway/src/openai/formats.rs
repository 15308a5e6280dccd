//! The output format a chat request asks for (`response_format`, vLLM's `structured_outputs` and
//! `guided_*`, or the tools' grammar: at most one) and its `logit_bias`, as the wire's sampling
//! parameters carry them.

use super::error::ApiError;
use super::tools::Tools;

/// vLLM's older `guided_*` fields.
pub(super) struct Guided {
    pub json: Option<serde_json::Value>,
    pub regex: Option<String>,
    pub grammar: Option<String>,
    pub choice: Option<Vec<String>>,
}

/// The output format the request asks for, and the field that asked: `response_format`,
/// `structured_outputs`, a `guided_*` field, or the tools. At most one may.
pub(super) fn output_format(
    response_format: Option<super::types::ResponseFormat>,
    structured: Option<super::types::StructuredOutputs>,
    guided: Guided,
    tools: Option<&Tools>,
) -> Result<Option<(vlm_proto::OutputFormat, &'static str)>, ApiError> {
    use vlm_proto::output_format::Kind;
    let mut found: Vec<(Kind, &'static str)> = Vec::new();
    if let Some(rf) = response_format {
        match rf.kind.as_deref() {
            None => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    "response_format.type is required (text, json_object or json_schema)",
                ))
            }
            Some("text") => {}
            Some("json_object") => found.push((Kind::JsonObject(true), "response_format")),
            Some("json_schema") => {
                let schema = rf
                    .json_schema
                    .and_then(|j| j.0.schema)
                    .filter(|s| !s.is_null())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "response_format.json_schema.schema",
                            "response_format.json_schema.schema is required for type json_schema",
                        )
                    })?;
                found.push((
                    Kind::JsonSchema(schema.to_string()),
                    "response_format.json_schema.schema",
                ));
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!(
                    "response_format.type {other:?} is not one of text, json_object, json_schema"
                ),
                ))
            }
        }
    }
    let choice_regex = |c: Vec<String>, field: &'static str| {
        if c.is_empty() {
            return Err(ApiError::invalid(
                field,
                format!("{field} must not be empty"),
            ));
        }
        Ok(Kind::Regex(
            c.iter()
                .map(|s| regex_escape(s))
                .collect::<Vec<_>>()
                .join("|"),
        ))
    };
    if let Some(so) = structured {
        if let Some(j) = so.json.filter(|j| !j.is_null()) {
            found.push((Kind::JsonSchema(j.to_string()), "structured_outputs.json"));
        }
        if let Some(r) = so.regex {
            found.push((Kind::Regex(r), "structured_outputs.regex"));
        }
        if let Some(g) = so.grammar {
            found.push((Kind::Lark(g), "structured_outputs.grammar"));
        }
        if let Some(c) = so.choice {
            found.push((
                choice_regex(c, "structured_outputs.choice")?,
                "structured_outputs.choice",
            ));
        }
    }
    if let Some(j) = guided.json.filter(|j| !j.is_null()) {
        found.push((Kind::JsonSchema(j.to_string()), "guided_json"));
    }
    if let Some(r) = guided.regex {
        found.push((Kind::Regex(r), "guided_regex"));
    }
    if let Some(g) = guided.grammar {
        found.push((Kind::Lark(g), "guided_grammar"));
    }
    if let Some(c) = guided.choice {
        found.push((choice_regex(c, "guided_choice")?, "guided_choice"));
    }
    if let Some(g) = tools.and_then(Tools::grammar) {
        found.push((Kind::Lark(g), "tools"));
    }
    match found.len() {
        0 => Ok(None),
        1 => {
            let (kind, field) = found.pop().expect("one");
            Ok(Some((vlm_proto::OutputFormat { kind: Some(kind) }, field)))
        }
        _ => Err(ApiError::invalid(
            found[1].1,
            format!(
                "{} and {} both constrain the output; send one of them",
                found[0].1, found[1].1
            ),
        )),
    }
}

/// `s` as a regex matching itself.
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// OpenAI's `logit_bias` (token ids as strings) as the wire's map.
pub(super) fn logit_bias(
    bias: Option<std::collections::BTreeMap<String, f32>>,
) -> Result<std::collections::HashMap<u32, f32>, ApiError> {
    bias.unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let t: u32 = k.parse().map_err(|_| {
                let shown: String = k.chars().take(32).collect();
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias: key {shown:?} is not a token id"),
                )
            })?;
            Ok((t, v))
        })
        .collect()
}
