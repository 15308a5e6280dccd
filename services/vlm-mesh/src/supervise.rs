//! What `up` does while the mesh runs: stop on Ctrl-C or when the gateway exits, and start a stage
//! process that died again on its address, with exponential backoff, as Kubernetes restarts a
//! crashed container (the gateway routes around it meanwhile and takes it back when healthy).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::mesh::Mesh;

/// First delay before starting a dead stage again; doubled per consecutive crash.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between restarts of a stage that keeps crashing.
const MAX_DELAY: Duration = Duration::from_secs(30);
/// A stage that ran this long before dying is restarted after [`FIRST_DELAY`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// `up --restart`: what to do when a stage process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RestartPolicy {
    /// Start it again on its address, with backoff (1 s, doubling to 30 s).
    OnFailure,
    /// Leave it down (the gateway keeps routing around it).
    Never,
}

/// Per-stage crash-loop backoff.
#[derive(Debug, Default)]
struct Backoff {
    crashes: u32,
    started: Option<Instant>,
}

impl Backoff {
    /// The delay before the next start, after a crash now.
    fn after_crash(&mut self, now: Instant) -> Duration {
        // It ran since its last start: a long run means it was healthy, not crash-looping.
        if self
            .started
            .take()
            .is_some_and(|t| now.duration_since(t) >= HEALTHY_RUN)
        {
            self.crashes = 0;
        }
        let delay = FIRST_DELAY
            .saturating_mul(1 << self.crashes.min(16))
            .min(MAX_DELAY);
        self.crashes += 1;
        delay
    }
}

/// Runs until `shutdown` completes (Ok: Ctrl-C/SIGTERM) or the gateway exits (Err); then the caller
/// shuts the mesh down. `shutdown` is made before `ready` is printed (see [`vlm_net::shutdown_signal`]).
pub async fn supervise(
    mesh: &mut Mesh,
    policy: RestartPolicy,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    // Stages waiting for their restart, with when it is due.
    let mut due: Vec<(Instant, String)> = Vec::new();
    loop {
        let next = due.iter().map(|(t, _)| *t).min();
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            (label, status) = mesh.child_exited() => {
                if label == "gateway" {
                    anyhow::bail!("the gateway exited ({status}); stopping the mesh");
                }
                if policy == RestartPolicy::Never {
                    eprintln!("warning: the {label} exited ({status}); the gateway routes around it");
                    continue;
                }
                let now = Instant::now();
                let delay = backoff.entry(label.clone()).or_default().after_crash(now);
                eprintln!(
                    "warning: the {label} exited ({status}); restarting it in {delay:?} \
                     (the gateway routes around it meanwhile)"
                );
                due.push((now + delay, label));
            }
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let at = due.iter().position(|(t, _)| Some(*t) == next).expect("due");
                let (_, label) = due.swap_remove(at);
                let b = backoff.entry(label.clone()).or_default();
                b.started = Some(Instant::now());
                match mesh.restart(&label).await {
                    Ok(info) => eprintln!("the {label} is back: pid {} on {}", info.pid, info.addr),
                    Err(e) => {
                        let delay = b.after_crash(Instant::now());
                        eprintln!("warning: restarting the {label} failed ({e:#}); next try in {delay:?}");
                        due.push((Instant::now() + delay, label));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_healthy_run() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..7).map(|_| b.after_crash(t0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        b.started = Some(t0);
        assert_eq!(b.after_crash(t0 + Duration::from_secs(59)).as_secs(), 30);
        b.started = Some(t0);
        assert_eq!(b.after_crash(t0 + HEALTHY_RUN).as_secs(), 1);
        assert_eq!(b.after_crash(t0 + HEALTHY_RUN).as_secs(), 2);
    }
}
