//! Random object ids in Stripe's form: a prefix such as `cus_` followed by
//! base62 characters.

use std::hash::{BuildHasher, RandomState};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Number of random characters after the prefix, as in Stripe's ids
/// (`cus_NffrFeUfNV2Hib`).
const RANDOM_LENGTH: usize = 14;

/// Returns `prefix` followed by 14 random base62 characters.
///
/// The randomness comes from the standard library's per-instance hash keys,
/// which are random at thread start and differ for every `RandomState`. It
/// suits unique test ids, not secrets.
pub(crate) fn random_id(prefix: &str) -> String {
    let mut id = String::with_capacity(prefix.len() + RANDOM_LENGTH);
    id.push_str(prefix);
    let high = u128::from(RandomState::new().hash_one(0_u8));
    let low = u128::from(RandomState::new().hash_one(1_u8));
    let mut bits = (high << 64) | low;
    for _ in 0..RANDOM_LENGTH {
        let digit = usize::try_from(bits % 62).unwrap_or(0);
        id.push(char::from(BASE62[digit]));
        bits /= 62;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_id_has_prefix_and_length() {
        let id = random_id("cus_");
        assert!(id.starts_with("cus_"));
        assert_eq!(id.len(), 4 + RANDOM_LENGTH);
        assert!(id[4..].chars().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn random_id_differs_between_calls() {
        let ids: std::collections::HashSet<String> = (0..100).map(|_| random_id("x_")).collect();
        assert_eq!(ids.len(), 100);
    }
}
