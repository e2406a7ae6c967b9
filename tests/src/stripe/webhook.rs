//! Stripe webhooks as Stripe sends them: event bodies for subscription and
//! customer changes, the `Stripe-Signature` header, and delivery by POST.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value, json};
use sha2::Sha256;

use super::customers::{CustomerDetails, customer_json};
use super::ids::random_id;
use super::state::unix_now;
use crate::HarnessError;

/// API version stamped on events: the version async-stripe 1.0.0-rc.10 is
/// generated for (`stripe_shared::version::VERSION`).
pub const API_VERSION: &str = "2026-09-30.endive";

/// How long a delivery may take before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Length of a subscription's billing period in the builders: 30 days.
const PERIOD_SECONDS: i64 = 30 * 24 * 60 * 60;

/// Returns a `Stripe-Signature` header value, `t=<timestamp>,v1=<hex>`, where
/// the hex is the HMAC-SHA256 of `"<timestamp>.<payload>"` keyed by the
/// endpoint's signing secret.
pub fn sign(payload: &str, secret: &str, timestamp: i64) -> String {
    format!("t={timestamp},v1={}", signature(payload, secret, timestamp))
}

/// Returns a `Stripe-Signature` header value as Stripe sends it while an
/// endpoint has several signing secrets: one `v1` entry per secret, in
/// order, then a `v0` entry of the legacy scheme that verifiers must ignore.
pub fn sign_with_secrets(payload: &str, secrets: &[&str], timestamp: i64) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&signature(payload, secret, timestamp));
    }
    // The v0 entry signs the same text with a key no endpoint has, so a
    // verifier that wrongly accepts v0 entries still fails.
    header.push_str(",v0=");
    header.push_str(&signature(payload, "legacy-v0-scheme", timestamp));
    header
}

fn signature(payload: &str, secret: &str, timestamp: i64) -> String {
    // HMAC takes keys of any length, so `new_from_slice` never fails and the
    // empty fallback is never used.
    Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_or_else(
        |_| String::new(),
        |mut mac| {
            mac.update(format!("{timestamp}.{payload}").as_bytes());
            hex::encode(mac.finalize().into_bytes())
        },
    )
}

/// Type of a subscription event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionEventType {
    /// `customer.subscription.created`
    Created,
    /// `customer.subscription.updated`
    Updated,
    /// `customer.subscription.deleted`: the subscription is canceled and
    /// ended at the event's time.
    Deleted,
}

impl SubscriptionEventType {
    /// Returns the event's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "customer.subscription.created",
            Self::Updated => "customer.subscription.updated",
            Self::Deleted => "customer.subscription.deleted",
        }
    }
}

/// A price on a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionItem {
    /// Price id (`price_...`).
    pub price: String,
    /// Product id of the price (`prod_...`).
    pub product: String,
}

/// The fields of a subscription that the event builders fill in. The rest
/// of Stripe's subscription object gets the values of a plain monthly
/// subscription charged automatically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Subscription id (`sub_...`).
    pub id: String,
    /// Customer id (`cus_...`).
    pub customer: String,
    /// Stripe's status, such as `active`, `trialing`, `past_due` or `canceled`.
    pub status: String,
    /// Creation time in Unix seconds.
    pub created: i64,
    /// Start of the current billing period in Unix seconds.
    pub current_period_start: i64,
    /// End of the current billing period in Unix seconds.
    pub current_period_end: i64,
    /// Prices on the subscription.
    pub items: Vec<SubscriptionItem>,
    /// The subscription's metadata.
    pub metadata: BTreeMap<String, String>,
    /// True for a live-mode subscription.
    pub livemode: bool,
}

impl Subscription {
    /// Returns an active test-mode subscription of `customer` to one price,
    /// created now with a 30-day period starting now and a random id.
    pub fn new(customer: &str, price: &str, product: &str) -> Self {
        let now = unix_now();
        Self {
            id: random_id("sub_"),
            customer: customer.to_owned(),
            status: "active".to_owned(),
            created: now,
            current_period_start: now,
            current_period_end: now + PERIOD_SECONDS,
            items: vec![SubscriptionItem {
                price: price.to_owned(),
                product: product.to_owned(),
            }],
            metadata: BTreeMap::new(),
            livemode: false,
        }
    }

    /// Returns the subscription as Stripe's `subscription` object.
    ///
    /// `current_period_start` and `current_period_end` are on each item,
    /// where async-stripe 1.0.0-rc.10 reads them, and also at the top level,
    /// where earlier API versions put them.
    pub fn to_json(&self) -> Value {
        let items: Vec<Value> = self.items.iter().map(|item| self.item_json(item)).collect();
        let canceled = self.status == "canceled";
        let ended_at = canceled.then_some(self.current_period_end.min(unix_now()));
        // Three smaller `json!` calls, because one call for the whole object
        // exceeds the macro's recursion limit.
        let identity = json!({
            "id": self.id,
            "object": "subscription",
            "application": null,
            "application_fee_percent": null,
            "automatic_tax": { "disabled_reason": null, "enabled": false, "liability": null },
            "billing_cycle_anchor": self.current_period_start,
            "billing_cycle_anchor_config": null,
            "billing_mode": { "flexible": null, "type": "classic", "updated_at": null },
            "billing_schedules": [],
            "billing_thresholds": null,
            "cancel_at": null,
            "cancel_at_period_end": false,
            "canceled_at": ended_at,
            "cancellation_details": {
                "comment": null,
                "feedback": null,
                "reason": canceled.then_some("cancellation_requested"),
            },
        });
        let billing = json!({
            "collection_method": "charge_automatically",
            "created": self.created,
            "currency": "usd",
            "current_period_end": self.current_period_end,
            "current_period_start": self.current_period_start,
            "customer": self.customer,
            "days_until_due": null,
            "default_payment_method": null,
            "default_source": null,
            "default_tax_rates": [],
            "description": null,
            "discounts": [],
            "ended_at": ended_at,
        });
        let rest = json!({
            "invoice_settings": { "account_tax_ids": null, "issuer": { "type": "self" } },
            "items": {
                "object": "list",
                "data": items,
                "has_more": false,
                "total_count": self.items.len(),
                "url": format!("/v1/subscription_items?subscription={}", self.id),
            },
            "latest_invoice": null,
            "livemode": self.livemode,
            "metadata": self.metadata,
            "next_pending_invoice_item_invoice": null,
            "on_behalf_of": null,
            "pause_collection": null,
            "payment_settings": null,
            "pending_invoice_item_interval": null,
            "pending_setup_intent": null,
            "pending_update": null,
            "schedule": null,
            "start_date": self.created,
            "status": self.status,
            "test_clock": null,
            "transfer_data": null,
            "trial_end": null,
            "trial_settings": { "end_behavior": { "missing_payment_method": "create_invoice" } },
            "trial_start": null,
        });

        let mut object = Map::new();
        for part in [identity, billing, rest] {
            if let Value::Object(fields) = part {
                object.extend(fields);
            }
        }
        Value::Object(object)
    }

    fn item_json(&self, item: &SubscriptionItem) -> Value {
        let recurring = json!({
            "interval": "month",
            "interval_count": 1,
            "meter": null,
            "usage_type": "licensed",
        });
        json!({
            "id": random_id("si_"),
            "object": "subscription_item",
            "billing_thresholds": null,
            "created": self.created,
            "current_period_end": self.current_period_end,
            "current_period_start": self.current_period_start,
            "discounts": [],
            "metadata": {},
            "plan": {
                "id": item.price,
                "object": "plan",
                "active": true,
                "amount": 1000,
                "amount_decimal": "1000",
                "billing_scheme": "per_unit",
                "created": self.created,
                "currency": "usd",
                "interval": "month",
                "interval_count": 1,
                "livemode": self.livemode,
                "metadata": {},
                "meter": null,
                "nickname": null,
                "product": item.product,
                "tiers_mode": null,
                "transform_usage": null,
                "trial_period_days": null,
                "usage_type": "licensed",
            },
            "price": {
                "id": item.price,
                "object": "price",
                "active": true,
                "billing_scheme": "per_unit",
                "created": self.created,
                "currency": "usd",
                "custom_unit_amount": null,
                "livemode": self.livemode,
                "lookup_key": null,
                "metadata": {},
                "nickname": null,
                "product": item.product,
                "recurring": recurring,
                "tax_behavior": "unspecified",
                "tiers_mode": null,
                "transform_quantity": null,
                "type": "recurring",
                "unit_amount": 1000,
                "unit_amount_decimal": "1000",
            },
            "quantity": 1,
            "subscription": self.id,
            "tax_rates": [],
        })
    }
}

/// Returns a `customer.subscription.*` event. A `Deleted` event carries the
/// subscription with status `canceled`. `previous_attributes` becomes
/// `data.previous_attributes`, as in Stripe's `*.updated` events.
pub fn subscription_event(
    event_type: SubscriptionEventType,
    subscription: &Subscription,
    previous_attributes: Option<Value>,
) -> Value {
    let mut subscription = subscription.clone();
    if event_type == SubscriptionEventType::Deleted {
        subscription.status = "canceled".to_owned();
    }
    event_json(
        event_type.as_str(),
        subscription.to_json(),
        previous_attributes,
        subscription.livemode,
    )
}

/// Returns a test-mode `customer.updated` event whose customer has `id` and
/// `metadata`. Pass the changed fields' old values as
/// `previous_attributes`, such as `{"metadata": {"tier": "basic"}}`.
pub fn customer_updated_event(
    id: &str,
    metadata: &BTreeMap<String, String>,
    previous_attributes: Option<Value>,
) -> Value {
    let customer = customer_json(id, unix_now(), false, metadata, CustomerDetails::default());
    event_json("customer.updated", customer, previous_attributes, false)
}

fn event_json(
    event_type: &str,
    object: Value,
    previous_attributes: Option<Value>,
    livemode: bool,
) -> Value {
    let mut data = Map::new();
    data.insert("object".to_owned(), object);
    if let Some(previous) = previous_attributes {
        data.insert("previous_attributes".to_owned(), previous);
    }
    json!({
        "id": random_id("evt_"),
        "object": "event",
        "api_version": API_VERSION,
        "created": unix_now(),
        "data": data,
        "livemode": livemode,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": event_type,
    })
}

/// POSTs `body` to `url` with `Content-Type: application/json` and
/// `Stripe-Signature: <signature>`, as Stripe delivers an event, and
/// returns the response status.
///
/// # Errors
///
/// [`HarnessError::Request`] when `url` or `signature` is invalid, or the
/// request fails or takes more than 10 seconds.
pub async fn deliver(url: &str, body: &str, signature: &str) -> Result<u16, HarnessError> {
    let request_error = |reason: String| HarnessError::Request {
        target: url.to_owned(),
        reason,
    };
    let signature = HeaderValue::from_str(signature).map_err(|_| {
        request_error(format!(
            "invalid Stripe-Signature value '{signature}': use the output of webhook::sign"
        ))
    })?;
    let request = hyper::Request::post(url)
        .header(CONTENT_TYPE, "application/json; charset=utf-8")
        .header(USER_AGENT, "Stripe/1.0 (+https://stripe.com/docs/webhooks)")
        .header("stripe-signature", signature)
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .map_err(|err| request_error(format!("invalid request: {err}")))?;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|err| request_error(crate::error::chain(&err)))?;
        let status = response.status().as_u16();
        response
            .into_body()
            .collect()
            .await
            .map_err(|err| request_error(format!("failed to read the response body: {err}")))?;
        Ok(status)
    };
    tokio::time::timeout(DELIVERY_TIMEOUT, exchange)
        .await
        .map_err(|_| request_error(format!("no response after {}s", DELIVERY_TIMEOUT.as_secs())))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_matches_known_vector() {
        // Computed independently with
        // `printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test`.
        let header = sign("{}", "whsec_test", 1_700_000_000);
        assert_eq!(
            header,
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }

    #[test]
    fn sign_with_secrets_lists_each_secret_then_v0() {
        let header = sign_with_secrets("{}", &["a", "b"], 5);
        let entries: Vec<&str> = header.split(',').collect();
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0], "t=5");
        assert_eq!(entries[1], format!("v1={}", signature("{}", "a", 5)));
        assert_eq!(entries[2], format!("v1={}", signature("{}", "b", 5)));
        assert!(entries[3].starts_with("v0="));
    }

    #[test]
    fn deleted_event_cancels_subscription() {
        let subscription = Subscription::new("cus_1", "price_1", "prod_1");
        let event = subscription_event(SubscriptionEventType::Deleted, &subscription, None);
        assert_eq!(event["type"], "customer.subscription.deleted");
        assert_eq!(event["data"]["object"]["status"], "canceled");
        assert!(event["data"]["object"]["ended_at"].is_i64());
        assert!(event["data"].get("previous_attributes").is_none());
    }

    #[test]
    fn updated_event_carries_previous_attributes() {
        let subscription = Subscription::new("cus_1", "price_2", "prod_2");
        let previous = json!({ "items": { "data": [{ "price": { "id": "price_1" } }] } });
        let event = subscription_event(
            SubscriptionEventType::Updated,
            &subscription,
            Some(previous.clone()),
        );
        assert_eq!(event["data"]["previous_attributes"], previous);
        let item = &event["data"]["object"]["items"]["data"][0];
        assert_eq!(item["price"]["id"], "price_2");
        assert_eq!(item["price"]["product"], "prod_2");
    }
}
