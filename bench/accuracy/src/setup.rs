//! Setup shared by every run of the benchmark: the checked options, the signing key, the
//! tiers given to the filter and the oracle, and the sidecar config file.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;
use veo_bench::limits::TierLimits;
use veo_bench::tokens::SigningKey;
use veo_tests::plugin::PluginConfig;

use crate::{Args, Counters};

/// Basic tier's default quota per 60 s, in requests; the benchmark scales it to its window.
const BASIC_PER_MINUTE: u64 = 60;

/// Pro tier's default quota per 60 s, in requests.
const PRO_PER_MINUTE: u64 = 600;

/// Sync interval that a sidecar requests from an instance while one of its customers is near
/// the quota, in milliseconds.
const SYNC_INTERVAL_NEAR_MS: i64 = 100;

/// Counter shards in Redis: one server needs one, so each exchange is one
/// command.
const REDIS_SHARDS: i64 = 1;

/// How often a sidecar exchanges its counts with Redis, in milliseconds.
const REDIS_FLUSH_INTERVAL_MS: i64 = 100;

/// Prefix of the sidecars' keys in Redis. The benchmark empties Redis before every run, so
/// every run uses the same prefix.
pub const KEY_PREFIX: &str = "veo";

/// The checked options and what is derived from them.
pub struct Setup {
    /// Length of each workload.
    pub duration: Duration,
    /// Quota window of every tier, in seconds.
    pub window_seconds: u64,
    /// Counter backend of the sidecars.
    pub counters: Counters,
    /// Customers of the synthetic overload.
    pub customers: usize,
    /// Multiple of the quota's rate that each synthetic customer sends.
    pub overload: f64,
    /// Seed of tiers, phases and routing.
    pub seed: u64,
    /// Timing error allowed by the oracle, in seconds.
    pub tolerance_seconds: f64,
    /// Share of a quota from which instances get caps.
    pub near_quota_fraction: f64,
    /// How often each filter sends usage while no customer is near its quota, in milliseconds.
    pub sync_interval_ms: u64,
    /// Key that signs every customer's token.
    pub key: SigningKey,
    /// Plugin configuration of every filter.
    pub plugin_config: PluginConfig,
    /// The same tiers, for the synthetic rates and the oracle.
    pub limits: TierLimits,
}

impl Setup {
    /// Checks `args` and builds the key, the plugin configuration and the tier limits.
    pub fn new(args: &Args) -> anyhow::Result<Self> {
        if args.instances.is_empty() || args.instances.contains(&0) {
            bail!(
                "invalid --instances {:?}: give fleet sizes of at least 1, such as 1,2,4",
                args.instances
            );
        }
        if args.duration_seconds == 0 {
            bail!("invalid --duration-seconds 0: give at least 1");
        }
        if args.window_seconds == 0 {
            bail!("invalid --window-seconds 0: give at least 1");
        }
        if !(args.tolerance_seconds >= 0.0 && args.tolerance_seconds < args.window_seconds as f64) {
            bail!(
                "invalid --tolerance-seconds {}: give a value from 0 up to the window of {} s",
                args.tolerance_seconds,
                args.window_seconds
            );
        }
        if args.customers == 0 {
            bail!("invalid --customers 0: give at least 1");
        }
        if !(args.overload.is_finite() && args.overload > 0.0) {
            bail!(
                "invalid --overload {}: give a positive factor such as 10",
                args.overload
            );
        }
        if args.sync_interval_ms == 0 {
            bail!("invalid --sync-interval-ms 0: give at least 1");
        }

        let key = SigningKey::generate();
        let jwks = serde_json::to_value(key.jwks()).context("failed to encode the JWKS")?;
        let window = args.window_seconds;
        let plugin_config = PluginConfig::for_jwks(jwks)
            .set(
                "/tiers",
                json!({
                    "basic": {"quota": {
                        "requests": scaled_quota(BASIC_PER_MINUTE, window),
                        "window_seconds": window,
                    }},
                    "pro": {"quota": {
                        "requests": scaled_quota(PRO_PER_MINUTE, window),
                        "window_seconds": window,
                    }},
                    "enterprise": {"burst": {"tokens_per_second": 100, "size": 200}},
                }),
            )
            .set("/sidecar/sync_interval_ms", json!(args.sync_interval_ms));
        let limits = TierLimits::from_plugin_config(
            &plugin_config.to_json().to_string(),
            "the benchmark's plugin configuration",
        )?;

        Ok(Self {
            duration: Duration::from_secs(args.duration_seconds),
            window_seconds: window,
            counters: args.counters,
            customers: args.customers,
            overload: args.overload,
            seed: args.seed,
            tolerance_seconds: args.tolerance_seconds,
            near_quota_fraction: args.near_quota_fraction,
            sync_interval_ms: args.sync_interval_ms,
            key,
            plugin_config,
            limits,
        })
    }

    /// Returns the quota of `tier` in requests per window, when it has one.
    pub fn quota_of(&self, tier: &str) -> Option<u64> {
        self.limits
            .get(tier)
            .and_then(|limit| limit.quota)
            .map(|quota| quota.requests)
    }

    /// Returns the config file of every sidecar, with counters in the Redis at `redis_url`
    /// or embedded.
    ///
    /// With embedded counters the file contains `window_seconds` alone, which every sidecar
    /// version reads, so each sidecar counts only its own instance's usage.
    pub fn sidecar_config(&self, redis_url: &str) -> toml::Table {
        let mut config = toml::Table::new();
        config.insert(
            "window_seconds".to_owned(),
            toml::Value::Integer(i64::try_from(self.window_seconds).unwrap_or(i64::MAX)),
        );
        if self.counters == Counters::Embedded {
            return config;
        }

        config.insert(
            "sync_interval_near_ms".to_owned(),
            toml::Value::Integer(SYNC_INTERVAL_NEAR_MS),
        );
        config.insert(
            "near_quota_fraction".to_owned(),
            toml::Value::Float(self.near_quota_fraction),
        );
        let mut counters = toml::Table::new();
        counters.insert(
            "backend".to_owned(),
            toml::Value::String("redis".to_owned()),
        );
        counters.insert(
            "redis_url".to_owned(),
            toml::Value::String(redis_url.to_owned()),
        );
        counters.insert(
            "key_prefix".to_owned(),
            toml::Value::String(KEY_PREFIX.to_owned()),
        );
        counters.insert("shards".to_owned(), toml::Value::Integer(REDIS_SHARDS));
        counters.insert(
            "flush_interval_ms".to_owned(),
            toml::Value::Integer(REDIS_FLUSH_INTERVAL_MS),
        );
        config.insert("counters".to_owned(), toml::Value::Table(counters));
        config
    }
}

/// Scales a quota per 60 s to `window_seconds`, keeping at least 1 request.
fn scaled_quota(per_minute: u64, window_seconds: u64) -> u64 {
    (per_minute * window_seconds / 60).max(1)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn setup(args: &[&str]) -> anyhow::Result<Setup> {
        let mut all = vec!["veo-accuracy"];
        all.extend_from_slice(args);
        Setup::new(&Args::try_parse_from(all)?)
    }

    #[test]
    fn redis_sidecar_config_has_the_shared_counters() {
        let config = setup(&[])
            .unwrap()
            .sidecar_config("redis://127.0.0.1:7000/");
        assert_eq!(config["window_seconds"].as_integer(), Some(10));
        assert_eq!(config["sync_interval_near_ms"].as_integer(), Some(100));
        assert_eq!(config["near_quota_fraction"].as_float(), Some(0.0));
        let counters = config["counters"].as_table().unwrap();
        assert_eq!(counters["backend"].as_str(), Some("redis"));
        assert_eq!(
            counters["redis_url"].as_str(),
            Some("redis://127.0.0.1:7000/")
        );
        assert_eq!(counters["key_prefix"].as_str(), Some(KEY_PREFIX));
        assert_eq!(counters["shards"].as_integer(), Some(1));
        assert_eq!(counters["flush_interval_ms"].as_integer(), Some(100));
    }

    #[test]
    fn embedded_sidecar_config_has_only_the_window() {
        let setup = setup(&["--counters", "embedded", "--window-seconds", "6"]).unwrap();
        let config = setup.sidecar_config("redis://unused/");
        assert_eq!(config.len(), 1);
        assert_eq!(config["window_seconds"].as_integer(), Some(6));
    }

    #[test]
    fn tiers_reach_filter_and_oracle_alike() {
        let setup = setup(&["--window-seconds", "30"]).unwrap();
        let tiers = &setup.plugin_config.to_json()["tiers"];
        assert_eq!(tiers["basic"]["quota"]["requests"], 30);
        assert_eq!(tiers["pro"]["quota"]["requests"], 300);
        assert_eq!(tiers["pro"]["quota"]["window_seconds"], 30);
        assert_eq!(setup.quota_of("basic"), Some(30));
        assert_eq!(setup.quota_of("pro"), Some(300));
        assert_eq!(setup.quota_of("enterprise"), None);
    }

    #[test]
    fn invalid_options_are_rejected() {
        for args in [
            &["--instances", "0"][..],
            &["--duration-seconds", "0"],
            &["--window-seconds", "0"],
            &["--tolerance-seconds", "10"],
            &["--tolerance-seconds=-1"],
            &["--customers", "0"],
            &["--overload", "0"],
            &["--sync-interval-ms", "0"],
        ] {
            let error = setup(args).err();
            assert!(error.is_some(), "{args:?} was accepted");
        }
    }

    #[test]
    fn quotas_scale_with_the_window() {
        assert_eq!(scaled_quota(60, 10), 10);
        assert_eq!(scaled_quota(600, 10), 100);
        assert_eq!(scaled_quota(60, 60), 60);
        assert_eq!(scaled_quota(60, 0), 1);
    }
}
