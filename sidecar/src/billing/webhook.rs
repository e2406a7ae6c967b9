//! Stripe webhook endpoint: verifies the signature of each delivery,
//! applies subscription and customer events to the tier of each Stripe
//! customer, and writes the tier back to the customer's metadata in Stripe.
//!
//! A delivery is recorded by event id in the same SQLite transaction as the
//! change it makes, so a replay or a concurrent second delivery of one event
//! is applied once. An event older than the stored state never replaces it.

mod event;
mod metadata;
mod signature;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::store::Store;
use event::{Change, CustomerChange, MetadataTier, ParsedEvent, Rank, SubscriptionEffect};
pub use signature::RejectReason;
use state::{Delivery, MappingOutcome, Recorded, SubscriptionSource, TierOutcome, TierUpdate};
pub use state::{SCHEMA, named_tier_overrides, tier_overrides};

/// Default of [`WebhookSettings::tolerance`].
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Default of [`WebhookSettings::canceled_tier`].
pub const DEFAULT_CANCELED_TIER: &str = "basic";

/// Minimum time between two warnings about rejections of one reason; the
/// others are logged at debug.
const REJECT_LOG_INTERVAL_S: i64 = 10;

/// Minimum time between two prunes of old processed event ids.
const PRUNE_INTERVAL_S: i64 = 3_600;

/// Maximum number of distinct values (unmapped prices, unknown tiers)
/// remembered so that each is logged once.
const MAX_LOGGED_VALUES: usize = 1_024;

/// Settings of the webhook endpoint.
#[derive(Clone)]
pub struct WebhookSettings {
    /// Endpoint signing secrets (`whsec_…`): one, or two while a secret is
    /// rotated. A delivery is accepted when it is signed with any of them.
    pub secrets: Vec<String>,
    /// Maximum difference between the signature's timestamp and now, in
    /// either direction.
    pub tolerance: Duration,
    /// Tier of each Stripe price id or product id.
    pub price_tiers: BTreeMap<String, String>,
    /// Tier after a subscription is deleted, canceled, unpaid or expired.
    pub canceled_tier: String,
    /// Tier names the filters configure; `metadata.tier` of a customer is
    /// applied only when it is one of them.
    pub known_tiers: Vec<String>,
}

impl Default for WebhookSettings {
    /// No secrets, which rejects every delivery, the default tolerance and
    /// canceled tier, and no price or known tiers.
    fn default() -> Self {
        WebhookSettings {
            secrets: Vec::new(),
            tolerance: DEFAULT_TOLERANCE,
            price_tiers: BTreeMap::new(),
            canceled_tier: DEFAULT_CANCELED_TIER.to_owned(),
            known_tiers: Vec::new(),
        }
    }
}

impl fmt::Debug for WebhookSettings {
    /// Formats the settings with the number of secrets in place of them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("tolerance", &self.tolerance)
            .field("price_tiers", &self.price_tiers)
            .field("canceled_tier", &self.canceled_tier)
            .field("known_tiers", &self.known_tiers)
            .finish()
    }
}

/// Handler of Stripe webhook deliveries; clones share the same state.
#[derive(Clone)]
pub struct WebhookHandler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    settings: WebhookSettings,
    stripe: Option<stripe::Client>,
    /// Notified after each committed change of `tier_overrides`.
    changed: Arc<Notify>,
    /// Audit log of tier changes; none in tests of the webhook alone.
    privacy: Option<crate::privacy::Privacy>,
    /// Notified after each committed tier change, to wake the metadata
    /// writer.
    metadata_wake: Notify,
    /// Rejections per [`RejectReason::index`].
    rejected: [AtomicU64; RejectReason::ALL.len()],
    /// Time of the last warning per [`RejectReason::index`], in Unix seconds.
    last_reject_warning_unix_s: [AtomicI64; RejectReason::ALL.len()],
    last_prune_unix_s: AtomicI64,
    logged_values: Mutex<HashSet<String>>,
}

impl fmt::Debug for WebhookHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookHandler")
            .field("settings", &self.inner.settings)
            .field("stripe", &self.inner.stripe.is_some())
            .finish_non_exhaustive()
    }
}

impl WebhookHandler {
    /// Creates a handler that records deliveries in `store`, which must
    /// contain [`SCHEMA`] and the `stripe_customer` table. `changed` is
    /// notified after each committed change of [`tier_overrides`]. Without
    /// `stripe`, tier metadata is not written to Stripe.
    pub fn new(
        store: Store,
        settings: WebhookSettings,
        stripe: Option<stripe::Client>,
        changed: Arc<Notify>,
        privacy: Option<crate::privacy::Privacy>,
    ) -> Self {
        warn_about_settings(&settings);
        WebhookHandler {
            inner: Arc::new(Inner {
                store,
                settings,
                stripe,
                changed,
                privacy,
                metadata_wake: Notify::new(),
                rejected: std::array::from_fn(|_| AtomicU64::new(0)),
                last_reject_warning_unix_s: std::array::from_fn(|_| AtomicI64::new(i64::MIN)),
                last_prune_unix_s: AtomicI64::new(i64::MIN),
                logged_values: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Verifies and applies one delivery; returns the HTTP status and a
    /// short JSON body.
    ///
    /// - 200 `{"status": …}`: `applied`, `unchanged` (same tier), `stale`
    ///   (older than the stored state), `duplicate` (event id seen before)
    ///   or `ignored` (an event type or object that does not affect tiers).
    ///   Stripe does not retry these.
    /// - 400 `{"error": …}`: the signature or the payload is invalid; see
    ///   [`RejectReason`].
    /// - 500: the store failed or no secret is configured, so Stripe
    ///   retries the delivery later.
    ///
    /// `body` must be the raw request body, because the signature covers
    /// its exact bytes. The caller limits its size and replies to a larger
    /// one with [`WebhookHandler::reject_too_large`].
    pub async fn handle(&self, headers: &HeaderMap, body: &[u8]) -> WebhookReply {
        let settings = &self.inner.settings;
        if settings.secrets.is_empty() {
            warn!(
                "Stripe webhook delivery rejected with 500: no signing secret; set \
                 STRIPE_WEBHOOK_SECRET or billing.webhook_secrets"
            );
            return reply_error(StatusCode::INTERNAL_SERVER_ERROR, "webhook not configured");
        }

        let now_unix_s = unix_now_s();
        let verified = signature::verify(
            headers,
            body,
            &settings.secrets,
            settings.tolerance,
            now_unix_s,
        );
        if let Err(reason) = verified {
            self.log_rejection(reason, body, now_unix_s);
            return reply_error(StatusCode::BAD_REQUEST, reason.message());
        }

        let parsed = match event::parse(body, settings) {
            Ok(parsed) => parsed,
            Err(err) => {
                let total = self.count_rejection(RejectReason::InvalidPayload);
                error!(
                    reason = RejectReason::InvalidPayload.as_str(),
                    event_id = ?event::event_id_for_log(body),
                    rejected_total = total,
                    error = %err,
                    "rejected a signed Stripe webhook delivery"
                );
                return reply_error(
                    StatusCode::BAD_REQUEST,
                    RejectReason::InvalidPayload.message(),
                );
            }
        };

        // Stripe signs a delivery after it creates the event, so a genuine
        // event is never created after the signature's accepted window.
        // Such a time would also make every later event look stale.
        let latest_created = now_unix_s.saturating_add_unsigned(settings.tolerance.as_secs());
        if parsed.created_unix_s > latest_created {
            let total = self.count_rejection(RejectReason::InvalidPayload);
            error!(
                reason = RejectReason::InvalidPayload.as_str(),
                event_id = %parsed.id,
                created = parsed.created_unix_s,
                now = now_unix_s,
                rejected_total = total,
                "rejected a signed Stripe webhook delivery: its event was created later than \
                 the signature's accepted time window; check the clock of the sender"
            );
            return reply_error(
                StatusCode::BAD_REQUEST,
                RejectReason::InvalidPayload.message(),
            );
        }

        let Some(delivery) = self.delivery(&parsed, now_unix_s) else {
            return reply_status("ignored");
        };
        let privacy = self.inner.privacy.clone();
        let identities = self.inner.store.identities().clone();
        let recorded = self
            .inner
            .store
            .write("apply a Stripe webhook event", move |conn| {
                state::record_audited(conn, &delivery, privacy.as_ref(), Some(&identities))
            })
            .await;

        match recorded {
            Ok(Recorded::Duplicate) => {
                debug!(event_id = %parsed.id, "Stripe event already processed");
                reply_status("duplicate")
            }
            Ok(Recorded::Applied { tier, mapping }) => {
                let status = self.report(&parsed, tier, mapping);
                reply_status(status)
            }
            Err(err) => {
                error!(
                    event_id = %parsed.id,
                    error = %err,
                    cause = %root_cause(&err),
                    "failed to apply a Stripe webhook event; Stripe will retry it"
                );
                reply_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "store unavailable; retry later",
                )
            }
        }
    }

    /// Counts and logs a delivery whose body was over the size limit and
    /// not read, and returns the 413 reply.
    pub fn reject_too_large(&self) -> WebhookReply {
        let reason = RejectReason::BodyTooLarge;
        self.log_rejection(reason, &[], unix_now_s());
        reply_error(StatusCode::PAYLOAD_TOO_LARGE, reason.message())
    }

    /// Returns the number of deliveries rejected with 400 or 413 since
    /// start.
    pub fn rejected_total(&self) -> u64 {
        self.inner
            .rejected
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .sum()
    }

    /// Returns the number of deliveries rejected for `reason` since start.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.inner.rejected[reason.index()].load(Ordering::Relaxed)
    }

    fn count_rejection(&self, reason: RejectReason) -> u64 {
        self.inner.rejected[reason.index()].fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Counts a rejection and logs it, at warn at most once per reason and
    /// [`REJECT_LOG_INTERVAL_S`], because unauthenticated requests can
    /// repeat it at any rate.
    fn log_rejection(&self, reason: RejectReason, body: &[u8], now_unix_s: i64) {
        let total = self.count_rejection(reason);
        let last = &self.inner.last_reject_warning_unix_s[reason.index()];
        let previous = last.load(Ordering::Relaxed);
        let due = now_unix_s.saturating_sub(previous) >= REJECT_LOG_INTERVAL_S;
        let event_id = event::event_id_for_log(body);

        if due
            && last
                .compare_exchange(previous, now_unix_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                reason = reason.as_str(),
                event_id = ?event_id,
                rejected_total = total,
                "rejected a Stripe webhook delivery"
            );
        } else {
            debug!(
                reason = reason.as_str(),
                event_id = ?event_id,
                rejected_total = total,
                "rejected a Stripe webhook delivery"
            );
        }
    }

    /// Builds what to record for `parsed`, or `None` when the event changes
    /// nothing and needs no record.
    fn delivery(&self, parsed: &ParsedEvent, now_unix_s: i64) -> Option<Delivery> {
        let (tier, mapping) = match &parsed.change {
            Change::Unhandled => {
                debug!(
                    event_id = %parsed.id,
                    event_type = %parsed.event_type,
                    "Stripe event type ignored"
                );
                (None, None)
            }
            Change::Subscription(change) => {
                let tier = match &change.effect {
                    SubscriptionEffect::Tier { tier, rank } => Some(TierUpdate {
                        stripe_customer_id: change.stripe_customer_id.clone(),
                        tier: tier.clone(),
                        event_created_unix_s: parsed.created_unix_s,
                        rank: *rank,
                        subscription: Some(SubscriptionSource {
                            id: change.subscription_id.clone(),
                            created_unix_s: change.subscription_created_unix_s,
                        }),
                    }),
                    SubscriptionEffect::UnmappedPrices { price_ids } => {
                        self.log_unmapped_prices(parsed, &change.subscription_id, price_ids);
                        None
                    }
                    SubscriptionEffect::StatusKept { status } => {
                        info!(
                            event_id = %parsed.id,
                            subscription = %change.subscription_id,
                            status = ?status,
                            "subscription status neither grants nor ends a tier; tier kept"
                        );
                        None
                    }
                };
                (tier, None)
            }
            Change::Customer(change) => self.customer_delivery(parsed, change),
        };
        if tier.is_none() && mapping.is_none() {
            return None;
        }

        Some(Delivery {
            event_id: parsed.id.clone(),
            event_type: parsed.event_type.clone(),
            received_unix_s: now_unix_s,
            tier,
            mapping,
            prune_before_unix_s: self.prune_due(now_unix_s),
        })
    }

    fn customer_delivery(
        &self,
        parsed: &ParsedEvent,
        change: &CustomerChange,
    ) -> (Option<TierUpdate>, Option<(String, String)>) {
        let tier = match &change.tier {
            MetadataTier::Known(tier) => Some(TierUpdate {
                stripe_customer_id: change.stripe_customer_id.clone(),
                tier: tier.clone(),
                event_created_unix_s: parsed.created_unix_s,
                rank: Rank::Override,
                subscription: None,
            }),
            MetadataTier::Unknown(tier) => {
                if self.first_time(format!("tier:{tier}")) {
                    warn!(
                        event_id = %parsed.id,
                        stripe_customer = %change.stripe_customer_id,
                        tier = ?tier,
                        known_tiers = ?self.inner.settings.known_tiers,
                        "customer metadata.tier names no known tier; tier kept"
                    );
                }
                None
            }
            MetadataTier::Absent | MetadataTier::Unchanged | MetadataTier::OwnWrite => None,
        };

        if let Some(invalid) = &change.invalid_customer {
            warn!(
                event_id = %parsed.id,
                stripe_customer = %change.stripe_customer_id,
                veo_customer_id = ?invalid,
                "customer metadata.veo_customer_id is not a valid customer id (1 to 256 bytes, \
                 no control characters); mapping not added"
            );
        }
        let mapping = change
            .customer
            .clone()
            .map(|customer| (customer, change.stripe_customer_id.clone()));
        (tier, mapping)
    }

    fn log_unmapped_prices(&self, parsed: &ParsedEvent, subscription: &str, price_ids: &[String]) {
        // Every price is marked, so that each one is reported once.
        let mut first = false;
        for price in price_ids {
            first |= self.first_time(format!("price:{price}"));
        }
        if first {
            warn!(
                event_id = %parsed.id,
                subscription = %subscription,
                prices = ?price_ids,
                "subscription has no price or product mapped to a tier; tier kept"
            );
        } else {
            debug!(
                event_id = %parsed.id,
                subscription = %subscription,
                "subscription has no price or product mapped to a tier; tier kept"
            );
        }
    }

    /// Returns whether `key` is logged for the first time. Past
    /// [`MAX_LOGGED_VALUES`] keys, new ones count as logged, so an endless
    /// stream of distinct values logs at debug only.
    fn first_time(&self, key: String) -> bool {
        let mut logged = self
            .inner
            .logged_values
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        logged.len() < MAX_LOGGED_VALUES && logged.insert(key)
    }

    /// Returns the cut-off for pruning processed event ids when the last
    /// prune is [`PRUNE_INTERVAL_S`] ago.
    fn prune_due(&self, now_unix_s: i64) -> Option<i64> {
        let last = &self.inner.last_prune_unix_s;
        let previous = last.load(Ordering::Relaxed);
        let due = now_unix_s.saturating_sub(previous) >= PRUNE_INTERVAL_S;
        let claimed = due
            && last
                .compare_exchange(previous, now_unix_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        claimed.then(|| now_unix_s.saturating_sub(state::EVENT_RETENTION_S))
    }

    /// Logs the outcome of a committed delivery, wakes the tasks waiting on
    /// it, and returns the status for the response.
    fn report(
        &self,
        parsed: &ParsedEvent,
        tier: TierOutcome,
        mapping: MappingOutcome,
    ) -> &'static str {
        let mut overrides_changed = false;
        let status = match tier {
            TierOutcome::Changed { tier, version } => {
                info!(
                    event_id = %parsed.id,
                    event_type = %parsed.event_type,
                    tier = %tier,
                    version,
                    "customer tier changed"
                );
                overrides_changed = true;
                self.inner.metadata_wake.notify_one();
                "applied"
            }
            TierOutcome::Unchanged => "unchanged",
            TierOutcome::Stale => {
                info!(
                    event_id = %parsed.id,
                    event_type = %parsed.event_type,
                    "Stripe event older than the stored tier state; tier kept"
                );
                "stale"
            }
            TierOutcome::None if mapping == MappingOutcome::Inserted => "applied",
            TierOutcome::None => "unchanged",
        };

        match mapping {
            MappingOutcome::Inserted => {
                info!(event_id = %parsed.id, "Stripe customer mapped to our customer id");
                overrides_changed = true;
            }
            MappingOutcome::CustomerTaken => warn!(
                event_id = %parsed.id,
                "metadata.veo_customer_id is already mapped to another Stripe customer; \
                 mapping kept"
            ),
            MappingOutcome::StripeCustomerTaken => warn!(
                event_id = %parsed.id,
                "the Stripe customer already bills another customer, so its \
                 metadata.veo_customer_id is ignored; one Stripe customer bills one customer, \
                 so give that customer a Stripe customer of its own"
            ),
            MappingOutcome::Erased => warn!(
                event_id = %parsed.id,
                "metadata.veo_customer_id names an erased customer; mapping not stored"
            ),
            MappingOutcome::Exists | MappingOutcome::None => {}
        }

        if overrides_changed {
            // notify_waiters wakes every current waiter, and notify_one keeps
            // a permit for a waiter that is between two waits.
            self.inner.changed.notify_waiters();
            self.inner.changed.notify_one();
        }
        status
    }
}

/// Warns about settings that make the endpoint reject or ignore events.
fn warn_about_settings(settings: &WebhookSettings) {
    if settings.secrets.is_empty() {
        warn!(
            "no Stripe webhook signing secret; webhook deliveries get 500 until \
             STRIPE_WEBHOOK_SECRET or billing.webhook_secrets is set"
        );
    }
    if settings.known_tiers.is_empty() {
        return;
    }
    for (price, tier) in &settings.price_tiers {
        if !settings.known_tiers.contains(tier) {
            warn!(
                price = %price,
                tier = %tier,
                "Stripe price mapped to a tier no filter configures"
            );
        }
    }
    if !settings.known_tiers.contains(&settings.canceled_tier) {
        warn!(
            tier = %settings.canceled_tier,
            "canceled tier is not a tier any filter configures"
        );
    }
}

/// The reply to a delivery and its outcome for the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookReply {
    /// HTTP status.
    pub status: StatusCode,
    /// JSON body.
    pub body: String,
    /// Outcome label of `veo_webhook_deliveries_total`: the `status` of a
    /// 200 reply (such as `applied` or `duplicate`), `rejected` for a
    /// 4xx reply and `failed` otherwise.
    pub outcome: &'static str,
}

fn reply_status(status: &'static str) -> WebhookReply {
    WebhookReply {
        status: StatusCode::OK,
        body: serde_json::json!({ "status": status }).to_string(),
        outcome: status,
    }
}

impl WebhookReply {
    /// Builds a reply with status `code` and the JSON body
    /// `{"error": message}`.
    pub fn error(code: StatusCode, message: &str) -> Self {
        reply_error(code, message)
    }
}

fn reply_error(code: StatusCode, message: &str) -> WebhookReply {
    WebhookReply {
        status: code,
        body: serde_json::json!({ "error": message }).to_string(),
        outcome: if code.is_client_error() {
            "rejected"
        } else {
            "failed"
        },
    }
}

fn unix_now_s() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
}

fn unix_now_ms() -> i64 {
    let elapsed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
}

fn root_cause(err: &dyn std::error::Error) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}
