//! Project tasks of Veo Edge, run as `cargo xtask <task>`: install the
//! tools, build the filter and the binaries, run the demo, the test suite or
//! the benchmarks.

mod compile;
mod coverage;
mod demo;
mod error;
mod paths;
mod run;
mod suite;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::XtaskError;

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Project tasks of Veo Edge"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Installs the wasm32-wasip1 target and Envoy 1.40.0 when missing.
    InstallTools {
        /// Also install the servers the tests start, redis-server and
        /// prometheus, with apt-get when they are missing.
        #[arg(long)]
        redis: bool,
    },
    /// Builds the wasm filter, the sidecar and the replay tools in release mode.
    Build,
    /// Starts the sidecar and Envoy with the filter, replays an access log and
    /// prints the summary, then stops every process.
    Demo {
        /// Apache or nginx combined access log to replay [default: the sample
        /// in bench/sample/access.log].
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// How many times faster than recorded the requests are sent.
        #[arg(long, value_name = "N", default_value_t = demo::DEFAULT_SPEED)]
        speed: f64,
    },
    /// Installs the tools, builds everything, runs `cargo test --workspace`,
    /// then measures the line coverage of the erasure, identity, audit and key modules.
    Test {
        /// Arguments passed on to `cargo test`, after `--`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Measures and prints the line coverage of the erasure, identity, audit and key
    /// modules with cargo-llvm-cov, failing on any line not run.
    Coverage,
    /// Installs the tools, builds everything, then runs `veo-bench`.
    Bench {
        /// Arguments passed on to `veo-bench`, after `--`.
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Installs the tools with redis-server, builds everything, then runs
    /// `veo-accuracy`, the accuracy benchmark of the global quota.
    Accuracy {
        /// Arguments passed on to `veo-accuracy`, after `--`.
        #[arg(last = true)]
        accuracy_args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_task(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {}", veo_tests::error::chain(&err));
            ExitCode::FAILURE
        }
    }
}

fn run_task(task: Task) -> Result<(), XtaskError> {
    match task {
        Task::InstallTools { redis } => tools::install(redis).map(|_| ()),
        Task::Build => compile::build_all(),
        Task::Demo { log, speed } => demo::run(log.as_deref(), speed),
        Task::Test { cargo_args } => suite::run(&cargo_args),
        Task::Coverage => coverage::run(),
        Task::Bench { bench_args } => suite::bench(&bench_args),
        Task::Accuracy { accuracy_args } => suite::accuracy(&accuracy_args),
    }
}
