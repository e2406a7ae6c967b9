//! Client-sent identity headers: the filter removes them and sets the
//! verified customer and tier, so a client cannot pick its own tier.

use anyhow::Context;
use veo_tests::Stack;
use veo_tests::client::count_status;
use veo_tests::plugin::{BASIC_QUOTA, PluginConfig};
use veo_tests::tokens::{SigningKey, TokenSpec};

/// Proves client-sent tier, customer and region headers change nothing upstream or in the quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sent_tier_changes_nothing() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start(&PluginConfig::for_key(&key)?).await?;
    let token = key.mint(&TokenSpec::new("honest-basic", "basic"))?;
    let forged = [
        ("x-veo-tier", "enterprise"),
        ("x-veo-customer", "someone-else"),
        ("x-veo-region", "eu-west"),
    ];
    let client = stack.client();

    let mut replies = Vec::new();
    for _ in 0..BASIC_QUOTA + 5 {
        replies.push(client.get_with_token("/", &token, &forged).await?);
    }

    let first = replies.first().context("no reply")?;
    assert_eq!(first.status, 200, "body: {}", first.body);
    let seen = first.json()?;
    let headers = &seen["headers"];
    assert_eq!(headers["x-veo-tier"], serde_json::json!(["basic"]));
    assert_eq!(
        headers["x-veo-customer"],
        serde_json::json!(["honest-basic"])
    );
    assert!(
        headers.get("x-veo-region").is_none(),
        "x-veo-region reached the upstream"
    );

    assert_eq!(count_status(&replies, 200), usize::try_from(BASIC_QUOTA)?);
    let refused = replies.last().context("no reply")?;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()?["tier"], "basic");
    Ok(())
}
