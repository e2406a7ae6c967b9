//! Erasure of a customer's personal data from the store, in one
//! transaction with its audit entry.
//!
//! What goes: every ledger row of the customer, its billing state (dirty
//! minutes, billed buckets, meter events, the Stripe customer mapping),
//! the webhook state of its Stripe customers and the usage not yet written
//! to the shared counters. Usage already invoiced stays only as anonymous
//! totals per minute and tier in `usage_anonymous`, with no link to the
//! customer.
//!
//! The customer's encrypted id in `customer_identity` goes too, and the
//! caller's `record` destroys the customer's data key, so copies of the
//! store can no longer reveal it either.
//!
//! What stays: the customer id in `erased_customer`, encrypted under the
//! data key of [`ERASURES_OWNER`], until its tokens have expired, so that
//! they are refused and usage sent for it is dropped. It stays in
//! `erasure_counters_pending` until Redis has dropped its counts, and in
//! `erasure_forward` until every peer sidecar has erased it. The erasure
//! row stays too; it contains the keyed hash of the id and never the id.

pub mod forward;

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::audit::Verification;
use crate::identity::Identities;
use crate::keys::{self, KeyError, KeyProvider};
use crate::privacy::to_sql;

/// Tables of erasure, created when missing.
pub const SCHEMA: &str = "
-- One row per erasure, found by the keyed hash of the customer id. A
-- customer erased again after its refusal period gets a second row.
CREATE TABLE IF NOT EXISTS erasure (
    erasure_id TEXT PRIMARY KEY NOT NULL,
    subject_hash TEXT NOT NULL,
    requested_unix_ms INTEGER NOT NULL,
    -- Version of the erased-customer set that first included the
    -- customer; 0 until it is pushed.
    erasures_version INTEGER NOT NULL DEFAULT 0,
    -- JSON object of record kind to records affected.
    records TEXT NOT NULL,
    receipt_position INTEGER NOT NULL,
    receipt_hash TEXT NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX IF NOT EXISTS erasure_by_subject ON erasure (subject_hash, requested_unix_ms);

-- Customers whose tokens are refused and whose usage is dropped, until
-- their tokens have expired: the pseudonym, and the customer id encrypted
-- under the data key of owner 'system:erasures' for the filter instances.
CREATE TABLE IF NOT EXISTS erased_customer (
    pseudonym TEXT PRIMARY KEY NOT NULL,
    sealed BLOB NOT NULL,
    refuse_until_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

-- Invoiced usage of erased customers, without the customer.
CREATE TABLE IF NOT EXISTS usage_anonymous (
    minute_unix_s INTEGER NOT NULL,
    tier TEXT NOT NULL,
    admitted INTEGER NOT NULL CHECK (admitted >= 0),
    refused INTEGER NOT NULL CHECK (refused >= 0),
    egress_bytes INTEGER NOT NULL CHECK (egress_bytes >= 0),
    PRIMARY KEY (minute_unix_s, tier)
) WITHOUT ROWID, STRICT;

-- Customers whose counts in Redis are still to be removed, because Redis
-- was unreachable when they were erased.
CREATE TABLE IF NOT EXISTS erasure_counters_pending (
    pseudonym TEXT PRIMARY KEY NOT NULL,
    -- The customer id, which the Redis keys contain, encrypted like
    -- erased_customer.sealed.
    sealed BLOB NOT NULL,
    erasure_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    -- 1 when the erasure is to be announced to the other sidecars sharing
    -- the counters once the counts are removed, 0 when it applied another
    -- sidecar's announcement.
    announce INTEGER NOT NULL DEFAULT 1 CHECK (announce IN (0, 1))
) WITHOUT ROWID, STRICT;

-- Last version of the erased-customer set each filter instance applied.
CREATE TABLE IF NOT EXISTS instance_erasure_ack (
    instance_id TEXT PRIMARY KEY NOT NULL,
    erasures_version INTEGER NOT NULL,
    acked_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Owner of the data key that encrypts the ids of erased customers, which
/// must outlive the customers' own data keys.
pub const ERASURES_OWNER: &str = "system:erasures";

/// Associated data of a sealed id in `erased_customer`.
const ERASED_AAD: &[u8] = b"erased_customer.sealed";

/// Associated data of a sealed id in `erasure_counters_pending`.
const COUNTERS_AAD: &[u8] = b"erasure_counters_pending.sealed";

/// Proof of an erasure in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Position of the audit entry, from 1.
    pub position: u64,
    /// SHA-256 of the audit entry, lowercase hex.
    pub entry_hash: String,
}

/// A stored erasure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// Identifier derived from the subject hash.
    pub erasure_id: String,
    /// Keyed hash of the customer id, lowercase hex.
    pub subject_hash: String,
    /// When the erasure was first requested, in milliseconds since the
    /// Unix epoch.
    pub requested_unix_ms: i64,
    /// Version of the erased-customer set that first included the customer;
    /// 0 until it is pushed.
    pub erasures_version: u64,
    /// Records affected per kind, in records.
    pub records: BTreeMap<String, u64>,
    /// The erasure's entry in the audit log.
    pub receipt: Receipt,
}

/// An erasure request: the customer, its keyed hashes, the time and the
/// refusal period.
#[derive(Debug, Clone, Copy)]
pub struct EraseRequest<'a> {
    /// Customer id, as in the token's customer claim.
    pub customer: &'a str,
    /// Keyed hash of `customer` under the subject key, lowercase hex: what
    /// the erasure and its audit entry record.
    pub subject_hash: &'a str,
    /// Keyed hash of `customer` under the index key: the pseudonym that
    /// the ledger, billing and erasure tables name the customer by.
    pub pseudonym: &'a str,
    /// Time of the request, in milliseconds since the Unix epoch.
    pub now_unix_ms: i64,
    /// When the customer was first erased, in milliseconds since the Unix
    /// epoch: `now_unix_ms`, or the time of the peer sidecar's erasure
    /// that was passed on here. An erasure of the customer from that time
    /// on, in force or not, is returned instead of a new one.
    pub first_erased_unix_ms: i64,
    /// Until when the customer's tokens are refused, in seconds since the
    /// Unix epoch.
    pub refuse_until_unix_s: i64,
    /// Whether counters shared through Redis hold counts of the customer,
    /// which stay queued for removal until [`counters_cleared`].
    pub shared_counters: bool,
    /// Whether the erasure is to be announced to the other sidecars sharing
    /// the counters once the counts are removed.
    pub announce: bool,
    /// Whether an erasure of the customer still in force is refused until
    /// `refuse_until_unix_s` when that is later, as for another sidecar's
    /// notice of a later erasure.
    pub extends_refusal: bool,
    /// Peer sidecars to pass the erasure on to, from
    /// `privacy.erasure_peers`; empty for an erasure passed on here.
    pub forward_to: &'a [String],
}

/// An erased customer whose Redis counts are still to be removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCounters {
    /// Customer id.
    pub customer: String,
    /// The erasure.
    pub erasure_id: String,
    /// When the erasure was requested, in milliseconds since the Unix
    /// epoch.
    pub requested_unix_ms: i64,
    /// Whether the erasure is to be announced once the counts are removed.
    pub announce: bool,
}

/// Appends an erasure's audit entry inside its transaction, given the
/// erasure id and the records affected per kind, and returns the receipt.
pub type RecordErasure<'a> =
    dyn FnMut(&Connection, &str, &mut BTreeMap<String, u64>) -> rusqlite::Result<Receipt> + 'a;

/// Returns the id of the `number`th erasure (from 1) of the customer with
/// `subject_hash`: stable, so a repeated request finds the same erasure.
pub fn erasure_id(subject_hash: &str, number: u64) -> String {
    let prefix: String = subject_hash.chars().take(32).collect();
    match number {
        0 | 1 => format!("er_{prefix}"),
        number => format!("er_{prefix}_{number}"),
    }
}

/// Erases `request.customer` unless it was erased before, in one
/// transaction. `record` appends the audit entry (and destroys the
/// customer's data key) inside that transaction, given the records
/// affected, so the erasure and its entry commit together. Returns the
/// erasure and whether this call performed it.
pub fn erase(
    conn: &mut Connection,
    keys: &dyn KeyProvider,
    request: EraseRequest<'_>,
    record: &mut RecordErasure<'_>,
) -> rusqlite::Result<(Erasure, bool)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let pseudonym = request.pseudonym;
    // Within the refusal period a repeated request returns the erasure in
    // force. After it, the customer may have come back with new data, which
    // a new erasure removes.
    let refusing =
        "SELECT 1 FROM erased_customer WHERE pseudonym = ?1 AND refuse_until_unix_s > ?2";
    let now_unix_s = request.now_unix_ms.div_euclid(1_000);
    let mut refusal = tx.prepare(refusing)?;
    let in_force = refusal.exists(params![pseudonym, now_unix_s])?;
    drop(refusal);
    let counting = "SELECT COUNT(*) FROM erasure WHERE subject_hash = ?1";
    let previous: u64 = tx.query_row(counting, [request.subject_hash], |row| row.get(0))?;
    // A peer resending an erasure it passed on finds the one it made here,
    // even once its refusal period has ended.
    let covering = "SELECT 1 FROM erasure WHERE subject_hash = ?1 AND requested_unix_ms >= ?2";
    let covered = tx
        .prepare(covering)?
        .exists(params![request.subject_hash, request.first_erased_unix_ms])?;
    if (in_force || covered)
        && let Some(existing) = by_subject(&tx, request.subject_hash)?
    {
        if request.extends_refusal {
            tx.execute(
                "UPDATE erased_customer SET refuse_until_unix_s = ?2
                 WHERE pseudonym = ?1 AND refuse_until_unix_s < ?2",
                params![pseudonym, request.refuse_until_unix_s],
            )?;
            tx.commit()?;
        }
        return Ok((existing, false));
    }
    let mut records = BTreeMap::new();
    let mut count = |kind: &str, affected: usize| {
        records.insert(kind.to_owned(), u64::try_from(affected).unwrap_or(u64::MAX));
    };

    let stripe_pseudonyms = stripe_pseudonyms(&tx, pseudonym)?;
    // Usage of minutes with a billed bucket was invoiced: it stays as
    // anonymous totals. The rest was never billed and goes entirely.
    let anonymized = tx.execute(
        "INSERT INTO usage_anonymous (minute_unix_s, tier, admitted, refused, egress_bytes)
         SELECT minute_unix_s, tier, admitted, refused, egress_bytes
         FROM usage_minute u
         WHERE customer = ?1 AND EXISTS (
             SELECT 1 FROM meter_bucket b
             WHERE b.customer = ?1 AND b.minute_unix_s = u.minute_unix_s AND b.billed > 0)
         ON CONFLICT (minute_unix_s, tier) DO UPDATE SET
             admitted = admitted + excluded.admitted,
             refused = refused + excluded.refused,
             egress_bytes = egress_bytes + excluded.egress_bytes",
        [pseudonym],
    )?;
    let ledger = tx.execute("DELETE FROM usage_minute WHERE customer = ?1", [pseudonym])?;
    count("usage_minute_anonymized", anonymized);
    count("usage_minute_deleted", ledger.saturating_sub(anonymized));
    for table in [
        "billing_dirty",
        "meter_bucket",
        "meter_event",
        "counter_outbox",
        "stripe_customer",
    ] {
        let affected = tx.execute(
            &format!("DELETE FROM {table} WHERE customer = ?1"),
            [pseudonym],
        )?;
        count(table, affected);
    }
    let identity = Identities::forget(&tx, pseudonym)?;
    count("customer_identity", usize::from(identity));
    let mut tier_state = 0;
    let mut metadata = 0;
    let mut stripe_identities = 0;
    for stripe_pseudonym in &stripe_pseudonyms {
        // A Stripe customer that another customer's mapping or meter event
        // names is kept for that customer.
        if Identities::stripe_in_use(&tx, stripe_pseudonym)? {
            continue;
        }
        tier_state += tx.execute(
            "DELETE FROM stripe_tier_state WHERE stripe_pseudonym = ?1",
            [stripe_pseudonym],
        )?;
        metadata += tx.execute(
            "DELETE FROM stripe_tier_metadata_pending WHERE stripe_pseudonym = ?1",
            [stripe_pseudonym],
        )?;
        let forgotten = Identities::forget_stripe(&tx, stripe_pseudonym).map_err(to_sql)?;
        stripe_identities += usize::from(forgotten);
    }
    count("stripe_tier_state", tier_state);
    count("stripe_tier_metadata_pending", metadata);
    count("stripe_identity", stripe_identities);
    let customer = request.customer.as_bytes();
    let sealed = keys::encrypt(&tx, keys, ERASURES_OWNER, customer, ERASED_AAD).map_err(to_sql)?;
    tx.execute(
        "INSERT INTO erased_customer (pseudonym, sealed, refuse_until_unix_s) VALUES (?1, ?2, ?3)
         ON CONFLICT (pseudonym) DO UPDATE SET
             sealed = excluded.sealed,
             refuse_until_unix_s = MAX(refuse_until_unix_s, excluded.refuse_until_unix_s)",
        params![pseudonym, sealed, request.refuse_until_unix_s],
    )?;

    let erasure_id = erasure_id(request.subject_hash, previous + 1);
    if request.shared_counters {
        let sealed =
            keys::encrypt(&tx, keys, ERASURES_OWNER, customer, COUNTERS_AAD).map_err(to_sql)?;
        let queue = "INSERT OR REPLACE INTO erasure_counters_pending
                         (pseudonym, sealed, erasure_id, announce)
                     VALUES (?1, ?2, ?3, ?4)";
        tx.execute(
            queue,
            params![pseudonym, sealed, erasure_id, request.announce],
        )?;
    }
    forward::queue(
        &tx,
        keys,
        request.customer,
        &erasure_id,
        request.first_erased_unix_ms,
        request.forward_to,
    )?;
    let receipt = record(&tx, &erasure_id, &mut records)?;
    // A map of strings to integers always serializes.
    let records_json = serde_json::json!(records).to_string();
    tx.execute(
        "INSERT INTO erasure (erasure_id, subject_hash, requested_unix_ms, records,
                              receipt_position, receipt_hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            erasure_id,
            request.subject_hash,
            request.first_erased_unix_ms,
            records_json,
            i64::try_from(receipt.position).unwrap_or(i64::MAX),
            receipt.entry_hash,
        ],
    )?;
    tx.commit()?;
    Ok((
        Erasure {
            erasure_id,
            subject_hash: request.subject_hash.to_owned(),
            requested_unix_ms: request.first_erased_unix_ms,
            erasures_version: 0,
            records,
            receipt,
        },
        true,
    ))
}

/// Returns the pseudonyms of the Stripe customers the customer's usage
/// went or was to go to.
fn stripe_pseudonyms(conn: &Connection, customer: &str) -> rusqlite::Result<Vec<String>> {
    let mut statement = conn.prepare(SELECT_STRIPE_PSEUDONYMS)?;
    let rows = statement.query_map([customer], |row| row.get(0))?;
    rows.collect()
}

const SELECT_STRIPE_PSEUDONYMS: &str = "
SELECT stripe_pseudonym FROM stripe_customer WHERE customer = ?1
UNION
SELECT stripe_pseudonym FROM meter_event
WHERE customer = ?1 AND stripe_pseudonym IS NOT NULL";

const SELECT_ERASED: &str =
    "SELECT pseudonym, sealed, refuse_until_unix_s FROM erased_customer ORDER BY pseudonym";

const UPSERT_ACK: &str = "
INSERT INTO instance_erasure_ack (instance_id, erasures_version, acked_unix_s)
VALUES (?1, ?2, ?3)
ON CONFLICT (instance_id) DO UPDATE SET
    erasures_version = excluded.erasures_version,
    acked_unix_s = excluded.acked_unix_s";

const SELECT_RECEIPTS: &str =
    "SELECT erasure_id, receipt_position, receipt_hash FROM erasure ORDER BY receipt_position";

const SELECT_ENTRY_HASH: &str = "SELECT entry_hash FROM audit_log WHERE position = ?1";

const SELECT_HEAD: &str = "SELECT value FROM sidecar_meta WHERE key = 'audit_head'";

/// Key of the last appended audit entry in `sidecar_meta`, as
/// "POSITION HASH".
pub const AUDIT_HEAD_KEY: &str = "audit_head";

/// Marks `verification` broken at `position` unless it already is at an
/// earlier one.
fn mark_broken(verification: &mut Verification, position: u64, problem: String) {
    if verification.intact || position < verification.first_bad_position {
        verification.intact = false;
        verification.first_bad_position = position;
        verification.problem = problem;
    }
}

/// Reads a row of `SELECT_RECEIPTS` as (what it anchors, position, hash).
fn receipt_anchor(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, u64, String)> {
    let erasure: String = row.get(0)?;
    Ok((
        format!("erasure {erasure}'s receipt"),
        row.get(1)?,
        row.get(2)?,
    ))
}

/// Checks the audit log against what the store recorded outside it: each
/// erasure's receipt and the last appended entry. The hash chain alone
/// cannot show entries cut from the end or a log rewritten with new
/// hashes; these records can. Marks `verification` broken at the first
/// mismatch.
pub fn check_receipts(conn: &Connection, verification: &mut Verification) -> rusqlite::Result<()> {
    let mut anchors: Vec<(String, u64, String)> = conn
        .prepare(SELECT_RECEIPTS)?
        .query_map([], receipt_anchor)?
        .collect::<rusqlite::Result<_>>()?;
    let head: Option<String> = conn
        .query_row(SELECT_HEAD, [], |row| row.get(0))
        .optional()?;
    if let Some((position, hash)) = head.as_deref().and_then(|head| head.split_once(' ')) {
        let position = position.parse().unwrap_or(u64::MAX);
        anchors.push((
            "the recorded last entry".to_owned(),
            position,
            hash.to_owned(),
        ));
    }
    let mut lookup = conn.prepare(SELECT_ENTRY_HASH)?;
    for (anchor, position, hash) in anchors {
        let stored: Option<String> = lookup.query_row([position], |row| row.get(0)).optional()?;
        let problem = match stored {
            Some(stored) if stored == hash => continue,
            Some(stored) => format!("entry {position} has hash {stored}, but {anchor} has {hash}"),
            None => {
                format!("entry {position}, named by {anchor}, is missing: entries were removed")
            }
        };
        mark_broken(verification, position, problem);
    }
    Ok(())
}

/// Records `receipt` as the last appended audit entry.
pub fn record_head(conn: &Connection, receipt: &Receipt) -> rusqlite::Result<()> {
    let head = format!("{} {}", receipt.position, receipt.entry_hash);
    let upsert = "INSERT INTO sidecar_meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";
    conn.execute(upsert, params![AUDIT_HEAD_KEY, head])
        .map(drop)
}

const SELECT_ERASURE: &str = "SELECT erasure_id, subject_hash, requested_unix_ms, erasures_version,
        records, receipt_position, receipt_hash FROM erasure";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Erasure> {
    let records: String = row.get(4)?;
    let records = serde_json::from_str(&records).map_err(|err| {
        rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, err.into())
    })?;
    Ok(Erasure {
        erasure_id: row.get(0)?,
        subject_hash: row.get(1)?,
        requested_unix_ms: row.get(2)?,
        erasures_version: row.get(3)?,
        records,
        receipt: Receipt {
            position: row.get(5)?,
            entry_hash: row.get(6)?,
        },
    })
}

/// Returns the latest erasure of the customer with `subject_hash`, if any.
pub fn by_subject(conn: &Connection, subject_hash: &str) -> rusqlite::Result<Option<Erasure>> {
    conn.query_row(
        &format!(
            "{SELECT_ERASURE} WHERE subject_hash = ?1 ORDER BY requested_unix_ms DESC, erasure_id DESC LIMIT 1"
        ),
        [subject_hash],
        from_row,
    )
    .optional()
}

/// Returns the erasure with `erasure_id`, if any.
pub fn by_id(conn: &Connection, erasure_id: &str) -> rusqlite::Result<Option<Erasure>> {
    conn.query_row(
        &format!("{SELECT_ERASURE} WHERE erasure_id = ?1"),
        [erasure_id],
        from_row,
    )
    .optional()
}

/// The erasure tables that held customer ids in clear in earlier stores:
/// the table, the column kept beside the id, and the associated data of the
/// sealed id.
const TABLES_WITH_IDS_IN_CLEAR: [(&str, &str, &[u8]); 2] = [
    ("erased_customer", "refuse_until_unix_s", ERASED_AAD),
    ("erasure_counters_pending", "erasure_id", COUNTERS_AAD),
];

/// Converts the erasure tables of a store written while they held customer
/// ids in clear: `erased_customer` and `erasure_counters_pending` rows with
/// a `customer` column get the pseudonym and the id sealed under
/// [`ERASURES_OWNER`] instead. Does nothing for tables already converted.
pub fn seal_ids_in_clear(
    conn: &Connection,
    keys: &dyn KeyProvider,
    pseudonym: &dyn Fn(&str) -> String,
) -> rusqlite::Result<()> {
    for (table, kept, aad) in TABLES_WITH_IDS_IN_CLEAR {
        if !has_column(conn, table, "customer")? {
            continue;
        }
        let select = format!("SELECT customer, {kept} FROM {table}");
        let rows: Vec<(String, rusqlite::types::Value)> = conn
            .prepare(&select)?
            .query_map([], pair)?
            .collect::<rusqlite::Result<_>>()?;
        conn.execute_batch(&format!("DROP TABLE {table}"))?;
        conn.execute_batch(SCHEMA)?;
        let insert = format!("INSERT INTO {table} (pseudonym, sealed, {kept}) VALUES (?1, ?2, ?3)");
        for (customer, value) in rows {
            let sealed = keys::encrypt(conn, keys, ERASURES_OWNER, customer.as_bytes(), aad)
                .map_err(to_sql)?;
            conn.execute(&insert, params![pseudonym(&customer), sealed, value])?;
        }
    }
    Ok(())
}

/// Tables of erased customers named by pseudonym, with the associated data
/// of their sealed ids.
pub const PSEUDONYM_TABLES: [(&str, &[u8]); 2] = [
    ("erased_customer", ERASED_AAD),
    ("erasure_counters_pending", COUNTERS_AAD),
];

/// Returns the (pseudonym, customer id) of every row of
/// [`PSEUDONYM_TABLES`], for replacing the pseudonyms under a new index
/// key. Fails on a row whose id cannot be read, because a random pseudonym
/// would end the customer's refusal.
pub fn erased_pseudonyms(
    conn: &Connection,
    keys: &dyn KeyProvider,
) -> Result<Vec<(String, String)>, KeyError> {
    let mut named = Vec::new();
    for (table, aad) in PSEUDONYM_TABLES {
        let select = format!("SELECT pseudonym, sealed FROM {table}");
        let rows: Vec<(String, Vec<u8>)> = conn
            .prepare(&select)?
            .query_map([], pair)?
            .collect::<rusqlite::Result<_>>()?;
        for (pseudonym, sealed) in rows {
            named.push((pseudonym, open_id(conn, keys, &sealed, aad)?));
        }
    }
    Ok(named)
}

/// Reads the first two columns of a row.
fn pair<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql>(
    row: &rusqlite::Row<'_>,
) -> rusqlite::Result<(A, B)> {
    Ok((row.get(0)?, row.get(1)?))
}

/// Returns whether `table` has a column named `column`.
pub(crate) fn has_column(conn: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let select = "SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2";
    conn.prepare(select)?.exists([table, column])
}

/// Returns the customers whose Redis counts are still to be removed, as
/// (customer id, erasure id) in order of pseudonym.
pub fn counters_pending(
    conn: &Connection,
    keys: &dyn KeyProvider,
) -> rusqlite::Result<Vec<PendingCounters>> {
    let select = "SELECT p.sealed, p.erasure_id, p.announce, COALESCE(e.requested_unix_ms, 0)
                  FROM erasure_counters_pending AS p
                  LEFT JOIN erasure AS e ON e.erasure_id = p.erasure_id
                  ORDER BY p.pseudonym";
    let mut statement = conn.prepare(select)?;
    let read = |row: &rusqlite::Row<'_>| {
        let columns: (Vec<u8>, String, bool, i64) =
            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        Ok(columns)
    };
    let rows = statement.query_map([], read)?;
    let mut pending = Vec::new();
    for row in rows {
        let (sealed, erasure_id, announce, requested_unix_ms) = row?;
        pending.push(PendingCounters {
            customer: unseal(conn, keys, &sealed, COUNTERS_AAD)?,
            erasure_id,
            requested_unix_ms,
            announce,
        });
    }
    Ok(pending)
}

/// Decrypts an erased customer's id sealed under [`ERASURES_OWNER`].
fn unseal(
    conn: &Connection,
    keys: &dyn KeyProvider,
    sealed: &[u8],
    aad: &[u8],
) -> rusqlite::Result<String> {
    open_id(conn, keys, sealed, aad).map_err(to_sql)
}

/// As [`unseal`], with the key module's error.
fn open_id(
    conn: &Connection,
    keys: &dyn KeyProvider,
    sealed: &[u8],
    aad: &[u8],
) -> Result<String, KeyError> {
    // The owner is a system owner, which is never destroyed, so a missing
    // plaintext means the data key table was changed by hand.
    let plaintext = keys::decrypt(conn, keys, ERASURES_OWNER, sealed, aad)?.ok_or_else(|| {
        KeyError::SystemKeyLost {
            owner: ERASURES_OWNER.to_owned(),
        }
    })?;
    // The sidecar seals only UTF-8, and the tag authenticates it.
    Ok(String::from_utf8_lossy(&plaintext).into_owned())
}

/// Returns whether the Redis counts of erasure `erasure_id` are still to be
/// removed.
pub fn counters_pending_for(conn: &Connection, erasure_id: &str) -> rusqlite::Result<bool> {
    let select = "SELECT 1 FROM erasure_counters_pending WHERE erasure_id = ?1";
    conn.prepare(select)?.exists([erasure_id])
}

/// Notes that the Redis counts of the customer of `pseudonym` were removed.
pub fn counters_cleared(conn: &Connection, pseudonym: &str) -> rusqlite::Result<()> {
    let delete = "DELETE FROM erasure_counters_pending WHERE pseudonym = ?1";
    conn.execute(delete, [pseudonym]).map(drop)
}

/// Counts a failed attempt to remove the Redis counts of the customer of
/// `pseudonym`.
pub fn counters_failed(conn: &Connection, pseudonym: &str) -> rusqlite::Result<()> {
    let update = "UPDATE erasure_counters_pending SET attempts = attempts + 1 WHERE pseudonym = ?1";
    conn.execute(update, [pseudonym]).map(drop)
}

/// Records the version of the erased-customer set that first carried the
/// erasure; a version already recorded is kept.
pub fn set_version(conn: &Connection, erasure_id: &str, version: u64) -> rusqlite::Result<()> {
    let update =
        "UPDATE erasure SET erasures_version = ?2 WHERE erasure_id = ?1 AND erasures_version = 0";
    conn.execute(update, params![erasure_id, version]).map(drop)
}

/// Removes the customers whose tokens have expired by `now_unix_s`, then
/// returns the rest as (customer id, refuse until) in ascending order of
/// customer id.
pub fn erased_customers(
    conn: &Connection,
    keys: &dyn KeyProvider,
    now_unix_s: i64,
) -> rusqlite::Result<Vec<(String, i64)>> {
    let expired = "DELETE FROM erased_customer WHERE refuse_until_unix_s <= ?1";
    conn.execute(expired, [now_unix_s])?;
    let mut statement = conn.prepare_cached(SELECT_ERASED)?;
    let rows = statement.query_map([], |row| Ok((row.get(1)?, row.get(2)?)))?;
    let mut erased = Vec::new();
    for row in rows {
        let (sealed, refuse_until): (Vec<u8>, i64) = row?;
        erased.push((unseal(conn, keys, &sealed, ERASED_AAD)?, refuse_until));
    }
    erased.sort();
    Ok(erased)
}

/// Stores the version of the erased-customer set an instance applied.
pub fn store_ack(
    conn: &Connection,
    instance: &str,
    version: u64,
    now_unix_s: i64,
) -> rusqlite::Result<()> {
    let values = params![instance, version, now_unix_s];
    conn.execute(UPSERT_ACK, values).map(drop)
}

/// Returns the highest version of the erased-customer set that an erasure
/// recorded, 0 when none did.
pub fn newest_version(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(MAX(erasures_version), 0) FROM erasure",
        [],
        |row| row.get(0),
    )
}

/// Returns every stored acknowledgement as (instance, version, time).
pub fn stored_acks(conn: &Connection) -> rusqlite::Result<Vec<(String, u64, i64)>> {
    let mut statement = conn
        .prepare("SELECT instance_id, erasures_version, acked_unix_s FROM instance_erasure_ack")?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the key file of every test's erased ids, kept for the whole run.
    fn keys() -> &'static dyn KeyProvider {
        static KEYS: std::sync::OnceLock<crate::keys::test_support::TestKeyFile> =
            std::sync::OnceLock::new();
        &KEYS
            .get_or_init(crate::keys::test_support::TestKeyFile::new)
            .keys
    }

    fn open() -> Connection {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // The full schema, as the store creates it.
        let conn = crate::store::test_support::open_writer(&path);
        std::mem::forget(dir);
        conn
    }

    fn seed(conn: &Connection, customer: &str, stripe_id: &str) {
        conn.execute_batch(&format!(
            "INSERT INTO usage_minute VALUES ('{customer}', 60, 'basic', 5, 1, 100);
             INSERT INTO usage_minute VALUES ('{customer}', 120, 'basic', 3, 0, 50);
             INSERT INTO billing_dirty VALUES ('{customer}', 120);
             INSERT INTO meter_bucket VALUES ('{customer}', 'api_requests', 60, 5, 1);
             INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                                      stripe_pseudonym, created_unix_s)
                 VALUES ('id-{customer}', '{customer}', 'api_requests', 60, 5, 'sent',
                         '{stripe_id}', 1);
             INSERT INTO counter_outbox (customer, bucket_unix_s, admitted, requests)
                 VALUES ('{customer}', 120, 3, 3);
             INSERT INTO stripe_customer VALUES ('{customer}', '{stripe_id}', 1);
             INSERT INTO stripe_tier_state VALUES ('{stripe_id}', 'pro', 1, 'evt_1', 1, 1,
                                                   NULL, NULL, 1);
             INSERT INTO stripe_tier_metadata_pending VALUES ('{stripe_id}', 'pro', 1, 0, 0);
             INSERT OR IGNORE INTO stripe_identity VALUES ('{stripe_id}', x'00');
             INSERT INTO customer_identity VALUES ('{customer}', x'00');"
        ))
        .unwrap();
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |row| row.get(0)).unwrap()
    }

    fn request(customer: &str) -> EraseRequest<'_> {
        EraseRequest {
            customer,
            subject_hash: "ab12",
            pseudonym: "cd34",
            now_unix_ms: 5_000,
            first_erased_unix_ms: 5_000,
            refuse_until_unix_s: 90_000,
            shared_counters: false,
            announce: true,
            extends_refusal: false,
            forward_to: &[],
        }
    }

    fn receipt(position: u64) -> Receipt {
        Receipt {
            position,
            entry_hash: "ff".into(),
        }
    }

    #[test]
    fn stripe_customer_billing_another_customer_is_kept() {
        let mut conn = open();
        seed(&conn, "cd34", "cus_A");
        seed(&conn, "globex", "cus_G");
        // cd34's usage went to cus_G before cus_G was mapped to globex.
        conn.execute_batch(
            "INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                                      stripe_pseudonym, created_unix_s)
                 VALUES ('id-old', 'cd34', 'api_requests', 120, 3, 'sent', 'cus_G', 1);",
        )
        .unwrap();

        let (erasure, _) = erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(receipt(1))
        })
        .unwrap();

        assert_eq!(erasure.records["stripe_identity"], 1);
        assert_eq!(erasure.records["stripe_tier_state"], 1);
        for table in ["stripe_identity", "stripe_tier_state"] {
            let column = match table {
                "stripe_identity" => "pseudonym",
                _ => "stripe_pseudonym",
            };
            let remaining = count(
                &conn,
                &format!("SELECT COUNT(*) FROM {table} WHERE {column} = 'cus_G'"),
            );
            assert_eq!(remaining, 1, "{table}");
        }
    }

    #[test]
    fn erasure_removes_every_trace_and_keeps_invoiced_totals() {
        let mut conn = open();
        seed(&conn, "cd34", "cus_A");
        seed(&conn, "globex", "cus_G");

        let (erasure, performed) =
            erase(&mut conn, keys(), request("acme"), &mut |_, id, records| {
                assert_eq!(id, "er_ab12");
                records.insert("data_key".into(), 1);
                Ok(receipt(1))
            })
            .unwrap();

        assert!(performed);
        assert_eq!(erasure.records["usage_minute_anonymized"], 1);
        assert_eq!(erasure.records["usage_minute_deleted"], 1);
        assert_eq!(erasure.records["stripe_tier_state"], 1);
        assert_eq!(erasure.records["data_key"], 1);
        assert_eq!(erasure.records["customer_identity"], 1);
        assert_eq!(erasure.records["stripe_identity"], 1);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM customer_identity"), 1);
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM stripe_identity WHERE pseudonym = 'cus_G'"
            ),
            1
        );
        for table in [
            "usage_minute",
            "billing_dirty",
            "meter_bucket",
            "meter_event",
            "counter_outbox",
            "stripe_customer",
        ] {
            let left = count(
                &conn,
                &format!("SELECT COUNT(*) FROM {table} WHERE customer = 'cd34'"),
            );
            assert_eq!(left, 0, "{table}");
            let other = count(
                &conn,
                &format!("SELECT COUNT(*) FROM {table} WHERE customer = 'globex'"),
            );
            assert!(other > 0, "{table} of another customer");
        }
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM stripe_tier_state WHERE stripe_pseudonym = 'cus_A'"
            ),
            0
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM stripe_identity WHERE pseudonym = 'cus_A'"
            ),
            0
        );
        assert_eq!(
            count(
                &conn,
                "SELECT admitted FROM usage_anonymous WHERE minute_unix_s = 60"
            ),
            5
        );
        assert_eq!(
            erased_customers(&conn, keys(), 1).unwrap(),
            [("acme".to_owned(), 90_000)]
        );
        assert_eq!(by_id(&conn, "er_ab12").unwrap().unwrap(), erasure);
    }

    #[test]
    fn repeated_erasure_returns_the_first() {
        let mut conn = open();
        seed(&conn, "cd34", "cus_A");
        let mut calls = 0;
        let mut record = |_: &Connection, _: &str, _: &mut BTreeMap<String, u64>| {
            calls += 1;
            Ok(receipt(calls))
        };
        let (first, _) = erase(&mut conn, keys(), request("acme"), &mut record).unwrap();

        let (second, performed) = erase(&mut conn, keys(), request("acme"), &mut record).unwrap();

        assert!(!performed);
        assert_eq!(second, first);
        assert_eq!(calls, 1, "the audit entry is appended once");
    }

    #[test]
    fn erasure_is_queued_once_for_each_peer() {
        let mut conn = open();
        let peers = ["http://a:1".to_owned(), "http://b:2".to_owned()];
        let forwarded = EraseRequest {
            forward_to: &peers,
            ..request("acme")
        };
        let mut record = |_: &Connection, _: &str, _: &mut BTreeMap<String, u64>| Ok(receipt(1));
        let (first, _) = erase(&mut conn, keys(), forwarded, &mut record).unwrap();
        let (_, performed) = erase(&mut conn, keys(), forwarded, &mut record).unwrap();

        assert!(!performed);
        let due = forward::due(&conn, keys(), 5_000).unwrap();
        let queued: Vec<(&str, &str, &str, i64)> = due
            .iter()
            .map(|row| {
                (
                    row.erasure_id.as_str(),
                    row.peer.as_str(),
                    row.customer.as_str(),
                    row.erased_at_unix_ms,
                )
            })
            .collect();
        let id = first.erasure_id.as_str();
        assert_eq!(
            queued,
            [
                (id, "http://a:1", "acme", 5_000),
                (id, "http://b:2", "acme", 5_000)
            ]
        );
    }

    #[test]
    fn late_peer_resend_returns_first() {
        let mut conn = open();
        // The peer erased the customer long ago, so the refusal period has
        // ended by the time its erasure arrives here.
        let passed_on = EraseRequest {
            now_unix_ms: 90_000_000,
            first_erased_unix_ms: 5_000,
            refuse_until_unix_s: 3_605,
            ..request("acme")
        };
        let mut calls = 0;
        let mut record = |_: &Connection, _: &str, _: &mut BTreeMap<String, u64>| {
            calls += 1;
            Ok(receipt(calls))
        };
        let (first, performed) = erase(&mut conn, keys(), passed_on, &mut record).unwrap();
        assert!(performed);
        assert_eq!(first.requested_unix_ms, 5_000);

        let resent = EraseRequest {
            now_unix_ms: 95_000_000,
            ..passed_on
        };
        let (second, performed) = erase(&mut conn, keys(), resent, &mut record).unwrap();
        assert!(!performed);
        assert_eq!(second, first);
        // A new request after the refusal period is a new erasure.
        let new = EraseRequest {
            now_unix_ms: 95_000_000,
            first_erased_unix_ms: 95_000_000,
            refuse_until_unix_s: 98_600,
            ..request("acme")
        };
        let (third, performed) = erase(&mut conn, keys(), new, &mut record).unwrap();
        assert!(performed);
        assert_eq!(third.erasure_id, "er_ab12_2");
        assert_eq!(calls, 2);
    }

    #[test]
    fn failed_queueing_for_peers_rolls_the_erasure_back() {
        let mut conn = open();
        seed(&conn, "cd34", "cus_A");
        conn.execute_batch("DROP TABLE erasure_forward").unwrap();
        let peers = ["http://a:1".to_owned()];
        let forwarded = EraseRequest {
            forward_to: &peers,
            ..request("acme")
        };

        let mut record = |_: &Connection, _: &str, _: &mut BTreeMap<String, u64>| Ok(receipt(1));
        let result = erase(&mut conn, keys(), forwarded, &mut record);

        assert!(result.is_err());
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM usage_minute"), 2);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM erasure"), 0);
        // With the table back, the same request erases the customer.
        conn.execute_batch(forward::SCHEMA).unwrap();
        let (_, performed) = erase(&mut conn, keys(), forwarded, &mut record).unwrap();
        assert!(performed);
        assert_eq!(count(&conn, "SELECT COUNT(*) FROM erasure_forward"), 1);
    }

    #[test]
    fn erasure_after_the_refusal_period_is_a_new_one() {
        let mut conn = open();
        let (first, _) = erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(receipt(1))
        })
        .unwrap();
        seed(&conn, "cd34", "cus_A");
        let later = EraseRequest {
            now_unix_ms: 90_000_000,
            first_erased_unix_ms: 90_000_000,
            refuse_until_unix_s: 100_000,
            ..request("acme")
        };

        let (second, performed) =
            erase(&mut conn, keys(), later, &mut |_, _, _| Ok(receipt(2))).unwrap();

        assert!(performed);
        assert_eq!(first.erasure_id, "er_ab12");
        assert_eq!(second.erasure_id, "er_ab12_2");
        assert_eq!(second.receipt.position, 2);
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM usage_minute WHERE customer = 'cd34'"
            ),
            0
        );
        assert_eq!(by_subject(&conn, "ab12").unwrap().unwrap(), second);
        assert_eq!(erasure_id("ab12", 0), "er_ab12");
    }

    #[test]
    fn failed_audit_entry_rolls_the_erasure_back() {
        let mut conn = open();
        seed(&conn, "cd34", "cus_A");

        let result = erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Err(rusqlite::Error::InvalidQuery)
        });

        assert!(result.is_err());
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM usage_minute WHERE customer = 'cd34'"
            ),
            2
        );
        assert!(by_subject(&conn, "ab12").unwrap().is_none());
    }

    #[test]
    fn version_is_recorded_once() {
        let mut conn = open();
        erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(receipt(1))
        })
        .unwrap();
        assert_eq!(newest_version(&conn).unwrap(), 0);

        set_version(&conn, "er_ab12", 7).unwrap();
        set_version(&conn, "er_ab12", 9).unwrap();

        assert_eq!(
            by_id(&conn, "er_ab12").unwrap().unwrap().erasures_version,
            7
        );
        assert_eq!(newest_version(&conn).unwrap(), 7);
    }

    #[test]
    fn expired_customers_are_pruned() {
        let mut conn = open();
        erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(receipt(1))
        })
        .unwrap();

        assert_eq!(erased_customers(&conn, keys(), 89_999).unwrap().len(), 1);
        assert!(erased_customers(&conn, keys(), 90_000).unwrap().is_empty());
    }

    #[test]
    fn acks_are_stored_and_replaced() {
        let conn = open();

        store_ack(&conn, "i1", 3, 10).unwrap();
        store_ack(&conn, "i1", 4, 20).unwrap();

        assert_eq!(stored_acks(&conn).unwrap(), [("i1".to_owned(), 4, 20)]);
    }

    #[test]
    fn shared_counters_stay_queued_until_cleared() {
        let mut conn = open();
        let shared = EraseRequest {
            shared_counters: true,
            ..request("acme")
        };
        erase(&mut conn, keys(), shared, &mut |_, _, _| Ok(receipt(1))).unwrap();

        assert_eq!(
            counters_pending(&conn, keys()).unwrap(),
            [PendingCounters {
                customer: "acme".into(),
                erasure_id: "er_ab12".into(),
                requested_unix_ms: 5_000,
                announce: true,
            }]
        );
        assert!(counters_pending_for(&conn, "er_ab12").unwrap());
        counters_failed(&conn, "cd34").unwrap();
        assert_eq!(
            count(&conn, "SELECT attempts FROM erasure_counters_pending"),
            1
        );
        counters_cleared(&conn, "cd34").unwrap();
        assert!(!counters_pending_for(&conn, "er_ab12").unwrap());
    }

    #[test]
    fn erasure_in_force_extends_refusal() {
        let mut conn = open();
        let refused_until =
            |conn: &Connection| count(conn, "SELECT refuse_until_unix_s FROM erased_customer");
        // Only the first call erases, so only it appends an entry.
        let mut record = |_: &Connection, _: &str, _: &mut BTreeMap<String, u64>| Ok(receipt(1));
        erase(&mut conn, keys(), request("acme"), &mut record).unwrap();

        let cases = [
            (true, 120_000, 120_000),
            (true, 100_000, 120_000),
            (false, 150_000, 120_000),
        ];
        for (extends_refusal, refuse_until_unix_s, expected) in cases {
            let later = EraseRequest {
                refuse_until_unix_s,
                announce: false,
                extends_refusal,
                ..request("acme")
            };
            let (erasure, performed) = erase(&mut conn, keys(), later, &mut record).unwrap();

            assert!(!performed);
            assert_eq!(erasure.erasure_id, "er_ab12");
            assert_eq!(refused_until(&conn), expected);
        }
    }

    #[test]
    fn propagated_erasure_is_not_announced() {
        let mut conn = open();
        let propagated = EraseRequest {
            shared_counters: true,
            announce: false,
            ..request("acme")
        };
        erase(&mut conn, keys(), propagated, &mut |_, _, _| Ok(receipt(1))).unwrap();

        let pending = counters_pending(&conn, keys()).unwrap();
        assert_eq!(pending.len(), 1);
        assert!(!pending[0].announce);
    }

    #[test]
    fn lost_key_of_erased_ids_is_an_error() {
        let mut conn = open();
        let shared = EraseRequest {
            shared_counters: true,
            ..request("acme")
        };
        erase(&mut conn, keys(), shared, &mut |_, _, _| Ok(receipt(1))).unwrap();
        conn.execute("DELETE FROM data_key WHERE owner = ?1", [ERASURES_OWNER])
            .unwrap();

        let err = erased_customers(&conn, keys(), 1).unwrap_err().to_string();
        assert!(err.contains("system:erasures"), "{err}");
        assert!(counters_pending(&conn, keys()).is_err());
    }

    #[test]
    fn missing_tables_are_errors() {
        let conn = Connection::open_in_memory().unwrap();

        assert!(stripe_pseudonyms(&conn, "acme").is_err());
        assert!(set_version(&conn, "er_1", 1).is_err());
        assert!(erased_customers(&conn, keys(), 1).is_err());
        assert!(store_ack(&conn, "i1", 1, 1).is_err());
        assert!(stored_acks(&conn).is_err());
        assert!(newest_version(&conn).is_err());
        assert!(by_id(&conn, "er_1").is_err());
        assert!(counters_pending(&conn, keys()).is_err());
        assert!(counters_pending_for(&conn, "er_1").is_err());
        assert!(counters_cleared(&conn, "acme").is_err());
        assert!(counters_failed(&conn, "acme").is_err());
    }

    fn intact() -> Verification {
        Verification {
            intact: true,
            entries: 3,
            first_bad_position: 0,
            problem: String::new(),
            head_hash: String::new(),
        }
    }

    fn add_entry(conn: &Connection, position: u64, hash: &str) {
        conn.execute(
            "INSERT INTO audit_log VALUES (?1, 0, 'a', 'b', NULL, 0, x'00', ?2, ?3)",
            params![
                position,
                if position == 1 {
                    crate::audit::GENESIS_HASH.to_owned()
                } else {
                    format!("h{}", position - 1)
                },
                hash
            ],
        )
        .unwrap();
    }

    #[test]
    fn receipts_and_head_must_match_the_log() {
        let mut conn = open();
        for position in 1..=3 {
            add_entry(&conn, position, &format!("h{position}"));
        }
        erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(Receipt {
                position: 2,
                entry_hash: "h2".into(),
            })
        })
        .unwrap();
        record_head(
            &conn,
            &Receipt {
                position: 3,
                entry_hash: "h3".into(),
            },
        )
        .unwrap();
        let mut verification = intact();
        check_receipts(&conn, &mut verification).unwrap();
        assert!(verification.intact, "{}", verification.problem);

        // The erasure's entry changed, and the last entry was cut off.
        conn.execute_batch("DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;")
            .unwrap();
        conn.execute(
            "UPDATE audit_log SET entry_hash = 'x' WHERE position = 2",
            [],
        )
        .unwrap();
        conn.execute("DELETE FROM audit_log WHERE position = 3", [])
            .unwrap();
        let mut verification = intact();
        check_receipts(&conn, &mut verification).unwrap();
        assert!(!verification.intact);
        assert_eq!(verification.first_bad_position, 2);
        assert!(
            verification.problem.contains("er_ab12"),
            "{}",
            verification.problem
        );

        // A later mismatch does not replace an earlier one.
        let mut earlier = Verification {
            intact: false,
            first_bad_position: 1,
            problem: "first".into(),
            ..intact()
        };
        check_receipts(&conn, &mut earlier).unwrap();
        assert_eq!(earlier.problem, "first");

        conn.execute("DELETE FROM audit_log WHERE position = 2", [])
            .unwrap();
        let mut verification = intact();
        check_receipts(&conn, &mut verification).unwrap();
        assert!(
            verification.problem.contains("missing"),
            "{}",
            verification.problem
        );
    }

    #[test]
    fn ids_in_clear_are_sealed_once() {
        let conn = open();
        conn.execute_batch(
            "DROP TABLE erased_customer;
             DROP TABLE erasure_counters_pending;
             CREATE TABLE erased_customer (customer TEXT PRIMARY KEY, refuse_until_unix_s INTEGER);
             CREATE TABLE erasure_counters_pending (customer TEXT PRIMARY KEY, erasure_id TEXT,
                                                    attempts INTEGER DEFAULT 0);
             INSERT INTO erased_customer VALUES ('acme', 90000);
             INSERT INTO erasure_counters_pending (customer, erasure_id) VALUES ('acme', 'er_1');",
        )
        .unwrap();
        let pseudonym = |customer: &str| format!("p-{customer}");

        seal_ids_in_clear(&conn, keys(), &pseudonym).unwrap();
        seal_ids_in_clear(&conn, keys(), &pseudonym).unwrap();

        assert_eq!(
            erased_customers(&conn, keys(), 1).unwrap(),
            [("acme".to_owned(), 90_000)]
        );
        assert_eq!(
            counters_pending(&conn, keys()).unwrap(),
            [PendingCounters {
                customer: "acme".into(),
                erasure_id: "er_1".into(),
                requested_unix_ms: 0,
                announce: true,
            }]
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM erased_customer WHERE pseudonym = 'p-acme'"
            ),
            1
        );
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM erasure_counters_pending WHERE pseudonym = 'p-acme'"
            ),
            1
        );
    }

    #[test]
    fn failed_sealing_is_an_error() {
        let conn = open();
        conn.execute_batch(
            "DROP TABLE erased_customer;
             CREATE TABLE erased_customer (customer TEXT PRIMARY KEY, refuse_until_unix_s INTEGER);
             INSERT INTO erased_customer VALUES ('acme', 90000);
             DROP TABLE data_key;",
        )
        .unwrap();

        assert!(seal_ids_in_clear(&conn, keys(), &str::to_owned).is_err());
        assert!(has_column(&Connection::open_in_memory().unwrap(), "t", "c").is_ok());
    }

    #[test]
    fn empty_log_without_head_is_intact() {
        let conn = open();
        let mut verification = intact();

        check_receipts(&conn, &mut verification).unwrap();

        assert!(verification.intact, "{}", verification.problem);
    }

    #[test]
    fn unreadable_receipts_are_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        assert!(check_receipts(&conn, &mut intact()).is_err());
        assert!(record_head(&conn, &receipt(1)).is_err());
    }

    #[test]
    fn unreadable_records_are_an_error() {
        let mut conn = open();
        erase(&mut conn, keys(), request("acme"), &mut |_, _, _| {
            Ok(receipt(1))
        })
        .unwrap();
        conn.execute("UPDATE erasure SET records = 'not json'", [])
            .unwrap();

        assert!(by_id(&conn, "er_ab12").is_err());
    }
}
