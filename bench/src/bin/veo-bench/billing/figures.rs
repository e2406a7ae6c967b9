//! The tables of `veo-bench billing`: meter events per admitted request and per bucket, and
//! the sync throughput of the sidecar next to the baseline, as Markdown.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use veo_tests::stripe::MeterEventRecord;

use super::baseline::BaselineRun;
use super::sidecar::{Delivery, Limits, METER_EVENT_NAMES};
use super::usage::Batching;

/// Meter events that the fake Stripe received in one run, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// Meter events accepted.
    pub events: usize,
    /// Distinct identifiers among them.
    pub identifiers: usize,
    /// Distinct (customer, event name, timestamp) buckets among them.
    pub buckets: usize,
    /// Sum of the `api_requests` values, in requests.
    pub billed_requests: u64,
    /// Sum of the `egress_bytes` values, in bytes.
    pub billed_egress_bytes: u64,
}

impl EventCounts {
    /// Counts `events` and adds up their values per meter.
    pub fn of(events: &[MeterEventRecord]) -> Self {
        let [requests_name, egress_name] = METER_EVENT_NAMES;
        let identifiers: HashSet<&str> = events.iter().map(|e| e.identifier.as_str()).collect();
        let buckets: HashSet<(&str, &str, i64)> = events
            .iter()
            .map(|e| (e.customer.as_str(), e.event_name.as_str(), e.timestamp))
            .collect();
        let sum = |name: &str| -> u64 {
            events
                .iter()
                .filter(|e| e.event_name == name)
                .map(|e| e.value)
                .fold(0, u64::saturating_add)
        };
        EventCounts {
            events: events.len(),
            identifiers: identifiers.len(),
            buckets: buckets.len(),
            billed_requests: sum(requests_name),
            billed_egress_bytes: sum(egress_name),
        }
    }
}

/// One run of the event count: usage sent, and what Stripe received for it.
#[derive(Debug, Clone)]
pub struct CountRow {
    /// Admitted requests per customer per minute.
    pub requests_per_minute: u64,
    /// Division of the usage into sync batches.
    pub batching: Batching,
    /// Sync batches sent.
    pub sync_batches: usize,
    /// Admitted requests sent.
    pub admitted_requests: u64,
    /// Egress bytes sent.
    pub egress_bytes: u64,
    /// (customer, meter, minute) buckets with usage.
    pub buckets: u64,
    /// Events the fake received.
    pub counts: EventCounts,
}

impl CountRow {
    /// Returns meter events per admitted request.
    pub fn events_per_request(&self) -> f64 {
        ratio(self.counts.events as f64, self.admitted_requests as f64)
    }

    /// Returns meter events per bucket with usage.
    pub fn events_per_bucket(&self) -> f64 {
        ratio(self.counts.events as f64, self.buckets as f64)
    }

    /// Lists what makes this run's figures wrong: usage billed other than sent, or an event
    /// the count cannot tell apart from another.
    pub fn problems(&self) -> Vec<String> {
        let counts = &self.counts;
        let name = format!(
            "{} requests per minute, {}",
            grouped(self.requests_per_minute),
            batching_label(self.batching)
        );
        let mut problems = Vec::new();
        if counts.billed_requests != self.admitted_requests {
            problems.push(format!(
                "{name}: Stripe received {} requests for {} admitted",
                counts.billed_requests, self.admitted_requests
            ));
        }
        if counts.billed_egress_bytes != self.egress_bytes {
            problems.push(format!(
                "{name}: Stripe received {} egress bytes for {} sent",
                counts.billed_egress_bytes, self.egress_bytes
            ));
        }
        if counts.identifiers != counts.events {
            problems.push(format!(
                "{name}: {} events share identifiers",
                counts.events - counts.identifiers
            ));
        }
        if counts.buckets as u64 != self.buckets {
            problems.push(format!(
                "{name}: events cover {} buckets of the {} with usage",
                counts.buckets, self.buckets
            ));
        }
        problems
    }
}

/// One throughput measurement of the sidecar with the baseline at the same concurrency.
#[derive(Debug, Clone)]
pub struct ThroughputRow {
    /// The sidecar's billing limits.
    pub limits: Limits,
    /// Events queued.
    pub events: usize,
    /// Events the sidecar delivered to the fake, and the time it took.
    pub sidecar: Delivery,
    /// The async-stripe client alone at `limits.max_concurrent_requests` tasks.
    pub baseline: BaselineRun,
}

impl ThroughputRow {
    /// Returns the sidecar's events per second, or `None` when it timed out.
    pub fn sidecar_rate(&self) -> Option<f64> {
        self.sidecar
            .elapsed
            .map(|elapsed| rate(self.sidecar.events, elapsed))
    }

    /// Returns the baseline's events per second.
    pub fn baseline_rate(&self) -> f64 {
        rate(self.baseline.delivered, self.baseline.elapsed)
    }

    /// Lists what makes this measurement invalid.
    pub fn problems(&self) -> Vec<String> {
        let name = format!(
            "max_concurrent_requests {}, max_events_per_second {}",
            self.limits.max_concurrent_requests, self.limits.max_events_per_second
        );
        let mut problems = Vec::new();
        if self.sidecar.elapsed.is_none() {
            problems.push(format!(
                "{name}: the sidecar delivered {} of {} events before the timeout",
                self.sidecar.events, self.events
            ));
        }
        if let Some(message) = &self.baseline.first_failure {
            problems.push(format!(
                "{name}: {} baseline requests failed, the first with: {message}",
                self.baseline.failures
            ));
        }
        if self.baseline.delivered != self.events {
            problems.push(format!(
                "{name}: the baseline delivered {} of {} events",
                self.baseline.delivered, self.events
            ));
        }
        problems
    }
}

/// Renders the event counts as a Markdown table.
pub fn render_counts(rows: &[CountRow]) -> String {
    let mut text = String::from(
        "| admitted requests per customer per minute | sync batches | admitted requests | \
         buckets | meter events | events per admitted request | events per bucket | billed \
         requests | billed egress bytes |\n\
         | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let _ = writeln!(
            text,
            "| {} | {} {} | {} | {} | {} | {} | {:.2} | {} | {} |",
            grouped(row.requests_per_minute),
            grouped(row.sync_batches as u64),
            batching_label(row.batching),
            grouped(row.admitted_requests),
            grouped(row.buckets),
            grouped(row.counts.events as u64),
            small_number(row.events_per_request()),
            row.events_per_bucket(),
            grouped(row.counts.billed_requests),
            grouped(row.counts.billed_egress_bytes),
        );
    }
    text
}

/// Renders the throughput as a Markdown table, one row per sidecar measurement.
pub fn render_throughput(rows: &[ThroughputRow]) -> String {
    let mut text = String::from(
        "| max_concurrent_requests | max_events_per_second | events | sidecar first event ms | \
         sidecar s | sidecar events/s | baseline s | baseline events/s | sidecar / baseline |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in rows {
        let (sidecar_seconds, sidecar_rate, versus) =
            match (row.sidecar.elapsed, row.sidecar_rate()) {
                (Some(elapsed), Some(sidecar_rate)) => (
                    format!("{:.2}", elapsed.as_secs_f64()),
                    grouped(sidecar_rate.round() as u64),
                    format!("{:.2}x", ratio(sidecar_rate, row.baseline_rate())),
                ),
                _ => (
                    format!(
                        "timed out, {} of {}",
                        grouped(row.sidecar.events as u64),
                        grouped(row.events as u64)
                    ),
                    "-".to_owned(),
                    "-".to_owned(),
                ),
            };
        let first_event = row.sidecar.first_event.map_or_else(
            || "-".to_owned(),
            |first| format!("{:.0}", first.as_secs_f64() * 1_000.0),
        );
        let _ = writeln!(
            text,
            "| {} | {} | {} | {first_event} | {sidecar_seconds} | {sidecar_rate} | {:.2} | {} | \
             {versus} |",
            row.limits.max_concurrent_requests,
            grouped(u64::from(row.limits.max_events_per_second)),
            grouped(row.events as u64),
            row.baseline.elapsed.as_secs_f64(),
            grouped(row.baseline_rate().round() as u64),
        );
    }
    text
}

fn batching_label(batching: Batching) -> &'static str {
    match batching {
        Batching::PerMinute => "(one per minute)",
        Batching::Split { .. } => "(one record each)",
    }
}

fn rate(events: usize, elapsed: Duration) -> f64 {
    ratio(events as f64, elapsed.as_secs_f64())
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator == 0.0 {
        0.0
    } else {
        numerator / denominator
    }
}

/// Formats `value` with two decimals, or in scientific notation below 0.01.
fn small_number(value: f64) -> String {
    if value == 0.0 || value >= 0.01 {
        format!("{value:.2}")
    } else {
        format!("{value:.1e}")
    }
}

/// Formats `value` with a comma between groups of three digits.
fn grouped(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        identifier: &str,
        name: &str,
        customer: &str,
        timestamp: i64,
        value: u64,
    ) -> MeterEventRecord {
        MeterEventRecord {
            identifier: identifier.into(),
            event_name: name.into(),
            customer: customer.into(),
            value,
            timestamp,
            created: 0,
        }
    }

    fn count_row(counts: EventCounts) -> CountRow {
        CountRow {
            requests_per_minute: 10,
            batching: Batching::PerMinute,
            sync_batches: 1,
            admitted_requests: 20,
            egress_bytes: 200,
            buckets: 4,
            counts,
        }
    }

    fn delivery(events: usize, elapsed: Option<Duration>) -> Delivery {
        Delivery {
            events,
            first_event: Some(Duration::from_millis(40)),
            elapsed,
        }
    }

    fn baseline(delivered: usize, millis: u64) -> BaselineRun {
        BaselineRun {
            delivered,
            elapsed: Duration::from_millis(millis),
            failures: 0,
            first_failure: None,
        }
    }

    #[test]
    fn counts_split_buckets_by_meter_and_minute() {
        let events = [
            event("1", "api_requests", "cus_a", 60, 10),
            event("2", "egress_bytes", "cus_a", 60, 100),
            event("3", "api_requests", "cus_a", 120, 10),
            // A second part of the first bucket.
            event("4", "api_requests", "cus_a", 60, 5),
        ];
        let counts = EventCounts::of(&events);
        assert_eq!(counts.events, 4);
        assert_eq!(counts.identifiers, 4);
        assert_eq!(counts.buckets, 3);
        assert_eq!(counts.billed_requests, 25);
        assert_eq!(counts.billed_egress_bytes, 100);
    }

    #[test]
    fn count_row_ratios() {
        let row = count_row(EventCounts {
            events: 4,
            identifiers: 4,
            buckets: 4,
            billed_requests: 20,
            billed_egress_bytes: 200,
        });
        assert_eq!(row.events_per_request(), 0.2);
        assert_eq!(row.events_per_bucket(), 1.0);
        assert!(row.problems().is_empty());
    }

    #[test]
    fn count_row_reports_lost_usage() {
        let row = count_row(EventCounts {
            events: 3,
            identifiers: 3,
            buckets: 3,
            billed_requests: 10,
            billed_egress_bytes: 200,
        });
        let problems = row.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("10 requests for 20 admitted"));
        assert!(problems[1].contains("3 buckets of the 4"));
    }

    #[test]
    fn throughput_row_compares_with_baseline() {
        let row = ThroughputRow {
            limits: Limits {
                max_concurrent_requests: 8,
                max_events_per_second: 10_000,
            },
            events: 2_000,
            sidecar: delivery(2_000, Some(Duration::from_secs(2))),
            baseline: baseline(2_000, 500),
        };
        assert_eq!(row.sidecar_rate(), Some(1_000.0));
        assert_eq!(row.baseline_rate(), 4_000.0);
        assert!(row.problems().is_empty());
        let table = render_throughput(&[row]);
        let line = table.lines().nth(2).unwrap_or_default();
        assert_eq!(
            line,
            "| 8 | 10,000 | 2,000 | 40 | 2.00 | 1,000 | 0.50 | 4,000 | 0.25x |"
        );
    }

    #[test]
    fn throughput_row_reports_timeout() {
        let row = ThroughputRow {
            limits: Limits {
                max_concurrent_requests: 1,
                max_events_per_second: 1_000,
            },
            events: 2_000,
            sidecar: delivery(1_500, None),
            baseline: baseline(1_999, 500),
        };
        assert_eq!(row.sidecar_rate(), None);
        assert_eq!(row.problems().len(), 2);
        let table = render_throughput(&[row]);
        assert!(
            table.contains("| timed out, 1,500 of 2,000 | - |"),
            "{table}"
        );
    }

    #[test]
    fn render_counts_row() {
        let mut row = count_row(EventCounts {
            events: 4,
            identifiers: 4,
            buckets: 4,
            billed_requests: 20,
            billed_egress_bytes: 200,
        });
        row.admitted_requests = 2_000_000;
        let table = render_counts(&[row]);
        let line = table.lines().nth(2).unwrap_or_default();
        assert_eq!(
            line,
            "| 10 | 1 (one per minute) | 2,000,000 | 4 | 4 | 2.0e-6 | 1.00 | 20 | 200 |"
        );
    }

    #[test]
    fn grouped_inserts_commas() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }

    #[test]
    fn small_number_switches_to_scientific() {
        assert_eq!(small_number(2.0), "2.00");
        assert_eq!(small_number(0.02), "0.02");
        assert_eq!(small_number(0.0002), "2.0e-4");
        assert_eq!(small_number(0.0), "0.00");
    }
}
