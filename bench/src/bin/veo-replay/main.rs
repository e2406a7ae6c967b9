//! `veo-replay`: generates signing keys and synthetic access logs, and replays an access log
//! or synthetic overload against Envoy with per-customer JWTs, writing a decisions file and a
//! per-tier summary.

mod run;

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use veo_bench::generate::{GenerateOptions, generate_access_log};
use veo_bench::tokens::write_key_files;

#[derive(Parser)]
#[command(
    version,
    about = "Replay access logs against Veo Edge with per-customer JWTs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ES256 key pair: DIR/signing-key.pem (PKCS#8) and DIR/jwks.json.
    Keygen {
        /// Directory for the key files; created when missing.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Replay an access log or synthetic overload and summarize the decisions per tier.
    Run(Box<run::RunArgs>),
    /// Check a decisions file against the rolling-window quota rules; exit with status 1 on a
    /// violation.
    Check(run::CheckArgs),
    /// Write a synthetic access log in the combined format.
    Generate {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of every random choice; the same seed gives the same file.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Lines to write, including one malformed line.
        #[arg(long, default_value_t = 2_500)]
        lines: usize,
        /// Hours of log time the requests spread over.
        #[arg(long, default_value_t = 6)]
        span_hours: u64,
    },
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen { dir } => {
            let (_, files) = write_key_files(&dir)?;
            println!("wrote {}", files.signing_key.display());
            println!("wrote {}", files.jwks.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Runtime::new().context("failed to start the runtime")?;
            runtime.block_on(run::run(*args))
        }
        Command::Check(args) => run::check_file(&args),
        Command::Generate {
            out,
            seed,
            lines,
            span_hours,
        } => {
            let options = GenerateOptions {
                seed,
                lines,
                span_seconds: span_hours * 3_600,
                ..GenerateOptions::default()
            };
            let file = File::create(&out)
                .with_context(|| format!("failed to create {}", out.display()))?;
            let log = generate_access_log(&options, &mut BufWriter::new(file))?;
            println!(
                "wrote {} lines from {} clients to {} (malformed line {})",
                log.lines,
                log.clients,
                out.display(),
                log.malformed_line
            );
            for (address, requests) in &log.heavy_clients {
                println!("heavy client {address}: {requests} requests");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
