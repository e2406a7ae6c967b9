//! Blind indexes: keyed hashes of customer ids, so that rows can be looked
//! up by customer without storing the id itself.

use std::fmt;

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use rusqlite::Connection;
use sha2::Sha256;
use zeroize::Zeroize;

use super::KeyError;
use super::data_keys::{copy, load, load_or_create, replace};
use super::provider::{DATA_KEY_LEN, DataKey, KeyProvider};

/// Owner of the data key that keys the pseudonyms naming customers in the
/// store's rows. Like every owner starting with
/// [`SYSTEM_OWNER_PREFIX`](super::SYSTEM_OWNER_PREFIX), it cannot be
/// destroyed, but [`IndexKey::replace`] gives it a new key.
pub const INDEX_OWNER: &str = "system:index";

/// Owner of the data key that keys the subject hashes of the audit log and
/// the erasure receipts. It never changes, so a receipt stays checkable
/// after the index key is replaced.
pub const SUBJECT_OWNER: &str = "system:subject";

type HmacSha256 = Hmac<Sha256>;

/// The secret key of [`blind_index`]: a data key of [`INDEX_OWNER`] or
/// [`SUBJECT_OWNER`], wrapped like any other. KEK rotation rewraps it
/// without changing it, so blind indexes stay the same. Its `Debug` output
/// omits the key.
#[derive(Clone)]
pub struct IndexKey {
    /// HMAC-SHA256 state after absorbing the key, cloned for each input.
    mac: HmacSha256,
}

impl IndexKey {
    /// Loads the index key from the `data_key` table, or creates and stores
    /// it on first use. Call it inside a write transaction the first time.
    pub fn load_or_create(conn: &Connection, provider: &dyn KeyProvider) -> Result<Self, KeyError> {
        load_or_create(conn, provider, INDEX_OWNER).map(|key| Self::from_data_key(&key))
    }

    /// Loads the key of subject hashes, or returns `None` when the store
    /// has none yet.
    pub fn load_subject(
        conn: &Connection,
        provider: &dyn KeyProvider,
    ) -> Result<Option<Self>, KeyError> {
        let key = load(conn, provider, SUBJECT_OWNER)?;
        Ok(key.map(|key| Self::from_data_key(&key)))
    }

    /// Stores the index key as the key of subject hashes too, and returns
    /// it. A store that had one key for both keeps its audit entries'
    /// subject hashes checkable this way, before its index key is replaced.
    pub fn copy_to_subject(
        conn: &Connection,
        provider: &dyn KeyProvider,
    ) -> Result<Self, KeyError> {
        copy(conn, provider, INDEX_OWNER, SUBJECT_OWNER).map(|key| Self::from_data_key(&key))
    }

    /// Replaces the index key with a new random one and returns it. Every
    /// pseudonym under the old key must be replaced in the same
    /// transaction.
    pub fn replace(conn: &Connection, provider: &dyn KeyProvider) -> Result<Self, KeyError> {
        replace(conn, provider, INDEX_OWNER).map(|key| Self::from_data_key(&key))
    }

    fn from_data_key(key: &DataKey) -> Self {
        // HMAC pads a key shorter than the hash's 64-byte block with zeros
        // (RFC 2104), so the padded block gives the same MAC as the 32-byte
        // key, and `new` has no length error to handle.
        let mut block = Key::<HmacSha256>::default();
        block[..DATA_KEY_LEN].copy_from_slice(key.as_bytes());
        let mac = <HmacSha256 as KeyInit>::new(&block);
        block.as_mut_slice().zeroize();
        Self { mac }
    }

    /// Returns the blind index of `customer`: HMAC-SHA256 under this key,
    /// as 64 lowercase hex digits. It is stable for one store and cannot be
    /// linked to the customer id without the key.
    pub fn hash(&self, customer: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(customer.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl fmt::Debug for IndexKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("IndexKey(..)")
    }
}

/// Returns the blind index of `customer` under `key`; the same as
/// [`IndexKey::hash`].
pub fn blind_index(key: &IndexKey, customer: &str) -> String {
    key.hash(customer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_support::{TestKeyFile, memory_store};
    use crate::keys::{destroy, rewrap_all};

    #[test]
    fn blind_index_is_stable_hex() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let key = IndexKey::load_or_create(&conn, &test.keys).unwrap();

        let first = blind_index(&key, "customer-1");
        let again = blind_index(&key, "customer-1");
        let other = blind_index(&key, "customer-2");

        assert_eq!(first, again);
        assert_eq!(first, key.hash("customer-1"));
        assert_ne!(first, other);
        assert_eq!(first.len(), 64);
        assert!(
            first
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
    }

    #[test]
    fn blind_index_is_hmac_sha256_of_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let key = IndexKey::load_or_create(&conn, &test.keys).unwrap();
        let data_key = load_or_create(&conn, &test.keys, INDEX_OWNER).unwrap();

        let mut expected = <HmacSha256 as Mac>::new_from_slice(data_key.as_bytes()).unwrap();
        expected.update(b"customer-1");

        assert_eq!(
            key.hash("customer-1"),
            hex::encode(expected.finalize().into_bytes())
        );
    }

    #[test]
    fn index_key_is_stored_once() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let first = IndexKey::load_or_create(&conn, &test.keys).unwrap();

        let second = IndexKey::load_or_create(&conn, &test.keys).unwrap();
        let rows: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM data_key WHERE owner = ?1",
                [INDEX_OWNER],
                |row| row.get(0),
            )
            .unwrap();

        assert_eq!(rows, 1);
        assert_eq!(blind_index(&first, "c"), blind_index(&second, "c"));
    }

    #[test]
    fn blind_index_depends_on_store_key() {
        let test = TestKeyFile::new();
        let first = IndexKey::load_or_create(&memory_store(), &test.keys).unwrap();
        let second = IndexKey::load_or_create(&memory_store(), &test.keys).unwrap();

        assert_ne!(blind_index(&first, "c"), blind_index(&second, "c"));
    }

    #[test]
    fn blind_index_survives_kek_rotation() {
        let conn = memory_store();
        let mut test = TestKeyFile::new();
        let before = blind_index(&IndexKey::load_or_create(&conn, &test.keys).unwrap(), "c");

        test.keys.rotate().unwrap();
        rewrap_all(&conn, &test.keys).unwrap();
        test.keys.retire("kek-1").unwrap();
        let after = blind_index(&IndexKey::load_or_create(&conn, &test.keys).unwrap(), "c");

        assert_eq!(before, after);
    }

    #[test]
    fn index_key_cannot_be_destroyed() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        IndexKey::load_or_create(&conn, &test.keys).unwrap();

        let err = destroy(&conn, INDEX_OWNER).unwrap_err();

        assert!(matches!(err, KeyError::ReservedOwner { .. }), "{err}");
    }

    #[test]
    fn load_reports_store_errors() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let test = TestKeyFile::new();

        let err = IndexKey::load_or_create(&conn, &test.keys).unwrap_err();

        assert!(matches!(err, KeyError::Sqlite(_)), "{err}");
    }

    #[test]
    fn debug_hides_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let key = IndexKey::load_or_create(&conn, &test.keys).unwrap();

        assert_eq!(format!("{key:?}"), "IndexKey(..)");
    }

    #[test]
    fn subject_key_is_a_copy_of_index_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        assert!(IndexKey::load_subject(&conn, &test.keys).unwrap().is_none());
        let index = IndexKey::load_or_create(&conn, &test.keys).unwrap();

        let subject = IndexKey::copy_to_subject(&conn, &test.keys).unwrap();

        let loaded = IndexKey::load_subject(&conn, &test.keys).unwrap().unwrap();
        assert_eq!(subject.hash("c"), index.hash("c"));
        assert_eq!(loaded.hash("c"), index.hash("c"));
    }

    #[test]
    fn replaced_index_key_gives_new_hashes() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let old = IndexKey::load_or_create(&conn, &test.keys).unwrap();
        let subject = IndexKey::copy_to_subject(&conn, &test.keys).unwrap();

        let new = IndexKey::replace(&conn, &test.keys).unwrap();

        let loaded = IndexKey::load_or_create(&conn, &test.keys).unwrap();
        assert_ne!(new.hash("c"), old.hash("c"));
        assert_eq!(loaded.hash("c"), new.hash("c"));
        let kept = IndexKey::load_subject(&conn, &test.keys).unwrap().unwrap();
        assert_eq!(kept.hash("c"), subject.hash("c"), "the subject key stays");
    }
}
