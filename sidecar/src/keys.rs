//! Envelope encryption of stored personal data, crypto-shredding, and blind
//! indexes.
//!
//! Each owner (a customer, or a `system:` owner of the sidecar itself) gets a
//! random 256-bit data key the first time data is encrypted for it. Data is
//! encrypted under the data key with AES-256-GCM. The data key is stored in
//! the `data_key` table only in wrapped form: encrypted under a key
//! encryption key (KEK) that a [`KeyProvider`] keeps outside the database.
//! Reading the database file alone therefore reveals no plaintext.
//!
//! # Crypto-shredding
//!
//! [`destroy`] deletes an owner's wrapped data key. Every ciphertext of that
//! owner, in the live store or copied elsewhere, then decrypts to `None`.
//! A backup of the database taken before the erasure still contains the
//! wrapped key, which stays readable as long as its KEK exists. Such backups
//! become unreadable once that KEK is retired: [`LocalKeyFile::rotate`],
//! then [`rewrap_all`], then [`LocalKeyFile::retire`] of the old KEK.
//! Retiring a KEK also ends restores from backups taken under it, so
//! operators rotate on a schedule that matches their backup retention.
//! Rows named by a blind index stay linkable to a guessed id until the
//! index key is replaced as well, by
//! [`replace_index_key`](crate::identity::replace_index_key).
//!
//! # Key providers and cloud KMS
//!
//! [`LocalKeyFile`] keeps the KEKs in a JSON file beside the store and is
//! the default. A cloud KMS fits [`KeyProvider`] with the KEK never leaving
//! it: `wrap` sends the 32-byte data key to the KMS's encrypt call (AWS KMS
//! `Encrypt` with a key id, GCP Cloud KMS `encrypt` on a CryptoKey, Vault's
//! transit `encrypt/<name>`) and stores the returned ciphertext blob as
//! [`WrappedKey::bytes`]. `unwrap` sends that blob to the matching decrypt
//! call. `current_kek_id` names the KMS key (or key version) that new data
//! keys are wrapped under, and rotation happens in the KMS. Both calls then
//! go over the network: each [`encrypt`] or [`decrypt`] makes one `unwrap`
//! call, and the first [`encrypt`] of an owner makes a `wrap` call.
//!
//! NOTE: unwrapped data keys are not cached, so a remote provider pays one
//! round trip per call. A cache must be keyed by the wrapped bytes (so it
//! can never disagree with the table after a rollback) and must drop an
//! owner's entry in [`destroy`].
//!
//! # Formats
//!
//! A wrapped key of [`LocalKeyFile`] is a 96-bit random nonce followed by
//! the AES-256-GCM ciphertext and tag of the data key, with the KEK id as
//! associated data. A ciphertext of [`encrypt`] is a format version byte
//! (1), an 8-byte id of the data key, a 96-bit random nonce, and the
//! AES-256-GCM ciphertext and tag. Its associated data covers the version,
//! the key id, the owner and the caller's `aad`, so a ciphertext moved to
//! another row, column or owner fails authentication.

use std::path::PathBuf;

mod cipher;
mod data_keys;
mod index;
mod local_file;
mod provider;

pub(crate) use cipher::{open as open_sealed, seal};
pub use data_keys::{
    SYSTEM_OWNER_PREFIX, count_wrapped_under, decrypt, destroy, encrypt, rewrap_all,
};
pub use index::{INDEX_OWNER, IndexKey, SUBJECT_OWNER, blind_index};
pub use local_file::LocalKeyFile;
pub use provider::{DATA_KEY_LEN, DataKey, KeyProvider, WrappedKey};

/// Table of wrapped data keys, created when missing.
pub const SCHEMA: &str = "
-- One data key per owner, wrapped under the KEK named by kek_id. Deleting a
-- row makes every ciphertext of its owner unreadable.
CREATE TABLE IF NOT EXISTS data_key (
    owner TEXT PRIMARY KEY NOT NULL,
    kek_id TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    created_unix_s INTEGER NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS data_key_by_kek ON data_key (kek_id);
";

/// Errors of key files, key providers and the data key table.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file exists but could not be opened or read.
    #[error(
        "failed to read key file {}; check that the sidecar's user can read it",
        path.display()
    )]
    ReadKeyFile {
        /// Path of the key file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The key file could not be written.
    #[error(
        "failed to write key file {}; check that its directory exists and is writable",
        path.display()
    )]
    WriteKeyFile {
        /// Path of the key file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The key file grants its group or other users access.
    #[error(
        "key file {} has mode {mode:04o}, which gives its group or other users access; \
         run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyFilePermissions {
        /// Path of the key file.
        path: PathBuf,
        /// Permission bits of the file.
        mode: u32,
    },
    /// The key file is not JSON of the expected shape.
    #[error(
        "key file {} is not valid JSON of the form \
         {{\"current\": ID, \"keys\": {{ID: KEY, ...}}}}; restore it from a backup",
        path.display()
    )]
    KeyFileFormat {
        /// Path of the key file.
        path: PathBuf,
        /// Cause reported by the JSON parser.
        #[source]
        source: serde_json::Error,
    },
    /// A key id in the key file has characters or a length that is not allowed.
    #[error(
        "key id {kek_id:?} in key file {} is invalid; use 1 to 64 ASCII letters, digits, \
         '.', '_' or '-'",
        path.display()
    )]
    InvalidKekId {
        /// Path of the key file.
        path: PathBuf,
        /// The invalid id.
        kek_id: String,
    },
    /// A key in the key file is not 32 bytes of base64 or hex.
    #[error(
        "key {kek_id} in key file {} is not 32 bytes in base64 or hex; restore the file \
         from a backup",
        path.display()
    )]
    InvalidKek {
        /// Path of the key file.
        path: PathBuf,
        /// Id of the invalid key.
        kek_id: String,
    },
    /// The key file's `current` names a key that it does not contain.
    #[error(
        "key file {} names {kek_id:?} as current, but its keys do not contain it; set \
         \"current\" to one of its keys",
        path.display()
    )]
    MissingCurrentKek {
        /// Path of the key file.
        path: PathBuf,
        /// The missing id.
        kek_id: String,
    },
    /// Retiring the current KEK was requested.
    #[error(
        "key {kek_id} is the current key of key file {}; rotate to a new key before \
         retiring it",
        path.display()
    )]
    RetireCurrentKek {
        /// Path of the key file.
        path: PathBuf,
        /// Id of the current key.
        kek_id: String,
    },
    /// The provider does not hold the KEK that a data key is wrapped under.
    #[error(
        "key encryption key {kek_id} is not available; restore it to the key file or \
         KMS it was retired from"
    )]
    UnknownKek {
        /// Id of the missing KEK.
        kek_id: String,
    },
    /// No numbered key id is left for rotation.
    #[error(
        "key file {} has no key id left after {kek_id}; rename its keys to lower \
         numbers",
        path.display()
    )]
    KekIdsExhausted {
        /// Path of the key file.
        path: PathBuf,
        /// The highest numbered id.
        kek_id: String,
    },
    /// A wrapped data key failed authentication under its KEK.
    #[error(
        "data key wrapped under {kek_id} failed authentication; the key under that id was \
         replaced or the wrapped key was changed, so restore the original key file or \
         data_key table"
    )]
    UnwrapFailed {
        /// Id of the KEK that was used.
        kek_id: String,
    },
    /// A provider returned a data key of the wrong length.
    #[error("data key has {len} bytes instead of 32; check the key provider's unwrap output")]
    DataKeyLength {
        /// Length received.
        len: usize,
    },
    /// A ciphertext is too short or has an unknown format version.
    #[error(
        "ciphertext of owner {owner} is invalid ({reason}); it was changed or does not come \
         from this store"
    )]
    MalformedCiphertext {
        /// Owner whose data key was requested.
        owner: String,
        /// Description of the defect.
        reason: &'static str,
    },
    /// A ciphertext failed authentication under its owner's data key.
    #[error(
        "ciphertext of owner {owner} failed authentication; it was changed, or it belongs \
         to another row, column or owner"
    )]
    Tampered {
        /// Owner whose data key was used.
        owner: String,
    },
    /// The plaintext is longer than AES-256-GCM can encrypt under one nonce.
    #[error("plaintext is longer than AES-256-GCM allows (64 GiB)")]
    PlaintextTooLong,
    /// `destroy` was called for an owner reserved for the sidecar's own keys.
    #[error(
        "owner {owner} is reserved for the sidecar's own keys and cannot be destroyed; \
         owners starting with \"system:\" are reserved"
    )]
    ReservedOwner {
        /// The reserved owner.
        owner: String,
    },
    /// A system owner's data key, which is never destroyed, is missing or
    /// was replaced, so its ciphertexts cannot be decrypted.
    #[error(
        "the data key of {owner} does not decrypt its ciphertexts; it was deleted or \
         replaced in the data_key table, restore that row from a backup"
    )]
    SystemKeyLost {
        /// The system owner.
        owner: String,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random(#[source] getrandom::Error),
    /// A query on the `data_key` table failed.
    #[error("data key table query failed")]
    Sqlite(#[from] rusqlite::Error),
}

impl KeyError {
    /// Returns whether the error is about a ciphertext that is damaged
    /// (changed or cut), rather than a key or table that cannot be read.
    /// Reading such a ciphertext again fails the same way.
    pub fn is_damaged_ciphertext(&self) -> bool {
        matches!(
            self,
            KeyError::MalformedCiphertext { .. } | KeyError::Tampered { .. }
        )
    }
}

#[cfg(test)]
pub(crate) mod test_support;
