//! Customer tier overrides. The sidecar sends the complete set whenever its
//! version differs from the one this instance reported. The sync role
//! stores the set in shared data under [`OVERRIDES_KEY`]. Each worker reads
//! it on its timer into an [`OverrideTable`], where the request path looks
//! customers up without a host call.

use std::collections::HashMap;

use prost::Message;
use veo_proto::sync::{TierOverride, TierOverrides};

use super::Sync;
use crate::config::Tiers;
use crate::host::{Host, LogLevel};
use crate::metrics::Counter;

/// Shared-data key of the tier overrides in force, as an encoded
/// `TierOverrides`. Missing until the first set arrives.
pub const OVERRIDES_KEY: &str = "veo.sync.overrides";

/// Maximum ignored overrides one log line names.
const MAX_LOGGED_UNKNOWN: usize = 10;

/// Reads the set published under [`OVERRIDES_KEY`]; `None` for bytes that
/// do not decode.
pub fn decode_overrides(bytes: &[u8]) -> Option<TierOverrides> {
    TierOverrides::decode(bytes).ok()
}

/// Returns the overrides of `set` that name a tier `tiers` does not define.
pub fn unknown_tiers<'a>(set: &'a TierOverrides, tiers: &Tiers) -> Vec<&'a TierOverride> {
    set.overrides
        .iter()
        .filter(|entry| tiers.find(&entry.tier).is_none())
        .collect()
}

/// Tier overrides as the request path uses them: customer id to the index
/// of the tier in the tier table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OverrideTable {
    by_customer: HashMap<String, usize>,
}

impl OverrideTable {
    /// Maps each customer of `set` to the index of its tier in `tiers`.
    /// Overrides that name a tier `tiers` does not define are left out.
    /// When the set names a customer twice, the later override applies.
    pub fn build(set: &TierOverrides, tiers: &Tiers) -> Self {
        let by_customer = set
            .overrides
            .iter()
            .filter_map(|entry| Some((entry.customer.clone(), tiers.find(&entry.tier)?)))
            .collect();
        Self { by_customer }
    }

    /// Returns the index of the override tier of `customer`, if it has one.
    pub fn tier_of(&self, customer: &str) -> Option<usize> {
        // Most instances have no overrides, and then this skips hashing
        // the id.
        if self.by_customer.is_empty() {
            return None;
        }
        self.by_customer.get(customer).copied()
    }

    /// Returns the number of customers with an override.
    pub fn len(&self) -> usize {
        self.by_customer.len()
    }

    /// Returns whether no customer has an override.
    pub fn is_empty(&self) -> bool {
        self.by_customer.is_empty()
    }
}

impl Sync {
    /// Publishes the tier overrides of a sync reply for the workers to
    /// apply on their next tick. `None` means the set in force is current.
    pub(super) fn apply_overrides(&mut self, host: &impl Host, set: Option<&TierOverrides>) {
        let Some(set) = set else {
            return;
        };
        // A resent batch carries the version from when it was built. If
        // that is older than the one in force, the sidecar sends the set
        // in force again, and there is nothing to publish.
        if set.version == self.overrides_version {
            return;
        }

        let unknown = unknown_tiers(set, &self.base_tiers);
        if !unknown.is_empty() {
            self.metrics
                .add(Counter::TierOverridesIgnored, unknown.len() as u64);
            host.log(LogLevel::Warn, &describe_unknown(set.version, &unknown));
        }
        if let Err(error) = host.set_shared_data(OVERRIDES_KEY, &set.encode_to_vec(), None) {
            host.log(
                LogLevel::Error,
                &format!(
                    "failed to publish tier overrides version={}: {error}; the sidecar sends \
                     them again with the next reply",
                    set.version
                ),
            );
            return;
        }
        self.overrides_version = set.version;
        host.log(
            LogLevel::Info,
            &format!(
                "tier overrides in force version={} overrides={}",
                set.version,
                set.overrides.len().saturating_sub(unknown.len())
            ),
        );
    }

    /// Returns the version of the tier overrides this instance applies, 0
    /// before the first set.
    pub fn overrides_version(&self) -> u64 {
        self.overrides_version
    }
}

/// Describes the ignored overrides of one set for a warning, naming at
/// most [`MAX_LOGGED_UNKNOWN`] of them.
fn describe_unknown(version: u64, unknown: &[&TierOverride]) -> String {
    let named: Vec<String> = unknown
        .iter()
        .take(MAX_LOGGED_UNKNOWN)
        .map(|entry| {
            // Escaped, so that an id from the sidecar cannot break the line.
            format!(
                "{}={}",
                entry.customer.escape_debug(),
                entry.tier.escape_debug()
            )
        })
        .collect();
    let more = unknown.len().saturating_sub(MAX_LOGGED_UNKNOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "ignoring {} tier overrides of version={version} that name tiers the plugin \
         configuration does not define: {}{more}; those customers keep the tier of their \
         token, add the tiers to `tiers` to use them",
        unknown.len(),
        named.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tier::{build_tiers, default_raw_tiers};

    fn tiers() -> Tiers {
        build_tiers(&default_raw_tiers(), "basic").unwrap()
    }

    fn set(version: u64, entries: &[(&str, &str)]) -> TierOverrides {
        TierOverrides {
            version,
            overrides: entries
                .iter()
                .map(|(customer, tier)| TierOverride {
                    customer: (*customer).to_owned(),
                    tier: (*tier).to_owned(),
                })
                .collect(),
        }
    }

    #[test]
    fn table_maps_customers_to_known_tiers() {
        let tiers = tiers();
        let set = set(
            3,
            &[
                ("acme", "pro"),
                ("zeta", "platinum"),
                ("acme", "enterprise"),
            ],
        );
        let table = OverrideTable::build(&set, &tiers);
        assert_eq!(table.len(), 1);
        assert_eq!(table.tier_of("acme"), tiers.find("enterprise"));
        assert_eq!(table.tier_of("zeta"), None);
        assert_eq!(table.tier_of("other"), None);

        let unknown = unknown_tiers(&set, &tiers);
        assert_eq!(unknown.len(), 1);
        assert_eq!(unknown[0].customer, "zeta");
    }

    #[test]
    fn stored_set_round_trips() {
        let set = set(7, &[("acme", "pro")]);
        assert_eq!(decode_overrides(&set.encode_to_vec()), Some(set));
        assert_eq!(decode_overrides(&[0xff]), None);
    }

    #[test]
    fn warning_names_at_most_ten_overrides() {
        let entries: Vec<(String, String)> = (0..12)
            .map(|index| (format!("customer-{index}"), "platinum".to_owned()))
            .collect();
        let borrowed: Vec<(&str, &str)> = entries
            .iter()
            .map(|(customer, tier)| (customer.as_str(), tier.as_str()))
            .collect();
        let set = set(2, &borrowed);
        let line = describe_unknown(2, &unknown_tiers(&set, &tiers()));
        assert!(line.contains("customer-9=platinum"), "{line}");
        assert!(!line.contains("customer-10="), "{line}");
        assert!(line.contains("and 2 more"), "{line}");
    }
}
