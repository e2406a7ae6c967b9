//! The key provider interface and the data keys it wraps.

use std::fmt;

use zeroize::Zeroizing;

use super::KeyError;

/// Length of a data key in bytes (AES-256).
pub const DATA_KEY_LEN: usize = 32;

/// A 256-bit data key, zeroized on drop. Its `Debug` output omits the bytes.
pub struct DataKey(Zeroizing<[u8; DATA_KEY_LEN]>);

impl DataKey {
    /// Generates a key from the operating system's random number generator.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = Zeroizing::new([0; DATA_KEY_LEN]);
        getrandom::fill(key.as_mut_slice()).map_err(KeyError::Random)?;
        Ok(Self(key))
    }

    /// Copies a key from `bytes`, for example the plaintext that a KMS
    /// returned. Fails with [`KeyError::DataKeyLength`] unless `bytes` has
    /// [`DATA_KEY_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        if bytes.len() != DATA_KEY_LEN {
            return Err(KeyError::DataKeyLength { len: bytes.len() });
        }
        let mut key = Zeroizing::new([0; DATA_KEY_LEN]);
        key.copy_from_slice(bytes);
        Ok(Self(key))
    }

    /// Returns the key's bytes.
    pub fn as_bytes(&self) -> &[u8; DATA_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("DataKey(..)")
    }
}

/// A data key encrypted under a key encryption key (KEK).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// Id of the KEK that wrapped the data key.
    pub kek_id: String,
    /// The provider's ciphertext of the data key.
    pub bytes: Vec<u8>,
}

/// Holder of the key encryption keys (KEKs) that wrap data keys: a local key
/// file or a KMS. The KEKs themselves never leave the provider.
pub trait KeyProvider: Send + Sync {
    /// Id of the KEK that [`wrap`](Self::wrap) uses.
    fn current_kek_id(&self) -> String;

    /// Encrypts `data_key` under the current KEK.
    fn wrap(&self, data_key: &DataKey) -> Result<WrappedKey, KeyError>;

    /// Decrypts `wrapped` with the KEK named by its `kek_id`, which may be
    /// any KEK the provider still has. Fails with
    /// [`KeyError::UnknownKek`] when it has no such KEK, and with
    /// [`KeyError::UnwrapFailed`] when `wrapped` fails authentication.
    fn unwrap(&self, wrapped: &WrappedKey) -> Result<DataKey, KeyError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_returns_different_keys() {
        let first = DataKey::generate().unwrap();
        let second = DataKey::generate().unwrap();

        assert_ne!(first.as_bytes(), second.as_bytes());
    }

    #[test]
    fn from_slice_copies_32_bytes() {
        let key = DataKey::from_slice(&[9; DATA_KEY_LEN]).unwrap();

        assert_eq!(key.as_bytes(), &[9; DATA_KEY_LEN]);
    }

    #[test]
    fn from_slice_rejects_other_lengths() {
        let err = DataKey::from_slice(&[9; 16]).unwrap_err();

        assert!(matches!(err, KeyError::DataKeyLength { len: 16 }), "{err}");
        assert_eq!(
            err.to_string(),
            "data key has 16 bytes instead of 32; check the key provider's unwrap output"
        );
    }

    #[test]
    fn debug_hides_key_bytes() {
        let key = DataKey::from_slice(&[0xab; DATA_KEY_LEN]).unwrap();

        assert_eq!(format!("{key:?}"), "DataKey(..)");
    }
}
