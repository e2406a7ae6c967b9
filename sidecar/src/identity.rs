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
//! Stripe customer ids are kept the same way: the billing and webhook
//! tables name a Stripe customer by its own pseudonym, and the id is
//! stored once, in `stripe_identity`, encrypted under a data key of that
//! Stripe customer. Erasing the customer billed to it destroys that key,
//! unless another customer's mapping or meter event still names the
//! Stripe customer.
//!
//! NOTE: anyone with the key file and a copy of the database can still
//! test whether a given customer id has rows in it, by computing its
//! pseudonym. That is what a blind index allows by design.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};

use crate::keys::{self, IndexKey, KeyError, KeyProvider};

/// Tables of the encrypted customer and Stripe customer ids, created when
/// missing.
pub const SCHEMA: &str = "
-- One row per customer with rows elsewhere: the customer id, encrypted
-- under the data key of owner 'customer:<pseudonym>'.
CREATE TABLE IF NOT EXISTS customer_identity (
    pseudonym TEXT PRIMARY KEY NOT NULL,
    sealed BLOB NOT NULL
) WITHOUT ROWID, STRICT;

-- One row per Stripe customer with rows elsewhere: its id (cus_...),
-- encrypted under the data key of owner 'stripe:<pseudonym>'.
CREATE TABLE IF NOT EXISTS stripe_identity (
    pseudonym TEXT PRIMARY KEY NOT NULL,
    sealed BLOB NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Storage of one kind of sealed id: its table, the associated data of its
/// ciphertexts (so one moved to another table fails authentication), and
/// the prefix of its data key owners.
struct Sealed {
    table: &'static str,
    aad: &'static [u8],
    owner_prefix: &'static str,
}

impl Sealed {
    fn owner(&self, pseudonym: &str) -> String {
        format!("{}{pseudonym}", self.owner_prefix)
    }
}

/// Customer ids, in `customer_identity`.
const CUSTOMER: Sealed = Sealed {
    table: "customer_identity",
    aad: b"customer_identity.sealed",
    owner_prefix: "customer:",
};

/// Stripe customer ids, in `stripe_identity`.
const STRIPE: Sealed = Sealed {
    table: "stripe_identity",
    aad: b"stripe_identity.sealed",
    owner_prefix: "stripe:",
};

/// Prefix of the input of a Stripe customer id's keyed hash. The
/// sidecar accepts no customer id with a control character, so no customer
/// id hashes to the same input.
const STRIPE_HASH_PREFIX: &str = "stripe\0";

/// Key in `sidecar_meta` recording that the tables hold pseudonyms of
/// customer ids.
const META_KEY: &str = "customer_ids";

/// Key in `sidecar_meta` recording that the tables hold pseudonyms of
/// Stripe customer ids.
const STRIPE_META_KEY: &str = "stripe_customer_ids";

/// Value of [`META_KEY`] and [`STRIPE_META_KEY`] once every id was
/// replaced.
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

/// Tables and columns that name a Stripe customer by its pseudonym.
pub const STRIPE_COLUMNS: [(&str, &str); 4] = [
    ("stripe_customer", "stripe_pseudonym"),
    ("meter_event", "stripe_pseudonym"),
    ("stripe_tier_state", "stripe_pseudonym"),
    ("stripe_tier_metadata_pending", "stripe_pseudonym"),
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
    /// customer id and Stripe customer id with its pseudonym, all in one
    /// transaction.
    pub fn open(conn: &mut Connection, keys: Arc<dyn KeyProvider>) -> Result<Self, KeyError> {
        let tx = conn.transaction()?;
        let index_key = IndexKey::load_or_create(&tx, keys.as_ref())?;
        let identities = Identities { index_key, keys };
        let mut pending = Vec::new();
        for key in [META_KEY, STRIPE_META_KEY] {
            if !converted(&tx, key)? {
                pending.push(key);
            }
        }
        if pending.is_empty() {
            tx.commit()?;
            return Ok(identities);
        }
        for key in pending {
            identities.convert(&tx, key)?;
            mark_converted(&tx, key)?;
        }
        tx.commit()?;
        // The pages as they were before the conversion, ids in clear,
        // stay in the write-ahead log until a checkpoint truncates it.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(identities)
    }

    /// Replaces the ids in clear that the conversion recorded under `key`
    /// in `sidecar_meta` covers: customer ids for [`META_KEY`], Stripe
    /// customer ids for [`STRIPE_META_KEY`].
    fn convert(&self, conn: &Connection, key: &str) -> Result<(), KeyError> {
        let (columns, kind, record): (&[(&str, &str)], _, &RecordId<'_>) = match key {
            META_KEY => (&CUSTOMER_COLUMNS, "customer", &|conn, id| {
                self.record(conn, id)
            }),
            _ => (&STRIPE_COLUMNS, "Stripe customer", &|conn, id| {
                self.record_stripe(conn, id)
            }),
        };
        let replaced = pseudonymize_all(conn, columns, record)?;
        if key == META_KEY {
            let pseudonym = |customer: &str| self.pseudonym(customer);
            crate::erasure::seal_ids_in_clear(conn, self.keys.as_ref(), &pseudonym)?;
        }
        if replaced > 0 {
            tracing::info!(ids = replaced, "replaced stored {kind} ids with pseudonyms");
        }
        Ok(())
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
        self.seal_once(conn, &CUSTOMER, &pseudonym, customer)?;
        Ok(pseudonym)
    }

    /// Returns the customer id of `pseudonym`, or `None` when it has no
    /// readable identity: the customer was erased, or its data key is
    /// gone.
    pub fn reveal(&self, conn: &Connection, pseudonym: &str) -> Result<Option<String>, KeyError> {
        self.unseal(conn, &CUSTOMER, pseudonym)
    }

    /// Returns the pseudonym of the Stripe customer id `stripe_id`, without
    /// touching the store.
    pub fn stripe_pseudonym(&self, stripe_id: &str) -> String {
        self.index_key
            .hash(&format!("{STRIPE_HASH_PREFIX}{stripe_id}"))
    }

    /// Returns the pseudonym of the Stripe customer id `stripe_id` and
    /// stores its encrypted id when it has none yet, like [`Self::record`].
    pub fn record_stripe(&self, conn: &Connection, stripe_id: &str) -> Result<String, KeyError> {
        let pseudonym = self.stripe_pseudonym(stripe_id);
        self.seal_once(conn, &STRIPE, &pseudonym, stripe_id)?;
        Ok(pseudonym)
    }

    /// Returns the Stripe customer id of `pseudonym`, or `None` when it has
    /// no readable identity: the customer billed to it was erased.
    pub fn reveal_stripe(
        &self,
        conn: &Connection,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        self.unseal(conn, &STRIPE, pseudonym)
    }

    fn seal_once(
        &self,
        conn: &Connection,
        kind: &Sealed,
        pseudonym: &str,
        id: &str,
    ) -> Result<(), KeyError> {
        let table = kind.table;
        let known = conn
            .prepare_cached(&format!("SELECT 1 FROM {table} WHERE pseudonym = ?1"))?
            .exists([pseudonym])?;
        if !known {
            let owner = kind.owner(pseudonym);
            let sealed = keys::encrypt(conn, self.keys.as_ref(), &owner, id.as_bytes(), kind.aad)?;
            conn.prepare_cached(&format!(
                "INSERT INTO {table} (pseudonym, sealed) VALUES (?1, ?2)"
            ))?
            .execute(params![pseudonym, sealed])?;
        }
        Ok(())
    }

    fn unseal(
        &self,
        conn: &Connection,
        kind: &Sealed,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        let table = kind.table;
        let sealed: Option<Vec<u8>> = conn
            .prepare_cached(&format!("SELECT sealed FROM {table} WHERE pseudonym = ?1"))?
            .query_row([pseudonym], |row| row.get(0))
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let owner = kind.owner(pseudonym);
        let plaintext = keys::decrypt(conn, self.keys.as_ref(), &owner, &sealed, kind.aad)?;
        // The sidecar only seals valid UTF-8, and the tag authenticates it.
        Ok(plaintext.and_then(|bytes| String::from_utf8(bytes).ok()))
    }

    /// Returns a [`Revealer`] that remembers what it revealed, for code
    /// that reveals many rows at once.
    pub fn revealer(&self) -> Revealer<'_> {
        Revealer {
            identities: self,
            known: HashMap::new(),
            known_stripe: HashMap::new(),
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

    /// Returns whether a customer's mapping or meter event names the
    /// Stripe customer of `pseudonym`.
    pub fn stripe_in_use(conn: &Connection, pseudonym: &str) -> rusqlite::Result<bool> {
        conn.prepare_cached(
            "SELECT 1 FROM stripe_customer WHERE stripe_pseudonym = ?1
             UNION ALL SELECT 1 FROM meter_event WHERE stripe_pseudonym = ?1",
        )?
        .exists([pseudonym])
    }

    /// Deletes the encrypted Stripe customer id of `pseudonym` and destroys
    /// its data key. Returns whether there was an id.
    pub fn forget_stripe(conn: &Connection, pseudonym: &str) -> Result<bool, KeyError> {
        let deleted = conn.execute(
            "DELETE FROM stripe_identity WHERE pseudonym = ?1",
            [pseudonym],
        )?;
        keys::destroy(conn, &STRIPE.owner(pseudonym))?;
        Ok(deleted > 0)
    }
}

/// Stores the encrypted form of an id and returns its pseudonym, as
/// [`Identities::record`] does.
type RecordId<'a> = dyn Fn(&Connection, &str) -> Result<String, KeyError> + 'a;

/// Returns whether the conversion recorded under `key` in `sidecar_meta`
/// was done.
fn converted(conn: &Connection, key: &str) -> rusqlite::Result<bool> {
    let done: Option<String> = conn
        .query_row(
            "SELECT value FROM sidecar_meta WHERE key = ?1",
            [key],
            |row| row.get(0),
        )
        .optional()?;
    Ok(done.as_deref() == Some(META_PSEUDONYMS))
}

/// Records in `sidecar_meta` that the conversion under `key` was done.
fn mark_converted(conn: &Connection, key: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO sidecar_meta (key, value) VALUES (?1, ?2)",
        [key, META_PSEUDONYMS],
    )?;
    Ok(())
}

/// Replaces every id stored in clear in `columns` by the pseudonym that
/// `record` returns, which also stores the encrypted id. Returns how many
/// distinct ids it replaced.
///
/// A temporary table maps each id to its pseudonym, so every table takes
/// one UPDATE, whatever the number of ids.
fn pseudonymize_all(
    conn: &Connection,
    columns: &[(&str, &str)],
    record: &RecordId<'_>,
) -> Result<u64, KeyError> {
    let union = columns
        .iter()
        .map(|(table, column)| format!("SELECT {column} FROM {table} WHERE {column} IS NOT NULL"))
        .collect::<Vec<_>>()
        .join(" UNION ");
    let ids: Vec<String> = {
        let mut statement = conn.prepare(&union)?;
        let rows = statement.query_map([], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let create = "CREATE TEMP TABLE pseudonym_of (id TEXT PRIMARY KEY, pseudonym TEXT)";
    conn.execute_batch(create)?;
    let insert = "INSERT INTO temp.pseudonym_of (id, pseudonym) VALUES (?1, ?2)";
    for id in &ids {
        let pseudonym = record(conn, id)?;
        conn.execute(insert, [id, &pseudonym])?;
    }
    for (table, column) in columns {
        conn.execute(
            &format!(
                "UPDATE {table} SET {column} = map.pseudonym FROM temp.pseudonym_of AS map
                 WHERE {table}.{column} = map.id"
            ),
            [],
        )?;
    }
    conn.execute_batch("DROP TABLE temp.pseudonym_of")?;
    Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
}

/// Reveals customer and Stripe customer ids, decrypting each pseudonym
/// once.
#[derive(Debug)]
pub struct Revealer<'a> {
    identities: &'a Identities,
    known: HashMap<String, Option<String>>,
    known_stripe: HashMap<String, Option<String>>,
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

    /// As [`Identities::reveal_stripe`], from memory for a pseudonym seen
    /// before.
    pub fn reveal_stripe(
        &mut self,
        conn: &Connection,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        if let Some(known) = self.known_stripe.get(pseudonym) {
            return Ok(known.clone());
        }
        let stripe_id = self.identities.reveal_stripe(conn, pseudonym)?;
        self.known_stripe
            .insert(pseudonym.to_owned(), stripe_id.clone());
        Ok(stripe_id)
    }
}

/// Owner of a customer's data key, named by the customer's pseudonym.
pub fn key_owner(pseudonym: &str) -> String {
    CUSTOMER.owner(pseudonym)
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
    fn failed_stripe_writes_are_errors() {
        let (test, _conn, _identities) = store();
        let path = test.dir.path().join("db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE stripe_identity;
             CREATE VIEW stripe_identity AS SELECT '' AS pseudonym, x'' AS sealed;",
        )
        .unwrap();
        assert!(
            Identities::forget_stripe(&conn, "p").is_err(),
            "delete from a view"
        );

        conn.execute_batch("DROP TABLE stripe_customer").unwrap();
        assert!(
            Identities::stripe_in_use(&conn, "p").is_err(),
            "no mapping table"
        );
    }

    #[test]
    fn failed_conversion_record_fails_the_open() {
        let test = TestKeyFile::new();
        let mut conn = crate::store::test_support::open_writer(&test.dir.path().join("db"));
        conn.execute_batch(
            "CREATE TRIGGER reject_meta BEFORE INSERT ON sidecar_meta
             WHEN NEW.key = 'customer_ids'
             BEGIN SELECT RAISE(ABORT, 'rejected'); END;",
        )
        .unwrap();

        assert!(Identities::open(&mut conn, test_keys(&test)).is_err());
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
        let stripe_globex: String = conn
            .query_row(
                "SELECT stripe_pseudonym FROM stripe_customer WHERE customer = ?1",
                [&globex],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stripe_globex, identities.stripe_pseudonym("cus_G"));
        assert_eq!(
            identities
                .reveal_stripe(&conn, &stripe_globex)
                .unwrap()
                .as_deref(),
            Some("cus_G")
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

    #[test]
    fn stripe_ids_are_sealed_and_revealed() {
        let (_test, conn, identities) = store();

        let pseudonym = identities.record_stripe(&conn, "cus_Q1x").unwrap();
        let again = identities.record_stripe(&conn, "cus_Q1x").unwrap();

        assert_eq!(pseudonym, again);
        assert_eq!(pseudonym, identities.stripe_pseudonym("cus_Q1x"));
        assert_ne!(pseudonym, identities.pseudonym("cus_Q1x"));
        let mut revealer = identities.revealer();
        for _ in 0..2 {
            assert_eq!(
                revealer
                    .reveal_stripe(&conn, &pseudonym)
                    .unwrap()
                    .as_deref(),
                Some("cus_Q1x")
            );
        }
        // A customer pseudonym names no Stripe customer.
        assert_eq!(identities.reveal(&conn, &pseudonym).unwrap(), None);
        let sealed: Vec<u8> = conn
            .query_row("SELECT sealed FROM stripe_identity", [], |row| row.get(0))
            .unwrap();
        assert!(!sealed.windows(7).any(|window| window == b"cus_Q1x"));
    }

    #[test]
    fn forgotten_stripe_id_reveals_nothing() {
        let (_test, conn, identities) = store();
        let mapped = identities.record_stripe(&conn, "cus_M").unwrap();
        let billed = identities.record_stripe(&conn, "cus_B").unwrap();
        let unused = identities.record_stripe(&conn, "cus_U").unwrap();
        conn.execute(
            "INSERT INTO stripe_customer VALUES ('p-acme', ?1, 1)",
            [&mapped],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                                      stripe_pseudonym, created_unix_s)
             VALUES ('e1', 'p-acme', 'api_requests', 60, 1, 'sent', ?1, 1)",
            [&billed],
        )
        .unwrap();

        assert!(Identities::stripe_in_use(&conn, &mapped).unwrap());
        assert!(Identities::stripe_in_use(&conn, &billed).unwrap());
        assert!(!Identities::stripe_in_use(&conn, &unused).unwrap());
        assert!(Identities::forget_stripe(&conn, &unused).unwrap());
        assert!(!Identities::forget_stripe(&conn, &unused).unwrap());

        assert_eq!(identities.reveal_stripe(&conn, &unused).unwrap(), None);
        let owners: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM data_key WHERE owner = ?1",
                [format!("stripe:{unused}")],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(owners, 0, "the data key is destroyed");
        assert_eq!(
            identities.reveal_stripe(&conn, &mapped).unwrap().as_deref(),
            Some("cus_M")
        );
    }

    #[test]
    fn store_with_pseudonymous_customers_gets_stripe_pseudonyms() {
        let test = TestKeyFile::new();
        let path = test.dir.path().join("db");
        // The Stripe tables as schema version 3 had them, ids in clear,
        // with the customers already named by pseudonym.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE stripe_customer (
                 customer TEXT PRIMARY KEY NOT NULL,
                 stripe_customer_id TEXT NOT NULL UNIQUE,
                 updated_unix_s INTEGER NOT NULL) WITHOUT ROWID, STRICT;
             CREATE TABLE stripe_tier_state (
                 stripe_customer_id TEXT PRIMARY KEY NOT NULL, tier TEXT NOT NULL,
                 version INTEGER NOT NULL CHECK (version >= 1), event_id TEXT NOT NULL,
                 event_created_unix_s INTEGER NOT NULL, rank INTEGER NOT NULL,
                 subscription_id TEXT, subscription_created_unix_s INTEGER,
                 updated_unix_s INTEGER NOT NULL) WITHOUT ROWID, STRICT;
             CREATE TABLE sidecar_meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)
                 WITHOUT ROWID, STRICT;
             CREATE TABLE meter_event (
                 id INTEGER PRIMARY KEY AUTOINCREMENT, identifier TEXT NOT NULL UNIQUE,
                 customer TEXT NOT NULL, meter TEXT NOT NULL, minute_unix_s INTEGER NOT NULL,
                 value INTEGER NOT NULL CHECK (value > 0),
                 correction INTEGER NOT NULL DEFAULT 0 CHECK (correction IN (0, 1)),
                 state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'parked')),
                 stripe_customer_id TEXT, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT,
                 created_unix_s INTEGER NOT NULL, sent_unix_s INTEGER) STRICT;
             CREATE TABLE stripe_tier_metadata_pending (
                 stripe_customer_id TEXT PRIMARY KEY NOT NULL, tier TEXT NOT NULL,
                 version INTEGER NOT NULL, attempts INTEGER NOT NULL CHECK (attempts >= 0),
                 next_attempt_unix_ms INTEGER NOT NULL) WITHOUT ROWID, STRICT;
             INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                                      stripe_customer_id, created_unix_s)
                 VALUES ('e1', 'p-acme', 'api_requests', 60, 5, 'sent', 'cus_A7q', 1),
                        ('e2', 'p-acme', 'api_requests', 120, 5, 'pending', NULL, 1);
             INSERT INTO stripe_tier_metadata_pending VALUES ('cus_N0map', 'basic', 1, 0, 0);
             INSERT INTO sidecar_meta VALUES ('customer_ids', 'pseudonyms');
             INSERT INTO stripe_customer VALUES ('p-acme', 'cus_A7q', 1);
             INSERT INTO stripe_tier_state VALUES ('cus_A7q', 'pro', 1, 'evt_1', 1, 1,
                                                   NULL, NULL, 1);
             INSERT INTO stripe_tier_state VALUES ('cus_N0map', 'basic', 1, 'evt_2', 1, 1,
                                                   NULL, NULL, 1);
             PRAGMA user_version = 3;",
        )
        .unwrap();
        drop(conn);
        let mut conn = crate::store::test_support::open_writer(&path);

        let identities = Identities::open(&mut conn, test_keys(&test)).unwrap();

        let mapped: (String, String) = conn
            .query_row(
                "SELECT customer, stripe_pseudonym FROM stripe_customer",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            mapped,
            ("p-acme".to_owned(), identities.stripe_pseudonym("cus_A7q"))
        );
        let states: Vec<String> = conn
            .prepare("SELECT stripe_pseudonym FROM stripe_tier_state ORDER BY tier")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            states,
            [
                identities.stripe_pseudonym("cus_N0map"),
                identities.stripe_pseudonym("cus_A7q")
            ]
        );
        assert_eq!(
            identities
                .reveal_stripe(&conn, &states[0])
                .unwrap()
                .as_deref(),
            Some("cus_N0map")
        );
        let events: Vec<Option<String>> = conn
            .prepare("SELECT stripe_pseudonym FROM meter_event ORDER BY id")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(events, [Some(identities.stripe_pseudonym("cus_A7q")), None]);
        let pending: String = conn
            .query_row(
                "SELECT stripe_pseudonym FROM stripe_tier_metadata_pending",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(pending, identities.stripe_pseudonym("cus_N0map"));
        let customers: i64 = conn
            .query_row("SELECT COUNT(*) FROM customer_identity", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(customers, 0, "the customers were left alone");
        drop(conn);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend(std::fs::read(test.dir.path().join("db-wal")).unwrap_or_default());
        for id in [&b"cus_A7q"[..], b"cus_N0map"] {
            assert!(!bytes.windows(id.len()).any(|window| window == id));
        }
    }
}
