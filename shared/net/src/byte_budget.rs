//! Memory admitted by bytes, not by count: a service's budget of request data held at once.
//!
//! Counting calls bounds memory only when every call is small; one 60 MB request costs as much as
//! a thousand small ones. A [`ByteBudget`] is a budget of bytes shared by everything a service
//! holds for its requests: the request messages the admission layer lets in (their declared
//! length, reserved before the rest of the message is read), the projected image embeddings the
//! gateway keeps for a request, the embeddings a decoder receives before its request is
//! scheduled, an HTTP body being read.
//!
//! A reservation larger than the whole budget is refused at once (it could never be served); one
//! that does not fit now waits, first come first served, until its deadline (at most
//! [`MAX_QUEUE_WAIT`](crate::admission::MAX_QUEUE_WAIT) without one), with at most `max_waiting`
//! reservations waiting; beyond that, RESOURCE_EXHAUSTED at once. A waiting reservation holds
//! nothing until all of it fits. A request that already holds memory and needs more
//! ([`BytePermit::try_grow`]) never waits (two requests could wait on each other) and goes before
//! the waiting ones (finishing it is what frees memory); it fails with RESOURCE_EXHAUSTED only
//! when the budget itself is full.
//!
//! (tokio's semaphore would hand a waiting reservation part of what it asks for as memory frees
//! up, starving the running requests' growth: hence this small queue of its own.)

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Status;
use vlm_telemetry::metrics::labels::{MemoryBudgetLabels, MemoryState, ServiceLabels};
use vlm_telemetry::MeshMetrics;

use crate::admission::MAX_QUEUE_WAIT;
use crate::peers::{Peer, PeerPermit, PeerShare};

/// Default `--max-bytes-in-flight`: 512 MiB of request data per service (64 requests of a 1 MB
/// image and LLaVA-7B's 4.7 MB of f16 embeddings each need 370 MB at the gateway).
pub const DEFAULT_MAX_BYTES_IN_FLIGHT: u64 = 512 << 20;

/// A service's budget of bytes in flight. Clones share it.
#[derive(Debug, Clone)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: &'static str,
    limit: u64,
    max_waiting: usize,
    state: Mutex<State>,
    /// Each peer's share of the budget, when bounded ([`ByteBudget::per_peer`]).
    peers: Option<PeerShare>,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    next_id: u64,
    /// Reservations waiting for room, oldest first; each is granted (bytes added to `used`, the
    /// sender fired) when all of it fits and everyone before it was granted.
    waiting: VecDeque<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    bytes: u64,
    grant: oneshot::Sender<()>,
}

impl State {
    /// Grants waiting reservations, in order, while the oldest fits.
    fn grant(&mut self, limit: u64) {
        while let Some(w) = self.waiting.front() {
            if w.grant.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if self.used + w.bytes > limit {
                return;
            }
            let w = self.waiting.pop_front().expect("front exists");
            self.used += w.bytes;
            if w.grant.send(()).is_err() {
                self.used -= w.bytes; // it stopped waiting just now
            }
        }
    }
}

/// Bytes held from a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub struct BytePermit {
    budget: ByteBudget,
    bytes: u64,
    /// The same bytes in the peer's share (none for a permit of no peer).
    peer: PeerPermit,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

impl ByteBudget {
    /// `total_bytes` for `service` (a metrics label, e.g. `vlm.v1.Decoder`); at most
    /// `max_waiting` reservations wait for room at once.
    pub fn new(service: &'static str, total_bytes: u64, max_waiting: usize) -> Self {
        let budget = ByteBudget {
            inner: Arc::new(Inner {
                service,
                limit: total_bytes,
                max_waiting,
                state: Mutex::new(State::default()),
                peers: None,
            }),
        };
        budget.gauge(MemoryState::limit, total_bytes);
        budget.gauge(MemoryState::used, 0);
        // Every series this budget records exists from the start, at zero.
        budget.waiting_gauge(0);
        let _ = MeshMetrics::global()
            .memory_budget_refused
            .get_or_create(&ServiceLabels { service });
        budget
    }

    /// Bounds what one peer's permits ([`Self::empty_for`], [`Self::reserve_for`]) hold together
    /// to `share` of the budget. Call it on a new budget, before it is cloned.
    pub fn per_peer(mut self, share: f64) -> Self {
        let inner = Arc::get_mut(&mut self.inner).expect("per_peer on a budget not yet cloned");
        let total = usize::try_from(inner.limit).unwrap_or(usize::MAX);
        inner.peers = Some(PeerShare::new(
            "bytes of request data",
            "--max-bytes-in-flight",
            total,
            share,
        ));
        self
    }

    /// An empty permit of `peer`, to grow with [`BytePermit::try_grow`] within the peer's share.
    pub fn empty_for(&self, peer: &Peer) -> BytePermit {
        let mut permit = self.permit(0);
        if let Some(share) = &self.inner.peers {
            permit.peer = share.empty(peer);
        }
        permit
    }

    /// [`Self::reserve`] for `peer`: refused at once (RESOURCE_EXHAUSTED) when it would take the
    /// peer beyond its share; otherwise waits for room like any reservation.
    pub async fn reserve_for(
        &self,
        peer: &Peer,
        bytes: u64,
        what: &str,
        deadline: Option<Instant>,
    ) -> Result<BytePermit, Status> {
        self.check_size(bytes, what)?;
        let mut share = match &self.inner.peers {
            Some(s) => s.empty(peer),
            None => PeerPermit::none(),
        };
        share.try_grow(usize::try_from(bytes).unwrap_or(usize::MAX))?;
        let mut permit = self.reserve(bytes, what, deadline).await?;
        permit.peer = share;
        Ok(permit)
    }

    /// The whole budget, in bytes.
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `bytes` for `what` (named in errors), waiting for room until `deadline` (at most
    /// [`MAX_QUEUE_WAIT`] without one).
    pub async fn reserve(
        &self,
        bytes: u64,
        what: &str,
        deadline: Option<Instant>,
    ) -> Result<BytePermit, Status> {
        self.check_size(bytes, what)?;
        let (id, granted) = {
            let mut st = self.lock();
            if st.waiting.is_empty() && st.used + bytes <= self.inner.limit {
                st.used += bytes;
                drop(st);
                return Ok(self.permit(bytes));
            }
            let queued = st.waiting.len();
            if queued >= self.inner.max_waiting {
                let used = st.used;
                drop(st);
                return Err(self.overloaded(
                    what,
                    bytes,
                    used,
                    &format!(", with {queued} more waiting"),
                ));
            }
            let id = st.next_id;
            st.next_id += 1;
            let (grant, granted) = oneshot::channel();
            st.waiting.push_back(Waiter { id, bytes, grant });
            self.waiting_gauge(st.waiting.len());
            (id, granted)
        };
        let mut wait = Wait {
            budget: self,
            id,
            bytes,
            granted: Some(granted),
        };
        let at = deadline.unwrap_or_else(|| Instant::now() + MAX_QUEUE_WAIT);
        let outcome = tokio::time::timeout_at(at, wait.granted.as_mut().expect("set")).await;
        if let Ok(Ok(())) = outcome {
            wait.granted = None; // ours now
            return Ok(self.permit(bytes));
        }
        drop(wait); // leaves the queue, or gives back a grant that raced the timeout
        let (used, limit) = (mib(self.used()), mib(self.limit()));
        Err(match deadline {
            Some(_) => {
                let refused = self.refuse(format!(
                    "{}: deadline passed while {what} waited for {} of memory ({used} of {limit} in use)",
                    self.inner.service,
                    mib(bytes),
                ));
                Status::deadline_exceeded(refused.message())
            }
            None => self.refuse(format!(
                "{} overloaded: {what} waited {} s for {} of memory ({used} of {limit} in use); retry later",
                self.inner.service,
                MAX_QUEUE_WAIT.as_secs(),
                mib(bytes),
            )),
        })
    }

    /// An empty permit, to grow with [`BytePermit::try_grow`].
    pub fn empty(&self) -> BytePermit {
        self.permit(0)
    }

    fn take_now(&self, bytes: u64, what: &str) -> Result<(), Status> {
        self.check_size(bytes, what)?;
        let mut st = self.lock();
        if st.used + bytes > self.inner.limit {
            let used = st.used;
            drop(st);
            return Err(self.overloaded(what, bytes, used, ""));
        }
        st.used += bytes;
        Ok(())
    }

    /// RESOURCE_EXHAUSTED at once when `bytes` could never fit the whole budget.
    pub fn check_size(&self, bytes: u64, what: &str) -> Result<(), Status> {
        if bytes > self.inner.limit {
            return Err(self.refuse(format!(
                "{what} needs {}, more than {}'s whole memory budget of {} (--max-bytes-in-flight)",
                mib(bytes),
                self.inner.service,
                mib(self.limit()),
            )));
        }
        Ok(())
    }

    fn release(&self, bytes: u64) {
        let mut st = self.lock();
        st.used -= bytes;
        st.grant(self.inner.limit);
        let (used, waiting) = (st.used, st.waiting.len());
        drop(st);
        self.gauge(MemoryState::used, used);
        self.waiting_gauge(waiting);
    }

    /// RESOURCE_EXHAUSTED (counted) for `what`, which needs `bytes` while `used` is held.
    fn overloaded(&self, what: &str, bytes: u64, used: u64, detail: &str) -> Status {
        self.refuse(format!(
            "{} overloaded: {what} needs {} and {} of its {} memory budget is in use{detail}; retry later",
            self.inner.service,
            mib(bytes),
            mib(used),
            mib(self.limit()),
        ))
    }

    /// Counts a refusal; the status is RESOURCE_EXHAUSTED.
    fn refuse(&self, message: String) -> Status {
        MeshMetrics::global()
            .memory_budget_refused
            .get_or_create(&ServiceLabels {
                service: self.inner.service,
            })
            .inc();
        Status::resource_exhausted(message)
    }

    fn permit(&self, bytes: u64) -> BytePermit {
        self.gauge(MemoryState::used, self.used());
        BytePermit {
            budget: self.clone(),
            bytes,
            peer: PeerPermit::none(),
        }
    }

    fn waiting_gauge(&self, waiting: usize) {
        MeshMetrics::global()
            .memory_budget_waiting
            .get_or_create(&ServiceLabels {
                service: self.inner.service,
            })
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    fn gauge(&self, state: MemoryState, bytes: u64) {
        MeshMetrics::global()
            .memory_budget_bytes
            .get_or_create(&MemoryBudgetLabels {
                service: self.inner.service,
                state,
            })
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
}

/// A reservation waiting in the queue; dropped unfinished (timeout, or the caller went away), it
/// leaves the queue, or gives back what was granted to it meanwhile.
struct Wait<'a> {
    budget: &'a ByteBudget,
    id: u64,
    bytes: u64,
    granted: Option<oneshot::Receiver<()>>,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        let Some(mut granted) = self.granted.take() else {
            return;
        };
        let mut st = self.budget.lock();
        if let Some(pos) = st.waiting.iter().position(|w| w.id == self.id) {
            st.waiting.remove(pos);
            let waiting = st.waiting.len();
            drop(st);
            self.budget.waiting_gauge(waiting);
        } else if granted.try_recv().is_ok() {
            drop(st);
            self.budget.release(self.bytes);
        }
    }
}

impl BytePermit {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Holds `bytes` more, now or never (RESOURCE_EXHAUSTED), before any waiting reservation.
    pub fn try_grow(&mut self, bytes: u64, what: &str) -> Result<(), Status> {
        let units = usize::try_from(bytes).unwrap_or(usize::MAX);
        self.peer.try_grow(units)?;
        if let Err(status) = self.budget.take_now(bytes, what) {
            self.peer.shrink(units);
            return Err(status);
        }
        self.bytes += bytes;
        self.budget.gauge(MemoryState::used, self.budget.used());
        Ok(())
    }
}

impl BytePermit {
    /// Holds exactly `bytes`: gives back what is above it, or takes what is missing now or never
    /// (RESOURCE_EXHAUSTED, holding what it held).
    pub fn resize(&mut self, bytes: u64, what: &str) -> Result<(), Status> {
        if bytes > self.bytes {
            return self.try_grow(bytes - self.bytes, what);
        }
        let give = self.bytes - bytes;
        self.bytes = bytes;
        if give > 0 {
            self.peer
                .shrink(usize::try_from(give).unwrap_or(usize::MAX));
            self.budget.release(give);
        }
        Ok(())
    }
}

impl Drop for BytePermit {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.release(self.bytes);
        }
    }
}

#[cfg(test)]
#[path = "byte_budget_tests.rs"]
mod tests;
