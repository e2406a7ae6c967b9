//! One usage batch: the collected usage turned into a `SyncRequest`,
//! encoded once so every resend carries the same bytes, unless the
//! sidecar rejects it for good.

use std::collections::BTreeMap;

use prost::Message;
use veo_proto::sync::{SyncRequest, UsageRecord};

use crate::config::Quota;

/// Maximum usage records in one batch; the rest waits for the next one.
/// At about 60 bytes a record, this keeps a batch after a long sidecar
/// outage under tonic's default 4 MB decoding limit.
pub const MAX_RECORDS_PER_BATCH: usize = 10_000;

/// Usage is summed per customer, tier and minute.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageKey {
    /// Customer id.
    pub customer: String,
    /// Tier the requests were decided under.
    pub tier: String,
    /// Start of the minute, in minutes since the Unix epoch.
    pub minute: u32,
}

/// Request counts of one [`UsageKey`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests refused with 429.
    pub refused: u64,
    /// Response body bytes of the admitted requests.
    pub egress_bytes: u64,
}

/// Versions of the sets the sidecar pushes that this instance applies,
/// each 0 before the first set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    /// Version of the customer tier overrides.
    pub tier_overrides: u64,
    /// Version of the asset region registry.
    pub asset_regions: u64,
    /// Version of the erased customers, reported only once they are
    /// purged.
    pub erasures: u64,
}

/// A built batch awaiting acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Sequence number of the batch in this instance's stream.
    pub sequence: u64,
    /// Number of usage records in it.
    pub records: usize,
    /// The encoded `SyncRequest`.
    pub encoded: Vec<u8>,
}

impl Batch {
    /// Moves up to [`MAX_RECORDS_PER_BATCH`] entries out of `collected`
    /// into a new batch. `versions` are those of the pushed sets the
    /// instance applies; `quota_of` returns the quota of a tier by name.
    pub fn take(
        collected: &mut BTreeMap<UsageKey, UsageTotals>,
        instance_id: &str,
        sequence: u64,
        created_unix_ms: i64,
        versions: Versions,
        quota_of: impl Fn(&str) -> Option<Quota>,
    ) -> Self {
        let mut usage = Vec::with_capacity(collected.len().min(MAX_RECORDS_PER_BATCH));
        while usage.len() < MAX_RECORDS_PER_BATCH {
            let Some((key, totals)) = collected.pop_first() else {
                break;
            };
            let quota = quota_of(&key.tier);
            usage.push(UsageRecord {
                quota_requests: quota.map_or(0, |quota| u64::from(quota.requests)),
                quota_window_ms: quota.map_or(0, |quota| quota.window_ms),
                egress_bytes: totals.egress_bytes,
                customer: key.customer,
                tier: key.tier,
                minute_unix_s: i64::from(key.minute) * 60,
                admitted_requests: totals.admitted,
                refused_requests: totals.refused,
            });
        }
        Self::from_records(usage, instance_id, sequence, created_unix_ms, versions)
    }

    /// Builds a batch of the records `usage`, with the other fields as in
    /// [`Batch::take`].
    pub fn from_records(
        usage: Vec<UsageRecord>,
        instance_id: &str,
        sequence: u64,
        created_unix_ms: i64,
        versions: Versions,
    ) -> Self {
        let request = SyncRequest {
            instance_id: instance_id.to_owned(),
            sequence,
            created_unix_ms,
            usage,
            tier_overrides_version: versions.tier_overrides,
            asset_regions_version: versions.asset_regions,
            erasures_version: versions.erasures,
        };
        Self::from_request(&request)
    }

    /// Encodes `request` as a batch.
    pub fn from_request(request: &SyncRequest) -> Self {
        Self {
            sequence: request.sequence,
            records: request.usage.len(),
            encoded: request.encode_to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(customer: &str, minute: u32) -> UsageKey {
        UsageKey {
            customer: customer.to_owned(),
            tier: "basic".to_owned(),
            minute,
        }
    }

    #[test]
    fn batch_carries_instance_sequence_and_minutes() {
        let mut collected = BTreeMap::from([(
            key("acme", 28_000_000),
            UsageTotals {
                admitted: 5,
                refused: 2,
                egress_bytes: 123_456,
            },
        )]);
        let quota = Quota {
            requests: 60,
            window_ms: 60_000,
        };
        let batch = Batch::take(
            &mut collected,
            "node-1/ab12",
            7,
            1_680_000_000_000,
            Versions {
                tier_overrides: 4,
                asset_regions: 5,
                erasures: 6,
            },
            |tier| (tier == "basic").then_some(quota),
        );
        assert!(collected.is_empty());

        let request = SyncRequest::decode(batch.encoded.as_slice()).unwrap();
        assert_eq!(request.instance_id, "node-1/ab12");
        assert_eq!(request.sequence, 7);
        assert_eq!(request.created_unix_ms, 1_680_000_000_000);
        assert_eq!(request.tier_overrides_version, 4);
        assert_eq!(request.asset_regions_version, 5);
        assert_eq!(request.erasures_version, 6);
        assert_eq!(
            request.usage,
            [UsageRecord {
                customer: "acme".to_owned(),
                tier: "basic".to_owned(),
                minute_unix_s: 1_680_000_000,
                admitted_requests: 5,
                refused_requests: 2,
                quota_requests: 60,
                quota_window_ms: 60_000,
                egress_bytes: 123_456,
            }]
        );
    }

    #[test]
    fn oversized_collection_spills_into_next_batch() {
        let mut collected: BTreeMap<UsageKey, UsageTotals> = (0..MAX_RECORDS_PER_BATCH as u32 + 3)
            .map(|minute| (key("acme", minute), UsageTotals::default()))
            .collect();
        let first = Batch::take(&mut collected, "i", 1, 0, Versions::default(), |_| None);
        assert_eq!(first.records, MAX_RECORDS_PER_BATCH);
        assert_eq!(collected.len(), 3);
    }
}
