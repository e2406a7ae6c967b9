//! Envoy processes for the benchmark: bootstrap configurations, start-up on ephemeral
//! loopback ports, and shutdown when the handle is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// How long an Envoy may take to load its configuration (V8 compiles the module on start).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Time allowed for one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Destination of the proxy's route.
#[derive(Debug, Clone, Copy)]
pub enum Upstream {
    /// A cluster pointing at the upstream Envoy's listener.
    Cluster(SocketAddr),
    /// A `direct_response` route in the proxy itself, with no upstream hop.
    DirectResponse,
}

/// A running Envoy, killed when dropped.
pub struct EnvoyProcess {
    /// Address of the listener named in the configuration.
    pub listener: SocketAddr,
    /// Address of the admin endpoint.
    pub admin: SocketAddr,
    /// The log file (Envoy's standard error).
    pub log: PathBuf,
    // `kill_on_drop` makes dropping the child stop the process.
    _child: Child,
}

/// Returns the bootstrap of the upstream: one listener that replies 200 `ok` to every request.
pub fn upstream_config() -> Value {
    bootstrap(
        http_connection_manager("upstream", direct_response_route(), vec![]),
        vec![],
    )
}

/// Returns the bootstrap of the proxy under test; `wasm_filter` is inserted before the router
/// when given.
pub fn proxy_config(upstream: Upstream, wasm_filter: Option<Value>) -> Value {
    let filters: Vec<Value> = wasm_filter.into_iter().collect();
    match upstream {
        Upstream::Cluster(address) => {
            let route = json!({
                "virtual_hosts": [{
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }],
            });
            let cluster = json!({
                "name": "upstream",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "upstream",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                        "socket_address": {
                            "address": address.ip().to_string(),
                            "port_value": address.port(),
                        },
                    }}}]}],
                },
            });
            bootstrap(
                http_connection_manager("proxy", route, filters),
                vec![cluster],
            )
        }
        Upstream::DirectResponse => bootstrap(
            http_connection_manager("proxy", direct_response_route(), filters),
            vec![],
        ),
    }
}

/// Returns the HTTP filter entry that loads `wasm` as plugin and VM `name` in V8, with
/// `configuration` as the plugin configuration when given.
pub fn wasm_filter(name: &str, wasm: &Path, configuration: Option<&Value>) -> Value {
    let mut config = json!({
        "name": name,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": wasm.display().to_string()}},
        },
    });
    if let Some(configuration) = configuration {
        config["configuration"] = json!({
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": configuration.to_string(),
        });
    }
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": config,
        },
    })
}

fn direct_response_route() -> Value {
    json!({
        "virtual_hosts": [{
            "name": "all",
            "domains": ["*"],
            "routes": [{
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "ok"}},
            }],
        }],
    })
}

fn http_connection_manager(prefix: &str, route: Value, mut filters: Vec<Value>) -> Value {
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
        },
    }));
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.\
                      http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": prefix,
            "route_config": route,
            "http_filters": filters,
        },
    })
}

fn bootstrap(connection_manager: Value, clusters: Vec<Value>) -> Value {
    let loopback = json!({"socket_address": {"address": "127.0.0.1", "port_value": 0}});
    json!({
        "admin": {"address": loopback},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": loopback,
                "filter_chains": [{"filters": [connection_manager]}],
            }],
            "clusters": clusters,
        },
    })
}

impl EnvoyProcess {
    /// Writes `config` to `dir/NAME.json`, starts Envoy with one worker thread and waits until
    /// its admin endpoint reports it live.
    ///
    /// # Errors
    /// Fails when Envoy cannot start, exits early or is not live within 30 s; the error
    /// includes the end of its log.
    pub async fn start(
        envoy: &Path,
        dir: &Path,
        name: &str,
        config: &Value,
    ) -> anyhow::Result<Self> {
        let config_path = dir.join(format!("{name}.json"));
        let admin_path = dir.join(format!("{name}.admin"));
        let log = dir.join(format!("{name}.log"));
        std::fs::write(&config_path, serde_json::to_vec_pretty(config)?)
            .with_context(|| format!("failed to write {}", config_path.display()))?;
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("failed to create {}", log.display()))?;

        let mut child = Command::new(envoy)
            .arg("--config-path")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("failed to start {}", envoy.display()))?;

        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "envoy {name} exited with {status} while starting:\n{}",
                    log_tail(&log)
                );
            }
            if started.elapsed() > START_TIMEOUT {
                bail!(
                    "envoy {name} was not live within {} s:\n{}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&log)
                );
            }
            if let Some((admin, listener)) = live_listener(&admin_path).await {
                return Ok(EnvoyProcess {
                    listener,
                    admin,
                    log,
                    _child: child,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Returns the admin and listener addresses once the admin endpoint replies `LIVE` to
/// `/ready`.
async fn live_listener(admin_path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let admin: SocketAddr = std::fs::read_to_string(admin_path)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let ready = admin_get(admin, "/ready").await?;
    if ready.trim() != "LIVE" {
        return None;
    }
    let listeners: Value =
        serde_json::from_str(&admin_get(admin, "/listeners?format=json").await?).ok()?;
    let socket = &listeners["listener_statuses"][0]["local_address"]["socket_address"];
    let address = socket["address"].as_str()?;
    let port = u16::try_from(socket["port_value"].as_u64()?).ok()?;
    let listener = format!("{address}:{port}").parse().ok()?;
    Some((admin, listener))
}

/// Sends `GET path` to the admin endpoint and returns the body of a 200 response.
pub async fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{admin}{path}").parse().ok()?;
    let response = tokio::time::timeout(ADMIN_TIMEOUT, client.get(uri))
        .await
        .ok()?
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_config_inserts_filter_before_router() {
        let filter = wasm_filter(
            "veo_edge",
            Path::new("/x/veo_filter.wasm"),
            Some(&json!({"jwt": {}})),
        );
        let config = proxy_config(Upstream::DirectResponse, Some(filter));
        let manager = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
        let filters = manager["typed_config"]["http_filters"].as_array().unwrap();
        let names: Vec<&str> = filters
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["envoy.filters.http.wasm", "envoy.filters.http.router"]
        );
        let value = filters[0]["typed_config"]["config"]["configuration"]["value"].as_str();
        assert_eq!(value, Some(r#"{"jwt":{}}"#));
    }

    #[test]
    fn filter_without_configuration_keeps_runtime_settings() {
        let with = wasm_filter("veo_edge", Path::new("/x/a.wasm"), Some(&json!({})));
        let without = wasm_filter("veo_noop", Path::new("/x/b.wasm"), None);
        let config = &without["typed_config"]["config"];
        assert!(config.get("configuration").is_none());
        assert_eq!(config["vm_config"]["vm_id"], "veo_noop");
        assert_eq!(
            config["vm_config"]["runtime"],
            with["typed_config"]["config"]["vm_config"]["runtime"]
        );
    }

    #[test]
    fn cluster_upstream_points_at_address() {
        let config = proxy_config(Upstream::Cluster("127.0.0.1:4321".parse().unwrap()), None);
        let endpoint = &config["static_resources"]["clusters"][0]["load_assignment"]["endpoints"]
            [0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(endpoint["port_value"], 4321);
        let manager = &config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0];
        let type_url = manager["typed_config"]["@type"].as_str().unwrap();
        assert!(type_url.ends_with("http_connection_manager.v3.HttpConnectionManager"));
        assert!(!type_url.contains(' '));
    }
}
