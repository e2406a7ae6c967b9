//! The TOML config file as written, before validation.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Keys of the config file; every key is optional and unknown keys are
/// rejected. Integers are read as `i64` so that range errors come from
/// validation, with the allowed range in the message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<String>,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) ready_file: Option<PathBuf>,
    pub(super) window_seconds: Option<i64>,
    pub(super) max_records_per_batch: Option<i64>,
    pub(super) shutdown_grace_seconds: Option<i64>,
    pub(super) sync_interval_near_ms: Option<i64>,
    pub(super) near_quota_fraction: Option<f64>,
    pub(super) counters: Option<FileCounters>,
    pub(super) tiers: Option<std::collections::BTreeMap<String, FileTier>>,
    pub(super) billing: Option<super::billing::FileBilling>,
    pub(super) privacy: Option<FilePrivacy>,
}

/// The `[privacy]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePrivacy {
    pub(super) key_file: Option<PathBuf>,
    pub(super) token_lifetime_seconds: Option<i64>,
    pub(super) erasure_peers: Option<Vec<String>>,
}

/// One `[tiers.<name>]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTier {
    pub(super) quota_requests: Option<i64>,
    pub(super) burst_rate_per_second: Option<f64>,
    pub(super) burst_size_requests: Option<i64>,
}

/// The `[counters]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCounters {
    pub(super) backend: Option<String>,
    pub(super) redis_url: Option<String>,
    pub(super) redis_cluster_urls: Option<Vec<String>>,
    pub(super) key_prefix: Option<String>,
    pub(super) shards: Option<i64>,
    pub(super) flush_interval_ms: Option<i64>,
    pub(super) timeout_ms: Option<i64>,
    pub(super) totals_ttl_seconds: Option<i64>,
    pub(super) sidecar_id: Option<String>,
    pub(super) notice_key_file: Option<PathBuf>,
}

impl FileConfig {
    /// Reads and parses the file at `path`.
    pub(super) fn read(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        match FileConfig::parse(text, Path::new("/etc/veo/sidecar.toml")) {
            Ok(config) => panic!("expected an error, parsed {config:?}"),
            Err(ConfigError::Parse { path, source }) => {
                format!("{} {source}", path.display())
            }
            Err(other) => panic!("expected a parse error, got {other}"),
        }
    }

    #[test]
    fn parses_every_key() {
        let text = r#"
            listen = "127.0.0.1:7000"
            data_dir = "/var/lib/veo"
            ready_file = "/run/veo/ready"
            window_seconds = 30
            max_records_per_batch = 100
            shutdown_grace_seconds = 5
        "#;
        let config = FileConfig::parse(text, Path::new("x.toml")).unwrap();

        assert_eq!(config.listen.as_deref(), Some("127.0.0.1:7000"));
        assert_eq!(config.data_dir, Some(PathBuf::from("/var/lib/veo")));
        assert_eq!(config.ready_file, Some(PathBuf::from("/run/veo/ready")));
        assert_eq!(config.window_seconds, Some(30));
        assert_eq!(config.max_records_per_batch, Some(100));
        assert_eq!(config.shutdown_grace_seconds, Some(5));
    }

    #[test]
    fn unknown_key_is_named() {
        let message = parse_error("window_secs = 30\n");

        assert!(message.contains("/etc/veo/sidecar.toml"), "{message}");
        assert!(message.contains("window_secs"), "{message}");
        assert!(message.contains("window_seconds"), "{message}");
    }

    #[test]
    fn wrong_type_names_key_and_value() {
        let message = parse_error("window_seconds = \"sixty\"\n");

        assert!(message.contains("window_seconds"), "{message}");
        assert!(message.contains("sixty"), "{message}");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn missing_file_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");

        let err = FileConfig::read(&path).unwrap_err();

        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
        assert!(err.to_string().contains("absent.toml"), "{err}");
    }
}
