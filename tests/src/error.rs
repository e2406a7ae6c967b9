//! Errors of the harness; each names the process, file or request that
//! failed and, where it helps, the last lines of the process's log.

use std::path::PathBuf;
use std::time::Duration;

/// Failure while setting up or driving the processes under test.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A build artifact or tool is missing.
    #[error(
        "{what} not found at {}: run `cargo xtask test`, which installs Envoy and builds the \
         filter and the binaries (or set {variable} to its path)",
        path.display()
    )]
    MissingArtifact {
        /// What the artifact is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// Environment variable that overrides the path.
        variable: &'static str,
    },
    /// A program that the tests run is not installed.
    #[error("{tool} not found: run `{install}`, or set {variable} to its path")]
    MissingTool {
        /// Name of the program.
        tool: &'static str,
        /// Command that installs it.
        install: &'static str,
        /// Environment variable that overrides the path.
        variable: &'static str,
    },
    /// A program could not be started.
    #[error("failed to start {program}")]
    Spawn {
        /// Path of the program.
        program: String,
        /// Cause reported by the operating system.
        #[source]
        source: std::io::Error,
    },
    /// A file or socket operation failed.
    #[error("failed to {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// File, folder or address involved.
        path: PathBuf,
        /// Cause reported by the operating system.
        #[source]
        source: std::io::Error,
    },
    /// A process did not become ready in time.
    #[error("{name} was not ready after {}s; last lines of its log:\n{log_tail}", timeout.as_secs())]
    NotReady {
        /// Name of the process.
        name: String,
        /// How long the harness waited.
        timeout: Duration,
        /// Last lines of the process's output.
        log_tail: String,
    },
    /// A process exited while it was expected to serve.
    #[error("{name} exited with {status}; last lines of its log:\n{log_tail}")]
    Exited {
        /// Name of the process.
        name: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Last lines of the process's output.
        log_tail: String,
    },
    /// An HTTP or gRPC request failed before a response arrived.
    #[error("request to {target} failed: {reason}")]
    Request {
        /// URL or service of the request.
        target: String,
        /// What went wrong.
        reason: String,
    },
    /// The Envoy bootstrap template could not be rendered.
    #[error("invalid bootstrap template {}: {reason}", path.display())]
    Template {
        /// Path of the template.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A token could not be minted.
    #[error("failed to mint a token: {0}")]
    Token(String),
    /// A configuration that the harness writes for a process is invalid.
    #[error("invalid {what}: {reason}")]
    InvalidConfig {
        /// Which configuration.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
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
