//! Erasures passed on to peer sidecars: the sidecars of
//! `privacy.erasure_peers`, such as those of the other regions, which keep
//! their own store.
//!
//! An erasure asked of this sidecar queues one row per peer in its own
//! transaction, so a crash cannot lose it. Each row stays until the peer
//! has erased the customer, however long the peer is away, and is tried
//! again with a delay that doubles from 1 s up to 5 minutes.

use rusqlite::{Connection, params};

use super::{ERASURES_OWNER, unseal};
use crate::keys::{self, KeyProvider};
use crate::privacy::to_sql;

/// Table of the erasures still to be passed on, created when missing.
pub const SCHEMA: &str = "
-- One row per erasure and peer sidecar, until the peer has erased the
-- customer. The customer id is encrypted under the data key of owner
-- 'system:erasures'.
CREATE TABLE IF NOT EXISTS erasure_forward (
    erasure_id TEXT NOT NULL,
    peer TEXT NOT NULL,
    sealed BLOB NOT NULL,
    erased_at_unix_ms INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    next_attempt_unix_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (erasure_id, peer)
) WITHOUT ROWID, STRICT;
";

/// Associated data of the sealed customer ids of `erasure_forward`.
const FORWARD_AAD: &[u8] = b"erasure_forward.sealed";

/// Maximum delay between two attempts for one peer, in milliseconds.
const MAX_DELAY_MS: i64 = 300_000;

/// An erasure still to be passed on to one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingForward {
    /// The erasure on this sidecar.
    pub erasure_id: String,
    /// Address of the peer sidecar.
    pub peer: String,
    /// Customer id.
    pub customer: String,
    /// When this sidecar erased the customer, in milliseconds since the
    /// Unix epoch.
    pub erased_at_unix_ms: i64,
    /// Failed attempts so far.
    pub attempts: u64,
}

/// A peer that has not yet erased the customer of one erasure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPeer {
    /// Address of the peer sidecar.
    pub peer: String,
    /// Failed attempts so far.
    pub attempts: u64,
    /// Error of the last attempt, or empty before the first.
    pub last_error: String,
}

/// Queues the erasure of `customer` for every peer of `peers`, inside the
/// erasure's transaction.
pub fn queue(
    conn: &Connection,
    keys: &dyn KeyProvider,
    customer: &str,
    erasure_id: &str,
    erased_at_unix_ms: i64,
    peers: &[String],
) -> rusqlite::Result<()> {
    for peer in peers {
        let sealed = keys::encrypt(conn, keys, ERASURES_OWNER, customer.as_bytes(), FORWARD_AAD)
            .map_err(to_sql)?;
        conn.execute(
            "INSERT OR REPLACE INTO erasure_forward (erasure_id, peer, sealed, erased_at_unix_ms)
             VALUES (?1, ?2, ?3, ?4)",
            params![erasure_id, peer, sealed, erased_at_unix_ms],
        )?;
    }
    Ok(())
}

/// Returns the erasures due to be passed on at `now_unix_ms`, oldest
/// first.
pub fn due(
    conn: &Connection,
    keys: &dyn KeyProvider,
    now_unix_ms: i64,
) -> rusqlite::Result<Vec<PendingForward>> {
    let select = "SELECT erasure_id, peer, sealed, erased_at_unix_ms, attempts
                  FROM erasure_forward WHERE next_attempt_unix_ms <= ?1
                  ORDER BY erased_at_unix_ms, erasure_id, peer";
    let mut statement = conn.prepare(select)?;
    let read = |row: &rusqlite::Row<'_>| {
        let columns: (String, String, Vec<u8>, i64, u64) = (
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        );
        Ok(columns)
    };
    let mut due = Vec::new();
    for row in statement.query_map([now_unix_ms], read)? {
        let (erasure_id, peer, sealed, erased_at_unix_ms, attempts) = row?;
        due.push(PendingForward {
            customer: unseal(conn, keys, &sealed, FORWARD_AAD)?,
            erasure_id,
            peer,
            erased_at_unix_ms,
            attempts,
        });
    }
    Ok(due)
}

/// Notes that `peer` erased the customer of `erasure_id`.
pub fn done(conn: &Connection, erasure_id: &str, peer: &str) -> rusqlite::Result<()> {
    let delete = "DELETE FROM erasure_forward WHERE erasure_id = ?1 AND peer = ?2";
    conn.execute(delete, [erasure_id, peer]).map(drop)
}

/// Counts a failed attempt to pass `erasure_id` on to `peer` and sets the
/// next one after a delay that doubles with each failure, from 1 s up to
/// 5 minutes.
pub fn failed(
    conn: &Connection,
    erasure_id: &str,
    peer: &str,
    error: &str,
    now_unix_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE erasure_forward SET
             attempts = attempts + 1,
             last_error = ?3,
             next_attempt_unix_ms = ?4 + MIN(?5, 1000 * (1 << MIN(attempts, 20)))
         WHERE erasure_id = ?1 AND peer = ?2",
        params![erasure_id, peer, error, now_unix_ms, MAX_DELAY_MS],
    )
    .map(drop)
}

/// Returns the peers that have not yet erased the customer of
/// `erasure_id`, in order of address.
pub fn pending_for(conn: &Connection, erasure_id: &str) -> rusqlite::Result<Vec<PendingPeer>> {
    let select = "SELECT peer, attempts, last_error FROM erasure_forward
                  WHERE erasure_id = ?1 ORDER BY peer";
    let mut statement = conn.prepare(select)?;
    let read = |row: &rusqlite::Row<'_>| {
        Ok(PendingPeer {
            peer: row.get(0)?,
            attempts: row.get(1)?,
            last_error: row.get(2)?,
        })
    };
    statement.query_map([erasure_id], read)?.collect()
}

/// Returns how many erasures for `peer` have failed at least once and
/// still wait.
pub fn failing(conn: &Connection, peer: &str) -> rusqlite::Result<u64> {
    let count = "SELECT COUNT(*) FROM erasure_forward WHERE peer = ?1 AND attempts > 0";
    conn.query_row(count, [peer], |row| row.get(0))
}

/// Returns the peers that erasures wait for but `peers` does not list,
/// each with the number of erasures waiting, in order of address.
pub fn unlisted(conn: &Connection, peers: &[String]) -> rusqlite::Result<Vec<(String, u64)>> {
    let select = "SELECT peer, COUNT(*) FROM erasure_forward GROUP BY peer ORDER BY peer";
    let mut statement = conn.prepare(select)?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let mut unlisted = Vec::new();
    for row in rows {
        let (peer, waiting): (String, u64) = row?;
        if !peers.contains(&peer) {
            unlisted.push((peer, waiting));
        }
    }
    Ok(unlisted)
}

/// Drops every erasure waiting for `peer`, or with a `successor` hands
/// them to it as new, and appends an audit entry (`drop_erasure_peer` or
/// `move_erasure_peer`, by `actor`) that lists them, in one transaction.
/// Returns the ids of the erasures; none, and no entry, when no erasure
/// waits for `peer` or when `successor` is `peer` itself.
pub fn drop_peer(
    conn: &mut Connection,
    keys: &dyn KeyProvider,
    peer: &str,
    successor: Option<&str>,
    actor: &str,
    now_unix_ms: i64,
) -> rusqlite::Result<Vec<String>> {
    if successor == Some(peer) {
        return Ok(Vec::new());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let erasure_ids: Vec<String> = tx
        .prepare("SELECT erasure_id FROM erasure_forward WHERE peer = ?1 ORDER BY erasure_id")?
        .query_map([peer], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if erasure_ids.is_empty() {
        return Ok(erasure_ids);
    }

    if let Some(successor) = successor {
        // An erasure the successor already waits for keeps that row.
        tx.execute(
            "UPDATE OR IGNORE erasure_forward
             SET peer = ?2, attempts = 0, last_error = '', next_attempt_unix_ms = 0
             WHERE peer = ?1",
            [peer, successor],
        )?;
    }
    tx.execute("DELETE FROM erasure_forward WHERE peer = ?1", [peer])?;

    let (action, details) = match successor {
        Some(successor) => (
            "move_erasure_peer",
            serde_json::json!({"peer": peer, "successor": successor, "erasure_ids": erasure_ids}),
        ),
        None => (
            "drop_erasure_peer",
            serde_json::json!({"peer": peer, "erasure_ids": erasure_ids}),
        ),
    };
    let entry = crate::audit::NewEntry {
        at_unix_ms: now_unix_ms,
        actor: actor.to_owned(),
        action: action.into(),
        subject_hash: None,
        records: u64::try_from(erasure_ids.len()).unwrap_or(u64::MAX),
        details,
    };
    let receipt = crate::audit::append(&tx, keys, &entry).map_err(to_sql)?;
    super::record_head(
        &tx,
        &super::Receipt {
            position: receipt.position,
            entry_hash: receipt.entry_hash,
        },
    )?;
    tx.commit()?;
    Ok(erasure_ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_support::TestKeyFile;

    fn open() -> (Connection, TestKeyFile) {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::store::test_support::open_writer(&dir.path().join("db"));
        std::mem::forget(dir);
        (conn, TestKeyFile::new())
    }

    fn peers() -> Vec<String> {
        vec!["http://a:1".into(), "http://b:2".into()]
    }

    #[test]
    fn queued_erasures_are_due_until_done() {
        let (conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();
        queue(&conn, &file.keys, "bob", "er_2", 4_000, &peers()[..1]).unwrap();

        let due_now = due(&conn, &file.keys, 10_000).unwrap();
        let order: Vec<(&str, &str)> = due_now
            .iter()
            .map(|row| (row.customer.as_str(), row.peer.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("bob", "http://a:1"),
                ("alice", "http://a:1"),
                ("alice", "http://b:2")
            ]
        );
        assert_eq!(due_now[1].erasure_id, "er_1");
        assert_eq!(due_now[1].erased_at_unix_ms, 5_000);
        assert_eq!(due_now[1].attempts, 0);

        done(&conn, "er_1", "http://a:1").unwrap();
        let pending = pending_for(&conn, "er_1").unwrap();
        assert_eq!(
            pending,
            [PendingPeer {
                peer: "http://b:2".into(),
                attempts: 0,
                last_error: String::new(),
            }]
        );
        // The id is stored only encrypted.
        let clear: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM erasure_forward WHERE instr(sealed, 'alice') > 0",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(clear, 0);
    }

    #[test]
    fn failures_back_off_up_to_five_minutes() {
        let (conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()[..1]).unwrap();
        let mut now = 10_000;
        let mut delays = Vec::new();
        for _ in 0..12 {
            failed(&conn, "er_1", "http://a:1", "connection refused", now).unwrap();
            let next: i64 = conn
                .query_row(
                    "SELECT next_attempt_unix_ms FROM erasure_forward",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert!(due(&conn, &file.keys, next - 1).unwrap().is_empty());
            assert_eq!(due(&conn, &file.keys, next).unwrap().len(), 1);
            delays.push(next - now);
            now = next;
        }
        assert_eq!(
            delays,
            [
                1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 300_000,
                300_000, 300_000
            ]
        );
        let pending = pending_for(&conn, "er_1").unwrap();
        assert_eq!(pending[0].attempts, 12);
        assert_eq!(pending[0].last_error, "connection refused");
    }

    #[test]
    fn unlisted_peers_are_reported() {
        let (conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();
        queue(&conn, &file.keys, "bob", "er_2", 6_000, &peers()).unwrap();

        let unlisted_peers = unlisted(&conn, &peers()[1..]).unwrap();

        assert_eq!(unlisted_peers, [("http://a:1".to_owned(), 2)]);
        assert!(unlisted(&conn, &peers()).unwrap().is_empty());
    }

    #[test]
    fn dropped_peer_is_audited() {
        let (mut conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();
        queue(&conn, &file.keys, "bob", "er_2", 6_000, &peers()[..1]).unwrap();

        let dropped =
            drop_peer(&mut conn, &file.keys, "http://a:1", None, "cli:ops", 7_000).unwrap();

        assert_eq!(dropped, ["er_1", "er_2"]);
        let left = due(&conn, &file.keys, 10_000).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].peer, "http://b:2");
        let entries = crate::audit::entries(&conn, Some(&file.keys), 0, 10).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].action, "drop_erasure_peer");
        assert_eq!(entries[0].actor, "cli:ops");
        assert_eq!(entries[0].records, 2);
        let head: String = conn
            .query_row(
                "SELECT value FROM sidecar_meta WHERE key = 'audit_head'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert!(head.contains(&entries[0].entry_hash), "{head}");
        // A peer nothing waits for drops nothing and appends no entry.
        let none = drop_peer(&mut conn, &file.keys, "http://c:3", None, "cli:ops", 8_000).unwrap();
        assert!(none.is_empty());
        assert_eq!(
            crate::audit::entries(&conn, Some(&file.keys), 0, 10)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn moved_peer_hands_its_erasures_to_the_successor() {
        let (mut conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();
        queue(&conn, &file.keys, "bob", "er_2", 6_000, &peers()[..1]).unwrap();
        failed(&conn, "er_2", "http://a:1", "down", 6_500).unwrap();

        let moved = drop_peer(
            &mut conn,
            &file.keys,
            "http://a:1",
            Some("http://b:2"),
            "cli:ops",
            7_000,
        )
        .unwrap();

        assert_eq!(moved, ["er_1", "er_2"]);
        let due_now = due(&conn, &file.keys, 7_000).unwrap();
        let rows: Vec<(&str, &str, u64)> = due_now
            .iter()
            .map(|row| (row.erasure_id.as_str(), row.peer.as_str(), row.attempts))
            .collect();
        assert_eq!(rows, [("er_1", "http://b:2", 0), ("er_2", "http://b:2", 0)]);
        let entries = crate::audit::entries(&conn, Some(&file.keys), 0, 10).unwrap();
        assert_eq!(entries[0].action, "move_erasure_peer");
        // A peer moved to itself keeps its erasures.
        let same = "http://b:2";
        let moved = drop_peer(&mut conn, &file.keys, same, Some(same), "cli:ops", 8_000).unwrap();
        assert!(moved.is_empty());
        assert_eq!(due(&conn, &file.keys, 8_000).unwrap().len(), 2);
    }

    #[test]
    fn failed_audit_entry_keeps_the_rows() {
        let (mut conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();

        let result = drop_peer(&mut conn, &file.keys, "http://a:1", None, "", 7_000);

        assert!(result.is_err());
        assert_eq!(due(&conn, &file.keys, 10_000).unwrap().len(), 2);
        // Without the table that records the last entry, nothing is kept.
        conn.execute_batch("DROP TABLE sidecar_meta").unwrap();
        let result = drop_peer(&mut conn, &file.keys, "http://a:1", None, "cli:ops", 7_000);
        assert!(result.is_err());
        assert_eq!(due(&conn, &file.keys, 10_000).unwrap().len(), 2);
    }

    #[test]
    fn failing_rows_are_counted_per_peer() {
        let (conn, file) = open();
        queue(&conn, &file.keys, "alice", "er_1", 5_000, &peers()).unwrap();
        queue(&conn, &file.keys, "bob", "er_2", 6_000, &peers()).unwrap();

        failed(&conn, "er_1", "http://a:1", "rejected", 7_000).unwrap();

        assert_eq!(failing(&conn, "http://a:1").unwrap(), 1);
        assert_eq!(failing(&conn, "http://b:2").unwrap(), 0);
    }

    #[test]
    fn missing_table_is_an_error() {
        let (conn, file) = open();
        conn.execute_batch("DROP TABLE erasure_forward").unwrap();

        assert!(queue(&conn, &file.keys, "alice", "er_1", 1, &peers()).is_err());
        assert!(due(&conn, &file.keys, 1).is_err());
        assert!(pending_for(&conn, "er_1").is_err());
        assert!(unlisted(&conn, &peers()).is_err());
        assert!(failing(&conn, "http://a:1").is_err());
        let mut conn = conn;
        assert!(drop_peer(&mut conn, &file.keys, "http://a:1", None, "cli:ops", 1).is_err());
    }
}
