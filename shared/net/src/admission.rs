//! Load shedding: a tower layer that admits at most `max_in_flight` calls to a service, lets at most
//! `max_queue` more wait for a slot, and answers everything beyond that at once with
//! RESOURCE_EXHAUSTED, so an overloaded service fails fast instead of queueing without bound (and
//! its memory stays bounded by the limits, whatever the offered load).
//!
//! A call whose request is one message (not a client stream: `vlm_proto::UNARY_REQUEST_PATHS`)
//! is admitted only once that message has arrived ([`read_first_message`], within
//! [`FIRST_MESSAGE_TIMEOUT`] and its deadline): headers without a message hold no slot and no
//! queue place. (A streaming request is admitted on its headers: its handler may answer before
//! the first message, and its messages are read under the slot.) At most `max_in_flight + max_queue` calls plus one connection's worth
//! ([`MAX_STREAMS_PER_CONNECTION`]) may be reading their first message at once, so one connection
//! alone cannot use them all; more are refused like an overload.
//!
//! A gate may also bound each peer's share ([`AdmissionGate::per_peer`], the gateway's
//! `--max-peer-share`): one peer (a connection, and a client certificate or source address:
//! [`crate::peers`]) may hold at most that share of the pre-admission readers and of the slots
//! and queue places together; beyond it, RESOURCE_EXHAUSTED naming the share.
//!
//! Calls in `vlm_proto::SELF_ADMITTED_PATHS` (long-lived streams) pass without a slot: the
//! service admits their units of work through the shared [`AdmissionGate`] itself. Their
//! messages are charged to the memory budget from each message's header on
//! ([`MeteredMessages`]; the handler takes the charges from the request's [`MessageLedger`]).
//!
//! A streaming call holds its slot until its response body ends or is dropped, not just until the
//! response headers, since that is when a stream's work is done. A queued call waits at most
//! until its deadline ([`DeadlineSource`]: fixed on arrival behind a `DeadlineLayer`), and at
//! most [`MAX_QUEUE_WAIT`] when it has none.
//!
//! Memory is admitted by bytes too: a one-message request reserves its declared length from the
//! service's [`ByteBudget`] before it takes a slot, and holds it as long as the slot (a request
//! larger than the whole budget is refused at once; one that does not fit now waits like a
//! queued call). The services reserve from the same budget what they buffer themselves. The
//! [`AdmissionGate`] (slots, queue and budget) is shared with other front doors of the same
//! service, such as the gateway's OpenAI-compatible HTTP port.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Frame;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::Status;
use vlm_telemetry::metrics::labels::ServiceLabels;
use vlm_telemetry::MeshMetrics;

use crate::peers::{Peer, PeerPermit, PeerShare};
use crate::{
    read_first_message, ByteBudget, BytePermit, DeadlineSource, Metered, MeteredMessages,
    FIRST_MESSAGE_TIMEOUT, MAX_STREAMS_PER_CONNECTION,
};

/// Longest a call without a deadline waits in the queue for a slot.
pub const MAX_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Most of a first message buffered before admission: a larger message is admitted once this
/// much of it has arrived (the rest is read under its slot, and the codec holds it to the
/// server's message limit). Unadmitted calls thus hold at most readers × 4 MiB.
const MAX_PREFETCH_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Calls served at once.
    pub max_in_flight: usize,
    /// Calls waiting for a slot; beyond this, RESOURCE_EXHAUSTED immediately.
    pub max_queue: usize,
}

#[derive(Debug)]
struct Shared {
    limits: AdmissionLimits,
    slots: Arc<Semaphore>,
    /// Calls reading their first message (not yet admitted).
    readers: Arc<Semaphore>,
    waiting: AtomicUsize,
    memory: ByteBudget,
    name: &'static str,
    /// Per-peer bounds, when the gate has them.
    peers: Option<PeerShares>,
}

/// One peer's bounds: of the readers, and of the slots and queue places together.
#[derive(Debug)]
struct PeerShares {
    readers: PeerShare,
    calls: PeerShare,
}

/// A service's admission: its slots, queue and memory budget. Clones share them, so every front
/// door of one service (its gRPC port, the gateway's HTTP port) admits against the same limits.
#[derive(Debug, Clone)]
pub struct AdmissionGate {
    shared: Arc<Shared>,
}

/// A serving slot (and its place in the peer's share), held until dropped.
#[derive(Debug)]
pub struct Slot {
    _slot: OwnedSemaphorePermit,
    _peer: PeerPermit,
}

impl AdmissionGate {
    /// Slots and queue per `limits` for `service` (its gRPC name, the metrics label), request
    /// data bounded by `memory`.
    pub fn new(service: &'static str, limits: AdmissionLimits, memory: ByteBudget) -> Self {
        // The series exist from the start, at zero, so dashboards and alerts see them.
        queue_depth(service, 0);
        let _ = MeshMetrics::global()
            .admission_shed
            .get_or_create(&ServiceLabels { service });
        AdmissionGate {
            shared: Arc::new(Shared {
                limits,
                slots: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
                readers: Arc::new(Semaphore::new(
                    limits.max_in_flight + limits.max_queue + MAX_STREAMS_PER_CONNECTION as usize,
                )),
                waiting: AtomicUsize::new(0),
                memory,
                name: service,
                peers: None,
            }),
        }
    }

    /// Bounds each peer to `share` (0 < share ≤ 1) of the readers and of the slots and queue
    /// places. Call it on a new gate, before it is cloned.
    pub fn per_peer(mut self, share: f64) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("per_peer on a gate not yet cloned");
        let limits = shared.limits;
        let readers = shared.readers.available_permits();
        shared.peers = Some(PeerShares {
            readers: PeerShare::new(
                "calls still sending their request",
                "--max-in-flight + --max-queue + 128",
                readers,
                share,
            ),
            calls: PeerShare::new(
                "calls served or queued",
                "--max-in-flight + --max-queue",
                limits.max_in_flight + limits.max_queue,
                share,
            ),
        });
        self
    }

    /// A slot now, after waiting in the bounded queue (until `deadline`, at most
    /// [`MAX_QUEUE_WAIT`] without one), or the status to answer with (counted as shed).
    pub async fn admit(&self, deadline: Option<Instant>) -> Result<Slot, Status> {
        self.admit_peer(&Peer::new(None, None::<&[&[u8]]>), deadline)
            .await
    }

    /// [`Self::admit`] for a call from `peer`, within the peer's share.
    pub async fn admit_peer(&self, peer: &Peer, deadline: Option<Instant>) -> Result<Slot, Status> {
        let admitted = async {
            // A peer at its share while the service is full anyway hears that it is full.
            let share = self
                .shared
                .take_call_share(peer)
                .map_err(|refusal| self.shared.full().unwrap_or(refusal))?;
            let slot = self.shared.admit(deadline).await?;
            Ok(Slot {
                _slot: slot,
                _peer: share,
            })
        };
        match admitted.await {
            Ok(slot) => Ok(slot),
            Err(status) => {
                count_shed(&self.shared);
                Err(status)
            }
        }
    }

    /// Calls holding a slot or waiting for one now.
    pub fn load(&self) -> usize {
        let s = &self.shared;
        let in_flight = s.limits.max_in_flight.max(1) - s.slots.available_permits();
        in_flight + s.waiting.load(Ordering::Acquire)
    }

    /// Keeps `vlm_saturation{service}` at [`Self::load`] / `capacity` (the work the service
    /// does at once), sampled every `every`, for as long as the process runs.
    pub fn report_saturation(&self, capacity: usize, every: std::time::Duration) {
        let gate = self.clone();
        let gauge = MeshMetrics::global()
            .saturation
            .get_or_create(&ServiceLabels {
                service: self.shared.name,
            })
            .clone();
        let capacity = capacity.max(1) as f64;
        tokio::spawn(async move {
            loop {
                gauge.set(gate.load() as f64 / capacity);
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The service's memory budget.
    pub fn memory(&self) -> &ByteBudget {
        &self.shared.memory
    }
}

/// Wraps a tonic service (keeps its `NamedService` name, so it is added to a server as is).
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: NamedService> Admission<S> {
    /// Admission at `limits` with the default memory budget.
    pub fn new(inner: S, limits: AdmissionLimits) -> Self {
        let memory = ByteBudget::new(
            S::NAME,
            crate::DEFAULT_MAX_BYTES_IN_FLIGHT,
            limits.max_queue,
        );
        Admission::with_gate(inner, AdmissionGate::new(S::NAME, limits, memory))
    }

    /// Admission through `gate` (shared with the service's other front doors).
    pub fn with_gate(inner: S, gate: AdmissionGate) -> Self {
        Admission {
            inner,
            shared: gate.shared,
        }
    }
}

/// The same as a tower layer, for building stacks: `AdmissionLayer::new(gate).layer(svc)`.
#[derive(Debug, Clone)]
pub struct AdmissionLayer(AdmissionGate);

impl AdmissionLayer {
    pub fn new(gate: AdmissionGate) -> Self {
        AdmissionLayer(gate)
    }
}

impl<S: NamedService> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;
    fn layer(&self, inner: S) -> Admission<S> {
        Admission::with_gate(inner, self.0.clone())
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl Shared {
    fn take_call_share(&self, peer: &Peer) -> Result<PeerPermit, Status> {
        match &self.peers {
            Some(p) => p.calls.take(peer),
            None => Ok(PeerPermit::none()),
        }
    }

    fn take_reader_share(&self, peer: &Peer) -> Result<PeerPermit, Status> {
        match &self.peers {
            Some(p) => p.readers.take(peer),
            None => Ok(PeerPermit::none()),
        }
    }

    /// The overload refusal, when every slot is taken and the queue is full.
    fn full(&self) -> Option<Status> {
        let queued = self.waiting.load(Ordering::Acquire);
        (self.slots.available_permits() == 0 && queued >= self.limits.max_queue)
            .then(|| self.overloaded(queued))
    }

    fn overloaded(&self, queued: usize) -> Status {
        Status::resource_exhausted(format!(
            "{} overloaded: {} calls in flight and {} queued (limits {} and {}); retry later",
            self.name,
            self.limits.max_in_flight,
            queued,
            self.limits.max_in_flight,
            self.limits.max_queue
        ))
    }

    /// A slot now, a slot after waiting in the bounded queue (at most until the caller's
    /// deadline), or the status to answer with.
    async fn admit(&self, deadline: Option<Instant>) -> Result<OwnedSemaphorePermit, Status> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        // A place in the queue only while there is one: a call that is shed never counts as
        // waiting, so the queue (and its gauge) never exceeds `max_queue`.
        let mut queued = self.waiting.load(Ordering::Acquire);
        loop {
            if queued >= self.limits.max_queue {
                return Err(self.overloaded(queued));
            }
            match self.waiting.compare_exchange_weak(
                queued,
                queued + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => queued = now,
            }
        }
        let _leave = WaitingGuard(&self.waiting, self.name);
        queue_depth(self.name, queued + 1);
        let acquire = self.slots.clone().acquire_owned();
        let permit = match deadline {
            Some(at) => tokio::time::timeout_at(at, acquire).await.map_err(|_| {
                Status::deadline_exceeded(format!(
                    "{}: deadline passed while queued for a slot",
                    self.name
                ))
            })?,
            None => tokio::time::timeout(MAX_QUEUE_WAIT, acquire)
                .await
                .map_err(|_| {
                    Status::resource_exhausted(format!(
                        "{} overloaded: no slot within {} s; retry later",
                        self.name,
                        MAX_QUEUE_WAIT.as_secs()
                    ))
                })?,
        };
        permit.map_err(|_| Status::unavailable(format!("{} is shutting down", self.name)))
    }
}

impl Shared {
    /// The request with its first message read (see the module docs), or the status to answer.
    async fn read_first_message(
        &self,
        req: Request<Body>,
        peer: &Peer,
        deadline: Option<Instant>,
    ) -> Result<(Request<Body>, u64), Status> {
        let _share = self.take_reader_share(peer)?;
        let _reader = self.readers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{} overloaded: too many calls are still sending their request; retry later",
                self.name
            ))
        })?;
        let timeout = deadline.map_or(FIRST_MESSAGE_TIMEOUT, |at| {
            at.saturating_duration_since(Instant::now())
                .min(FIRST_MESSAGE_TIMEOUT)
        });
        let (parts, body) = req.into_parts();
        let (body, declared) = read_first_message(body, MAX_PREFETCH_BYTES, timeout).await?;
        Ok((Request::from_parts(parts, body), declared))
    }
}

/// Counts a refused call and answers it.
fn shed(shared: &Shared, status: Status) -> Response<Body> {
    count_shed(shared);
    status.into_http()
}

fn count_shed(shared: &Shared) {
    MeshMetrics::global()
        .admission_shed
        .get_or_create(&ServiceLabels {
            service: shared.name,
        })
        .inc();
}

struct WaitingGuard<'a>(&'a AtomicUsize, &'static str);
impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        let before = self.0.fetch_sub(1, Ordering::AcqRel);
        queue_depth(self.1, before.saturating_sub(1));
    }
}

fn queue_depth(service: &'static str, depth: usize) {
    MeshMetrics::global()
        .admission_queue_depth
        .get_or_create(&ServiceLabels { service })
        .set(i64::try_from(depth).unwrap_or(i64::MAX));
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The service that was polled ready serves this call; a fresh clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let deadline = req.call_deadline();
            let peer = Peer::of_http(&req);
            if vlm_proto::SELF_ADMITTED_PATHS.contains(&req.uri().path()) {
                // Its messages are charged to the budget as they arrive; the handler takes
                // each one's charge from the ledger.
                let (mut parts, body) = req.into_parts();
                let what = "a stream message";
                let (body, ledger) = MeteredMessages::new(body, shared.memory.clone(), peer, what);
                parts.extensions.insert(ledger);
                return inner
                    .call(Request::from_parts(parts, Body::new(body)))
                    .await;
            }
            let (req, memory) = if vlm_proto::UNARY_REQUEST_PATHS.contains(&req.uri().path()) {
                let reserved = async {
                    const WHAT: &str = "the request message";
                    let (req, declared) = shared.read_first_message(req, &peer, deadline).await?;
                    // Refused at once if it could never fit; otherwise what has been read is
                    // reserved now (waiting for room), and the rest as it arrives.
                    shared.memory.check_size(declared, WHAT)?;
                    let read = declared.min(MAX_PREFETCH_BYTES as u64);
                    let memory = shared
                        .memory
                        .reserve_for(&peer, read, WHAT, deadline)
                        .await?;
                    let memory = Arc::new(std::sync::Mutex::new(memory));
                    let (parts, body) = req.into_parts();
                    let body = Body::new(Metered::new(body, memory.clone(), WHAT));
                    Ok::<_, Status>((Request::from_parts(parts, body), Some(memory)))
                };
                match reserved.await {
                    Ok(r) => r,
                    Err(status) => return Ok(shed(&shared, status)),
                }
            } else {
                (req, None)
            };
            let share = match shared.take_call_share(&peer) {
                Ok(p) => p,
                Err(status) => return Ok(shed(&shared, status)),
            };
            let permit = match shared.admit(deadline).await {
                Ok(p) => p,
                Err(status) => return Ok(shed(&shared, status)),
            };
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| {
                Body::new(PermitBody {
                    inner: body,
                    _permit: permit,
                    _share: share,
                    _memory: memory,
                })
            }))
        })
    }
}

/// A response body that keeps its call's slot (and its request's bytes) until it ends or is
/// dropped.
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
    _share: PeerPermit,
    _memory: Option<Arc<std::sync::Mutex<BytePermit>>>,
}

impl http_body::Body for PermitBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod tests;
