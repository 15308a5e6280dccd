//! The caller's deadline, read once per call: [`DeadlineLayer`] parses a call's `grpc-timeout`
//! as it arrives and stores the instant it expires as a [`CallDeadline`] in the request's
//! extensions. Everything after it (admission's queue, the service, its own outgoing calls)
//! reads that one instant through [`DeadlineSource`], so time spent queued counts against the
//! caller's budget and the header is parsed once.

use std::task::{Context, Poll};

use tokio::time::Instant;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;

use crate::parse_grpc_timeout;

/// When a call's deadline passes: its arrival plus its `grpc-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline(pub Instant);

/// The deadline a `grpc-timeout` value set, counted from now; `None` when absent or malformed.
fn from_header(value: Option<&http::HeaderValue>) -> Option<Instant> {
    let timeout = parse_grpc_timeout(value?.to_str().ok()?)?;
    Some(Instant::now() + timeout)
}

/// Where a call's deadline can be read from.
pub trait DeadlineSource {
    /// The call's deadline, `None` when the caller set none.
    fn call_deadline(&self) -> Option<Instant>;
}

/// Metadata alone: its `grpc-timeout`, counted from now.
impl DeadlineSource for MetadataMap {
    fn call_deadline(&self) -> Option<Instant> {
        from_header(self.as_ref().get("grpc-timeout"))
    }
}

/// A call a service received: the [`CallDeadline`] set on arrival, else its `grpc-timeout`.
impl<T> DeadlineSource for tonic::Request<T> {
    fn call_deadline(&self) -> Option<Instant> {
        match self.extensions().get::<CallDeadline>() {
            Some(d) => Some(d.0),
            None => self.metadata().call_deadline(),
        }
    }
}

/// A call inside a tower stack: the [`CallDeadline`] set on arrival, else its `grpc-timeout`.
impl<B> DeadlineSource for http::Request<B> {
    fn call_deadline(&self) -> Option<Instant> {
        match self.extensions().get::<CallDeadline>() {
            Some(d) => Some(d.0),
            None => from_header(self.headers().get("grpc-timeout")),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// A service wrapped by [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
}

impl<S: NamedService> NamedService for Deadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> S::Future {
        if let Some(at) = from_header(req.headers().get("grpc-timeout")) {
            req.extensions_mut().insert(CallDeadline(at));
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::builder();
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(()).unwrap()
    }

    /// Runs `req` through the layer; what the inner service saw.
    async fn through_layer(req: http::Request<()>) -> http::Request<()> {
        let inner = tower::service_fn(|r: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(r)
        });
        let mut svc = tower::Layer::layer(&DeadlineLayer, inner);
        svc.call(req).await.unwrap()
    }

    #[tokio::test]
    async fn the_layer_sets_the_deadline_from_grpc_timeout_on_arrival() {
        let before = Instant::now();
        let seen = through_layer(request(Some("2S"))).await;
        let after = Instant::now();
        let at = seen.extensions().get::<CallDeadline>().expect("set").0;
        let two = Duration::from_secs(2);
        assert!(before + two <= at && at <= after + two, "{at:?}");
        assert_eq!(seen.call_deadline(), Some(at));
    }

    #[tokio::test]
    async fn no_or_a_malformed_timeout_is_no_deadline() {
        for req in [request(None), request(Some("soon"))] {
            let seen = through_layer(req).await;
            assert!(seen.extensions().get::<CallDeadline>().is_none());
            assert_eq!(seen.call_deadline(), None);
        }
    }

    #[test]
    fn a_request_reads_the_arrival_deadline_before_its_header() {
        // An arrival deadline far from "now + 1H" tells which one was read.
        let arrival = Instant::now() + Duration::from_millis(1);
        let mut req = request(Some("1H"));
        req.extensions_mut().insert(CallDeadline(arrival));
        assert_eq!(req.call_deadline(), Some(arrival));
        let call = tonic::Request::from_http(req);
        assert_eq!(call.call_deadline(), Some(arrival));
        // The metadata alone has only the header.
        let from_header = call.metadata().call_deadline().unwrap();
        assert!(
            from_header >= arrival + Duration::from_secs(3599),
            "{from_header:?}"
        );
    }
}
