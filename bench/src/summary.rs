//! The per-tier summary of a replay: requests sent, admitted, refused with 429, rejected with
//! 401, any other outcome, and latency percentiles.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::decisions::Decision;

/// Counts and latencies of one tier (or of all tiers, in the `total` row).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TierSummary {
    /// Tier name, or `total`.
    pub tier: String,
    /// Requests sent.
    pub sent: usize,
    /// Responses with a 2xx status.
    pub admitted: usize,
    /// Responses with status 429.
    pub rate_limited: usize,
    /// Responses with status 401.
    pub unauthorized: usize,
    /// Any other status, or no response.
    pub other: usize,
    /// Median latency in milliseconds, when any latency was recorded.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds, when any latency was recorded.
    pub p99_ms: Option<f64>,
}

/// Summarizes decisions per tier, in tier name order, followed by a `total` row.
pub fn summarize(decisions: &[Decision]) -> Vec<TierSummary> {
    let mut by_tier: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
    for decision in decisions {
        by_tier.entry(&decision.tier).or_default().push(decision);
    }

    let mut rows: Vec<TierSummary> = by_tier
        .into_iter()
        .map(|(tier, group)| summarize_group(tier, &group))
        .collect();
    let all: Vec<&Decision> = decisions.iter().collect();
    rows.push(summarize_group("total", &all));
    rows
}

fn summarize_group(tier: &str, decisions: &[&Decision]) -> TierSummary {
    let mut summary = TierSummary {
        tier: tier.to_string(),
        sent: decisions.len(),
        ..TierSummary::default()
    };
    for decision in decisions {
        match decision.status {
            200..=299 => summary.admitted += 1,
            429 => summary.rate_limited += 1,
            401 => summary.unauthorized += 1,
            _ => summary.other += 1,
        }
    }

    let mut latencies: Vec<f64> = decisions.iter().filter_map(|d| d.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    summary.p50_ms = percentile(&latencies, 50.0);
    summary.p99_ms = percentile(&latencies, 99.0);
    summary
}

/// Returns the nearest-rank percentile `p` (0 to 100) of ascending `sorted` values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Renders the summary as an aligned text table with a header line.
pub fn render_table(rows: &[TierSummary]) -> String {
    let width = rows
        .iter()
        .map(|row| row.tier.len())
        .chain([4])
        .max()
        .unwrap_or(4);
    let mut table = format!(
        "{:<width$} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}\n",
        "tier", "sent", "admitted", "429", "401", "other", "p50 ms", "p99 ms"
    );
    for row in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            table,
            "{:<width$} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
            row.tier,
            row.sent,
            row.admitted,
            row.rate_limited,
            row.unauthorized,
            row.other,
            format_ms(row.p50_ms),
            format_ms(row.p99_ms),
        );
    }
    table
}

fn format_ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(tier: &str, status: u16, latency_ms: Option<f64>) -> Decision {
        Decision {
            t: 0.0,
            customer: "c".to_string(),
            tier: tier.to_string(),
            status,
            latency_ms,
            lateness_ms: None,
            line: None,
            error: None,
            instance: None,
            filter_admitted: None,
        }
    }

    #[test]
    fn counts_outcomes_per_tier() {
        let decisions = [
            decision("pro", 200, Some(1.0)),
            decision("basic", 200, Some(2.0)),
            decision("basic", 204, Some(2.0)),
            decision("basic", 429, Some(0.5)),
            decision("basic", 401, Some(0.5)),
            decision("basic", 503, Some(9.0)),
            decision("basic", 0, None),
        ];
        let rows = summarize(&decisions);
        let tiers: Vec<&str> = rows.iter().map(|row| row.tier.as_str()).collect();
        assert_eq!(tiers, ["basic", "pro", "total"]);

        let basic = &rows[0];
        assert_eq!(basic.sent, 6);
        assert_eq!(basic.admitted, 2);
        assert_eq!(basic.rate_limited, 1);
        assert_eq!(basic.unauthorized, 1);
        assert_eq!(basic.other, 2);
        assert_eq!(basic.p50_ms, Some(2.0));
        assert_eq!(basic.p99_ms, Some(9.0));
        assert_eq!(rows[2].sent, 7);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&values, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn table_has_header_and_one_line_per_row() {
        let rows = summarize(&[decision("enterprise", 200, None)]);
        let table = render_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("tier"));
        assert!(lines[0].contains("p99 ms"));
        assert!(lines[1].starts_with("enterprise"));
        assert!(lines[1].ends_with('-'));
    }
}
