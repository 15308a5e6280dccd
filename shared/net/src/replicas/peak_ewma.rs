//! A replica's latency estimate for balancing (see [`PeakEwma`]).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Peak-EWMA latency with the calls in flight: a new sample above the estimate replaces it at once
/// (peak), lower samples pull it down with weight `1 - exp(-elapsed / decay)`, and idle time decays
/// it towards zero so a once-slow replica is probed again. The cost of a call also counts how long
/// the oldest pending call has been waiting, so a replica that has stopped answering gets costlier
/// while it is stuck rather than only after the call finally ends.
pub(super) struct PeakEwma {
    pub(super) estimate_ns: f64,
    updated: Instant,
    decay_ns: f64,
    pub(super) pending: HashMap<u64, Instant>,
    pub(super) next_call: u64,
}

impl PeakEwma {
    pub(super) fn new(default_rtt: Duration, decay: Duration) -> Self {
        PeakEwma {
            estimate_ns: default_rtt.as_nanos() as f64,
            updated: Instant::now(),
            decay_ns: decay.as_nanos().max(1) as f64,
            pending: HashMap::new(),
            next_call: 0,
        }
    }

    fn decayed(&self, now: Instant, sample_ns: f64) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        let w = (-elapsed / self.decay_ns).exp();
        self.estimate_ns * w + sample_ns * (1.0 - w)
    }

    pub(super) fn observe(&mut self, now: Instant, rtt: Duration) {
        let sample = rtt.as_nanos() as f64;
        self.estimate_ns = if sample > self.estimate_ns {
            sample
        } else {
            self.decayed(now, sample)
        };
        self.updated = now;
    }

    pub(super) fn cost(&self, now: Instant) -> f64 {
        let estimate = self.decayed(now, 0.0);
        let stuck = self
            .pending
            .values()
            .map(|t| now.saturating_duration_since(*t).as_nanos() as f64)
            .fold(0.0, f64::max);
        estimate.max(stuck) * (self.pending.len() as f64 + 1.0)
    }
}
