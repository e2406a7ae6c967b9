//! `veo-bench billing`: how many Stripe meter events the sidecar sends per admitted request,
//! and how fast it sends its queue to a fake Stripe next to the async-stripe client alone.
//!
//! Every measurement starts a fresh fake Stripe and the real sidecar in a fresh temporary
//! directory. It sends usage of past minutes over the Sync API as one filter instance, then
//! starts one billing round, which closes every bucket and sends its events. The count runs
//! stop the sidecar afterwards, so that its last round sends anything left, and count what
//! the fake received.

mod baseline;
mod figures;
mod sidecar;
mod usage;

use std::time::{Duration, Instant};

use anyhow::ensure;

use figures::{CountRow, EventCounts, ThroughputRow};
use sidecar::{BillingSidecar, Limits};
use usage::{Batching, METERS, UsagePlan};
use veo_proto::sync_limits::MAX_REQUESTS_PER_RECORD;

/// Response body bytes per admitted request in every run.
const EGRESS_BYTES_PER_REQUEST: u64 = 2_048;

/// Admitted requests per customer per minute of the throughput runs. The value does not
/// change the number of events.
const THROUGHPUT_REQUESTS_PER_MINUTE: u64 = 100;

/// The sidecar's default `billing.max_concurrent_requests`.
const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 8;

/// The sidecar's default `billing.max_events_per_second`.
const DEFAULT_MAX_EVENTS_PER_SECOND: u32 = 1_000;

/// Largest `billing.max_concurrent_requests` the sidecar accepts.
const MAX_CONCURRENT_REQUESTS: usize = 256;

/// Largest `billing.max_events_per_second` the sidecar accepts.
const MAX_EVENTS_PER_SECOND: u32 = 10_000;

/// Oldest minute used, so that every event timestamp is within the 35 days Stripe accepts.
const MAX_MINUTES: usize = 30 * 24 * 60;

/// Time a count run waits for its events before it stops the sidecar anyway.
const COUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `veo-bench billing`.
#[derive(Debug, clap::Args)]
pub struct BillingArgs {
    /// Customers, each billed to a Stripe customer of its own.
    #[arg(long, default_value_t = 20)]
    customers: usize,
    /// Past minutes of usage per customer in the count runs.
    #[arg(long, default_value_t = 3)]
    minutes: usize,
    /// Admitted requests per customer per minute of the count runs, comma-separated. Each
    /// rate runs twice: one sync batch per minute, then every customer's minute split into
    /// `--split-parts` batches of one record.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 10_000, 1_000_000])]
    rates: Vec<u64>,
    /// Sync batches that each customer's usage of a minute is split into in the second run
    /// of each rate (fewer when the minute has fewer requests).
    #[arg(long, default_value_t = 10)]
    split_parts: u64,
    /// Past minutes of usage per customer in the throughput runs. Each minute of each
    /// customer is 2 meter events.
    #[arg(long, default_value_t = 50)]
    throughput_minutes: usize,
    /// `billing.max_concurrent_requests` of the throughput runs, comma-separated. The
    /// baseline sends from as many tokio tasks.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32])]
    concurrency: Vec<usize>,
    /// `billing.max_events_per_second` of those runs, by default the largest the sidecar
    /// accepts, so that the configured cap is not what limits them.
    #[arg(long, default_value_t = MAX_EVENTS_PER_SECOND)]
    max_events_per_second: u32,
    /// `billing.max_events_per_second` of one more throughput run at the default 8 requests
    /// in flight, which shows the cap; 0 leaves that run out.
    #[arg(long, default_value_t = DEFAULT_MAX_EVENTS_PER_SECOND)]
    capped_events_per_second: u32,
}

/// Runs the count runs and the throughput runs and prints both tables. The sidecar is found
/// like the end-to-end tests find it (`VEO_SIDECAR_BIN`, else `target/release/veo-sidecar`).
/// Returns false when a run's figures are invalid.
pub async fn run(args: &BillingArgs) -> anyhow::Result<bool> {
    validate(args)?;
    let load_before = crate::report::load_average();
    let started = Instant::now();
    let customers: Vec<String> = (0..args.customers)
        .map(|index| format!("customer-{index:04}"))
        .collect();

    let mut count_rows = Vec::new();
    for &rate in &args.rates {
        for batching in [
            Batching::PerMinute,
            Batching::Split {
                parts: args.split_parts,
            },
        ] {
            let plan = UsagePlan {
                customers: customers.clone(),
                minutes: usage::past_minutes(args.minutes, usage::unix_now()),
                requests_per_minute: rate,
                egress_bytes_per_request: EGRESS_BYTES_PER_REQUEST,
            };
            count_rows.push(count_events(&plan, batching).await?);
        }
    }

    let plan = UsagePlan {
        customers,
        minutes: usage::past_minutes(args.throughput_minutes, usage::unix_now()),
        requests_per_minute: THROUGHPUT_REQUESTS_PER_MINUTE,
        egress_bytes_per_request: EGRESS_BYTES_PER_REQUEST,
    };
    let mut throughput_rows = Vec::new();
    for limits in throughput_limits(args) {
        throughput_rows.push(measure_throughput(&plan, limits).await?);
    }

    print!(
        "{}",
        render(
            args,
            &count_rows,
            &throughput_rows,
            &load_before,
            started.elapsed()
        )
    );
    let problems: Vec<String> = count_rows
        .iter()
        .flat_map(CountRow::problems)
        .chain(throughput_rows.iter().flat_map(ThroughputRow::problems))
        .collect();
    for problem in &problems {
        println!("INVALID: {problem}");
    }
    Ok(problems.is_empty())
}

fn validate(args: &BillingArgs) -> anyhow::Result<()> {
    ensure!(
        args.customers >= 1,
        "invalid --customers 0: bill at least 1 customer"
    );
    for (option, minutes) in [
        ("--minutes", args.minutes),
        ("--throughput-minutes", args.throughput_minutes),
    ] {
        ensure!(
            (1..=MAX_MINUTES).contains(&minutes),
            "invalid {option} {minutes}: must be 1 to {MAX_MINUTES}, so that Stripe accepts \
             every event timestamp"
        );
    }
    ensure!(
        !args.rates.is_empty(),
        "invalid --rates: give at least one rate"
    );
    for &rate in &args.rates {
        ensure!(
            (1..=MAX_REQUESTS_PER_RECORD).contains(&rate),
            "invalid rate {rate} in --rates: must be 1 to {MAX_REQUESTS_PER_RECORD}, the most \
             requests the sidecar accepts in one usage record"
        );
    }
    ensure!(
        (1..=1_000).contains(&args.split_parts),
        "invalid --split-parts {}: must be 1 to 1000",
        args.split_parts
    );
    for &concurrency in &args.concurrency {
        ensure!(
            (1..=MAX_CONCURRENT_REQUESTS).contains(&concurrency),
            "invalid {concurrency} in --concurrency: the sidecar accepts 1 to \
             {MAX_CONCURRENT_REQUESTS} for max_concurrent_requests"
        );
    }
    ensure!(
        (1..=MAX_EVENTS_PER_SECOND).contains(&args.max_events_per_second),
        "invalid --max-events-per-second {}: the sidecar accepts 1 to {MAX_EVENTS_PER_SECOND}",
        args.max_events_per_second
    );
    ensure!(
        args.capped_events_per_second <= MAX_EVENTS_PER_SECOND,
        "invalid --capped-events-per-second {}: the sidecar accepts 1 to \
         {MAX_EVENTS_PER_SECOND}, and 0 leaves the run out",
        args.capped_events_per_second
    );
    Ok(())
}

/// Returns the sidecar limits of each throughput run.
fn throughput_limits(args: &BillingArgs) -> Vec<Limits> {
    let mut limits: Vec<Limits> = args
        .concurrency
        .iter()
        .map(|&max_concurrent_requests| Limits {
            max_concurrent_requests,
            max_events_per_second: args.max_events_per_second,
        })
        .collect();
    if args.capped_events_per_second > 0 {
        limits.push(Limits {
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            max_events_per_second: args.capped_events_per_second,
        });
    }
    limits
}

/// Sends `plan` cut as `batching` to a sidecar with the default billing limits, bills it in
/// one round, stops the sidecar and counts the events the fake received.
async fn count_events(plan: &UsagePlan, batching: Batching) -> anyhow::Result<CountRow> {
    let limits = Limits {
        max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
        max_events_per_second: DEFAULT_MAX_EVENTS_PER_SECOND,
    };
    let mut billing = BillingSidecar::start(&plan.customers, limits).await?;
    let batches = plan.batches(batching);
    let sync_batches = batches.len();
    usage::send(billing.address(), batches).await?;

    let started = Instant::now();
    billing.start_round().await?;
    let buckets = plan.buckets();
    let expected = usize::try_from(buckets).unwrap_or(usize::MAX);
    billing
        .wait_for_events(started, expected, COUNT_TIMEOUT)
        .await;
    billing.stop();
    let counts = EventCounts::of(&billing.stripe().meter_events());

    eprintln!(
        "count: {} requests per customer per minute in {sync_batches} sync batches: {} meter \
         events for {buckets} buckets",
        plan.requests_per_minute, counts.events
    );
    Ok(CountRow {
        requests_per_minute: plan.requests_per_minute,
        batching,
        sync_batches,
        admitted_requests: plan.admitted_requests(),
        egress_bytes: plan.egress_bytes(),
        buckets,
        counts,
    })
}

/// Measures how long the sidecar takes from the start of a billing round until the fake
/// contains every event of `plan`, then the baseline at the same concurrency.
async fn measure_throughput(plan: &UsagePlan, limits: Limits) -> anyhow::Result<ThroughputRow> {
    let events = usize::try_from(plan.buckets()).unwrap_or(usize::MAX);
    let mut billing = BillingSidecar::start(&plan.customers, limits).await?;
    usage::send(billing.address(), plan.batches(Batching::PerMinute)).await?;

    let started = Instant::now();
    billing.start_round().await?;
    let timeout = delivery_timeout(events, limits.max_events_per_second);
    let delivery = billing.wait_for_events(started, events, timeout).await;
    billing.stop();
    drop(billing);

    let baseline = baseline::measure(plan, limits.max_concurrent_requests).await?;
    let row = ThroughputRow {
        limits,
        events,
        sidecar: delivery,
        baseline,
    };
    eprintln!(
        "throughput: max_concurrent_requests {}, max_events_per_second {}: sidecar {}, \
         baseline {:.0} events/s",
        limits.max_concurrent_requests,
        limits.max_events_per_second,
        row.sidecar_rate().map_or_else(
            || format!("{} of {events} events before the timeout", delivery.events),
            |rate| format!("{rate:.0} events/s")
        ),
        row.baseline_rate()
    );
    Ok(row)
}

/// Returns how long a throughput run waits: 30 s plus three times what the pacing alone
/// takes for `events`.
fn delivery_timeout(events: usize, max_events_per_second: u32) -> Duration {
    let paced = events as f64 / f64::from(max_events_per_second.max(1));
    Duration::from_secs(30) + Duration::from_secs_f64(3.0 * paced)
}

/// Renders both tables with their settings, the command line and the machine.
fn render(
    args: &BillingArgs,
    count_rows: &[CountRow],
    throughput_rows: &[ThroughputRow],
    load_before: &str,
    elapsed: Duration,
) -> String {
    let max_per_bucket = count_rows
        .iter()
        .map(CountRow::events_per_bucket)
        .fold(0.0, f64::max);
    let throughput_events = args.customers * args.throughput_minutes * METERS as usize;
    let command: Vec<String> = std::env::args().collect();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "\nMeter events per admitted request: {customers} customers, {minutes} past minutes, \
         {EGRESS_BYTES_PER_REQUEST} egress bytes per request, sidecar billing defaults \
         (max_concurrent_requests {DEFAULT_MAX_CONCURRENT_REQUESTS}, max_events_per_second \
         {DEFAULT_MAX_EVENTS_PER_SECOND})\n\n{}\nMost events per (customer, meter, minute) \
         bucket: {max_per_bucket:.2} (target: at most 1)\n\nSync throughput: \
         {throughput_events} meter events ({customers} customers x {throughput_minutes} \
         minutes x {METERS} meters), from the start of a billing round until the fake Stripe \
         contains them all\n\n{}\ncommand: {}\nmachine: {cpus} logical CPUs, load average \
         before: {load_before}, run time {:.0} s\n",
        figures::render_counts(count_rows),
        figures::render_throughput(throughput_rows),
        command.join(" "),
        elapsed.as_secs_f64(),
        customers = args.customers,
        minutes = args.minutes,
        throughput_minutes = args.throughput_minutes,
    )
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        billing: BillingArgs,
    }

    fn parse(args: &[&str]) -> BillingArgs {
        let argv = std::iter::once("billing").chain(args.iter().copied());
        Command::try_parse_from(argv).unwrap().billing
    }

    #[test]
    fn defaults_are_valid() {
        let args = parse(&[]);
        assert!(validate(&args).is_ok());
        assert_eq!(args.rates, [1, 100, 10_000, 1_000_000]);
        assert_eq!(args.concurrency, [1, 8, 32]);
    }

    #[test]
    fn throughput_limits_add_capped_run() {
        let limits = throughput_limits(&parse(&["--concurrency", "1,32"]));
        let pairs: Vec<(usize, u32)> = limits
            .iter()
            .map(|l| (l.max_concurrent_requests, l.max_events_per_second))
            .collect();
        assert_eq!(pairs, [(1, 10_000), (32, 10_000), (8, 1_000)]);
    }

    #[test]
    fn capped_run_can_be_left_out() {
        let limits = throughput_limits(&parse(&["--capped-events-per-second", "0"]));
        assert_eq!(limits.len(), 3);
    }

    #[test]
    fn validate_rejects_out_of_range_options() {
        for args in [
            &["--customers", "0"][..],
            &["--minutes", "0"],
            &["--rates", "0"],
            &["--rates", "4294967296"],
            &["--concurrency", "257"],
            &["--max-events-per-second", "10001"],
            &["--capped-events-per-second", "10001"],
            &["--split-parts", "0"],
        ] {
            assert!(validate(&parse(args)).is_err(), "{args:?}");
        }
    }

    #[test]
    fn delivery_timeout_grows_with_pacing() {
        assert_eq!(delivery_timeout(2_000, 1_000), Duration::from_secs(36));
        assert_eq!(
            delivery_timeout(2_000, 10_000),
            Duration::from_millis(30_600)
        );
    }
}
