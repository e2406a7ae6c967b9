//! Long-running child processes whose output goes to a log file and that are
//! stopped when their guard is dropped, on success, error and Ctrl-C alike.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::XtaskError;

/// How long a process gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started service; dropping it stops the process.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Service {
    /// Starts `command` with stdout and stderr written to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Self, XtaskError> {
        let io_error = |source| XtaskError::Io {
            action: "create the log file",
            path: log.to_path_buf(),
            source,
        };
        let stdout = File::create(log).map_err(io_error)?;
        let stderr = stdout.try_clone().map_err(io_error)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| XtaskError::Spawn {
                program: command.get_program().to_string_lossy().into_owned(),
                hint: "run `cargo xtask build` first".to_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// Fails with the log's last lines when the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), XtaskError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(XtaskError::Exited {
                name: self.name.clone(),
                status,
                log_tail: self.log_tail(),
            }),
            Ok(None) | Err(_) => Ok(()),
        }
    }

    /// Returns the not-ready error for this process after `timeout`.
    pub fn not_ready(&self, timeout: Duration) -> XtaskError {
        XtaskError::NotReady {
            name: self.name.clone(),
            timeout,
            log_tail: self.log_tail(),
        }
    }

    /// Returns the last 20 lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Stops the process with SIGTERM, then SIGKILL after [`STOP_GRACE`].
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if let Ok(raw) = i32::try_from(self.child.id()) {
            // The process may exit between the check and the signal.
            let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "xtask: {} did not stop after SIGTERM; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}
