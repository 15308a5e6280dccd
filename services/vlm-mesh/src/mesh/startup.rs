//! How `up`'s start-up ends other than in a ready mesh: which endings are a requested stop, and
//! how the gateway's public ports are served.

use std::process::ExitStatus;

/// Whether the gateway `up` starts serves its public ports in plaintext: `VLM_PLAINTEXT` set to
/// anything clap reads as true (it reaches the gateway through the environment).
pub(super) fn gateway_plaintext() -> bool {
    std::env::var("VLM_PLAINTEXT").is_ok_and(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "f" | "no" | "n" | "off"
        )
    })
}

/// A service ended during start-up because it was asked to (it exited 0, or SIGINT/SIGTERM ended
/// it): a Ctrl-C in the terminal reaches every process of the group. A normal stop, not a failure.
#[derive(Debug)]
pub struct StoppedDuringStartup {
    pub service: String,
    pub status: ExitStatus,
}

impl std::fmt::Display for StoppedDuringStartup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the {} was stopped during start-up ({})",
            self.service, self.status
        )
    }
}

impl std::error::Error for StoppedDuringStartup {}

/// Why a service ended during start-up: [`StoppedDuringStartup`] when it was asked to stop,
/// otherwise a failure naming it.
pub(super) fn ended_during_startup(service: &str, status: ExitStatus, what: &str) -> anyhow::Error {
    use std::os::unix::process::ExitStatusExt;
    let asked =
        status.success() || matches!(status.signal(), Some(libc::SIGINT) | Some(libc::SIGTERM));
    if asked {
        StoppedDuringStartup {
            service: service.to_string(),
            status,
        }
        .into()
    } else {
        anyhow::anyhow!("the {service} {what} ({status}); see its log above")
    }
}
