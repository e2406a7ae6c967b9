//! AES-256-GCM with a random 96-bit nonce stored in front of the ciphertext.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};

use super::KeyError;

/// Length of the random nonce in front of each sealed message.
pub(super) const NONCE_LEN: usize = 12;

/// Encrypts `plaintext` under `key` with a fresh random nonce, and returns
/// the nonce followed by the ciphertext and tag.
pub(crate) fn seal(key: &[u8; 32], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut nonce = [0; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(KeyError::Random)?;

    let payload = Payload {
        msg: plaintext,
        aad,
    };
    let cipher = Aes256Gcm::new(key.into());
    let sealed = cipher
        .encrypt(&nonce.into(), payload)
        .map_err(|_| KeyError::PlaintextTooLong)?;
    Ok([nonce.as_slice(), &sealed].concat())
}

/// Decrypts what [`seal`] returned, or returns `None` when it is too short
/// or fails authentication under `key` and `aad`.
pub(crate) fn open(key: &[u8; 32], sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let (nonce, ciphertext) = sealed.split_first_chunk::<NONCE_LEN>()?;
    let payload = Payload {
        msg: ciphertext,
        aad,
    };
    Aes256Gcm::new(key.into())
        .decrypt(nonce.into(), payload)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    /// Length of the GCM authentication tag at the end of each sealed message.
    const TAG_LEN: usize = 16;

    #[test]
    fn seal_then_open_returns_plaintext() {
        let sealed = seal(&KEY, b"hello", b"row 1").unwrap();

        assert_eq!(sealed.len(), NONCE_LEN + 5 + TAG_LEN);
        assert_eq!(open(&KEY, &sealed, b"row 1").unwrap(), b"hello");
    }

    #[test]
    fn seal_uses_fresh_nonce() {
        let first = seal(&KEY, b"hello", b"").unwrap();
        let second = seal(&KEY, b"hello", b"").unwrap();

        assert_ne!(first, second);
    }

    #[test]
    fn open_rejects_other_aad_key_or_bytes() {
        let sealed = seal(&KEY, b"hello", b"row 1").unwrap();
        let mut flipped = sealed.clone();
        if let Some(byte) = flipped.last_mut() {
            *byte ^= 1;
        }

        assert_eq!(open(&KEY, &sealed, b"row 2"), None);
        assert_eq!(open(&[8; 32], &sealed, b"row 1"), None);
        assert_eq!(open(&KEY, &flipped, b"row 1"), None);
    }

    #[test]
    fn open_rejects_short_input() {
        assert_eq!(open(&KEY, &[0; NONCE_LEN - 1], b""), None);
        assert_eq!(open(&KEY, &[0; NONCE_LEN + TAG_LEN - 1], b""), None);
    }
}
