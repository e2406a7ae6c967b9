//! The `run` command: plan, replay, summarize, and optionally check with the oracle.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use veo_bench::access_log::read_access_log;
use veo_bench::decisions::{Decision, read_decisions, write_decisions};
use veo_bench::limits::TierLimits;
use veo_bench::oracle::{Violation, check_decisions};
use veo_bench::replay::{
    PlannedRequest, ReplayOptions, SyntheticLoad, plan_from_log, plan_synthetic, run_replay,
};
use veo_bench::summary::{render_table, summarize};
use veo_bench::tiers::TierAssignment;
use veo_bench::tokens::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKey, TokenSpec};

/// Malformed lines and violations listed one by one before the rest are only counted.
const LISTED_MAX: usize = 20;

/// Options of `veo-replay run`.
#[derive(Args)]
pub struct RunArgs {
    /// ES256 private key (PKCS#8 PEM) that signs the tokens, from `veo-replay keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Base URL of the Envoy listener.
    #[arg(long)]
    target: String,
    /// Access log in the combined format [default: the sample log of this crate].
    #[arg(long, conflicts_with = "synthetic_customers")]
    log: Option<PathBuf>,
    /// Speed-up factor: log time divided by this is replay time.
    #[arg(long, default_value_t = 1000.0)]
    speed: f64,
    /// Seed of the tier assignment and of synthetic traffic.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// JSON object of customer id (`cust-<address>`) to tier; others get basic.
    /// Without it tiers are drawn by the seed: 80% basic, 15% pro, 5% enterprise.
    #[arg(long)]
    tiers: Option<PathBuf>,
    /// Write one JSON object per request to this file.
    #[arg(long)]
    decisions: Option<PathBuf>,
    /// `iss` claim of the tokens.
    #[arg(long, default_value = DEFAULT_ISSUER)]
    issuer: String,
    /// `aud` claim of the tokens.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// Synthetic mode: number of customers, instead of a log.
    #[arg(long, requires = "overload")]
    synthetic_customers: Option<usize>,
    /// Synthetic mode: each customer sends this many times its tier's sustained rate.
    #[arg(long, requires = "synthetic_customers")]
    overload: Option<f64>,
    /// Synthetic mode: seconds of traffic.
    #[arg(long, default_value_t = 30.0)]
    duration_seconds: f64,
    /// Maximum requests in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Milliseconds allowed per request before it is recorded without a response.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(flatten)]
    limits: LimitArgs,
    /// Check the decisions against the rolling-window rules; exit with status 1 on a
    /// violation.
    #[arg(long)]
    check: bool,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// Sources of the tier limits, for synthetic rates and the check.
#[derive(Args)]
pub struct LimitArgs {
    /// Filter plugin configuration (JSON) whose `tiers` give the limits
    /// [default: basic 60 and pro 600 per 60 s, enterprise burst 200 at 100/s].
    #[arg(long)]
    plugin_config: Option<PathBuf>,
    /// Window length in seconds of every quota, overriding the configured one.
    #[arg(long)]
    window_seconds: Option<u64>,
    /// Timing tolerance of the check, in seconds.
    #[arg(long, default_value_t = 0.5)]
    tolerance_seconds: f64,
}

impl LimitArgs {
    fn load(&self) -> anyhow::Result<TierLimits> {
        let limits = match &self.plugin_config {
            Some(path) => TierLimits::read_plugin_config(path)?,
            None => TierLimits::default_tiers(),
        };
        Ok(match self.window_seconds {
            Some(window_seconds) => limits.with_window_seconds(window_seconds),
            None => limits,
        })
    }
}

/// Options of `veo-replay check`.
#[derive(Args)]
pub struct CheckArgs {
    /// Decisions file (JSON Lines) written by `veo-replay run`.
    #[arg(long)]
    decisions: PathBuf,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Checks an existing decisions file.
pub fn check_file(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let decisions = read_decisions(&args.decisions)?;
    let limits = args.limits.load()?;
    Ok(check(&decisions, &limits, args.limits.tolerance_seconds))
}

/// Runs the oracle, prints its report and returns the exit code.
fn check(decisions: &[Decision], limits: &TierLimits, tolerance_seconds: f64) -> ExitCode {
    let report = check_decisions(decisions, limits, tolerance_seconds);
    print_violations(&report.violations);
    println!(
        "check: {} customers with a quota checked, {} without a quota, {} violations",
        report.customers_checked,
        report.customers_without_quota,
        report.violations.len()
    );
    if !report.unknown_tiers.is_empty() {
        println!(
            "check: tiers without configured limits, not checked: {}",
            report.unknown_tiers.join(", ")
        );
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the replay described by `args`.
pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let key = SigningKey::read_pem(&args.key)?;
    let tiers = match &args.tiers {
        Some(path) => TierAssignment::read_mapping(path)?,
        None => TierAssignment::seeded(args.seed),
    };
    let limits = args.limits.load()?;

    let plan = build_plan(&args, &tiers, &limits)?;
    let options = ReplayOptions {
        target: args.target.clone(),
        concurrency: args.concurrency,
        request_timeout: Duration::from_millis(args.timeout_ms),
        token_spec: TokenSpec {
            issuer: args.issuer.clone(),
            audience: args.audience.clone(),
            ..TokenSpec::default()
        },
        progress: !args.no_progress,
    };
    let outcome = run_replay(plan, &key, &options).await?;

    print!("{}", render_table(&summarize(&outcome.decisions)));
    println!(
        "replayed {} requests in {:.1} s; latest send {:.1} ms behind schedule",
        outcome.decisions.len(),
        outcome.elapsed.as_secs_f64(),
        outcome.max_lateness.as_secs_f64() * 1_000.0
    );
    if let Some(path) = &args.decisions {
        write_decisions(path, &outcome.decisions)?;
        println!("decisions written to {}", path.display());
    }

    if !args.check {
        return Ok(ExitCode::SUCCESS);
    }
    Ok(check(
        &outcome.decisions,
        &limits,
        args.limits.tolerance_seconds,
    ))
}

/// Prints the first violation of each customer, for at most [`LISTED_MAX`] customers.
fn print_violations(violations: &[Violation]) {
    let mut per_customer: Vec<(&Violation, usize)> = Vec::new();
    for violation in violations {
        match per_customer.last_mut() {
            Some((first, count)) if first.customer == violation.customer => *count += 1,
            _ => per_customer.push((violation, 1)),
        }
    }
    for (first, count) in per_customer.iter().take(LISTED_MAX) {
        println!("violation: {first} ({count} violations for this customer)");
    }
    if per_customer.len() > LISTED_MAX {
        println!(
            "violations for {} more customers not listed",
            per_customer.len() - LISTED_MAX
        );
    }
}

fn build_plan(
    args: &RunArgs,
    tiers: &TierAssignment,
    limits: &TierLimits,
) -> anyhow::Result<Vec<PlannedRequest>> {
    if let (Some(customers), Some(overload)) = (args.synthetic_customers, args.overload) {
        let duration = Duration::try_from_secs_f64(args.duration_seconds).with_context(|| {
            format!(
                "invalid --duration-seconds {}: expected a positive number",
                args.duration_seconds
            )
        })?;
        let load = SyntheticLoad {
            customers,
            overload,
            duration,
            seed: args.seed,
        };
        return Ok(plan_synthetic(&load, tiers, limits)?);
    }

    let path = args.log.clone().unwrap_or_else(|| {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/sample/access.log"))
    });
    let log = read_access_log(&path)?;
    for malformed in log.malformed.iter().take(LISTED_MAX) {
        eprintln!(
            "{}:{}: skipped malformed line: {}",
            path.display(),
            malformed.line,
            malformed.reason
        );
    }
    if log.malformed.len() > LISTED_MAX {
        eprintln!(
            "skipped {} more malformed lines",
            log.malformed.len() - LISTED_MAX
        );
    }
    println!(
        "{}: {} requests, skipped {} malformed line(s)",
        path.display(),
        log.entries.len(),
        log.malformed.len()
    );
    Ok(plan_from_log(&log.entries, tiers, args.speed)?)
}
