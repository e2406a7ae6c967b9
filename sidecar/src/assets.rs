//! The asset region registry: which regions may request each region-locked
//! asset, per tier, and which region's storage holds it. Entries are set
//! over the admin API, kept in the store, and pushed to every filter
//! instance in the sync reply.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use veo_proto::admin;
use veo_proto::sync;

use crate::status::ServiceError;
use crate::validate::{self, MAX_ID_BYTES};

/// Table of the registry, created when missing.
pub const SCHEMA: &str = "
-- One row per registered asset. The region lists are JSON: an array of
-- region names, and an object from tier name to such an array.
CREATE TABLE IF NOT EXISTS asset_region (
    asset TEXT PRIMARY KEY NOT NULL,
    allowed_regions TEXT NOT NULL,
    tier_regions TEXT NOT NULL,
    storage_region TEXT NOT NULL,
    updated_unix_ms INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
";

/// Maximum length of a region name, in bytes.
const MAX_REGION_BYTES: usize = 64;
/// Most regions one list may name.
const MAX_REGIONS: usize = 64;
/// Most tiers with their own regions in one entry.
const MAX_TIER_RULES: usize = 32;
/// Most assets the registry holds; each one travels in every changed
/// registry push to every instance.
pub const MAX_ASSETS: usize = 100_000;
/// Most bytes of region and tier names in one entry, so that the entry
/// fits in its audit entry's details.
const MAX_ENTRY_NAME_BYTES: usize = 16_384;
/// Name of the region of clients whose region is unknown. The filter
/// reserves it, so an entry must not name it.
const UNKNOWN_REGION: &str = "unknown";

/// Checks a registry entry from the admin API: the asset id, region names
/// of letters, digits, `_` and `-` (such as `eu-west`) as the filter
/// accepts them, and tier names as `[tiers]` accepts them.
pub fn check(entry: &admin::AssetRegions) -> Result<(), ServiceError> {
    validate::identifier("asset.asset", &entry.asset, MAX_ID_BYTES)?;
    if entry.asset.contains('/') {
        return Err(ServiceError::invalid(
            "asset.asset",
            format!(
                "{:?} contains '/'; an asset id is one path segment",
                entry.asset
            ),
        ));
    }
    check_regions("asset.allowed_regions", &entry.allowed_regions)?;
    if entry.tier_regions.len() > MAX_TIER_RULES {
        return Err(ServiceError::invalid(
            "asset.tier_regions",
            format!(
                "names {} tiers, more than {MAX_TIER_RULES}",
                entry.tier_regions.len()
            ),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (index, rule) in entry.tier_regions.iter().enumerate() {
        let field = format!("asset.tier_regions[{index}]");
        if !crate::config::billing::is_tier_name(&rule.tier) {
            return Err(ServiceError::invalid(
                format!("{field}.tier"),
                format!(
                    "{:?} is not a tier name: use 1 to 32 ASCII letters, digits, '_' or '-'",
                    rule.tier
                ),
            ));
        }
        if !seen.insert(rule.tier.as_str()) {
            return Err(ServiceError::invalid(
                format!("{field}.tier"),
                format!("tier {:?} is listed twice; merge its regions", rule.tier),
            ));
        }
        check_regions(&format!("{field}.regions"), &rule.regions)?;
    }
    if !entry.storage_region.is_empty() {
        check_region("asset.storage_region", &entry.storage_region)?;
    }
    let name_bytes: usize = entry.allowed_regions.iter().map(String::len).sum::<usize>()
        + entry
            .tier_regions
            .iter()
            .map(|rule| rule.tier.len() + rule.regions.iter().map(String::len).sum::<usize>())
            .sum::<usize>();
    if name_bytes > MAX_ENTRY_NAME_BYTES {
        return Err(ServiceError::invalid(
            "asset",
            format!(
                "names {name_bytes} bytes of regions and tiers, more than \
                 {MAX_ENTRY_NAME_BYTES}; list fewer regions per tier"
            ),
        ));
    }
    Ok(())
}

/// Returns `entry` as the registry stores it: each region list sorted
/// without duplicates, and the tier rules in order of tier name.
pub fn normalized(entry: &admin::AssetRegions) -> admin::AssetRegions {
    let mut tier_regions: Vec<admin::TierRegions> = entry
        .tier_regions
        .iter()
        .map(|rule| admin::TierRegions {
            tier: rule.tier.clone(),
            regions: sorted(&rule.regions),
        })
        .collect();
    tier_regions.sort_by(|left, right| left.tier.cmp(&right.tier));
    admin::AssetRegions {
        asset: entry.asset.clone(),
        allowed_regions: sorted(&entry.allowed_regions),
        tier_regions,
        storage_region: entry.storage_region.clone(),
    }
}

fn check_regions(field: &str, regions: &[String]) -> Result<(), ServiceError> {
    if regions.len() > MAX_REGIONS {
        return Err(ServiceError::invalid(
            field,
            format!("names {} regions, more than {MAX_REGIONS}", regions.len()),
        ));
    }
    for (index, region) in regions.iter().enumerate() {
        check_region(&format!("{field}[{index}]"), region)?;
    }
    Ok(())
}

/// Checks one region name.
pub fn check_region(field: &str, region: &str) -> Result<(), ServiceError> {
    if region == UNKNOWN_REGION {
        return Err(ServiceError::invalid(
            field,
            format!(
                "{region:?} is reserved for clients whose region is unknown; name the region \
                 whose countries the filter maps, such as \"eu-west\""
            ),
        ));
    }
    let valid = !region.is_empty()
        && region.len() <= MAX_REGION_BYTES
        && region
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            field,
            format!(
                "{region:?} is not a region name: use 1 to {MAX_REGION_BYTES} letters, \
                 digits, '_' or '-', as in the filter's `geo.countries`, such as \"eu-west\""
            ),
        ))
    }
}

/// Outcome of storing an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The entry was stored.
    Stored,
    /// The registry is full and the asset is not in it.
    Full,
}

/// Stores `entry`, replacing the asset's previous one. Region lists are
/// sorted and deduplicated.
pub fn put(
    conn: &Connection,
    entry: &admin::AssetRegions,
    now_unix_ms: i64,
) -> rusqlite::Result<PutOutcome> {
    let exists = get(conn, &entry.asset)?.is_some();
    if !exists {
        let count: i64 =
            conn.query_row("SELECT COUNT(*) FROM asset_region", [], |row| row.get(0))?;
        if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_ASSETS {
            return Ok(PutOutcome::Full);
        }
    }
    let allowed = sorted(&entry.allowed_regions);
    let tiers: BTreeMap<&str, Vec<String>> = entry
        .tier_regions
        .iter()
        .map(|rule| (rule.tier.as_str(), sorted(&rule.regions)))
        .collect();
    conn.execute(
        "INSERT INTO asset_region
             (asset, allowed_regions, tier_regions, storage_region, updated_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (asset) DO UPDATE SET
             allowed_regions = excluded.allowed_regions,
             tier_regions = excluded.tier_regions,
             storage_region = excluded.storage_region,
             updated_unix_ms = excluded.updated_unix_ms",
        params![
            entry.asset,
            to_json(&allowed)?,
            to_json(&tiers)?,
            entry.storage_region,
            now_unix_ms
        ],
    )?;
    Ok(PutOutcome::Stored)
}

fn sorted(regions: &[String]) -> Vec<String> {
    let mut regions = regions.to_vec();
    regions.sort();
    regions.dedup();
    regions
}

fn to_json<T: serde::Serialize>(value: &T) -> rusqlite::Result<String> {
    serde_json::to_string(value).map_err(|err| rusqlite::Error::ToSqlConversionFailure(err.into()))
}

/// Returns the entry of `asset`, if registered.
pub fn get(conn: &Connection, asset: &str) -> rusqlite::Result<Option<admin::AssetRegions>> {
    conn.query_row(
        "SELECT asset, allowed_regions, tier_regions, storage_region
         FROM asset_region WHERE asset = ?1",
        [asset],
        from_row,
    )
    .optional()
}

/// Returns up to `limit` entries whose asset sorts after `after`, in
/// ascending order of asset.
pub fn list_page(
    conn: &Connection,
    after: &str,
    limit: u32,
) -> rusqlite::Result<Vec<admin::AssetRegions>> {
    let mut statement = conn.prepare_cached(
        "SELECT asset, allowed_regions, tier_regions, storage_region
         FROM asset_region WHERE asset > ?1 ORDER BY asset LIMIT ?2",
    )?;
    let rows = statement.query_map(params![after, limit], from_row)?;
    rows.collect()
}

/// Returns every entry in ascending order of asset.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<admin::AssetRegions>> {
    let mut statement = conn.prepare_cached(
        "SELECT asset, allowed_regions, tier_regions, storage_region
         FROM asset_region ORDER BY asset",
    )?;
    let rows = statement.query_map([], from_row)?;
    rows.collect()
}

/// Removes the entry of `asset`; false when there was none.
pub fn delete(conn: &Connection, asset: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM asset_region WHERE asset = ?1", [asset])? > 0)
}

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<admin::AssetRegions> {
    let json_error = |column: usize| {
        move |err: serde_json::Error| {
            rusqlite::Error::FromSqlConversionFailure(
                column,
                rusqlite::types::Type::Text,
                err.into(),
            )
        }
    };
    let allowed: String = row.get(1)?;
    let tiers: String = row.get(2)?;
    let allowed_regions: Vec<String> = serde_json::from_str(&allowed).map_err(json_error(1))?;
    let tiers: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&tiers).map_err(json_error(2))?;
    Ok(admin::AssetRegions {
        asset: row.get(0)?,
        allowed_regions,
        tier_regions: tiers
            .into_iter()
            .map(|(tier, regions)| admin::TierRegions { tier, regions })
            .collect(),
        storage_region: row.get(3)?,
    })
}

/// Converts registry entries to the form the sync reply carries.
pub fn to_sync(entries: Vec<admin::AssetRegions>) -> Vec<sync::AssetRegion> {
    entries
        .into_iter()
        .map(|entry| sync::AssetRegion {
            asset: entry.asset,
            allowed_regions: entry.allowed_regions,
            tier_regions: entry
                .tier_regions
                .into_iter()
                .map(|rule| sync::TierRegions {
                    tier: rule.tier,
                    regions: rule.regions,
                })
                .collect(),
            storage_region: entry.storage_region,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn
    }

    fn entry(asset: &str) -> admin::AssetRegions {
        admin::AssetRegions {
            asset: asset.into(),
            allowed_regions: vec!["us-east".into(), "eu-west".into(), "eu-west".into()],
            tier_regions: vec![admin::TierRegions {
                tier: "enterprise".into(),
                regions: vec!["ap-southeast".into()],
            }],
            storage_region: "eu-west".into(),
        }
    }

    #[test]
    fn stored_entry_reads_back_sorted() {
        let conn = open();

        assert_eq!(put(&conn, &entry("a1"), 1).unwrap(), PutOutcome::Stored);

        let read = get(&conn, "a1").unwrap().unwrap();
        assert_eq!(read.allowed_regions, ["eu-west", "us-east"]);
        assert_eq!(read.tier_regions[0].tier, "enterprise");
        assert_eq!(read.storage_region, "eu-west");
        assert_eq!(list(&conn).unwrap().len(), 1);
    }

    #[test]
    fn pages_follow_asset_order() {
        let conn = open();
        for asset in ["a3", "a1", "a2"] {
            put(&conn, &entry(asset), 1).unwrap();
        }
        let assets = |page: Vec<admin::AssetRegions>| -> Vec<String> {
            page.into_iter().map(|entry| entry.asset).collect()
        };

        assert_eq!(assets(list_page(&conn, "", 2).unwrap()), ["a1", "a2"]);
        assert_eq!(assets(list_page(&conn, "a2", 2).unwrap()), ["a3"]);
        assert!(list_page(&conn, "a3", 2).unwrap().is_empty());
    }

    #[test]
    fn put_replaces_and_delete_removes() {
        let conn = open();
        put(&conn, &entry("a1"), 1).unwrap();
        let mut changed = entry("a1");
        changed.allowed_regions = vec!["ap-southeast".into()];
        changed.tier_regions.clear();

        put(&conn, &changed, 2).unwrap();

        let read = get(&conn, "a1").unwrap().unwrap();
        assert_eq!(read.allowed_regions, ["ap-southeast"]);
        assert!(read.tier_regions.is_empty());
        assert!(delete(&conn, "a1").unwrap());
        assert!(!delete(&conn, "a1").unwrap());
        assert!(get(&conn, "a1").unwrap().is_none());
    }

    #[test]
    fn invalid_entries_name_the_field() {
        let field = |entry: admin::AssetRegions| match check(&entry).unwrap_err() {
            ServiceError::InvalidArgument { field, reason } => format!("{field}: {reason}"),
            other => panic!("unexpected {other}"),
        };
        let mut bad = entry("a/1");
        assert!(field(bad.clone()).starts_with("asset.asset"));
        bad = entry("a1");
        bad.allowed_regions = vec!["EU West".into()];
        assert!(field(bad.clone()).starts_with("asset.allowed_regions[0]"));
        bad = entry("a1");
        bad.tier_regions[0].tier = "gold plan".into();
        assert!(field(bad.clone()).starts_with("asset.tier_regions[0].tier"));
        bad = entry("a1");
        bad.tier_regions.push(bad.tier_regions[0].clone());
        assert!(field(bad.clone()).contains("listed twice"));
        bad = entry("a1");
        bad.storage_region = "-".repeat(65);
        assert!(field(bad.clone()).starts_with("asset.storage_region"));
        bad = entry("a1");
        bad.storage_region = "unknown".into();
        assert!(field(bad.clone()).contains("reserved"));
        bad = entry("a1");
        bad.allowed_regions = vec!["unknown".into()];
        assert!(field(bad).starts_with("asset.allowed_regions[0]"));
        assert!(check(&entry("a1")).is_ok());
    }

    #[test]
    fn oversized_entry_is_invalid() {
        let regions: Vec<String> = (0..64).map(|index| format!("{index:0>64}")).collect();
        let mut big = entry("a1");
        big.allowed_regions.clone_from(&regions);
        big.tier_regions = (0..4)
            .map(|index| admin::TierRegions {
                tier: format!("tier-{index}"),
                regions: regions.clone(),
            })
            .collect();

        let error = check(&big).unwrap_err().to_string();

        assert!(error.contains("20504 bytes"), "{error}");
        big.tier_regions.truncate(2);
        assert!(check(&big).is_ok());
    }

    #[test]
    fn normalized_entry_matches_stored_one() {
        let conn = open();
        let mut requested = entry("a1");
        requested.tier_regions.insert(
            0,
            admin::TierRegions {
                tier: "pro".into(),
                regions: vec!["us-east".into(), "eu-west".into(), "us-east".into()],
            },
        );

        put(&conn, &requested, 1).unwrap();

        assert_eq!(normalized(&requested), get(&conn, "a1").unwrap().unwrap());
    }

    #[test]
    fn conversion_keeps_every_field() {
        let converted = to_sync(vec![entry("a1")]);

        assert_eq!(converted[0].asset, "a1");
        assert_eq!(converted[0].tier_regions[0].regions, ["ap-southeast"]);
        assert_eq!(converted[0].storage_region, "eu-west");
    }
}
