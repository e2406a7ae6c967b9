//! Response body bytes of admitted requests. A response ends after the
//! limiter wrote the request's record, and its bytes do not go into the
//! record, because that would cost another read and compare-and-swap per
//! request.
//! Each worker sums them in memory per customer, tier and minute, and its
//! timer puts the sums on the usage queue, where the sync role adds them to
//! the same usage records as the request counts.

use std::cell::RefCell;
use std::collections::HashMap;

use super::UsageMessage;
use crate::config::Tiers;

/// Maximum entries in one queue message. With customer ids of at most 128
/// bytes and tier names of at most 32, an entry takes at most 174 bytes, so
/// a message stays under 180 KB.
pub const MAX_ENTRIES_PER_MESSAGE: usize = 1_000;

/// Response body bytes of one customer's admitted requests in one minute
/// under one tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressUsage {
    /// Customer id.
    pub customer: String,
    /// Tier the requests were decided under.
    pub tier: String,
    /// Start of the minute of the requests, in minutes since the Unix
    /// epoch.
    pub minute: u32,
    /// Response body bytes.
    pub bytes: u64,
}

/// Bytes of one tier and minute, with the tier as its index in the tier
/// table, so that counting copies no tier name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    tier: usize,
    minute: u32,
    bytes: u64,
}

/// Response body bytes one worker counted and has not yet put on the
/// usage queue.
#[derive(Debug, Default)]
pub struct EgressMeter {
    by_customer: RefCell<HashMap<String, Vec<Bucket>>>,
}

impl EgressMeter {
    /// Creates an empty meter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` to the sum of `customer` in `minute` under the tier at
    /// index `tier`, saturating at `u64::MAX`.
    pub fn add(&self, customer: &str, tier: usize, minute: u32, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut by_customer = self.by_customer.borrow_mut();
        let buckets = match by_customer.get_mut(customer) {
            Some(buckets) => buckets,
            None => by_customer.entry(customer.to_owned()).or_default(),
        };
        match buckets
            .iter_mut()
            .find(|bucket| bucket.tier == tier && bucket.minute == minute)
        {
            Some(bucket) => bucket.bytes = bucket.bytes.saturating_add(bytes),
            None => buckets.push(Bucket {
                tier,
                minute,
                bytes,
            }),
        }
    }

    /// Returns whether no bytes are waiting.
    pub fn is_empty(&self) -> bool {
        self.by_customer.borrow().is_empty()
    }

    /// Takes every sum as queue messages of at most
    /// [`MAX_ENTRIES_PER_MESSAGE`] entries each. `tiers` names the tier
    /// indices.
    pub fn take_messages(&self, tiers: &Tiers) -> Vec<UsageMessage> {
        let by_customer = std::mem::take(&mut *self.by_customer.borrow_mut());
        let entries: Vec<EgressUsage> = by_customer
            .into_iter()
            .flat_map(|(customer, buckets)| {
                buckets.into_iter().map(move |bucket| EgressUsage {
                    customer: customer.clone(),
                    tier: tiers.get(bucket.tier).name.clone(),
                    minute: bucket.minute,
                    bytes: bucket.bytes,
                })
            })
            .collect();
        entries
            .chunks(MAX_ENTRIES_PER_MESSAGE)
            .map(|chunk| UsageMessage::Egress(chunk.to_vec()))
            .collect()
    }
}

/// Appends the encoding of `entries` to `out`: the count (4 bytes,
/// little-endian), then per entry the customer and the tier (each a length
/// byte and the bytes, cut to 255), the minute (4) and the bytes (8).
pub(super) fn encode_entries(out: &mut Vec<u8>, entries: &[EgressUsage]) {
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for entry in entries.iter().take(count as usize) {
        push_short(out, &entry.customer);
        push_short(out, &entry.tier);
        out.extend_from_slice(&entry.minute.to_le_bytes());
        out.extend_from_slice(&entry.bytes.to_le_bytes());
    }
}

/// Decodes what [`encode_entries`] wrote; `None` for bytes in another
/// format.
pub(super) fn decode_entries(bytes: &[u8]) -> Option<Vec<EgressUsage>> {
    let (count, mut rest) = bytes.split_first_chunk::<4>()?;
    let count = u32::from_le_bytes(*count) as usize;
    // Each entry takes at least 14 bytes, so a count the bytes cannot hold
    // is rejected before it sizes an allocation.
    if count > rest.len() / 14 {
        return None;
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (customer, tail) = take_short(rest)?;
        let (tier, tail) = take_short(tail)?;
        let (minute, tail) = tail.split_first_chunk::<4>()?;
        let (sent, tail) = tail.split_first_chunk::<8>()?;
        entries.push(EgressUsage {
            customer,
            tier,
            minute: u32::from_le_bytes(*minute),
            bytes: u64::from_le_bytes(*sent),
        });
        rest = tail;
    }
    Some(entries)
}

fn push_short(out: &mut Vec<u8>, text: &str) {
    let bytes = text.as_bytes();
    let len = bytes.len().min(usize::from(u8::MAX));
    out.push(len as u8);
    out.extend_from_slice(&bytes[..len]);
}

fn take_short(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let (text, rest) = rest.split_at_checked(usize::from(len))?;
    Some((String::from_utf8(text.to_vec()).ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tier::{build_tiers, default_raw_tiers};

    fn tiers() -> Tiers {
        build_tiers(&default_raw_tiers(), "basic").unwrap()
    }

    fn entries(messages: &[UsageMessage]) -> Vec<EgressUsage> {
        let mut entries: Vec<EgressUsage> = messages
            .iter()
            .flat_map(|message| match message {
                UsageMessage::Egress(entries) => entries.clone(),
                other => panic!("unexpected message {other:?}"),
            })
            .collect();
        entries.sort_by(|a, b| {
            (&a.customer, &a.tier, a.minute).cmp(&(&b.customer, &b.tier, b.minute))
        });
        entries
    }

    #[test]
    fn meter_sums_per_customer_tier_and_minute() {
        let tiers = tiers();
        let pro = tiers.find("pro").unwrap();
        let basic = tiers.find("basic").unwrap();
        let meter = EgressMeter::new();
        meter.add("acme", pro, 7, 100);
        meter.add("acme", pro, 7, 250);
        meter.add("acme", pro, 8, 1);
        meter.add("acme", basic, 7, 2);
        meter.add("zeta", pro, 7, 30);
        meter.add("zeta", pro, 7, 0);

        let queued = entries(&meter.take_messages(&tiers));
        let sums: Vec<(&str, &str, u32, u64)> = queued
            .iter()
            .map(|entry| {
                (
                    entry.customer.as_str(),
                    entry.tier.as_str(),
                    entry.minute,
                    entry.bytes,
                )
            })
            .collect();
        assert_eq!(
            sums,
            [
                ("acme", "basic", 7, 2),
                ("acme", "pro", 7, 350),
                ("acme", "pro", 8, 1),
                ("zeta", "pro", 7, 30),
            ]
        );
        assert!(meter.is_empty());
        assert!(meter.take_messages(&tiers).is_empty());
    }

    #[test]
    fn meter_saturates_instead_of_wrapping() {
        let tiers = tiers();
        let meter = EgressMeter::new();
        meter.add("acme", 0, 7, u64::MAX - 1);
        meter.add("acme", 0, 7, 5);
        assert_eq!(entries(&meter.take_messages(&tiers))[0].bytes, u64::MAX);
    }

    #[test]
    fn many_customers_split_into_bounded_messages() {
        let tiers = tiers();
        let meter = EgressMeter::new();
        let customers = MAX_ENTRIES_PER_MESSAGE + 1;
        for index in 0..customers {
            meter.add(&format!("customer-{index}"), 0, 7, 1);
        }
        let messages = meter.take_messages(&tiers);
        assert_eq!(messages.len(), 2);
        assert_eq!(entries(&messages).len(), customers);
        for message in &messages {
            assert_eq!(
                UsageMessage::decode(&message.encode()).as_ref(),
                Some(message)
            );
        }
    }

    #[test]
    fn huge_count_does_not_decode() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0; 14]);
        assert_eq!(decode_entries(&bytes), None);
    }
}
