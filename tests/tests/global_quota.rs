//! One quota across several Envoy instances, each with its own sidecar, all
//! sharing counters in a real redis-server. The quota applies to the
//! customer as a whole, Redis outages and late starts lose and double count
//! nothing, and a change of tier or limits grants no refill.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use veo_tests::client::HttpClient;
use veo_tests::health::{self, Health};
use veo_tests::plugin::PluginConfig;
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Fleet, FleetOptions, RedisCluster, RedisServer};

/// Rolling window of the tests, in seconds: short, so a test spans several.
const WINDOW_SECONDS: u64 = 6;
/// Basic quota of the tests, in requests per window.
const QUOTA: u64 = 12;
/// Sync interval of the filter far from the quota, in milliseconds
/// (`PluginConfig`'s default).
const FAR_SYNC_MS: u64 = 200;
/// Sync interval the sidecar requests near the quota, in milliseconds.
const NEAR_SYNC_MS: u64 = 50;
/// Interval between the sidecars' exchanges with Redis, in milliseconds.
const FLUSH_MS: u64 = 50;
/// Allowance for the time between sending a request and Envoy deciding it,
/// and for call latency, in seconds.
const TOLERANCE_S: f64 = 0.3;

/// One decided request.
#[derive(Debug, Clone)]
struct Sent {
    t: f64,
    customer: String,
    status: u16,
}

fn plugin_config(key: &SigningKey) -> anyhow::Result<PluginConfig> {
    Ok(PluginConfig::for_key(key)?.quota("basic", QUOTA, WINDOW_SECONDS))
}

/// Sidecar configuration sharing counters through `target`, a TOML
/// fragment such as `redis_url = "..."`.
fn sidecar_config(target: &str) -> anyhow::Result<toml::Table> {
    let text = format!(
        "window_seconds = {WINDOW_SECONDS}\n\
         sync_interval_near_ms = {NEAR_SYNC_MS}\n\
         [counters]\n\
         backend = \"redis\"\n\
         {target}\n\
         shards = 8\n\
         flush_interval_ms = {FLUSH_MS}\n\
         timeout_ms = 300\n"
    );
    Ok(text.parse()?)
}

async fn fleet(key: &SigningKey, instances: usize, sidecar: toml::Table) -> anyhow::Result<Fleet> {
    let options = FleetOptions {
        sidecar_config: sidecar,
        ..FleetOptions::new(instances)
    };
    Ok(Fleet::start(&plugin_config(key)?, &options).await?)
}

/// Sends requests of each customer at `rate_per_s`, spread evenly over the
/// customers and round robin over `clients`, for `duration`.
async fn drive(
    clients: &[HttpClient],
    tokens: &[(String, String)],
    rate_per_s: f64,
    duration: Duration,
    start: Instant,
    sent: &mut Vec<Sent>,
) -> anyhow::Result<()> {
    let step = Duration::from_secs_f64(1.0 / (rate_per_s * tokens.len() as f64));
    let begin = Instant::now();
    let mut index = 0usize;
    while begin.elapsed() < duration {
        let (customer, token) = &tokens[index % tokens.len()];
        let client = &clients[index % clients.len()];
        let t = start.elapsed().as_secs_f64();
        let reply = client.get_with_token("/", token, &[]).await?;
        sent.push(Sent {
            t,
            customer: customer.clone(),
            status: reply.status,
        });
        index += 1;
        let next = begin + step * u32::try_from(index).unwrap_or(u32::MAX);
        tokio::time::sleep_until(next.into()).await;
    }
    Ok(())
}

/// Returns the maximum number of requests of `customer` admitted within any
/// window shorter than the quota window by [`TOLERANCE_S`].
fn max_admitted_in_window(sent: &[Sent], customer: &str) -> usize {
    let admitted: Vec<f64> = sent
        .iter()
        .filter(|request| request.customer == customer && request.status == 200)
        .map(|request| request.t)
        .collect();
    let window = WINDOW_SECONDS as f64 - TOLERANCE_S;
    admitted
        .iter()
        .enumerate()
        .map(|(index, &start)| {
            admitted[index..]
                .iter()
                .take_while(|&&t| t < start + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Bound on over-admission per window stated in the sidecar docs:
/// `(n - 1) * r * (t + f + l)`, with `r` the requests per second one
/// instance admits for the customer, `t` the longest sync interval, `f`
/// the Redis flush interval and `l` the latency allowance.
fn overshoot_bound(instances: usize, per_instance_rate: f64) -> usize {
    let seconds = (FAR_SYNC_MS + FLUSH_MS) as f64 / 1000.0 + TOLERANCE_S;
    ((instances - 1) as f64 * per_instance_rate * seconds).ceil() as usize
}

fn admitted_per_customer(sent: &[Sent]) -> BTreeMap<String, u64> {
    let mut admitted = BTreeMap::new();
    for request in sent {
        let count = admitted.entry(request.customer.clone()).or_insert(0);
        if request.status == 200 {
            *count += 1;
        }
    }
    admitted
}

/// Sums the per-minute totals every sidecar wrote to Redis, per customer.
async fn redis_totals(servers: &[&RedisServer]) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut totals = BTreeMap::new();
    for server in servers {
        let keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*:m:*")).await?;
        for key in keys {
            let fields: BTreeMap<String, u64> =
                server.query(redis::cmd("HGETALL").arg(&key)).await?;
            for (customer, count) in fields {
                *totals.entry(customer).or_insert(0) += count;
            }
        }
    }
    Ok(totals)
}

/// Sums the ledgers of every sidecar of the fleet, per customer.
async fn ledger_totals(
    fleet: &Fleet,
    customers: &[String],
) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut totals = BTreeMap::new();
    for instance in fleet.instances() {
        for customer in customers {
            let usage = instance.sidecar.usage(customer).await?;
            *totals.entry(customer.clone()).or_insert(0) += usage.admitted;
        }
    }
    Ok(totals)
}

/// Waits until every sidecar's ledger and Redis's totals both equal
/// `expected`, and returns the last of each.
async fn await_totals(
    fleet: &Fleet,
    servers: &[&RedisServer],
    expected: &BTreeMap<String, u64>,
) -> anyhow::Result<(BTreeMap<String, u64>, BTreeMap<String, u64>)> {
    let customers: Vec<String> = expected.keys().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ledger = ledger_totals(fleet, &customers).await?;
        let mut redis = redis_totals(servers).await?;
        for customer in &customers {
            redis.entry(customer.clone()).or_insert(0);
        }
        if (&ledger == expected && &redis == expected) || Instant::now() > deadline {
            return Ok((ledger, redis));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tokens(
    key: &SigningKey,
    customers: &[&str],
    tier: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    customers
        .iter()
        .map(|customer| {
            Ok((
                (*customer).to_owned(),
                key.mint(&TokenSpec::new(customer, tier))?,
            ))
        })
        .collect()
}

fn clients(fleet: &Fleet) -> Vec<HttpClient> {
    fleet
        .instances()
        .iter()
        .map(|instance| instance.envoy.client())
        .collect()
}

/// Checks that a customer sending far above its quota through several
/// instances gets at most the quota plus the stated bound in any window,
/// and keeps getting requests through window after window. A customer
/// under its quota must never be rejected meanwhile.
async fn assert_one_quota(fleet: &Fleet, key: &SigningKey) -> anyhow::Result<()> {
    let instances = fleet.instances().len();
    let clients = clients(fleet);
    let heavy = tokens(key, &["heavy"], "basic")?;
    let light = tokens(key, &["light"], "basic")?;
    // The heavy customer sends 10 requests per second to each instance;
    // the light one sends half its quota per window in all.
    let heavy_rate = 10.0 * instances as f64;
    let light_rate = QUOTA as f64 / 2.0 / WINDOW_SECONDS as f64;
    let duration = Duration::from_secs(2 * WINDOW_SECONDS + 2);

    let start = Instant::now();
    let mut heavy_sent = Vec::new();
    let mut light_sent = Vec::new();
    let (heavy_done, light_done) = tokio::join!(
        drive(
            &clients,
            &heavy,
            heavy_rate,
            duration,
            start,
            &mut heavy_sent
        ),
        drive(
            &clients,
            &light,
            light_rate,
            duration,
            start,
            &mut light_sent
        ),
    );
    heavy_done?;
    light_done?;

    let max_admitted = max_admitted_in_window(&heavy_sent, "heavy");
    let bound = overshoot_bound(instances, 10.0);
    let admitted = admitted_per_customer(&heavy_sent)["heavy"];
    eprintln!(
        "heavy: {} sent, {admitted} admitted, at most {max_admitted} in one window \
         (quota {QUOTA}, bound {bound})",
        heavy_sent.len()
    );
    ensure!(
        max_admitted <= QUOTA as usize + bound,
        "{max_admitted} admitted within one window, more than the quota {QUOTA} plus the bound {bound}"
    );
    ensure!(
        admitted >= 2 * QUOTA,
        "only {admitted} admitted over more than two windows; the quota is {QUOTA} per window"
    );
    let rejected_light: Vec<&Sent> = light_sent.iter().filter(|r| r.status != 200).collect();
    ensure!(
        rejected_light.is_empty(),
        "a customer under its quota was rejected: {rejected_light:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_quota_through_redis() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let redis = RedisServer::start(&dir.path().join("redis")).await?;
    let key = SigningKey::generate("k1");
    let target = format!("redis_url = \"{}\"", redis.url());
    let fleet = fleet(&key, 2, sidecar_config(&target)?).await?;

    assert_one_quota(&fleet, &key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_shares_one_quota() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = RedisCluster::start(dir.path(), 3).await?;
    let key = SigningKey::generate("k1");
    let seeds: Vec<String> = cluster
        .seed_urls()
        .iter()
        .map(|url| format!("\"{url}\""))
        .collect();
    let target = format!("redis_cluster_urls = [{}]", seeds.join(", "));
    let fleet = fleet(&key, 2, sidecar_config(&target)?).await?;

    assert_one_quota(&fleet, &key).await?;

    // Every sidecar's usage reached the cluster, spread over its masters.
    let customers = ["heavy", "light"].map(str::to_owned);
    let ledger = ledger_totals(&fleet, &customers).await?;
    let nodes: Vec<&RedisServer> = cluster.nodes().iter().collect();
    let (ledger, redis) = await_totals(&fleet, &nodes, &ledger).await?;
    assert_eq!(redis, ledger, "Redis Cluster totals and ledger differ");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_counts_every_request_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start(&dir.path().join("redis")).await?;
    let key = SigningKey::generate("k1");
    let target = format!("redis_url = \"{}\"", redis.url());
    let fleet = fleet(&key, 2, sidecar_config(&target)?).await?;
    let clients = clients(&fleet);
    let names = ["c0", "c1", "c2"];
    let tokens = tokens(&key, &names, "basic")?;
    // Under the quota: a third of it per window for each customer.
    let rate = QUOTA as f64 / 3.0 / WINDOW_SECONDS as f64;
    let phase = Duration::from_secs(4);
    let start = Instant::now();
    let mut sent = Vec::new();

    drive(&clients, &tokens, rate, phase, start, &mut sent).await?;
    redis.stop();
    drive(&clients, &tokens, rate, phase, start, &mut sent).await?;

    // While Redis is down the sidecars report themselves degraded and the
    // filters count degraded replies, yet the local policy admits every
    // request.
    for instance in fleet.instances() {
        let status = health::check(instance.sidecar.address(), "veo.counters").await?;
        assert_eq!(
            status,
            Health::NotServing,
            "sidecar health during the outage"
        );
        let overall = health::check(instance.sidecar.address(), "").await?;
        assert_eq!(overall, Health::Serving, "the sidecar itself keeps serving");
        let stats = instance.envoy.admin().stats("veo.").await?;
        let degraded = stats
            .iter()
            .find(|(name, _)| name.ends_with("veo.sync_degraded_total"))
            .map_or(0, |(_, &value)| value);
        assert!(degraded > 0, "no degraded sync reply counted: {stats:?}");
    }

    redis.start_again().await?;
    drive(&clients, &tokens, rate, phase, start, &mut sent).await?;

    let rejected: Vec<&Sent> = sent
        .iter()
        .filter(|request| request.status != 200)
        .collect();
    ensure!(
        rejected.is_empty(),
        "requests rejected under the quota: {rejected:?}"
    );
    let admitted = admitted_per_customer(&sent);
    let (ledger, redis_seen) = await_totals(&fleet, &[&redis], &admitted).await?;
    assert_eq!(
        ledger, admitted,
        "ledger totals and admitted requests differ"
    );
    assert_eq!(
        redis_seen, admitted,
        "Redis totals and admitted requests differ"
    );
    for instance in fleet.instances() {
        let status = health::check(instance.sidecar.address(), "veo.counters").await?;
        assert_eq!(
            status,
            Health::Serving,
            "sidecar health after Redis returned"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_started_during_outage_recovers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start(&dir.path().join("redis")).await?;
    redis.stop();
    let key = SigningKey::generate("k1");
    let target = format!("redis_url = \"{}\"", redis.url());
    let fleet = fleet(&key, 1, sidecar_config(&target)?).await?;
    let sidecar = fleet.instances()[0].sidecar.address();

    assert_eq!(health::check(sidecar, "").await?, Health::Serving);
    assert_eq!(
        health::check(sidecar, "veo.counters").await?,
        Health::NotServing
    );
    let clients = clients(&fleet);
    let tokens = tokens(&key, &["early"], "basic")?;
    let start = Instant::now();
    let mut sent = Vec::new();
    drive(
        &clients,
        &tokens,
        2.0,
        Duration::from_secs(2),
        start,
        &mut sent,
    )
    .await?;
    ensure!(
        sent.iter().all(|request| request.status == 200),
        "requests rejected while Redis was down: {sent:?}"
    );

    redis.start_again().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health::check(sidecar, "veo.counters").await? != Health::Serving {
        ensure!(
            Instant::now() < deadline,
            "the sidecar did not report Redis reachable within 10 s:\n{}",
            fleet.instances()[0].sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admitted = admitted_per_customer(&sent);
    let (_, redis_seen) = await_totals(&fleet, &[&redis], &admitted).await?;
    assert_eq!(redis_seen, admitted, "usage counted while Redis was down");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_change_applies_without_refill() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key)?
        .quota("basic", 5, 30)
        .quota("pro", 10, 30);
    let fleet = Fleet::start(&config, &FleetOptions::new(1)).await?;
    let client = fleet.instances()[0].envoy.client();
    let pro = key.mint(&TokenSpec::new("mover", "pro"))?;
    let basic = key.mint(&TokenSpec::new("mover", "basic"))?;

    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(client.get_with_token("/", &pro, &[]).await?.status);
    }
    ensure!(statuses.iter().all(|&status| status == 200), "{statuses:?}");

    // Downgraded with 8 of the window used: basic's 5 are already spent.
    let reply = client.get_with_token("/", &basic, &[]).await?;
    assert_eq!(
        reply.status, 429,
        "downgrade granted a fresh quota: {}",
        reply.body
    );

    // Upgraded again: the same 8 count, so 2 more of pro's 10.
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(client.get_with_token("/", &pro, &[]).await?.status);
    }
    assert_eq!(
        after,
        [200, 200, 429, 429],
        "upgrade must not refill either"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_policy_rejects_during_outage() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut redis = RedisServer::start(&dir.path().join("redis")).await?;
    let key = SigningKey::generate("k1");
    let config = plugin_config(&key)?
        .set("/tiers/pro/failure_policy", serde_json::json!("refuse"))
        .set("/tiers/pro/failure_status", serde_json::json!(503));
    let target = format!("redis_url = \"{}\"", redis.url());
    let options = FleetOptions {
        sidecar_config: sidecar_config(&target)?,
        ..FleetOptions::new(1)
    };
    let fleet = Fleet::start(&config, &options).await?;
    let instance = &fleet.instances()[0];
    let client = instance.envoy.client();
    let pro = key.mint(&TokenSpec::new("strict", "pro"))?;
    let basic = key.mint(&TokenSpec::new("lenient", "basic"))?;
    assert_eq!(client.get_with_token("/", &pro, &[]).await?.status, 200);
    assert_eq!(client.get_with_token("/", &basic, &[]).await?.status, 200);

    redis.stop();
    // The workers read the sync state on their timer, so wait until the pro
    // tier's policy applies.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rejection = loop {
        let reply = client.get_with_token("/", &pro, &[]).await?;
        if reply.status != 200 {
            break reply;
        }
        ensure!(
            Instant::now() < deadline,
            "pro still admitted 10 s into the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rejection.status, 503, "body: {}", rejection.body);
    assert_eq!(rejection.json()?["error"], "quota_unavailable");
    assert_eq!(rejection.header("retry-after"), Some("1"));
    // Basic keeps the default policy: decided locally, and counted.
    assert_eq!(client.get_with_token("/", &basic, &[]).await?.status, 200);
    let expected = BTreeMap::from([("wasmcustom.veo.fail_open_total".to_owned(), 1)]);
    let seen = instance
        .envoy
        .admin()
        .await_counters(&expected, Duration::from_secs(5))
        .await?;
    ensure!(
        seen["wasmcustom.veo.fail_open_total"] >= 1,
        "fail-open admission not counted: {seen:?}"
    );

    redis.start_again().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get_with_token("/", &pro, &[]).await?.status != 200 {
        ensure!(
            Instant::now() < deadline,
            "pro still rejected 10 s after Redis returned"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let closed = instance
        .envoy
        .admin()
        .stats("veo.fail_closed_total")
        .await?;
    ensure!(
        closed.values().any(|&count| count >= 1),
        "rejections under the refuse policy not counted: {closed:?}"
    );
    Ok(())
}

/// Returns the sidecar config whose `[tiers]` give basic `quota` requests
/// per rolling 30 s.
fn sidecar_basic_quota(quota: u64) -> String {
    format!("window_seconds = 30\n[tiers.basic]\nquota_requests = {quota}\n")
}

/// Starts one instance whose filter and sidecar both give basic `quota`
/// requests per rolling 30 s.
async fn basic_quota_instance(key: &SigningKey, quota: u64) -> anyhow::Result<Fleet> {
    let config = PluginConfig::for_key(key)?.quota("basic", quota, 30);
    let options = FleetOptions {
        sidecar_config: sidecar_basic_quota(quota).parse()?,
        ..FleetOptions::new(1)
    };
    Ok(Fleet::start(&config, &options).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_change_applies_without_refill() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut fleet = basic_quota_instance(&key, 12).await?;
    let client = fleet.instances()[0].envoy.client();
    let token = key.mint(&TokenSpec::new("steady", "basic"))?;

    for _ in 0..8 {
        let reply = client.get_with_token("/", &token, &[]).await?;
        ensure!(reply.status == 200, "under the quota: {}", reply.body);
    }

    // Down to 6 with 8 used: rejected from the next sync on, with no
    // fresh 6. A request admitted before the change reaches the instance
    // counts as used too.
    fleet.instances_mut()[0]
        .sidecar
        .reload_config(&sidecar_basic_quota(6))?;
    let mut admitted_before_change = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.get_with_token("/", &token, &[]).await?;
        let policy = reply.header("ratelimit-policy").unwrap_or_default();
        if policy.contains("q=6") {
            ensure!(reply.status == 429, "the lower limit granted a fresh quota");
            break;
        }
        // Until the new limit appears in `ratelimit-policy`, requests are
        // decided under the old one. The sidecar may already cap this
        // instance at what it used.
        if reply.status == 200 {
            admitted_before_change += 1;
        }
        ensure!(
            Instant::now() < deadline,
            "the lower limit did not apply within 10 s:\n{}",
            fleet.instances()[0].sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let used = 8 + admitted_before_change;
    ensure!(used <= 12, "{used} admitted under a quota of 12");

    // Up to 10: exactly what is left of 10 in the same window.
    fleet.instances_mut()[0]
        .sidecar
        .reload_config(&sidecar_basic_quota(10))?;
    let mut admitted_after_raise = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.get_with_token("/", &token, &[]).await?;
        let raised = reply
            .header("ratelimit-policy")
            .is_some_and(|policy| policy.contains("q=10"));
        if reply.status == 200 {
            ensure!(raised, "admitted while the limit was still 6");
            admitted_after_raise += 1;
        } else if raised {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the higher limit did not apply within 10 s"
        );
        if !raised {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        admitted_after_raise,
        10usize.saturating_sub(used),
        "{used} used before the raise to 10"
    );
    Ok(())
}

/// Proves a raised limit admits the next request of a customer that sat
/// idle at the cap of its old quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_limit_admits_idle_customer() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut fleet = basic_quota_instance(&key, 5).await?;
    let client = fleet.instances()[0].envoy.client();
    let token = key.mint(&TokenSpec::new("idle", "basic"))?;
    for _ in 0..5 {
        let reply = client.get_with_token("/", &token, &[]).await?;
        ensure!(reply.status == 200, "under the quota: {}", reply.body);
    }
    let refused = client.get_with_token("/", &token, &[]).await?;
    ensure!(refused.status == 429, "sixth request: {}", refused.status);

    // While the customer is idle, the sync replies keep refreshing its cap
    // of 5, computed from the old quota.
    tokio::time::sleep(Duration::from_secs(1)).await;
    fleet.instances_mut()[0]
        .sidecar
        .reload_config(&sidecar_basic_quota(8))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fleet.instances()[0]
        .envoy
        .log()
        .contains("basic 8 per 30 s")
    {
        ensure!(
            Instant::now() < deadline,
            "the sidecar's new limit did not reach Envoy within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Workers read the new limits on their next tick, every 250 ms.
    tokio::time::sleep(Duration::from_millis(1000)).await;

    let reply = client.get_with_token("/", &token, &[]).await?;
    let policy = reply.header("ratelimit-policy").unwrap_or_default();
    ensure!(policy.contains("q=8"), "policy after the raise: {policy}");
    ensure!(
        reply.status == 200,
        "first request after the raise to 8 with 5 used: status {}",
        reply.status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_replica_recovers_after_promotion() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let primary = RedisServer::start(&dir.path().join("primary")).await?;
    let replica = RedisServer::start_replica_of(&dir.path().join("replica"), &primary).await?;
    let key = SigningKey::generate("k1");
    // The sidecar points at the replica, as after a failover that has not
    // finished: its writes get READONLY.
    let target = format!("redis_url = \"{}\"", replica.url());
    let fleet = fleet(&key, 1, sidecar_config(&target)?).await?;
    let sidecar = fleet.instances()[0].sidecar.address();
    let clients = clients(&fleet);
    let tokens = tokens(&key, &["failover"], "basic")?;
    let start = Instant::now();
    let mut sent = Vec::new();
    drive(
        &clients,
        &tokens,
        2.0,
        Duration::from_secs(2),
        start,
        &mut sent,
    )
    .await?;
    ensure!(
        sent.iter().all(|request| request.status == 200),
        "requests rejected while Redis was read-only: {sent:?}"
    );
    assert_eq!(
        health::check(sidecar, "veo.counters").await?,
        Health::NotServing
    );
    ensure!(
        fleet.instances()[0].sidecar.log().contains("read-only"),
        "the sidecar did not log the READONLY replies:\n{}",
        fleet.instances()[0].sidecar.log()
    );

    // The replica becomes the primary.
    let _: String = replica
        .query(redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health::check(sidecar, "veo.counters").await? != Health::Serving {
        ensure!(
            Instant::now() < deadline,
            "no recovery 10 s after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let admitted = admitted_per_customer(&sent);
    let (_, seen) = await_totals(&fleet, &[&replica], &admitted).await?;
    assert_eq!(seen, admitted, "usage counted while Redis was read-only");
    drop(primary);
    Ok(())
}
