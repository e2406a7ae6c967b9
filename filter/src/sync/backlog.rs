//! A bound on the usage collected for the next batches.
//!
//! While the sidecar is unreachable, usage collects in one record per
//! customer, tier and minute, so a long outage with many customers would
//! grow the VM's memory without end. Once the records exceed the bound, the
//! records of earlier hours are merged into one record per hour, dated at
//! the hour's first minute. If that is not enough, the records of earlier
//! days are merged into one per day. The counts are kept whole; only the
//! minute they are billed under moves back. Only when the merged records
//! still exceed the bound are the oldest dropped, so that the VM cannot run
//! out of memory.

use std::collections::BTreeMap;

use super::batch::{UsageKey, UsageTotals};

/// Minutes in an hour and in a day, the spans records are merged into.
const MERGE_SPANS: [u32; 2] = [60, 24 * 60];

/// The changes [`bound`] made to the collected usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounded {
    /// Records merged into the record of their hour or day.
    pub merged_records: usize,
    /// Records dropped because merging was not enough.
    pub dropped_records: usize,
    /// Admitted requests in the dropped records.
    pub dropped_admitted: u64,
    /// Span of the widest merge, in minutes; 0 when nothing was merged.
    pub merge_span_minutes: u32,
}

/// Keeps `collected` at `max_records` records or fewer; `now_minute` is
/// the current minute since the Unix epoch. Returns `None` when
/// `collected` was within the bound.
pub fn bound(
    collected: &mut BTreeMap<UsageKey, UsageTotals>,
    now_minute: u32,
    max_records: usize,
) -> Option<Bounded> {
    if collected.len() <= max_records {
        return None;
    }
    let mut outcome = Bounded::default();
    for span in MERGE_SPANS {
        let before = collected.len();
        merge_before(collected, now_minute - now_minute % span, span);
        if collected.len() < before {
            outcome.merged_records += before - collected.len();
            outcome.merge_span_minutes = span;
        }
        if collected.len() <= max_records {
            return Some(outcome);
        }
    }
    let mut by_age: Vec<(u32, UsageKey)> = collected
        .keys()
        .map(|key| (key.minute, key.clone()))
        .collect();
    by_age.sort_unstable();
    let excess = collected.len() - max_records;
    for (_, key) in by_age.into_iter().take(excess) {
        if let Some(totals) = collected.remove(&key) {
            outcome.dropped_records += 1;
            outcome.dropped_admitted = outcome.dropped_admitted.saturating_add(totals.admitted);
        }
    }
    Some(outcome)
}

/// Merges every record dated before `start` into the record of the first
/// minute of its `span`.
fn merge_before(collected: &mut BTreeMap<UsageKey, UsageTotals>, start: u32, span: u32) {
    for (mut key, totals) in std::mem::take(collected) {
        if key.minute < start {
            key.minute -= key.minute % span;
        }
        let merged = collected.entry(key).or_default();
        merged.admitted = merged.admitted.saturating_add(totals.admitted);
        merged.refused = merged.refused.saturating_add(totals.refused);
        merged.egress_bytes = merged.egress_bytes.saturating_add(totals.egress_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minute at the start of a day, so spans line up with the tests'
    /// arithmetic.
    const DAY_START: u32 = 29_000_000 / 1440 * 1440;

    fn key(customer: &str, minute: u32) -> UsageKey {
        UsageKey {
            customer: customer.to_owned(),
            tier: "basic".to_owned(),
            minute,
        }
    }

    fn totals(admitted: u64) -> UsageTotals {
        UsageTotals {
            admitted,
            refused: 1,
            egress_bytes: 10 * admitted,
        }
    }

    fn sums(collected: &BTreeMap<UsageKey, UsageTotals>) -> (u64, u64, u64) {
        collected.values().fold((0, 0, 0), |sum, totals| {
            (
                sum.0 + totals.admitted,
                sum.1 + totals.refused,
                sum.2 + totals.egress_bytes,
            )
        })
    }

    /// One record per customer and minute over `minutes` minutes before
    /// `now`, each with `minute % 7 + 1` admitted requests.
    fn outage(customers: u32, minutes: u32, now: u32) -> BTreeMap<UsageKey, UsageTotals> {
        (0..customers)
            .flat_map(|customer| {
                (now - minutes..=now).map(move |minute| {
                    (
                        key(&format!("c{customer}"), minute),
                        totals(u64::from(minute % 7 + 1)),
                    )
                })
            })
            .collect()
    }

    #[test]
    fn within_the_bound_nothing_changes() {
        let mut collected = outage(3, 10, DAY_START + 100);
        let before = collected.clone();
        assert_eq!(bound(&mut collected, DAY_START + 100, 33), None);
        assert_eq!(collected, before);
    }

    #[test]
    fn earlier_hours_merge_and_every_count_is_kept() {
        let now = DAY_START + 5 * 60 + 30;
        let mut collected = outage(10, 5 * 60 + 30, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 1_000).unwrap();

        // Per customer: 5 whole hours as 5 records, the current hour's 31
        // minutes unchanged.
        assert_eq!(collected.len(), 10 * (5 + 31));
        assert_eq!(sums(&collected), before);
        assert_eq!(outcome.merge_span_minutes, 60);
        assert_eq!(outcome.merged_records, 10 * (5 * 60 + 31) - 10 * (5 + 31));
        assert_eq!((outcome.dropped_records, outcome.dropped_admitted), (0, 0));
        let first_hour = &collected[&key("c0", DAY_START)];
        let expected: u64 = (DAY_START..DAY_START + 60)
            .map(|minute| u64::from(minute % 7 + 1))
            .sum();
        assert_eq!(first_hour.admitted, expected);
        assert_eq!(first_hour.refused, 60);
        assert!(collected.contains_key(&key("c0", now - 30)));
        assert!(!collected.contains_key(&key("c0", DAY_START + 1)));
    }

    #[test]
    fn earlier_days_merge_when_hours_are_not_enough() {
        let now = DAY_START + 2 * 1440 + 90;
        let mut collected = outage(20, 2 * 1440 + 90, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 20 * 40).unwrap();

        // Per customer: 2 earlier days, 1 earlier hour today and the 31
        // minutes of the current hour.
        assert_eq!(collected.len(), 20 * (2 + 1 + 31));
        assert_eq!(sums(&collected), before);
        assert_eq!(outcome.merge_span_minutes, 1440);
        assert_eq!(outcome.dropped_records, 0);
        assert!(collected.contains_key(&key("c7", DAY_START + 1440)));
        assert!(collected.contains_key(&key("c7", DAY_START + 2 * 1440)));
    }

    #[test]
    fn records_beyond_what_merging_reaches_drop_oldest_first() {
        let now = DAY_START + 1440 + 10;
        let mut collected = outage(50, 20, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 100).unwrap();

        assert_eq!(collected.len(), 100);
        let after = sums(&collected);
        assert_eq!(before.0 - after.0, outcome.dropped_admitted);
        // The day before merges into one record per customer, which
        // leaves 12 records per customer, 600 in all: the 500 oldest go.
        assert_eq!(outcome.dropped_records, 500);
        let oldest_kept = collected.keys().map(|key| key.minute).min().unwrap();
        assert!(oldest_kept >= now - 1, "{oldest_kept}");
    }

    #[test]
    fn merged_records_add_to_a_record_already_at_the_hour_start() {
        let now = DAY_START + 120;
        let mut collected = BTreeMap::from([
            (key("a", DAY_START), totals(4)),
            (key("a", DAY_START + 3), totals(5)),
            (key("a", DAY_START + 59), totals(6)),
            (key("a", now), totals(7)),
        ]);
        let outcome = bound(&mut collected, now, 2).unwrap();
        assert_eq!(outcome.merged_records, 2);
        assert_eq!(collected[&key("a", DAY_START)].admitted, 15);
        assert_eq!(collected[&key("a", DAY_START)].egress_bytes, 150);
        assert_eq!(collected[&key("a", now)].admitted, 7);
    }
}
