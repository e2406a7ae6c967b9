//! Renders `envoy/bootstrap.yaml`, whose placeholders are names in double
//! braces, into a runnable Envoy bootstrap.

use std::path::Path;

use crate::error::XtaskError;
use crate::paths;

/// Values for the placeholders of `envoy/bootstrap.yaml`.
pub struct BootstrapValues<'a> {
    /// Node id of the Envoy instance.
    pub node_id: &'a str,
    /// Port of the upstream service on 127.0.0.1.
    pub upstream_port: u16,
    /// Port of veo-sidecar's gRPC server on 127.0.0.1.
    pub sidecar_port: u16,
    /// Path of the filter's `.wasm` module.
    pub wasm: &'a Path,
    /// Plugin configuration, a JSON document.
    pub plugin_config: &'a serde_json::Value,
}

/// Renders the template with `values`, binding the listener and the admin
/// interface to free ports, and writes the result to `out`.
pub fn render_to(values: &BootstrapValues<'_>, out: &Path) -> Result<(), XtaskError> {
    let template_path = paths::workspace_root().join("envoy").join("bootstrap.yaml");
    let template = std::fs::read_to_string(&template_path).map_err(|source| XtaskError::Io {
        action: "read the bootstrap template",
        path: template_path.clone(),
        source,
    })?;

    // A JSON string is also a valid YAML double-quoted scalar.
    let plugin_config = values.plugin_config.to_string();
    let replacements = [
        ("NODE_ID", quote(values.node_id)),
        ("ADMIN_PORT", "0".to_owned()),
        ("LISTENER_PORT", "0".to_owned()),
        ("UPSTREAM_PORT", values.upstream_port.to_string()),
        ("SIDECAR_PORT", values.sidecar_port.to_string()),
        ("WASM_PATH", quote(&values.wasm.to_string_lossy())),
        ("PLUGIN_CONFIG", quote(&plugin_config)),
    ];
    let mut text = template;
    for (name, value) in &replacements {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = text.find("{{") {
        let rest: String = text[start..].chars().take(40).collect();
        return Err(XtaskError::Tool(format!(
            "{} has a placeholder this task does not fill: {rest}",
            template_path.display()
        )));
    }

    std::fs::write(out, text).map_err(|source| XtaskError::Io {
        action: "write the Envoy bootstrap",
        path: out.to_path_buf(),
        source,
    })
}

fn quote(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_every_placeholder_of_shipped_template() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let config = serde_json::json!({"jwt": {"issuer": "say \"hi\""}});
        let values = BootstrapValues {
            node_id: "demo",
            upstream_port: 8081,
            sidecar_port: 8082,
            wasm: Path::new("/tmp/veo filter.wasm"),
            plugin_config: &config,
        };

        render_to(&values, out.path()).unwrap();

        let text = std::fs::read_to_string(out.path()).unwrap();
        assert!(!text.contains("{{"));
        assert!(text.contains("port_value: 8082"));
        assert!(text.contains(&format!("value: {}", quote(&config.to_string()))));
    }
}
