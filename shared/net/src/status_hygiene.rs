//! What every status a mesh service sends must satisfy, enforced in one layer
//! ([`StatusHygieneLayer`]) around each service, whatever produced the status (a handler, tonic's
//! codec, a layer):
//!
//! - **Bounded message.** `grpc-message` is cut to [`MAX_STATUS_MESSAGE_BYTES`] (marked with `…`),
//!   so a message that echoes hostile input (a 100 kB stop string) cannot exceed the peer's header
//!   limit and turn a clear INVALID_ARGUMENT into a transport error.
//! - **Undecodable requests are the caller's fault.** tonic's codec reports a request message
//!   that is not valid protobuf as INTERNAL (`failed to decode Protobuf message: …`); it becomes
//!   INVALID_ARGUMENT, so clients and retry policies do not take it for a server failure.
//!
//! Both trailers-only responses (the status in the headers) and stream trailers are rewritten.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, HeaderValue, Request, Response};
use tower::{Layer, Service};

/// Longest `grpc-message` (percent-encoded, as sent) a mesh service sends.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;

/// tonic's wording for a request message it could not decode (prost's `DecodeError`).
const DECODE_ERROR: &str = "failed to decode Protobuf message";

const INTERNAL: &str = "13";
const INVALID_ARGUMENT: &str = "3";

/// Applies the rules in the module docs to one header block (headers or trailers).
fn clean(headers: &mut HeaderMap) {
    let undecodable = headers.get("grpc-status").is_some_and(|v| v == INTERNAL)
        && headers
            .get("grpc-message")
            .is_some_and(|m| percent_decode(m.as_bytes()).starts_with(DECODE_ERROR));
    if undecodable {
        headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    }
    if let Some(m) = headers.get("grpc-message") {
        if m.len() > MAX_STATUS_MESSAGE_BYTES {
            let shortened = shorten(&percent_decode(m.as_bytes()), MAX_STATUS_MESSAGE_BYTES);
            if let Ok(v) = HeaderValue::from_str(&shortened) {
                headers.insert("grpc-message", v);
            }
        }
    }
}

/// The longest prefix of `message` (whole characters) that, percent-encoded and followed by
/// `…`, fits `max` bytes; percent-encoded.
fn shorten(message: &str, max: usize) -> String {
    const ELLIPSIS: &str = "%E2%80%A6";
    let mut out = String::new();
    for c in message.chars() {
        let mut buf = [0u8; 4];
        let encoded = percent_encode(c.encode_utf8(&mut buf).as_bytes());
        if out.len() + encoded.len() + ELLIPSIS.len() > max {
            break;
        }
        out.push_str(&encoded);
    }
    out.push_str(ELLIPSIS);
    out
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..=0x7E).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 3 <= s.len() {
            if let Some(b) = std::str::from_utf8(&s[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatusHygieneLayer;

impl<S> Layer<S> for StatusHygieneLayer {
    type Service = StatusHygiene<S>;
    fn layer(&self, inner: S) -> StatusHygiene<S> {
        StatusHygiene { inner }
    }
}

/// A service wrapped by [`StatusHygieneLayer`].
#[derive(Debug, Clone)]
pub struct StatusHygiene<S> {
    inner: S,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for StatusHygiene<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, ReqBody> Service<Request<ReqBody>> for StatusHygiene<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            clean(resp.headers_mut());
            Ok(resp.map(|inner| Body::new(CleanTrailers { inner })))
        })
    }
}

/// A response body whose trailers go through [`clean`].
struct CleanTrailers {
    inner: Body,
}

impl HttpBody for CleanTrailers {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    clean(&mut trailers);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            }))),
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: &str, message: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(code).unwrap());
        h.insert("grpc-message", HeaderValue::from_str(message).unwrap());
        h
    }

    #[test]
    fn an_undecodable_request_is_invalid_argument() {
        let mut h = headers(
            "13",
            "failed%20to%20decode%20Protobuf%20message%3A%20invalid%20wire%20type",
        );
        clean(&mut h);
        assert_eq!(h["grpc-status"], "3");
        let mut h = headers("13", "model%20failure");
        clean(&mut h);
        assert_eq!(h["grpc-status"], "13");
    }

    #[test]
    fn a_long_message_is_cut_at_an_escape_boundary() {
        // "é" is %C3%A9: a cut must not leave half of it.
        for prefix in 0..6 {
            let msg = format!("{}{}", "a".repeat(prefix), "%C3%A9".repeat(400));
            let mut h = headers("3", &msg);
            clean(&mut h);
            let m = h["grpc-message"].as_bytes();
            assert!(m.len() <= MAX_STATUS_MESSAGE_BYTES, "{}", m.len());
            assert!(m.ends_with(b"%E2%80%A6"));
            let decoded = percent_decode(m);
            assert!(!decoded.contains('\u{FFFD}'), "{decoded}");
            assert!(decoded.starts_with(&"a".repeat(prefix)), "{decoded}");
        }
        let mut h = headers("3", "short");
        clean(&mut h);
        assert_eq!(h["grpc-message"], "short");
    }
}
