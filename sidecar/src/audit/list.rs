//! Listing entries with their details decrypted.

use rusqlite::{Connection, params};

use super::append::details_aad;
use super::chain::{COLUMNS, StoredEntry};
use super::{AUDIT_OWNER, AuditError};
use crate::keys::{self, KeyProvider};

/// Maximum number of entries that one [`entries`] call returns.
pub const MAX_LIST_LIMIT: u32 = 1000;

/// An entry of the audit log as listed.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Position, from 1.
    pub position: u64,
    /// Time of the change, in Unix milliseconds.
    pub at_unix_ms: i64,
    /// Author of the change.
    pub actor: String,
    /// Kind of change.
    pub action: String,
    /// Blind index of the customer concerned.
    pub subject_hash: Option<String>,
    /// Number of records the change touched.
    pub records: u64,
    /// The decrypted details; `None` without a key provider or when the
    /// audit data key no longer exists.
    pub details: Option<serde_json::Value>,
    /// Hash of the entry before, or [`GENESIS_HASH`](super::GENESIS_HASH).
    pub prev_hash: String,
    /// Hash of this entry.
    pub entry_hash: String,
}

/// Returns up to `limit` entries after position `after_position`, in
/// ascending order of position; `limit` is capped at [`MAX_LIST_LIMIT`].
/// With a `provider`, details are decrypted. Fails with
/// [`AuditError::Keys`] when stored details fail authentication. Listing
/// does not check the hash chain; [`verify`](super::verify) does.
pub fn entries(
    conn: &Connection,
    provider: Option<&dyn KeyProvider>,
    after_position: u64,
    limit: u32,
) -> Result<Vec<Entry>, AuditError> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit_log WHERE position > ?1 ORDER BY position LIMIT ?2"
    ))?;
    let bounds = params![after_position, limit.min(MAX_LIST_LIMIT)];
    let rows = statement.query_map(bounds, StoredEntry::from_row)?;

    let mut entries = Vec::new();
    for row in rows {
        let stored = row?;
        let details = match provider {
            Some(provider) => decrypt_details(conn, provider, &stored)?,
            None => None,
        };
        entries.push(Entry {
            position: stored.position,
            at_unix_ms: stored.at_unix_ms,
            actor: stored.actor,
            action: stored.action,
            subject_hash: stored.subject_hash,
            records: stored.records,
            details,
            prev_hash: stored.prev_hash,
            entry_hash: stored.entry_hash,
        });
    }
    Ok(entries)
}

fn decrypt_details(
    conn: &Connection,
    provider: &dyn KeyProvider,
    stored: &StoredEntry,
) -> Result<Option<serde_json::Value>, AuditError> {
    let aad = details_aad(stored.position);
    let Some(json) = keys::decrypt(conn, provider, AUDIT_OWNER, &stored.details, &aad)? else {
        return Ok(None);
    };
    match serde_json::from_slice(&json) {
        Ok(details) => Ok(Some(details)),
        Err(source) => Err(AuditError::Details {
            position: stored.position,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::Body;
    use crate::audit::test_support::{append_entries, drop_triggers, new_entry};
    use crate::audit::{GENESIS_HASH, append, verify};
    use crate::keys::test_support::{TestKeyFile, memory_store};

    #[test]
    fn lists_entries_with_decrypted_details() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 3);

        let listed = entries(&conn, Some(&test.keys), 0, 10).unwrap();

        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0].details, Some(new_entry(1).details));
        assert_eq!(listed[2].details, Some(new_entry(3).details));
        assert_eq!(listed[2].entry_hash, receipts[2].entry_hash);
        assert_eq!(listed[2].subject_hash, receipts[2].subject_hash);
    }

    #[test]
    fn lists_after_position_up_to_limit() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, 5);

        let listed = entries(&conn, None, 2, 2).unwrap();
        let rest = entries(&conn, None, 4, 10).unwrap();
        let none = entries(&conn, None, 5, 10).unwrap();

        let positions: Vec<u64> = listed.iter().map(|entry| entry.position).collect();
        assert_eq!(positions, [3, 4]);
        assert_eq!(rest.len(), 1);
        assert!(none.is_empty());
    }

    #[test]
    fn caps_limit() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, i64::from(MAX_LIST_LIMIT) + 1);

        let listed = entries(&conn, None, 0, u32::MAX).unwrap();

        assert_eq!(listed.len(), MAX_LIST_LIMIT as usize);
    }

    #[test]
    fn lists_without_provider_or_audit_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, 1);

        let without_provider = entries(&conn, None, 0, 10).unwrap();
        conn.execute("DELETE FROM data_key WHERE owner = ?1", [AUDIT_OWNER])
            .unwrap();
        let without_key = entries(&conn, Some(&test.keys), 0, 10).unwrap();

        assert_eq!(without_provider[0].details, None);
        assert_eq!(without_key[0].details, None);
        assert_eq!(without_key[0].actor, "cli:alice");
    }

    #[test]
    fn reports_tampered_details() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, 2);
        drop_triggers(&conn);
        conn.execute(
            "UPDATE audit_log SET details = (SELECT details FROM audit_log WHERE position = 2) \
             WHERE position = 1",
            [],
        )
        .unwrap();

        let err = entries(&conn, Some(&test.keys), 0, 10).unwrap_err();

        assert!(matches!(err, AuditError::Keys(_)), "{err}");
    }

    #[test]
    fn reports_details_that_are_not_json() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let details = keys::encrypt(
            &conn,
            &test.keys,
            AUDIT_OWNER,
            b"{not json",
            &details_aad(1),
        )
        .unwrap();
        let body = Body {
            position: 1,
            at_unix_ms: 1,
            actor: "cli:alice",
            action: "erase_customer",
            subject_hash: None,
            records: 0,
            details: &details,
            prev_hash: GENESIS_HASH,
        };
        conn.execute(
            &format!("INSERT INTO audit_log ({COLUMNS}) VALUES (1, 1, 'cli:alice', 'erase_customer', NULL, 0, ?1, ?2, ?3)"),
            rusqlite::params![details, GENESIS_HASH, body.hash()],
        )
        .unwrap();

        let err = entries(&conn, Some(&test.keys), 0, 10).unwrap_err();

        assert!(verify(&conn).unwrap().intact);
        assert!(
            matches!(err, AuditError::Details { position: 1, .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "details of audit entry 1 are not valid JSON"
        );
        append(&conn, &test.keys, &new_entry(2)).unwrap();
    }

    #[test]
    fn reports_out_of_range_position() {
        let conn = memory_store();

        let err = entries(&conn, None, u64::MAX, 10).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    #[test]
    fn reports_missing_table() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();

        let err = entries(&conn, None, 0, 10).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    #[test]
    fn reports_unreadable_row() {
        let conn = memory_store();
        conn.execute_batch(
            "DROP TABLE audit_log;
             CREATE TABLE audit_log (position, at_unix_ms, actor, action, subject_hash,
                 records, details, prev_hash, entry_hash);
             INSERT INTO audit_log VALUES (1, 'noon', 'a', 'b', NULL, 0, x'00', 'p', 'h');",
        )
        .unwrap();

        let err = entries(&conn, None, 0, 10).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }
}
