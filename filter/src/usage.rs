//! Usage not yet sent to the sidecar, and the shared-queue messages that
//! hand it to the sync role. Request counts per minute bucket and tier live
//! inside each customer's limiter record. Response body bytes live in each
//! worker's memory until its timer sends them.

pub mod egress;
pub mod queue;

pub use egress::{EgressMeter, EgressUsage};
pub use queue::UsageQueue;

/// Name of the shared queue from the workers to the sync role.
pub const QUEUE_NAME: &str = "veo.usage";

/// Most pending buckets one record keeps. Past this (the sync role has
/// not drained the record for that many minutes) the two oldest buckets
/// merge, which keeps every count but files the older one under the later
/// minute.
pub const MAX_PENDING_BUCKETS: usize = 32;

const MESSAGE_SLOT: u8 = 1;
const MESSAGE_EVICTED: u8 = 2;
const MESSAGE_EGRESS: u8 = 3;

/// Requests of one customer in one minute under one tier, not yet sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUsage {
    /// Start of the minute, in minutes since the Unix epoch.
    pub minute: u32,
    /// Tier the requests were decided under.
    pub tier: String,
    /// Requests admitted.
    pub admitted: u32,
    /// Requests refused with 429.
    pub refused: u32,
}

impl PendingUsage {
    /// Returns the start of the minute in seconds since the Unix epoch.
    pub fn minute_unix_s(&self) -> i64 {
        i64::from(self.minute) * 60
    }
}

/// Returns the minute bucket of `now_ms` (milliseconds since the Unix
/// epoch), in minutes since the Unix epoch.
pub fn minute_of(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 60_000).unwrap_or(u32::MAX)
}

/// Counts one request in `pending`, in the bucket of `now_ms` and `tier`.
pub fn count_request(pending: &mut Vec<PendingUsage>, now_ms: u64, tier: &str, admitted: bool) {
    let minute = minute_of(now_ms);
    let index = pending
        .iter()
        .position(|bucket| bucket.minute == minute && bucket.tier == tier);
    let index = match index {
        Some(index) => index,
        None => {
            pending.push(PendingUsage {
                minute,
                tier: tier.to_owned(),
                admitted: 0,
                refused: 0,
            });
            pending.len() - 1
        }
    };
    if let Some(bucket) = pending.get_mut(index) {
        if admitted {
            bucket.admitted = bucket.admitted.saturating_add(1);
        } else {
            bucket.refused = bucket.refused.saturating_add(1);
        }
    }
    if pending.len() > MAX_PENDING_BUCKETS {
        let oldest = pending.remove(0);
        if let Some(next) = pending.first_mut() {
            next.admitted = next.admitted.saturating_add(oldest.admitted);
            next.refused = next.refused.saturating_add(oldest.refused);
        }
    }
}

/// Appends the encoding of `pending` to `out`.
pub fn encode_pending(out: &mut Vec<u8>, pending: &[PendingUsage]) {
    out.push(pending.len().min(usize::from(u8::MAX)) as u8);
    for bucket in pending.iter().take(usize::from(u8::MAX)) {
        out.extend_from_slice(&bucket.minute.to_le_bytes());
        out.extend_from_slice(&bucket.admitted.to_le_bytes());
        out.extend_from_slice(&bucket.refused.to_le_bytes());
        let tier = bucket.tier.as_bytes();
        let len = tier.len().min(usize::from(u8::MAX));
        out.push(len as u8);
        out.extend_from_slice(&tier[..len]);
    }
}

/// Decodes what [`encode_pending`] wrote and returns the rest.
pub fn decode_pending(bytes: &[u8]) -> Option<(Vec<PendingUsage>, &[u8])> {
    let (&count, mut rest) = bytes.split_first()?;
    let mut pending = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (minute, tail) = rest.split_first_chunk::<4>()?;
        let (admitted, tail) = tail.split_first_chunk::<4>()?;
        let (refused, tail) = tail.split_first_chunk::<4>()?;
        let (&len, tail) = tail.split_first()?;
        let (tier, tail) = tail.split_at_checked(usize::from(len))?;
        pending.push(PendingUsage {
            minute: u32::from_le_bytes(*minute),
            tier: String::from_utf8(tier.to_vec()).ok()?,
            admitted: u32::from_le_bytes(*admitted),
            refused: u32::from_le_bytes(*refused),
        });
        rest = tail;
    }
    Some((pending, rest))
}

/// A message on the usage queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageMessage {
    /// The record in this limiter slot went from no pending usage to some.
    Slot(u32),
    /// Usage of one customer that no limiter record holds: the pending
    /// usage of an evicted record, or a request decided without its record
    /// because shared data failed.
    Detached {
        /// Customer the usage belongs to.
        customer: String,
        /// The usage, in minute buckets.
        pending: Vec<PendingUsage>,
    },
    /// Response body bytes of admitted requests, taken from one worker's
    /// [`EgressMeter`].
    Egress(Vec<EgressUsage>),
}

impl UsageMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Slot(slot) => {
                let mut out = vec![MESSAGE_SLOT];
                out.extend_from_slice(&slot.to_le_bytes());
                out
            }
            Self::Detached { customer, pending } => {
                let mut out = vec![MESSAGE_EVICTED];
                let customer = customer.as_bytes();
                let len = customer.len().min(usize::from(u8::MAX));
                out.push(len as u8);
                out.extend_from_slice(&customer[..len]);
                encode_pending(&mut out, pending);
                out
            }
            Self::Egress(entries) => {
                let mut out = vec![MESSAGE_EGRESS];
                egress::encode_entries(&mut out, entries);
                out
            }
        }
    }

    /// Decodes a message; `None` for bytes in another format.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&kind, rest) = bytes.split_first()?;
        match kind {
            MESSAGE_SLOT => {
                let slot = rest.first_chunk::<4>()?;
                Some(Self::Slot(u32::from_le_bytes(*slot)))
            }
            MESSAGE_EVICTED => {
                let (&len, rest) = rest.split_first()?;
                let (customer, rest) = rest.split_at_checked(usize::from(len))?;
                let (pending, _) = decode_pending(rest)?;
                Some(Self::Detached {
                    customer: String::from_utf8(customer.to_vec()).ok()?,
                    pending,
                })
            }
            MESSAGE_EGRESS => egress::decode_entries(rest).map(Self::Egress),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_fill_minute_buckets_per_tier() {
        let mut pending = Vec::new();
        count_request(&mut pending, 60_000, "basic", true);
        count_request(&mut pending, 119_999, "basic", false);
        count_request(&mut pending, 120_000, "basic", true);
        count_request(&mut pending, 120_001, "pro", true);

        assert_eq!(pending.len(), 3);
        assert_eq!(
            (pending[0].minute, pending[0].admitted, pending[0].refused),
            (1, 1, 1)
        );
        assert_eq!((pending[1].minute, pending[1].tier.as_str()), (2, "basic"));
        assert_eq!((pending[2].minute, pending[2].tier.as_str()), (2, "pro"));
        assert_eq!(pending[1].minute_unix_s(), 120);
    }

    #[test]
    fn bucket_overflow_merges_oldest_and_keeps_counts() {
        let mut pending = Vec::new();
        let minutes = MAX_PENDING_BUCKETS as u64 + 5;
        for minute in 0..minutes {
            count_request(&mut pending, minute * 60_000, "basic", true);
        }
        assert_eq!(pending.len(), MAX_PENDING_BUCKETS);
        let total: u32 = pending.iter().map(|bucket| bucket.admitted).sum();
        assert_eq!(u64::from(total), minutes);
    }

    #[test]
    fn messages_round_trip() {
        let evicted = UsageMessage::Detached {
            customer: "acme".to_owned(),
            pending: vec![PendingUsage {
                minute: 28_000_000,
                tier: "pro".to_owned(),
                admitted: 7,
                refused: 2,
            }],
        };
        let egress = UsageMessage::Egress(vec![
            EgressUsage {
                customer: "acme".to_owned(),
                tier: "pro".to_owned(),
                minute: 28_000_000,
                bytes: u64::MAX,
            },
            EgressUsage {
                customer: "zeta".to_owned(),
                tier: "basic".to_owned(),
                minute: 28_000_001,
                bytes: 1,
            },
        ]);
        for message in [UsageMessage::Slot(4242), evicted, egress] {
            assert_eq!(UsageMessage::decode(&message.encode()), Some(message));
        }
        assert_eq!(UsageMessage::decode(&[9, 1, 2]), None);
        assert_eq!(UsageMessage::decode(&[MESSAGE_SLOT, 1]), None);
        assert_eq!(UsageMessage::decode(&[MESSAGE_EGRESS, 1, 0, 0, 0]), None);
    }
}
