//! Append-only, hash-chained audit log of changes to customers' data, such
//! as erasures, tier changes and asset region changes.
//!
//! Each entry stores the SHA-256 hash of the entry before it (`prev_hash`)
//! and its own hash over all its fields (`entry_hash`), so [`verify`] finds
//! a changed field, a removed entry and reordered entries. Triggers abort
//! every `UPDATE` and `DELETE` of the table and every insert that is not
//! at the next position and linked to the last entry.
//!
//! Someone who can write the database file can drop the triggers and
//! recompute every hash after a change. To detect that too, keep a
//! [`Receipt`] of a recent entry outside the store (in the operator's
//! records, or in an erasure's response to its requester) and check it with
//! [`verify_against`].
//!
//! `details` are encrypted at rest with a data key of [`AUDIT_OWNER`]
//! (see [`crate::keys`]), and the entry hash covers the stored ciphertext,
//! so verification needs no key. `details` must never contain personal
//! data: callers put counts, ids the sidecar generated, and blind indexes
//! in it, never a customer id, e-mail address or IP address. The
//! `subject_hash` of an entry about a customer is the customer's blind
//! index ([`crate::keys::blind_index`]), so the plain id is not stored.

use std::path::PathBuf;

mod append;
mod chain;
mod list;
mod verify;

pub use append::append;
pub use list::{Entry, MAX_LIST_LIMIT, entries};
pub use verify::{Verification, verify, verify_against, verify_file};

/// Owner of the data key that encrypts every entry's `details`.
pub const AUDIT_OWNER: &str = "system:audit";

/// `prev_hash` of the first entry: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The audit log table and its append-only triggers, created when missing.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_log (
    position INTEGER PRIMARY KEY CHECK (position >= 1),
    at_unix_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    subject_hash TEXT,
    records INTEGER NOT NULL CHECK (records >= 0),
    details BLOB NOT NULL,
    prev_hash TEXT NOT NULL,
    entry_hash TEXT NOT NULL
) STRICT;

CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be updated');
END;

CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit_log is append-only: entries cannot be deleted');
END;

-- Also stops INSERT OR REPLACE, which deletes without firing delete
-- triggers unless recursive_triggers is on.
CREATE TRIGGER IF NOT EXISTS audit_log_append_at_end BEFORE INSERT ON audit_log
WHEN NEW.position IS NOT (SELECT COALESCE(MAX(position), 0) + 1 FROM audit_log)
    OR NEW.prev_hash IS NOT COALESCE(
        (SELECT entry_hash FROM audit_log WHERE position = NEW.position - 1),
        '0000000000000000000000000000000000000000000000000000000000000000')
BEGIN
    SELECT RAISE(ABORT,
        'audit_log entries are appended at the next position, linked to the last entry');
END;
";

/// An entry to append.
#[derive(Clone, Debug, PartialEq)]
pub struct NewEntry {
    /// Time of the change, in Unix milliseconds; not negative.
    pub at_unix_ms: i64,
    /// Author of the change, such as `cli:alice` or an admin client's name;
    /// 1 to 256 bytes without control characters.
    pub actor: String,
    /// Kind of change, such as `erase_customer`, `tier_change`,
    /// `set_stripe_customer` or `set_asset_regions`; 1 to 64 of `a-z`,
    /// `0-9` and `_`.
    pub action: String,
    /// Blind index of the customer concerned, 64 lowercase hex digits.
    pub subject_hash: Option<String>,
    /// Number of records the change touched.
    pub records: u64,
    /// Facts about the change, without personal data; at most
    /// [`MAX_DETAILS_BYTES`] as JSON.
    pub details: serde_json::Value,
}

/// Maximum size of an entry's `details`, as compact JSON.
pub const MAX_DETAILS_BYTES: usize = 64 * 1024;

/// Proof that an entry was appended: its position and hash. Any later
/// change to the entry or to an entry before it changes the hash that
/// [`verify_against`] finds at `position`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Position of the entry, from 1.
    pub position: u64,
    /// SHA-256 of the entry, 64 lowercase hex digits.
    pub entry_hash: String,
    /// The entry's `subject_hash`.
    pub subject_hash: Option<String>,
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// An entry to append has an invalid field.
    #[error("invalid audit entry: {field} {reason}")]
    InvalidEntry {
        /// Name of the field.
        field: &'static str,
        /// Description of the problem and of the allowed values.
        reason: String,
    },
    /// An entry's details could not be encrypted or decrypted.
    #[error("failed to encrypt or decrypt audit entry details")]
    Keys(#[from] crate::keys::KeyError),
    /// Decrypted details are not JSON.
    #[error("details of audit entry {position} are not valid JSON")]
    Details {
        /// Position of the entry.
        position: u64,
        /// Cause reported by the JSON parser.
        #[source]
        source: serde_json::Error,
    },
    /// A store file could not be opened or read.
    #[error(
        "failed to read the store {} to verify its audit log; check that it is a sidecar \
         store such as DATA_DIR/usage.sqlite3",
        path.display()
    )]
    Open {
        /// Path of the store file.
        path: PathBuf,
        /// Cause reported by SQLite.
        #[source]
        source: rusqlite::Error,
    },
    /// A store file has no audit log table.
    #[error(
        "store {} has no audit_log table; it was created by a sidecar without an audit \
         log, or it is not a sidecar store",
        path.display()
    )]
    NoAuditLog {
        /// Path of the store file.
        path: PathBuf,
    },
    /// A query on the audit log failed.
    #[error("audit log query failed")]
    Sqlite(#[from] rusqlite::Error),
}

#[cfg(test)]
mod test_support;
