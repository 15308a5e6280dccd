//! Tool calls on the OpenAI endpoint: `tools`, `tool_choice` and `parallel_tool_calls` become an
//! output format the decoder follows (a Lark grammar with each function's parameters as an
//! embedded JSON schema), and the answer's text becomes `message.tool_calls`.
//!
//! The model writes a call as `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (the Hermes
//! convention Qwen's templates use); several calls follow each other with nothing between. With
//! `tool_choice` `required` or a named function the answer is calls only; with `auto` it is calls
//! or text that does not begin with `<tool_call>`; with `none` nothing is constrained and tools
//! are only shown to the model.

use serde_json::{json, Value};

use super::error::ApiError;
use super::types::{Obj, ToolChoice, ToolDef};
use crate::chat_template::{TemplateMessage, TemplatePart};

/// What opens and closes one call in the model's output.
pub(super) const CALL_OPEN: &str = "<tool_call>";
pub(super) const CALL_CLOSE: &str = "</tool_call>";
/// Most tools a request may declare (OpenAI's limit).
pub(super) const MAX_TOOLS: usize = 128;
/// Most calls in one answer when parallel calls are allowed (the grammar's bound, so a model
/// cannot loop on calls until `max_tokens`).
pub(super) const MAX_PARALLEL_CALLS: usize = 8;

/// One declared function.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Function {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Mode {
    None,
    Auto,
    Required,
    Named(String),
}

/// The request's tools, checked.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Tools {
    pub functions: Vec<Function>,
    pub mode: Mode,
    pub parallel: bool,
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Tools {
    /// `tools`, `tool_choice` and `parallel_tool_calls` as the request gave them.
    pub(super) fn check(
        tools: Option<Vec<Obj<ToolDef>>>,
        choice: Option<ToolChoice>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>, ApiError> {
        let tools = tools.unwrap_or_default();
        if tools.len() > MAX_TOOLS {
            return Err(ApiError::invalid(
                "tools",
                format!("{} tools; at most {MAX_TOOLS} are accepted", tools.len()),
            ));
        }
        let mut functions = Vec::with_capacity(tools.len());
        for (i, Obj(t)) in tools.into_iter().enumerate() {
            let path = format!("tools[{i}]");
            match t.kind.as_deref() {
                Some("function") => {}
                other => {
                    return Err(ApiError::invalid(
                        format!("{path}.type"),
                        format!("{path}.type must be \"function\", got {other:?}"),
                    ))
                }
            }
            let Some(Obj(f)) = t.function else {
                return Err(ApiError::invalid(
                    format!("{path}.function"),
                    format!("{path}.function is required"),
                ));
            };
            let name = f.name.unwrap_or_default();
            if !valid_name(&name) {
                return Err(ApiError::invalid(
                    format!("{path}.function.name"),
                    format!("{path}.function.name must be 1-64 letters, digits, '_' or '-'"),
                ));
            }
            if functions.iter().any(|g: &Function| g.name == name) {
                return Err(ApiError::invalid(
                    format!("{path}.function.name"),
                    format!("{path}.function.name {name:?} is declared twice"),
                ));
            }
            let parameters = match f.parameters {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p,
                Some(_) => {
                    return Err(ApiError::invalid(
                        format!("{path}.function.parameters"),
                        format!("{path}.function.parameters must be a JSON schema object"),
                    ))
                }
            };
            functions.push(Function {
                name,
                description: f.description,
                parameters,
            });
        }
        let mode = match choice {
            None if functions.is_empty() => Mode::None,
            None => Mode::Auto,
            Some(ToolChoice::Mode(m)) => match m.as_str() {
                "none" => Mode::None,
                "auto" => Mode::Auto,
                "required" => Mode::Required,
                other => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice {other:?} is not one of none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": …}}}}"),
                    ))
                }
            },
            Some(ToolChoice::Function(name)) => {
                if !functions.iter().any(|f| f.name == name) {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not in tools"),
                    ));
                }
                Mode::Named(name)
            }
        };
        if functions.is_empty() {
            if matches!(mode, Mode::Required | Mode::Named(_)) {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "tool_choice asks for a tool call but no tools are given",
                ));
            }
            return Ok(None);
        }
        Ok(Some(Tools {
            functions,
            mode,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// Whether the answer is to be read as tool calls.
    pub(super) fn active(&self) -> bool {
        self.mode != Mode::None
    }

    /// Whether the answer can only be calls (no text branch).
    pub(super) fn calls_only(&self) -> bool {
        matches!(self.mode, Mode::Required | Mode::Named(_))
    }

    /// The JSON schema of one call to `f`.
    fn call_schema(f: &Function) -> Value {
        json!({
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false
        })
    }

    /// The Lark grammar the answer follows, or `None` when tools are only shown (`none`).
    pub(super) fn grammar(&self) -> Option<String> {
        let callable: Vec<&Function> = match &self.mode {
            Mode::None => return None,
            Mode::Named(n) => self.functions.iter().filter(|f| &f.name == n).collect(),
            Mode::Auto | Mode::Required => self.functions.iter().collect(),
        };
        let mut schema = if callable.len() == 1 {
            Self::call_schema(callable[0])
        } else {
            json!({"anyOf": callable.iter().map(|f| Self::call_schema(f)).collect::<Vec<_>>()})
        };
        schema["x-guidance"] = json!({"whitespace_flexible": false});
        let most = if self.parallel && !matches!(self.mode, Mode::Named(_)) {
            MAX_PARALLEL_CALLS
        } else {
            1
        };
        // calls: call (call (call …)?)? — at most `most` calls.
        let mut calls = String::from("call");
        for _ in 1..most {
            calls = format!("call ({calls})?");
        }
        let start = if self.calls_only() {
            "start: calls".to_string()
        } else {
            format!("start: calls | text\ntext: /{}/", not_a_call_regex())
        };
        Some(format!(
            "{start}\ncalls: {calls}\ncall: {open:?} %json {schema} {close:?}\n",
            open = CALL_OPEN,
            close = CALL_CLOSE,
        ))
    }

    /// The calls in `text`, when it is nothing but calls to declared functions (whitespace
    /// between them allowed): (name, arguments as JSON text).
    pub(super) fn parse(&self, text: &str) -> Option<Vec<(String, String)>> {
        let mut rest = text.trim();
        let mut calls = Vec::new();
        while !rest.is_empty() {
            let body = rest.strip_prefix(CALL_OPEN)?;
            let end = body.find(CALL_CLOSE)?;
            let v: Value = serde_json::from_str(&body[..end]).ok()?;
            let name = v.get("name")?.as_str()?;
            let args = v.get("arguments")?;
            if !args.is_object() || !self.functions.iter().any(|f| f.name == name) {
                return None;
            }
            calls.push((name.to_string(), args.to_string()));
            rest = body[end + CALL_CLOSE.len()..].trim_start();
        }
        (!calls.is_empty()).then_some(calls)
    }

    /// The functions as chat templates with a tool section take them (`tools` in the template's
    /// context, OpenAI's shape).
    pub(super) fn template_value(&self) -> Value {
        Value::Array(
            self.functions
                .iter()
                .map(|f| {
                    json!({"type": "function", "function": {
                        "name": f.name,
                        "description": f.description,
                        "parameters": f.parameters,
                    }})
                })
                .collect(),
        )
    }

    /// What a template without a tool section is given instead: a system text that lists the
    /// functions and says how to call them.
    pub(super) fn fallback_instructions(&self) -> String {
        let list: Vec<String> = self
            .functions
            .iter()
            .map(|f| {
                json!({"name": f.name, "description": f.description, "parameters": f.parameters})
                    .to_string()
            })
            .collect();
        format!(
            "You can call functions. They are listed as JSON schemas between <tools> and </tools>:\n<tools>\n{}\n</tools>\nTo call a function, answer with {CALL_OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CALL_CLOSE} for each call, and nothing else.",
            list.join("\n")
        )
    }
}

/// Messages for a template without a tool section: the functions listed in a system message
/// (merged into the first one; in the first user message when the template has no system
/// turn), each call of an assistant message written after its text as the model writes calls,
/// and tool results as user turns `<tool_response>…</tool_response>` (consecutive ones in one
/// turn, so user and assistant turns still alternate).
pub(super) fn written_into_text(
    messages: Vec<TemplateMessage>,
    tools: Option<&Tools>,
    system_turns: bool,
) -> Vec<TemplateMessage> {
    let text = |t: String| TemplatePart::Text { text: t };
    let mut out: Vec<TemplateMessage> = Vec::with_capacity(messages.len() + 1);
    for mut m in messages {
        if let Some(calls) = m.tool_calls.take() {
            for c in calls {
                // As the model writes a call: the name first.
                let call = format!(
                    "{{\"name\":{},\"arguments\":{}}}",
                    c["function"]["name"], c["function"]["arguments"]
                );
                m.content
                    .push(text(format!("{CALL_OPEN}{call}{CALL_CLOSE}")));
            }
        }
        if m.role == "tool" {
            let body: Vec<String> = m
                .content
                .iter()
                .filter_map(|p| match p {
                    TemplatePart::Text { text } => Some(text.clone()),
                    TemplatePart::Image => None,
                })
                .collect();
            let response = text(format!(
                "<tool_response>
{}
</tool_response>",
                body.join(
                    "
"
                )
            ));
            let images = m
                .content
                .iter()
                .filter(|p| **p == TemplatePart::Image)
                .count();
            match out.last_mut() {
                Some(prev) if prev.role == "user" && prev.tool_call_id.is_some() => {
                    prev.content
                        .extend(std::iter::repeat_n(TemplatePart::Image, images));
                    prev.content.push(response);
                }
                _ => {
                    let mut content = vec![TemplatePart::Image; images];
                    content.push(response);
                    out.push(TemplateMessage {
                        role: "user".into(),
                        content,
                        tool_calls: None,
                        // Marks a turn made of tool results (not rendered: the template reads
                        // no such key).
                        tool_call_id: m.tool_call_id,
                    });
                }
            }
            continue;
        }
        out.push(m);
    }
    for m in &mut out {
        m.tool_call_id = None;
    }
    if let Some(t) = tools.filter(|t| t.active()) {
        let instructions = t.fallback_instructions();
        let first_system = out.iter().position(|m| m.role == "system");
        match (system_turns, first_system) {
            (true, Some(i)) => out[i]
                .content
                .insert(0, text(format!("{instructions}\n\n"))),
            (true, None) => out.insert(
                0,
                TemplateMessage {
                    role: "system".into(),
                    content: vec![text(instructions)],
                    ..Default::default()
                },
            ),
            (false, _) => {
                if let Some(u) = out.iter_mut().find(|m| m.role == "user") {
                    let at = u
                        .content
                        .iter()
                        .position(|p| matches!(p, TemplatePart::Text { .. }))
                        .unwrap_or(u.content.len());
                    u.content.insert(at, text(format!("{instructions}\n\n")));
                }
            }
        }
    }
    out
}

/// A regex for text that does not begin with [`CALL_OPEN`]: a proper prefix of it, or text
/// that leaves it at some character.
fn not_a_call_regex() -> String {
    let m: Vec<char> = CALL_OPEN.chars().collect();
    let esc = |c: char| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c.to_string()
        } else {
            format!("\\x{:02x}", c as u32)
        }
    };
    let mut alts = vec![String::new()];
    for i in 0..m.len() {
        let prefix: String = m[..i].iter().map(|&c| esc(c)).collect();
        if i > 0 {
            alts.push(prefix.clone());
        }
        alts.push(format!("{prefix}[^{}][\\s\\S]*", esc(m[i])));
    }
    format!("(?:{})", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools(mode: Mode, parallel: bool) -> Tools {
        Tools {
            functions: vec![
                Function {
                    name: "tap".into(),
                    description: Some("Tap".into()),
                    parameters: json!({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}),
                },
                Function {
                    name: "back".into(),
                    description: None,
                    parameters: json!({"type": "object", "properties": {}}),
                },
            ],
            mode,
            parallel,
        }
    }

    #[test]
    fn parse_reads_calls_only() {
        let t = tools(Mode::Auto, true);
        assert_eq!(
            t.parse(r#"<tool_call>{"name":"tap","arguments":{"x":3}}</tool_call> <tool_call>{"name":"back","arguments":{}}</tool_call>"#),
            Some(vec![("tap".into(), r#"{"x":3}"#.into()), ("back".into(), "{}".into())])
        );
        assert_eq!(t.parse("hello"), None);
        assert_eq!(
            t.parse(r#"<tool_call>{"name":"tap","arguments":{"x":3}}</tool_call> and more"#),
            None
        );
        assert_eq!(
            t.parse(r#"<tool_call>{"name":"nope","arguments":{}}</tool_call>"#),
            None
        );
        assert_eq!(
            t.parse(r#"<tool_call>{"name":"tap","arguments":{"x":3}}"#),
            None
        );
    }

    #[test]
    fn grammar_shapes() {
        let g = tools(Mode::Required, false).grammar().unwrap();
        assert!(g.starts_with("start: calls\ncalls: call\n"), "{g}");
        let g = tools(Mode::Auto, true).grammar().unwrap();
        assert!(g.contains("start: calls | text"), "{g}");
        assert_eq!(g.matches("call (").count(), MAX_PARALLEL_CALLS - 1, "{g}");
        let g = tools(Mode::Named("back".into()), true).grammar().unwrap();
        assert!(
            !g.contains("tap") && g.contains("\"const\":\"back\""),
            "{g}"
        );
        assert!(tools(Mode::None, true).grammar().is_none());
    }

    #[test]
    fn the_text_regex_excludes_exactly_calls() {
        let r = not_a_call_regex();
        // Empty, every proper prefix of the opening tag, and a departure from it at each place.
        assert!(r.starts_with("(?:|[^\\x3c][\\s\\S]*|\\x3c|"), "{r}");
        assert!(r.contains("|\\x3ctool_call|"), "{r}");
        assert!(r.ends_with("|\\x3ctool_call[^\\x3e][\\s\\S]*)"), "{r}");
    }
}
