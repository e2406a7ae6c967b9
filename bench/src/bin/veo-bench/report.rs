//! The result table and the validity checks of a benchmark run.

use std::fmt::Write as _;

use crate::setup::{Filter, Outcome, Setup};
use crate::{Args, UpstreamKind};

/// Lists what makes a measurement invalid.
pub fn problems(setup: &Setup, outcome: &Outcome) -> Vec<String> {
    let measurement = &outcome.measurement;
    let mut problems = Vec::new();
    if measurement.non_2xx > 0 {
        problems.push(format!(
            "{} responses were not 2xx or 3xx",
            measurement.non_2xx
        ));
    }
    if measurement.socket_errors > 0 {
        problems.push(format!("{} socket errors", measurement.socket_errors));
    }
    if setup.name == "verify" && measurement.token_restarts > 0 {
        problems.push(format!(
            "{} requests completed, more than the unique tokens minted, so tokens were \
             reused; raise --unique-tokens",
            measurement.requests
        ));
    }
    if setup.filter == Filter::VeoEdge && outcome.cache.is_none() {
        problems.push("the filter's token-cache counters were not found in /stats".to_string());
    }
    problems
}

/// Renders the table: per setup the round with the median requests/s, its ratio to the
/// baseline's median, the spread over rounds, and any reason a round is not valid. Rows of
/// the host calls and the Veo Edge filter also show the ratio to the empty wasm filter's
/// median.
pub fn render(args: &Args, load_before: &str, results: &[(&Setup, Vec<Outcome>)]) -> String {
    let medians: Vec<Option<&Outcome>> = results.iter().map(|(_, o)| median(o)).collect();
    let median_rate = |filter: Filter| {
        results
            .iter()
            .zip(&medians)
            .find(|((setup, _), _)| setup.filter == filter)
            .and_then(|(_, median)| *median)
            .map_or(0.0, |outcome| outcome.measurement.requests_per_second)
    };
    let baseline = median_rate(Filter::None);
    let empty_wasm = median_rate(Filter::Empty);
    let upstream = match args.upstream {
        UpstreamKind::Envoy => "separate Envoy (direct response)",
        UpstreamKind::Direct => "direct response in the proxy",
    };
    let mut table = format!(
        "\nEnvoy --concurrency 1, wrk {} thread(s), {} connections, {} s per setup and round, \
         {} round(s), upstream: {upstream}, load average before: {load_before}\n",
        args.threads,
        args.connections,
        args.duration_seconds,
        args.rounds.max(1),
    );
    let _ = writeln!(
        table,
        "{:<30} {:>11} {:>8} {:>8} {:>13} {:>14} {:>15} {:>11} {:>9}",
        "setup",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "vs no filter",
        "vs empty wasm",
        "range req/s",
        "cache hits",
        "misses"
    );
    for ((setup, outcomes), median) in results.iter().zip(&medians) {
        let Some(outcome) = median else {
            continue;
        };
        let m = &outcome.measurement;
        let vs_baseline = ratio(m.requests_per_second, baseline);
        let vs_empty =
            if matches!(setup.filter, Filter::HostCalls | Filter::VeoEdge) && empty_wasm > 0.0 {
                format!("{:.2}x", ratio(m.requests_per_second, empty_wasm))
            } else {
                "-".to_string()
            };
        let (hits, misses) = outcome.cache.map_or_else(
            || ("-".to_string(), "-".to_string()),
            |cache| (cache.hits.to_string(), cache.misses.to_string()),
        );
        let rates = outcomes.iter().map(|o| o.measurement.requests_per_second);
        let low = rates.clone().fold(f64::INFINITY, f64::min);
        let high = rates.fold(0.0, f64::max);
        let _ = writeln!(
            table,
            "{:<30} {:>11.0} {:>8.2} {:>8.2} {:>12.2}x {:>14} {:>15} {:>11} {:>9}",
            setup.label,
            m.requests_per_second,
            m.p50_ms,
            m.p99_ms,
            vs_baseline,
            vs_empty,
            format!("{low:.0}-{high:.0}"),
            hits,
            misses
        );
    }
    for (setup, outcomes) in results {
        for (round, outcome) in outcomes.iter().enumerate() {
            for problem in problems(setup, outcome) {
                let _ = writeln!(
                    table,
                    "INVALID {} round {}: {problem}",
                    setup.label,
                    round + 1
                );
            }
        }
    }
    table
}

/// Returns `rate / reference`, or 0 when the reference is missing.
fn ratio(rate: f64, reference: f64) -> f64 {
    if reference > 0.0 {
        rate / reference
    } else {
        0.0
    }
}

/// Returns the outcome with the median requests/s (the upper one of an even count).
fn median(outcomes: &[Outcome]) -> Option<&Outcome> {
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by(|a, b| {
        a.measurement
            .requests_per_second
            .total_cmp(&b.measurement.requests_per_second)
    });
    sorted.get(sorted.len() / 2).copied()
}

/// Returns the 1-minute load average from `/proc/loadavg`, or `unknown`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split(' ').next().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;
    use crate::setup::CacheCounts;
    use crate::wrk::Measurement;

    fn setup(label: &'static str, filter: Filter) -> Setup {
        Setup {
            label,
            name: label,
            filter,
            tokens: PathBuf::new(),
        }
    }

    fn outcome(requests_per_second: f64, filter: Filter) -> Outcome {
        Outcome {
            measurement: Measurement {
                requests_per_second,
                ..Measurement::default()
            },
            cache: (filter == Filter::VeoEdge).then_some(CacheCounts { hits: 1, misses: 0 }),
        }
    }

    fn row<'a>(table: &'a str, label: &str) -> Vec<&'a str> {
        table
            .lines()
            .find(|line| line.starts_with(label))
            .map(|line| line[label.len()..].split_whitespace().collect())
            .unwrap_or_default()
    }

    #[test]
    fn filter_rows_show_ratio_to_empty_wasm_filter() {
        let args = crate::Args::parse_from(["veo-bench"]);
        let setups = [
            setup("none", Filter::None),
            setup("empty", Filter::Empty),
            setup("calls", Filter::HostCalls),
            setup("veo", Filter::VeoEdge),
        ];
        let rates = [
            [1000.0, 990.0, 1010.0],
            [800.0, 700.0, 900.0],
            [640.0, 620.0, 660.0],
            [600.0, 500.0, 700.0],
        ];
        let results: Vec<(&Setup, Vec<Outcome>)> = setups
            .iter()
            .zip(rates)
            .map(|(setup, rates)| {
                let outcomes = rates.iter().map(|r| outcome(*r, setup.filter)).collect();
                (setup, outcomes)
            })
            .collect();
        let table = render(&args, "0.10", &results);
        // Columns: requests/s, p50, p99, vs no filter, vs empty wasm, range, hits, misses.
        assert_eq!(row(&table, "none")[3..5], ["1.00x", "-"]);
        assert_eq!(row(&table, "empty")[3..5], ["0.80x", "-"]);
        assert_eq!(row(&table, "calls")[3..5], ["0.64x", "0.80x"]);
        assert_eq!(row(&table, "veo")[3..6], ["0.60x", "0.75x", "500-700"]);
        assert!(!table.contains("INVALID"));
    }

    #[test]
    fn empty_wasm_ratio_without_its_setup() {
        let args = crate::Args::parse_from(["veo-bench", "--setups", "cached"]);
        let setups = [setup("none", Filter::None), setup("veo", Filter::VeoEdge)];
        let results: Vec<(&Setup, Vec<Outcome>)> = setups
            .iter()
            .zip([1000.0, 700.0])
            .map(|(setup, rate)| (setup, vec![outcome(rate, setup.filter)]))
            .collect();
        let table = render(&args, "0.10", &results);
        assert_eq!(row(&table, "veo")[3..5], ["0.70x", "-"]);
    }
}
