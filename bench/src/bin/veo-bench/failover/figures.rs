//! Variants and kinds of failure of `veo-bench failover`, the figures of one round, and the
//! table over the rounds.

use std::fmt::Write as _;
use std::time::Duration;

use clap::ValueEnum;
use veo_tests::residency::FailoverSettings;

/// Mechanism besides the active health check that moves traffic off a failed site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// The health check alone: no retry, no outlier ejection.
    HealthCheck,
    /// One retry on the other priority.
    Retry,
    /// Outlier ejection after 3 gateway failures in a row.
    Outlier,
    /// Both, as `envoy/residency.yaml` recommends.
    RetryOutlier,
}

impl Variant {
    /// Every variant, in table order.
    pub const ALL: [Variant; 4] = [
        Variant::HealthCheck,
        Variant::Retry,
        Variant::Outlier,
        Variant::RetryOutlier,
    ];

    /// Returns the variant's name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Variant::HealthCheck => "health check only",
            Variant::Retry => "health check + retry",
            Variant::Outlier => "health check + ejection",
            Variant::RetryOutlier => "health check + retry + ejection (default)",
        }
    }

    /// Returns the storage clusters' settings with a health check every `interval`.
    pub fn settings(self, interval: Duration) -> FailoverSettings {
        let (retries, outlier_ejection) = match self {
            Variant::HealthCheck => (0, false),
            Variant::Retry => (1, false),
            Variant::Outlier => (0, true),
            Variant::RetryOutlier => (1, true),
        };
        FailoverSettings {
            health_check_interval: interval,
            retries,
            outlier_ejection,
        }
    }
}

/// Kind of failure of the primary site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Failure {
    /// The site returns 503 to its health check and to every request.
    Failing,
    /// The site stops: its connections close and new ones are refused.
    Stopped,
}

impl Failure {
    /// Every kind of failure, in table order.
    pub const ALL: [Failure; 2] = [Failure::Failing, Failure::Stopped];

    /// Returns the failure's name in the table.
    pub fn label(self) -> &'static str {
        match self {
            Failure::Failing => "503",
            Failure::Stopped => "stopped",
        }
    }
}

/// Figures of one failover and failback.
#[derive(Debug, Clone)]
pub struct Round {
    /// From the failure to the first response from the secondary site.
    pub first_secondary: Option<Duration>,
    /// From the failure until Envoy's admin interface showed the primary unhealthy, `None`
    /// when it never did within the round.
    pub marked_unhealthy: Option<Duration>,
    /// Requests after the failure that got no 200.
    pub failed_requests: usize,
    /// Requests sent from the failure until the secondary had served 20 in a row and Envoy
    /// had marked the primary.
    pub requests: usize,
    /// Retries that Envoy made in the region's cluster during the failover.
    pub retries: u64,
    /// From restoring the primary to its first response.
    pub failback: Option<Duration>,
    /// Requests after the restore that got no 200.
    pub failed_in_failback: usize,
}

impl Round {
    /// Returns the round's figures on one line, for the progress output.
    pub fn summary(&self) -> String {
        format!(
            "first secondary response {}, marked unhealthy {}, {} of {} requests failed, {} \
             retries, failback {}",
            milliseconds(self.first_secondary),
            milliseconds(self.marked_unhealthy),
            self.failed_requests,
            self.requests,
            self.retries,
            milliseconds(self.failback),
        )
    }
}

/// The rounds of one variant and kind of failure.
#[derive(Debug, Clone)]
pub struct Row {
    variant: Variant,
    failure: Failure,
    rounds: Vec<Round>,
}

impl Row {
    /// Returns the row of `rounds`.
    pub fn new(variant: Variant, failure: Failure, rounds: Vec<Round>) -> Self {
        Self {
            variant,
            failure,
            rounds,
        }
    }

    /// Returns false when a round has no response from the secondary or from the restored
    /// primary, or a failed request after the restore.
    pub fn is_valid(&self) -> bool {
        self.rounds.iter().all(|round| {
            round.first_secondary.is_some()
                && round.failback.is_some()
                && round.failed_in_failback == 0
        })
    }
}

/// Renders the settings and one table row per variant and kind of failure.
pub fn render(
    rows: &[Row],
    interval: Duration,
    pace: Duration,
    load_before: &str,
    elapsed: Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nResidency failover of eu-west to eu-central: health check every {} ms (unhealthy \
         after 2 failed checks, or 1 non-200 response), one request every {} ms, load \
         average {load_before} before, {:.0} s in all.\n",
        interval.as_millis(),
        pace.as_millis(),
        elapsed.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "| variant | failure | rounds | first secondary response ms, median (max) | marked \
         unhealthy ms, median (max) | failed requests, median (max) | requests until moved, \
         median | retries, median (max) | failback ms, median (max) |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let rounds = &row.rounds;
        let first: Vec<_> = rounds.iter().map(|r| r.first_secondary).collect();
        let marked: Vec<_> = rounds.iter().map(|r| r.marked_unhealthy).collect();
        let failback: Vec<_> = rounds.iter().map(|r| r.failback).collect();
        let failed: Vec<u64> = rounds.iter().map(|r| r.failed_requests as u64).collect();
        let requests: Vec<u64> = rounds.iter().map(|r| r.requests as u64).collect();
        let retries: Vec<u64> = rounds.iter().map(|r| r.retries).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} ({}) | {} | {} ({}) | {} |",
            row.variant.label(),
            row.failure.label(),
            rounds.len(),
            duration_spread(&first),
            duration_spread(&marked),
            median(&failed),
            failed.iter().max().copied().unwrap_or(0),
            median(&requests),
            median(&retries),
            retries.iter().max().copied().unwrap_or(0),
            duration_spread(&failback),
        );
    }
    if rows.iter().any(|row| !row.is_valid()) {
        let _ = writeln!(
            out,
            "\nINVALID: a round had no response from a site or a failed request after the \
             restore."
        );
    }
    out
}

/// Formats the median and maximum of `values` in milliseconds, with `-` for a round that
/// has no value.
fn duration_spread(values: &[Option<Duration>]) -> String {
    let mut known: Vec<u64> = values
        .iter()
        .flatten()
        .map(|value| u64::try_from(value.as_millis()).unwrap_or(u64::MAX))
        .collect();
    if known.len() < values.len() || known.is_empty() {
        return "-".to_owned();
    }
    known.sort_unstable();
    format!(
        "{} ({})",
        median(&known),
        known.last().copied().unwrap_or(0)
    )
}

/// Returns the median of `values`, the upper one of an even count, 0 for none.
fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

fn milliseconds(value: Option<Duration>) -> String {
    value.map_or_else(
        || "-".to_owned(),
        |value| format!("{} ms", value.as_millis()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(first_ms: u64, failed: usize) -> Round {
        Round {
            first_secondary: Some(Duration::from_millis(first_ms)),
            marked_unhealthy: Some(Duration::from_millis(first_ms + 5)),
            failed_requests: failed,
            requests: 40,
            retries: 1,
            failback: Some(Duration::from_millis(200)),
            failed_in_failback: 0,
        }
    }

    #[test]
    fn renders_median_and_max() {
        let row = Row::new(
            Variant::HealthCheck,
            Failure::Failing,
            vec![round(10, 1), round(30, 5), round(20, 3)],
        );
        let text = render(
            &[row],
            Duration::from_millis(100),
            Duration::from_millis(5),
            "0.5",
            Duration::from_secs(3),
        );
        assert!(
            text.contains(
                "| health check only | 503 | 3 | 20 (30) | 25 (35) | 3 (5) | 40 | 1 (1) | 200 (200) |"
            ),
            "{text}"
        );
        assert!(!text.contains("INVALID"));
    }

    #[test]
    fn marks_round_without_failback_invalid() {
        let mut broken = round(10, 0);
        broken.failback = None;
        let row = Row::new(Variant::Retry, Failure::Stopped, vec![broken]);
        assert!(!row.is_valid());
        let text = render(
            &[row],
            Duration::from_millis(100),
            Duration::from_millis(5),
            "0.5",
            Duration::from_secs(3),
        );
        assert!(text.contains("| - |"), "{text}");
        assert!(text.contains("INVALID"));
    }

    #[test]
    fn maps_variants_to_settings() {
        let interval = Duration::from_millis(250);
        let default = Variant::RetryOutlier.settings(interval);
        assert_eq!(default.retries, 1);
        assert!(default.outlier_ejection);
        let alone = Variant::HealthCheck.settings(interval);
        assert_eq!(alone.retries, 0);
        assert!(!alone.outlier_ejection);
        assert_eq!(alone.health_check_interval, interval);
    }
}
