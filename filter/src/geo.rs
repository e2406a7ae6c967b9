//! Geo-fencing of region-locked assets. The client's region comes from a
//! country header that only Envoy or a trusted CDN can set. An asset named
//! in the request path is admitted only from the regions its rule lists,
//! and the request of an admitted asset carries the asset's storage region
//! upstream. Everything here decides without a host call: the filter reads
//! the headers and the attribute it needs and passes them in.

pub mod pattern;
pub mod rule;
pub mod source;

use std::borrow::Cow;
use std::collections::HashMap;
use std::rc::Rc;

pub use pattern::AssetPattern;
pub use rule::{AssetRule, AssetTable};
pub use source::{CdnSource, ClientRegion};

/// Index of a client region in [`Geo::regions`].
pub type RegionId = u16;

/// Name of the unknown region in metric tags and log lines; no configured
/// region may take it.
pub const UNKNOWN_REGION: &str = "unknown";

/// Maximum length of a region name, in bytes.
pub const MAX_REGION_NAME_BYTES: usize = 64;

/// Maximum length of an asset id, in bytes.
pub const MAX_ASSET_BYTES: usize = 256;

/// Policy for a request of a locked asset whose client region is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownPolicy {
    /// Reject with 451 (config value `"refuse"`).
    #[default]
    Refuse,
    /// Admit as if the region were allowed (config value `"allow"`).
    Allow,
}

/// Policy for a request for an asset before the asset region registry
/// first arrives from the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BeforeRegistry {
    /// Reject with 503 and `retry-after: 1` (config value `"refuse"`),
    /// because the registry may lock the asset.
    #[default]
    Refuse,
    /// Decide by the configured rules alone (config value
    /// `"configured_rules"`).
    ConfiguredRules,
}

/// Reason of a 451 rejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The client's region is known but not allowed for the asset.
    RegionNotAllowed,
    /// The client's region is unknown and the policy rejects it.
    RegionUnknown,
}

impl Rejection {
    /// Returns the `reason` value of the 451 body.
    pub fn reason(self) -> &'static str {
        match self {
            Self::RegionNotAllowed => "region_not_allowed",
            Self::RegionUnknown => "region_unknown",
        }
    }
}

/// The validated `geo` section of the plugin configuration.
#[derive(Debug)]
pub struct Geo {
    /// Lowercase name of the header Envoy's geoip filter sets.
    pub geoip_header: String,
    /// The CDN's country header and the ranges it is trusted from.
    pub cdn: Option<CdnSource>,
    /// Policy for an unknown client region.
    pub unknown_policy: UnknownPolicy,
    /// Policy for a request for an asset before the first registry.
    pub before_registry: BeforeRegistry,
    /// Lowercase name of the header that carries the storage region.
    pub storage_region_header: String,
    /// Region names in name order; a [`RegionId`] indexes this.
    pub(crate) regions: Vec<String>,
    /// Uppercase country code to region.
    pub(crate) countries: HashMap<[u8; 2], RegionId>,
    /// Path patterns in configuration order.
    pub(crate) patterns: Vec<AssetPattern>,
    /// Rules of the configuration.
    pub(crate) assets: AssetTable,
}

impl Geo {
    /// Returns the region names that countries map to, in name order.
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// Returns the id of region `name`, `None` when no country maps to it.
    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        let index = self.regions.iter().position(|region| region == name)?;
        RegionId::try_from(index).ok()
    }

    /// Returns the name of `region`, [`UNKNOWN_REGION`] when unknown.
    pub fn region_name(&self, region: ClientRegion) -> &str {
        match region {
            ClientRegion::Known(id) => self
                .regions
                .get(usize::from(id))
                .map_or(UNKNOWN_REGION, String::as_str),
            ClientRegion::Unknown => UNKNOWN_REGION,
        }
    }

    /// Returns the region of a country header value: known when it is a
    /// country code that `countries` maps, else unknown.
    pub fn region_of_country(&self, value: &[u8]) -> ClientRegion {
        source::country_code(value)
            .and_then(|code| self.countries.get(&code).copied())
            .map_or(ClientRegion::Unknown, ClientRegion::Known)
    }

    /// Returns the asset id in `path`, by the first pattern that matches.
    /// The query string is ignored and a percent-encoded id is decoded.
    pub fn asset_in<'p>(&self, path: &'p [u8]) -> Option<Cow<'p, str>> {
        let path = pattern::without_query(path);
        let segment = self
            .patterns
            .iter()
            .find_map(|pattern| pattern.segment(path))?;
        pattern::decode_asset(segment)
    }

    /// Returns the rule of `asset`: the registry's entry when it has one,
    /// else the configured rule. `None` means the asset is not locked.
    pub fn rule<'a>(&'a self, registry: &'a AssetTable, asset: &str) -> Option<&'a Rc<AssetRule>> {
        registry.get(asset).or_else(|| self.assets.get(asset))
    }

    /// Decides a request of a locked asset under `rule` from a client in
    /// `region`, decided under the tier at index `tier`.
    pub fn decide(
        &self,
        rule: &AssetRule,
        region: ClientRegion,
        tier: usize,
    ) -> Result<(), Rejection> {
        match region {
            ClientRegion::Known(id) if rule.admits(id, tier) => Ok(()),
            ClientRegion::Known(_) => Err(Rejection::RegionNotAllowed),
            ClientRegion::Unknown => match self.unknown_policy {
                UnknownPolicy::Allow => Ok(()),
                UnknownPolicy::Refuse => Err(Rejection::RegionUnknown),
            },
        }
    }
}

/// Checks a region name: 1 to 64 ASCII letters, digits, `-` or `_`, and
/// not [`UNKNOWN_REGION`]. The name becomes a header value and a metric
/// tag, so it must contain no `.`.
pub fn check_region_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("name a region, such as \"eu-west\"");
    }
    if name.len() > MAX_REGION_NAME_BYTES {
        return Err("region names are at most 64 bytes");
    }
    let valid = name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
    if !valid {
        return Err("region names contain only ASCII letters, digits, `-` and `_`");
    }
    if name == UNKNOWN_REGION {
        return Err("\"unknown\" is the tag of requests without a known region; pick another name");
    }
    Ok(())
}

/// Checks an asset id: 1 to 256 bytes, without `/` or control characters,
/// since it is matched against one path segment.
pub fn check_asset_id(asset: &str) -> Result<(), &'static str> {
    if asset.is_empty() || asset.len() > MAX_ASSET_BYTES {
        return Err("asset ids are 1 to 256 bytes");
    }
    if asset.contains('/') || asset.chars().any(char::is_control) {
        return Err("an asset id is one path segment: no `/` and no control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_names_are_checked() {
        assert_eq!(check_region_name("eu-west"), Ok(()));
        assert_eq!(check_region_name("ap_south_1"), Ok(()));
        for bad in ["", "eu.west", "eu west", "unknown", &"r".repeat(65)] {
            assert!(check_region_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn asset_ids_are_checked() {
        assert_eq!(check_asset_id("a1"), Ok(()));
        for bad in ["", "a/b", "a\nb", &"a".repeat(257)] {
            assert!(check_asset_id(bad).is_err(), "{bad:?}");
        }
    }
}
