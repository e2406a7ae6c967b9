//! Customer ids at rest.
//!
//! The ledger and billing tables name a customer by its pseudonym: the
//! keyed hash ([`IndexKey::hash`]) of the customer id, the same value the
//! audit log and the erasures record as the subject hash. The id itself is
//! stored once, in `customer_identity`, encrypted under the customer's own
//! data key. The database file therefore contains no customer id in clear,
//! and erasing a customer destroys that data key, so the identity row in
//! a copy or backup of the file can no longer be read either.
//!
//! Lookups by customer compute the pseudonym. Code that must name the
//! customer to the outside (usage listings, Redis keys, tier overrides
//! pushed to the filter) reveals it from `customer_identity`.
//!
//! NOTE: anyone with the key file and a copy of the database can still
//! test whether a given customer id has rows in it, by computing its
//! pseudonym. That is what a blind index allows by design.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use crate::keys::{self, IndexKey, KeyError, KeyProvider};

/// Table of the encrypted customer ids, created when missing.
pub const SCHEMA: &str = "
-- One row per customer with rows elsewhere: the customer id, encrypted
-- under the data key of owner 'customer:<pseudonym>'.
CREATE TABLE IF NOT EXISTS customer_identity (
    pseudonym TEXT PRIMARY KEY NOT NULL,
    sealed BLOB NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Associated data of a sealed customer id, so a ciphertext moved to
/// another table or column fails authentication.
const SEALED_AAD: &[u8] = b"customer_identity.sealed";

/// Key in `sidecar_meta` recording that the tables hold pseudonyms.
const META_KEY: &str = "customer_ids";

/// Value of [`META_KEY`] once every customer id was replaced.
const META_PSEUDONYMS: &str = "pseudonyms";

/// Tables and columns that name a customer by its pseudonym.
pub const CUSTOMER_COLUMNS: [(&str, &str); 6] = [
    ("usage_minute", "customer"),
    ("billing_dirty", "customer"),
    ("meter_bucket", "customer"),
    ("meter_event", "customer"),
    ("counter_outbox", "customer"),
    ("stripe_customer", "customer"),
];

/// Pseudonyms of customer ids and their encrypted originals; cheap to
/// clone.
#[derive(Clone)]
pub struct Identities {
    index_key: IndexKey,
    keys: Arc<dyn KeyProvider>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").finish_non_exhaustive()
    }
}

impl Identities {
    /// Loads the index key (creating it on first use), and on the first
    /// open of a store written before pseudonyms replaces every stored
    /// customer id with its pseudonym, all in one transaction.
    pub fn open(conn: &mut Connection, keys: Arc<dyn KeyProvider>) -> Result<Self, KeyError> {
        let tx = conn.transaction()?;
        let index_key = IndexKey::load_or_create(&tx, keys.as_ref())?;
        let identities = Identities { index_key, keys };
        let done: Option<String> = tx
            .query_row(
                "SELECT value FROM sidecar_meta WHERE key = ?1",
                [META_KEY],
                |row| row.get(0),
            )
            .optional()?;
        if done.as_deref() != Some(META_PSEUDONYMS) {
            let replaced = identities.pseudonymize_all(&tx)?;
            let pseudonym = |customer: &str| identities.pseudonym(customer);
            crate::erasure::seal_ids_in_clear(&tx, identities.keys.as_ref(), &pseudonym)?;
            if replaced > 0 {
                tracing::info!(
                    customers = replaced,
                    "replaced stored customer ids with pseudonyms"
                );
            }
            tx.execute(
                "INSERT OR REPLACE INTO sidecar_meta (key, value) VALUES (?1, ?2)",
                [META_KEY, META_PSEUDONYMS],
            )?;
            tx.commit()?;
            // The pages as they were before the conversion, ids in clear,
            // stay in the write-ahead log until a checkpoint truncates it.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            return Ok(identities);
        }
        tx.commit()?;
        Ok(identities)
    }

    /// Returns the pseudonym of `customer`, without touching the store.
    pub fn pseudonym(&self, customer: &str) -> String {
        self.index_key.hash(customer)
    }

    /// Returns the pseudonym of `customer` and stores its encrypted id when
    /// it has none yet. Call it inside the transaction that writes rows
    /// under the pseudonym, so the rows never outlive a rollback of the
    /// identity.
    pub fn record(&self, conn: &Connection, customer: &str) -> Result<String, KeyError> {
        let pseudonym = self.pseudonym(customer);
        let known = conn
            .prepare_cached("SELECT 1 FROM customer_identity WHERE pseudonym = ?1")?
            .exists([&pseudonym])?;
        if !known {
            let sealed = keys::encrypt(
                conn,
                self.keys.as_ref(),
                &key_owner(&pseudonym),
                customer.as_bytes(),
                SEALED_AAD,
            )?;
            conn.prepare_cached(
                "INSERT INTO customer_identity (pseudonym, sealed) VALUES (?1, ?2)",
            )?
            .execute(params![pseudonym, sealed])?;
        }
        Ok(pseudonym)
    }

    /// Returns the customer id of `pseudonym`, or `None` when it has no
    /// readable identity: the customer was erased, or its data key is
    /// gone.
    pub fn reveal(&self, conn: &Connection, pseudonym: &str) -> Result<Option<String>, KeyError> {
        let sealed: Option<Vec<u8>> = conn
            .prepare_cached("SELECT sealed FROM customer_identity WHERE pseudonym = ?1")?
            .query_row([pseudonym], |row| row.get(0))
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let plaintext = keys::decrypt(
            conn,
            self.keys.as_ref(),
            &key_owner(pseudonym),
            &sealed,
            SEALED_AAD,
        )?;
        // The sidecar only seals valid UTF-8, and the tag authenticates it.
        Ok(plaintext.and_then(|bytes| String::from_utf8(bytes).ok()))
    }

    /// Returns a [`Revealer`] that remembers what it revealed, for code
    /// that reveals many rows at once.
    pub fn revealer(&self) -> Revealer<'_> {
        Revealer {
            identities: self,
            known: HashMap::new(),
        }
    }

    /// Deletes the encrypted id of `pseudonym`; returns whether there was
    /// one. The data key is destroyed separately, with the audit entry.
    pub fn forget(conn: &Connection, pseudonym: &str) -> rusqlite::Result<bool> {
        let deleted = conn.execute(
            "DELETE FROM customer_identity WHERE pseudonym = ?1",
            [pseudonym],
        )?;
        Ok(deleted > 0)
    }

    /// Replaces every customer id stored in clear by its pseudonym and
    /// records its identity; returns how many customers it replaced.
    ///
    /// A temporary table maps each id to its pseudonym, so every table
    /// takes one UPDATE, whatever the number of customers.
    fn pseudonymize_all(&self, conn: &Connection) -> Result<u64, KeyError> {
        let union = CUSTOMER_COLUMNS
            .iter()
            .map(|(table, column)| format!("SELECT {column} FROM {table}"))
            .collect::<Vec<_>>()
            .join(" UNION ");
        let customers: Vec<String> = {
            let mut statement = conn.prepare(&union)?;
            let rows = statement.query_map([], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let create = "CREATE TEMP TABLE pseudonym_of (customer TEXT PRIMARY KEY, pseudonym TEXT)";
        conn.execute_batch(create)?;
        let insert = "INSERT INTO temp.pseudonym_of (customer, pseudonym) VALUES (?1, ?2)";
        for customer in &customers {
            let pseudonym = self.record(conn, customer)?;
            conn.execute(insert, [customer, &pseudonym])?;
        }
        for (table, column) in CUSTOMER_COLUMNS {
            conn.execute(
                &format!(
                    "UPDATE {table} SET {column} = map.pseudonym FROM temp.pseudonym_of AS map
                     WHERE {table}.{column} = map.customer"
                ),
                [],
            )?;
        }
        conn.execute_batch("DROP TABLE temp.pseudonym_of")?;
        Ok(u64::try_from(customers.len()).unwrap_or(u64::MAX))
    }
}

/// Reveals customer ids, decrypting each pseudonym once.
#[derive(Debug)]
pub struct Revealer<'a> {
    identities: &'a Identities,
    known: HashMap<String, Option<String>>,
}

impl Revealer<'_> {
    /// As [`Revealer::reveal`], but a failure is logged and gives `None`,
    /// for listings where one unreadable identity must not hide the rest.
    pub fn reveal_or_skip(&mut self, conn: &Connection, pseudonym: &str) -> Option<String> {
        match self.reveal(conn, pseudonym) {
            Ok(customer) => customer,
            Err(err) => {
                tracing::warn!(
                    customer_pseudonym = pseudonym,
                    error = %err,
                    "failed to read a customer's identity; the customer is left out, check \
                     customer_identity and the key file"
                );
                None
            }
        }
    }

    /// As [`Identities::reveal`], from memory for a pseudonym seen before.
    pub fn reveal(
        &mut self,
        conn: &Connection,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        if let Some(known) = self.known.get(pseudonym) {
            return Ok(known.clone());
        }
        let customer = self.identities.reveal(conn, pseudonym)?;
        self.known.insert(pseudonym.to_owned(), customer.clone());
        Ok(customer)
    }
}

/// Owner of a customer's data key, named by the customer's pseudonym.
pub fn key_owner(pseudonym: &str) -> String {
    format!("customer:{pseudonym}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_support::TestKeyFile;

    /// Returns a second handle on the test's key file.
    fn test_keys(test: &TestKeyFile) -> Arc<dyn KeyProvider> {
        let path = test.dir.path().join("keys.json");
        Arc::new(crate::keys::LocalKeyFile::open_or_create(&path).unwrap())
    }

    fn store() -> (TestKeyFile, Connection, Identities) {
        let test = TestKeyFile::new();
        let mut conn = crate::store::test_support::open_writer(&test.dir.path().join("db"));
        let keys = test_keys(&test);
        let identities = Identities::open(&mut conn, keys).unwrap();
        (test, conn, identities)
    }

    #[test]
    fn recorded_id_is_revealed_not_stored() {
        let (_test, conn, identities) = store();

        let pseudonym = identities.record(&conn, "acme-video").unwrap();
        let again = identities.record(&conn, "acme-video").unwrap();

        assert_eq!(pseudonym, again);
        assert_eq!(pseudonym, identities.pseudonym("acme-video"));
        assert_eq!(
            identities.reveal(&conn, &pseudonym).unwrap().as_deref(),
            Some("acme-video")
        );
        let sealed: Vec<u8> = conn
            .query_row("SELECT sealed FROM customer_identity", [], |row| row.get(0))
            .unwrap();
        assert!(!sealed.windows(10).any(|window| window == b"acme-video"));
    }

    #[test]
    fn destroyed_key_or_forgotten_row_reveals_nothing() {
        let (_test, conn, identities) = store();
        let kept = identities.record(&conn, "kept").unwrap();
        let shredded = identities.record(&conn, "shredded").unwrap();
        let forgotten = identities.record(&conn, "forgotten").unwrap();

        assert!(keys::destroy(&conn, &key_owner(&shredded)).unwrap());
        assert!(Identities::forget(&conn, &forgotten).unwrap());
        assert!(!Identities::forget(&conn, &forgotten).unwrap());

        let mut revealer = identities.revealer();
        assert_eq!(
            revealer.reveal(&conn, &kept).unwrap().as_deref(),
            Some("kept")
        );
        assert_eq!(
            revealer.reveal(&conn, &kept).unwrap().as_deref(),
            Some("kept")
        );
        assert_eq!(revealer.reveal(&conn, &shredded).unwrap(), None);
        assert_eq!(revealer.reveal(&conn, &forgotten).unwrap(), None);
    }

    #[test]
    fn sealed_id_moved_to_another_row_fails() {
        let (_test, conn, identities) = store();
        let first = identities.record(&conn, "first").unwrap();
        let second = identities.record(&conn, "second").unwrap();
        conn.execute(
            "UPDATE customer_identity SET sealed =
                 (SELECT sealed FROM customer_identity WHERE pseudonym = ?1)
             WHERE pseudonym = ?2",
            [&first, &second],
        )
        .unwrap();

        // The other customer's ciphertext names another data key.
        assert_eq!(identities.reveal(&conn, &second).unwrap(), None);
    }

    #[test]
    fn debug_output_omits_the_keys() {
        let (_test, _conn, identities) = store();

        assert_eq!(format!("{identities:?}"), "Identities { .. }");
    }

    #[test]
    fn tampered_identity_is_an_error() {
        let (_test, conn, identities) = store();
        let pseudonym = identities.record(&conn, "acme").unwrap();
        let mut sealed: Vec<u8> = conn
            .query_row("SELECT sealed FROM customer_identity", [], |row| row.get(0))
            .unwrap();
        if let Some(last) = sealed.last_mut() {
            *last ^= 1;
        }
        conn.execute("UPDATE customer_identity SET sealed = ?1", [sealed])
            .unwrap();

        assert!(identities.reveal(&conn, &pseudonym).is_err());
        assert_eq!(
            identities.revealer().reveal_or_skip(&conn, &pseudonym),
            None
        );
    }

    #[test]
    fn failed_writes_are_errors() {
        let (test, conn, identities) = store();
        conn.execute_batch(
            "CREATE TRIGGER reject_identity BEFORE INSERT ON customer_identity
             BEGIN SELECT RAISE(ABORT, 'rejected'); END;",
        )
        .unwrap();
        assert!(identities.record(&conn, "acme").is_err(), "insert");

        // New connections, so that no statement cached before a schema
        // change runs.
        let path = test.dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE customer_identity;
             CREATE VIEW customer_identity AS SELECT '' AS pseudonym, x'' AS sealed;",
        )
        .unwrap();
        assert!(
            identities.record(&conn, "acme").is_err(),
            "insert into a view"
        );
        assert!(
            Identities::forget(&conn, "p").is_err(),
            "delete from a view"
        );

        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("DROP VIEW customer_identity; DROP TABLE data_key;")
            .unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        assert!(
            identities.record(&conn, "acme").is_err(),
            "no data key table"
        );
    }

    #[test]
    fn failed_replacement_fails_the_open() {
        let test = TestKeyFile::new();
        let mut conn = crate::store::test_support::open_writer(&test.dir.path().join("db"));
        conn.execute_batch(
            "INSERT INTO billing_dirty VALUES ('acme', 60);
             CREATE TRIGGER reject_update BEFORE UPDATE ON billing_dirty
             BEGIN SELECT RAISE(ABORT, 'rejected'); END;",
        )
        .unwrap();

        assert!(Identities::open(&mut conn, test_keys(&test)).is_err());
        let clear: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM billing_dirty WHERE customer = 'acme'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(clear, 1, "the replacement rolled back");
    }

    #[test]
    fn converted_store_files_contain_no_id() {
        let test = TestKeyFile::new();
        let path = test.dir.path().join("db");
        let mut conn = crate::store::test_support::open_writer(&path);
        conn.execute_batch(
            "INSERT INTO usage_minute VALUES ('cust-plain-7c1f', 60, 'basic', 5, 1, 100);
             INSERT INTO counter_outbox (customer, bucket_unix_s, admitted, requests)
                 VALUES ('cust-plain-7c1f', 60, 1, 1);",
        )
        .unwrap();

        drop(Identities::open(&mut conn, test_keys(&test)).unwrap());

        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(test.dir.path().join("db-wal")).unwrap_or_default());
        let id = b"cust-plain-7c1f";
        assert!(!bytes.windows(id.len()).any(|window| window == id));
    }

    #[test]
    fn first_open_replaces_ids_in_clear_once() {
        let test = TestKeyFile::new();
        let path = test.dir.path().join("db");
        let mut conn = crate::store::test_support::open_writer(&path);
        conn.execute_batch(
            "INSERT INTO usage_minute VALUES ('acme', 60, 'basic', 5, 1, 100);
             INSERT INTO billing_dirty VALUES ('acme', 60);
             INSERT INTO meter_bucket VALUES ('acme', 'api_requests', 60, 5, 1);
             INSERT INTO counter_outbox (customer, bucket_unix_s, admitted, requests)
                 VALUES ('globex', 60, 1, 1);
             INSERT INTO stripe_customer VALUES ('globex', 'cus_G', 1);
             DROP TABLE erased_customer;
             CREATE TABLE erased_customer (customer TEXT PRIMARY KEY, refuse_until_unix_s INTEGER);
             INSERT INTO erased_customer VALUES ('gone', 99);",
        )
        .unwrap();
        let keys = test_keys(&test);

        let identities = Identities::open(&mut conn, Arc::clone(&keys)).unwrap();
        let acme = identities.pseudonym("acme");
        let globex = identities.pseudonym("globex");
        for (table, column) in CUSTOMER_COLUMNS {
            let clear: i64 = conn
                .query_row(
                    &format!("SELECT COUNT(*) FROM {table} WHERE {column} IN ('acme', 'globex')"),
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(clear, 0, "{table}");
        }
        let acme_rows: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM usage_minute WHERE customer = ?1",
                [&acme],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(acme_rows, 1);
        assert_eq!(
            identities.reveal(&conn, &globex).unwrap().as_deref(),
            Some("globex")
        );
        let erased: String = conn
            .query_row("SELECT pseudonym FROM erased_customer", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(erased, identities.pseudonym("gone"));

        // A later open leaves values alone, even ones that look like ids.
        conn.execute("INSERT INTO billing_dirty VALUES ('raw', 120)", [])
            .unwrap();
        drop(Identities::open(&mut conn, keys).unwrap());
        let raw: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM billing_dirty WHERE customer = 'raw'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(raw, 1);
    }
}
