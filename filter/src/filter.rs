//! The HTTP filter role. Per request it reads the bearer token, finds it
//! in the verified-token cache or verifies it, rejects erased customers,
//! applies the customer's tier override, geo-fences region-locked assets,
//! and rate-limits the customer in shared data. Then it replies 401, 451 or
//! 429, or passes the request upstream with the customer and tier headers
//! set from the verified claims, and counts the response body bytes.

pub mod erasure;
pub mod geo;
pub mod stream;

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::config::tier::FailurePolicy;
use crate::config::{Config, Tiers};
use crate::geo::AssetTable;
use crate::host::{Host, LogLevel};
use crate::jwt::{AuthError, bearer_token};
use crate::limiter::{Admission, Limiter};
use crate::metrics::{Counter, Metrics};
use crate::response::{self, LocalReply};
use crate::sync::{
    ErasureTable, OVERRIDES_KEY, OverrideTable, STATE_KEY, TIERS_KEY, decode_overrides,
    decode_pushed_tiers,
};
use crate::token_cache::{CacheLevel, CachedToken, TokenCache};
use crate::usage::queue::Delivery;
use crate::usage::{self, EgressMeter, UsageMessage, UsageQueue};
use geo::Fence;
pub use stream::{RequestEgress, Stream};

/// Header the upstream reads the customer id from.
pub const CUSTOMER_HEADER: &str = "x-veo-customer";
/// Header the upstream reads the tier from.
pub const TIER_HEADER: &str = "x-veo-tier";

/// Minimum time between two warnings of the same kind, in milliseconds.
const WARNING_INTERVAL_MS: u64 = 10_000;

/// Next step of the HTTP context after the request headers.
#[derive(Debug, Clone)]
pub enum RequestOutcome {
    /// A local reply was sent; stop the filter chain.
    Replied,
    /// Send the request upstream.
    Forward {
        /// Headers to add to the response; `None` when the request was
        /// admitted without the limiter.
        fields: Option<ResponseFields>,
        /// The usage bucket the response body bytes count in.
        egress: RequestEgress,
    },
}

/// Rate-limit fields for the response of an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseFields {
    /// Index of the tier in the tier table.
    pub tier: usize,
    /// Value of the `ratelimit` header.
    pub ratelimit: String,
}

/// One worker's HTTP filter under one configuration.
#[derive(Debug)]
pub struct Filter {
    config: Config,
    tokens: TokenCache,
    limiter: Limiter,
    usage: UsageQueue,
    metrics: Metrics,
    debug: Cell<bool>,
    last_warning_ms: Cell<u64>,
    /// Whether the shared counters are unreachable, as the sync role last
    /// published it; read on the timer, not per request.
    degraded: Cell<bool>,
    /// Tiers in force: the configured ones with the limits the sidecar
    /// pushed; read on the timer.
    tiers: RefCell<Rc<Tiers>>,
    /// Compare-and-swap token of the pushed limits last applied.
    tiers_cas: Cell<Option<u32>>,
    /// Customer tier overrides the sync role published, read on the timer.
    overrides: RefCell<OverrideTable>,
    /// Compare-and-swap token of the overrides last applied.
    overrides_cas: Cell<Option<u32>>,
    /// Asset rules the sidecar pushed, read on the timer.
    assets: RefCell<AssetTable>,
    /// Compare-and-swap token of the asset rules last applied.
    assets_cas: Cell<Option<u32>>,
    /// Whether an asset region registry from the sidecar was applied.
    assets_loaded: Cell<bool>,
    /// Whether the 503 for a request before the first registry was logged.
    registry_wait_logged: Cell<bool>,
    /// Erased customers the sync role published, read on the timer.
    erasures: RefCell<ErasureTable>,
    /// Compare-and-swap token of the erased customers last applied.
    erasures_cas: Cell<Option<u32>>,
    /// Response body bytes not yet on the usage queue.
    egress: EgressMeter,
    /// Whether a newer configuration replaced this filter or the plugin
    /// stopped. No timer flushes `egress` after that.
    retired: Cell<bool>,
}

impl Filter {
    /// Creates the filter; `vm_id` names the VM whose usage queue the sync
    /// role registered.
    pub fn new(host: &impl Host, config: Config, vm_id: &str) -> Self {
        let mut metrics = Metrics::define(host, &config.tiers);
        if let Some(geo) = &config.geo {
            metrics.define_geo_blocked(host, geo.regions());
        }
        Self {
            tokens: TokenCache::new(config.token_cache_entries),
            limiter: Limiter::new(config.max_customers)
                .with_share_before_sync(config.quota_share_before_sync),
            usage: UsageQueue::new(vm_id),
            metrics,
            tiers: RefCell::new(Rc::new(config.tiers.clone())),
            config,
            debug: Cell::new(false),
            last_warning_ms: Cell::new(0),
            degraded: Cell::new(false),
            tiers_cas: Cell::new(None),
            overrides: RefCell::new(OverrideTable::default()),
            overrides_cas: Cell::new(None),
            assets: RefCell::new(AssetTable::default()),
            assets_cas: Cell::new(None),
            assets_loaded: Cell::new(false),
            registry_wait_logged: Cell::new(false),
            erasures: RefCell::new(ErasureTable::default()),
            erasures_cas: Cell::new(None),
            egress: EgressMeter::new(),
            retired: Cell::new(false),
        }
    }

    /// Turns per-request debug lines on or off; formatting them costs, so
    /// the shell follows Envoy's log level.
    pub fn set_debug(&self, enabled: bool) {
        self.debug.set(enabled);
    }

    /// Decides a request from its headers.
    pub fn on_request_headers(&self, host: &impl Host) -> RequestOutcome {
        self.metrics.add(Counter::Requests, 1);
        let now_ms = host.now_ms();

        let (cached, level) = match self.authenticate(host, now_ms / 1000) {
            Ok(found) => found,
            Err(error) => return self.reject(host, error),
        };
        let tier_index = self.tier_of(&cached);
        let tiers = Rc::clone(&self.tiers.borrow());
        let tier = tiers.get(tier_index);
        // Before the limiter, so a 451 consumes no quota and is not usage.
        let storage_region = match self.fence(host, &cached.customer, tier, tier_index) {
            Fence::Pass { storage_region } => storage_region,
            Fence::Refused => return RequestOutcome::Replied,
        };
        let degraded = self.degraded.get();
        if degraded && let FailurePolicy::Refuse { status } = tier.failure_policy {
            self.metrics.add(Counter::FailClosed, 1);
            self.send(host, &response::counters_unavailable(tier, status));
            return RequestOutcome::Replied;
        }
        let hint = cached.limiter_slot.get();
        let admission = match self
            .limiter
            .admit(host, &cached.customer, tier, now_ms, hint)
        {
            Ok(admission) => admission,
            Err(error) => {
                // Fail open: the request is admitted without the shared
                // record, so it is not limited, but it is still billed.
                self.metrics.add(Counter::LimiterErrors, 1);
                let message = format!(
                    "rate limiter unavailable, admitting request customer={} error={error}",
                    cached.customer
                );
                self.warn(host, now_ms, &message);
                let mut pending = Vec::new();
                usage::count_request(&mut pending, now_ms, &tier.name, true);
                let detached = UsageMessage::Detached {
                    customer: cached.customer.clone(),
                    pending,
                };
                self.deliver_usage(host, now_ms, &[detached]);
                let customer = &cached.customer;
                self.forward(host, customer, &tier.name, storage_region.as_deref());
                return RequestOutcome::Forward {
                    fields: None,
                    egress: RequestEgress::new(cached, tier_index, now_ms),
                };
            }
        };
        cached.limiter_slot.set(Some(admission.slot));
        self.note_eviction(host, now_ms, &admission);
        self.deliver_usage(host, now_ms, &admission.messages);

        let decision = admission.decision;
        if self.debug.get() {
            let message = format!(
                "request decided customer={} tier={} admitted={} retry_after={} slot={} \
                 token_cache={}",
                cached.customer,
                tier.name,
                decision.admitted,
                decision.retry_after_s,
                admission.slot,
                level.map_or("miss", CacheLevel::name)
            );
            host.log(LogLevel::Debug, &message);
        }

        if degraded && decision.admitted {
            self.metrics.add(Counter::FailOpen, 1);
        }
        if !decision.admitted {
            self.metrics.add_rate_limited(tier_index);
            self.send(host, &response::too_many_requests(tier, &decision));
            return RequestOutcome::Replied;
        }
        self.forward(
            host,
            &cached.customer,
            &tier.name,
            storage_region.as_deref(),
        );
        let fields = ResponseFields {
            tier: tier_index,
            ratelimit: response::ratelimit_value(tier, &decision),
        };
        RequestOutcome::Forward {
            fields: Some(fields),
            egress: RequestEgress::new(cached, tier_index, now_ms),
        }
    }

    /// Returns the index of the tier a request of `cached` is decided
    /// under: the customer's override when it has one, else the tier the
    /// token resolved to.
    fn tier_of(&self, cached: &CachedToken) -> usize {
        self.overrides
            .borrow()
            .tier_of(&cached.customer)
            .unwrap_or(cached.tier)
    }

    /// Finds the request's bearer token in the cache or verifies it; the
    /// cache level is `None` when the token was verified now.
    fn authenticate(
        &self,
        host: &impl Host,
        now_s: u64,
    ) -> Result<(Rc<CachedToken>, Option<CacheLevel>), AuthError> {
        let header = host.request_header("authorization").ok().flatten();
        let verifier = &self.config.verifier;
        let token = bearer_token(header.as_deref(), verifier.max_token_bytes)?;

        let tiers = &self.config.tiers;
        if let Some((cached, level)) = self.tokens.get(host, tiers, token, now_s) {
            self.metrics.add(Counter::TokenCacheHits, 1);
            if self.is_erased(&cached.customer, now_s) {
                self.tokens.remove(host, token);
                return Err(AuthError::Revoked);
            }
            return Ok((cached, Some(level)));
        }
        self.metrics.add(Counter::TokenCacheMisses, 1);
        let verified = verifier.verify(token, now_s)?;
        if self.is_erased(&verified.customer, now_s) {
            return Err(AuthError::Revoked);
        }
        Ok((
            self.tokens.insert(host, tiers, token, verified, now_s),
            None,
        ))
    }

    /// Adds the rate-limit fields to the response of an admitted request.
    pub fn on_response_headers(&self, host: &impl Host, fields: &ResponseFields) {
        let tiers = Rc::clone(&self.tiers.borrow());
        let tier = tiers.get(fields.tier);
        let _ = host.add_response_header("ratelimit-policy", &tier.policy_header);
        let _ = host.add_response_header("ratelimit", &fields.ratelimit);
    }

    /// Periodic work of the worker: read what the sync role published,
    /// put the counted response bytes and held usage messages on the usage
    /// queue, publish counters.
    pub fn on_tick(&self, host: &impl Host) {
        if let Ok(value) = host.get_shared_data(STATE_KEY) {
            self.degraded
                .set(value.bytes.is_some_and(|bytes| bytes.first() == Some(&1)));
        }
        self.refresh_tiers(host);
        self.refresh_overrides(host);
        self.refresh_assets(host);
        self.refresh_erasures(host);
        if self.usage.backlog_len() > 0 {
            self.usage.retry_backlog(host);
        }
        self.flush_egress(host);
        self.metrics.flush(host);
    }

    /// Adds the response body bytes of a finished request to the worker's
    /// sums, which the next tick puts on the usage queue.
    pub fn record_egress(&self, host: &impl Host, egress: &RequestEgress) {
        self.egress.add(
            &egress.token.customer,
            egress.tier,
            egress.minute,
            egress.bytes,
        );
        // A replaced filter gets no more ticks, but its requests in flight
        // still end here.
        if self.retired.get() {
            self.flush_egress(host);
        }
    }

    /// Puts the response body bytes counted so far on the usage queue, and
    /// those of later requests as they end. Call it when a newer
    /// configuration replaces this filter or the plugin stops.
    pub fn retire(&self, host: &impl Host) {
        self.retired.set(true);
        self.flush_egress(host);
        self.metrics.flush(host);
    }

    fn flush_egress(&self, host: &impl Host) {
        if self.egress.is_empty() {
            return;
        }
        let messages = self.egress.take_messages(&self.config.tiers);
        self.deliver_usage(host, host.now_ms(), &messages);
    }

    /// Applies tier limits the sync role published since the last tick.
    fn refresh_tiers(&self, host: &impl Host) {
        let Ok(value) = host.get_shared_data(TIERS_KEY) else {
            return;
        };
        if value.cas == self.tiers_cas.get() {
            return;
        }
        self.tiers_cas.set(value.cas);
        let bytes = value.bytes.unwrap_or_default();
        let Some(pushed) = decode_pushed_tiers(&bytes) else {
            host.log(
                LogLevel::Error,
                "failed to decode the tier limits published under veo.sync.tiers; keeping the \
                 limits in force",
            );
            return;
        };
        // The sync role checked these limits against the same
        // configuration before publishing them.
        match self.config.tiers.with_pushed(&pushed) {
            Ok((tiers, _)) => *self.tiers.borrow_mut() = Rc::new(tiers),
            Err(error) => host.log(
                LogLevel::Error,
                &format!("ignoring published tier limits: {error}"),
            ),
        }
    }

    /// Applies the customer tier overrides the sync role published since
    /// the last tick. An empty set clears every override.
    // NOTE: each tick copies the whole set out of shared data before the
    // compare-and-swap token shows it unchanged. That is cheap for
    // thousands of overrides; a set of many megabytes would call for a
    // separate version key.
    fn refresh_overrides(&self, host: &impl Host) {
        let Ok(value) = host.get_shared_data(OVERRIDES_KEY) else {
            return;
        };
        if value.cas == self.overrides_cas.get() {
            return;
        }
        self.overrides_cas.set(value.cas);
        let bytes = value.bytes.unwrap_or_default();
        let Some(set) = decode_overrides(&bytes) else {
            host.log(
                LogLevel::Error,
                "failed to decode the tier overrides published under veo.sync.overrides; \
                 keeping the overrides in force",
            );
            return;
        };
        // The sync role logged and counted the overrides that name a tier
        // the configuration does not define; the table leaves them out.
        *self.overrides.borrow_mut() = OverrideTable::build(&set, &self.config.tiers);
    }

    /// Returns the tiers in force.
    pub fn tiers(&self) -> Rc<Tiers> {
        Rc::clone(&self.tiers.borrow())
    }

    /// Returns the configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn reject(&self, host: &impl Host, error: AuthError) -> RequestOutcome {
        self.metrics.add(Counter::AuthFailures, 1);
        if self.debug.get() {
            host.log(
                LogLevel::Debug,
                &format!("request rejected status=401 reason=\"{}\"", error.reason()),
            );
        }
        self.send(host, &response::unauthorized(error));
        RequestOutcome::Replied
    }

    /// Replaces client-sent identity headers with the verified ones,
    /// removes the other headers a client could forge, and sets the
    /// storage region of a locked asset.
    fn forward(&self, host: &impl Host, customer: &str, tier: &str, storage_region: Option<&str>) {
        // Removing first means a forged header that names an identity
        // header can never delete the verified value.
        for name in &self.config.forged_headers {
            let _ = host.remove_request_header(name);
        }
        let _ = host.set_request_header(CUSTOMER_HEADER, customer);
        let _ = host.set_request_header(TIER_HEADER, tier);
        if let (Some(geo), Some(region)) = (&self.config.geo, storage_region) {
            let _ = host.set_request_header(&geo.storage_region_header, region);
        }
    }

    fn send(&self, host: &impl Host, reply: &LocalReply) {
        let headers: Vec<(&str, &str)> = reply
            .headers
            .iter()
            .map(|(name, value)| (*name, value.as_str()))
            .collect();
        if let Err(error) = host.send_local_response(reply.status, &headers, reply.body.as_bytes())
        {
            host.log(
                LogLevel::Error,
                &format!(
                    "could not send local reply status={} error={error}",
                    reply.status
                ),
            );
        }
    }

    fn note_eviction(&self, host: &impl Host, now_ms: u64, admission: &Admission) {
        if let Some(active) = admission.evicted_active {
            self.metrics.add(Counter::LimiterEvictions, 1);
            if active {
                self.warn(
                    host,
                    now_ms,
                    &format!(
                        "evicted an active customer record slot={}; raise max_customers",
                        admission.slot
                    ),
                );
            }
        }
    }

    fn deliver_usage(&self, host: &impl Host, now_ms: u64, messages: &[UsageMessage]) {
        for message in messages {
            if self.usage.send(host, message) == Delivery::Dropped {
                self.metrics.add(Counter::UsageDropped, 1);
                let message = "usage backlog full, dropping usage; \
                               check that the veo_sync bootstrap extension runs";
                self.warn(host, now_ms, message);
            }
        }
    }

    /// Logs a warning unless one was logged in the last
    /// [`WARNING_INTERVAL_MS`]; later ones in that time are dropped.
    fn warn(&self, host: &impl Host, now_ms: u64, message: &str) {
        let last = self.last_warning_ms.get();
        if last == 0 || now_ms.saturating_sub(last) >= WARNING_INTERVAL_MS {
            self.last_warning_ms.set(now_ms.max(1));
            host.log(LogLevel::Warn, message);
        }
    }
}

#[cfg(test)]
mod tests {
    use jwt_simple::prelude::UnixTimeStamp;
    use prost::Message;
    use serde_json::json;
    use veo_proto::sync::{TierOverride, TierOverrides};

    use super::*;
    use crate::host::MemoryHost;
    use crate::limiter::MAX_ATTEMPTS;
    use crate::limiter::record::Record;
    use crate::testing::{NOW_S, Worker, claims, es256_token};
    use crate::usage::QUEUE_NAME;

    const NOW_MS: u64 = NOW_S * 1000;

    fn worker() -> Worker {
        Worker::new(MemoryHost::new(NOW_MS))
    }

    fn token(customer: &str, tier: Option<&str>) -> String {
        es256_token(claims(customer, tier))
    }

    /// Stores a set of tier overrides as the sync role publishes it.
    fn publish_overrides(host: &MemoryHost, version: u64, entries: &[(&str, &str)]) {
        let set = TierOverrides {
            version,
            overrides: entries
                .iter()
                .map(|(customer, tier)| TierOverride {
                    customer: (*customer).to_owned(),
                    tier: (*tier).to_owned(),
                })
                .collect(),
        };
        host.set_shared_data(OVERRIDES_KEY, &set.encode_to_vec(), None)
            .unwrap();
    }

    #[test]
    fn missing_token_gets_401() {
        let worker = worker();
        assert_eq!(worker.send(&[]), 401);
        assert_eq!(
            worker.reply_json(),
            json!({"error": "unauthorized", "reason": "missing token"})
        );
        let reply = worker.host.local_response().unwrap();
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"veo\"")
        );
        assert_eq!(worker.counter("veo.auth_failures_total"), 1);
    }

    #[test]
    fn invalid_tokens_get_401_with_reason() {
        let worker = worker();
        let mut expired = claims("a", None);
        expired.expires_at = Some(UnixTimeStamp::from_secs(NOW_S - 3600));
        let cases = [
            (es256_token(expired), "expired"),
            ("not-a-token".to_owned(), "malformed token"),
            (token("a", None).replace('.', "x"), "malformed token"),
        ];
        for (token, reason) in cases {
            assert_eq!(worker.send_token(&token), 401);
            assert_eq!(worker.reply_json()["reason"], reason);
            let body = worker.host.local_response().unwrap().body_text().to_owned();
            assert!(!body.contains(&token), "token echoed: {body}");
        }
        assert_eq!(worker.counter("veo.auth_failures_total"), 3);
    }

    #[test]
    fn non_utf8_headers_are_handled() {
        let worker = worker();
        assert_eq!(
            worker.send(&[("authorization", b"Bearer \xc3\x28.a.b")]),
            401
        );
        assert_eq!(worker.reply_json()["reason"], "malformed token");

        let bearer = format!("Bearer {}", token("acme", None));
        let status = worker.send(&[
            ("authorization", bearer.as_bytes()),
            ("x-veo-region", b"\xff\xfe"),
            ("x-veo-customer", b"\xff"),
        ]);
        assert_eq!(status, 200);
        assert_eq!(worker.host.request_header_text("x-veo-region"), None);
        assert_eq!(
            worker.host.request_header_text("x-veo-customer").as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn admitted_request_carries_verified_identity() {
        let worker = worker();
        let bearer = format!("Bearer {}", token("acme", Some("pro")));
        let status = worker.send(&[
            ("authorization", bearer.as_bytes()),
            ("x-veo-customer", b"someone-else"),
            ("x-veo-tier", b"enterprise"),
            ("x-veo-tier", b"enterprise"),
            ("x-veo-region", b"eu-west"),
        ]);
        assert_eq!(status, 200);
        let host = &worker.host;
        assert_eq!(
            host.request_header_text("x-veo-customer").as_deref(),
            Some("acme")
        );
        assert_eq!(
            host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );
        assert_eq!(host.request_header_count("x-veo-tier"), 1);
        assert_eq!(host.request_header_text("x-veo-region"), None);
        assert_eq!(
            host.response_header("ratelimit-policy").as_deref(),
            Some("\"pro\";q=5;w=60")
        );
        assert_eq!(
            host.response_header("ratelimit").as_deref(),
            Some("\"pro\";r=4;t=60")
        );
    }

    #[test]
    fn forged_headers_cannot_remove_verified_identity() {
        let forged = json!({"forged_headers": ["x-veo-customer", "X-Veo-Tier", "x-veo-region"]});
        let worker = Worker::with_config(MemoryHost::new(NOW_MS), forged);
        let bearer = format!("Bearer {}", token("acme", Some("pro")));
        let status = worker.send(&[
            ("authorization", bearer.as_bytes()),
            ("x-veo-customer", b"someone-else"),
            ("x-veo-region", b"eu-west"),
        ]);
        assert_eq!(status, 200);
        let host = &worker.host;
        assert_eq!(
            host.request_header_text("x-veo-customer").as_deref(),
            Some("acme")
        );
        assert_eq!(
            host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );
        assert_eq!(host.request_header_text("x-veo-region"), None);
    }

    #[test]
    fn client_sent_tier_changes_nothing() {
        let worker = worker();
        let bearer = format!("Bearer {}", token("acme", Some("basic")));
        let headers = [
            ("authorization", bearer.as_bytes()),
            ("x-veo-tier", b"enterprise".as_slice()),
        ];
        let statuses: Vec<u32> = (0..5).map(|_| worker.send(&headers)).collect();
        assert_eq!(statuses, [200, 200, 200, 429, 429]);
        assert_eq!(worker.reply_json()["tier"], "basic");
    }

    #[test]
    fn basic_gets_exactly_its_quota_then_429() {
        let worker = worker();
        let token = token("acme", None);
        let statuses: Vec<u32> = (0..6).map(|_| worker.send_token(&token)).collect();
        assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);

        let reply = worker.host.local_response().unwrap();
        assert_eq!(reply.header("retry-after"), Some("60"));
        assert_eq!(reply.header("ratelimit-policy"), Some("\"basic\";q=3;w=60"));
        assert_eq!(reply.header("ratelimit"), Some("\"basic\";r=0;t=60"));
        assert_eq!(
            worker.reply_json(),
            json!({"error": "rate_limited", "tier": "basic", "retry_after_seconds": 60})
        );
        assert_eq!(worker.counter("veo.rate_limited_total.tier.basic"), 3);
        assert_eq!(worker.counter("veo.requests_total"), 6);
    }

    #[test]
    fn window_passing_admits_again() {
        let worker = worker();
        let token = token("acme", None);
        for _ in 0..3 {
            assert_eq!(worker.send_token(&token), 200);
        }
        worker.host.advance_ms(59_999);
        assert_eq!(worker.send_token(&token), 429);
        assert_eq!(
            worker.host.local_response().unwrap().header("retry-after"),
            Some("1")
        );
        worker.host.advance_ms(1);
        assert_eq!(worker.send_token(&token), 200);
    }

    #[test]
    fn workers_share_one_quota() {
        let first = worker();
        let second = Worker::new(first.host.worker());
        let token = token("acme", None);
        let statuses: Vec<u32> = (0..6)
            .map(|index| {
                let worker = if index % 2 == 0 { &first } else { &second };
                worker.send_token(&token)
            })
            .collect();
        assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    }

    #[test]
    fn enterprise_is_refused_only_above_burst_cap() {
        let worker = worker();
        let token = token("big", Some("enterprise"));
        let statuses: Vec<u32> = (0..6).map(|_| worker.send_token(&token)).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
        assert_eq!(
            worker.host.local_response().unwrap().header("ratelimit"),
            Some("\"enterprise\";r=0;t=1")
        );

        // At the refill rate of one per second it is never refused.
        for _ in 0..20 {
            worker.host.advance_ms(1_000);
            assert_eq!(worker.send_token(&token), 200);
        }
    }

    #[test]
    fn unknown_tier_falls_back_to_default() {
        let worker = worker();
        assert_eq!(worker.send_token(&token("acme", Some("platinum"))), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("basic")
        );
    }

    #[test]
    fn cached_token_costs_only_limiter_calls() {
        let worker = worker();
        let token = token("acme", Some("pro"));
        assert_eq!(worker.send_token(&token), 200);
        let before = worker.host.shared_data_calls();
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(worker.host.shared_data_calls() - before, 2);
        assert_eq!(worker.counter("veo.token_cache_misses_total"), 1);
        assert_eq!(worker.counter("veo.token_cache_hits_total"), 1);

        // Another worker finds the token in shared data: one more call.
        let other = Worker::new(worker.host.worker());
        assert_eq!(other.send_token(&token), 200);
        assert_eq!(other.host.shared_data_calls(), 1 + 2);
        assert_eq!(other.counter("veo.token_cache_hits_total"), 1);
    }

    #[test]
    fn first_request_of_customer_announces_usage() {
        let worker = worker();
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let token = token("acme", None);
        for _ in 0..4 {
            worker.send_token(&token);
        }
        assert_eq!(worker.host.queue_len(queue), 1);
        let message = worker.host.dequeue_shared_queue(queue).unwrap().unwrap();
        assert!(matches!(
            UsageMessage::decode(&message),
            Some(UsageMessage::Slot(_))
        ));
    }

    #[test]
    fn limiter_contention_fails_open_and_is_billed() {
        let worker = worker();
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let token = token("acme", None);
        assert_eq!(worker.send_token(&token), 200);
        worker.host.dequeue_shared_queue(queue).unwrap().unwrap();
        let keys = worker.host.shared_data_keys(crate::limiter::KEY_PREFIX);
        for _ in 0..MAX_ATTEMPTS {
            let writer = worker.host.worker();
            let key = keys[0].clone();
            worker.host.before_next_set(&keys[0], move || {
                let bytes = writer.peek_shared_data(&key).unwrap();
                writer.set_shared_data(&key, &bytes, None).unwrap();
            });
        }
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-customer").as_deref(),
            Some("acme")
        );
        assert_eq!(worker.counter("veo.limiter_errors_total"), 1);

        let message = worker.host.dequeue_shared_queue(queue).unwrap().unwrap();
        let Some(UsageMessage::Detached { customer, pending }) = UsageMessage::decode(&message)
        else {
            panic!("expected the fail-open request's usage on the queue");
        };
        assert_eq!(customer, "acme");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].admitted, 1);
        assert_eq!(pending[0].refused, 0);
    }

    #[test]
    fn debug_lines_name_decision_but_not_token() {
        let worker = worker();
        worker.filter.set_debug(true);
        let token = token("acme", None);
        worker.send_token(&token);
        worker.send_token("garbage");
        let logs = worker.host.logs();
        assert!(
            logs.iter()
                .any(|(_, line)| line.contains("customer=acme tier=basic admitted=true"))
        );
        assert!(logs.iter().any(|(_, line)| line.contains("status=401")));
        assert!(logs.iter().all(|(_, line)| !line.contains(&token)));
    }

    #[test]
    fn override_applies_to_cached_token() {
        let worker = worker();
        let token = token("acme", Some("basic"));
        assert_eq!(worker.send_token(&token), 200);
        publish_overrides(&worker.host, 1, &[("acme", "pro")]);
        worker.filter.on_tick(&worker.host);

        let before = worker.host.shared_data_calls();
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(worker.host.shared_data_calls() - before, 2);
        assert_eq!(worker.counter("veo.token_cache_hits_total"), 1);
        let host = &worker.host;
        assert_eq!(
            host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );
        assert_eq!(
            host.response_header("ratelimit-policy").as_deref(),
            Some("\"pro\";q=5;w=60")
        );
        // The record is the customer's whatever the tier, so the request
        // admitted under basic counts against the quota of pro.
        assert_eq!(
            host.response_header("ratelimit").as_deref(),
            Some("\"pro\";r=3;t=60")
        );

        let statuses: Vec<u32> = (0..4).map(|_| worker.send_token(&token)).collect();
        assert_eq!(statuses, [200, 200, 200, 429]);
        assert_eq!(worker.reply_json()["tier"], "pro");
        assert_eq!(worker.counter("veo.rate_limited_total.tier.pro"), 1);
        assert_eq!(worker.counter("veo.rate_limited_total.tier.basic"), 0);

        let keys = host.shared_data_keys(crate::limiter::KEY_PREFIX);
        let record = Record::decode(&host.peek_shared_data(&keys[0]).unwrap()).unwrap();
        let counted: Vec<(&str, u32, u32)> = record
            .pending
            .iter()
            .map(|bucket| (bucket.tier.as_str(), bucket.admitted, bucket.refused))
            .collect();
        assert_eq!(counted, [("basic", 1, 0), ("pro", 4, 1)]);
    }

    #[test]
    fn unknown_override_tier_is_ignored() {
        let worker = worker();
        publish_overrides(
            &worker.host,
            1,
            &[("acme", "platinum"), ("zeta", "enterprise")],
        );
        worker.filter.on_tick(&worker.host);

        assert_eq!(worker.send_token(&token("acme", Some("pro"))), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );
        assert_eq!(worker.send_token(&token("zeta", None)), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("enterprise")
        );
    }

    #[test]
    fn empty_override_set_clears_overrides() {
        let worker = worker();
        let token = token("acme", None);
        publish_overrides(&worker.host, 1, &[("acme", "pro")]);
        worker.filter.on_tick(&worker.host);
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );

        publish_overrides(&worker.host, 2, &[]);
        worker.filter.on_tick(&worker.host);
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("basic")
        );
    }

    #[test]
    fn undecodable_overrides_keep_those_in_force() {
        let worker = worker();
        publish_overrides(&worker.host, 1, &[("acme", "pro")]);
        worker.filter.on_tick(&worker.host);
        worker
            .host
            .set_shared_data(OVERRIDES_KEY, b"\xff\xff", None)
            .unwrap();
        worker.filter.on_tick(&worker.host);

        assert_eq!(worker.send_token(&token("acme", None)), 200);
        assert_eq!(
            worker.host.request_header_text("x-veo-tier").as_deref(),
            Some("pro")
        );
        let logs = worker.host.logs();
        assert!(
            logs.iter()
                .any(|(level, line)| *level == LogLevel::Error && line.contains("overrides"))
        );
    }
}
