//! The whole system under test: echo upstream, sidecar and Envoy with the
//! filter, each on a free loopback port, with files in one temporary folder.

use tempfile::TempDir;

use crate::HarnessError;
use crate::client::HttpClient;
use crate::envoy::{BootstrapValues, Envoy, EnvoyProcess};
use crate::plugin::PluginConfig;
use crate::sidecar::Sidecar;
use crate::upstream::EchoUpstream;

/// How the stack is started.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Envoy's worker threads (`--concurrency`).
    pub concurrency: u32,
    /// Config file of the sidecar, when it needs one.
    pub sidecar_toml: Option<String>,
    /// Environment variables added to the sidecar's, such as
    /// `STRIPE_API_KEY`.
    pub sidecar_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            concurrency: 1,
            sidecar_toml: None,
            sidecar_env: Vec::new(),
        }
    }
}

/// A running stack. Dropping it stops Envoy, then the sidecar, then the
/// upstream, and removes the temporary folder with the logs and the store.
#[derive(Debug)]
pub struct Stack {
    /// Envoy with the filter in both roles.
    pub envoy: Envoy,
    /// The sidecar with its embedded store.
    pub sidecar: Sidecar,
    /// The upstream behind Envoy's route.
    pub upstream: EchoUpstream,
    dir: TempDir,
}

impl Stack {
    /// Starts the stack with one Envoy worker and `config` in both filter
    /// roles.
    pub async fn start(config: &PluginConfig) -> Result<Self, HarnessError> {
        Self::start_with(config, StackOptions::default()).await
    }

    /// Starts the stack with `options` and `config` in both filter roles.
    pub async fn start_with(
        config: &PluginConfig,
        options: StackOptions,
    ) -> Result<Self, HarnessError> {
        Self::start_in(temp_dir()?, config, options).await
    }

    /// Starts the stack with its files in `dir`, which it removes when
    /// dropped, so that a caller can put its own files there first.
    pub async fn start_in(
        dir: TempDir,
        config: &PluginConfig,
        options: StackOptions,
    ) -> Result<Self, HarnessError> {
        let upstream = EchoUpstream::start().await?;
        let env: Vec<(&str, &str)> = options
            .sidecar_env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let sidecar =
            Sidecar::start_with_env(dir.path(), options.sidecar_toml.as_deref(), &env).await?;
        let values = BootstrapValues {
            node_id: format!("veo-test-{}", std::process::id()),
            upstream_port: upstream.address().port(),
            sidecar_port: sidecar.address().port(),
            plugin_config: config.to_json(),
        };
        let geo = values.plugin_config.get("geo").is_some();
        let envoy = EnvoyProcess::spawn(dir.path(), &values, options.concurrency)?
            .wait_ready()
            .await?;
        if geo {
            envoy.wait_for_asset_regions().await?;
        }
        Ok(Self {
            envoy,
            sidecar,
            upstream,
            dir,
        })
    }

    /// Returns a client of Envoy's API listener that reuses connections.
    pub fn client(&self) -> HttpClient {
        self.envoy.client()
    }

    /// Returns the folder with the bootstrap, the logs and the sidecar's store.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Creates a temporary folder named `veo-test-*` that is removed when
/// dropped.
pub fn temp_dir() -> Result<TempDir, HarnessError> {
    temp_dir_named("veo-test")
}

/// Creates a temporary folder named `{name}-*` that is removed when dropped.
pub fn temp_dir_named(name: &str) -> Result<TempDir, HarnessError> {
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir()
        .map_err(|source| HarnessError::Io {
            action: "create a temporary folder in",
            path: std::env::temp_dir(),
            source,
        })
}
