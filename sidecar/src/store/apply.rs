//! Applying a usage batch: one transaction per batch, idempotent per
//! (instance, sequence).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use std::collections::{BTreeMap, HashSet};

use crate::identity::Identities;
use crate::ledger::{ApplyOutcome, Batch, MINUTE_SECONDS};
use crate::privacy::to_sql;

const SELECT_LAST_SEQUENCE: &str =
    "SELECT last_sequence FROM instance_sequence WHERE instance_id = ?1";

// Totals saturate at i64::MAX. SQLite turns an overflowing sum into a REAL,
// which the STRICT table rejects, and the filter resends a failed batch
// forever. Only a client that sends about 2^31 records of the largest count
// for one key reaches the limit.
const UPSERT_USAGE: &str = "
INSERT INTO usage_minute (customer, minute_unix_s, tier, admitted, refused, egress_bytes)
VALUES (?1, ?2, ?3, ?4, ?5, ?6)
ON CONFLICT (customer, minute_unix_s, tier) DO UPDATE SET
    admitted = admitted + MIN(excluded.admitted, 9223372036854775807 - admitted),
    refused = refused + MIN(excluded.refused, 9223372036854775807 - refused),
    egress_bytes = egress_bytes
        + MIN(excluded.egress_bytes, 9223372036854775807 - egress_bytes)";

const MARK_BILLING_DIRTY: &str = "
INSERT OR IGNORE INTO billing_dirty (customer, minute_unix_s) VALUES (?1, ?2)";

const INSERT_OUTBOX: &str = "
INSERT INTO counter_outbox (customer, bucket_unix_s, admitted, requests)
VALUES (?1, ?2, ?3, ?4)";

const UPSERT_SEQUENCE: &str = "
INSERT INTO instance_sequence (instance_id, last_sequence, updated_unix_s)
VALUES (?1, ?2, ?3)
ON CONFLICT (instance_id) DO UPDATE SET
    last_sequence = excluded.last_sequence,
    updated_unix_s = excluded.updated_unix_s";

/// Adds the batch's records, marks their minutes for billing and records
/// its sequence in one transaction,
/// unless the instance already applied this sequence or a later one.
///
/// Returns only after the commit, so a caller that replies after this
/// returns never acknowledges a batch that a crash could lose. On error the
/// transaction rolls back and nothing changes.
///
/// With `outbox_window_s`, the batch's usage is also queued for the shared
/// counters in the same transaction. Usage of minutes that overlap the
/// window ending now goes into the bucket of `now_unix_s`. Older usage goes
/// into its own minute, which the shared store counts in its minute totals
/// but not in the window.
///
/// With `identities`, the rows name each customer by its pseudonym, and
/// the customer's encrypted id is stored in the same transaction.
/// Returns the last sequence applied for `instance`, `None` before its
/// first batch.
pub(super) fn last_sequence(conn: &Connection, instance: &str) -> rusqlite::Result<Option<i64>> {
    conn.query_row(SELECT_LAST_SEQUENCE, [instance], |row| row.get(0))
        .optional()
}

pub(super) fn apply_batch(
    conn: &mut Connection,
    batch: &Batch,
    now_unix_s: i64,
    outbox_window_s: Option<i64>,
    identities: Option<&Identities>,
) -> rusqlite::Result<ApplyOutcome> {
    // IMMEDIATE takes the write lock before reading the sequence, so the
    // check and the write are atomic even if a second process opened the
    // same data directory.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

    let last: i64 = tx
        .query_row(SELECT_LAST_SEQUENCE, [&batch.instance_id], |row| row.get(0))
        .optional()?
        .unwrap_or(0);
    if batch.sequence <= last {
        // Dropping the transaction rolls it back; nothing was written.
        return Ok(ApplyOutcome::Duplicate { last });
    }

    // Usage of an erased customer leaves no trace, whether its batch was
    // built before or after the erasure.
    let erased = erased_in(&tx, batch, now_unix_s, identities)?;
    let kept = |customer: &str| erased.is_empty() || !erased.contains(customer);
    let mut names: BTreeMap<&str, String> = BTreeMap::new();
    for record in &batch.records {
        let empty = record.admitted == 0 && record.refused == 0 && record.egress_bytes == 0;
        if empty || names.contains_key(record.customer.as_str()) || !kept(&record.customer) {
            continue;
        }
        let name = match identities {
            Some(identities) => identities.record(&tx, &record.customer).map_err(to_sql)?,
            None => record.customer.clone(),
        };
        names.insert(&record.customer, name);
    }
    // Every kept customer has a name from the loop above.
    let name = |customer: &str| names.get(customer).cloned().unwrap_or_default();
    {
        let mut upsert = tx.prepare_cached(UPSERT_USAGE)?;
        let mut mark_dirty = tx.prepare_cached(MARK_BILLING_DIRTY)?;
        for record in &batch.records {
            if record.admitted == 0 && record.refused == 0 && record.egress_bytes == 0
                || !kept(&record.customer)
            {
                continue;
            }
            let customer = name(&record.customer);
            upsert.execute(params![
                customer,
                record.minute_unix_s,
                record.tier,
                record.admitted,
                record.refused,
                record.egress_bytes,
            ])?;
            // Billing turns admitted requests and egress bytes into meter
            // events; refusals are not billed.
            if record.admitted > 0 || record.egress_bytes > 0 {
                mark_dirty.execute(params![customer, record.minute_unix_s])?;
            }
        }
    }
    if let Some(window_s) = outbox_window_s {
        let mut insert = tx.prepare_cached(INSERT_OUTBOX)?;
        for ((customer, bucket), (admitted, requests)) in outbox_rows(batch, now_unix_s, window_s) {
            if !kept(customer) {
                continue;
            }
            insert.execute(params![name(customer), bucket, admitted, requests])?;
        }
    }
    tx.execute(
        UPSERT_SEQUENCE,
        params![batch.instance_id, batch.sequence, now_unix_s],
    )?;

    tx.commit()?;
    Ok(ApplyOutcome::Applied { previous: last })
}

/// Returns the customers of `batch` that are erased.
/// A customer stays erased until its refusal period ends at
/// `refuse_until_unix_s`; from then on its tokens are admitted again, so its
/// usage is kept.
fn erased_in(
    conn: &Connection,
    batch: &Batch,
    now_unix_s: i64,
    identities: Option<&Identities>,
) -> rusqlite::Result<HashSet<String>> {
    let any: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM erased_customer)", [], |row| {
        row.get(0)
    })?;
    let mut erased = HashSet::new();
    if !any {
        return Ok(erased);
    }
    let mut lookup = conn.prepare_cached(
        "SELECT 1 FROM erased_customer WHERE pseudonym = ?1 AND refuse_until_unix_s > ?2",
    )?;
    for record in &batch.records {
        if erased.contains(&record.customer) {
            continue;
        }
        let pseudonym = match identities {
            Some(identities) => identities.pseudonym(&record.customer),
            None => record.customer.clone(),
        };
        if lookup.exists(rusqlite::params![pseudonym, now_unix_s])? {
            erased.insert(record.customer.clone());
        }
    }
    Ok(erased)
}

/// Sums a batch per customer and outbox bucket.
fn outbox_rows(batch: &Batch, now_unix_s: i64, window_s: i64) -> BTreeMap<(&str, i64), (i64, i64)> {
    let window_start = now_unix_s - window_s;
    let mut rows: BTreeMap<(&str, i64), (i64, i64)> = BTreeMap::new();
    for record in &batch.records {
        if record.admitted == 0 && record.refused == 0 {
            continue;
        }
        let bucket = if record.minute_unix_s + MINUTE_SECONDS > window_start {
            now_unix_s
        } else {
            record.minute_unix_s
        };
        let row = rows.entry((record.customer.as_str(), bucket)).or_default();
        row.0 = row.0.saturating_add(record.admitted);
        row.1 = row
            .1
            .saturating_add(record.admitted.saturating_add(record.refused));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::UsageEntry;
    use crate::store::schema;

    fn entry(customer: &str, minute_unix_s: i64, admitted: i64, refused: i64) -> UsageEntry {
        UsageEntry {
            customer: customer.into(),
            tier: "basic".into(),
            minute_unix_s,
            admitted,
            refused,
            egress_bytes: 0,
            quota: None,
        }
    }

    fn batch(instance: &str, sequence: i64, records: Vec<UsageEntry>) -> Batch {
        Batch {
            instance_id: instance.into(),
            sequence,
            records,
        }
    }

    fn totals(conn: &Connection, customer: &str) -> (i64, i64) {
        conn.query_row(
            "SELECT COALESCE(SUM(admitted), 0), COALESCE(SUM(refused), 0)
             FROM usage_minute WHERE customer = ?1",
            [customer],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap()
    }

    fn last_sequence(conn: &Connection, instance: &str) -> Option<i64> {
        conn.query_row(SELECT_LAST_SEQUENCE, [instance], |row| row.get(0))
            .optional()
            .unwrap()
    }

    fn open(dir: &tempfile::TempDir) -> Connection {
        schema::open_writer(&dir.path().join("db")).unwrap()
    }

    #[test]
    fn first_batch_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);

        let outcome = apply_batch(
            &mut conn,
            &batch("a", 1, vec![entry("c1", 60, 5, 2)]),
            100,
            None,
            None,
        );

        assert_eq!(outcome.unwrap(), ApplyOutcome::Applied { previous: 0 });
        assert_eq!(totals(&conn, "c1"), (5, 2));
        assert_eq!(last_sequence(&conn, "a"), Some(1));
    }

    #[test]
    fn same_sequence_is_duplicate_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        let first = batch("a", 1, vec![entry("c1", 60, 5, 0)]);
        apply_batch(&mut conn, &first, 100, None, None).unwrap();

        let outcome = apply_batch(&mut conn, &first, 101, None, None).unwrap();

        assert_eq!(outcome, ApplyOutcome::Duplicate { last: 1 });
        assert_eq!(totals(&conn, "c1"), (5, 0));
    }

    #[test]
    fn older_sequence_is_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        apply_batch(
            &mut conn,
            &batch("a", 5, vec![entry("c1", 60, 1, 0)]),
            100,
            None,
            None,
        )
        .unwrap();

        let outcome = apply_batch(
            &mut conn,
            &batch("a", 3, vec![entry("c1", 60, 7, 0)]),
            101,
            None,
            None,
        );

        assert_eq!(outcome.unwrap(), ApplyOutcome::Duplicate { last: 5 });
        assert_eq!(totals(&conn, "c1"), (1, 0));
        assert_eq!(last_sequence(&conn, "a"), Some(5));
    }

    #[test]
    fn sequences_are_per_instance() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        apply_batch(
            &mut conn,
            &batch("a", 1, vec![entry("c1", 60, 1, 0)]),
            100,
            None,
            None,
        )
        .unwrap();

        let outcome = apply_batch(
            &mut conn,
            &batch("b", 1, vec![entry("c1", 60, 2, 0)]),
            100,
            None,
            None,
        );

        assert_eq!(outcome.unwrap(), ApplyOutcome::Applied { previous: 0 });
        assert_eq!(totals(&conn, "c1"), (3, 0));
    }

    #[test]
    fn gap_is_accepted_and_reports_previous() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        apply_batch(&mut conn, &batch("a", 1, vec![]), 100, None, None).unwrap();

        let outcome = apply_batch(
            &mut conn,
            &batch("a", 4, vec![entry("c1", 0, 1, 0)]),
            100,
            None,
            None,
        );

        assert_eq!(outcome.unwrap(), ApplyOutcome::Applied { previous: 1 });
        assert_eq!(last_sequence(&conn, "a"), Some(4));
    }

    #[test]
    fn records_of_same_bucket_add_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        let records = vec![entry("c1", 120, 2, 1), entry("c1", 120, 3, 0)];
        apply_batch(&mut conn, &batch("a", 1, records), 100, None, None).unwrap();

        apply_batch(
            &mut conn,
            &batch("a", 2, vec![entry("c1", 120, 4, 4)]),
            100,
            None,
            None,
        )
        .unwrap();

        assert_eq!(totals(&conn, "c1"), (9, 5));
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage_minute", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn totals_saturate_instead_of_failing_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        conn.execute(
            "INSERT INTO usage_minute VALUES ('c1', 60, 'basic', ?1, ?1, 0)",
            [i64::MAX - 5],
        )
        .unwrap();

        let outcome = apply_batch(
            &mut conn,
            &batch("a", 1, vec![entry("c1", 60, 10, 10)]),
            100,
            None,
            None,
        );

        assert_eq!(outcome.unwrap(), ApplyOutcome::Applied { previous: 0 });
        assert_eq!(totals(&conn, "c1"), (i64::MAX, i64::MAX));
    }

    #[test]
    fn empty_records_store_no_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);

        apply_batch(
            &mut conn,
            &batch("a", 1, vec![entry("c1", 60, 0, 0)]),
            100,
            None,
            None,
        )
        .unwrap();

        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM usage_minute", [], |row| row.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(last_sequence(&conn, "a"), Some(1));
    }

    #[test]
    fn failed_batch_rolls_back_records_and_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        // Fails the second insert of the batch, after the first one succeeded.
        conn.execute_batch(
            "CREATE TEMP TRIGGER reject_boom BEFORE INSERT ON usage_minute
             WHEN NEW.customer = 'boom' BEGIN SELECT RAISE(ABORT, 'rejected'); END;",
        )
        .unwrap();
        let records = vec![entry("c1", 60, 5, 0), entry("boom", 60, 1, 0)];

        let result = apply_batch(&mut conn, &batch("a", 1, records), 100, None, None);

        assert!(result.is_err());
        assert_eq!(totals(&conn, "c1"), (0, 0));
        assert_eq!(last_sequence(&conn, "a"), None);
    }

    #[test]
    fn applied_batch_is_on_disk_when_apply_returns() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);

        apply_batch(
            &mut conn,
            &batch("a", 1, vec![entry("c1", 60, 5, 0)]),
            100,
            None,
            None,
        )
        .unwrap();

        // Copy the database and its WAL while the writer is still open and
        // never closed cleanly, as after `kill -9`, then recover the copy.
        let crashed = tempfile::tempdir().unwrap();
        for suffix in ["", "-wal"] {
            let from = dir.path().join(format!("db{suffix}"));
            std::fs::copy(&from, crashed.path().join(format!("db{suffix}"))).unwrap();
        }
        let recovered = Connection::open(crashed.path().join("db")).unwrap();
        assert_eq!(totals(&recovered, "c1"), (5, 0));
        assert_eq!(last_sequence(&recovered, "a"), Some(1));
        drop(conn);
    }

    #[test]
    fn outbox_buckets_recent_and_old_usage() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir);
        let records = vec![
            entry("c1", 960, 5, 2),
            entry("c1", 900, 1, 0),
            entry("c1", 60, 4, 1),
            entry("c2", 960, 0, 3),
        ];
        apply_batch(&mut conn, &batch("a", 1, records), 1_000, Some(60), None).unwrap();
        // A duplicate adds nothing.
        let again = vec![entry("c1", 960, 5, 2)];
        apply_batch(&mut conn, &batch("a", 1, again), 1_001, Some(60), None).unwrap();

        let mut statement = conn
            .prepare("SELECT customer, bucket_unix_s, admitted, requests FROM counter_outbox ORDER BY id")
            .unwrap();
        let rows: Vec<(String, i64, i64, i64)> = statement
            .query_map([], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                ("c1".to_owned(), 60, 4, 5),
                ("c1".to_owned(), 1_000, 6, 8),
                ("c2".to_owned(), 1_000, 0, 3),
            ]
        );
    }
}
