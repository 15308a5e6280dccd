//! A constraint whose next mask is computed while the forward pass runs.
//!
//! The mask for step n+1 depends only on the tokens up to step n, so as soon as a token is
//! accepted the constraint moves to a mask thread, which computes the next mask while the engine
//! runs the batch's next forward; the next step takes the finished mask (waiting only if the
//! forward was faster). A batch of constrained sequences computes its masks in parallel on the
//! pool's threads.

use std::sync::mpsc;
use std::sync::OnceLock;

use super::{Constraint, TokenMask};
use crate::error::{ModelError, Result};

/// Threads computing masks, shared by every engine of the process.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("vlm-mask-{i}"))
            .build()
            .expect("mask thread pool")
    })
}

type Computed = (Box<Constraint>, Result<TokenMask>);

enum State {
    /// On this thread; no mask being computed.
    Here(Box<Constraint>),
    /// On a mask thread, computing the next mask.
    Computing(mpsc::Receiver<Computed>),
    /// A mask thread died (it cannot: llguidance's panics are caught); the sequence fails.
    Lost,
}

/// See the module docs.
pub struct MaskAhead {
    state: State,
}

impl MaskAhead {
    /// Starts `constraint` after the tokens an earlier replica already produced (`resumed`,
    /// replayed without masks, so the stream goes on exactly where it was), and starts computing
    /// the first mask at once (it overlaps the prompt's prefill).
    pub fn start(constraint: Constraint, resumed: &[u32]) -> Result<Self> {
        let mut c = Box::new(constraint);
        for &t in resumed {
            c.advance(t).map_err(|_| {
                ModelError::InvalidParams(format!(
                    "resumed token {t} does not follow the request's format"
                ))
            })?;
        }
        if !resumed.is_empty() && c.is_complete() {
            return Err(ModelError::InvalidParams(
                "the resumed tokens already complete the request's format".into(),
            ));
        }
        let mut me = MaskAhead {
            state: State::Here(c),
        };
        me.compute_next();
        Ok(me)
    }

    /// The mask of this step (waits for its computation).
    pub fn take_mask(&mut self) -> Result<TokenMask> {
        match std::mem::replace(&mut self.state, State::Lost) {
            State::Computing(rx) => {
                let (c, mask) = rx.recv().map_err(|_| lost())?;
                self.state = State::Here(c);
                mask
            }
            State::Here(mut c) => {
                let mask = c.mask();
                self.state = State::Here(c);
                mask
            }
            State::Lost => Err(lost()),
        }
    }

    /// Advances by the sampled `token`; true when the format is complete after it.
    pub fn advance(&mut self, token: u32) -> Result<bool> {
        match &mut self.state {
            State::Here(c) => {
                c.advance(token)?;
                Ok(c.is_complete())
            }
            _ => Err(lost()),
        }
    }

    /// Starts computing the next step's mask on a mask thread.
    pub fn compute_next(&mut self) {
        let State::Here(_) = self.state else {
            return;
        };
        let State::Here(mut c) = std::mem::replace(&mut self.state, State::Lost) else {
            unreachable!()
        };
        let (tx, rx) = mpsc::sync_channel(1);
        pool().spawn(move || {
            let mask = c.mask();
            let _ = tx.send((c, mask));
        });
        self.state = State::Computing(rx);
    }
}

fn lost() -> ModelError {
    ModelError::InvalidFormat("format: its mask computation was lost".into())
}
