//! Plugin configuration: parsed from the JSON in Envoy's `configuration`
//! field, validated once, and kept as an immutable [`Config`].

pub mod geo;
pub mod raw;
pub mod tier;

use std::collections::HashSet;
use std::time::Duration;

use raw::{RawConfig, RawJwt, RawSidecar};
pub use tier::{Burst, Quota, Tier, Tiers};

use crate::filter::{CUSTOMER_HEADER, TIER_HEADER};
use crate::geo::Geo;
use crate::jwt::Verifier;
use crate::jwt::keys::VerifyingKey;

/// Default clock skew tolerated on time claims, in seconds.
const DEFAULT_LEEWAY_SECONDS: u64 = 60;
/// Default largest token, in bytes.
const DEFAULT_MAX_TOKEN_BYTES: usize = 4096;
/// Default number of customer slots.
const DEFAULT_MAX_CUSTOMERS: u32 = 10_000;
/// Default number of token-cache slots.
const DEFAULT_TOKEN_CACHE_ENTRIES: u32 = 10_000;
/// Largest slot table of either kind.
const MAX_TABLE_SLOTS: u32 = 1_000_000;

/// An invalid plugin configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration bytes are not UTF-8.
    #[error("plugin configuration is not UTF-8; write it as a JSON string")]
    NotUtf8,
    /// The JSON does not parse or does not match the schema.
    #[error("invalid plugin configuration JSON{}: {message}", at_field(path))]
    Json {
        /// Dotted path of the field that failed, such as
        /// `tiers.basic.quota.requests`; empty for a syntax error.
        path: String,
        /// The parser's message, naming the value and the expected type.
        message: String,
    },
    /// A field has a value outside its allowed range.
    #[error("invalid `{field}` = {value}: {problem}")]
    Invalid {
        /// Dotted path of the field, such as `tiers.basic.quota.requests`.
        field: String,
        /// The rejected value as written.
        value: String,
        /// The problem and the accepted values.
        problem: String,
    },
}

impl ConfigError {
    /// Builds an [`ConfigError::Invalid`].
    pub fn invalid(field: impl Into<String>, value: &str, problem: &str) -> Self {
        Self::Invalid {
            field: field.into(),
            value: value.to_owned(),
            problem: problem.to_owned(),
        }
    }
}

/// Formats the field part of [`ConfigError::Json`].
fn at_field(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at `{path}`")
    }
}

/// Connection settings of the sync role to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarSettings {
    /// Envoy cluster name.
    pub cluster: String,
    /// Time between usage batches.
    pub sync_interval: Duration,
    /// Deadline of one sync call.
    pub timeout: Duration,
    /// Usage records (customer, tier and minute) held for the sidecar
    /// before the records of earlier hours and days are merged.
    pub max_backlog_records: usize,
}

/// The validated plugin configuration.
#[derive(Debug)]
pub struct Config {
    /// Token verification.
    pub verifier: Verifier,
    /// Tier table.
    pub tiers: Tiers,
    /// Customer slots in the shared limiter table.
    pub max_customers: u32,
    /// Share of a quota this instance admits for a customer while it has
    /// no sync reply about that customer from the last window, above 0 and
    /// at most 1.
    pub quota_share_before_sync: f64,
    /// Slots in the shared verified-token cache.
    pub token_cache_entries: u32,
    /// Lowercase names of client headers removed before the request goes
    /// upstream, besides `x-veo-customer` and `x-veo-tier`.
    pub forged_headers: Vec<String>,
    /// Sidecar connection.
    pub sidecar: SidecarSettings,
    /// Geo-fencing; `None` turns it off.
    pub geo: Option<Geo>,
}

impl Config {
    /// Parses and validates the plugin configuration.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8)?;
        // serde would also read a struct from a JSON array, by position.
        if !text.trim_start().starts_with('{') {
            return Err(ConfigError::Json {
                path: String::new(),
                message: "the configuration must be a JSON object with at least \
                          `{\"jwt\": {\"jwks\": {\"keys\": [...]}}}`"
                    .to_owned(),
            });
        }
        // serde_json alone names only the line and column, which help
        // little with a one-line JSON string in YAML, so add the key's path.
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let raw: RawConfig =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
                let path = error.path().to_string();
                ConfigError::Json {
                    path: if path == "." { String::new() } else { path },
                    message: error.into_inner().to_string(),
                }
            })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        let verifier = build_verifier(&raw.jwt)?;
        let raw_tiers = raw.tiers.unwrap_or_else(tier::default_raw_tiers);
        let default_tier = raw.default_tier.as_deref().unwrap_or("basic");
        let tiers = tier::build_tiers(&raw_tiers, default_tier)?;
        let max_customers = table_slots("max_customers", raw.max_customers, DEFAULT_MAX_CUSTOMERS)?;
        let quota_share_before_sync = raw.quota_share_before_sync.unwrap_or(1.0);
        if !(quota_share_before_sync > 0.0 && quota_share_before_sync <= 1.0) {
            return Err(ConfigError::invalid(
                "quota_share_before_sync",
                &quota_share_before_sync.to_string(),
                "must be above 0 and at most 1; with N instances sharing quotas, 1/N",
            ));
        }
        let token_cache_entries = table_slots(
            "token_cache_entries",
            raw.token_cache_entries,
            DEFAULT_TOKEN_CACHE_ENTRIES,
        )?;
        let forged_headers = build_forged_headers(raw.forged_headers.unwrap_or_default())?;
        let sidecar = build_sidecar(raw.sidecar)?;
        let geo = raw.geo.map(|raw| geo::build_geo(raw, &tiers)).transpose()?;
        Ok(Self {
            verifier,
            tiers,
            max_customers,
            quota_share_before_sync,
            token_cache_entries,
            forged_headers,
            sidecar,
            geo,
        })
    }
}

fn build_verifier(raw: &RawJwt) -> Result<Verifier, ConfigError> {
    if raw.jwks.keys.is_empty() {
        return Err(ConfigError::invalid(
            "jwt.jwks.keys",
            "[]",
            "add at least one public key",
        ));
    }
    let mut keys: Vec<(Option<String>, VerifyingKey)> = Vec::with_capacity(raw.jwks.keys.len());
    for (index, jwk) in raw.jwks.keys.iter().enumerate() {
        let field = format!("jwt.jwks.keys[{index}]");
        let key = VerifyingKey::from_jwk(jwk, &field)?;
        if jwk.kid.is_none() && raw.jwks.keys.len() > 1 {
            return Err(ConfigError::invalid(
                format!("{field}.kid"),
                "(missing)",
                "every key needs a `kid` when the set holds more than one key",
            ));
        }
        if let Some(kid) = &jwk.kid
            && keys.iter().any(|(other, _)| other.as_ref() == Some(kid))
        {
            return Err(ConfigError::invalid(
                format!("{field}.kid"),
                kid,
                "key ids must be unique",
            ));
        }
        keys.push((jwk.kid.clone(), key));
    }

    if let Some(issuer) = &raw.issuer
        && issuer.is_empty()
    {
        return Err(ConfigError::invalid(
            "jwt.issuer",
            "\"\"",
            "leave it out to accept any issuer",
        ));
    }
    let audiences = match &raw.audiences {
        Some(list) if list.is_empty() || list.iter().any(String::is_empty) => {
            return Err(ConfigError::invalid(
                "jwt.audiences",
                &format!("{list:?}"),
                "list non-empty audience names, or leave it out to accept any audience",
            ));
        }
        Some(list) => Some(list.iter().cloned().collect::<HashSet<_>>()),
        None => None,
    };

    let leeway_seconds = raw.leeway_seconds.unwrap_or(DEFAULT_LEEWAY_SECONDS);
    if leeway_seconds > 3600 {
        return Err(ConfigError::invalid(
            "jwt.leeway_seconds",
            &leeway_seconds.to_string(),
            "must be 0 to 3600 seconds",
        ));
    }
    let max_token_bytes = raw.max_token_bytes.unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
    if !(64..=65_536).contains(&max_token_bytes) {
        return Err(ConfigError::invalid(
            "jwt.max_token_bytes",
            &max_token_bytes.to_string(),
            "must be 64 to 65536 bytes",
        ));
    }
    let customer_claim = claim_name("jwt.customer_claim", raw.customer_claim.as_deref(), "sub")?;
    let tier_claim = claim_name("jwt.tier_claim", raw.tier_claim.as_deref(), "tier")?;

    Ok(Verifier {
        keys,
        issuer: raw.issuer.clone(),
        audiences,
        leeway_seconds,
        max_token_bytes,
        customer_claim,
        tier_claim,
    })
}

fn claim_name(field: &str, value: Option<&str>, default: &str) -> Result<String, ConfigError> {
    let name = value.unwrap_or(default);
    if name.is_empty() {
        return Err(ConfigError::invalid(field, "\"\"", "name a claim"));
    }
    Ok(name.to_owned())
}

fn table_slots(field: &str, value: Option<u32>, default: u32) -> Result<u32, ConfigError> {
    let slots = value.unwrap_or(default);
    if slots == 0 || slots > MAX_TABLE_SLOTS {
        return Err(ConfigError::invalid(
            field,
            &slots.to_string(),
            &format!("must be 1 to {MAX_TABLE_SLOTS}"),
        ));
    }
    Ok(slots)
}

fn build_forged_headers(names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut headers = Vec::with_capacity(names.len());
    for (index, name) in names.into_iter().enumerate() {
        if !is_header_name(&name) {
            return Err(ConfigError::invalid(
                format!("forged_headers[{index}]"),
                &name,
                "not an HTTP header name (pseudo-headers such as `:authority` are not allowed)",
            ));
        }
        let lower = name.to_ascii_lowercase();
        // The identity headers are always replaced; removing them as well
        // would only cost host calls.
        let identity = [CUSTOMER_HEADER, TIER_HEADER].contains(&lower.as_str());
        if !identity && !headers.contains(&lower) {
            headers.push(lower);
        }
    }
    Ok(headers)
}

/// Returns whether `name` is an HTTP header name (an RFC 9110 token),
/// which excludes pseudo-headers such as `:authority`.
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte))
}

/// Usage records held for the sidecar by default, before older minutes
/// merge: an hour of minutes for 1,666 customers.
const DEFAULT_MAX_BACKLOG_RECORDS: u64 = 100_000;
/// Bounds of `sidecar.max_backlog_records`.
const MIN_BACKLOG_RECORDS: usize = 100;
const MAX_BACKLOG_RECORDS: usize = 1_000_000;

fn build_sidecar(raw: Option<RawSidecar>) -> Result<SidecarSettings, ConfigError> {
    let raw = raw.unwrap_or(RawSidecar {
        cluster: None,
        sync_interval_ms: None,
        timeout_ms: None,
        max_backlog_records: None,
    });
    let cluster = raw.cluster.unwrap_or_else(|| "veo_sidecar".to_owned());
    if cluster.is_empty() {
        return Err(ConfigError::invalid(
            "sidecar.cluster",
            "\"\"",
            "name the Envoy cluster of the sidecar",
        ));
    }
    let interval_ms = raw.sync_interval_ms.unwrap_or(1000);
    if !(10..=60_000).contains(&interval_ms) {
        return Err(ConfigError::invalid(
            "sidecar.sync_interval_ms",
            &interval_ms.to_string(),
            "must be 10 to 60000 milliseconds",
        ));
    }
    let timeout_ms = raw.timeout_ms.unwrap_or(1000);
    if !(1..=60_000).contains(&timeout_ms) {
        return Err(ConfigError::invalid(
            "sidecar.timeout_ms",
            &timeout_ms.to_string(),
            "must be 1 to 60000 milliseconds",
        ));
    }
    let max_backlog_records = raw
        .max_backlog_records
        .unwrap_or(DEFAULT_MAX_BACKLOG_RECORDS);
    let Some(max_backlog_records) = usize::try_from(max_backlog_records)
        .ok()
        .filter(|records| (MIN_BACKLOG_RECORDS..=MAX_BACKLOG_RECORDS).contains(records))
    else {
        return Err(ConfigError::invalid(
            "sidecar.max_backlog_records",
            &max_backlog_records.to_string(),
            "must be 100 to 1000000 records",
        ));
    };
    Ok(SidecarSettings {
        cluster,
        sync_interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_millis(timeout_ms),
        max_backlog_records,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::testing::{config, config_json, jwks};

    fn error_of(config: Value) -> String {
        Config::from_bytes(config.to_string().as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config =
            Config::from_bytes(json!({"jwt": {"jwks": jwks()}}).to_string().as_bytes()).unwrap();
        assert_eq!(config.verifier.leeway_seconds, 60);
        assert_eq!(config.verifier.max_token_bytes, 4096);
        assert_eq!(config.verifier.customer_claim, "sub");
        assert_eq!(config.verifier.tier_claim, "tier");
        assert_eq!(config.verifier.issuer, None);
        assert_eq!(config.tiers.get(config.tiers.default_index()).name, "basic");
        assert_eq!(config.tiers.all().len(), 3);
        assert_eq!(config.max_customers, 10_000);
        assert_eq!(config.token_cache_entries, 10_000);
        assert!(config.forged_headers.is_empty());
        assert_eq!(config.sidecar.cluster, "veo_sidecar");
        assert_eq!(config.sidecar.sync_interval, Duration::from_millis(1000));
        assert_eq!(config.sidecar.timeout, Duration::from_millis(1000));
        assert_eq!(config.sidecar.max_backlog_records, 100_000);
    }

    #[test]
    fn full_config_is_read() {
        let config = config(json!({
            "forged_headers": ["X-Veo-Region", "x-veo-region", "X-Veo-Customer", "x-veo-tier"],
            "sidecar": {"cluster": "side", "sync_interval_ms": 200, "timeout_ms": 150,
                        "max_backlog_records": 500}
        }));
        assert_eq!(config.sidecar.max_backlog_records, 500);
        assert_eq!(config.forged_headers, ["x-veo-region"]);
        assert_eq!(config.sidecar.cluster, "side");
        assert_eq!(config.sidecar.sync_interval, Duration::from_millis(200));
        assert_eq!(config.verifier.keys.len(), 3);
        assert_eq!(config.max_customers, 64);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = error_of(config_json(json!({"max_customer": 5})));
        assert!(error.contains("unknown field `max_customer`"), "{error}");
        let mut nested = config_json(json!({}));
        nested["tiers"]["basic"]["quota"]["limit"] = json!(1);
        let error = error_of(nested);
        assert!(error.contains("unknown field `limit`"), "{error}");
    }

    #[test]
    fn jwks_is_required() {
        let error = error_of(json!({"default_tier": "basic"}));
        assert!(error.contains("missing field `jwt`"), "{error}");
        let error = error_of(json!({"jwt": {"jwks": {"keys": []}}}));
        assert!(error.contains("jwt.jwks.keys"), "{error}");
    }

    #[test]
    fn errors_name_field_and_value() {
        let cases = [
            (json!({"max_customers": 0}), "`max_customers` = 0"),
            (
                json!({"quota_share_before_sync": 0.0}),
                "`quota_share_before_sync` = 0",
            ),
            (
                json!({"quota_share_before_sync": 1.5}),
                "`quota_share_before_sync` = 1.5",
            ),
            (
                json!({"token_cache_entries": 2_000_000}),
                "`token_cache_entries` = 2000000",
            ),
            (json!({"default_tier": "gold"}), "`default_tier` = gold"),
            (
                json!({"forged_headers": [":authority"]}),
                "`forged_headers[0]` = :authority",
            ),
            (
                json!({"sidecar": {"sync_interval_ms": 0}}),
                "`sidecar.sync_interval_ms` = 0",
            ),
            (json!({"sidecar": {"cluster": ""}}), "`sidecar.cluster`"),
            (
                json!({"sidecar": {"max_backlog_records": 99}}),
                "`sidecar.max_backlog_records` = 99",
            ),
            (
                json!({"sidecar": {"max_backlog_records": 1_000_001}}),
                "`sidecar.max_backlog_records` = 1000001",
            ),
            (
                json!({"tiers": {"basic": {"quota": {"requests": 0, "window_seconds": 60}}}}),
                "`tiers.basic.quota.requests` = 0",
            ),
            (
                json!({"tiers": {"x": {"burst": {"tokens_per_second": -1, "size": 3}}}}),
                "`tiers.x.burst.tokens_per_second` = -1",
            ),
        ];
        for (extra, expected) in cases {
            let error = error_of(config_json(extra));
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let mut cases = vec![
            (json!({"max_customers": "10"}), "`max_customers`", "\"10\""),
            (json!({"max_customers": -1}), "`max_customers`", "-1"),
            (
                json!({"token_cache_entries": 2_000_000_000_000u64}),
                "`token_cache_entries`",
                "2000000000000",
            ),
            (
                json!({"sidecar": {"timeout_ms": 1.5}}),
                "`sidecar.timeout_ms`",
                "1.5",
            ),
            (
                json!({"tiers": {"basic": {"quota": {"requests": 5, "window_seconds": -60}}}}),
                "`tiers.basic.quota.window_seconds`",
                "-60",
            ),
            (
                json!({"forged_headers": ["x-a", 5]}),
                "`forged_headers[1]`",
                "5",
            ),
            (json!({"sidecar": {"bogus": 1}}), "`sidecar.bogus`", "bogus"),
        ];
        let mut keys = jwks();
        keys["keys"][0]["kid"] = json!(5);
        cases.push((
            json!({"jwt": {"jwks": keys}}),
            "`jwt.jwks.keys[0].kid`",
            "5",
        ));
        cases.push((
            json!({"jwt": {"jwks": jwks(), "leeway_seconds": "60"}}),
            "`jwt.leeway_seconds`",
            "\"60\"",
        ));
        for (extra, field, value) in cases {
            let error = error_of(config_json(extra));
            assert!(error.contains(field), "{error} lacks {field}");
            assert!(error.contains(value), "{error} lacks {value}");
        }
    }

    #[test]
    fn huge_burst_rate_is_shown_short() {
        let error = error_of(config_json(json!({
            "tiers": {"x": {"burst": {"tokens_per_second": 1e300, "size": 3}}},
            "default_tier": "x"
        })));
        assert!(
            error.contains("`tiers.x.burst.tokens_per_second` = 1e+300:"),
            "{error}"
        );
    }

    #[test]
    fn jwt_settings_are_checked() {
        let cases = [
            (
                json!({"leeway_seconds": 7200}),
                "`jwt.leeway_seconds` = 7200",
            ),
            (json!({"max_token_bytes": 10}), "`jwt.max_token_bytes` = 10"),
            (json!({"audiences": []}), "`jwt.audiences`"),
            (json!({"issuer": ""}), "`jwt.issuer`"),
            (json!({"customer_claim": ""}), "`jwt.customer_claim`"),
        ];
        for (jwt, expected) in cases {
            let mut raw = config_json(json!({}));
            for (key, value) in jwt.as_object().unwrap() {
                raw["jwt"][key] = value.clone();
            }
            let error = error_of(raw);
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
    }

    #[test]
    fn bad_keys_are_rejected_with_their_index() {
        let mut keys = jwks();
        let cases = [
            ("kty", json!("oct"), "`jwt.jwks.keys[0].kty` = oct"),
            ("crv", json!("P-384"), "`jwt.jwks.keys[0].crv` = P-384"),
            ("x", json!("AAAA"), "`jwt.jwks.keys[0].x` = AAAA"),
            ("alg", json!("RS256"), "`jwt.jwks.keys[0].alg` = RS256"),
            ("use", json!("enc"), "`jwt.jwks.keys[0].use` = enc"),
            ("d", json!("c2VjcmV0"), "`jwt.jwks.keys[0].d`"),
        ];
        for (member, value, expected) in cases {
            let original = keys["keys"][0].clone();
            keys["keys"][0][member] = value;
            let error = error_of(json!({"jwt": {"jwks": keys.clone()}}));
            assert!(error.contains(expected), "{error} lacks {expected}");
            assert!(!error.contains("c2VjcmV0"), "secret shown: {error}");
            keys["keys"][0] = original;
        }
    }

    #[test]
    fn key_ids_must_be_unique_and_present() {
        let mut keys = jwks();
        keys["keys"][1]["kid"] = json!("es");
        let error = error_of(json!({"jwt": {"jwks": keys.clone()}}));
        assert!(error.contains("`jwt.jwks.keys[1].kid` = es"), "{error}");

        keys["keys"][1].as_object_mut().unwrap().remove("kid");
        let error = error_of(json!({"jwt": {"jwks": keys}}));
        assert!(error.contains("`jwt.jwks.keys[1].kid`"), "{error}");
    }

    #[test]
    fn rsa_exponent_other_than_65537_is_rejected() {
        let mut keys = jwks();
        keys["keys"][1]["e"] = json!("Aw");
        let error = error_of(json!({"jwt": {"jwks": keys}}));
        assert!(error.contains("`jwt.jwks.keys[1].e`"), "{error}");
    }

    #[test]
    fn weak_rsa_key_is_rejected() {
        let mut keys = jwks();
        keys["keys"][1]["n"] = json!("AQAB");
        let error = error_of(json!({"jwt": {"jwks": keys}}));
        assert!(error.contains("`jwt.jwks.keys[1].n`"), "{error}");
    }

    #[test]
    fn configuration_must_be_an_object() {
        for text in ["", "  ", "[{\"jwks\": {\"keys\": []}}]", "\"jwt\"", "null"] {
            let error = Config::from_bytes(text.as_bytes()).unwrap_err().to_string();
            assert!(error.contains("must be a JSON object"), "{text:?}: {error}");
        }
    }

    #[test]
    fn invalid_json_and_bytes_are_reported() {
        let error = Config::from_bytes(b"{not json").unwrap_err().to_string();
        assert!(
            error.starts_with("invalid plugin configuration JSON"),
            "{error}"
        );
        let error = Config::from_bytes(b"\xff\xfe").unwrap_err();
        assert!(matches!(error, ConfigError::NotUtf8));
    }
}
