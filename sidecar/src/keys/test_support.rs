//! Helpers shared by the tests of the key and audit modules.

use rusqlite::Connection;
use tempfile::TempDir;

use super::LocalKeyFile;

/// A key file in its own temporary directory, removed on drop.
pub(crate) struct TestKeyFile {
    pub dir: TempDir,
    pub keys: LocalKeyFile,
}

impl TestKeyFile {
    /// Creates `keys.json` with one random KEK in a new temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = LocalKeyFile::open_or_create(&dir.path().join("keys.json")).unwrap();
        Self { dir, keys }
    }
}

/// Opens an in-memory database with the key and audit tables.
pub(crate) fn memory_store() -> Connection {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(super::SCHEMA).unwrap();
    conn.execute_batch(crate::audit::SCHEMA).unwrap();
    conn
}
