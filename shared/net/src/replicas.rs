//! Replicas of one stage and how a caller picks one: discovery (a static URL list, or DNS names
//! re-resolved periodically the way a Kubernetes headless Service presents pods), active health
//! checks that eject and re-admit replicas, passive ejection on transport failures, and
//! power-of-two-choices over a peak-EWMA latency estimate.
//!
//! Why not `tower::balance::p2c::Balance` as a service: it picks a replica inside `call`, so a
//! caller cannot say "anywhere but the replica that just failed", which call-level retries and
//! decoder failover need; and tonic streaming requests are not `Clone`, so the balancer could not
//! replay them anyway. The algorithm is the same (Finagle's peak EWMA, as in `tower::load`), made
//! into a small picker that returns a [`Lease`] on one replica's channel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::Status;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::{lazy_channel, url_host, ChannelOptions, ClientTls, NetError};
use peak_ewma::PeakEwma;

mod peak_ewma;
use vlm_telemetry::GrpcClientTrace;

/// A mesh channel with trace-context propagation (see [`vlm_telemetry::grpc`]).
pub type TracedChannel = GrpcClientTrace<Channel>;

/// Makes the client TLS for a server name (None = plaintext, for tests without TLS).
pub type TlsForHost =
    Arc<dyn Fn(&str) -> Result<Option<ClientTls>, NetError> + Send + Sync + 'static>;

/// How a [`ReplicaSet`] finds and watches its replicas.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// Interval of the active health checks (grpc.health.v1 Check on every replica).
    pub health_interval: Duration,
    /// How often `dns://` names are re-resolved.
    pub dns_refresh: Duration,
    /// Time constant of the peak-EWMA latency estimate (how fast a slow replica is forgiven).
    pub ewma_decay: Duration,
    /// Latency assumed for a replica with no observation yet.
    pub default_rtt: Duration,
    /// How `dns://` names are resolved (the system resolver by default).
    pub resolver: crate::Resolver,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            health_interval: Duration::from_secs(1),
            dns_refresh: Duration::from_secs(5),
            ewma_decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
            resolver: crate::Resolver::system(),
        }
    }
}

/// One replica: its channel, health and load.
pub struct Replica {
    pub id: u64,
    /// `https://addr:port` (for `dns://` names: the resolved address).
    pub url: String,
    channel: Channel,
    healthy: AtomicBool,
    load: Mutex<PeakEwma>,
    /// Calls picked onto this replica since start (tests and logs read it).
    pub calls: AtomicU64,
    /// Prompt positions this caller's calls on the replica still have to prefill (see
    /// [`Replica::begin_prefill`]).
    prefilling: AtomicU64,
}

impl Replica {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn cost(&self, now: Instant) -> f64 {
        self.load.lock().expect("load lock").cost(now)
    }

    /// Calls this caller has in flight on the replica now.
    pub fn in_flight(&self) -> usize {
        self.load.lock().expect("load lock").pending.len()
    }

    /// Prompt positions this caller's calls on the replica still have to prefill: work that
    /// delays every other call's next step there (a decoder runs one prefill chunk per step).
    pub fn prefilling(&self) -> u64 {
        self.prefilling.load(Ordering::Relaxed)
    }

    /// Counts `positions` in [`Self::prefilling`] until the guard is dropped (the call's first
    /// token, or its end).
    pub fn begin_prefill(self: &Arc<Self>, positions: u64) -> PrefillGuard {
        self.prefilling.fetch_add(positions, Ordering::Relaxed);
        PrefillGuard {
            replica: self.clone(),
            positions,
        }
    }
}

/// A call's prefill counted on its replica; see [`Replica::begin_prefill`].
pub struct PrefillGuard {
    replica: Arc<Replica>,
    positions: u64,
}

impl Drop for PrefillGuard {
    fn drop(&mut self) {
        self.replica
            .prefilling
            .fetch_sub(self.positions, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("healthy", &self.is_healthy())
            .finish()
    }
}

/// A picked replica, held for the duration of one call. Dropping it without [`Lease::success`]
/// records nothing about latency (the call failed or was cancelled).
pub struct Lease {
    replica: Arc<Replica>,
    call: u64,
    started: Instant,
    stage: Arc<str>,
}

impl Lease {
    /// The replica's channel, wrapped so every call through it opens a client span and carries
    /// the W3C trace context to the server.
    pub fn channel(&self) -> TracedChannel {
        GrpcClientTrace::new(self.replica.channel.clone())
    }
    pub fn replica(&self) -> &Arc<Replica> {
        &self.replica
    }
    pub fn id(&self) -> u64 {
        self.replica.id
    }
    pub fn url(&self) -> &str {
        &self.replica.url
    }

    /// Records the latency of a call (or of the part of it the caller times) for balancing.
    pub fn observe(&self, latency: Duration) {
        self.replica
            .load
            .lock()
            .expect("load lock")
            .observe(Instant::now(), latency);
    }

    /// The call succeeded: its whole duration is a latency sample.
    pub fn success(self) {
        self.observe(self.started.elapsed());
    }

    /// The call was abandoned as too slow: count the time spent as a (peak) sample so the balancer
    /// avoids the replica until it proves fast again, without ejecting it (it still answers).
    pub fn abandoned(self) {
        self.observe(self.started.elapsed());
    }

    /// The replica could not be reached or broke the call: eject it until a health check passes.
    pub fn unreachable(self, why: &str) {
        if self.replica.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(stage = %self.stage, replica = %self.replica.url, "replica ejected after a failed call: {why}");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica
            .load
            .lock()
            .expect("load lock")
            .pending
            .remove(&self.call);
    }
}

/// Where replicas come from: `https://host:port` is one replica; `dns://host:port` is every
/// address the name resolves to, re-resolved every `dns_refresh` (TLS still checks `host`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Static(String),
    Dns { host: String, port: u16 },
}

fn parse_sources(spec: &str) -> Result<Vec<Source>, NetError> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some(rest) = item.strip_prefix("dns://") {
            let bad = |reason: &str| NetError::Endpoint {
                url: item.to_string(),
                reason: reason.to_string(),
            };
            let (host, port) = rest
                .trim_end_matches('/')
                .rsplit_once(':')
                .ok_or_else(|| bad("dns:// needs host:port"))?;
            let port = port.parse().map_err(|_| bad("invalid port"))?;
            if host.is_empty() {
                return Err(bad("missing host"));
            }
            out.push(Source::Dns {
                host: host.to_string(),
                port,
            });
        } else {
            out.push(Source::Static(item.to_string()));
        }
    }
    if out.is_empty() {
        return Err(NetError::Endpoint {
            url: spec.to_string(),
            reason: "no replica given".into(),
        });
    }
    Ok(out)
}

/// The replicas of one stage. Cheap to share (`Arc`); background tasks (health checks, DNS
/// refresh) stop when the set is dropped.
pub struct ReplicaSet {
    stage: Arc<str>,
    replicas: RwLock<Vec<Arc<Replica>>>,
    next_id: AtomicU64,
    opts: ReplicaOptions,
    tls: TlsForHost,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("stage", &self.stage)
            .field("replicas", &self.replicas())
            .finish()
    }
}

impl Drop for ReplicaSet {
    fn drop(&mut self) {
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }
}

impl ReplicaSet {
    /// Replicas from `spec` (`URL,URL…`, each `https://host:port` or `dns://host:port`). Must be
    /// called inside a tokio runtime: health checks and DNS refresh run in the background.
    pub fn new(
        stage: &str,
        spec: &str,
        tls: TlsForHost,
        opts: ReplicaOptions,
    ) -> Result<Arc<ReplicaSet>, NetError> {
        let sources = parse_sources(spec)?;
        let set = Arc::new(ReplicaSet {
            stage: stage.into(),
            replicas: RwLock::new(Vec::new()),
            next_id: AtomicU64::new(0),
            opts,
            tls,
            tasks: Mutex::new(Vec::new()),
        });
        let mut dns = Vec::new();
        for s in sources {
            match s {
                Source::Static(url) => {
                    let host = url_host(&url)?;
                    set.add(&url, &host)?;
                }
                Source::Dns { host, port } => dns.push((host, port)),
            }
        }
        let weak = Arc::downgrade(&set);
        let health = tokio::spawn(async move {
            loop {
                let Some(set) = weak.upgrade() else { return };
                let interval = set.opts.health_interval;
                set.check_health().await;
                drop(set);
                tokio::time::sleep(interval).await;
            }
        });
        set.tasks.lock().expect("tasks lock").push(health);
        if !dns.is_empty() {
            let weak = Arc::downgrade(&set);
            let refresh = tokio::spawn(async move {
                loop {
                    let Some(set) = weak.upgrade() else { return };
                    let every = set.opts.dns_refresh;
                    set.resolve(&dns).await;
                    drop(set);
                    tokio::time::sleep(every).await;
                }
            });
            set.tasks.lock().expect("tasks lock").push(refresh);
        }
        Ok(set)
    }

    pub fn stage(&self) -> &str {
        &self.stage
    }

    /// The current replicas (a snapshot).
    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.read().expect("replicas lock").clone()
    }

    fn add(&self, url: &str, tls_host: &str) -> Result<Arc<Replica>, NetError> {
        // Each new connection of the channel (first use, reconnects) gets the TLS of its moment.
        let channel = lazy_channel(url, (self.tls)(tls_host)?, &ChannelOptions::default())?;
        let replica = Arc::new(Replica {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            url: url.to_string(),
            channel,
            // Optimistic until the first health check says otherwise: a fresh gateway can take
            // traffic at once, and a wrong guess costs one failed, retried call.
            healthy: AtomicBool::new(true),
            load: Mutex::new(PeakEwma::new(self.opts.default_rtt, self.opts.ewma_decay)),
            calls: AtomicU64::new(0),
            prefilling: AtomicU64::new(0),
        });
        self.replicas
            .write()
            .expect("replicas lock")
            .push(replica.clone());
        Ok(replica)
    }

    async fn resolve(&self, names: &[(String, u16)]) {
        let mut wanted: Vec<(String, String)> = Vec::new(); // (url, tls host)
        for (host, port) in names {
            // The scheme follows the TLS setting (plaintext only in tests without TLS).
            let scheme = match (self.tls)(host) {
                Ok(Some(_)) => "https",
                Ok(None) => "http",
                Err(e) => {
                    tracing::warn!(stage = %self.stage, %host, "no TLS configuration: {e}");
                    return;
                }
            };
            match self.opts.resolver.lookup(host, *port).await {
                Ok(addrs) => {
                    for a in addrs {
                        wanted.push((format!("{scheme}://{a}"), host.clone()));
                    }
                }
                Err(e) => {
                    // Keep the last known replicas: a DNS hiccup must not empty the set.
                    tracing::warn!(stage = %self.stage, %host, "DNS lookup failed, keeping the current replicas: {e}");
                    return;
                }
            }
        }
        let current: Vec<String> = self.replicas().iter().map(|r| r.url.clone()).collect();
        for (url, host) in &wanted {
            if !current.contains(url) {
                match self.add(url, host) {
                    Ok(_) => {
                        tracing::info!(stage = %self.stage, replica = %url, "replica discovered")
                    }
                    Err(e) => {
                        tracing::warn!(stage = %self.stage, replica = %url, "cannot add replica: {e}")
                    }
                }
            }
        }
        self.replicas.write().expect("replicas lock").retain(|r| {
            let keep = wanted.iter().any(|(u, _)| *u == r.url);
            if !keep {
                tracing::info!(stage = %self.stage, replica = %r.url, "replica gone from DNS");
            }
            keep
        });
    }

    async fn check_health(&self) {
        let checks = self.replicas().into_iter().map(|r| {
            let timeout = self.opts.health_interval.max(Duration::from_millis(100));
            async move {
                let mut client = HealthClient::new(r.channel.clone());
                let ok = matches!(
                    tokio::time::timeout(timeout, client.check(HealthCheckRequest { service: String::new() })).await,
                    Ok(Ok(resp)) if resp.get_ref().status() == ServingStatus::Serving
                );
                let was = r.healthy.swap(ok, Ordering::Relaxed);
                if was != ok {
                    if ok {
                        tracing::info!(stage = %self.stage, replica = %r.url, "replica healthy again; back in the set");
                    } else {
                        tracing::warn!(stage = %self.stage, replica = %r.url, "replica failed its health check; ejected");
                    }
                }
            }
        });
        futures::future::join_all(checks).await;
    }

    /// Whether a healthy replica outside `exclude` exists: abandoning a slow call only helps when
    /// there is somewhere else to go (otherwise the retry would queue on the same replica again).
    pub fn has_alternative(&self, exclude: &[u64]) -> bool {
        self.replicas
            .read()
            .expect("replicas lock")
            .iter()
            .any(|r| r.is_healthy() && !exclude.contains(&r.id))
    }

    /// Picks a replica by power of two choices over peak-EWMA cost among healthy replicas not in
    /// `exclude` (all of them, when every one is excluded). When none is healthy, unhealthy ones
    /// are tried too (a replica may be back before the next health check; a dead one fails
    /// fast). UNAVAILABLE when the set is empty.
    pub fn pick(&self, exclude: &[u64]) -> Result<Lease, Status> {
        self.pick_with(exclude, |_| None)
    }

    /// [`Self::pick`], letting `choose` pick among the candidates (healthy replicas not in
    /// `exclude`, as `pick` finds them) by index; when it returns `None`, power of two choices
    /// as in `pick`.
    pub fn pick_with(
        &self,
        exclude: &[u64],
        choose: impl FnOnce(&[&Arc<Replica>]) -> Option<usize>,
    ) -> Result<Lease, Status> {
        let all = self.replicas();
        let mut allowed: Vec<&Arc<Replica>> =
            all.iter().filter(|r| !exclude.contains(&r.id)).collect();
        if allowed.is_empty() {
            // Every replica failed this request already: a retry may as well go to one of them
            // (a single-replica stage, or one that restarted) rather than fail without trying.
            allowed = all.iter().collect();
        }
        let healthy: Vec<&Arc<Replica>> =
            allowed.iter().copied().filter(|r| r.is_healthy()).collect();
        let candidates = if healthy.is_empty() { allowed } else { healthy };
        let now = Instant::now();
        let chosen = match candidates.len() {
            0 => {
                return Err(Status::unavailable(format!(
                    "no {} replica known (none configured or resolved)",
                    self.stage
                )))
            }
            1 => candidates[0],
            n => match choose(&candidates).filter(|i| *i < n) {
                Some(i) => candidates[i],
                None => {
                    let (a, b) = two_distinct(n);
                    let (ra, rb) = (candidates[a], candidates[b]);
                    if rb.cost(now) < ra.cost(now) {
                        rb
                    } else {
                        ra
                    }
                }
            },
        };
        chosen.calls.fetch_add(1, Ordering::Relaxed);
        let call = {
            let mut load = chosen.load.lock().expect("load lock");
            load.next_call += 1;
            let id = load.next_call;
            load.pending.insert(id, now);
            id
        };
        Ok(Lease {
            replica: chosen.clone(),
            call,
            started: now,
            stage: self.stage.clone(),
        })
    }
}

/// Two distinct indices below `n` (n ≥ 2), uniformly.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = (crate::jitter::random_u64() % n as u64) as usize;
    let b = (crate::jitter::random_u64() % (n as u64 - 1)) as usize;
    (a, if b >= a { b + 1 } else { b })
}

#[cfg(test)]
#[path = "replicas_tests.rs"]
mod tests;
