//! The shipped Envoy bootstrap: Envoy's validate mode accepts it, and an
//! invalid plugin configuration makes Envoy reject it with a log line that
//! names the field.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use veo_tests::artifacts;
use veo_tests::envoy::{BootstrapValues, EnvoyProcess, bootstrap};
use veo_tests::plugin::PluginConfig;
use veo_tests::stack::temp_dir;
use veo_tests::tokens::SigningKey;

/// Loopback port that the clusters point at; nothing connects to it while
/// Envoy validates or loads its configuration.
const UNUSED_PORT: u16 = 9;

fn values(config: &PluginConfig) -> BootstrapValues {
    BootstrapValues {
        node_id: "veo-bootstrap-test".to_owned(),
        upstream_port: UNUSED_PORT,
        sidecar_port: UNUSED_PORT,
        plugin_config: config.to_json(),
    }
}

/// Proves `envoy --mode validate` accepts the shipped bootstrap with the built filter.
#[test]
fn validate_mode_accepts_shipped_bootstrap() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let dir = temp_dir()?;
    let path = dir.path().join("envoy.yaml");
    let text = bootstrap::render(
        &values(&PluginConfig::for_key(&key)?),
        &artifacts::filter_wasm()?,
    )?;
    std::fs::write(&path, text)?;

    let output = Command::new(artifacts::envoy_binary()?)
        .arg("--mode")
        .arg("validate")
        .arg("--config-path")
        .arg(&path)
        .arg("--disable-hot-restart")
        .output()
        .context("failed to run envoy --mode validate")?;

    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "validate failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK"), "validate printed:\n{stdout}");
    Ok(())
}

/// Proves an invalid plugin configuration stops Envoy with a log line naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_plugin_config_is_rejected() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let cases: [(&str, &str, Option<Value>, &str); 4] = [
        ("unknown key", "/tier_table", Some(json!({})), "tier_table"),
        (
            "zero window",
            "/tiers/basic/quota/window_seconds",
            Some(json!(0)),
            "window_seconds",
        ),
        (
            "quota of the wrong type",
            "/tiers/pro/quota/requests",
            Some(json!("six hundred")),
            "requests",
        ),
        ("missing JWKS", "/jwt/jwks", None, "jwks"),
    ];

    let mut failures = Vec::new();
    for (case, pointer, value, field) in cases {
        let config = PluginConfig::for_key(&key)?;
        let config = match value {
            Some(value) => config.set(pointer, value),
            None => config.remove(pointer),
        };
        let dir = temp_dir()?;
        let mut envoy = EnvoyProcess::spawn(dir.path(), &values(&config), 1)?;

        let status = envoy.wait_exit(Duration::from_secs(30)).await;
        let log = envoy.log();
        match status {
            None => failures.push(format!("{case}: Envoy still runs 30 s after loading it")),
            Some(status) if status.success() => {
                failures.push(format!("{case}: Envoy exited with {status}"));
            }
            Some(_) => {}
        }
        let filter_lines: Vec<&str> = log.lines().filter(|line| line.contains("veo")).collect();
        if !filter_lines.iter().any(|line| line.contains(field)) {
            failures.push(format!(
                "{case}: no log line of the filter names `{field}`; its lines:\n{}",
                filter_lines.join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}
