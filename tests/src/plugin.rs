//! Plugin configuration of the filter for the tests: short windows so tests
//! run fast, and setters for any key.

use serde_json::{Value, json};

use crate::HarnessError;
use crate::tokens::{AUDIENCE, ISSUER, SigningKey};

/// Quota window of the test tiers, in seconds.
pub const WINDOW_SECONDS: u64 = 3;

/// Basic tier's quota per window in the test configuration, in requests.
pub const BASIC_QUOTA: u64 = 10;

/// Pro tier's quota per window in the test configuration, in requests.
pub const PRO_QUOTA: u64 = 30;

/// Enterprise tier's token-bucket size in the test configuration.
pub const ENTERPRISE_BURST: u64 = 40;

/// Enterprise tier's token-bucket refill rate, in tokens per second.
pub const ENTERPRISE_RATE: u64 = 1;

/// How often the filter sends usage to the sidecar in the tests, in
/// milliseconds.
pub const SYNC_INTERVAL_MS: u64 = 200;

/// The plugin configuration as a JSON document.
#[derive(Debug, Clone)]
pub struct PluginConfig {
    value: Value,
}

impl PluginConfig {
    /// Returns the test configuration trusting `key`: the expected issuer
    /// and audience, short windows, and a short sync interval.
    pub fn for_key(key: &SigningKey) -> Result<Self, HarnessError> {
        Ok(Self::for_jwks(key.jwks()?))
    }

    /// Returns the test configuration trusting the keys of `jwks`.
    pub fn for_jwks(jwks: Value) -> Self {
        let value = json!({
            "jwt": {
                "jwks": jwks,
                "issuer": ISSUER,
                "audiences": [AUDIENCE],
            },
            "tiers": {
                "basic": {"quota": {"requests": BASIC_QUOTA, "window_seconds": WINDOW_SECONDS}},
                "pro": {"quota": {"requests": PRO_QUOTA, "window_seconds": WINDOW_SECONDS}},
                "enterprise": {
                    "burst": {"tokens_per_second": ENTERPRISE_RATE, "size": ENTERPRISE_BURST}
                },
            },
            "forged_headers": ["x-veo-region"],
            "sidecar": {
                "cluster": "veo_sidecar",
                "sync_interval_ms": SYNC_INTERVAL_MS,
                "timeout_ms": 500,
            },
        });
        Self { value }
    }

    /// Sets `tier`'s quota to `requests` per rolling `window_seconds`.
    pub fn quota(self, tier: &str, requests: u64, window_seconds: u64) -> Self {
        self.set(
            &format!("/tiers/{tier}/quota"),
            json!({"requests": requests, "window_seconds": window_seconds}),
        )
    }

    /// Sets the value at JSON pointer `pointer`, creating missing objects on
    /// the way.
    pub fn set(mut self, pointer: &str, value: Value) -> Self {
        let mut node = &mut self.value;
        for key in pointer.split('/').skip(1) {
            if !node.is_object() {
                *node = json!({});
            }
            node = &mut node[key];
        }
        *node = value;
        self
    }

    /// Removes the key at JSON pointer `pointer` when it exists.
    pub fn remove(mut self, pointer: &str) -> Self {
        if let Some((parent, key)) = pointer.rsplit_once('/')
            && let Some(Value::Object(map)) = self.value.pointer_mut(parent)
        {
            map.remove(key);
        }
        self
    }

    /// Returns the configuration as JSON.
    pub fn to_json(&self) -> Value {
        self.value.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_creates_nested_keys() {
        let key = SigningKey::generate("k1");
        let config = PluginConfig::for_key(&key).unwrap().set("/a/b", json!(3));
        assert_eq!(config.to_json()["a"]["b"], 3);
    }

    #[test]
    fn quota_replaces_tier_quota() {
        let key = SigningKey::generate("k1");
        let config = PluginConfig::for_key(&key).unwrap().quota("basic", 7, 2);
        assert_eq!(config.to_json()["tiers"]["basic"]["quota"]["requests"], 7);
        assert_eq!(
            config.to_json()["tiers"]["basic"]["quota"]["window_seconds"],
            2
        );
    }

    #[test]
    fn remove_drops_key() {
        let key = SigningKey::generate("k1");
        let config = PluginConfig::for_key(&key).unwrap().remove("/jwt/issuer");
        assert!(config.to_json()["jwt"].get("issuer").is_none());
    }
}
