//! The plugin configuration exactly as written in Envoy's `configuration`
//! field: JSON, every key optional except `jwt.jwks`, unknown keys rejected.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Top-level plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Token verification settings.
    pub jwt: RawJwt,
    /// Tier used when the token names no tier or an unknown one.
    pub default_tier: Option<String>,
    /// Tier table; replaces the built-in table when given.
    pub tiers: Option<BTreeMap<String, RawTier>>,
    /// Number of customer slots in the shared limiter table.
    pub max_customers: Option<u32>,
    /// Share of a quota this instance admits for a customer before any
    /// sync reply about it.
    pub quota_share_before_sync: Option<f64>,
    /// Number of slots in the shared verified-token cache.
    pub token_cache_entries: Option<u32>,
    /// Extra request headers removed before the request goes upstream.
    pub forged_headers: Option<Vec<String>>,
    /// Sidecar connection settings.
    pub sidecar: Option<RawSidecar>,
    /// Geo-fencing of region-locked assets; absent turns it off.
    pub geo: Option<RawGeo>,
}

/// The `jwt` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwt {
    /// Public keys as a JSON Web Key Set.
    pub jwks: RawJwks,
    /// Required `iss` claim.
    pub issuer: Option<String>,
    /// Accepted `aud` values; a token must carry at least one.
    pub audiences: Option<Vec<String>>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_seconds: Option<u64>,
    /// Largest accepted token, in bytes.
    pub max_token_bytes: Option<usize>,
    /// Claim that names the customer.
    pub customer_claim: Option<String>,
    /// Claim that names the tier.
    pub tier_claim: Option<String>,
}

/// A JSON Web Key Set (RFC 7517).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwks {
    /// The keys.
    pub keys: Vec<RawJwk>,
}

/// One JSON Web Key. Members that only describe the key are accepted and
/// ignored. Private-key members are parsed so that validation can reject
/// them with a clear message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJwk {
    /// Key type: `EC`, `RSA` or `OKP`.
    pub kty: String,
    /// Key id matched against the token header's `kid`.
    pub kid: Option<String>,
    /// Curve: `P-256` for EC, `Ed25519` for OKP.
    pub crv: Option<String>,
    /// EC x coordinate or OKP public key, base64url.
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    pub y: Option<String>,
    /// RSA modulus, base64url.
    pub n: Option<String>,
    /// RSA public exponent, base64url.
    pub e: Option<String>,
    /// Declared algorithm; must match the key type when present.
    pub alg: Option<String>,
    /// Declared use; must be `sig` when present.
    #[serde(rename = "use")]
    pub key_use: Option<String>,
    /// Declared operations (ignored).
    pub key_ops: Option<Vec<String>>,
    /// Certificate chain (ignored).
    pub x5c: Option<Vec<String>>,
    /// Certificate SHA-1 thumbprint (ignored).
    pub x5t: Option<String>,
    /// Certificate SHA-256 thumbprint (ignored).
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: Option<String>,
    /// Private exponent or private key; rejected.
    pub d: Option<String>,
    /// RSA private prime; rejected.
    pub p: Option<String>,
    /// RSA private prime; rejected.
    pub q: Option<String>,
    /// RSA private CRT exponent; rejected.
    pub dp: Option<String>,
    /// RSA private CRT exponent; rejected.
    pub dq: Option<String>,
    /// RSA private CRT coefficient; rejected.
    pub qi: Option<String>,
    /// Symmetric key; rejected.
    pub k: Option<String>,
}

/// One tier: a rolling-window quota, a token bucket, or both.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTier {
    /// Rolling-window quota.
    pub quota: Option<RawQuota>,
    /// Token bucket.
    pub burst: Option<RawBurst>,
    /// Failure policy while the counters shared with other instances are
    /// unreachable: "local" (default) or "refuse".
    pub failure_policy: Option<String>,
    /// Status of the rejection under the "refuse" policy; default 503.
    pub failure_status: Option<u16>,
}

/// `requests` admitted per rolling window of `window_seconds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    /// Requests admitted per window.
    pub requests: u32,
    /// Window length, in seconds.
    pub window_seconds: u32,
}

/// Token bucket refilled at `tokens_per_second` up to `size` tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBurst {
    /// Refill rate, in tokens per second.
    pub tokens_per_second: f64,
    /// Bucket capacity, in tokens (requests).
    pub size: u32,
}

/// The `sidecar` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSidecar {
    /// Envoy cluster that reaches the sidecar over HTTP/2.
    pub cluster: Option<String>,
    /// Time between usage batches, in milliseconds.
    pub sync_interval_ms: Option<u64>,
    /// Deadline of one sync call, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Usage records held for the sidecar before older ones are merged.
    pub max_backlog_records: Option<u64>,
}

/// The `geo` section.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGeo {
    /// Header that Envoy's geoip filter writes the client's country to.
    pub geoip_header: Option<String>,
    /// Country header of a CDN in front of Envoy, trusted only from
    /// `cdn_trusted_ranges`.
    pub cdn_country_header: Option<String>,
    /// CIDR ranges of the CDN's addresses.
    pub cdn_trusted_ranges: Option<Vec<String>>,
    /// ISO 3166-1 alpha-2 country code to region name.
    pub countries: Option<BTreeMap<String, String>>,
    /// Policy for a client whose region is unknown: "refuse" or "allow".
    pub unknown_country: Option<String>,
    /// Policy for a request for an asset before the sidecar's asset region
    /// registry first arrives: "refuse" or "configured_rules".
    pub before_registry: Option<String>,
    /// Path patterns with one `{asset}` segment.
    pub asset_patterns: Vec<String>,
    /// Configured rules of region-locked assets.
    pub assets: Option<Vec<RawAssetRule>>,
    /// Request header that carries the asset's storage region upstream.
    pub storage_region_header: Option<String>,
}

/// One region-locked asset.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAssetRule {
    /// Asset id as it appears in the `{asset}` path segment.
    pub asset: String,
    /// Regions every tier may request the asset from.
    pub allowed_regions: Vec<String>,
    /// Extra regions per tier name.
    pub tier_regions: Option<BTreeMap<String, Vec<String>>>,
    /// Region whose storage contains the asset.
    pub storage_region: Option<String>,
}
