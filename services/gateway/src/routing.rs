//! Prefix-aware decoder routing: each decoder call goes to the replica most likely to hold the
//! longest prefix of its prompt in its prefix cache, within a load bound, so a session's later
//! steps (which resend its system prompt and history) reuse the KV their earlier steps computed.
//!
//! The gateway links no model code, so it keys prefixes on what it has: the rendered prompt
//! text in [`CHUNK_BYTES`]-byte chunks, each chunk's key chained with the one before it (key
//! *i* names the whole text up to the end of chunk *i*, as a radix tree's path would), then one
//! key per image, from the image's bytes. For every replica it remembers the keys of the prompts
//! it sent there (an LRU of [`KEYS_PER_REPLICA`] keys per replica: 4 MiB of prompt text each).
//! A prompt's match on a replica is how many of its leading keys that replica holds. The image
//! keys come after the text's: two prompts with the same text and different images match on
//! their text only (the decoder reuses the text before the first image either way).
//!
//! The rule, in order:
//! 1. an **affinity key** (gRPC metadata `session-id`; OpenAI `prompt_cache_key`, else `user`)
//!    goes to the replica the session went to last, if it is within the load bound;
//! 2. else the replica with the longest match (ties: fewer calls in flight), if within the bound;
//! 3. a best match over the bound **spills** to the best-matching replica within it;
//! 4. no match anywhere: power of two choices over peak-EWMA load (the balancing every stage
//!    uses).
//!
//! The load bound is that of consistent hashing with bounded loads: a replica may take a call
//! while its calls in flight (from this gateway) stay within `balance × (all in flight + 1) /
//! replicas`, rounded up, or below the least-loaded replica's plus [`SLACK`] (at low load a
//! cached prefix is worth more than an even spread), so no replica carries much more than its
//! share however skewed the prefixes are. Failover and resume pick the same way among the replicas the request has not
//! given up on.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use vlm_net::Replica;
use vlm_telemetry::metrics::labels::{RouteLabels, RouteReason};
use vlm_telemetry::MeshMetrics;

/// Bytes of prompt text per key.
pub const CHUNK_BYTES: usize = 64;

/// Keys remembered per replica (LRU).
pub const KEYS_PER_REPLICA: usize = 1 << 16;

/// Calls in flight a replica may have beyond the least-loaded one whatever the bound says: at
/// low load, a cached prefix is worth more than an even spread.
const SLACK: usize = 2;

/// Sessions remembered (LRU).
const SESSIONS: usize = 1 << 16;

/// Which rule picks a decoder replica (`--decoder-routing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingMode {
    /// Prefix-aware, within the load bound (the default).
    Prefix,
    /// Power of two choices over load only, as for the other stages.
    Balance,
}

/// Decoder routing's settings.
#[derive(Clone, Copy, Debug)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    /// The load bound's factor (`--routing-balance`, > 1).
    pub balance: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            mode: RoutingMode::Prefix,
            balance: 1.25,
        }
    }
}

/// One request's routing key: its prefix keys and its affinity key.
#[derive(Clone, Debug, Default)]
pub(crate) struct RouteKey {
    chain: Vec<u64>,
    session: Option<u64>,
}

fn hash_of(parts: impl FnOnce(&mut std::collections::hash_map::DefaultHasher)) -> u64 {
    // SipHash with fixed keys: the same text gives the same keys for the gateway's lifetime.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts(&mut h);
    h.finish()
}

impl RouteKey {
    /// The key of `prompt` with `images` (in request order) and the affinity key `session`.
    pub fn new<'a>(
        prompt: &str,
        images: impl IntoIterator<Item = &'a [u8]>,
        session: Option<&str>,
    ) -> RouteKey {
        let mut chain = Vec::with_capacity(prompt.len() / CHUNK_BYTES + 2);
        let mut prev = 0u64;
        for chunk in prompt.as_bytes().chunks(CHUNK_BYTES) {
            prev = hash_of(|h| {
                prev.hash(h);
                chunk.hash(h);
            });
            chain.push(prev);
        }
        for image in images {
            let digest = blake3::hash(image);
            prev = hash_of(|h| {
                prev.hash(h);
                digest.as_bytes().hash(h);
            });
            chain.push(prev);
        }
        let session = session.filter(|s| !s.is_empty()).map(|s| {
            hash_of(|h| {
                "session".hash(h);
                s.hash(h);
            })
        });
        RouteKey { chain, session }
    }
}

/// A routing decision: the candidate's index and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Decision {
    pub index: Option<usize>,
    pub reason: RouteReason,
}

/// What the gateway knows of each decoder replica's prefixes and sessions.
pub(crate) struct Router {
    cfg: RoutingConfig,
    state: Mutex<State>,
}

struct State {
    /// Per replica id: the keys of prompts sent there.
    held: HashMap<u64, LruCache<u64, ()>>,
    /// Per session key: the replica its last call went to.
    sessions: LruCache<u64, u64>,
}

/// A candidate as the rule sees it.
struct Seen {
    id: u64,
    in_flight: usize,
    matched: usize,
}

impl Router {
    pub fn new(cfg: RoutingConfig) -> Router {
        Router {
            cfg,
            state: Mutex::new(State {
                held: HashMap::new(),
                sessions: LruCache::new(NonZeroUsize::new(SESSIONS).expect("nonzero")),
            }),
        }
    }

    /// Picks among `candidates` for `key` (see the module docs); `index: None` leaves the
    /// choice to power of two choices.
    pub fn choose(&self, key: &RouteKey, candidates: &[&Arc<Replica>]) -> Decision {
        let loads: Vec<(u64, usize)> = candidates.iter().map(|r| (r.id, r.in_flight())).collect();
        self.decide(key, &loads)
    }

    /// [`Self::choose`] over `(replica id, calls in flight)` pairs.
    fn decide(&self, key: &RouteKey, loads: &[(u64, usize)]) -> Decision {
        if self.cfg.mode == RoutingMode::Balance {
            return Decision {
                index: None,
                reason: RouteReason::off,
            };
        }
        let mut state = self.state.lock().expect("routing lock");
        let seen: Vec<Seen> = loads
            .iter()
            .map(|&(id, in_flight)| Seen {
                id,
                in_flight,
                matched: state.held.get(&id).map_or(0, |held| {
                    key.chain.iter().take_while(|k| held.contains(k)).count()
                }),
            })
            .collect();
        let total: usize = seen.iter().map(|s| s.in_flight).sum();
        let bound = (self.cfg.balance * (total + 1) as f64 / seen.len().max(1) as f64).ceil();
        let least = seen.iter().map(|s| s.in_flight).min().unwrap_or(0);
        let within =
            |s: &Seen| s.in_flight < least + SLACK || (s.in_flight + 1) as f64 <= bound.max(1.0);
        if let Some(session) = key.session {
            if let Some(&id) = state.sessions.get(&session) {
                if let Some(i) = seen.iter().position(|s| s.id == id && within(s)) {
                    return Decision {
                        index: Some(i),
                        reason: RouteReason::affinity,
                    };
                }
            }
        }
        drop(state);
        // Longest match first, then fewer calls in flight.
        let best = |ok: &dyn Fn(&Seen) -> bool| {
            (0..seen.len())
                .filter(|&i| seen[i].matched > 0 && ok(&seen[i]))
                .max_by(|&a, &b| {
                    (seen[a].matched, std::cmp::Reverse(seen[a].in_flight))
                        .cmp(&(seen[b].matched, std::cmp::Reverse(seen[b].in_flight)))
                })
        };
        match best(&|_| true) {
            None => Decision {
                index: None,
                reason: RouteReason::balanced,
            },
            Some(i) if within(&seen[i]) => Decision {
                index: Some(i),
                reason: RouteReason::prefix,
            },
            Some(_) => Decision {
                index: best(&within),
                reason: RouteReason::spilled,
            },
        }
    }

    /// Remembers that `key`'s call went to `replica` (its prompt will be in that replica's
    /// prefix cache); `live` are the ids of the replicas that exist now (others are forgotten).
    pub fn record(&self, key: &RouteKey, replica: u64, live: &[u64]) {
        if self.cfg.mode == RoutingMode::Balance {
            return;
        }
        let mut state = self.state.lock().expect("routing lock");
        state.held.retain(|id, _| live.contains(id));
        let held = state.held.entry(replica).or_insert_with(|| {
            LruCache::new(NonZeroUsize::new(KEYS_PER_REPLICA).expect("nonzero"))
        });
        for k in &key.chain {
            held.put(*k, ());
        }
        if let Some(session) = key.session {
            state.sessions.put(session, replica);
        }
    }
}

/// The gRPC metadata that carries a request's affinity key.
pub const SESSION_METADATA: &str = "session-id";

/// Longest affinity key accepted, in bytes.
pub const MAX_SESSION_BYTES: usize = 256;

/// A request's affinity key from its `session-id` metadata (`session_id` too), if any;
/// INVALID_ARGUMENT naming it when it is not visible ASCII or over [`MAX_SESSION_BYTES`].
pub(crate) fn session_of(
    metadata: &tonic::metadata::MetadataMap,
) -> Result<Option<String>, tonic::Status> {
    let Some(value) = metadata
        .get(SESSION_METADATA)
        .or_else(|| metadata.get("session_id"))
    else {
        return Ok(None);
    };
    let bad = |why: &str| {
        tonic::Status::invalid_argument(format!(
            "gateway: the `{SESSION_METADATA}` metadata (the request's routing affinity key) {why}"
        ))
    };
    let s = value.to_str().map_err(|_| bad("is not visible ASCII"))?;
    if s.len() > MAX_SESSION_BYTES {
        return Err(bad(&format!(
            "is {} bytes, over the limit of {MAX_SESSION_BYTES}",
            s.len()
        )));
    }
    Ok(Some(s.to_string()))
}

/// Counts a decision in `vlm_gateway_routing_decisions_total`.
pub(crate) fn count(reason: RouteReason) {
    MeshMetrics::global()
        .gateway_routing
        .get_or_create(&RouteLabels { reason })
        .inc();
}

/// Adds the prompt positions a decoder served from its prefix cache to the decision's count.
pub(crate) fn cached_tokens(reason: RouteReason, tokens: u32) {
    MeshMetrics::global()
        .gateway_routed_cached_tokens
        .get_or_create(&RouteLabels { reason })
        .inc_by(u64::from(tokens));
}

#[cfg(test)]
#[path = "routing_tests.rs"]
mod tests;
