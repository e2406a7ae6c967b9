//! Encoding of one customer's limiter record in shared data.
//!
//! Layout, little-endian:
//! - version (1 byte), customer length (1) and bytes, last seen (8),
//!   idle-at time (8), flags (1: bit 0 log, bit 1 bucket, bit 2 remote
//!   usage, bit 3 cap's quota);
//! - with the log: base time (8), count (4), one 4-byte offset per
//!   admitted request;
//! - with the bucket: tokens (8, f64), refill time (8);
//! - with remote usage: others' admissions (4), this instance's cap (4,
//!   `u32::MAX` for none), time of the sync reply (8);
//! - pending usage: bucket count (1), then per bucket the minute (4),
//!   admitted (4), refused (4), tier length (1) and tier bytes;
//! - with the cap's quota: the quota the cap was computed from (4).
//!
//! The cap's quota comes last because filters that predate it ignore
//! unknown flags and trailing bytes, so they still read such a record.
//! When they write it back, the quota is gone and the cap counts as before.

use super::bucket::TokenBucket;
use super::window::SlidingLog;
use crate::usage::{PendingUsage, decode_pending, encode_pending};

/// Format version written in the first byte.
const VERSION: u8 = 2;
const HAS_LOG: u8 = 1;
const HAS_BUCKET: u8 = 2;
const HAS_REMOTE: u8 = 4;
const HAS_CAP_QUOTA: u8 = 8;

/// Usage of a customer at other instances, from the sidecar's last sync
/// reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteState {
    /// Requests the other instances admitted within the window, as of
    /// `updated_ms`.
    pub others_admitted: u32,
    /// Maximum requests this instance may have admitted within the window;
    /// `None` far from the quota.
    pub cap: Option<u32>,
    /// Time of the sync reply, in milliseconds since the Unix epoch.
    pub updated_ms: u64,
    /// The quota `cap` was computed from, in requests, when the reply
    /// named it. Under another quota the cap keeps withholding the same
    /// number of requests from this instance (see `decide`).
    pub cap_quota: Option<u32>,
}

/// Rate-limit state and pending usage of one customer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    /// Customer id (at most 255 bytes).
    pub customer: String,
    /// Time of the customer's last request, in milliseconds since the
    /// Unix epoch.
    pub last_seen_ms: u64,
    /// Time from which the limit state no longer affects any decision, so
    /// evicting the record loses nothing but its pending usage, which the
    /// evicting worker forwards.
    pub idle_at_ms: u64,
    /// Admission log of the tier's quota.
    pub log: Option<SlidingLog>,
    /// Token bucket of the tier's burst limit.
    pub bucket: Option<TokenBucket>,
    /// Usage at other instances, from the last sync reply.
    pub remote: Option<RemoteState>,
    /// Usage not yet taken by the sync role.
    pub pending: Vec<PendingUsage>,
}

impl Record {
    /// Creates an empty record for `customer`.
    pub fn new(customer: &str) -> Self {
        Self {
            customer: customer.to_owned(),
            ..Self::default()
        }
    }

    /// Returns whether the record can be evicted without changing any
    /// future decision.
    pub fn is_idle(&self, now_ms: u64) -> bool {
        now_ms >= self.idle_at_ms
    }

    /// Encodes the record.
    pub fn encode(&self) -> Vec<u8> {
        let log_len = self
            .log
            .as_ref()
            .map_or(0, |log| 12 + 4 * log.offsets.len());
        let mut out = Vec::with_capacity(40 + self.customer.len() + log_len);
        let cap_quota = self
            .remote
            .and_then(|remote| remote.cap.and(remote.cap_quota));
        out.push(VERSION);
        let customer = self.customer.as_bytes();
        let customer = &customer[..customer.len().min(usize::from(u8::MAX))];
        out.push(customer.len() as u8);
        out.extend_from_slice(customer);
        out.extend_from_slice(&self.last_seen_ms.to_le_bytes());
        out.extend_from_slice(&self.idle_at_ms.to_le_bytes());

        let mut flags = 0;
        if self.log.is_some() {
            flags |= HAS_LOG;
        }
        if self.bucket.is_some() {
            flags |= HAS_BUCKET;
        }
        if self.remote.is_some() {
            flags |= HAS_REMOTE;
        }
        if cap_quota.is_some() {
            flags |= HAS_CAP_QUOTA;
        }
        out.push(flags);
        if let Some(log) = &self.log {
            out.extend_from_slice(&log.base_ms.to_le_bytes());
            out.extend_from_slice(&(log.offsets.len() as u32).to_le_bytes());
            for offset in &log.offsets {
                out.extend_from_slice(&offset.to_le_bytes());
            }
        }
        if let Some(bucket) = &self.bucket {
            out.extend_from_slice(&bucket.tokens.to_le_bytes());
            out.extend_from_slice(&bucket.updated_ms.to_le_bytes());
        }
        if let Some(remote) = &self.remote {
            out.extend_from_slice(&remote.others_admitted.to_le_bytes());
            out.extend_from_slice(&remote.cap.unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(&remote.updated_ms.to_le_bytes());
        }
        encode_pending(&mut out, &self.pending);
        if let Some(quota) = cap_quota {
            out.extend_from_slice(&quota.to_le_bytes());
        }
        out
    }

    /// Decodes a record; `None` for bytes in another format.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION {
            return None;
        }
        let (&len, rest) = rest.split_first()?;
        let (customer, rest) = rest.split_at_checked(usize::from(len))?;
        let (last_seen, rest) = rest.split_first_chunk::<8>()?;
        let (idle_at, rest) = rest.split_first_chunk::<8>()?;
        let (&flags, mut rest) = rest.split_first()?;

        let mut log = None;
        if flags & HAS_LOG != 0 {
            let (base, tail) = rest.split_first_chunk::<8>()?;
            let (count, tail) = tail.split_first_chunk::<4>()?;
            let count = u32::from_le_bytes(*count) as usize;
            let (offsets, tail) = tail.split_at_checked(count.checked_mul(4)?)?;
            let offsets = offsets
                .chunks_exact(4)
                .map(|chunk| u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect();
            log = Some(SlidingLog {
                base_ms: u64::from_le_bytes(*base),
                offsets,
            });
            rest = tail;
        }
        let mut bucket = None;
        if flags & HAS_BUCKET != 0 {
            let (tokens, tail) = rest.split_first_chunk::<8>()?;
            let (updated, tail) = tail.split_first_chunk::<8>()?;
            bucket = Some(TokenBucket {
                tokens: f64::from_le_bytes(*tokens),
                updated_ms: u64::from_le_bytes(*updated),
            });
            rest = tail;
        }
        let mut remote = None;
        if flags & HAS_REMOTE != 0 {
            let (others, tail) = rest.split_first_chunk::<4>()?;
            let (cap, tail) = tail.split_first_chunk::<4>()?;
            let (updated, tail) = tail.split_first_chunk::<8>()?;
            let cap = u32::from_le_bytes(*cap);
            remote = Some(RemoteState {
                others_admitted: u32::from_le_bytes(*others),
                cap: (cap != u32::MAX).then_some(cap),
                updated_ms: u64::from_le_bytes(*updated),
                cap_quota: None,
            });
            rest = tail;
        }
        let (pending, rest) = decode_pending(rest)?;
        if flags & HAS_CAP_QUOTA != 0
            && let Some(remote) = &mut remote
        {
            let (quota, _) = rest.split_first_chunk::<4>()?;
            remote.cap_quota = Some(u32::from_le_bytes(*quota));
        }

        Some(Self {
            customer: String::from_utf8(customer.to_vec()).ok()?,
            last_seen_ms: u64::from_le_bytes(*last_seen),
            idle_at_ms: u64::from_le_bytes(*idle_at),
            log,
            bucket,
            remote,
            pending,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            customer: "acme".to_owned(),
            last_seen_ms: 1_700_000_000_123,
            idle_at_ms: 1_700_000_060_123,
            log: Some(SlidingLog {
                base_ms: 1_700_000_000_000,
                offsets: vec![0, 5, 123],
            }),
            bucket: Some(TokenBucket {
                tokens: 12.5,
                updated_ms: 1_700_000_000_100,
            }),
            remote: Some(RemoteState {
                others_admitted: 7,
                cap: Some(20),
                updated_ms: 1_700_000_000_050,
                cap_quota: None,
            }),
            pending: vec![PendingUsage {
                minute: 28_333_333,
                tier: "basic".to_owned(),
                admitted: 3,
                refused: 1,
            }],
        }
    }

    #[test]
    fn record_round_trips() {
        let record = sample();
        assert_eq!(Record::decode(&record.encode()), Some(record));
    }

    #[test]
    fn cap_quota_round_trips() {
        let mut record = sample();
        if let Some(remote) = &mut record.remote {
            remote.cap_quota = Some(60);
        }
        let bytes = record.encode();
        assert_eq!(bytes[0], VERSION);
        assert_eq!(bytes.len(), sample().encode().len() + 4);
        assert_eq!(Record::decode(&bytes), Some(record));
    }

    #[test]
    fn reader_without_cap_quota_keeps_the_rest() {
        // A filter that predates the cap's quota ignores the flag and the
        // trailing bytes. Clearing the flag shows what it reads.
        let mut record = sample();
        if let Some(remote) = &mut record.remote {
            remote.cap_quota = Some(60);
        }
        let mut bytes = record.encode();
        let flags = 1 + 1 + record.customer.len() + 8 + 8;
        bytes[flags] &= !HAS_CAP_QUOTA;
        assert_eq!(Record::decode(&bytes), Some(sample()));
    }

    #[test]
    fn cap_quota_needs_a_cap() {
        let mut record = sample();
        if let Some(remote) = &mut record.remote {
            remote.cap = None;
            remote.cap_quota = Some(60);
        }
        let decoded = Record::decode(&record.encode()).unwrap();
        assert_eq!(decoded.remote.unwrap().cap_quota, None);
    }

    #[test]
    fn bare_record_round_trips() {
        let record = Record::new("c");
        assert_eq!(Record::decode(&record.encode()), Some(record));
    }

    #[test]
    fn basic_record_size_is_small() {
        // 60 admissions in the log and one pending bucket.
        let mut record = sample();
        record.bucket = None;
        record.remote = None;
        record.log = Some(SlidingLog {
            base_ms: 0,
            offsets: (0..60).collect(),
        });
        assert_eq!(
            record.encode().len(),
            1 + 1 + 4 + 8 + 8 + 1 + 12 + 240 + 1 + 18
        );
    }

    /// Customer, log entries, bucket, remote usage, and the tiers of the
    /// pending buckets of one record.
    type Shape<'a> = (&'a str, Option<u32>, bool, bool, &'a [&'a str]);

    #[test]
    fn encoded_size_follows_layout() {
        let shapes: [Shape<'_>; 6] = [
            ("c", None, false, false, &[]),
            ("customer-000001", Some(1), false, true, &[]),
            ("customer-000001", Some(60), false, true, &[]),
            (
                "customer-000001",
                Some(60),
                false,
                false,
                &["basic", "basic"],
            ),
            ("acme", None, true, true, &["enterprise"]),
            (&"x".repeat(255), Some(600), true, true, &["pro"]),
        ];
        for (customer, entries, has_bucket, has_remote, tiers) in shapes {
            let record = Record {
                customer: customer.to_owned(),
                log: entries.map(|count| SlidingLog {
                    base_ms: 0,
                    offsets: (0..count).collect(),
                }),
                bucket: has_bucket.then_some(TokenBucket {
                    tokens: 1.0,
                    updated_ms: 0,
                }),
                remote: has_remote.then_some(RemoteState {
                    others_admitted: 0,
                    cap: None,
                    updated_ms: 0,
                    cap_quota: None,
                }),
                pending: tiers
                    .iter()
                    .zip(0..)
                    .map(|(tier, minute)| PendingUsage {
                        minute,
                        tier: (*tier).to_owned(),
                        admitted: 1,
                        refused: 0,
                    })
                    .collect(),
                ..Record::default()
            };
            let log = entries.map_or(0, |count| 12 + 4 * count as usize);
            let pending: usize = tiers.iter().map(|tier| 13 + tier.len()).sum();
            let expected = 19
                + customer.len()
                + log
                + 16 * usize::from(has_bucket)
                + 16 * usize::from(has_remote)
                + 1
                + pending;
            assert_eq!(record.encode().len(), expected, "customer {customer:.8}");
        }
    }

    #[test]
    fn truncated_record_does_not_decode() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert_eq!(Record::decode(&bytes[..len]), None, "length {len}");
        }
    }

    #[test]
    fn huge_log_count_does_not_decode() {
        let mut bytes = Record::new("c").encode();
        let flags_at = 1 + 1 + 1 + 16;
        bytes[flags_at] = HAS_LOG;
        bytes.truncate(flags_at + 1);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Record::decode(&bytes), None);
    }
}
