//! `veo-bench failover`: how long residency routing takes to move a storage region to its
//! secondary site when the primary fails, and how many requests fail meanwhile.
//!
//! Each variant starts the stack of the residency tests: Envoy on `envoy/residency.yaml` with
//! the filter, the sidecar and the storage sites. A client sends `eu-west` storage requests
//! one at a time at a fixed pace. Each round fails `eu-west` (health endpoint and data return
//! 503) or stops it (connections refused) and measures until `eu-central` has served 20
//! requests in a row and Envoy has marked `eu-west`. Once the health check has failed too, it
//! restores `eu-west` and measures until it serves again.

mod figures;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use veo_tests::residency::stack::plugin_config;
use veo_tests::residency::{
    FailoverSettings, Probe, Region, ResidencyOptions, ResidencyStack, Sample, Site,
};
use veo_tests::tokens::{SigningKey, TokenSpec};

use figures::{Failure, Round, Variant};

/// Region whose primary site fails in every round.
const REGION: Region = Region::EuWest;

/// Requests in a row from one site that count as traffic moved to it.
const SETTLED: usize = 20;

/// Options of `veo-bench failover`.
#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    /// Failovers per variant and kind of failure.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Time between active health checks of each storage site, in milliseconds. The default
    /// is the interval recommended in envoy/README.md.
    #[arg(long, default_value_t = 1_000)]
    health_check_interval_ms: u64,
    /// Time between the client's requests, in milliseconds. The client sends one request at a
    /// time, so a slow response delays the next one.
    #[arg(long, default_value_t = 5)]
    request_interval_ms: u64,
    /// Variants to measure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Variant::ALL)]
    variants: Vec<Variant>,
    /// Kinds of failure, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Failure::ALL)]
    failures: Vec<Failure>,
}

/// Measures every variant and kind of failure and prints the table. Envoy, the filter module
/// and the sidecar are found like the end-to-end tests find them (`ENVOY_BIN`,
/// `VEO_FILTER_WASM`, `VEO_SIDECAR_BIN`, else the release builds and `.tools/`). Returns false
/// when a round never moved its traffic.
pub async fn run(args: &FailoverArgs) -> anyhow::Result<bool> {
    ensure!(args.rounds >= 1, "invalid --rounds 0: run at least 1 round");
    ensure!(
        (1..=60_000).contains(&args.health_check_interval_ms),
        "invalid --health-check-interval-ms {}: must be 1 to 60000",
        args.health_check_interval_ms
    );
    ensure!(
        (1..=1_000).contains(&args.request_interval_ms),
        "invalid --request-interval-ms {}: must be 1 to 1000",
        args.request_interval_ms
    );
    let interval = Duration::from_millis(args.health_check_interval_ms);
    let pace = Duration::from_millis(args.request_interval_ms);
    let load_before = crate::report::load_average();
    let started = Instant::now();

    let mut rows = Vec::new();
    for &variant in &args.variants {
        let failover = variant.settings(interval);
        eprintln!(
            "{}: starting Envoy, the sidecar and the storage sites",
            variant.label()
        );
        let (mut stack, token) = start(failover).await?;
        let probe = Probe::new(stack.client(), &token, Some(REGION));
        for &failure in &args.failures {
            let mut rounds = Vec::new();
            for index in 0..args.rounds {
                // Spread the failures evenly over the health check's period, so that the
                // rounds do not all land at the same point of its timer.
                let phase = interval * index / args.rounds;
                let round = measure_round(&mut stack, &probe, failure, pace, interval, phase)
                    .await
                    .with_context(|| {
                        format!(
                            "{}, {}, round {}; Envoy's log is in {}",
                            variant.label(),
                            failure.label(),
                            index + 1,
                            stack.dir().display()
                        )
                    })?;
                eprintln!(
                    "{}, {}, round {}: {}",
                    variant.label(),
                    failure.label(),
                    index + 1,
                    round.summary()
                );
                rounds.push(round);
            }
            rows.push(figures::Row::new(variant, failure, rounds));
        }
    }

    print!(
        "{}",
        figures::render(&rows, interval, pace, &load_before, started.elapsed())
    );
    Ok(rows.iter().all(figures::Row::is_valid))
}

/// Starts the stack with `failover` and returns it with an enterprise token.
async fn start(failover: FailoverSettings) -> anyhow::Result<(ResidencyStack, String)> {
    let key = SigningKey::generate("bench");
    let mut options = ResidencyOptions::new(plugin_config(&key)?);
    options.failover = failover;
    let stack = ResidencyStack::start(&options).await?;
    let token = key.mint(&TokenSpec::new("storage-reader", "enterprise"))?;
    Ok((stack, token))
}

/// Fails the primary after `phase`, measures until the secondary serves, restores the
/// primary and measures until it serves again.
async fn measure_round(
    stack: &mut ResidencyStack,
    probe: &Probe,
    failure: Failure,
    pace: Duration,
    interval: Duration,
    phase: Duration,
) -> anyhow::Result<Round> {
    let primary = REGION.primary();
    let secondary = REGION.secondary();
    // Long enough for 2 missed health checks with their timeouts, the settling requests and
    // a busy machine.
    let timeout = interval * 4 + Duration::from_secs(5);

    let warm = probe
        .run_until(pace, timeout, |s| settled_on(s, primary))
        .await;
    ensure!(
        settled_on(&warm, primary),
        "{} never served",
        primary.name()
    );
    tokio::time::sleep(phase).await;
    let retries_before = stack.retries(REGION).await?;

    let failed_at = Instant::now();
    match failure {
        Failure::Failing => stack.site(primary).set_failing(true),
        Failure::Stopped => stack.site_mut(primary).stop().await,
    }
    // The client keeps sending until Envoy has also marked the primary, so that the failed
    // requests and retries cover the whole time the primary still got traffic.
    let marked_flag = AtomicBool::new(false);
    let (samples, marked) = tokio::join!(
        probe.run_until(pace, timeout, |s| {
            settled_on(s, secondary) && marked_flag.load(Ordering::SeqCst)
        }),
        async {
            let marked = stack.await_host_health(primary, false, timeout).await;
            marked_flag.store(true, Ordering::SeqCst);
            marked
        },
    );
    ensure!(
        settled_on(&samples, secondary),
        "{} never took over from {}",
        secondary.name(),
        primary.name()
    );
    let retries = stack.retries(REGION).await? - retries_before;

    // Outages last longer than a few requests, so the failback starts once the health check
    // has failed too, as after a real outage, whichever mechanism moved the traffic.
    ensure!(
        await_failed_health_check(stack, primary, timeout).await?,
        "the health check never failed {}",
        primary.name()
    );

    let restored_at = Instant::now();
    match failure {
        Failure::Failing => stack.site(primary).set_failing(false),
        Failure::Stopped => stack.site_mut(primary).restart().await?,
    }
    let back = probe
        .run_until(pace, timeout, |s| settled_on(s, primary))
        .await;
    ensure!(
        settled_on(&back, primary),
        "{} never served again",
        primary.name()
    );

    Ok(Round {
        first_secondary: first_served(&samples, secondary).map(|done| done - failed_at),
        marked_unhealthy: marked?,
        failed_requests: count_failed(&samples),
        requests: samples.len(),
        retries,
        failback: first_served(&back, primary).map(|done| done - restored_at),
        failed_in_failback: count_failed(&back),
    })
}

/// Returns true when the last [`SETTLED`] samples were served by `site`.
fn settled_on(samples: &[Sample], site: Site) -> bool {
    samples.len() >= SETTLED
        && samples
            .iter()
            .rev()
            .take(SETTLED)
            .all(|sample| sample.served_by(site.name()))
}

/// Polls every 10 ms until the active health check has failed `site`, and returns false when
/// `timeout` passes first.
async fn await_failed_health_check(
    stack: &ResidencyStack,
    site: Site,
    timeout: Duration,
) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if stack.host_health(site).await?.failed_active_health_check {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(false)
}

fn first_served(samples: &[Sample], site: Site) -> Option<Instant> {
    samples
        .iter()
        .find(|sample| sample.served_by(site.name()))
        .map(|sample| sample.done)
}

fn count_failed(samples: &[Sample]) -> usize {
    samples.iter().filter(|sample| sample.failed()).count()
}
