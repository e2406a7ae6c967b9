//! Child processes with their output in a log file, stopped when dropped so
//! that a failing test leaves nothing running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::HarnessError;

/// How long a process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Number of log lines that errors quote.
const LOG_TAIL_LINES: usize = 30;

/// A started process; dropping it stops the process.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `command` with stdout and stderr appended to `log`.
    ///
    /// Appending keeps the log of an earlier run of the same process, as
    /// after a restart.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Self, HarnessError> {
        let io_error = |source| HarnessError::Io {
            action: "open the log file",
            path: log.to_path_buf(),
            source,
        };
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io_error)?;
        let stderr = stdout.try_clone().map_err(io_error)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                program: command.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Returns the name given at start, used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the exit status when the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the log's last lines when the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), HarnessError> {
        match self.exit_status() {
            Some(status) => Err(HarnessError::Exited {
                name: self.name.clone(),
                status,
                log_tail: self.log_tail(),
            }),
            None => Ok(()),
        }
    }

    /// Returns the error for a process that was not ready after `timeout`.
    pub fn not_ready(&self, timeout: Duration) -> HarnessError {
        HarnessError::NotReady {
            name: self.name.clone(),
            timeout,
            log_tail: self.log_tail(),
        }
    }

    /// Returns the whole log written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Returns the last lines of the log.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to the process, unless it already exited.
    pub fn signal(&mut self, signal: Signal) -> Result<(), HarnessError> {
        if let Some(status) = self.exit_status() {
            return Err(HarnessError::Exited {
                name: self.name.clone(),
                status,
                log_tail: self.log_tail(),
            });
        }
        if let Ok(raw) = i32::try_from(self.child.id()) {
            // The process may exit between the check and the signal.
            let _ = kill(Pid::from_raw(raw), signal);
        }
        Ok(())
    }

    /// Kills the process with SIGKILL, as `kill -9` does, and reaps it.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM, then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        if let Ok(raw) = i32::try_from(self.child.id()) {
            // The process may exit between the check and the signal.
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill_hard();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop();
    }
}
