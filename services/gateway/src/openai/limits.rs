//! What bounds a chat request: its body (size through axum's `DefaultBodyLimit`, time read here)
//! and how many are served at once ([`admit`], a middleware layer that refuses the excess at once
//! rather than queueing it).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

/// Slots for requests served at once.
#[derive(Debug, Clone)]
pub(super) struct Slots {
    free: Arc<Semaphore>,
    limit: usize,
}

impl Slots {
    /// `limit` slots (at least one).
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Slots {
            free: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

/// Middleware: serves the request in a free slot, held until its response body has been sent or
/// dropped (a streamed answer is work until its last chunk), or refuses it at once with 503 and
/// `Retry-After`.
pub(super) async fn admit(State(slots): State<Slots>, req: Request, next: Next) -> Response {
    let Ok(permit) = slots.free.clone().try_acquire_owned() else {
        tracing::debug!(limit = slots.limit, "chat completion refused: no free slot");
        return ApiError::overloaded(slots.limit).into_response();
    };
    next.run(req).await.map(|inner| {
        Body::new(PermitBody {
            inner,
            _permit: permit,
        })
    })
}

/// A response body that keeps its request's slot until it ends or is dropped.
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
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
