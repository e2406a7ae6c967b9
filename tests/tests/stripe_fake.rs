//! The fake Stripe server driven by the real async-stripe client, which
//! proves that the fake speaks the wire format the sidecar's client expects,
//! and the webhook helpers checked against async-stripe's webhook parser.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use stripe::{
    ApiErrors, ApiErrorsCode, ApiErrorsType, IdempotencyKey, RequestStrategy, StripeError,
    StripeRequest,
};
use stripe_billing::billing_meter::ListBillingMeter;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::{
    ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
};
use stripe_core::customer::{RetrieveCustomer, RetrieveCustomerReturned, UpdateCustomer};
use veo_tests::stripe::webhook::{self, Subscription, SubscriptionEventType};
use veo_tests::stripe::{
    FailureCount, FakeStripe, InjectedFailure, METER_EVENTS_PATH, MeterAggregation,
};

const KEY: &str = "sk_test_4eC39HqLyjWDarjtT1zdp7dc";
const EVENT_NAME: &str = "api_requests";
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

/// A fake with one customer and one summing meter, and a client of it.
struct Setup {
    fake: FakeStripe,
    client: stripe::Client,
    customer: String,
    meter: String,
}

async fn setup() -> anyhow::Result<Setup> {
    let fake = FakeStripe::start(KEY).await?;
    let client = stripe::ClientBuilder::new(KEY)
        .url(fake.base_url())
        .build()?;
    let customer = fake.create_customer(&[("tier", "basic")]);
    let meter = fake.create_meter(EVENT_NAME)?;
    Ok(Setup {
        fake,
        client,
        customer,
        meter,
    })
}

fn usage(customer: &str, value: u64) -> HashMap<String, String> {
    HashMap::from([
        ("stripe_customer_id".to_owned(), customer.to_owned()),
        ("value".to_owned(), value.to_string()),
    ])
}

/// Returns the Stripe error and HTTP status of a failed request.
fn stripe_error<T: std::fmt::Debug>(
    result: Result<T, StripeError>,
) -> anyhow::Result<(Box<ApiErrors>, u16)> {
    match result {
        Err(StripeError::Stripe(error, status)) => Ok((error, status)),
        other => bail!("expected a Stripe error response, got {other:?}"),
    }
}

fn idempotent(key: &str) -> anyhow::Result<RequestStrategy> {
    Ok(RequestStrategy::Idempotent(IdempotencyKey::new(key)?))
}

/// A raw HTTP response: status, headers and body.
struct RawResponse {
    status: u16,
    headers: hyper::HeaderMap,
    body: serde_json::Value,
}

/// Sends a form POST without async-stripe, to read headers it hides.
async fn post_form(
    fake: &FakeStripe,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<RawResponse> {
    let mut request = hyper::Request::post(format!("http://{}{path}", fake.address()))
        .header("content-type", "application/x-www-form-urlencoded");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::copy_from_slice(body.as_bytes())))?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok(RawResponse {
        status,
        headers,
        body: serde_json::from_slice(&bytes)?,
    })
}

/// Proves an accepted event comes back as async-stripe's `BillingMeterEvent` and is recorded.
#[tokio::test]
async fn meter_event_is_recorded() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let timestamp = fake.now() - 120;

    let event = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 7))
        .identifier("req-1")
        .timestamp(timestamp)
        .send(&client)
        .await?;

    assert_eq!(event.event_name, EVENT_NAME);
    assert_eq!(event.identifier, "req-1");
    assert_eq!(event.timestamp, timestamp);
    assert!(!event.livemode);
    assert_eq!(event.payload, usage(&customer, 7));
    let recorded = fake.meter_events();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].identifier, "req-1");
    assert_eq!(recorded[0].customer, customer);
    assert_eq!(recorded[0].value, 7);
    assert_eq!(recorded[0].timestamp, timestamp);
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 7);
    assert_eq!(fake.request_count(METER_EVENTS_PATH, 200), 1);
    Ok(())
}

/// Proves an event without identifier gets a generated one and the current time.
#[tokio::test]
async fn missing_identifier_is_generated() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let before = fake.now();

    let event = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
        .send(&client)
        .await?;

    assert!(!event.identifier.is_empty());
    assert!(event.timestamp >= before);
    assert_eq!(fake.meter_events()[0].identifier, event.identifier);
    Ok(())
}

/// Proves a reused identifier fails with `resource_already_exists` and adds nothing.
#[tokio::test]
async fn duplicate_identifier_is_rejected() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let request = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 3)).identifier("dup-1");
    request.send(&client).await?;

    let (error, status) = stripe_error(request.send(&client).await)?;

    assert_eq!(status, 400);
    assert_eq!(error.type_, ApiErrorsType::InvalidRequestError);
    assert_eq!(error.code, Some(ApiErrorsCode::ResourceAlreadyExists));
    assert_eq!(error.param.as_deref(), Some("identifier"));
    assert!(
        error
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("dup-1")
    );
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 3);
    assert_eq!(fake.request_count(METER_EVENTS_PATH, 400), 1);
    Ok(())
}

/// Proves an identifier can be reused once 24 hours have passed.
#[tokio::test]
async fn identifier_expires_after_a_day() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let request = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 2)).identifier("day-1");
    request.send(&client).await?;
    fake.advance_clock(DAY - 10);
    assert!(request.send(&client).await.is_err());

    fake.advance_clock(11);
    request.send(&client).await?;

    assert_eq!(fake.meter_events().len(), 2);
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 4);
    Ok(())
}

/// Proves a repeated idempotency key replays the first response and a changed body is rejected.
#[tokio::test]
async fn idempotency_key_replays_first_response() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let request = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 5));

    let first = request
        .clone()
        .customize()
        .request_strategy(idempotent("key-1")?)
        .send(&client)
        .await?;
    let second = request
        .customize()
        .request_strategy(idempotent("key-1")?)
        .send(&client)
        .await?;

    assert_eq!(first.identifier, second.identifier);
    assert_eq!(first.created, second.created);
    assert_eq!(fake.meter_events().len(), 1);
    assert_eq!(fake.request_count(METER_EVENTS_PATH, 200), 2);

    let changed = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 6))
        .customize()
        .request_strategy(idempotent("key-1")?)
        .send(&client)
        .await;
    let (error, status) = stripe_error(changed)?;
    assert_eq!(status, 400);
    assert_eq!(error.type_, ApiErrorsType::IdempotencyError);
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 5);
    Ok(())
}

/// Proves a replay carries `Idempotent-Replayed: true`, and parameter order does not matter.
#[tokio::test]
async fn replay_sets_idempotent_replayed_header() -> anyhow::Result<()> {
    let Setup { fake, customer, .. } = setup().await?;
    let auth = format!("Bearer {KEY}");
    let headers = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "raw-1"),
    ];
    let body =
        format!("event_name={EVENT_NAME}&payload[stripe_customer_id]={customer}&payload[value]=4");
    let reordered = format!(
        "payload[value]=4&payload%5Bstripe_customer_id%5D={customer}&event_name={EVENT_NAME}"
    );

    let first = post_form(&fake, METER_EVENTS_PATH, &body, &headers).await?;
    let second = post_form(&fake, METER_EVENTS_PATH, &reordered, &headers).await?;

    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(first.headers.get("idempotent-replayed").is_none());
    assert_eq!(
        second
            .headers
            .get("idempotent-replayed")
            .map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(second.body, first.body);
    assert_eq!(
        first.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    let request_id = first.headers.get("request-id").context("no Request-Id")?;
    assert!(request_id.to_str()?.starts_with("req_"));
    assert_eq!(fake.meter_events().len(), 1);
    Ok(())
}

/// Proves injected 429s have no effect and the client's retry strategy gets past them.
#[tokio::test]
async fn rate_limit_has_no_effect() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    fake.inject_failure(
        METER_EVENTS_PATH,
        InjectedFailure::RateLimited,
        FailureCount::Next(2),
    );
    let request = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 9)).identifier("rl-1");

    let (error, status) = stripe_error(request.send(&client).await)?;
    assert_eq!(status, 429);
    assert_eq!(error.code, Some(ApiErrorsCode::RateLimit));
    assert!(fake.meter_events().is_empty());

    request
        .customize()
        .request_strategy(RequestStrategy::Retry(3))
        .send(&client)
        .await?;

    assert_eq!(fake.request_count(METER_EVENTS_PATH, 429), 2);
    assert_eq!(fake.request_count(METER_EVENTS_PATH, 200), 1);
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 9);
    Ok(())
}

/// Proves an injected 500 has no effect and is not saved under the idempotency key.
#[tokio::test]
async fn server_error_has_no_effect() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    fake.inject_failure(
        METER_EVENTS_PATH,
        InjectedFailure::ServerError,
        FailureCount::Next(1),
    );
    let strategy = idempotent("se-key")?;
    let send = || {
        CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
            .identifier("se-1")
            .customize()
            .request_strategy(strategy.clone())
            .send(&client)
    };

    let (error, status) = stripe_error(send().await)?;
    assert_eq!(status, 500);
    assert_eq!(error.type_, ApiErrorsType::ApiError);
    assert!(fake.meter_events().is_empty());

    send().await?;
    assert_eq!(fake.meter_events().len(), 1);
    Ok(())
}

/// Proves a lost reply records the event, and a retry with the same key gets the first response.
#[tokio::test]
async fn lost_reply_records_event() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    fake.inject_failure(
        METER_EVENTS_PATH,
        InjectedFailure::LostReply,
        FailureCount::Next(1),
    );
    let request = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 4)).identifier("lr-1");

    let lost = request
        .clone()
        .customize()
        .request_strategy(idempotent("lr-key")?)
        .send(&client)
        .await;
    let (_, status) = stripe_error(lost)?;
    assert_eq!(status, 500);
    assert_eq!(fake.meter_events().len(), 1);

    let replayed = request
        .clone()
        .customize()
        .request_strategy(idempotent("lr-key")?)
        .send(&client)
        .await?;
    assert_eq!(replayed.identifier, "lr-1");
    assert_eq!(fake.meter_events().len(), 1);

    let (error, status) = stripe_error(request.send(&client).await)?;
    assert_eq!(status, 400);
    assert_eq!(error.code, Some(ApiErrorsCode::ResourceAlreadyExists));
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 4);
    Ok(())
}

/// Proves a failure injected until cleared applies to every request until then.
#[tokio::test]
async fn failure_until_cleared() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    fake.inject_failure(
        METER_EVENTS_PATH,
        InjectedFailure::ServerError,
        FailureCount::UntilCleared,
    );
    for _ in 0..3 {
        let result = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
            .send(&client)
            .await;
        assert_eq!(stripe_error(result)?.1, 500);
    }

    fake.clear_failures(METER_EVENTS_PATH);
    CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
        .send(&client)
        .await?;

    assert_eq!(fake.request_count(METER_EVENTS_PATH, 500), 3);
    assert_eq!(fake.meter_events().len(), 1);
    Ok(())
}

/// Proves unknown event names and customers, bad values and out-of-range timestamps are rejected.
#[tokio::test]
async fn invalid_meter_events_are_rejected() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let now = fake.now();
    let cases = [
        (
            CreateBillingMeterEvent::new("no_such_meter", usage(&customer, 1)),
            "event_name",
        ),
        (
            CreateBillingMeterEvent::new(EVENT_NAME, usage("cus_missing", 1)),
            "payload[stripe_customer_id]",
        ),
        (
            CreateBillingMeterEvent::new(
                EVENT_NAME,
                HashMap::from([
                    ("stripe_customer_id".to_owned(), customer.clone()),
                    ("value".to_owned(), "-3".to_owned()),
                ]),
            ),
            "payload[value]",
        ),
        (
            CreateBillingMeterEvent::new(
                EVENT_NAME,
                HashMap::from([("stripe_customer_id".to_owned(), customer.clone())]),
            ),
            "payload[value]",
        ),
        (
            CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
                .timestamp(now - 35 * DAY - 1),
            "timestamp",
        ),
        (
            CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1)).timestamp(now + 301),
            "timestamp",
        ),
    ];

    for (request, param) in cases {
        let (error, status) = stripe_error(request.send(&client).await)?;
        assert_eq!(status, 400, "{param}");
        assert_eq!(error.param.as_deref(), Some(param));
    }
    let (error, _) = stripe_error(
        CreateBillingMeterEvent::new(EVENT_NAME, usage("cus_missing", 1))
            .send(&client)
            .await,
    )?;
    assert_eq!(error.code, Some(ApiErrorsCode::ResourceMissing));
    assert!(fake.meter_events().is_empty());
    Ok(())
}

/// Proves a dropped event leaves the sums and its identifier can be sent again.
#[tokio::test]
async fn dropped_event_can_be_resent() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let request =
        CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 8)).identifier("lost-1");
    request.send(&client).await?;

    assert!(fake.drop_event("lost-1"));
    assert!(!fake.drop_event("lost-1"));
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 0);

    request.send(&client).await?;
    assert_eq!(fake.usage_sum(&customer, EVENT_NAME), 8);
    Ok(())
}

/// Proves summaries sum a customer's events in `[start, end)`, per hour newest first.
#[tokio::test]
async fn event_summaries_sum_events() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        meter,
    } = setup().await?;
    let other = fake.create_customer(&[]);
    let day = (fake.now() / DAY - 1) * DAY;
    fake.set_clock(day + 5 * HOUR);
    let events = [
        (&customer, day + 60, 2),
        (&customer, day + HOUR - 1, 3),
        (&customer, day + 2 * HOUR + 30, 10),
        (&other, day + 2 * HOUR, 100),
        (&customer, day + 3 * HOUR, 1000),
    ];
    for (index, (who, timestamp, value)) in events.iter().enumerate() {
        CreateBillingMeterEvent::new(EVENT_NAME, usage(who, *value))
            .identifier(format!("sum-{index}"))
            .timestamp(*timestamp)
            .send(&client)
            .await?;
    }

    let whole = ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + 3 * HOUR, day)
        .send(&client)
        .await?;
    assert_eq!(whole.data.len(), 1);
    assert_eq!(whole.data[0].aggregated_value, 15.0);
    assert_eq!(whole.data[0].start_time, day);
    assert_eq!(whole.data[0].end_time, day + 3 * HOUR);
    assert_eq!(whole.data[0].meter, meter);
    assert!(!whole.has_more);
    assert_eq!(
        whole.url,
        format!("/v1/billing/meters/{meter}/event_summaries")
    );

    let hourly =
        ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + 4 * HOUR, day)
            .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Hour)
            .send(&client)
            .await?;
    let windows: Vec<(i64, f64)> = hourly
        .data
        .iter()
        .map(|summary| (summary.start_time - day, summary.aggregated_value))
        .collect();
    assert_eq!(windows, [(3 * HOUR, 1000.0), (2 * HOUR, 10.0), (0, 5.0)]);

    let daily = ListIdBillingMeterEventSummary::new(meter.as_str(), &other, day + DAY, day)
        .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Day)
        .send(&client)
        .await?;
    assert_eq!(daily.data.len(), 1);
    assert_eq!(daily.data[0].aggregated_value, 100.0);
    Ok(())
}

/// Proves summaries page with `limit` and `starting_after`.
#[tokio::test]
async fn event_summaries_paginate() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        meter,
    } = setup().await?;
    let day = (fake.now() / DAY - 1) * DAY;
    fake.set_clock(day + 5 * HOUR);
    for (hour, value) in [(0, 1), (1, 2), (2, 3)] {
        CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, value))
            .timestamp(day + hour * HOUR)
            .send(&client)
            .await?;
    }

    let mut values = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut request =
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + 3 * HOUR, day)
                .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Hour)
                .limit(1);
        if let Some(cursor) = &cursor {
            request = request.starting_after(cursor.as_str());
        }
        let page = request.send(&client).await?;
        assert_eq!(page.data.len(), 1);
        values.push(page.data[0].aggregated_value);
        cursor = Some(page.data[0].id.as_str().to_owned());
        if !page.has_more {
            break;
        }
    }

    assert_eq!(values, [3.0, 2.0, 1.0]);
    Ok(())
}

/// Proves summaries reject times not aligned to the minute or to the grouping window.
#[tokio::test]
async fn event_summaries_reject_misaligned_times() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        meter,
    } = setup().await?;
    let day = (fake.now() / DAY - 1) * DAY;
    let hour = ListIdBillingMeterEventSummaryValueGroupingWindow::Hour;
    let daily = ListIdBillingMeterEventSummaryValueGroupingWindow::Day;
    let cases = [
        (
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + HOUR, day + 30),
            "start_time",
        ),
        (
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + HOUR, day + 60)
                .value_grouping_window(hour.clone()),
            "start_time",
        ),
        (
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + 90 * 60, day)
                .value_grouping_window(hour),
            "end_time",
        ),
        (
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + HOUR, day)
                .value_grouping_window(daily),
            "end_time",
        ),
        (
            ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day, day + HOUR),
            "end_time",
        ),
    ];

    for (request, param) in cases {
        let (error, status) = stripe_error(request.send(&client).await)?;
        assert_eq!(status, 400, "{param}");
        assert_eq!(error.param.as_deref(), Some(param));
    }
    Ok(())
}

/// Proves summaries follow the meter's aggregation formula.
#[tokio::test]
async fn event_summaries_follow_aggregation() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        customer,
        ..
    } = setup().await?;
    let count_meter = fake.create_meter_with_aggregation("calls", MeterAggregation::Count)?;
    let last_meter = fake.create_meter_with_aggregation("seats", MeterAggregation::Last)?;
    let day = (fake.now() / DAY - 1) * DAY;
    fake.set_clock(day + 5 * HOUR);
    for (event_name, timestamp, value) in [
        ("calls", day + 10, 50),
        ("calls", day + 20, 60),
        ("seats", day + 30, 4),
        ("seats", day + 20, 9),
    ] {
        CreateBillingMeterEvent::new(event_name, usage(&customer, value))
            .timestamp(timestamp)
            .send(&client)
            .await?;
    }

    for (meter, expected) in [(count_meter, 2.0), (last_meter, 4.0)] {
        let list = ListIdBillingMeterEventSummary::new(meter.as_str(), &customer, day + HOUR, day)
            .send(&client)
            .await?;
        assert_eq!(list.data[0].aggregated_value, expected, "{meter}");
    }
    Ok(())
}

/// Proves the meter list deserializes as async-stripe's `BillingMeter`.
#[tokio::test]
async fn meters_are_listed() -> anyhow::Result<()> {
    let Setup {
        fake,
        client,
        meter,
        ..
    } = setup().await?;
    let second = fake.create_meter("bytes_out")?;

    let list = ListBillingMeter::new().send(&client).await?;

    let ids: Vec<String> = list
        .data
        .iter()
        .map(|meter| meter.id.as_str().to_owned())
        .collect();
    assert_eq!(ids, [second, meter]);
    assert_eq!(list.data[1].event_name, EVENT_NAME);
    assert_eq!(
        list.data[1].customer_mapping.event_payload_key,
        "stripe_customer_id"
    );
    assert_eq!(list.data[1].value_settings.event_payload_key, "value");
    assert!(!list.has_more);
    Ok(())
}

/// Proves a metadata update merges keys, deletes emptied ones and deserializes as `Customer`.
#[tokio::test]
async fn customer_metadata_update_merges() -> anyhow::Result<()> {
    let Setup { fake, client, .. } = setup().await?;
    let customer = fake.create_customer(&[("tier", "basic"), ("region", "eu")]);

    let updated = UpdateCustomer::new(customer.as_str())
        .metadata(HashMap::from([
            ("tier".to_owned(), "pro".to_owned()),
            ("region".to_owned(), String::new()),
            ("seats".to_owned(), "3".to_owned()),
        ]))
        .send(&client)
        .await?;

    let expected = HashMap::from([
        ("tier".to_owned(), "pro".to_owned()),
        ("seats".to_owned(), "3".to_owned()),
    ]);
    assert_eq!(updated.id.as_str(), customer);
    assert_eq!(updated.metadata.as_ref(), Some(&expected));
    let stored = fake
        .customer_metadata(&customer)
        .context("customer missing")?;
    assert_eq!(stored.len(), 2);
    assert_eq!(stored.get("tier").map(String::as_str), Some("pro"));

    match RetrieveCustomer::new(customer.as_str())
        .send(&client)
        .await?
    {
        RetrieveCustomerReturned::Customer(retrieved) => {
            assert_eq!(retrieved.metadata, Some(expected));
            assert!(!retrieved.livemode);
        }
        RetrieveCustomerReturned::DeletedCustomer(_) => bail!("customer came back deleted"),
    }
    Ok(())
}

/// Proves an unknown customer is a 404 `resource_missing`.
#[tokio::test]
async fn unknown_customer_is_missing() -> anyhow::Result<()> {
    let Setup { fake, client, .. } = setup().await?;

    let result = UpdateCustomer::new("cus_nobody")
        .metadata(HashMap::from([("tier".to_owned(), "pro".to_owned())]))
        .send(&client)
        .await;

    let (error, status) = stripe_error(result)?;
    assert_eq!(status, 404);
    assert_eq!(error.code, Some(ApiErrorsCode::ResourceMissing));
    assert_eq!(fake.request_count("/v1/customers/cus_nobody", 404), 1);
    Ok(())
}

/// Proves a wrong API key gets a 401 that does not echo the key.
#[tokio::test]
async fn wrong_key_is_rejected() -> anyhow::Result<()> {
    let Setup { fake, customer, .. } = setup().await?;
    let wrong_key = "sk_test_wrongwrongwrongwrong9876";
    let client = stripe::ClientBuilder::new(wrong_key)
        .url(fake.base_url())
        .build()?;

    let result = CreateBillingMeterEvent::new(EVENT_NAME, usage(&customer, 1))
        .send(&client)
        .await;

    let (error, status) = stripe_error(result)?;
    assert_eq!(status, 401);
    assert_eq!(error.type_, ApiErrorsType::InvalidRequestError);
    let message = error.message.unwrap_or_default();
    assert!(
        message.starts_with("Invalid API Key provided: sk_test_"),
        "{message}"
    );
    assert!(message.ends_with("9876"), "{message}");
    assert!(!message.contains(wrong_key), "{message}");
    assert!(fake.meter_events().is_empty());
    assert_eq!(fake.request_count(METER_EVENTS_PATH, 401), 1);

    let missing = post_form(&fake, METER_EVENTS_PATH, "", &[]).await?;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.body["error"]["type"], "invalid_request_error");
    Ok(())
}

/// Proves `sign` produces the header async-stripe's test helper produces.
#[test]
fn signature_matches_async_stripe() {
    let payload = r#"{"id":"evt_1","object":"event"}"#;
    let expected =
        stripe_webhook::Webhook::generate_test_header(payload, "whsec_abc", Some(1_700_000_000));
    assert_eq!(webhook::sign(payload, "whsec_abc", 1_700_000_000), expected);
}

/// Proves the built events pass async-stripe's signature check and parse into typed objects.
#[test]
fn webhook_events_parse_with_async_stripe() -> anyhow::Result<()> {
    use stripe_webhook::{EventObject, Webhook};

    let secret = "whsec_test_secret";
    let mut subscription = Subscription::new("cus_1", "price_pro", "prod_pro");
    subscription
        .metadata
        .insert("plan".to_owned(), "pro".to_owned());
    for event_type in [
        SubscriptionEventType::Created,
        SubscriptionEventType::Updated,
        SubscriptionEventType::Deleted,
    ] {
        let previous = serde_json::json!({ "status": "trialing" });
        let body =
            webhook::subscription_event(event_type, &subscription, Some(previous)).to_string();
        let now = subscription.created;
        let header = webhook::sign(&body, secret, now);

        let event = Webhook::construct_event_with_timestamp(&body, &header, secret, now)
            .map_err(|err| anyhow::anyhow!("{event_type:?}: {err}"))?;

        assert_eq!(event.type_.as_str(), event_type.as_str());
        assert!(event.data.previous_attributes.is_some());
        let parsed = match event.data.object {
            EventObject::CustomerSubscriptionCreated(parsed)
            | EventObject::CustomerSubscriptionUpdated(parsed)
            | EventObject::CustomerSubscriptionDeleted(parsed) => parsed,
            other => bail!("{event_type:?} parsed as {other:?}"),
        };
        assert_eq!(parsed.customer.id().as_str(), "cus_1");
        assert_eq!(parsed.items.data[0].price.id.as_str(), "price_pro");
        assert_eq!(parsed.items.data[0].price.product.id().as_str(), "prod_pro");
        assert_eq!(parsed.metadata.get("plan").map(String::as_str), Some("pro"));
        let canceled = parsed.status.as_str() == "canceled";
        assert_eq!(canceled, event_type == SubscriptionEventType::Deleted);
    }

    let metadata = BTreeMap::from([("tier".to_owned(), "enterprise".to_owned())]);
    let body = webhook::customer_updated_event("cus_2", &metadata, None).to_string();
    let header = webhook::sign(&body, secret, 1_700_000_000);
    let event = Webhook::construct_event_with_timestamp(&body, &header, secret, 1_700_000_000)?;
    let EventObject::CustomerUpdated(customer) = event.data.object else {
        bail!("customer.updated did not parse as a customer");
    };
    assert_eq!(customer.id.as_str(), "cus_2");
    assert_eq!(
        customer
            .metadata
            .and_then(|m| m.get("tier").cloned())
            .as_deref(),
        Some("enterprise")
    );
    Ok(())
}

/// Proves a header with several v1 signatures and a v0 entry verifies when one secret matches.
#[test]
fn rotated_secrets_verify() -> anyhow::Result<()> {
    use stripe_webhook::{Webhook, WebhookError};

    let body = webhook::customer_updated_event("cus_3", &Default::default(), None).to_string();
    let header = webhook::sign_with_secrets(&body, &["whsec_old", "whsec_new"], 1_700_000_000);

    Webhook::construct_event_with_timestamp(&body, &header, "whsec_new", 1_700_000_000)?;
    Webhook::construct_event_with_timestamp(&body, &header, "whsec_old", 1_700_000_000)?;
    let wrong =
        Webhook::construct_event_with_timestamp(&body, &header, "whsec_other", 1_700_000_000);
    assert!(
        matches!(wrong, Err(WebhookError::BadSignature)),
        "{wrong:?}"
    );
    Ok(())
}

/// Proves `deliver` sends the body and signature intact, checked by a receiver using async-stripe.
#[tokio::test]
async fn deliver_posts_signed_event() -> anyhow::Result<()> {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let secret = "whsec_deliver";
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let service = service_fn(move |request| check_delivery(request, secret));
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });

    let subscription = Subscription::new("cus_4", "price_basic", "prod_basic");
    let body = webhook::subscription_event(SubscriptionEventType::Created, &subscription, None)
        .to_string();
    let now = subscription.created;
    let url = format!("http://{address}/webhooks/stripe");

    let accepted = webhook::deliver(&url, &body, &webhook::sign(&body, secret, now)).await?;
    receiver.abort();
    assert_eq!(accepted, 200);
    Ok(())
}

/// Responds 200 to a JSON body whose `Stripe-Signature` verifies with
/// `secret`, and 400 otherwise.
async fn check_delivery(
    request: hyper::Request<hyper::body::Incoming>,
    secret: &str,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let content_type = header("content-type");
    let signature = header("stripe-signature");
    let body = match request.into_body().collect().await {
        Ok(collected) => String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };

    let verified = stripe_webhook::Webhook::construct_event(&body, &signature, secret).is_ok();
    let mut response = hyper::Response::new(Full::new(Bytes::new()));
    if !(verified && content_type.starts_with("application/json")) {
        *response.status_mut() = hyper::StatusCode::BAD_REQUEST;
    }
    Ok(response)
}

/// Proves `deliver` reports a receiver that is not listening.
#[tokio::test]
async fn deliver_reports_refused_connection() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    drop(listener);

    let result = webhook::deliver(&format!("http://{address}/"), "{}", "t=1,v1=00").await;

    assert!(result.is_err(), "{result:?}");
    Ok(())
}
