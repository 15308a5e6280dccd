//! A Watch stream's own feature cache, charged to the gateway's memory budget as it fills: the
//! charge follows the bytes the cache holds, and a value that does not fit the budget is not
//! kept (a later question encodes that frame again), so the streams' caches never hold memory
//! the budget has not granted.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use vlm_cache::{CacheBackend, CacheError, MemoryCache};
use vlm_net::{ByteBudget, BytePermit};

const WHAT: &str = "a Watch stream's feature cache";

pub(super) struct BudgetedCache {
    inner: MemoryCache,
    charge: tokio::sync::Mutex<BytePermit>,
}

impl BudgetedCache {
    /// A cache of at most `max_bytes`, charged to `budget` within `peer`'s share.
    pub fn new(max_bytes: usize, budget: &ByteBudget, peer: &vlm_net::Peer) -> Self {
        BudgetedCache {
            inner: MemoryCache::new(max_bytes),
            charge: tokio::sync::Mutex::new(budget.empty_for(peer)),
        }
    }

    /// Sets the charge to what the cache holds; false when the budget cannot grant it.
    async fn settle(&self, charge: &mut BytePermit) -> bool {
        let held = self.inner.bytes().await;
        charge.resize(held, WHAT).is_ok()
    }
}

impl CacheBackend for BudgetedCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        self.inner.get(key)
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let mut charge = self.charge.lock().await;
            self.inner.put(key, value, ttl).await?;
            if !self.settle(&mut charge).await {
                tracing::debug!(
                    key,
                    "the memory budget is full: a Watch feature is not cached"
                );
                self.inner.delete(key).await?;
                self.settle(&mut charge).await;
            }
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let mut charge = self.charge.lock().await;
            self.inner.delete(key).await?;
            self.settle(&mut charge).await;
            Ok(())
        })
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_charge_follows_the_bytes_held_and_a_full_budget_keeps_nothing_more() {
        let budget = ByteBudget::new("test.WatchCache", 100, 1);
        let peer = vlm_net::Peer::new(None, None::<&[&[u8]]>);
        let cache = BudgetedCache::new(1000, &budget, &peer);
        let ttl = Duration::from_secs(60);
        cache
            .put("a", Bytes::from(vec![1u8; 60]), ttl)
            .await
            .unwrap();
        assert_eq!(budget.used(), 60);
        // 60 + 60 > 100: the second value is not kept, and nothing more is charged.
        cache
            .put("b", Bytes::from(vec![2u8; 60]), ttl)
            .await
            .unwrap();
        assert_eq!(budget.used(), 60);
        assert!(cache.get("b").await.unwrap().is_none());
        assert!(cache.get("a").await.unwrap().is_some());
        cache.delete("a").await.unwrap();
        assert_eq!(budget.used(), 0);
        cache
            .put("b", Bytes::from(vec![2u8; 60]), ttl)
            .await
            .unwrap();
        assert_eq!(budget.used(), 60);
        drop(cache);
        assert_eq!(budget.used(), 0);
    }
}
