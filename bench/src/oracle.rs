//! An exact checker of rolling-window quota decisions.
//!
//! Each customer of a tier with a quota of `q` requests per `W` seconds must meet two rules.
//! (a) No rolling window shorter than `W - tolerance` contains more than `q` admitted (2xx)
//! requests. (b) Every 429 has at least `q` admitted requests in the `W + tolerance` seconds
//! before it, counting up to `tolerance` after it. The tolerance absorbs the gap between the
//! time a request was sent, which the decisions file records, and the time the proxy
//! decided it.

pub mod accuracy;

use std::collections::BTreeMap;
use std::fmt;

use crate::decisions::Decision;
use crate::limits::TierLimits;

/// Rule broken by a [`Violation`].
#[derive(Debug, Clone, PartialEq)]
pub enum ViolationKind {
    /// More than the quota was admitted within a window shorter than `W - tolerance`.
    OverAdmitted {
        /// Admitted requests in the window ending at the violation.
        admitted: usize,
        /// Time of the first admitted request of that window, seconds from replay start.
        window_start: f64,
    },
    /// A request was refused with 429 although fewer than the quota were admitted before it.
    RefusedUnderQuota {
        /// Admitted requests in the `W + tolerance` seconds before the refusal.
        admitted: usize,
    },
}

/// One request whose decision breaks the quota rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// The customer.
    pub customer: String,
    /// The customer's tier.
    pub tier: String,
    /// When the offending request was sent, seconds from replay start.
    pub t: f64,
    /// The quota in force, requests per window.
    pub quota: u64,
    /// The window length in seconds.
    pub window_seconds: u64,
    /// The broken rule.
    pub kind: ViolationKind,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Violation {
            customer,
            tier,
            t,
            quota,
            window_seconds,
            ..
        } = self;
        match &self.kind {
            ViolationKind::OverAdmitted {
                admitted,
                window_start,
            } => write!(
                f,
                "{customer} ({tier}, {quota} per {window_seconds} s): {admitted} admitted \
                 between t={window_start:.3} s and t={t:.3} s"
            ),
            ViolationKind::RefusedUnderQuota { admitted } => write!(
                f,
                "{customer} ({tier}, {quota} per {window_seconds} s): refused with 429 at \
                 t={t:.3} s after only {admitted} admitted in the window before it"
            ),
        }
    }
}

/// The outcome of [`check_decisions`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OracleReport {
    /// Every violation, ordered by customer and time.
    pub violations: Vec<Violation>,
    /// Customers whose tier has a quota, and so were checked.
    pub customers_checked: usize,
    /// Customers whose tier has no quota (burst-only or unlimited), not checked.
    pub customers_without_quota: usize,
    /// Tiers seen in the decisions that `limits` does not configure.
    pub unknown_tiers: Vec<String>,
}

impl OracleReport {
    /// Returns true when no decision broke the rules.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks `decisions` against the quotas in `limits`; `tolerance_seconds` is the allowed
/// timing error (use a few hundred milliseconds for a loopback replay).
///
/// A customer's limits are those of the tier on its first decision. A 2xx, or any status of a
/// request the filter admitted (`filter_admitted`, such as an upstream's 5xx), consumes quota.
/// Other statuses (401, the filter's own 5xx, no response) neither consume quota nor count as
/// refusals.
pub fn check_decisions(
    decisions: &[Decision],
    limits: &TierLimits,
    tolerance_seconds: f64,
) -> OracleReport {
    let mut by_customer: BTreeMap<&str, Vec<&Decision>> = BTreeMap::new();
    for decision in decisions {
        by_customer
            .entry(decision.customer.as_str())
            .or_default()
            .push(decision);
    }

    let mut report = OracleReport::default();
    for (customer, mut requests) in by_customer {
        requests.sort_by(|a, b| a.t.total_cmp(&b.t));
        let tier = requests[0].tier.as_str();
        let Some(limit) = limits.get(tier) else {
            if !report.unknown_tiers.iter().any(|known| known == tier) {
                report.unknown_tiers.push(tier.to_string());
            }
            continue;
        };
        let Some(quota) = limit.quota else {
            report.customers_without_quota += 1;
            continue;
        };

        report.customers_checked += 1;
        let checker = CustomerCheck {
            customer,
            tier,
            quota: quota.requests,
            window_seconds: quota.window_seconds,
            tolerance_seconds,
        };
        checker.check(&requests, &mut report.violations);
    }
    report
}

struct CustomerCheck<'a> {
    customer: &'a str,
    tier: &'a str,
    quota: u64,
    window_seconds: u64,
    tolerance_seconds: f64,
}

impl CustomerCheck<'_> {
    fn check(&self, requests: &[&Decision], violations: &mut Vec<Violation>) {
        let admitted: Vec<f64> = requests
            .iter()
            .filter(|decision| decision.is_admitted())
            .map(|decision| decision.t)
            .collect();
        let mut found = Vec::new();
        self.check_over_admitted(&admitted, &mut found);
        self.check_refusals(requests, &admitted, &mut found);
        found.sort_by(|a, b| a.t.total_cmp(&b.t));
        violations.extend(found);
    }

    /// (a): with the admitted times sorted, `q + 1` of them closer together than the shortened
    /// window means some window held more than `q`.
    fn check_over_admitted(&self, admitted: &[f64], found: &mut Vec<Violation>) {
        let window = self.window_seconds as f64 - self.tolerance_seconds;
        let quota = usize::try_from(self.quota).unwrap_or(usize::MAX);
        for (first, last) in admitted.iter().zip(admitted.iter().skip(quota)) {
            if last - first < window {
                let count = admitted.partition_point(|t| t <= last)
                    - admitted.partition_point(|t| t < first);
                found.push(self.violation(
                    *last,
                    ViolationKind::OverAdmitted {
                        admitted: count,
                        window_start: *first,
                    },
                ));
            }
        }
    }

    /// (b): a 429 at `t` needs `q` admitted requests in `[t - W - tolerance, t + tolerance]`.
    fn check_refusals(&self, requests: &[&Decision], admitted: &[f64], found: &mut Vec<Violation>) {
        let window = self.window_seconds as f64 + self.tolerance_seconds;
        for refused in requests.iter().filter(|decision| decision.status == 429) {
            let from = admitted.partition_point(|t| *t < refused.t - window);
            let to = admitted.partition_point(|t| *t <= refused.t + self.tolerance_seconds);
            let count = to - from;
            if (count as u64) < self.quota {
                found.push(self.violation(
                    refused.t,
                    ViolationKind::RefusedUnderQuota { admitted: count },
                ));
            }
        }
    }

    fn violation(&self, t: f64, kind: ViolationKind) -> Violation {
        Violation {
            customer: self.customer.to_string(),
            tier: self.tier.to_string(),
            t,
            quota: self.quota,
            window_seconds: self.window_seconds,
            kind,
        }
    }
}

/// Decisions and limits shared by the tests of the oracle and of the
/// accuracy measures.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;

    use crate::decisions::Decision;
    use crate::limits::{Quota, TierLimit, TierLimits};

    /// Returns limits with one quota tier `basic` (`requests` per 10 s) and
    /// one burst-only tier `enterprise`.
    pub(crate) fn basic_limits(requests: u64) -> TierLimits {
        let basic = TierLimit {
            quota: Some(Quota {
                requests,
                window_seconds: 10,
            }),
            burst: None,
        };
        let enterprise = *TierLimits::default_tiers().get("enterprise").unwrap();
        TierLimits::new(BTreeMap::from([
            ("basic".to_string(), basic),
            ("enterprise".to_string(), enterprise),
        ]))
    }

    /// Returns one decision per `(t, status)` of `customer` in `tier`.
    pub(crate) fn decisions(customer: &str, tier: &str, events: &[(f64, u16)]) -> Vec<Decision> {
        events
            .iter()
            .map(|&(t, status)| Decision {
                t,
                customer: customer.to_string(),
                tier: tier.to_string(),
                status,
                latency_ms: None,
                lateness_ms: None,
                line: None,
                error: None,
                instance: None,
                filter_admitted: None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testing::{basic_limits, decisions};

    /// Limits with one quota tier `basic` (3 per 10 s) and one burst-only tier `enterprise`.
    fn limits() -> TierLimits {
        basic_limits(3)
    }

    #[test]
    fn exact_rolling_window_passes() {
        let events = [
            (0.0, 200),
            (1.0, 200),
            (2.0, 200),
            (3.0, 429),
            (9.9, 429),
            (10.0, 200),
            (10.5, 429),
            (11.0, 200),
            (12.0, 200),
            (12.5, 429),
        ];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.0);
        assert_eq!(report.violations, vec![]);
        assert_eq!(report.customers_checked, 1);
        assert!(report.passed());
    }

    #[test]
    fn upstream_error_of_admitted_request_uses_quota() {
        let events = [(0.0, 200), (1.0, 502), (2.0, 200), (3.0, 429)];
        let mut with_field = decisions("a", "basic", &events);
        with_field[1].filter_admitted = Some(true);
        let report = check_decisions(&with_field, &limits(), 0.0);
        assert_eq!(report.violations, vec![]);

        // Without the field the 502 looks like the filter's own reply, so
        // the 429 seems to come after only two admissions.
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.0);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].t, 3.0);
    }

    #[test]
    fn one_over_quota_fails() {
        let events = [(0.0, 200), (1.0, 200), (2.0, 200), (3.0, 200)];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.25);
        assert_eq!(report.violations.len(), 1);
        let violation = &report.violations[0];
        assert_eq!(violation.customer, "a");
        assert_eq!(violation.t, 3.0);
        assert_eq!(
            violation.kind,
            ViolationKind::OverAdmitted {
                admitted: 4,
                window_start: 0.0
            }
        );
    }

    #[test]
    fn double_quota_across_fixed_window_boundary_fails() {
        // A fixed-window limiter admits 3 at the end of one window and 3 at the start of the
        // next; a rolling window must not.
        let events = [
            (8.0, 200),
            (9.0, 200),
            (9.5, 200),
            (10.1, 200),
            (10.2, 200),
            (10.3, 200),
        ];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.25);
        let times: Vec<f64> = report.violations.iter().map(|v| v.t).collect();
        assert_eq!(times, vec![10.1, 10.2, 10.3]);
    }

    #[test]
    fn refusal_under_quota_fails() {
        let events = [(0.0, 200), (5.0, 429)];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.25);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].t, 5.0);
        assert_eq!(
            report.violations[0].kind,
            ViolationKind::RefusedUnderQuota { admitted: 1 }
        );
    }

    #[test]
    fn refusal_after_window_passed_fails() {
        let events = [(0.0, 200), (1.0, 200), (2.0, 200), (11.0, 429)];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.25);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(
            report.violations[0].kind,
            ViolationKind::RefusedUnderQuota { admitted: 2 }
        );
    }

    #[test]
    fn tolerance_absorbs_small_timing_errors() {
        // A fourth admission 0.2 s before the first one leaves the window, and a refusal 0.2 s
        // after the second one left it.
        let events = [(0.0, 200), (1.0, 200), (2.0, 200), (9.8, 200), (11.2, 429)];
        let strict = check_decisions(&decisions("a", "basic", &events), &limits(), 0.0);
        assert_eq!(strict.violations.len(), 2);
        let tolerant = check_decisions(&decisions("a", "basic", &events), &limits(), 0.5);
        assert_eq!(tolerant.violations, vec![]);
    }

    #[test]
    fn other_statuses_neither_admit_nor_refuse() {
        let events = [
            (0.0, 200),
            (0.5, 401),
            (1.0, 200),
            (1.5, 503),
            (2.0, 200),
            (2.5, 0),
            (3.0, 429),
        ];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.25);
        assert_eq!(report.violations, vec![]);
    }

    #[test]
    fn customers_are_checked_separately() {
        let mut all = decisions("a", "basic", &[(0.0, 200), (1.0, 200), (2.0, 200)]);
        all.extend(decisions(
            "b",
            "basic",
            &[(0.5, 200), (1.5, 200), (2.5, 200)],
        ));
        all.extend(decisions("c", "basic", &[(3.0, 429)]));
        let report = check_decisions(&all, &limits(), 0.25);
        assert_eq!(report.customers_checked, 3);
        assert_eq!(report.violations.len(), 1);
        assert_eq!(report.violations[0].customer, "c");
    }

    #[test]
    fn unsorted_input_is_sorted_per_customer() {
        let events = [(2.0, 200), (3.0, 429), (0.0, 200), (1.0, 200)];
        let report = check_decisions(&decisions("a", "basic", &events), &limits(), 0.0);
        assert_eq!(report.violations, vec![]);
    }

    #[test]
    fn tiers_without_quota_are_counted_not_checked() {
        let mut all = decisions("e", "enterprise", &[(0.0, 200), (0.0, 429)]);
        all.extend(decisions("x", "platinum", &[(0.0, 200)]));
        let report = check_decisions(&all, &limits(), 0.25);
        assert_eq!(report.customers_checked, 0);
        assert_eq!(report.customers_without_quota, 1);
        assert_eq!(report.unknown_tiers, vec!["platinum".to_string()]);
        assert!(report.passed());
    }

    #[test]
    fn violation_message_names_customer_and_time() {
        let events = [(0.0, 200), (5.0, 429)];
        let report = check_decisions(&decisions("cust-1", "basic", &events), &limits(), 0.25);
        let message = report.violations[0].to_string();
        assert!(message.contains("cust-1"), "{message}");
        assert!(message.contains("t=5.000 s"), "{message}");
    }
}
