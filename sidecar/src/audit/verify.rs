//! Checking the hash chain, on a connection or on a store file.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::chain::{COLUMNS, StoredEntry};
use super::{AuditError, GENESIS_HASH, Receipt};

/// How long [`verify_file`] waits for a running sidecar's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Result of checking the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Whether every entry matches its hash and links to the entry before.
    pub intact: bool,
    /// Number of entries in the log.
    pub entries: u64,
    /// Position from which the log cannot be trusted; 0 when intact.
    pub first_bad_position: u64,
    /// Description of the problem at `first_bad_position`; empty when intact.
    pub problem: String,
    /// `entry_hash` of the last entry, or [`GENESIS_HASH`] for an empty log.
    pub head_hash: String,
}

/// Checks every entry in order of position: positions run 1, 2, 3, ...
/// without a gap, each entry's `entry_hash` matches its fields, and each
/// `prev_hash` is the `entry_hash` of the entry before (64 zeros for the
/// first). Reports the first failure. No key is needed.
pub fn verify(conn: &Connection) -> Result<Verification, AuditError> {
    let mut statement = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM audit_log ORDER BY position"
    ))?;
    let mut rows = statement.query([])?;

    let mut entries = 0;
    let mut head_hash = GENESIS_HASH.to_owned();
    let mut problem = None;
    while let Some(row) = rows.next()? {
        let entry = StoredEntry::from_row(row)?;
        entries += 1;
        if problem.is_none() {
            problem = find_problem(entries, &head_hash, &entry);
        }
        head_hash = entry.entry_hash;
    }

    let (first_bad_position, problem) = problem.unwrap_or_default();
    Ok(Verification {
        intact: problem.is_empty(),
        entries,
        first_bad_position,
        problem,
        head_hash,
    })
}

/// Runs [`verify`] and also checks that the entry at `receipt.position`
/// still has `receipt.entry_hash`. This detects what the chain alone
/// cannot: entries removed from the end, and a log rewritten with every
/// hash recomputed.
pub fn verify_against(conn: &Connection, receipt: &Receipt) -> Result<Verification, AuditError> {
    let mut verification = verify(conn)?;
    if !verification.intact {
        return Ok(verification);
    }

    let found: Option<String> = conn
        .query_row(
            "SELECT entry_hash FROM audit_log WHERE position = ?1",
            [receipt.position],
            |row| row.get(0),
        )
        .optional()?;
    let position = receipt.position;
    verification.problem = match found {
        Some(hash) if hash == receipt.entry_hash => return Ok(verification),
        Some(_) => format!(
            "entry {position} differs from the receipt; the log was rewritten from that \
             entry or an earlier one"
        ),
        None => format!(
            "entry {position} of the receipt is missing; the log ends at entry {}, so \
             entries were removed from its end",
            verification.entries
        ),
    };
    verification.intact = false;
    verification.first_bad_position = position;
    Ok(verification)
}

/// Opens the store file at `path` read-only and runs [`verify`], for
/// checking the data directory of a stopped sidecar (a running one's works
/// too). Fails with [`AuditError::Open`] when the file is missing or not
/// an SQLite database, and with [`AuditError::NoAuditLog`] when it has no
/// audit log.
pub fn verify_file(path: &Path) -> Result<Verification, AuditError> {
    let open_error = |source| AuditError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;

    let has_log: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_log')",
            [],
            |row| row.get(0),
        )
        .map_err(open_error)?;
    if !has_log {
        return Err(AuditError::NoAuditLog {
            path: path.to_path_buf(),
        });
    }
    verify(&conn)
}

/// Returns the first problem of `entry`, expected at position `expected`
/// after an entry whose hash is `prev_hash`, as its position and a
/// description.
fn find_problem(expected: u64, prev_hash: &str, entry: &StoredEntry) -> Option<(u64, String)> {
    let position = entry.position;
    if position != expected {
        let problem = format!(
            "entry {expected} is missing; the next entry is at position {position}, so entries \
             were removed or renumbered"
        );
        return Some((expected, problem));
    }
    if entry.body().hash() != entry.entry_hash {
        let problem = format!(
            "entry {position} does not match its entry_hash; one of its fields was changed"
        );
        return Some((position, problem));
    }
    if entry.prev_hash != prev_hash {
        let problem = format!(
            "entry {position} does not link to the entry before it; its prev_hash differs \
             from that entry's entry_hash, so an entry was removed, replaced or reordered"
        );
        return Some((position, problem));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::append;
    use crate::audit::test_support::{append_entries, drop_triggers, new_entry};
    use crate::keys::test_support::{TestKeyFile, memory_store};

    /// Returns a log of five entries with its triggers dropped, ready to be
    /// edited.
    fn tampered_log() -> (rusqlite::Connection, TestKeyFile, Vec<Receipt>) {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 5);
        drop_triggers(&conn);
        (conn, test, receipts)
    }

    fn stored(conn: &Connection, position: u64) -> StoredEntry {
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM audit_log WHERE position = ?1"),
            [position],
            StoredEntry::from_row,
        )
        .unwrap()
    }

    fn assert_broken_at(verification: &Verification, position: u64, problem: &str) {
        assert!(!verification.intact, "{verification:?}");
        assert_eq!(
            verification.first_bad_position, position,
            "{verification:?}"
        );
        assert!(verification.problem.contains(problem), "{verification:?}");
    }

    #[test]
    fn empty_log_is_intact() {
        let conn = memory_store();

        let verification = verify(&conn).unwrap();

        assert_eq!(
            verification,
            Verification {
                intact: true,
                entries: 0,
                first_bad_position: 0,
                problem: String::new(),
                head_hash: GENESIS_HASH.to_owned(),
            }
        );
    }

    #[test]
    fn appended_log_is_intact() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 5);

        let verification = verify(&conn).unwrap();

        assert!(verification.intact);
        assert_eq!(verification.entries, 5);
        assert_eq!(verification.first_bad_position, 0);
        assert_eq!(verification.problem, "");
        assert_eq!(verification.head_hash, receipts[4].entry_hash);
    }

    #[test]
    fn detects_changed_details_byte() {
        let (conn, _test, _) = tampered_log();
        let mut details = stored(&conn, 3).details;
        details[20] ^= 1;
        conn.execute(
            "UPDATE audit_log SET details = ?1 WHERE position = 3",
            [details],
        )
        .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(&verification, 3, "entry 3 does not match its entry_hash");
        assert_eq!(verification.entries, 5);
    }

    #[test]
    fn detects_changed_field() {
        let changes = [
            // Each change flips the first character to one it cannot
            // already be, because the hashes are random.
            "actor = CASE substr(actor, 1, 1) WHEN 'd' THEN 'e' ELSE 'd' END || substr(actor, 2)",
            "action = 'tier_change'",
            "at_unix_ms = at_unix_ms + 1",
            "records = records + 1",
            "subject_hash = NULL",
            "prev_hash = CASE substr(prev_hash, 1, 1) WHEN '1' THEN '2' ELSE '1' END || substr(prev_hash, 2)",
            "entry_hash = CASE substr(entry_hash, 1, 1) WHEN '1' THEN '2' ELSE '1' END || substr(entry_hash, 2)",
        ];

        for change in changes {
            let (conn, _test, _) = tampered_log();
            conn.execute(
                &format!("UPDATE audit_log SET {change} WHERE position = 3"),
                [],
            )
            .unwrap();

            let verification = verify(&conn).unwrap();

            assert_broken_at(&verification, 3, "entry 3 does not match its entry_hash");
        }
    }

    #[test]
    fn detects_changed_head() {
        let (conn, _test, _) = tampered_log();
        conn.execute("UPDATE audit_log SET records = 0 WHERE position = 5", [])
            .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(&verification, 5, "entry 5 does not match its entry_hash");
    }

    #[test]
    fn detects_removed_middle_entry() {
        let (conn, _test, receipts) = tampered_log();
        conn.execute("DELETE FROM audit_log WHERE position = 3", [])
            .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(
            &verification,
            3,
            "entry 3 is missing; the next entry is at position 4",
        );
        assert_eq!(verification.entries, 4);
        assert_eq!(verification.head_hash, receipts[4].entry_hash);
    }

    #[test]
    fn detects_removed_first_entry() {
        let (conn, _test, _) = tampered_log();
        conn.execute("DELETE FROM audit_log WHERE position = 1", [])
            .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(&verification, 1, "entry 1 is missing");
    }

    #[test]
    fn detects_swapped_entries() {
        let (conn, _test, _) = tampered_log();
        conn.execute_batch(
            "UPDATE audit_log SET position = 100 WHERE position = 2;
             UPDATE audit_log SET position = 2 WHERE position = 3;
             UPDATE audit_log SET position = 3 WHERE position = 100;",
        )
        .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(&verification, 2, "entry 2 does not match its entry_hash");
    }

    #[test]
    fn detects_removed_entry_with_renumbering() {
        let (conn, _test, _) = tampered_log();
        conn.execute_batch(
            "DELETE FROM audit_log WHERE position = 3;
             UPDATE audit_log SET position = 3 WHERE position = 4;
             UPDATE audit_log SET position = 4 WHERE position = 5;",
        )
        .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(&verification, 3, "entry 3 does not match its entry_hash");
    }

    #[test]
    fn detects_entry_rewritten_with_new_hash() {
        let (conn, _test, _) = tampered_log();
        let mut entry = stored(&conn, 3);
        entry.actor = "cli:mallory".to_owned();
        let hash = entry.body().hash();
        conn.execute(
            "UPDATE audit_log SET actor = ?1, entry_hash = ?2 WHERE position = 3",
            [&entry.actor, &hash],
        )
        .unwrap();

        let verification = verify(&conn).unwrap();

        assert_broken_at(
            &verification,
            4,
            "entry 4 does not link to the entry before it",
        );
    }

    #[test]
    fn receipt_detects_rewritten_head() {
        let (conn, _test, receipts) = tampered_log();
        let mut entry = stored(&conn, 5);
        entry.records = 0;
        let hash = entry.body().hash();
        conn.execute(
            "UPDATE audit_log SET records = 0, entry_hash = ?1 WHERE position = 5",
            [&hash],
        )
        .unwrap();

        let chain_only = verify(&conn).unwrap();
        let verification = verify_against(&conn, &receipts[4]).unwrap();

        assert!(chain_only.intact, "recomputed hashes pass the chain check");
        assert_broken_at(&verification, 5, "entry 5 differs from the receipt");
        assert_eq!(verification.head_hash, hash);
    }

    #[test]
    fn receipt_detects_removed_tail() {
        let (conn, _test, receipts) = tampered_log();
        conn.execute("DELETE FROM audit_log WHERE position >= 4", [])
            .unwrap();

        let chain_only = verify(&conn).unwrap();
        let verification = verify_against(&conn, &receipts[4]).unwrap();

        assert!(chain_only.intact);
        assert_eq!(chain_only.entries, 3);
        assert_broken_at(
            &verification,
            5,
            "entry 5 of the receipt is missing; the log ends at entry 3",
        );
    }

    #[test]
    fn matching_receipt_keeps_log_intact() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 3);

        let verification = verify_against(&conn, &receipts[1]).unwrap();

        assert_eq!(verification, verify(&conn).unwrap());
        assert!(verification.intact);
    }

    #[test]
    fn receipt_check_keeps_first_chain_problem() {
        let (conn, _test, receipts) = tampered_log();
        conn.execute("UPDATE audit_log SET actor = 'x' WHERE position = 2", [])
            .unwrap();

        let verification = verify_against(&conn, &receipts[4]).unwrap();

        assert_broken_at(&verification, 2, "entry 2 does not match its entry_hash");
    }

    #[test]
    fn verify_reports_missing_table() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();

        let err = verify(&conn).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    #[test]
    fn verify_reports_unreadable_row() {
        let conn = memory_store();
        conn.execute_batch(
            "DROP TABLE audit_log;
             CREATE TABLE audit_log (position, at_unix_ms, actor, action, subject_hash,
                 records, details, prev_hash, entry_hash);
             INSERT INTO audit_log VALUES (1, 'noon', 'a', 'b', NULL, 0, x'00', 'p', 'h');",
        )
        .unwrap();

        let err = verify(&conn).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    #[test]
    fn verify_against_reports_out_of_range_position() {
        let conn = memory_store();
        let receipt = Receipt {
            position: u64::MAX,
            entry_hash: GENESIS_HASH.to_owned(),
            subject_hash: None,
        };

        let err = verify_against(&conn, &receipt).unwrap_err();

        assert!(matches!(err, AuditError::Sqlite(_)), "{err}");
    }

    /// Creates a WAL store file with the key and audit tables, like the
    /// sidecar's, and returns its path and an open writer.
    fn store_file(dir: &Path) -> (std::path::PathBuf, Connection) {
        let path = dir.join("usage.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(crate::keys::SCHEMA).unwrap();
        conn.execute_batch(crate::audit::SCHEMA).unwrap();
        (path, conn)
    }

    #[test]
    fn verify_file_checks_stopped_store() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = store_file(dir.path());
        let test = TestKeyFile::new();
        let receipts = append_entries(&conn, &test.keys, 3);
        drop(conn);

        let verification = verify_file(&path).unwrap();

        assert!(verification.intact);
        assert_eq!(verification.entries, 3);
        assert_eq!(verification.head_hash, receipts[2].entry_hash);
    }

    #[test]
    fn verify_file_checks_running_store() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = store_file(dir.path());
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, 2);

        let before = verify_file(&path).unwrap();
        append(&conn, &test.keys, &new_entry(3)).unwrap();
        let after = verify_file(&path).unwrap();

        assert_eq!(before.entries, 2);
        assert_eq!(after.entries, 3);
        assert!(after.intact);
    }

    #[test]
    fn verify_file_detects_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let (path, conn) = store_file(dir.path());
        let test = TestKeyFile::new();
        append_entries(&conn, &test.keys, 3);
        drop_triggers(&conn);
        conn.execute("UPDATE audit_log SET actor = 'x' WHERE position = 2", [])
            .unwrap();
        drop(conn);

        let verification = verify_file(&path).unwrap();

        assert_broken_at(&verification, 2, "entry 2 does not match its entry_hash");
    }

    #[test]
    fn verify_file_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.sqlite3");

        let err = verify_file(&path).unwrap_err();

        assert!(matches!(err, AuditError::Open { .. }), "{err}");
        let expected = format!(
            "failed to read the store {} to verify its audit log; check that it is a sidecar \
             store such as DATA_DIR/usage.sqlite3",
            path.display()
        );
        assert_eq!(err.to_string(), expected);
        assert!(!path.exists(), "a read-only open creates no file");
    }

    #[test]
    fn verify_file_reports_other_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(
            &path,
            "these are not the pages of an SQLite database, just text",
        )
        .unwrap();

        let err = verify_file(&path).unwrap_err();

        assert!(matches!(err, AuditError::Open { .. }), "{err}");
    }

    #[test]
    fn verify_file_reports_store_without_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.sqlite3");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(crate::keys::SCHEMA).unwrap();
        drop(conn);

        let err = verify_file(&path).unwrap_err();

        assert!(matches!(err, AuditError::NoAuditLog { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with(&format!("store {} has no audit_log table", path.display()))
        );
    }
}
