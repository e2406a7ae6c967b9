//! Tests of the Istio manifests in `envoy/istio`. Both filter roles load one
//! VM with one configuration. The bootstrap override's singleton and
//! cluster, and the EnvoyFilter's HTTP filter before a router, go into an
//! Envoy bootstrap that this file builds, and real Envoy with the built
//! module enforces the quota on it. The usage reaches a sidecar started
//! with the manifests' sidecar config.
//!
//! Istio itself does not run here: its own bootstrap, the merge and the
//! filters it adds are not reproduced.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use veo_tests::artifacts;
use veo_tests::client::{burst, count_status};
use veo_tests::envoy::{EnvoyProcess, LISTENER_NAME};
use veo_tests::sidecar::{CustomerUsage, Sidecar};
use veo_tests::stack::temp_dir;
use veo_tests::tokens::{AUDIENCE, ISSUER, SigningKey, TokenSpec};
use veo_tests::upstream::EchoUpstream;

/// The manifests, relative to the workspace root.
const MANIFESTS: &str = "envoy/istio/veo-edge.yaml";

/// The parts of the manifests that Envoy and the sidecar read.
struct Manifests {
    /// `custom_bootstrap.json` of the bootstrap override ConfigMap.
    bootstrap_override: Value,
    /// The HTTP filter the EnvoyFilter inserts before the router.
    http_filter: Value,
    /// `veo-sidecar.toml` of the sidecar's ConfigMap.
    sidecar_toml: String,
}

impl Manifests {
    fn load() -> anyhow::Result<Self> {
        let path = artifacts::workspace_root().join(MANIFESTS);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let documents = text
            .split("\n---\n")
            .map(yaml_serde::from_str::<Value>)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parse {}", path.display()))?;
        let find = |kind: &str, name: &str| {
            documents
                .iter()
                .find(|document| document["kind"] == kind && document["metadata"]["name"] == name)
                .with_context(|| format!("{MANIFESTS} has no {kind} named {name}"))
        };

        let bootstrap = find("ConfigMap", "veo-edge-bootstrap")?["data"]["custom_bootstrap.json"]
            .as_str()
            .context("the bootstrap override has no custom_bootstrap.json")?;
        let bootstrap_override = serde_json::from_str(bootstrap)
            .context("custom_bootstrap.json is not one JSON document")?;

        let patches = &find("EnvoyFilter", "veo-edge")?["spec"]["configPatches"];
        ensure!(
            patches.as_array().map(Vec::len) == Some(1),
            "the EnvoyFilter should have one patch: {patches}"
        );
        let patch = &patches[0];
        ensure!(patch["applyTo"] == "HTTP_FILTER", "{patch}");
        ensure!(patch["match"]["context"] == "GATEWAY", "{patch}");
        ensure!(patch["patch"]["operation"] == "INSERT_BEFORE", "{patch}");
        ensure!(
            patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
                == "envoy.filters.http.router",
            "the filter must go before the router: {patch}"
        );

        let sidecar_toml = find("ConfigMap", "veo-sidecar")?["data"]["veo-sidecar.toml"]
            .as_str()
            .context("the sidecar's ConfigMap has no veo-sidecar.toml")?
            .to_owned();
        Ok(Self {
            bootstrap_override,
            http_filter: patch["patch"]["value"].clone(),
            sidecar_toml,
        })
    }

    /// Returns the wasm service config of the `veo_sync` singleton.
    fn singleton_mut(&mut self) -> &mut Value {
        &mut self.bootstrap_override["bootstrap_extensions"][0]["typed_config"]["config"]
    }

    /// Returns the wasm config of the `veo_edge` HTTP filter.
    fn filter_mut(&mut self) -> &mut Value {
        &mut self.http_filter["typed_config"]["config"]
    }

    /// Parses the plugin configuration of the HTTP filter.
    fn plugin_config(&self) -> anyhow::Result<Value> {
        let text = self.http_filter["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .context("the HTTP filter has no configuration string")?;
        serde_json::from_str(text).context("the plugin configuration is not JSON")
    }

    /// Sets the module path and the plugin configuration of both roles.
    fn set_module_and_config(&mut self, wasm: &str, plugin_config: &Value) {
        let plugin_config = plugin_config.to_string();
        let set = |config: &mut Value| {
            config["vm_config"]["code"]["local"]["filename"] = json!(wasm);
            config["configuration"]["value"] = json!(plugin_config);
        };
        set(self.singleton_mut());
        set(self.filter_mut());
    }

    /// Builds an Envoy bootstrap from the override's singleton and
    /// clusters, with the sidecar cluster on `sidecar_port`. Its one
    /// listener runs the EnvoyFilter's filter and the router, which routes
    /// to an upstream on `upstream_port`.
    fn bootstrap(&self, upstream_port: u16, sidecar_port: u16) -> Value {
        let mut clusters = self.clusters();
        for cluster in &mut clusters {
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"] = json!(sidecar_port);
        }
        clusters.push(json!({
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": upstream_port
                }}}}]}],
            },
        }));
        let router = json!({
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        });
        json!({
            "node": {"id": "istio-gateway-test", "cluster": "istio-ingressgateway"},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
            "bootstrap_extensions": self.bootstrap_override["bootstrap_extensions"],
            "static_resources": {
                "listeners": [{
                    "name": LISTENER_NAME,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "gateway",
                            "route_config": {"virtual_hosts": [{
                                "name": "api",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                            }]},
                            "http_filters": [self.http_filter.clone(), router],
                        },
                    }]}],
                }],
                "clusters": clusters,
            },
        })
    }

    /// Returns the clusters the bootstrap override adds.
    fn clusters(&self) -> Vec<Value> {
        self.bootstrap_override["static_resources"]["clusters"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// Proves the singleton and the HTTP filter load one VM with one configuration.
#[test]
fn both_roles_share_one_vm_and_configuration() -> anyhow::Result<()> {
    let mut manifests = Manifests::load()?;
    let singleton = manifests.singleton_mut().clone();
    let filter = manifests.filter_mut().clone();
    assert_eq!(
        manifests.bootstrap_override["bootstrap_extensions"][0]["typed_config"]["singleton"],
        true
    );
    assert_eq!(singleton["name"], "veo_sync");
    assert_eq!(filter["name"], "veo_edge");
    assert_eq!(singleton["vm_config"], filter["vm_config"]);
    assert_eq!(singleton["configuration"], filter["configuration"]);

    let plugin_config = manifests.plugin_config()?;
    let cluster = plugin_config["sidecar"]["cluster"]
        .as_str()
        .unwrap_or("veo_sidecar");
    let clusters = manifests.clusters();
    assert!(
        clusters.iter().any(|added| added["name"] == cluster),
        "the bootstrap override adds no cluster named {cluster}"
    );

    // The sidecar's gRPC address must be the cluster's endpoint.
    let sidecar: toml::Table = manifests.sidecar_toml.parse()?;
    let endpoint = &clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        ["socket_address"];
    assert_eq!(
        sidecar["listen"].as_str(),
        Some(
            format!(
                "{}:{}",
                endpoint["address"].as_str().unwrap_or(""),
                endpoint["port_value"]
            )
            .as_str()
        )
    );
    Ok(())
}

/// Proves the manifests' parts, merged into real Envoy, enforce the basic quota and bill it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_enforce_quota_and_bill_in_real_envoy() -> anyhow::Result<()> {
    let mut manifests = Manifests::load()?;
    let dir = temp_dir()?;
    let upstream = EchoUpstream::start().await?;
    let sidecar = Sidecar::start_with_config(dir.path(), &manifests.sidecar_toml).await?;

    // The example key is a placeholder every deployment replaces; the rest
    // of the plugin configuration stays as shipped.
    let key = SigningKey::generate("k1");
    let mut plugin_config = manifests.plugin_config()?;
    plugin_config["jwt"]["jwks"] = key.jwks()?;
    plugin_config["jwt"]["issuer"] = json!(ISSUER);
    plugin_config["jwt"]["audiences"] = json!([AUDIENCE]);
    let wasm = artifacts::filter_wasm()?;
    manifests.set_module_and_config(&wasm.to_string_lossy(), &plugin_config);

    let bootstrap = manifests.bootstrap(upstream.address().port(), sidecar.address().port());
    let envoy = EnvoyProcess::spawn_rendered(dir.path(), &bootstrap.to_string(), 2)?
        .wait_ready()
        .await?;
    let client = envoy.client();

    let anonymous = client.get("/videos/1", &[]).await?;
    assert_eq!(anonymous.status, 401, "body: {}", anonymous.body);

    // The shipped tiers: basic is 60 requests per 60 s.
    let customer = "istio-basic";
    let token = key.mint(&TokenSpec::new(customer, "basic"))?;
    let replies = burst(&client, &token, 61).await?;
    assert_eq!(count_status(&replies, 200), 60);
    assert_eq!(replies[60].status, 429, "body: {}", replies[60].body);
    let forwarded = replies[0].json()?;
    assert_eq!(
        forwarded["headers"]["x-veo-customer"][0], customer,
        "upstream saw: {forwarded}"
    );

    let expected = BTreeMap::from([(
        customer.to_owned(),
        CustomerUsage {
            admitted: 60,
            refused: 1,
        },
    )]);
    let billed = sidecar
        .await_usage(&expected, Duration::from_secs(15))
        .await?;
    assert_eq!(billed, expected, "sidecar log:\n{}", sidecar.log());
    Ok(())
}

/// Proves Envoy rejects the manifests until the example key is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_key_must_be_replaced() -> anyhow::Result<()> {
    let mut manifests = Manifests::load()?;
    let plugin_config = manifests.plugin_config()?;
    let wasm = artifacts::filter_wasm()?;
    manifests.set_module_and_config(&wasm.to_string_lossy(), &plugin_config);
    let dir = temp_dir()?;
    // Nothing listens on port 9; Envoy stops before it would connect.
    let bootstrap = manifests.bootstrap(9, 9);
    let mut envoy = EnvoyProcess::spawn_rendered(dir.path(), &bootstrap.to_string(), 1)?;

    let status = envoy.wait_exit(Duration::from_secs(30)).await;
    let log = envoy.log();
    assert!(
        status.is_some_and(|status| !status.success()),
        "Envoy accepted the example key ({status:?}); log:\n{log}"
    );
    assert!(
        log.lines()
            .any(|line| line.contains("veo") && line.contains("jwt.jwks")),
        "no line of the filter names the JWKS; log:\n{log}"
    );
    Ok(())
}
