//! Drives the `veo-replay` binary: key generation and log replays against a
//! running Envoy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::HarnessError;
use crate::artifacts;

/// Keys written by `veo-replay keygen`.
#[derive(Debug, Clone)]
pub struct ReplayKeys {
    /// ES256 private key in PKCS#8 PEM that signs the replay's tokens.
    pub signing_key: PathBuf,
    /// The matching public key as a JWKS.
    pub jwks: serde_json::Value,
}

/// Output of one finished `veo-replay run`.
#[derive(Debug)]
pub struct ReplayOutput {
    /// Whether the replay exited with status 0.
    pub success: bool,
    /// Standard output: the summary table.
    pub stdout: String,
    /// Standard error: malformed lines and errors.
    pub stderr: String,
}

/// Runs `veo-replay keygen` into `dir` and reads the JWKS it wrote.
pub fn keygen(dir: &Path) -> Result<ReplayKeys, HarnessError> {
    let output = run(Command::new(artifacts::replay_binary()?)
        .arg("keygen")
        .arg("--dir")
        .arg(dir))?;
    if !output.success {
        return Err(HarnessError::Request {
            target: "veo-replay keygen".to_owned(),
            reason: output.stderr,
        });
    }
    let jwks_path = dir.join("jwks.json");
    let text = std::fs::read_to_string(&jwks_path).map_err(|source| HarnessError::Io {
        action: "read the JWKS written by veo-replay keygen",
        path: jwks_path.clone(),
        source,
    })?;
    let jwks = serde_json::from_str(&text).map_err(|err| HarnessError::Request {
        target: "veo-replay keygen".to_owned(),
        reason: format!("{} is not JSON: {err}", jwks_path.display()),
    })?;
    Ok(ReplayKeys {
        signing_key: dir.join("signing-key.pem"),
        jwks,
    })
}

/// Replays `log` against the listener on 127.0.0.1:`port` at `speed` times
/// the recorded pace, writing the decisions to `decisions`. The replay is
/// killed when it runs longer than `timeout`.
pub async fn replay_log(
    keys: &ReplayKeys,
    port: u16,
    log: &Path,
    speed: f64,
    decisions: &Path,
    timeout: Duration,
) -> Result<ReplayOutput, HarnessError> {
    let mut command = run_command(keys, port, log, speed, decisions)?;
    command.arg("--no-progress");
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .map_err(|_| HarnessError::Request {
            target: "veo-replay run".to_owned(),
            reason: format!(
                "still running after {}s, so it was killed",
                timeout.as_secs()
            ),
        })?
        .map_err(|source| HarnessError::Spawn {
            program: "veo-replay".to_owned(),
            source,
        })?;
    Ok(output.into())
}

/// Returns the `veo-replay run` command that replays `log` against the
/// listener on 127.0.0.1:`port` at `speed` times the recorded pace, signed
/// with `keys` and writing the decisions to `decisions`. The process is
/// killed when the command's child is dropped.
pub fn run_command(
    keys: &ReplayKeys,
    port: u16,
    log: &Path,
    speed: f64,
    decisions: &Path,
) -> Result<tokio::process::Command, HarnessError> {
    let mut command = tokio::process::Command::new(artifacts::replay_binary()?);
    command
        .arg("run")
        .arg("--key")
        .arg(&keys.signing_key)
        .arg("--target")
        .arg(format!("http://127.0.0.1:{port}"))
        .arg("--log")
        .arg(log)
        .arg("--speed")
        .arg(speed.to_string())
        .arg("--decisions")
        .arg(decisions)
        .kill_on_drop(true);
    Ok(command)
}

fn run(command: &mut Command) -> Result<ReplayOutput, HarnessError> {
    let output = command.output().map_err(|source| HarnessError::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    Ok(output.into())
}

impl From<Output> for ReplayOutput {
    fn from(output: Output) -> Self {
        Self {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}
