//! Starts the demo's processes on loopback: the upstream, the sidecar with
//! its embedded store, and Envoy with the filter, each on a free port.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::admin::Admin;
use super::bootstrap::{self, BootstrapValues};
use super::upstream::{self, Upstream};
use crate::error::XtaskError;
use crate::paths;
use crate::process::Service;

/// How long each process gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Name of the API listener in `envoy/bootstrap.yaml`.
const LISTENER_NAME: &str = "veo_ingress";

/// The running processes; dropping the stack stops Envoy, then the sidecar,
/// then the upstream.
pub struct Stack {
    /// Port of Envoy's API listener on 127.0.0.1.
    pub listener_port: u16,
    /// Address of the sidecar's gRPC server.
    pub sidecar_address: SocketAddr,
    /// Client of Envoy's admin interface.
    pub admin: Admin,
    _envoy: Service,
    _sidecar: Service,
    _upstream: Upstream,
}

/// Starts the stack with its files under `dir`; Envoy loads
/// `plugin_config` in both filter roles.
pub async fn start(
    envoy_bin: &Path,
    dir: &Path,
    plugin_config: &serde_json::Value,
) -> Result<Stack, XtaskError> {
    let upstream = upstream::start().await?;

    let ready_file = dir.join("sidecar.addr");
    let mut sidecar = Service::spawn(
        "veo-sidecar",
        Command::new(paths::release_binary("veo-sidecar"))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("sidecar-data"))
            .arg("--ready-file")
            .arg(&ready_file),
        &dir.join("sidecar.log"),
    )?;
    let sidecar_address = parse_address(&wait_for_file(&mut sidecar, &ready_file).await?)?;

    let bootstrap_path = dir.join("envoy.yaml");
    bootstrap::render_to(
        &BootstrapValues {
            node_id: "veo-demo",
            upstream_port: upstream.address.port(),
            sidecar_port: sidecar_address.port(),
            wasm: &paths::filter_wasm(),
            plugin_config,
        },
        &bootstrap_path,
    )?;

    let admin_file = dir.join("envoy-admin.addr");
    let mut envoy = Service::spawn(
        "envoy",
        Command::new(envoy_bin)
            .arg("--config-path")
            .arg(&bootstrap_path)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .arg("--base-id")
            .arg(std::process::id().to_string())
            .arg("--disable-hot-restart")
            .args(["--concurrency", "2", "--log-level", "info"]),
        &dir.join("envoy.log"),
    )?;
    let admin = Admin::new(parse_address(
        &wait_for_file(&mut envoy, &admin_file).await?,
    )?);
    let listener_port = wait_for_listener(&mut envoy, &admin).await?;

    Ok(Stack {
        listener_port,
        sidecar_address,
        admin,
        _envoy: envoy,
        _sidecar: sidecar,
        _upstream: upstream,
    })
}

/// Waits until `file` has content, failing when `service` exits first.
async fn wait_for_file(service: &mut Service, file: &Path) -> Result<String, XtaskError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && !text.trim().is_empty()
        {
            return Ok(text.trim().to_owned());
        }
        service.ensure_running()?;
        if Instant::now() > deadline {
            return Err(service.not_ready(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until Envoy reports the API listener bound and itself live.
async fn wait_for_listener(envoy: &mut Service, admin: &Admin) -> Result<u16, XtaskError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        envoy.ensure_running()?;
        let live = admin.get("/ready").await.is_ok();
        if let (true, Ok(Some(port))) = (live, admin.listener_port(LISTENER_NAME).await) {
            return Ok(port);
        }
        if Instant::now() > deadline {
            return Err(envoy.not_ready(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn parse_address(text: &str) -> Result<SocketAddr, XtaskError> {
    text.parse()
        .map_err(|err| XtaskError::Tool(format!("`{text}` is not an IP:PORT address: {err}")))
}
