//! `--api-key`: with a key, every request must carry `Authorization: Bearer <key>`, checked before
//! anything else (the body is not read for a request without it); without one, any key or none is
//! accepted, as OpenAI-compatible servers (vLLM) do, since clients such as the OpenAI SDK always
//! send one.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The key requests must present, if any.
#[derive(Clone)]
pub(super) struct ApiKey(Option<Arc<[u8]>>);

impl ApiKey {
    pub fn new(key: Option<&str>) -> Self {
        ApiKey(key.map(|k| Arc::from(k.as_bytes())))
    }

    /// Whether an `Authorization` header value carries the key (compared in time independent of
    /// where the first difference is).
    fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some(key) = &self.0 else { return true };
        let Some(given) = authorization.and_then(bearer) else {
            return false;
        };
        given.len() == key.len()
            && given
                .iter()
                .zip(key.iter())
                .fold(0, |d, (a, b)| d | (a ^ b))
                == 0
    }
}

/// The token of a `Bearer <token>` value (the scheme is case-insensitive, RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| token.trim_ascii())
}

pub(super) async fn require_key(State(key): State<ApiKey>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if key.admits(given) {
        return next.run(req).await;
    }
    let what = if given.is_some() {
        "an incorrect API key"
    } else {
        "no API key"
    };
    let mut resp = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        format!("The request has {what}; send `Authorization: Bearer <key>` with this server's --api-key"),
    )
    .code("invalid_api_key")
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_key_is_admitted() {
        let key = ApiKey::new(Some("s3cret"));
        assert!(key.admits(Some(b"Bearer s3cret")));
        assert!(key.admits(Some(b"bearer s3cret")));
        assert!(!key.admits(Some(b"Bearer s3cre")));
        assert!(!key.admits(Some(b"Bearer s3cret2")));
        assert!(!key.admits(Some(b"Basic s3cret")));
        assert!(!key.admits(Some(b"s3cret")));
        assert!(!key.admits(None));
        let open = ApiKey::new(None);
        assert!(open.admits(None));
        assert!(open.admits(Some(b"Bearer anything")));
    }
}
