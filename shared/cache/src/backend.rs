//! Where cached features are kept: the [`CacheBackend`] trait, [`RedisCache`] for a mesh (every
//! gateway replica shares one Redis) and [`MemoryCache`] for a single process. Backends store
//! opaque bytes and bound their own latency; the policy on top is [`crate::FeatureCache`].

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo};

use crate::CacheError;

/// What a cache backend must be able to do. Implementations bound their own latency (a slow
/// backend returns [`CacheError::Timeout`] rather than stalling a request).
pub trait CacheBackend: Send + Sync {
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

/// Settings for [`RedisCache`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Bound on a lookup; past it the request proceeds as a miss.
    pub get_timeout: Duration,
    /// Bound on a store (stores run off the request path).
    pub put_timeout: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// For `rediss://` URLs: the CA to verify the server with (PEM; the system roots when
    /// `None`), and a client certificate chain and key (PEM) for servers that ask for one.
    pub tls: RedisTls,
}

/// TLS material for a `rediss://` Redis.
#[derive(Clone, Default)]
pub struct RedisTls {
    pub ca_pem: Option<Vec<u8>>,
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_pem.is_some())
            .finish()
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            get_timeout: Duration::from_millis(250),
            put_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_millis(500),
            tls: RedisTls::default(),
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
        let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
        let custom = opts.tls.ca_pem.is_some() || opts.tls.client_pem.is_some();
        if custom && !tls {
            return Err(CacheError::Config(format!(
                "{url}: a Redis CA or client certificate is given but the URL is not rediss://"
            )));
        }
        let client = if custom {
            let certs =
                redis::TlsCertificates {
                    client_tls: opts.tls.client_pem.clone().map(|(cert, key)| {
                        redis::ClientTlsConfig {
                            client_cert: cert,
                            client_key: key,
                        }
                    }),
                    root_cert: opts.tls.ca_pem.clone(),
                };
            redis::Client::build_with_tls(info, certs)
        } else {
            redis::Client::open(info)
        }
        .map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.connect_timeout))
            .set_response_timeout(Some(opts.put_timeout))
            // Reconnect attempts happen on later requests; never spend a request's time retrying.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| CacheError::Config(format!("{url}: {e}")))?;
        Ok(RedisCache { conn, opts })
    }

    /// One PING: whether Redis answers now (start-up checks; the cache itself never needs it).
    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let pong: String = bounded(
            self.opts.connect_timeout + self.opts.get_timeout,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await?;
        if pong != "PONG" {
            return Err(CacheError::Backend(format!("PING answered {pong:?}")));
        }
        Ok(())
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

impl CacheBackend for RedisCache {
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

/// A value and how long it may live.
#[derive(Clone)]
struct MemoryEntry {
    value: Bytes,
    ttl: Duration,
}

/// Each entry lives for the TTL it was stored with.
struct PerEntryTtl;

impl moka::Expiry<String, MemoryEntry> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &MemoryEntry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &MemoryEntry,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// In-process cache for a single gateway (used when no Redis is configured): a moka cache with
/// least-recently-used eviction, weighted by the bytes of its values, entries expiring after the
/// TTL they were stored with.
pub struct MemoryCache {
    cache: moka::future::Cache<String, MemoryEntry>,
    max_bytes: usize,
}

impl MemoryCache {
    pub fn new(max_bytes: usize) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes as u64)
            .weigher(|_key: &String, e: &MemoryEntry| {
                u32::try_from(e.value.len()).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryTtl)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        MemoryCache { cache, max_bytes }
    }

    /// Bytes of the values held, once pending evictions and expiries have run.
    pub async fn bytes(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }
}

impl CacheBackend for MemoryCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        Box::pin(async move { Ok(self.cache.get(key).await.map(|e| e.value)) })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            // A value larger than the whole cache would only evict everything else.
            if value.len() <= self.max_bytes {
                let entry = MemoryEntry { value, ttl };
                self.cache.insert(key.to_string(), entry).await;
            }
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            self.cache.invalidate(key).await;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_cache_is_bounded_by_bytes_and_evicts_least_recent() {
        let c = MemoryCache::new(100);
        let ttl = Duration::from_secs(60);
        c.put("a", Bytes::from(vec![1u8; 40]), ttl).await.unwrap();
        c.put("b", Bytes::from(vec![2u8; 40]), ttl).await.unwrap();
        assert_eq!(c.bytes().await, 80);
        assert!(c.get("a").await.unwrap().is_some()); // a is now more recent than b
        c.put("c", Bytes::from(vec![3u8; 40]), ttl).await.unwrap();
        assert!(c.bytes().await <= 100);
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
        assert_eq!(c.bytes().await, 40);
    }

    #[tokio::test]
    async fn memory_cache_entries_expire_after_their_own_ttl() {
        let c = MemoryCache::new(100);
        c.put("a", Bytes::from_static(b"x"), Duration::ZERO)
            .await
            .unwrap();
        c.put("b", Bytes::from_static(b"y"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(c.get("a").await.unwrap().is_none());
        assert_eq!(c.get("b").await.unwrap().unwrap(), Bytes::from_static(b"y"));
    }
}
