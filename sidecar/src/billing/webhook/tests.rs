//! Tests of the whole handler against a store in a temporary directory.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use rusqlite::OptionalExtension;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use super::signature::{SIGNATURE_HEADER, sign};
use super::state::tests::MAPPING_SCHEMA;
use super::*;

const SECRET: &str = "whsec_primary_test_secret";
const OLD_SECRET: &str = "whsec_previous_test_secret";

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    handler: WebhookHandler,
    changed: Arc<Notify>,
}

fn settings() -> WebhookSettings {
    WebhookSettings {
        secrets: vec![SECRET.into()],
        price_tiers: BTreeMap::from([
            ("price_pro".into(), "pro".into()),
            ("prod_enterprise".into(), "enterprise".into()),
        ]),
        known_tiers: vec!["basic".into(), "pro".into(), "enterprise".into()],
        ..WebhookSettings::default()
    }
}

async fn fixture_with(settings: WebhookSettings, stripe: Option<stripe::Client>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::test_support::open(dir.path());
    store
        .write("create the webhook tables", |conn| {
            conn.execute_batch(SCHEMA)?;
            conn.execute_batch(MAPPING_SCHEMA)
        })
        .await
        .unwrap();
    let changed = Arc::new(Notify::new());
    let handler = WebhookHandler::new(store.clone(), settings, stripe, Arc::clone(&changed), None);
    Fixture {
        _dir: dir,
        store,
        handler,
        changed,
    }
}

async fn fixture() -> Fixture {
    fixture_with(settings(), None).await
}

fn signed_headers(body: &[u8], timestamp: i64, secrets: &[&str]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let value = sign(body, timestamp, secrets);
    headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(&value).unwrap());
    headers
}

fn subscription_event(
    id: &str,
    event_type: &str,
    created: i64,
    status: &str,
    price: &str,
) -> Vec<u8> {
    json!({
        "id": id,
        "object": "event",
        "type": event_type,
        "created": created,
        "data": {"object": {
            "id": "sub_1",
            "object": "subscription",
            "customer": "cus_1",
            "status": status,
            "created": 10,
            "items": {"object": "list", "data": [
                {"id": "si_1", "price": {"id": price, "product": "prod_x"}},
            ]},
        }},
    })
    .to_string()
    .into_bytes()
}

fn customer_event(id: &str, created: i64, metadata: Value) -> Vec<u8> {
    json!({
        "id": id,
        "object": "event",
        "type": "customer.updated",
        "created": created,
        "data": {
            "object": {"id": "cus_1", "object": "customer", "metadata": metadata},
            "previous_attributes": {"metadata": {"tier": null, "veo_customer_id": null}},
        },
        "request": {"id": "req_1", "idempotency_key": null},
    })
    .to_string()
    .into_bytes()
}

impl Fixture {
    async fn deliver(&self, body: &[u8]) -> (StatusCode, String) {
        let headers = signed_headers(body, unix_now_s(), &[SECRET]);
        let reply = self.handler.handle(&headers, body).await;
        (reply.status, reply.body)
    }

    async fn tier(&self, stripe_customer_id: &str) -> Option<String> {
        let pseudonym = self.store.identities().stripe_pseudonym(stripe_customer_id);
        self.store
            .read("read a tier", move |conn| {
                conn.query_row(
                    "SELECT tier FROM stripe_tier_state WHERE stripe_pseudonym = ?1",
                    [pseudonym],
                    |row| row.get(0),
                )
                .optional()
            })
            .await
            .unwrap()
    }

    async fn count(&self, table: &'static str) -> i64 {
        self.store
            .read("count rows", move |conn| {
                conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                    row.get(0)
                })
            })
            .await
            .unwrap()
    }

    async fn overrides(&self) -> Vec<(String, String)> {
        let identities = self.store.identities().clone();
        self.store
            .read("read tier overrides", move |conn| {
                named_tier_overrides(conn, &identities)
            })
            .await
            .unwrap()
    }
}

fn status_of(body: &str) -> String {
    let value: Value = serde_json::from_str(body).unwrap();
    value["status"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn valid_delivery_sets_tier() {
    let fixture = fixture().await;
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );
    let notified = fixture.changed.notified();

    let (code, reply) = fixture.deliver(&body).await;

    assert_eq!(code, StatusCode::OK, "{reply}");
    assert_eq!(status_of(&reply), "applied");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("pro"));
    tokio::time::timeout(Duration::from_secs(1), notified)
        .await
        .expect("changed was not notified");
}

#[tokio::test]
async fn rejections_get_400_and_are_counted() {
    let fixture = fixture().await;
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );
    let now = unix_now_s();
    let mut changed_body = body.clone();
    changed_body[10] ^= 1;
    let cases: Vec<(&str, HeaderMap, Vec<u8>, RejectReason)> = vec![
        (
            "missing header",
            HeaderMap::new(),
            body.clone(),
            RejectReason::MissingHeader,
        ),
        (
            "malformed header",
            {
                let mut headers = HeaderMap::new();
                headers.insert(SIGNATURE_HEADER, HeaderValue::from_static("t=abc,v1=00"));
                headers
            },
            body.clone(),
            RejectReason::MalformedHeader,
        ),
        (
            "wrong secret",
            signed_headers(&body, now, &["whsec_wrong"]),
            body.clone(),
            RejectReason::SignatureMismatch,
        ),
        (
            "stale timestamp",
            signed_headers(&body, now - 301, &[SECRET]),
            body.clone(),
            RejectReason::TimestampOutsideTolerance,
        ),
        (
            "future timestamp",
            signed_headers(&body, now + 301, &[SECRET]),
            body.clone(),
            RejectReason::TimestampOutsideTolerance,
        ),
        (
            "body changed by one byte",
            signed_headers(&body, now, &[SECRET]),
            changed_body,
            RejectReason::SignatureMismatch,
        ),
    ];

    for (index, (name, headers, body, reason)) in cases.iter().enumerate() {
        let reply = fixture.handler.handle(headers, body).await;
        let (code, reply) = (reply.status, reply.body);

        assert_eq!(code, StatusCode::BAD_REQUEST, "{name}: {reply}");
        assert!(reply.contains(reason.message()), "{name}: {reply}");
        assert!(!reply.contains(SECRET), "{name}: {reply}");
        assert_eq!(fixture.handler.rejected_total(), index as u64 + 1, "{name}");
    }
    assert_eq!(fixture.handler.rejected(RejectReason::SignatureMismatch), 2);
    assert_eq!(
        fixture
            .handler
            .rejected(RejectReason::TimestampOutsideTolerance),
        2
    );
    assert_eq!(fixture.tier("cus_1").await, None);
    assert_eq!(fixture.count("stripe_webhook_event").await, 0);
}

#[tokio::test]
async fn accepted_signatures_are_applied() {
    let rotating = WebhookSettings {
        secrets: vec![OLD_SECRET.into(), SECRET.into()],
        ..settings()
    };
    let fixture = fixture_with(rotating, None).await;
    let now = unix_now_s();
    let cases: [(&str, i64, &[&str]); 4] = [
        ("second secret during rotation", now, &[SECRET]),
        (
            "several v1, one matching",
            now,
            &["whsec_x", SECRET, "whsec_y"],
        ),
        ("within tolerance, past", now - 290, &[OLD_SECRET]),
        ("within tolerance, future", now + 290, &[SECRET]),
    ];

    for (index, (name, timestamp, secrets)) in cases.into_iter().enumerate() {
        let body = subscription_event(
            &format!("evt_{index}"),
            "customer.subscription.updated",
            100 + index as i64,
            "active",
            "price_pro",
        );
        let headers = signed_headers(&body, timestamp, secrets);

        let reply = fixture.handler.handle(&headers, &body).await;
        let (code, reply) = (reply.status, reply.body);

        assert_eq!(code, StatusCode::OK, "{name}: {reply}");
    }
    assert_eq!(fixture.handler.rejected_total(), 0);
    assert_eq!(fixture.count("stripe_webhook_event").await, 4);
}

#[tokio::test]
async fn replayed_delivery_is_applied_once() {
    let fixture = fixture().await;
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );

    let first = fixture.deliver(&body).await;
    let second = fixture.deliver(&body).await;

    assert_eq!(first.0, StatusCode::OK);
    assert_eq!(status_of(&first.1), "applied");
    assert_eq!(second.0, StatusCode::OK);
    assert_eq!(status_of(&second.1), "duplicate");
    assert_eq!(fixture.count("stripe_webhook_event").await, 1);
    assert_eq!(fixture.count("stripe_tier_metadata_pending").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_are_applied_once() {
    let fixture = fixture().await;
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );
    let headers = signed_headers(&body, unix_now_s(), &[SECRET]);

    let (first, second) = tokio::join!(
        fixture.handler.handle(&headers, &body),
        fixture.handler.handle(&headers, &body)
    );

    let mut statuses = [status_of(&first.body), status_of(&second.body)];
    statuses.sort();
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(statuses, ["applied", "duplicate"]);
    let mut outcomes = [first.outcome, second.outcome];
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["applied", "duplicate"]);
    assert_eq!(fixture.count("stripe_webhook_event").await, 1);
}

#[tokio::test]
async fn older_update_leaves_newer_tier() {
    let fixture = fixture().await;
    let newer = subscription_event(
        "evt_2",
        "customer.subscription.updated",
        200,
        "active",
        "price_pro",
    );
    let older = json!({
        "id": "evt_1", "type": "customer.subscription.updated", "created": 150,
        "data": {"object": {
            "id": "sub_1", "customer": "cus_1", "status": "active", "created": 10,
            "items": {"data": [{"price": {"id": "price_e", "product": "prod_enterprise"}}]},
        }},
    })
    .to_string();

    fixture.deliver(&newer).await;
    let (code, reply) = fixture.deliver(older.as_bytes()).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "stale");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("pro"));
}

#[tokio::test]
async fn deletion_after_update_cancels_tier() {
    let fixture = fixture().await;
    let updated = subscription_event(
        "evt_1",
        "customer.subscription.updated",
        100,
        "active",
        "price_pro",
    );
    let deleted = subscription_event(
        "evt_2",
        "customer.subscription.deleted",
        200,
        "canceled",
        "price_pro",
    );

    fixture.deliver(&updated).await;
    let (code, reply) = fixture.deliver(&deleted).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "applied");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("basic"));
}

#[tokio::test]
async fn canceled_status_beats_active_same_second() {
    let fixture = fixture().await;
    let canceled = subscription_event(
        "evt_2",
        "customer.subscription.updated",
        100,
        "canceled",
        "price_pro",
    );
    let active = subscription_event(
        "evt_1",
        "customer.subscription.updated",
        100,
        "active",
        "price_pro",
    );

    fixture.deliver(&canceled).await;
    let (_, reply) = fixture.deliver(&active).await;

    assert_eq!(status_of(&reply), "stale");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("basic"));
}

#[tokio::test]
async fn customer_metadata_sets_tier_and_mapping() {
    let fixture = fixture().await;
    let body = customer_event(
        "evt_1",
        100,
        json!({"tier": "enterprise", "veo_customer_id": "acme"}),
    );

    let (code, reply) = fixture.deliver(&body).await;

    assert_eq!(code, StatusCode::OK, "{reply}");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("enterprise"));
    assert_eq!(
        fixture.overrides().await,
        [("acme".to_owned(), "enterprise".to_owned())]
    );
    assert_eq!(
        fixture.count("stripe_tier_metadata_pending").await,
        0,
        "the tier came from Stripe's metadata, so nothing is written back"
    );
}

#[tokio::test]
async fn unknown_metadata_tier_is_ignored() {
    let fixture = fixture().await;
    let body = customer_event("evt_1", 100, json!({"tier": "platinum"}));

    let (code, reply) = fixture.deliver(&body).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "ignored");
    assert_eq!(fixture.tier("cus_1").await, None);
}

#[tokio::test]
async fn own_metadata_write_is_not_an_override() {
    let fixture = fixture().await;
    fixture
        .deliver(&subscription_event(
            "evt_1",
            "customer.subscription.updated",
            100,
            "active",
            "price_pro",
        ))
        .await;
    let echo = json!({
        "id": "evt_2", "type": "customer.updated", "created": 200,
        "data": {
            "object": {"id": "cus_1", "metadata": {"tier": "enterprise"}},
            "previous_attributes": {"metadata": {"tier": "basic"}},
        },
        "request": {"id": "req_1", "idempotency_key": "veo-tier-0123"},
    })
    .to_string();

    let (code, reply) = fixture.deliver(echo.as_bytes()).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "ignored");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("pro"));
}

#[tokio::test]
async fn unmapped_price_keeps_state() {
    let fixture = fixture().await;
    fixture
        .deliver(&subscription_event(
            "evt_1",
            "customer.subscription.updated",
            100,
            "active",
            "price_pro",
        ))
        .await;
    let unmapped = subscription_event(
        "evt_2",
        "customer.subscription.deleted",
        200,
        "canceled",
        "price_other",
    );

    let (code, reply) = fixture.deliver(&unmapped).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "ignored");
    assert_eq!(fixture.tier("cus_1").await.as_deref(), Some("pro"));
}

#[tokio::test]
async fn unhandled_event_type_is_ignored() {
    let fixture = fixture().await;
    let body =
        br#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{"id":"in_1"}}}"#;

    let (code, reply) = fixture.deliver(body).await;

    assert_eq!(code, StatusCode::OK);
    assert_eq!(status_of(&reply), "ignored");
    assert_eq!(fixture.count("stripe_webhook_event").await, 0);
}

#[tokio::test]
async fn malformed_json_after_valid_signature_is_400() {
    let fixture = fixture().await;

    let (code, reply) = fixture.deliver(b"{\"id\": \"evt_1\", ").await;

    assert_eq!(code, StatusCode::BAD_REQUEST, "{reply}");
    assert_eq!(fixture.handler.rejected(RejectReason::InvalidPayload), 1);
}

#[tokio::test]
async fn store_failure_is_500() {
    let fixture = fixture().await;
    fixture
        .store
        .write("drop a table", |conn| {
            conn.execute_batch("DROP TABLE stripe_webhook_event")
        })
        .await
        .unwrap();
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );

    let (code, reply) = fixture.deliver(&body).await;

    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR, "{reply}");
    assert!(!reply.contains("stripe_webhook_event"), "{reply}");
}

#[tokio::test]
async fn missing_secret_is_500() {
    let fixture = fixture_with(WebhookSettings::default(), None).await;
    let body = subscription_event(
        "evt_1",
        "customer.subscription.created",
        100,
        "active",
        "price_pro",
    );

    let (code, _) = fixture.deliver(&body).await;

    assert_eq!(code, StatusCode::INTERNAL_SERVER_ERROR);
}

#[test]
fn settings_debug_hides_secrets() {
    let text = format!("{:?}", settings());

    assert!(!text.contains(SECRET), "{text}");
    assert!(text.contains("<1 redacted>"), "{text}");
}

/// Waits until `table` has `rows` rows, for up to five seconds.
async fn wait_for_rows(fixture: &Fixture, table: &'static str, rows: i64) {
    for _ in 0..500 {
        if fixture.count(table).await == rows {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{table} did not reach {rows} rows");
}

#[tokio::test]
async fn writer_without_stripe_marks_writes_done() {
    let fixture = fixture().await;
    fixture
        .deliver(&subscription_event(
            "evt_1",
            "customer.subscription.created",
            100,
            "active",
            "price_pro",
        ))
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = tokio::spawn(fixture.handler.clone().run_metadata_writer(stop_rx));

    wait_for_rows(&fixture, "stripe_tier_metadata_pending", 0).await;
    stop_tx.send(true).unwrap();

    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("writer did not stop")
        .unwrap();
}

#[tokio::test]
async fn writer_stops_when_stop_sender_dropped() {
    let fixture = fixture().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = tokio::spawn(fixture.handler.clone().run_metadata_writer(stop_rx));

    drop(stop_tx);

    tokio::time::timeout(Duration::from_secs(5), writer)
        .await
        .expect("writer did not stop")
        .unwrap();
}

/// One request received by [`fake_stripe`].
#[derive(Debug)]
struct Received {
    request_line: String,
    idempotency_key: String,
    body: String,
}

/// Replies to each connection with the next of `replies` (status, body) and
/// sends what it received on the returned channel.
async fn fake_stripe(
    replies: Vec<(u16, &'static str)>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for (status, reply) in replies {
            let (mut socket, _) = listener.accept().await.unwrap();
            let received = read_request(&mut socket).await;
            let response = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
            sender.send(received).unwrap();
        }
    });
    (url, receiver)
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Received {
    let mut data = Vec::new();
    let mut buffer = [0_u8; 4096];
    let header_end = loop {
        let read = socket.read(&mut buffer).await.unwrap();
        assert!(read > 0, "connection closed before the headers ended");
        data.extend_from_slice(&buffer[..read]);
        if let Some(end) = data.windows(4).position(|window| window == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8(data[..header_end].to_vec()).unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let length: usize = header("content-length").parse().unwrap_or(0);
    while data.len() < header_end + length {
        let read = socket.read(&mut buffer).await.unwrap();
        assert!(read > 0, "connection closed before the body ended");
        data.extend_from_slice(&buffer[..read]);
    }
    Received {
        request_line: head.lines().next().unwrap_or_default().to_owned(),
        idempotency_key: header("idempotency-key"),
        body: String::from_utf8(data[header_end..header_end + length].to_vec()).unwrap(),
    }
}

const CUSTOMER_REPLY: &str =
    r#"{"id":"cus_1","object":"customer","created":1,"livemode":false,"metadata":{"tier":"pro"}}"#;
const SERVER_ERROR_REPLY: &str = r#"{"error":{"type":"api_error","message":"try again"}}"#;
const NOT_FOUND_REPLY: &str =
    r#"{"error":{"type":"invalid_request_error","message":"No such customer"}}"#;

async fn fixture_with_fake_stripe(
    replies: Vec<(u16, &'static str)>,
) -> (Fixture, tokio::sync::mpsc::UnboundedReceiver<Received>) {
    let (url, received) = fake_stripe(replies).await;
    let client = stripe::ClientBuilder::new("sk_test_fake")
        .url(url)
        .build()
        .unwrap();
    (fixture_with(settings(), Some(client)).await, received)
}

#[tokio::test]
async fn writer_retries_server_errors() {
    let (fixture, mut received) =
        fixture_with_fake_stripe(vec![(500, SERVER_ERROR_REPLY), (200, CUSTOMER_REPLY)]).await;
    fixture
        .deliver(&subscription_event(
            "evt_1",
            "customer.subscription.created",
            100,
            "active",
            "price_pro",
        ))
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = tokio::spawn(fixture.handler.clone().run_metadata_writer(stop_rx));

    wait_for_rows(&fixture, "stripe_tier_metadata_pending", 0).await;
    stop_tx.send(true).unwrap();
    writer.await.unwrap();

    let first = received.recv().await.unwrap();
    let second = received.recv().await.unwrap();
    assert_eq!(first.request_line, "POST /v1/customers/cus_1 HTTP/1.1");
    assert_eq!(second.request_line, first.request_line);
    assert_eq!(second.body, first.body);
    assert!(
        first.body == "metadata[tier]=pro" || first.body == "metadata%5Btier%5D=pro",
        "{}",
        first.body
    );
    assert!(first.idempotency_key.starts_with("veo-tier-"), "{first:?}");
    assert_ne!(first.idempotency_key, second.idempotency_key);
}

#[tokio::test]
async fn writer_gives_up_on_client_errors() {
    let (fixture, mut received) = fixture_with_fake_stripe(vec![(404, NOT_FOUND_REPLY)]).await;
    fixture
        .deliver(&subscription_event(
            "evt_1",
            "customer.subscription.created",
            100,
            "active",
            "price_pro",
        ))
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let writer = tokio::spawn(fixture.handler.clone().run_metadata_writer(stop_rx));

    wait_for_rows(&fixture, "stripe_tier_metadata_pending", 0).await;
    stop_tx.send(true).unwrap();
    writer.await.unwrap();

    assert!(received.recv().await.is_some());
    assert!(received.recv().await.is_none(), "a 404 must not be retried");
}
