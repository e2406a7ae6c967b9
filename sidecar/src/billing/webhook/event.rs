//! Decoding of a verified delivery into the tier change it requests.
//!
//! Stripe renders a webhook payload in the API version of the account (or
//! the one pinned on the endpoint), which need not match the version the
//! async-stripe types were generated for. A field added, renamed or made
//! nullable in another version would make those types fail on events this
//! endpoint does not even use. So the payload is read with serde_json into
//! the minimal structs below, which hold only the fields the endpoint uses
//! and ignore the rest.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::WebhookSettings;

/// Prefix of the idempotency keys of our own metadata writes, which lets
/// the endpoint recognise the `customer.updated` events they cause.
pub(super) const OWN_WRITE_KEY_PREFIX: &str = "veo-tier-";

/// Metadata key that carries the tier on a Stripe customer.
pub(super) const TIER_METADATA_KEY: &str = "tier";

/// Metadata key that carries our customer id on a Stripe customer.
pub(super) const CUSTOMER_METADATA_KEY: &str = "veo_customer_id";

/// Maximum length of our customer id, as for identifiers in sync batches.
const MAX_CUSTOMER_ID_BYTES: usize = 256;

/// Maximum length accepted for a Stripe object id.
const MAX_STRIPE_ID_BYTES: usize = 255;

/// Errors of a payload that passed the signature check.
#[derive(Debug, thiserror::Error)]
pub(super) enum PayloadError {
    /// The body is not JSON of an event.
    #[error("event is not valid JSON of a Stripe event: {0}")]
    Event(#[source] serde_json::Error),
    /// `data.object` does not have the fields of the object the event type
    /// names.
    #[error("data.object of event {event_id} ({event_type}) is not a valid {object}: {source}")]
    Object {
        /// Id of the event.
        event_id: String,
        /// Type of the event.
        event_type: String,
        /// Object the event type carries, such as "subscription".
        object: &'static str,
        /// Cause reported by serde_json.
        #[source]
        source: serde_json::Error,
    },
    /// An id is empty, too long or contains characters Stripe ids do not
    /// use.
    #[error("{field} {value:?} is not a Stripe id (ASCII letters, digits and '_', 1 to 255 bytes)")]
    InvalidId {
        /// Field that contains the id, such as "data.object.customer".
        field: &'static str,
        /// The value, for the log line.
        value: String,
    },
}

/// A verified event, with the change it requests.
#[derive(Debug)]
pub(super) struct ParsedEvent {
    /// Event id, `evt_…`.
    pub id: String,
    /// Event type, such as `customer.subscription.updated`.
    pub event_type: String,
    /// Time Stripe created the event, in Unix seconds.
    pub created_unix_s: i64,
    pub change: Change,
}

/// Change an event requests of the tier state.
#[derive(Debug)]
pub(super) enum Change {
    /// The event type does not affect tiers.
    Unhandled,
    /// A `customer.subscription.*` event.
    Subscription(SubscriptionChange),
    /// A `customer.created` or `customer.updated` event.
    Customer(CustomerChange),
}

/// Change requested by a subscription event.
#[derive(Debug)]
pub(super) struct SubscriptionChange {
    pub stripe_customer_id: String,
    pub subscription_id: String,
    /// Creation time of the subscription, in Unix seconds.
    pub subscription_created_unix_s: i64,
    pub effect: SubscriptionEffect,
}

/// Effect of a subscription event on the customer's tier.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SubscriptionEffect {
    /// Set `tier`, ordered by `rank` against events of the same second.
    Tier { tier: String, rank: Rank },
    /// No item has a mapped price or product, so the subscription is not
    /// one of ours and the state stays.
    UnmappedPrices { price_ids: Vec<String> },
    /// A status that neither grants nor ends a tier, such as `incomplete`
    /// or `paused`; the state stays.
    StatusKept { status: String },
}

/// Change requested by a customer event.
#[derive(Debug)]
pub(super) struct CustomerChange {
    pub stripe_customer_id: String,
    pub tier: MetadataTier,
    /// `metadata.veo_customer_id`, when set and valid.
    pub customer: Option<String>,
    /// `metadata.veo_customer_id` when set but not a valid customer id.
    pub invalid_customer: Option<String>,
}

/// Meaning of `metadata.tier` of a customer event for the tier.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MetadataTier {
    /// No `tier` key.
    Absent,
    /// The update did not change `metadata.tier`, so the value is not a new
    /// decision and may predate a newer subscription event.
    Unchanged,
    /// The update is our own metadata write, which only echoes our state.
    OwnWrite,
    /// A value that is not a known tier.
    Unknown(String),
    /// A known tier set by an operator: an override.
    Known(String),
}

/// Order of states set in the same second; a higher rank wins a tie.
///
/// A subscription ends after it ran, so an ended status beats a live one of
/// the same second, and the deletion beats both. An operator's override in
/// the same second as a routine subscription update is taken as the later
/// decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Rank {
    /// `active`, `trialing` or `past_due`.
    Live = 0,
    /// `metadata.tier` set on the customer.
    Override = 1,
    /// `canceled`, `unpaid` or `incomplete_expired`.
    Ended = 2,
    /// `customer.subscription.deleted`.
    Deleted = 3,
}

impl Rank {
    /// Value stored in the database.
    pub(super) fn to_sql(self) -> i64 {
        self as i64
    }
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: i64,
    data: EventData,
    /// `{ "id": …, "idempotency_key": … }`, or the bare request id in API
    /// versions before 2017-05-25 (Stripe changelog of that version).
    #[serde(default)]
    request: serde_json::Value,
}

#[derive(Deserialize)]
struct EventData {
    object: serde_json::Value,
    #[serde(default)]
    previous_attributes: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Subscription {
    id: String,
    customer: Expandable,
    status: String,
    created: i64,
    #[serde(default)]
    items: Option<SubscriptionItems>,
}

#[derive(Deserialize)]
struct SubscriptionItems {
    #[serde(default)]
    data: Vec<SubscriptionItem>,
}

#[derive(Deserialize)]
struct SubscriptionItem {
    #[serde(default)]
    price: Option<Price>,
}

#[derive(Deserialize)]
struct Price {
    id: String,
    #[serde(default)]
    product: Option<Expandable>,
}

/// A related object, sent as its id or, when expanded, as the object.
#[derive(Deserialize)]
#[serde(untagged)]
enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    fn id(&self) -> &str {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

#[derive(Deserialize)]
struct Customer {
    id: String,
    #[serde(default)]
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct EventId {
    id: String,
}

/// Returns the event id of `body` when it has one that looks like a Stripe
/// id, for log lines about deliveries that failed verification.
pub(super) fn event_id_for_log(body: &[u8]) -> Option<String> {
    let event: EventId = serde_json::from_slice(body).ok()?;
    is_stripe_id(&event.id).then_some(event.id)
}

/// Parses a verified body and decides the change it requests under
/// `settings`.
pub(super) fn parse(body: &[u8], settings: &WebhookSettings) -> Result<ParsedEvent, PayloadError> {
    let event: Event = serde_json::from_slice(body).map_err(PayloadError::Event)?;
    check_id("id", &event.id)?;

    let change = match event.event_type.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" => {
            let subscription = subscription(&event)?;
            Change::Subscription(subscription_change(subscription, false, settings)?)
        }
        "customer.subscription.deleted" => {
            let subscription = subscription(&event)?;
            Change::Subscription(subscription_change(subscription, true, settings)?)
        }
        "customer.created" | "customer.updated" => {
            let customer: Customer = object(&event, "customer")?;
            Change::Customer(customer_change(customer, &event, settings)?)
        }
        _ => Change::Unhandled,
    };

    Ok(ParsedEvent {
        id: event.id,
        event_type: event.event_type,
        created_unix_s: event.created,
        change,
    })
}

fn subscription(event: &Event) -> Result<Subscription, PayloadError> {
    object(event, "subscription")
}

fn object<T: serde::de::DeserializeOwned>(
    event: &Event,
    object: &'static str,
) -> Result<T, PayloadError> {
    T::deserialize(&event.data.object).map_err(|source| PayloadError::Object {
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        object,
        source,
    })
}

fn subscription_change(
    subscription: Subscription,
    deleted: bool,
    settings: &WebhookSettings,
) -> Result<SubscriptionChange, PayloadError> {
    let stripe_customer_id = subscription.customer.id().to_owned();
    check_id("data.object.customer", &stripe_customer_id)?;
    check_id("data.object.id", &subscription.id)?;

    let effect = match mapped_tier(&subscription, settings) {
        Err(price_ids) => SubscriptionEffect::UnmappedPrices { price_ids },
        Ok(_) if deleted => SubscriptionEffect::Tier {
            tier: settings.canceled_tier.clone(),
            rank: Rank::Deleted,
        },
        Ok(tier) => match subscription.status.as_str() {
            "active" | "trialing" | "past_due" => SubscriptionEffect::Tier {
                tier,
                rank: Rank::Live,
            },
            "canceled" | "unpaid" | "incomplete_expired" => SubscriptionEffect::Tier {
                tier: settings.canceled_tier.clone(),
                rank: Rank::Ended,
            },
            _ => SubscriptionEffect::StatusKept {
                status: subscription.status.clone(),
            },
        },
    };

    Ok(SubscriptionChange {
        stripe_customer_id,
        subscription_id: subscription.id,
        subscription_created_unix_s: subscription.created,
        effect,
    })
}

/// Returns the tier of the first item whose price id or product id is
/// mapped, or the price ids of all items when none is.
fn mapped_tier(
    subscription: &Subscription,
    settings: &WebhookSettings,
) -> Result<String, Vec<String>> {
    let prices = subscription
        .items
        .iter()
        .flat_map(|items| items.data.iter())
        .filter_map(|item| item.price.as_ref());

    let mut price_ids = Vec::new();
    for price in prices {
        if let Some(tier) = settings.price_tiers.get(&price.id) {
            return Ok(tier.clone());
        }
        let product = price.product.as_ref().map(Expandable::id);
        if let Some(tier) = product.and_then(|id| settings.price_tiers.get(id)) {
            return Ok(tier.clone());
        }
        price_ids.push(price.id.clone());
    }
    Err(price_ids)
}

fn customer_change(
    customer: Customer,
    event: &Event,
    settings: &WebhookSettings,
) -> Result<CustomerChange, PayloadError> {
    check_id("data.object.id", &customer.id)?;
    let metadata = customer.metadata.unwrap_or_default();

    let tier = match metadata.get(TIER_METADATA_KEY) {
        None => MetadataTier::Absent,
        Some(_) if is_own_write(event) => MetadataTier::OwnWrite,
        Some(_) if !tier_may_have_changed(event) => MetadataTier::Unchanged,
        Some(tier) if settings.known_tiers.contains(tier) => MetadataTier::Known(tier.clone()),
        Some(tier) => MetadataTier::Unknown(tier.clone()),
    };

    let (customer_id, invalid_customer) = match metadata.get(CUSTOMER_METADATA_KEY) {
        None => (None, None),
        Some(id) if is_customer_id(id) => (Some(id.clone()), None),
        Some(id) => (None, Some(id.clone())),
    };

    Ok(CustomerChange {
        stripe_customer_id: customer.id,
        tier,
        customer: customer_id,
        invalid_customer,
    })
}

/// Returns whether the event comes from an API request that carried one of our own
/// idempotency keys, that is from the metadata writer.
fn is_own_write(event: &Event) -> bool {
    event
        .request
        .get("idempotency_key")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|key| key.starts_with(OWN_WRITE_KEY_PREFIX))
}

/// Returns whether the event may have set `metadata.tier`. A `*.updated` event lists
/// the previous value of every changed key in `previous_attributes`, with
/// `null` for an added key, so an update without `metadata.tier` there left
/// the tier as it was. Events without `previous_attributes` (creations)
/// count as setting it.
fn tier_may_have_changed(event: &Event) -> bool {
    match &event.data.previous_attributes {
        None => true,
        Some(previous) => previous
            .get("metadata")
            .and_then(serde_json::Value::as_object)
            .is_some_and(|metadata| metadata.contains_key(TIER_METADATA_KEY)),
    }
}

fn check_id(field: &'static str, value: &str) -> Result<(), PayloadError> {
    if is_stripe_id(value) {
        return Ok(());
    }
    Err(PayloadError::InvalidId {
        field,
        value: value.chars().take(MAX_STRIPE_ID_BYTES).collect(),
    })
}

/// Returns whether `value` has the form of a Stripe id. The customer id goes into
/// the path of the metadata request, so it must not contain `/` or `?`.
fn is_stripe_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_STRIPE_ID_BYTES
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_')
}

/// Returns whether `value` is a valid customer id: 1 to 256 bytes without control
/// characters, the rule sync batches follow.
fn is_customer_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_CUSTOMER_ID_BYTES
        && !value.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn settings() -> WebhookSettings {
        WebhookSettings {
            secrets: vec!["whsec_test".into()],
            price_tiers: BTreeMap::from([
                ("price_pro".into(), "pro".into()),
                ("prod_enterprise".into(), "enterprise".into()),
            ]),
            known_tiers: vec!["basic".into(), "pro".into(), "enterprise".into()],
            ..WebhookSettings::default()
        }
    }

    fn subscription_event(event_type: &str, status: &str, items: serde_json::Value) -> Vec<u8> {
        json!({
            "id": "evt_1",
            "type": event_type,
            "created": 100,
            "data": {"object": {
                "id": "sub_1",
                "object": "subscription",
                "customer": "cus_1",
                "status": status,
                "created": 50,
                "items": {"object": "list", "data": items},
            }},
        })
        .to_string()
        .into_bytes()
    }

    fn effect(body: &[u8]) -> SubscriptionEffect {
        match parse(body, &settings()).unwrap().change {
            Change::Subscription(change) => change.effect,
            other => panic!("expected a subscription change, got {other:?}"),
        }
    }

    fn price(id: &str, product: serde_json::Value) -> serde_json::Value {
        json!({"price": {"id": id, "product": product}})
    }

    #[test]
    fn live_statuses_keep_mapped_tier() {
        for status in ["active", "trialing", "past_due"] {
            let body = subscription_event(
                "customer.subscription.updated",
                status,
                json!([price("price_pro", json!("prod_x"))]),
            );

            assert_eq!(
                effect(&body),
                SubscriptionEffect::Tier {
                    tier: "pro".into(),
                    rank: Rank::Live
                },
                "{status}"
            );
        }
    }

    #[test]
    fn ended_statuses_give_canceled_tier() {
        for status in ["canceled", "unpaid", "incomplete_expired"] {
            let body = subscription_event(
                "customer.subscription.updated",
                status,
                json!([price("price_pro", json!("prod_x"))]),
            );

            assert_eq!(
                effect(&body),
                SubscriptionEffect::Tier {
                    tier: "basic".into(),
                    rank: Rank::Ended
                },
                "{status}"
            );
        }
    }

    #[test]
    fn other_statuses_keep_state() {
        let body = subscription_event(
            "customer.subscription.created",
            "incomplete",
            json!([price("price_pro", json!("prod_x"))]),
        );

        assert_eq!(
            effect(&body),
            SubscriptionEffect::StatusKept {
                status: "incomplete".into()
            }
        );
    }

    #[test]
    fn deletion_gives_canceled_tier() {
        let body = subscription_event(
            "customer.subscription.deleted",
            "canceled",
            json!([price("price_pro", json!("prod_x"))]),
        );

        assert_eq!(
            effect(&body),
            SubscriptionEffect::Tier {
                tier: "basic".into(),
                rank: Rank::Deleted
            }
        );
    }

    #[test]
    fn first_mapped_item_wins() {
        let body = subscription_event(
            "customer.subscription.created",
            "active",
            json!([
                price("price_other", json!("prod_other")),
                price(
                    "price_x",
                    json!({"id": "prod_enterprise", "object": "product"})
                ),
                price("price_pro", json!("prod_x")),
            ]),
        );

        assert_eq!(
            effect(&body),
            SubscriptionEffect::Tier {
                tier: "enterprise".into(),
                rank: Rank::Live
            }
        );
    }

    #[test]
    fn unmapped_prices_are_listed() {
        let body = subscription_event(
            "customer.subscription.created",
            "active",
            json!([price("price_a", json!("prod_a")), {"price": null}]),
        );

        assert_eq!(
            effect(&body),
            SubscriptionEffect::UnmappedPrices {
                price_ids: vec!["price_a".into()]
            }
        );
    }

    #[test]
    fn expanded_customer_is_read() {
        let body = json!({
            "id": "evt_1", "type": "customer.subscription.created", "created": 1,
            "data": {"object": {
                "id": "sub_1", "customer": {"id": "cus_9", "object": "customer"},
                "status": "active", "created": 1, "items": {"data": []},
            }},
        })
        .to_string();

        let Change::Subscription(change) = parse(body.as_bytes(), &settings()).unwrap().change
        else {
            panic!("expected a subscription change");
        };

        assert_eq!(change.stripe_customer_id, "cus_9");
    }

    #[test]
    fn unhandled_type_needs_no_object_fields() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{}}}"#;

        let parsed = parse(body, &settings()).unwrap();

        assert!(matches!(parsed.change, Change::Unhandled));
    }

    #[test]
    fn invalid_payloads_are_errors() {
        let cases: [&[u8]; 5] = [
            b"not json",
            br#"{"type":"customer.updated","created":1,"data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"customer.updated","created":1,"data":{"object":{}}}"#,
            br#"{"id":"evt/1","type":"invoice.paid","created":1,"data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"customer.updated","created":1,
                "data":{"object":{"id":"cus_1/x"}}}"#,
        ];

        for body in cases {
            assert!(
                parse(body, &settings()).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    fn customer_event(
        metadata: serde_json::Value,
        previous: Option<serde_json::Value>,
        idempotency_key: Option<&str>,
    ) -> CustomerChange {
        let mut data =
            json!({"object": {"id": "cus_1", "object": "customer", "metadata": metadata}});
        if let Some(previous) = previous {
            data["previous_attributes"] = previous;
        }
        let body = json!({
            "id": "evt_1", "type": "customer.updated", "created": 1, "data": data,
            "request": {"id": "req_1", "idempotency_key": idempotency_key},
        })
        .to_string();
        match parse(body.as_bytes(), &settings()).unwrap().change {
            Change::Customer(change) => change,
            other => panic!("expected a customer change, got {other:?}"),
        }
    }

    #[test]
    fn customer_metadata_tier_is_read() {
        let cases = [
            (json!({}), None, None, MetadataTier::Absent),
            (
                json!({"tier": "pro"}),
                None,
                None,
                MetadataTier::Known("pro".into()),
            ),
            (
                json!({"tier": "gold"}),
                None,
                None,
                MetadataTier::Unknown("gold".into()),
            ),
            (
                json!({"tier": "pro"}),
                Some(json!({"metadata": {"tier": null}})),
                None,
                MetadataTier::Known("pro".into()),
            ),
            (
                json!({"tier": "pro"}),
                Some(json!({"email": "old@example.com"})),
                None,
                MetadataTier::Unchanged,
            ),
            (
                json!({"tier": "pro"}),
                Some(json!({"metadata": {"veo_customer_id": null}})),
                None,
                MetadataTier::Unchanged,
            ),
            (
                json!({"tier": "pro"}),
                Some(json!({"metadata": {"tier": "basic"}})),
                Some("veo-tier-abc"),
                MetadataTier::OwnWrite,
            ),
            (
                json!({"tier": "pro"}),
                None,
                Some("dashboard-key"),
                MetadataTier::Known("pro".into()),
            ),
        ];

        for (metadata, previous, key, expected) in cases {
            let change = customer_event(metadata.clone(), previous.clone(), key);

            assert_eq!(change.tier, expected, "{metadata} {previous:?} {key:?}");
        }
    }

    #[test]
    fn customer_id_metadata_is_checked() {
        let valid = customer_event(json!({"veo_customer_id": "acme"}), None, None);
        let invalid = customer_event(json!({"veo_customer_id": "a\nb"}), None, None);

        assert_eq!(valid.customer.as_deref(), Some("acme"));
        assert_eq!(invalid.customer, None);
        assert_eq!(invalid.invalid_customer.as_deref(), Some("a\nb"));
    }

    #[test]
    fn old_request_form_is_accepted() {
        let body = br#"{"id":"evt_1","type":"customer.updated","created":1,
            "request":"req_1","data":{"object":{"id":"cus_1","metadata":{"tier":"pro"}}}}"#;

        let Change::Customer(change) = parse(body, &settings()).unwrap().change else {
            panic!("expected a customer change");
        };

        assert_eq!(change.tier, MetadataTier::Known("pro".into()));
    }

    #[test]
    fn event_id_for_log_skips_odd_ids() {
        assert_eq!(
            event_id_for_log(br#"{"id":"evt_1"}"#).as_deref(),
            Some("evt_1")
        );
        assert_eq!(event_id_for_log(b"{\"id\":\"evt\\n1\"}"), None);
        assert_eq!(event_id_for_log(b"nope"), None);
    }
}
