//! What bounds a chat request: its body (size through axum's `DefaultBodyLimit`, time read here,
//! memory reserved before reading by [`reserve_body`]) and how many are served at once
//! ([`in_slot`]: the gateway's own admission, shared with its gRPC port).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::sync::{Arc, Mutex};

use vlm_net::{AdmissionGate, Metered};

use super::error::ApiError;
use super::types::{parse_request, ChatCompletionRequest};

/// How much of a request body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimits {
    /// Largest body, in bytes (also set as the route's `DefaultBodyLimit`).
    pub max_bytes: usize,
    /// The whole body must arrive within this.
    pub read_timeout: Duration,
}

/// A chat request's body, read within [`BodyLimits`] and parsed; every failure in OpenAI's shape.
pub(super) struct ChatBody(pub ChatCompletionRequest);

impl<S> FromRequest<S> for ChatBody
where
    S: Send + Sync,
    BodyLimits: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limits = BodyLimits::from_ref(state);
        let body = tokio::time::timeout(limits.read_timeout, Bytes::from_request(req, state))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "invalid_request_error",
                    format!(
                        "the request body did not arrive within {:?}",
                        limits.read_timeout
                    ),
                )
            })?
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "invalid_request_error",
                        format!(
                            "the request body exceeds the limit of {} bytes",
                            limits.max_bytes
                        ),
                    )
                    .code("request_too_large")
                } else if let Some(status) = budget_refusal(&rejection) {
                    ApiError::refused(&status)
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        format!("cannot read the request body: {}", rejection.body_text()),
                    )
                }
            })?;
        parse_request(&body).map(ChatBody)
    }
}

/// The memory budget's refusal, when that is why reading the body failed ([`Metered`]).
fn budget_refusal(rejection: &axum::extract::rejection::BytesRejection) -> Option<tonic::Status> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(e) = source {
        if let Some(status) = e.downcast_ref::<tonic::Status>() {
            return Some(status.clone());
        }
        source = e.source();
    }
    None
}

/// Middleware: holds the body's memory against the gateway's budget as it arrives (a slow sender
/// holds only what it sent), until the response body has been sent or dropped. A body whose
/// declared length, with the request parsed from it (twice the length), could never fit is
/// refused before it is read; one that finds the budget full fails with 503 and `Retry-After`.
pub(super) async fn reserve_body(
    State(limits): State<AdmissionLimits>,
    req: Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let memory = limits.gate.memory();
    if let Some(n) = declared {
        let n = n.min(limits.body.max_bytes as u64);
        if let Err(status) = memory.check_size(2 * n, "the request body") {
            return ApiError::refused(&status).into_response();
        }
    }
    // Within the peer's share of the budget (no peer: an in-process call).
    let held = match req.extensions().get::<vlm_net::Peer>() {
        Some(peer) => memory.empty_for(peer),
        None => memory.empty(),
    };
    let held = Arc::new(Mutex::new(held));
    let (parts, body) = req.into_parts();
    let body = Body::new(Metered::new(body, held.clone(), "the request body"));
    hold_until_sent(next.run(Request::from_parts(parts, body)).await, held)
}

/// Serves `respond` in one of the gateway's slots (the same slots and queue as its gRPC port),
/// taken once the request has been read and held until its response body has been sent or
/// dropped (a streamed answer is work until its last chunk); refused with 503 and
/// `Retry-After` when the queue is full or the wait too long.
pub(super) async fn in_slot(
    gate: &AdmissionGate,
    peer: &vlm_net::Peer,
    respond: impl std::future::Future<Output = Response>,
) -> Response {
    let slot = match gate.admit_peer(peer, None).await {
        Ok(slot) => slot,
        Err(status) => {
            tracing::debug!("chat completion refused: {}", status.message());
            return ApiError::refused(&status).into_response();
        }
    };
    hold_until_sent(respond.await, slot)
}

/// The admission a chat request goes through, and its body limits.
#[derive(Debug, Clone)]
pub(super) struct AdmissionLimits {
    pub gate: AdmissionGate,
    pub body: BodyLimits,
}

fn hold_until_sent<H: Send + Sync + 'static>(resp: Response, held: H) -> Response {
    resp.map(|inner| {
        Body::new(PermitBody {
            inner,
            _held: Box::new(held),
        })
    })
}

/// A response body that keeps what its request holds (a slot, memory) until it ends or is
/// dropped.
struct PermitBody {
    inner: Body,
    _held: Box<dyn Send + Sync>,
}

impl http_body::Body for PermitBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
