//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
//! that matches the failure (a gateway status maps to the same class as on the gRPC port).

use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tonic::{Code, Status};

/// What a per-peer refusal's message names ([`vlm_net::PeerShare`]).
const PEER_SHARE: &str = "--max-peer-share";

/// An error in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    kind: &'static str,
    pub(super) param: Option<String>,
    code: Option<&'static str>,
    /// Seconds after which a retry may succeed (`Retry-After`), for refusals under load.
    retry_after: Option<&'static str>,
}

/// The JSON body of an [`ApiError`].
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorDetail<'a> {
    pub message: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// A 400 `invalid_request_error` naming the offending parameter (a JSON path).
    pub(super) fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).param(param)
    }

    pub(super) fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub(super) fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub(super) fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                message: &self.message,
                kind: self.kind,
                param: self.param.as_deref(),
                code: self.code,
            },
        }
    }

    /// The HTTP view of a gateway status: the same classes of failure as on the gRPC port.
    /// RESOURCE_EXHAUSTED is two things: a request too large (413) or a service refusing for
    /// load, whose message says `overloaded` (documented in the README's error table): that one
    /// is 503 + Retry-After, which clients retry, wherever in the mesh it was refused.
    pub(super) fn from_status(s: &Status) -> Self {
        if s.code() == Code::ResourceExhausted
            && (s.message().contains("overloaded") || s.message().contains(PEER_SHARE))
        {
            return Self::refused(s);
        }
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

    /// A request body that is no JSON, or JSON of the wrong shape: the message and `param` name
    /// the field it failed on (`messages[0].content[1].image_url`), as OpenAI's do.
    pub(super) fn from_json(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if !inner.is_data() {
            return Self::not_json(&inner);
        }
        // serde_json appends the position; the path says more.
        let text = inner.to_string();
        let text = text.rsplit_once(" at line ").map_or(text.as_str(), |t| t.0);
        if path == "." {
            let message = if text.starts_with("invalid type") {
                "the request body must be a JSON object".to_string()
            } else {
                format!("the request body is invalid: {text}")
            };
            return Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        }
        Self::invalid(path.clone(), format!("{path}: {text}"))
    }

    pub(super) fn not_json(e: &serde_json::Error) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("the request body is not valid JSON: {e}"),
        )
    }

    /// The generation's stream ended without its final message.
    pub(super) fn no_final() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation ended without a final message",
        )
    }

    /// An admission refusal: 429 `rate_limit_exceeded` when the client is beyond its share
    /// of a limit (`--max-peer-share`: other clients are being served), else 503 `overloaded`;
    /// both with `Retry-After`, which the SDKs honour.
    pub(super) fn refused(status: &tonic::Status) -> Self {
        if !status.message().contains(PEER_SHARE) {
            return Self::overloaded(status);
        }
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            status.message().to_string(),
        )
        .code("rate_limit_exceeded");
        e.retry_after = Some("1");
        e
    }

    /// The gateway's admission refused the request (`status` says why: slots and queue full,
    /// its memory budget, a wait too long).
    fn overloaded(status: &tonic::Status) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            status.message().to_string(),
        )
        .code("overloaded");
        e.retry_after = Some("1");
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        for (code, http) in [
            (Code::InvalidArgument, 400),
            (Code::ResourceExhausted, 413),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Cancelled, 499),
            (Code::Internal, 500),
        ] {
            let e = ApiError::from_status(&Status::new(code, "decoder: boom"));
            assert_eq!(e.status.as_u16(), http);
            assert_eq!(e.body().error.message, "decoder: boom");
        }
    }

    #[test]
    fn a_stage_refusing_for_load_is_503_with_retry_after() {
        let s = Status::resource_exhausted(
            "decoder: vlm.v1.Decoder overloaded: 1 calls in flight and 0 queued (limits 1 and 0); retry later",
        );
        let e = ApiError::from_status(&s);
        assert_eq!(e.status.as_u16(), 503);
        assert_eq!(e.retry_after, Some("1"));
        assert_eq!(e.body().error.code, Some("overloaded"));
        // Too large for the whole budget is about the request: still 413.
        let s = Status::resource_exhausted(
            "gateway: the request needs 9 MiB, more than gateway's whole memory budget of 8 MiB",
        );
        assert_eq!(ApiError::from_status(&s).status.as_u16(), 413);
    }

    #[test]
    fn a_client_beyond_its_share_is_429_with_retry_after() {
        let share = vlm_net::PeerShare::new("calls", "--max-in-flight", 4, 0.25);
        let peer = vlm_net::Peer::new(Some("127.0.0.1:4000".parse().unwrap()), None::<&[&[u8]]>);
        let _held = share.take(&peer).unwrap();
        let refusal = share.take(&peer).unwrap_err();
        let e = ApiError::from_status(&refusal);
        assert_eq!(e.status.as_u16(), 429, "{}", refusal.message());
        assert_eq!(e.retry_after, Some("1"));
        assert_eq!(e.body().error.code, Some("rate_limit_exceeded"));
        assert_eq!(e.body().error.kind, "rate_limit_error");
    }

    #[test]
    fn the_body_has_every_field_of_openais_shape_even_when_null() {
        let e = ApiError::invalid("n", "n = 2 is not supported").code("x");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {
                "message": "n = 2 is not supported", "type": "invalid_request_error",
                "param": "n", "code": "x",
            }})
        );
        let v = serde_json::to_value(ApiError::no_final().body()).unwrap();
        assert!(v["error"]["param"].is_null() && v["error"]["code"].is_null());
        assert!(v["error"].as_object().unwrap().contains_key("param"));
    }
}
