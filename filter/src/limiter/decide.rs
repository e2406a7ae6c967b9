//! One request against one customer's record: check every limit of the
//! tier, consume from all of them only when all admit, count the request
//! as pending usage, and work out the rate-limit header values.

use super::bucket::TokenBucket;
use super::record::{Record, RemoteState};
use crate::config::{Quota, Tier};
use crate::usage::count_request;

/// State of one limit after a request, for the `ratelimit` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// Requests this limit would still admit now (`r`).
    pub remaining: u64,
    /// Seconds until `remaining` grows by one (`t`); on the limit that
    /// refused a request, the seconds until it would admit one.
    pub reset_s: u64,
}

/// The decision on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is admitted.
    pub admitted: bool,
    /// Seconds until a request would be admitted; 0 when admitted.
    pub retry_after_s: u64,
    /// State of the rolling-window quota, when the tier has one.
    pub quota: Option<LimitState>,
    /// State of the token bucket, when the tier has one.
    pub burst: Option<LimitState>,
}

/// Applies one request at `now_ms` to `record` under `tier`, with the
/// whole quota available before any sync reply.
pub fn apply(record: &mut Record, tier: &Tier, now_ms: u64) -> Decision {
    apply_with(record, tier, now_ms, 1.0)
}

/// Applies one request at `now_ms` to `record` under `tier`. Without a
/// sync reply about the customer from the last window, only
/// `share_before_sync` of the quota is available, rounded up, so that
/// instances that receive a new customer at the same time do not each
/// admit the whole quota.
pub fn apply_with(
    record: &mut Record,
    tier: &Tier,
    now_ms: u64,
    share_before_sync: f64,
) -> Decision {
    record.last_seen_ms = now_ms;

    let quota_check = match tier.quota {
        Some(quota) => {
            let quota = local_quota(quota, record.remote.as_ref(), now_ms, share_before_sync);
            let log = record.log.get_or_insert_default();
            log.prune(&quota, now_ms);
            Some((quota, log.check(&quota, now_ms)))
        }
        None => {
            record.log = None;
            None
        }
    };
    let burst_check = match tier.burst {
        Some(burst) => {
            let bucket = record
                .bucket
                .get_or_insert_with(|| TokenBucket::full(&burst, now_ms));
            bucket.refill(&burst, now_ms);
            Some((burst, bucket.check(&burst)))
        }
        None => {
            record.bucket = None;
            None
        }
    };

    let quota_allows = quota_check.is_none_or(|(_, check)| check.allowed);
    let burst_allows = burst_check.is_none_or(|(_, check)| check.allowed);
    let admitted = quota_allows && burst_allows;
    count_request(&mut record.pending, now_ms, &tier.name, admitted);

    let mut idle_at_ms = now_ms;
    let mut retry_after_s = 0;
    let mut quota_state = None;
    if let (Some((quota, check)), Some(log)) = (quota_check, record.log.as_mut()) {
        let state = if admitted {
            log.record(now_ms);
            let after = log.check(&quota, now_ms);
            LimitState {
                remaining: u64::from(quota.requests.saturating_sub(after.used)),
                reset_s: ceil_seconds(after.oldest_leaves_ms),
            }
        } else if check.allowed {
            LimitState {
                remaining: u64::from(quota.requests.saturating_sub(check.used)),
                reset_s: ceil_seconds(check.oldest_leaves_ms),
            }
        } else {
            exhausted_state(check.wait_ms, &mut retry_after_s)
        };
        idle_at_ms = idle_at_ms.max(log.idle_at_ms(&quota));
        quota_state = Some(state);
    }

    let mut burst_state = None;
    if let (Some((burst, check)), Some(bucket)) = (burst_check, record.bucket.as_mut()) {
        let state = if admitted {
            bucket.take();
            LimitState {
                remaining: check.available.saturating_sub(1),
                reset_s: ceil_seconds(bucket.next_token_ms(&burst)),
            }
        } else if check.allowed {
            LimitState {
                remaining: check.available,
                reset_s: ceil_seconds(bucket.next_token_ms(&burst)),
            }
        } else {
            exhausted_state(check.wait_ms, &mut retry_after_s)
        };
        idle_at_ms = idle_at_ms.max(bucket.idle_at_ms(&burst));
        burst_state = Some(state);
    }

    record.idle_at_ms = idle_at_ms;
    Decision {
        admitted,
        retry_after_s,
        quota: quota_state,
        burst: burst_state,
    }
}

/// Returns the part of `quota` this instance may use: the quota less what
/// other instances admitted, and at most this instance's cap, as of the
/// last sync reply. Without a reply from the last window, the share
/// before sync applies.
fn local_quota(
    quota: Quota,
    remote: Option<&RemoteState>,
    now_ms: u64,
    share_before_sync: f64,
) -> Quota {
    let Some(remote) = remote.filter(|remote| now_ms < remote.updated_ms + quota.window_ms) else {
        // The share is above 0 and at most 1, so the product fits a u32.
        let share = (f64::from(quota.requests) * share_before_sync).ceil() as u32;
        return Quota {
            requests: share.clamp(1, quota.requests.max(1)),
            window_ms: quota.window_ms,
        };
    };
    let mut requests = quota.requests.saturating_sub(remote.others_admitted);
    if let Some(cap) = remote.cap {
        // A cap computed from another quota keeps withholding what it
        // withheld from this instance, so a changed limit applies from the
        // worker's next request until a reply brings a cap for it.
        let cap = match remote.cap_quota {
            Some(cap_quota) if cap_quota != quota.requests => {
                quota.requests.saturating_sub(cap_quota.saturating_sub(cap))
            }
            _ => cap,
        };
        requests = requests.min(cap);
    }
    Quota {
        requests,
        window_ms: quota.window_ms,
    }
}

fn ceil_seconds(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// Returns the state of a limit that rejects the request for `wait_ms`, and
/// raises `retry_after_s` to that wait in whole seconds, at least 1.
fn exhausted_state(wait_ms: u64, retry_after_s: &mut u64) -> LimitState {
    let wait_s = ceil_seconds(wait_ms).max(1);
    *retry_after_s = (*retry_after_s).max(wait_s);
    LimitState {
        remaining: 0,
        reset_s: wait_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Burst, Quota};

    fn tier(quota: Option<Quota>, burst: Option<Burst>) -> Tier {
        Tier {
            name: "t".to_owned(),
            quota,
            burst,
            policy_header: String::new(),
            failure_policy: crate::config::tier::FailurePolicy::Local,
        }
    }

    const QUOTA: Quota = Quota {
        requests: 2,
        window_ms: 60_000,
    };
    const BURST: Burst = Burst {
        tokens_per_second: 1.0,
        size: 3,
    };

    /// Returns a record of one admission at 1 s with a sync reply's cap
    /// of 1 computed from `cap_quota`.
    fn capped(cap_quota: Option<u32>) -> Record {
        let mut record = Record::new("c");
        assert!(apply(&mut record, &tier(Some(QUOTA), None), 1_000).admitted);
        record.remote = Some(RemoteState {
            others_admitted: 0,
            cap: Some(1),
            updated_ms: 1_500,
            cap_quota,
        });
        record
    }

    #[test]
    fn cap_of_current_quota_applies() {
        for cap_quota in [Some(QUOTA.requests), None] {
            let mut record = capped(cap_quota);
            let decision = apply(&mut record, &tier(Some(QUOTA), None), 2_000);
            assert!(!decision.admitted, "{cap_quota:?}");
        }
    }

    #[test]
    fn raised_quota_raises_a_stale_cap() {
        // The cap of 1 came from a quota of 1 and withholds nothing; the
        // tier now allows 2.
        let mut record = capped(Some(1));
        let decision = apply(&mut record, &tier(Some(QUOTA), None), 2_000);
        assert!(decision.admitted);
        let third = apply(&mut record, &tier(Some(QUOTA), None), 2_500);
        assert!(!third.admitted);
    }

    #[test]
    fn lowered_quota_lowers_a_stale_cap() {
        // The cap of 1 came from a quota of 3, so it withholds 2 from this
        // instance. Under the tier's quota of 2 that leaves 0, and the log
        // already contains one request.
        let mut record = capped(Some(3));
        let decision = apply(&mut record, &tier(Some(QUOTA), None), 2_000);
        assert!(!decision.admitted);
    }

    #[test]
    fn admitted_request_reports_remaining_and_reset() {
        let mut record = Record::new("c");
        let decision = apply(&mut record, &tier(Some(QUOTA), None), 1_000);
        assert!(decision.admitted);
        assert_eq!(decision.retry_after_s, 0);
        assert_eq!(
            decision.quota,
            Some(LimitState {
                remaining: 1,
                reset_s: 60
            })
        );
        assert_eq!(record.idle_at_ms, 61_000);
    }

    #[test]
    fn refused_request_reports_retry_after_of_oldest() {
        let mut record = Record::new("c");
        let tier = tier(Some(QUOTA), None);
        apply(&mut record, &tier, 1_000);
        apply(&mut record, &tier, 30_000);
        let decision = apply(&mut record, &tier, 40_500);
        assert!(!decision.admitted);
        assert_eq!(decision.retry_after_s, 21);
        assert_eq!(
            decision.quota,
            Some(LimitState {
                remaining: 0,
                reset_s: 21
            })
        );
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let mut record = Record::new("c");
        let tier = tier(Some(QUOTA), None);
        apply(&mut record, &tier, 1_000);
        apply(&mut record, &tier, 1_000);
        let decision = apply(&mut record, &tier, 60_999);
        assert!(!decision.admitted);
        assert_eq!(decision.retry_after_s, 1);
    }

    #[test]
    fn refusal_by_one_limit_consumes_neither() {
        let tier = tier(Some(QUOTA), Some(BURST));
        let mut record = Record::new("c");
        apply(&mut record, &tier, 0);
        apply(&mut record, &tier, 0);
        let refused = apply(&mut record, &tier, 0);
        assert!(!refused.admitted);
        // The bucket admitted but was not charged for the refused request.
        assert_eq!(refused.burst.map(|state| state.remaining), Some(1));
        assert!(
            record
                .bucket
                .is_some_and(|bucket| (bucket.tokens - 1.0).abs() < 1e-9)
        );
    }

    #[test]
    fn burst_refusal_waits_for_next_token() {
        let tier = tier(None, Some(BURST));
        let mut record = Record::new("c");
        for _ in 0..3 {
            assert!(apply(&mut record, &tier, 0).admitted);
        }
        let decision = apply(&mut record, &tier, 400);
        assert!(!decision.admitted);
        assert_eq!(decision.retry_after_s, 1);
        assert_eq!(decision.quota, None);
        assert_eq!(record.log, None);
    }

    #[test]
    fn usage_counts_admitted_and_refused() {
        let tier = tier(Some(QUOTA), None);
        let mut record = Record::new("c");
        for _ in 0..5 {
            apply(&mut record, &tier, 120_000);
        }
        assert_eq!(record.pending.len(), 1);
        assert_eq!(record.pending[0].admitted, 2);
        assert_eq!(record.pending[0].refused, 3);
        assert_eq!(record.pending[0].tier, "t");
    }
}
