//! Renders `envoy/bootstrap.yaml`, whose placeholders are names in double
//! braces, into a bootstrap for one test.

use std::path::Path;

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

/// Renders the shipped template with `values`, the built filter module and
/// free ports for the listener and the admin interface.
pub fn render(values: &BootstrapValues, wasm: &Path) -> Result<String, HarnessError> {
    let path = artifacts::bootstrap_template();
    let template = std::fs::read_to_string(&path).map_err(|source| HarnessError::Io {
        action: "read the bootstrap template",
        path: path.clone(),
        source,
    })?;

    // A JSON string is also a valid YAML double-quoted scalar.
    let replacements = [
        ("NODE_ID", quote(&values.node_id)),
        ("ADMIN_PORT", "0".to_owned()),
        ("LISTENER_PORT", "0".to_owned()),
        ("UPSTREAM_PORT", values.upstream_port.to_string()),
        ("SIDECAR_PORT", values.sidecar_port.to_string()),
        ("WASM_PATH", quote(&wasm.to_string_lossy())),
        ("PLUGIN_CONFIG", quote(&values.plugin_config.to_string())),
    ];
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
        let rest: String = text[start..].chars().take(40).collect();
        return Err(HarnessError::Template {
            path,
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
}
