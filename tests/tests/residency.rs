//! Residency routing in real Envoy on `envoy/residency.yaml`: each storage
//! region reaches its own site, a failed site hands its region to the
//! second site of the same jurisdiction and takes it back once healthy,
//! and no request leaves its jurisdiction.
//!
//! Most tests send `x-veo-storage-region` from the client, which the filter
//! passes through while its configuration has no `geo` section, so they
//! test Envoy's side alone. `filter_routes_locked_asset_by_region` covers
//! the path where the filter sets the header.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;
use veo_tests::artifacts;
use veo_tests::residency::bootstrap::{self, FailoverSettings, ResidencyValues};
use veo_tests::residency::stack::plugin_config;
use veo_tests::residency::{
    CLIENT_COUNTRIES, Probe, Region, ResidencyOptions, ResidencyStack, STORAGE_REGION_HEADER,
    Sample, Site,
};
use veo_tests::stack::temp_dir;
use veo_tests::tokens::{SigningKey, TokenSpec};

/// Time between the requests of a probe.
const PACE: Duration = Duration::from_millis(10);

/// Maximum wait for traffic to move. With a health check every 100 ms,
/// Envoy needs about 200 ms; the rest is room for a busy machine.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Requests in a row from the expected site that count as traffic moved.
const SETTLED: usize = 20;

/// Starts the stack with `failover` and returns it with an enterprise token.
async fn start(failover: FailoverSettings) -> anyhow::Result<(ResidencyStack, String)> {
    let key = SigningKey::generate("k1");
    let mut options = ResidencyOptions::new(plugin_config(&key)?);
    options.failover = failover;
    let stack = ResidencyStack::start(&options).await?;
    let token = key.mint(&TokenSpec::new("storage-reader", "enterprise"))?;
    Ok((stack, token))
}

/// Returns true when the last [`SETTLED`] samples were served by `site`.
fn settled_on(samples: &[Sample], site: Site) -> bool {
    samples.len() >= SETTLED
        && samples
            .iter()
            .rev()
            .take(SETTLED)
            .all(|sample| sample.served_by(site.name()))
}

/// Returns the names of the sites that served `samples`, failures left out.
fn serving_sites(samples: &[Sample]) -> Vec<String> {
    let mut sites: Vec<String> = samples.iter().filter_map(|s| s.site.clone()).collect();
    sites.sort();
    sites.dedup();
    sites
}

/// Proves `envoy --mode validate` accepts the residency bootstrap with the built filter.
#[test]
fn validate_mode_accepts_residency_bootstrap() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let dir = temp_dir()?;
    let path = dir.path().join("envoy-residency.yaml");
    let values = ResidencyValues {
        node_id: "veo-residency-validate".to_owned(),
        upstream_port: 9,
        site_ports: Site::ALL.iter().map(|site| (*site, 9)).collect(),
        sidecar_port: 9,
        plugin_config: plugin_config(&key)?.to_json(),
        failover: FailoverSettings::recommended(),
        geoip_db_path: dir.path().join("countries.mmdb"),
        xff_trusted_hops: 1,
    };
    veo_tests::mmdb::write_country_database(&values.geoip_db_path, &CLIENT_COUNTRIES)?;
    std::fs::write(
        &path,
        bootstrap::render(&values, &artifacts::filter_wasm()?)?,
    )?;

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

/// Proves each region reaches its primary site, no header reaches the default storage, and an unknown region gets 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_each_region_to_its_primary() -> anyhow::Result<()> {
    let (stack, token) = start(FailoverSettings::for_tests()).await?;

    for region in Region::ALL {
        let sample = Probe::new(stack.client(), &token, Some(region))
            .send()
            .await;
        assert_eq!(sample.status, Some(200), "{region:?}");
        assert_eq!(sample.site.as_deref(), Some(region.primary().name()));
    }
    let unlocked = Probe::new(stack.client(), &token, None).send().await;
    assert_eq!(unlocked.status, Some(200));
    assert_eq!(unlocked.site.as_deref(), Some("default"));

    let client = stack.client();
    for value in ["mars", "EU-WEST", ""] {
        let reply = client
            .get_with_token("/videos/a/1.ts", &token, &[(STORAGE_REGION_HEADER, value)])
            .await?;
        assert_eq!(reply.status, 500, "region {value:?}: {}", reply.body);
        assert!(reply.body.contains("no storage route"), "{}", reply.body);
    }

    for region in Region::ALL {
        assert_eq!(stack.site(region.primary()).requests(), 1, "{region:?}");
        assert_eq!(stack.site(region.secondary()).requests(), 0, "{region:?}");
    }
    assert_eq!(stack.default_storage().requests(), 1);
    Ok(())
}

/// Proves a failing primary hands its region to the secondary of its jurisdiction without a failed request, and takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_health_check_fails() -> anyhow::Result<()> {
    let (stack, token) = start(FailoverSettings::for_tests()).await?;
    let eu = Probe::new(stack.client(), &token, Some(Region::EuWest));
    let before = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::EuWest))
        .await;
    ensure!(settled_on(&before, Site::EuWest), "eu-west never served");

    let failed_at = Instant::now();
    stack.site(Site::EuWest).set_failing(true);
    let during = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::EuCentral))
        .await;

    assert!(
        settled_on(&during, Site::EuCentral),
        "no failover: {during:?}"
    );
    assert!(
        serving_sites(&during)
            .iter()
            .all(|site| site == "eu-west" || site == "eu-central")
    );
    assert_eq!(during.iter().filter(|s| s.failed()).count(), 0);
    let first_secondary = during
        .iter()
        .find(|s| s.served_by("eu-central"))
        .context("eu-central never served")?;
    assert!(first_secondary.done - failed_at < MOVE_TIMEOUT);

    // Once Envoy marks the site, by ejection or by the health check, it
    // stops sending the site requests instead of retrying each one.
    let marked = stack
        .await_host_health(Site::EuWest, false, MOVE_TIMEOUT)
        .await?;
    assert!(marked.is_some(), "eu-west still healthy in Envoy");
    let attempts = stack.site(Site::EuWest).requests();
    let after = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| s.len() >= SETTLED)
        .await;
    assert!(settled_on(&after, Site::EuCentral));
    assert_eq!(stack.site(Site::EuWest).requests(), attempts);

    let us = Probe::new(stack.client(), &token, Some(Region::UsEast))
        .send()
        .await;
    assert!(us.served_by("us-east"), "{us:?}");

    stack.site(Site::EuWest).set_failing(false);
    let back = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::EuWest))
        .await;
    assert!(settled_on(&back, Site::EuWest), "no failback: {back:?}");
    assert_eq!(back.iter().filter(|s| s.failed()).count(), 0);
    Ok(())
}

/// Proves a stopped primary hands its region to the secondary of its jurisdiction without a failed request, and takes it back after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_when_primary_stops() -> anyhow::Result<()> {
    let (mut stack, token) = start(FailoverSettings::for_tests()).await?;
    let us = Probe::new(stack.client(), &token, Some(Region::UsEast));
    let before = us
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::UsEast))
        .await;
    ensure!(settled_on(&before, Site::UsEast), "us-east never served");

    stack.site_mut(Site::UsEast).stop().await;
    let during = us
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::UsWest))
        .await;

    assert!(settled_on(&during, Site::UsWest), "no failover: {during:?}");
    assert_eq!(serving_sites(&during), ["us-west"].map(String::from));
    assert_eq!(during.iter().filter(|s| s.failed()).count(), 0);

    let marked = stack
        .await_host_health(Site::UsEast, false, MOVE_TIMEOUT)
        .await?;
    assert!(marked.is_some(), "us-east still healthy in Envoy");
    let retries = stack.retries(Region::UsEast).await?;
    let after = us
        .run_until(PACE, MOVE_TIMEOUT, |s| s.len() >= SETTLED)
        .await;
    assert!(settled_on(&after, Site::UsWest));
    assert_eq!(stack.retries(Region::UsEast).await?, retries);

    stack.site_mut(Site::UsEast).restart().await?;
    let back = us
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::UsEast))
        .await;
    assert!(settled_on(&back, Site::UsEast), "no failback: {back:?}");
    assert_eq!(back.iter().filter(|s| s.failed()).count(), 0);
    Ok(())
}

/// Proves the health check alone moves a region, with retries and ejection turned off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_by_health_check_alone() -> anyhow::Result<()> {
    let failover = FailoverSettings {
        retries: 0,
        outlier_ejection: false,
        ..FailoverSettings::for_tests()
    };
    let (stack, token) = start(failover).await?;
    let ap = Probe::new(stack.client(), &token, Some(Region::ApSoutheast));
    let before = ap
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::ApSoutheast))
        .await;
    ensure!(
        settled_on(&before, Site::ApSoutheast),
        "ap-southeast never served"
    );

    stack.site(Site::ApSoutheast).set_failing(true);
    let during = ap
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::ApSoutheastB))
        .await;

    assert!(
        settled_on(&during, Site::ApSoutheastB),
        "no failover: {during:?}"
    );
    // Without retries the requests before the health check fails get the
    // site's 503, and only those.
    assert!(
        during
            .iter()
            .filter(|s| s.failed())
            .all(|s| s.status == Some(503))
    );
    assert_eq!(stack.retries(Region::ApSoutheast).await?, 0);
    Ok(())
}

/// Proves a region whose two sites fail gets 503 and never reaches another jurisdiction or the default storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stays_in_jurisdiction_when_both_sites_fail() -> anyhow::Result<()> {
    let (stack, token) = start(FailoverSettings::for_tests()).await?;
    let eu = Probe::new(stack.client(), &token, Some(Region::EuWest));
    let before = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| settled_on(s, Site::EuWest))
        .await;
    ensure!(settled_on(&before, Site::EuWest), "eu-west never served");

    stack.site(Site::EuWest).set_failing(true);
    stack.site(Site::EuCentral).set_failing(true);
    for site in [Site::EuWest, Site::EuCentral] {
        let marked = stack.await_host_health(site, false, MOVE_TIMEOUT).await?;
        assert!(marked.is_some(), "{site:?} still healthy in Envoy");
    }
    let others: Vec<u64> = Site::ALL
        .iter()
        .filter(|site| site.region() != Region::EuWest)
        .map(|site| stack.site(*site).requests())
        .collect();
    let during = eu
        .run_until(PACE, MOVE_TIMEOUT, |s| s.len() >= SETTLED)
        .await;

    assert!(during.iter().all(|s| s.status == Some(503)), "{during:?}");
    let others_after: Vec<u64> = Site::ALL
        .iter()
        .filter(|site| site.region() != Region::EuWest)
        .map(|site| stack.site(*site).requests())
        .collect();
    assert_eq!(others_after, others);
    assert_eq!(stack.default_storage().requests(), 0);
    Ok(())
}

/// Proves the filter's storage header routes a locked asset to its region and fails over, whatever the client sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_routes_locked_asset_by_region() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let config = plugin_config(&key)?.set(
        "/geo",
        json!({
            "geoip_header": "x-geoip-country",
            "countries": {"DE": "eu-west", "FR": "eu-west", "US": "us-east"},
            "unknown_country": "refuse",
            "asset_patterns": ["/videos/{asset}/"],
            "assets": [
                {"asset": "eu-film", "allowed_regions": ["eu-west"], "storage_region": "eu-west"},
                {"asset": "us-film", "allowed_regions": ["us-east"], "storage_region": "us-east"},
            ],
        }),
    );
    let stack = ResidencyStack::start(&ResidencyOptions::new(config)).await?;
    let token = key.mint(&TokenSpec::new("storage-reader", "enterprise"))?;
    let client = stack.client();
    let site_of = |reply: &veo_tests::client::Reply| {
        reply
            .header("x-storage-site")
            .unwrap_or_default()
            .to_owned()
    };

    // The country comes from the geoip lookup of the address in
    // x-forwarded-for, never from a client-sent country header.
    let german = [("x-forwarded-for", "127.0.0.4")];
    let eu_film = client
        .get_with_token("/videos/eu-film/1.ts", &token, &german)
        .await?;
    assert_eq!(eu_film.status, 200, "{}", eu_film.body);
    assert_eq!(site_of(&eu_film), "eu-west");

    let forged = [
        ("x-forwarded-for", "127.0.0.4"),
        (STORAGE_REGION_HEADER, "us-east"),
    ];
    let eu_forged = client
        .get_with_token("/videos/eu-film/1.ts", &token, &forged)
        .await?;
    assert_eq!(site_of(&eu_forged), "eu-west");
    let free_forged = client
        .get_with_token("/videos/free-film/1.ts", &token, &forged)
        .await?;
    assert_eq!(free_forged.status, 200, "{}", free_forged.body);
    assert_eq!(site_of(&free_forged), "default");

    let american = [("x-forwarded-for", "127.0.0.5")];
    let us_film = client
        .get_with_token("/videos/us-film/1.ts", &token, &american)
        .await?;
    assert_eq!(site_of(&us_film), "us-east");
    let refused = client
        .get_with_token("/videos/eu-film/1.ts", &token, &american)
        .await?;
    assert_eq!(refused.status, 451, "{}", refused.body);
    let spoofed = [("x-forwarded-for", "127.0.0.5"), ("x-geoip-country", "DE")];
    let spoof_refused = client
        .get_with_token("/videos/eu-film/1.ts", &token, &spoofed)
        .await?;
    assert_eq!(spoof_refused.status, 451, "{}", spoof_refused.body);
    assert_eq!(stack.site(Site::EuWest).requests(), 2);

    stack.site(Site::EuWest).set_failing(true);
    let marked = stack
        .await_host_health(Site::EuWest, false, MOVE_TIMEOUT)
        .await?;
    assert!(marked.is_some(), "eu-west still healthy in Envoy");
    let moved = client
        .get_with_token("/videos/eu-film/1.ts", &token, &german)
        .await?;
    assert_eq!(moved.status, 200, "{}", moved.body);
    assert_eq!(site_of(&moved), "eu-central");
    Ok(())
}
