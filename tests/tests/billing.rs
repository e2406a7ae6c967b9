//! Billing end to end: real Envoy with the filter, the real sidecar and a
//! fake Stripe API that speaks Stripe's wire format. Every admitted request
//! and every response byte reaches Stripe exactly once, through lost
//! replies, outages, rate limits and `kill -9`. Webhooks change tiers at the
//! edge, and reconciliation finds and corrects usage Stripe lost.
//!
//! The tests run on a multi-threaded runtime: stopping the sidecar blocks
//! one thread while its last billing round talks to the fake Stripe server,
//! which runs on the other.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use veo_proto::admin::{GetStripeCustomerRequest, ReconcileRequest, SetStripeCustomerRequest};
use veo_tests::client::{HttpClient, Reply};
use veo_tests::plugin::{BASIC_QUOTA, PRO_QUOTA, PluginConfig, WINDOW_SECONDS};
use veo_tests::sidecar::{CustomerUsage, Sidecar, unix_seconds};
use veo_tests::stripe::webhook::{Subscription, SubscriptionEventType, sign, subscription_event};
use veo_tests::stripe::{FailureCount, FakeStripe, InjectedFailure};
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Stack, StackOptions};

const API_KEY: &str = "sk_test_veo_billing";
const WEBHOOK_SECRET: &str = "whsec_veo_billing_test";
const METER_EVENTS: &str = "/v1/billing/meter_events";

/// Sidecar config of the billing tests: rounds every second, minutes
/// billed one second after they end, and the test prices.
fn sidecar_toml(max_concurrent_requests: u32) -> String {
    format!(
        r#"
[billing]
region = "test"
sync_interval_seconds = 1
close_delay_seconds = 1
max_concurrent_requests = {max_concurrent_requests}
reconcile_interval_seconds = 0
# The fake shows events in its summaries at once.
summary_settle_seconds = 0

[billing.prices]
price_basic = "basic"
price_pro = "pro"
"#
    )
}

struct Billing {
    stack: Stack,
    stripe: FakeStripe,
    key: SigningKey,
}

impl Billing {
    async fn start(max_concurrent_requests: u32) -> anyhow::Result<Self> {
        let stripe = FakeStripe::start(API_KEY).await?;
        stripe.create_meter("api_requests")?;
        stripe.create_meter("egress_bytes")?;
        let key = SigningKey::generate("k1");
        let options = StackOptions {
            sidecar_toml: Some(sidecar_toml(max_concurrent_requests)),
            sidecar_env: vec![
                ("STRIPE_API_KEY".into(), API_KEY.into()),
                ("STRIPE_API_BASE".into(), stripe.base_url()),
                ("STRIPE_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
            ],
            ..StackOptions::default()
        };
        let stack = Stack::start_with(&PluginConfig::for_key(&key)?, options).await?;
        Ok(Self { stack, stripe, key })
    }

    /// Creates a Stripe customer for `customer` and maps it over the admin
    /// API; returns the Stripe id.
    async fn map_customer(&self, customer: &str) -> anyhow::Result<String> {
        let stripe_id = self
            .stripe
            .create_customer(&[("veo_customer_id", customer)]);
        self.stack
            .sidecar
            .admin()
            .await?
            .set_stripe_customer(SetStripeCustomerRequest {
                customer: customer.into(),
                stripe_customer_id: stripe_id.clone(),
            })
            .await
            .context("SetStripeCustomer")?;
        Ok(stripe_id)
    }

    fn webhook_url(&self) -> String {
        format!(
            "http://{}/stripe/webhook",
            self.stack.sidecar.http_address()
        )
    }
}

/// What the client saw of one customer's traffic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Seen {
    admitted: u64,
    refused: u64,
    body_bytes: u64,
}

async fn traffic(client: &HttpClient, token: &str, count: usize) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    for _ in 0..count {
        let reply = client.get_with_token("/videos/v1", token, &[]).await?;
        match reply.status {
            200 => {
                seen.admitted += 1;
                seen.body_bytes += reply.body.len() as u64;
            }
            429 => seen.refused += 1,
            other => anyhow::bail!("unexpected status {other}: {}", reply.body),
        }
    }
    Ok(seen)
}

/// Waits until the ledger contains exactly what the clients saw.
async fn await_ledger(sidecar: &Sidecar, seen: &BTreeMap<String, Seen>) -> anyhow::Result<()> {
    let expected: BTreeMap<String, CustomerUsage> = seen
        .iter()
        .map(|(customer, seen)| {
            let usage = CustomerUsage {
                admitted: seen.admitted,
                refused: seen.refused,
            };
            (customer.clone(), usage)
        })
        .collect();
    let observed = sidecar
        .await_usage(&expected, Duration::from_secs(10))
        .await?;
    ensure!(
        observed == expected,
        "ledger {observed:?} != client {expected:?}"
    );
    Ok(())
}

/// Waits until the sidecar has stored `bytes` response bytes in all, by its
/// `veo_ledger_usage_total{meter="egress_bytes"}` counter. The filter sends
/// a response's bytes when the response ends, often one batch after the
/// request's count.
async fn await_egress(billing: &Billing, bytes: u64) -> anyhow::Result<()> {
    let expected = format!("veo_ledger_usage_total{{meter=\"egress_bytes\"}} {bytes}\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = metrics_page(billing).await?;
        if metrics.contains(&expected) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "expected {expected} in {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check()
}

/// Checks that no identifier was accepted twice and that there is at most
/// one event per customer, meter and minute.
fn assert_each_event_once(stripe: &FakeStripe) {
    let events = stripe.meter_events();
    let identifiers: BTreeSet<&str> = events
        .iter()
        .map(|event| event.identifier.as_str())
        .collect();
    assert_eq!(
        identifiers.len(),
        events.len(),
        "an identifier was accepted twice"
    );
    let buckets: BTreeSet<(&str, &str, i64)> = events
        .iter()
        .map(|event| {
            (
                event.customer.as_str(),
                event.event_name.as_str(),
                event.timestamp,
            )
        })
        .collect();
    assert_eq!(
        buckets.len(),
        events.len(),
        "more than one event for a customer, meter and minute"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admitted_request_is_billed_once() -> anyhow::Result<()> {
    let billing = Billing::start(4).await?;
    let client = billing.stack.client();
    let customers = [("ana", "basic"), ("ben", "pro"), ("cy", "basic")];
    let mut stripe_ids = BTreeMap::new();
    let mut seen = BTreeMap::new();
    for (customer, tier) in customers {
        stripe_ids.insert(customer, billing.map_customer(customer).await?);
        let token = billing.key.mint(&TokenSpec::new(customer, tier))?;
        // More than the pro quota, so some requests are refused and must
        // not be billed.
        seen.insert(customer.to_owned(), traffic(&client, &token, 40).await?);
    }
    await_ledger(&billing.stack.sidecar, &seen).await?;
    let bytes: u64 = seen.values().map(|seen| seen.body_bytes).sum();
    await_egress(&billing, bytes).await?;

    let mut stack = billing.stack;
    stack.sidecar.stop();

    for (customer, seen) in &seen {
        let stripe_id = &stripe_ids[customer.as_str()];
        assert!(seen.refused > 0, "{customer} was never refused");
        assert_eq!(
            billing.stripe.usage_sum(stripe_id, "api_requests"),
            seen.admitted,
            "api_requests of {customer}"
        );
        assert_eq!(
            billing.stripe.usage_sum(stripe_id, "egress_bytes"),
            seen.body_bytes,
            "egress_bytes of {customer}"
        );
    }
    assert_each_event_once(&billing.stripe);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_and_kill_bill_nothing_twice() -> anyhow::Result<()> {
    let billing = Billing::start(1).await?;
    let client = billing.stack.client();
    let stripe_id = billing.map_customer("dora").await?;
    let token = billing.key.mint(&TokenSpec::new("dora", "pro"))?;
    let seen = traffic(&client, &token, 12).await?;
    await_ledger(
        &billing.stack.sidecar,
        &BTreeMap::from([("dora".to_owned(), seen)]),
    )
    .await?;
    await_egress(&billing, seen.body_bytes).await?;

    // Stripe records every event but the replies are lost, so the sidecar
    // retries; it is killed while retrying and started again.
    billing.stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::LostReply,
        FailureCount::UntilCleared,
    );
    let mut stack = billing.stack;
    let deadline = Instant::now() + Duration::from_secs(90);
    while billing.stripe.meter_events().is_empty() {
        ensure!(Instant::now() < deadline, "no meter event reached Stripe");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.sidecar.kill_hard();
    billing.stripe.clear_failures(METER_EVENTS);
    stack.sidecar.restart().await?;
    stack.sidecar.stop();

    assert_eq!(
        billing.stripe.usage_sum(&stripe_id, "api_requests"),
        seen.admitted
    );
    assert_eq!(
        billing.stripe.usage_sum(&stripe_id, "egress_bytes"),
        seen.body_bytes
    );
    assert_each_event_once(&billing.stripe);
    let replays = billing.stripe.request_count(METER_EVENTS, 200)
        + billing.stripe.request_count(METER_EVENTS, 400);
    assert!(replays >= 1, "the restarted sidecar sent nothing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_and_rate_limits_catch_up_in_order() -> anyhow::Result<()> {
    let billing = Billing::start(1).await?;
    let client = billing.stack.client();
    let mut stripe_ids = BTreeMap::new();
    let mut seen = BTreeMap::new();
    for customer in ["eli", "fay"] {
        stripe_ids.insert(customer, billing.map_customer(customer).await?);
        let token = billing.key.mint(&TokenSpec::new(customer, "pro"))?;
        seen.insert(customer.to_owned(), traffic(&client, &token, 8).await?);
    }
    await_ledger(&billing.stack.sidecar, &seen).await?;
    await_egress(&billing, seen.values().map(|seen| seen.body_bytes).sum()).await?;

    billing.stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::ServerError,
        FailureCount::Next(3),
    );
    billing.stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::RateLimited,
        FailureCount::Next(3),
    );
    let mut stack = billing.stack;
    stack.sidecar.stop();
    stack.sidecar.restart().await?;
    let caught_up = eventually(Duration::from_secs(60), || {
        stripe_ids.iter().all(|(customer, stripe_id)| {
            billing.stripe.usage_sum(stripe_id, "api_requests") == seen[*customer].admitted
                && billing.stripe.usage_sum(stripe_id, "egress_bytes") == seen[*customer].body_bytes
        })
    })
    .await;

    assert!(caught_up, "Stripe has {:?}", billing.stripe.meter_events());
    assert!(billing.stripe.request_count(METER_EVENTS, 500) >= 3);
    assert!(billing.stripe.request_count(METER_EVENTS, 429) >= 3);
    assert_each_event_once(&billing.stripe);
    let timestamps: Vec<i64> = billing
        .stripe
        .meter_events()
        .iter()
        .map(|event| event.timestamp)
        .collect();
    assert!(
        timestamps.windows(2).all(|pair| pair[0] <= pair[1]),
        "events reached Stripe out of minute order: {timestamps:?}"
    );
    Ok(())
}

fn current_tier(reply: &Reply) -> Option<String> {
    let body = reply.json().ok()?;
    body["headers"]["x-veo-tier"][0].as_str().map(str::to_owned)
}

async fn deliver(billing: &Billing, event: &serde_json::Value) -> anyhow::Result<u16> {
    let body = event.to_string();
    let signature = sign(&body, WEBHOOK_SECRET, unix_seconds());
    Ok(veo_tests::stripe::webhook::deliver(&billing.webhook_url(), &body, &signature).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrade_webhook_holds_customer_to_basic_quota() -> anyhow::Result<()> {
    let billing = Billing::start(4).await?;
    let client = billing.stack.client();
    let stripe_id = billing.map_customer("gus").await?;
    let token = billing.key.mint(&TokenSpec::new("gus", "pro"))?;
    let before = traffic(&client, &token, usize::try_from(BASIC_QUOTA * 2)?).await?;
    assert_eq!(before.refused, 0, "pro admits twice the basic quota");

    let mut subscription = Subscription::new(&stripe_id, "price_basic", "prod_video");
    let event = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    assert_eq!(deliver(&billing, &event).await?, 200);
    let delivered = Instant::now();
    let mut downgraded = None;
    while delivered.elapsed() < Duration::from_secs(5) {
        let reply = client.get_with_token("/videos/v1", &token, &[]).await?;
        if reply.status == 429 || current_tier(&reply).as_deref() == Some("basic") {
            downgraded = Some(delivered.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let downgraded = downgraded.context("the downgrade never reached the filter")?;
    println!("downgrade reached the filter {downgraded:?} after the webhook");

    tokio::time::sleep(Duration::from_secs(WINDOW_SECONDS)).await;
    let held = traffic(&client, &token, usize::try_from(BASIC_QUOTA * 2)?).await?;
    assert_eq!(
        held.admitted, BASIC_QUOTA,
        "basic quota after the downgrade"
    );

    let tier = billing
        .stack
        .sidecar
        .admin()
        .await?
        .get_stripe_customer(GetStripeCustomerRequest {
            customer: "gus".into(),
        })
        .await?
        .into_inner()
        .tier;
    assert_eq!(tier, "basic");
    let written = eventually(Duration::from_secs(10), || {
        billing
            .stripe
            .customer_metadata(&stripe_id)
            .is_some_and(|metadata| metadata.get("tier").map(String::as_str) == Some("basic"))
    })
    .await;
    assert!(written, "tier metadata not written to the Stripe customer");

    // An upgrade lifts the limit again.
    subscription.items[0].price = "price_pro".into();
    let event = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    assert_eq!(deliver(&billing, &event).await?, 200);
    tokio::time::sleep(Duration::from_secs(WINDOW_SECONDS)).await;
    let lifted = traffic(&client, &token, usize::try_from(PRO_QUOTA)?).await?;
    assert_eq!(lifted.admitted, PRO_QUOTA, "pro quota after the upgrade");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_reject_forgeries_and_keep_newest_tier() -> anyhow::Result<()> {
    let billing = Billing::start(4).await?;
    let stripe_id = billing.map_customer("hal").await?;
    let url = billing.webhook_url();
    let mut subscription = Subscription::new(&stripe_id, "price_pro", "prod_video");
    let newer = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    subscription.items[0].price = "price_basic".into();
    let mut older = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    older["created"] = serde_json::json!(newer["created"].as_i64().unwrap_or(0) - 60);

    let body = newer.to_string();
    let now = unix_seconds();
    let forged = sign(&body, "whsec_someone_else", now);
    assert_eq!(
        veo_tests::stripe::webhook::deliver(&url, &body, &forged).await?,
        400
    );
    let stale = sign(&body, WEBHOOK_SECRET, now - 301);
    assert_eq!(
        veo_tests::stripe::webhook::deliver(&url, &body, &stale).await?,
        400
    );
    let future = sign(&body, WEBHOOK_SECRET, now + 301);
    assert_eq!(
        veo_tests::stripe::webhook::deliver(&url, &body, &future).await?,
        400
    );
    let tampered = body.replace("price_pro", "price_prp");
    let signature = sign(&body, WEBHOOK_SECRET, now);
    assert_eq!(
        veo_tests::stripe::webhook::deliver(&url, &tampered, &signature).await?,
        400
    );
    // A body over 1 MiB is not read, but it is counted as rejected.
    let oversized = format!("{body}{}", " ".repeat(1 << 20));
    let signature = sign(&oversized, WEBHOOK_SECRET, now);
    assert_eq!(
        veo_tests::stripe::webhook::deliver(&url, &oversized, &signature).await?,
        413
    );

    // The newer event twice at once, then the older one: pro stays.
    let (first, second) = tokio::join!(deliver(&billing, &newer), deliver(&billing, &newer));
    assert_eq!((first?, second?), (200, 200));
    assert_eq!(deliver(&billing, &older).await?, 200);

    let tier = billing
        .stack
        .sidecar
        .admin()
        .await?
        .get_stripe_customer(GetStripeCustomerRequest {
            customer: "hal".into(),
        })
        .await?
        .into_inner()
        .tier;
    assert_eq!(tier, "pro");
    let metrics = metrics_page(&billing).await?;
    assert!(
        metrics.contains("veo_webhook_deliveries_total{outcome=\"rejected\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("veo_webhook_deliveries_total{outcome=\"duplicate\"} 1"),
        "{metrics}"
    );
    Ok(())
}

/// Reads the sidecar's `/metrics` page.
async fn metrics_page(billing: &Billing) -> anyhow::Result<String> {
    let client = HttpClient::new(billing.stack.sidecar.http_address());
    let reply = client.get("/metrics", &[]).await?;
    ensure!(
        reply.status == 200,
        "GET /metrics answered {}",
        reply.status
    );
    Ok(reply.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_corrects_a_dropped_event() -> anyhow::Result<()> {
    let billing = Billing::start(4).await?;
    let client = billing.stack.client();
    let stripe_id = billing.map_customer("ivy").await?;
    let token = billing.key.mint(&TokenSpec::new("ivy", "pro"))?;
    let started = unix_seconds() / 60 * 60;
    let seen = traffic(&client, &token, 15).await?;
    await_ledger(
        &billing.stack.sidecar,
        &BTreeMap::from([("ivy".to_owned(), seen)]),
    )
    .await?;

    // Let the minute close and reach Stripe, then make Stripe lose the
    // request event.
    let billed = eventually(Duration::from_secs(90), || {
        billing.stripe.usage_sum(&stripe_id, "api_requests") == seen.admitted
    })
    .await;
    assert!(billed, "usage never reached Stripe");
    let dropped = billing
        .stripe
        .meter_events()
        .into_iter()
        .find(|event| event.event_name == "api_requests")
        .context("no api_requests event")?;
    assert!(billing.stripe.drop_event(&dropped.identifier));

    let end = (unix_seconds() / 60 + 1) * 60;
    let mut admin = billing.stack.sidecar.admin().await?;
    let request = ReconcileRequest {
        start_unix_s: started - 60,
        end_unix_s: end,
        correct: true,
    };
    let report = admin.reconcile(request).await?.into_inner();
    println!("{report:?}");
    assert!(
        report.max_drift_ratio > 0.01,
        "the dropped event shows as drift"
    );
    assert_eq!(report.corrective_events, 1);

    let corrected = eventually(Duration::from_secs(30), || {
        billing.stripe.usage_sum(&stripe_id, "api_requests") == seen.admitted
    })
    .await;
    assert!(corrected, "the correction never reached Stripe");
    let again = admin.reconcile(request).await?.into_inner();
    assert_eq!(
        again.corrective_events, 0,
        "a second run corrects nothing more"
    );
    assert!(
        again.max_drift_ratio.abs() < 1e-9,
        "drift after correction: {again:?}"
    );
    Ok(())
}
