//! Appending entries, in the caller's transaction.

use rusqlite::{Connection, OptionalExtension, params};

use super::chain::{Body, COLUMNS};
use super::{AUDIT_OWNER, AuditError, GENESIS_HASH, MAX_DETAILS_BYTES, NewEntry, Receipt};
use crate::keys::{self, KeyProvider};

/// Maximum length of an entry's actor in bytes.
const MAX_ACTOR_LEN: usize = 256;

/// Maximum length of an entry's action in bytes.
const MAX_ACTION_LEN: usize = 64;

/// Appends `entry` at the next position, linked to the last entry, with its
/// details encrypted under the data key of [`AUDIT_OWNER`].
///
/// Call it inside the transaction that makes the change, so the entry
/// commits or rolls back with it. Fails with [`AuditError::InvalidEntry`]
/// when a field is out of range, and with [`AuditError::Keys`] when the
/// details cannot be encrypted.
pub fn append(
    conn: &Connection,
    provider: &dyn KeyProvider,
    entry: &NewEntry,
) -> Result<Receipt, AuditError> {
    let details_json = check(entry)?;

    let (position, prev_hash) = next_link(conn)?;
    let aad = details_aad(position);
    let details = keys::encrypt(conn, provider, AUDIT_OWNER, details_json.as_bytes(), &aad)?;
    let body = Body {
        position,
        at_unix_ms: entry.at_unix_ms,
        actor: &entry.actor,
        action: &entry.action,
        subject_hash: entry.subject_hash.as_deref(),
        records: entry.records,
        details: &details,
        prev_hash: &prev_hash,
    };
    let entry_hash = body.hash();

    conn.execute(
        &format!("INSERT INTO audit_log ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
        params![
            body.position,
            body.at_unix_ms,
            body.actor,
            body.action,
            body.subject_hash,
            body.records,
            body.details,
            body.prev_hash,
            entry_hash,
        ],
    )?;
    Ok(Receipt {
        position,
        entry_hash,
        subject_hash: entry.subject_hash.clone(),
    })
}

/// Associated data of an entry's details, so that details moved to another
/// entry fail authentication.
pub(super) fn details_aad(position: u64) -> Vec<u8> {
    format!("audit_log.details:{position}").into_bytes()
}

/// Returns the next position and the hash it links to: one past the last
/// entry and that entry's hash, or 1 and [`GENESIS_HASH`] for an empty log.
fn next_link(conn: &Connection) -> Result<(u64, String), AuditError> {
    let last = conn
        .query_row(
            "SELECT position, entry_hash FROM audit_log ORDER BY position DESC LIMIT 1",
            [],
            |row| Ok((row.get::<_, u64>(0)?, row.get::<_, String>(1)?)),
        )
        .optional()?;
    Ok(match last {
        Some((position, hash)) => (position + 1, hash),
        None => (1, GENESIS_HASH.to_owned()),
    })
}

/// Checks the fields of `entry` and returns its details as compact JSON.
fn check(entry: &NewEntry) -> Result<String, AuditError> {
    let invalid = |field, reason: String| Err(AuditError::InvalidEntry { field, reason });

    if entry.at_unix_ms < 0 {
        let reason = format!("is {}; give a time in Unix milliseconds", entry.at_unix_ms);
        return invalid("at_unix_ms", reason);
    }
    let actor_len = entry.actor.len();
    if actor_len == 0 || actor_len > MAX_ACTOR_LEN || entry.actor.chars().any(char::is_control) {
        let reason = format!(
            "must be 1 to {MAX_ACTOR_LEN} bytes without control characters; it has \
             {actor_len} bytes"
        );
        return invalid("actor", reason);
    }
    if !is_action(&entry.action) {
        let reason = format!(
            "{:?} must be 1 to {MAX_ACTION_LEN} of a-z, 0-9 and _, such as erase_customer",
            entry.action
        );
        return invalid("action", reason);
    }
    if let Some(subject_hash) = &entry.subject_hash
        && !is_lowercase_sha256_hex(subject_hash)
    {
        let reason = format!(
            "{subject_hash:?} must be 64 lowercase hex digits, a blind index from \
             keys::blind_index"
        );
        return invalid("subject_hash", reason);
    }
    if i64::try_from(entry.records).is_err() {
        let reason = format!("is {}; the maximum is {}", entry.records, i64::MAX);
        return invalid("records", reason);
    }
    let details = entry.details.to_string();
    if details.len() > MAX_DETAILS_BYTES {
        let reason = format!(
            "is {} bytes of JSON; the maximum is {MAX_DETAILS_BYTES}",
            details.len()
        );
        return invalid("details", reason);
    }
    Ok(details)
}

fn is_action(action: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    (1..=MAX_ACTION_LEN).contains(&action.len()) && action.bytes().all(allowed)
}

fn is_lowercase_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::test_support::{SUBJECT, append_entries, new_entry};
    use crate::audit::{entries, verify};
    use crate::keys::test_support::{TestKeyFile, memory_store};

    fn stored_details(conn: &Connection, position: u64) -> Vec<u8> {
        conn.query_row(
            "SELECT details FROM audit_log WHERE position = ?1",
            [position],
            |row| row.get(0),
        )
        .unwrap()
    }

    fn log_len(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM audit_log", [], |row| row.get(0))
            .unwrap()
    }

    /// Appends `entry` to an empty log and returns the error and the
    /// number of entries afterwards.
    fn append_error(entry: &NewEntry) -> (AuditError, i64) {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let err = append(&conn, &test.keys, entry).unwrap_err();
        (err, log_len(&conn))
    }

    #[test]
    fn first_entry_links_to_genesis() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        let receipt = append(&conn, &test.keys, &new_entry(1_700_000_000_000)).unwrap();
        let listed = entries(&conn, None, 0, 10).unwrap();

        assert_eq!(receipt.position, 1);
        assert_eq!(receipt.subject_hash.as_deref(), Some(SUBJECT));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].prev_hash, GENESIS_HASH);
        assert_eq!(listed[0].entry_hash, receipt.entry_hash);
        assert_eq!(listed[0].at_unix_ms, 1_700_000_000_000);
        assert_eq!(listed[0].actor, "cli:alice");
        assert_eq!(listed[0].action, "erase_customer");
        assert_eq!(listed[0].records, 3);
    }

    #[test]
    fn entries_link_to_previous_hash() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        let receipts = append_entries(&conn, &test.keys, 3);
        let listed = entries(&conn, None, 0, 10).unwrap();

        let positions: Vec<u64> = receipts.iter().map(|receipt| receipt.position).collect();
        assert_eq!(positions, [1, 2, 3]);
        assert_eq!(listed[1].prev_hash, receipts[0].entry_hash);
        assert_eq!(listed[2].prev_hash, receipts[1].entry_hash);
        assert!(verify(&conn).unwrap().intact);
    }

    #[test]
    fn details_are_encrypted_at_rest() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        append(&conn, &test.keys, &new_entry(1)).unwrap();
        let stored = stored_details(&conn, 1);
        let plaintext =
            keys::decrypt(&conn, &test.keys, AUDIT_OWNER, &stored, &details_aad(1)).unwrap();

        assert!(!stored.windows(10).any(|window| window == b"erasure_id"));
        assert_eq!(
            plaintext.as_deref(),
            Some(br#"{"erasure_id":"er-1","records":3}"#.as_slice())
        );
    }

    #[test]
    fn audit_key_is_created_once() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        append_entries(&conn, &test.keys, 2);
        let keys: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM data_key WHERE owner = ?1",
                [AUDIT_OWNER],
                |row| row.get(0),
            )
            .unwrap();

        assert_eq!(keys, 1);
    }

    #[test]
    fn entry_without_subject_is_accepted() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let entry = NewEntry {
            subject_hash: None,
            action: "set_asset_regions".to_owned(),
            ..new_entry(1)
        };

        let receipt = append(&conn, &test.keys, &entry).unwrap();

        assert_eq!(receipt.subject_hash, None);
        assert!(verify(&conn).unwrap().intact);
    }

    #[test]
    fn boundary_values_are_accepted() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let entry = NewEntry {
            at_unix_ms: 0,
            actor: "a".repeat(MAX_ACTOR_LEN),
            action: "a_9".repeat(MAX_ACTION_LEN / 3) + "z",
            records: i64::MAX as u64,
            details: serde_json::Value::String("x".repeat(MAX_DETAILS_BYTES - 2)),
            ..new_entry(0)
        };

        append(&conn, &test.keys, &entry).unwrap();
        let listed = entries(&conn, Some(&test.keys), 0, 1).unwrap();

        assert_eq!(listed[0].records, i64::MAX as u64);
        assert_eq!(listed[0].details.as_ref(), Some(&entry.details));
        assert!(verify(&conn).unwrap().intact);
    }

    #[test]
    fn rejects_invalid_fields() {
        let cases = [
            (
                NewEntry {
                    at_unix_ms: -1,
                    ..new_entry(1)
                },
                "at_unix_ms",
            ),
            (
                NewEntry {
                    actor: String::new(),
                    ..new_entry(1)
                },
                "actor",
            ),
            (
                NewEntry {
                    actor: "a".repeat(MAX_ACTOR_LEN + 1),
                    ..new_entry(1)
                },
                "actor",
            ),
            (
                NewEntry {
                    actor: "cli:\nalice".to_owned(),
                    ..new_entry(1)
                },
                "actor",
            ),
            (
                NewEntry {
                    action: String::new(),
                    ..new_entry(1)
                },
                "action",
            ),
            (
                NewEntry {
                    action: "Erase".to_owned(),
                    ..new_entry(1)
                },
                "action",
            ),
            (
                NewEntry {
                    action: "erase-customer".to_owned(),
                    ..new_entry(1)
                },
                "action",
            ),
            (
                NewEntry {
                    action: "a".repeat(MAX_ACTION_LEN + 1),
                    ..new_entry(1)
                },
                "action",
            ),
            (
                NewEntry {
                    subject_hash: Some("ab".to_owned()),
                    ..new_entry(1)
                },
                "subject_hash",
            ),
            (
                NewEntry {
                    subject_hash: Some(SUBJECT.to_uppercase()),
                    ..new_entry(1)
                },
                "subject_hash",
            ),
            (
                NewEntry {
                    subject_hash: Some(SUBJECT.replace('f', "g")),
                    ..new_entry(1)
                },
                "subject_hash",
            ),
            (
                NewEntry {
                    records: i64::MAX as u64 + 1,
                    ..new_entry(1)
                },
                "records",
            ),
            (
                NewEntry {
                    details: serde_json::Value::String("x".repeat(MAX_DETAILS_BYTES - 1)),
                    ..new_entry(1)
                },
                "details",
            ),
        ];

        for (entry, expected) in cases {
            let (err, entries) = append_error(&entry);

            assert!(
                matches!(err, AuditError::InvalidEntry { field, .. } if field == expected),
                "{entry:?}: {err}"
            );
            assert_eq!(entries, 0);
        }
    }

    #[test]
    fn invalid_field_messages_name_value_and_limit() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let messages = [
            (
                NewEntry {
                    at_unix_ms: -5,
                    ..new_entry(1)
                },
                "invalid audit entry: at_unix_ms is -5; give a time in Unix milliseconds",
            ),
            (
                NewEntry {
                    actor: String::new(),
                    ..new_entry(1)
                },
                "invalid audit entry: actor must be 1 to 256 bytes without control characters; it has 0 bytes",
            ),
            (
                NewEntry {
                    action: "Erase".to_owned(),
                    ..new_entry(1)
                },
                "invalid audit entry: action \"Erase\" must be 1 to 64 of a-z, 0-9 and _, such as erase_customer",
            ),
            (
                NewEntry {
                    subject_hash: Some("ab".to_owned()),
                    ..new_entry(1)
                },
                "invalid audit entry: subject_hash \"ab\" must be 64 lowercase hex digits, a blind index from keys::blind_index",
            ),
            (
                NewEntry {
                    records: u64::MAX,
                    ..new_entry(1)
                },
                "invalid audit entry: records is 18446744073709551615; the maximum is 9223372036854775807",
            ),
            (
                NewEntry {
                    details: serde_json::Value::String("x".repeat(MAX_DETAILS_BYTES)),
                    ..new_entry(1)
                },
                "invalid audit entry: details is 65538 bytes of JSON; the maximum is 65536",
            ),
        ];

        for (entry, expected) in messages {
            let err = append(&conn, &test.keys, &entry).unwrap_err();

            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn rolled_back_append_leaves_no_trace() {
        let mut conn = memory_store();
        let test = TestKeyFile::new();

        let tx = conn.transaction().unwrap();
        append(&tx, &test.keys, &new_entry(1)).unwrap();
        drop(tx);
        let receipt = append(&conn, &test.keys, &new_entry(2)).unwrap();

        assert_eq!(receipt.position, 1);
        assert_eq!(log_len(&conn), 1);
        assert!(verify(&conn).unwrap().intact);
    }

    #[test]
    fn append_reports_missing_table() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::keys::SCHEMA).unwrap();
        let test = TestKeyFile::new();

        let err = append(&conn, &test.keys, &new_entry(1)).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
        assert_eq!(err.to_string(), "audit log query failed");
    }

    #[test]
    fn append_reports_unavailable_key() {
        let conn = memory_store();
        let mut test = TestKeyFile::new();
        append(&conn, &test.keys, &new_entry(1)).unwrap();
        test.keys.rotate().unwrap();
        test.keys.retire("kek-1").unwrap();

        let err = append(&conn, &test.keys, &new_entry(2)).unwrap_err();

        assert!(matches!(err, AuditError::Keys(_)), "{err}");
        assert_eq!(
            err.to_string(),
            "failed to encrypt or decrypt audit entry details"
        );
        assert_eq!(log_len(&conn), 1);
    }

    #[test]
    fn append_reports_failed_insert() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        conn.execute_batch(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON audit_log
             BEGIN SELECT RAISE(ABORT, 'read-only for this test'); END;",
        )
        .unwrap();

        let err = append(&conn, &test.keys, &new_entry(1)).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    #[test]
    fn triggers_keep_the_log_append_only() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 2);
        let statements = [
            "UPDATE audit_log SET actor = 'mallory' WHERE position = 1".to_owned(),
            "DELETE FROM audit_log WHERE position = 2".to_owned(),
            format!(
                "INSERT OR REPLACE INTO audit_log ({COLUMNS}) \
                 SELECT {COLUMNS} FROM audit_log WHERE position = 1"
            ),
            format!(
                "INSERT INTO audit_log ({COLUMNS}) VALUES (4, 0, 'a', 'b', NULL, 0, x'00', '{}', 'h')",
                receipts[1].entry_hash
            ),
            format!(
                "INSERT INTO audit_log ({COLUMNS}) VALUES (3, 0, 'a', 'b', NULL, 0, x'00', '{}', 'h')",
                receipts[0].entry_hash
            ),
        ];

        for statement in &statements {
            let result = conn.execute(statement, []);

            assert!(result.is_err(), "{statement}");
        }
        assert_eq!(log_len(&conn), 2);
        assert!(verify(&conn).unwrap().intact);
    }
}
