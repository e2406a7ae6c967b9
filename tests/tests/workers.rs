//! One count per customer across Envoy's worker threads: the quota state
//! lives in shared data, so parallel connections served by different
//! workers share it.

use std::collections::BTreeMap;

use anyhow::Context;
use tokio::task::JoinSet;
use veo_tests::plugin::PluginConfig;
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Stack, StackOptions};

/// Quota per customer in this test; the window is long enough for every
/// request to fall inside it.
const QUOTA: u64 = 40;
const WINDOW_SECONDS: u64 = 30;
const REQUESTS_PER_CUSTOMER: usize = 120;
const PARALLEL_CONNECTIONS: usize = 16;

/// Proves two workers admit exactly one quota per customer between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_one_count() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key)?.quota("basic", QUOTA, WINDOW_SECONDS);
    let stack = Stack::start_with(
        &config,
        StackOptions {
            concurrency: 2,
            ..StackOptions::default()
        },
    )
    .await?;
    let customers = ["shared-a", "shared-b"];
    let mut tokens = Vec::new();
    for customer in customers {
        tokens.push(key.mint(&TokenSpec::new(customer, "basic"))?);
    }

    // Each task opens a new connection per request; the kernel spreads
    // connections over the workers' listening sockets.
    let client = stack.envoy.fresh_connection_client();
    let mut tasks = JoinSet::new();
    for task in 0..PARALLEL_CONNECTIONS {
        let client = client.clone();
        let tokens = tokens.clone();
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            let per_task = REQUESTS_PER_CUSTOMER * tokens.len() / PARALLEL_CONNECTIONS;
            for request in 0..per_task {
                let customer = (task + request) % tokens.len();
                let reply = client.get_with_token("/", &tokens[customer], &[]).await?;
                statuses.push((customer, reply.status));
            }
            Ok::<_, veo_tests::HarnessError>(statuses)
        });
    }
    let mut admitted: BTreeMap<usize, u64> = BTreeMap::new();
    let mut refused: BTreeMap<usize, u64> = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        for (customer, status) in result.context("request task panicked")?? {
            match status {
                200 => *admitted.entry(customer).or_default() += 1,
                429 => *refused.entry(customer).or_default() += 1,
                other => anyhow::bail!("unexpected status {other} for {}", customers[customer]),
            }
        }
    }

    for (index, customer) in customers.iter().enumerate() {
        let admitted = admitted.get(&index).copied().unwrap_or(0);
        let refused = refused.get(&index).copied().unwrap_or(0);
        assert_eq!(admitted, QUOTA, "{customer}: admitted");
        assert!(refused > 0, "{customer}: nothing refused");
    }

    // Envoy names listener stats after the configured address, port 0 here.
    let stats = stack.envoy.admin().stats(".worker_").await?;
    for worker in 0..2 {
        let suffix = format!(".worker_{worker}.downstream_cx_total");
        let connections: u64 = stats
            .iter()
            .filter(|(name, _)| name.starts_with("listener.127.0.0.1_") && name.ends_with(&suffix))
            .map(|(_, value)| value)
            .sum();
        assert!(
            connections > 0,
            "worker {worker} served no connection; stats: {stats:?}"
        );
    }
    Ok(())
}
