//! Tiers at run time: validated limits, the `RateLimit-Policy` value
//! written once, and lookup by the tier name a token carries.

use std::collections::BTreeMap;

use veo_proto::sync::TierLimits;

use super::ConfigError;
use super::raw::{RawBurst, RawQuota, RawTier};

/// Maximum quota, in requests per window. The rolling window stores one
/// 4-byte timestamp per admitted request, so this caps a customer's
/// record at about 400 KB.
pub const MAX_QUOTA_REQUESTS: u32 = 100_000;

/// Maximum window, in seconds (one day).
pub const MAX_WINDOW_SECONDS: u32 = 86_400;

/// Maximum bucket size, in tokens.
pub const MAX_BURST_SIZE: u32 = 1_000_000;

/// Maximum tier name length, in bytes.
const MAX_TIER_NAME_BYTES: usize = 32;

/// At most `requests` admitted in any rolling window of `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Requests admitted per window.
    pub requests: u32,
    /// Window length, in milliseconds.
    pub window_ms: u64,
}

/// Token bucket: `size` tokens, refilled at `tokens_per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    /// Refill rate, in tokens per second.
    pub tokens_per_second: f64,
    /// Capacity, in tokens.
    pub size: u32,
}

impl Burst {
    /// Returns the time an empty bucket takes to fill, in whole seconds
    /// rounded up (at least 1).
    pub fn refill_seconds(&self) -> u64 {
        let seconds = (f64::from(self.size) / self.tokens_per_second).ceil();
        (seconds as u64).max(1)
    }
}

/// Behaviour of a tier while the counters shared with other instances are
/// unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Decide on this instance's counts and the last known usage of the
    /// others, and count each such admission.
    #[default]
    Local,
    /// Reject every request with this status (config value `"refuse"`).
    Refuse {
        /// HTTP status of the rejection, 400 to 599.
        status: u16,
    },
}

/// Default status of a rejection under [`FailurePolicy::Refuse`].
pub const DEFAULT_FAILURE_STATUS: u16 = 503;

/// One subscription tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Tier {
    /// Tier name, as tokens carry it and headers and metrics show it.
    pub name: String,
    /// Rolling-window quota, if any.
    pub quota: Option<Quota>,
    /// Token bucket, if any.
    pub burst: Option<Burst>,
    /// Value of the `ratelimit-policy` response header.
    pub policy_header: String,
    /// Behaviour while the shared counters are unreachable.
    pub failure_policy: FailurePolicy,
}

impl Tier {
    /// Returns the policy name of the token bucket in rate-limit headers:
    /// the tier name, or `<tier>-burst` when the tier also has a quota.
    pub fn burst_policy_name(&self) -> String {
        format!("{}{}", self.name, self.burst_name_suffix())
    }

    /// Returns what follows the tier name in the token bucket's policy
    /// name: `-burst` when the tier also has a quota, else nothing.
    pub fn burst_name_suffix(&self) -> &'static str {
        if self.quota.is_some() { "-burst" } else { "" }
    }
}

/// The tier table with its default.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiers {
    tiers: Vec<Tier>,
    default: usize,
}

impl Tiers {
    /// Returns the index of tier `name`, or of the default tier when the
    /// name is missing or unknown.
    pub fn resolve(&self, name: Option<&str>) -> usize {
        name.and_then(|name| self.find(name))
            .unwrap_or(self.default)
    }

    /// Returns the index of tier `name`, or `None` when the table has no
    /// tier of that name.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|tier| tier.name == name)
    }

    /// Returns the tier at `index`, or the default tier when out of range.
    pub fn get(&self, index: usize) -> &Tier {
        match self.tiers.get(index) {
            Some(tier) => tier,
            None => &self.tiers[self.default],
        }
    }

    /// Returns every tier in name order.
    pub fn all(&self) -> &[Tier] {
        &self.tiers
    }

    /// Returns the index of the default tier.
    pub fn default_index(&self) -> usize {
        self.default
    }

    /// Returns this table with the limits the sidecar pushed, and the
    /// pushed names this table does not have, which are ignored.
    ///
    /// Each tier the sidecar names takes the pushed quota and burst but
    /// keeps its failure policy. The other tiers keep their limits.
    pub fn with_pushed(&self, pushed: &[TierLimits]) -> Result<(Tiers, Vec<String>), ConfigError> {
        let mut tiers = self.clone();
        let mut unknown = Vec::new();
        for limits in pushed {
            let Some(tier) = tiers.tiers.iter_mut().find(|tier| tier.name == limits.name) else {
                unknown.push(limits.name.clone());
                continue;
            };
            let field = format!("sidecar tiers.{}", limits.name);
            let quota = match limits.quota_requests {
                0 => None,
                requests => {
                    if limits.window_ms % 1000 != 0 {
                        return Err(ConfigError::invalid(
                            format!("{field}.window_ms"),
                            &limits.window_ms.to_string(),
                            "must be whole seconds",
                        ));
                    }
                    let raw = RawQuota {
                        requests: u32::try_from(requests).unwrap_or(u32::MAX),
                        window_seconds: u32::try_from(limits.window_ms / 1000).unwrap_or(u32::MAX),
                    };
                    Some(build_quota(&field, &raw)?)
                }
            };
            let burst = if limits.burst_rate_per_second == 0.0 {
                None
            } else {
                let raw = RawBurst {
                    tokens_per_second: limits.burst_rate_per_second,
                    size: u32::try_from(limits.burst_size_requests).unwrap_or(u32::MAX),
                };
                Some(build_burst(&field, &raw)?)
            };
            if quota.is_none() && burst.is_none() {
                return Err(ConfigError::invalid(
                    field,
                    "{}",
                    "the sidecar sent a tier without a quota or a burst limit",
                ));
            }
            tier.quota = quota;
            tier.burst = burst;
            tier.policy_header = policy_header(tier);
        }
        Ok((tiers, unknown))
    }
}

/// Returns the built-in tier table: basic 60 and pro 600 requests per
/// minute, enterprise a 200-token bucket refilled at 100 per second.
pub fn default_raw_tiers() -> BTreeMap<String, RawTier> {
    let quota = |requests| RawTier {
        quota: Some(RawQuota {
            requests,
            window_seconds: 60,
        }),
        burst: None,
        failure_policy: None,
        failure_status: None,
    };
    BTreeMap::from([
        ("basic".to_owned(), quota(60)),
        ("pro".to_owned(), quota(600)),
        (
            "enterprise".to_owned(),
            RawTier {
                quota: None,
                burst: Some(RawBurst {
                    tokens_per_second: 100.0,
                    size: 200,
                }),
                failure_policy: None,
                failure_status: None,
            },
        ),
    ])
}

/// Validates the tier table and the default tier name.
pub fn build_tiers(raw: &BTreeMap<String, RawTier>, default: &str) -> Result<Tiers, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            "tiers",
            "{}",
            "define at least one tier, or leave `tiers` out for the built-in table",
        ));
    }
    let tiers = raw
        .iter()
        .map(|(name, tier)| build_tier(name, tier))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(default) = tiers.iter().position(|tier| tier.name == default) else {
        let names: Vec<&str> = tiers.iter().map(|tier| tier.name.as_str()).collect();
        return Err(ConfigError::invalid(
            "default_tier",
            default,
            &format!("not a configured tier; choose one of {}", names.join(", ")),
        ));
    };
    Ok(Tiers { tiers, default })
}

fn build_tier(name: &str, raw: &RawTier) -> Result<Tier, ConfigError> {
    let field = format!("tiers.{name}");
    let name_ok = !name.is_empty()
        && name.len() <= MAX_TIER_NAME_BYTES
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if !name_ok {
        return Err(ConfigError::invalid(
            "tiers",
            name,
            "tier names are 1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`",
        ));
    }
    if raw.quota.is_none() && raw.burst.is_none() {
        return Err(ConfigError::invalid(
            field,
            "{}",
            "give the tier a `quota`, a `burst`, or both",
        ));
    }

    let quota = raw
        .quota
        .as_ref()
        .map(|quota| build_quota(&field, quota))
        .transpose()?;
    let burst = raw
        .burst
        .as_ref()
        .map(|burst| build_burst(&field, burst))
        .transpose()?;
    let failure_policy = build_failure_policy(&field, raw)?;
    let mut tier = Tier {
        name: name.to_owned(),
        quota,
        burst,
        policy_header: String::new(),
        failure_policy,
    };
    tier.policy_header = policy_header(&tier);
    Ok(tier)
}

fn build_failure_policy(field: &str, raw: &RawTier) -> Result<FailurePolicy, ConfigError> {
    let status = raw.failure_status.unwrap_or(DEFAULT_FAILURE_STATUS);
    if !(400..=599).contains(&status) {
        return Err(ConfigError::invalid(
            format!("{field}.failure_status"),
            &status.to_string(),
            "must be an HTTP error status, 400 to 599",
        ));
    }
    match raw.failure_policy.as_deref() {
        None | Some("local") if raw.failure_status.is_none() => Ok(FailurePolicy::Local),
        None | Some("local") => Err(ConfigError::invalid(
            format!("{field}.failure_status"),
            &status.to_string(),
            "applies only with \"failure_policy\": \"refuse\"",
        )),
        Some("refuse") => Ok(FailurePolicy::Refuse { status }),
        Some(other) => Err(ConfigError::invalid(
            format!("{field}.failure_policy"),
            &format!("{other:?}"),
            "must be \"local\" (decide on local counts) or \"refuse\" (refuse while the \
             shared counters are unreachable)",
        )),
    }
}

fn build_quota(field: &str, raw: &RawQuota) -> Result<Quota, ConfigError> {
    if raw.requests == 0 || raw.requests > MAX_QUOTA_REQUESTS {
        return Err(ConfigError::invalid(
            format!("{field}.quota.requests"),
            &raw.requests.to_string(),
            &format!("must be 1 to {MAX_QUOTA_REQUESTS}"),
        ));
    }
    if raw.window_seconds == 0 || raw.window_seconds > MAX_WINDOW_SECONDS {
        return Err(ConfigError::invalid(
            format!("{field}.quota.window_seconds"),
            &raw.window_seconds.to_string(),
            &format!("must be 1 to {MAX_WINDOW_SECONDS} seconds"),
        ));
    }
    Ok(Quota {
        requests: raw.requests,
        window_ms: u64::from(raw.window_seconds) * 1000,
    })
}

fn build_burst(field: &str, raw: &RawBurst) -> Result<Burst, ConfigError> {
    let rate = raw.tokens_per_second;
    if !(0.001..=1_000_000.0).contains(&rate) {
        // JSON's short form, such as `1e+300`, instead of 301 digits.
        let value = serde_json::Number::from_f64(rate)
            .map_or_else(|| rate.to_string(), |number| number.to_string());
        return Err(ConfigError::invalid(
            format!("{field}.burst.tokens_per_second"),
            &value,
            "must be 0.001 to 1000000 tokens per second",
        ));
    }
    if raw.size == 0 || raw.size > MAX_BURST_SIZE {
        return Err(ConfigError::invalid(
            format!("{field}.burst.size"),
            &raw.size.to_string(),
            &format!("must be 1 to {MAX_BURST_SIZE} tokens"),
        ));
    }
    Ok(Burst {
        tokens_per_second: rate,
        size: raw.size,
    })
}

/// Writes the `ratelimit-policy` value (IETF draft-ietf-httpapi-ratelimit-
/// headers): one item per limit, `q` in requests and `w` in seconds.
fn policy_header(tier: &Tier) -> String {
    let mut items = Vec::new();
    if let Some(quota) = tier.quota {
        items.push(format!(
            "\"{}\";q={};w={}",
            tier.name,
            quota.requests,
            quota.window_ms / 1000
        ));
    }
    if let Some(burst) = tier.burst {
        items.push(format!(
            "\"{}\";q={};w={}",
            tier.burst_policy_name(),
            burst.size,
            burst.refill_seconds()
        ));
    }
    items.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_has_the_three_tiers() {
        let tiers = build_tiers(&default_raw_tiers(), "basic").unwrap();
        let names: Vec<&str> = tiers.all().iter().map(|tier| tier.name.as_str()).collect();
        assert_eq!(names, ["basic", "enterprise", "pro"]);
        assert_eq!(tiers.get(tiers.default_index()).name, "basic");
    }

    #[test]
    fn policy_header_names_quota_and_window() {
        let tiers = build_tiers(&default_raw_tiers(), "basic").unwrap();
        let basic = tiers.get(tiers.resolve(Some("basic")));
        assert_eq!(basic.policy_header, "\"basic\";q=60;w=60");
        let enterprise = tiers.get(tiers.resolve(Some("enterprise")));
        assert_eq!(enterprise.policy_header, "\"enterprise\";q=200;w=2");
    }

    #[test]
    fn policy_header_lists_both_limits() {
        let raw = BTreeMap::from([(
            "mixed".to_owned(),
            RawTier {
                quota: Some(RawQuota {
                    requests: 10,
                    window_seconds: 30,
                }),
                burst: Some(RawBurst {
                    tokens_per_second: 3.0,
                    size: 5,
                }),
                failure_policy: None,
                failure_status: None,
            },
        )]);
        let tiers = build_tiers(&raw, "mixed").unwrap();
        assert_eq!(
            tiers.get(0).policy_header,
            "\"mixed\";q=10;w=30, \"mixed-burst\";q=5;w=2"
        );
    }

    #[test]
    fn unknown_or_missing_tier_resolves_to_default() {
        let tiers = build_tiers(&default_raw_tiers(), "pro").unwrap();
        let pro = tiers.resolve(Some("pro"));
        assert_eq!(tiers.resolve(Some("platinum")), pro);
        assert_eq!(tiers.resolve(None), pro);
        assert_eq!(tiers.get(usize::MAX).name, "pro");
    }

    #[test]
    fn tier_without_limits_is_rejected() {
        let raw = BTreeMap::from([(
            "free".to_owned(),
            RawTier {
                quota: None,
                burst: None,
                failure_policy: None,
                failure_status: None,
            },
        )]);
        let error = build_tiers(&raw, "free").unwrap_err().to_string();
        assert!(error.contains("tiers.free"), "{error}");
    }

    #[test]
    fn tier_name_with_dot_is_rejected() {
        let mut raw = default_raw_tiers();
        let basic = raw.remove("basic").unwrap();
        raw.insert("gold.plus".to_owned(), basic);
        let error = build_tiers(&raw, "pro").unwrap_err().to_string();
        assert!(error.contains("gold.plus"), "{error}");
    }

    #[test]
    fn zero_window_is_rejected() {
        let raw = BTreeMap::from([(
            "basic".to_owned(),
            RawTier {
                quota: Some(RawQuota {
                    requests: 5,
                    window_seconds: 0,
                }),
                burst: None,
                failure_policy: None,
                failure_status: None,
            },
        )]);
        let error = build_tiers(&raw, "basic").unwrap_err().to_string();
        assert!(
            error.contains("tiers.basic.quota.window_seconds"),
            "{error}"
        );
    }

    fn tier_with_policy(policy: Option<&str>, status: Option<u16>) -> Result<Tiers, ConfigError> {
        let raw = BTreeMap::from([(
            "basic".to_owned(),
            RawTier {
                quota: Some(RawQuota {
                    requests: 5,
                    window_seconds: 60,
                }),
                burst: None,
                failure_policy: policy.map(str::to_owned),
                failure_status: status,
            },
        )]);
        build_tiers(&raw, "basic")
    }

    #[test]
    fn failure_policy_defaults_to_local() {
        let local = tier_with_policy(None, None).unwrap();
        assert_eq!(local.get(0).failure_policy, FailurePolicy::Local);
        let refuse = tier_with_policy(Some("refuse"), None).unwrap();
        assert_eq!(
            refuse.get(0).failure_policy,
            FailurePolicy::Refuse { status: 503 }
        );
        let custom = tier_with_policy(Some("refuse"), Some(429)).unwrap();
        assert_eq!(
            custom.get(0).failure_policy,
            FailurePolicy::Refuse { status: 429 }
        );
    }

    #[test]
    fn invalid_failure_policy_names_the_field() {
        let cases = [
            (Some("maybe"), None, "tiers.basic.failure_policy"),
            (Some("refuse"), Some(200), "tiers.basic.failure_status"),
            (None, Some(503), "tiers.basic.failure_status"),
        ];
        for (policy, status, field) in cases {
            let error = tier_with_policy(policy, status).unwrap_err().to_string();
            assert!(error.contains(field), "{policy:?} {status:?}: {error}");
        }
    }
}
