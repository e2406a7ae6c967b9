//! Asset rules as the request path uses them: region ids instead of names,
//! tier indexes instead of tier names. The configuration's rules and the
//! registry the sidecar pushes are both an [`AssetTable`].

use std::collections::HashMap;
use std::rc::Rc;

use veo_proto::sync::{AssetRegion, AssetRegions};

use super::{Geo, RegionId, check_asset_id, check_region_name};
use crate::config::Tiers;

/// Regions a locked asset may be requested from, and its storage region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssetRule {
    /// Regions every tier may request the asset from.
    pub allowed: Vec<RegionId>,
    /// Extra regions per tier index.
    pub by_tier: Vec<(usize, Vec<RegionId>)>,
    /// Region sent upstream in the storage region header.
    pub storage_region: Option<Rc<str>>,
}

impl AssetRule {
    /// Returns whether a client in `region` may request the asset under
    /// the tier at index `tier`.
    pub fn admits(&self, region: RegionId, tier: usize) -> bool {
        self.allowed.contains(&region)
            || self
                .by_tier
                .iter()
                .any(|(index, regions)| *index == tier && regions.contains(&region))
    }
}

/// Rules by asset id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssetTable {
    by_asset: HashMap<String, Rc<AssetRule>>,
}

impl AssetTable {
    /// Returns the rule of `asset`.
    pub fn get(&self, asset: &str) -> Option<&Rc<AssetRule>> {
        // An empty registry is the usual case; skip hashing the id.
        if self.by_asset.is_empty() {
            return None;
        }
        self.by_asset.get(asset)
    }

    /// Adds or replaces the rule of `asset`.
    pub fn insert(&mut self, asset: String, rule: AssetRule) {
        self.by_asset.insert(asset, Rc::new(rule));
    }

    /// Returns the number of assets with a rule.
    pub fn len(&self) -> usize {
        self.by_asset.len()
    }

    /// Returns whether no asset has a rule.
    pub fn is_empty(&self) -> bool {
        self.by_asset.is_empty()
    }

    /// Builds the table of a registry the sidecar pushed, and describes
    /// what it ignores. An entry with an invalid asset id is skipped. A
    /// region that no configured country maps to, a tier the configuration
    /// does not define, and an invalid storage region are left out of their
    /// entry, so the entry admits fewer regions, never more. When the set
    /// names an asset twice, the later entry applies.
    pub fn from_registry(set: &AssetRegions, geo: &Geo, tiers: &Tiers) -> (Self, Vec<String>) {
        let mut table = Self::default();
        let mut problems = Vec::new();
        for entry in &set.assets {
            if let Err(problem) = check_asset_id(&entry.asset) {
                problems.push(format!("asset {:?}: {problem}", entry.asset));
                continue;
            }
            let rule = registry_rule(entry, geo, tiers, &mut problems);
            table.insert(entry.asset.clone(), rule);
        }
        (table, problems)
    }
}

fn registry_rule(
    entry: &AssetRegion,
    geo: &Geo,
    tiers: &Tiers,
    problems: &mut Vec<String>,
) -> AssetRule {
    let asset = entry.asset.escape_debug().to_string();
    let allowed = registry_regions(&asset, &entry.allowed_regions, geo, problems);
    let mut by_tier = Vec::new();
    for tier_regions in &entry.tier_regions {
        let regions = registry_regions(&asset, &tier_regions.regions, geo, problems);
        match tiers.find(&tier_regions.tier) {
            Some(index) => by_tier.push((index, regions)),
            None => problems.push(format!(
                "asset {asset}: tier {:?} is not a configured tier",
                tier_regions.tier
            )),
        }
    }
    let storage_region = match entry.storage_region.as_str() {
        "" => None,
        name => match check_region_name(name) {
            Ok(()) => Some(Rc::from(name)),
            Err(problem) => {
                problems.push(format!("asset {asset}: storage region {name:?}: {problem}"));
                None
            }
        },
    };
    AssetRule {
        allowed,
        by_tier,
        storage_region,
    }
}

/// Returns the ids of the regions in `names` that countries map to, and
/// notes the others in `problems`.
fn registry_regions(
    asset: &str,
    names: &[String],
    geo: &Geo,
    problems: &mut Vec<String>,
) -> Vec<RegionId> {
    let mut ids = Vec::with_capacity(names.len());
    for name in names {
        match geo.region_id(name) {
            Some(id) => ids.push(id),
            None => problems.push(format!(
                "asset {asset}: region {name:?} is not a region of geo.countries"
            )),
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::TierRegions;

    use super::*;
    use crate::testing::config;

    fn entry(asset: &str, allowed: &[&str], storage: &str) -> AssetRegion {
        AssetRegion {
            asset: asset.to_owned(),
            allowed_regions: allowed.iter().map(|name| (*name).to_owned()).collect(),
            tier_regions: Vec::new(),
            storage_region: storage.to_owned(),
        }
    }

    #[test]
    fn registry_keeps_known_regions_and_tiers_only() {
        let config = config(serde_json::json!({"geo": {
            "countries": {"DE": "eu-west", "US": "us-east"},
            "asset_patterns": ["/videos/{asset}/"]
        }}));
        let geo = config.geo.as_ref().unwrap();
        let mut locked = entry("a1", &["eu-west", "mars"], "eu west");
        locked.tier_regions = vec![
            TierRegions {
                tier: "pro".to_owned(),
                regions: vec!["us-east".to_owned()],
            },
            TierRegions {
                tier: "platinum".to_owned(),
                regions: vec!["us-east".to_owned()],
            },
        ];
        let set = AssetRegions {
            version: 3,
            assets: vec![locked, entry("a/b", &["eu-west"], ""), entry("a2", &[], "")],
        };
        let (table, problems) = AssetTable::from_registry(&set, geo, &config.tiers);

        assert_eq!(table.len(), 2);
        let rule = table.get("a1").unwrap();
        let eu = geo.region_id("eu-west").unwrap();
        let us = geo.region_id("us-east").unwrap();
        let pro = config.tiers.find("pro").unwrap();
        let basic = config.tiers.find("basic").unwrap();
        assert_eq!(rule.allowed, [eu]);
        assert!(rule.admits(us, pro));
        assert!(!rule.admits(us, basic));
        assert_eq!(rule.storage_region, None);
        assert!(!table.get("a2").unwrap().admits(eu, basic));
        assert_eq!(problems.len(), 4, "{problems:?}");
        for expected in ["mars", "platinum", "eu west", "a/b"] {
            assert!(
                problems.iter().any(|problem| problem.contains(expected)),
                "{expected} missing from {problems:?}"
            );
        }
    }
}
