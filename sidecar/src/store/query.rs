//! Usage queries: one customer's buckets, and the top customers of a range.

use rusqlite::{Connection, params};

use crate::ledger::{BucketTotal, CustomerTotal, Granularity, TimeRange};

// Stored minutes are never negative, so integer division rounds down and
// `(minute / width) * width` is the start of the UTC-aligned bucket.
//
// TOTAL sums as a float where SUM would fail on a sum beyond 2^63 - 1, which
// forged usage batches could reach. Sums of integers stay exact up to 2^53.
const USAGE_BUCKETS: &str = "
SELECT (minute_unix_s / ?4) * ?4 AS bucket, TOTAL(admitted), TOTAL(refused), TOTAL(egress_bytes)
FROM usage_minute
WHERE customer = ?1 AND minute_unix_s >= ?2 AND minute_unix_s < ?3
GROUP BY bucket
HAVING TOTAL(admitted) + TOTAL(refused) + TOTAL(egress_bytes) > 0
ORDER BY bucket";

const TOP_CUSTOMERS: &str = "
SELECT customer, TOTAL(admitted) AS admitted, TOTAL(refused), TOTAL(egress_bytes)
FROM usage_minute
WHERE minute_unix_s >= ?1 AND minute_unix_s < ?2
GROUP BY customer
HAVING TOTAL(admitted) + TOTAL(refused) + TOTAL(egress_bytes) > 0
ORDER BY admitted DESC, customer ASC
LIMIT ?3";

/// Reads column `index` of a TOTAL as a count, saturating at `u64::MAX`.
fn count(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let total: f64 = row.get(index)?;
    // `as` saturates, and the stored counts are never negative.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(total as u64)
}

/// Returns `customer`'s non-empty buckets of `granularity` whose minutes
/// start within `range`, in ascending order of start.
pub(super) fn usage_buckets(
    conn: &Connection,
    customer: &str,
    range: TimeRange,
    granularity: Granularity,
) -> rusqlite::Result<Vec<BucketTotal>> {
    let mut statement = conn.prepare_cached(USAGE_BUCKETS)?;
    let rows = statement.query_map(
        params![
            customer,
            range.start_unix_s,
            range.end_unix_s,
            granularity.seconds()
        ],
        |row| {
            Ok(BucketTotal {
                start_unix_s: row.get(0)?,
                admitted: count(row, 1)?,
                refused: count(row, 2)?,
                egress_bytes: count(row, 3)?,
            })
        },
    )?;
    rows.collect()
}

/// Returns up to `limit` customers with usage whose minutes start within
/// `range`, in descending order of admitted requests, ties by customer.
pub(super) fn top_customers(
    conn: &Connection,
    range: TimeRange,
    limit: u32,
) -> rusqlite::Result<Vec<CustomerTotal>> {
    let mut statement = conn.prepare_cached(TOP_CUSTOMERS)?;
    let rows = statement.query_map(
        params![range.start_unix_s, range.end_unix_s, limit],
        |row| {
            Ok(CustomerTotal {
                customer: row.get(0)?,
                admitted: count(row, 1)?,
                refused: count(row, 2)?,
                egress_bytes: count(row, 3)?,
            })
        },
    )?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Batch, UsageEntry};
    use crate::store::{apply::apply_batch, schema};

    const DAY: i64 = 86_400;
    /// 2024-03-10T00:00:00Z, a midnight in UTC.
    const MIDNIGHT: i64 = 1_710_028_800;

    /// Stores `(customer, minute, admitted, refused)` records without bytes.
    fn ledger(records: &[(&str, i64, i64, i64)]) -> (tempfile::TempDir, Connection) {
        let with_bytes: Vec<_> = records
            .iter()
            .map(|&(customer, minute, admitted, refused)| (customer, minute, admitted, refused, 0))
            .collect();
        ledger_with_bytes(&with_bytes)
    }

    /// Stores `(customer, minute, admitted, refused, egress bytes)` records.
    fn ledger_with_bytes(
        records: &[(&str, i64, i64, i64, i64)],
    ) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_writer(&dir.path().join("db")).unwrap();
        let records = records
            .iter()
            .map(
                |&(customer, minute_unix_s, admitted, refused, egress_bytes)| UsageEntry {
                    customer: customer.into(),
                    tier: "pro".into(),
                    minute_unix_s,
                    admitted,
                    refused,
                    egress_bytes,
                    quota: None,
                },
            )
            .collect();
        let batch = Batch {
            instance_id: "a".into(),
            sequence: 1,
            records,
        };
        apply_batch(&mut conn, &batch, 0, None, None).unwrap();
        (dir, conn)
    }

    #[test]
    fn bytes_alone_make_a_bucket() {
        // A minute can hold response bytes without requests: the filter
        // counts bytes in the request's minute even after its requests
        // merged into a later one.
        let dir = tempfile::tempdir().unwrap();
        let mut conn = schema::open_writer(&dir.path().join("db")).unwrap();
        let batch = Batch {
            instance_id: "a".into(),
            sequence: 1,
            records: vec![UsageEntry {
                customer: "c1".into(),
                tier: "pro".into(),
                minute_unix_s: MIDNIGHT,
                admitted: 0,
                refused: 0,
                egress_bytes: 512,
                quota: None,
            }],
        };
        apply_batch(&mut conn, &batch, 0, None, None).unwrap();
        let whole = range(MIDNIGHT, MIDNIGHT + 60);

        let buckets = usage_buckets(&conn, "c1", whole, Granularity::Minute).unwrap();
        assert_eq!(buckets.len(), 1);
        assert_eq!(buckets[0].egress_bytes, 512);
        let top = top_customers(&conn, whole, 10).unwrap();
        assert_eq!(top.len(), 1);
        assert_eq!(top[0].egress_bytes, 512);
    }

    #[test]
    fn sums_beyond_i64_do_not_fail() {
        let half = i64::MAX / 2;
        let (_dir, conn) = ledger_with_bytes(&[
            ("c1", MIDNIGHT, 1, 0, half),
            ("c1", MIDNIGHT + 60, 1, 0, half),
            ("c1", MIDNIGHT + 120, 1, 0, half),
        ]);
        let whole = range(MIDNIGHT, MIDNIGHT + DAY);

        let days = usage_buckets(&conn, "c1", whole, Granularity::Day).unwrap();
        let top = top_customers(&conn, whole, 10).unwrap();

        assert_eq!(days[0].admitted, 3);
        assert!(days[0].egress_bytes > u64::try_from(i64::MAX).unwrap());
        assert_eq!(top[0].admitted, 3);
        assert_eq!(top[0].egress_bytes, days[0].egress_bytes);
    }

    fn range(start_unix_s: i64, end_unix_s: i64) -> TimeRange {
        TimeRange {
            start_unix_s,
            end_unix_s,
        }
    }

    fn bucket(start_unix_s: i64, admitted: u64, refused: u64) -> BucketTotal {
        BucketTotal {
            start_unix_s,
            admitted,
            refused,
            egress_bytes: 0,
        }
    }

    fn sample() -> (tempfile::TempDir, Connection) {
        ledger(&[
            ("c1", MIDNIGHT, 1, 0),
            ("c1", MIDNIGHT + 60, 2, 1),
            ("c1", MIDNIGHT + 3_600, 4, 0),
            ("c1", MIDNIGHT + 3_660, 8, 2),
            ("c1", MIDNIGHT + DAY + 120, 16, 0),
            ("c2", MIDNIGHT + 60, 100, 0),
        ])
    }

    #[test]
    fn minute_buckets_are_ascending_and_skip_empty() {
        let (_dir, conn) = sample();

        let buckets = usage_buckets(
            &conn,
            "c1",
            range(MIDNIGHT, MIDNIGHT + 2 * DAY),
            Granularity::Minute,
        )
        .unwrap();

        let expected = vec![
            bucket(MIDNIGHT, 1, 0),
            bucket(MIDNIGHT + 60, 2, 1),
            bucket(MIDNIGHT + 3_600, 4, 0),
            bucket(MIDNIGHT + 3_660, 8, 2),
            bucket(MIDNIGHT + DAY + 120, 16, 0),
        ];
        assert_eq!(buckets, expected);
    }

    #[test]
    fn hour_buckets_sum_their_minutes() {
        let (_dir, conn) = sample();

        let buckets = usage_buckets(
            &conn,
            "c1",
            range(MIDNIGHT, MIDNIGHT + 2 * DAY),
            Granularity::Hour,
        )
        .unwrap();

        let expected = vec![
            bucket(MIDNIGHT, 3, 1),
            bucket(MIDNIGHT + 3_600, 12, 2),
            bucket(MIDNIGHT + DAY, 16, 0),
        ];
        assert_eq!(buckets, expected);
    }

    #[test]
    fn day_buckets_start_at_utc_midnight() {
        let (_dir, conn) = sample();

        let buckets = usage_buckets(
            &conn,
            "c1",
            range(MIDNIGHT - DAY, MIDNIGHT + 2 * DAY),
            Granularity::Day,
        )
        .unwrap();

        assert_eq!(
            buckets,
            vec![bucket(MIDNIGHT, 15, 3), bucket(MIDNIGHT + DAY, 16, 0)]
        );
    }

    #[test]
    fn range_end_is_exclusive() {
        let (_dir, conn) = sample();

        let buckets = usage_buckets(
            &conn,
            "c1",
            range(MIDNIGHT + 60, MIDNIGHT + 3_660),
            Granularity::Hour,
        )
        .unwrap();

        assert_eq!(
            buckets,
            vec![bucket(MIDNIGHT, 2, 1), bucket(MIDNIGHT + 3_600, 4, 0)]
        );
    }

    #[test]
    fn unknown_customer_has_no_buckets() {
        let (_dir, conn) = sample();

        let buckets =
            usage_buckets(&conn, "nobody", range(0, MIDNIGHT * 2), Granularity::Day).unwrap();

        assert!(buckets.is_empty());
    }

    #[test]
    fn top_customers_descend_by_admitted() {
        let (_dir, conn) = ledger(&[
            ("small", 60, 1, 9),
            ("large", 60, 50, 0),
            ("middle", 120, 10, 0),
            ("middle", 180, 10, 0),
            ("refused-only", 60, 0, 3),
        ]);

        let top = top_customers(&conn, range(0, 3_600), 10).unwrap();

        let names: Vec<_> = top.iter().map(|total| total.customer.as_str()).collect();
        assert_eq!(names, ["large", "middle", "small", "refused-only"]);
        assert_eq!(top[1].admitted, 20);
        assert_eq!(top[2].refused, 9);
    }

    #[test]
    fn top_customers_ties_and_limit() {
        let (_dir, conn) = ledger(&[("b", 60, 5, 0), ("a", 60, 5, 0), ("c", 60, 5, 0)]);

        let top = top_customers(&conn, range(0, 3_600), 2).unwrap();

        let names: Vec<_> = top.iter().map(|total| total.customer.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn top_customers_only_count_the_range() {
        let (_dir, conn) = ledger(&[("early", 0, 100, 0), ("late", 3_600, 1, 0)]);

        let top = top_customers(&conn, range(60, 7_200), 10).unwrap();

        assert_eq!(top.len(), 1);
        assert_eq!(top[0].customer, "late");
    }
}
