//! Turns chat messages into the model's prompt, as transformers' `apply_chat_template` does.
//!
//! The template and its special tokens come from the decoder (`DecoderInfo.chat_template`, read
//! from the checkpoint there: the gateway reads no checkpoint); the endpoint compiles it once per
//! template it is given.
//!
//! Messages are passed in the Hugging Face multimodal shape: `content` is a list of
//! `{"type": "text", "text": …}` and `{"type": "image"}` parts, and the template writes the
//! model's image placeholder where each image goes.

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::Serialize;

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
