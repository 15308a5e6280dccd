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

#[derive(Debug)]
pub struct AdaptiveTimeout {
    name: &'static str,
    opts: AdaptiveTimeoutOptions,
    per_replica: Mutex<HashMap<u64, (f64, Instant)>>,
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
        let mut m = self.per_replica.lock().expect("adaptive lock");
        let e = m.entry(replica).or_insert((sample, Instant::now()));
        let w = if sample > e.0 { UP } else { DOWN };
        e.0 += w * (sample - e.0);
        e.1 = Instant::now();
    }

    /// The per-unit estimate of the fastest replica heard from recently, if any.
    pub fn estimate(&self) -> Option<Duration> {
        let m = self.per_replica.lock().expect("adaptive lock");
        m.values()
            .filter(|(_, t)| t.elapsed() < STALE)
            .map(|(e, _)| *e)
            .min_by(f64::total_cmp)
            .map(Duration::from_secs_f64)
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
}
