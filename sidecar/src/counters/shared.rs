//! The exchange loop between this sidecar and the shared counters: every
//! flush interval it writes the outbox to Redis and reads back what the
//! other sidecars admitted, and it tracks whether Redis is reachable.
//!
//! While Redis is unreachable the sidecar keeps deciding on its own
//! instances' counts, reports itself degraded in the sync reply and the
//! `veo.counters` health status, and logs once per [`WARNING_INTERVAL`].
//! The outbox keeps every row until Redis has it, and Redis applies each
//! row id once, so the counts merge without loss or double counting once
//! Redis is back.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use super::redis::{ErasureSource, NoticeEntry, RedisCounters};
use super::{Contribution, CounterError, Exchange, WindowTotals};
use crate::ledger::unix_now_s;
use crate::remote::{Counts, RecentUsage};
use crate::store::Store;

/// Health service name whose status follows the shared counters.
pub const HEALTH_SERVICE: &str = "veo.counters";

/// Minimum time between two warnings about an unreachable Redis.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Interval between checks that an idle Redis still responds to `PING`.
const IDLE_PING_INTERVAL: Duration = Duration::from_secs(1);

/// Maximum outbox rows written in one exchange.
const OUTBOX_BATCH: u32 = 20_000;

/// Handle to the shared counters; clones share one state.
#[derive(Clone)]
pub struct SharedCounters {
    inner: Arc<Inner>,
}

struct Inner {
    backend: RedisCounters,
    store: Store,
    recent: Arc<Mutex<RecentUsage>>,
    window_seconds: u32,
    flush_interval: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Window counts of every other sidecar, per customer, as of the last
    /// exchange.
    elsewhere: HashMap<String, Counts>,
    /// This sidecar's rows already in Redis, per customer, newest last.
    own: HashMap<String, BTreeMap<i64, Counts>>,
    /// Highest outbox id added to `own`.
    own_max_id: i64,
    degraded: bool,
    /// Set once the first exchange has succeeded or failed.
    known: bool,
    failures_since_warning: u64,
    warned_at: Option<Instant>,
    /// Time of the last successful call to Redis.
    contact_at: Option<Instant>,
}

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounters")
            .field("target", &self.inner.backend.describe_target())
            .finish_non_exhaustive()
    }
}

impl SharedCounters {
    /// Creates the handle; nothing is sent until [`SharedCounters::run`].
    pub fn new(
        backend: RedisCounters,
        store: Store,
        recent: Arc<Mutex<RecentUsage>>,
        window_seconds: u32,
        flush_interval: Duration,
    ) -> SharedCounters {
        SharedCounters {
            inner: Arc::new(Inner {
                backend,
                store,
                recent,
                window_seconds,
                flush_interval,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Returns what every other sidecar admitted of `customer` within the
    /// window, as of the last exchange.
    pub fn elsewhere(&self, customer: &str) -> Counts {
        self.lock()
            .elsewhere
            .get(customer)
            .copied()
            .unwrap_or_default()
    }

    /// Drops every count of `customer` held here and in Redis, for its
    /// erasure. Returns the Redis fields and entries removed.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::erase_customer`]; the counts held here are
    /// dropped all the same.
    pub async fn erase_customer(
        &self,
        customer: &str,
        now_unix_s: i64,
    ) -> Result<u64, crate::counters::CounterError> {
        {
            let mut state = self.lock();
            state.own.remove(customer);
            state.elsewhere.remove(customer);
        }
        self.inner
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .forget(customer);
        self.inner
            .backend
            .erase_customer(customer, now_unix_s)
            .await
    }

    /// Tells every sidecar sharing the counters that `customer` was
    /// erased, as [`RedisCounters::announce_erasure`].
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::announce_erasure`].
    pub async fn announce_erasure(
        &self,
        customer: &str,
        erasure: &ErasureSource<'_>,
        retention: Duration,
    ) -> Result<(), crate::counters::CounterError> {
        self.inner
            .backend
            .announce_erasure(customer, erasure, retention)
            .await
    }

    /// Returns up to `count` entries of the erasure notice stream after
    /// `after_entry_id`, oldest first, including this sidecar's own.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::erasure_notices`].
    pub async fn erasure_notices(
        &self,
        after_entry_id: &str,
        count: usize,
    ) -> Result<Vec<NoticeEntry>, crate::counters::CounterError> {
        self.inner
            .backend
            .erasure_notices(after_entry_id, count)
            .await
    }

    /// Returns the id this sidecar writes its counts under.
    pub fn sidecar_id(&self) -> &str {
        self.inner.backend.sidecar_id()
    }

    /// Returns whether the last exchange failed.
    pub fn degraded(&self) -> bool {
        self.lock().degraded
    }

    /// Returns the number of commands sent to Redis so far.
    pub fn commands_sent(&self) -> u64 {
        self.inner.backend.commands_sent()
    }

    /// Exchanges with Redis every flush interval until `stop` turns true,
    /// then makes one last attempt to write the outbox.
    pub async fn run(self, mut health: HealthReporter, mut stop: watch::Receiver<bool>) {
        health
            .set_service_status(HEALTH_SERVICE, ServingStatus::NotServing)
            .await;
        let mut ticker = tokio::time::interval(self.inner.flush_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => {
                    self.exchange_once(&mut health).await;
                    return;
                }
            }
            self.exchange_once(&mut health).await;
        }
    }

    /// Runs one exchange and records its outcome.
    pub async fn exchange_once(&self, health: &mut HealthReporter) {
        let outcome = self.exchange().await;
        let now = Instant::now();
        let (status, message) = {
            let mut state = self.lock();
            let was_degraded = state.degraded;
            let first = !state.known;
            state.known = true;
            match outcome {
                Ok(()) => {
                    state.degraded = false;
                    state.failures_since_warning = 0;
                    let message = (was_degraded || first).then(|| {
                        format!(
                            "shared counters at {} reachable; counts merged",
                            self.inner.backend.describe_target()
                        )
                    });
                    (
                        (was_degraded || first).then_some(ServingStatus::Serving),
                        message.map(|text| (false, text)),
                    )
                }
                Err(error) => {
                    state.degraded = true;
                    state.failures_since_warning += 1;
                    let due = state
                        .warned_at
                        .is_none_or(|at| now.duration_since(at) >= WARNING_INTERVAL);
                    let message = due.then(|| {
                        let failures = state.failures_since_warning;
                        state.failures_since_warning = 0;
                        state.warned_at = Some(now);
                        format!(
                            "{error}; counting locally and keeping the outbox until Redis \
                             is back (failed exchanges since the last warning: {failures})"
                        )
                    });
                    (
                        (!was_degraded || first).then_some(ServingStatus::NotServing),
                        message.map(|text| (true, text)),
                    )
                }
            }
        };
        if let Some((is_warning, text)) = message {
            if is_warning {
                warn!(target: "veo_sidecar::counters", "{text}");
            } else {
                info!(target: "veo_sidecar::counters", "{text}");
            }
        }
        if let Some(status) = status {
            health.set_service_status(HEALTH_SERVICE, status).await;
        }
    }

    async fn exchange(&self) -> Result<(), ExchangeError> {
        let inner = &self.inner;
        let rows = inner
            .store
            .outbox(OUTBOX_BATCH)
            .await
            .map_err(|error| ExchangeError::Store(error.to_string()))?;

        let now_unix_s = unix_now_s();
        let customers = {
            let mut recent = inner.recent.lock().unwrap_or_else(PoisonError::into_inner);
            recent.prune(u64::try_from(now_unix_s).unwrap_or(0));
            recent.customers()
        };

        if rows.is_empty() && customers.is_empty() {
            // Nothing to write and no customer to read. Still check, once
            // per IDLE_PING_INTERVAL, that Redis responds, so the health
            // status follows it.
            let due = {
                let state = self.lock();
                state.degraded
                    || !state.known
                    || state
                        .contact_at
                        .is_none_or(|at| at.elapsed() >= IDLE_PING_INTERVAL)
            };
            if due {
                inner.backend.ping().await?;
                self.lock().contact_at = Some(Instant::now());
            }
            self.lock().elsewhere.clear();
            return Ok(());
        }

        let result = inner
            .backend
            .exchange(Exchange {
                contributions: &rows,
                customers: &customers,
                now_unix_s,
                window_seconds: inner.window_seconds,
            })
            .await?;

        if let Some(last) = rows.last() {
            // Redis has applied these rows. A failed removal only resends
            // them, and Redis skips ids it has applied.
            if let Err(error) = inner.store.remove_outbox(last.id).await {
                warn!(
                    target: "veo_sidecar::counters",
                    error = %error,
                    last_id = last.id,
                    "failed to trim the counter outbox; Redis will skip its rows when they are resent"
                );
            }
        }

        let mut state = self.lock();
        state.contact_at = Some(Instant::now());
        state.add_own(&rows, now_unix_s, inner.window_seconds);
        state.prune_own(now_unix_s, inner.window_seconds);
        let elsewhere = result
            .totals
            .iter()
            .map(|(customer, totals)| (customer.clone(), state.subtract_own(customer, totals)))
            .collect();
        state.elsewhere = elsewhere;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Adds the rows now stored in Redis to this sidecar's own window counts.
    /// Rows whose bucket is already outside the window went to Redis's
    /// minute totals only, so they are left out here too.
    fn add_own(&mut self, rows: &[Contribution], now_unix_s: i64, window_seconds: u32) {
        let start = now_unix_s - i64::from(window_seconds);
        for row in rows
            .iter()
            .filter(|row| row.id > self.own_max_id && row.bucket_unix_s > start)
        {
            let bucket = self
                .own
                .entry(row.customer.clone())
                .or_default()
                .entry(row.bucket_unix_s)
                .or_default();
            bucket.admitted = bucket.admitted.saturating_add(row.admitted);
            bucket.requests = bucket.requests.saturating_add(row.requests);
        }
        if let Some(last) = rows.last() {
            self.own_max_id = self.own_max_id.max(last.id);
        }
    }

    /// Drops own rows whose bucket left the window `(now - window, now]`.
    fn prune_own(&mut self, now_unix_s: i64, window_seconds: u32) {
        let start = now_unix_s - i64::from(window_seconds);
        self.own.retain(|_, series| {
            *series = series.split_off(&(start + 1));
            !series.is_empty()
        });
    }

    fn subtract_own(&self, customer: &str, totals: &WindowTotals) -> Counts {
        let own = self.own.get(customer).map_or(Counts::default(), |series| {
            series
                .values()
                .fold(Counts::default(), |sum, counts| Counts {
                    admitted: sum.admitted.saturating_add(counts.admitted),
                    requests: sum.requests.saturating_add(counts.requests),
                })
        });
        Counts {
            admitted: totals.admitted.saturating_sub(own.admitted),
            requests: totals.requests.saturating_sub(own.requests),
        }
    }
}

/// Failure of one exchange.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error(transparent)]
    Counters(#[from] CounterError),
    #[error("could not read the counter outbox: {0}")]
    Store(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, bucket_unix_s: i64, admitted: u64) -> Contribution {
        Contribution {
            id,
            customer: "c1".to_owned(),
            bucket_unix_s,
            admitted,
            requests: admitted,
        }
    }

    #[test]
    fn old_rows_stay_out_of_own_window() {
        let mut state = State::default();
        // A backlog row of an old minute after a recent one.
        state.add_own(&[row(1, 1_000, 3), row(2, 600, 50)], 1_000, 60);
        let totals = WindowTotals {
            admitted: 10,
            requests: 10,
        };
        assert_eq!(state.subtract_own("c1", &totals).admitted, 7);
    }

    #[test]
    fn own_rows_counted_once_then_pruned() {
        let mut state = State::default();
        state.add_own(&[row(1, 990, 2), row(2, 1_000, 3)], 1_000, 60);
        state.add_own(&[row(2, 1_000, 3)], 1_000, 60);
        let totals = WindowTotals {
            admitted: 5,
            requests: 5,
        };
        assert_eq!(state.subtract_own("c1", &totals).admitted, 0);

        state.prune_own(1_050, 60);
        assert_eq!(state.subtract_own("c1", &totals).admitted, 2);
    }
}
