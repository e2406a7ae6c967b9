//! The baseline of the sync throughput: the async-stripe client alone, sending the meter
//! events of the same usage as the sidecar would, with the same requests in flight and no
//! store, queue or pacing in between.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use tokio::task::JoinSet;
use veo_tests::stripe::FakeStripe;

use super::sidecar::{API_KEY, METER_EVENT_NAMES};
use super::usage::UsagePlan;

/// One meter event, as the sidecar would send it for one bucket.
#[derive(Debug, Clone)]
struct MeterEvent {
    event_name: &'static str,
    stripe_customer_id: String,
    minute_unix_s: i64,
    value: u64,
    identifier: String,
}

/// Result of one baseline run.
#[derive(Debug, Clone)]
pub struct BaselineRun {
    /// Events the fake contained afterwards.
    pub delivered: usize,
    /// Time from the first request until every response was received.
    pub elapsed: Duration,
    /// Requests that failed, with the first failure.
    pub failures: usize,
    /// Message of the first failed request.
    pub first_failure: Option<String>,
}

/// Sends one event per bucket of `plan` to a fresh fake Stripe from `concurrency` tokio
/// tasks that share one client, each sending its next event when the response to the
/// previous one arrives.
pub async fn measure(plan: &UsagePlan, concurrency: usize) -> anyhow::Result<BaselineRun> {
    let stripe = FakeStripe::start(API_KEY).await?;
    for name in METER_EVENT_NAMES {
        stripe.create_meter(name)?;
    }
    let events = Arc::new(meter_events(plan, &stripe));
    let client = stripe::ClientBuilder::new(API_KEY)
        .url(stripe.base_url())
        .build()
        .context("failed to build the async-stripe client of the baseline")?;

    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let events = Arc::clone(&events);
        let next = Arc::clone(&next);
        let client = client.clone();
        tasks.spawn(async move {
            let mut failures = Vec::new();
            while let Some(event) = events.get(next.fetch_add(1, Ordering::Relaxed)) {
                if let Err(message) = send(&client, event).await {
                    failures.push(message);
                }
            }
            failures
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        failures.extend(joined.context("a sending task of the baseline stopped")?);
    }
    let elapsed = started.elapsed();

    Ok(BaselineRun {
        delivered: stripe.meter_events().len(),
        elapsed,
        failures: failures.len(),
        first_failure: failures.into_iter().next(),
    })
}

/// Returns one event per bucket of `plan`, each customer billed to a new Stripe customer of
/// the fake.
fn meter_events(plan: &UsagePlan, stripe: &FakeStripe) -> Vec<MeterEvent> {
    let [requests_name, egress_name] = METER_EVENT_NAMES;
    let mut events = Vec::new();
    for customer in &plan.customers {
        let stripe_customer_id = stripe.create_customer(&[("veo_customer_id", customer.as_str())]);
        for &minute_unix_s in &plan.minutes {
            let requests = plan.requests_per_minute;
            let egress = requests.saturating_mul(plan.egress_bytes_per_request);
            for (event_name, value) in [(requests_name, requests), (egress_name, egress)] {
                if value == 0 {
                    continue;
                }
                events.push(MeterEvent {
                    event_name,
                    stripe_customer_id: stripe_customer_id.clone(),
                    minute_unix_s,
                    value,
                    identifier: format!("bench-{customer}-{event_name}-{minute_unix_s}"),
                });
            }
        }
    }
    events
}

/// Sends `event` with its identifier as the idempotency key, as the sidecar does.
async fn send(client: &stripe::Client, event: &MeterEvent) -> Result<(), String> {
    let payload = HashMap::from([
        (
            "stripe_customer_id".to_owned(),
            event.stripe_customer_id.clone(),
        ),
        ("value".to_owned(), event.value.to_string()),
    ]);
    let key = IdempotencyKey::new(&event.identifier)
        .map_err(|err| format!("identifier {}: {err}", event.identifier))?;
    CreateBillingMeterEvent::new(event.event_name, payload)
        .identifier(event.identifier.clone())
        .timestamp(event.minute_unix_s)
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key))
        .send(client)
        .await
        .map(drop)
        .map_err(|err| format!("meter event {}: {err}", event.identifier))
}
