//! Fake Stripe API server inside the test process, faithful to the parts of
//! Stripe's API v1 that Veo Edge uses: meter events, meters and their event
//! summaries, and customers. It checks the API key, honours idempotency
//! keys, can fail on request, and records what it accepted for assertions.
//! [`webhook`] signs and sends Stripe webhook events.
//!
//! Point async-stripe at it with
//! `stripe::ClientBuilder::new(key).url(fake.base_url()).build()`.

mod customers;
mod dispatch;
mod error;
mod form;
mod ids;
mod list;
mod meter_events;
mod meters;
mod server;
mod state;
pub mod webhook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::HarnessError;
use customers::Customer;
use ids::random_id;
use meters::Meter;
use state::State;

pub use meter_events::MeterEventRecord;
pub use meters::MeterAggregation;
pub use state::{FailureCount, InjectedFailure};

/// Path of the endpoint that creates meter events.
pub const METER_EVENTS_PATH: &str = "/v1/billing/meter_events";

/// A running fake Stripe. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct FakeStripe {
    address: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl FakeStripe {
    /// Starts the fake on a free loopback port. Clients must send
    /// `Authorization: Bearer <api_key>`. A key starting with `sk_live_` or
    /// `rk_live_` makes every object live-mode.
    pub async fn start(api_key: &str) -> Result<Self, HarnessError> {
        if api_key.is_empty() || !api_key.bytes().all(|byte| byte.is_ascii_graphic()) {
            return Err(HarnessError::InvalidConfig {
                what: "fake Stripe API key",
                reason: "the key must be non-empty visible ASCII, such as sk_test_123".to_owned(),
            });
        }
        let io_error = |source| HarnessError::Io {
            action: "bind the fake Stripe server to",
            path: "127.0.0.1:0".into(),
            source,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io_error)?;
        let address = listener.local_addr().map_err(io_error)?;
        let state = Arc::new(Mutex::new(State::new(api_key.to_owned())));
        let task = tokio::spawn(server::serve(listener, Arc::clone(&state)));
        Ok(Self {
            address,
            state,
            task,
        })
    }

    /// Returns the address the fake listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the base URL for async-stripe's `ClientBuilder::url`, as
    /// `http://127.0.0.1:PORT/`. async-stripe 1.0.0-rc.10 appends `v1` and
    /// the endpoint's path to it, so it must end with `/` and not contain
    /// `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.address)
    }

    /// Creates a customer with a random `cus_` id and returns the id.
    pub fn create_customer(&self, metadata: &[(&str, &str)]) -> String {
        let id = random_id("cus_");
        let mut state = self.state();
        let customer = Customer::new(id.clone(), state.now(), to_map(metadata));
        state.customers.insert(id.clone(), customer);
        id
    }

    /// Deletes customer `id`, as the Dashboard does; returns whether it
    /// existed. Its meter events stay.
    pub fn delete_customer(&self, id: &str) -> bool {
        self.state().customers.remove(id).is_some()
    }

    /// Creates a customer with the given id, for configurations written
    /// before the fake starts.
    pub fn create_customer_with_id(
        &self,
        id: &str,
        metadata: &[(&str, &str)],
    ) -> Result<(), HarnessError> {
        let invalid = |reason: String| HarnessError::InvalidConfig {
            what: "fake Stripe customer id",
            reason,
        };
        if id.is_empty() || id.contains(['/', '?', '#']) {
            return Err(invalid(format!(
                "'{id}' cannot be part of a URL path: use an id such as cus_test1"
            )));
        }
        let mut state = self.state();
        if state.customers.contains_key(id) {
            return Err(invalid(format!(
                "customer {id} already exists: pick another id"
            )));
        }
        let customer = Customer::new(id.to_owned(), state.now(), to_map(metadata));
        state.customers.insert(id.to_owned(), customer);
        Ok(())
    }

    /// Creates an active meter that sums the values of events named
    /// `event_name`, and returns its `mtr_` id.
    pub fn create_meter(&self, event_name: &str) -> Result<String, HarnessError> {
        self.create_meter_with_aggregation(event_name, MeterAggregation::Sum)
    }

    /// Creates an active meter with the given aggregation formula and
    /// returns its `mtr_` id. Stripe allows one meter per event name, so a
    /// second meter for the same name is an error.
    pub fn create_meter_with_aggregation(
        &self,
        event_name: &str,
        aggregation: MeterAggregation,
    ) -> Result<String, HarnessError> {
        let mut state = self.state();
        if event_name.is_empty() || state.meters.iter().any(|m| m.event_name == event_name) {
            return Err(HarnessError::InvalidConfig {
                what: "fake Stripe meter",
                reason: format!(
                    "event name '{event_name}' is empty or already has a meter: use one meter \
                     per event name"
                ),
            });
        }
        let id = random_id(&format!("mtr_{}", state.mode_infix()));
        let created = state.now();
        state.meters.push(Meter {
            id: id.clone(),
            event_name: event_name.to_owned(),
            aggregation,
            created,
        });
        Ok(id)
    }

    /// Returns the accepted meter events in arrival order, without those
    /// removed by [`FakeStripe::drop_event`].
    pub fn meter_events(&self) -> Vec<MeterEventRecord> {
        self.state().events.clone()
    }

    /// Returns the sum of the values of the accepted events of `customer`
    /// named `event_name`.
    pub fn usage_sum(&self, customer: &str, event_name: &str) -> u64 {
        self.state()
            .events
            .iter()
            .filter(|event| event.customer == customer && event.event_name == event_name)
            .map(|event| event.value)
            .sum()
    }

    /// Returns the metadata of `customer`, or `None` when it does not exist.
    pub fn customer_metadata(&self, customer: &str) -> Option<BTreeMap<String, String>> {
        self.state()
            .customers
            .get(customer)
            .map(|customer| customer.metadata.clone())
    }

    /// Returns how many responses to `path` had `status`. The path has no
    /// query string, as in `/v1/customers/cus_1`.
    pub fn request_count(&self, path: &str, status: u16) -> u64 {
        self.state()
            .request_counts
            .get(&(path.to_owned(), status))
            .copied()
            .unwrap_or(0)
    }

    /// Returns the number of responses by path and status.
    pub fn request_counts(&self) -> BTreeMap<(String, u16), u64> {
        self.state().request_counts.clone()
    }

    /// Forgets the events with `identifier`, as if Stripe had lost them: they
    /// leave sums and summaries, and the identifier can be sent again.
    /// Returns whether any event had that identifier.
    pub fn drop_event(&self, identifier: &str) -> bool {
        let mut state = self.state();
        let before = state.events.len();
        state.events.retain(|event| event.identifier != identifier);
        state.identifiers.remove(identifier);
        state.events.len() < before
    }

    /// Makes requests to `path` fail as `failure` for `count` requests, after
    /// any failures already queued for that path. Injected 429 and 500
    /// responses are not saved under idempotency keys, so a retry with the
    /// same key runs the request.
    pub fn inject_failure(&self, path: &str, failure: InjectedFailure, count: FailureCount) {
        self.state().inject_failure(path, failure, count);
    }

    /// Removes every failure queued for `path`.
    pub fn clear_failures(&self, path: &str) {
        self.state().clear_failures(path);
    }

    /// Returns the fake's clock in Unix seconds.
    pub fn now(&self) -> i64 {
        self.state().now()
    }

    /// Sets the fake's clock, which bounds event timestamps and expires
    /// idempotency keys and identifiers after 24 hours. The clock keeps
    /// running from there.
    pub fn set_clock(&self, unix_seconds: i64) {
        let mut state = self.state();
        let offset = unix_seconds.saturating_sub(state.now());
        state.clock_offset = state.clock_offset.saturating_add(offset);
    }

    /// Makes each meter event show in the summaries only `seconds` after it
    /// was accepted, as Stripe's asynchronous aggregation does; 0 (the
    /// default) shows it at once.
    pub fn set_summary_lag(&self, seconds: i64) {
        self.state().summary_lag_s = seconds.max(0);
    }

    /// Moves the fake's clock by `seconds`, which may be negative.
    pub fn advance_clock(&self, seconds: i64) {
        let mut state = self.state();
        state.clock_offset = state.clock_offset.saturating_add(seconds);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Handlers change the data only after all their checks pass, so the
        // data behind a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn to_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}
