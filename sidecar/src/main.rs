//! Command-line entry point of the `veo-sidecar` binary.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use veo_sidecar::cli::Flags;
use veo_sidecar::config::Config;

fn main() -> ExitCode {
    let flags = Flags::parse();
    init_tracing();
    if let Some(command) = flags.command.clone() {
        return run_command(command);
    }

    let config = match Config::load(&flags) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("veo-sidecar: {}", veo_sidecar::error_chain(&err));
            return ExitCode::FAILURE;
        }
    };
    if flags.validate {
        return print_out(&format!("{}: configuration is valid\n", config.origin()));
    }

    info!(version = env!("CARGO_PKG_VERSION"), "starting veo-sidecar");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(veo_sidecar::server::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %veo_sidecar::error_chain(&err), "sidecar failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs an operator command against a running sidecar and prints its
/// result.
fn run_command(command: veo_sidecar::cli::Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("veo-sidecar: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(veo_sidecar::admin_cli::run(command)) {
        Ok(text) => print_out(&text),
        Err(err) => {
            eprintln!("veo-sidecar: {}", veo_sidecar::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to standard output. A reader that closed the pipe early,
/// such as `head`, ends the command quietly; any other failure is an error.
fn print_out(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("veo-sidecar: failed to write to standard output: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at the level `RUST_LOG` sets, info by default, with
/// colours only on a terminal.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
