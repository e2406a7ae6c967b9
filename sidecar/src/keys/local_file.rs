//! The default key provider: KEKs in a JSON file readable by the sidecar's
//! user only.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::KeyError;
use super::cipher::{open, seal};
use super::provider::{DataKey, KeyProvider, WrappedKey};

/// Length of a KEK in bytes (AES-256).
const KEK_LEN: usize = 32;

/// Prefix of the ids that [`LocalKeyFile::rotate`] numbers.
const KEK_ID_PREFIX: &str = "kek-";

/// Maximum length of a KEK id in bytes.
const MAX_KEK_ID_LEN: usize = 64;

/// Permission bits of a new key file: read and write for the owner only.
const FILE_MODE: u32 = 0o600;

/// Permission bits that must be clear: any access by group or others.
const GROUP_OTHER_BITS: u32 = 0o077;

/// Start of the associated data of a wrapped key, followed by the KEK id.
const WRAP_AAD_LABEL: &[u8] = b"veo-sidecar data key wrap v1\0";

/// KEKs in a JSON file such as `DATA_DIR/keys.json`:
///
/// ```json
/// { "current": "kek-2", "keys": { "kek-1": "<base64>", "kek-2": "<base64>" } }
/// ```
///
/// Each key is 32 bytes in standard base64 (as written by this type) or in
/// hex (64 digits). The file must not grant its group or other users any
/// access. One sidecar owns the file: [`rotate`](Self::rotate) and
/// [`retire`](Self::retire) replace it without coordinating with other
/// writers.
pub struct LocalKeyFile {
    path: PathBuf,
    current: String,
    keys: BTreeMap<String, Zeroizing<[u8; KEK_LEN]>>,
}

/// The key file as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileIn {
    current: String,
    keys: BTreeMap<String, Zeroizing<String>>,
}

/// The key file as written.
#[derive(Serialize)]
struct KeyFileOut<'a> {
    current: &'a str,
    keys: BTreeMap<&'a str, Zeroizing<String>>,
}

impl LocalKeyFile {
    /// Reads the key file at `path`, or creates it with mode 0600 and one
    /// random KEK, `kek-1`, when it does not exist. Fails when the file
    /// grants its group or others access, is not valid JSON of the shape
    /// above, has an invalid key id or key, or its `current` key is missing.
    pub fn open_or_create(path: &Path) -> Result<Self, KeyError> {
        let path = path.to_path_buf();
        match File::open(&path) {
            Ok(file) => Self::read(path, file),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(KeyError::ReadKeyFile { path, source }),
        }
    }

    /// Path of the key file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Ids of the KEKs in the file, in ascending order.
    pub fn kek_ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Adds a random KEK, makes it current and replaces the file atomically
    /// (a synced temporary file renamed over it). Returns the new KEK's id,
    /// `kek-N` with N one above the highest numbered id. Data keys stay
    /// wrapped under their old KEK until [`rewrap_all`](super::rewrap_all).
    pub fn rotate(&mut self) -> Result<String, KeyError> {
        let kek_id = self.next_kek_id()?;
        let mut keys = self.keys.clone();
        keys.insert(kek_id.clone(), random_kek()?);

        write_key_file(&self.path, &kek_id, &keys)?;
        self.current.clone_from(&kek_id);
        self.keys = keys;
        Ok(kek_id)
    }

    /// Removes the KEK `kek_id` and replaces the file atomically. Data keys
    /// still wrapped under it become unreadable, so run
    /// [`rewrap_all`](super::rewrap_all) first and check with
    /// [`count_wrapped_under`](super::count_wrapped_under). Fails for the
    /// current KEK and for an id the file does not contain.
    pub fn retire(&mut self, kek_id: &str) -> Result<(), KeyError> {
        if kek_id == self.current {
            return Err(KeyError::RetireCurrentKek {
                path: self.path.clone(),
                kek_id: kek_id.to_owned(),
            });
        }
        let mut keys = self.keys.clone();
        if keys.remove(kek_id).is_none() {
            return Err(KeyError::UnknownKek {
                kek_id: kek_id.to_owned(),
            });
        }

        write_key_file(&self.path, &self.current, &keys)?;
        self.keys = keys;
        Ok(())
    }

    fn create(path: PathBuf) -> Result<Self, KeyError> {
        let current = format!("{KEK_ID_PREFIX}1");
        let keys = BTreeMap::from([(current.clone(), random_kek()?)]);
        write_key_file(&path, &current, &keys)?;
        Ok(Self {
            path,
            current,
            keys,
        })
    }

    fn read(path: PathBuf, mut file: File) -> Result<Self, KeyError> {
        let read_error = |source| KeyError::ReadKeyFile {
            path: path.clone(),
            source,
        };
        let mode = file.metadata().map_err(read_error)?.permissions().mode() & 0o7777;
        if mode & GROUP_OTHER_BITS != 0 {
            let path = path.clone();
            return Err(KeyError::KeyFilePermissions { path, mode });
        }
        let mut text = Zeroizing::new(Vec::new());
        file.read_to_end(&mut text).map_err(read_error)?;

        match serde_json::from_slice::<KeyFileIn>(&text) {
            Ok(contents) => Self::from_contents(path, contents),
            Err(source) => Err(KeyError::KeyFileFormat { path, source }),
        }
    }

    fn from_contents(path: PathBuf, contents: KeyFileIn) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        for (kek_id, text) in &contents.keys {
            if !is_valid_kek_id(kek_id) {
                let kek_id = kek_id.clone();
                return Err(KeyError::InvalidKekId { path, kek_id });
            }
            let Some(kek) = decode_kek(text) else {
                let kek_id = kek_id.clone();
                return Err(KeyError::InvalidKek { path, kek_id });
            };
            keys.insert(kek_id.clone(), kek);
        }
        if !keys.contains_key(&contents.current) {
            let kek_id = contents.current;
            return Err(KeyError::MissingCurrentKek { path, kek_id });
        }

        Ok(Self {
            path,
            current: contents.current,
            keys,
        })
    }

    fn next_kek_id(&self) -> Result<String, KeyError> {
        let highest = self
            .keys
            .keys()
            .filter_map(|id| id.strip_prefix(KEK_ID_PREFIX)?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        match highest.checked_add(1) {
            Some(next) => Ok(format!("{KEK_ID_PREFIX}{next}")),
            None => Err(KeyError::KekIdsExhausted {
                path: self.path.clone(),
                kek_id: format!("{KEK_ID_PREFIX}{highest}"),
            }),
        }
    }

    fn kek(&self, kek_id: &str) -> Result<&[u8; KEK_LEN], KeyError> {
        match self.keys.get(kek_id) {
            Some(kek) => Ok(kek),
            None => Err(KeyError::UnknownKek {
                kek_id: kek_id.to_owned(),
            }),
        }
    }
}

impl KeyProvider for LocalKeyFile {
    fn current_kek_id(&self) -> String {
        self.current.clone()
    }

    fn wrap(&self, data_key: &DataKey) -> Result<WrappedKey, KeyError> {
        let kek = self.kek(&self.current)?;
        let bytes = seal(kek, data_key.as_bytes(), &wrap_aad(&self.current))?;
        Ok(WrappedKey {
            kek_id: self.current.clone(),
            bytes,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        let kek = self.kek(&wrapped.kek_id)?;
        let Some(plaintext) = open(kek, &wrapped.bytes, &wrap_aad(&wrapped.kek_id)) else {
            let kek_id = wrapped.kek_id.clone();
            return Err(KeyError::UnwrapFailed { kek_id });
        };
        DataKey::from_slice(&Zeroizing::new(plaintext))
    }
}

impl fmt::Debug for LocalKeyFile {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("LocalKeyFile")
            .field("path", &self.path)
            .field("current", &self.current)
            .field("kek_ids", &self.kek_ids())
            .finish()
    }
}

/// Associated data of a wrapped key: a label and the KEK id, so a wrapped
/// key presented under another id fails authentication.
fn wrap_aad(kek_id: &str) -> Vec<u8> {
    [WRAP_AAD_LABEL, kek_id.as_bytes()].concat()
}

fn is_valid_kek_id(kek_id: &str) -> bool {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    (1..=MAX_KEK_ID_LEN).contains(&kek_id.len()) && kek_id.chars().all(allowed)
}

/// Decodes 32 bytes written as 64 hex digits or in standard base64.
fn decode_kek(text: &str) -> Option<Zeroizing<[u8; KEK_LEN]>> {
    let mut kek = Zeroizing::new([0; KEK_LEN]);
    if text.len() == 2 * KEK_LEN {
        hex::decode_to_slice(text, kek.as_mut_slice()).ok()?;
        return Some(kek);
    }
    let bytes = Zeroizing::new(STANDARD.decode(text).ok()?);
    if bytes.len() != KEK_LEN {
        return None;
    }
    kek.copy_from_slice(&bytes);
    Some(kek)
}

fn random_kek() -> Result<Zeroizing<[u8; KEK_LEN]>, KeyError> {
    let mut kek = Zeroizing::new([0; KEK_LEN]);
    getrandom::fill(kek.as_mut_slice()).map_err(KeyError::Random)?;
    Ok(kek)
}

fn write_key_file(
    path: &Path,
    current: &str,
    keys: &BTreeMap<String, Zeroizing<[u8; KEK_LEN]>>,
) -> Result<(), KeyError> {
    let encoded = keys
        .iter()
        .map(|(id, kek)| (id.as_str(), Zeroizing::new(STANDARD.encode(kek.as_slice()))))
        .collect();
    let contents = KeyFileOut {
        current,
        keys: encoded,
    };

    let write_error = |source| KeyError::WriteKeyFile {
        path: path.to_path_buf(),
        source,
    };
    let json = serde_json::to_vec_pretty(&contents).map_err(io::Error::other);
    write_atomically(path, &Zeroizing::new(json.map_err(write_error)?)).map_err(write_error)
}

/// Replaces `path` with `contents` so that a reader, or a restart after a
/// crash, finds either the old file or the new one. The contents go to a
/// temporary file of mode 0600 beside it, which is synced and renamed over
/// `path`, and then the directory is synced so the rename is durable.
fn write_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let suffix = getrandom::u64().map_err(io::Error::other)?;
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{suffix:016x}.tmp"));
    let temp = PathBuf::from(temp);

    let result = write_and_rename(&temp, path, contents);
    if result.is_err() {
        // The temporary file may not exist, so a failure here is expected.
        let _ = fs::remove_file(&temp);
    }
    result
}

fn write_and_rename(temp: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(temp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);

    fs::rename(temp, path)?;
    let directory = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty());
    File::open(directory.unwrap_or(Path::new(".")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::keys::test_support::TestKeyFile;

    const HEX_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    /// Writes `contents` to `keys.json` in `dir` with mode 0600.
    fn write_private(dir: &Path, contents: &str) -> PathBuf {
        let path = dir.join("keys.json");
        fs::write(&path, contents).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn open_err(contents: &str) -> (PathBuf, KeyError) {
        let dir = tempfile::tempdir().unwrap();
        let path = write_private(dir.path(), contents);
        let err = LocalKeyFile::open_or_create(&path).unwrap_err();
        (path, err)
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn creates_private_file_with_one_key() {
        let test = TestKeyFile::new();
        let path = test.dir.path().join("keys.json");

        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();

        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(test.keys.current_kek_id(), "kek-1");
        assert_eq!(test.keys.kek_ids(), ["kek-1"]);
        assert_eq!(test.keys.path(), path);
        assert_eq!(json["current"], "kek-1");
        let encoded = json["keys"]["kek-1"].as_str().unwrap();
        assert_eq!(STANDARD.decode(encoded).unwrap().len(), KEK_LEN);
        assert_eq!(file_names(test.dir.path()), ["keys.json"]);
    }

    #[test]
    fn reopened_file_unwraps_keys() {
        let test = TestKeyFile::new();
        let data_key = DataKey::generate().unwrap();
        let wrapped = test.keys.wrap(&data_key).unwrap();

        let reopened = LocalKeyFile::open_or_create(test.keys.path()).unwrap();
        let unwrapped = reopened.unwrap(&wrapped).unwrap();

        assert_eq!(wrapped.kek_id, "kek-1");
        assert_eq!(unwrapped.as_bytes(), data_key.as_bytes());
    }

    #[test]
    fn reads_hex_and_base64_keys() {
        let base64 = STANDARD.encode([5; KEK_LEN]);
        let dir = tempfile::tempdir().unwrap();
        let contents =
            format!(r#"{{"current": "b", "keys": {{"a": "{HEX_KEY}", "b": "{base64}"}}}}"#);
        let path = write_private(dir.path(), &contents);

        let keys = LocalKeyFile::open_or_create(&path).unwrap();

        assert_eq!(keys.current_kek_id(), "b");
        assert_eq!(keys.kek("a").unwrap()[31], 0x1f);
        assert_eq!(keys.kek("b").unwrap(), &[5; KEK_LEN]);
    }

    #[test]
    fn rejects_group_or_other_access() {
        for mode in [0o640, 0o604, 0o620, 0o601] {
            let test = TestKeyFile::new();
            let path = test.keys.path().to_path_buf();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();

            let err = LocalKeyFile::open_or_create(&path).unwrap_err();

            assert!(matches!(err, KeyError::KeyFilePermissions { mode: m, .. } if m == mode));
            let expected = format!(
                "key file {} has mode {mode:04o}, which gives its group or other users access; \
                 run `chmod 600 {}`",
                path.display(),
                path.display()
            );
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn rejects_invalid_json() {
        for contents in [
            "not json",
            r#"{"current": "kek-1"}"#,
            r#"{"current": "kek-1", "keys": {}, "extra": 1}"#,
            r#"{"current": 1, "keys": {}}"#,
        ] {
            let (path, err) = open_err(contents);

            assert!(
                matches!(err, KeyError::KeyFileFormat { .. }),
                "{contents}: {err}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("key file {} is not valid JSON", path.display()))
            );
        }
    }

    #[test]
    fn rejects_invalid_kek_ids() {
        let long = "k".repeat(MAX_KEK_ID_LEN + 1);
        for kek_id in ["", "kek 1", "kek/1", "kék", long.as_str()] {
            let contents = format!(r#"{{"current": "x", "keys": {{"{kek_id}": "{HEX_KEY}"}}}}"#);

            let (path, err) = open_err(&contents);

            assert!(
                matches!(&err, KeyError::InvalidKekId { kek_id: id, .. } if id == kek_id),
                "{err}"
            );
            assert!(err.to_string().contains(&path.display().to_string()));
        }
    }

    #[test]
    fn accepts_longest_kek_id() {
        let kek_id = "k".repeat(MAX_KEK_ID_LEN);
        let dir = tempfile::tempdir().unwrap();
        let contents = format!(r#"{{"current": "{kek_id}", "keys": {{"{kek_id}": "{HEX_KEY}"}}}}"#);
        let path = write_private(dir.path(), &contents);

        let keys = LocalKeyFile::open_or_create(&path).unwrap();

        assert_eq!(keys.current_kek_id(), kek_id);
    }

    #[test]
    fn rejects_keys_of_wrong_length_or_encoding() {
        let short = STANDARD.encode([1; 16]);
        let not_hex = "z".repeat(64);
        for key in [short.as_str(), not_hex.as_str(), "!!!!", ""] {
            let contents = format!(r#"{{"current": "kek-1", "keys": {{"kek-1": "{key}"}}}}"#);

            let (path, err) = open_err(&contents);

            assert!(
                matches!(&err, KeyError::InvalidKek { kek_id, .. } if kek_id == "kek-1"),
                "{err}"
            );
            let expected = format!(
                "key kek-1 in key file {} is not 32 bytes in base64 or hex; restore the file \
                 from a backup",
                path.display()
            );
            assert_eq!(err.to_string(), expected);
        }
    }

    #[test]
    fn rejects_missing_current_key() {
        let contents = format!(r#"{{"current": "kek-2", "keys": {{"kek-1": "{HEX_KEY}"}}}}"#);

        let (_, err) = open_err(&contents);

        assert!(matches!(&err, KeyError::MissingCurrentKek { kek_id, .. } if kek_id == "kek-2"));
        assert!(
            err.to_string().contains("names \"kek-2\" as current"),
            "{err}"
        );
    }

    #[test]
    fn rejects_empty_key_set() {
        let (_, err) = open_err(r#"{"current": "", "keys": {}}"#);

        assert!(matches!(&err, KeyError::MissingCurrentKek { kek_id, .. } if kek_id.is_empty()));
    }

    #[test]
    fn reports_unreadable_path() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_directory = dir.path().join("file");
        fs::write(&not_a_directory, "").unwrap();
        let path = not_a_directory.join("keys.json");

        let err = LocalKeyFile::open_or_create(&path).unwrap_err();

        assert!(matches!(err, KeyError::ReadKeyFile { .. }), "{err}");
        let expected = format!(
            "failed to read key file {}; check that the sidecar's user can read it",
            path.display()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn reports_directory_as_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        fs::create_dir(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();

        let err = LocalKeyFile::open_or_create(&path).unwrap_err();

        assert!(matches!(err, KeyError::ReadKeyFile { .. }), "{err}");
    }

    #[test]
    fn reports_failed_create() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("keys.json");

        let err = LocalKeyFile::open_or_create(&path).unwrap_err();

        assert!(matches!(err, KeyError::WriteKeyFile { .. }), "{err}");
        let expected = format!(
            "failed to write key file {}; check that its directory exists and is writable",
            path.display()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn rotate_adds_current_key_and_keeps_old() {
        let mut test = TestKeyFile::new();
        let data_key = DataKey::generate().unwrap();
        let old = test.keys.wrap(&data_key).unwrap();

        let kek_id = test.keys.rotate().unwrap();
        let new = test.keys.wrap(&data_key).unwrap();
        let reopened = LocalKeyFile::open_or_create(test.keys.path()).unwrap();

        assert_eq!(kek_id, "kek-2");
        assert_eq!(test.keys.current_kek_id(), "kek-2");
        assert_eq!(new.kek_id, "kek-2");
        assert_eq!(
            test.keys.unwrap(&old).unwrap().as_bytes(),
            data_key.as_bytes()
        );
        assert_eq!(reopened.current_kek_id(), "kek-2");
        assert_eq!(reopened.kek_ids(), ["kek-1", "kek-2"]);
        assert_eq!(
            reopened.unwrap(&new).unwrap().as_bytes(),
            data_key.as_bytes()
        );
        assert_eq!(mode_of(test.keys.path()), 0o600);
        assert_eq!(file_names(test.dir.path()), ["keys.json"]);
    }

    #[test]
    fn rotate_numbers_after_highest_id() {
        let dir = tempfile::tempdir().unwrap();
        let contents = format!(
            r#"{{"current": "main", "keys": {{"main": "{HEX_KEY}", "kek-007": "{HEX_KEY}", "kek-x": "{HEX_KEY}"}}}}"#
        );
        let path = write_private(dir.path(), &contents);
        let mut keys = LocalKeyFile::open_or_create(&path).unwrap();

        assert_eq!(keys.rotate().unwrap(), "kek-8");
    }

    #[test]
    fn rotate_reports_exhausted_ids() {
        let dir = tempfile::tempdir().unwrap();
        let last = format!("kek-{}", u64::MAX);
        let contents = format!(r#"{{"current": "{last}", "keys": {{"{last}": "{HEX_KEY}"}}}}"#);
        let path = write_private(dir.path(), &contents);
        let mut keys = LocalKeyFile::open_or_create(&path).unwrap();

        let err = keys.rotate().unwrap_err();

        assert!(
            matches!(&err, KeyError::KekIdsExhausted { kek_id, .. } if *kek_id == last),
            "{err}"
        );
        assert_eq!(keys.current_kek_id(), last);
    }

    #[test]
    fn failed_rotate_keeps_state_and_removes_temp_file() {
        let mut test = TestKeyFile::new();
        let path = test.keys.path().to_path_buf();
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();

        let err = test.keys.rotate().unwrap_err();

        assert!(matches!(err, KeyError::WriteKeyFile { .. }), "{err}");
        assert_eq!(test.keys.current_kek_id(), "kek-1");
        assert_eq!(test.keys.kek_ids(), ["kek-1"]);
        assert_eq!(file_names(test.dir.path()), ["keys.json"]);
    }

    #[test]
    fn retire_removes_old_key() {
        let mut test = TestKeyFile::new();
        let old = test.keys.wrap(&DataKey::generate().unwrap()).unwrap();
        test.keys.rotate().unwrap();

        test.keys.retire("kek-1").unwrap();
        let reopened = LocalKeyFile::open_or_create(test.keys.path()).unwrap();

        assert_eq!(test.keys.kek_ids(), ["kek-2"]);
        assert_eq!(reopened.kek_ids(), ["kek-2"]);
        let err = reopened.unwrap(&old).unwrap_err();
        assert!(matches!(&err, KeyError::UnknownKek { kek_id } if kek_id == "kek-1"));
        assert_eq!(
            err.to_string(),
            "key encryption key kek-1 is not available; restore it to the key file or KMS it \
             was retired from"
        );
    }

    #[test]
    fn retire_rejects_current_key() {
        let mut test = TestKeyFile::new();

        let err = test.keys.retire("kek-1").unwrap_err();

        assert!(matches!(&err, KeyError::RetireCurrentKek { kek_id, .. } if kek_id == "kek-1"));
        assert!(
            err.to_string()
                .contains("rotate to a new key before retiring it"),
            "{err}"
        );
        assert_eq!(test.keys.kek_ids(), ["kek-1"]);
    }

    #[test]
    fn retire_rejects_unknown_key() {
        let mut test = TestKeyFile::new();

        let err = test.keys.retire("kek-9").unwrap_err();

        assert!(matches!(&err, KeyError::UnknownKek { kek_id } if kek_id == "kek-9"));
    }

    #[test]
    fn failed_retire_keeps_state() {
        let mut test = TestKeyFile::new();
        test.keys.rotate().unwrap();
        let path = test.keys.path().to_path_buf();
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();

        let err = test.keys.retire("kek-1").unwrap_err();

        assert!(matches!(err, KeyError::WriteKeyFile { .. }), "{err}");
        assert_eq!(test.keys.kek_ids(), ["kek-1", "kek-2"]);
    }

    #[test]
    fn unwrap_rejects_changed_bytes() {
        let test = TestKeyFile::new();
        let mut wrapped = test.keys.wrap(&DataKey::generate().unwrap()).unwrap();
        if let Some(byte) = wrapped.bytes.last_mut() {
            *byte ^= 1;
        }

        let err = test.keys.unwrap(&wrapped).unwrap_err();

        assert!(matches!(&err, KeyError::UnwrapFailed { kek_id } if kek_id == "kek-1"));
        assert!(
            err.to_string()
                .starts_with("data key wrapped under kek-1 failed authentication")
        );
    }

    #[test]
    fn unwrap_rejects_other_kek_id() {
        let mut test = TestKeyFile::new();
        let mut wrapped = test.keys.wrap(&DataKey::generate().unwrap()).unwrap();
        test.keys.rotate().unwrap();
        wrapped.kek_id = "kek-2".to_owned();

        let err = test.keys.unwrap(&wrapped).unwrap_err();

        assert!(matches!(&err, KeyError::UnwrapFailed { kek_id } if kek_id == "kek-2"));
    }

    #[test]
    fn debug_lists_ids_without_keys() {
        let test = TestKeyFile::new();

        let debug = format!("{:?}", test.keys);

        assert!(debug.contains("current: \"kek-1\""), "{debug}");
        assert!(debug.contains("kek_ids: [\"kek-1\"]"), "{debug}");
        assert!(!debug.contains(&format!("{:?}", test.keys.kek("kek-1").unwrap())));
    }
}
