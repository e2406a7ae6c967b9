//! Customer ids at rest.
//!
//! The ledger and billing tables name a customer by its pseudonym: the
//! keyed hash ([`IndexKey::hash`]) of the customer id under the store's
//! index key. The id itself is stored once, in `customer_identity`,
//! encrypted under the customer's own data key. The database file therefore
//! contains no customer id in clear, and erasing a customer destroys that
//! data key, so the identity row in a copy or backup of the file can no
//! longer be read either.
//!
//! The audit log and the erasures record a customer by its subject hash
//! instead: the keyed hash under a second key that never changes, so that
//! a receipt stays checkable. [`replace_index_key`] gives the store a new
//! index key and renames every row. Once the key-encryption key of a
//! backup's index key is retired, the backup's rows of erased customers
//! can no longer be linked to their ids.
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

use crate::keys::{self, DataKey, IndexKey, KeyError, KeyProvider};

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
/// ciphertexts (so one moved to another table fails authentication), the
/// prefix of its data key owners, and the prefix of its pseudonym's hashed
/// input.
struct Sealed {
    table: &'static str,
    aad: &'static [u8],
    owner_prefix: &'static str,
    hash_prefix: &'static str,
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
    hash_prefix: "",
};

/// Stripe customer ids, in `stripe_identity`.
const STRIPE: Sealed = Sealed {
    table: "stripe_identity",
    aad: b"stripe_identity.sealed",
    owner_prefix: "stripe:",
    hash_prefix: STRIPE_HASH_PREFIX,
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
    subject_key: IndexKey,
    keys: Arc<dyn KeyProvider>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities").finish_non_exhaustive()
    }
}

impl Identities {
    /// Loads the index and subject keys (creating them on first use). On
    /// the first open of a store written before pseudonyms, it replaces
    /// every stored customer id and Stripe customer id with its pseudonym.
    /// On the first open of a store whose index key also keyed the subject
    /// hashes, that key becomes the subject key and the rows get
    /// pseudonyms under a new index key. All of it happens in one
    /// transaction.
    pub fn open(conn: &mut Connection, keys: Arc<dyn KeyProvider>) -> Result<Self, KeyError> {
        let tx = conn.transaction()?;
        let index_key = IndexKey::load_or_create(&tx, keys.as_ref())?;
        let (subject_key, split) = match IndexKey::load_subject(&tx, keys.as_ref())? {
            Some(subject_key) => (subject_key, false),
            None => (IndexKey::copy_to_subject(&tx, keys.as_ref())?, true),
        };
        let mut identities = Identities {
            index_key,
            subject_key,
            keys,
        };
        let mut rewritten = split;
        for key in [META_KEY, STRIPE_META_KEY] {
            if !converted(&tx, key)? {
                identities.convert(&tx, key)?;
                mark_converted(&tx, key)?;
                rewritten = true;
            }
        }
        if split {
            identities.rename_under_new_key(&tx)?;
        }
        if rewritten {
            // The pages as they were before, ids in clear or old
            // pseudonyms, stay in the file and the write-ahead log until
            // they are rebuilt, which the next open retries after a failure.
            mark_rebuild(&tx)?;
        }
        tx.commit()?;
        if rebuild_pending(conn)? {
            rebuild_file(conn)?;
        }
        Ok(identities)
    }

    /// Replaces the index key with a new one and every pseudonym under the
    /// old key with the customer's pseudonym under the new key: in the
    /// ledger, billing, webhook and erasure tables, and in the owners of
    /// the customers' data keys. Returns what it renamed.
    fn rename_under_new_key(&mut self, conn: &Connection) -> Result<Renamed, KeyError> {
        self.index_key = IndexKey::replace(conn, self.keys.as_ref())?;
        conn.execute_batch(CREATE_RENAME_MAP)?;
        let customers = self.rename_identities(conn, &CUSTOMER)?;
        let insert = "INSERT OR IGNORE INTO temp.rename_map (old, new) VALUES (?1, ?2)";
        for (old, customer) in crate::erasure::erased_pseudonyms(conn, self.keys.as_ref())? {
            conn.execute(insert, [&old, &self.pseudonym(&customer)])?;
        }
        let erasure_columns =
            crate::erasure::PSEUDONYM_TABLES.map(|(table, _)| (table, "pseudonym"));
        let columns: Vec<_> = CUSTOMER_COLUMNS
            .iter()
            .chain(&erasure_columns)
            .copied()
            .collect();
        let mut unidentified = rename_unidentified(conn, &columns)?;
        replace_values(conn, &columns)?;

        conn.execute_batch("DELETE FROM temp.rename_map")?;
        let stripe_customers = self.rename_identities(conn, &STRIPE)?;
        unidentified += rename_unidentified(conn, &STRIPE_COLUMNS)?;
        replace_values(conn, &STRIPE_COLUMNS)?;
        conn.execute_batch("DROP TABLE temp.rename_map")?;
        destroy_unused_keys(conn)?;

        let renamed = Renamed {
            customers,
            stripe_customers,
            unidentified,
        };
        if unidentified > 0 {
            tracing::warn!(
                pseudonyms = unidentified,
                "rows named by a pseudonym without a readable identity got a random pseudonym; \
                 they can no longer be linked to a customer"
            );
        }
        tracing::info!(
            customers,
            stripe_customers,
            "renamed the stored rows under a new index key"
        );
        Ok(renamed)
    }

    /// Gives every identity of `kind` its pseudonym under the current index
    /// key: its id is encrypted again under a new data key of the new
    /// owner, the old data key is destroyed, and the change is recorded in
    /// `temp.rename_map`. An identity whose data key is gone, or whose
    /// ciphertext is damaged, is deleted, and its rows are left to
    /// [`rename_unidentified`]. Returns how many identities it renamed.
    fn rename_identities(&self, conn: &Connection, kind: &Sealed) -> Result<u64, KeyError> {
        let table = kind.table;
        let olds: Vec<String> = conn
            .prepare(&format!("SELECT pseudonym FROM {table}"))?
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut renamed = 0;
        for old in olds {
            let Some(id) = self.unseal_readable(conn, kind, &old)? else {
                conn.execute(&format!("DELETE FROM {table} WHERE pseudonym = ?1"), [&old])?;
                continue;
            };
            let new = self.index_key.hash(&format!("{}{id}", kind.hash_prefix));
            let owner = kind.owner(&new);
            // A new data key, so the live row shares no key id with a copy
            // of the old one.
            keys::destroy(conn, &kind.owner(&old))?;
            let sealed = keys::encrypt(conn, self.keys.as_ref(), &owner, id.as_bytes(), kind.aad)?;
            let update = format!("UPDATE {table} SET {RENAME_IDENTITY}");
            conn.execute(&update, params![old, new, sealed])?;
            conn.execute(INSERT_RENAME, [&old, &new])?;
            renamed += 1;
        }
        Ok(renamed)
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

    /// Returns the subject hash of `customer`, as the audit log, the
    /// erasures and their receipts record it.
    pub fn subject(&self, customer: &str) -> String {
        self.subject_key.hash(customer)
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

    /// As [`Self::reveal`], but a damaged ciphertext is logged and gives
    /// `None`, as a destroyed data key does. Other errors, such as a
    /// key-encryption key missing from the key file, are returned.
    pub fn reveal_readable(
        &self,
        conn: &Connection,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        self.unseal_readable(conn, &CUSTOMER, pseudonym)
    }

    /// Returns the pseudonym of the Stripe customer id `stripe_id`, without
    /// touching the store.
    pub fn stripe_pseudonym(&self, stripe_id: &str) -> String {
        self.index_key
            .hash(&format!("{}{stripe_id}", STRIPE.hash_prefix))
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

    /// As [`Self::unseal`], with a damaged ciphertext logged and read as
    /// `None`.
    fn unseal_readable(
        &self,
        conn: &Connection,
        kind: &Sealed,
        pseudonym: &str,
    ) -> Result<Option<String>, KeyError> {
        match self.unseal(conn, kind, pseudonym) {
            Err(err) if err.is_damaged_ciphertext() => {
                tracing::warn!(
                    table = kind.table,
                    pseudonym,
                    error = %err,
                    "failed to read a damaged identity, which counts as erased; restore the \
                     row from a backup to keep the id"
                );
                Ok(None)
            }
            read => read,
        }
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
    conn.execute_batch(CREATE_RENAME_MAP)?;
    for id in &ids {
        let pseudonym = record(conn, id)?;
        conn.execute(INSERT_RENAME, [id, &pseudonym])?;
    }
    replace_values(conn, columns)?;
    conn.execute_batch("DROP TABLE temp.rename_map")?;
    Ok(u64::try_from(ids.len()).unwrap_or(u64::MAX))
}

/// Creates the temporary table that maps each old value of a column to its
/// new one, so every table takes one UPDATE, whatever the number of values.
const CREATE_RENAME_MAP: &str =
    "CREATE TEMP TABLE rename_map (old TEXT PRIMARY KEY NOT NULL, new TEXT NOT NULL)";

/// Records an old value and its new one in `temp.rename_map`.
const INSERT_RENAME: &str = "INSERT INTO temp.rename_map (old, new) VALUES (?1, ?2)";

/// Sets of an identity's row: its new pseudonym and its id encrypted again.
const RENAME_IDENTITY: &str = "pseudonym = ?2, sealed = ?3 WHERE pseudonym = ?1";

/// Selects the owners of customers' and Stripe customers' data keys that no
/// identity row names.
const SELECT_UNUSED_KEYS: &str = "
SELECT owner FROM data_key
WHERE (substr(owner, 1, 9) = 'customer:'
       AND substr(owner, 10) NOT IN (SELECT pseudonym FROM customer_identity))
   OR (substr(owner, 1, 7) = 'stripe:'
       AND substr(owner, 8) NOT IN (SELECT pseudonym FROM stripe_identity))";

/// Replaces every value of `columns` that `temp.rename_map` maps.
fn replace_values(conn: &Connection, columns: &[(&str, &str)]) -> rusqlite::Result<()> {
    for (table, column) in columns {
        conn.execute(
            &format!(
                "UPDATE {table} SET {column} = map.new FROM temp.rename_map AS map
                 WHERE {table}.{column} = map.old"
            ),
            [],
        )?;
    }
    Ok(())
}

/// Maps each value of `columns` that `temp.rename_map` does not map yet to
/// a random pseudonym, and returns how many there were. Those are rows of
/// an identity that can no longer be read, which must not keep a pseudonym
/// that the old index key computes.
fn rename_unidentified(conn: &Connection, columns: &[(&str, &str)]) -> Result<u64, KeyError> {
    let union = columns
        .iter()
        .map(|(table, column)| format!("SELECT {column} AS value FROM {table}"))
        .collect::<Vec<_>>()
        .join(" UNION ");
    let unmapped: Vec<String> = conn
        .prepare(&format!(
            "SELECT value FROM ({union}) WHERE value IS NOT NULL
                 AND value NOT IN (SELECT old FROM temp.rename_map)"
        ))?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for old in &unmapped {
        let random = hex::encode(DataKey::generate()?.as_bytes());
        conn.execute(INSERT_RENAME, [old, &random])?;
    }
    Ok(u64::try_from(unmapped.len()).unwrap_or(u64::MAX))
}

/// Destroys the data keys of customers and Stripe customers that have no
/// identity: they encrypt nothing, and their owners name old pseudonyms.
fn destroy_unused_keys(conn: &Connection) -> Result<(), KeyError> {
    let unused: Vec<String> = conn
        .prepare(SELECT_UNUSED_KEYS)?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for owner in unused {
        keys::destroy(conn, &owner)?;
    }
    Ok(())
}

/// Key in `sidecar_meta` recording that rows were replaced and the file
/// is still to be rebuilt.
const REBUILD_META_KEY: &str = "file_rebuild";

/// Records that the file is to be rebuilt, inside the transaction that
/// replaces rows.
fn mark_rebuild(conn: &Connection) -> rusqlite::Result<()> {
    let insert = "INSERT OR REPLACE INTO sidecar_meta (key, value) VALUES (?1, 'pending')";
    conn.execute(insert, [REBUILD_META_KEY]).map(drop)
}

/// Returns whether the file is still to be rebuilt.
fn rebuild_pending(conn: &Connection) -> rusqlite::Result<bool> {
    let select = "SELECT 1 FROM sidecar_meta WHERE key = ?1";
    conn.prepare(select)?.exists([REBUILD_META_KEY])
}

/// Rebuilds the database file and truncates the write-ahead log. VACUUM
/// copies only live rows, so old values in free pages are dropped. It
/// needs free disk space of about the file's size.
fn rebuild_file(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("VACUUM")?;
    let delete = "DELETE FROM sidecar_meta WHERE key = ?1";
    conn.execute(delete, [REBUILD_META_KEY])?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
}

/// Counts of the rows [`replace_index_key`] renamed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Renamed {
    /// Customers whose rows got their pseudonym under the new key.
    pub customers: u64,
    /// Stripe customers whose rows got their pseudonym under the new key.
    pub stripe_customers: u64,
    /// Pseudonyms without a readable identity, replaced by random ones.
    pub unidentified: u64,
}

/// Replaces the store's index key with a new one and renames every row
/// under it, in one transaction (see [`Identities`]). Run it on a stopped
/// store, after [`Identities::open`] has converted it.
pub fn replace_index_key(
    conn: &mut Connection,
    keys: Arc<dyn KeyProvider>,
) -> Result<Renamed, KeyError> {
    let mut identities = Identities::open(conn, keys)?;
    let tx = conn.transaction()?;
    let renamed = identities.rename_under_new_key(&tx)?;
    mark_rebuild(&tx)?;
    tx.commit()?;
    rebuild_file(conn)?;
    Ok(renamed)
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
        // The customer has no identity row, so its rows got a random
        // pseudonym in place of one under the old index key.
        assert_eq!(mapped.1, identities.stripe_pseudonym("cus_A7q"));
        assert_ne!(mapped.0, "p-acme");
        let event_customers: Vec<String> = conn
            .prepare("SELECT DISTINCT customer FROM meter_event")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(event_customers, std::slice::from_ref(&mapped.0));
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

    /// Returns the bytes of the store file and its write-ahead log.
    fn store_bytes(test: &TestKeyFile) -> Vec<u8> {
        let mut bytes = std::fs::read(test.dir.path().join("db")).unwrap();
        bytes.extend(std::fs::read(test.dir.path().join("db-wal")).unwrap_or_default());
        bytes
    }

    fn contains(bytes: &[u8], text: &str) -> bool {
        bytes
            .windows(text.len())
            .any(|window| window == text.as_bytes())
    }

    fn column_values(conn: &Connection, table: &str, column: &str) -> Vec<String> {
        conn.prepare(&format!("SELECT DISTINCT {column} FROM {table} ORDER BY 1"))
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// Erases the customer "gone" with counts left in Redis, and returns
    /// the erasure's id.
    fn erase(
        conn: &mut Connection,
        keys: &dyn KeyProvider,
        subject: &str,
        pseudonym: &str,
    ) -> String {
        let request = crate::erasure::EraseRequest {
            customer: "gone",
            subject_hash: subject,
            pseudonym,
            now_unix_ms: 5_000,
            first_erased_unix_ms: 5_000,
            refuse_until_unix_s: 90_000,
            shared_counters: true,
            announce: true,
            extends_refusal: false,
            forward_to: &[],
        };
        let receipt = crate::erasure::Receipt {
            position: 1,
            entry_hash: "ff".into(),
        };
        let (erasure, _) =
            crate::erasure::erase(conn, keys, request, &mut |_, _, _| Ok(receipt.clone())).unwrap();
        erasure.erasure_id
    }

    /// Inserts a ledger row of the customer of `pseudonym`.
    fn insert_usage(conn: &Connection, pseudonym: &str) {
        let insert = "INSERT INTO usage_minute VALUES (?1, 60, 'basic', 5, 1, 100)";
        conn.execute(insert, [pseudonym]).unwrap();
    }

    #[test]
    fn subject_hash_is_not_the_pseudonym() {
        let (test, mut conn, identities) = store();

        let again = Identities::open(&mut conn, test_keys(&test)).unwrap();

        assert_ne!(identities.subject("acme"), identities.pseudonym("acme"));
        assert_eq!(again.subject("acme"), identities.subject("acme"));
        assert_eq!(again.pseudonym("acme"), identities.pseudonym("acme"));
    }

    #[test]
    fn single_key_store_gets_subject_key() {
        let (test, mut conn, identities) = store();
        let old = identities.record(&conn, "acme").unwrap();
        insert_usage(&conn, &old);
        // A store written before the subject key had the index key only,
        // which keyed the subject hashes too.
        let gone = identities.pseudonym("gone");
        let erased = erase(&mut conn, test_keys(&test).as_ref(), &gone, &gone);
        conn.execute(
            "DELETE FROM data_key WHERE owner = ?1",
            [crate::keys::SUBJECT_OWNER],
        )
        .unwrap();

        let split = Identities::open(&mut conn, test_keys(&test)).unwrap();

        assert_eq!(split.subject("acme"), old);
        let found = crate::erasure::by_subject(&conn, &split.subject("gone")).unwrap();
        assert_eq!(found.map(|erasure| erasure.erasure_id), Some(erased));
        let new = split.pseudonym("acme");
        assert_ne!(new, old);
        assert_eq!(
            column_values(&conn, "usage_minute", "customer"),
            std::slice::from_ref(&new)
        );
        assert_eq!(split.reveal(&conn, &new).unwrap().as_deref(), Some("acme"));
        drop(conn);
        assert!(!contains(&store_bytes(&test), &old));
    }

    #[test]
    fn new_index_key_renames_every_row() {
        let (test, mut conn, before) = store();
        let keys = test_keys(&test);
        let acme = before.record(&conn, "acme").unwrap();
        let cus_a = before.record_stripe(&conn, "cus_A").unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO usage_minute VALUES ('{acme}', 60, 'basic', 5, 1, 100),
                                             ('orphan', 60, 'basic', 1, 0, 10);
             INSERT INTO billing_dirty VALUES ('{acme}', 60), ('orphan', 60);
             INSERT INTO meter_bucket VALUES ('{acme}', 'api_requests', 60, 5, 1);
             INSERT INTO meter_event (identifier, customer, meter, minute_unix_s, value, state,
                                      stripe_pseudonym, created_unix_s)
                 VALUES ('e1', '{acme}', 'api_requests', 60, 5, 'sent', '{cus_a}', 1);
             INSERT INTO counter_outbox (customer, bucket_unix_s, admitted, requests)
                 VALUES ('{acme}', 60, 1, 1);
             INSERT INTO stripe_customer VALUES ('{acme}', '{cus_a}', 1);
             INSERT INTO stripe_tier_metadata_pending VALUES ('{cus_a}', 'basic', 1, 0, 0);
             INSERT INTO stripe_tier_state VALUES ('orphan-stripe', 'pro', 1, 'evt_1', 1, 1,
                                                   NULL, NULL, 1);"
        ))
        .unwrap();
        crate::keys::encrypt(&conn, keys.as_ref(), "customer:unused", b"x", b"").unwrap();
        let gone = before.pseudonym("gone");
        erase(&mut conn, keys.as_ref(), &before.subject("gone"), &gone);

        let renamed = replace_index_key(&mut conn, Arc::clone(&keys)).unwrap();
        let after = Identities::open(&mut conn, keys).unwrap();

        assert_eq!(
            renamed,
            Renamed {
                customers: 1,
                stripe_customers: 1,
                unidentified: 2
            }
        );
        let new_acme = after.pseudonym("acme");
        let new_cus_a = after.stripe_pseudonym("cus_A");
        assert_ne!(new_acme, acme);
        assert_eq!(after.subject("acme"), before.subject("acme"));
        for (table, column) in CUSTOMER_COLUMNS {
            assert!(
                column_values(&conn, table, column).contains(&new_acme),
                "{table}"
            );
        }
        for (table, column) in STRIPE_COLUMNS
            .into_iter()
            .filter(|(t, _)| *t != "stripe_tier_state")
        {
            assert_eq!(
                column_values(&conn, table, column),
                std::slice::from_ref(&new_cus_a),
                "{table}"
            );
        }
        assert_eq!(
            after.reveal(&conn, &new_acme).unwrap().as_deref(),
            Some("acme")
        );
        assert_eq!(
            after.reveal_stripe(&conn, &new_cus_a).unwrap().as_deref(),
            Some("cus_A")
        );
        let new_gone = after.pseudonym("gone");
        for (table, _) in crate::erasure::PSEUDONYM_TABLES {
            assert_eq!(
                column_values(&conn, table, "pseudonym"),
                std::slice::from_ref(&new_gone)
            );
        }
        let named = crate::erasure::erased_pseudonyms(&conn, after.keys.as_ref()).unwrap();
        assert_eq!(named[0], (new_gone.clone(), "gone".to_owned()));
        // Rows without an identity share one random pseudonym per value.
        let orphans = column_values(&conn, "billing_dirty", "customer");
        let orphan = orphans.iter().find(|value| **value != new_acme).unwrap();
        assert_eq!(orphan.len(), 64);
        assert!(column_values(&conn, "usage_minute", "customer").contains(orphan));
        let owners = column_values(&conn, "data_key", "owner");
        assert!(owners.contains(&format!("customer:{new_acme}")));
        assert!(owners.contains(&format!("stripe:{new_cus_a}")));
        assert!(!owners.contains(&"customer:unused".to_owned()));
        drop(conn);
        let bytes = store_bytes(&test);
        for old in [&acme, &cus_a, &gone, "orphan-stripe", "customer:unused"] {
            assert!(!contains(&bytes, old), "{old} is still in the store file");
        }
    }

    #[test]
    fn unreadable_identity_is_dropped_by_new_index_key() {
        // An identity whose data key was destroyed, and one whose ciphertext
        // was cut.
        type MakeUnreadable = fn(&Connection, &str);
        let cases: [(&str, MakeUnreadable); 2] = [
            ("shredded", |conn, pseudonym| {
                assert!(keys::destroy(conn, &key_owner(pseudonym)).unwrap());
            }),
            ("damaged", |conn, _| cut_sealed(conn, "customer_identity")),
        ];
        for (name, make_unreadable) in cases {
            let (test, mut conn, identities) = store();
            let pseudonym = identities.record(&conn, name).unwrap();
            insert_usage(&conn, &pseudonym);
            make_unreadable(&conn, &pseudonym);

            let renamed = replace_index_key(&mut conn, test_keys(&test)).unwrap();

            assert_eq!(renamed.customers, 0, "{name}");
            assert_eq!(renamed.unidentified, 1, "{name}");
            let identities_left = column_values(&conn, "customer_identity", "pseudonym");
            assert!(identities_left.is_empty(), "{name}");
            let customers = column_values(&conn, "usage_minute", "customer");
            assert_eq!(customers.len(), 1, "{name}");
            assert_ne!(customers[0], pseudonym, "{name}");
            assert_eq!(identities.reveal_readable(&conn, "none").unwrap(), None);
        }
    }

    #[test]
    fn damaged_erased_id_stops_new_index_key() {
        let (test, mut conn, identities) = store();
        let keys = test_keys(&test);
        let gone = identities.pseudonym("gone");
        erase(&mut conn, keys.as_ref(), "ab12", &gone);
        cut_sealed(&conn, "erased_customer");

        let err = replace_index_key(&mut conn, keys).unwrap_err();

        assert!(matches!(err, KeyError::Tampered { .. }), "{err}");
        assert_eq!(
            column_values(&conn, "erased_customer", "pseudonym"),
            [gone],
            "the renaming rolled back, so the refusal holds"
        );
    }

    /// Cuts the last byte of every sealed id in `table`.
    fn cut_sealed(conn: &Connection, table: &str) {
        let cut = format!("UPDATE {table} SET sealed = substr(sealed, 1, length(sealed) - 1)");
        conn.execute(&cut, []).unwrap();
    }

    #[test]
    fn unreadable_keys_stop_new_index_key() {
        let (test, mut conn, identities) = store();
        let keys = test_keys(&test);
        let pseudonym = identities.record(&conn, "acme").unwrap();
        conn.execute(
            "UPDATE data_key SET kek_id = 'kek-9' WHERE owner = ?1",
            [key_owner(&pseudonym)],
        )
        .unwrap();

        let err = replace_index_key(&mut conn, Arc::clone(&keys)).unwrap_err();

        assert!(
            matches!(&err, KeyError::UnknownKek { kek_id } if kek_id == "kek-9"),
            "{err}"
        );
        assert_eq!(
            column_values(&conn, "customer_identity", "pseudonym"),
            std::slice::from_ref(&pseudonym),
            "the renaming rolled back"
        );

        conn.execute("DELETE FROM customer_identity", []).unwrap();
        erase(&mut conn, keys.as_ref(), "ab12", "cd34");
        conn.execute("DELETE FROM data_key WHERE owner = 'system:erasures'", [])
            .unwrap();

        let err = replace_index_key(&mut conn, keys).unwrap_err();

        assert!(matches!(err, KeyError::SystemKeyLost { .. }), "{err}");
        assert_eq!(
            column_values(&conn, "erased_customer", "pseudonym"),
            ["cd34"],
            "the renaming rolled back"
        );
    }

    #[test]
    fn every_text_column_is_classified() {
        let (_test, conn, _identities) = store();
        // Columns that hold no pseudonym: subject hashes and values derived
        // from them, which never change, and values about no customer.
        // Meter event identifiers hash the pseudonym but are kept, since
        // retries must reuse them, and an erasure deletes the customer's
        // events.
        let kept = [
            "asset_region.allowed_regions",
            "asset_region.asset",
            "asset_region.storage_region",
            "asset_region.tier_regions",
            "audit_log.action",
            "audit_log.actor",
            "audit_log.entry_hash",
            "audit_log.prev_hash",
            "audit_log.subject_hash",
            "data_key.kek_id",
            "erasure.erasure_id",
            "erasure.receipt_hash",
            "erasure.records",
            "erasure.subject_hash",
            "erasure_counters_pending.erasure_id",
            "erasure_forward.erasure_id",
            "erasure_forward.last_error",
            "erasure_forward.peer",
            "instance_erasure_ack.instance_id",
            "instance_sequence.instance_id",
            "meter_bucket.meter",
            "meter_event.identifier",
            "meter_event.meter",
            "meter_event.reason",
            "meter_event.state",
            "sidecar_meta.key",
            "sidecar_meta.value",
            "stripe_tier_metadata_pending.tier",
            "stripe_tier_state.event_id",
            "stripe_tier_state.subscription_id",
            "stripe_tier_state.tier",
            "stripe_webhook_event.event_id",
            "stripe_webhook_event.event_type",
            "usage_anonymous.tier",
            "usage_minute.tier",
        ];
        let erasure_columns =
            crate::erasure::PSEUDONYM_TABLES.map(|(table, _)| (table, "pseudonym"));
        let renamed = CUSTOMER_COLUMNS
            .iter()
            .chain(&STRIPE_COLUMNS)
            .chain(&erasure_columns)
            .chain(&[
                ("customer_identity", "pseudonym"),
                ("stripe_identity", "pseudonym"),
                ("data_key", "owner"),
            ])
            .map(|(table, column)| format!("{table}.{column}"));
        let mut expected: Vec<String> = renamed.chain(kept.map(String::from)).collect();
        expected.sort();
        expected.dedup();

        let columns: Vec<String> = conn
            .prepare(
                "SELECT m.name || '.' || c.name FROM sqlite_master AS m, pragma_table_info(m.name) AS c
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND c.type = 'TEXT'
                 ORDER BY 1",
            )
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();

        assert_eq!(
            columns, expected,
            "a new TEXT column must be renamed or listed"
        );
    }

    #[test]
    fn interrupted_rebuild_runs_at_next_open() {
        let (test, mut conn, _identities) = store();
        assert!(!rebuild_pending(&conn).unwrap());
        mark_rebuild(&conn).unwrap();

        Identities::open(&mut conn, test_keys(&test)).unwrap();

        assert!(!rebuild_pending(&conn).unwrap());
    }
}
