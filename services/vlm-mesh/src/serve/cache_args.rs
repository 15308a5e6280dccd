//! The gateway's feature-cache flags (also accepted by `up`, which passes them through), and the
//! cache they build: in memory, or Redis, which needs a secret (or an explicit
//! `--cache-unkeyed`) so that whoever can write to Redis cannot plant features.

use clap::Args;

/// Feature-cache flags of the gateway (also accepted by `up`, which passes them through).
#[derive(Args, Debug, Clone, Default)]
pub struct CacheArgs {
    /// Redis URL for the shared feature cache (e.g. redis://127.0.0.1:6379). Without it, an
    /// in-memory LRU of --cache-max-bytes is used.
    #[arg(long, env = "VLM_REDIS")]
    pub redis: Option<String>,
    /// Lifetime of cached features, in seconds.
    #[arg(long, env = "VLM_CACHE_TTL", default_value_t = 3600)]
    pub cache_ttl: u64,
    /// Size bound of the in-memory cache, in bytes.
    #[arg(long, env = "VLM_CACHE_MAX_BYTES", default_value_t = 256 << 20)]
    pub cache_max_bytes: usize,
    /// Disable the feature cache.
    #[arg(long, env = "VLM_NO_CACHE", conflicts_with = "redis")]
    pub no_cache: bool,
    /// File holding a secret shared by every gateway of the mesh: cached features are tagged
    /// with a MAC under it, so whoever can write to Redis without it cannot plant features
    /// (values that do not verify are deleted and recomputed). Required with --redis unless
    /// --cache-unkeyed is given; `up` makes one in its state directory.
    #[arg(long, env = "VLM_CACHE_SECRET_FILE")]
    pub cache_secret_file: Option<std::path::PathBuf>,
    /// Use Redis without a cache secret: values are bound to their key only by an unkeyed hash,
    /// so anyone who can write to Redis can plant features that are served as an image's (a
    /// forged value answers questions about another image; a malformed one fails every request
    /// for that image until its TTL). For trusted, isolated Redis only.
    #[arg(long, env = "VLM_CACHE_UNKEYED", conflicts_with = "cache_secret_file")]
    pub cache_unkeyed: bool,
    /// For a `rediss://` URL: the CA (PEM) that signed Redis's certificate (default: the
    /// system's roots).
    #[arg(long, env = "VLM_REDIS_CA", requires = "redis")]
    pub redis_ca: Option<std::path::PathBuf>,
    /// For a `rediss://` URL whose server asks for client certificates: ours (PEM chain).
    #[arg(long, env = "VLM_REDIS_CERT", requires_all = ["redis", "redis_key"])]
    pub redis_cert: Option<std::path::PathBuf>,
    /// The key (PEM) of --redis-cert.
    #[arg(long, env = "VLM_REDIS_KEY", requires = "redis_cert")]
    pub redis_key: Option<std::path::PathBuf>,
}

impl CacheArgs {
    pub fn build(&self) -> anyhow::Result<Option<std::sync::Arc<vlm_cache::FeatureCache>>> {
        if self.no_cache {
            return Ok(None);
        }
        let secret = match &self.cache_secret_file {
            None if self.redis.is_some() && !self.cache_unkeyed => anyhow::bail!(
                "--redis needs --cache-secret-file: without a secret, anyone who can write to \
                 Redis can plant image features that are served as cache hits (answers about \
                 another image). Give every gateway the same secret file (`vlm-mesh up` makes \
                 one), or pass --cache-unkeyed to accept that risk"
            ),
            None => {
                if self.redis.is_some() {
                    tracing::warn!(
                        "--cache-unkeyed: cached features are not authenticated; anyone who can \
                         write to Redis can plant features that are served as cache hits \
                         (answers about another image) or fail every request for an image \
                         until the TTL"
                    );
                }
                None
            }
            Some(path) => {
                let secret = std::fs::read(path)
                    .map_err(|e| anyhow::anyhow!("--cache-secret-file {}: {e}", path.display()))?;
                let secret = secret.trim_ascii();
                anyhow::ensure!(
                    secret.len() >= 16,
                    "--cache-secret-file {}: the secret must be at least 16 bytes",
                    path.display()
                );
                Some(secret.to_vec())
            }
        };
        let backend: std::sync::Arc<dyn vlm_cache::CacheBackend> = match &self.redis {
            Some(url) => {
                std::sync::Arc::new(vlm_cache::RedisCache::new(url, self.redis_options()?)?)
            }
            None => std::sync::Arc::new(vlm_cache::MemoryCache::new(self.cache_max_bytes)),
        };
        Ok(Some(vlm_cache::FeatureCache::with_sealer(
            backend,
            std::time::Duration::from_secs(self.cache_ttl),
            vlm_tensor::TensorLimits::default(),
            vlm_cache::Sealer::new(secret.as_deref()),
        )))
    }

    /// The Redis connection's settings, with the TLS files read.
    fn redis_options(&self) -> anyhow::Result<vlm_cache::RedisOptions> {
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
        };
        let ca_pem = match &self.redis_ca {
            Some(p) => Some(read("--redis-ca", p)?),
            None => None,
        };
        let client_pem = match (&self.redis_cert, &self.redis_key) {
            (Some(c), Some(k)) => Some((read("--redis-cert", c)?, read("--redis-key", k)?)),
            (None, None) => None,
            _ => anyhow::bail!("--redis-cert and --redis-key go together"),
        };
        Ok(vlm_cache::RedisOptions {
            tls: vlm_cache::RedisTls { ca_pem, client_pem },
            ..Default::default()
        })
    }

    /// At start-up: one PING to the Redis of --redis. A TLS failure (wrong CA, a client
    /// certificate Redis refuses) is a configuration error and stops the gateway, naming the
    /// flags; Redis being down is not (the cache connects when it is back).
    pub async fn check_redis(&self) -> anyhow::Result<()> {
        let Some(url) = &self.redis else {
            return Ok(());
        };
        let redis = vlm_cache::RedisCache::new(url, self.redis_options()?)?;
        match redis.ping().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let why = e.to_string();
                let lower = why.to_ascii_lowercase();
                // Under TLS 1.3 a Redis that wants a client certificate refuses after the
                // handshake: the client reads its alert, or (when the close wins the race) its
                // first write fails with a broken pipe or a reset. A Redis that is down refuses
                // the connection instead.
                let closed_after_handshake = url.starts_with("rediss://")
                    && ["broken pipe", "connection reset"]
                        .iter()
                        .any(|w| lower.contains(w));
                if closed_after_handshake
                    || ["certificate", "tls", "handshake", "unknownissuer"]
                        .iter()
                        .any(|w| lower.contains(w))
                {
                    anyhow::bail!(
                        "--redis {url}: the TLS connection failed: {why}. Check --redis-ca (the CA that signed Redis's certificate; without it, the system's roots) and, if Redis asks for client certificates, --redis-cert/--redis-key"
                    );
                }
                tracing::warn!(
                    "--redis {url} does not answer yet ({why}); the cache connects when it does"
                );
                Ok(())
            }
        }
    }

    /// The same settings as `serve gateway` arguments.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--cache-ttl".to_string(),
            self.cache_ttl.to_string(),
            "--cache-max-bytes".into(),
            self.cache_max_bytes.to_string(),
        ];
        if let Some(url) = &self.redis {
            args.extend(["--redis".to_string(), url.clone()]);
        }
        if self.no_cache {
            args.push("--no-cache".into());
        }
        if let Some(path) = &self.cache_secret_file {
            args.extend([
                "--cache-secret-file".to_string(),
                path.display().to_string(),
            ]);
        }
        if self.cache_unkeyed {
            args.push("--cache-unkeyed".into());
        }
        for (flag, path) in [
            ("--redis-ca", &self.redis_ca),
            ("--redis-cert", &self.redis_cert),
            ("--redis-key", &self.redis_key),
        ] {
            if let Some(p) = path {
                args.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redis_without_a_secret_is_refused_unless_unkeyed_is_explicit() {
        let args = CacheArgs {
            redis: Some("redis://127.0.0.1:1".into()),
            cache_ttl: 60,
            cache_max_bytes: 1 << 20,
            ..Default::default()
        };
        let e = args.build().err().expect("refused").to_string();
        assert!(
            e.contains("--cache-secret-file") && e.contains("--cache-unkeyed"),
            "{e}"
        );
        let unkeyed = CacheArgs {
            cache_unkeyed: true,
            ..args.clone()
        };
        assert!(unkeyed.build().unwrap().is_some());
        assert!(unkeyed.to_args().contains(&"--cache-unkeyed".to_string()));
        // Without Redis the in-memory cache needs no secret: nobody else writes to it.
        let memory = CacheArgs {
            redis: None,
            ..args
        };
        assert!(memory.build().unwrap().is_some());
    }
}
