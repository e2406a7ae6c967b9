//! State the sidecar pushes to every filter instance in the sync reply,
//! beside the tier overrides: the asset region registry and the erased
//! customers. Each is a complete, versioned set sent to an instance while
//! the version it reports differs. The instances' acknowledgements of the
//! erased customers are tracked here too.
//!
//! The registry's version is derived from its content, so equal
//! registries have equal versions, and no restart or clock step can give
//! an instance's old registry the version of a new one. The erased
//! customers' versions increase, since acknowledgements compare them.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError, RwLock};

use prost::Message;
use sha2::{Digest, Sha256};
use veo_proto::sync::{AssetRegion, AssetRegions, ErasedCustomer, Erasures};

/// Seconds since its last sync after which an instance no longer counts as
/// running, so an erasure stops waiting for its acknowledgement.
pub const INSTANCE_ACTIVE_SECONDS: i64 = 300;

/// Returns the version of a registry with `assets` in order of asset: the
/// first 8 bytes of the SHA-256 of their encoding, or 1 in place of 0.
/// prost encodes a message without map fields the same way every time.
fn registry_version(assets: &[AssetRegion]) -> u64 {
    let mut hash = Sha256::new();
    for asset in assets {
        hash.update(asset.encode_length_delimited_to_vec());
    }
    let digest = hash.finalize();
    let mut first = [0; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first).max(1)
}

/// A complete set and its version.
#[derive(Debug, Clone, Default)]
struct Versioned<T> {
    version: u64,
    items: Vec<T>,
}

impl<T: Clone + PartialEq> Versioned<T> {
    /// Replaces the set; a different set gets the next version.
    fn replace(&mut self, items: Vec<T>) -> bool {
        if self.items == items {
            return false;
        }
        self.version = self.version.wrapping_add(1).max(1);
        self.items = items;
        true
    }
}

/// Acknowledgement state of one filter instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceAck {
    /// Version of the erased customers the instance last reported.
    pub erasures_version: u64,
    /// When the instance last synced, in seconds since the Unix epoch.
    pub last_seen_unix_s: i64,
}

/// The pushed sets and the instances' acknowledgements; shared by the sync
/// and admin services.
#[derive(Debug)]
pub struct Pushes {
    assets: RwLock<Versioned<AssetRegion>>,
    erasures: RwLock<Versioned<ErasedCustomer>>,
    erased: RwLock<HashSet<String>>,
    acks: Mutex<HashMap<String, InstanceAck>>,
}

impl Pushes {
    /// Creates an empty registry and an empty erased-customer set whose
    /// first version is `first_version`. Starting from the start time makes
    /// every instance receive the erased customers again after a restart,
    /// even one that held an earlier sidecar's version.
    pub fn new(first_version: u64) -> Pushes {
        let first = |version: u64| version.max(1);
        Pushes {
            assets: RwLock::new(Versioned {
                version: registry_version(&[]),
                items: Vec::new(),
            }),
            erasures: RwLock::new(Versioned {
                version: first(first_version),
                items: Vec::new(),
            }),
            erased: RwLock::default(),
            acks: Mutex::default(),
        }
    }

    /// Replaces the asset region registry; returns whether it changed.
    pub fn set_assets(&self, mut assets: Vec<AssetRegion>) -> bool {
        assets.sort_by(|a, b| a.asset.cmp(&b.asset));
        let mut current = self.assets.write().unwrap_or_else(PoisonError::into_inner);
        if current.items == assets {
            return false;
        }
        current.version = registry_version(&assets);
        current.items = assets;
        true
    }

    /// Returns the registry when `known_version` is not the current one.
    pub fn assets_for(&self, known_version: u64) -> Option<AssetRegions> {
        let current = self.assets.read().unwrap_or_else(PoisonError::into_inner);
        (current.version != known_version).then(|| AssetRegions {
            version: current.version,
            assets: current.items.clone(),
        })
    }

    /// Replaces the erased customers; returns the version in force after
    /// the call.
    pub fn set_erased(&self, mut customers: Vec<ErasedCustomer>) -> u64 {
        customers.sort_by(|a, b| a.customer.cmp(&b.customer));
        let names = customers.iter().map(|c| c.customer.clone()).collect();
        let mut current = self
            .erasures
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        current.replace(customers);
        *self.erased.write().unwrap_or_else(PoisonError::into_inner) = names;
        current.version
    }

    /// Returns the version of the erased customers in force.
    pub fn erasures_version(&self) -> u64 {
        self.erasures
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .version
    }

    /// Returns the erased customers when `known_version` is not the current
    /// one.
    pub fn erasures_for(&self, known_version: u64) -> Option<Erasures> {
        let current = self.erasures.read().unwrap_or_else(PoisonError::into_inner);
        (current.version != known_version).then(|| Erasures {
            version: current.version,
            customers: current.items.clone(),
        })
    }

    /// Returns whether `customer` is erased and its tokens still refused.
    pub fn is_erased(&self, customer: &str) -> bool {
        let erased = self.erased.read().unwrap_or_else(PoisonError::into_inner);
        !erased.is_empty() && erased.contains(customer)
    }

    /// Records that `instance` synced at `now_unix_s` and applies the erased
    /// customers of `erasures_version`. Returns the previous state, so the
    /// caller can persist a change of version.
    pub fn record_ack(
        &self,
        instance: &str,
        erasures_version: u64,
        now_unix_s: i64,
    ) -> Option<InstanceAck> {
        let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let ack = InstanceAck {
            erasures_version,
            last_seen_unix_s: now_unix_s,
        };
        match acks.get_mut(instance) {
            Some(entry) => Some(std::mem::replace(entry, ack)),
            None => {
                acks.insert(instance.to_owned(), ack);
                None
            }
        }
    }

    /// Loads acknowledgements kept in the store, keeping newer ones already
    /// recorded.
    pub fn load_acks(&self, stored: Vec<(String, InstanceAck)>) {
        let mut acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        for (instance, ack) in stored {
            acks.entry(instance).or_insert(ack);
        }
    }

    /// Moves the erased-customer set's version above `version` when it is
    /// not yet. The first version comes from the clock, which may be behind
    /// the versions an earlier run reached, and an instance must never
    /// count as having acknowledged a set it has not received.
    pub fn move_versions_past(&self, version: u64) {
        let floor = version.saturating_add(1);
        let mut erasures = self
            .erasures
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        erasures.version = erasures.version.max(floor);
    }

    /// Returns the instances seen within [`INSTANCE_ACTIVE_SECONDS`] of
    /// `now_unix_s` that have not acknowledged `version`, in ascending
    /// order.
    pub fn pending_instances(&self, version: u64, now_unix_s: i64) -> Vec<String> {
        let acks = self.acks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut pending: Vec<String> = acks
            .iter()
            .filter(|(_, ack)| {
                ack.erasures_version < version
                    && now_unix_s.saturating_sub(ack.last_seen_unix_s) <= INSTANCE_ACTIVE_SECONDS
            })
            .map(|(instance, _)| instance.clone())
            .collect();
        pending.sort();
        pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erased(customer: &str) -> ErasedCustomer {
        ErasedCustomer {
            customer: customer.into(),
            refuse_until_unix_s: 100,
        }
    }

    #[test]
    fn sets_are_sent_while_the_version_differs() {
        let pushes = Pushes::new(7);

        let empty = pushes.assets_for(0).unwrap().version;
        assert!(pushes.assets_for(empty).is_none());
        assert!(pushes.set_assets(vec![AssetRegion {
            asset: "a1".into(),
            ..AssetRegion::default()
        }]));
        assert!(!pushes.set_assets(vec![AssetRegion {
            asset: "a1".into(),
            ..AssetRegion::default()
        }]));
        let with_one = pushes.assets_for(empty).unwrap().version;
        assert_ne!(with_one, empty);
        assert!(pushes.assets_for(with_one).is_none());
    }

    #[test]
    fn registry_version_depends_on_content_only() {
        let entry = |asset: &str, region: &str| AssetRegion {
            asset: asset.into(),
            allowed_regions: vec![region.into()],
            ..AssetRegion::default()
        };
        // Two runs of the sidecar, started at different times.
        let (first, second) = (Pushes::new(5), Pushes::new(1_000));
        let version = |pushes: &Pushes| pushes.assets_for(0).unwrap().version;
        assert_eq!(version(&first), version(&second));

        first.set_assets(vec![entry("a1", "eu"), entry("a2", "us")]);
        second.set_assets(vec![entry("a2", "us"), entry("a1", "eu")]);
        assert_eq!(version(&first), version(&second));

        second.set_assets(vec![entry("a1", "eu"), entry("a2", "ap")]);
        assert_ne!(version(&first), version(&second));
        // Back to the first content, back to its version.
        let before = version(&first);
        first.set_assets(vec![entry("a1", "eu")]);
        first.set_assets(vec![entry("a1", "eu"), entry("a2", "us")]);
        assert_eq!(version(&first), before);
    }

    #[test]
    fn erased_customers_are_known_by_name() {
        let pushes = Pushes::new(1);

        let version = pushes.set_erased(vec![erased("acme")]);

        assert_eq!(version, 2);
        assert!(pushes.is_erased("acme"));
        assert!(!pushes.is_erased("globex"));
        assert_eq!(pushes.erasures_for(1).unwrap().customers.len(), 1);
        assert!(pushes.erasures_for(2).is_none());
    }

    #[test]
    fn pending_instances_are_recent_and_behind() {
        let pushes = Pushes::new(1);
        pushes.record_ack("behind", 1, 1_000);
        pushes.record_ack("current", 2, 1_000);
        pushes.record_ack("gone", 1, 1_000 - INSTANCE_ACTIVE_SECONDS - 1);

        assert_eq!(pushes.pending_instances(2, 1_000), ["behind"]);
        let previous = pushes.record_ack("behind", 2, 1_001).unwrap();
        assert_eq!(previous.erasures_version, 1);
        assert!(pushes.pending_instances(2, 1_001).is_empty());
    }

    #[test]
    fn stored_acks_do_not_replace_newer_ones() {
        let pushes = Pushes::new(1);
        pushes.record_ack("i1", 3, 50);

        pushes.load_acks(vec![
            (
                "i1".into(),
                InstanceAck {
                    erasures_version: 1,
                    last_seen_unix_s: 10,
                },
            ),
            (
                "i2".into(),
                InstanceAck {
                    erasures_version: 1,
                    last_seen_unix_s: 40,
                },
            ),
        ]);

        assert_eq!(pushes.pending_instances(2, 60), ["i2"]);
    }

    #[test]
    fn versions_move_past_stored_acks() {
        let pushes = Pushes::new(5);

        pushes.load_acks(vec![(
            "i1".into(),
            InstanceAck {
                erasures_version: 9,
                last_seen_unix_s: 10,
            },
        )]);
        pushes.move_versions_past(9);
        pushes.move_versions_past(3);

        let version = pushes.erasures_version();
        assert_eq!(version, 10);
        assert_eq!(pushes.pending_instances(version, 60), ["i1"]);
    }
}
