//! Hostile-input checks of the sidecar's billing paths: the outbox file,
//! exactly-once delivery to Stripe, reconciliation, webhooks and the admin
//! API. Each test starts its own sidecar on loopback without Envoy and
//! feeds usage through the sync API directly.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veo_proto::admin::{
    GetStripeCustomerRequest, ListParkedMeterEventsRequest, ParkedMeterEvent, ReconcileRequest,
    SetStripeCustomerRequest,
};
use veo_proto::sync::UsageRecord;
use veo_tests::sidecar::{Sidecar, unix_seconds};
use veo_tests::stack::temp_dir;
use veo_tests::stripe::webhook::{Subscription, SubscriptionEventType, sign, subscription_event};
use veo_tests::stripe::{FailureCount, FakeStripe, InjectedFailure};
use veo_tests::sync_api::{minute_ago, send_batch, usage_record};

const API_KEY: &str = "sk_test_veo_edges";
const WEBHOOK_SECRET: &str = "whsec_veo_edges";
const METER_EVENTS: &str = "/v1/billing/meter_events";

const CONFIG: &str = r#"
[billing]
region = "test"
sync_interval_seconds = 1
close_delay_seconds = 1
max_concurrent_requests = 8
reconcile_interval_seconds = 0
# The fake shows events in its summaries at once.
summary_settle_seconds = 0

[billing.prices]
price_basic = "basic"
price_pro = "pro"
"#;

async fn start_stripe() -> anyhow::Result<FakeStripe> {
    let stripe = FakeStripe::start(API_KEY).await?;
    stripe.create_meter("api_requests")?;
    stripe.create_meter("egress_bytes")?;
    Ok(stripe)
}

async fn start_with_stripe(
    dir: &std::path::Path,
    stripe: &FakeStripe,
    base: &str,
) -> anyhow::Result<Sidecar> {
    start_with_config(dir, stripe, base, CONFIG).await
}

async fn start_with_config(
    dir: &std::path::Path,
    stripe: &FakeStripe,
    base: &str,
    config: &str,
) -> anyhow::Result<Sidecar> {
    Sidecar::start_with_env(
        dir,
        Some(config),
        &[
            ("STRIPE_API_KEY", API_KEY),
            ("STRIPE_API_BASE", base),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
    .await
    .with_context(|| format!("start with Stripe at {}", stripe.base_url()))
}

async fn map(sidecar: &Sidecar, customer: &str, stripe_id: &str) -> anyhow::Result<()> {
    sidecar
        .admin()
        .await?
        .set_stripe_customer(SetStripeCustomerRequest {
            customer: customer.into(),
            stripe_customer_id: stripe_id.into(),
        })
        .await
        .context("SetStripeCustomer")?;
    Ok(())
}

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

/// Waits up to 20 s for the sidecar to park a meter event, and returns the
/// parked events.
async fn await_parked(sidecar: &Sidecar) -> anyhow::Result<Vec<ParkedMeterEvent>> {
    let mut admin = sidecar.admin().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = admin
            .list_parked_meter_events(ListParkedMeterEventsRequest { limit: 10 })
            .await?
            .into_inner()
            .events;
        if !listed.is_empty() {
            return Ok(listed);
        }
        ensure!(Instant::now() < deadline, "no event parked within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fails unless the fake Stripe contains exactly one meter event.
fn ensure_one_event(stripe: &FakeStripe) -> anyhow::Result<()> {
    let events = stripe.meter_events();
    ensure!(
        events.len() == 1,
        "Stripe contains {} events: {events:?}",
        events.len()
    );
    Ok(())
}

/// Sums the parseable lines of the outbox file per (customer, meter).
fn outbox_sums(path: &std::path::Path) -> BTreeMap<(String, String), i64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut sums = BTreeMap::new();
    for line in text.lines() {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
            let customer = value["customer"].as_str().unwrap_or("").to_owned();
            let meter = value["meter"].as_str().unwrap_or("").to_owned();
            *sums.entry((customer, meter)).or_insert(0) += value["value"].as_i64().unwrap_or(0);
        }
    }
    sums
}

/// A crash during an outbox write leaves a torn last line. The next start
/// must still leave every unit readable in the file exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_torn_line_keeps_next_event() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let data = dir.path().join("sidecar-data");
    std::fs::create_dir_all(&data)?;
    let outbox = data.join("meter_events.jsonl");
    std::fs::write(&outbox, b"{\"identifier\":\"veo_req_1_torn\",\"ev")?;
    let mut sidecar = Sidecar::start_with_config(dir.path(), CONFIG).await?;
    let minute = minute_ago(3);
    send_batch(&sidecar, "i1", 1, vec![usage_record("ana", minute, 7, 700)]).await?;

    let written = eventually(Duration::from_secs(15), || {
        std::fs::read_to_string(&outbox).is_ok_and(|text| text.matches('\n').count() >= 2)
    })
    .await;
    sidecar.stop();
    assert!(written, "outbox: {:?}", std::fs::read_to_string(&outbox));
    let sums = outbox_sums(&outbox);
    println!("{}", std::fs::read_to_string(&outbox)?);
    assert_eq!(
        sums.get(&("ana".into(), "api_requests".into())),
        Some(&7),
        "api_requests readable in the outbox"
    );
    assert_eq!(
        sums.get(&("ana".into(), "egress_bytes".into())),
        Some(&700),
        "egress_bytes readable in the outbox"
    );
    Ok(())
}

/// A store commit that fails after an outbox write, here because another
/// process holds the store's write lock longer than the sidecar waits,
/// leaves the written events pending. The next write must not write them
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_failed_commit_writes_each_event_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let folder = dir.path().join("outbox");
    let outbox = folder.join("meter_events.jsonl");
    let config = CONFIG.replacen(
        "[billing]\n",
        &format!(
            "[billing]\noutbox_file = {:?}\n",
            outbox.display().to_string()
        ),
        1,
    );
    let mut sidecar = Sidecar::start_with_config(dir.path(), &config).await?;
    let minute = minute_ago(3);
    let usage = vec![
        usage_record("ana", minute, 7, 0),
        usage_record("bo", minute, 5, 0),
    ];
    send_batch(&sidecar, "i1", 1, usage).await?;

    // The folder is missing, so the first writes fail and the events wait.
    let failed = eventually(Duration::from_secs(15), || {
        sidecar.log().contains("failed to write the outbox file")
    })
    .await;
    ensure!(failed, "no outbox write failed: {}", sidecar.log());
    let store = rusqlite::Connection::open(sidecar.data_dir().join("usage.sqlite3"))?;
    store.execute_batch("BEGIN IMMEDIATE")?;
    std::fs::create_dir_all(&folder)?;
    let marked_failed = eventually(Duration::from_secs(20), || {
        sidecar.log().contains("mark meter events sent")
    })
    .await;
    store.execute_batch("ROLLBACK")?;
    drop(store);
    ensure!(
        marked_failed,
        "no commit failed after a write: {}",
        sidecar.log()
    );

    // Rounds run every second; give the next ones time, then stop, which
    // runs a last round.
    tokio::time::sleep(Duration::from_secs(4)).await;
    sidecar.stop();
    let text = std::fs::read_to_string(&outbox)?;
    let identifiers: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| line["identifier"].as_str().map(str::to_owned))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = identifiers.iter().collect();
    ensure!(
        identifiers.len() == distinct.len(),
        "the outbox holds an event twice:\n{text}"
    );
    let sums = outbox_sums(&outbox);
    assert_eq!(sums.get(&("ana".into(), "api_requests".into())), Some(&7));
    assert_eq!(sums.get(&("bo".into(), "api_requests".into())), Some(&5));
    Ok(())
}

/// Late usage, duplicate batches, lost replies and repeated `kill -9`:
/// Stripe ends with exactly the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_and_lost_replies_bill_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let customers: Vec<String> = (0..24).map(|index| format!("c{index}")).collect();
    let mut stripe_ids = BTreeMap::new();
    for customer in &customers {
        let id = stripe.create_customer(&[]);
        map(&sidecar, customer, &id).await?;
        stripe_ids.insert(customer.clone(), id);
    }

    let mut expected: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut sequence = 0;
    for minutes_ago in [6, 5, 4] {
        sequence += 1;
        let minute = minute_ago(minutes_ago);
        let usage: Vec<UsageRecord> = customers
            .iter()
            .enumerate()
            .map(|(index, customer)| usage_record(customer, minute, index as u64 + 1, 1000))
            .collect();
        for customer in &customers {
            let entry = expected.entry(customer.clone()).or_default();
            let index: u64 = customer[1..].parse()?;
            entry.0 += index + 1;
            entry.1 += 1000;
        }
        send_batch(&sidecar, "i1", sequence, usage.clone()).await?;
        // The same batch again, as after a lost sync reply.
        send_batch(&sidecar, "i1", sequence, usage).await?;
    }

    stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::LostReply,
        FailureCount::Next(30),
    );
    stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::RateLimited,
        FailureCount::Next(5),
    );
    stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::ServerError,
        FailureCount::Next(5),
    );
    let mut killed = 0;
    for delay_ms in [150, 400, 90, 700, 250] {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        sidecar.kill_hard();
        killed += 1;
        // Late usage of an already billed minute, between the kills.
        sequence += 1;
        sidecar.restart().await?;
        let late = minute_ago(6);
        send_batch(
            &sidecar,
            "i1",
            sequence,
            vec![usage_record("c0", late, 2, 10)],
        )
        .await?;
        let entry = expected.entry("c0".into()).or_default();
        entry.0 += 2;
        entry.1 += 10;
    }

    let caught_up = eventually(Duration::from_secs(90), || {
        expected.iter().all(|(customer, (requests, bytes))| {
            let id = &stripe_ids[customer];
            stripe.usage_sum(id, "api_requests") == *requests
                && stripe.usage_sum(id, "egress_bytes") == *bytes
        })
    })
    .await;
    sidecar.stop();
    println!(
        "killed {killed} times; counts {:?}",
        stripe.request_counts()
    );
    for (customer, (requests, bytes)) in &expected {
        let id = &stripe_ids[customer];
        assert_eq!(
            stripe.usage_sum(id, "api_requests"),
            *requests,
            "{customer} requests"
        );
        assert_eq!(
            stripe.usage_sum(id, "egress_bytes"),
            *bytes,
            "{customer} bytes"
        );
    }
    assert!(caught_up);
    Ok(())
}

/// Two reconciliations over overlapping ranges must not both correct the
/// same missing usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_reconciles_correct_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "ivy", &stripe_id).await?;
    let minute = minute_ago(5);
    send_batch(&sidecar, "i1", 1, vec![usage_record("ivy", minute, 15, 0)]).await?;
    ensure!(
        eventually(Duration::from_secs(20), || stripe
            .usage_sum(&stripe_id, "api_requests")
            == 15)
        .await,
        "usage never reached Stripe"
    );
    let event = stripe.meter_events().first().cloned().context("no event")?;
    assert!(stripe.drop_event(&event.identifier));

    // Stripe fails every meter event request while the reconciliations
    // run, as when its summaries lag: a queued correction is not counted
    // yet.
    stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::ServerError,
        FailureCount::UntilCleared,
    );
    let end = minute_ago(1);
    let mut admin = sidecar.admin().await?;
    let mut corrective = 0;
    for start in [minute - 60, minute - 120, minute] {
        let report = admin
            .reconcile(ReconcileRequest {
                start_unix_s: start,
                end_unix_s: end,
                correct: true,
            })
            .await?
            .into_inner();
        corrective += report.corrective_events;
    }
    stripe.clear_failures(METER_EVENTS);
    tokio::time::sleep(Duration::from_secs(8)).await;
    sidecar.stop();
    println!(
        "corrective events {corrective}; Stripe {:?}",
        stripe.meter_events()
    );
    assert_eq!(
        stripe.usage_sum(&stripe_id, "api_requests"),
        15,
        "Stripe after overlapping reconciliations"
    );
    Ok(())
}

/// Concurrent reconciliations of one range queue one correction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconciles_correct_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "ivy", &stripe_id).await?;
    let minute = minute_ago(5);
    send_batch(&sidecar, "i1", 1, vec![usage_record("ivy", minute, 15, 0)]).await?;
    ensure!(
        eventually(Duration::from_secs(20), || stripe
            .usage_sum(&stripe_id, "api_requests")
            == 15)
        .await,
        "usage never reached Stripe"
    );
    let event = stripe.meter_events().first().cloned().context("no event")?;
    assert!(stripe.drop_event(&event.identifier));

    let request = ReconcileRequest {
        start_unix_s: minute,
        end_unix_s: minute_ago(1),
        correct: true,
    };

    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut admin = sidecar.admin().await?;
        tasks.push(tokio::spawn(async move { admin.reconcile(request).await }));
    }
    for task in tasks {
        task.await??;
    }
    // Run again and again while the correction is in flight.
    let mut admin = sidecar.admin().await?;
    for _ in 0..10 {
        admin.reconcile(request).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    sidecar.stop();
    assert_eq!(stripe.usage_sum(&stripe_id, "api_requests"), 15);
    Ok(())
}

/// After a customer moves to another Stripe customer, reconciliation must
/// not bill the new one for usage the old one was billed for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_after_remap_bills_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let old_id = stripe.create_customer(&[]);
    let new_id = stripe.create_customer(&[]);
    map(&sidecar, "max", &old_id).await?;
    let minute = minute_ago(5);
    send_batch(&sidecar, "i1", 1, vec![usage_record("max", minute, 9, 0)]).await?;
    ensure!(
        eventually(Duration::from_secs(20), || stripe
            .usage_sum(&old_id, "api_requests")
            == 9)
        .await,
        "usage never reached Stripe"
    );

    map(&sidecar, "max", &new_id).await?;
    let report = sidecar
        .admin()
        .await?
        .reconcile(ReconcileRequest {
            start_unix_s: minute,
            end_unix_s: minute_ago(1),
            correct: true,
        })
        .await?
        .into_inner();
    tokio::time::sleep(Duration::from_secs(4)).await;
    sidecar.stop();
    let total =
        stripe.usage_sum(&old_id, "api_requests") + stripe.usage_sum(&new_id, "api_requests");
    println!("report {report:?}");
    assert_eq!(total, 9, "requests billed across both Stripe customers");
    Ok(())
}

/// A base URL without the trailing slash, or with `/v1`, is a likely typo.
/// It must either work or fail loudly, never park or lose usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_base_typos_do_not_park_usage() -> anyhow::Result<()> {
    let stripe = start_stripe().await?;
    let base = stripe.base_url();
    let bases = [
        base.trim_end_matches('/').to_owned(),
        format!("{base}v1/"),
        format!("{base}v1"),
    ];
    let mut failures = Vec::new();
    for (index, base) in bases.iter().enumerate() {
        let dir = temp_dir()?;
        let started = start_with_stripe(dir.path(), &stripe, base).await;
        let Ok(mut sidecar) = started else {
            println!("{base}: start failed: {:?}", started.err());
            continue;
        };
        let stripe_id = stripe.create_customer(&[]);
        let customer = format!("typo{index}");
        map(&sidecar, &customer, &stripe_id).await?;
        send_batch(
            &sidecar,
            "i1",
            1,
            vec![usage_record(&customer, minute_ago(3), 4, 0)],
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(6)).await;
        let parked = sidecar
            .admin()
            .await?
            .list_parked_meter_events(ListParkedMeterEventsRequest { limit: 10 })
            .await?
            .into_inner()
            .events;
        sidecar.stop();
        let billed = stripe.usage_sum(&stripe_id, "api_requests");
        println!("{base}: billed {billed}, parked {parked:?}");
        if !parked.is_empty() {
            failures.push(base.clone());
        }
    }
    assert!(
        failures.is_empty(),
        "usage parked instead of an error at start for {failures:?}"
    );
    Ok(())
}

/// Usage for a minute far in the future is accepted by sync; it must not
/// end parked or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_minute_is_not_parked() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "fut", &stripe_id).await?;
    let future = minute_ago(-525_600);
    let accepted = send_batch(&sidecar, "i1", 1, vec![usage_record("fut", future, 3, 0)]).await;
    println!("sync of a minute a year ahead: {accepted:?}");
    sidecar.stop();
    sidecar.restart().await?;
    let parked = sidecar
        .admin()
        .await?
        .list_parked_meter_events(ListParkedMeterEventsRequest { limit: 10 })
        .await?
        .into_inner()
        .events;
    sidecar.stop();
    println!("parked {parked:?}");
    assert!(
        accepted.is_err() || parked.is_empty(),
        "future usage accepted and then parked: {parked:?}"
    );
    Ok(())
}

/// A meter event whose Stripe customer id cannot be read from the store is
/// parked with the reason, and setting the customer's Stripe customer again
/// bills it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_stripe_id_parks_until_remapped() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "lost", &stripe_id).await?;
    sidecar.stop();
    let store = rusqlite::Connection::open(sidecar.data_dir().join("usage.sqlite3"))?;
    ensure!(
        store.execute("DELETE FROM stripe_identity", [])? == 1,
        "no Stripe identity stored"
    );
    drop(store);
    sidecar.restart().await?;

    let usage = vec![usage_record("lost", minute_ago(2), 3, 0)];
    send_batch(&sidecar, "i1", 1, usage).await?;
    let parked = await_parked(&sidecar).await?;
    ensure!(
        parked
            .iter()
            .all(|event| event.reason.contains("stripe_identity")),
        "{parked:?}"
    );
    assert_eq!(stripe.usage_sum(&stripe_id, "api_requests"), 0);

    map(&sidecar, "lost", &stripe_id).await?;
    let billed = eventually(Duration::from_secs(20), || {
        stripe.usage_sum(&stripe_id, "api_requests") == 3
    })
    .await;
    sidecar.stop();
    ensure!(billed, "the remapped customer's usage was not billed");
    Ok(())
}

/// Sends raw bytes to `address` and returns the status code of the reply,
/// or `None` when the connection closed without one.
async fn raw_status(address: SocketAddr, request: &[u8]) -> anyhow::Result<Option<u16>> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(request).await?;
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buffer = [0u8; 4096];
        loop {
            let count = stream.read(&mut buffer).await?;
            if count == 0 {
                break;
            }
            reply.extend_from_slice(&buffer[..count]);
            if reply.windows(4).any(|window| window == b"\r\n\r\n") {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await;
    ensure!(read.is_ok(), "no reply within 10 s: the server hangs");
    let text = String::from_utf8_lossy(&reply);
    Ok(text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok()))
}

fn webhook_request(headers: &[u8], body: &[u8]) -> Vec<u8> {
    let mut request = Vec::new();
    request.extend_from_slice(b"POST /stripe/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    request.extend_from_slice(b"Content-Type: application/json\r\nConnection: close\r\n");
    request.extend_from_slice(headers);
    request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    request.extend_from_slice(body);
    request
}

fn signature_header(body: &str, timestamp: i64) -> Vec<u8> {
    format!(
        "Stripe-Signature: {}\r\n",
        sign(body, WEBHOOK_SECRET, timestamp)
    )
    .into_bytes()
}

async fn tier_of(sidecar: &Sidecar, customer: &str) -> anyhow::Result<String> {
    Ok(sidecar
        .admin()
        .await?
        .get_stripe_customer(GetStripeCustomerRequest {
            customer: customer.into(),
        })
        .await?
        .into_inner()
        .tier)
}

/// Malformed, forged, oversized and replayed deliveries: the sidecar stays
/// up, responds to each, and keeps the newest tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_webhooks_keep_newest_tier() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let address = sidecar.http_address();
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "hal", &stripe_id).await?;
    let now = unix_seconds();

    let mut subscription = Subscription::new(&stripe_id, "price_pro", "prod_video");
    let newest = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    subscription.items[0].price = "price_basic".into();
    let mut older = subscription_event(SubscriptionEventType::Updated, &subscription, None);
    older["created"] = serde_json::json!(newest["created"].as_i64().unwrap_or(0) - 10);
    let newest_body = newest.to_string();
    let older_body = older.to_string();

    let mut unknown = newest.clone();
    unknown["type"] = serde_json::json!("invoice.paid");
    unknown["id"] = serde_json::json!("evt_unknown_type");
    let unknown_body = unknown.to_string();
    // Signed now but created far ahead: accepted, it would make every
    // later event stale and keep the customer on basic.
    let mut created_ahead = older.clone();
    created_ahead["created"] = serde_json::json!(i64::MAX);
    created_ahead["id"] = serde_json::json!("evt_created_ahead");
    let created_ahead_body = created_ahead.to_string();
    let mut unmapped = subscription_event(
        SubscriptionEventType::Created,
        &Subscription::new("cus_nobody", "price_pro", "prod_video"),
        None,
    );
    unmapped["id"] = serde_json::json!("evt_unmapped");
    let unmapped_body = unmapped.to_string();
    let huge_value = "a".repeat(60_000);
    let big_body = format!("{{\"pad\":\"{}\"}}", "x".repeat((1 << 20) + 10));

    let cases: Vec<(&str, Vec<u8>, Vec<u16>)> = vec![
        (
            "forged",
            webhook_request(
                format!(
                    "Stripe-Signature: {}\r\n",
                    sign(&newest_body, "whsec_other", now)
                )
                .as_bytes(),
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "stale",
            webhook_request(
                &signature_header(&newest_body, now - 301),
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "future",
            webhook_request(
                // Far past the 300 s tolerance: `now` was read before the
                // earlier cases, and a slow run moves the sidecar's clock
                // closer to this timestamp.
                &signature_header(&newest_body, now + 900),
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "huge header",
            webhook_request(
                format!("Stripe-Signature: t={now},v1={huge_value}\r\n").as_bytes(),
                newest_body.as_bytes(),
            ),
            vec![400, 431],
        ),
        (
            "repeated header",
            webhook_request(
                &[
                    signature_header(&newest_body, now),
                    signature_header(&newest_body, now),
                ]
                .concat(),
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "non-UTF-8 header",
            webhook_request(
                b"Stripe-Signature: t=1,v1=\xff\xfe\r\n",
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "many v1",
            webhook_request(
                format!(
                    "Stripe-Signature: t={now}{}\r\n",
                    format!(",v1={}", "0".repeat(64)).repeat(40)
                )
                .as_bytes(),
                newest_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "body over 1 MiB",
            webhook_request(&signature_header(&big_body, now), big_body.as_bytes()),
            vec![413],
        ),
        (
            "invalid JSON",
            webhook_request(&signature_header("{not json", now), b"{not json"),
            vec![400],
        ),
        (
            "non-UTF-8 body",
            webhook_request(b"Stripe-Signature: t=1,v1=00\r\n", b"\xff\xfe\xfd"),
            vec![400],
        ),
        (
            "created after its signature",
            webhook_request(
                &signature_header(&created_ahead_body, now),
                created_ahead_body.as_bytes(),
            ),
            vec![400],
        ),
        (
            "unknown type",
            webhook_request(
                &signature_header(&unknown_body, now),
                unknown_body.as_bytes(),
            ),
            vec![200],
        ),
        (
            "unmapped customer",
            webhook_request(
                &signature_header(&unmapped_body, now),
                unmapped_body.as_bytes(),
            ),
            vec![200],
        ),
    ];
    for (name, request, allowed) in &cases {
        let status = raw_status(address, request).await?;
        println!("{name}: {status:?}");
        assert!(
            status.is_some_and(|status| allowed.contains(&status)),
            "{name}: status {status:?}, expected one of {allowed:?}"
        );
    }

    // The newest event 20 times at once, then the older one, then replays.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let request = webhook_request(&signature_header(&newest_body, now), newest_body.as_bytes());
        tasks.push(tokio::spawn(
            async move { raw_status(address, &request).await },
        ));
    }
    for task in tasks {
        assert_eq!(task.await??, Some(200));
    }
    let request = webhook_request(&signature_header(&older_body, now), older_body.as_bytes());
    assert_eq!(raw_status(address, &request).await?, Some(200));
    let request = webhook_request(&signature_header(&newest_body, now), newest_body.as_bytes());
    assert_eq!(raw_status(address, &request).await?, Some(200));

    let tier = tier_of(&sidecar, "hal").await?;
    sidecar.stop();
    assert_eq!(tier, "pro", "newest tier kept");
    assert!(!sidecar.log().contains("panicked"), "{}", sidecar.log());
    Ok(())
}

/// Invalid admin requests get a clear `InvalidArgument` naming the field,
/// and the sidecar stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_rejects_bad_input_clearly() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    map(&sidecar, "acme", "cus_taken1").await?;
    let mut admin = sidecar.admin().await?;

    let huge = "x".repeat(200_000);
    let mut unclear = Vec::new();
    let set_cases = [
        ("", "cus_A1"),
        ("acme\n", "cus_A1"),
        ("beta", ""),
        ("beta", "cus_"),
        ("beta", "acct_1"),
        ("beta", "cus_a b"),
        ("beta", "cus_taken1"),
        ("beta", huge.as_str()),
        (huge.as_str(), "cus_A1"),
    ];
    for (customer, stripe_id) in set_cases {
        let result = admin
            .set_stripe_customer(SetStripeCustomerRequest {
                customer: customer.into(),
                stripe_customer_id: stripe_id.into(),
            })
            .await;
        let status = result.err().context("accepted")?;
        let message_start: String = status.message().chars().take(160).collect();
        let customer: String = customer.chars().take(20).collect();
        let stripe_id: String = stripe_id.chars().take(20).collect();
        println!(
            "set {customer:?} {stripe_id:?}: {:?} {} ({} bytes)",
            status.code(),
            message_start,
            status.message().len()
        );
        if status.code() != tonic::Code::InvalidArgument || status.message().len() >= 1024 {
            unclear.push(format!(
                "{customer:?} {stripe_id:?}: {:?} {message_start}",
                status.code()
            ));
        }
    }

    let now = minute_ago(0);
    let ranges = [
        (-60, 0),
        (30, 90),
        (120, 60),
        (0, 0),
        (0, 40 * 86_400),
        (now, now + 3600),
        (i64::MIN, i64::MAX - 7),
        (now - 60, i64::MAX / 60 * 60),
    ];
    for (start, end) in ranges {
        let result = admin
            .reconcile(ReconcileRequest {
                start_unix_s: start,
                end_unix_s: end,
                correct: true,
            })
            .await;
        let status = result.err().context("accepted")?;
        println!(
            "reconcile {start}..{end}: {:?} {}",
            status.code(),
            status.message()
        );
        if status.code() != tonic::Code::InvalidArgument {
            unclear.push(format!("reconcile {start}..{end}: {:?}", status.code()));
        }
    }
    let alive = admin
        .get_stripe_customer(GetStripeCustomerRequest {
            customer: "acme".into(),
        })
        .await;
    sidecar.stop();
    assert!(alive.is_ok(), "sidecar down after bad input: {alive:?}");
    assert!(unclear.is_empty(), "unclear errors: {unclear:#?}");
    Ok(())
}

/// Proves an event parked because its Stripe customer did not exist is
/// billed once after that customer is created and mapped again, although
/// Stripe replays the rejection saved under the event's first idempotency
/// key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_event_bills_once_after_customer_exists() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let ghost = "cus_ghost1";
    map(&sidecar, "ghost", ghost).await?;

    let usage = vec![usage_record("ghost", minute_ago(2), 3, 0)];
    send_batch(&sidecar, "i1", 1, usage).await?;
    let parked = await_parked(&sidecar).await?;
    ensure!(
        parked
            .iter()
            .all(|event| event.reason.contains("No such customer")),
        "{parked:?}"
    );

    stripe.create_customer_with_id(ghost, &[])?;
    map(&sidecar, "ghost", ghost).await?;
    let billed = eventually(Duration::from_secs(20), || {
        stripe.usage_sum(ghost, "api_requests") == 3
    })
    .await;
    sidecar.stop();
    ensure!(
        billed,
        "the parked usage was not billed: {} requests",
        stripe.usage_sum(ghost, "api_requests")
    );
    ensure_one_event(&stripe)
}

/// Proves a meter event whose first attempt got a 500 that Stripe saved
/// under its idempotency key is billed once, with the next key, rather than
/// retried against the saved 500 until Stripe drops the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_server_error_bills_once() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "flaky", &stripe_id).await?;
    stripe.inject_failure(
        METER_EVENTS,
        InjectedFailure::SavedServerError,
        FailureCount::Next(1),
    );

    let usage = vec![usage_record("flaky", minute_ago(2), 4, 0)];
    send_batch(&sidecar, "i1", 1, usage).await?;
    let billed = eventually(Duration::from_secs(30), || {
        stripe.usage_sum(&stripe_id, "api_requests") == 4
    })
    .await;
    sidecar.stop();
    ensure!(
        billed,
        "the usage was not billed after the saved 500: {} requests, requests {:?}",
        stripe.usage_sum(&stripe_id, "api_requests"),
        stripe.request_counts()
    );
    ensure!(
        stripe.request_count(METER_EVENTS, 500) == 1,
        "{:?}",
        stripe.request_counts()
    );
    ensure_one_event(&stripe)
}

/// Proves that reconciling with corrections while Stripe's summaries lag
/// behind the events sent queues no correction, so the usage is billed
/// once, and that the report agrees with the ledger once Stripe caught up.
/// Only the fake's clock moves, so the second run is still within the
/// settle time, and its corrections are not checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_summaries_get_no_correction() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    stripe.set_summary_lag(300);
    let config = CONFIG.replace("summary_settle_seconds = 0", "summary_settle_seconds = 600");
    let mut sidecar = start_with_config(dir.path(), &stripe, &stripe.base_url(), &config).await?;
    let stripe_id = stripe.create_customer(&[]);
    map(&sidecar, "lea", &stripe_id).await?;
    let minute = minute_ago(2);
    send_batch(&sidecar, "i1", 1, vec![usage_record("lea", minute, 6, 0)]).await?;
    ensure!(
        eventually(Duration::from_secs(20), || stripe
            .usage_sum(&stripe_id, "api_requests")
            == 6)
        .await,
        "usage never reached Stripe"
    );

    let mut admin = sidecar.admin().await?;
    let request = ReconcileRequest {
        start_unix_s: minute,
        end_unix_s: minute + 60,
        correct: true,
    };
    let lagging = admin.reconcile(request).await?.into_inner();
    stripe.advance_clock(301);
    let caught_up = admin.reconcile(request).await?.into_inner();
    tokio::time::sleep(Duration::from_secs(3)).await;
    sidecar.stop();

    assert_eq!(lagging.corrective_events, 0, "{lagging:?}");
    assert_eq!(lagging.rows[0].stripe_value, Some(0), "{lagging:?}");
    assert_eq!(caught_up.rows[0].stripe_value, Some(6), "{caught_up:?}");
    assert_eq!(stripe.usage_sum(&stripe_id, "api_requests"), 6);
    Ok(())
}

/// Proves one Stripe customer whose summaries Stripe does not return, here
/// because it was deleted, neither stops the reconciliation of the others
/// nor their corrections, and is named in the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_customer_does_not_stop_reconcile() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let stripe = start_stripe().await?;
    let mut sidecar = start_with_stripe(dir.path(), &stripe, &stripe.base_url()).await?;
    let deleted_id = stripe.create_customer(&[]);
    let kept_id = stripe.create_customer(&[]);
    map(&sidecar, "gone", &deleted_id).await?;
    map(&sidecar, "kept", &kept_id).await?;
    let minute = minute_ago(3);
    let usage = vec![
        usage_record("gone", minute, 4, 0),
        usage_record("kept", minute, 9, 0),
    ];
    send_batch(&sidecar, "i1", 1, usage).await?;
    ensure!(
        eventually(Duration::from_secs(20), || {
            stripe.usage_sum(&deleted_id, "api_requests") == 4
                && stripe.usage_sum(&kept_id, "api_requests") == 9
        })
        .await,
        "usage never reached Stripe"
    );
    let kept_event = stripe
        .meter_events()
        .into_iter()
        .find(|event| event.customer == kept_id)
        .context("no event of the kept customer")?;
    ensure!(
        stripe.drop_event(&kept_event.identifier),
        "event not dropped"
    );
    ensure!(stripe.delete_customer(&deleted_id), "customer not deleted");

    let mut admin = sidecar.admin().await?;
    let report = admin
        .reconcile(ReconcileRequest {
            start_unix_s: minute,
            end_unix_s: minute + 60,
            correct: true,
        })
        .await?
        .into_inner();
    let billed = eventually(Duration::from_secs(20), || {
        stripe.usage_sum(&kept_id, "api_requests") == 9
    })
    .await;
    sidecar.stop();

    assert_eq!(report.corrective_events, 1, "{report:?}");
    assert_eq!(report.stripe_errors.len(), 1, "{report:?}");
    ensure!(
        report.stripe_errors[0].contains("No such customer"),
        "{:?}",
        report.stripe_errors
    );
    ensure!(
        billed,
        "the kept customer's missing usage was not corrected"
    );
    Ok(())
}
