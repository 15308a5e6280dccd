//! The OpenAI-compatible HTTP endpoint: `POST /v1/chat/completions` and `GET /v1/models` over
//! HTTP/1.1 + JSON on its own port, for the clients that speak OpenAI's API (the `openai` SDKs,
//! agents that send screenshots as base64 `image_url` parts).
//!
//! A chat request becomes a `GenerateRequest` ([`convert`]): the messages go through the model's
//! chat template (see [`crate::chat_template`]), every `image_url` part becomes one image in message
//! order, and the request runs through the very same [`Gateway::generate`] as a gRPC call (same
//! cache, limits, deadlines and trace). Errors use OpenAI's shape ([`error`]) with the HTTP status
//! that matches the gRPC code.
//!
//! An axum router behind hyper's HTTP/1.1 server, which bounds the time to send request headers
//! (axum's own `serve` cannot) and runs behind the optional TLS acceptor.

mod auth;
mod convert;
mod error;
mod fields;
mod formats;
mod limits;
mod stream;
#[cfg(test)]
mod tests;
mod tools;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use futures::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower_http::normalize_path::NormalizePath;
use vlm_net::HttpTlsAcceptor;
use vlm_proto::gateway_server::Gateway;
use vlm_proto::{GenerateRequest, GetModelInfoRequest};

use crate::chat_template::{ChatTemplate, TemplateCache};
use crate::GatewayService;
use error::ApiError;
use limits::{AdmissionLimits, BodyLimits, ChatBody};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may take to send its request body (up to 64 MiB of base64 images).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The served model's name, which clients pass as `model` (the gateway's own, so the endpoint
    /// starts before, or without, the stages being up); responses name it.
    pub model_id: String,
    /// More names clients may pass as `model` (`--served-model-name` beyond the first, as vLLM
    /// takes them); `GET /v1/models` lists them after `model_id`.
    pub aliases: Vec<String>,
    /// With a key, every request must carry `Authorization: Bearer <key>` (401 otherwise);
    /// without one, any key (or none) is accepted.
    pub api_key: Option<String>,
    /// Fetch `http(s)://` image URLs (off: they are refused with 400).
    pub allow_image_urls: bool,
    /// Let image URLs reach loopback, private, link-local and other internal addresses (off:
    /// refused with 400, against server-side request forgery).
    pub allow_private_image_urls: bool,
    /// Most images per request, counted before any URL is fetched (the gateway's own limit).
    pub max_images: usize,
    /// Largest request body accepted, in bytes (base64 images included); larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest image accepted, in bytes (also bounds fetched URLs).
    pub max_image_bytes: usize,
    /// The gateway's compiled chat template ([`GatewayService::templates`]), shared with its
    /// `Generate` and `Watch`.
    pub templates: Arc<TemplateCache>,
    /// Refuse requests with fields this server does not know (else they are logged once per
    /// name and accepted, as vLLM does).
    pub strict_openai: bool,
    /// The gateway's admission (slots, queue, memory budget), shared with its gRPC port: a chat
    /// completion takes a slot once its body has been read (a streamed one holds it until its
    /// last chunk), and its body's memory is reserved before reading. Refusals are 503 with
    /// `Retry-After`.
    pub admission: vlm_net::AdmissionGate,
}

/// The endpoint, sharing its gateway (a [`GatewayService`] but in tests) with the gRPC server.
pub struct OpenAiEndpoint<G = GatewayService> {
    gateway: Arc<G>,
    model_id: String,
    created: u64,
    cfg: OpenAiConfig,
    body: BodyLimits,
}

impl<G> FromRef<Arc<OpenAiEndpoint<G>>> for AdmissionLimits {
    fn from_ref(endpoint: &Arc<OpenAiEndpoint<G>>) -> Self {
        AdmissionLimits {
            gate: endpoint.cfg.admission.clone(),
            body: endpoint.body,
        }
    }
}

impl<G> FromRef<Arc<OpenAiEndpoint<G>>> for BodyLimits {
    fn from_ref(endpoint: &Arc<OpenAiEndpoint<G>>) -> Self {
        endpoint.body
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<G: Gateway> OpenAiEndpoint<G> {
    pub fn new(gateway: Arc<G>, cfg: OpenAiConfig) -> anyhow::Result<Self> {
        Ok(OpenAiEndpoint {
            gateway,
            model_id: cfg.model_id.clone(),
            created: unix_now(),
            body: BodyLimits {
                max_bytes: cfg.max_body_bytes,
                read_timeout: BODY_READ_TIMEOUT,
            },
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
        let app = self.app();
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
            let app = app.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut http = hyper::server::conn::http1::Builder::new();
                http.timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT);
                // Every request carries its peer (connection, client certificate or address):
                // admission bounds each peer's share.
                let serve = |certs: Option<&[rustls_pki_types::CertificateDer<'_>]>| {
                    let peer = vlm_net::Peer::new(Some(peer), certs);
                    TowerToHyperService::new(tower::util::MapRequest::new(
                        app,
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(peer.clone());
                            req
                        },
                    ))
                };
                let result = match tls {
                    Some(acceptor) => match acceptor.accept(tcp).await {
                        Ok(stream) => {
                            let service = serve(stream.get_ref().1.peer_certificates());
                            http.serve_connection(TokioIo::new(stream), service).await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                    },
                    None => http.serve_connection(TokioIo::new(tcp), serve(None)).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, "HTTP connection ended: {e}");
                }
            });
        }
    }

    /// The routes, with trailing slashes trimmed first (`/v1/models/` is `/v1/models`).
    fn app(self: &Arc<Self>) -> NormalizePath<Router> {
        let chat = post(chat::<G>)
            .fallback(method_not_allowed)
            .route_layer(middleware::from_fn_with_state(
                AdmissionLimits::from_ref(self),
                limits::reserve_body,
            ))
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes));
        let router = Router::new()
            .route("/v1/chat/completions", chat)
            .route("/v1/models", get(models::<G>).fallback(method_not_allowed))
            .route("/v1/models/{*id}", get(model::<G>).fallback(unknown_url))
            .fallback(unknown_url)
            // Outermost: a request without the key is refused before its body is read.
            .layer(middleware::from_fn_with_state(
                auth::ApiKey::new(self.cfg.api_key.as_deref()),
                auth::require_key,
            ))
            .with_state(self.clone());
        NormalizePath::trim_trailing_slash(router)
    }

    fn model_object<'a>(&'a self, id: &'a str) -> types::Model<'a> {
        types::Model {
            id,
            object: "model",
            created: self.created,
            owned_by: "vlm-mesh",
        }
    }

    /// Every name a client may pass as `model`, the one responses use first.
    fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.model_id.as_str()).chain(self.cfg.aliases.iter().map(String::as_str))
    }

    /// The model's chat template, as the decoder reports it (through the gateway's model
    /// identity, asked again when a replica's weights change), compiled once in the gateway's
    /// [`TemplateCache`].
    async fn template(&self) -> Result<Arc<ChatTemplate>, ApiError> {
        let info = Gateway::get_model_info(
            self.gateway.as_ref(),
            tonic::Request::new(GetModelInfoRequest {}),
        )
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
        self.cfg
            .templates
            .compiled(info.chat_template.as_ref())
            .map_err(|s| ApiError::from_status(&s))
    }

    /// A checked chat request, run through the gateway.
    async fn complete(&self, body: types::ChatCompletionRequest) -> Result<Response, ApiError> {
        let names: Vec<&str> = self.names().collect();
        let template = self.template().await?;
        let chat = convert::ChatRequest::check(
            body,
            &names,
            &template.image_token,
            self.cfg.strict_openai,
        )?;
        let policy = convert::FetchPolicy {
            allow_urls: self.cfg.allow_image_urls,
            allow_internal: self.cfg.allow_private_image_urls,
            max_image_bytes: self.cfg.max_image_bytes,
            max_images: self.cfg.max_images,
            // All images together: the same bound as a request body with the images inline.
            max_total_bytes: self.cfg.max_body_bytes,
        };
        let images = convert::load_images(chat.images, policy).await?;
        let prompt = if template.takes_tools() {
            let tools = chat.tools.as_ref().map(tools::Tools::template_value);
            template.render_with_tools(&chat.messages, tools.as_ref())
        } else {
            let messages = tools::written_into_text(
                chat.messages,
                chat.tools.as_ref(),
                template.has_system_turns(),
            );
            template.render(&messages)
        }
        .map_err(|e| ApiError::invalid("messages", e))?;
        // Regions need `image_inputs`; without any, images go as plain `images`.
        let (images, image_inputs) = if chat.regions.iter().all(Vec::is_empty) {
            (images, vec![])
        } else {
            let inputs = images
                .into_iter()
                .zip(chat.regions)
                .map(|(data, regions)| vlm_proto::ImageInput { data, regions })
                .collect();
            (vec![], inputs)
        };
        let request = GenerateRequest {
            image_inputs,
            images,
            prompt,
            params: Some(chat.params),
            monitor_layers: false,
            question: String::new(),
        };
        let mut request = tonic::Request::new(request);
        if let Some(session) = &chat.session {
            // Any string, as a bounded ASCII key: its digest.
            let key = blake3::hash(session.as_bytes()).to_hex();
            let value = tonic::metadata::MetadataValue::try_from(&key[..32])
                .expect("hex digits are valid metadata");
            request.metadata_mut().insert("session-id", value);
        }
        let field = chat.format_field;
        let grpc = Gateway::generate(self.gateway.as_ref(), request)
            .await
            .map_err(|s| format_error(ApiError::from_status(&s), field))?
            .into_inner();
        let pieces = stream::pieces(grpc).map(move |p| p.map_err(|e| format_error(e, field)));
        let created = unix_now();
        let answer = stream::Answer {
            model: self.model_id.clone(),
            created,
            tools: chat.tools.filter(tools::Tools::active),
        };
        Ok(if chat.stream {
            // With an output format, the first piece comes before the response starts, so a
            // format the decoder cannot compile is a 400 naming its field, not an error event
            // after a 200 (the headers wait for the first token; without a format they go out
            // at once).
            let mut pieces = Box::pin(pieces);
            let first = match field {
                Some(_) => Some(
                    pieces
                        .next()
                        .await
                        .unwrap_or_else(|| Err(ApiError::no_final()))?,
                ),
                None => None,
            };
            let pieces = futures::stream::iter(first.map(Ok)).chain(pieces);
            stream::sse(pieces, answer, chat.include_usage).into_response()
        } else {
            Json(stream::completion(pieces, answer).await?).into_response()
        })
    }
}

/// A decoder's refusal of the output format names the request field it came from
/// (`format.json_schema` → `response_format.json_schema.schema`, `tools`…).
fn format_error(e: ApiError, field: Option<&'static str>) -> ApiError {
    let Some(field) = field else { return e };
    let wire = [
        "format.json_schema",
        "format.json_object",
        "format.regex",
        "format.lark",
    ];
    match wire.iter().find(|w| e.message.contains(*w)) {
        Some(w) => {
            let mut e = e;
            e.message = e.message.replace(w, field);
            e.param(field)
        }
        None => e,
    }
}

async fn chat<G: Gateway>(
    State(endpoint): State<Arc<OpenAiEndpoint<G>>>,
    peer: Option<axum::Extension<vlm_net::Peer>>,
    ChatBody(body): ChatBody,
) -> Response {
    let respond = async {
        endpoint.complete(body).await.unwrap_or_else(|e| {
            tracing::debug!(status = %e.status, "chat completion refused: {}", e.message);
            e.into_response()
        })
    };
    // In-process tests call the router without a connection: no peer, no share.
    let peer = peer.map_or_else(|| vlm_net::Peer::new(None, None::<&[&[u8]]>), |p| p.0);
    limits::in_slot(&endpoint.cfg.admission, &peer, respond).await
}

async fn models<G: Gateway>(State(endpoint): State<Arc<OpenAiEndpoint<G>>>) -> Response {
    Json(types::ModelList {
        object: "list",
        data: endpoint.names().map(|n| endpoint.model_object(n)).collect(),
    })
    .into_response()
}

async fn model<G: Gateway>(State(endpoint): State<Arc<OpenAiEndpoint<G>>>, uri: Uri) -> Response {
    let id = uri.path().strip_prefix("/v1/models/").unwrap_or_default();
    if let Some(name) = endpoint.names().find(|n| *n == id) {
        return Json(endpoint.model_object(name)).into_response();
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "The model `{id}` does not exist; this server serves `{}`",
            endpoint.model_id
        ),
    )
    .code("model_not_found")
    .into_response()
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn unknown_url(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "Invalid URL ({method} {}); this server has POST /v1/chat/completions and GET /v1/models",
            uri.path()
        ),
    )
    .code("unknown_url")
}
