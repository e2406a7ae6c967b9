//! Renders `envoy/bootstrap.yaml`, or `envoy/geo.yaml` for the geo-fencing
//! tests, whose placeholders are names in double braces, into a bootstrap
//! for one test.

use std::path::{Path, PathBuf};

use crate::HarnessError;
use crate::artifacts;

/// Values for the placeholders of `envoy/bootstrap.yaml`.
#[derive(Debug, Clone)]
pub struct BootstrapValues {
    /// Node id of the Envoy instance.
    pub node_id: String,
    /// Port of the upstream service on 127.0.0.1.
    pub upstream_port: u16,
    /// Port of the sidecar's gRPC server on 127.0.0.1.
    pub sidecar_port: u16,
    /// Plugin configuration given to both roles of the filter.
    pub plugin_config: serde_json::Value,
}

/// Values of the placeholders that only `envoy/geo.yaml` has.
#[derive(Debug, Clone)]
pub struct GeoValues {
    /// Country database (MaxMind DB format) of Envoy's geoip filter.
    pub geoip_db_path: PathBuf,
    /// The connection manager's `xff_num_trusted_hops`: how many proxies in
    /// front of Envoy append trusted `x-forwarded-for` entries. It is 0 when
    /// clients connect directly.
    pub xff_trusted_hops: u32,
}

/// Renders the shipped template with `values`, the built filter module and
/// free ports for the listener and the admin interface.
pub fn render(values: &BootstrapValues, wasm: &Path) -> Result<String, HarnessError> {
    fill(
        &artifacts::bootstrap_template(),
        &replacements(values, wasm),
    )
}

/// Returns the path of the geo-fencing template that ships in `envoy/`.
pub fn geo_template() -> PathBuf {
    artifacts::workspace_root().join("envoy").join("geo.yaml")
}

/// Renders `envoy/geo.yaml` like [`render`], with the geoip database and
/// the trusted hops of `geo`.
pub fn render_geo(
    values: &BootstrapValues,
    geo: &GeoValues,
    wasm: &Path,
) -> Result<String, HarnessError> {
    let mut replacements = replacements(values, wasm);
    replacements.push(("GEOIP_DB_PATH", quote(&geo.geoip_db_path.to_string_lossy())));
    replacements.push(("XFF_TRUSTED_HOPS", geo.xff_trusted_hops.to_string()));
    fill(&geo_template(), &replacements)
}

fn replacements(values: &BootstrapValues, wasm: &Path) -> Vec<(&'static str, String)> {
    // A JSON string is also a valid YAML double-quoted scalar.
    vec![
        ("NODE_ID", quote(&values.node_id)),
        ("ADMIN_PORT", "0".to_owned()),
        ("LISTENER_PORT", "0".to_owned()),
        ("UPSTREAM_PORT", values.upstream_port.to_string()),
        ("SIDECAR_PORT", values.sidecar_port.to_string()),
        ("WASM_PATH", quote(&wasm.to_string_lossy())),
        ("PLUGIN_CONFIG", quote(&values.plugin_config.to_string())),
    ]
}

/// Reads the template at `path` and replaces every placeholder. Fails when
/// one of `replacements` is missing or an unknown one is left.
fn fill(path: &Path, replacements: &[(&str, String)]) -> Result<String, HarnessError> {
    let template = std::fs::read_to_string(path).map_err(|source| HarnessError::Io {
        action: "read the bootstrap template",
        path: path.to_path_buf(),
        source,
    })?;

    let mut text = template;
    for (name, value) in replacements {
        let placeholder = format!("{{{{{name}}}}}");
        if !text.contains(&placeholder) {
            return Err(HarnessError::Template {
                path: path.to_path_buf(),
                reason: format!("placeholder {placeholder} is missing"),
            });
        }
        text = text.replace(&placeholder, value);
    }
    if let Some(start) = text.find("{{") {
        let rest: String = text[start..].chars().take(40).collect();
        return Err(HarnessError::Template {
            path: path.to_path_buf(),
            reason: format!("unknown placeholder at `{rest}`"),
        });
    }
    Ok(text)
}

fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> BootstrapValues {
        BootstrapValues {
            node_id: "node-1".to_owned(),
            upstream_port: 8081,
            sidecar_port: 8082,
            plugin_config: serde_json::json!({"jwt": {"issuer": "it's \"quoted\""}}),
        }
    }

    #[test]
    fn fills_every_placeholder() {
        let text = render(&values(), Path::new("/tmp/veo filter.wasm")).unwrap();
        assert!(!text.contains("{{"));
        assert!(text.contains("port_value: 8081"));
        assert!(text.contains("port_value: 8082"));
        assert!(text.contains("\"/tmp/veo filter.wasm\""));
    }

    #[test]
    fn embeds_plugin_config_as_escaped_string() {
        let text = render(&values(), Path::new("/f.wasm")).unwrap();
        let expected = quote(&values().plugin_config.to_string());
        assert!(text.contains(&format!("value: {expected}")));
    }

    #[test]
    fn fills_geo_placeholders() {
        let geo = GeoValues {
            geoip_db_path: PathBuf::from("/tmp/countries.mmdb"),
            xff_trusted_hops: 1,
        };
        let text = render_geo(&values(), &geo, Path::new("/f.wasm")).unwrap();
        assert!(!text.contains("{{"));
        assert!(text.contains("country_db_path: \"/tmp/countries.mmdb\""));
        assert!(text.contains("xff_num_trusted_hops: 1"));
        assert!(text.contains("port_value: 8081"));
    }
}
