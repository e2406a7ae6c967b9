//! The stored form of an entry and the hash that chains it to the entry
//! before it.

use rusqlite::Row;
use sha2::{Digest, Sha256};

/// Columns of `audit_log` in the order [`StoredEntry::from_row`] reads them.
pub(super) const COLUMNS: &str =
    "position, at_unix_ms, actor, action, subject_hash, records, details, prev_hash, entry_hash";

/// First input of every entry hash, so the hash of an entry never equals a
/// hash computed for another purpose.
const HASH_LABEL: &[u8] = b"veo-sidecar audit entry v1\0";

/// The fields of an entry that its hash covers: all but `entry_hash`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Body<'a> {
    pub position: u64,
    pub at_unix_ms: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub subject_hash: Option<&'a str>,
    pub records: u64,
    /// The details as stored: ciphertext.
    pub details: &'a [u8],
    pub prev_hash: &'a str,
}

impl Body<'_> {
    /// Returns the SHA-256 of the fields as lowercase hex. Integers are
    /// 8 bytes big-endian, and text and bytes are preceded by their length
    /// as 8 bytes big-endian, so that no two different entries have the
    /// same input. A missing `subject_hash` is one zero byte, and a present
    /// one is a one byte followed by the length-prefixed text.
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(HASH_LABEL);
        hasher.update(self.position.to_be_bytes());
        hasher.update(self.at_unix_ms.to_be_bytes());
        update_field(&mut hasher, self.actor.as_bytes());
        update_field(&mut hasher, self.action.as_bytes());
        match self.subject_hash {
            None => hasher.update([0]),
            Some(subject_hash) => {
                hasher.update([1]);
                update_field(&mut hasher, subject_hash.as_bytes());
            }
        }
        hasher.update(self.records.to_be_bytes());
        update_field(&mut hasher, self.details);
        update_field(&mut hasher, self.prev_hash.as_bytes());
        hex::encode(hasher.finalize())
    }
}

fn update_field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_be_bytes());
    hasher.update(bytes);
}

/// A row of `audit_log`.
#[derive(Clone, Debug)]
pub(super) struct StoredEntry {
    pub position: u64,
    pub at_unix_ms: i64,
    pub actor: String,
    pub action: String,
    pub subject_hash: Option<String>,
    pub records: u64,
    pub details: Vec<u8>,
    pub prev_hash: String,
    pub entry_hash: String,
}

impl StoredEntry {
    /// Reads a row selected with [`COLUMNS`].
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            position: row.get(0)?,
            at_unix_ms: row.get(1)?,
            actor: row.get(2)?,
            action: row.get(3)?,
            subject_hash: row.get(4)?,
            records: row.get(5)?,
            details: row.get(6)?,
            prev_hash: row.get(7)?,
            entry_hash: row.get(8)?,
        })
    }

    /// The fields that `entry_hash` should cover.
    pub fn body(&self) -> Body<'_> {
        Body {
            position: self.position,
            at_unix_ms: self.at_unix_ms,
            actor: &self.actor,
            action: &self.action,
            subject_hash: self.subject_hash.as_deref(),
            records: self.records,
            details: &self.details,
            prev_hash: &self.prev_hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Body<'static> {
        Body {
            position: 1,
            at_unix_ms: 1_700_000_000_000,
            actor: "cli:alice",
            action: "erase_customer",
            subject_hash: None,
            records: 3,
            details: b"ciphertext",
            prev_hash: crate::audit::GENESIS_HASH,
        }
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        let hash = body().hash();

        assert_eq!(hash.len(), 64);
        assert!(
            hash.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_eq!(hash, body().hash());
    }

    #[test]
    fn hash_covers_every_field() {
        let base = body().hash();
        let changed = [
            Body {
                position: 2,
                ..body()
            },
            Body {
                at_unix_ms: 1,
                ..body()
            },
            Body {
                actor: "cli:bob",
                ..body()
            },
            Body {
                action: "tier_change",
                ..body()
            },
            Body {
                subject_hash: Some("ab"),
                ..body()
            },
            Body {
                records: 4,
                ..body()
            },
            Body {
                details: b"ciphertexu",
                ..body()
            },
            Body {
                prev_hash: "1",
                ..body()
            },
        ];

        for (index, body) in changed.iter().enumerate() {
            assert_ne!(body.hash(), base, "field {index}");
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let first = Body {
            actor: "ab",
            action: "c",
            ..body()
        };
        let second = Body {
            actor: "a",
            action: "bc",
            ..body()
        };
        let empty = Body {
            subject_hash: Some(""),
            ..body()
        };

        assert_ne!(first.hash(), second.hash());
        assert_ne!(empty.hash(), body().hash());
    }
}
