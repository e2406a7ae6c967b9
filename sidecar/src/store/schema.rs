//! Connection settings and the schema of the usage store.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;

use super::StoreError;
use crate::erasure::has_column;

/// Schema version stored in `PRAGMA user_version`.
///
/// Version 3 names customers by pseudonym, and version 4 Stripe customers
/// too. Converting the values needs the keys, so
/// [`Identities::open`](crate::identity::Identities::open) does it. Version
/// 5 adds `meter_event.key_generation`. Version 6 keys the subject hashes
/// of the audit log and the erasures with a key of their own, and renames
/// the rows under a new index key, which `Identities::open` does too.
///
/// The version stops an older sidecar from opening the store. It would
/// write ids in clear and send pseudonyms to Stripe as customer ids. It
/// would retry an event with an idempotency key whose failure Stripe
/// replays, and record subject hashes that no receipt matches.
pub(super) const SCHEMA_VERSION: i64 = 6;

/// Changes from schema version 1: response body bytes per ledger row. The
/// billing tables are created by [`SCHEMA`] like every other table.
const MIGRATE_FROM_1: &str = "
ALTER TABLE usage_minute
    ADD COLUMN egress_bytes INTEGER NOT NULL DEFAULT 0 CHECK (egress_bytes >= 0);
";

/// Columns that held Stripe customer ids up to schema version 3, renamed
/// since they hold pseudonyms: (table, old name, new name).
const RENAMED_STRIPE_COLUMNS: [(&str, &str, &str); 4] = [
    ("stripe_customer", "stripe_customer_id", "stripe_pseudonym"),
    ("meter_event", "stripe_customer_id", "stripe_pseudonym"),
    (
        "stripe_tier_state",
        "stripe_customer_id",
        "stripe_pseudonym",
    ),
    (
        "stripe_tier_metadata_pending",
        "stripe_customer_id",
        "stripe_pseudonym",
    ),
];

/// Columns added to existing tables after their first release: (table,
/// column, definition).
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [
    (
        "erasure_counters_pending",
        "announce",
        "INTEGER NOT NULL DEFAULT 1 CHECK (announce IN (0, 1))",
    ),
    (
        "meter_event",
        "key_generation",
        "INTEGER NOT NULL DEFAULT 0 CHECK (key_generation >= 0)",
    ),
];

/// How long a statement waits for another connection's lock, for example
/// while the reader and the writer both touch the WAL during a checkpoint.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_minute (
    customer TEXT NOT NULL,
    minute_unix_s INTEGER NOT NULL,
    tier TEXT NOT NULL,
    admitted INTEGER NOT NULL CHECK (admitted >= 0),
    refused INTEGER NOT NULL CHECK (refused >= 0),
    egress_bytes INTEGER NOT NULL DEFAULT 0 CHECK (egress_bytes >= 0),
    PRIMARY KEY (customer, minute_unix_s, tier)
) WITHOUT ROWID, STRICT;

CREATE INDEX IF NOT EXISTS usage_minute_by_minute ON usage_minute (minute_unix_s);

CREATE TABLE IF NOT EXISTS instance_sequence (
    instance_id TEXT PRIMARY KEY NOT NULL,
    last_sequence INTEGER NOT NULL CHECK (last_sequence >= 1),
    updated_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

-- Usage not yet written to the counters shared with other sidecars. Ids
-- only grow (AUTOINCREMENT never reuses one), so the shared store can
-- apply each row once even when a write is retried after a crash.
CREATE TABLE IF NOT EXISTS counter_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer TEXT NOT NULL,
    bucket_unix_s INTEGER NOT NULL,
    admitted INTEGER NOT NULL CHECK (admitted >= 0),
    requests INTEGER NOT NULL CHECK (requests >= 0)
) STRICT;

-- Minute buckets whose usage changed since billing last looked at them;
-- written in the batch's transaction.
CREATE TABLE IF NOT EXISTS billing_dirty (
    customer TEXT NOT NULL,
    minute_unix_s INTEGER NOT NULL,
    PRIMARY KEY (customer, minute_unix_s)
) WITHOUT ROWID, STRICT;

-- Usage already turned into meter events, per customer, meter and minute.
-- Usage that arrives after a bucket was billed becomes one more part.
CREATE TABLE IF NOT EXISTS meter_bucket (
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    minute_unix_s INTEGER NOT NULL,
    billed INTEGER NOT NULL CHECK (billed >= 0),
    parts INTEGER NOT NULL CHECK (parts >= 0),
    PRIMARY KEY (customer, meter, minute_unix_s)
) WITHOUT ROWID, STRICT;

-- Meter events in the order they were created. `pending` events wait to be
-- sent, `sent` ones were accepted (or already recorded), `parked` ones can
-- never be accepted as they are and keep Stripe's reason.
CREATE TABLE IF NOT EXISTS meter_event (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identifier TEXT NOT NULL UNIQUE,
    customer TEXT NOT NULL,
    meter TEXT NOT NULL,
    minute_unix_s INTEGER NOT NULL,
    value INTEGER NOT NULL CHECK (value > 0),
    correction INTEGER NOT NULL DEFAULT 0 CHECK (correction IN (0, 1)),
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'parked')),
    -- Pseudonym of the Stripe customer the event was sent to, set when it
    -- is sent or first retried, and for corrections when they are queued.
    stripe_pseudonym TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- Count of idempotency keys given up on: after a 5xx, which Stripe
    -- replays to the same key, and after unparking.
    key_generation INTEGER NOT NULL DEFAULT 0 CHECK (key_generation >= 0),
    reason TEXT,
    created_unix_s INTEGER NOT NULL,
    sent_unix_s INTEGER
) STRICT;

CREATE INDEX IF NOT EXISTS meter_event_by_state ON meter_event (state, id);
CREATE INDEX IF NOT EXISTS meter_event_by_minute ON meter_event (minute_unix_s);

-- The Stripe customer that each customer's usage is billed to, by
-- pseudonym; stripe_identity holds its id.
CREATE TABLE IF NOT EXISTS stripe_customer (
    customer TEXT PRIMARY KEY NOT NULL,
    stripe_pseudonym TEXT NOT NULL UNIQUE,
    updated_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE TABLE IF NOT EXISTS sidecar_meta (
    key TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Opens the writing connection, switches the file to WAL and creates the
/// schema when missing.
pub(super) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;

    // WAL lets the reader connection query while a batch commits. The mode
    // is stored in the database file, so the reader inherits it.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_error)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    set_synchronous(&conn).map_err(open_error)?;
    // Deleted and replaced rows (an erased customer's ledger, customer ids
    // replaced by pseudonyms) are overwritten with zeros rather than left
    // in free space, at the cost of writing the freed pages.
    conn.pragma_update(None, "secure_delete", true)
        .map_err(open_error)?;

    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_error)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaVersion {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }

    let tx = conn.transaction().map_err(open_error)?;
    if found == 1 {
        tx.execute_batch(MIGRATE_FROM_1).map_err(open_error)?;
    }
    for (table, old, new) in RENAMED_STRIPE_COLUMNS {
        if has_column(&tx, table, old).map_err(open_error)? {
            tx.execute_batch(&format!("ALTER TABLE {table} RENAME COLUMN {old} TO {new}"))
                .map_err(open_error)?;
        }
    }
    for (table, column, definition) in ADDED_COLUMNS {
        // A table that is not there yet gets the column from its schema.
        let table_exists = tx
            .prepare("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1")
            .and_then(|mut statement| statement.exists([table]))
            .map_err(open_error)?;
        if table_exists && !has_column(&tx, table, column).map_err(open_error)? {
            tx.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))
            .map_err(open_error)?;
        }
    }
    tx.execute_batch(SCHEMA).map_err(open_error)?;
    tx.execute_batch(crate::billing::webhook::SCHEMA)
        .map_err(open_error)?;
    tx.execute_batch(crate::keys::SCHEMA).map_err(open_error)?;
    tx.execute_batch(crate::identity::SCHEMA)
        .map_err(open_error)?;
    tx.execute_batch(crate::audit::SCHEMA).map_err(open_error)?;
    tx.execute_batch(crate::assets::SCHEMA)
        .map_err(open_error)?;
    tx.execute_batch(crate::erasure::SCHEMA)
        .map_err(open_error)?;
    tx.execute_batch(crate::erasure::forward::SCHEMA)
        .map_err(open_error)?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(open_error)?;
    tx.commit().map_err(open_error)?;
    Ok(conn)
}

/// Opens the reading connection, which rejects writes.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let open_error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
    set_synchronous(&conn).map_err(open_error)?;
    conn.pragma_update(None, "query_only", true)
        .map_err(open_error)?;
    Ok(conn)
}

/// Makes every commit durable before it returns.
///
/// In WAL mode `NORMAL` already survives a crash of the process (`kill -9`),
/// because committed frames are in the WAL file in the OS page cache, but
/// it may lose the last commits when the machine loses power. `FULL` syncs
/// the WAL on every commit, so an acknowledged batch survives both. The cost
/// is one fsync per batch, and batches arrive once per instance and sync
/// interval, not per request.
fn set_synchronous(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "synchronous", "FULL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("db")).unwrap();

        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap();

        assert_eq!(mode, "wal");
        assert_eq!(synchronous, 2, "2 is FULL");
    }

    #[test]
    fn writer_overwrites_deleted_content() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writer(&dir.path().join("db")).unwrap();

        let secure_delete: i64 = conn
            .pragma_query_value(None, "secure_delete", |row| row.get(0))
            .unwrap();

        assert_eq!(secure_delete, 1);
    }

    #[test]
    fn reopening_keeps_schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(open_writer(&path).unwrap());

        let conn = open_writer(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();

        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn version_1_store_gains_egress_and_billing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE usage_minute (
                 customer TEXT NOT NULL, minute_unix_s INTEGER NOT NULL, tier TEXT NOT NULL,
                 admitted INTEGER NOT NULL CHECK (admitted >= 0),
                 refused INTEGER NOT NULL CHECK (refused >= 0),
                 PRIMARY KEY (customer, minute_unix_s, tier)) WITHOUT ROWID, STRICT;
             INSERT INTO usage_minute VALUES ('c1', 60, 'basic', 7, 2);
             PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);

        let conn = open_writer(&path).unwrap();

        let row: (i64, i64, i64) = conn
            .query_row(
                "SELECT admitted, refused, egress_bytes FROM usage_minute WHERE customer = 'c1'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (7, 2, 0));
        let events: i64 = conn
            .query_row("SELECT COUNT(*) FROM meter_event", [], |row| row.get(0))
            .unwrap();
        assert_eq!(events, 0);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn pending_counter_removals_gain_announce() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE erasure_counters_pending (
                 pseudonym TEXT PRIMARY KEY NOT NULL, sealed BLOB NOT NULL,
                 erasure_id TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)
                 WITHOUT ROWID, STRICT;
             INSERT INTO erasure_counters_pending VALUES ('p', x'00', 'er_1', 0);
             PRAGMA user_version = 3;",
        )
        .unwrap();
        drop(conn);

        let conn = open_writer(&path).unwrap();

        let announce: i64 = conn
            .query_row("SELECT announce FROM erasure_counters_pending", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(announce, 1);
    }

    #[test]
    fn meter_events_gain_key_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE meter_event (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, identifier TEXT NOT NULL UNIQUE,
                 customer TEXT NOT NULL, meter TEXT NOT NULL, minute_unix_s INTEGER NOT NULL,
                 value INTEGER NOT NULL CHECK (value > 0),
                 correction INTEGER NOT NULL DEFAULT 0 CHECK (correction IN (0, 1)),
                 state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'parked')),
                 stripe_pseudonym TEXT, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT,
                 created_unix_s INTEGER NOT NULL, sent_unix_s INTEGER) STRICT;
             INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                 created_unix_s)
             VALUES ('veo_req_1', 'p', 'api_requests', 60, 3, 'parked', 1);
             PRAGMA user_version = 4;",
        )
        .unwrap();
        drop(conn);

        let conn = open_writer(&path).unwrap();

        let generation: i64 = conn
            .query_row("SELECT key_generation FROM meter_event", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(generation, 0);
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn newer_schema_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let conn = open_writer(&path).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);

        let err = open_writer(&path).unwrap_err();

        assert!(
            matches!(err, StoreError::SchemaVersion { found, .. } if found == SCHEMA_VERSION + 1),
            "{err}"
        );
    }

    #[test]
    fn reader_rejects_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _writer = open_writer(&path).unwrap();
        let reader = open_reader(&path).unwrap();

        let result = reader.execute("DELETE FROM usage_minute", []);

        assert!(result.is_err());
    }
}
