//! Adaptive timeouts: how long one unit of work (an image, a row block, a decode step) may take
//! before the replica doing it is considered stuck and the call is abandoned and retried elsewhere.
//!
//! Each replica's latency per unit feeds a high-quantile EWMA (it rises quickly on slow samples and
//! falls slowly), and the stage's limit is `factor ×` the *best* replica's estimate: "how long a
//! healthy replica takes for this", so one slow replica cannot raise the bar that detects it. The
//! result is clamped to `[min, max]`, and never reaches past the caller's remaining deadline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct AdaptiveTimeoutOptions {
    pub factor: f64,
    pub min: Duration,
    pub max: Duration,
}

impl Default for AdaptiveTimeoutOptions {
    fn default() -> Self {
        AdaptiveTimeoutOptions {
            factor: 5.0,
            min: Duration::from_millis(500),
            max: Duration::from_secs(60),
        }
    }
}

/// Weight of a sample above the estimate, and of one below it: asymmetric, so the estimate tracks
/// roughly the 90th percentile rather than the mean.
const UP: f64 = 0.3;
const DOWN: f64 = 0.03;
/// Estimates of replicas not heard from for this long no longer count (the replica may be gone).
const STALE: Duration = Duration::from_secs(120);
/// A peer idle for longer than this says nothing about how fast replicas are now.
pub const FRESH: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct AdaptiveTimeout {
    name: &'static str,
    opts: AdaptiveTimeoutOptions,
    per_replica: Mutex<HashMap<u64, Seen>>,
}

/// What is known of one replica: its estimate per unit, its last sample and when that came.
#[derive(Debug, Clone, Copy)]
struct Seen {
    estimate: f64,
    last: f64,
    at: Instant,
}

/// A replica a slow call's replica is compared with: its id, and whether the caller has calls in
/// flight on it now.
#[derive(Debug, Clone, Copy)]
pub struct PeerPace {
    pub id: u64,
    pub busy: bool,
}

impl AdaptiveTimeout {
    pub fn new(name: &'static str, opts: AdaptiveTimeoutOptions) -> Self {
        AdaptiveTimeout {
            name,
            opts,
            per_replica: Mutex::new(HashMap::new()),
        }
    }

    /// Records that `replica` did `units` of work in `elapsed`.
    pub fn observe(&self, replica: u64, elapsed: Duration, units: f64) {
        if units <= 0.0 {
            return;
        }
        let sample = elapsed.as_secs_f64() / units;
        let now = Instant::now();
        let mut m = self.per_replica.lock().expect("adaptive lock");
        let e = m.entry(replica).or_insert(Seen {
            estimate: sample,
            last: sample,
            at: now,
        });
        let w = if sample > e.estimate { UP } else { DOWN };
        e.estimate += w * (sample - e.estimate);
        e.last = sample;
        e.at = now;
    }

    /// The per-unit estimate of the fastest replica heard from recently, if any.
    pub fn estimate(&self) -> Option<Duration> {
        let m = self.per_replica.lock().expect("adaptive lock");
        m.values()
            .filter(|s| s.at.elapsed() < STALE)
            .map(|s| s.estimate)
            .min_by(f64::total_cmp)
            .map(Duration::from_secs_f64)
    }

    /// Whether a call that has waited `waited` for `units` of work is slow because of its
    /// replica, not because every replica is slow: true when some peer is clearly faster now,
    /// its per-unit time × the factor below the wait's. A peer's time now is the largest of its
    /// estimate, its last sample and, while the caller has calls in flight on it, the time since
    /// it last answered (a peer that is stuck too counts as that slow). Peers not heard from for
    /// [`FRESH`] say nothing; `None` when no peer says anything.
    pub fn is_outlier(&self, waited: Duration, units: f64, peers: &[PeerPace]) -> Option<bool> {
        let per_unit = waited.as_secs_f64() / units.max(1.0);
        let m = self.per_replica.lock().expect("adaptive lock");
        let now = Instant::now();
        let mut fastest: Option<f64> = None;
        for p in peers {
            let Some(s) = m.get(&p.id) else { continue };
            let since = now.saturating_duration_since(s.at);
            if since >= FRESH && !p.busy {
                continue;
            }
            let open = if p.busy { since.as_secs_f64() } else { 0.0 };
            let t = s.estimate.max(s.last).max(open);
            fastest = Some(fastest.map_or(t, |f: f64| f.min(t)));
        }
        fastest.map(|t| per_unit > self.opts.factor * t)
    }

    /// How long `units` of work may take: `factor × estimate × units` clamped to `[min, max]`
    /// (`max` before anything was observed), and at most until `deadline`.
    pub fn limit(&self, units: f64, deadline: Instant) -> Duration {
        let adaptive = match self.estimate() {
            Some(e) => e
                .mul_f64(self.opts.factor * units.max(1.0))
                .clamp(self.opts.min, self.opts.max),
            None => self.opts.max,
        };
        adaptive.min(deadline.saturating_duration_since(Instant::now()))
    }

    /// The clamp's upper end (at most until `deadline`): a bound for waits that say nothing
    /// about the work, such as queueing.
    pub fn max_limit(&self, deadline: Instant) -> Duration {
        self.opts
            .max
            .min(deadline.saturating_duration_since(Instant::now()))
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_follows_the_fastest_replica_and_is_clamped() {
        let t = AdaptiveTimeout::new(
            "x",
            AdaptiveTimeoutOptions {
                factor: 4.0,
                min: Duration::from_millis(50),
                max: Duration::from_secs(10),
            },
        );
        let far = Instant::now() + Duration::from_secs(3600);
        assert_eq!(t.limit(1.0, far), Duration::from_secs(10), "unseeded: max");
        for _ in 0..20 {
            t.observe(0, Duration::from_millis(20), 1.0);
            t.observe(1, Duration::from_millis(400), 1.0); // a slow replica
        }
        let l = t.limit(1.0, far);
        assert!(
            l >= Duration::from_millis(79) && l <= Duration::from_millis(81),
            "{l:?}"
        );
        // Per unit: 3 units take three times as long, clamped at max.
        assert!(t.limit(3.0, far) > Duration::from_millis(230));
        assert_eq!(t.limit(1e6, far), Duration::from_secs(10));
        // Never past the deadline.
        let soon = Instant::now() + Duration::from_millis(5);
        assert!(t.limit(1.0, soon) <= Duration::from_millis(5));
        // Tiny samples still give at least `min`.
        let u = AdaptiveTimeout::new("y", t.opts.clone());
        u.observe(0, Duration::from_micros(1), 1.0);
        assert_eq!(u.limit(1.0, far), Duration::from_millis(50));
    }

    #[test]
    fn a_wait_is_an_outlier_only_against_a_faster_peer() {
        let t = AdaptiveTimeout::new(
            "x",
            AdaptiveTimeoutOptions {
                factor: 5.0,
                min: Duration::from_millis(50),
                max: Duration::from_secs(10),
            },
        );
        let idle = |id| PeerPace { id, busy: false };
        // No peer heard from: nothing to compare with.
        assert_eq!(t.is_outlier(Duration::from_secs(1), 1.0, &[idle(1)]), None);
        for _ in 0..10 {
            t.observe(1, Duration::from_millis(20), 1.0);
        }
        // 200 ms is 10× a peer's 20 ms: an outlier; 80 ms is not.
        assert_eq!(
            t.is_outlier(Duration::from_millis(200), 1.0, &[idle(1)]),
            Some(true)
        );
        assert_eq!(
            t.is_outlier(Duration::from_millis(80), 1.0, &[idle(1)]),
            Some(false)
        );
        // Per unit: 10 units of 20 ms are not slow.
        assert_eq!(
            t.is_outlier(Duration::from_millis(200), 10.0, &[idle(1)]),
            Some(false)
        );
        // Every replica slow now: the peer's last sample is as slow as the wait.
        t.observe(1, Duration::from_millis(150), 1.0);
        assert_eq!(
            t.is_outlier(Duration::from_millis(200), 1.0, &[idle(1)]),
            Some(false)
        );
        // A busy peer that has not answered for a while is that slow too.
        let u = AdaptiveTimeout::new("y", t.opts.clone());
        u.observe(2, Duration::from_millis(20), 1.0);
        std::thread::sleep(Duration::from_millis(60));
        let busy = PeerPace { id: 2, busy: true };
        assert_eq!(
            u.is_outlier(Duration::from_millis(200), 1.0, &[busy]),
            Some(false)
        );
        assert_eq!(
            u.is_outlier(Duration::from_millis(200), 1.0, &[idle(2)]),
            Some(true)
        );
    }
}
