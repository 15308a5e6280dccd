//! The image-feature cache shared by gateway replicas.
//!
//! [`FeatureCache`] is the whole policy a gateway needs: keyed lookups, single flight (identical
//! images in flight at once are encoded once), filling from a tee of the encoder's stream, and
//! stores off the request path. Values are `vlm_tensor::TensorValue` encodings under keys from
//! [`feature_key`], kept by a [`CacheBackend`]: [`RedisCache`] for a mesh, [`MemoryCache`] for one
//! process. The cache is never the source of truth: every backend error is a miss.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod backend;
mod features;
mod sealed;

pub use backend::{CacheBackend, MemoryCache, RedisCache, RedisOptions, RedisTls};
pub use features::{FeatureCache, Fill, Lookup, Outcome};
pub use sealed::Sealer;

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
