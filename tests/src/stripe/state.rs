//! Everything the fake stores: its clock, customers, meters, accepted meter
//! events, idempotency keys, injected failures and request counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::customers::Customer;
use super::meter_events::MeterEventRecord;
use super::meters::Meter;

/// How long Stripe keeps an idempotency key, and how long it keeps a meter
/// event identifier unique: 24 hours, in seconds.
pub(crate) const RETENTION_SECONDS: i64 = 24 * 60 * 60;

/// Returns the system clock in Unix seconds.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

/// A failure the fake returns in place of the real response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectedFailure {
    /// HTTP 429 with Stripe's `rate_limit` error, and the request has no effect.
    RateLimited,
    /// HTTP 500 with an `api_error`, and the request has no effect.
    ServerError,
    /// The request takes effect (a meter event is recorded, an idempotency
    /// key saved), but the client receives HTTP 500, as when a reply is
    /// lost on the way back.
    LostReply,
    /// HTTP 500 with an `api_error` from an endpoint that started
    /// executing: the request has no effect, but Stripe saves the 500 under
    /// its idempotency key and replays it to every retry with that key.
    SavedServerError,
}

/// How many requests an injected failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCount {
    /// The next N requests to the path.
    Next(u32),
    /// Every request to the path until the failures are cleared.
    UntilCleared,
}

#[derive(Debug, Clone, Copy)]
struct FailureRule {
    failure: InjectedFailure,
    remaining: FailureCount,
}

/// A response saved under an idempotency key.
#[derive(Debug, Clone)]
pub(crate) struct SavedResponse {
    /// Method and path of the first request, as in `POST /v1/customers/cus_1`.
    pub endpoint: String,
    /// Parameters of the first request, in canonical order.
    pub params: Vec<(String, String)>,
    /// HTTP status of the saved response.
    pub status: u16,
    /// Body of the saved response.
    pub body: Value,
    /// `Stripe-Should-Retry` header of the saved response.
    pub should_retry: Option<bool>,
    /// `Request-Id` of the first request.
    pub request_id: String,
    /// Fake-clock time when the key was first used, in Unix seconds.
    pub saved_at: i64,
}

/// The fake's data. The server keeps it behind one mutex, so every request
/// runs alone.
#[derive(Debug)]
pub(crate) struct State {
    /// The secret key clients must send as `Authorization: Bearer <key>`.
    pub api_key: String,
    /// True for a live-mode key (`sk_live_`, `rk_live_`).
    pub livemode: bool,
    /// Seconds added to the system clock.
    pub clock_offset: i64,
    /// Customers by id.
    pub customers: BTreeMap<String, Customer>,
    /// Meters in creation order.
    pub meters: Vec<Meter>,
    /// Accepted meter events in arrival order, without dropped ones.
    pub events: Vec<MeterEventRecord>,
    /// Fake-clock time when each meter event identifier was last accepted.
    pub identifiers: HashMap<String, i64>,
    /// Saved responses by idempotency key.
    pub idempotency: HashMap<String, SavedResponse>,
    failures: HashMap<String, VecDeque<FailureRule>>,
    /// Responses sent, by path and HTTP status.
    pub request_counts: BTreeMap<(String, u16), u64>,
    /// Seconds after its acceptance before a meter event shows in the
    /// summaries, which Stripe aggregates asynchronously.
    pub summary_lag_s: i64,
}

impl State {
    pub(crate) fn new(api_key: String) -> Self {
        let livemode = api_key.starts_with("sk_live_") || api_key.starts_with("rk_live_");
        Self {
            api_key,
            livemode,
            clock_offset: 0,
            customers: BTreeMap::new(),
            meters: Vec::new(),
            events: Vec::new(),
            identifiers: HashMap::new(),
            idempotency: HashMap::new(),
            failures: HashMap::new(),
            request_counts: BTreeMap::new(),
            summary_lag_s: 0,
        }
    }

    /// Returns the fake's time in Unix seconds: the system clock plus the
    /// offset that tests set.
    pub(crate) fn now(&self) -> i64 {
        unix_now().saturating_add(self.clock_offset)
    }

    /// Returns `test_` in test mode and nothing in live mode, for ids such as
    /// `mtr_test_...`.
    pub(crate) fn mode_infix(&self) -> &'static str {
        if self.livemode { "" } else { "test_" }
    }

    /// Queues `failure` for the next requests to `path`, after any failures
    /// already queued there.
    pub(crate) fn inject_failure(
        &mut self,
        path: &str,
        failure: InjectedFailure,
        count: FailureCount,
    ) {
        if count == FailureCount::Next(0) {
            return;
        }
        self.failures
            .entry(path.to_owned())
            .or_default()
            .push_back(FailureRule {
                failure,
                remaining: count,
            });
    }

    /// Removes every failure queued for `path`.
    pub(crate) fn clear_failures(&mut self, path: &str) {
        self.failures.remove(path);
    }

    /// Takes the failure that applies to this request to `path`, if any.
    pub(crate) fn take_failure(&mut self, path: &str) -> Option<InjectedFailure> {
        let queue = self.failures.get_mut(path)?;
        let rule = queue.front_mut()?;
        let failure = rule.failure;
        if let FailureCount::Next(remaining) = &mut rule.remaining {
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                queue.pop_front();
            }
        }
        if queue.is_empty() {
            self.failures.remove(path);
        }
        Some(failure)
    }

    /// Counts one response to `path` with `status`.
    pub(crate) fn count_request(&mut self, path: &str, status: u16) {
        *self
            .request_counts
            .entry((path.to_owned(), status))
            .or_default() += 1;
    }

    /// Forgets idempotency keys and meter event identifiers older than the
    /// 24-hour retention.
    pub(crate) fn expire(&mut self) {
        let cutoff = self.now().saturating_sub(RETENTION_SECONDS);
        self.idempotency.retain(|_, saved| saved.saved_at > cutoff);
        self.identifiers
            .retain(|_, accepted_at| *accepted_at > cutoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_failure_counts_down_then_moves_on() {
        let mut state = State::new("sk_test_x".into());
        let path = "/v1/billing/meter_events";
        state.inject_failure(path, InjectedFailure::RateLimited, FailureCount::Next(2));
        state.inject_failure(path, InjectedFailure::ServerError, FailureCount::Next(1));

        assert_eq!(state.take_failure(path), Some(InjectedFailure::RateLimited));
        assert_eq!(state.take_failure(path), Some(InjectedFailure::RateLimited));
        assert_eq!(state.take_failure(path), Some(InjectedFailure::ServerError));
        assert_eq!(state.take_failure(path), None);
        assert_eq!(state.take_failure("/v1/other"), None);
    }

    #[test]
    fn until_cleared_lasts_until_cleared() {
        let mut state = State::new("sk_test_x".into());
        state.inject_failure("/p", InjectedFailure::LostReply, FailureCount::UntilCleared);
        for _ in 0..5 {
            assert_eq!(state.take_failure("/p"), Some(InjectedFailure::LostReply));
        }
        state.clear_failures("/p");
        assert_eq!(state.take_failure("/p"), None);
    }

    #[test]
    fn livemode_follows_key_prefix() {
        assert!(State::new("sk_live_abc".into()).livemode);
        assert!(!State::new("sk_test_abc".into()).livemode);
        assert_eq!(State::new("sk_test_abc".into()).mode_infix(), "test_");
    }
}
