//! Turns chat messages into the model's prompt, as transformers' `apply_chat_template` does.
//!
//! The template and its special tokens come from the decoder (`DecoderInfo.chat_template`, read
//! from the checkpoint there: the gateway reads no checkpoint); the endpoint compiles it once per
//! template it is given.
//!
//! Messages are passed in the Hugging Face multimodal shape: `content` is a list of
//! `{"type": "text", "text": …}` and `{"type": "image"}` parts, and the template writes the
//! model's image placeholder where each image goes.
//!
//! One [`TemplateCache`] per gateway holds the compiled template: the OpenAI endpoint renders
//! `messages` with it, `Generate` and `Watch` render a plain `question` with it
//! ([`ChatTemplate::render_question`]). The CLI uses the same renderer in process (`generate
//! --question`) and [`ChatTemplate::turn_markers`] to warn about raw prompts that are not in the
//! model's chat format.

use std::sync::{Arc, Mutex};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;
use tonic::Status;

/// One part of a message, in the shape chat templates expect.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TemplatePart {
    Text { text: String },
    Image,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: Vec<TemplatePart>,
    /// An assistant message's calls, in the shape Hugging Face templates take
    /// (`{"type": "function", "function": {"name", "arguments": {…}}}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message's call id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Text-only messages reach the template as a string (see [`Self::new`]).
    text_as_string: bool,
    /// See [`Self::takes_tools`].
    takes_tools: bool,
    /// See [`Self::has_system_turns`].
    system_turns: bool,
    /// Where the template came from (for logs and errors).
    pub source: String,
    /// The model's image placeholder (`<image>` for llava-hf checkpoints).
    pub image_token: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("image_token", &self.image_token)
            .finish()
    }
}

impl ChatTemplate {
    /// The template the decoder reported.
    pub fn from_proto(t: &vlm_proto::ChatTemplate) -> anyhow::Result<Self> {
        Self::new(
            &t.template,
            t.source.clone(),
            t.image_token.clone(),
            t.bos_token.clone(),
            t.eos_token.clone(),
        )
    }

    pub fn new(
        template: &str,
        source: String,
        image_token: String,
        bos_token: String,
        eos_token: String,
    ) -> anyhow::Result<Self> {
        let mut env = Environment::new();
        // transformers compiles chat templates with trim_blocks and lstrip_blocks: a block tag's
        // newline and its line's leading whitespace are not output (multi-line templates such
        // as GLM-4.1V's depend on it).
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string/dict methods (`.upper()`, `.strip()`, `.items()`…) that HF templates use.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // transformers' `{% generation %}` markers only label assistant tokens for training.
        let template = template
            .replace("{% generation %}", "")
            .replace("{% endgeneration %}", "")
            .replace("{%- generation %}", "")
            .replace("{%- endgeneration %}", "")
            .replace("{% generation -%}", "")
            .replace("{% endgeneration -%}", "");
        // A template that tests `content is string` (GLM-4.1V's) prints a text-only message's
        // content as it is; such messages get their text as a string, as vLLM's content-format
        // detection gives them. Other templates always see the list of parts.
        let text_as_string = template.contains("is string");
        let takes_tools = template.contains("tools");
        let system_turns = template.contains("system");
        env.add_template_owned("chat", template)
            .map_err(|e| anyhow::anyhow!("chat template from {source} does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            text_as_string,
            takes_tools,
            system_turns,
            source,
            image_token,
            bos_token,
            eos_token,
        })
    }

    /// A text-only message's text (parts joined by newlines), for templates that take strings.
    fn string_content(&self, m: &TemplateMessage) -> Option<String> {
        if !self.text_as_string {
            return None;
        }
        let texts: Option<Vec<&str>> = m
            .content
            .iter()
            .map(|p| match p {
                TemplatePart::Text { text } => Some(text.as_str()),
                TemplatePart::Image => None,
            })
            .collect();
        texts.map(|t| t.join("\n"))
    }

    /// The prompt for `messages`, ending with the assistant's turn being opened.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, String> {
        self.render_with_tools(messages, None)
    }

    /// Whether the template has a tool section (reads `tools`): tool definitions, calls and
    /// results are then given to it as Hugging Face templates take them; otherwise the OpenAI
    /// endpoint writes them into the messages' text (README, "Tool calls").
    pub fn takes_tools(&self) -> bool {
        self.takes_tools
    }

    /// Whether the template renders system messages (mentions them at all).
    pub fn has_system_turns(&self) -> bool {
        self.system_turns
    }

    /// [`Self::render`] with `tools` (OpenAI's shape) in the template's context.
    pub fn render_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| match self.string_content(m) {
                Some(text) => minijinja::context! {
                    role => m.role.clone(),
                    content => text,
                    tool_calls => m.tool_calls.clone(),
                    tool_call_id => m.tool_call_id.clone(),
                },
                None => Value::from_serialize(m),
            })
            .collect();
        tmpl.render(minijinja::context! {
            messages => messages,
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => true,
            image_token => self.image_token.clone(),
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        })
        .map_err(|e| {
            // raise_exception's message is the template's own explanation.
            match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                _ => format!("the chat template failed: {e}"),
            }
        })
    }
}

impl ChatTemplate {
    /// The prompt for a plain `question` about `images` images: one user message whose content
    /// is one image part per image, then the text (what `Generate`'s and `Watch`'s `question`
    /// and `generate --question` mean).
    pub fn render_question(&self, images: usize, question: &str) -> Result<String, String> {
        self.render(&[question_message(images, question)])
    }

    /// How the template marks a user turn and the opening of the assistant's, found by rendering
    /// probe conversations (`None` where the template raises or the probe text does not come
    /// through verbatim):
    /// - the user marker is the last line of the text every user turn starts with: the common
    ///   end of what comes before the first user turn's text and of what comes between an
    ///   assistant's text and the next user's text, trimmed (so a preamble such as GLM's
    ///   `[gMASK]<sop>` or a default system turn is not part of it);
    /// - the assistant marker is the last line of what follows the last user text, trimmed.
    ///
    /// LLaVA-1.5: `USER:` and `ASSISTANT:`; GLM-4.1V: `<|user|>` and `<|assistant|>`; ChatML:
    /// `<|im_start|>user` and `<|im_start|>assistant`.
    pub fn turn_markers(&self) -> Option<TurnMarkers> {
        const FIRST: &str = "vlmprobefirst";
        const REPLY: &str = "vlmprobereply";
        const NEXT: &str = "vlmprobenext";
        let one = self.render(&[question_message(0, FIRST)]).ok()?;
        let at = one.find(FIRST)?;
        let (before, after) = (&one[..at], &one[at + FIRST.len()..]);
        let assistant = last_line(after);
        let conversation = [
            question_message(0, FIRST),
            TemplateMessage {
                role: "assistant".into(),
                content: vec![TemplatePart::Text { text: REPLY.into() }],
                ..Default::default()
            },
            question_message(0, NEXT),
        ];
        let user = match self.render(&conversation) {
            Ok(three) => {
                let between = three
                    .find(REPLY)
                    .map(|r| r + REPLY.len())
                    .and_then(|r| Some(&three[r..r + three[r..].find(NEXT)?]));
                match between {
                    Some(between) => last_line(common_suffix(before, between)),
                    None => last_line(before),
                }
            }
            // A template that takes one user turn only: what precedes it.
            Err(_) => last_line(before),
        };
        if user.is_empty() && assistant.is_empty() {
            return None;
        }
        Some(TurnMarkers {
            user: user.to_string(),
            assistant: assistant.to_string(),
        })
    }
}

/// One user turn: `images` image parts, then `text`.
fn question_message(images: usize, text: &str) -> TemplateMessage {
    let mut content = vec![TemplatePart::Image; images];
    content.push(TemplatePart::Text { text: text.into() });
    TemplateMessage {
        role: "user".into(),
        content,
        ..Default::default()
    }
}

/// The last non-blank line of `s`, trimmed ("" when there is none).
fn last_line(s: &str) -> &str {
    s.trim()
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("")
}

/// The longest common end of `a` and `b` (on a character boundary).
fn common_suffix<'a>(a: &'a str, b: &str) -> &'a str {
    let len: usize = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .map(|(c, _)| c.len_utf8())
        .sum();
    &a[a.len() - len..]
}

/// The text a chat template opens a user turn and the assistant's turn with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnMarkers {
    /// E.g. `USER:` (LLaVA-1.5), `<|user|>` (GLM-4.1V); empty when the template has none.
    pub user: String,
    /// E.g. `ASSISTANT:`, `<|assistant|>`; empty when the template has none.
    pub assistant: String,
}

impl TurnMarkers {
    /// The markers `prompt` does not contain, user first.
    pub fn missing(&self, prompt: &str) -> Vec<&str> {
        [self.user.as_str(), self.assistant.as_str()]
            .into_iter()
            .filter(|m| !m.is_empty() && !prompt.contains(m))
            .collect()
    }

    /// What is wrong with a raw `prompt` that lacks some markers (`None` when it has them all),
    /// e.g. `the prompt has no "ASSISTANT:" (the model's chat template marks its turns with
    /// "USER:" … "ASSISTANT:")`.
    pub fn lacking(&self, prompt: &str) -> Option<String> {
        let missing = self.missing(prompt);
        if missing.is_empty() {
            return None;
        }
        let quoted: Vec<String> = missing.iter().map(|m| format!("{m:?}")).collect();
        Some(format!(
            "the prompt has no {} (the model's chat template marks its turns with {:?} … {:?})",
            quoted.join(" and no "),
            self.user,
            self.assistant
        ))
    }
}

/// The gateway's compiled chat template: the one the decoder last reported (through the model's
/// identity, asked again when a replica reports other weights), compiled once per template.
/// Shared by `Generate`, `Watch` and the OpenAI endpoint.
#[derive(Default)]
pub struct TemplateCache {
    known: Mutex<Option<(vlm_proto::ChatTemplate, Arc<ChatTemplate>)>>,
}

impl std::fmt::Debug for TemplateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let known = self.known.lock().expect("chat template lock");
        f.debug_struct("TemplateCache")
            .field("source", &known.as_ref().map(|(t, _)| t.source.clone()))
            .finish()
    }
}

impl TemplateCache {
    /// `reported` (`ModelInfo.chat_template`) compiled; INTERNAL when the decoder reported none
    /// or one that does not compile (the model is unusable for chat, not the request wrong).
    pub fn compiled(
        &self,
        reported: Option<&vlm_proto::ChatTemplate>,
    ) -> Result<Arc<ChatTemplate>, Status> {
        let reported = reported.ok_or_else(|| {
            Status::internal("the decoder reported no chat template (an older decoder?)")
        })?;
        let mut known = self.known.lock().expect("chat template lock");
        if let Some((t, compiled)) = known.as_ref() {
            if t == reported {
                return Ok(compiled.clone());
            }
        }
        let compiled = Arc::new(ChatTemplate::from_proto(reported).map_err(|e| {
            tracing::error!("the model's chat template is unusable: {e:#}");
            Status::internal(format!("{e:#}"))
        })?);
        tracing::info!(source = %reported.source, image_token = %reported.image_token, "chat template");
        *known = Some((reported.clone(), compiled.clone()));
        Ok(compiled)
    }
}

#[cfg(test)]
#[path = "chat_template_tests.rs"]
mod tests;
