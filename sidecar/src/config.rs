//! Sidecar configuration: a TOML file overridden by flags, validated once at
//! start into an immutable [`Config`].

pub mod billing;
mod file;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::IntoConnectionInfo;

use crate::allowance::AllowanceSettings;
use crate::cli::Flags;
use crate::counters::redis::{NoticeKey, RedisSettings, RedisTarget};
use file::{FileConfig, FileCounters, FileTier};
use veo_proto::sync::TierLimits;

/// Address served when neither the file nor `--listen` sets one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// Store directory used when neither the file nor `--data-dir` sets one.
pub const DEFAULT_DATA_DIR: &str = "./veo-data";
/// Default length of the window that remote usage covers, in seconds.
pub const DEFAULT_WINDOW_SECONDS: i64 = 60;
/// Default cap on usage records in one sync batch.
pub const DEFAULT_MAX_RECORDS_PER_BATCH: i64 = 50_000;
/// Minimum accepted cap on records per batch. The filter sends up to this
/// many records in one batch and resends a rejected batch unchanged, so a
/// lower cap would stop its usage for good.
pub const MIN_MAX_RECORDS_PER_BATCH: i64 = 10_000;
/// Maximum accepted cap on records per batch. The gRPC message limit grows
/// with the cap (358 bytes a record, see [`crate::server`]), so this keeps
/// one call's message under about 35 MB.
pub const MAX_MAX_RECORDS_PER_BATCH: i64 = 100_000;
/// Default time allowed for in-flight calls at shutdown, in seconds.
pub const DEFAULT_SHUTDOWN_GRACE_SECONDS: i64 = 10;
/// Default sync interval requested of an instance near a quota, in
/// milliseconds.
pub const DEFAULT_SYNC_INTERVAL_NEAR_MS: i64 = 100;
/// Default share of a quota from which instances get caps.
pub const DEFAULT_NEAR_QUOTA_FRACTION: f64 = 0.0;
/// Default key prefix in Redis.
pub const DEFAULT_KEY_PREFIX: &str = "veo";
/// Default number of shards (hash tags) on one Redis server: one script
/// call per exchange.
pub const DEFAULT_SHARDS: i64 = 1;
/// Default number of shards on a Redis Cluster, enough to spread the
/// counters over several masters.
pub const DEFAULT_CLUSTER_SHARDS: i64 = 8;
/// Default interval between exchanges with Redis, in milliseconds.
pub const DEFAULT_FLUSH_INTERVAL_MS: i64 = 100;
/// Default deadline of one Redis exchange, in milliseconds.
pub const DEFAULT_REDIS_TIMEOUT_MS: i64 = 500;
/// Default lifetime of the per-minute totals in Redis, in seconds (two
/// days).
pub const DEFAULT_TOTALS_TTL_SECONDS: i64 = 172_800;

/// Backend of the counters shared between sidecars.
#[derive(Debug, Clone)]
pub enum CountersConfig {
    /// Counts of this sidecar's instances only, for one host.
    Embedded,
    /// Redis, shared by every sidecar with the same key prefix.
    Redis(RedisConfig),
}

/// Settings of the Redis counters.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// Connection and key layout.
    pub settings: RedisSettings,
    /// Interval between exchanges with Redis.
    pub flush_interval: Duration,
    /// Identifier of this sidecar in Redis; generated and kept in the data
    /// directory when not configured.
    pub sidecar_id: Option<String>,
}

/// Validated runtime configuration; built only by [`Config::load`].
#[derive(Debug, Clone)]
pub struct Config {
    origin: Origin,
    listen: SocketAddr,
    data_dir: PathBuf,
    ready_file: Option<PathBuf>,
    window_seconds: u32,
    max_records_per_batch: usize,
    shutdown_grace: Duration,
    allowance: AllowanceSettings,
    counters: CountersConfig,
    tiers: Vec<TierLimits>,
    billing: billing::BillingConfig,
    privacy: PrivacyConfig,
}

/// Settings of erasure and of the encryption of personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivacyConfig {
    /// File of the local key-encryption keys; `DATA_DIR/keys.json` by
    /// default.
    pub key_file: PathBuf,
    /// Maximum lifetime of a token the issuer signs, in seconds. An erased
    /// customer's tokens are rejected this long after the erasure.
    pub token_lifetime_seconds: i64,
    /// gRPC addresses (`http://host:port`) of the peer sidecars that an
    /// erasure asked of this sidecar is passed on to until each succeeds.
    /// These are sidecars with their own store, such as one of each other
    /// region, and any that must get every erasure even after a long stop.
    pub erasure_peers: Vec<String>,
}

/// Most peers an erasure is passed on to.
const MAX_ERASURE_PEERS: usize = 32;

/// Default longest token lifetime: one day.
const DEFAULT_TOKEN_LIFETIME_S: i64 = 86_400;
/// Largest accepted token lifetime: 90 days.
const MAX_TOKEN_LIFETIME_S: i64 = 90 * 86_400;

/// Source of a configuration value, named in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Built-in default.
    Default,
    /// The config file at this path.
    File(PathBuf),
    /// A command-line flag such as `--listen`.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("the built-in defaults"),
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("failed to read config file {}; check the path given to --config", path.display())]
    Read {
        /// Path of the config file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key or wrong type.
    #[error("invalid config file {}; fix or remove the key shown below", path.display())]
    Parse {
        /// Path of the config file.
        path: PathBuf,
        /// Parser error, naming the line and key.
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value outside its allowed range.
    #[error("invalid {key} = {value} in {origin}: {reason}")]
    Invalid {
        /// Source of the value.
        origin: Origin,
        /// Config key, or flag name for flags.
        key: &'static str,
        /// The rejected value as given.
        value: String,
        /// Allowed values, and so what to change.
        reason: String,
    },
}

impl Config {
    /// Loads the file named by `--config` (when given), applies the flags
    /// over it and validates every key.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let (file, file_origin) = match &flags.config {
            Some(path) => (FileConfig::read(path)?, Origin::File(path.clone())),
            None => (FileConfig::default(), Origin::Default),
        };
        Config::build(file, file_origin, flags)
    }

    fn build(file: FileConfig, file_origin: Origin, flags: &Flags) -> Result<Config, ConfigError> {
        let (listen, listen_origin) = layer(
            (flags.listen.clone(), "--listen"),
            (file.listen, &file_origin),
        )
        .unwrap_or_else(|| (DEFAULT_LISTEN.into(), Origin::Default));
        let listen = parse_listen(&listen, listen_origin)?;

        let (data_dir, data_dir_origin) = layer(
            (flags.data_dir.clone(), "--data-dir"),
            (file.data_dir, &file_origin),
        )
        .unwrap_or_else(|| (DEFAULT_DATA_DIR.into(), Origin::Default));
        require_path("data_dir", &data_dir, data_dir_origin)?;

        let ready_file = layer(
            (flags.ready_file.clone(), "--ready-file"),
            (file.ready_file, &file_origin),
        );
        if let Some((path, origin)) = &ready_file {
            require_file_name("ready_file", path, origin.clone())?;
        }

        let setting = |key: &'static str, value: Option<i64>, default: i64| match value {
            Some(value) => Setting {
                key,
                origin: file_origin.clone(),
                value,
            },
            None => Setting {
                key,
                origin: Origin::Default,
                value: default,
            },
        };
        let window = setting(
            "window_seconds",
            file.window_seconds,
            DEFAULT_WINDOW_SECONDS,
        );
        let max_records = setting(
            "max_records_per_batch",
            file.max_records_per_batch,
            DEFAULT_MAX_RECORDS_PER_BATCH,
        );
        let grace = setting(
            "shutdown_grace_seconds",
            file.shutdown_grace_seconds,
            DEFAULT_SHUTDOWN_GRACE_SECONDS,
        );

        let near_ms = setting(
            "sync_interval_near_ms",
            file.sync_interval_near_ms,
            DEFAULT_SYNC_INTERVAL_NEAR_MS,
        );
        let near_fraction = file
            .near_quota_fraction
            .unwrap_or(DEFAULT_NEAR_QUOTA_FRACTION);
        if !(0.0..=1.0).contains(&near_fraction) {
            return Err(ConfigError::Invalid {
                origin: file_origin.clone(),
                key: "near_quota_fraction",
                value: near_fraction.to_string(),
                reason: "must be between 0 and 1, the share of the quota used from which \
                         instances get caps"
                    .into(),
            });
        }
        let allowance = AllowanceSettings {
            near_quota_fraction: near_fraction,
            near_sync_ms: near_ms.within(10, 60_000, "milliseconds")?,
        };
        let counters = counters_config(file.counters, &file_origin, flags.redis_url.clone())?;
        let window_seconds: u32 = window.within(1, 3600, "seconds")?;
        let tiers = tiers_config(file.tiers, &file_origin, window_seconds)?;
        let billing = billing::billing_config(file.billing, &file_origin, flags, &data_dir)?;
        let price_tiers = billing
            .webhook
            .price_tiers
            .values()
            .map(|tier| ("billing.prices", tier));
        let canceled = ("billing.canceled_tier", &billing.webhook.canceled_tier);
        for (key, tier) in price_tiers.chain([canceled]) {
            if !tiers.is_empty() && !tiers.iter().any(|known| &known.name == tier) {
                return Err(ConfigError::Invalid {
                    origin: file_origin.clone(),
                    key,
                    value: format!("{tier:?}"),
                    reason: "names no tier of the [tiers.<name>] tables".into(),
                });
            }
        }

        let file_privacy = file.privacy.unwrap_or_default();
        let token_lifetime_seconds = file_privacy
            .token_lifetime_seconds
            .unwrap_or(DEFAULT_TOKEN_LIFETIME_S);
        if !(60..=MAX_TOKEN_LIFETIME_S).contains(&token_lifetime_seconds) {
            return Err(ConfigError::Invalid {
                origin: file_origin.clone(),
                key: "privacy.token_lifetime_seconds",
                value: token_lifetime_seconds.to_string(),
                reason: format!(
                    "must be between 60 and {MAX_TOKEN_LIFETIME_S} seconds: the longest \
                     lifetime (exp minus iat) of the tokens your issuer signs"
                ),
            });
        }
        let privacy = PrivacyConfig {
            key_file: file_privacy
                .key_file
                .unwrap_or_else(|| data_dir.join("keys.json")),
            token_lifetime_seconds,
            erasure_peers: erasure_peers(
                &file_origin,
                file_privacy.erasure_peers.unwrap_or_default(),
            )?,
        };

        Ok(Config {
            allowance,
            counters,
            tiers,
            billing,
            privacy,
            origin: file_origin,
            listen,
            data_dir,
            ready_file: ready_file.map(|(path, _)| path),
            window_seconds,
            max_records_per_batch: max_records.within(
                MIN_MAX_RECORDS_PER_BATCH,
                MAX_MAX_RECORDS_PER_BATCH,
                "records, since the filter sends up to 10000 records in one batch",
            )?,
            shutdown_grace: Duration::from_secs(grace.within(0, 3600, "seconds")?),
        })
    }

    /// Returns the config file the settings came from, or the built-in
    /// defaults.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Address to bind; port 0 means any free port.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// Directory holding the SQLite store.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// File that receives the bound address once serving, when set.
    pub fn ready_file(&self) -> Option<&Path> {
        self.ready_file.as_deref()
    }

    /// Length of the window that remote usage covers, in seconds.
    pub fn window_seconds(&self) -> u32 {
        self.window_seconds
    }

    /// Maximum number of usage records accepted in one sync batch.
    pub fn max_records_per_batch(&self) -> usize {
        self.max_records_per_batch
    }

    /// Time in-flight calls get to finish after SIGTERM or SIGINT.
    pub fn shutdown_grace(&self) -> Duration {
        self.shutdown_grace
    }

    /// Returns the allowance settings: when caps start and the sync
    /// interval near a quota.
    pub fn allowance(&self) -> AllowanceSettings {
        self.allowance
    }

    /// Returns the backend of the counters shared between sidecars.
    pub fn counters(&self) -> &CountersConfig {
        &self.counters
    }

    /// Tier limits pushed to every instance; empty leaves each instance's
    /// own.
    pub fn tiers(&self) -> &[TierLimits] {
        &self.tiers
    }

    /// Erasure and encryption settings.
    pub fn privacy(&self) -> &PrivacyConfig {
        &self.privacy
    }

    /// Billing, webhook and HTTP settings.
    pub fn billing(&self) -> &billing::BillingConfig {
        &self.billing
    }

    /// Reads the config file again and returns its tier limits, for a
    /// reload on SIGHUP; other keys take effect only at the next start.
    pub fn reload_tiers(&self) -> Result<Vec<TierLimits>, ConfigError> {
        let Origin::File(path) = &self.origin else {
            return Ok(self.tiers.clone());
        };
        let file = FileConfig::read(path)?;
        tiers_config(file.tiers, &self.origin, self.window_seconds)
    }
}

/// Maximum quota of a tier, in requests per window.
const MAX_TIER_QUOTA: i64 = 100_000;
/// Maximum token-bucket size, in requests.
const MAX_TIER_BURST: i64 = 1_000_000;

/// Validates the `[tiers.<name>]` tables into the limits sent to the
/// filters, with the quota window of `window_seconds`.
fn tiers_config(
    file: Option<std::collections::BTreeMap<String, FileTier>>,
    origin: &Origin,
    window_seconds: u32,
) -> Result<Vec<TierLimits>, ConfigError> {
    let Some(file) = file else {
        return Ok(Vec::new());
    };
    let invalid = |key: &'static str, value: String, reason: String| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        value,
        reason,
    };
    let mut tiers = Vec::with_capacity(file.len());
    for (name, tier) in file {
        if !billing::is_tier_name(&name) {
            return Err(invalid(
                "tiers",
                format!("{name:?}"),
                "tier names are 1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`".into(),
            ));
        }
        let quota = tier.quota_requests.unwrap_or(0);
        if !(0..=MAX_TIER_QUOTA).contains(&quota) {
            return Err(invalid(
                "tiers.<name>.quota_requests",
                format!("{quota} (tier {name})"),
                format!(
                    "must be 0 to {MAX_TIER_QUOTA} requests per window; 0 or absent means no \
                     quota, and then the tier needs a burst"
                ),
            ));
        }
        let rate = tier.burst_rate_per_second.unwrap_or(0.0);
        let size = tier.burst_size_requests.unwrap_or(0);
        let burst_given =
            tier.burst_rate_per_second.is_some() || tier.burst_size_requests.is_some();
        let burst_valid = rate.is_finite()
            && rate > 0.0
            && rate <= 1_000_000.0
            && (1..=MAX_TIER_BURST).contains(&size);
        if burst_given && !burst_valid {
            return Err(invalid(
                "tiers.<name>.burst_rate_per_second",
                format!("{rate} with burst_size_requests = {size} (tier {name})"),
                format!(
                    "a burst needs both a rate above 0 and up to 1000000 per second and a size \
                     of 1 to {MAX_TIER_BURST}"
                ),
            ));
        }
        if quota == 0 && !burst_given {
            return Err(invalid(
                "tiers.<name>.quota_requests",
                format!("{quota} (tier {name}, no burst)"),
                "a tier needs a limit: set quota_requests above 0, or a burst \
                 (burst_rate_per_second and burst_size_requests), or both"
                    .into(),
            ));
        }
        tiers.push(TierLimits {
            name,
            quota_requests: u64::try_from(quota).unwrap_or(0),
            window_ms: if quota > 0 {
                u64::from(window_seconds) * 1000
            } else {
                0
            },
            burst_rate_per_second: if burst_given { rate } else { 0.0 },
            burst_size_requests: if burst_given {
                u64::try_from(size).unwrap_or(0)
            } else {
                0
            },
        });
    }
    Ok(tiers)
}

/// Validates the `[counters]` table, with `--redis-url` over it.
fn counters_config(
    file: Option<FileCounters>,
    file_origin: &Origin,
    redis_url_flag: Option<String>,
) -> Result<CountersConfig, ConfigError> {
    let file = file.unwrap_or_default();
    let invalid =
        |origin: Origin, key: &'static str, value: String, reason: String| ConfigError::Invalid {
            origin,
            key,
            value,
            reason,
        };
    let backend = match (&redis_url_flag, file.backend.as_deref()) {
        (Some(_), _) => "redis",
        (None, None) => "embedded",
        (None, Some(backend @ ("embedded" | "redis"))) => backend,
        (None, Some(other)) => {
            return Err(invalid(
                file_origin.clone(),
                "counters.backend",
                format!("{other:?}"),
                "must be \"embedded\" (one host) or \"redis\" (counters shared through Redis)"
                    .into(),
            ));
        }
    };
    if backend == "embedded" {
        let redis_keys = [
            ("counters.redis_url", file.redis_url.is_some()),
            (
                "counters.redis_cluster_urls",
                file.redis_cluster_urls.is_some(),
            ),
            ("counters.key_prefix", file.key_prefix.is_some()),
            ("counters.shards", file.shards.is_some()),
            (
                "counters.flush_interval_ms",
                file.flush_interval_ms.is_some(),
            ),
            ("counters.timeout_ms", file.timeout_ms.is_some()),
            (
                "counters.totals_ttl_seconds",
                file.totals_ttl_seconds.is_some(),
            ),
            ("counters.sidecar_id", file.sidecar_id.is_some()),
            ("counters.notice_key_file", file.notice_key_file.is_some()),
        ];
        if let Some((key, _)) = redis_keys.into_iter().find(|(_, set)| *set) {
            return Err(invalid(
                file_origin.clone(),
                key,
                "(set)".into(),
                "applies only to the Redis counters, and counters.backend is \"embedded\"; set \
                 backend = \"redis\" to share the counters, or remove the key"
                    .into(),
            ));
        }
        return Ok(CountersConfig::Embedded);
    }

    let check_url = |url: &str, origin: Origin, key: &'static str| {
        url.into_connection_info().map(|_| ()).map_err(|error| {
            invalid(
                origin,
                key,
                format!("{url:?}"),
                format!("not a Redis URL ({error}); write it as redis://HOST:PORT/"),
            )
        })
    };
    let target = match (redis_url_flag, file.redis_url, file.redis_cluster_urls) {
        (Some(url), _, _) => {
            check_url(&url, Origin::Flag("--redis-url"), "redis_url")?;
            RedisTarget::Standalone(url)
        }
        (None, Some(_), Some(_)) => {
            return Err(invalid(
                file_origin.clone(),
                "counters.redis_cluster_urls",
                "[...]".into(),
                "give either counters.redis_url (one server) or counters.redis_cluster_urls \
                 (Redis Cluster seeds), not both"
                    .into(),
            ));
        }
        (None, Some(url), None) => {
            check_url(&url, file_origin.clone(), "counters.redis_url")?;
            RedisTarget::Standalone(url)
        }
        (None, None, Some(urls)) if !urls.is_empty() => {
            for url in &urls {
                check_url(url, file_origin.clone(), "counters.redis_cluster_urls")?;
            }
            RedisTarget::Cluster(urls)
        }
        (None, None, _) => {
            return Err(invalid(
                file_origin.clone(),
                "counters.redis_url",
                "(missing)".into(),
                "backend \"redis\" needs counters.redis_url or counters.redis_cluster_urls".into(),
            ));
        }
    };

    let key_prefix = file.key_prefix.unwrap_or_else(|| DEFAULT_KEY_PREFIX.into());
    let prefix_ok = !key_prefix.is_empty()
        && key_prefix.len() <= 64
        && key_prefix
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b':'));
    if !prefix_ok {
        return Err(invalid(
            file_origin.clone(),
            "counters.key_prefix",
            format!("{key_prefix:?}"),
            "must be 1 to 64 characters of A-Z, a-z, 0-9, `_`, `-`, `.` and `:`".into(),
        ));
    }
    if let Some(id) = &file.sidecar_id {
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.'));
        if !id_ok {
            return Err(invalid(
                file_origin.clone(),
                "counters.sidecar_id",
                format!("{id:?}"),
                "must be 1 to 128 characters of A-Z, a-z, 0-9, `_`, `-` and `.`, unique among \
                 the sidecars sharing Redis"
                    .into(),
            ));
        }
    }
    let notice_key = match &file.notice_key_file {
        Some(path) => Some(NoticeKey::read(path).map_err(|error| {
            invalid(
                file_origin.clone(),
                "counters.notice_key_file",
                format!("{:?}", path.display().to_string()),
                format!(
                    "{}; `veo-sidecar new-notice-key --out FILE` writes a new key, and every \
                     sidecar sharing the key prefix needs a copy of the same file",
                    crate::error_chain(&error)
                ),
            )
        })?),
        None => None,
    };
    let number = |key: &'static str, value: Option<i64>, default: i64| Setting {
        key,
        origin: if value.is_some() {
            file_origin.clone()
        } else {
            Origin::Default
        },
        value: value.unwrap_or(default),
    };
    let default_shards = match target {
        RedisTarget::Standalone(_) => DEFAULT_SHARDS,
        RedisTarget::Cluster(_) => DEFAULT_CLUSTER_SHARDS,
    };
    let shards =
        number("counters.shards", file.shards, default_shards).within(1, 1024, "shards")?;
    let flush_ms: u64 = number(
        "counters.flush_interval_ms",
        file.flush_interval_ms,
        DEFAULT_FLUSH_INTERVAL_MS,
    )
    .within(10, 60_000, "milliseconds")?;
    let timeout_ms: u64 = number(
        "counters.timeout_ms",
        file.timeout_ms,
        DEFAULT_REDIS_TIMEOUT_MS,
    )
    .within(10, 60_000, "milliseconds")?;
    let totals_ttl_seconds = number(
        "counters.totals_ttl_seconds",
        file.totals_ttl_seconds,
        DEFAULT_TOTALS_TTL_SECONDS,
    )
    .within(60, 31_536_000, "seconds")?;
    Ok(CountersConfig::Redis(RedisConfig {
        settings: RedisSettings {
            target,
            key_prefix,
            shards,
            totals_ttl_seconds,
            timeout: Duration::from_millis(timeout_ms),
            notice_key,
        },
        flush_interval: Duration::from_millis(flush_ms),
        sidecar_id: file.sidecar_id,
    }))
}

/// One integer key with the origin of its value.
struct Setting {
    key: &'static str,
    origin: Origin,
    value: i64,
}

impl Setting {
    /// Returns the value converted to `T` when it lies in `min..=max`.
    fn within<T: TryFrom<i64>>(self, min: i64, max: i64, unit: &str) -> Result<T, ConfigError> {
        let invalid = || ConfigError::Invalid {
            origin: self.origin.clone(),
            key: self.key,
            value: self.value.to_string(),
            reason: format!("must be between {min} and {max} {unit}"),
        };
        if !(min..=max).contains(&self.value) {
            return Err(invalid());
        }
        T::try_from(self.value).map_err(|_| invalid())
    }
}

/// Picks the flag's value over the file's, with where it came from.
fn layer<T>(
    (flag, flag_name): (Option<T>, &'static str),
    (file, file_origin): (Option<T>, &Origin),
) -> Option<(T, Origin)> {
    match (flag, file) {
        (Some(value), _) => Some((value, Origin::Flag(flag_name))),
        (None, Some(value)) => Some((value, file_origin.clone())),
        (None, None) => None,
    }
}

fn parse_listen(text: &str, origin: Origin) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| ConfigError::Invalid {
        origin,
        key: "listen",
        value: format!("{text:?}"),
        reason: "expected IP:PORT such as 127.0.0.1:50051 (port 0 picks a free port)".into(),
    })
}

/// Checks `privacy.erasure_peers` and returns each address in the form
/// `http://host:port` (lowercase, no leading zeros), so that one peer
/// written two ways is caught as listed twice: at most
/// [`MAX_ERASURE_PEERS`] addresses, without credentials, path, query or
/// fragment.
fn erasure_peers(origin: &Origin, peers: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let invalid = |value: &str, reason: String| ConfigError::Invalid {
        origin: origin.clone(),
        key: "privacy.erasure_peers",
        value: format!("{value:?}"),
        reason,
    };
    if peers.len() > MAX_ERASURE_PEERS {
        return Err(invalid(
            &format!("{} addresses", peers.len()),
            format!("list at most {MAX_ERASURE_PEERS} peer sidecars"),
        ));
    }
    let mut canonical = Vec::with_capacity(peers.len());
    for peer in &peers {
        let address = canonical_peer_address(peer);
        let Some(address) = address else {
            return Err(invalid(
                peer,
                "expected the gRPC address of a peer sidecar as http://HOST:PORT, with a DNS \
                 name or an IP address as HOST, a port from 1 to 65535 and no credentials, \
                 path or query, such as \
                 http://sidecar.us-east.internal:50051; for TLS, route it through the mesh's \
                 proxy"
                    .into(),
            ));
        };
        if canonical.contains(&address) {
            return Err(invalid(peer, format!("names {address} a second time")));
        }
        canonical.push(address);
    }
    Ok(canonical)
}

/// Returns the address of a peer sidecar in the form `http://host:port`
/// (see [`peer_host`]), or `None` when it is not `http://HOST:PORT` with a
/// port from 1 to 65535 and no credentials, path, query or fragment.
pub fn canonical_peer_address(peer: &str) -> Option<String> {
    let uri: tonic::codegen::http::Uri = peer.parse().ok()?;
    let authority = uri.authority()?;
    let plain = uri.scheme_str()?.eq_ignore_ascii_case("http")
        && !authority.as_str().contains('@')
        && !peer.contains(['?', '#'])
        && uri.path() == "/";
    let digits = uri.port()?.as_str().bytes().all(|b| b.is_ascii_digit());
    let port = uri.port_u16().filter(|port| *port != 0 && digits)?;
    let host = peer_host(authority.host())?;
    plain.then(|| format!("http://{host}:{port}"))
}

/// Returns `host` in its standard form: an IP address as Rust writes it
/// (IPv6 in brackets), or a DNS name in lowercase whose last label starts
/// with a letter. Other forms that resolvers accept, such as `127.1`,
/// `0x7f000001` or a trailing dot, give `None`, so one peer cannot be
/// listed twice under two spellings.
fn peer_host(host: &str) -> Option<String> {
    if let Some(inner) = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| format!("[{ip}]"));
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(ip.to_string());
    }
    let name = host.to_ascii_lowercase();
    let labels_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    let last_ok = name
        .rsplit('.')
        .next()
        .and_then(|label| label.bytes().next())
        .is_some_and(|first| first.is_ascii_alphabetic());
    (labels_ok && last_ok).then_some(name)
}

fn require_path(key: &'static str, path: &Path, origin: Origin) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Invalid {
            origin,
            key,
            value: "\"\"".into(),
            reason: "must name a directory".into(),
        });
    }
    Ok(())
}

fn require_file_name(key: &'static str, path: &Path, origin: Origin) -> Result<(), ConfigError> {
    // `Path::file_name` ignores a trailing `/`, so check for it and for an
    // existing directory too, because renaming the file into place fails.
    let trailing_separator = path.as_os_str().to_string_lossy().ends_with('/');
    if path.file_name().is_none() || trailing_separator || path.is_dir() {
        return Err(ConfigError::Invalid {
            origin,
            key,
            value: format!("{:?}", path.display().to_string()),
            reason: "must name a file, not a directory".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("sidecar.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn flags_for(path: &Path) -> Flags {
        Flags {
            config: Some(path.to_path_buf()),
            ..Flags::default()
        }
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let config = Config::load(&Flags::default()).unwrap();

        assert_eq!(
            config.listen(),
            DEFAULT_LISTEN.parse::<SocketAddr>().unwrap()
        );
        assert_eq!(config.data_dir(), Path::new(DEFAULT_DATA_DIR));
        assert_eq!(config.ready_file(), None);
        assert_eq!(config.window_seconds(), 60);
        assert_eq!(config.max_records_per_batch(), 50_000);
        assert_eq!(config.shutdown_grace(), Duration::from_secs(10));
        assert_eq!(config.origin(), &Origin::Default);
    }

    #[test]
    fn file_sets_every_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            &dir,
            "listen = \"127.0.0.1:7000\"\ndata_dir = \"/var/lib/veo\"\n\
             ready_file = \"/run/veo/ready\"\nwindow_seconds = 30\n\
             max_records_per_batch = 10000\nshutdown_grace_seconds = 0\n",
        );

        let config = Config::load(&flags_for(&path)).unwrap();

        assert_eq!(config.listen().port(), 7000);
        assert_eq!(config.data_dir(), Path::new("/var/lib/veo"));
        assert_eq!(config.ready_file(), Some(Path::new("/run/veo/ready")));
        assert_eq!(config.window_seconds(), 30);
        assert_eq!(config.max_records_per_batch(), 10_000);
        assert_eq!(config.shutdown_grace(), Duration::ZERO);
        assert_eq!(config.origin(), &Origin::File(path));
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            &dir,
            "listen = \"127.0.0.1:7000\"\ndata_dir = \"/a\"\nready_file = \"/b\"\n",
        );
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some("/c".into()),
            ready_file: Some("/d".into()),
            ..flags_for(&path)
        };

        let config = Config::load(&flags).unwrap();

        assert_eq!(config.listen().port(), 0);
        assert_eq!(config.data_dir(), Path::new("/c"));
        assert_eq!(config.ready_file(), Some(Path::new("/d")));
    }

    #[test]
    fn range_error_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, "window_seconds = 0\n");

        let message = Config::load(&flags_for(&path)).unwrap_err().to_string();

        assert_eq!(
            message,
            format!(
                "invalid window_seconds = 0 in config file {}: must be between 1 and 3600 seconds",
                path.display()
            )
        );
    }

    #[test]
    fn every_range_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("window_seconds = 3601", "window_seconds"),
            ("max_records_per_batch = 0", "max_records_per_batch"),
            ("max_records_per_batch = 9999", "max_records_per_batch"),
            ("max_records_per_batch = 100001", "max_records_per_batch"),
            ("shutdown_grace_seconds = -1", "shutdown_grace_seconds"),
            ("listen = \"localhost\"", "listen"),
            ("data_dir = \"\"", "data_dir"),
            ("ready_file = \"/run/veo/..\"", "ready_file"),
            ("ready_file = \"/run/veo/\"", "ready_file"),
        ];

        for (text, key) in cases {
            let path = write_config(&dir, text);

            match Config::load(&flags_for(&path)) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("expected {key} to be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn counter_and_tier_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("near_quota_fraction = 1.5", "near_quota_fraction"),
            ("sync_interval_near_ms = 5", "sync_interval_near_ms"),
            ("[counters]\nbackend = \"memcached\"", "counters.backend"),
            ("[counters]\nshards = 0", "counters.shards"),
            (
                "[counters]\nredis_url = \"redis://127.0.0.1/\"",
                "counters.redis_url",
            ),
            ("[counters]\nbackend = \"redis\"", "counters.redis_url"),
            (
                "[counters]\nbackend = \"redis\"\nredis_url = \"http://x\"",
                "counters.redis_url",
            ),
            (
                "[counters]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1/\"\n\
                 redis_cluster_urls = [\"redis://127.0.0.1:7000/\"]",
                "counters.redis_cluster_urls",
            ),
            (
                "[counters]\nredis_url = \"redis://127.0.0.1/\"\nbackend = \"redis\"\nshards = 0",
                "counters.shards",
            ),
            (
                "[counters]\nredis_url = \"redis://127.0.0.1/\"\nbackend = \"redis\"\n\
                 key_prefix = \"a{b}\"",
                "counters.key_prefix",
            ),
            (
                "[counters]\nredis_url = \"redis://127.0.0.1/\"\nbackend = \"redis\"\n\
                 notice_key_file = \"/nonexistent/notice.key\"",
                "counters.notice_key_file",
            ),
            (
                "[tiers.basic]\nquota_requests = -1",
                "tiers.<name>.quota_requests",
            ),
            (
                "[tiers.basic]\nburst_size_requests = 5",
                "tiers.<name>.burst_rate_per_second",
            ),
            ("[tiers.gold]", "tiers.<name>.quota_requests"),
            (
                "[tiers.gold]\nquota_requests = 0",
                "tiers.<name>.quota_requests",
            ),
            ("[tiers.\"no way\"]\nquota_requests = 1", "tiers"),
            (
                "[tiers.basic]\nquota_requests = 5\n[billing]\ncanceled_tier = \"nosuch\"",
                "billing.canceled_tier",
            ),
            ("[billing]\noutbox_file = \"\"", "billing.outbox_file"),
            ("[billing]\noutbox_file = \"/tmp/\"", "billing.outbox_file"),
            ("[billing]\noutbox_file = \"/\"", "billing.outbox_file"),
        ];

        for (text, key) in cases {
            let path = write_config(&dir, text);

            match Config::load(&flags_for(&path)) {
                Err(ConfigError::Invalid { key: got, .. }) => assert_eq!(got, key, "{text}"),
                other => panic!("expected {key} to be rejected, got {other:?}"),
            }
        }
    }

    #[test]
    fn redis_and_tiers_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(
            &dir,
            "window_seconds = 30\n[counters]\nbackend = \"redis\"\n\
             redis_url = \"redis://127.0.0.1:6390/\"\nshards = 8\n\
             [tiers.basic]\nquota_requests = 20\n\
             [tiers.enterprise]\nburst_rate_per_second = 5.0\nburst_size_requests = 10\n",
        );

        let config = Config::load(&flags_for(&path)).unwrap();

        let CountersConfig::Redis(redis) = config.counters() else {
            panic!("expected Redis counters");
        };
        assert_eq!(redis.settings.shards, 8);
        assert_eq!(
            config
                .tiers()
                .iter()
                .map(|tier| (tier.name.as_str(), tier.quota_requests, tier.window_ms))
                .collect::<Vec<_>>(),
            [("basic", 20, 30_000), ("enterprise", 0, 0)]
        );
        assert_eq!(config.tiers()[1].burst_size_requests, 10);

        std::fs::write(
            &path,
            "window_seconds = 30\n[tiers.basic]\nquota_requests = 7\n",
        )
        .unwrap();
        assert_eq!(config.reload_tiers().unwrap()[0].quota_requests, 7);
    }

    #[test]
    fn notice_key_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("notice.key");
        NoticeKey::create(&key_file).unwrap();
        let path = write_config(
            &dir,
            &format!(
                "[counters]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6390/\"\n\
                 notice_key_file = {:?}\n",
                key_file.display().to_string()
            ),
        );

        let config = Config::load(&flags_for(&path)).unwrap();

        let CountersConfig::Redis(redis) = config.counters() else {
            panic!("expected Redis counters");
        };
        assert_eq!(
            redis.settings.notice_key,
            Some(NoticeKey::read(&key_file).unwrap())
        );
    }

    #[test]
    fn redis_url_flag_selects_redis() {
        let flags = Flags {
            redis_url: Some("redis://127.0.0.1:6391/".into()),
            ..Flags::default()
        };
        let config = Config::load(&flags).unwrap();
        assert!(matches!(config.counters(), CountersConfig::Redis(_)));
    }

    #[test]
    fn batch_limit_below_filter_batch_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(&dir, "max_records_per_batch = 1000\n");

        let message = Config::load(&flags_for(&path)).unwrap_err().to_string();

        assert!(
            message.contains("max_records_per_batch = 1000"),
            "{message}"
        );
        assert!(message.contains("10000"), "{message}");
        assert!(message.contains("filter"), "{message}");
    }

    #[test]
    fn ready_file_naming_a_directory_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Flags {
            ready_file: Some(dir.path().to_path_buf()),
            ..Flags::default()
        };

        let message = Config::load(&flags).unwrap_err().to_string();

        assert!(message.contains("flag --ready-file"), "{message}");
        assert!(message.contains("directory"), "{message}");
    }

    #[test]
    fn erasure_peers_are_checked() {
        let load = |peers: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sidecar.toml");
            std::fs::write(&path, format!("[privacy]\nerasure_peers = {peers}\n")).unwrap();
            let flags = Flags {
                config: Some(path),
                data_dir: Some(dir.path().join("data")),
                ..Flags::default()
            };
            Config::load(&flags).map(|config| config.privacy().erasure_peers.clone())
        };

        let peers = load(r#"["http://10.0.0.2:50051/", "http://[::1]:50052"]"#).unwrap();
        assert_eq!(peers, ["http://10.0.0.2:50051", "http://[::1]:50052"]);
        for (peers, named) in [
            (r#"["10.0.0.2:50051"]"#, "\"10.0.0.2:50051\""),
            (r#"["https://a:1"]"#, "https://a:1"),
            (r#"["http://a"]"#, "http://a"),
            (r#"["http://a:1/veo"]"#, "http://a:1/veo"),
            (
                r#"["http://a:1", "HTTP://A:01/"]"#,
                "names http://a:1 a second time",
            ),
            (r#"["http://user:secret@a:1"]"#, "no credentials"),
            (r#"["http://a:0"]"#, "http://a:0"),
            (r#"["http://a:1#frag"]"#, "http://a:1#frag"),
            (r#"["http://127.1:5"]"#, "http://127.1:5"),
            (r#"["http://2130706433:5"]"#, "http://2130706433:5"),
            (r#"["http://0x7f000001:5"]"#, "http://0x7f000001:5"),
            (r#"["http://a.:5"]"#, "http://a.:5"),
            (r#"["http://a:+5"]"#, "http://a:+5"),
            (r#"["http://[::1%25lo]:5"]"#, "http://[::1%25lo]:5"),
            (
                r#"["http://[::1]:5", "http://[0:0:0:0:0:0:0:1]:5"]"#,
                "names http://[::1]:5 a second time",
            ),
            (r#"["http://a:1/?x=1"]"#, "http://a:1/?x=1"),
        ] {
            let message = load(peers).unwrap_err().to_string();
            assert!(message.contains("privacy.erasure_peers"), "{message}");
            assert!(message.contains(named), "{message}");
        }
        let many: Vec<String> = (0..=MAX_ERASURE_PEERS)
            .map(|port| format!("\"http://a:{}\"", port + 1))
            .collect();
        let message = load(&format!("[{}]", many.join(",")))
            .unwrap_err()
            .to_string();
        assert!(message.contains("at most 32"), "{message}");
    }

    #[test]
    fn invalid_flag_is_named_as_flag() {
        let flags = Flags {
            listen: Some("127.0.0.1".into()),
            ..Flags::default()
        };

        let message = Config::load(&flags).unwrap_err().to_string();

        assert!(message.contains("listen = \"127.0.0.1\""), "{message}");
        assert!(message.contains("flag --listen"), "{message}");
        assert!(message.contains("IP:PORT"), "{message}");
    }
}
