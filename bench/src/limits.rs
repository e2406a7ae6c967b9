//! Per-tier rate limits as the filter's plugin configuration states them: a `quota` (an exact
//! rolling window) and/or a `burst` (a token bucket). The replay uses them to size synthetic
//! overload and the oracle uses them to check decisions.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors from reading limits out of a plugin configuration.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    /// The file could not be read.
    #[error("failed to read plugin configuration {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The `tiers` object is missing parts or has values of the wrong type.
    #[error("invalid tiers in plugin configuration {origin}: {source}")]
    Parse {
        /// Source of the configuration: a path or a description.
        origin: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
}

/// At most `requests` admitted in any rolling window of `window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    /// Requests admitted per window.
    pub requests: u64,
    /// Window length in seconds.
    pub window_seconds: u64,
}

/// A token bucket: `size` tokens, refilled at `tokens_per_second`, one token per request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Burst {
    /// Refill rate in tokens (requests) per second.
    pub tokens_per_second: f64,
    /// Bucket capacity in tokens.
    pub size: u64,
}

/// The limits of one tier; a tier with neither is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct TierLimit {
    /// Rolling-window quota.
    #[serde(default)]
    pub quota: Option<Quota>,
    /// Token-bucket burst cap.
    #[serde(default)]
    pub burst: Option<Burst>,
}

impl TierLimit {
    /// Returns the sustained rate in requests per second that the tier admits. That is the
    /// quota's average rate, else the burst refill rate, and `None` for an unlimited tier.
    pub fn sustained_rate(&self) -> Option<f64> {
        match (self.quota, self.burst) {
            (Some(quota), _) if quota.window_seconds > 0 => {
                Some(quota.requests as f64 / quota.window_seconds as f64)
            }
            (_, Some(burst)) => Some(burst.tokens_per_second),
            _ => None,
        }
    }
}

/// Limits by tier name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TierLimits {
    tiers: BTreeMap<String, TierLimit>,
}

#[derive(Deserialize)]
struct PluginConfigTiers {
    #[serde(default)]
    tiers: Option<BTreeMap<String, TierLimit>>,
}

impl TierLimits {
    /// Returns the filter's default table: basic 60 and pro 600 requests per 60 s, enterprise a
    /// burst of 200 refilled at 100 per second.
    pub fn default_tiers() -> Self {
        let quota = |requests| TierLimit {
            quota: Some(Quota {
                requests,
                window_seconds: 60,
            }),
            burst: None,
        };
        let enterprise = TierLimit {
            quota: None,
            burst: Some(Burst {
                tokens_per_second: 100.0,
                size: 200,
            }),
        };
        TierLimits {
            tiers: BTreeMap::from([
                ("basic".to_string(), quota(60)),
                ("pro".to_string(), quota(600)),
                ("enterprise".to_string(), enterprise),
            ]),
        }
    }

    /// Builds limits from explicit entries.
    pub fn new(tiers: BTreeMap<String, TierLimit>) -> Self {
        TierLimits { tiers }
    }

    /// Reads the `tiers` object of a filter plugin configuration (JSON); other keys are
    /// ignored. Without `tiers` the filter's defaults apply, so this returns
    /// [`TierLimits::default_tiers`]. `origin` names the source in errors.
    ///
    /// # Errors
    /// Returns [`LimitsError::Parse`] when the JSON or its `tiers` object is invalid.
    pub fn from_plugin_config(json: &str, origin: &str) -> Result<Self, LimitsError> {
        let config: PluginConfigTiers =
            serde_json::from_str(json).map_err(|source| LimitsError::Parse {
                origin: origin.to_string(),
                source,
            })?;
        Ok(config
            .tiers
            .map(TierLimits::new)
            .unwrap_or_else(TierLimits::default_tiers))
    }

    /// Reads a plugin configuration file; see [`TierLimits::from_plugin_config`].
    ///
    /// # Errors
    /// Returns [`LimitsError::Read`] or [`LimitsError::Parse`] naming the file.
    pub fn read_plugin_config(path: &Path) -> Result<Self, LimitsError> {
        let json = fs::read_to_string(path).map_err(|source| LimitsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_plugin_config(&json, &path.display().to_string())
    }

    /// Sets the window length of every quota, keeping the request counts.
    pub fn with_window_seconds(mut self, window_seconds: u64) -> Self {
        for limit in self.tiers.values_mut() {
            if let Some(quota) = &mut limit.quota {
                quota.window_seconds = window_seconds;
            }
        }
        self
    }

    /// Returns the limits of `tier`, or `None` when the tier is not configured.
    pub fn get(&self, tier: &str) -> Option<&TierLimit> {
        self.tiers.get(tier)
    }

    /// Iterates over tiers and their limits in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &TierLimit)> {
        self.tiers
            .iter()
            .map(|(name, limit)| (name.as_str(), limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tiers_from_plugin_config() {
        let json = r#"{
            "jwt": {"jwks": {"keys": []}},
            "tiers": {
                "basic": {"quota": {"requests": 5, "window_seconds": 2}},
                "gold": {"burst": {"tokens_per_second": 50, "size": 10},
                         "quota": {"requests": 1000, "window_seconds": 60}}
            }
        }"#;
        let limits = TierLimits::from_plugin_config(json, "test").unwrap();
        let basic = limits.get("basic").unwrap();
        assert_eq!(basic.quota.unwrap().requests, 5);
        assert_eq!(basic.burst, None);
        let gold = limits.get("gold").unwrap();
        assert_eq!(gold.burst.unwrap().size, 10);
        assert!(limits.get("pro").is_none());
    }

    #[test]
    fn missing_tiers_means_defaults() {
        let limits = TierLimits::from_plugin_config(r#"{"jwt": {}}"#, "test").unwrap();
        assert_eq!(limits, TierLimits::default_tiers());
    }

    #[test]
    fn invalid_tiers_name_origin() {
        let json = r#"{"tiers": {"basic": {"quota": {"requests": "many"}}}}"#;
        let error = TierLimits::from_plugin_config(json, "envoy.yaml").unwrap_err();
        assert!(error.to_string().contains("envoy.yaml"));
    }

    #[test]
    fn window_override_keeps_requests() {
        let limits = TierLimits::default_tiers().with_window_seconds(5);
        let basic = limits.get("basic").unwrap().quota.unwrap();
        assert_eq!((basic.requests, basic.window_seconds), (60, 5));
        assert_eq!(limits.get("enterprise").unwrap().quota, None);
    }

    #[test]
    fn sustained_rate_prefers_quota() {
        let limits = TierLimits::default_tiers();
        assert_eq!(limits.get("basic").unwrap().sustained_rate(), Some(1.0));
        assert_eq!(limits.get("pro").unwrap().sustained_rate(), Some(10.0));
        assert_eq!(
            limits.get("enterprise").unwrap().sustained_rate(),
            Some(100.0)
        );
        assert_eq!(TierLimit::default().sustained_rate(), None);
    }
}
