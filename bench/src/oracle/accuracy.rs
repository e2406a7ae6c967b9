//! Accuracy of quota decisions, for proxies that may admit more than the quota (several
//! instances, each deciding with counts that lag behind the others).
//!
//! The run is cut into customer-windows: for each customer, the tumbling windows
//! `[k * W, (k + 1) * W)` of send time in which it sent a request. In each, the peak is the
//! largest number of requests within any rolling window of `W - tolerance` seconds that ends
//! there. Over-admission is the admitted peak beyond the quota, in percent of the quota. A
//! false refusal is a 429 that rule (b) of [`check_decisions`] rejects: fewer than the quota
//! admitted in the window before it.

use std::collections::BTreeMap;

use super::{OracleReport, ViolationKind, check_decisions};
use crate::decisions::Decision;
use crate::limits::TierLimits;

/// One customer in one tumbling window of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct CustomerWindow {
    /// The customer.
    pub customer: String,
    /// The customer's tier.
    pub tier: String,
    /// Start of the window, in seconds from replay start.
    pub start: f64,
    /// The quota in force, in requests per window.
    pub quota: u64,
    /// Most requests admitted or refused within one rolling window ending in this window.
    pub peak_sent: usize,
    /// Most requests admitted within one rolling window ending in this window.
    pub peak_admitted: usize,
}

impl CustomerWindow {
    /// Returns the requests admitted beyond the quota at the peak.
    pub fn over_admitted(&self) -> u64 {
        (self.peak_admitted as u64).saturating_sub(self.quota)
    }

    /// Returns [`CustomerWindow::over_admitted`] in percent of the quota.
    pub fn over_admission_percent(&self) -> f64 {
        if self.quota == 0 {
            return 0.0;
        }
        100.0 * self.over_admitted() as f64 / self.quota as f64
    }

    /// Returns true when the customer sent more than its quota within one rolling window,
    /// so that a proxy could admit too many.
    pub fn demand_exceeds_quota(&self) -> bool {
        self.peak_sent as u64 > self.quota
    }
}

/// The outcome of [`measure_accuracy`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AccuracyReport {
    /// Every customer-window with a request, for customers of a tier with a quota, ordered by
    /// customer and start.
    pub windows: Vec<CustomerWindow>,
    /// Requests admitted (2xx) or refused (429) of customers of a tier with a quota.
    pub checked_requests: usize,
    /// Refusals with 429 while the customer was under its quota.
    pub false_refusals: usize,
    /// The rule-by-rule check of the same decisions.
    pub oracle: OracleReport,
}

impl AccuracyReport {
    /// Returns the customer-windows where demand exceeded the quota, the only ones where
    /// over-admission can happen.
    pub fn windows_over_quota_demand(&self) -> impl Iterator<Item = &CustomerWindow> {
        self.windows
            .iter()
            .filter(|window| window.demand_exceeds_quota())
    }

    /// Returns the customer-window with the largest over-admission, the earliest on a tie,
    /// or `None` when no window went over its quota.
    pub fn worst_window(&self) -> Option<&CustomerWindow> {
        self.windows
            .iter()
            .filter(|window| window.over_admitted() > 0)
            .fold(None, |worst: Option<&CustomerWindow>, window| match worst {
                Some(worst)
                    if worst.over_admission_percent() >= window.over_admission_percent() =>
                {
                    Some(worst)
                }
                _ => Some(window),
            })
    }

    /// Returns the largest over-admission of any customer-window, in percent of its quota.
    pub fn max_over_admission_percent(&self) -> f64 {
        self.worst_window()
            .map_or(0.0, CustomerWindow::over_admission_percent)
    }

    /// Returns the mean over-admission of the customer-windows where demand exceeded the
    /// quota, in percent of the quota, or `None` when there is no such window.
    pub fn mean_over_admission_percent(&self) -> Option<f64> {
        let (count, sum) = self
            .windows_over_quota_demand()
            .fold((0usize, 0.0), |(count, sum), window| {
                (count + 1, sum + window.over_admission_percent())
            });
        (count > 0).then(|| sum / count as f64)
    }

    /// Returns the false refusals in percent of the checked requests, 0 without requests.
    pub fn false_refusal_percent(&self) -> f64 {
        if self.checked_requests == 0 {
            return 0.0;
        }
        100.0 * self.false_refusals as f64 / self.checked_requests as f64
    }
}

/// Measures `decisions` against the quotas in `limits`, with `tolerance_seconds` of timing
/// error allowed between send and decision, as in [`check_decisions`]. The tolerance must be
/// shorter than every quota window.
///
/// A customer's limits are those of the tier on its first decision. Customers of a tier
/// without a quota are left out, and statuses other than 2xx and 429 neither count as sent
/// nor as admitted.
pub fn measure_accuracy(
    decisions: &[Decision],
    limits: &TierLimits,
    tolerance_seconds: f64,
) -> AccuracyReport {
    let oracle = check_decisions(decisions, limits, tolerance_seconds);
    let false_refusals = oracle
        .violations
        .iter()
        .filter(|violation| matches!(violation.kind, ViolationKind::RefusedUnderQuota { .. }))
        .count();

    let mut by_customer: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
    for decision in decisions {
        by_customer
            .entry(decision.customer.as_str())
            .or_default()
            .push(decision);
    }

    let mut report = AccuracyReport {
        false_refusals,
        ..AccuracyReport::default()
    };
    for (customer, mut requests) in by_customer {
        requests.sort_by(|a, b| a.t.total_cmp(&b.t));
        let tier = requests[0].tier.as_str();
        let Some(quota) = limits.get(tier).and_then(|limit| limit.quota) else {
            continue;
        };
        let window = quota.window_seconds as f64;
        let rolling = (window - tolerance_seconds).max(f64::MIN_POSITIVE);

        let sent: Vec<f64> = requests
            .iter()
            .filter(|decision| decision.is_admitted() || decision.status == 429)
            .map(|decision| decision.t.max(0.0))
            .collect();
        let admitted: Vec<f64> = requests
            .iter()
            .filter(|decision| decision.is_admitted())
            .map(|decision| decision.t.max(0.0))
            .collect();
        report.checked_requests += sent.len();

        let admitted_peaks = peaks_per_window(&admitted, rolling, window);
        for (index, peak_sent) in peaks_per_window(&sent, rolling, window) {
            report.windows.push(CustomerWindow {
                customer: customer.to_string(),
                tier: tier.to_string(),
                start: index as f64 * window,
                quota: quota.requests,
                peak_sent,
                peak_admitted: admitted_peaks.get(&index).copied().unwrap_or(0),
            });
        }
    }
    report.oracle = oracle;
    report
}

/// Returns, for each tumbling window of `window` seconds that contains one of the sorted
/// `times`, the most times within one rolling window of `rolling` seconds ending in it.
///
/// A rolling count only grows at one of the times, so the peak is the count over
/// `(t - rolling, t]` at one of them.
fn peaks_per_window(times: &[f64], rolling: f64, window: f64) -> BTreeMap<u64, usize> {
    let mut peaks = BTreeMap::new();
    let mut first = 0;
    for (index, &t) in times.iter().enumerate() {
        while times[first] <= t - rolling {
            first += 1;
        }
        let count = index - first + 1;
        let bucket = (t / window).floor() as u64;
        let peak = peaks.entry(bucket).or_insert(0);
        *peak = count.max(*peak);
    }
    peaks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::testing::{basic_limits, decisions};

    /// Limits with one quota tier `basic` (4 per 10 s) and one burst-only tier `enterprise`.
    fn limits() -> TierLimits {
        basic_limits(4)
    }

    /// `count` requests from `start`, one every `step` seconds, all with `status`.
    fn series(start: f64, step: f64, count: usize, status: u16) -> Vec<(f64, u16)> {
        (0..count)
            .map(|index| (start + step * index as f64, status))
            .collect()
    }

    #[test]
    fn exact_limiter_has_no_error() {
        let mut events = series(0.0, 0.1, 4, 200);
        events.extend(series(0.4, 0.1, 50, 429));
        events.extend(series(10.0, 0.1, 4, 200));
        events.extend(series(10.4, 0.1, 20, 429));
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        assert_eq!(report.windows.len(), 2);
        assert_eq!(report.max_over_admission_percent(), 0.0);
        assert_eq!(report.mean_over_admission_percent(), Some(0.0));
        assert_eq!(report.false_refusals, 0);
        assert_eq!(report.checked_requests, 78);
        assert_eq!(report.worst_window(), None);
    }

    #[test]
    fn two_instances_admitting_each_a_quota_double_it() {
        let mut events = series(0.0, 0.1, 8, 200);
        events.extend(series(0.8, 0.1, 10, 429));
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        let worst = report.worst_window().unwrap();
        assert_eq!(worst.peak_admitted, 8);
        assert_eq!(worst.over_admitted(), 4);
        assert_eq!(report.max_over_admission_percent(), 100.0);
        assert_eq!(report.mean_over_admission_percent(), Some(100.0));
    }

    #[test]
    fn over_admission_across_window_boundary_counts() {
        // Admissions at 9.0-9.3 and 10.1-10.4 are 8 within 1.4 s, though each tumbling window
        // holds only 4.
        let mut events = series(9.0, 0.1, 4, 200);
        events.extend(series(10.1, 0.1, 4, 200));
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        assert_eq!(report.windows.len(), 2);
        assert_eq!(report.windows[1].peak_admitted, 8);
        assert_eq!(report.max_over_admission_percent(), 100.0);
        assert_eq!(report.mean_over_admission_percent(), Some(100.0));
    }

    #[test]
    fn mean_covers_windows_with_demand_over_quota() {
        let mut all = decisions("heavy", "basic", &series(0.0, 0.1, 6, 200));
        all.extend(decisions("light", "basic", &series(0.0, 1.0, 2, 200)));
        all.extend(decisions(
            "steady",
            "basic",
            &[(0.0, 200), (1.0, 200), (2.0, 200), (3.0, 200), (4.0, 429)],
        ));
        let report = measure_accuracy(&all, &limits(), 0.25);

        assert_eq!(report.windows.len(), 3);
        assert_eq!(report.windows_over_quota_demand().count(), 2);
        // heavy: 6 admitted of 4 is 50% over; steady: 0%.
        assert_eq!(report.max_over_admission_percent(), 50.0);
        assert_eq!(report.mean_over_admission_percent(), Some(25.0));
        assert_eq!(report.worst_window().unwrap().customer, "heavy");
    }

    #[test]
    fn refusal_under_quota_is_false() {
        let events = [(0.0, 200), (1.0, 200), (2.0, 429), (3.0, 200)];
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        assert_eq!(report.false_refusals, 1);
        assert_eq!(report.checked_requests, 4);
        assert_eq!(report.false_refusal_percent(), 25.0);
        assert_eq!(report.mean_over_admission_percent(), None);
    }

    #[test]
    fn other_statuses_are_not_counted() {
        let events = [(0.0, 200), (0.5, 401), (1.0, 0), (1.5, 503)];
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        assert_eq!(report.windows.len(), 1);
        assert_eq!(report.windows[0].peak_sent, 1);
        assert_eq!(report.windows[0].peak_admitted, 1);
        assert_eq!(report.checked_requests, 1);
    }

    #[test]
    fn tiers_without_quota_are_skipped() {
        let all = decisions("e", "enterprise", &series(0.0, 0.01, 50, 200));
        let report = measure_accuracy(&all, &limits(), 0.25);

        assert_eq!(report.windows, vec![]);
        assert_eq!(report.checked_requests, 0);
        assert_eq!(report.max_over_admission_percent(), 0.0);
    }

    #[test]
    fn windows_start_at_multiples_of_the_quota_window() {
        let events = [(3.0, 200), (25.0, 200)];
        let report = measure_accuracy(&decisions("a", "basic", &events), &limits(), 0.25);

        let starts: Vec<f64> = report.windows.iter().map(|window| window.start).collect();
        assert_eq!(starts, [0.0, 20.0]);
    }
}
