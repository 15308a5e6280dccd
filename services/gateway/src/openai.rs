//! The OpenAI-compatible HTTP endpoint: `POST /v1/chat/completions` and `GET /v1/models` over
//! HTTP/1.1 + JSON on its own port, for the clients that speak OpenAI's API (the `openai` SDKs,
//! agents that send screenshots as base64 `image_url` parts).
//!
//! A chat request becomes a `GenerateRequest`: the messages go through the model's chat template
//! (see [`crate::chat_template`]), every `image_url` part becomes one image in message order, and
//! the request runs through the very same [`Gateway::generate`] as a gRPC call (same cache, limits,
//! deadlines and trace). Errors use OpenAI's shape, `{"error": {"message", "type", "param",
//! "code"}}`, with the HTTP status that matches the gRPC code.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Code, Status};
use vlm_net::HttpTlsAcceptor;
use vlm_proto::gateway_server::Gateway;
use vlm_proto::generate_response::Kind as ResponseKind;
use vlm_proto::{FinishReason, GenerateRequest};

use crate::chat_template::{ChatTemplate, TemplateMessage, TemplatePart};
use crate::GatewayService;

type Body = BoxBody<Bytes, Infallible>;
type ChatStream = <GatewayService as Gateway>::GenerateStream;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request body (up to 64 MiB of base64 images).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// Checkpoint directory: the chat template and special tokens are read from it.
    pub model_dir: PathBuf,
    /// Fetch `http(s)://` image URLs (off: they are refused with 400).
    pub allow_image_urls: bool,
    /// Largest request body accepted, in bytes (base64 images included).
    pub max_body_bytes: usize,
    /// Largest image accepted, in bytes (also bounds fetched URLs).
    pub max_image_bytes: usize,
}

/// The endpoint, sharing its [`GatewayService`] with the gRPC server.
pub struct OpenAiEndpoint {
    gateway: Arc<GatewayService>,
    template: ChatTemplate,
    model_id: String,
    created: u64,
    cfg: OpenAiConfig,
}

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        );
        e.param = Some(param.into());
        e
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }

    fn response(&self) -> Response<Body> {
        json_response(self.status, &self.body())
    }

    /// The HTTP view of a gateway status: the same classes of failure as on the gRPC port.
    fn from_status(s: &Status) -> Self {
        let (status, kind, code) = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_argument",
            ),
            Code::ResourceExhausted => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "resource_exhausted",
            ),
            Code::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "unavailable",
            ),
            Code::DeadlineExceeded => (
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "deadline_exceeded",
            ),
            Code::Cancelled => (
                StatusCode::from_u16(499).expect("499 is a valid status"),
                "server_error",
                "cancelled",
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal",
            ),
        };
        ApiError::new(status, kind, s.message()).code(code)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where an image comes from, before it is decoded or fetched.
#[derive(Debug, PartialEq)]
enum ImageSource {
    Inline(Vec<u8>),
    Url(String),
}

/// A chat request, checked and turned into what the gateway needs.
#[derive(Debug)]
struct ChatRequest {
    messages: Vec<TemplateMessage>,
    /// (JSON path of the part, source), in message order.
    images: Vec<(String, ImageSource)>,
    params: vlm_proto::SamplingParams,
    stream: bool,
    include_usage: bool,
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str, path: &str) -> Result<&'a str, ApiError> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::invalid(
            format!("{path}.{key}"),
            format!("{path}.{key} must be a string"),
        )),
        None => Err(ApiError::invalid(
            format!("{path}.{key}"),
            format!("{path}.{key} is required"),
        )),
    }
}

/// An optional field, absent or null → None.
fn opt<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_f32(obj: &Map<String, Value>, key: &str) -> Result<Option<f32>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|f| Some(f as f32))
            .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a number"))),
    }
}

fn opt_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(key, format!("{key} must be a non-negative integer"))),
    }
}

fn opt_u32(obj: &Map<String, Value>, key: &str) -> Result<Option<u32>, ApiError> {
    match opt_u64(obj, key)? {
        None => Ok(None),
        Some(n) => u32::try_from(n)
            .map(Some)
            .map_err(|_| ApiError::invalid(key, format!("{key} is too large"))),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ApiError> {
    match opt(obj, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be a boolean"))),
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

impl ChatRequest {
    /// Checks the request against OpenAI's schema and what this server supports.
    fn parse(body: &Value, model_id: &str, image_token: &str) -> Result<Self, ApiError> {
        let Some(obj) = body.as_object() else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the request body must be a JSON object",
            ));
        };
        match obj.get("model") {
            Some(Value::String(m)) if m == model_id => {}
            Some(Value::String(m)) => {
                let mut e = ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("The model `{m}` does not exist; this server serves `{model_id}` (see GET /v1/models)"),
                )
                .code("model_not_found");
                e.param = Some("model".into());
                return Err(e);
            }
            _ => {
                return Err(ApiError::invalid(
                    "model",
                    format!("model is required (a string); this server serves `{model_id}`"),
                ))
            }
        }
        if let Some(n) = opt_u64(obj, "n")? {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!(
                        "n = {n} is not supported: this server returns exactly one choice (n = 1)"
                    ),
                ));
            }
        }
        if opt_bool(obj, "logprobs")? == Some(true) {
            return Err(ApiError::invalid(
                "logprobs",
                "logprobs are not supported by this server",
            ));
        }
        if opt(obj, "tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(ApiError::invalid(
                "tools",
                "tools are not supported by this server",
            ));
        }

        let Some(Value::Array(raw_messages)) = obj.get("messages") else {
            return Err(ApiError::invalid(
                "messages",
                "messages is required (an array)",
            ));
        };
        if raw_messages.is_empty() {
            return Err(ApiError::invalid("messages", "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(raw_messages.len());
        let mut images = Vec::new();
        for (i, m) in raw_messages.iter().enumerate() {
            let path = format!("messages[{i}]");
            let Some(m) = m.as_object() else {
                return Err(ApiError::invalid(
                    &path,
                    format!("{path} must be an object"),
                ));
            };
            let role = match get_str(m, "role", &path)? {
                r @ ("system" | "user" | "assistant") => r.to_string(),
                // OpenAI's newer name for system instructions.
                "developer" => "system".to_string(),
                other => {
                    return Err(ApiError::invalid(
                        format!("{path}.role"),
                        format!("{path}.role {other:?} is not supported (system, developer, user, assistant)"),
                    ))
                }
            };
            let mut content = Vec::new();
            match opt(m, "content") {
                None => {}
                Some(Value::String(s)) => content.push(TemplatePart::Text { text: s.clone() }),
                Some(Value::Array(parts)) => {
                    for (j, p) in parts.iter().enumerate() {
                        let ppath = format!("{path}.content[{j}]");
                        let Some(p) = p.as_object() else {
                            return Err(ApiError::invalid(
                                &ppath,
                                format!("{ppath} must be an object"),
                            ));
                        };
                        match get_str(p, "type", &ppath)? {
                            "text" => content.push(TemplatePart::Text {
                                text: get_str(p, "text", &ppath)?.to_string(),
                            }),
                            "image_url" => {
                                let url = match p.get("image_url") {
                                    Some(Value::String(u)) => u.as_str(),
                                    Some(Value::Object(o)) => {
                                        get_str(o, "url", &format!("{ppath}.image_url"))?
                                    }
                                    _ => {
                                        return Err(ApiError::invalid(
                                            format!("{ppath}.image_url"),
                                            format!("{ppath}.image_url is required: an image_url part needs an image ({{\"url\": \"data:image/png;base64,…\"}})"),
                                        ))
                                    }
                                };
                                let upath = format!("{ppath}.image_url.url");
                                let source = if url.starts_with("data:") {
                                    ImageSource::Inline(decode_data_url(url, &upath)?)
                                } else if url.starts_with("http://") || url.starts_with("https://")
                                {
                                    ImageSource::Url(url.to_string())
                                } else if url.is_empty() {
                                    return Err(ApiError::invalid(
                                        &upath,
                                        format!(
                                            "{upath} is empty: an image_url part needs an image"
                                        ),
                                    ));
                                } else {
                                    return Err(ApiError::invalid(
                                        &upath,
                                        format!("{upath}: expected a data:image/…;base64 URL"),
                                    ));
                                };
                                images.push((upath, source));
                                content.push(TemplatePart::Image);
                            }
                            other => {
                                return Err(ApiError::invalid(
                                    format!("{ppath}.type"),
                                    format!(
                                        "{ppath}.type {other:?} is not supported (text, image_url)"
                                    ),
                                ))
                            }
                        }
                    }
                }
                Some(_) => {
                    return Err(ApiError::invalid(
                        format!("{path}.content"),
                        format!("{path}.content must be a string or an array of parts"),
                    ))
                }
            }
            // The placeholder is the template's to write; in user text it would claim an image
            // that is not there (or shift every image after it).
            let mentions = content
                .iter()
                .any(|c| matches!(c, TemplatePart::Text { text } if text.contains(image_token)));
            if mentions {
                let has_image = content.contains(&TemplatePart::Image);
                return Err(ApiError::invalid(
                    format!("{path}.content"),
                    if has_image {
                        format!("{path}: text must not contain the image placeholder {image_token}; each image_url part is placed by the chat template")
                    } else {
                        format!("{path} refers to an image ({image_token}) but has no image_url part; attach the image as {{\"type\": \"image_url\", \"image_url\": {{\"url\": \"data:image/png;base64,…\"}}}}")
                    },
                ));
            }
            messages.push(TemplateMessage { role, content });
        }

        let max_tokens = match opt_u32(obj, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => opt_u32(obj, "max_tokens")?,
        };
        let stop = match opt(obj, "stop") {
            None => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::invalid("stop", "stop must be a string or an array of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ApiError::invalid(
                    "stop",
                    "stop must be a string or an array of strings",
                ))
            }
        };
        let params = vlm_proto::SamplingParams {
            max_tokens,
            // OpenAI's defaults: temperature 1, top_p 1.
            temperature: opt_f32(obj, "temperature")?.unwrap_or(1.0),
            top_p: opt_f32(obj, "top_p")?.unwrap_or(1.0),
            // Not in OpenAI's API; accepted as vLLM and others do.
            top_k: opt_u32(obj, "top_k")?.unwrap_or(0),
            seed: opt_u64(obj, "seed")?,
            stop,
        };
        let stream = opt_bool(obj, "stream")?.unwrap_or(false);
        let include_usage = match opt(obj, "stream_options") {
            None => false,
            Some(Value::Object(o)) => opt_bool(o, "include_usage")
                .map_err(|_| {
                    ApiError::invalid(
                        "stream_options.include_usage",
                        "stream_options.include_usage must be a boolean",
                    )
                })?
                .unwrap_or(false),
            Some(_) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "stream_options must be an object",
                ))
            }
        };
        Ok(ChatRequest {
            messages,
            images,
            params,
            stream,
            include_usage,
        })
    }
}

/// OpenAI's `usage` object, with the prefix-cache hits as `prompt_tokens_details.cached_tokens`.
fn openai_usage(u: &vlm_proto::Usage) -> serde_json::Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

fn openai_finish_reason(r: i32) -> &'static str {
    match FinishReason::try_from(r).unwrap_or(FinishReason::Unspecified) {
        FinishReason::Length | FinishReason::ContextLength => "length",
        _ => "stop",
    }
}

/// An SSE event carrying `value`.
fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

impl OpenAiEndpoint {
    pub async fn new(gateway: Arc<GatewayService>, cfg: OpenAiConfig) -> anyhow::Result<Self> {
        let template = ChatTemplate::from_model_dir(&cfg.model_dir)?;
        tracing::info!(source = %template.source, "chat template");
        // The served name is the gateway's own: the endpoint starts before (or without) the
        // stages being up.
        let model_id = gateway.model_id().to_string();
        Ok(OpenAiEndpoint {
            gateway,
            template,
            model_id,
            created: unix_now(),
            cfg,
        })
    }

    /// The id clients pass as `model`.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Serves HTTP/1.1 on `listener` (TLS when `tls` is set) until `shutdown` completes.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<HttpTlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, tls = tls.is_some(), model = %self.model_id, "serving the OpenAI-compatible endpoint");
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept on {addr} failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                let result = match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => http.serve_connection(TokioIo::new(stream), svc).await,
                        Err(e) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                    },
                    None => http.serve_connection(TokioIo::new(tcp), svc).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, "HTTP connection ended: {e}");
                }
            });
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::POST, "/v1/chat/completions") => match self.chat(req).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(status = %e.status, "chat completion refused: {}", e.message);
                    e.response()
                }
            },
            (Method::GET, "/v1/models") => json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": [self.model_object()]}),
            ),
            (Method::GET, p) if p.starts_with("/v1/models/") => {
                let id = &p["/v1/models/".len()..];
                if id == self.model_id {
                    json_response(StatusCode::OK, &self.model_object())
                } else {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        format!("The model `{id}` does not exist; this server serves `{}`", self.model_id),
                    )
                    .code("model_not_found")
                    .response()
                }
            }
            (_, "/v1/chat/completions" | "/v1/models") => ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                format!("{method} is not allowed on {path}"),
            )
            .response(),
            _ => ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Invalid URL ({method} {path}); this server has POST /v1/chat/completions and GET /v1/models"),
            )
            .code("unknown_url")
            .response(),
        }
    }

    fn model_object(&self) -> Value {
        json!({"id": self.model_id, "object": "model", "created": self.created, "owned_by": "vlm-mesh"})
    }

    async fn chat(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let limit = self.cfg.max_body_bytes;
        let body = tokio::time::timeout(
            BODY_READ_TIMEOUT,
            Limited::new(req.into_body(), limit).collect(),
        )
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {BODY_READ_TIMEOUT:?}"),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("the request body exceeds the limit of {limit} bytes"),
                )
                .code("request_too_large")
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("cannot read the request body: {e}"),
                )
            }
        })?
        .to_bytes();
        let body: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        let chat = ChatRequest::parse(&body, &self.model_id, &self.template.image_token)?;
        let mut images = Vec::with_capacity(chat.images.len());
        for (path, source) in chat.images {
            images.push(match source {
                ImageSource::Inline(b) => Bytes::from(b),
                ImageSource::Url(url) if !self.cfg.allow_image_urls => {
                    return Err(ApiError::invalid(
                        path.clone(),
                        format!("{path}: image URLs ({}) are not fetched by this server; send the image inline as data:image/png;base64,… (or start the gateway with --allow-image-urls)", url.split(':').next().unwrap_or("http")),
                    )
                    .code("image_url_not_allowed"));
                }
                ImageSource::Url(url) => crate::fetch::fetch_image(&url, self.cfg.max_image_bytes)
                    .await
                    .map_err(|e| ApiError::invalid(path.clone(), format!("{path}: {e}")))?,
            });
        }
        let prompt = self
            .template
            .render(&chat.messages)
            .map_err(|e| ApiError::invalid("messages", e))?;
        let grpc_req = GenerateRequest {
            images,
            prompt,
            params: Some(chat.params),
            monitor_layers: false,
        };
        let stream = Gateway::generate(self.gateway.as_ref(), tonic::Request::new(grpc_req))
            .await
            .map_err(|s| ApiError::from_status(&s))?
            .into_inner();
        let created = unix_now();
        if chat.stream {
            Ok(self.stream_response(stream, created, chat.include_usage))
        } else {
            self.collect_response(stream, created).await
        }
    }

    async fn collect_response(
        &self,
        mut stream: ChatStream,
        created: u64,
    ) -> Result<Response<Body>, ApiError> {
        let mut text = String::new();
        let mut token_ids = Vec::new();
        while let Some(msg) = stream.next().await {
            match msg.map_err(|s| ApiError::from_status(&s))?.kind {
                Some(ResponseKind::Delta(d)) => {
                    text.push_str(&d.text);
                    token_ids.extend(d.token_ids);
                }
                Some(ResponseKind::Final(f)) => {
                    let usage = f.usage.unwrap_or_default();
                    return Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "id": format!("chatcmpl-{}", f.trace_id),
                            "object": "chat.completion",
                            "created": created,
                            "model": self.model_id,
                            "choices": [{
                                "index": 0,
                                "message": {"role": "assistant", "content": text, "refusal": null},
                                "logprobs": null,
                                "finish_reason": openai_finish_reason(f.finish_reason),
                            }],
                            "usage": openai_usage(&usage),
                            "system_fingerprint": null,
                            // Not part of OpenAI's schema (clients ignore it): what the gRPC API reports.
                            "vlm": {"token_ids": token_ids, "trace_id": f.trace_id},
                        }),
                    ));
                }
                None => {}
            }
        }
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation ended without a final message",
        ))
    }

    /// Server-Sent Events in OpenAI's `chat.completion.chunk` format, ending with `data: [DONE]`.
    /// An error after the response has started is sent as one `data: {"error": …}` event (what
    /// the OpenAI SDKs raise), without `[DONE]`.
    fn stream_response(
        &self,
        mut stream: ChatStream,
        created: u64,
        include_usage: bool,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let model = self.model_id.clone();
        // The id is known only at the end (it carries the trace id); chunks use a request id.
        let id = format!("chatcmpl-{}", vlm_net::new_request_id());
        tokio::spawn(async move {
            let chunk = |delta: Value, finish: Option<&str>| {
                let mut c = json!({
                    "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": null,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                });
                if include_usage {
                    c["usage"] = Value::Null;
                }
                sse(&c)
            };
            if tx
                .send(chunk(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
            {
                return;
            }
            // Dropping `stream` (any early return: the client went away) cancels the generation.
            while let Some(msg) = stream.next().await {
                let event = match msg {
                    Ok(m) => m,
                    Err(s) => {
                        let _ = tx.send(sse(&ApiError::from_status(&s).body())).await;
                        return;
                    }
                };
                match event.kind {
                    Some(ResponseKind::Delta(d)) => {
                        if d.text.is_empty() {
                            continue;
                        }
                        if tx
                            .send(chunk(json!({"content": d.text}), None))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Some(ResponseKind::Final(f)) => {
                        let reason = openai_finish_reason(f.finish_reason);
                        if tx.send(chunk(json!({}), Some(reason))).await.is_err() {
                            return;
                        }
                        if include_usage {
                            let usage = f.usage.unwrap_or_default();
                            let last = json!({
                                "id": id, "object": "chat.completion.chunk", "created": created,
                                "model": model, "system_fingerprint": null, "choices": [],
                                "usage": openai_usage(&usage),
                            });
                            if tx.send(sse(&last)).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                        return;
                    }
                    None => {}
                }
            }
            let e = ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation ended without a final message",
            );
            let _ = tx.send(sse(&e.body())).await;
        });
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b)));
        let mut resp = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert("cache-control", HeaderValue::from_static("no-cache"));
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_B64: &str = "iVBORw0KGgo=";

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::parse(&v, "tiny-llava", "<image>")
    }

    fn user_with_image(url: &str) -> Value {
        json!([{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": url}},
        ]}])
    }

    #[test]
    fn a_full_request_maps_to_the_gateway_parameters() {
        let r = parse(json!({
            "model": "tiny-llava",
            "messages": user_with_image(&format!("data:image/png;base64,{PNG_B64}")),
            "max_completion_tokens": 7, "max_tokens": 99,
            "temperature": 0.5, "top_p": 0.9, "seed": 42, "stop": "\n",
            "stream": true, "stream_options": {"include_usage": true}, "n": 1,
            "user": "ignored",
        }))
        .unwrap();
        assert_eq!(r.params.max_tokens, Some(7));
        assert_eq!(r.params.temperature, 0.5);
        assert_eq!(r.params.top_p, 0.9);
        assert_eq!(r.params.seed, Some(42));
        assert_eq!(r.params.stop, vec!["\n".to_string()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(
            r.images,
            vec![(
                "messages[0].content[1].image_url.url".to_string(),
                ImageSource::Inline(
                    base64::engine::general_purpose::STANDARD
                        .decode(PNG_B64)
                        .unwrap()
                )
            )]
        );
        assert_eq!(r.messages[0].content[1], TemplatePart::Image);
    }

    #[test]
    fn defaults_follow_openai() {
        let r =
            parse(json!({"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}))
                .unwrap();
        assert_eq!(r.params.temperature, 1.0);
        assert_eq!(r.params.top_p, 1.0);
        assert_eq!(r.params.max_tokens, None);
        assert_eq!(r.params.seed, None);
        assert!(!r.stream);
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let msgs = user_with_image(&format!("data:image/png;base64,{PNG_B64}"));
        let cases = [
            (json!({"model": "gpt-4o", "messages": msgs}), 404, "model"),
            (json!({"messages": msgs}), 400, "model"),
            (
                json!({"model": "tiny-llava", "messages": msgs, "n": 2}),
                400,
                "n",
            ),
            (
                json!({"model": "tiny-llava", "messages": []}),
                400,
                "messages",
            ),
            (
                json!({"model": "tiny-llava", "messages": user_with_image("data:image/png;base64,@@@")}),
                400,
                "messages[0].content[1].image_url.url",
            ),
            (
                json!({"model": "tiny-llava", "messages": user_with_image("data:text/plain;base64,aGk=")}),
                400,
                "messages[0].content[1].image_url.url",
            ),
            (
                json!({"model": "tiny-llava", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                400,
                "messages[0].content[0].image_url",
            ),
            (
                json!({"model": "tiny-llava", "messages": [{"role": "user", "content": "Describe <image>"}]}),
                400,
                "messages[0].content",
            ),
            (
                json!({"model": "tiny-llava", "messages": [{"role": "tool", "content": "x"}]}),
                400,
                "messages[0].role",
            ),
            (
                json!({"model": "tiny-llava", "messages": msgs, "temperature": "hot"}),
                400,
                "temperature",
            ),
            (
                json!({"model": "tiny-llava", "messages": msgs, "seed": -1}),
                400,
                "seed",
            ),
        ];
        for (body, status, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.status.as_u16(), status, "{body}: {e:?}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
            let shaped = e.body();
            assert!(shaped["error"]["message"].as_str().unwrap().len() > 10);
            assert!(shaped["error"]["type"].is_string());
        }
    }

    #[test]
    fn http_urls_are_kept_for_the_fetch_policy() {
        let r = parse(json!({"model": "tiny-llava", "messages": user_with_image("https://example.com/a.png")}))
            .unwrap();
        assert_eq!(
            r.images[0].1,
            ImageSource::Url("https://example.com/a.png".into())
        );
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::ResourceExhausted, 413),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ] {
            let e = ApiError::from_status(&Status::new(code, "decoder: boom"));
            assert_eq!(e.status.as_u16(), http);
            assert_eq!(e.body()["error"]["message"], "decoder: boom");
        }
    }
}
