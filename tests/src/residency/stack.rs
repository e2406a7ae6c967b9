//! The residency stack: Envoy on `envoy/residency.yaml` with the filter in
//! both roles, the sidecar, the six storage sites and the default storage.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use super::bootstrap::{self, FailoverSettings, ResidencyValues};
use super::storage::StorageServer;
use super::{DEFAULT_SITE, Region, Site};
use crate::HarnessError;
use crate::artifacts;
use crate::client::HttpClient;
use crate::envoy::{Admin, LISTENER_NAME};
use crate::plugin::PluginConfig;
use crate::process::ChildProcess;
use crate::sidecar::Sidecar;
use crate::stack::temp_dir_named;
use crate::tokens::SigningKey;

/// How long Envoy gets to load the filter and bind its listener.
const READY_TIMEOUT: Duration = Duration::from_secs(45);

/// Size and refill rate per second of the enterprise token bucket in
/// [`plugin_config`], far above what a failover run sends.
const ENTERPRISE_BUCKET: u64 = 1_000_000;

/// Counter that makes each Envoy's base id unique within this process.
static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// How the residency stack is started.
#[derive(Debug, Clone)]
pub struct ResidencyOptions {
    /// Plugin configuration given to both roles of the filter.
    pub plugin_config: PluginConfig,
    /// Health check, retry and ejection settings of the storage clusters.
    pub failover: FailoverSettings,
    /// Envoy's worker threads (`--concurrency`).
    pub concurrency: u32,
}

impl ResidencyOptions {
    /// Returns options with `plugin_config`, the test failover settings and
    /// one Envoy worker.
    pub fn new(plugin_config: PluginConfig) -> Self {
        Self {
            plugin_config,
            failover: FailoverSettings::for_tests(),
            concurrency: 1,
        }
    }
}

/// Health of one site as Envoy's admin `/clusters` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostHealth {
    /// The active health check failed.
    pub failed_active_health_check: bool,
    /// Outlier detection ejected the site.
    pub failed_outlier_check: bool,
}

impl HostHealth {
    /// Returns true when Envoy sends traffic to the site's priority.
    pub fn is_healthy(self) -> bool {
        !self.failed_active_health_check && !self.failed_outlier_check
    }
}

/// A running residency stack. Dropping it stops Envoy, then the sidecar,
/// then the storage sites, and removes the temporary folder.
#[derive(Debug)]
pub struct ResidencyStack {
    envoy: ChildProcess,
    admin: Admin,
    listener_port: u16,
    sidecar: Sidecar,
    /// One server per site, in the order of [`Site::ALL`].
    sites: [StorageServer; 6],
    default: StorageServer,
    dir: TempDir,
}

/// Returns the test plugin configuration trusting `key`, with an
/// enterprise token bucket so large that no request of a failover run is
/// refused. Mint enterprise tokens for the storage requests.
pub fn plugin_config(key: &SigningKey) -> Result<PluginConfig, HarnessError> {
    Ok(PluginConfig::for_key(key)?.set(
        "/tiers/enterprise/burst",
        json!({"tokens_per_second": ENTERPRISE_BUCKET, "size": ENTERPRISE_BUCKET}),
    ))
}

impl ResidencyStack {
    /// Starts the storage sites, the sidecar and Envoy, and waits until
    /// Envoy serves.
    pub async fn start(options: &ResidencyOptions) -> Result<Self, HarnessError> {
        let dir = temp_dir_named("veo-residency")?;
        let default = StorageServer::start(DEFAULT_SITE).await?;
        let [
            eu_west,
            eu_central,
            us_east,
            us_west,
            ap_southeast,
            ap_southeast_b,
        ] = Site::ALL;
        let sites = [
            StorageServer::start(eu_west.name()).await?,
            StorageServer::start(eu_central.name()).await?,
            StorageServer::start(us_east.name()).await?,
            StorageServer::start(us_west.name()).await?,
            StorageServer::start(ap_southeast.name()).await?,
            StorageServer::start(ap_southeast_b.name()).await?,
        ];
        let sidecar = Sidecar::start(dir.path()).await?;
        let geoip_db_path = dir.path().join("countries.mmdb");
        crate::mmdb::write_country_database(&geoip_db_path, &super::CLIENT_COUNTRIES)?;

        let values = ResidencyValues {
            node_id: format!("veo-residency-{}", std::process::id()),
            upstream_port: default.address().port(),
            site_ports: Site::ALL
                .iter()
                .zip(&sites)
                .map(|(site, server)| (*site, server.address().port()))
                .collect(),
            sidecar_port: sidecar.address().port(),
            plugin_config: options.plugin_config.to_json(),
            failover: options.failover,
            geoip_db_path,
            xff_trusted_hops: super::XFF_TRUSTED_HOPS,
        };
        let text = bootstrap::render(&values, &artifacts::filter_wasm()?)?;
        let (envoy, admin, listener_port) =
            spawn_envoy(dir.path(), &text, options.concurrency).await?;
        let stack = Self {
            envoy,
            admin,
            listener_port,
            sidecar,
            sites,
            default,
            dir,
        };

        // Until every site has passed a health check, Envoy spreads each
        // region over both of its sites.
        for site in Site::ALL {
            if stack
                .await_host_health(site, true, READY_TIMEOUT)
                .await?
                .is_none()
            {
                return Err(HarnessError::NotReady {
                    name: format!("storage site {} in Envoy", site.name()),
                    timeout: READY_TIMEOUT,
                    log_tail: stack.envoy.log_tail(),
                });
            }
        }
        Ok(stack)
    }

    /// Returns a client of the API listener that reuses connections.
    pub fn client(&self) -> HttpClient {
        HttpClient::new(([127, 0, 0, 1], self.listener_port).into())
    }

    /// Returns the client of Envoy's admin interface.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// Returns the storage server of `site`.
    pub fn site(&self, site: Site) -> &StorageServer {
        &self.sites[site.index()]
    }

    /// Returns the storage server of `site`, to stop or restart it.
    pub fn site_mut(&mut self, site: Site) -> &mut StorageServer {
        &mut self.sites[site.index()]
    }

    /// Returns the default storage, which serves assets without a region.
    pub fn default_storage(&self) -> &StorageServer {
        &self.default
    }

    /// Returns the sidecar.
    pub fn sidecar(&self) -> &Sidecar {
        &self.sidecar
    }

    /// Returns the folder with the bootstrap and the logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns Envoy's whole log so far.
    pub fn envoy_log(&self) -> String {
        self.envoy.log()
    }

    /// Reads the health of `site` from the admin `/clusters`.
    pub async fn host_health(&self, site: Site) -> Result<HostHealth, HarnessError> {
        let reply = self.admin.get("/clusters?format=json").await?;
        let clusters: serde_json::Value =
            serde_json::from_str(&reply.body).map_err(|err| HarnessError::Request {
                target: format!("http://{}/clusters", self.admin.address()),
                reason: format!("invalid JSON: {err}"),
            })?;
        let port = u64::from(self.site(site).address().port());
        let host = clusters["cluster_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|cluster| cluster["name"] == site.region().cluster())
            .flat_map(|cluster| cluster["host_statuses"].as_array().into_iter().flatten())
            .find(|host| host["address"]["socket_address"]["port_value"].as_u64() == Some(port))
            .ok_or_else(|| HarnessError::Request {
                target: format!("http://{}/clusters", self.admin.address()),
                reason: format!(
                    "no host on port {port} in cluster {}",
                    site.region().cluster()
                ),
            })?;
        let flag = |name: &str| host["health_status"][name].as_bool().unwrap_or(false);
        Ok(HostHealth {
            failed_active_health_check: flag("failed_active_health_check"),
            failed_outlier_check: flag("failed_outlier_check"),
        })
    }

    /// Polls the health of `site` every 10 ms until it is `healthy` or
    /// `timeout` passes, and returns how long that took, `None` on timeout.
    pub async fn await_host_health(
        &self,
        site: Site,
        healthy: bool,
        timeout: Duration,
    ) -> Result<Option<Duration>, HarnessError> {
        let started = Instant::now();
        loop {
            if self.host_health(site).await?.is_healthy() == healthy {
                return Ok(Some(started.elapsed()));
            }
            if started.elapsed() > timeout {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Returns the number of retries that Envoy made in `region`'s cluster.
    pub async fn retries(&self, region: Region) -> Result<u64, HarnessError> {
        let name = format!("cluster.{}.upstream_rq_retry", region.cluster());
        Ok(self
            .admin
            .stats(&name)
            .await?
            .get(&name)
            .copied()
            .unwrap_or(0))
    }
}

/// Starts Envoy on the rendered bootstrap `text` and waits until its admin
/// interface reports it live and the API listener is bound.
async fn spawn_envoy(
    dir: &Path,
    text: &str,
    concurrency: u32,
) -> Result<(ChildProcess, Admin, u16), HarnessError> {
    let bootstrap_path = dir.join("envoy-residency.yaml");
    std::fs::write(&bootstrap_path, text).map_err(|source| HarnessError::Io {
        action: "write the Envoy bootstrap",
        path: bootstrap_path.clone(),
        source,
    })?;
    let admin_file = dir.join("envoy-admin.addr");
    let mut process = ChildProcess::spawn(
        "envoy",
        Command::new(artifacts::envoy_binary()?)
            .arg("--config-path")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("--base-id")
            .arg(unique_base_id().to_string())
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .args(["--log-level", "info"]),
        &dir.join("envoy.log"),
    )?;

    let deadline = Instant::now() + READY_TIMEOUT;
    let mut admin = None;
    loop {
        process.ensure_running()?;
        if admin.is_none() {
            admin = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|text| text.trim().parse().ok())
                .map(Admin::new);
        }
        if let Some(admin) = &admin
            && admin.is_live().await
            && let Ok(Some(port)) = admin.listener_port(LISTENER_NAME).await
        {
            return Ok((process, admin.clone(), port));
        }
        if Instant::now() > deadline {
            return Err(process.not_ready(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Returns a base id that no other Envoy of this process uses. The ids
/// start at 500 within the process's block of 1,000 so that they stay apart
/// from the ids of `crate::envoy`, which start at 0.
fn unique_base_id() -> u32 {
    let instance = 500 + NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed) % 500;
    (std::process::id() % 1_000_000) * 1000 + instance
}
