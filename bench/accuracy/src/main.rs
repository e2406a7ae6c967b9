//! `veo-accuracy`: measures how close several Envoy instances, each with the Veo Edge filter
//! and its own sidecar, come to one exact global quota. For each fleet size it replays
//! synthetic overload and a recorded access log, spreading the requests over the instances at
//! random, and compares every decision with the exact rolling-window oracle of `veo_bench`.
//!
//! It builds nothing: it starts the sidecar binary, the filter module and Envoy that the
//! `veo_tests` harness finds (`cargo xtask build` makes them), and redis-server from `PATH`.

mod plot;
mod redis_stats;
mod report;
mod run;
mod setup;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, ValueEnum};

use crate::setup::Setup;
use crate::workload::Workload;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Accuracy of the global quota across several Envoy instances sharing Redis"
)]
struct Args {
    /// Fleet sizes to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    instances: Vec<usize>,
    /// Seconds each workload lasts: the synthetic overload runs this long, and the access log
    /// is sped up to last this long.
    #[arg(long, default_value_t = 40)]
    duration_seconds: u64,
    /// Folder for the table, the decisions files and the plots.
    #[arg(long, default_value = "out/accuracy")]
    out: PathBuf,
    /// Counter backend of the sidecars: `redis` shares the counters between all sidecars, and
    /// `embedded` gives each sidecar its own, so the instances share nothing (the baseline).
    #[arg(long, value_enum, default_value_t = Counters::Redis)]
    counters: Counters,
    /// Quota window of the tiers, in seconds. The quotas scale with it from the default
    /// 60 (basic) and 600 (pro) requests per 60 s.
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// Customers of the synthetic overload; every fourth one is pro, the others basic.
    #[arg(long, default_value_t = 12)]
    customers: usize,
    /// Multiple of its quota's rate that each synthetic customer sends.
    #[arg(long, default_value_t = 10.0)]
    overload: f64,
    /// Access log to replay [default: ../shared/data/access-log-2015.log beside the
    /// repository]. When the file is absent only the synthetic overload runs.
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Seed of the tiers of the log's customers, the synthetic phases and the instance each
    /// request goes to.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often each filter sends its usage to its sidecar, in milliseconds, while no
    /// customer is near its quota.
    #[arg(long, default_value_t = 200)]
    sync_interval_ms: u64,
    /// Timing error allowed between sending a request and the proxy deciding it, in seconds.
    #[arg(long, default_value_t = 0.25)]
    tolerance_seconds: f64,
    /// Share of a quota used, over all instances, from which each instance
    /// gets a cap (the sidecars' `near_quota_fraction`).
    #[arg(long, default_value_t = 0.0)]
    near_quota_fraction: f64,
}

/// Counter backend of the sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Counters {
    /// One Redis shared by every sidecar.
    Redis,
    /// Each sidecar's own embedded store: no quota is shared between instances.
    Embedded,
}

impl Counters {
    /// Returns the name used on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Counters::Redis => "redis",
            Counters::Embedded => "embedded",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("veo-accuracy: failed to start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = run_all(args) => result,
            _ = tokio::signal::ctrl_c() => {
                Err(anyhow::anyhow!("interrupted; every started process was stopped"))
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("veo-accuracy: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_all(args: Args) -> anyhow::Result<()> {
    let setup = Setup::new(&args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("failed to create the output folder {}", args.out.display()))?;

    let log = args
        .log
        .clone()
        .unwrap_or_else(veo_tests::artifacts::shared_access_log);
    let mut workloads = vec![Workload::overload(&setup)?];
    if log.is_file() {
        workloads.push(Workload::replay(&setup, &log)?);
    } else {
        println!(
            "Access log {} is absent, so only the synthetic overload runs.",
            log.display()
        );
    }

    // With this file, `veo-replay check --plugin-config` checks the decisions files again.
    let plugin_config_path = args.out.join("plugin-config.json");
    std::fs::write(
        &plugin_config_path,
        setup.plugin_config.to_json().to_string(),
    )
    .with_context(|| format!("failed to write {}", plugin_config_path.display()))?;

    let redis_dir = veo_tests::stack::temp_dir_named("veo-accuracy-redis")?;
    let redis = veo_tests::redis::RedisServer::start(redis_dir.path())
        .await
        .context("failed to start redis-server; install it with `apt-get install redis-server`")?;
    let mut redis_client = redis_stats::StatsClient::connect(&redis.url()).await?;

    let mut results = Vec::new();
    for &instances in &args.instances {
        for workload in &workloads {
            println!(
                "Running {} with {instances} instance(s) for about {} s ...",
                workload.name(),
                workload.duration().as_secs()
            );
            let result =
                run::measure(&setup, workload, instances, &redis.url(), &mut redis_client).await?;
            report::write_decisions(&args.out, &result)?;
            println!("{}", report::one_line(&result));
            results.push(result);
        }
    }
    drop(redis);

    let table = report::render(&setup, &workloads, &results);
    println!("\n{table}");
    let table_path = args.out.join("accuracy.md");
    std::fs::write(&table_path, &table)
        .with_context(|| format!("failed to write {}", table_path.display()))?;
    for workload in &workloads {
        let path = plot::write_admitted_plot(&args.out, &setup, workload, &results)?;
        println!("Plot of admitted against quota: {}", path.display());
    }
    println!("Table and decisions files: {}", args.out.display());
    Ok(())
}
