//! Encoding of one shared token-cache slot: version, the token's full
//! SHA-256 (checked on read, since many tokens share a slot), expiry,
//! customer and tier claim.

/// Format version written in the first byte.
const VERSION: u8 = 1;

/// One shared token-cache slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedEntry {
    /// SHA-256 of the whole token.
    pub hash: [u8; 32],
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at_s: u64,
    /// Customer id (at most 255 bytes).
    pub customer: String,
    /// Tier claim as the token carries it; `None` when absent or longer
    /// than 255 bytes, since no configured tier name is that long.
    pub tier: Option<String>,
}

impl SharedEntry {
    /// Encodes the entry.
    pub fn encode(&self) -> Vec<u8> {
        let customer = short_bytes(Some(&self.customer));
        let tier = short_bytes(self.tier.as_deref());
        let mut out = Vec::with_capacity(44 + customer.len() + tier.len());
        out.push(VERSION);
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.expires_at_s.to_le_bytes());
        out.push(customer.len() as u8);
        out.extend_from_slice(customer);
        match self.tier {
            Some(_) if !tier.is_empty() => {
                out.push(1);
                out.push(tier.len() as u8);
                out.extend_from_slice(tier);
            }
            _ => out.push(0),
        }
        out
    }

    /// Decodes an entry; `None` for bytes in another format.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (&version, rest) = bytes.split_first()?;
        if version != VERSION {
            return None;
        }
        let (hash, rest) = rest.split_first_chunk::<32>()?;
        let (expiry, rest) = rest.split_first_chunk::<8>()?;
        let (customer, rest) = take_short(rest)?;
        let (&has_tier, rest) = rest.split_first()?;
        let tier = match has_tier {
            0 => None,
            _ => Some(take_short(rest)?.0),
        };
        Some(Self {
            hash: *hash,
            expires_at_s: u64::from_le_bytes(*expiry),
            customer,
            tier,
        })
    }
}

/// Returns the bytes of `text` when it fits a one-byte length, else none.
fn short_bytes(text: Option<&str>) -> &[u8] {
    match text {
        Some(text) if text.len() <= usize::from(u8::MAX) => text.as_bytes(),
        _ => &[],
    }
}

fn take_short(bytes: &[u8]) -> Option<(String, &[u8])> {
    let (&len, rest) = bytes.split_first()?;
    let (text, rest) = rest.split_at_checked(usize::from(len))?;
    let text = String::from_utf8(text.to_vec()).ok()?;
    Some((text, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips() {
        let entry = SharedEntry {
            hash: [7; 32],
            expires_at_s: 1_700_000_000,
            customer: "acme".to_owned(),
            tier: Some("pro".to_owned()),
        };
        assert_eq!(SharedEntry::decode(&entry.encode()), Some(entry));
    }

    #[test]
    fn entry_without_tier_round_trips() {
        let entry = SharedEntry {
            hash: [1; 32],
            expires_at_s: 5,
            customer: "c".to_owned(),
            tier: None,
        };
        assert_eq!(SharedEntry::decode(&entry.encode()), Some(entry));
    }

    #[test]
    fn overlong_tier_is_stored_as_absent() {
        let entry = SharedEntry {
            hash: [1; 32],
            expires_at_s: 5,
            customer: "c".to_owned(),
            tier: Some("t".repeat(300)),
        };
        let decoded = SharedEntry::decode(&entry.encode()).unwrap();
        assert_eq!(decoded.tier, None);
    }

    #[test]
    fn truncated_or_foreign_bytes_do_not_decode() {
        let entry = SharedEntry {
            hash: [1; 32],
            expires_at_s: 5,
            customer: "customer".to_owned(),
            tier: None,
        };
        let bytes = entry.encode();
        for len in 0..bytes.len() {
            assert_eq!(SharedEntry::decode(&bytes[..len]), None, "length {len}");
        }
        assert_eq!(SharedEntry::decode(&[9, 9, 9]), None);
    }
}
