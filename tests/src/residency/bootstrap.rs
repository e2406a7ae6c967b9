//! Renders `envoy/residency.yaml`, whose placeholders are names in double
//! braces, into a bootstrap for one test or benchmark run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Site;
use crate::HarnessError;
use crate::artifacts;

/// How fast a storage cluster notices a failed site and what it does until
/// then: the placeholders `HEALTH_CHECK_INTERVAL`, `STORAGE_RETRIES` and
/// `OUTLIER_ENFORCING_PERCENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverSettings {
    /// Time between active health checks of each site, at least 1 ms.
    pub health_check_interval: Duration,
    /// Retries of a failed storage request on the other priority; 0 turns
    /// retries off.
    pub retries: u32,
    /// Whether outlier detection ejects a site after 3 gateway failures in
    /// a row.
    pub outlier_ejection: bool,
}

impl FailoverSettings {
    /// Returns the settings recommended for a deployment: a health check
    /// every second, one retry and outlier ejection.
    pub fn recommended() -> Self {
        Self {
            health_check_interval: Duration::from_secs(1),
            retries: 1,
            outlier_ejection: true,
        }
    }

    /// Returns the recommended settings with a health check every 100 ms,
    /// so that failover and failback take well under a second in a test.
    pub fn for_tests() -> Self {
        Self {
            health_check_interval: Duration::from_millis(100),
            ..Self::recommended()
        }
    }
}

/// Values for the placeholders of `envoy/residency.yaml`.
#[derive(Debug, Clone)]
pub struct ResidencyValues {
    /// Node id of the Envoy instance.
    pub node_id: String,
    /// Port of the default storage on 127.0.0.1.
    pub upstream_port: u16,
    /// Port of each storage site on 127.0.0.1, one per [`Site::ALL`].
    pub site_ports: Vec<(Site, u16)>,
    /// Port of the sidecar's gRPC server on 127.0.0.1.
    pub sidecar_port: u16,
    /// Plugin configuration given to both roles of the filter.
    pub plugin_config: serde_json::Value,
    /// Health check, retry and ejection settings of the storage clusters.
    pub failover: FailoverSettings,
    /// Country database that Envoy's geoip filter reads.
    pub geoip_db_path: PathBuf,
    /// Proxies in front of Envoy whose `x-forwarded-for` entries count.
    pub xff_trusted_hops: u32,
}

/// Returns the path of the residency template that ships in `envoy/`.
pub fn template_path() -> PathBuf {
    artifacts::workspace_root()
        .join("envoy")
        .join("residency.yaml")
}

/// Renders the shipped residency template with `values`, the filter module
/// `wasm` and free ports for the listener and the admin interface.
///
/// Fails when a site has no port, when the health check interval is under
/// 1 ms, or when the template and the placeholders differ.
pub fn render(values: &ResidencyValues, wasm: &Path) -> Result<String, HarnessError> {
    let path = template_path();
    let template = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
        action: "read the residency template",
        path: path.clone(),
        source,
    })?;
    let replacements = replacements(values, wasm)?;

    let mut text = template;
    for (name, value) in &replacements {
        let placeholder = format!("{{{{{name}}}}}");
        if !text.contains(&placeholder) {
            return Err(HarnessError::Template {
                path,
                reason: format!("placeholder {placeholder} is missing"),
            });
        }
        text = text.replace(&placeholder, value);
    }
    if let Some(start) = text.find("{{") {
        let rest: String = text
            .get(start..)
            .unwrap_or_default()
            .chars()
            .take(40)
            .collect();
        return Err(HarnessError::Template {
            path,
            reason: format!("unknown placeholder at `{rest}`"),
        });
    }
    Ok(text)
}

fn replacements(
    values: &ResidencyValues,
    wasm: &Path,
) -> Result<Vec<(String, String)>, HarnessError> {
    let failover = &values.failover;
    if failover.health_check_interval < Duration::from_millis(1) {
        return Err(HarnessError::InvalidConfig {
            what: "residency failover settings",
            reason: format!(
                "health check interval {:?} is under 1 ms; use at least 1 ms",
                failover.health_check_interval
            ),
        });
    }

    let mut replacements = vec![
        ("NODE_ID".to_owned(), quote(&values.node_id)),
        ("ADMIN_PORT".to_owned(), "0".to_owned()),
        ("LISTENER_PORT".to_owned(), "0".to_owned()),
        ("SIDECAR_PORT".to_owned(), values.sidecar_port.to_string()),
        ("UPSTREAM_PORT".to_owned(), values.upstream_port.to_string()),
        ("WASM_PATH".to_owned(), quote(&wasm.to_string_lossy())),
        (
            "PLUGIN_CONFIG".to_owned(),
            quote(&values.plugin_config.to_string()),
        ),
        (
            "HEALTH_CHECK_INTERVAL".to_owned(),
            quote(&envoy_duration(failover.health_check_interval)),
        ),
        ("STORAGE_RETRIES".to_owned(), failover.retries.to_string()),
        (
            "GEOIP_DB_PATH".to_owned(),
            quote(&values.geoip_db_path.to_string_lossy()),
        ),
        (
            "XFF_TRUSTED_HOPS".to_owned(),
            values.xff_trusted_hops.to_string(),
        ),
        (
            "OUTLIER_ENFORCING_PERCENT".to_owned(),
            if failover.outlier_ejection {
                "100"
            } else {
                "0"
            }
            .to_owned(),
        ),
    ];
    for site in Site::ALL {
        let port = values
            .site_ports
            .iter()
            .find(|(candidate, _)| *candidate == site)
            .map(|(_, port)| *port)
            .ok_or_else(|| HarnessError::InvalidConfig {
                what: "residency bootstrap values",
                reason: format!("no port for storage site {}", site.name()),
            })?;
        replacements.push((site.port_placeholder().to_owned(), port.to_string()));
    }
    Ok(replacements)
}

/// Formats `duration` as a protobuf JSON duration with millisecond
/// precision, such as `0.100s`.
fn envoy_duration(duration: Duration) -> String {
    format!("{}.{:03}s", duration.as_secs(), duration.subsec_millis())
}

fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> ResidencyValues {
        ResidencyValues {
            node_id: "node-1".to_owned(),
            upstream_port: 8080,
            site_ports: Site::ALL
                .iter()
                .zip(8081..)
                .map(|(site, port)| (*site, port))
                .collect(),
            sidecar_port: 8090,
            plugin_config: serde_json::json!({"jwt": {}}),
            failover: FailoverSettings::for_tests(),
            geoip_db_path: PathBuf::from("/countries.mmdb"),
            xff_trusted_hops: 1,
        }
    }

    #[test]
    fn fills_every_placeholder() {
        let text = render(&values(), Path::new("/f.wasm")).unwrap();
        assert!(!text.contains("{{"));
        for port in 8080..8087 {
            assert!(
                text.contains(&format!("port_value: {port} ")),
                "port {port}"
            );
        }
        assert!(text.contains("interval: \"0.100s\""));
        assert!(text.contains("num_retries: 1"));
        assert!(text.contains("enforcing_consecutive_gateway_failure: 100"));
    }

    #[test]
    fn turns_retries_and_ejection_off() {
        let mut values = values();
        values.failover.retries = 0;
        values.failover.outlier_ejection = false;
        let text = render(&values, Path::new("/f.wasm")).unwrap();
        assert!(text.contains("num_retries: 0"));
        assert!(text.contains("enforcing_consecutive_gateway_failure: 0"));
    }

    #[test]
    fn rejects_missing_site_port() {
        let mut values = values();
        values.site_ports.pop();
        let error = render(&values, Path::new("/f.wasm")).unwrap_err();
        assert!(
            error.to_string().contains("no port for storage site"),
            "{error}"
        );
    }

    #[test]
    fn rejects_zero_interval() {
        let mut values = values();
        values.failover.health_check_interval = Duration::ZERO;
        let error = render(&values, Path::new("/f.wasm")).unwrap_err();
        assert!(error.to_string().contains("under 1 ms"), "{error}");
    }

    #[test]
    fn formats_durations_for_envoy() {
        assert_eq!(envoy_duration(Duration::from_millis(100)), "0.100s");
        assert_eq!(envoy_duration(Duration::from_millis(2500)), "2.500s");
    }
}
