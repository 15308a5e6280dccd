//! Request bodies held against the memory budget as they arrive.
//!
//! [`Metered`]: a body's bytes, as they arrive (a one-message request, an HTTP body).
//!
//! [`MeteredMessages`]: the messages of a long-lived client stream (`Watch`). Each gRPC message
//! is charged to the service's [`ByteBudget`] **when its 5-byte header arrives**, at its
//! declared length, before any of its bytes are buffered; a message that finds the budget full
//! fails the stream with RESOURCE_EXHAUSTED. Once a message has arrived whole, its charge waits in the stream's
//! [`MessageLedger`] (in the request's extensions), in order; the handler takes one charge per
//! message it receives ([`MessageLedger::take`]) and keeps it as long as it keeps the message's
//! data. So partial messages, messages the codec holds and data the handler keeps all count.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;

use crate::{ByteBudget, BytePermit, Peer};

/// A body whose data is held against `permit` as it arrives: the permit grows (never waiting)
/// by what exceeds it, and the body fails with RESOURCE_EXHAUSTED when the budget is full. A
/// slow sender thus holds only what it has sent, not what it declared.
pub struct Metered<B> {
    inner: B,
    permit: Arc<Mutex<BytePermit>>,
    seen: u64,
    what: &'static str,
}

impl<B> Metered<B> {
    pub fn new(inner: B, permit: Arc<Mutex<BytePermit>>, what: &'static str) -> Self {
        Metered {
            inner,
            permit,
            seen: 0,
            what,
        }
    }
}

impl<B> http_body::Body for Metered<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let std::task::Poll::Ready(Some(Ok(frame))) = polled else {
            return polled.map(|f| f.map(|r| r.map_err(Into::into)));
        };
        if let Some(data) = frame.data_ref() {
            self.seen += data.len() as u64;
            let mut permit = self.permit.lock().unwrap_or_else(|p| p.into_inner());
            if self.seen > permit.bytes() {
                let more = self.seen - permit.bytes();
                if let Err(status) = permit.try_grow(more, self.what) {
                    return std::task::Poll::Ready(Some(Err(Box::new(status))));
                }
            }
        }
        std::task::Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The charges of a stream's messages that have arrived whole and not yet been taken.
#[derive(Debug, Clone, Default)]
pub struct MessageLedger {
    done: Arc<Mutex<VecDeque<BytePermit>>>,
}

impl MessageLedger {
    /// The charge of the oldest message not yet taken (the handler calls this once per message
    /// it receives, in order). `None` for a stream that is not metered.
    pub fn take(&self) -> Option<BytePermit> {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    fn push(&self, permit: BytePermit) {
        self.done
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(permit);
    }
}

/// A request body whose gRPC messages are charged as described in the module docs.
pub struct MeteredMessages<B> {
    inner: B,
    budget: ByteBudget,
    peer: Peer,
    what: &'static str,
    ledger: MessageLedger,
    header: [u8; 5],
    /// Header bytes read of the next message.
    have: usize,
    /// Bytes of the current message still to come (0 between messages).
    remaining: u64,
    current: Option<BytePermit>,
}

impl<B> MeteredMessages<B> {
    /// Meters `inner` against `budget`, within `peer`'s share of it; `what` names a message in
    /// errors. The returned ledger receives the charges.
    pub fn new(
        inner: B,
        budget: ByteBudget,
        peer: Peer,
        what: &'static str,
    ) -> (Self, MessageLedger) {
        let ledger = MessageLedger::default();
        let body = MeteredMessages {
            inner,
            budget,
            peer,
            what,
            ledger: ledger.clone(),
            header: [0; 5],
            have: 0,
            remaining: 0,
            current: None,
        };
        (body, ledger)
    }

    /// Walks `data` through the message framing, charging each header as it completes.
    fn account(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            if self.current.is_none() {
                let n = (5 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have < 5 {
                    continue;
                }
                self.have = 0;
                let len = u32::from_be_bytes(self.header[1..5].try_into().expect("4 bytes"));
                let mut permit = self.budget.empty_for(&self.peer);
                permit.try_grow(5 + u64::from(len), self.what)?;
                if len == 0 {
                    self.ledger.push(permit);
                } else {
                    self.current = Some(permit);
                    self.remaining = u64::from(len);
                }
            } else {
                let n = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= n as u64;
                data = &data[n..];
                if self.remaining == 0 {
                    self.ledger
                        .push(self.current.take().expect("a message in progress"));
                }
            }
        }
        Ok(())
    }
}

impl<B> http_body::Body for MeteredMessages<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Poll::Ready(Some(Ok(frame))) = polled else {
            return polled.map(|f| f.map(|r| r.map_err(Into::into)));
        };
        if let Some(data) = frame.data_ref() {
            let data = data.clone();
            if let Err(status) = self.account(&data) {
                return Poll::Ready(Some(Err(Box::new(status))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
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
    use http_body_util::BodyExt;

    fn unknown() -> Peer {
        Peer::new(None, None::<&[&[u8]]>)
    }

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&(len as u32).to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len));
        m
    }

    /// Messages split anywhere across frames are charged at their header, handed to the ledger
    /// once whole, and given back when the handler drops their charge.
    #[tokio::test]
    async fn messages_are_charged_from_their_header_until_taken() {
        let budget = ByteBudget::new("test.Meter", 1000, 4);
        let mut wire = message(100);
        wire.extend(message(0));
        wire.extend(message(300));
        // Frames of 3 bytes: headers and bodies split everywhere.
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = wire
            .chunks(3)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let (mut body, ledger) =
            MeteredMessages::new(inner, budget.clone(), unknown(), "a message");
        // Up to the third message's header: the first two are whole, the third is charged.
        let mut read = 0;
        while read < 105 + 5 + 5 {
            let f = body.frame().await.unwrap().unwrap();
            read += f.data_ref().unwrap().len();
        }
        assert_eq!(budget.used(), 105 + 5 + 305);
        let first = ledger.take().expect("the first message");
        assert_eq!(first.bytes(), 105);
        let second = ledger.take().expect("the empty message");
        assert_eq!(second.bytes(), 5);
        assert!(ledger.take().is_none(), "the third is not whole yet");
        while body.frame().await.is_some() {}
        let third = ledger.take().expect("the third message");
        assert_eq!(third.bytes(), 305);
        drop((first, second));
        assert_eq!(budget.used(), 305);
        drop(third);
        assert_eq!(budget.used(), 0);
    }

    /// A header whose message does not fit the budget fails the body before its data arrives.
    #[tokio::test]
    async fn a_message_that_does_not_fit_fails_at_its_header() {
        let budget = ByteBudget::new("test.Meter2", 1000, 4);
        let wire = message(2000)[..5].to_vec();
        let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
            vec![Ok(Frame::data(Bytes::from(wire)))];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(chunks));
        let (mut body, _ledger) =
            MeteredMessages::new(inner, budget.clone(), unknown(), "a Watch message");
        let err = body.frame().await.unwrap().unwrap_err();
        let status = err.downcast_ref::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("a Watch message"), "{status:?}");
        assert_eq!(budget.used(), 0);
    }
}
