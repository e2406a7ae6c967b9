//! The test suite and the benchmarks, each run after installing the tools
//! and building the artifacts they start.

use std::process::Command;

use crate::error::XtaskError;
use crate::{compile, coverage, paths, run, tools};

/// Installs the tools with redis-server, builds the artifacts, then runs
/// `cargo test --workspace --no-fail-fast` with `extra_args` passed to the
/// test binaries, so one run lists every failing test. A run without
/// `extra_args` then measures and prints the line coverage of the erasure
/// and audit modules.
///
/// The end-to-end tests find Envoy, the filter and the binaries through the
/// `ENVOY_BIN`, `VEO_FILTER_WASM`, `VEO_SIDECAR_BIN` and `VEO_REPLAY_BIN`
/// variables set here.
pub fn run(extra_args: &[String]) -> Result<(), XtaskError> {
    // The tests of the shared counters start real redis-server processes.
    tools::install(true)?;
    let mut command = prepared_command(paths::cargo())?;
    command.args(["test", "--workspace", "--no-fail-fast"]);
    if !extra_args.is_empty() {
        command.arg("--").args(extra_args);
    }
    run::status(&mut command, "the failing tests are listed above")?;
    // A filtered run is for one area; the coverage figure needs them all.
    if extra_args.is_empty() {
        coverage::run()?;
    }
    Ok(())
}

/// Installs the tools, builds the artifacts, then runs `veo-bench` with
/// `args`. The throughput benchmark also gets wrk, unless `--wrk` names
/// one.
pub fn bench(args: &[String]) -> Result<(), XtaskError> {
    let measurement = args
        .iter()
        .any(|arg| ["memory", "billing", "failover", "--help", "-h"].contains(&arg.as_str()));
    let own_wrk = args
        .iter()
        .any(|arg| arg == "--wrk" || arg.starts_with("--wrk="));
    if !measurement && !own_wrk {
        tools::ensure_wrk()?;
    }
    let mut command = prepared_command(paths::release_binary("veo-bench").into_os_string())?;
    command.args(args);
    run::status(&mut command, "see the benchmark's output above")
}

/// Installs the tools with redis-server, builds the artifacts and
/// `veo-accuracy`, then runs it with `args`.
pub fn accuracy(args: &[String]) -> Result<(), XtaskError> {
    tools::install(true)?;
    let mut command = prepared_command(paths::release_binary("veo-accuracy").into_os_string())?;
    run::status(
        Command::new(paths::cargo())
            .args(["build", "--release", "-p", "veo-accuracy"])
            .current_dir(paths::workspace_root()),
        "fix the build errors above, then retry",
    )?;
    command.args(args);
    run::status(&mut command, "see the benchmark's output above")
}

/// Returns `program` set up to run in the workspace root with the artifact
/// variables, after installing the tools and building the artifacts.
fn prepared_command(program: impl AsRef<std::ffi::OsStr>) -> Result<Command, XtaskError> {
    let tools = tools::install(false)?;
    compile::build_all()?;

    let mut command = Command::new(program);
    command
        .current_dir(paths::workspace_root())
        .env("ENVOY_BIN", &tools.envoy)
        .env("VEO_FILTER_WASM", paths::filter_wasm())
        .env("VEO_SIDECAR_BIN", paths::release_binary("veo-sidecar"))
        .env("VEO_REPLAY_BIN", paths::release_binary("veo-replay"));
    Ok(command)
}
