//! Erasure notices in the stream `{<prefix>:erasures}`: what an entry
//! contains, sealing it under the notice key the sidecars share, and reading
//! entries back.
//!
//! Without a notice key an entry has the fields `customer`, `sidecar`,
//! `erasure` and `erased_at_ms` in clear. With one it has the single field
//! `sealed`: the same four values as JSON, encrypted with AES-256-GCM under
//! the key, with the stream's key name as associated data. Redis then contains
//! no customer id, and only a holder of the key can write a notice that
//! other sidecars apply.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use redis::streams::StreamId;
use serde::{Deserialize, Serialize};

use crate::keys::{open_sealed, seal};

/// Field of a sealed entry.
const SEALED_FIELD: &str = "sealed";

/// Start of the associated data of a sealed entry; the stream's key name
/// follows, so an entry copied to another prefix's stream fails.
const AAD_LABEL: &[u8] = b"veo-sidecar erasure notice v1\0";

/// Permission bits of the group and other users, which a notice key file
/// must not have.
const GROUP_OTHER_BITS: u32 = 0o077;

/// The key that seals erasure notices, shared by every sidecar with the same
/// key prefix.
#[derive(Clone, PartialEq, Eq)]
pub struct NoticeKey([u8; 32]);

impl fmt::Debug for NoticeKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("NoticeKey(..)")
    }
}

/// Failure to read or write a notice key file.
#[derive(Debug, thiserror::Error)]
pub enum NoticeKeyError {
    /// The file could not be read or written.
    #[error("failed to read or write {path}", path = path.display())]
    Io {
        /// Path of the key file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The file gives its group or other users access.
    #[error(
        "{path} has mode {mode:04o}, which gives its group or other users access; run \
         `chmod 600 {path}`",
        path = path.display()
    )]
    Permissions {
        /// Path of the key file.
        path: PathBuf,
        /// The file's permission bits.
        mode: u32,
    },
    /// The file does not contain 64 hexadecimal digits.
    #[error(
        "{path} does not contain a key: it must hold 64 hexadecimal digits (32 bytes); \
         `veo-sidecar new-notice-key --out FILE` writes one",
        path = path.display()
    )]
    Format {
        /// Path of the key file.
        path: PathBuf,
    },
    /// The system's random number generator failed.
    #[error("failed to generate a notice key: {0}")]
    Random(getrandom::Error),
}

impl NoticeKey {
    /// Reads the key from `path`: 64 hexadecimal digits, surrounding white
    /// space ignored, in a file only its owner may read.
    ///
    /// # Errors
    ///
    /// [`NoticeKeyError`] naming the file and what is wrong with it.
    pub fn read(path: &Path) -> Result<Self, NoticeKeyError> {
        let io = |source| NoticeKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            return Err(NoticeKeyError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut key = [0; 32];
        hex::decode_to_slice(text.trim(), &mut key).map_err(|_| NoticeKeyError::Format {
            path: path.to_path_buf(),
        })?;
        Ok(Self(key))
    }

    /// Writes a new random key to `path`, which must not exist yet, with
    /// mode 0600.
    ///
    /// # Errors
    ///
    /// [`NoticeKeyError::Io`] when the file exists or cannot be written.
    pub fn create(path: &Path) -> Result<(), NoticeKeyError> {
        let io = |source| NoticeKeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut key = [0; 32];
        getrandom::fill(&mut key).map_err(NoticeKeyError::Random)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        writeln!(file, "{}", hex::encode(key)).map_err(io)?;
        file.sync_all().map_err(io)
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

/// An erasure that a sidecar sharing the key prefix announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasureNotice {
    /// Stream entry id, `<Unix milliseconds>-<sequence>`, which grows with
    /// every entry.
    pub entry_id: String,
    /// When the customer was erased at the announcing sidecar, in Unix
    /// milliseconds.
    pub erased_at_unix_ms: i64,
    /// Erased customer id.
    pub customer: String,
    /// Id of the sidecar that erased the customer.
    pub sidecar_id: String,
    /// Erasure id at that sidecar.
    pub erasure_id: String,
}

impl ErasureNotice {
    /// Returns when the notice was announced, in Unix milliseconds: the
    /// time part of its stream entry id, which Redis sets, or the erasure
    /// time when the id has no such part.
    pub fn announced_at_unix_ms(&self) -> i64 {
        self.entry_id
            .split('-')
            .next()
            .and_then(|millis| millis.parse().ok())
            .unwrap_or(self.erased_at_unix_ms)
    }
}

/// The erasure that an announcement names.
#[derive(Debug, Clone, Copy)]
pub struct ErasureSource<'a> {
    /// Erasure id at the announcing sidecar.
    pub erasure_id: &'a str,
    /// When the customer was erased, in Unix milliseconds.
    pub erased_at_unix_ms: i64,
}

/// An entry of the erasure notice stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoticeEntry {
    /// A notice this sidecar can read.
    Notice(ErasureNotice),
    /// An entry this sidecar cannot read: a field is missing or does not
    /// parse, or the entry is sealed under another key, sealed while this
    /// sidecar has no key, or in clear while it has one.
    Unreadable {
        /// Stream entry id.
        entry_id: String,
        /// Description of the problem and what to do.
        detail: String,
    },
}

impl NoticeEntry {
    /// Returns the stream entry id.
    pub fn entry_id(&self) -> &str {
        match self {
            Self::Notice(notice) => &notice.entry_id,
            Self::Unreadable { entry_id, .. } => entry_id,
        }
    }
}

/// The values of a notice, as sealed. Owned, because a customer id may
/// contain characters that JSON escapes.
#[derive(Serialize, Deserialize)]
struct Sealed {
    customer: String,
    sidecar: String,
    erasure: String,
    erased_at_ms: i64,
}

/// Returns the fields and values of the entry that announces `customer`'s
/// erasure by `sidecar_id`, sealed when there is a `key`.
pub(super) fn entry_fields(
    key: Option<&NoticeKey>,
    stream_key: &str,
    customer: &str,
    sidecar_id: &str,
    source: &ErasureSource<'_>,
) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
    let Some(key) = key else {
        return Ok(vec![
            ("customer", customer.as_bytes().to_vec()),
            ("sidecar", sidecar_id.as_bytes().to_vec()),
            ("erasure", source.erasure_id.as_bytes().to_vec()),
            (
                "erased_at_ms",
                source.erased_at_unix_ms.to_string().into_bytes(),
            ),
        ]);
    };
    let values = Sealed {
        customer: customer.to_owned(),
        sidecar: sidecar_id.to_owned(),
        erasure: source.erasure_id.to_owned(),
        erased_at_ms: source.erased_at_unix_ms,
    };
    let plaintext = serde_json::to_vec(&values).map_err(|err| err.to_string())?;
    let sealed = seal(&key.0, &plaintext, &aad(stream_key)).map_err(|err| err.to_string())?;
    Ok(vec![(SEALED_FIELD, sealed)])
}

/// Reads one stream entry as an erasure notice, opening it with `key`.
pub(super) fn parse(entry: StreamId, key: Option<&NoticeKey>, stream_key: &str) -> NoticeEntry {
    let parsed = match (entry.map.get(SEALED_FIELD), key) {
        (Some(value), Some(key)) => open(value, key, stream_key, &entry.id),
        (Some(_), None) => Err(
            "the entry is sealed and this sidecar has no notice key; set \
                                counters.notice_key_file to the key of the other sidecars"
                .to_owned(),
        ),
        (None, Some(_)) => Err(
            "the entry is not sealed and this sidecar accepts only sealed \
                                notices; set the same counters.notice_key_file on every \
                                sidecar sharing the key prefix"
                .to_owned(),
        ),
        (None, None) => in_clear(&entry),
    };
    match parsed {
        Ok(notice) => NoticeEntry::Notice(notice),
        Err(detail) => NoticeEntry::Unreadable {
            entry_id: entry.id,
            detail,
        },
    }
}

/// Opens a sealed entry's value.
fn open(
    value: &redis::Value,
    key: &NoticeKey,
    stream_key: &str,
    entry_id: &str,
) -> Result<ErasureNotice, String> {
    let unreadable = || {
        "the sealed entry does not open under this sidecar's notice key; every sidecar sharing \
         the key prefix needs the same counters.notice_key_file"
            .to_owned()
    };
    let sealed: Vec<u8> = redis::from_redis_value(value.clone()).map_err(|_| unreadable())?;
    let plaintext = open_sealed(&key.0, &sealed, &aad(stream_key)).ok_or_else(unreadable)?;
    // The parser's message could quote the customer id, so it is left out.
    let values: Sealed = serde_json::from_slice(&plaintext).map_err(|_| {
        "the sealed entry opens but is not a notice of this version; run one version of \
         veo-sidecar on every sidecar sharing the key prefix"
            .to_owned()
    })?;
    Ok(ErasureNotice {
        entry_id: entry_id.to_owned(),
        erased_at_unix_ms: values.erased_at_ms,
        customer: values.customer,
        sidecar_id: values.sidecar,
        erasure_id: values.erasure,
    })
}

/// Reads the fields of an entry in clear.
fn in_clear(entry: &StreamId) -> Result<ErasureNotice, String> {
    let field = |name: &str| -> Result<String, String> {
        let Some(value) = entry.map.get(name) else {
            return Err(format!("missing field {name}"));
        };
        redis::from_redis_value(value.clone()).map_err(|err| format!("invalid field {name}: {err}"))
    };
    let erased_at = field("erased_at_ms")?;
    Ok(ErasureNotice {
        entry_id: entry.id.clone(),
        erased_at_unix_ms: erased_at
            .parse()
            .map_err(|_| format!("invalid field erased_at_ms: {erased_at:?} is not an integer"))?,
        customer: field("customer")?,
        sidecar_id: field("sidecar")?,
        erasure_id: field("erasure")?,
    })
}

/// Returns the associated data of a sealed entry in `stream_key`.
fn aad(stream_key: &str) -> Vec<u8> {
    [AAD_LABEL, stream_key.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use redis::Value;

    use super::*;

    const STREAM: &str = "{veo:erasures}";

    fn source() -> ErasureSource<'static> {
        ErasureSource {
            erasure_id: "er_1",
            erased_at_unix_ms: 1_000,
        }
    }

    #[test]
    fn announced_time_comes_from_the_entry_id() {
        let mut notice = ErasureNotice {
            entry_id: "1733400000123-4".into(),
            erased_at_unix_ms: 5,
            customer: "c".into(),
            sidecar_id: "s".into(),
            erasure_id: "er".into(),
        };
        assert_eq!(notice.announced_at_unix_ms(), 1_733_400_000_123);
        notice.entry_id = "not-an-id".into();
        assert_eq!(notice.announced_at_unix_ms(), 5);
    }

    /// Builds the stream entry `1-0` from `fields`, as XRANGE returns it.
    fn entry(fields: Vec<(&'static str, Vec<u8>)>) -> StreamId {
        let map: HashMap<String, Value> = fields
            .into_iter()
            .map(|(name, value)| (name.to_owned(), Value::BulkString(value)))
            .collect();
        StreamId {
            id: "1-0".to_owned(),
            map,
            ..StreamId::default()
        }
    }

    fn detail(parsed: NoticeEntry) -> String {
        match parsed {
            NoticeEntry::Unreadable { detail, .. } => detail,
            NoticeEntry::Notice(notice) => panic!("read as a notice: {notice:?}"),
        }
    }

    fn acme_notice() -> NoticeEntry {
        NoticeEntry::Notice(ErasureNotice {
            entry_id: "1-0".to_owned(),
            erased_at_unix_ms: 1_000,
            customer: "acme".to_owned(),
            sidecar_id: "side-a".to_owned(),
            erasure_id: "er_1".to_owned(),
        })
    }

    #[test]
    fn sealed_entry_hides_customer() {
        let key = NoticeKey::from_bytes([3; 32]);
        let fields = entry_fields(Some(&key), STREAM, "acme", "side-a", &source()).unwrap();

        assert_eq!(fields.len(), 1);
        assert_eq!(fields[0].0, SEALED_FIELD);
        assert!(!fields[0].1.windows(4).any(|window| window == b"acme"));
        assert_eq!(parse(entry(fields), Some(&key), STREAM), acme_notice());
    }

    #[test]
    fn sealed_customer_with_escaped_characters_reads_back() {
        let key = NoticeKey::from_bytes([3; 32]);
        for customer in ["a\"b", "acme\\eu", "caf\u{e9}"] {
            let fields = entry_fields(Some(&key), STREAM, customer, "side-a", &source()).unwrap();

            let NoticeEntry::Notice(notice) = parse(entry(fields), Some(&key), STREAM) else {
                panic!("{customer:?} did not read back");
            };
            assert_eq!(notice.customer, customer);
        }
    }

    #[test]
    fn clear_entry_reads_without_key() {
        let fields = entry_fields(None, STREAM, "acme", "side-a", &source()).unwrap();

        assert_eq!(parse(entry(fields), None, STREAM), acme_notice());
    }

    #[test]
    fn sealed_entry_rejects_other_key() {
        let key = NoticeKey::from_bytes([3; 32]);
        let other = NoticeKey::from_bytes([4; 32]);
        let fields = entry_fields(Some(&key), STREAM, "acme", "side-a", &source()).unwrap();

        let wrong_key = detail(parse(entry(fields.clone()), Some(&other), STREAM));
        let wrong_stream = detail(parse(entry(fields), Some(&key), "{other:erasures}"));

        assert!(wrong_key.contains("does not open"), "{wrong_key}");
        assert!(wrong_stream.contains("does not open"), "{wrong_stream}");
    }

    #[test]
    fn sealed_and_clear_must_match() {
        let key = NoticeKey::from_bytes([3; 32]);
        let sealed = entry_fields(Some(&key), STREAM, "acme", "side-a", &source()).unwrap();
        let clear = entry_fields(None, STREAM, "acme", "side-a", &source()).unwrap();

        let without_key = detail(parse(entry(sealed), None, STREAM));
        let forged = detail(parse(entry(clear), Some(&key), STREAM));

        assert!(without_key.contains("has no notice key"), "{without_key}");
        assert!(forged.contains("not sealed"), "{forged}");
    }

    #[test]
    fn sealed_non_notice_is_unreadable() {
        let key = NoticeKey::from_bytes([3; 32]);
        let sealed = seal(&key.0, b"[]", &aad(STREAM)).unwrap();
        let integer = StreamId {
            id: "1-0".to_owned(),
            map: HashMap::from([(SEALED_FIELD.to_owned(), Value::Int(5))]),
            ..StreamId::default()
        };

        let not_json = detail(parse(
            entry(vec![(SEALED_FIELD, sealed)]),
            Some(&key),
            STREAM,
        ));
        let not_bytes = detail(parse(integer, Some(&key), STREAM));

        assert!(not_json.contains("is not a notice"), "{not_json}");
        assert!(not_bytes.contains("does not open"), "{not_bytes}");
    }

    #[test]
    fn clear_entry_bad_field_unreadable() {
        let mut fields = entry_fields(None, STREAM, "acme", "side-a", &source()).unwrap();
        fields.retain(|(name, _)| *name != "sidecar");
        let mut bad_time = entry_fields(None, STREAM, "acme", "side-a", &source()).unwrap();
        bad_time[3].1 = b"soon".to_vec();

        let missing = detail(parse(entry(fields), None, STREAM));
        let not_integer = detail(parse(entry(bad_time), None, STREAM));

        assert_eq!(missing, "missing field sidecar");
        assert!(
            not_integer.contains("\"soon\" is not an integer"),
            "{not_integer}"
        );
    }

    #[test]
    fn created_key_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notice.key");

        NoticeKey::create(&path).unwrap();
        let key = NoticeKey::read(&path).unwrap();
        let again = NoticeKey::create(&path).unwrap_err();

        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(format!("{key:?}"), "NoticeKey(..)");
        assert!(again.to_string().contains("notice.key"), "{again}");
    }

    #[test]
    fn key_file_errors_name_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notice.key");

        let missing = NoticeKey::read(&path).unwrap_err().to_string();
        std::fs::write(&path, "abc\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let short = NoticeKey::read(&path).unwrap_err().to_string();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open_to_all = NoticeKey::read(&path).unwrap_err().to_string();

        assert!(missing.contains("notice.key"), "{missing}");
        assert!(short.contains("64 hexadecimal digits"), "{short}");
        assert!(open_to_all.contains("chmod 600"), "{open_to_all}");
    }
}
