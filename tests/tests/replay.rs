//! Access-log replays through Envoy with the filter, checked decision by
//! decision against the exact rolling-window oracle.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use veo_bench::access_log::read_access_log;
use veo_bench::decisions::read_decisions;
use veo_bench::limits::TierLimits;
use veo_bench::oracle::check_decisions;
use veo_tests::plugin::PluginConfig;
use veo_tests::replay::{keygen, replay_log};
use veo_tests::stack::temp_dir;
use veo_tests::{Stack, StackOptions, artifacts};

/// Allowed gap between when the replay sent a request and when the filter
/// decided it, in seconds.
const TOLERANCE_SECONDS: f64 = 0.5;

/// Keeps the replays in this file from overlapping: each one's timing check
/// allows only [`TOLERANCE_SECONDS`] between sending and deciding, and two
/// replays at once on a 2-core machine could exceed that.
static ONE_REPLAY_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What one replay must show.
struct Expectation {
    speed: f64,
    window_seconds: u64,
    min_customers_refused: usize,
}

/// Replays `log` through a stack whose tiers keep the default quotas with a
/// window of `expectation.window_seconds`, then checks the outcome.
async fn replay_and_check(log: &Path, expectation: &Expectation) -> anyhow::Result<()> {
    let _turn = ONE_REPLAY_AT_A_TIME.lock().await;
    let parsed = read_access_log(log)?;
    let files = temp_dir()?;
    let keys = keygen(files.path())?;
    let window = expectation.window_seconds;
    let config = PluginConfig::for_jwks(keys.jwks.clone()).set(
        "/tiers",
        json!({
            "basic": {"quota": {"requests": 60, "window_seconds": window}},
            "pro": {"quota": {"requests": 600, "window_seconds": window}},
            "enterprise": {"burst": {"tokens_per_second": 100, "size": 200}},
        }),
    );
    let stack = Stack::start_with(
        &config,
        StackOptions {
            concurrency: 2,
            ..StackOptions::default()
        },
    )
    .await?;

    let decisions_path = files.path().join("decisions.jsonl");
    let output = replay_log(
        &keys,
        stack.envoy.listener_port(),
        log,
        expectation.speed,
        &decisions_path,
        Duration::from_secs(300),
    )
    .await?;
    assert!(
        output.success,
        "veo-replay failed:\n{}\n{}",
        output.stdout, output.stderr
    );
    for malformed in &parsed.malformed {
        let mention = format!(":{}:", malformed.line);
        assert!(
            output.stderr.contains(&mention),
            "malformed line {} not reported; stderr:\n{}",
            malformed.line,
            output.stderr
        );
    }

    let decisions = read_decisions(&decisions_path)?;
    assert_eq!(
        decisions.len(),
        parsed.entries.len(),
        "one decision per well-formed line"
    );
    let undecided: Vec<_> = decisions
        .iter()
        .filter(|decision| decision.status != 200 && decision.status != 429)
        .take(5)
        .collect();
    assert!(
        undecided.is_empty(),
        "requests neither admitted nor refused: {undecided:?}"
    );

    let limits = TierLimits::from_plugin_config(&config.to_json().to_string(), "test config")?;
    let report = check_decisions(&decisions, &limits, TOLERANCE_SECONDS);
    let listed: Vec<String> = report
        .violations
        .iter()
        .take(10)
        .map(ToString::to_string)
        .collect();
    assert!(
        report.passed(),
        "{} violations of the rolling-window rules, first ones:\n{}",
        report.violations.len(),
        listed.join("\n")
    );
    assert!(
        report.unknown_tiers.is_empty(),
        "{:?}",
        report.unknown_tiers
    );

    let refused: BTreeSet<&str> = decisions
        .iter()
        .filter(|decision| decision.status == 429)
        .map(|decision| decision.customer.as_str())
        .collect();
    assert!(
        refused.len() >= expectation.min_customers_refused,
        "only {} customers exceeded their quota: {refused:?}",
        refused.len()
    );
    eprintln!(
        "{}: {} decisions, {} customers checked, {} customers refused at least once",
        log.display(),
        decisions.len(),
        report.customers_checked,
        refused.len()
    );
    Ok(())
}

/// Proves a replay of the shipped sample log keeps every decision within the rolling-window rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sample_log_replay_matches_oracle() -> anyhow::Result<()> {
    // The sample spans 6 hours, so 2000x lasts about 11 s; its heaviest
    // clients send more than 60 requests within 5 s of replay time.
    let expectation = Expectation {
        speed: 2000.0,
        window_seconds: 5,
        min_customers_refused: 3,
    };
    replay_and_check(&artifacts::sample_access_log(), &expectation).await
}

/// Proves a one-minute replay of the recorded 2015 log matches the oracle, when the log is present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_log_replay_matches_oracle() -> anyhow::Result<()> {
    let log = artifacts::shared_access_log();
    if !log.is_file() {
        eprintln!(
            "recorded_log_replay_matches_oracle: {} is absent, so this replay is not run",
            log.display()
        );
        return Ok(());
    }
    // 83 hours of traffic at 6500x last about 46 s; in a 30 s window several
    // clients send more than the basic quota of 60.
    let expectation = Expectation {
        speed: 6500.0,
        window_seconds: 30,
        min_customers_refused: 3,
    };
    replay_and_check(&log, &expectation)
        .await
        .with_context(|| format!("replay of {}", log.display()))
}
