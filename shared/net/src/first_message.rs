//! Reading a call's first request message before it is admitted.
//!
//! A call that sends its headers but no message must not hold an admission slot or queue place:
//! 130 such streams on one connection once locked a whole gateway for as long as the connection
//! lived. [`read_first_message`] reads the body until one whole gRPC message (5-byte prefix plus
//! its declared length) has arrived, within a time limit, and gives back a body that replays
//! what was read and continues with the rest (later messages of a streaming call).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::codegen::http::HeaderMap;
use tonic::Status;

/// How long a caller may take, after its call's headers, to send the first request message.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads `body` until its first gRPC message is complete, or `max_bytes` of it have arrived (a
/// large message is admitted once that much of it is in: the sender has shown it is sending, and
/// what waits unadmitted stays bounded), or the body ends; returns a body that yields the same
/// bytes, and the first message's size as its prefix declares it (what was read, when the body
/// ended before a whole prefix). Fails with DEADLINE_EXCEEDED when `timeout` passes first.
pub async fn read_first_message(
    mut body: Body,
    max_bytes: usize,
    timeout: Duration,
) -> Result<(Body, u64), Status> {
    let mut head = BytesMut::new();
    let mut trailers = None;
    let mut ended = false;
    let read = async {
        while !first_message_complete(&head, max_bytes) {
            match body.frame().await {
                None => {
                    ended = true;
                    break;
                }
                Some(Err(status)) => return Err(status),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        let chunk = data.copy_to_bytes(data.remaining());
                        head.extend_from_slice(&chunk);
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        ended = true;
                        break;
                    }
                },
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(Status::deadline_exceeded(format!(
                "no complete request message within {} s of the call's headers",
                timeout.as_secs()
            )))
        }
    }
    let declared = declared_size(&head).unwrap_or(head.len() as u64);
    let body = Body::new(Prefetched {
        head: (!head.is_empty()).then(|| head.freeze()),
        trailers,
        rest: (!ended).then_some(body),
    });
    Ok((body, declared))
}

/// Prefix plus declared length of the message `buf` starts with, once its prefix is in.
fn declared_size(buf: &[u8]) -> Option<u64> {
    let len = buf.get(1..5)?;
    Some(5 + u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]])))
}

/// True once `buf` holds a whole gRPC message, or `max_bytes` of one. A declared length alone
/// is not enough: a 5-byte prefix announcing 60 MB and nothing after it must not be admitted.
fn first_message_complete(buf: &[u8], max_bytes: usize) -> bool {
    if buf.len() >= max_bytes {
        return true;
    }
    if buf.len() < 5 {
        return false;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    buf.len() >= 5 + len
}

/// What was read, then the rest of the original body.
struct Prefetched {
    head: Option<Bytes>,
    trailers: Option<HeaderMap>,
    rest: Option<Body>,
}

impl HttpBody for Prefetched {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if let Some(rest) = self.rest.as_mut() {
            return Pin::new(rest).poll_frame(cx);
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none()
            && self.trailers.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// A body fed by the test, one frame at a time.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let frames = futures::StreamExt::map(stream, |b| Ok::<_, Status>(Frame::data(b)));
        (tx, Body::new(http_body_util::StreamBody::new(frames)))
    }

    #[tokio::test]
    async fn waits_for_a_whole_message_then_replays_it_and_the_rest() {
        let (tx, body) = channel_body();
        let first = message(b"hello world");
        tx.send(Bytes::copy_from_slice(&first[..3])).await.unwrap();
        let reading = tokio::spawn(read_first_message(body, 1 << 20, Duration::from_secs(60)));
        tx.send(Bytes::copy_from_slice(&first[3..])).await.unwrap();
        let second = message(b"again");
        tx.send(Bytes::from(second.clone())).await.unwrap();
        drop(tx);
        let (body, declared) = reading.await.unwrap().unwrap();
        assert_eq!(declared, first.len() as u64);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], [first, second].concat().as_slice());
    }

    #[tokio::test]
    async fn headers_without_a_message_time_out() {
        let (tx, body) = channel_body();
        tx.send(Bytes::from_static(&[0, 0, 0])).await.unwrap();
        let err = read_first_message(body, 1 << 20, Duration::from_millis(50))
            .await
            .expect_err("timed out");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        drop(tx);
    }

    #[test]
    fn a_large_message_is_complete_enough_once_max_bytes_have_arrived() {
        let mut m = vec![0];
        m.extend_from_slice(&(100u32 << 20).to_be_bytes());
        // Only the prefix of a 100 MiB message: not yet.
        assert!(!first_message_complete(&m, 1 << 10));
        m.resize(1 << 10, 7);
        assert!(first_message_complete(&m, 1 << 10));
        assert!(!first_message_complete(&m[..4], 64 << 20));
        assert!(!first_message_complete(&message(b"abc")[..7], 1 << 20));
        assert!(first_message_complete(&message(b"abc"), 1 << 20));
    }
}
