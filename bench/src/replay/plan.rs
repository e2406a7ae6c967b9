//! Replay plans: the requests to send and when, built from an access log or from a synthetic
//! overload description.

use std::time::Duration;

use crate::access_log::AccessLogEntry;
use crate::limits::TierLimits;
use crate::random::SplitMix64;
use crate::tiers::{TierAssignment, customer_for_client};

/// One request of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRequest {
    /// When to send it, from the start of the replay.
    pub at: Duration,
    /// Customer id, the token's `sub`.
    pub customer: String,
    /// Tier claimed by the customer's token.
    pub tier: String,
    /// HTTP method.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// Access log line, for log replays.
    pub line: Option<usize>,
}

/// Errors from building a plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The speed-up factor is zero, negative or not a number.
    #[error("invalid speed {0}: expected a positive factor such as 1000")]
    InvalidSpeed(f64),
    /// A synthetic customer's tier has no quota or burst to derive a request rate from.
    #[error(
        "tier {tier:?} has no quota or burst in the tier limits, so its overload rate is \
         unknown: configure the tier or assign customers to other tiers"
    )]
    NoRate {
        /// The tier.
        tier: String,
    },
    /// The overload factor or duration is zero, negative or not a number.
    #[error("invalid synthetic load: {0}")]
    InvalidLoad(String),
}

/// Builds a plan from log entries: each client address is a customer, and each entry is sent
/// at `(entry time - earliest time) / speed`. The plan is sorted by send time, keeping log
/// order for entries of the same second.
///
/// # Errors
/// Returns [`PlanError::InvalidSpeed`] unless `speed` is positive.
pub fn plan_from_log(
    entries: &[AccessLogEntry],
    tiers: &TierAssignment,
    speed: f64,
) -> Result<Vec<PlannedRequest>, PlanError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(PlanError::InvalidSpeed(speed));
    }
    let Some(first) = entries.iter().map(|entry| entry.time.unix_seconds).min() else {
        return Ok(Vec::new());
    };

    let mut plan: Vec<PlannedRequest> = entries
        .iter()
        .map(|entry| {
            let customer = customer_for_client(&entry.client);
            let log_offset = (entry.time.unix_seconds - first) as f64;
            PlannedRequest {
                at: Duration::from_secs_f64(log_offset / speed),
                tier: tiers.tier_for(&customer),
                customer,
                method: entry.method.clone(),
                path: entry.path.clone(),
                line: Some(entry.line),
            }
        })
        .collect();
    // A stable sort keeps the log's order among requests of the same second.
    plan.sort_by_key(|request| request.at);
    Ok(plan)
}

/// Synthetic overload: `customers` customers each sending at `overload` times the sustained
/// rate of their tier for `duration`.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticLoad {
    /// Number of customers, named `synthetic-0000`, `synthetic-0001`, ...
    pub customers: usize,
    /// Multiple of the tier's sustained rate (quota per window, else burst refill rate).
    pub overload: f64,
    /// How long each customer sends.
    pub duration: Duration,
    /// Seed of each customer's start phase and request paths.
    pub seed: u64,
}

/// Builds a synthetic plan: each customer sends evenly spaced requests from a random phase
/// within its first interval.
///
/// # Errors
/// Returns [`PlanError::NoRate`] when a customer's tier has no limits to derive a rate from,
/// and [`PlanError::InvalidLoad`] for a non-positive overload or duration.
pub fn plan_synthetic(
    load: &SyntheticLoad,
    tiers: &TierAssignment,
    limits: &TierLimits,
) -> Result<Vec<PlannedRequest>, PlanError> {
    if !(load.overload.is_finite() && load.overload > 0.0) {
        return Err(PlanError::InvalidLoad(format!(
            "overload {} must be a positive factor",
            load.overload
        )));
    }
    if load.duration.is_zero() {
        return Err(PlanError::InvalidLoad(
            "duration must be positive".to_string(),
        ));
    }

    let mut random = SplitMix64::new(load.seed);
    let mut plan = Vec::new();
    for index in 0..load.customers {
        let customer = format!("synthetic-{index:04}");
        let tier = tiers.tier_for(&customer);
        let rate = limits
            .get(&tier)
            .and_then(|limit| limit.sustained_rate())
            .filter(|rate| *rate > 0.0)
            .ok_or_else(|| PlanError::NoRate { tier: tier.clone() })?;

        let interval = 1.0 / (rate * load.overload);
        let video = random.range(1_000, 10_000);
        let mut at = random.next_f64() * interval;
        let mut segment = 0;
        while at < load.duration.as_secs_f64() {
            plan.push(PlannedRequest {
                at: Duration::from_secs_f64(at),
                customer: customer.clone(),
                tier: tier.clone(),
                method: "GET".to_string(),
                path: format!("/videos/{video}/segments/{segment}.ts"),
                line: None,
            });
            segment += 1;
            at += interval;
        }
    }
    plan.sort_by_key(|request| request.at);
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::parse_line;

    fn entry(line: usize, client: &str, time: &str) -> AccessLogEntry {
        let text = format!(r#"{client} - - [{time} +0000] "GET /v/{line} HTTP/1.1" 200 1 "-" "t""#);
        parse_line(line, &text).unwrap()
    }

    #[test]
    fn log_plan_scales_offsets_by_speed() {
        let entries = [
            entry(1, "10.0.0.1", "01/Jan/2024:00:00:10"),
            entry(2, "10.0.0.2", "01/Jan/2024:00:00:00"),
            entry(3, "10.0.0.1", "01/Jan/2024:00:16:40"),
        ];
        let plan = plan_from_log(&entries, &TierAssignment::seeded(1), 100.0).unwrap();
        let offsets: Vec<Duration> = plan.iter().map(|request| request.at).collect();
        assert_eq!(
            offsets,
            [
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_secs(10)
            ]
        );
        assert_eq!(plan[0].customer, "cust-10.0.0.2");
        assert_eq!(plan[0].line, Some(2));
        assert_eq!(plan[1].path, "/v/1");
    }

    #[test]
    fn log_plan_keeps_order_within_a_second() {
        let entries: Vec<_> = (1..=5)
            .map(|line| entry(line, "10.0.0.1", "01/Jan/2024:00:00:00"))
            .collect();
        let plan = plan_from_log(&entries, &TierAssignment::seeded(1), 1.0).unwrap();
        let lines: Vec<_> = plan.iter().map(|request| request.line).collect();
        assert_eq!(lines, [Some(1), Some(2), Some(3), Some(4), Some(5)]);
    }

    #[test]
    fn log_plan_rejects_bad_speed() {
        for speed in [0.0, -1.0, f64::NAN] {
            let error = plan_from_log(&[], &TierAssignment::seeded(1), speed).unwrap_err();
            assert!(matches!(error, PlanError::InvalidSpeed(_)));
        }
    }

    #[test]
    fn synthetic_plan_sends_at_overload_rate() {
        let load = SyntheticLoad {
            customers: 20,
            overload: 3.0,
            duration: Duration::from_secs(10),
            seed: 5,
        };
        let tiers = TierAssignment::seeded(9);
        let limits = TierLimits::default_tiers();
        let plan = plan_synthetic(&load, &tiers, &limits).unwrap();

        for index in 0..20 {
            let customer = format!("synthetic-{index:04}");
            let tier = tiers.tier_for(&customer);
            let expected = limits.get(&tier).unwrap().sustained_rate().unwrap() * 3.0 * 10.0;
            let sent = plan.iter().filter(|r| r.customer == customer).count() as f64;
            assert!(
                (sent - expected).abs() <= 1.0,
                "{customer}: {sent} vs {expected}"
            );
        }
        assert!(plan.windows(2).all(|pair| pair[0].at <= pair[1].at));
        assert!(plan.iter().all(|r| r.at < Duration::from_secs(10)));
    }

    #[test]
    fn synthetic_plan_needs_a_rate() {
        let load = SyntheticLoad {
            customers: 1,
            overload: 2.0,
            duration: Duration::from_secs(1),
            seed: 1,
        };
        let tiers = TierAssignment::Mapping {
            tiers: Default::default(),
            fallback: "gold".to_string(),
        };
        let error = plan_synthetic(&load, &tiers, &TierLimits::default_tiers()).unwrap_err();
        assert_eq!(
            error,
            PlanError::NoRate {
                tier: "gold".to_string()
            }
        );
    }
}
