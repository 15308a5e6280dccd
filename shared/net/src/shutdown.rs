use std::future::Future;

/// Completes on Ctrl-C (SIGINT) or SIGTERM (what Kubernetes and `vlm-mesh up` send), for
/// `serve_with_shutdown`.
///
/// The handlers are installed when this is *called*, not when the future is first polled: call it
/// before announcing readiness (`listening …`, `ready …`), so a signal sent the moment a
/// supervisor sees that line is a graceful stop, never the default action that kills the process.
/// A signal that arrives before the future is polled is kept and completes it at once. If a
/// handler cannot be installed, that signal is logged and ignored rather than ending the server.
///
/// Must be called inside a Tokio runtime with I/O enabled.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        let interrupt = install(SignalKind::interrupt(), "Ctrl-C");
        let terminate = install(SignalKind::terminate(), "SIGTERM");
        async move {
            async fn recv(s: Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(interrupt) => tracing::info!("Ctrl-C received, shutting down"),
                _ = recv(terminate) => tracing::info!("SIGTERM received, shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received, shutting down");
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// The handler exists as soon as `shutdown_signal()` returns: a SIGTERM sent before the future
    /// is ever polled neither kills the test process nor gets lost.
    #[tokio::test]
    async fn a_signal_before_the_first_poll_completes_the_future() {
        let shutdown = shutdown_signal();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success());
        tokio::time::timeout(std::time::Duration::from_secs(30), shutdown)
            .await
            .expect("the SIGTERM sent before the first poll completes the shutdown future");
    }
}
