//! Waiting for SIGTERM or SIGINT.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Installed handlers for the signals that stop the sidecar.
pub(super) struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
}

impl StopSignals {
    /// Installs the handlers. Install them before announcing readiness, so
    /// that a SIGTERM sent right after the ready file appears stops the
    /// server cleanly instead of killing the process.
    pub(super) fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the first signal and returns its name.
    pub(super) async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
