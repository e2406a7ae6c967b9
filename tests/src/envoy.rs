//! Real Envoy running the shipped bootstrap with the built filter, on free
//! loopback ports, with a base id of its own.

pub mod admin;
pub mod bootstrap;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use self::admin::Admin;
pub use self::bootstrap::{BootstrapValues, GeoValues};
use crate::HarnessError;
use crate::artifacts;
use crate::client::HttpClient;
use crate::process::ChildProcess;

/// How long Envoy gets to load the filter and bind its listener.
const READY_TIMEOUT: Duration = Duration::from_secs(45);

/// Name of the API listener in `envoy/bootstrap.yaml`.
pub const LISTENER_NAME: &str = "veo_ingress";

/// Counter that makes each Envoy's base id unique within this process.
static NEXT_INSTANCE: AtomicU32 = AtomicU32::new(0);

/// An Envoy process that was started but may not be ready.
#[derive(Debug)]
pub struct EnvoyProcess {
    process: ChildProcess,
    admin_file: PathBuf,
}

/// A ready Envoy; dropping it stops the process.
#[derive(Debug)]
pub struct Envoy {
    process: ChildProcess,
    admin: Admin,
    listener_port: u16,
}

impl EnvoyProcess {
    /// Renders the bootstrap into `dir` and starts Envoy on it with
    /// `concurrency` worker threads, without waiting for readiness.
    pub fn spawn(
        dir: &Path,
        values: &BootstrapValues,
        concurrency: u32,
    ) -> Result<Self, HarnessError> {
        let bootstrap = bootstrap::render(values, &artifacts::filter_wasm()?)?;
        Self::spawn_rendered(dir, &bootstrap, concurrency)
    }

    /// Renders the geo-fencing bootstrap `envoy/geo.yaml` into `dir` and
    /// starts Envoy on it like [`EnvoyProcess::spawn`].
    pub fn spawn_geo(
        dir: &Path,
        values: &BootstrapValues,
        geo: &GeoValues,
        concurrency: u32,
    ) -> Result<Self, HarnessError> {
        let bootstrap = bootstrap::render_geo(values, geo, &artifacts::filter_wasm()?)?;
        Self::spawn_rendered(dir, &bootstrap, concurrency)
    }

    /// Writes `bootstrap`, a whole Envoy configuration in YAML or JSON,
    /// into `dir` and starts Envoy on it like [`EnvoyProcess::spawn`]. Its
    /// API listener must be named [`LISTENER_NAME`].
    pub fn spawn_rendered(
        dir: &Path,
        bootstrap: &str,
        concurrency: u32,
    ) -> Result<Self, HarnessError> {
        let bootstrap_path = dir.join("envoy.yaml");
        std::fs::write(&bootstrap_path, bootstrap).map_err(|source| HarnessError::Io {
            action: "write the Envoy bootstrap",
            path: bootstrap_path.clone(),
            source,
        })?;

        let admin_file = dir.join("envoy-admin.addr");
        let process = ChildProcess::spawn(
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
        Ok(Self {
            process,
            admin_file,
        })
    }

    /// Waits until the admin interface reports Envoy live and the API
    /// listener bound.
    pub async fn wait_ready(mut self) -> Result<Envoy, HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut admin = None;
        loop {
            self.process.ensure_running()?;
            if admin.is_none() {
                admin = std::fs::read_to_string(&self.admin_file)
                    .ok()
                    .and_then(|text| text.trim().parse().ok())
                    .map(Admin::new);
            }
            if let Some(admin) = &admin
                && admin.is_live().await
                && let Ok(Some(listener_port)) = admin.listener_port(LISTENER_NAME).await
            {
                return Ok(Envoy {
                    process: self.process,
                    admin: admin.clone(),
                    listener_port,
                });
            }
            if Instant::now() > deadline {
                return Err(self.process.not_ready(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits up to `timeout` for Envoy to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout).await
    }

    /// Returns the whole log written so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

impl Envoy {
    /// Returns the client of the admin interface.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// Returns the port of the API listener on 127.0.0.1.
    pub fn listener_port(&self) -> u16 {
        self.listener_port
    }

    /// Returns a client of the API listener that reuses connections.
    pub fn client(&self) -> HttpClient {
        HttpClient::new(([127, 0, 0, 1], self.listener_port).into())
    }

    /// Returns a client of the API listener whose connections come from
    /// `source`, an address in 127.0.0.0/8.
    pub fn client_from(&self, source: IpAddr) -> HttpClient {
        HttpClient::from_source(([127, 0, 0, 1], self.listener_port).into(), source)
    }

    /// Returns a client of the API listener that opens a new connection per
    /// request.
    pub fn fresh_connection_client(&self) -> HttpClient {
        HttpClient::fresh_connections(([127, 0, 0, 1], self.listener_port).into())
    }

    /// Returns the whole log written so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Waits until the filter has the sidecar's asset region registry, so
    /// that requests for assets are decided rather than rejected with 503.
    /// The sync role logs the registry it publishes.
    pub async fn wait_for_asset_regions(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.process.log().contains("asset regions in force") {
            if Instant::now() > deadline {
                return Err(self.process.not_ready(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Fails with the log's last lines when Envoy has exited.
    pub fn ensure_running(&mut self) -> Result<(), HarnessError> {
        self.process.ensure_running()
    }

    /// Stops Envoy with SIGTERM, as an orchestrator does, and waits for it
    /// to exit (SIGKILL after a grace period).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// Returns a base id that no other Envoy of this test run uses, so that
/// parallel Envoys never share hot-restart shared memory.
fn unique_base_id() -> u32 {
    let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed) % 1000;
    (std::process::id() % 1_000_000) * 1000 + instance
}
