//! Prompts in the model's chat format: `--question` (plain text) rendered with the checkpoint's
//! chat template, and the warning for a raw `--prompt` / `--ask` that lacks the template's turn
//! markers (a model asked outside its chat format answers nonsense, or nothing, without error).
//!
//! The gateway renders `question` with the template the decoder reports; `generate` renders it
//! here with the same renderer ([`vlm_gateway::chat_template`]) from the same checkpoint files
//! ([`vlm_model::ChatTemplateSource`]), so both give the same prompt.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tonic::transport::Channel;
use vlm_gateway::chat_template::ChatTemplate;
use vlm_proto::gateway_client::GatewayClient;

/// How long `ask` and `watch` wait for the model's chat template before sending a raw prompt
/// unchecked.
const TEMPLATE_TIMEOUT: Duration = Duration::from_secs(10);

/// The checkpoint's chat template (or the LLaVA-1.5 fallback), compiled as the gateway compiles
/// the one the decoder reports.
pub fn local_template(model: &Path) -> anyhow::Result<ChatTemplate> {
    let s = vlm_model::ChatTemplateSource::from_dir(model)
        .with_context(|| format!("cannot read the chat template of {}", model.display()))?;
    ChatTemplate::new(
        &s.template,
        s.source,
        s.image_token,
        s.bos_token,
        s.eos_token,
    )
}

/// `question` about `images` images as the model's prompt (what the gateway makes of a
/// `question`).
pub fn render_question(
    template: &ChatTemplate,
    images: usize,
    question: &str,
) -> anyhow::Result<String> {
    template
        .render_question(images, question)
        .map_err(|e| anyhow::anyhow!("the model's chat template refused the question: {e}"))
}

/// The warning for a raw `prompt` that lacks `template`'s turn markers, if it does.
pub fn warning(template: &ChatTemplate, prompt: &str) -> Option<String> {
    let lacking = template.turn_markers()?.lacking(prompt)?;
    Some(format!(
        "warning: {lacking}; the model may answer nonsense. Use --question for plain text."
    ))
}

/// Prints [`warning`] on stderr, if any.
pub fn warn_raw_prompt(template: &ChatTemplate, prompt: &str) {
    if let Some(w) = warning(template, prompt) {
        eprintln!("{w}");
    }
}

/// Checks a raw `prompt` against the chat template the gateway's model reports
/// (`GetModelInfo`), warning on stderr when it lacks the turn markers. Never fails: when the
/// template cannot be had, it returns the warning that the check was skipped, for the caller to
/// print once its own call has been accepted (if the gateway cannot be reached at all, the
/// call's error says so alone).
#[must_use]
pub async fn check_raw_prompt(client: &mut GatewayClient<Channel>, prompt: &str) -> Option<String> {
    let mut req = tonic::Request::new(vlm_proto::GetModelInfoRequest {});
    req.set_timeout(TEMPLATE_TIMEOUT);
    let template = match tokio::time::timeout(TEMPLATE_TIMEOUT, client.get_model_info(req)).await {
        Ok(Ok(info)) => match info.into_inner().chat_template {
            Some(t) => ChatTemplate::from_proto(&t).map_err(|e| format!("{e:#}")),
            None => Err("the gateway reported no chat template".to_string()),
        },
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err(format!("no answer within {TEMPLATE_TIMEOUT:?}")),
    };
    match template {
        Ok(t) => {
            warn_raw_prompt(&t, prompt);
            None
        }
        Err(e) => Some(format!(
            "warning: the raw prompt was not checked against the model's chat template \
             (GetModelInfo: {e}); it was sent as it is"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    #[test]
    fn the_demo_question_on_the_demo_model_is_the_llava_prompt() {
        let t = local_template(&models().join("shapes-llava")).unwrap();
        assert_eq!(
            render_question(&t, 1, "Describe the image.").unwrap(),
            "USER: <image>\nDescribe the image. ASSISTANT:"
        );
        assert_eq!(
            warning(&t, "USER: <image>\nDescribe the image. ASSISTANT:"),
            None
        );
        assert_eq!(
            warning(&t, "<image> Describe the image.").unwrap(),
            "warning: the prompt has no \"USER:\" and no \"ASSISTANT:\" (the model's chat \
             template marks its turns with \"USER:\" … \"ASSISTANT:\"); the model may answer \
             nonsense. Use --question for plain text."
        );
    }

    #[test]
    fn glm4v_questions_use_its_own_template() {
        let t = local_template(&models().join("tiny-glm4v")).unwrap();
        assert_eq!(
            render_question(&t, 2, "Same?").unwrap(),
            "[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>\
             <|begin_of_image|><|image|><|end_of_image|>Same?<|assistant|>\n"
        );
        let w = warning(&t, "USER: <image>\nDescribe the image. ASSISTANT:").unwrap();
        assert!(w.contains("\"<|user|>\" and no \"<|assistant|>\""), "{w}");
    }
}
