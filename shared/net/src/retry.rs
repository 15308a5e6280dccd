//! Call-level retries: which failures are worth another replica, how long to back off, and a
//! budget so that retries cannot multiply the load on a stage that is already failing.
//!
//! tower's `Retry` middleware needs `Clone` requests, and a tonic streaming request is a stream
//! that has been consumed by the time it fails; so the caller re-sends the inputs it still holds
//! and asks a [`RetryPolicy`] whether and when to do so.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};

/// Whether a failed call may succeed on another replica. UNAVAILABLE (refused, reset, draining),
/// transport breakage reported as UNKNOWN/INTERNAL by h2, and a peer that cancelled or aborted the
/// call are; anything about the request itself (INVALID_ARGUMENT, RESOURCE_EXHAUSTED…) is not, and
/// neither is an exhausted deadline.
pub fn is_retryable(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable | Code::Aborted | Code::Cancelled | Code::Unknown => true,
        Code::Internal => {
            let m = status.message().to_ascii_lowercase();
            [
                "h2 protocol",
                "transport",
                "connection",
                "stream",
                "broken pipe",
            ]
            .iter()
            .any(|w| m.contains(w))
        }
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct RetryOptions {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubles per retry, up to `max_backoff`; full jitter.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Retries allowed on top of the calls made, as a fraction of them (over `budget_window`)…
    pub budget_ratio: f32,
    /// …plus this many retries per second regardless, so a quiet service can still retry.
    pub budget_min_per_sec: u32,
    pub budget_window: Duration,
}

impl Default for RetryOptions {
    fn default() -> Self {
        RetryOptions {
            max_attempts: 3,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            budget_ratio: 0.2,
            budget_min_per_sec: 10,
            budget_window: Duration::from_secs(10),
        }
    }
}

/// Shared by every call to one stage.
#[derive(Clone)]
pub struct RetryPolicy {
    opts: RetryOptions,
    budget: Arc<TpsBudget>,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("opts", &self.opts)
            .finish()
    }
}

impl RetryPolicy {
    pub fn new(opts: RetryOptions) -> Self {
        let budget = TpsBudget::new(
            opts.budget_window
                .clamp(Duration::from_secs(1), Duration::from_secs(60)),
            opts.budget_min_per_sec,
            opts.budget_ratio,
        );
        RetryPolicy {
            opts,
            budget: Arc::new(budget),
        }
    }

    /// Call once per logical call (not per attempt): it earns the budget its retries spend.
    pub fn record_call(&self) {
        self.budget.deposit();
    }

    /// Whether attempt number `attempt` (1-based, the one that just failed with `status`) may be
    /// retried, and after what pause. `None` when the failure is final, attempts are used up, the
    /// budget is spent, or the pause would end past `deadline`.
    pub fn next_retry(&self, attempt: u32, status: &Status, deadline: Instant) -> Option<Duration> {
        if !is_retryable(status) || attempt >= self.opts.max_attempts {
            return None;
        }
        let exp = self
            .opts
            .base_backoff
            .saturating_mul(1u32 << (attempt - 1).min(16))
            .min(self.opts.max_backoff);
        // Full jitter: callers that failed together do not come back together.
        let pause = exp.mul_f64(crate::jitter::random_unit());
        if Instant::now() + pause >= deadline {
            return None;
        }
        if !self.budget.withdraw() {
            tracing::warn!("retry budget exhausted; not retrying: {}", status.message());
            return None;
        }
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(is_retryable(&Status::unavailable("x")));
        assert!(is_retryable(&Status::internal("h2 protocol error: reset")));
        assert!(!is_retryable(&Status::internal("model failure")));
        assert!(!is_retryable(&Status::invalid_argument("x")));
        assert!(!is_retryable(&Status::resource_exhausted("x")));
        assert!(!is_retryable(&Status::deadline_exceeded("x")));
    }

    #[tokio::test]
    async fn attempts_deadline_and_budget_bound_retries() {
        let p = RetryPolicy::new(RetryOptions {
            max_attempts: 3,
            budget_min_per_sec: 1,
            budget_ratio: 0.0,
            ..Default::default()
        });
        let far = Instant::now() + Duration::from_secs(60);
        let un = Status::unavailable("down");
        assert!(p.next_retry(3, &un, far).is_none(), "attempts used up");
        assert!(
            p.next_retry(1, &un, Instant::now()).is_none(),
            "deadline reached"
        );
        // With no calls deposited, only the per-second minimum is available; it runs out.
        let granted = (0..50)
            .filter(|_| p.next_retry(1, &un, far).is_some())
            .count();
        assert!(granted < 50, "budget never ran out");
        assert!(granted >= 1, "the per-second minimum allows some retries");
        let pause = RetryPolicy::new(Default::default())
            .next_retry(2, &un, far)
            .unwrap();
        assert!(pause <= Duration::from_millis(20), "{pause:?}");
    }
}
