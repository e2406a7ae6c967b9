//! Helpers shared by the tests of the audit log.

use rusqlite::Connection;

use super::{NewEntry, Receipt, append};
use crate::keys::KeyProvider;

/// Subject hash used by test entries.
pub(crate) const SUBJECT: &str = "5f2b8006a0c83f52b62ba44a97b58bf76fe2f70a329e588f67f89691d93d498f";

/// Returns a valid entry of an erasure at time `at_unix_ms`.
pub(crate) fn new_entry(at_unix_ms: i64) -> NewEntry {
    NewEntry {
        at_unix_ms,
        actor: "cli:alice".to_owned(),
        action: "erase_customer".to_owned(),
        subject_hash: Some(SUBJECT.to_owned()),
        records: 3,
        details: serde_json::json!({ "erasure_id": format!("er-{at_unix_ms}"), "records": 3 }),
    }
}

/// Appends `count` entries at times 1, 2, ... and returns their receipts.
pub(crate) fn append_entries(
    conn: &Connection,
    provider: &dyn KeyProvider,
    count: i64,
) -> Vec<Receipt> {
    (1..=count)
        .map(|at| append(conn, provider, &new_entry(at)).unwrap())
        .collect()
}

/// Drops the append-only triggers, as someone editing the file would.
pub(crate) fn drop_triggers(conn: &Connection) {
    conn.execute_batch(
        "DROP TRIGGER audit_log_no_update;
         DROP TRIGGER audit_log_no_delete;
         DROP TRIGGER audit_log_append_at_end;",
    )
    .unwrap();
}
