//! A chat request → what [`Gateway::generate`](vlm_proto::gateway_server::Gateway::generate)
//! needs: the messages for the chat template (every `image_url` part becomes one image, in message
//! order), the images (base64 data URLs decoded here; `http(s)://` URLs fetched by
//! [`crate::fetch`] when allowed) and the sampling parameters with OpenAI's defaults.

use axum::http::StatusCode;
use base64::Engine;
use bytes::Bytes;

use super::error::ApiError;
use super::formats;
use super::tools::Tools;
use super::types::{ChatCompletionRequest, Content, ImageUrl, Message, Obj, Part};
use crate::chat_template::{TemplateMessage, TemplatePart};

/// Where an image comes from, before it is decoded or fetched.
#[derive(Debug, PartialEq)]
pub(super) enum ImageSource {
    Inline(Vec<u8>),
    Url(String),
}

/// A chat request, checked and turned into what the gateway needs.
#[derive(Debug)]
pub(super) struct ChatRequest {
    pub messages: Vec<TemplateMessage>,
    /// (JSON path of the part, source), in message order.
    pub images: Vec<(String, ImageSource)>,
    /// Each image's regions of interest (the `image_url.regions` extension), in the same order.
    pub regions: Vec<Vec<vlm_proto::Region>>,
    pub params: vlm_proto::SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    /// `prompt_cache_key`, else `user`: the decoder routing's affinity key.
    pub session: Option<String>,
    /// The request's tools, when it declares any.
    pub tools: Option<Tools>,
    /// The request field the output format came from (named in format errors).
    pub format_field: Option<&'static str>,
}

impl ChatRequest {
    /// Checks the request against what this server serves and supports (the JSON types were
    /// checked when it was read).
    pub(super) fn check(
        req: ChatCompletionRequest,
        names: &[&str],
        image_token: &str,
        strict: bool,
    ) -> Result<Self, ApiError> {
        check_model(req.model.as_deref(), names)?;
        super::fields::check(&req, strict)?;
        if let Some(n) = req.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(
                "n",
                format!("n = {n} is not supported: this server returns exactly one choice (n = 1)"),
            ));
        }
        let tools = Tools::check(req.tools, req.tool_choice, req.parallel_tool_calls)?;
        let format = formats::output_format(
            req.response_format.map(|o| o.0),
            req.structured_outputs.map(|o| o.0),
            formats::Guided {
                json: req.guided_json,
                regex: req.guided_regex,
                grammar: req.guided_grammar,
                choice: req.guided_choice,
            },
            tools.as_ref(),
        )?;
        let logit_bias = formats::logit_bias(req.logit_bias)?;
        let Some(raw) = req.messages else {
            return Err(ApiError::invalid(
                "messages",
                "messages is required (an array)",
            ));
        };
        if raw.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(raw.len());
        let mut images = Images::default();
        for (i, Obj(m)) in raw.into_iter().enumerate() {
            messages.push(message(
                &format!("messages[{i}]"),
                m,
                image_token,
                &mut images,
            )?);
        }
        let Images {
            list: images,
            regions,
        } = images;
        let params = vlm_proto::SamplingParams {
            max_tokens: req.max_completion_tokens.or(req.max_tokens),
            // OpenAI's defaults: temperature 1, top_p 1.
            temperature: req.temperature.unwrap_or(1.0),
            top_p: req.top_p.unwrap_or(1.0),
            top_k: req.top_k.unwrap_or(0),
            seed: req.seed,
            stop: req.stop.map(|s| s.0).unwrap_or_default(),
            // OpenAI's default 0; the decoder checks the range.
            frequency_penalty: req.frequency_penalty.unwrap_or(0.0),
            presence_penalty: req.presence_penalty.unwrap_or(0.0),
            logit_bias,
            format: format.as_ref().map(|(f, _)| f.clone()),
        };
        Ok(ChatRequest {
            messages,
            images,
            regions,
            params,
            session: req.prompt_cache_key.or(req.user).filter(|s| !s.is_empty()),
            tools,
            format_field: format.map(|(_, field)| field),
            stream: req.stream.unwrap_or(false),
            include_usage: req
                .stream_options
                .and_then(|o| o.0.include_usage)
                .unwrap_or(false),
        })
    }
}

/// `model` must be one of the served names (`names[0]` is the one responses use).
fn check_model(model: Option<&str>, names: &[&str]) -> Result<(), ApiError> {
    let model_id = names.join("`, `");
    match model {
        Some(m) if names.contains(&m) => Ok(()),
        Some(m) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{m}` does not exist; this server serves `{model_id}` (see GET /v1/models)"),
        )
        .param("model")
        .code("model_not_found")),
        None => Err(ApiError::invalid(
            "model",
            format!("model is required (a string); this server serves `{model_id}`"),
        )),
    }
}

fn required<T>(value: Option<T>, path: &str) -> Result<T, ApiError> {
    value.ok_or_else(|| ApiError::invalid(path, format!("{path} is required")))
}

/// A request's images as its parts name them, with their regions.
#[derive(Default)]
struct Images {
    list: Vec<(String, ImageSource)>,
    regions: Vec<Vec<vlm_proto::Region>>,
}

/// One message (at JSON path `path`); its images are appended to `images`.
fn message(
    path: &str,
    m: Message,
    image_token: &str,
    images: &mut Images,
) -> Result<TemplateMessage, ApiError> {
    let role = match required(m.role, &format!("{path}.role"))?.as_str() {
        r @ ("system" | "user" | "assistant" | "tool") => r.to_string(),
        // OpenAI's newer name for system instructions.
        "developer" => "system".to_string(),
        other => {
            return Err(ApiError::invalid(
                format!("{path}.role"),
                format!(
                "{path}.role {other:?} is not supported (system, developer, user, assistant, tool)"
            ),
            ))
        }
    };
    let content = match m.content {
        None => vec![],
        Some(Content::Text(text)) => vec![TemplatePart::Text { text }],
        Some(Content::Parts(parts)) => parts
            .into_iter()
            .enumerate()
            .map(|(j, p)| part(&format!("{path}.content[{j}]"), p, images))
            .collect::<Result<_, _>>()?,
    };
    // The placeholder is the template's to write; in user text it would claim an image that is
    // not there (or shift every image after it).
    let mentions = content
        .iter()
        .any(|c| matches!(c, TemplatePart::Text { text } if text.contains(image_token)));
    if mentions {
        let message = if content.contains(&TemplatePart::Image) {
            format!("{path}: text must not contain the image placeholder {image_token}; each image_url part is placed by the chat template")
        } else {
            format!("{path} refers to an image ({image_token}) but has no image_url part; attach the image as {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;base64,…\"}}}}")
        };
        return Err(ApiError::invalid(format!("{path}.content"), message));
    }
    let tool_call_id = match (role.as_str(), m.tool_call_id) {
        ("tool", None) => {
            return Err(ApiError::invalid(
                format!("{path}.tool_call_id"),
                format!("{path}.tool_call_id is required in a tool message"),
            ))
        }
        (_, id) => id,
    };
    let tool_calls = match m.tool_calls {
        Some(calls) if role == "assistant" => Some(
            calls
                .into_iter()
                .enumerate()
                .map(|(j, Obj(c))| history_call(&format!("{path}.tool_calls[{j}]"), c))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => {
            return Err(ApiError::invalid(
                format!("{path}.tool_calls"),
                format!("{path}.tool_calls belongs in an assistant message"),
            ))
        }
        None => None,
    };
    Ok(TemplateMessage {
        role,
        content,
        tool_calls,
        tool_call_id,
    })
}

/// A call in the history, in the shape Hugging Face templates take: its arguments as a JSON
/// object (OpenAI sends them as JSON text).
fn history_call(path: &str, c: super::types::ToolCallIn) -> Result<serde_json::Value, ApiError> {
    let Some(Obj(f)) = c.function else {
        return Err(ApiError::invalid(
            format!("{path}.function"),
            format!("{path}.function is required"),
        ));
    };
    let name = required(f.name, &format!("{path}.function.name"))?;
    let args = f.arguments.unwrap_or_else(|| "{}".into());
    let arguments: serde_json::Value = serde_json::from_str(&args).map_err(|e| {
        ApiError::invalid(
            format!("{path}.function.arguments"),
            format!("{path}.function.arguments is not JSON: {e}"),
        )
    })?;
    Ok(serde_json::json!({
        "id": c.id,
        "type": c.kind.unwrap_or_else(|| "function".into()),
        "function": {"name": name, "arguments": arguments},
    }))
}

/// One content part (at JSON path `path`).
fn part(path: &str, p: Part, images: &mut Images) -> Result<TemplatePart, ApiError> {
    match required(p.kind, &format!("{path}.type"))?.as_str() {
        "text" => Ok(TemplatePart::Text {
            text: required(p.text, &format!("{path}.text"))?,
        }),
        "image_url" => {
            let (url, regions) = match p.image_url {
                Some(ImageUrl::Bare(u)) => (u, vec![]),
                Some(ImageUrl::Object(o)) => (
                    required(o.url, &format!("{path}.image_url.url"))?,
                    o.regions.unwrap_or_default(),
                ),
                None => return Err(ApiError::invalid(
                    format!("{path}.image_url"),
                    format!("{path}.image_url is required: an image_url part needs an image ({{\"url\": \"data:image/png;base64,…\"}})"),
                )),
            };
            let upath = format!("{path}.image_url.url");
            let source = image_source(&upath, url)?;
            images.list.push((upath, source));
            images.regions.push(
                regions
                    .into_iter()
                    .map(|[x0, y0, x1, y1]| vlm_proto::Region { x0, y0, x1, y1 })
                    .collect(),
            );
            Ok(TemplatePart::Image)
        }
        other => Err(ApiError::invalid(
            format!("{path}.type"),
            format!("{path}.type {other:?} is not supported (text, image_url)"),
        )),
    }
}

fn image_source(path: &str, url: String) -> Result<ImageSource, ApiError> {
    if url.starts_with("data:") {
        Ok(ImageSource::Inline(decode_data_url(&url, path)?))
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Ok(ImageSource::Url(url))
    } else if url.is_empty() {
        Err(ApiError::invalid(
            path,
            format!("{path} is empty: an image_url part needs an image"),
        ))
    } else {
        Err(ApiError::invalid(
            path,
            format!("{path}: expected a data:image/…;base64 URL"),
        ))
    }
}

/// `data:image/png;base64,…` → bytes. Only images the encoder decodes are accepted.
fn decode_data_url(url: &str, path: &str) -> Result<Vec<u8>, ApiError> {
    let rest = &url["data:".len()..];
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            path,
            format!("{path}: malformed data URL (no ',' after the media type)"),
        ));
    };
    let mut meta_parts = meta.split(';');
    let mime = meta_parts.next().unwrap_or("").to_ascii_lowercase();
    if !meta_parts.any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid(
            path,
            format!("{path}: only base64 data URLs are supported (data:{mime};base64,…)"),
        ));
    }
    if !matches!(
        mime.as_str(),
        "image/png" | "image/jpeg" | "image/jpg" | "image/webp"
    ) {
        return Err(ApiError::invalid(
            path,
            format!(
                "{path}: unsupported media type {mime:?}; send image/png, image/jpeg or image/webp"
            ),
        ));
    }
    let cleaned: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&cleaned)
        .map_err(|e| {
            ApiError::invalid(
                path,
                format!("{path}: malformed base64 in the data URL: {e}"),
            )
        })?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            path,
            format!("{path}: the data URL holds no image (0 bytes)"),
        ));
    }
    Ok(bytes)
}

/// How image URLs may be fetched.
#[derive(Debug, Clone, Copy)]
pub(super) struct FetchPolicy {
    /// Fetch `http(s)://` URLs at all (else refused).
    pub allow_urls: bool,
    /// Let URLs reach loopback, private and link-local addresses.
    pub allow_internal: bool,
    /// Largest image, in bytes.
    pub max_image_bytes: usize,
    /// Most images per request (counted before anything is fetched).
    pub max_images: usize,
    /// Largest total of all images, inline and fetched, in bytes.
    pub max_total_bytes: usize,
}

/// The images' bytes, in order: inline ones as they are, URLs fetched when the policy allows
/// (each at most `max_image_bytes`, all together at most `max_total_bytes`), else refused. The
/// images are counted before any URL is fetched.
pub(super) async fn load_images(
    images: Vec<(String, ImageSource)>,
    policy: FetchPolicy,
) -> Result<Vec<Bytes>, ApiError> {
    if images.len() > policy.max_images {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "{} images in one request; at most {} are accepted",
                images.len(),
                policy.max_images
            ),
        ));
    }
    let mut out = Vec::with_capacity(images.len());
    let mut total = 0usize;
    for (path, source) in images {
        let budget = policy
            .max_image_bytes
            .min(policy.max_total_bytes.saturating_sub(total));
        let bytes = match source {
            ImageSource::Inline(b) => Bytes::from(b),
            ImageSource::Url(url) if !policy.allow_urls => {
                let scheme = url.split(':').next().unwrap_or("http");
                return Err(ApiError::invalid(
                    path.clone(),
                    format!("{path}: image URLs ({scheme}) are not fetched by this server; send the image inline as data:image/png;base64,… (or start the gateway with --allow-image-urls)"),
                )
                .code("image_url_not_allowed"));
            }
            ImageSource::Url(url) => crate::fetch::fetch_image(&url, budget, policy.allow_internal)
                .await
                .map_err(|e| ApiError::invalid(path.clone(), format!("{path}: {e}")))?,
        };
        total += bytes.len();
        if total > policy.max_total_bytes {
            return Err(ApiError::invalid(
                path,
                format!(
                    "the request's images exceed {} bytes in total",
                    policy.max_total_bytes
                ),
            ));
        }
        out.push(bytes);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
