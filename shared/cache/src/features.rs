//! The feature-cache policy a gateway uses: lookups (corrupt values deleted), single flight, and
//! filling from a tee of the encoder's stream with the store off the request path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tracing::Instrument;
use vlm_tensor::{TensorChunk, TensorLimits, TensorValue, TensorValueBuilder};

use crate::{CacheBackend, RateLimitedLog, Sealer};

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Features from the backend, or from an identical image another request just encoded.
    Hit,
    /// Not cached.
    Miss,
    /// The backend failed; the request goes on as on a miss.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Error => "error",
        }
    }
}

/// The answer to [`FeatureCache::lookup`].
pub struct Lookup {
    pub outcome: Outcome,
    /// The features, on a hit.
    pub features: Option<TensorValue>,
    /// Not a hit, and this request is the one that encodes the image: it tees the encoder's
    /// chunks into the [`Fill`] (requests for the same key wait for it meanwhile).
    pub fill: Option<Fill>,
}

/// Keys being encoded right now → their value once the encoding request has it.
type Inflight = Mutex<HashMap<String, watch::Receiver<Option<TensorValue>>>>;

/// Image features by key, over a [`CacheBackend`], with single flight.
pub struct FeatureCache {
    backend: Arc<dyn CacheBackend>,
    ttl: Duration,
    limits: TensorLimits,
    sealer: Sealer,
    inflight: Inflight,
    errors_log: RateLimitedLog,
}

impl FeatureCache {
    /// Values live `ttl`; a value that does not decode within `limits`, or is not bound to its
    /// key, is treated as corrupt. Values are tagged without a secret (see [`Sealer`]).
    pub fn new(backend: Arc<dyn CacheBackend>, ttl: Duration, limits: TensorLimits) -> Arc<Self> {
        Self::with_sealer(backend, ttl, limits, Sealer::new(None))
    }

    /// [`Self::new`], sealing and opening values with `sealer` (keyed with the gateways' shared
    /// secret, so nobody without it can plant features).
    pub fn with_sealer(
        backend: Arc<dyn CacheBackend>,
        ttl: Duration,
        limits: TensorLimits,
        sealer: Sealer,
    ) -> Arc<Self> {
        Arc::new(FeatureCache {
            backend,
            ttl,
            limits,
            sealer,
            inflight: Mutex::new(HashMap::new()),
            errors_log: RateLimitedLog::new(Duration::from_secs(10)),
        })
    }

    /// `redis` or `memory`.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// The features under `key`: from the backend, from an identical image in flight (waiting
    /// for it), or none, in which case the first such caller gets the [`Fill`].
    pub async fn lookup(self: &Arc<Self>, key: &str) -> Lookup {
        let span = tracing::info_span!(
            "cache.lookup",
            cache.backend = self.backend.kind(),
            cache.result = tracing::field::Empty,
        );
        let t = Instant::now();
        let found = self.lookup_coalesced(key).instrument(span.clone()).await;
        span.record("cache.result", found.outcome.as_str());
        vlm_telemetry::metrics::cache_lookup(found.outcome.as_str());
        vlm_telemetry::metrics::observe_stage("cache.lookup", t.elapsed());
        found
    }

    async fn lookup_coalesced(self: &Arc<Self>, key: &str) -> Lookup {
        let (outcome, value) = self.get(key).await;
        if let Some(v) = value {
            return hit(v);
        }
        let existing = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            match inflight.get(key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.to_string(), rx);
                    Ok(tx)
                }
            }
        };
        match existing {
            Ok(tx) => {
                let fill = Fill {
                    guard: Some(InflightGuard {
                        cache: self.clone(),
                        key: key.to_string(),
                    }),
                    tx,
                    builder: Some(TensorValueBuilder::new(self.limits)),
                    limits: self.limits,
                };
                // Double-check after taking the lead: a leader that finished between our get and
                // our insert has already stored its value (it leaves the in-flight map only once
                // stored), so nobody encodes twice. Not after a failed get: asking a backend that
                // just failed (or timed out) again would double the lookup's bound, and a value
                // it cannot return costs at most one encode.
                if outcome != Outcome::Error {
                    if let (_, Some(v)) = self.get(key).await {
                        let _ = fill.tx.send(Some(v.clone())); // to any request already waiting
                        return hit(v);
                    }
                }
                Lookup {
                    outcome,
                    features: None,
                    fill: Some(fill),
                }
            }
            Err(mut rx) => {
                // The same image is being encoded for another request: wait for its features. If
                // that request fails or goes away, this one encodes (without filling).
                let shared = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match shared {
                    Some(v) => hit(v),
                    None => Lookup {
                        outcome,
                        features: None,
                        fill: None,
                    },
                }
            }
        }
    }

    /// A value from the backend, if present, intact and bound to `key`. Others are deleted.
    async fn get(&self, key: &str) -> (Outcome, Option<TensorValue>) {
        match self.backend.get(key).await {
            Ok(Some(bytes)) => match self.sealer.open(key, bytes, &self.limits) {
                Ok(v) => (Outcome::Hit, Some(v)),
                Err(e) => {
                    tracing::warn!(
                        key,
                        "corrupt or untrusted cached features ({e}); deleting and recomputing"
                    );
                    if let Err(e) = self.backend.delete(key).await {
                        self.error("delete", &e);
                    }
                    (Outcome::Miss, None)
                }
            },
            Ok(None) => (Outcome::Miss, None),
            Err(e) => {
                self.error("lookup", &e);
                (Outcome::Error, None)
            }
        }
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.errors_log.should_log() {
            tracing::warn!(
                backend = self.backend.kind(),
                suppressed,
                "feature cache {what} failed, continuing without it: {e}"
            );
        }
    }

    /// Writes off the request path (the request never waits for it). The in-flight entry stays
    /// until the write is done, so a request arriving in between shares the value instead of
    /// encoding again.
    fn store(self: &Arc<Self>, key: String, value: Bytes, inflight: InflightGuard) {
        let this = self.clone();
        let span = tracing::info_span!(
            "cache.store",
            cache.backend = self.backend.kind(),
            cache.bytes = value.len(),
            cache.result = tracing::field::Empty,
        );
        let task = async move {
            let result = match this.backend.put(&key, value, this.ttl).await {
                Ok(()) => "ok",
                Err(e) => {
                    this.error("store", &e);
                    "error"
                }
            };
            tracing::Span::current().record("cache.result", result);
            vlm_telemetry::metrics::cache_store(result);
            drop(inflight);
        };
        tokio::spawn(task.instrument(span));
    }
}

fn hit(v: TensorValue) -> Lookup {
    Lookup {
        outcome: Outcome::Hit,
        features: Some(v),
        fill: None,
    }
}

/// The encoding request's side of a miss: tee every chunk of the encoder's stream into it, then
/// [`Fill::finish`]. Dropped unfinished (the encode failed or was abandoned), it lets the waiting
/// requests go and encode themselves.
pub struct Fill {
    guard: Option<InflightGuard>,
    tx: watch::Sender<Option<TensorValue>>,
    /// None once a chunk did not fit (the value is then not cacheable; the request is unaffected).
    builder: Option<TensorValueBuilder>,
    limits: TensorLimits,
}

impl Fill {
    /// Another attempt (on another replica) sends the stream again from its first chunk.
    pub fn restart(&mut self) {
        self.builder = Some(TensorValueBuilder::new(self.limits));
    }

    /// One chunk of the encoder's stream, as relayed.
    pub fn push(&mut self, chunk: &TensorChunk) {
        if let Some(b) = &mut self.builder {
            if b.push(chunk).is_err() {
                self.builder = None;
            }
        }
    }

    /// The stream ended well: hand the features to waiting requests and store them.
    pub fn finish(mut self) {
        let (Some(builder), Some(guard)) = (self.builder.take(), self.guard.take()) else {
            return;
        };
        let Ok(value) = builder.finish() else { return };
        let cache = guard.cache.clone();
        let key = guard.key.clone();
        let bytes = cache.sealer.seal(&key, &value);
        let _ = self.tx.send(Some(value));
        cache.store(key, bytes, guard);
    }
}

/// Removes an in-flight entry when its leader finishes or gives up, so waiting requests stop.
struct InflightGuard {
    cache: Arc<FeatureCache>,
    key: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.cache
            .inflight
            .lock()
            .expect("inflight lock")
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryCache;

    fn value(seed: f32) -> TensorValue {
        let values: Vec<f32> = (0..12).map(|i| seed + i as f32).collect();
        TensorValue::from_f32(&values, &[3, 4], vlm_tensor::WireDType::F32).unwrap()
    }

    fn cache() -> Arc<FeatureCache> {
        let backend = Arc::new(MemoryCache::new(1 << 20));
        FeatureCache::new(backend, Duration::from_secs(60), TensorLimits::default())
    }

    fn fill_with(mut fill: Fill, v: &TensorValue) {
        for c in v.chunks(16) {
            fill.push(&c);
        }
        fill.finish();
    }

    #[tokio::test]
    async fn a_miss_is_filled_once_and_then_hits() {
        let c = cache();
        let first = c.lookup("k").await;
        assert_eq!(first.outcome, Outcome::Miss);
        let v = value(1.0);
        fill_with(first.fill.expect("the first miss fills"), &v);
        // The store runs in the background; a lookup meanwhile is served by the in-flight value
        // or by the backend, never encoded again.
        let second = c.lookup("k").await;
        assert_eq!(second.outcome, Outcome::Hit);
        assert_eq!(second.features.unwrap(), v);
        assert!(second.fill.is_none());
    }

    /// Lets spawned lookups run until `n` of them wait on the in-flight value (bounded).
    async fn until_waiting(fill: &Fill, n: usize) {
        for _ in 0..10_000 {
            // The in-flight map holds one receiver; every waiting request a clone.
            if fill.tx.receiver_count() > n {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{n} lookups never waited for the in-flight value");
    }

    #[tokio::test]
    async fn identical_lookups_in_flight_wait_for_the_one_encode() {
        let c = cache();
        let leader = c.lookup("k").await;
        let fill = leader.fill.expect("leader");
        let followers: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.lookup("k").await })
            })
            .collect();
        until_waiting(&fill, 4).await;
        let v = value(7.0);
        fill_with(fill, &v);
        for f in followers {
            let got = f.await.unwrap();
            assert_eq!(got.outcome, Outcome::Hit);
            assert!(got.fill.is_none(), "only one request encodes");
            assert_eq!(got.features.unwrap(), v);
        }
    }

    #[tokio::test]
    async fn an_abandoned_fill_releases_the_waiting_requests() {
        let c = cache();
        let fill = c.lookup("k").await.fill.expect("leader");
        let waiting = {
            let c = c.clone();
            tokio::spawn(async move { c.lookup("k").await })
        };
        until_waiting(&fill, 1).await;
        drop(fill); // the leader's encode failed
        let got = waiting.await.unwrap();
        assert_eq!(got.outcome, Outcome::Miss);
        assert!(got.features.is_none());
        assert!(
            got.fill.is_none(),
            "a released request encodes without filling"
        );
        // Nothing was stored, and the key can be led again.
        assert!(c.lookup("k").await.fill.is_some());
    }

    /// A backend whose every lookup times out, counting them.
    #[derive(Default)]
    struct Unanswering {
        gets: std::sync::atomic::AtomicUsize,
    }

    impl CacheBackend for Unanswering {
        fn get<'a>(
            &'a self,
            _key: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<Bytes>, crate::CacheError>> {
            self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err(crate::CacheError::Timeout(Duration::from_millis(250))) })
        }
        fn put<'a>(
            &'a self,
            _key: &'a str,
            _value: Bytes,
            _ttl: Duration,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::CacheError>> {
            Box::pin(async { Ok(()) })
        }
        fn delete<'a>(
            &'a self,
            _key: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<(), crate::CacheError>> {
            Box::pin(async { Ok(()) })
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    /// A lookup against a backend that does not answer waits for it once (one bounded get),
    /// not twice: README "lookups are bounded to 250 ms".
    #[tokio::test]
    async fn a_failing_backend_is_asked_once_per_lookup() {
        let backend = Arc::new(Unanswering::default());
        let c = FeatureCache::new(
            backend.clone(),
            Duration::from_secs(60),
            TensorLimits::default(),
        );
        let got = c.lookup("k").await;
        assert_eq!(got.outcome, Outcome::Error);
        assert!(got.fill.is_some(), "it still encodes and fills");
        assert_eq!(backend.gets.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn corrupt_values_are_deleted_and_missed() {
        let backend = Arc::new(MemoryCache::new(1 << 20));
        let c = FeatureCache::new(
            backend.clone(),
            Duration::from_secs(60),
            TensorLimits::default(),
        );
        backend
            .put(
                "k",
                Bytes::from_static(b"not a tensor"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let got = c.lookup("k").await;
        assert_eq!(got.outcome, Outcome::Miss);
        assert!(backend.get("k").await.unwrap().is_none(), "deleted");
    }
}
