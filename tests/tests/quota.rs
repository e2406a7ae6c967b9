//! Tier quotas end to end: exact quotas per rolling window, the 429 reply and
//! its headers, the enterprise burst cap, and admission after the window.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use veo_tests::Stack;
use veo_tests::client::{Reply, burst, count_status};
use veo_tests::plugin::{
    BASIC_QUOTA, ENTERPRISE_BURST, ENTERPRISE_RATE, PRO_QUOTA, PluginConfig, WINDOW_SECONDS,
};
use veo_tests::ratelimit::parse_item;
use veo_tests::tokens::{SigningKey, TokenSpec};

async fn start() -> anyhow::Result<(Stack, SigningKey)> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start(&PluginConfig::for_key(&key)?).await?;
    Ok((stack, key))
}

/// Checks a 429 reply: JSON body, `Retry-After` within the window, and the
/// `RateLimit` fields naming `tier` with nothing remaining.
fn assert_rate_limited(reply: &Reply, tier: &str, quota: u64) -> anyhow::Result<u64> {
    assert_eq!(reply.status, 429, "body: {}", reply.body);
    let retry_after: u64 = reply
        .header("retry-after")
        .context("429 without retry-after")?
        .parse()
        .context("retry-after is not an integer")?;
    assert!(
        (1..=WINDOW_SECONDS).contains(&retry_after),
        "retry-after {retry_after} outside 1..={WINDOW_SECONDS}"
    );

    let body = reply.json()?;
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["tier"], tier);
    assert_eq!(body["retry_after_seconds"], retry_after);

    let policy = parse_item(
        reply
            .header("ratelimit-policy")
            .context("no ratelimit-policy")?,
    )
    .context("ratelimit-policy is not a structured-field item")?;
    assert_eq!(policy.name, tier);
    assert_eq!(policy.integer("q"), Some(quota));
    assert_eq!(policy.integer("w"), Some(WINDOW_SECONDS));

    let limit = parse_item(reply.header("ratelimit").context("no ratelimit")?)
        .context("ratelimit is not a structured-field item")?;
    assert_eq!(limit.name, tier);
    assert_eq!(limit.integer("r"), Some(0));
    assert_eq!(limit.integer("t"), Some(retry_after));
    Ok(retry_after)
}

/// Checks that a burst got exactly `quota` admissions, first, each with the
/// remaining count in `RateLimit`, and 429 for every request after them.
fn assert_exact_quota(replies: &[Reply], tier: &str, quota: u64) -> anyhow::Result<()> {
    let quota_len = usize::try_from(quota)?;
    for (index, reply) in replies[..quota_len].iter().enumerate() {
        assert_eq!(
            reply.status, 200,
            "request {index} of the burst: {}",
            reply.body
        );
        let limit = parse_item(reply.header("ratelimit").context("200 without ratelimit")?)
            .context("ratelimit is not a structured-field item")?;
        assert_eq!(limit.integer("r"), Some(quota - 1 - u64::try_from(index)?));
        ensure!(
            reply.header("ratelimit-policy").is_some(),
            "200 without ratelimit-policy"
        );
    }
    for reply in &replies[quota_len..] {
        assert_rate_limited(reply, tier, quota)?;
    }
    Ok(())
}

/// Sends a rapid burst of `quota` plus 5 requests as `customer` of `tier`
/// and checks that exactly `quota` are admitted, and only those reach the
/// upstream.
async fn assert_burst_gets_exact_quota(
    customer: &str,
    tier: &str,
    quota: u64,
) -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let token = key.mint(&TokenSpec::new(customer, tier))?;

    let replies = burst(&stack.client(), &token, usize::try_from(quota)? + 5).await?;

    assert_exact_quota(&replies, tier, quota)?;
    assert_eq!(stack.upstream.requests(), quota);
    Ok(())
}

/// Proves a basic customer's rapid burst gets exactly the basic quota, then 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_burst_gets_exactly_basic_quota() -> anyhow::Result<()> {
    assert_burst_gets_exact_quota("basic-burst", "basic", BASIC_QUOTA).await
}

/// Proves a pro customer's rapid burst gets exactly the pro quota, then 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pro_burst_gets_exactly_pro_quota() -> anyhow::Result<()> {
    assert_burst_gets_exact_quota("pro-burst", "pro", PRO_QUOTA).await
}

/// Proves enterprise is never refused within its burst cap and is refused above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enterprise_refused_only_above_burst_cap() -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let token = key.mint(&TokenSpec::new("enterprise-burst", "enterprise"))?;
    let cap = usize::try_from(ENTERPRISE_BURST)?;

    let started = Instant::now();
    let replies = burst(&stack.client(), &token, cap + 10).await?;
    let elapsed = started.elapsed();

    for (index, reply) in replies[..cap].iter().enumerate() {
        assert_eq!(reply.status, 200, "request {index} within the burst cap");
    }
    // The bucket refills at ENTERPRISE_RATE tokens per second during the burst.
    let refilled = usize::try_from(ENTERPRISE_RATE * (elapsed.as_secs() + 1))?;
    let admitted = count_status(&replies, 200);
    assert!(
        admitted <= cap + refilled,
        "{admitted} admitted, above the cap {cap} plus {refilled} refilled tokens"
    );
    let refused = count_status(&replies, 429);
    assert!(refused > 0, "no request above the burst cap was refused");
    assert_eq!(admitted + refused, replies.len());
    Ok(())
}

/// Proves requests are admitted again once the Retry-After interval has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admits_again_after_retry_after() -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let token = key.mint(&TokenSpec::new("basic-retry", "basic"))?;
    let client = stack.client();

    let replies = burst(&client, &token, usize::try_from(BASIC_QUOTA)? + 1).await?;
    let refused = replies.last().context("empty burst")?;
    let retry_after = assert_rate_limited(refused, "basic", BASIC_QUOTA)?;

    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(300)).await;
    let reply = client.get_with_token("/", &token, &[]).await?;
    assert_eq!(
        reply.status, 200,
        "after retry-after {retry_after}s: {}",
        reply.body
    );
    Ok(())
}

/// Proves refused requests do not use quota: steady refused retries never block the next window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_do_not_consume_quota() -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let token = key.mint(&TokenSpec::new("basic-steady", "basic"))?;
    let client = stack.client();
    let quota = usize::try_from(BASIC_QUOTA)?;

    let replies = burst(&client, &token, quota).await?;
    assert_eq!(count_status(&replies, 200), quota);

    // Retry every 100 ms; if the refusals counted, the window would never empty.
    let deadline = Instant::now() + Duration::from_secs(WINDOW_SECONDS + 2);
    let mut refusals = 0;
    loop {
        let reply = client.get_with_token("/", &token, &[]).await?;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 429, "body: {}", reply.body);
        refusals += 1;
        ensure!(
            Instant::now() < deadline,
            "still refused {WINDOW_SECONDS}s after the quota was used, after {refusals} refusals"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refusals > 0, "the quota was not used up by the first burst");

    // The first burst has left the window; only the one admitted retry is in it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let replies = burst(&client, &token, quota + 3).await?;
    assert_eq!(count_status(&replies, 200), quota - 1);
    Ok(())
}
