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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: Vec<TemplatePart>,
}

/// A compiled chat template plus the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Text-only messages reach the template as a string (see [`Self::new`]).
    text_as_string: bool,
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
        env.add_template_owned("chat", template)
            .map_err(|e| anyhow::anyhow!("chat template from {source} does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            text_as_string,
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
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| format!("chat template: {e}"))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| match self.string_content(m) {
                Some(text) => minijinja::context! { role => m.role.clone(), content => text },
                None => Value::from_serialize(m),
            })
            .collect();
        tmpl.render(minijinja::context! {
            messages => messages,
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
mod tests {
    use super::*;

    /// llava-hf's LLaVA-1.5 template, the decoder's fallback (`vlm_model::chat_template`).
    const LLAVA_1_5_TEMPLATE: &str =
        include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja");

    fn fallback() -> ChatTemplate {
        ChatTemplate::new(
            LLAVA_1_5_TEMPLATE,
            "test".into(),
            "<image>".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap()
    }

    fn user(parts: Vec<TemplatePart>) -> TemplateMessage {
        TemplateMessage {
            role: "user".into(),
            content: parts,
        }
    }

    fn text(t: &str) -> TemplatePart {
        TemplatePart::Text { text: t.into() }
    }

    #[test]
    fn one_user_turn_with_an_image_is_the_llava_1_5_prompt() {
        let p = fallback()
            .render(&[user(vec![
                text("What is shown in this image?"),
                TemplatePart::Image,
            ])])
            .unwrap();
        // What transformers' LlavaProcessor.apply_chat_template writes for the same message
        // (its trailing space after the text included).
        assert_eq!(p, "USER: <image>\nWhat is shown in this image? ASSISTANT:");
    }

    #[test]
    fn multi_turn_keeps_roles_images_and_order() {
        let p = fallback()
            .render(&[
                TemplateMessage {
                    role: "system".into(),
                    content: vec![text("Be brief.")],
                },
                user(vec![TemplatePart::Image, text("Colour?")]),
                TemplateMessage {
                    role: "assistant".into(),
                    content: vec![text("Red.")],
                },
                user(vec![TemplatePart::Image, text("And this one?")]),
            ])
            .unwrap();
        assert_eq!(
            p,
            "Be brief. USER: <image>\nColour? ASSISTANT: Red. USER: <image>\nAnd this one? ASSISTANT:"
        );
        assert_eq!(p.matches("<image>").count(), 2);
    }

    #[test]
    fn checkpoint_templates_get_pycompat_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}\
             [{{ m.role.upper() }}]{% for c in m.content %}{% if c.type == 'image' %}{{ image_token }}{% else %}{{ c.text.strip() }}{% endif %}{% endfor %}\
             {% generation %}{% endgeneration %}{% endfor %}",
            "test".into(),
            "<img>".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap();
        assert_eq!(
            t.render(&[user(vec![TemplatePart::Image, text("  hi ")])])
                .unwrap(),
            "<s>[USER]<img>hi"
        );
        let err = t
            .render(&[TemplateMessage {
                role: "tool".into(),
                content: vec![],
            }])
            .unwrap_err();
        assert_eq!(err, "no tools");
    }

    #[test]
    fn a_template_that_does_not_compile_is_an_error_naming_its_source() {
        let e = ChatTemplate::from_proto(&vlm_proto::ChatTemplate {
            template: "{% for %}".into(),
            source: "/m/chat_template.jinja".into(),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("/m/chat_template.jinja"), "{e}");
    }

    /// GLM-4.1V's own template, rendered as transformers rendered it for the fixture: images as
    /// `<|begin_of_image|><|image|><|end_of_image|>`, a system string, and Open-AutoGLM's history
    /// (text-only user turns, assistant turns as text).
    #[test]
    fn glm4v_template_renders_as_transformers_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-glm4v");
        let t = ChatTemplate::new(
            &std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
            "chat_template.jinja".into(),
            "<|image|>".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("reference/reference.json")).unwrap(),
        )
        .unwrap();
        let parts = |content: &serde_json::Value| -> Vec<TemplatePart> {
            match content {
                serde_json::Value::String(s) => vec![text(s)],
                v => v
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "image" => TemplatePart::Image,
                        _ => text(p["text"].as_str().unwrap()),
                    })
                    .collect(),
            }
        };
        let history = &reference["templates"][0];
        let messages: Vec<TemplateMessage> = history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| TemplateMessage {
                role: m["role"].as_str().unwrap().into(),
                content: parts(&m["content"]),
            })
            .collect();
        assert_eq!(
            t.render(&messages).unwrap(),
            history["prompt"].as_str().unwrap()
        );
        let two = reference["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "two")
            .unwrap();
        let messages = [
            TemplateMessage {
                role: "system".into(),
                content: vec![text("You are a phone agent.")],
            },
            user(vec![
                TemplatePart::Image,
                TemplatePart::Image,
                text("How many shapes are there?"),
            ]),
        ];
        assert_eq!(
            t.render(&messages).unwrap(),
            two["prompt"].as_str().unwrap()
        );
    }
}

#[cfg(test)]
mod question_tests {
    use super::*;

    fn llava() -> ChatTemplate {
        ChatTemplate::new(
            include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja"),
            "test".into(),
            "<image>".into(),
            "<s>".into(),
            "</s>".into(),
        )
        .unwrap()
    }

    fn glm4v() -> ChatTemplate {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-glm4v");
        ChatTemplate::new(
            &std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap(),
            "chat_template.jinja".into(),
            "<|image|>".into(),
            String::new(),
            String::new(),
        )
        .unwrap()
    }

    /// The bundled checkpoints with a LLaVA or GLM text model carry no template of their own
    /// (they get the LLaVA-1.5 fallback); only the GLM-4.1V ones have one, tiny-glm4v's. If that
    /// changes, the tests below must cover the new template.
    #[test]
    fn only_the_glm4v_fixtures_ship_a_template() {
        let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models");
        let glm4v = std::fs::read_to_string(models.join("tiny-glm4v/chat_template.jinja")).unwrap();
        for entry in std::fs::read_dir(&models).unwrap().flatten() {
            let dir = entry.path();
            if !dir.join("config.json").exists() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let has_own = dir.join("chat_template.jinja").exists()
                || dir.join("chat_template.json").exists()
                || std::fs::read_to_string(dir.join("tokenizer_config.json"))
                    .is_ok_and(|t| t.contains("\"chat_template\""));
            assert_eq!(has_own, name.ends_with("glm4v"), "{name}");
            if has_own {
                let own = std::fs::read_to_string(dir.join("chat_template.jinja")).unwrap();
                assert_eq!(own, glm4v, "{name}: another template than tiny-glm4v's");
            }
        }
    }

    #[test]
    fn a_question_is_one_user_turn_with_its_images_first() {
        let t = llava();
        // The demo's prompt (DEFAULT_DEMO_PROMPT before `--question`), exactly.
        assert_eq!(
            t.render_question(1, "Describe the image.").unwrap(),
            "USER: <image>\nDescribe the image. ASSISTANT:"
        );
        assert_eq!(
            t.render_question(2, "Same?").unwrap(),
            "USER: <image>\n<image>\nSame? ASSISTANT:"
        );
        assert_eq!(t.render_question(0, "Hi").unwrap(), "USER: Hi ASSISTANT:");
        let g = glm4v();
        assert_eq!(
            g.render_question(1, "Describe the image.").unwrap(),
            "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>Describe the image.<|assistant|>\n"
        );
        assert_eq!(
            g.render_question(0, "Hi").unwrap(),
            "[gMASK]<sop><|user|>\nHi<|assistant|>\n"
        );
    }

    #[test]
    fn turn_markers_of_the_llava_fallback_and_glm4v() {
        let llava = llava().turn_markers().unwrap();
        assert_eq!(
            llava,
            TurnMarkers {
                user: "USER:".into(),
                assistant: "ASSISTANT:".into()
            }
        );
        assert!(llava
            .missing("USER: <image>\nWhere is the circle? ASSISTANT:")
            .is_empty());
        assert_eq!(
            llava.missing("<image> Describe the image."),
            ["USER:", "ASSISTANT:"]
        );
        assert_eq!(llava.missing("USER: <image>\nWhere?"), ["ASSISTANT:"]);
        assert_eq!(
            llava.lacking("USER: <image>\nWhere?").unwrap(),
            r#"the prompt has no "ASSISTANT:" (the model's chat template marks its turns with "USER:" … "ASSISTANT:")"#
        );
        assert_eq!(llava.lacking("USER: hi ASSISTANT:"), None);

        // GLM's preamble `[gMASK]<sop>` comes once, not with every user turn.
        let glm = glm4v().turn_markers().unwrap();
        assert_eq!(
            glm,
            TurnMarkers {
                user: "<|user|>".into(),
                assistant: "<|assistant|>".into()
            }
        );
        // With a system turn in front, as the reference prompts have it: nothing missing.
        assert!(glm
            .missing("[gMASK]<sop><|system|>\nYou are a phone agent.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Hi<|assistant|>\n")
            .is_empty());
        // A LLaVA-style prompt sent to GLM lacks both.
        assert_eq!(
            glm.missing("USER: <image>\nDescribe the image. ASSISTANT:"),
            ["<|user|>", "<|assistant|>"]
        );
        assert_eq!(
            glm.lacking("<|image|> hi").unwrap(),
            r#"the prompt has no "<|user|>" and no "<|assistant|>" (the model's chat template marks its turns with "<|user|>" … "<|assistant|>")"#
        );
    }

    /// ChatML with a default system turn (as Qwen2's): the system turn and the end-of-turn
    /// token before the next user turn are not part of the markers.
    #[test]
    fn turn_markers_leave_out_default_system_turns_and_turn_ends() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}\
             {% for m in messages %}<|im_start|>{{ m.role }}\n{% for c in m.content %}{% if c.type == 'image' %}<|vision|>{% else %}{{ c.text }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}\
             {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "test".into(),
            "<|vision|>".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(
            t.turn_markers().unwrap(),
            TurnMarkers {
                user: "<|im_start|>user".into(),
                assistant: "<|im_start|>assistant".into()
            }
        );
        // A template that raises on the probe, or never writes its text, has no markers.
        let raising = ChatTemplate::new(
            "{{ raise_exception('images only') }}",
            "test".into(),
            "<image>".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(raising.turn_markers(), None);
        assert_eq!(raising.render_question(1, "Hi").unwrap_err(), "images only");
    }

    #[test]
    fn the_cache_compiles_once_per_reported_template() {
        let cache = TemplateCache::default();
        let e = cache.compiled(None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        let a = vlm_proto::ChatTemplate {
            template: include_str!("../../../shared/model/src/llava_1_5_chat_template.jinja")
                .into(),
            source: "built-in".into(),
            image_token: "<image>".into(),
            ..Default::default()
        };
        let first = cache.compiled(Some(&a)).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.compiled(Some(&a)).unwrap()));
        let b = vlm_proto::ChatTemplate {
            image_token: "<img>".into(),
            ..a.clone()
        };
        let other = cache.compiled(Some(&b)).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.image_token, "<img>");
        let broken = vlm_proto::ChatTemplate {
            template: "{% for %}".into(),
            ..a
        };
        assert_eq!(
            cache.compiled(Some(&broken)).unwrap_err().code(),
            tonic::Code::Internal
        );
    }
}
