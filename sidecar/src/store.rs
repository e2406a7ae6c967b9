//! Embedded SQLite store of the usage ledger: per-customer usage in minute
//! buckets and the last applied sequence of each filter instance.
//!
//! SQLite calls block, so every call runs on tokio's blocking pool. One
//! connection writes and a second one reads; WAL mode lets the reader run
//! while the writer commits.

mod apply;
mod query;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OptionalExtension};
use tracing::{info, warn};

use crate::counters::Contribution;
use crate::identity::Identities;
use crate::keys::{KeyError, KeyProvider};
use crate::ledger::{ApplyOutcome, Batch, BucketTotal, CustomerTotal, Granularity, TimeRange};

/// File name of the SQLite database inside the data directory.
pub const DATABASE_FILE: &str = "usage.sqlite3";

/// Errors of the usage store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error(
        "failed to create the data directory {}; check its permissions or choose another \
         with --data-dir",
        path.display()
    )]
    CreateDir {
        /// The data directory.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or its schema created.
    #[error("failed to open the usage store {}", path.display())]
    Open {
        /// Path of the database file.
        path: PathBuf,
        /// Cause reported by SQLite.
        #[source]
        source: rusqlite::Error,
    },
    /// SQLite could not switch the database to WAL journal mode.
    #[error(
        "usage store {} stays in journal mode {mode}, not WAL; put --data-dir on a local \
         file system",
        path.display()
    )]
    NoWal {
        /// Path of the database file.
        path: PathBuf,
        /// Journal mode SQLite reported.
        mode: String,
    },
    /// The database was written by a newer sidecar with an unknown schema.
    #[error(
        "usage store {} has schema version {found}, newer than the supported {supported}; \
         run a newer veo-sidecar or point --data-dir elsewhere",
        path.display()
    )]
    SchemaVersion {
        /// Path of the database file.
        path: PathBuf,
        /// Version stored in the file.
        found: i64,
        /// Latest version this build supports.
        supported: i64,
    },
    /// The key of the customer pseudonyms could not be loaded, or stored
    /// customer ids could not be replaced by pseudonyms.
    #[error(
        "failed to load the customer id keys of the usage store {}; check [privacy] key_file",
        path.display()
    )]
    Keys {
        /// Path of the database file.
        path: PathBuf,
        /// Cause reported by the key module.
        #[source]
        source: KeyError,
    },
    /// A statement failed.
    #[error("usage store failed to {operation}")]
    Sqlite {
        /// Operation that failed, such as "apply a batch".
        operation: &'static str,
        /// Cause reported by SQLite.
        #[source]
        source: rusqlite::Error,
    },
    /// The blocking task running a statement was cancelled or panicked.
    #[error("usage store task did not finish")]
    Task(#[source] tokio::task::JoinError),
}

/// Handle to the store; clones share the same connections.
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Connections>,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Writer,
    Reader,
}

#[derive(Debug)]
struct Connections {
    path: PathBuf,
    identities: Identities,
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

/// Replaces the index key of the stopped store in `data_dir` and renames
/// every row under the new key (see [`crate::identity::replace_index_key`]).
pub fn replace_index_key(
    data_dir: &Path,
    keys: Arc<dyn KeyProvider>,
) -> Result<crate::identity::Renamed, StoreError> {
    let path = data_dir.join(DATABASE_FILE);
    let mut writer = schema::open_writer(&path)?;
    crate::identity::replace_index_key(&mut writer, keys)
        .map_err(|source| StoreError::Keys { path, source })
}

impl Store {
    /// Opens or creates the store in `data_dir`, creating the directory when
    /// missing, with the customer ids encrypted under data keys wrapped by
    /// `keys`. Blocks, so call it from a blocking context.
    pub fn open(data_dir: &Path, keys: Arc<dyn KeyProvider>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);

        let mut writer = schema::open_writer(&path)?;
        let identities =
            Identities::open(&mut writer, keys).map_err(|source| StoreError::Keys {
                path: path.clone(),
                source,
            })?;
        let reader = schema::open_reader(&path)?;
        Ok(Store {
            inner: Arc::new(Connections {
                path,
                identities,
                writer: Mutex::new(writer),
                reader: Mutex::new(reader),
            }),
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Returns the pseudonyms under which the tables name customers.
    pub fn identities(&self) -> &Identities {
        &self.inner.identities
    }

    /// Applies `batch` in one transaction and returns after it is committed,
    /// or reports a duplicate when its sequence is at or below the
    /// instance's last applied one, changing nothing.
    pub async fn apply(&self, batch: Batch, now_unix_s: i64) -> Result<ApplyOutcome, StoreError> {
        let identities = self.identities().clone();
        self.run("apply a batch", Role::Writer, move |conn| {
            apply::apply_batch(conn, &batch, now_unix_s, None, Some(&identities))
        })
        .await
    }

    /// Returns the last sequence applied for `instance`, `None` before its
    /// first batch.
    pub async fn last_sequence(&self, instance: &str) -> Result<Option<i64>, StoreError> {
        let instance = instance.to_owned();
        self.run(
            "read an instance's last sequence",
            Role::Reader,
            move |conn| apply::last_sequence(conn, &instance),
        )
        .await
    }

    /// Like [`Store::apply`], and also queues the batch's usage in the
    /// outbox of the shared counters, in the same transaction, so that
    /// usage acknowledged to the filter always reaches them.
    pub async fn apply_with_outbox(
        &self,
        batch: Batch,
        now_unix_s: i64,
        window_seconds: u32,
    ) -> Result<ApplyOutcome, StoreError> {
        let identities = self.identities().clone();
        self.run("apply a batch", Role::Writer, move |conn| {
            let window_s = Some(i64::from(window_seconds));
            apply::apply_batch(conn, &batch, now_unix_s, window_s, Some(&identities))
        })
        .await
    }

    /// Returns up to `limit` outbox rows, oldest first, named by customer
    /// id. A row whose customer has no identity (it was erased) is deleted.
    /// A row whose identity cannot be read is left out of the shared
    /// counters and logged; the next [`Store::remove_outbox`] past its id
    /// deletes it.
    pub async fn outbox(&self, limit: u32) -> Result<Vec<Contribution>, StoreError> {
        let identities = self.identities().clone();
        self.run("read the counter outbox", Role::Writer, move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT id, customer, bucket_unix_s, admitted, requests FROM counter_outbox \
                 ORDER BY id LIMIT ?1",
            )?;
            let rows = statement
                .query_map([limit], |row| {
                    Ok(Contribution {
                        id: row.get(0)?,
                        customer: row.get(1)?,
                        bucket_unix_s: row.get(2)?,
                        admitted: row.get(3)?,
                        requests: row.get(4)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut revealer = identities.revealer();
            let mut named = Vec::with_capacity(rows.len());
            for mut row in rows {
                match revealer.reveal(conn, &row.customer) {
                    Ok(Some(customer)) => {
                        row.customer = customer;
                        named.push(row);
                    }
                    // The customer was erased after the row was read.
                    Ok(None) => {
                        conn.execute("DELETE FROM counter_outbox WHERE id = ?1", [row.id])?;
                    }
                    // Skipped, so the shared counters miss this usage,
                    // which the ledger still has. The next removal past its
                    // id deletes the row.
                    Err(err) => warn!(
                        outbox_id = row.id,
                        error = %err,
                        "failed to read the identity of a counter outbox row; skipping it"
                    ),
                }
            }
            Ok(named)
        })
        .await
    }

    /// Removes the outbox rows up to and including `id`, once the shared
    /// counters have applied them.
    pub async fn remove_outbox(&self, id: i64) -> Result<(), StoreError> {
        self.run("trim the counter outbox", Role::Writer, move |conn| {
            conn.execute("DELETE FROM counter_outbox WHERE id <= ?1", [id])
                .map(|_| ())
        })
        .await
    }

    /// Returns the value stored under `key` in the sidecar's metadata, or
    /// stores and returns `make()` when there is none.
    pub async fn meta_or_insert(
        &self,
        key: &'static str,
        make: impl FnOnce() -> String + Send + 'static,
    ) -> Result<String, StoreError> {
        self.run("read the sidecar metadata", Role::Writer, move |conn| {
            let found: Option<String> = conn
                .query_row(
                    "SELECT value FROM sidecar_meta WHERE key = ?1",
                    [key],
                    |row| row.get(0),
                )
                .optional()?;
            if let Some(value) = found {
                return Ok(value);
            }
            let value = make();
            conn.execute(
                "INSERT INTO sidecar_meta (key, value) VALUES (?1, ?2)",
                [key, value.as_str()],
            )?;
            Ok(value)
        })
        .await
    }

    /// Returns `customer`'s non-empty buckets within `range`, ascending.
    pub async fn usage(
        &self,
        customer: String,
        range: TimeRange,
        granularity: Granularity,
    ) -> Result<Vec<BucketTotal>, StoreError> {
        let pseudonym = self.identities().pseudonym(&customer);
        self.run("query usage", Role::Reader, move |conn| {
            query::usage_buckets(conn, &pseudonym, range, granularity)
        })
        .await
    }

    /// Returns up to `limit` customers with the most admitted requests within
    /// `range`, descending, ties in ascending order of customer.
    pub async fn top_customers(
        &self,
        range: TimeRange,
        limit: u32,
    ) -> Result<Vec<CustomerTotal>, StoreError> {
        let identities = self.identities().clone();
        self.run("list top customers", Role::Reader, move |conn| {
            // Ties are ordered by customer id, which only the revealed ids
            // give, so every customer of the range is read before the cut.
            let totals = query::top_customers(conn, range, u32::MAX)?;
            let mut revealer = identities.revealer();
            let mut named = Vec::with_capacity(totals.len());
            for mut total in totals {
                if let Some(customer) = revealer.reveal_or_skip(conn, &total.customer) {
                    total.customer = customer;
                    named.push(total);
                }
            }
            let mut totals = named;
            totals.sort_by(|a, b| {
                b.admitted
                    .cmp(&a.admitted)
                    .then_with(|| a.customer.cmp(&b.customer))
            });
            totals.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            Ok(totals)
        })
        .await
    }

    /// Closes both connections, which checkpoints the WAL into the database.
    /// When another handle is still alive it only logs a warning, because
    /// SQLite recovers the WAL at the next open.
    pub async fn close(self) {
        let path = self.inner.path.clone();
        let Ok(connections) = Arc::try_unwrap(self.inner) else {
            warn!(
                path = %path.display(),
                "usage store still used by unfinished calls; not closing it cleanly, \
                 committed batches are safe and the next start recovers the WAL"
            );
            return;
        };

        let closed = tokio::task::spawn_blocking(move || {
            let reader = connections
                .reader
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            let writer = connections
                .writer
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner);
            reader.close().and(writer.close()).map_err(|(_, err)| err)
        })
        .await;
        match closed {
            Ok(Ok(())) => info!(path = %path.display(), "usage store closed"),
            Ok(Err(err)) => {
                warn!(path = %path.display(), error = %err, "failed to close the usage store")
            }
            Err(err) => {
                warn!(path = %path.display(), error = %err, "failed to close the usage store")
            }
        }
    }

    /// Runs `work` on the writing connection on the blocking pool; SQLite
    /// errors are reported as failures to do `operation`.
    pub async fn write<T, F>(&self, operation: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.run(operation, Role::Writer, work).await
    }

    /// Runs `work` on the read-only connection on the blocking pool.
    pub async fn read<T, F>(&self, operation: &'static str, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.run(operation, Role::Reader, work).await
    }

    /// Runs `work` on the writer or the reader connection on the blocking
    /// pool. The mutex keeps the writer the only one, even across clones.
    async fn run<T, F>(&self, operation: &'static str, role: Role, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let result = tokio::task::spawn_blocking(move || {
            let mutex = match role {
                Role::Writer => &inner.writer,
                Role::Reader => &inner.reader,
            };
            work(&mut lock(mutex))
        })
        .await
        .map_err(StoreError::Task)?;
        result.map_err(|source| StoreError::Sqlite { operation, source })
    }
}

/// Locks a connection. A panic while holding the lock cannot leave a
/// transaction open, because rusqlite rolls back when the transaction drops.
fn lock(mutex: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Returns the path of the store file in `data_dir`.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DATABASE_FILE)
}

/// Stores and connections for the tests of other modules.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;
    use std::sync::Arc;

    use rusqlite::Connection;

    use super::Store;
    use crate::keys::LocalKeyFile;

    /// Opens a writing connection with the whole schema, for the unit tests
    /// of modules that keep tables in the store.
    pub fn open_writer(path: &Path) -> Connection {
        super::schema::open_writer(path).unwrap()
    }

    /// Opens a store in `dir`, with its key file `keys.json` beside it.
    pub fn open(dir: &Path) -> Store {
        let keys = LocalKeyFile::open_or_create(&dir.join("keys.json")).unwrap();
        Store::open(dir, Arc::new(keys)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::UsageEntry;

    fn batch(sequence: i64, admitted: i64) -> Batch {
        Batch {
            instance_id: "a".into(),
            sequence,
            records: vec![UsageEntry {
                customer: "c1".into(),
                tier: "basic".into(),
                minute_unix_s: 120,
                admitted,
                refused: 0,
                egress_bytes: 0,
                quota: None,
            }],
        }
    }

    fn whole_range() -> TimeRange {
        TimeRange {
            start_unix_s: 0,
            end_unix_s: 3_600,
        }
    }

    #[tokio::test]
    async fn tables_hold_pseudonyms_queries_take_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_support::open(dir.path());
        let records = [("zeta", 5), ("alpha", 5), ("mid", 7)]
            .into_iter()
            .map(|(customer, admitted)| UsageEntry {
                customer: customer.into(),
                tier: "basic".into(),
                minute_unix_s: 120,
                admitted,
                refused: 0,
                egress_bytes: 0,
                quota: None,
            })
            .collect();
        let batch = Batch {
            instance_id: "a".into(),
            sequence: 1,
            records,
        };
        store.apply_with_outbox(batch, 150, 60).await.unwrap();

        let top = store.top_customers(whole_range(), 2).await.unwrap();
        let names: Vec<(&str, u64)> = top
            .iter()
            .map(|total| (total.customer.as_str(), total.admitted))
            .collect();
        assert_eq!(names, [("mid", 7), ("alpha", 5)], "ties by customer id");
        let alpha = store
            .usage("alpha".into(), whole_range(), Granularity::Minute)
            .await
            .unwrap();
        assert_eq!(alpha[0].admitted, 5);
        let outbox: Vec<String> = store
            .outbox(10)
            .await
            .unwrap()
            .into_iter()
            .map(|row| row.customer)
            .collect();
        assert_eq!(outbox, ["alpha", "mid", "zeta"]);
        let identities = store.identities().clone();
        let stored: Vec<String> = store
            .read("list stored customers", |conn| {
                let mut statement = conn.prepare(
                    "SELECT customer FROM usage_minute UNION SELECT customer FROM counter_outbox
                     UNION SELECT customer FROM billing_dirty ORDER BY 1",
                )?;
                let rows = statement.query_map([], |row| row.get(0))?;
                rows.collect()
            })
            .await
            .unwrap();
        let mut expected: Vec<String> = ["alpha", "mid", "zeta"]
            .iter()
            .map(|customer| identities.pseudonym(customer))
            .collect();
        expected.sort();
        assert_eq!(stored, expected);
    }

    #[tokio::test]
    async fn outbox_rows_without_identity_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_support::open(dir.path());
        store.apply_with_outbox(batch(1, 4), 150, 60).await.unwrap();
        let pseudonym = store.identities().pseudonym("c1");
        store
            .write("forget c1", move |conn| {
                Identities::forget(conn, &pseudonym).map(drop)
            })
            .await
            .unwrap();

        assert!(store.outbox(10).await.unwrap().is_empty());
        let left: i64 = store
            .read("count the outbox", |conn| {
                conn.query_row("SELECT COUNT(*) FROM counter_outbox", [], |row| row.get(0))
            })
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn usage_of_an_erased_customer_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_support::open(dir.path());
        let pseudonym = store.identities().pseudonym("c1");
        store
            .write("erase c1", move |conn| {
                conn.execute(
                    "INSERT INTO erased_customer VALUES (?1, x'00', 10000)",
                    [&pseudonym],
                )
            })
            .await
            .unwrap();

        store.apply(batch(1, 4), 100).await.unwrap();
        store.apply(batch(2, 3), 10_000).await.unwrap();

        let usage = store
            .usage("c1".into(), whole_range(), Granularity::Minute)
            .await
            .unwrap();
        assert_eq!(usage[0].admitted, 3, "kept once the refusal period ended");
    }

    #[tokio::test]
    async fn reopened_store_keeps_usage_and_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_support::open(dir.path());
        store.apply(batch(1, 4), 0).await.unwrap();
        store.close().await;

        let store = crate::store::test_support::open(dir.path());
        let resent = store.apply(batch(1, 4), 0).await.unwrap();
        let buckets = store
            .usage("c1".into(), whole_range(), Granularity::Hour)
            .await
            .unwrap();

        assert_eq!(resent, ApplyOutcome::Duplicate { last: 1 });
        assert_eq!(buckets.len(), 1);
        assert_eq!(buckets[0].admitted, 4);
    }

    #[tokio::test]
    async fn reader_sees_commits_of_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_support::open(dir.path());
        store.apply(batch(1, 2), 0).await.unwrap();
        let before = store.top_customers(whole_range(), 10).await.unwrap();

        store.apply(batch(2, 3), 0).await.unwrap();
        let after = store.top_customers(whole_range(), 10).await.unwrap();

        assert_eq!(before[0].admitted, 2);
        assert_eq!(after[0].admitted, 5);
    }

    #[test]
    fn data_dir_that_is_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("taken");
        std::fs::write(&file, "").unwrap();

        let keys =
            crate::keys::LocalKeyFile::open_or_create(&dir.path().join("keys.json")).unwrap();
        let err = Store::open(&file, Arc::new(keys)).unwrap_err();

        assert!(matches!(err, StoreError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("taken"), "{err}");
    }
}
