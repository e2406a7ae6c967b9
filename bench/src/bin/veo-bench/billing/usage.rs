//! Usage of the benchmark's customers and the sync batches that carry it to the sidecar, as
//! one filter instance sends them over `veo.sync.v1.Sync`.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use veo_proto::sync::sync_client::SyncClient;
use veo_proto::sync::{SyncRequest, UsageRecord};

/// Length of a usage bucket, in seconds.
pub const MINUTE_SECONDS: i64 = 60;

/// Meters that every bucket of usage is billed on: `api_requests` and `egress_bytes`.
pub const METERS: u64 = 2;

/// Tier of every record. The records carry no quota, so the quota fields stay 0.
const TIER: &str = "enterprise";

/// Instance id of the one filter instance that the benchmark plays.
const INSTANCE_ID: &str = "veo-bench/billing";

/// The same admitted requests and egress for every customer in every minute of a run.
#[derive(Debug, Clone)]
pub struct UsagePlan {
    /// Customer ids, as in the token's customer claim.
    pub customers: Vec<String>,
    /// Starts of the minute buckets, in Unix seconds.
    pub minutes: Vec<i64>,
    /// Admitted requests per customer per minute.
    pub requests_per_minute: u64,
    /// Response body bytes per admitted request.
    pub egress_bytes_per_request: u64,
}

/// Division of a plan's usage into sync batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batching {
    /// One batch per minute with a record for each customer.
    PerMinute,
    /// Each customer's usage of a minute split into up to `parts` records of nearly equal
    /// size, each record in a batch of its own.
    Split {
        /// Records per customer and minute; fewer when the minute has fewer requests.
        parts: u64,
    },
}

impl UsagePlan {
    /// Returns the admitted requests of the whole plan.
    pub fn admitted_requests(&self) -> u64 {
        self.records().saturating_mul(self.requests_per_minute)
    }

    /// Returns the egress bytes of the whole plan.
    pub fn egress_bytes(&self) -> u64 {
        self.admitted_requests()
            .saturating_mul(self.egress_bytes_per_request)
    }

    /// Returns the (customer, meter, minute) buckets with usage.
    pub fn buckets(&self) -> u64 {
        if self.requests_per_minute == 0 {
            return 0;
        }
        let meters = if self.egress_bytes_per_request == 0 {
            1
        } else {
            METERS
        };
        self.records() * meters
    }

    /// Returns the usage records of each batch, in sending order.
    pub fn batches(&self, batching: Batching) -> Vec<Vec<UsageRecord>> {
        match batching {
            Batching::PerMinute => self
                .minutes
                .iter()
                .map(|&minute| {
                    self.customers
                        .iter()
                        .map(|customer| self.record(customer, minute, self.requests_per_minute))
                        .collect()
                })
                .collect(),
            Batching::Split { parts } => {
                // Parts go out round by round, as a filter syncs every interval, so that the
                // records of one bucket are far apart in the stream.
                let shares = split(self.requests_per_minute, parts);
                let mut batches = Vec::new();
                for &share in &shares {
                    for &minute in &self.minutes {
                        for customer in &self.customers {
                            batches.push(vec![self.record(customer, minute, share)]);
                        }
                    }
                }
                batches
            }
        }
    }

    fn records(&self) -> u64 {
        (self.customers.len() * self.minutes.len()) as u64
    }

    fn record(&self, customer: &str, minute_unix_s: i64, requests: u64) -> UsageRecord {
        UsageRecord {
            customer: customer.to_owned(),
            tier: TIER.to_owned(),
            minute_unix_s,
            admitted_requests: requests,
            refused_requests: 0,
            quota_requests: 0,
            quota_window_ms: 0,
            egress_bytes: requests.saturating_mul(self.egress_bytes_per_request),
        }
    }
}

/// Splits `total` into `parts` shares (fewer when `total` is smaller) that differ by at most
/// one and add up to `total`. Every share is at least 1 unless `total` is 0.
pub fn split(total: u64, parts: u64) -> Vec<u64> {
    let parts = parts.clamp(1, total.max(1));
    let base = total / parts;
    let remainder = total % parts;
    (0..parts)
        .map(|index| base + u64::from(index < remainder))
        .collect()
}

/// Returns the starts of the `count` whole minutes before the one that contains
/// `now_unix_s`, newest first.
pub fn past_minutes(count: usize, now_unix_s: i64) -> Vec<i64> {
    let current = now_unix_s - now_unix_s.rem_euclid(MINUTE_SECONDS);
    (1..=count as i64)
        .map(|age| current - age * MINUTE_SECONDS)
        .collect()
}

/// Returns the system clock in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// Sends `batches` to the sidecar at `address` in order, with sequences 1, 2, ..., and
/// checks that the sidecar applied each one.
pub async fn send(address: SocketAddr, batches: Vec<Vec<UsageRecord>>) -> anyhow::Result<()> {
    let target = format!("http://{address}");
    let mut client = SyncClient::connect(target.clone())
        .await
        .with_context(|| format!("failed to connect to the sidecar's Sync API at {target}"))?;
    for (sequence, usage) in (1u64..).zip(batches) {
        let request = SyncRequest {
            instance_id: INSTANCE_ID.to_owned(),
            sequence,
            created_unix_ms: unix_now().saturating_mul(1_000),
            usage,
            tier_overrides_version: 0,
            asset_regions_version: 0,
            erasures_version: 0,
        };
        let response = client
            .sync(request)
            .await
            .with_context(|| format!("sync batch {sequence} failed at {target}"))?
            .into_inner();
        ensure!(
            response.applied_sequence == sequence && !response.duplicate,
            "the sidecar did not apply sync batch {sequence}: it returned applied_sequence {} \
             and duplicate {}; see its log",
            response.applied_sequence,
            response.duplicate
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(requests_per_minute: u64) -> UsagePlan {
        UsagePlan {
            customers: vec!["a".into(), "b".into(), "c".into()],
            minutes: vec![600, 540],
            requests_per_minute,
            egress_bytes_per_request: 10,
        }
    }

    fn totals(batches: &[Vec<UsageRecord>]) -> (u64, u64) {
        batches
            .iter()
            .flatten()
            .fold((0, 0), |(requests, bytes), record| {
                (
                    requests + record.admitted_requests,
                    bytes + record.egress_bytes,
                )
            })
    }

    #[test]
    fn split_adds_up_to_total() {
        assert_eq!(split(10, 3), [4, 3, 3]);
        assert_eq!(split(1_000_000, 10).iter().sum::<u64>(), 1_000_000);
        assert_eq!(split(2, 10), [1, 1]);
        assert_eq!(split(5, 0), [5]);
        assert_eq!(split(0, 4), [0]);
    }

    #[test]
    fn per_minute_batches_carry_whole_plan() {
        let plan = plan(7);
        let batches = plan.batches(Batching::PerMinute);
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|batch| batch.len() == 3));
        assert_eq!(totals(&batches), (42, 420));
        assert_eq!(plan.admitted_requests(), 42);
        assert_eq!(plan.egress_bytes(), 420);
        assert_eq!(plan.buckets(), 12);
    }

    #[test]
    fn split_batches_carry_same_usage() {
        let plan = plan(7);
        let batches = plan.batches(Batching::Split { parts: 3 });
        assert_eq!(batches.len(), 3 * 2 * 3);
        assert!(batches.iter().all(|batch| batch.len() == 1));
        assert_eq!(totals(&batches), (42, 420));
    }

    #[test]
    fn split_batches_stop_at_one_request() {
        let batches = plan(1).batches(Batching::Split { parts: 10 });
        assert_eq!(batches.len(), 2 * 3);
        assert_eq!(totals(&batches), (6, 60));
    }

    #[test]
    fn buckets_leave_out_empty_meters() {
        let mut plan = plan(5);
        plan.egress_bytes_per_request = 0;
        assert_eq!(plan.buckets(), 6);
        plan.requests_per_minute = 0;
        assert_eq!(plan.buckets(), 0);
    }

    #[test]
    fn past_minutes_end_before_current_minute() {
        assert_eq!(past_minutes(3, 1_000_030), [999_960, 999_900, 999_840]);
        assert_eq!(past_minutes(1, 1_000_020), [999_960]);
        assert!(past_minutes(0, 1_000_000).is_empty());
    }
}
