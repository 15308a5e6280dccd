//! The image-feature cache shared by gateway replicas.
//!
//! [`FeatureCache`] stores opaque values (the gateway stores `vlm_tensor::TensorValue` encodings)
//! under keys from [`feature_key`]. Two implementations: [`RedisCache`] for a mesh (every gateway
//! replica shares one Redis) and [`MemoryCache`], a byte-bounded LRU for a single process. The cache
//! is never the source of truth: callers treat every error as a miss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo};

/// Prefix of every key; bump the version when the value layout changes.
pub const KEY_PREFIX: &str = "vlm:feat:v1:";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache backend error: {0}")]
    Backend(String),
    #[error("cache operation timed out after {0:?}")]
    Timeout(Duration),
    #[error("invalid cache configuration: {0}")]
    Config(String),
}

/// What the cache must be able to do. Implementations bound their own latency (a slow backend
/// returns [`CacheError::Timeout`] rather than stalling a request).
pub trait FeatureCache: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>>;
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>>;
    /// `redis` or `memory`, for logs and metrics.
    fn kind(&self) -> &'static str;
}

/// The cache key for one image: blake3 over everything that changes the features — the image bytes,
/// the encoder's model fingerprint (derived from its loaded weights), its preprocessing settings and
/// the request options (e.g. the wire dtype the value is stored in). Fields are length-prefixed so
/// no two different inputs produce the same byte stream.
pub fn feature_key(
    image: &[u8],
    model_fingerprint: &str,
    preprocessing: &str,
    options: &str,
) -> String {
    let mut h = blake3::Hasher::new();
    for part in [
        image,
        model_fingerprint.as_bytes(),
        preprocessing.as_bytes(),
        options.as_bytes(),
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part);
    }
    format!("{KEY_PREFIX}{}", h.finalize().to_hex())
}

/// Settings for [`RedisCache`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Bound on a lookup; past it the request proceeds as a miss.
    pub get_timeout: Duration,
    /// Bound on a store (stores run off the request path).
    pub put_timeout: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            get_timeout: Duration::from_millis(250),
            put_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
        }
    }
}

/// Redis-backed cache. The connection is established lazily and re-established by the
/// connection manager after Redis restarts, so caching resumes without restarting the gateway.
pub struct RedisCache {
    conn: ConnectionManager,
    opts: RedisOptions,
}

impl RedisCache {
    /// Validates the URL and prepares the connection; it does not fail when Redis is down.
    pub fn new(url: &str, opts: RedisOptions) -> Result<Self, CacheError> {
        let info = url
            .into_connection_info()
            .map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
        // Redis servers older than 7.2 reject CLIENT SETINFO; we never need it.
        let redis_settings = info.redis_settings().clone().set_skip_set_lib_name();
        let info = info.set_redis_settings(redis_settings);
        let client =
            redis::Client::open(info).map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.put_timeout))
            // Reconnect attempts happen on later requests; never spend a request's time retrying.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
        Ok(RedisCache { conn, opts })
    }
}

async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CacheError::Backend(e.to_string())),
        Err(_) => Err(CacheError::Timeout(limit)),
    }
}

impl FeatureCache for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let v: Option<Vec<u8>> = bounded(self.opts.get_timeout, conn.get(key)).await?;
            Ok(v.map(Bytes::from))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // One SET … EX: the whole value in a single command and round trip.
            let secs = ttl.as_secs().max(1);
            bounded(
                self.opts.put_timeout,
                conn.set_ex::<_, _, ()>(key, value.as_ref(), secs),
            )
            .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            bounded(self.opts.put_timeout, conn.del::<_, ()>(key)).await
        })
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

struct MemoryEntry {
    value: Bytes,
    expires: Instant,
}

struct MemoryState {
    lru: lru::LruCache<String, MemoryEntry>,
    bytes: usize,
}

/// In-process LRU bounded by the total bytes of its values (used when no Redis is configured).
pub struct MemoryCache {
    state: Mutex<MemoryState>,
    max_bytes: usize,
}

impl MemoryCache {
    pub fn new(max_bytes: usize) -> Self {
        MemoryCache {
            state: Mutex::new(MemoryState {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
            }),
            max_bytes,
        }
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        self.state.lock().expect("cache lock").bytes
    }
}

impl FeatureCache for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        let mut s = self.state.lock().expect("cache lock");
        let hit = match s.lru.get(key) {
            Some(e) if e.expires > Instant::now() => Some(e.value.clone()),
            Some(_) => {
                let e = s.lru.pop(key).expect("entry present");
                s.bytes -= e.value.len();
                None
            }
            None => None,
        };
        Box::pin(std::future::ready(Ok(hit)))
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        let mut s = self.state.lock().expect("cache lock");
        if value.len() <= self.max_bytes {
            if let Some(old) = s.lru.pop(key) {
                s.bytes -= old.value.len();
            }
            s.bytes += value.len();
            s.lru.put(
                key.to_string(),
                MemoryEntry {
                    value,
                    expires: Instant::now() + ttl,
                },
            );
            while s.bytes > self.max_bytes {
                match s.lru.pop_lru() {
                    Some((_, e)) => s.bytes -= e.value.len(),
                    None => break,
                }
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        let mut s = self.state.lock().expect("cache lock");
        if let Some(e) = s.lru.pop(key) {
            s.bytes -= e.value.len();
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

/// Logs a recurring failure at most once per interval, with how many were suppressed, so a dead
/// Redis produces one line every few seconds rather than one per request.
pub struct RateLimitedLog {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub fn new(interval: Duration) -> Self {
        RateLimitedLog {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(suppressed_since_last)` when the caller should log now.
    pub fn should_log(&self) -> Option<u64> {
        let mut last = self.last.lock().expect("log lock");
        let now = Instant::now();
        match *last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_separate_every_input() {
        let base = feature_key(b"img", "model-a", "pre", "f32");
        assert!(base.starts_with(KEY_PREFIX));
        assert_eq!(base.len(), KEY_PREFIX.len() + 64);
        assert_eq!(base, feature_key(b"img", "model-a", "pre", "f32"));
        assert_ne!(base, feature_key(b"img2", "model-a", "pre", "f32"));
        assert_ne!(base, feature_key(b"img", "model-b", "pre", "f32"));
        assert_ne!(base, feature_key(b"img", "model-a", "pre2", "f32"));
        assert_ne!(base, feature_key(b"img", "model-a", "pre", "f16"));
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(
            feature_key(b"ab", "c", "", ""),
            feature_key(b"a", "bc", "", "")
        );
    }

    #[tokio::test]
    async fn memory_cache_is_bounded_by_bytes_and_evicts_least_recent() {
        let c = MemoryCache::new(100);
        let ttl = Duration::from_secs(60);
        c.put("a", Bytes::from(vec![1u8; 40]), ttl).await.unwrap();
        c.put("b", Bytes::from(vec![2u8; 40]), ttl).await.unwrap();
        assert!(c.get("a").await.unwrap().is_some()); // a is now most recent
        c.put("c", Bytes::from(vec![3u8; 40]), ttl).await.unwrap();
        assert!(c.bytes() <= 100);
        assert!(
            c.get("b").await.unwrap().is_none(),
            "least recently used entry evicted"
        );
        assert_eq!(c.get("a").await.unwrap().unwrap().len(), 40);
        assert_eq!(c.get("c").await.unwrap().unwrap()[0], 3);
        // A value larger than the whole cache is not stored.
        c.put("huge", Bytes::from(vec![0u8; 101]), ttl)
            .await
            .unwrap();
        assert!(c.get("huge").await.unwrap().is_none());
        c.delete("a").await.unwrap();
        assert!(c.get("a").await.unwrap().is_none());
        assert_eq!(c.bytes(), 40);
    }

    #[tokio::test]
    async fn memory_cache_entries_expire() {
        let c = MemoryCache::new(100);
        c.put("a", Bytes::from_static(b"x"), Duration::ZERO)
            .await
            .unwrap();
        assert!(c.get("a").await.unwrap().is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn rate_limited_log_suppresses_within_interval() {
        let l = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(l.should_log(), Some(0));
        assert_eq!(l.should_log(), None);
        assert_eq!(l.should_log(), None);
        let l0 = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(l0.should_log(), Some(0));
        assert_eq!(l0.should_log(), Some(0));
    }
}
