//! The filter's counters on Envoy's stats endpoint: requests, auth failures,
//! token-cache hits and misses, and 429s by tier.

use std::collections::BTreeMap;
use std::time::Duration;

use veo_tests::Stack;
use veo_tests::client::{burst, count_status};
use veo_tests::plugin::{BASIC_QUOTA, PluginConfig};
use veo_tests::tokens::{SigningKey, TokenSpec};

/// Proves the filter's counters match the requests, 401s, cache lookups and 429s sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_counters_match_decisions() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start(&PluginConfig::for_key(&key)?).await?;
    let client = stack.client();
    let token = key.mint(&TokenSpec::new("stats-basic", "basic"))?;
    let over_quota = 3;
    let without_token = 2;

    let replies = burst(&client, &token, usize::try_from(BASIC_QUOTA)? + over_quota).await?;
    assert_eq!(count_status(&replies, 429), over_quota);
    for _ in 0..without_token {
        assert_eq!(client.get("/", &[]).await?.status, 401);
    }

    let sent = BASIC_QUOTA + u64::try_from(over_quota + without_token)?;
    let expected: BTreeMap<String, u64> = [
        ("wasmcustom.veo.requests_total", sent),
        (
            "wasmcustom.veo.auth_failures_total",
            u64::try_from(without_token)?,
        ),
        (
            "wasmcustom.veo.rate_limited_total.tier.basic",
            u64::try_from(over_quota)?,
        ),
        ("wasmcustom.veo.rate_limited_total.tier.pro", 0),
        // One verification, then every later request with the token hits the cache.
        ("wasmcustom.veo.token_cache_misses_total", 1),
        (
            "wasmcustom.veo.token_cache_hits_total",
            BASIC_QUOTA + u64::try_from(over_quota)? - 1,
        ),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    let observed = stack
        .envoy
        .admin()
        .await_counters(&expected, Duration::from_secs(5))
        .await?;
    assert_eq!(
        observed, expected,
        "Envoy stats (left) against requests sent (right)"
    );
    Ok(())
}
