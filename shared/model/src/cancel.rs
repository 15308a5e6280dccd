//! Cancellation of long model computations whose caller went away.
//!
//! A gRPC handler that runs a model call on a blocking thread cannot stop that thread when the
//! call is dropped (the client disconnected, or the gateway gave up on this replica and asked
//! another). The handler holds a [`CancelOnDrop`] guard; the computation checks its [`Cancel`]
//! between steps (before preprocessing, between vision layers) and returns
//! [`ModelError::Cancelled`], so abandoned work stops within one step instead of running to the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{ModelError, Result};

/// A flag a computation polls; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token that nothing cancels.
    pub fn never() -> Self {
        Cancel::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once cancelled: the step boundary of a computation.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(ModelError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A guard that cancels this token when dropped (held by the future awaiting the result).
    pub fn on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its token when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropping_the_guard_cancels_every_clone() {
        let token = Cancel::never();
        let seen_by_worker = token.clone();
        assert!(seen_by_worker.check().is_ok());
        let guard = token.on_drop();
        assert!(!seen_by_worker.is_cancelled());
        drop(guard);
        assert!(matches!(seen_by_worker.check(), Err(ModelError::Cancelled)));
    }
}
