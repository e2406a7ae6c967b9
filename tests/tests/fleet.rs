//! Fleets of several instances: each Envoy wired to its own sidecar, every sidecar started
//! with the fleet's config file, and all Envoys forwarding to one upstream.

use std::collections::BTreeMap;
use std::time::Duration;

use veo_tests::plugin::PluginConfig;
use veo_tests::sidecar::CustomerUsage;
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Fleet, FleetOptions};

/// Sidecar config that every sidecar version reads; the value shows in its start log.
const SIDECAR_CONFIG: &str = "window_seconds = 7\n";

/// Start-log field that shows [`SIDECAR_CONFIG`] was read.
const CONFIG_IN_LOG: &str = "window_seconds=7";

/// Proves each Envoy of a fleet forwards to the shared upstream and reports usage to its own sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_instances_report_to_own_sidecar() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key)?;
    let options = FleetOptions {
        sidecar_config: SIDECAR_CONFIG.parse()?,
        ..FleetOptions::new(2)
    };
    let fleet = Fleet::start(&config, &options).await?;
    assert_eq!(fleet.instances().len(), 2);
    assert_eq!(fleet.listener_urls().len(), 2);

    let customers = ["customer-0", "customer-1"];
    for (instance, customer) in fleet.instances().iter().zip(customers) {
        let token = key.mint(&TokenSpec::new(customer, "basic"))?;
        let reply = instance
            .envoy
            .client()
            .get_with_token("/", &token, &[])
            .await?;
        assert_eq!(reply.status, 200, "{customer}: {}", reply.body);
    }
    assert_eq!(fleet.upstream.requests(), 2);

    let one_admitted = CustomerUsage {
        admitted: 1,
        refused: 0,
    };
    let no_usage = CustomerUsage {
        admitted: 0,
        refused: 0,
    };
    for (index, instance) in fleet.instances().iter().enumerate() {
        let expected = BTreeMap::from([
            (customers[index].to_owned(), one_admitted),
            (customers[1 - index].to_owned(), no_usage),
        ]);
        let observed = instance
            .sidecar
            .await_usage(&expected, Duration::from_secs(10))
            .await?;
        assert_eq!(observed, expected, "ledger of instance {index}'s sidecar");
        assert!(
            instance.sidecar.log().contains(CONFIG_IN_LOG),
            "sidecar of instance {index} did not load its config file:\n{}",
            instance.sidecar.log()
        );
    }
    Ok(())
}

/// Proves a fleet's sidecar keeps its config file across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_sidecar_restart_keeps_config() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let options = FleetOptions {
        sidecar_config: SIDECAR_CONFIG.parse()?,
        ..FleetOptions::new(1)
    };
    let mut fleet = Fleet::start(&PluginConfig::for_key(&key)?, &options).await?;
    let sidecar = &mut fleet.instances_mut()[0].sidecar;

    sidecar.kill_hard();
    sidecar.restart().await?;
    let loads = sidecar.log().matches(CONFIG_IN_LOG).count();
    assert_eq!(loads, 2, "config loads in the log:\n{}", sidecar.log());
    Ok(())
}

/// Proves a fleet of no instance is rejected with a message.
#[tokio::test]
async fn empty_fleet_is_rejected() {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key).unwrap();
    let error = Fleet::start(&config, &FleetOptions::new(0)).await.err();
    let message = error.map(|err| err.to_string()).unwrap_or_default();
    assert!(message.contains("0 instances"), "{message}");
}
