//! The checkpoint's chat template and the special tokens it may refer to, as the decoder reports
//! them (`DecoderInfo.chat_template`) to the gateway, which renders it (the gateway reads no
//! checkpoint).
//!
//! The template is the first found of: `chat_template.jinja`, `chat_template.json`
//! (`{"chat_template": …}`, what llava-hf processors ship), `tokenizer_config.json`'s
//! `chat_template` (a string, or a list of named templates: `default` is used). Without one,
//! [`LLAVA_1_5_TEMPLATE`] is used: llava-hf's LLaVA-1.5 template, which gives
//! `USER: <image>\n<text> ASSISTANT:` for one user turn with an image.

use std::path::Path;

use serde_json::Value;

use crate::config::read_json;
use crate::error::Result;

/// llava-hf/llava-1.5-7b-hf's chat template (its `{% generation %}` markers removed): per message
/// `ROLE: `, then its images, then its texts each followed by a space; `ASSISTANT:` at the end.
pub const LLAVA_1_5_TEMPLATE: &str = include_str!("llava_1_5_chat_template.jinja");

/// What a chat template needs from the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplateSource {
    /// The Jinja text, as transformers would compile it.
    pub template: String,
    /// Where it came from (a file, or the built-in fallback), for logs and errors.
    pub source: String,
    /// The model's image placeholder: `tokenizer_config.json`'s `image_token`, else the added
    /// token whose id is `config.json`'s `image_token_id` (`image_token_index`), else `<image>`.
    pub image_token: String,
    /// `tokenizer_config.json`'s `bos_token` (empty when it has none).
    pub bos_token: String,
    /// `tokenizer_config.json`'s `eos_token` (empty when it has none).
    pub eos_token: String,
}

/// `path`'s JSON, or `None` when there is no such file.
fn optional_json(path: &Path) -> Result<Option<Value>> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A `chat_template` value: a string, or transformers' list of `{name, template}`.
fn template_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .or_else(|| list.first())
            .and_then(|t| t["template"].as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token in tokenizer_config.json: a string or an AddedToken object.
fn token_value(v: &Value) -> Option<String> {
    v.as_str()
        .map(str::to_string)
        .or_else(|| v["content"].as_str().map(str::to_string))
}

/// The added token whose id is config.json's `image_token_id` (`image_token_index`), for
/// checkpoints whose tokenizer_config.json does not name it (GLM-4.1V's `<|image|>`).
fn image_token_of_config(dir: &Path) -> Result<Option<String>> {
    let Some(cfg) = optional_json(&dir.join("config.json"))? else {
        return Ok(None);
    };
    let Some(id) = cfg["image_token_id"]
        .as_u64()
        .or_else(|| cfg["image_token_index"].as_u64())
    else {
        return Ok(None);
    };
    let Some(tok) = optional_json(&dir.join("tokenizer.json"))? else {
        return Ok(None);
    };
    Ok(tok["added_tokens"].as_array().and_then(|added| {
        added
            .iter()
            .find(|t| t["id"].as_u64() == Some(id))
            .and_then(|t| t["content"].as_str().map(str::to_string))
    }))
}

/// The keys of `tokenizer_config.json` that are read (see [`ChatTemplateSource::from_dir`]).
#[derive(serde::Deserialize)]
#[allow(dead_code)] // only its field names are used
struct RawTokenizerConfig {
    chat_template: Option<Value>,
    image_token: Option<Value>,
    bos_token: Option<Value>,
    eos_token: Option<Value>,
}

pub(crate) fn tokenizer_config_keys() -> &'static [&'static str] {
    crate::config::keys::keys_of::<RawTokenizerConfig>()
}

impl ChatTemplateSource {
    /// The checkpoint's template, or the LLaVA-1.5 fallback.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_cfg = optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let jinja = dir.join("chat_template.jinja");
        let json = dir.join("chat_template.json");
        let (template, source) = if jinja.exists() {
            let t = std::fs::read_to_string(&jinja)
                .map_err(|e| crate::ModelError::checkpoint(&jinja, format!("cannot read: {e}")))?;
            (t, jinja.display().to_string())
        } else if let Some(t) =
            optional_json(&json)?.and_then(|v| template_value(&v["chat_template"]))
        {
            (t, json.display().to_string())
        } else if let Some(t) = template_value(&tok_cfg["chat_template"]) {
            let file = dir.join("tokenizer_config.json");
            (t, format!("{} (chat_template)", file.display()))
        } else {
            (
                LLAVA_1_5_TEMPLATE.to_string(),
                "built-in LLaVA-1.5 template".to_string(),
            )
        };
        let image_token = match token_value(&tok_cfg["image_token"]) {
            Some(t) => t,
            None => image_token_of_config(dir)?.unwrap_or_else(|| "<image>".into()),
        };
        Ok(ChatTemplateSource {
            template,
            source,
            image_token,
            bos_token: token_value(&tok_cfg["bos_token"]).unwrap_or_default(),
            eos_token: token_value(&tok_cfg["eos_token"]).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_found_in_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let found = || ChatTemplateSource::from_dir(dir.path()).unwrap();
        // No template anywhere: the fallback.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"image_token": "<im>", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#,
        )
        .unwrap();
        let t = found();
        assert_eq!(t.source, "built-in LLaVA-1.5 template");
        assert_eq!(t.template, LLAVA_1_5_TEMPLATE);
        assert_eq!(
            (
                t.image_token.as_str(),
                t.bos_token.as_str(),
                t.eos_token.as_str()
            ),
            ("<im>", "<s>", "</s>")
        );
        // tokenizer_config.json's list form picks `default`.
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        let t = found();
        assert_eq!(t.template, "D");
        assert!(t.source.ends_with("tokenizer_config.json (chat_template)"));
        assert_eq!(t.image_token, "<image>");
        assert_eq!(t.bos_token, "");
        // chat_template.json wins over tokenizer_config.json, chat_template.jinja over both.
        std::fs::write(
            dir.path().join("chat_template.json"),
            r#"{"chat_template": "J"}"#,
        )
        .unwrap();
        assert_eq!(found().template, "J");
        std::fs::write(dir.path().join("chat_template.jinja"), "K").unwrap();
        assert_eq!(found().template, "K");
        assert!(found().source.ends_with("chat_template.jinja"));
        // A file that is not JSON is an error naming it.
        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        let e = ChatTemplateSource::from_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer_config.json"), "{e}");
    }

    /// GLM-4.1V's tokenizer_config.json names no image token: it is the added token whose id is
    /// config.json's image_token_id.
    #[test]
    fn glm4v_image_token_comes_from_the_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-glm4v");
        let t = ChatTemplateSource::from_dir(&dir).unwrap();
        assert_eq!(t.image_token, "<|image|>");
        assert!(t.template.starts_with("[gMASK]<sop>"), "{}", t.template);
        assert!(t.source.ends_with("chat_template.jinja"));
    }
}
