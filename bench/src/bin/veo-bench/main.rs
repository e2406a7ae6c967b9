//! `veo-bench`: measures the throughput and latency of Envoy in five setups in one run.
//! The first is Envoy without a wasm filter. The next two load a wasm filter that does
//! nothing, and one that makes only the host calls of a cached request. The last two load the
//! Veo Edge filter, on cached tokens and verifying every token. All run against the same upstream at the same
//! concurrency, and the table gives each one's ratio to the baseline, and the last three
//! their ratio to the empty wasm filter.
//!
//! `veo-bench memory` instead measures Envoy's heap per customer that the filter tracks in
//! shared data, `veo-bench billing` the Stripe meter events the sidecar sends per admitted
//! request and how fast it sends them, and `veo-bench failover` how fast residency routing
//! moves a storage region to its secondary site.

mod billing;
mod envoy;
mod failover;
mod memory;
mod mint;
mod report;
mod setup;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Repository root, for the default Envoy and wasm paths.
const REPOSITORY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[derive(Parser)]
#[command(
    version,
    about = "Throughput of Envoy with and without the Veo Edge filter",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Measurement to run instead of the throughput benchmark.
    #[command(subcommand)]
    command: Option<Command>,
    /// Envoy binary [default: .tools/envoy/envoy/_bin/envoy in the repository].
    #[arg(long, env = "ENVOY_BIN")]
    envoy: Option<PathBuf>,
    /// Filter module [default: target/wasm32-wasip1/release/veo_filter.wasm].
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Module of the empty wasm filter
    /// [default: target/wasm32-wasip1/release/veo_noop_filter.wasm].
    #[arg(long)]
    noop_wasm: Option<PathBuf>,
    /// Module that makes only the host calls of a cached request
    /// [default: target/wasm32-wasip1/release/veo_host_calls_filter.wasm].
    #[arg(long)]
    host_calls_wasm: Option<PathBuf>,
    /// wrk binary.
    #[arg(long, default_value = "wrk")]
    wrk: PathBuf,
    /// Seconds of measured load per setup.
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Seconds of unmeasured load per setup before the measurement.
    #[arg(long, default_value_t = 2)]
    warmup_seconds: u64,
    /// Open connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Distinct tokens reused by the cached-token setup (one customer each).
    #[arg(long, default_value_t = 16)]
    cached_tokens: usize,
    /// Distinct tokens minted for the verify-every-token setup. It must exceed the requests
    /// that setup completes, or tokens are reused and the run is marked invalid.
    #[arg(long, default_value_t = 40_000)]
    unique_tokens: usize,
    /// Upstream of the proxy: a second Envoy (`envoy`) or a direct response of the proxy
    /// itself (`direct`).
    #[arg(long, value_enum, default_value_t = UpstreamKind::Envoy)]
    upstream: UpstreamKind,
    /// Rounds: every setup runs this many times, interleaved, and the table shows the round
    /// with the median requests/s.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Setups to run, as a comma-separated list of `no-filter`, `empty-wasm`, `host-calls`,
    /// `cached` and `verify` [default: all]. The baseline, `no-filter`, always runs.
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = clap::builder::PossibleValuesParser::new(setup::NAMES)
    )]
    setups: Vec<String>,
    /// Keep the working directory (configurations, logs, tokens) and print its path.
    #[arg(long)]
    keep_dir: bool,
}

/// Measurements other than the throughput benchmark.
#[derive(Subcommand)]
enum Command {
    /// Envoy heap per customer tracked in shared data: the limiter record and the
    /// verified-token cache entry, read from Envoy's admin `/memory`.
    Memory(memory::MemoryArgs),
    /// Stripe meter events per admitted request and per (customer, meter, minute) bucket, and
    /// the sidecar's sync throughput to a fake Stripe next to the async-stripe client alone.
    Billing(billing::BillingArgs),
    /// Time from a failed storage site to the first response from its secondary, and the
    /// requests that fail meanwhile, with and without retries and outlier ejection.
    Failover(failover::FailoverArgs),
}

/// Upstream of the proxy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum UpstreamKind {
    /// A separate Envoy with one worker that returns 200 from a direct response.
    Envoy,
    /// The proxy's own route returns 200 from a direct response.
    Direct,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let outcome = tokio::select! {
        outcome = run(&args) => outcome,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; stopped every process it started")),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<bool> {
    match &args.command {
        Some(Command::Memory(memory_args)) => memory::run(memory_args).await,
        Some(Command::Billing(billing_args)) => billing::run(billing_args).await,
        Some(Command::Failover(failover_args)) => failover::run(failover_args).await,
        None => setup::run(args).await,
    }
}

impl Args {
    fn envoy_path(&self) -> PathBuf {
        self.envoy
            .clone()
            .unwrap_or_else(|| PathBuf::from(REPOSITORY).join(".tools/envoy/envoy/_bin/envoy"))
    }

    fn wasm_path(&self) -> PathBuf {
        self.wasm.clone().unwrap_or_else(|| {
            PathBuf::from(REPOSITORY).join("target/wasm32-wasip1/release/veo_filter.wasm")
        })
    }

    fn noop_wasm_path(&self) -> PathBuf {
        self.noop_wasm.clone().unwrap_or_else(|| {
            PathBuf::from(REPOSITORY).join("target/wasm32-wasip1/release/veo_noop_filter.wasm")
        })
    }

    fn host_calls_wasm_path(&self) -> PathBuf {
        self.host_calls_wasm.clone().unwrap_or_else(|| {
            PathBuf::from(REPOSITORY)
                .join("target/wasm32-wasip1/release/veo_host_calls_filter.wasm")
        })
    }

    fn load(&self, seconds: u64) -> wrk::Load {
        wrk::Load {
            threads: self.threads.max(1),
            connections: self.connections.max(self.threads.max(1)),
            duration: Duration::from_secs(seconds),
        }
    }
}
