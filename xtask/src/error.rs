//! Errors of the tasks; each names what failed and what to do next.

use std::path::PathBuf;
use std::time::Duration;

/// Failure of a task.
#[derive(Debug, thiserror::Error)]
pub enum XtaskError {
    /// A program could not be started at all.
    #[error("failed to start `{program}`: {hint}")]
    Spawn {
        program: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    /// A program ran and exited unsuccessfully.
    #[error("`{command}` failed with {status}: {hint}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        hint: String,
    },
    /// A file or folder operation failed.
    #[error("failed to {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tool is present but not usable as it is.
    #[error("{0}")]
    Tool(String),
    /// A started process did not become ready in time.
    #[error("{name} was not ready after {}s; last lines of its log:\n{log_tail}", timeout.as_secs())]
    NotReady {
        name: String,
        timeout: Duration,
        log_tail: String,
    },
    /// A started process exited while it was expected to serve.
    #[error("{name} exited with {status}; last lines of its log:\n{log_tail}")]
    Exited {
        name: String,
        status: std::process::ExitStatus,
        log_tail: String,
    },
    /// A request to Envoy's admin endpoint or to the sidecar failed.
    #[error("request to {target} failed: {reason}")]
    Request { target: String, reason: String },
    /// The user pressed Ctrl-C.
    #[error("interrupted; every started process was stopped")]
    Interrupted,
}

/// Formats an error followed by its chain of causes.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
