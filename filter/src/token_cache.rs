//! Verified-token cache in two levels. The first is a per-worker map keyed
//! by the token itself, where a hit costs no host call. Behind it is a slot
//! table in Envoy shared data keyed by the SHA-256 of the whole token, where
//! a hit costs one `get_shared_data`. So a token is verified about once per
//! Envoy instance. Entries are used only until the token's `exp`.

pub mod entry;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use sha2::{Digest, Sha256};

use crate::config::Tiers;
use crate::host::Host;
use crate::jwt::VerifiedToken;
use entry::SharedEntry;

/// Prefix of the shared-data keys of the token cache; the slot index
/// follows.
pub const KEY_PREFIX: &str = "veo.tok.";

/// Value that clears a shared slot. Keys cannot be deleted, and an empty
/// value may read back as a missing one, so a cleared slot contains one
/// byte that no entry format starts with.
const CLEARED_SLOT: &[u8] = &[0];

/// A verified token as the request path uses it.
#[derive(Debug)]
pub struct CachedToken {
    /// Customer id.
    pub customer: String,
    /// Index of the resolved tier in the configured tier table.
    pub tier: usize,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at_s: u64,
    /// Limiter slot where this customer's record was last found; a hint
    /// that saves probing.
    pub limiter_slot: Cell<Option<u32>>,
}

/// Cache level that returned a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLevel {
    /// The worker's own map.
    Local,
    /// Envoy shared data.
    Shared,
}

impl CacheLevel {
    /// Returns the level's name in log lines.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Shared => "shared",
        }
    }
}

/// The two-level cache of one worker.
#[derive(Debug)]
pub struct TokenCache {
    local: RefCell<HashMap<Box<str>, Rc<CachedToken>>>,
    capacity: usize,
    shared_slots: u32,
}

impl TokenCache {
    /// Creates a cache holding at most `entries` tokens per level.
    pub fn new(entries: u32) -> Self {
        Self {
            local: RefCell::new(HashMap::new()),
            capacity: entries as usize,
            shared_slots: entries.max(1),
        }
    }

    /// Looks `token` up, first locally then in shared data; a shared hit
    /// is copied into the local map.
    pub fn get(
        &self,
        host: &impl Host,
        tiers: &Tiers,
        token: &str,
        now_s: u64,
    ) -> Option<(Rc<CachedToken>, CacheLevel)> {
        let local = self.local.borrow().get(token).cloned();
        if let Some(cached) = local {
            if now_s < cached.expires_at_s {
                return Some((cached, CacheLevel::Local));
            }
            self.local.borrow_mut().remove(token);
            return None;
        }

        let hash = token_hash(token);
        let value = host.get_shared_data(&self.shared_key(&hash)).ok()?;
        let entry = SharedEntry::decode(&value.bytes?)?;
        if entry.hash != hash || now_s >= entry.expires_at_s {
            return None;
        }
        let cached = Rc::new(CachedToken {
            tier: tiers.resolve(entry.tier.as_deref()),
            customer: entry.customer,
            expires_at_s: entry.expires_at_s,
            limiter_slot: Cell::new(None),
        });
        self.insert_local(token, Rc::clone(&cached), now_s);
        Some((cached, CacheLevel::Shared))
    }

    /// Stores a freshly verified token in both levels and returns the
    /// entry. A token already past `exp` (accepted within the leeway) is
    /// not stored.
    pub fn insert(
        &self,
        host: &impl Host,
        tiers: &Tiers,
        token: &str,
        verified: VerifiedToken,
        now_s: u64,
    ) -> Rc<CachedToken> {
        let cached = Rc::new(CachedToken {
            tier: tiers.resolve(verified.tier.as_deref()),
            customer: verified.customer.clone(),
            expires_at_s: verified.expires_at_s,
            limiter_slot: Cell::new(None),
        });
        if now_s >= verified.expires_at_s {
            return cached;
        }

        let hash = token_hash(token);
        let entry = SharedEntry {
            hash,
            expires_at_s: verified.expires_at_s,
            customer: verified.customer,
            tier: verified.tier,
        };
        // A lost race with another worker only replaces one cache entry
        // with another valid one, so the write needs no compare-and-swap.
        let _ = host.set_shared_data(&self.shared_key(&hash), &entry.encode(), None);
        self.insert_local(token, Rc::clone(&cached), now_s);
        cached
    }

    /// Removes `token` from both levels. The shared slot is cleared only
    /// while it still contains this token, so a newer token that took the
    /// slot stays.
    pub fn remove(&self, host: &impl Host, token: &str) {
        self.local.borrow_mut().remove(token);

        let hash = token_hash(token);
        let key = self.shared_key(&hash);
        let Ok(value) = host.get_shared_data(&key) else {
            return;
        };
        let entry = value.bytes.as_deref().and_then(SharedEntry::decode);
        if entry.is_some_and(|entry| entry.hash == hash) {
            // A lost race means another token took the slot, which is the
            // same outcome for this token.
            let _ = host.set_shared_data(&key, CLEARED_SLOT, value.cas);
        }
    }

    fn insert_local(&self, token: &str, cached: Rc<CachedToken>, now_s: u64) {
        let mut local = self.local.borrow_mut();
        if local.len() >= self.capacity {
            local.retain(|_, entry| now_s < entry.expires_at_s);
        }
        // Still full of live tokens: start over rather than track recency
        // on every hit; the shared level refills the map cheaply.
        if local.len() >= self.capacity {
            local.clear();
        }
        local.insert(token.into(), cached);
    }

    fn shared_key(&self, hash: &[u8; 32]) -> String {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&hash[..8]);
        let slot = u64::from_le_bytes(prefix) % u64::from(self.shared_slots);
        format!("{KEY_PREFIX}{slot}")
    }

    /// Returns the number of tokens in the local map.
    pub fn local_len(&self) -> usize {
        self.local.borrow().len()
    }
}

/// Returns the SHA-256 of the whole token.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tier::{build_tiers, default_raw_tiers};
    use crate::host::MemoryHost;

    fn tiers() -> Tiers {
        build_tiers(&default_raw_tiers(), "basic").unwrap()
    }

    fn verified(customer: &str, tier: Option<&str>, expires_at_s: u64) -> VerifiedToken {
        VerifiedToken {
            customer: customer.to_owned(),
            tier: tier.map(str::to_owned),
            expires_at_s,
        }
    }

    #[test]
    fn local_hit_costs_no_host_call() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(16);
        cache.insert(
            &host,
            &tiers(),
            "tok-a",
            verified("acme", Some("pro"), 2000),
            1000,
        );
        let calls = host.shared_data_calls();

        let (hit, level) = cache.get(&host, &tiers(), "tok-a", 1001).unwrap();
        assert_eq!(level, CacheLevel::Local);
        assert_eq!(hit.customer, "acme");
        assert_eq!(tiers().get(hit.tier).name, "pro");
        assert_eq!(host.shared_data_calls(), calls);
    }

    #[test]
    fn other_worker_hits_shared_level_with_one_call() {
        let host = MemoryHost::new(1_000_000);
        let other = host.worker();
        TokenCache::new(16).insert(&host, &tiers(), "tok-a", verified("acme", None, 2000), 1000);

        let cache = TokenCache::new(16);
        let (hit, level) = cache.get(&other, &tiers(), "tok-a", 1001).unwrap();
        assert_eq!(level, CacheLevel::Shared);
        assert_eq!(hit.customer, "acme");
        assert_eq!(tiers().get(hit.tier).name, "basic");
        assert_eq!(other.shared_data_calls(), 1);

        let (_, level) = cache.get(&other, &tiers(), "tok-a", 1001).unwrap();
        assert_eq!(level, CacheLevel::Local);
    }

    #[test]
    fn entries_are_not_used_from_expiry_on() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(16);
        cache.insert(&host, &tiers(), "tok-a", verified("acme", None, 2000), 1000);
        assert!(cache.get(&host, &tiers(), "tok-a", 1999).is_some());
        assert!(cache.get(&host, &tiers(), "tok-a", 2000).is_none());

        let other = TokenCache::new(16);
        assert!(other.get(&host, &tiers(), "tok-a", 2000).is_none());
    }

    #[test]
    fn removed_token_is_gone_from_both_levels() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(16);
        cache.insert(&host, &tiers(), "tok-a", verified("acme", None, 2000), 1000);
        cache.remove(&host, "tok-a");

        assert_eq!(cache.local_len(), 0);
        assert!(cache.get(&host, &tiers(), "tok-a", 1001).is_none());
        assert!(
            TokenCache::new(16)
                .get(&host, &tiers(), "tok-a", 1001)
                .is_none()
        );
    }

    #[test]
    fn removal_keeps_other_token_in_slot() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(1);
        cache.insert(&host, &tiers(), "tok-a", verified("acme", None, 2000), 1000);
        cache.insert(&host, &tiers(), "tok-b", verified("zeta", None, 2000), 1000);
        cache.remove(&host, "tok-a");

        let (hit, level) = TokenCache::new(1)
            .get(&host, &tiers(), "tok-b", 1001)
            .unwrap();
        assert_eq!(level, CacheLevel::Shared);
        assert_eq!(hit.customer, "zeta");
    }

    #[test]
    fn token_past_expiry_is_not_stored() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(16);
        cache.insert(&host, &tiers(), "tok-a", verified("acme", None, 1000), 1010);
        assert_eq!(cache.local_len(), 0);
        assert!(host.shared_data_keys(KEY_PREFIX).is_empty());
    }

    #[test]
    fn colliding_token_in_same_slot_is_a_miss() {
        let host = MemoryHost::new(1_000_000);
        let writer = TokenCache::new(1);
        writer.insert(&host, &tiers(), "tok-a", verified("acme", None, 2000), 1000);

        let reader = TokenCache::new(1);
        assert!(reader.get(&host, &tiers(), "tok-b", 1001).is_none());
        assert_eq!(host.shared_data_keys(KEY_PREFIX), ["veo.tok.0"]);
    }

    #[test]
    fn shared_table_is_bounded_by_entries() {
        let host = MemoryHost::new(1_000_000);
        let cache = TokenCache::new(8);
        for index in 0..100 {
            let token = format!("tok-{index}");
            cache.insert(&host, &tiers(), &token, verified("acme", None, 2000), 1000);
        }
        assert!(host.shared_data_keys(KEY_PREFIX).len() <= 8);
        assert!(cache.local_len() <= 8);
    }

    #[test]
    fn tier_is_resolved_with_current_table() {
        let host = MemoryHost::new(1_000_000);
        TokenCache::new(4).insert(&host, &tiers(), "t", verified("c", Some("pro"), 2000), 1000);

        let pro_less = {
            let mut raw = default_raw_tiers();
            raw.remove("pro");
            build_tiers(&raw, "enterprise").unwrap()
        };
        let (hit, _) = TokenCache::new(4).get(&host, &pro_less, "t", 1001).unwrap();
        assert_eq!(pro_less.get(hit.tier).name, "enterprise");
    }
}
