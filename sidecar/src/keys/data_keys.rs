//! The `data_key` table: one wrapped data key per owner, and encryption
//! under it.

use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::KeyError;
use super::cipher::{open, seal};
use super::provider::{DataKey, KeyProvider, WrappedKey};

/// Prefix of the owners reserved for the sidecar's own keys, such as
/// [`INDEX_OWNER`](super::INDEX_OWNER). [`destroy`] rejects them.
pub const SYSTEM_OWNER_PREFIX: &str = "system:";

/// First byte of a ciphertext in the current format.
const FORMAT_V1: u8 = 1;

/// Length of the data key id in a ciphertext.
const KEY_ID_LEN: usize = 8;

/// Length of a ciphertext's header: the format version and the key id.
const HEADER_LEN: usize = 1 + KEY_ID_LEN;

/// Start of the hashed input that derives a data key's id.
const KEY_ID_LABEL: &[u8] = b"veo-sidecar data key id v1\0";

/// Encrypts `plaintext` under `owner`'s data key, creating and storing the
/// key on first use. `aad` (associated data) names where the ciphertext is
/// stored, for example `b"customer_profile.email:42"`. [`decrypt`] must be
/// given the same `aad`, so a ciphertext copied to another row or column
/// fails authentication.
///
/// Call it inside the transaction that stores the ciphertext, so a new data
/// key commits together with the data it encrypts.
pub fn encrypt(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
    plaintext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let key = load_or_create(conn, provider, owner)?;
    let header = header(&key);

    let sealed = seal(key.as_bytes(), plaintext, &bound_aad(&header, owner, aad))?;
    Ok([header.as_slice(), &sealed].concat())
}

/// Decrypts a ciphertext of [`encrypt`] for `owner` and `aad`.
///
/// Returns `None` when the ciphertext was not encrypted under the owner's
/// current data key: the key was destroyed (crypto-shredded), possibly
/// followed by a new key for new data, or the ciphertext belongs to another
/// owner. Fails with [`KeyError::MalformedCiphertext`] or
/// [`KeyError::Tampered`] when the ciphertext was changed or belongs to
/// another row or column, and with the provider's error when the data key
/// cannot be unwrapped.
pub fn decrypt(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Option<Vec<u8>>, KeyError> {
    let malformed = |reason| KeyError::MalformedCiphertext {
        owner: owner.to_owned(),
        reason,
    };
    let (header, sealed) = ciphertext
        .split_first_chunk::<HEADER_LEN>()
        .ok_or_else(|| malformed("shorter than its header"))?;
    let [version, key_id @ ..] = header;
    if *version != FORMAT_V1 {
        return Err(malformed("unknown format version"));
    }

    let Some(key) = load(conn, provider, owner)? else {
        return Ok(None);
    };
    if *key_id != key_id_of(&key) {
        return Ok(None);
    }

    let plaintext = open(key.as_bytes(), sealed, &bound_aad(header, owner, aad));
    match plaintext {
        Some(plaintext) => Ok(Some(plaintext)),
        None => Err(KeyError::Tampered {
            owner: owner.to_owned(),
        }),
    }
}

/// Deletes `owner`'s data key, so that every ciphertext encrypted under it
/// decrypts to `None` from then on. Returns whether a key existed.
///
/// SQLite's `secure_delete` is on for the delete, so the wrapped key's
/// bytes are overwritten in the database page. Older copies of the page can
/// remain in the write-ahead log until the next checkpoint. Fails with
/// [`KeyError::ReservedOwner`] for owners starting with
/// [`SYSTEM_OWNER_PREFIX`].
pub fn destroy(conn: &Connection, owner: &str) -> Result<bool, KeyError> {
    if owner.starts_with(SYSTEM_OWNER_PREFIX) {
        return Err(KeyError::ReservedOwner {
            owner: owner.to_owned(),
        });
    }
    delete_overwritten(conn, owner)
}

/// Stores `from`'s data key for the owner `to` as well, wrapped again, and
/// returns it. `from` gets a key first when it has none.
pub(super) fn copy(
    conn: &Connection,
    provider: &dyn KeyProvider,
    from: &str,
    to: &str,
) -> Result<DataKey, KeyError> {
    let key = load_or_create(conn, provider, from)?;
    insert(conn, provider, to, &key)?;
    Ok(key)
}

/// Replaces `owner`'s data key with a new random one and returns it. The
/// old wrapped key's bytes are overwritten as in [`destroy`].
pub(super) fn replace(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
) -> Result<DataKey, KeyError> {
    delete_overwritten(conn, owner)?;
    load_or_create(conn, provider, owner)
}

/// Deletes `owner`'s data key with `secure_delete` on, and returns whether
/// a key existed.
fn delete_overwritten(conn: &Connection, owner: &str) -> Result<bool, KeyError> {
    let secure_delete: i64 = conn.pragma_query_value(None, "secure_delete", |row| row.get(0))?;
    conn.pragma_update(None, "secure_delete", true)?;
    let deleted = conn.execute("DELETE FROM data_key WHERE owner = ?1", [owner]);
    conn.pragma_update(None, "secure_delete", secure_delete)?;
    Ok(deleted? > 0)
}

/// Wraps every data key that is not under the provider's current KEK with
/// that KEK, and returns how many were rewrapped. Ciphertexts stay as they
/// are because the data keys themselves do not change. Afterwards old KEKs
/// can be retired once [`count_wrapped_under`] returns 0 for them.
pub fn rewrap_all(conn: &Connection, provider: &dyn KeyProvider) -> Result<u64, KeyError> {
    let current = provider.current_kek_id();
    let stale = {
        let mut statement = conn.prepare(
            "SELECT owner, kek_id, wrapped FROM data_key WHERE kek_id <> ?1 ORDER BY owner",
        )?;
        let rows = statement.query_map([&current], owner_and_wrapped_key)?;
        rows.collect::<Result<Vec<_>, _>>()?
    };

    let mut update =
        conn.prepare("UPDATE data_key SET kek_id = ?1, wrapped = ?2 WHERE owner = ?3")?;
    let mut rewrapped = 0;
    for (owner, wrapped) in &stale {
        let key = provider.unwrap(wrapped)?;
        let new = provider.wrap(&key)?;
        update.execute(params![new.kek_id, new.bytes, owner])?;
        rewrapped += 1;
    }
    Ok(rewrapped)
}

/// Counts the data keys wrapped under the KEK `kek_id`.
pub fn count_wrapped_under(conn: &Connection, kek_id: &str) -> Result<u64, KeyError> {
    let count = conn.query_row(
        "SELECT COUNT(*) FROM data_key WHERE kek_id = ?1",
        [kek_id],
        |row| row.get(0),
    )?;
    Ok(count)
}

/// Returns `owner`'s data key, creating and storing one when it has none.
pub(super) fn load_or_create(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
) -> Result<DataKey, KeyError> {
    if let Some(key) = load(conn, provider, owner)? {
        return Ok(key);
    }

    let key = DataKey::generate()?;
    insert(conn, provider, owner, &key)?;
    Ok(key)
}

/// Stores `key` wrapped as `owner`'s data key.
fn insert(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
    key: &DataKey,
) -> Result<(), KeyError> {
    let wrapped = provider.wrap(key)?;
    conn.execute(
        "INSERT INTO data_key (owner, kek_id, wrapped, created_unix_s) VALUES (?1, ?2, ?3, ?4)",
        params![owner, wrapped.kek_id, wrapped.bytes, now_unix_s()],
    )?;
    Ok(())
}

/// Returns `owner`'s data key, or `None` when it has none.
pub(super) fn load(
    conn: &Connection,
    provider: &dyn KeyProvider,
    owner: &str,
) -> Result<Option<DataKey>, KeyError> {
    let wrapped = conn
        .prepare_cached("SELECT kek_id, wrapped FROM data_key WHERE owner = ?1")?
        .query_row([owner], |row| {
            Ok(WrappedKey {
                kek_id: row.get(0)?,
                bytes: row.get(1)?,
            })
        })
        .optional()?;
    wrapped.map(|wrapped| provider.unwrap(&wrapped)).transpose()
}

/// Reads a row of `(owner, kek_id, wrapped)`.
fn owner_and_wrapped_key(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, WrappedKey)> {
    let wrapped = WrappedKey {
        kek_id: row.get(1)?,
        bytes: row.get(2)?,
    };
    Ok((row.get(0)?, wrapped))
}

/// Builds a ciphertext's header: the format version and the key's id.
fn header(key: &DataKey) -> [u8; HEADER_LEN] {
    let mut header = [FORMAT_V1; HEADER_LEN];
    header[1..].copy_from_slice(&key_id_of(key));
    header
}

/// Derives a short id of a data key, so that a ciphertext of a destroyed
/// key is distinguished from one that was changed after the owner got a new
/// key. A hash prefix of a random 256-bit key reveals nothing usable
/// about the key.
fn key_id_of(key: &DataKey) -> [u8; KEY_ID_LEN] {
    let digest = Sha256::new()
        .chain_update(KEY_ID_LABEL)
        .chain_update(key.as_bytes())
        .finalize();
    let mut id = [0; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

/// Associated data of a ciphertext: its header, the length-prefixed owner
/// and the caller's `aad`.
fn bound_aad(header: &[u8; HEADER_LEN], owner: &str, aad: &[u8]) -> Vec<u8> {
    let owner_len = (owner.len() as u64).to_be_bytes();
    [header.as_slice(), &owner_len, owner.as_bytes(), aad].concat()
}

fn now_unix_s() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::cipher::NONCE_LEN;
    use crate::keys::test_support::{TestKeyFile, memory_store};

    fn wrapped_of(conn: &Connection, owner: &str) -> WrappedKey {
        conn.query_row(
            "SELECT kek_id, wrapped FROM data_key WHERE owner = ?1",
            [owner],
            |row| {
                Ok(WrappedKey {
                    kek_id: row.get(0)?,
                    bytes: row.get(1)?,
                })
            },
        )
        .unwrap()
    }

    fn key_count(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM data_key", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn encrypt_then_decrypt_returns_plaintext() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        let ciphertext = encrypt(&conn, &test.keys, "c1", b"alice@example.com", b"t.c:1").unwrap();
        let plaintext = decrypt(&conn, &test.keys, "c1", &ciphertext, b"t.c:1").unwrap();

        assert_eq!(plaintext.as_deref(), Some(b"alice@example.com".as_slice()));
        assert_eq!(ciphertext.first(), Some(&FORMAT_V1));
        // Header, nonce, the 17 plaintext bytes and the 16-byte tag.
        assert_eq!(ciphertext.len(), HEADER_LEN + NONCE_LEN + 17 + 16);
        assert_eq!(wrapped_of(&conn, "c1").kek_id, "kek-1");
    }

    #[test]
    fn encrypt_reuses_owner_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        let first = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        let second = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        encrypt(&conn, &test.keys, "c2", b"a", b"").unwrap();

        assert_eq!(key_count(&conn), 2);
        assert_eq!(first.get(..HEADER_LEN), second.get(..HEADER_LEN));
        assert_ne!(first, second, "each ciphertext has its own nonce");
    }

    #[test]
    fn created_key_records_time() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        let created: i64 = conn
            .query_row("SELECT created_unix_s FROM data_key", [], |row| row.get(0))
            .unwrap();

        assert!(created > 1_700_000_000, "{created}");
    }

    #[test]
    fn decrypt_rejects_other_aad() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"row 1").unwrap();

        let err = decrypt(&conn, &test.keys, "c1", &ciphertext, b"row 2").unwrap_err();

        assert!(matches!(&err, KeyError::Tampered { owner } if owner == "c1"));
        assert_eq!(
            err.to_string(),
            "ciphertext of owner c1 failed authentication; it was changed, or it belongs to \
             another row, column or owner"
        );
    }

    #[test]
    fn decrypt_rejects_changed_bytes() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"abc", b"").unwrap();

        for index in HEADER_LEN..ciphertext.len() {
            let mut changed = ciphertext.clone();
            changed[index] ^= 0x80;

            let err = decrypt(&conn, &test.keys, "c1", &changed, b"").unwrap_err();

            assert!(
                matches!(err, KeyError::Tampered { .. }),
                "byte {index}: {err}"
            );
        }
    }

    #[test]
    fn decrypt_rejects_truncated_sealed_part() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"abc", b"").unwrap();

        let err = decrypt(&conn, &test.keys, "c1", &ciphertext[..HEADER_LEN + 4], b"").unwrap_err();

        assert!(matches!(err, KeyError::Tampered { .. }), "{err}");
    }

    #[test]
    fn decrypt_rejects_other_owner_with_same_aad() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"x").unwrap();
        encrypt(&conn, &test.keys, "c2", b"b", b"x").unwrap();

        // c2's key has another id, so the ciphertext looks like one of a
        // destroyed key of c2.
        let other = decrypt(&conn, &test.keys, "c2", &ciphertext, b"x").unwrap();

        assert_eq!(other, None);
    }

    #[test]
    fn decrypt_rejects_key_row_moved_to_other_owner() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"x").unwrap();
        conn.execute("UPDATE data_key SET owner = 'c2' WHERE owner = 'c1'", [])
            .unwrap();

        let err = decrypt(&conn, &test.keys, "c2", &ciphertext, b"x").unwrap_err();

        assert!(
            matches!(&err, KeyError::Tampered { owner } if owner == "c2"),
            "{err}"
        );
    }

    #[test]
    fn decrypt_rejects_malformed_header() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let mut ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        ciphertext[0] = 2;

        let cases: [(&[u8], &str); 3] = [
            (&[], "shorter than its header"),
            (&[FORMAT_V1; HEADER_LEN - 1], "shorter than its header"),
            (&ciphertext, "unknown format version"),
        ];
        for (input, expected) in cases {
            let err = decrypt(&conn, &test.keys, "c1", input, b"").unwrap_err();

            assert!(
                matches!(err, KeyError::MalformedCiphertext { reason, .. } if reason == expected),
                "{err}"
            );
        }
        let err = decrypt(&conn, &test.keys, "c1", &[], b"").unwrap_err();
        assert_eq!(
            err.to_string(),
            "ciphertext of owner c1 is invalid (shorter than its header); it was changed or \
             does not come from this store"
        );
    }

    #[test]
    fn decrypt_without_key_returns_none() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();

        let plaintext = decrypt(&conn, &test.keys, "c9", &ciphertext, b"").unwrap();

        assert_eq!(plaintext, None);
    }

    #[test]
    fn destroy_shreds_ciphertexts() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        let untouched = encrypt(&conn, &test.keys, "c2", b"b", b"").unwrap();

        let destroyed = destroy(&conn, "c1").unwrap();

        assert!(destroyed);
        assert_eq!(
            decrypt(&conn, &test.keys, "c1", &ciphertext, b"").unwrap(),
            None
        );
        assert_eq!(
            decrypt(&conn, &test.keys, "c2", &untouched, b"")
                .unwrap()
                .as_deref(),
            Some(b"b".as_slice())
        );
        assert!(
            !destroy(&conn, "c1").unwrap(),
            "a second destroy finds no key"
        );
    }

    #[test]
    fn destroyed_key_stays_shredded_after_new_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let old = encrypt(&conn, &test.keys, "c1", b"old", b"").unwrap();
        destroy(&conn, "c1").unwrap();

        let new = encrypt(&conn, &test.keys, "c1", b"new", b"").unwrap();

        assert_eq!(decrypt(&conn, &test.keys, "c1", &old, b"").unwrap(), None);
        assert_eq!(
            decrypt(&conn, &test.keys, "c1", &new, b"")
                .unwrap()
                .as_deref(),
            Some(b"new".as_slice())
        );
    }

    #[test]
    fn destroy_rejects_system_owners() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        encrypt(&conn, &test.keys, "system:audit", b"a", b"").unwrap();

        let err = destroy(&conn, "system:audit").unwrap_err();

        assert!(matches!(&err, KeyError::ReservedOwner { owner } if owner == "system:audit"));
        assert!(
            err.to_string()
                .starts_with("owner system:audit is reserved"),
            "{err}"
        );
        assert_eq!(key_count(&conn), 1);
    }

    #[test]
    fn destroy_restores_secure_delete_setting() {
        let conn = memory_store();
        let secure_delete = |conn: &Connection| -> i64 {
            conn.pragma_query_value(None, "secure_delete", |row| row.get(0))
                .unwrap()
        };
        let before = secure_delete(&conn);

        destroy(&conn, "c1").unwrap();

        assert_eq!(before, 0);
        assert_eq!(secure_delete(&conn), 0);
    }

    #[test]
    fn destroy_overwrites_wrapped_key_in_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite3");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(crate::keys::SCHEMA).unwrap();
        let test = TestKeyFile::new();
        encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap();
        let wrapped = wrapped_of(&conn, "c1").bytes;
        let contains_wrapped =
            |bytes: &[u8]| bytes.windows(wrapped.len()).any(|window| window == wrapped);
        assert!(contains_wrapped(&std::fs::read(&path).unwrap()));

        let tx = conn.transaction().unwrap();
        destroy(&tx, "c1").unwrap();
        tx.commit().unwrap();

        assert!(!contains_wrapped(&std::fs::read(&path).unwrap()));
    }

    #[test]
    fn destroy_reports_missing_table() {
        let conn = Connection::open_in_memory().unwrap();

        let err = destroy(&conn, "c1").unwrap_err();

        assert!(matches!(err, KeyError::Sqlite(_)), "{err}");
        assert_eq!(err.to_string(), "data key table query failed");
    }

    #[test]
    fn rewrap_rotate_retire_keeps_ciphertexts_readable() {
        let conn = memory_store();
        let mut test = TestKeyFile::new();
        let first = encrypt(&conn, &test.keys, "c1", b"one", b"").unwrap();
        let second = encrypt(&conn, &test.keys, "c2", b"two", b"").unwrap();
        test.keys.rotate().unwrap();
        encrypt(&conn, &test.keys, "c3", b"three", b"").unwrap();

        let rewrapped = rewrap_all(&conn, &test.keys).unwrap();
        let left_under_old = count_wrapped_under(&conn, "kek-1").unwrap();
        test.keys.retire("kek-1").unwrap();

        assert_eq!(rewrapped, 2);
        assert_eq!(left_under_old, 0);
        assert_eq!(count_wrapped_under(&conn, "kek-2").unwrap(), 3);
        assert_eq!(wrapped_of(&conn, "c1").kek_id, "kek-2");
        assert_eq!(
            decrypt(&conn, &test.keys, "c1", &first, b"")
                .unwrap()
                .as_deref(),
            Some(b"one".as_slice())
        );
        assert_eq!(
            decrypt(&conn, &test.keys, "c2", &second, b"")
                .unwrap()
                .as_deref(),
            Some(b"two".as_slice())
        );
        assert_eq!(rewrap_all(&conn, &test.keys).unwrap(), 0);
    }

    #[test]
    fn rewrap_reports_missing_kek() {
        let conn = memory_store();
        let mut test = TestKeyFile::new();
        encrypt(&conn, &test.keys, "c1", b"one", b"").unwrap();
        test.keys.rotate().unwrap();
        test.keys.retire("kek-1").unwrap();

        let err = rewrap_all(&conn, &test.keys).unwrap_err();

        assert!(
            matches!(&err, KeyError::UnknownKek { kek_id } if kek_id == "kek-1"),
            "{err}"
        );
        assert_eq!(wrapped_of(&conn, "c1").kek_id, "kek-1");
    }

    #[test]
    fn decrypt_reports_retired_kek() {
        let conn = memory_store();
        let mut test = TestKeyFile::new();
        let ciphertext = encrypt(&conn, &test.keys, "c1", b"one", b"").unwrap();
        test.keys.rotate().unwrap();
        test.keys.retire("kek-1").unwrap();

        let err = decrypt(&conn, &test.keys, "c1", &ciphertext, b"").unwrap_err();

        assert!(matches!(err, KeyError::UnknownKek { .. }), "{err}");
    }

    #[test]
    fn queries_report_missing_table() {
        let conn = Connection::open_in_memory().unwrap();
        let test = TestKeyFile::new();

        let results = [
            encrypt(&conn, &test.keys, "c1", b"a", b"").map(|_| ()),
            rewrap_all(&conn, &test.keys).map(|_| ()),
            count_wrapped_under(&conn, "kek-1").map(|_| ()),
        ];

        for result in results {
            assert!(matches!(result, Err(KeyError::Sqlite(_))), "{result:?}");
        }
    }

    #[test]
    fn encrypt_reports_failed_insert() {
        let conn = memory_store();
        conn.execute_batch("CREATE TRIGGER no_keys BEFORE INSERT ON data_key BEGIN SELECT RAISE(ABORT, 'no'); END;")
            .unwrap();
        let test = TestKeyFile::new();

        let err = encrypt(&conn, &test.keys, "c1", b"a", b"").unwrap_err();

        assert!(matches!(err, KeyError::Sqlite(_)), "{err}");
        assert_eq!(key_count(&conn), 0);
    }

    #[test]
    fn copied_key_is_the_same_key() {
        let conn = memory_store();
        let test = TestKeyFile::new();

        let copied = copy(&conn, &test.keys, "system:index", "system:subject").unwrap();

        let from = load(&conn, &test.keys, "system:index").unwrap().unwrap();
        let to = load(&conn, &test.keys, "system:subject").unwrap().unwrap();
        assert_eq!(copied.as_bytes(), from.as_bytes());
        assert_eq!(to.as_bytes(), from.as_bytes());
        assert_ne!(
            wrapped_of(&conn, "system:index").bytes,
            wrapped_of(&conn, "system:subject").bytes,
            "wrapped again, with its own nonce"
        );
        assert!(matches!(
            copy(&conn, &test.keys, "system:index", "system:subject"),
            Err(KeyError::Sqlite(_))
        ));
    }

    #[test]
    fn replaced_key_opens_no_old_ciphertext() {
        let conn = memory_store();
        let test = TestKeyFile::new();
        let old_ciphertext = encrypt(&conn, &test.keys, "system:index", b"a", b"").unwrap();
        let old = load(&conn, &test.keys, "system:index").unwrap().unwrap();

        let new = replace(&conn, &test.keys, "system:index").unwrap();

        assert_ne!(old.as_bytes(), new.as_bytes());
        let stored = load(&conn, &test.keys, "system:index").unwrap().unwrap();
        assert_eq!(stored.as_bytes(), new.as_bytes());
        assert_eq!(
            decrypt(&conn, &test.keys, "system:index", &old_ciphertext, b"").unwrap(),
            None
        );
        assert_eq!(key_count(&conn), 1);
    }
}
