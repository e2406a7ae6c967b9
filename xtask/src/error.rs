//! Errors of the tasks; each names what failed and what to do next.

use std::path::PathBuf;

use veo_tests::HarnessError;

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
    /// The stack or a request to it failed.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// The user pressed Ctrl-C.
    #[error("interrupted; every started process was stopped")]
    Interrupted,
}
