//! Validation of the `geo` section into a [`Geo`]: header names, the
//! country map, trusted CDN ranges, path patterns and the asset rules.

use std::collections::{BTreeSet, HashMap};
use std::rc::Rc;

use ipnet::IpNet;

use super::raw::{RawAssetRule, RawGeo};
use super::{ConfigError, Tiers, is_header_name};
use crate::filter::{CUSTOMER_HEADER, TIER_HEADER};
use crate::geo::source::NO_COUNTRY_CODES;
use crate::geo::{
    AssetPattern, AssetRule, AssetTable, BeforeRegistry, CdnSource, Geo, RegionId, UnknownPolicy,
    check_asset_id, check_region_name,
};

/// Default header of Envoy's geoip filter.
pub const DEFAULT_GEOIP_HEADER: &str = "x-geoip-country";
/// Default header of the storage region.
pub const DEFAULT_STORAGE_REGION_HEADER: &str = "x-veo-storage-region";

/// Builds the geo-fencing settings; `tiers` are the configured tiers that
/// `tier_regions` may name.
pub fn build_geo(raw: RawGeo, tiers: &Tiers) -> Result<Geo, ConfigError> {
    let geoip_header = header_name("geo.geoip_header", raw.geoip_header, DEFAULT_GEOIP_HEADER)?;
    let storage_region_header = header_name(
        "geo.storage_region_header",
        raw.storage_region_header,
        DEFAULT_STORAGE_REGION_HEADER,
    )?;
    let cdn = build_cdn(raw.cdn_country_header, raw.cdn_trusted_ranges)?;
    check_distinct_headers(&geoip_header, cdn.as_ref(), &storage_region_header)?;

    let (regions, countries) = build_countries(raw.countries.unwrap_or_default())?;
    let unknown_policy = match raw.unknown_country.as_deref() {
        None | Some("refuse") => UnknownPolicy::Refuse,
        Some("allow") => UnknownPolicy::Allow,
        Some(other) => {
            return Err(ConfigError::invalid(
                "geo.unknown_country",
                other,
                "must be \"refuse\" or \"allow\"",
            ));
        }
    };
    let before_registry = match raw.before_registry.as_deref() {
        None | Some("refuse") => BeforeRegistry::Refuse,
        Some("configured_rules") => BeforeRegistry::ConfiguredRules,
        Some(other) => {
            return Err(ConfigError::invalid(
                "geo.before_registry",
                other,
                "must be \"refuse\" or \"configured_rules\"",
            ));
        }
    };
    let patterns = build_patterns(raw.asset_patterns)?;

    let mut geo = Geo {
        geoip_header,
        cdn,
        unknown_policy,
        before_registry,
        storage_region_header,
        regions,
        countries,
        patterns,
        assets: AssetTable::default(),
    };
    geo.assets = build_assets(raw.assets.unwrap_or_default(), &geo, tiers)?;
    Ok(geo)
}

fn header_name(field: &str, value: Option<String>, default: &str) -> Result<String, ConfigError> {
    let name = value.unwrap_or_else(|| default.to_owned());
    if !is_header_name(&name) {
        return Err(ConfigError::invalid(
            field,
            &name,
            "not an HTTP header name (pseudo-headers such as `:authority` are not allowed)",
        ));
    }
    Ok(name.to_ascii_lowercase())
}

fn build_cdn(
    header: Option<String>,
    ranges: Option<Vec<String>>,
) -> Result<Option<CdnSource>, ConfigError> {
    let Some(header) = header else {
        if ranges.is_some_and(|ranges| !ranges.is_empty()) {
            return Err(ConfigError::invalid(
                "geo.cdn_trusted_ranges",
                "(set)",
                "set `geo.cdn_country_header` too, or remove the ranges",
            ));
        }
        return Ok(None);
    };
    let header = header_name("geo.cdn_country_header", Some(header), "")?;
    let mut trusted = Vec::new();
    for (index, text) in ranges.unwrap_or_default().into_iter().enumerate() {
        let field = format!("geo.cdn_trusted_ranges[{index}]");
        let range: IpNet = text.trim().parse().map_err(|_| {
            ConfigError::invalid(
                field.clone(),
                &text,
                "not a CIDR range; write it as 173.245.48.0/20 or 2400:cb00::/32",
            )
        })?;
        if range != range.trunc() {
            return Err(ConfigError::invalid(
                field,
                &text,
                &format!(
                    "has bits set after the prefix length; write the network address {}",
                    range.trunc()
                ),
            ));
        }
        if range.prefix_len() == 0 {
            return Err(ConfigError::invalid(
                field,
                &text,
                "trusts every address, so any client could set its own country; list the \
                 CDN's ranges",
            ));
        }
        if let IpNet::V6(v6) = range
            && v6.addr().to_ipv4_mapped().is_some()
        {
            return Err(ConfigError::invalid(
                field,
                &text,
                "is an IPv4-mapped IPv6 range, which never matches because the filter compares \
                 IPv4 clients as IPv4; write the IPv4 range",
            ));
        }
        trusted.push(range);
    }
    Ok(Some(CdnSource { header, trusted }))
}

fn check_distinct_headers(
    geoip: &str,
    cdn: Option<&CdnSource>,
    storage: &str,
) -> Result<(), ConfigError> {
    let mut headers = vec![
        ("geo.geoip_header", geoip),
        ("geo.storage_region_header", storage),
    ];
    if let Some(cdn) = cdn {
        headers.push(("geo.cdn_country_header", cdn.header.as_str()));
    }
    for (index, (field, name)) in headers.iter().enumerate() {
        if ["authorization", CUSTOMER_HEADER, TIER_HEADER].contains(name) {
            return Err(ConfigError::invalid(
                *field,
                name,
                "is a header the filter reads or sets for another purpose; pick another name",
            ));
        }
        if headers.iter().take(index).any(|(_, other)| other == name) {
            return Err(ConfigError::invalid(
                *field,
                name,
                "the geoip, CDN and storage region headers must differ",
            ));
        }
    }
    Ok(())
}

/// Uppercase country code to region id.
type CountryMap = HashMap<[u8; 2], RegionId>;

/// Returns the region names in name order and the country map.
fn build_countries(
    raw: std::collections::BTreeMap<String, String>,
) -> Result<(Vec<String>, CountryMap), ConfigError> {
    for (code, region) in &raw {
        let field = format!("geo.countries.{code}");
        if let Err(problem) = check_region_name(region) {
            return Err(ConfigError::invalid(field, &format!("{region:?}"), problem));
        }
    }
    let regions: Vec<String> = raw
        .values()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if regions.len() > usize::from(RegionId::MAX) {
        return Err(ConfigError::invalid(
            "geo.countries",
            &regions.len().to_string(),
            "too many distinct regions",
        ));
    }

    let mut countries = HashMap::with_capacity(raw.len());
    for (code, region) in &raw {
        let field = format!("geo.countries.{code}");
        let upper = code.to_ascii_uppercase();
        let &[first, second] = upper.as_bytes() else {
            return Err(ConfigError::invalid(
                field,
                code,
                "not an ISO 3166-1 alpha-2 country code such as \"DE\"",
            ));
        };
        let key = [first, second];
        if !key.iter().all(u8::is_ascii_uppercase) || NO_COUNTRY_CODES.contains(&key) {
            return Err(ConfigError::invalid(
                field,
                code,
                "not an ISO 3166-1 alpha-2 country code such as \"DE\"; XX, T1, A1 and A2 \
                 always count as unknown, see `geo.unknown_country`",
            ));
        }
        let id = regions
            .iter()
            .position(|name| name == region)
            .and_then(|index| RegionId::try_from(index).ok())
            .unwrap_or_default();
        if countries.insert(key, id).is_some() {
            return Err(ConfigError::invalid(
                field,
                code,
                "the country is listed twice; codes are compared case-insensitively",
            ));
        }
    }
    Ok((regions, countries))
}

fn build_patterns(raw: Vec<String>) -> Result<Vec<AssetPattern>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            "geo.asset_patterns",
            "[]",
            "list at least one pattern such as \"/videos/{asset}/\"",
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(index, text)| {
            AssetPattern::parse(text).map_err(|problem| {
                ConfigError::invalid(format!("geo.asset_patterns[{index}]"), text, problem)
            })
        })
        .collect()
}

fn build_assets(
    raw: Vec<RawAssetRule>,
    geo: &Geo,
    tiers: &Tiers,
) -> Result<AssetTable, ConfigError> {
    let mut table = AssetTable::default();
    for (index, entry) in raw.into_iter().enumerate() {
        let field = format!("geo.assets[{index}]");
        if let Err(problem) = check_asset_id(&entry.asset) {
            return Err(ConfigError::invalid(
                format!("{field}.asset"),
                &format!("{:?}", entry.asset),
                problem,
            ));
        }
        if table.get(&entry.asset).is_some() {
            return Err(ConfigError::invalid(
                format!("{field}.asset"),
                &entry.asset,
                "the asset has a rule already; merge the two",
            ));
        }
        let allowed = region_ids(
            &format!("{field}.allowed_regions"),
            &entry.allowed_regions,
            geo,
        )?;
        let mut by_tier = Vec::new();
        for (tier, regions) in entry.tier_regions.unwrap_or_default() {
            let tier_field = format!("{field}.tier_regions.{tier}");
            let Some(tier_index) = tiers.find(&tier) else {
                return Err(ConfigError::invalid(
                    tier_field,
                    &tier,
                    "not a configured tier; add it to `tiers` or fix the name",
                ));
            };
            by_tier.push((tier_index, region_ids(&tier_field, &regions, geo)?));
        }
        let storage_region = match entry.storage_region {
            Some(name) => {
                if let Err(problem) = check_region_name(&name) {
                    return Err(ConfigError::invalid(
                        format!("{field}.storage_region"),
                        &format!("{name:?}"),
                        problem,
                    ));
                }
                Some(Rc::from(name))
            }
            None => None,
        };
        let rule = AssetRule {
            allowed,
            by_tier,
            storage_region,
        };
        table.insert(entry.asset, rule);
    }
    Ok(table)
}

fn region_ids(field: &str, names: &[String], geo: &Geo) -> Result<Vec<RegionId>, ConfigError> {
    names
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let field = format!("{field}[{index}]");
            check_region_name(name).map_err(|problem| {
                ConfigError::invalid(field.clone(), &format!("{name:?}"), problem)
            })?;
            geo.region_id(name).ok_or_else(|| {
                ConfigError::invalid(
                    field,
                    name,
                    "no country in `geo.countries` maps to this region, so no client could \
                     match it; map a country to it or fix the name",
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::config::Config;
    use crate::geo::ClientRegion;
    use crate::testing::{config, config_json, geo_json};

    fn error_with(key: &str, value: Value) -> String {
        let mut geo = geo_json();
        geo[key] = value;
        let raw = config_json(json!({"geo": geo}));
        Config::from_bytes(raw.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn geo_section_is_read() {
        let config = config(json!({"geo": geo_json()}));
        let geo = config.geo.unwrap();
        assert_eq!(geo.geoip_header, "x-geoip-country");
        assert_eq!(geo.storage_region_header, "x-veo-storage-region");
        assert_eq!(geo.unknown_policy, UnknownPolicy::Refuse);
        assert_eq!(geo.regions(), ["ap-southeast", "eu-west", "us-east"]);
        assert_eq!(
            geo.region_of_country(b"fr"),
            ClientRegion::Known(geo.region_id("eu-west").unwrap())
        );
        let cdn = geo.cdn.as_ref().unwrap();
        assert_eq!(cdn.header, "cf-ipcountry");
        assert_eq!(cdn.trusted.len(), 2);
        assert_eq!(geo.assets.len(), 2);
        assert_eq!(
            geo.assets.get("a1").unwrap().storage_region.as_deref(),
            Some("eu-west")
        );
    }

    #[test]
    fn absent_geo_section_turns_it_off() {
        assert!(config(json!({})).geo.is_none());
    }

    #[test]
    fn minimal_geo_section_gets_defaults() {
        let config = config(json!({"geo": {"asset_patterns": ["/v/{asset}"]}}));
        let geo = config.geo.unwrap();
        assert_eq!(geo.geoip_header, DEFAULT_GEOIP_HEADER);
        assert_eq!(geo.storage_region_header, DEFAULT_STORAGE_REGION_HEADER);
        assert!(geo.cdn.is_none());
        assert!(geo.regions().is_empty());
    }

    #[test]
    fn geo_errors_name_field_and_value() {
        let cases = [
            (
                "cdn_trusted_ranges",
                json!(["173.245.48.0/20", "173.245.48/20"]),
                "`geo.cdn_trusted_ranges[1]` = 173.245.48/20",
            ),
            (
                "cdn_trusted_ranges",
                json!(["2400:cb00::/129"]),
                "`geo.cdn_trusted_ranges[0]` = 2400:cb00::/129",
            ),
            (
                "cdn_trusted_ranges",
                json!(["173.245.48.1/20"]),
                "network address 173.245.48.0/20",
            ),
            (
                "cdn_trusted_ranges",
                json!(["0.0.0.0/0"]),
                "`geo.cdn_trusted_ranges[0]` = 0.0.0.0/0: trusts every address",
            ),
            (
                "cdn_trusted_ranges",
                json!(["::ffff:127.0.0.2/128"]),
                "IPv4-mapped",
            ),
            (
                "unknown_country",
                json!("deny"),
                "`geo.unknown_country` = deny: must be \"refuse\" or \"allow\"",
            ),
            (
                "before_registry",
                json!("wait"),
                "`geo.before_registry` = wait: must be \"refuse\" or \"configured_rules\"",
            ),
            (
                "asset_patterns",
                json!(["/videos/{id}/"]),
                "`geo.asset_patterns[0]` = /videos/{id}/",
            ),
            ("asset_patterns", json!([]), "`geo.asset_patterns` = []"),
            (
                "countries",
                json!({"DE": ""}),
                "`geo.countries.DE` = \"\": name a region",
            ),
            (
                "countries",
                json!({"DEU": "eu-west"}),
                "`geo.countries.DEU` = DEU",
            ),
            (
                "countries",
                json!({"XX": "eu-west"}),
                "`geo.countries.XX` = XX",
            ),
            (
                "countries",
                json!({"de": "eu-west", "DE": "eu-west"}),
                "listed twice",
            ),
            (
                "assets",
                json!([{"asset": "a1", "allowed_regions": [""]}]),
                "`geo.assets[0].allowed_regions[0]` = \"\"",
            ),
            (
                "assets",
                json!([{"asset": "a1", "allowed_regions": ["mars"]}]),
                "`geo.assets[0].allowed_regions[0]` = mars",
            ),
            (
                "assets",
                json!([{"asset": "a1", "allowed_regions": [], "tier_regions": {"gold": []}}]),
                "`geo.assets[0].tier_regions.gold` = gold",
            ),
            (
                "assets",
                json!([{"asset": "a1", "allowed_regions": [], "storage_region": ""}]),
                "`geo.assets[0].storage_region` = \"\"",
            ),
            (
                "assets",
                json!([{"asset": "", "allowed_regions": []}]),
                "`geo.assets[0].asset` = \"\"",
            ),
            (
                "assets",
                json!([
                    {"asset": "a1", "allowed_regions": []},
                    {"asset": "a1", "allowed_regions": []}
                ]),
                "`geo.assets[1].asset` = a1",
            ),
            (
                "storage_region_header",
                json!("x-veo-tier"),
                "`geo.storage_region_header` = x-veo-tier",
            ),
            (
                "cdn_country_header",
                json!("X-GeoIP-Country"),
                "`geo.cdn_country_header` = x-geoip-country",
            ),
            (
                "geoip_header",
                json!(":authority"),
                "`geo.geoip_header` = :authority",
            ),
        ];
        for (key, value, expected) in cases {
            let error = error_with(key, value);
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
    }

    #[test]
    fn ranges_need_a_cdn_header() {
        let mut geo = geo_json();
        geo.as_object_mut().unwrap().remove("cdn_country_header");
        let raw = config_json(json!({"geo": geo}));
        let error = Config::from_bytes(raw.to_string().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.contains("`geo.cdn_trusted_ranges`"), "{error}");
    }

    #[test]
    fn unknown_geo_keys_are_rejected() {
        let error = error_with("countrys", json!({}));
        assert!(error.contains("unknown field `countrys`"), "{error}");
        let error = error_with(
            "assets",
            json!([{"asset": "a1", "allowed_regions": [], "regions": []}]),
        );
        assert!(error.contains("geo.assets[0]"), "{error}");
        assert!(error.contains("unknown field `regions`"), "{error}");
    }
}
