//! The one way the gateway calls a stage. A [`Stage`] is a replica set with its retry policy and
//! adaptive timeout; a [`StageCall`] is one request's calls to it: it picks replicas (never one
//! this request already gave up on), bounds waits by the adaptive timeout while another replica is
//! left, books failures against replicas, and decides, with the retry budget and backoff, whether
//! to try again; every retry is logged, counted and recorded as a span event here.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;
use vlm_net::{
    is_retryable, AdaptiveTimeout, AdaptiveTimeoutOptions, Lease, PeerPace, ReplicaSet,
    RetryOptions, RetryPolicy,
};
use vlm_telemetry::metrics::labels::{AbandonLabels, AbandonReason, RouteReason};
use vlm_telemetry::MeshMetrics;

use crate::routing::{self, RouteKey, Router};

/// One stage as the gateway calls it: its replicas, its retry policy and its adaptive timeout.
pub(crate) struct Stage {
    /// "encoder", "projector" or "decoder": prefixes this stage's errors.
    pub name: &'static str,
    replicas: Arc<ReplicaSet>,
    retry: RetryPolicy,
    /// Per unit of work (image, row block, decode step).
    pub timeout: AdaptiveTimeout,
}

impl Stage {
    pub fn new(
        name: &'static str,
        replicas: Arc<ReplicaSet>,
        retry: RetryOptions,
        timeouts: AdaptiveTimeoutOptions,
        unit: &'static str,
    ) -> Self {
        Stage {
            name,
            replicas,
            retry: RetryPolicy::new(retry),
            timeout: AdaptiveTimeout::new(unit, timeouts),
        }
    }

    /// A request's calls to this stage, bounded by `deadline`; counts towards the retry budget.
    pub fn call(self: &Arc<Self>, deadline: Instant) -> StageCall {
        self.retry.record_call();
        StageCall {
            stage: self.clone(),
            tried: Vec::new(),
            attempt: 1,
            deadline,
            route: None,
            reason: None,
        }
    }
}

/// A failed attempt at one stage; `status` says whether another replica may do better.
#[derive(Debug)]
pub(crate) struct Failure {
    pub stage: &'static str,
    pub status: Status,
}

impl Failure {
    pub fn new(stage: &'static str, status: Status) -> Self {
        Failure { stage, status }
    }

    /// The request itself went away (not a stage's fault; never retried).
    pub fn cancelled() -> Self {
        Failure::new("gateway", Status::cancelled("request cancelled"))
    }

    pub fn into_status(self) -> Status {
        stage_status(self.stage, self.status)
    }
}

/// Marks which stage failed; keeps the code (UNAVAILABLE, DEADLINE_EXCEEDED, INVALID_ARGUMENT…).
pub(crate) fn stage_status(stage: &str, s: Status) -> Status {
    if stage == "gateway" || s.message().starts_with(stage) {
        return s;
    }
    Status::new(s.code(), format!("{stage}: {}", s.message()))
}

/// One request's calls to one stage.
pub(crate) struct StageCall {
    pub stage: Arc<Stage>,
    /// Replicas this request has given up on.
    tried: Vec<u64>,
    attempt: u32,
    pub deadline: Instant,
    /// Routes every pick by this key (the decoder's prefix-aware routing).
    route: Option<(Arc<Router>, RouteKey)>,
    /// Why the first pick went where it did, when routed.
    pub reason: Option<RouteReason>,
}

impl StageCall {
    /// Picks replicas for `key` with `router` from now on.
    pub fn routed(mut self, router: Arc<Router>, key: RouteKey) -> Self {
        self.route = Some((router, key));
        self
    }

    /// A healthy replica this request has not given up on, or the stage's reason why none is.
    pub fn pick(&mut self) -> Result<Lease, Failure> {
        let replicas = &self.stage.replicas;
        let fail = |status| Failure::new(self.stage.name, status);
        let Some((router, key)) = &self.route else {
            return replicas.pick(&self.tried).map_err(fail);
        };
        let mut reason = RouteReason::balanced;
        let lease = replicas
            .pick_with(&self.tried, |candidates| {
                let d = router.choose(key, candidates);
                reason = d.reason;
                d.index
            })
            .map_err(fail)?;
        let live: Vec<u64> = replicas.replicas().iter().map(|r| r.id).collect();
        router.record(key, lease.id(), &live);
        routing::count(reason);
        self.reason.get_or_insert(reason);
        Ok(lease)
    }

    /// Whether `current`, which has kept this call waiting `waited` for `units` of work, is
    /// slower than its peers (the replicas this request has not given up on that are healthy or
    /// busy with its other calls): only then is the call abandoned for slowness. When every
    /// replica is as slow, waiting is cheaper than doing the work again elsewhere. With no peer
    /// heard from lately, the wait's own limit decides (a stuck replica among idle ones is
    /// abandoned).
    pub fn is_outlier(
        &self,
        current: &Lease,
        timeout: &AdaptiveTimeout,
        waited: Duration,
        units: f64,
    ) -> bool {
        let peers: Vec<PeerPace> = self
            .stage
            .replicas
            .replicas()
            .iter()
            // A busy replica counts even when its health check failed: its silence is evidence
            // that every replica is slow (a saturated machine answers health checks late too).
            .filter(|r| r.id != current.id() && !self.tried.contains(&r.id))
            .filter(|r| r.is_healthy() || r.in_flight() > 0)
            .map(|r| PeerPace {
                id: r.id,
                busy: r.in_flight() > 0,
            })
            .collect();
        timeout.is_outlier(waited, units, &peers).unwrap_or(true)
    }

    /// Awaits `fut`, which `current` has worked on since `since`: each time `limit` passes
    /// without it, the call is given up (`Err(limit)`) only if `current` is an outlier among
    /// its peers ([`Self::is_outlier`] for `units` of work) or the deadline has passed; else it
    /// waits another `limit`.
    pub async fn wait_unless_outlier<T>(
        &self,
        current: &Lease,
        timeout: &AdaptiveTimeout,
        units: f64,
        since: Instant,
        limit: Duration,
        fut: impl Future<Output = T>,
    ) -> Result<T, Duration> {
        tokio::pin!(fut);
        let mut due = since + limit;
        loop {
            tokio::select! {
                v = &mut fut => return Ok(v),
                _ = tokio::time::sleep_until(due.min(self.deadline)) => {}
            }
            let now = Instant::now();
            if now >= self.deadline || self.is_outlier(current, timeout, now - since, units) {
                return Err(limit);
            }
            due = now + limit.max(Duration::from_millis(1));
        }
    }

    /// How long `units` of work on `current` may take by `timeout`, if another healthy replica is
    /// left to go to; otherwise only the deadline bounds the wait (abandoning a slow call to queue
    /// again on the same replica would only make it slower).
    pub fn limit(&self, current: &Lease, timeout: &AdaptiveTimeout, units: f64) -> Duration {
        if self.has_alternative(current) {
            timeout.limit(units, self.deadline)
        } else {
            self.remaining()
        }
    }

    /// Like [`Self::limit`] with the clamp's maximum: for waits that say little about the replica
    /// (queueing for a slot).
    pub fn max_limit(&self, current: &Lease, timeout: &AdaptiveTimeout) -> Duration {
        if self.has_alternative(current) {
            timeout.max_limit(self.deadline)
        } else {
            self.remaining()
        }
    }

    fn has_alternative(&self, current: &Lease) -> bool {
        let mut exclude = self.tried.clone();
        exclude.push(current.id());
        self.stage.replicas.has_alternative(&exclude)
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Books a failed call: a retryable failure excludes the replica from this request's further
    /// attempts and ejects it from the set until a health check passes.
    pub fn failed(&mut self, lease: Lease, status: Status) -> Failure {
        if is_retryable(&status) {
            self.tried.push(lease.id());
            lease.unreachable(&format!("{:?}: {}", status.code(), status.message()));
        }
        Failure::new(self.stage.name, status)
    }

    /// Books a call given up on after `limit` (the replica answers, but too slowly), or the
    /// request's deadline passing.
    pub fn too_slow(
        &mut self,
        lease: Lease,
        limit: Duration,
        what: &str,
        reason: AbandonReason,
    ) -> Failure {
        if Instant::now() >= self.deadline {
            return self.deadline_failure();
        }
        tracing::warn!(
            stage = self.stage.name,
            replica = lease.url(),
            limit_ms = limit.as_millis() as u64,
            "{} slower than its adaptive timeout; call abandoned",
            self.stage.name
        );
        let status = Status::unavailable(format!(
            "replica {} {what} within the adaptive timeout of {} ms",
            lease.url(),
            limit.as_millis()
        ));
        self.tried.push(lease.id());
        lease.abandoned();
        MeshMetrics::global()
            .gateway_abandoned
            .get_or_create(&AbandonLabels {
                stage: self.stage.name,
                reason,
            })
            .inc();
        Failure::new(self.stage.name, status)
    }

    pub fn deadline_failure(&self) -> Failure {
        Failure::new(
            self.stage.name,
            Status::deadline_exceeded("request deadline exceeded"),
        )
    }

    /// After a failed attempt: waits the backoff and returns Ok when another attempt may follow
    /// (`kind`: `retry` before any output reached the client, `failover` after), or the status to
    /// give up with.
    pub async fn again(&mut self, f: Failure, kind: &'static str) -> Result<(), Status> {
        if f.stage == "gateway" {
            return Err(f.status);
        }
        let Some(pause) = self
            .stage
            .retry
            .next_retry(self.attempt, &f.status, self.deadline)
        else {
            return Err(self.final_status(f));
        };
        tracing::info!(
            stage = f.stage,
            attempt = self.attempt,
            kind,
            "{} failed; trying another replica: {}",
            f.stage,
            f.status.message()
        );
        retry_event(kind, f.stage, self.attempt, &f.status);
        tokio::time::sleep(pause).await;
        self.attempt += 1;
        Ok(())
    }

    /// The status to give up with: once the deadline has passed, whatever a hop said (tonic's own
    /// client timer reports CANCELLED), the answer is DEADLINE_EXCEEDED.
    fn final_status(&self, f: Failure) -> Status {
        if Instant::now() >= self.deadline {
            return Status::deadline_exceeded(format!(
                "request deadline exceeded ({}: {})",
                f.stage,
                f.status.message()
            ));
        }
        if self.attempt > 1 && is_retryable(&f.status) {
            let msg = format!(
                "{} (gave up after {} attempts)",
                f.status.message(),
                self.attempt
            );
            return stage_status(f.stage, Status::new(f.status.code(), msg));
        }
        f.into_status()
    }

    /// Opens a call with `open` on a replica, retrying on others while failures are retryable;
    /// the lease of the replica that answered comes back with the call.
    pub async fn open<T, F, Fut>(&mut self, mut open: F) -> Result<(Lease, T), Status>
    where
        F: FnMut(&Lease) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        loop {
            let failure = match self.pick() {
                Err(f) => f,
                Ok(lease) => match tokio::time::timeout_at(self.deadline, open(&lease)).await {
                    Ok(Ok(v)) => return Ok((lease, v)),
                    Ok(Err(s)) => self.failed(lease, s),
                    Err(_) => self.deadline_failure(),
                },
            };
            self.again(failure, "retry").await?;
        }
    }

    /// Like [`Self::open`], with each attempt bounded by the stage's adaptive timeout for `units`
    /// of work (while another replica is left to go to): a replica that answers too slowly is
    /// abandoned for another, and the time a successful attempt took is observed.
    pub async fn open_timed<T, F, Fut>(
        &mut self,
        units: f64,
        mut open: F,
    ) -> Result<(Lease, T), Status>
    where
        F: FnMut(&Lease) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        loop {
            let failure = match self.pick() {
                Err(f) => f,
                Ok(lease) => {
                    let timeout = &self.stage.timeout;
                    let limit = self.limit(&lease, timeout, units);
                    let started = Instant::now();
                    let call = open(&lease);
                    match self
                        .wait_unless_outlier(&lease, timeout, units, started, limit, call)
                        .await
                    {
                        Ok(Ok(v)) => {
                            timeout.observe(lease.id(), started.elapsed(), units);
                            return Ok((lease, v));
                        }
                        Ok(Err(s)) => self.failed(lease, s),
                        Err(limit) => {
                            self.too_slow(lease, limit, "did not answer", AbandonReason::slow)
                        }
                    }
                }
            };
            self.again(failure, "retry").await?;
        }
    }

    /// A unary call, retried like [`Self::open`]; the replica is credited with the success.
    pub async fn unary<T, F, Fut>(&mut self, call: F) -> Result<T, Status>
    where
        F: FnMut(&Lease) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let (lease, v) = self.open(call).await?;
        lease.success();
        Ok(v)
    }
}

/// A retry or failover as an event on the request's span, with the reason, so the trace says
/// why a stage was called twice; and in `vlm_gateway_retries_total`.
fn retry_event(kind: &'static str, stage: &str, attempt: u32, status: &Status) {
    vlm_telemetry::span_event(
        kind,
        &[
            ("vlm.stage", stage.to_string()),
            ("vlm.attempt", attempt.to_string()),
            ("rpc.grpc.status_code", (status.code() as i32).to_string()),
            ("reason", status.message().to_string()),
        ],
    );
    vlm_telemetry::metrics::stage_retry(stage, kind);
}
