//! The billing loop: every interval it closes the finished minute buckets
//! into meter events and sends the queue to Stripe or the outbox file.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::queue::{self, LedgerKey, QueuedEvent};
use super::sink::{FileSink, MeterNames, NamedEvent, SendOutcome, StripeSink, backoff};
use crate::ledger::unix_now_s;
use crate::metrics::Metrics;
use crate::privacy::to_sql;
use crate::store::{Store, StoreError};

/// Oldest event timestamp Stripe accepts, in seconds: 35 days.
pub const MAX_EVENT_AGE_S: i64 = 35 * 86_400;
/// How far ahead of now an event's timestamp may be when it is sent, in
/// seconds: Stripe accepts up to 5 minutes, and this leaves a minute for
/// clock differences.
const MAX_EVENT_LEAD_S: i64 = 4 * 60;
/// Buckets closed per store transaction.
const CLOSE_LIMIT: usize = 2_000;
/// Events read from the queue at a time.
const READ_LIMIT: usize = 500;

/// Settings of the billing loop.
#[derive(Debug, Clone)]
pub struct BillingSettings {
    /// Region of this sidecar, part of every event identifier.
    pub region: String,
    /// Interval between rounds.
    pub interval: Duration,
    /// Time after a minute ends before its bucket is billed, so that the
    /// filters' batches for it have arrived.
    pub close_delay: Duration,
    /// Seconds a sent meter event is given to show in Stripe's summaries,
    /// which Stripe aggregates asynchronously, before reconciliation may
    /// correct its hour.
    pub summary_settle_s: i64,
    /// Maximum events sent to Stripe per second.
    pub max_events_per_second: u32,
    /// Maximum requests to Stripe in flight at once.
    pub max_concurrent_requests: usize,
    /// First retry delay after a failure.
    pub retry_base: Duration,
    /// Maximum retry delay.
    pub retry_cap: Duration,
    /// Stripe event names of the meters.
    pub names: MeterNames,
    /// Outbox file written when no Stripe key is set.
    pub outbox_path: PathBuf,
    /// Whether to export `veo_customer_usage_total` per customer pseudonym.
    pub customer_usage_metrics: bool,
    /// Base URL of the Prometheus server that scrapes this sidecar, which
    /// reconciliation reads `veo_customer_usage_total` from.
    pub prometheus_url: Option<String>,
}

/// Destination of the meter events.
#[derive(Debug, Clone)]
pub enum Destination {
    /// Stripe's API.
    Stripe(Box<StripeSink>),
    /// The local outbox file.
    File(FileSink),
}

/// Result of one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Events created from closed buckets.
    pub created: usize,
    /// Events accepted, or found already recorded.
    pub sent: usize,
    /// Events parked.
    pub parked: usize,
    /// Events waiting for a Stripe customer.
    pub waiting: usize,
    /// Consecutive failed attempts when the round stopped early; 0 when it
    /// sent everything it could.
    pub failures: u32,
}

/// The billing loop's state.
#[derive(Debug, Clone)]
pub struct Biller {
    store: Store,
    ledger: LedgerKey,
    settings: BillingSettings,
    destination: Destination,
    metrics: Metrics,
    wake: Arc<Notify>,
    /// Whether the outbox file may hold events the store has not marked
    /// sent: at start, and after a write or commit failed. The next write
    /// first reads the file's identifiers and marks those events sent.
    outbox_unchecked: Arc<AtomicBool>,
}

impl Biller {
    /// Creates the loop; [`Biller::run`] starts it.
    pub fn new(
        store: Store,
        ledger: LedgerKey,
        settings: BillingSettings,
        destination: Destination,
        metrics: Metrics,
    ) -> Self {
        Biller {
            store,
            ledger,
            settings,
            destination,
            metrics,
            wake: Arc::new(Notify::new()),
            outbox_unchecked: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Handle that starts a round early, for example after a customer's
    /// Stripe customer was set.
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Returns the store the loop works on.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Returns the ledger's identity, for corrective events.
    pub fn ledger(&self) -> &LedgerKey {
        &self.ledger
    }

    /// Returns the base URL of the Prometheus server that reconciliation
    /// reads usage from, if one is configured.
    pub fn prometheus_url(&self) -> Option<&str> {
        self.settings.prometheus_url.as_deref()
    }

    /// Returns the seconds a sent event is given to show in Stripe's
    /// summaries.
    pub fn summary_settle_s(&self) -> i64 {
        self.settings.summary_settle_s
    }

    /// Returns the Stripe sink when events go to Stripe.
    pub fn stripe(&self) -> Option<&StripeSink> {
        match &self.destination {
            Destination::Stripe(sink) => Some(sink),
            Destination::File(_) => None,
        }
    }

    /// Runs rounds every interval until `stop` turns true, then runs one
    /// last round that bills every bucket, open ones included, so no usage
    /// waits for the next start. Usage of those minutes that arrives later
    /// is billed as one more event per bucket.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let report = self.round(failures, false).await;
            failures = report.failures;
            let delay = if failures > 0 {
                backoff(failures, self.settings.retry_base, self.settings.retry_cap)
            } else {
                self.settings.interval
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.wake.notified() => {}
                _ = stop.changed() => {
                    let _ = self.round(0, true).await;
                    return;
                }
            }
        }
    }

    /// Closes buckets (every one with `close_all`) and sends the queue
    /// once; `failures` is the number of failed attempts in a row before
    /// this round.
    pub async fn round(&self, failures: u32, close_all: bool) -> RoundReport {
        let mut report = RoundReport {
            failures,
            ..RoundReport::default()
        };
        match self.close(close_all).await {
            Ok(created) => report.created = created,
            Err(err) => {
                error!(error = %err, "failed to turn closed minutes into meter events; retrying next round")
            }
        }
        if let Err(err) = self.send_queue(&mut report).await {
            error!(error = %err, "failed to read or update the meter event queue; retrying next round");
        }
        if let Ok(counts) = self
            .store
            .read("count meter events", |conn| queue::counts(conn))
            .await
        {
            self.metrics.meter_events_pending.set(counts.pending);
            self.metrics.meter_events_parked_now.set(counts.parked);
        }
        if report.created > 0 || report.sent > 0 || report.parked > 0 {
            info!(
                created = report.created,
                sent = report.sent,
                parked = report.parked,
                waiting = report.waiting,
                "billing round"
            );
        }
        report
    }

    async fn close(&self, close_all: bool) -> Result<usize, StoreError> {
        let mut created = 0;
        loop {
            let ledger = self.ledger.clone();
            let delay = i64::try_from(self.settings.close_delay.as_secs()).unwrap_or(i64::MAX);
            let delay = (!close_all).then_some(delay);
            let now = unix_now_s();
            let batch = self
                .store
                .write("close minute buckets", move |conn| {
                    queue::close_buckets(conn, &ledger, now, delay, CLOSE_LIMIT)
                })
                .await?;
            created += batch;
            if batch < CLOSE_LIMIT {
                return Ok(created);
            }
        }
    }

    async fn send_queue(&self, report: &mut RoundReport) -> Result<(), StoreError> {
        let mut after = 0;
        let mut pacer = Pacer::new(self.settings.max_events_per_second);
        loop {
            let events = self
                .store
                .read("read meter events", move |conn| {
                    queue::pending(conn, after, READ_LIMIT)
                })
                .await?;
            let Some(last) = events.last() else {
                return Ok(());
            };
            after = last.id;
            let stop = match &self.destination {
                Destination::File(sink) => self.write_file(sink, events, report).await?,
                Destination::Stripe(sink) => {
                    self.send_stripe(sink, events, report, &mut pacer).await?
                }
            };
            if stop {
                return Ok(());
            }
        }
    }

    async fn write_file(
        &self,
        sink: &FileSink,
        events: Vec<QueuedEvent>,
        report: &mut RoundReport,
    ) -> Result<bool, StoreError> {
        // The file is read by the billing system that consumes it, so it
        // names customers and Stripe customers by id rather than by the
        // store's pseudonyms. An event whose customer has no identity was
        // deleted by an erasure after it was read, so it is left out. An
        // identity that cannot be read stops the round, because marking its
        // event sent would lose it.
        let mut events = events;
        if self.outbox_unchecked.load(Ordering::Acquire) {
            match self.recover_outbox_file(sink).await {
                Ok(written) => {
                    events.retain(|event| !written.contains(&event.identifier));
                    self.outbox_unchecked.store(false, Ordering::Release);
                }
                Err(err) => {
                    report.failures = report.failures.saturating_add(1);
                    error!(
                        path = %sink.path().display(),
                        error = %err,
                        "failed to read the outbox file or to mark the events it holds as sent; \
                         writing no event until that works, so that none is written twice"
                    );
                    return Ok(true);
                }
            }
        }
        let identities = self.store.identities().clone();
        let read = events.clone();
        let named = self
            .store
            .read("name the meter events' customers", move |conn| {
                let mut revealer = identities.revealer();
                let mut named = Vec::with_capacity(read.len());
                for event in read {
                    let customer = revealer.reveal(conn, &event.customer).map_err(to_sql)?;
                    let Some(customer) = customer else {
                        continue;
                    };
                    let stripe_customer_id = match &event.stripe_pseudonym {
                        Some(pseudonym) => {
                            revealer.reveal_stripe(conn, pseudonym).map_err(to_sql)?
                        }
                        None => None,
                    };
                    named.push(NamedEvent {
                        event,
                        customer,
                        stripe_customer_id,
                    });
                }
                Ok(named)
            })
            .await?;
        let writer = sink.clone();
        let written = tokio::task::spawn_blocking(move || writer.write(&named)).await;
        if !matches!(written, Ok(Ok(()))) {
            // Part of the events may be in the file.
            self.outbox_unchecked.store(true, Ordering::Release);
        }
        match written {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                report.failures = report.failures.saturating_add(1);
                error!(path = %sink.path().display(), error = %err, "failed to write the outbox file; retrying");
                return Ok(true);
            }
            Err(err) => {
                report.failures = report.failures.saturating_add(1);
                error!(error = %err, "outbox file write did not finish; retrying");
                return Ok(true);
            }
        }
        let ids: Vec<(i64, Option<String>)> = events
            .iter()
            .map(|event| (event.id, event.stripe_pseudonym.clone()))
            .collect();
        let now = unix_now_s();
        let marked = self
            .store
            .write("mark meter events sent", move |conn| {
                queue::mark_sent(conn, &ids, now)
            })
            .await;
        if marked.is_err() {
            // The events are in the file but still pending in the store.
            self.outbox_unchecked.store(true, Ordering::Release);
        }
        marked?;
        for event in &events {
            self.count_sent(event, "written");
        }
        report.sent += events.len();
        report.failures = 0;
        Ok(false)
    }

    /// Sends events in queue order, `max_concurrent_requests` at a time.
    /// Returns true when a transient failure stopped the round.
    async fn send_stripe(
        &self,
        sink: &StripeSink,
        events: Vec<QueuedEvent>,
        report: &mut RoundReport,
        pacer: &mut Pacer,
    ) -> Result<bool, StoreError> {
        let now = unix_now_s();
        let mut ready = Vec::new();
        for event in events {
            if event.minute_unix_s < now - MAX_EVENT_AGE_S {
                let reason = format!(
                    "timestamp {} is older than the 35 days Stripe accepts; bill it by hand",
                    event.minute_unix_s
                );
                self.park(&event, reason).await?;
                report.parked += 1;
                continue;
            }
            if event.stripe_pseudonym.is_none() {
                report.waiting += 1;
                continue;
            }
            if event.minute_unix_s > now + MAX_EVENT_LEAD_S {
                // Usage from a filter whose clock runs ahead: Stripe takes
                // no timestamp more than 5 minutes ahead, so the event
                // waits until its time.
                report.waiting += 1;
                continue;
            }
            ready.push(event);
        }
        if report.waiting > 0 {
            debug!(
                events = report.waiting,
                "meter events wait for their customers' Stripe customer; set it with SetStripeCustomer"
            );
        }

        let (ready, unreadable) = self.reveal_stripe_customers(ready).await?;
        for event in unreadable {
            let reason = "the Stripe customer's id is missing from stripe_identity or its data \
                          key is gone; set the customer's Stripe customer again to queue it"
                .to_owned();
            warn!(
                identifier = event.identifier,
                customer_pseudonym = event.customer,
                reason,
                "parked a meter event whose Stripe customer cannot be read"
            );
            self.park(&event, reason).await?;
            report.parked += 1;
        }

        // A sliding window: a new send starts as soon as one finishes,
        // until a transient failure stops new sends. The outcomes are
        // written once for the whole read, which costs one commit (and one
        // fsync) per read instead of one per event. A crash before that
        // commit only makes the next start send those events again, which
        // Stripe reports as already recorded.
        let concurrency = self.settings.max_concurrent_requests.max(1);
        let mut in_flight = JoinSet::new();
        let mut outcomes: Vec<Option<SendOutcome>> = vec![None; ready.len()];
        let mut next = 0;
        let mut stopped = false;
        loop {
            while !stopped && next < ready.len() && in_flight.len() < concurrency {
                pacer.wait().await;
                let sink = sink.clone();
                let (event, stripe_customer_id) = ready[next].clone();
                let index = next;
                in_flight
                    .spawn(async move { (index, sink.send(&event, &stripe_customer_id).await) });
                next += 1;
            }
            match in_flight.join_next().await {
                None => break,
                Some(Ok((index, outcome))) => {
                    stopped |=
                        matches!(outcome, SendOutcome::Retry(_) | SendOutcome::RetryNewKey(_));
                    if let Some(slot) = outcomes.get_mut(index) {
                        *slot = Some(outcome);
                    }
                }
                Some(Err(err)) => {
                    stopped = true;
                    error!(error = %err, "a meter event send task failed; the event stays queued");
                }
            }
        }

        let mut sent_ids = Vec::new();
        let mut retry = false;
        for ((event, _), outcome) in ready.iter().zip(outcomes) {
            match outcome {
                None => {}
                Some(SendOutcome::Accepted) => {
                    sent_ids.push((event.id, event.stripe_pseudonym.clone()));
                    self.count_sent(event, "accepted");
                }
                Some(SendOutcome::AlreadyRecorded) => {
                    sent_ids.push((event.id, event.stripe_pseudonym.clone()));
                    self.count_sent(event, "already_recorded");
                    info!(
                        identifier = event.identifier,
                        "Stripe already has this meter event; marked sent"
                    );
                }
                Some(SendOutcome::Reject(reason)) => {
                    warn!(
                        identifier = event.identifier,
                        customer_pseudonym = event.customer,
                        meter = event.meter.name(),
                        reason,
                        "Stripe rejected a meter event for good; parked, list them with `veo-sidecar parked-events`"
                    );
                    self.park(event, reason).await?;
                    report.parked += 1;
                }
                Some(SendOutcome::Retry(reason)) => {
                    retry = true;
                    self.record_retry(event, reason, false).await?;
                }
                Some(SendOutcome::RetryNewKey(reason)) => {
                    retry = true;
                    self.record_retry(event, reason, true).await?;
                }
            }
        }
        report.sent += sent_ids.len();
        let now = unix_now_s();
        self.store
            .write("mark meter events sent", move |conn| {
                queue::mark_sent(conn, &sent_ids, now)
            })
            .await?;
        if retry || stopped {
            report.failures = report.failures.saturating_add(1);
            return Ok(true);
        }
        report.failures = 0;
        Ok(false)
    }

    /// Pairs each event with the id of its Stripe customer, read from the
    /// encrypted identity its pseudonym names. Also returns the events whose
    /// Stripe customer has no identity row or data key, which can never be
    /// sent as they are.
    async fn reveal_stripe_customers(
        &self,
        events: Vec<QueuedEvent>,
    ) -> Result<(Vec<(QueuedEvent, String)>, Vec<QueuedEvent>), StoreError> {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let identities = self.store.identities().clone();
        self.store
            .read("read the meter events' Stripe customers", move |conn| {
                let mut revealer = identities.revealer();
                let mut named = Vec::with_capacity(events.len());
                let mut unreadable = Vec::new();
                for event in events {
                    let Some(pseudonym) = &event.stripe_pseudonym else {
                        continue;
                    };
                    match revealer.reveal_stripe(conn, pseudonym).map_err(to_sql)? {
                        Some(stripe_id) => named.push((event, stripe_id)),
                        None => unreadable.push(event),
                    }
                }
                Ok((named, unreadable))
            })
            .await
    }

    /// Counts a failed attempt of `event` that the next round retries,
    /// with the next idempotency key when `new_key` is set.
    async fn record_retry(
        &self,
        event: &QueuedEvent,
        reason: String,
        new_key: bool,
    ) -> Result<(), StoreError> {
        self.metrics.meter_event_retries.inc();
        let id = event.id;
        let logged = reason.clone();
        let stripe_pseudonym = event.stripe_pseudonym.clone().unwrap_or_default();
        self.store
            .write("count a meter event attempt", move |conn| {
                queue::record_attempt(conn, id, &stripe_pseudonym, &logged, new_key)
            })
            .await?;
        warn!(
            identifier = event.identifier,
            attempts = event.attempts + 1,
            new_idempotency_key = new_key,
            reason,
            "failed to send a meter event; retrying after a backoff"
        );
        Ok(())
    }

    async fn park(&self, event: &QueuedEvent, reason: String) -> Result<(), StoreError> {
        self.metrics
            .meter_events_parked
            .with_label_values(&[event.meter.name()])
            .inc();
        let id = event.id;
        self.store
            .write("park a meter event", move |conn| {
                queue::park(conn, id, &reason)
            })
            .await
    }

    fn count_sent(&self, event: &QueuedEvent, outcome: &str) {
        self.metrics
            .meter_events_sent
            .with_label_values(&[event.meter.name(), outcome])
            .inc();
        self.metrics
            .billed_usage
            .with_label_values(&[event.meter.name()])
            .inc_by(u64::try_from(event.value).unwrap_or(0));
    }

    /// Marks events already in the outbox file as sent, so a crash or a
    /// failed commit between the file write and the store's commit writes
    /// no event twice. Returns the identifiers in the file.
    async fn recover_outbox_file(
        &self,
        sink: &FileSink,
    ) -> Result<HashSet<String>, Box<dyn std::error::Error + Send + Sync>> {
        let reader = sink.clone();
        let written = tokio::task::spawn_blocking(move || reader.written_identifiers()).await??;
        if written.is_empty() {
            return Ok(written);
        }
        let identifiers: Vec<String> = written.iter().cloned().collect();
        let now = unix_now_s();
        let recovered = self
            .store
            .write("recover the outbox file", move |conn| {
                queue::mark_sent_by_identifier(conn, &identifiers, now)
            })
            .await?;
        if recovered > 0 {
            info!(
                events = recovered,
                "meter events found in the outbox file but not marked sent; marked sent now"
            );
        }
        Ok(written)
    }
}

/// A token bucket that lets at most `per_second` sends start per second,
/// with bursts of up to 20 ms worth. Sleeping once per burst rather than
/// once per send matters because tokio's timers have millisecond
/// resolution.
#[derive(Debug)]
struct Pacer {
    per_second: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl Pacer {
    fn new(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        let capacity = (per_second / 50.0).max(1.0);
        Pacer {
            per_second,
            capacity,
            tokens: capacity,
            refilled: Instant::now(),
        }
    }

    async fn wait(&mut self) {
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(self.refilled).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
            self.refilled = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.per_second;
            tokio::time::sleep(Duration::from_secs_f64(wait.max(0.001))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pacer_holds_the_rate() {
        let mut pacer = Pacer::new(1_000);
        let started = Instant::now();
        for _ in 0..300 {
            pacer.wait().await;
        }
        let elapsed = started.elapsed();
        // 300 sends at 1,000 per second take at least 280 ms after the
        // first burst of 20.
        assert!(elapsed >= Duration::from_millis(270), "{elapsed:?}");
    }
}
