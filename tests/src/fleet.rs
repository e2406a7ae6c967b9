//! Several instances of the system under test behind one upstream, as
//! several hosts behind a load balancer run them: each instance is an Envoy
//! with the filter and its own sidecar, and all of them forward to one echo
//! upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tempfile::TempDir;

use crate::HarnessError;
use crate::envoy::{BootstrapValues, Envoy, EnvoyProcess};
use crate::plugin::PluginConfig;
use crate::sidecar::Sidecar;
use crate::stack::temp_dir_named;
use crate::upstream::EchoUpstream;

/// Counter that makes each fleet's node ids unique within this process.
static NEXT_FLEET: AtomicU32 = AtomicU32::new(0);

/// Options for starting a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Number of instances, at least 1.
    pub instances: usize,
    /// Envoy's worker threads per instance (`--concurrency`).
    pub concurrency: u32,
    /// Sidecar config file given to every sidecar. When it has a
    /// `[counters]` table without `sidecar_id`, each sidecar gets
    /// `sidecar_id = "instance-N"` there, N being its instance's index.
    pub sidecar_config: toml::Table,
}

impl FleetOptions {
    /// Returns options for `instances` instances with one Envoy worker each
    /// and an empty sidecar config, so every key keeps its default.
    pub fn new(instances: usize) -> Self {
        Self {
            instances,
            concurrency: 1,
            sidecar_config: toml::Table::new(),
        }
    }
}

/// One instance of a fleet: an Envoy with the filter in both roles and the
/// sidecar that Envoy syncs with.
#[derive(Debug)]
pub struct Instance {
    /// Envoy with the filter.
    pub envoy: Envoy,
    /// The sidecar that only this Envoy syncs with.
    pub sidecar: Sidecar,
    dir: PathBuf,
}

impl Instance {
    /// Returns the folder with this instance's bootstrap, logs, sidecar
    /// config and store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// A running fleet. Dropping it stops every Envoy and sidecar, in instance
/// order, then the upstream, and removes the temporary folder.
#[derive(Debug)]
pub struct Fleet {
    instances: Vec<Instance>,
    /// The upstream behind every Envoy's route.
    pub upstream: EchoUpstream,
    dir: TempDir,
}

impl Fleet {
    /// Starts a fleet with `config` in both filter roles of every Envoy.
    pub async fn start(
        config: &PluginConfig,
        options: &FleetOptions,
    ) -> Result<Self, HarnessError> {
        Self::start_in(temp_dir_named("veo-fleet")?, config, options).await
    }

    /// Starts a fleet with its files in `dir`, one folder `instance-N` per
    /// instance, and removes `dir` when dropped.
    pub async fn start_in(
        dir: TempDir,
        config: &PluginConfig,
        options: &FleetOptions,
    ) -> Result<Self, HarnessError> {
        if options.instances == 0 {
            return Err(HarnessError::InvalidConfig {
                what: "fleet size",
                reason: "0 instances; start at least 1".to_owned(),
            });
        }
        let fleet_number = NEXT_FLEET.fetch_add(1, Ordering::Relaxed);
        let upstream = EchoUpstream::start().await?;

        // The sidecars start in turn, since each is ready within a fraction of
        // a second, while the Envoys start together because each takes seconds
        // to load the filter.
        let mut started = Vec::with_capacity(options.instances);
        for index in 0..options.instances {
            let instance_dir = dir.path().join(format!("instance-{index}"));
            create_dir(&instance_dir)?;
            let sidecar_toml = sidecar_config_for(&options.sidecar_config, index)?;
            let sidecar = Sidecar::start_with_config(&instance_dir, &sidecar_toml).await?;
            let values = BootstrapValues {
                node_id: format!("veo-fleet-{}-{fleet_number}-{index}", std::process::id()),
                upstream_port: upstream.address().port(),
                sidecar_port: sidecar.address().port(),
                plugin_config: config.to_json(),
            };
            let envoy = EnvoyProcess::spawn(&instance_dir, &values, options.concurrency)?;
            started.push((envoy, sidecar, instance_dir));
        }

        let mut instances = Vec::with_capacity(started.len());
        for (envoy, sidecar, dir) in started {
            instances.push(Instance {
                envoy: envoy.wait_ready().await?,
                sidecar,
                dir,
            });
        }
        Ok(Self {
            instances,
            upstream,
            dir,
        })
    }

    /// Returns the instances in start order.
    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Returns the instances in start order, for restarting a sidecar.
    pub fn instances_mut(&mut self) -> &mut [Instance] {
        &mut self.instances
    }

    /// Returns the address of each Envoy's API listener, in instance order.
    pub fn listener_addresses(&self) -> Vec<SocketAddr> {
        self.instances
            .iter()
            .map(|instance| SocketAddr::from(([127, 0, 0, 1], instance.envoy.listener_port())))
            .collect()
    }

    /// Returns `http://ADDRESS` of each Envoy's API listener, in instance
    /// order.
    pub fn listener_urls(&self) -> Vec<String> {
        self.listener_addresses()
            .iter()
            .map(|address| format!("http://{address}"))
            .collect()
    }

    /// Returns the folder that contains every instance's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Returns the sidecar id that [`Fleet`] gives the sidecar of instance
/// `index`.
pub fn sidecar_id(index: usize) -> String {
    format!("instance-{index}")
}

/// Renders `config` as the TOML file of instance `index`'s sidecar, adding
/// its [`sidecar_id`] to a `[counters]` table that has none.
fn sidecar_config_for(config: &toml::Table, index: usize) -> Result<String, HarnessError> {
    let mut config = config.clone();
    if let Some(toml::Value::Table(counters)) = config.get_mut("counters") {
        counters
            .entry("sidecar_id")
            .or_insert_with(|| toml::Value::String(sidecar_id(index)));
    }
    toml::to_string(&config).map_err(|err| HarnessError::InvalidConfig {
        what: "sidecar config",
        reason: err.to_string(),
    })
}

fn create_dir(path: &Path) -> Result<(), HarnessError> {
    std::fs::create_dir_all(path).map_err(|source| HarnessError::Io {
        action: "create",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn sidecar_id_goes_into_counters_table() {
        let config = parse("window_seconds = 10\n[counters]\nbackend = \"redis\"\n");
        let rendered = parse(&sidecar_config_for(&config, 2).unwrap());
        assert_eq!(
            rendered["counters"]["sidecar_id"].as_str(),
            Some("instance-2")
        );
        assert_eq!(rendered["counters"]["backend"].as_str(), Some("redis"));
        assert_eq!(rendered["window_seconds"].as_integer(), Some(10));
    }

    #[test]
    fn given_sidecar_id_is_kept() {
        let config = parse("[counters]\nsidecar_id = \"host-a\"\n");
        let rendered = parse(&sidecar_config_for(&config, 1).unwrap());
        assert_eq!(rendered["counters"]["sidecar_id"].as_str(), Some("host-a"));
    }

    #[test]
    fn config_without_counters_gets_no_sidecar_id() {
        let config = parse("window_seconds = 10\n");
        let rendered = parse(&sidecar_config_for(&config, 0).unwrap());
        assert_eq!(rendered, config);
    }
}
