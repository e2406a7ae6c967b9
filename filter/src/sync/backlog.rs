//! A bound on the usage collected for the next batches.
//!
//! While the sidecar is unreachable, usage collects in one record per
//! customer, tier and minute, so a long outage with many customers would
//! grow the VM's memory without end. Once the records exceed the bound,
//! they are merged until they fit within nine tenths of it, so the next
//! merge waits until the records have grown again:
//!
//! 1. records older than an hour into one record per hour;
//! 2. records older than a day into one record per day;
//! 3. records older than ten minutes into one record per ten minutes.
//!
//! A merged record is dated at the first minute of its hour, day or ten
//! minutes. The counts are kept whole; only the minute they are billed
//! under moves back, at most to the start of its UTC day. Records of the
//! last hour are merged only in the last step, because the shared quota
//! counts them in windows of up to an hour. Only when the merged records
//! still exceed the bound are the oldest dropped, so that the VM cannot run
//! out of memory.
//!
//! NOTE: a record moved back across the start of a Stripe billing period
//! is billed in the period before, which may be invoiced already.

use std::collections::BTreeMap;

use veo_proto::sync_limits::{MAX_EGRESS_BYTES_PER_RECORD, MAX_REQUESTS_PER_RECORD};

use super::batch::{UsageKey, UsageTotals};

/// The merges in order: records older than the first value, in minutes,
/// merge into one record per span of the second value, in minutes.
const MERGES: [(u32, u32); 3] = [(60, 60), (24 * 60, 24 * 60), (10, 10)];

/// The changes [`bound`] made to the collected usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounded {
    /// Records folded into another record of their hour, day or ten
    /// minutes, and so removed.
    pub merged_records: usize,
    /// Span of the widest merge that folded records, in minutes; 0 when
    /// none did.
    pub merge_span_minutes: u32,
    /// Records dropped because merging was not enough.
    pub dropped_records: usize,
    /// Admitted requests in the dropped records.
    pub dropped_admitted: u64,
    /// Refused requests in the dropped records.
    pub dropped_refused: u64,
    /// Response body bytes in the dropped records.
    pub dropped_egress_bytes: u64,
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
    // Nine tenths, so that the next merge waits until the records grow.
    let target = max_records - max_records / 10;
    let mut outcome = Bounded::default();
    for (age, span) in MERGES {
        let before = collected.len();
        merge_older_than(collected, now_minute.saturating_sub(age), span);
        if collected.len() < before {
            outcome.merged_records += before - collected.len();
            outcome.merge_span_minutes = outcome.merge_span_minutes.max(span);
        }
        if collected.len() <= target {
            return Some(outcome);
        }
    }
    drop_oldest(collected, target, &mut outcome);
    Some(outcome)
}

/// Merges every record dated before `cutoff` into the record of the first
/// minute of its `span`, unless the merged counts would exceed what one
/// record may carry.
fn merge_older_than(collected: &mut BTreeMap<UsageKey, UsageTotals>, cutoff: u32, span: u32) {
    for (key, totals) in std::mem::take(collected) {
        if key.minute >= cutoff {
            add(collected, key, totals);
            continue;
        }
        let merged_key = UsageKey {
            minute: key.minute - key.minute % span,
            ..key.clone()
        };
        match collected.get(&merged_key) {
            Some(merged) if !fits(merged, &totals) => add(collected, key, totals),
            _ => add(collected, merged_key, totals),
        }
    }
}

/// Returns whether `a` and `b` together fit in one record the sidecar
/// accepts.
fn fits(a: &UsageTotals, b: &UsageTotals) -> bool {
    a.admitted.saturating_add(b.admitted) <= MAX_REQUESTS_PER_RECORD
        && a.refused.saturating_add(b.refused) <= MAX_REQUESTS_PER_RECORD
        && a.egress_bytes.saturating_add(b.egress_bytes) <= MAX_EGRESS_BYTES_PER_RECORD
}

/// Adds `totals` to the record of `key`.
fn add(collected: &mut BTreeMap<UsageKey, UsageTotals>, key: UsageKey, totals: UsageTotals) {
    let merged = collected.entry(key).or_default();
    merged.admitted = merged.admitted.saturating_add(totals.admitted);
    merged.refused = merged.refused.saturating_add(totals.refused);
    merged.egress_bytes = merged.egress_bytes.saturating_add(totals.egress_bytes);
}

/// Drops whole minutes, oldest first, until at most `target` records are
/// left, and adds what went to `outcome`.
fn drop_oldest(
    collected: &mut BTreeMap<UsageKey, UsageTotals>,
    target: usize,
    outcome: &mut Bounded,
) {
    let mut per_minute: BTreeMap<u32, usize> = BTreeMap::new();
    for key in collected.keys() {
        *per_minute.entry(key.minute).or_default() += 1;
    }
    let mut excess = collected.len().saturating_sub(target);
    let mut cutoff = 0;
    for (minute, records) in per_minute {
        if excess == 0 {
            break;
        }
        cutoff = minute + 1;
        excess = excess.saturating_sub(records);
    }
    collected.retain(|key, totals| {
        if key.minute >= cutoff {
            return true;
        }
        outcome.dropped_records += 1;
        outcome.dropped_admitted = outcome.dropped_admitted.saturating_add(totals.admitted);
        outcome.dropped_refused = outcome.dropped_refused.saturating_add(totals.refused);
        outcome.dropped_egress_bytes = outcome
            .dropped_egress_bytes
            .saturating_add(totals.egress_bytes);
        false
    });
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

    /// Builds one record per customer and minute over `minutes` minutes
    /// before `now`, each with `minute % 7 + 1` admitted requests.
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
    fn records_older_than_an_hour_merge() {
        let now = DAY_START + 5 * 60 + 30;
        let mut collected = outage(10, 5 * 60 + 30, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 1_000).unwrap();

        // Per customer: hours 0 to 3, hour 4 up to an hour ago, and the
        // 61 minutes of the last hour unchanged.
        assert_eq!(collected.len(), 10 * (4 + 1 + 61));
        assert_eq!(sums(&collected), before);
        assert_eq!(outcome.merge_span_minutes, 60);
        assert_eq!(outcome.merged_records, 10 * (5 * 60 + 31) - 10 * 66);
        assert_eq!(outcome.dropped_records, 0);
        let first_hour = &collected[&key("c0", DAY_START)];
        let expected: u64 = (DAY_START..DAY_START + 60)
            .map(|minute| u64::from(minute % 7 + 1))
            .sum();
        assert_eq!(first_hour.admitted, expected);
        assert_eq!(first_hour.refused, 60);
        assert!(collected.contains_key(&key("c0", now - 60)));
        assert!(!collected.contains_key(&key("c0", DAY_START + 1)));
    }

    #[test]
    fn records_older_than_a_day_merge() {
        let now = DAY_START + 2 * 1440 + 90;
        let mut collected = outage(20, 2 * 1440 + 90, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 2_000).unwrap();

        // Per customer: day 0, the first two hours of day 1 (older than a
        // day), its other 22 hours, the first hour of day 2 up to an hour
        // ago, and the 61 minutes of the last hour.
        assert_eq!(collected.len(), 20 * (1 + 1 + 22 + 1 + 61));
        assert_eq!(sums(&collected), before);
        assert_eq!(outcome.merge_span_minutes, 1440);
        assert_eq!(outcome.dropped_records, 0);
        assert!(collected.contains_key(&key("c7", DAY_START)));
        assert!(collected.contains_key(&key("c7", DAY_START + 1440)));
        assert!(collected.contains_key(&key("c7", DAY_START + 1440 + 120)));
    }

    #[test]
    fn last_hour_merges_in_ten_minutes() {
        let now = DAY_START + 100;
        let mut collected = outage(10, 59, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 300).unwrap();

        // Per customer: the minutes 41 to 89 in five ten-minute records,
        // and the 11 minutes of the last ten unchanged.
        assert_eq!(collected.len(), 10 * (5 + 11));
        assert_eq!(sums(&collected), before);
        assert_eq!(outcome.merge_span_minutes, 10);
        assert!(collected.contains_key(&key("c3", DAY_START + 40)));
        assert!(collected.contains_key(&key("c3", now - 10)));
    }

    #[test]
    fn records_beyond_merging_drop_oldest_first() {
        let now = DAY_START + 1440 + 10;
        let mut collected = outage(50, 20, now);
        let before = sums(&collected);
        let outcome = bound(&mut collected, now, 100).unwrap();

        // The ten minutes of the day before merge into one record per
        // customer, which leaves 12 per customer. Whole minutes go, oldest
        // first, until at most 90 records are left: 50, the current minute.
        assert_eq!(collected.len(), 50);
        assert_eq!(outcome.dropped_records, 550);
        assert!(collected.keys().all(|key| key.minute == now));
        let after = sums(&collected);
        assert_eq!(outcome.dropped_admitted, before.0 - after.0);
        assert_eq!(outcome.dropped_refused, before.1 - after.1);
        assert_eq!(outcome.dropped_egress_bytes, before.2 - after.2);
    }

    #[test]
    fn merges_add_to_hour_start_record() {
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

    #[test]
    fn merge_never_exceeds_one_record_limit() {
        let now = DAY_START + 120;
        let nearly_full = UsageTotals {
            admitted: MAX_REQUESTS_PER_RECORD - 5,
            refused: 0,
            egress_bytes: 0,
        };
        let mut collected = BTreeMap::from([
            (key("a", DAY_START), nearly_full),
            (key("a", DAY_START + 1), totals(10)),
            (key("a", DAY_START + 2), totals(1)),
            (key("a", now), totals(7)),
        ]);
        let outcome = bound(&mut collected, now, 3).unwrap();

        assert_eq!(outcome.merged_records, 1);
        assert_eq!(
            collected[&key("a", DAY_START)].admitted,
            MAX_REQUESTS_PER_RECORD - 4
        );
        assert_eq!(collected[&key("a", DAY_START + 1)].admitted, 10);
        assert!(
            collected
                .values()
                .all(|totals| fits(totals, &UsageTotals::default()))
        );
    }
}
