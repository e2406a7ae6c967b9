//! The sync role, run once per Envoy instance as a singleton on the main
//! thread: on each timer tick it drains the usage queue, takes the pending
//! usage out of the announced limiter records, and sends one batch per
//! interval to the sidecar with `veo.sync.v1.Sync/Sync`.
//!
//! One call is in flight at a time. A batch is resent unchanged, with the
//! same sequence number, until the sidecar acknowledges it, while new
//! usage collects for the next batch. The sequence advances only on
//! success, so the sidecar applies every batch once. Only a batch the
//! sidecar rejects for good is changed before it is resent (see
//! [`rejected`]). When there is no usage
//! to send, the tick sends a poll (a batch without usage) for the reply
//! alone: on the first tick, while the last reply named any customer, after
//! applying erased customers (to acknowledge them), and at least once per
//! [`HEARTBEAT`] otherwise, so an idle instance still receives the pushed
//! sets.
//!
//! Each reply's view of other instances is written into the customers'
//! limiter records, where the request path reads it at no extra cost. The
//! reply also sets the next interval, shorter near a quota, and reports
//! whether the counters shared with other sidecars are reachable. It may
//! carry tier limits, customer tier overrides, the asset region registry
//! and erased customers. The workers read the state and these sets from
//! shared data on their own timer.

pub mod assets;
pub mod backlog;
pub mod batch;
pub mod erasures;
pub mod instance;
pub mod overrides;
pub mod rejected;

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use veo_proto::sync::{SyncRequest, SyncResponse, TierLimits};

use crate::config::{SidecarSettings, Tier, Tiers};
use crate::geo::Geo;
use crate::host::{Host, LogLevel, SetError};
use crate::limiter::record::{Record, RemoteState};
use crate::limiter::{Limiter, slot_key};
use crate::metrics::{Counter, Metrics};
use crate::usage::{EgressUsage, PendingUsage, UsageMessage};
pub use assets::{ASSETS_KEY, decode_asset_regions};
use batch::{Batch, UsageKey, UsageTotals, Versions};
use erasures::ErasureState;
pub use erasures::{ERASURES_KEY, ErasureTable, decode_erasures};
pub use overrides::{OVERRIDES_KEY, OverrideTable, decode_overrides};

/// gRPC service of the sync call.
pub const SERVICE: &str = "veo.sync.v1.Sync";
/// gRPC method of the sync call.
pub const METHOD: &str = "Sync";
/// Shared-data key of the sync state the workers read: one byte, 1 while
/// the shared counters are unreachable, else 0.
pub const STATE_KEY: &str = "veo.sync.state";

/// Shared-data key of the tier limits the sidecar pushed, as an encoded
/// `SyncResponse` with only its `tiers` set; empty when the plugin
/// configuration's limits apply.
pub const TIERS_KEY: &str = "veo.sync.tiers";

/// Compare-and-swap attempts to take one record's pending usage before
/// the slot is left for the next tick.
const TAKE_ATTEMPTS: u32 = 16;

/// Failed sync calls in a row after which the shared counters count as
/// unreachable.
pub const DEGRADED_AFTER_FAILURES: u32 = 2;

/// gRPC status code for success.
const GRPC_OK: u32 = 0;

/// The call in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    token: u32,
    poll: bool,
}

/// State of the sync role.
#[derive(Debug)]
pub struct Sync {
    settings: SidecarSettings,
    instance_id: String,
    queue_id: u32,
    metrics: Metrics,
    /// Tiers of the plugin configuration.
    base_tiers: Tiers,
    /// Tiers in force: the configured ones with the pushed limits.
    tiers: Tiers,
    /// The pushed limits last seen, encoded as in [`TIERS_KEY`]; `None`
    /// until the first reply, so that it publishes whatever it carries.
    pushed_tiers: Option<Vec<u8>>,
    /// Version of the tier overrides last published under
    /// [`OVERRIDES_KEY`]; 0 before the first.
    overrides_version: u64,
    /// Geo-fencing settings of the plugin configuration, to check pushed
    /// asset regions against.
    geo: Option<Geo>,
    /// Version of the asset regions last published under [`ASSETS_KEY`];
    /// 0 before the first.
    asset_regions_version: u64,
    /// Erased customers received and the purge of their data.
    erasures: ErasureState,
    limiter: Limiter,
    collected: BTreeMap<UsageKey, UsageTotals>,
    retry_slots: Vec<u32>,
    unacknowledged: Option<Batch>,
    /// Records split off a batch that the sidecar rejected as too large.
    /// They go out in the next batches once the first half is applied as
    /// new, and are dropped if the sidecar reports it as a duplicate,
    /// because then an earlier attempt had applied the whole batch.
    held_back: Vec<veo_proto::sync::UsageRecord>,
    in_flight: Option<InFlight>,
    next_sequence: u64,
    failing: bool,
    consecutive_failures: u32,
    degraded: bool,
    /// Whether `degraded` was written to [`STATE_KEY`] at least once.
    state_published: bool,
    poll_due: bool,
    /// Time of the last reply, in milliseconds since the Unix epoch; `None`
    /// before the first.
    last_reply_ms: Option<u64>,
    interval: Duration,
}

/// Maximum time an idle instance goes without a call to the sidecar.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

impl Sync {
    /// Creates the sync role. `instance_id` identifies this Envoy
    /// instance and VM to the sidecar; `queue_id` is the registered usage
    /// queue; `tiers`, `limiter` and `geo` are the filter's.
    pub fn new(
        settings: SidecarSettings,
        instance_id: String,
        queue_id: u32,
        metrics: Metrics,
        tiers: Tiers,
        limiter: Limiter,
        geo: Option<Geo>,
    ) -> Self {
        Self {
            interval: settings.sync_interval,
            settings,
            instance_id,
            queue_id,
            metrics,
            base_tiers: tiers.clone(),
            tiers,
            pushed_tiers: None,
            overrides_version: 0,
            geo,
            asset_regions_version: 0,
            erasures: ErasureState::default(),
            limiter,
            collected: BTreeMap::new(),
            retry_slots: Vec::new(),
            unacknowledged: None,
            held_back: Vec::new(),
            in_flight: None,
            next_sequence: 1,
            failing: false,
            consecutive_failures: 0,
            degraded: false,
            state_published: false,
            poll_due: false,
            last_reply_ms: None,
        }
    }

    /// Applies new settings, tiers, limiter table and geo-fencing settings
    /// from a configuration update.
    pub fn reconfigure(
        &mut self,
        settings: SidecarSettings,
        tiers: Tiers,
        limiter: Limiter,
        geo: Option<Geo>,
    ) {
        self.interval = settings.sync_interval;
        self.settings = settings;
        self.base_tiers = tiers.clone();
        self.tiers = tiers;
        // Unknown, so the next reply publishes its limits, none included.
        self.pushed_tiers = None;
        self.limiter = limiter;
        self.geo = geo;
    }

    /// Returns the instance id sent with every batch.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// Returns the current timer period of the role.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Collects usage, then sends a batch or a poll unless a call is in
    /// flight.
    pub fn on_tick(&mut self, host: &impl Host) {
        self.collect(host);
        self.bound_backlog(host);
        self.finish_erasures(host);
        self.metrics.flush(host);
        if self.in_flight.is_some() {
            return;
        }

        if self.unacknowledged.is_none() && !self.held_back.is_empty() {
            let created_unix_ms = i64::try_from(host.now_ms()).unwrap_or(i64::MAX);
            let count = self.held_back.len().min(batch::MAX_RECORDS_PER_BATCH);
            let usage: Vec<_> = self.held_back.drain(..count).collect();
            self.unacknowledged = Some(Batch::from_records(
                usage,
                &self.instance_id,
                self.next_sequence,
                created_unix_ms,
                self.versions(),
            ));
        }
        if self.unacknowledged.is_none() && !self.collected.is_empty() {
            let created_unix_ms = i64::try_from(host.now_ms()).unwrap_or(i64::MAX);
            let versions = self.versions();
            let tiers = &self.tiers;
            // The batch is resent with these versions until it is
            // acknowledged. A version that is stale by then only makes the
            // sidecar send the set in force again, which changes nothing.
            let batch = Batch::take(
                &mut self.collected,
                &self.instance_id,
                self.next_sequence,
                created_unix_ms,
                versions,
                |name| {
                    let index = tiers.resolve(Some(name));
                    let tier = tiers.get(index);
                    (tier.name == name).then_some(tier.quota).flatten()
                },
            );
            self.unacknowledged = Some(batch);
        }
        // Poll now when waiting for the next tick would leave more than the
        // heartbeat since the last reply.
        let heartbeat_ms = u64::try_from(HEARTBEAT.as_millis()).unwrap_or(u64::MAX);
        let interval_ms = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let heartbeat_due = self.last_reply_ms.is_none_or(|at| {
            host.now_ms().saturating_sub(at).saturating_add(interval_ms) > heartbeat_ms
        });
        let (message, poll) = match &self.unacknowledged {
            Some(batch) => (batch.encoded.clone(), false),
            None if self.poll_due || heartbeat_due => (self.poll_message(host), true),
            None => return,
        };

        let dispatched = host.dispatch_grpc_call(
            &self.settings.cluster,
            SERVICE,
            METHOD,
            &message,
            self.settings.timeout,
        );
        match dispatched {
            Ok(token) => {
                self.in_flight = Some(InFlight { token, poll });
                self.metrics.add(Counter::SyncBatchesSent, 1);
            }
            Err(error) => self.fail(host, &format!("dispatch failed: {error}")),
        }
        self.metrics.flush(host);
    }

    /// Handles the reply to a sync call: `status` is the gRPC status code,
    /// `message` the status message of a failed call as Envoy passes it
    /// (percent-encoded) and `body` the encoded `SyncResponse`.
    pub fn on_response(
        &mut self,
        host: &impl Host,
        token: u32,
        status: u32,
        message: Option<&str>,
        body: Option<&[u8]>,
    ) {
        let Some(call) = self.in_flight.filter(|call| call.token == token) else {
            return;
        };
        self.in_flight = None;
        if status != GRPC_OK {
            let message = rejected::decode_message(message.unwrap_or_default());
            if !call.poll && self.reshape_rejected(host, status, &message) {
                // The sidecar replied, so this is no sign that it is
                // unreachable, and the changed batch goes out on the next
                // tick.
                self.metrics.add(Counter::SyncFailures, 1);
                let interval = self.settings.sync_interval;
                self.set_interval(host, interval);
            } else {
                self.fail(host, &format!("grpc_status={status} message={message:?}"));
            }
            self.metrics.flush(host);
            return;
        }
        let reply = match SyncResponse::decode(body.unwrap_or_default()) {
            Ok(reply) => reply,
            Err(error) => {
                self.fail(host, &format!("invalid reply: {error}"));
                self.metrics.flush(host);
                return;
            }
        };
        self.consecutive_failures = 0;
        if self.last_reply_ms.is_none() {
            // Envoy 1.40.0 has been seen to start two sync roles, of which
            // only one ever sent; this line names the one that does.
            host.log(
                LogLevel::Info,
                &format!(
                    "usage sync connected instance_id={} cluster={}",
                    self.instance_id, self.settings.cluster
                ),
            );
        }
        self.last_reply_ms = Some(host.now_ms());
        if self.failing {
            self.failing = false;
            host.log(
                LogLevel::Info,
                &format!(
                    "sidecar sync recovered cluster={} sequence={}",
                    self.settings.cluster,
                    self.next_sequence.saturating_sub(1)
                ),
            );
        }
        if !call.poll
            && let Some(batch) = self.unacknowledged.take()
        {
            self.next_sequence = batch.sequence + 1;
            if reply.duplicate && !self.held_back.is_empty() {
                host.log(
                    LogLevel::Info,
                    &format!(
                        "the sidecar had applied batch sequence={} whole before it was split, \
                         so the {} records held back from it are not sent again",
                        batch.sequence,
                        self.held_back.len()
                    ),
                );
                self.held_back.clear();
            }
            let level = if reply.duplicate {
                LogLevel::Info
            } else {
                LogLevel::Debug
            };
            host.log(
                level,
                &format!(
                    "sync batch acknowledged sequence={} records={} duplicate={} \
                     applied_sequence={}",
                    batch.sequence, batch.records, reply.duplicate, reply.applied_sequence
                ),
            );
        }
        self.apply_reply(host, &reply);
        self.metrics.flush(host);
    }

    /// Changes the unacknowledged batch that the sidecar rejected with
    /// `status` and `message` when resending it unchanged cannot succeed
    /// (see [`rejected`]), and returns whether it did. A dropped record is
    /// logged and counted in `veo.usage_rejected_records_total`. The
    /// second half of a halved batch is held back until the first half is
    /// acknowledged. The changed batch keeps its sequence number, because
    /// the sidecar checks for a duplicate before it validates a batch, so
    /// it applied none of it. A batch left empty gives up its sequence
    /// number, in case an earlier attempt was applied by a sidecar that
    /// validates first.
    fn reshape_rejected(&mut self, host: &impl Host, status: u32, message: &str) -> bool {
        let Some(batch) = &self.unacknowledged else {
            return false;
        };
        let reshape = rejected::reshape_for(status, message, batch.records);
        if reshape == rejected::Reshape::Keep {
            return false;
        }
        let Ok(mut request) = SyncRequest::decode(batch.encoded.as_slice()) else {
            return false;
        };
        let sequence = batch.sequence;
        let removed = rejected::apply(&mut request, reshape);
        match reshape {
            rejected::Reshape::DropRecord(_) => {
                for record in &removed {
                    self.metrics.add(Counter::UsageRejectedRecords, 1);
                    host.log(
                        LogLevel::Error,
                        &format!(
                            "sidecar rejected a usage record, which is dropped: customer={:?} \
                             tier={:?} minute_unix_s={} admitted={} refused={} egress_bytes={} \
                             error={message:?}; check that the filter and the sidecar are of \
                             the same version",
                            record.customer,
                            record.tier,
                            record.minute_unix_s,
                            record.admitted_requests,
                            record.refused_requests,
                            record.egress_bytes
                        ),
                    );
                }
            }
            rejected::Reshape::Halve => {
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "sidecar rejected a batch of {} usage records as too large, so it is \
                         sent in halves; check the message size limits between the filter and \
                         the sidecar error={message:?}",
                        request.usage.len() + removed.len()
                    ),
                );
                self.held_back.splice(0..0, removed);
            }
            rejected::Reshape::Keep => {}
        }
        if request.usage.is_empty() {
            self.unacknowledged = None;
            self.next_sequence = sequence + 1;
        } else {
            self.unacknowledged = Some(Batch::from_request(&request));
        }
        true
    }

    /// Returns the sequence number of the unacknowledged batch, if any.
    pub fn pending_sequence(&self) -> Option<u64> {
        self.unacknowledged.as_ref().map(|batch| batch.sequence)
    }

    /// Returns whether a call is in flight.
    pub fn is_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Returns whether the shared counters count as unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded
    }

    fn poll_message(&self, host: &impl Host) -> Vec<u8> {
        let versions = self.versions();
        SyncRequest {
            instance_id: self.instance_id.clone(),
            sequence: self.next_sequence.saturating_sub(1),
            created_unix_ms: i64::try_from(host.now_ms()).unwrap_or(i64::MAX),
            usage: Vec::new(),
            tier_overrides_version: versions.tier_overrides,
            asset_regions_version: versions.asset_regions,
            erasures_version: versions.erasures,
        }
        .encode_to_vec()
    }

    /// Returns the versions of the pushed sets this instance applies.
    fn versions(&self) -> Versions {
        Versions {
            tier_overrides: self.overrides_version,
            asset_regions: self.asset_regions_version,
            erasures: self.erasures_version(),
        }
    }

    /// Writes the reply's view of other instances into the limiter
    /// records, then applies its interval and degraded state.
    fn apply_reply(&mut self, host: &impl Host, reply: &SyncResponse) {
        let now_ms = host.now_ms();
        let mut missing = 0usize;
        for usage in &reply.remote_usage {
            let remote = RemoteState {
                others_admitted: u32::try_from(usage.admitted_requests).unwrap_or(u32::MAX),
                cap: usage
                    .instance_cap_requests
                    .map(|cap| u32::try_from(cap).unwrap_or(u32::MAX - 1)),
                updated_ms: now_ms,
                cap_quota: usage
                    .cap_quota_requests
                    .map(|quota| u32::try_from(quota).unwrap_or(u32::MAX)),
            };
            match self.limiter.set_remote(host, &usage.customer, remote) {
                Ok(true) => {}
                Ok(false) => missing += 1,
                Err(error) => host.log(
                    LogLevel::Warn,
                    &format!(
                        "failed to store remote usage customer={} error={error}; the next \
                         reply updates it",
                        usage.customer
                    ),
                ),
            }
        }
        if missing > 0 {
            host.log(
                LogLevel::Debug,
                &format!(
                    "skipped remote usage of {missing} customers without a record on this instance"
                ),
            );
        }
        self.poll_due = !reply.remote_usage.is_empty();
        self.set_degraded(host, reply.counters_degraded);
        self.apply_tiers(host, &reply.tiers);
        self.apply_overrides(host, reply.tier_overrides.as_ref());
        self.apply_asset_regions(host, reply.asset_regions.as_ref());
        self.apply_erasures(host, reply.erasures.as_ref());

        let interval = match reply.next_sync_ms {
            0 => self.settings.sync_interval,
            ms => Duration::from_millis(u64::from(ms)).min(self.settings.sync_interval),
        };
        self.set_interval(host, interval);
    }

    /// Publishes tier limits the sidecar pushed, when they changed, for
    /// the workers to apply on their next tick. Limits never reset a
    /// customer's counters: the same log is checked against the new quota.
    fn apply_tiers(&mut self, host: &impl Host, pushed: &[TierLimits]) {
        let bytes = if pushed.is_empty() {
            Vec::new()
        } else {
            SyncResponse {
                tiers: pushed.to_vec(),
                ..SyncResponse::default()
            }
            .encode_to_vec()
        };
        if self.pushed_tiers.as_ref() == Some(&bytes) {
            return;
        }
        let tiers = match self.base_tiers.with_pushed(pushed) {
            Ok((tiers, unknown)) => {
                if !unknown.is_empty() {
                    host.log(
                        LogLevel::Warn,
                        &format!(
                            "ignoring sidecar limits of tiers the plugin configuration does \
                             not define: {}; add them to `tiers` to use them",
                            unknown.join(", ")
                        ),
                    );
                }
                tiers
            }
            Err(error) => {
                host.log(
                    LogLevel::Error,
                    &format!("ignoring tier limits from the sidecar: {error}"),
                );
                self.pushed_tiers = Some(bytes);
                return;
            }
        };
        if let Err(error) = host.set_shared_data(TIERS_KEY, &bytes, None) {
            host.log(
                LogLevel::Error,
                &format!("failed to publish tier limits: {error}"),
            );
            return;
        }
        let summary: Vec<String> = tiers.all().iter().map(describe_tier).collect();
        host.log(
            LogLevel::Info,
            &format!("tier limits in force: {}", summary.join("; ")),
        );
        self.tiers = tiers;
        self.pushed_tiers = Some(bytes);
    }

    fn set_interval(&mut self, host: &impl Host, interval: Duration) {
        if interval == self.interval {
            return;
        }
        match host.set_tick_period(interval) {
            Ok(()) => self.interval = interval,
            Err(error) => host.log(
                LogLevel::Warn,
                &format!(
                    "failed to set the sync interval to {} ms: {error}",
                    interval.as_millis()
                ),
            ),
        }
    }

    /// Publishes whether the shared counters are unreachable, for the
    /// workers' failure policies.
    fn set_degraded(&mut self, host: &impl Host, degraded: bool) {
        if degraded {
            self.metrics.add(Counter::SyncDegraded, 1);
        }
        // The first call always publishes: a reloaded VM may find the
        // state of its predecessor in shared data.
        if degraded == self.degraded && self.state_published {
            return;
        }
        let changed = degraded != self.degraded;
        match host.set_shared_data(STATE_KEY, &[u8::from(degraded)], None) {
            Ok(()) => {
                self.degraded = degraded;
                self.state_published = true;
            }
            Err(error) => {
                host.log(
                    LogLevel::Error,
                    &format!("failed to publish the sync state: {error}"),
                );
                return;
            }
        }
        if !changed {
            return;
        }
        if degraded {
            host.log(
                LogLevel::Warn,
                "shared counters unreachable; each tier's failure policy applies until \
                 they are back",
            );
        } else {
            host.log(LogLevel::Info, "shared counters reachable again");
        }
    }

    fn fail(&mut self, host: &impl Host, detail: &str) {
        self.metrics.add(Counter::SyncFailures, 1);
        self.failing = true;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let (sequence, records) = self
            .unacknowledged
            .as_ref()
            .map_or((0, 0), |batch| (batch.sequence, batch.records));
        // Calls start only from the timer and one at a time, so this logs
        // at most once per interval however many requests arrive.
        host.log(
            LogLevel::Warn,
            &format!(
                "sidecar sync failed cluster={} {detail} sequence={sequence} records={records}; \
                 requests are still decided locally and the batch will be resent",
                self.settings.cluster
            ),
        );
        if self.consecutive_failures >= DEGRADED_AFTER_FAILURES {
            self.set_degraded(host, true);
        }
        let interval = self.settings.sync_interval;
        self.set_interval(host, interval);
    }

    /// Drains the usage queue and takes pending usage out of the records
    /// it names.
    fn collect(&mut self, host: &impl Host) {
        let now_s = host.now_ms() / 1000;
        let mut slots = std::mem::take(&mut self.retry_slots);
        loop {
            match host.dequeue_shared_queue(self.queue_id) {
                Ok(Some(bytes)) => match UsageMessage::decode(&bytes) {
                    Some(UsageMessage::Slot(slot)) => slots.push(slot),
                    Some(UsageMessage::Detached { customer, pending }) => {
                        self.add(&customer, pending, now_s);
                    }
                    Some(UsageMessage::Egress(entries)) => self.add_egress(entries, now_s),
                    None => host.log(LogLevel::Warn, "skipped an unreadable usage queue message"),
                },
                Ok(None) => break,
                Err(error) => {
                    host.log(
                        LogLevel::Error,
                        &format!("could not read the usage queue: {error}"),
                    );
                    break;
                }
            }
        }
        slots.sort_unstable();
        slots.dedup();
        for slot in slots {
            if !self.take_pending(host, slot, now_s) {
                self.retry_slots.push(slot);
            }
        }
    }

    /// Moves one record's pending usage into the next batch; returns
    /// false when the record kept changing and should be tried again.
    fn take_pending(&mut self, host: &impl Host, slot: u32, now_s: u64) -> bool {
        let key = slot_key(slot);
        for _ in 0..TAKE_ATTEMPTS {
            let Ok(value) = host.get_shared_data(&key) else {
                return false;
            };
            let record = value.bytes.as_deref().and_then(Record::decode);
            let (Some(mut record), Some(cas)) = (record, value.cas) else {
                return true;
            };
            if record.pending.is_empty() {
                return true;
            }
            let pending = std::mem::take(&mut record.pending);
            match host.set_shared_data(&key, &record.encode(), Some(cas)) {
                Ok(()) => {
                    self.add(&record.customer, pending, now_s);
                    return true;
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Host(_)) => return false,
            }
        }
        false
    }

    /// Keeps the collected usage within `max_backlog_records`, merging
    /// older minutes and, as a last resort, dropping the oldest.
    fn bound_backlog(&mut self, host: &impl Host) {
        let now_minute = u32::try_from(host.now_ms() / 60_000).unwrap_or(u32::MAX);
        let max = self.settings.max_backlog_records;
        let Some(outcome) = backlog::bound(&mut self.collected, now_minute, max) else {
            return;
        };
        let merged = u64::try_from(outcome.merged_records).unwrap_or(u64::MAX);
        self.metrics.add(Counter::BacklogRecordsMerged, merged);
        if outcome.merged_records > 0 {
            host.log(
                LogLevel::Warn,
                &format!(
                    "usage held for the sidecar exceeded sidecar.max_backlog_records={max}; \
                     merged {} records into records of up to {} minutes, counts kept; \
                     check that cluster {} is reachable",
                    outcome.merged_records, outcome.merge_span_minutes, self.settings.cluster
                ),
            );
        }
        if outcome.dropped_records > 0 {
            self.metrics
                .add(Counter::BacklogRequestsDropped, outcome.dropped_admitted);
            self.metrics
                .add(Counter::BacklogBytesDropped, outcome.dropped_egress_bytes);
            host.log(
                LogLevel::Error,
                &format!(
                    "usage held for the sidecar still exceeded \
                     sidecar.max_backlog_records={max} after merging; dropped the {} oldest \
                     records with {} admitted requests, {} refused requests and {} response \
                     bytes; raise the bound or restore cluster {}",
                    outcome.dropped_records,
                    outcome.dropped_admitted,
                    outcome.dropped_refused,
                    outcome.dropped_egress_bytes,
                    self.settings.cluster
                ),
            );
        }
    }

    // NOTE: the collected usage and the unacknowledged batch live only in
    // this VM's memory, so an Envoy restart loses usage not yet
    // acknowledged by the sidecar.
    /// Adds usage to the next batch, unless the customer is erased.
    fn add(&mut self, customer: &str, pending: Vec<PendingUsage>, now_s: u64) {
        if self.is_erased(customer, now_s) {
            return;
        }
        for bucket in pending {
            let key = UsageKey {
                customer: customer.to_owned(),
                tier: bucket.tier,
                minute: bucket.minute,
            };
            let totals = self.collected.entry(key).or_default();
            totals.admitted = totals.admitted.saturating_add(u64::from(bucket.admitted));
            totals.refused = totals.refused.saturating_add(u64::from(bucket.refused));
        }
    }

    /// Adds response body bytes to the usage records of their customer,
    /// tier and minute, the same records that carry the request counts.
    /// Bytes of erased customers are dropped.
    fn add_egress(&mut self, entries: Vec<EgressUsage>, now_s: u64) {
        for entry in entries {
            if self.is_erased(&entry.customer, now_s) {
                continue;
            }
            let key = UsageKey {
                customer: entry.customer,
                tier: entry.tier,
                minute: entry.minute,
            };
            let totals = self.collected.entry(key).or_default();
            totals.egress_bytes = totals.egress_bytes.saturating_add(entry.bytes);
        }
    }
}

/// Describes a tier's limits for a log line.
fn describe_tier(tier: &Tier) -> String {
    let mut parts = Vec::new();
    if let Some(quota) = tier.quota {
        parts.push(format!(
            "{} per {} s",
            quota.requests,
            quota.window_ms / 1000
        ));
    }
    if let Some(burst) = tier.burst {
        parts.push(format!(
            "burst {} at {}/s",
            burst.size, burst.tokens_per_second
        ));
    }
    format!("{} {}", tier.name, parts.join(", "))
}

/// Reads the limits published under [`TIERS_KEY`]; `None` for bytes that
/// do not decode.
pub fn decode_pushed_tiers(bytes: &[u8]) -> Option<Vec<TierLimits>> {
    SyncResponse::decode(bytes).ok().map(|reply| reply.tiers)
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::Duration;

    use veo_proto::sync::{RemoteUsage, SyncRequest, TierLimits, TierOverride, TierOverrides};

    use super::*;
    use crate::filter::Stream;
    use crate::host::MemoryHost;
    use crate::testing::{Instance, NOW_S, claims, es256_token};

    const UNAVAILABLE: u32 = 14;

    fn totals(request: &SyncRequest, customer: &str) -> (u64, u64) {
        request
            .usage
            .iter()
            .filter(|record| record.customer == customer)
            .fold((0, 0), |(admitted, refused), record| {
                (
                    admitted + record.admitted_requests,
                    refused + record.refused_requests,
                )
            })
    }

    fn acknowledge(sequence: u64) -> SyncResponse {
        SyncResponse {
            applied_sequence: sequence,
            ..SyncResponse::default()
        }
    }

    #[test]
    fn tick_sends_one_batch_with_usage() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 5), 3);
        assert_eq!(instance.requests("zeta", 1), 1);
        instance.sync.on_tick(&instance.sync_host);

        let calls = instance.sync_host.grpc_calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].cluster, "veo_sidecar");
        assert_eq!(
            (calls[0].service.as_str(), calls[0].method.as_str()),
            (SERVICE, METHOD)
        );
        assert_eq!(calls[0].timeout, Duration::from_millis(50));
        let (_, request) = instance.last_call();
        assert_eq!(request.instance_id, "node-1/abcd");
        assert_eq!(request.sequence, 1);
        assert_eq!(request.created_unix_ms, (NOW_S * 1000) as i64);
        assert_eq!(totals(&request, "acme"), (3, 2));
        assert_eq!(totals(&request, "zeta"), (1, 0));
        let record = &request.usage[0];
        assert_eq!(record.tier, "basic");
        assert_eq!(record.minute_unix_s, (NOW_S / 60 * 60) as i64);
        assert_eq!(instance.sync_host.counter("veo.sync_batches_sent_total"), 1);
    }

    #[test]
    fn drained_records_hold_no_pending_usage() {
        let mut instance = Instance::new();
        instance.requests("acme", 2);
        instance.sync.on_tick(&instance.sync_host);
        let keys = instance
            .sync_host
            .shared_data_keys(crate::limiter::KEY_PREFIX);
        let bytes = instance.sync_host.peek_shared_data(&keys[0]).unwrap();
        assert!(Record::decode(&bytes).unwrap().pending.is_empty());
    }

    #[test]
    fn only_one_call_is_in_flight() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        instance.sync.on_tick(&instance.sync_host);
        assert_eq!(instance.sync_host.grpc_calls().len(), 1);
        assert!(instance.sync.is_in_flight());
    }

    fn customers(request: &SyncRequest) -> Vec<&str> {
        request
            .usage
            .iter()
            .map(|record| record.customer.as_str())
            .collect()
    }

    /// Fails the call `token` with `status` and `message`.
    fn reject(instance: &mut Instance, token: u32, status: u32, message: &str) {
        instance
            .sync
            .on_response(&instance.sync_host, token, status, Some(message), None);
    }

    #[test]
    fn rejected_record_is_dropped_before_resend() {
        let mut instance = Instance::new();
        instance.requests("acme", 2);
        instance.requests("zeta", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, first) = instance.last_call();
        assert_eq!(customers(&first), ["acme", "zeta"]);

        let message = "invalid usage[0].customer: contains a control character";
        reject(&mut instance, token, rejected::INVALID_ARGUMENT, message);
        instance.sync.on_tick(&instance.sync_host);
        let (token, resent) = instance.last_call();
        assert_eq!(resent.sequence, 1);
        assert_eq!(customers(&resent), ["zeta"]);
        assert_eq!(
            instance
                .sync_host
                .counter("veo.usage_rejected_records_total"),
            1
        );

        // The last record rejected too: nothing is left to send.
        let message = "invalid usage[0].tier: must not be empty";
        reject(&mut instance, token, rejected::INVALID_ARGUMENT, message);
        assert_eq!(instance.sync.pending_sequence(), None);
        instance.requests("beta", 1);
        instance.sync.on_tick(&instance.sync_host);
        // The emptied batch gives up its sequence number.
        let (_, next) = instance.last_call();
        assert_eq!(next.sequence, 2);
        assert_eq!(customers(&next), ["beta"]);
    }

    #[test]
    fn oversized_batch_is_sent_in_halves() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.requests("beta", 1);
        instance.requests("zeta", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();

        let message = "Error, decoded message length too large";
        reject(&mut instance, token, rejected::OUT_OF_RANGE, message);
        // Usage that arrives meanwhile waits for the held-back half.
        instance.requests("zeta", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, first_half) = instance.last_call();
        assert_eq!(first_half.sequence, 1);
        assert_eq!(customers(&first_half), ["acme", "beta"]);
        instance.reply(token, &acknowledge(1));

        instance.sync.on_tick(&instance.sync_host);
        let (token, second_half) = instance.last_call();
        assert_eq!(second_half.sequence, 2);
        assert_eq!(customers(&second_half), ["zeta"]);
        assert_eq!(totals(&second_half, "zeta"), (1, 0));
        instance.reply(token, &acknowledge(2));

        instance.sync.on_tick(&instance.sync_host);
        let (_, later) = instance.last_call();
        assert_eq!(later.sequence, 3);
        assert_eq!(totals(&later, "zeta"), (1, 0));
        assert_eq!(instance.sync_host.counter("veo.sync_degraded_total"), 0);
    }

    #[test]
    fn split_batch_applied_before_drops_held_half() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.requests("zeta", 1);
        instance.sync.on_tick(&instance.sync_host);
        // The first attempt may have been applied: its reply never came.
        let (token, _) = instance.last_call();
        instance
            .sync
            .on_response(&instance.sync_host, token, UNAVAILABLE, None, None);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        reject(&mut instance, token, rejected::OUT_OF_RANGE, "too large");

        instance.sync.on_tick(&instance.sync_host);
        let (token, first_half) = instance.last_call();
        assert_eq!(customers(&first_half), ["acme"]);
        let duplicate = SyncResponse {
            duplicate: true,
            ..acknowledge(1)
        };
        instance.reply(token, &duplicate);

        instance.requests("beta", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(next.sequence, 2);
        assert_eq!(customers(&next), ["beta"]);
    }

    #[test]
    fn rejections_do_not_degrade_the_counters() {
        let mut instance = Instance::new();
        for customer in ["acme", "beta", "zeta"] {
            instance.requests(customer, 1);
        }
        instance.sync.on_tick(&instance.sync_host);
        for _ in 0..2 {
            let (token, _) = instance.last_call();
            let message = "invalid usage[0].tier: must not be empty";
            reject(&mut instance, token, rejected::INVALID_ARGUMENT, message);
            instance.sync.on_tick(&instance.sync_host);
        }
        let (_, resent) = instance.last_call();
        assert_eq!(customers(&resent), ["zeta"]);
        assert!(!instance.sync.is_degraded());
    }

    #[test]
    fn failed_batch_is_resent_unchanged_then_sequence_advances() {
        let mut instance = Instance::new();
        instance.requests("acme", 2);
        instance.sync.on_tick(&instance.sync_host);
        let first = instance.sync_host.grpc_calls().pop().unwrap();
        instance
            .sync
            .on_response(&instance.sync_host, first.token, UNAVAILABLE, None, None);
        assert_eq!(instance.sync.pending_sequence(), Some(1));

        // New usage arrives while the sidecar is down.
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let resent = instance.sync_host.grpc_calls().pop().unwrap();
        assert_eq!(resent.message, first.message);
        instance.reply(resent.token, &acknowledge(1));
        assert_eq!(instance.sync.pending_sequence(), None);

        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(next.sequence, 2);
        assert_eq!(totals(&next, "acme"), (1, 0));
        assert_eq!(instance.sync_host.counter("veo.sync_failures_total"), 1);
    }

    #[test]
    fn failure_logs_once_per_interval() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance
            .sync_host
            .fail_grpc_dispatch(Some(crate::host::HostError(10)));
        for _ in 0..3 {
            // Many requests per interval, one warning per interval.
            instance.requests("acme", 10);
            instance.sync.on_tick(&instance.sync_host);
        }
        let warnings: Vec<String> = instance
            .sync_host
            .logs()
            .into_iter()
            .filter(|(level, line)| {
                *level == LogLevel::Warn && line.contains("sidecar sync failed")
            })
            .map(|(_, line)| line)
            .collect();
        assert_eq!(warnings.len(), 3);
        assert!(warnings[0].contains("sequence=1"), "{}", warnings[0]);
        assert_eq!(instance.sync_host.counter("veo.sync_failures_total"), 3);
        assert_eq!(instance.sync.pending_sequence(), Some(1));
    }

    #[test]
    fn every_request_is_counted_once_across_retries() {
        let mut instance = Instance::new();
        let mut sent = Vec::new();
        let mut admitted = 0;
        for round in 0..6 {
            admitted += instance.requests("acme", 1);
            instance.sync_host.advance_ms(20_000);
            instance.sync.on_tick(&instance.sync_host);
            if let Some(call) = instance.sync_host.grpc_calls().pop()
                && instance.sync.is_in_flight()
            {
                let request = SyncRequest::decode(call.message.as_slice()).unwrap();
                if round % 2 == 0 {
                    instance.sync.on_response(
                        &instance.sync_host,
                        call.token,
                        UNAVAILABLE,
                        None,
                        None,
                    );
                } else {
                    instance.reply(call.token, &acknowledge(request.sequence));
                    sent.push(request);
                }
            }
        }
        // The sidecar comes back: acknowledge until nothing is left.
        for _ in 0..3 {
            instance.sync.on_tick(&instance.sync_host);
            if instance.sync.is_in_flight() {
                let (token, request) = instance.last_call();
                instance.reply(token, &acknowledge(request.sequence));
                sent.push(request);
            }
        }
        let sequences: Vec<u64> = sent.iter().map(|request| request.sequence).collect();
        assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
        let counted: u64 = sent.iter().map(|request| totals(request, "acme").0).sum();
        assert_eq!(counted, admitted as u64);
        assert_eq!(instance.sync.pending_sequence(), None);
    }

    #[test]
    fn evicted_usage_reaches_the_batch() {
        let mut instance = Instance::new();
        let queue_id = instance
            .sync_host
            .resolve_shared_queue("veo_edge", crate::usage::QUEUE_NAME)
            .unwrap()
            .unwrap();
        let message = UsageMessage::Detached {
            customer: "gone".to_owned(),
            pending: vec![PendingUsage {
                minute: 29_000_000,
                tier: "pro".to_owned(),
                admitted: 4,
                refused: 1,
            }],
        };
        instance
            .sync_host
            .enqueue_shared_queue(queue_id, &message.encode())
            .unwrap();
        instance.sync.on_tick(&instance.sync_host);
        let (_, request) = instance.last_call();
        assert_eq!(totals(&request, "gone"), (4, 1));
        assert_eq!(request.usage[0].minute_unix_s, 29_000_000 * 60);
    }

    fn remote(customer: &str, admitted: u64, cap: Option<u64>) -> RemoteUsage {
        RemoteUsage {
            customer: customer.to_owned(),
            admitted_requests: admitted,
            instance_cap_requests: cap,
            cap_quota_requests: None,
        }
    }

    #[test]
    fn duplicate_acknowledgement_is_logged() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            duplicate: true,
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);

        assert_eq!(instance.sync.pending_sequence(), None);
        let logs = instance.sync_host.logs();
        assert!(
            logs.iter()
                .any(|(level, line)| *level == LogLevel::Info && line.contains("duplicate=true"))
        );
    }

    #[test]
    fn other_instances_usage_limits_requests() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            remote_usage: vec![remote("acme", 1, None)],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);

        // A quota of 3 per window, with 1 admitted here and 1 elsewhere, leaves 1.
        assert_eq!(instance.requests("acme", 5), 1);
    }

    #[test]
    fn cap_near_quota_limits_instance() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            remote_usage: vec![remote("acme", 0, Some(2))],
            next_sync_ms: 40,
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);

        // The quota of 3 would admit two more; the cap admits one.
        assert_eq!(instance.requests("acme", 5), 1);
        assert_eq!(
            instance.sync_host.tick_period(),
            Some(Duration::from_millis(40))
        );
    }

    #[test]
    fn poll_refreshes_remote_usage_when_idle() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            remote_usage: vec![remote("acme", 5, None)],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);

        instance.sync.on_tick(&instance.sync_host);
        let (token, poll) = instance.last_call();
        assert!(poll.usage.is_empty());
        assert_eq!(poll.sequence, 1);
        instance.reply(token, &SyncResponse::default());

        // The poll's reply named no customer, so polling stops.
        instance.sync.on_tick(&instance.sync_host);
        assert_eq!(instance.sync_host.grpc_calls().len(), 2);
        // And the next batch still takes the next sequence.
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        assert_eq!(instance.last_call().1.sequence, 2);
    }

    #[test]
    fn degraded_state_is_published_for_workers() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            counters_degraded: true,
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        assert!(instance.sync.is_degraded());
        assert_eq!(
            instance.sync_host.peek_shared_data(STATE_KEY),
            Some(vec![1])
        );

        instance.filter.on_tick(&instance.worker_host);
        instance.requests("acme", 1);
        instance.filter.on_tick(&instance.worker_host);
        assert_eq!(instance.worker_host.counter("veo.fail_open_total"), 1);
    }

    #[test]
    fn consecutive_failures_count_as_degraded() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        for round in 0..DEGRADED_AFTER_FAILURES {
            assert!(!instance.sync.is_degraded(), "round {round}");
            instance.sync.on_tick(&instance.sync_host);
            let call = instance.sync_host.grpc_calls().pop().unwrap();
            instance
                .sync
                .on_response(&instance.sync_host, call.token, UNAVAILABLE, None, None);
        }
        assert!(instance.sync.is_degraded());

        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        instance.reply(token, &acknowledge(1));
        assert!(!instance.sync.is_degraded());
        assert_eq!(
            instance.sync_host.peek_shared_data(STATE_KEY),
            Some(vec![0])
        );
    }

    fn limits(name: &str, quota: u64) -> TierLimits {
        TierLimits {
            name: name.to_owned(),
            quota_requests: quota,
            window_ms: 60_000,
            ..TierLimits::default()
        }
    }

    #[test]
    fn pushed_limits_apply_without_refill() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 1,
            tiers: vec![limits("basic", 2), limits("platinum", 9)],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        instance.filter.on_tick(&instance.worker_host);

        // Down from 3 to 2 with 1 used: one more, not a fresh 2.
        assert_eq!(instance.requests("acme", 5), 1);
        let logs = instance.sync_host.logs();
        assert!(logs.iter().any(|(_, line)| line.contains("platinum")));

        // Up to 5 with 2 used: three more.
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: 2,
            tiers: vec![limits("basic", 5)],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        instance.filter.on_tick(&instance.worker_host);
        assert_eq!(instance.requests("acme", 5), 3);
        assert_eq!(
            instance.filter.tiers().get(0).policy_header,
            "\"basic\";q=5;w=60"
        );
    }

    #[test]
    fn invalid_pushed_limits_are_ignored() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let mut bad = limits("basic", 2);
        bad.window_ms = 1_500;
        let reply = SyncResponse {
            applied_sequence: 1,
            tiers: vec![bad],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        instance.filter.on_tick(&instance.worker_host);

        assert_eq!(instance.requests("acme", 5), 2);
        let logs = instance.sync_host.logs();
        assert!(
            logs.iter()
                .any(|(level, line)| *level == LogLevel::Error && line.contains("window_ms"))
        );
    }

    #[test]
    fn reply_to_unknown_call_is_ignored() {
        let mut instance = Instance::new();
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        instance.reply(999, &acknowledge(1));
        assert!(instance.sync.is_in_flight());
        assert_eq!(instance.sync.pending_sequence(), Some(1));
    }

    #[test]
    fn idle_instance_polls_first_then_once_per_heartbeat() {
        let mut instance = Instance::new();
        instance.sync.on_tick(&instance.sync_host);
        let (token, poll) = instance.last_call();
        assert!(
            poll.usage.is_empty(),
            "the first tick fetches the pushed sets"
        );
        instance.reply(token, &SyncResponse::default());

        // The reply came 5 ms after the call, so the next tick, one
        // interval after the call, is less than a second after the reply.
        instance.sync_host.advance_ms(5);
        instance.reply(token, &SyncResponse::default());
        instance.sync_host.advance_ms(995);
        instance.sync.on_tick(&instance.sync_host);
        assert_eq!(instance.sync_host.grpc_calls().len(), 2, "heartbeat poll");
    }

    #[test]
    fn short_interval_polls_once_a_second() {
        let mut instance =
            Instance::with_config(serde_json::json!({"sidecar": {"sync_interval_ms": 100}}));
        let mut replied = 0;
        for _ in 0..30 {
            instance.sync.on_tick(&instance.sync_host);
            if instance.sync_host.grpc_calls().len() > replied {
                let (token, _) = instance.last_call();
                instance.sync_host.advance_ms(5);
                instance.reply(token, &SyncResponse::default());
                replied += 1;
                instance.sync_host.advance_ms(95);
            } else {
                instance.sync_host.advance_ms(100);
            }
        }

        // 3 s of ticks: the first poll, then one about every second.
        assert_eq!(instance.sync_host.grpc_calls().len(), 3);
    }

    #[test]
    fn applied_erasures_are_acknowledged_by_an_idle_instance() {
        let mut instance = Instance::new();
        instance.sync.on_tick(&instance.sync_host);
        let (token, _) = instance.last_call();
        let erasures = veo_proto::sync::Erasures {
            version: 7,
            customers: vec![veo_proto::sync::ErasedCustomer {
                customer: "gone".into(),
                refuse_until_unix_s: i64::MAX,
            }],
        };
        instance.reply(
            token,
            &SyncResponse {
                erasures: Some(erasures),
                ..SyncResponse::default()
            },
        );

        // The last purge runs a second later; the tick that runs it also
        // reports the version, without waiting for the heartbeat.
        for _ in 0..12 {
            instance.sync_host.advance_ms(100);
            instance.sync.on_tick(&instance.sync_host);
            if instance.sync.is_in_flight() {
                let (token, _) = instance.last_call();
                instance.reply(token, &SyncResponse::default());
            }
        }
        let acknowledged = instance
            .sync_host
            .grpc_calls()
            .iter()
            .filter_map(|call| SyncRequest::decode(call.message.as_slice()).ok())
            .any(|request| request.erasures_version == 7);
        assert!(acknowledged, "the erasure was never acknowledged");
    }

    fn record<'a>(request: &'a SyncRequest, customer: &str) -> &'a veo_proto::sync::UsageRecord {
        let mut records = request
            .usage
            .iter()
            .filter(|record| record.customer == customer);
        let record = records.next().unwrap();
        assert!(
            records.next().is_none(),
            "{customer} has more than one record"
        );
        record
    }

    #[test]
    fn egress_bytes_join_request_counts_in_batch() {
        let mut instance = Instance::new();
        assert!(instance.exchange("acme", None, &[100, 200]));
        assert!(instance.exchange("acme", None, &[50]));
        assert!(instance.exchange("zeta", Some("pro"), &[7]));
        instance.filter.on_tick(&instance.worker_host);
        instance.sync.on_tick(&instance.sync_host);

        let (_, request) = instance.last_call();
        assert_eq!(request.usage.len(), 2);
        let acme = record(&request, "acme");
        assert_eq!(acme.admitted_requests, 2);
        assert_eq!(acme.egress_bytes, 350);
        assert_eq!(acme.minute_unix_s, (NOW_S / 60 * 60) as i64);
        let zeta = record(&request, "zeta");
        assert_eq!(zeta.tier, "pro");
        assert_eq!(zeta.egress_bytes, 7);
    }

    #[test]
    fn retried_batch_carries_identical_egress() {
        let mut instance = Instance::new();
        assert!(instance.exchange("acme", None, &[300]));
        instance.filter.on_tick(&instance.worker_host);
        instance.sync.on_tick(&instance.sync_host);
        let first = instance.sync_host.grpc_calls().pop().unwrap();
        instance
            .sync
            .on_response(&instance.sync_host, first.token, UNAVAILABLE, None, None);

        // More bytes arrive while the sidecar is down.
        assert!(instance.exchange("acme", None, &[50]));
        instance.filter.on_tick(&instance.worker_host);
        instance.sync.on_tick(&instance.sync_host);
        let resent = instance.sync_host.grpc_calls().pop().unwrap();
        assert_eq!(resent.message, first.message);
        let request = SyncRequest::decode(resent.message.as_slice()).unwrap();
        assert_eq!(record(&request, "acme").egress_bytes, 300);
        instance.reply(resent.token, &acknowledge(1));

        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(next.sequence, 2);
        let acme = record(&next, "acme");
        assert_eq!((acme.admitted_requests, acme.egress_bytes), (1, 50));
    }

    #[test]
    fn late_bytes_count_in_request_minute() {
        let mut instance = Instance::new();
        let header = format!("Bearer {}", es256_token(claims("acme", None)));
        instance
            .worker_host
            .start_request(&[("authorization", header.as_bytes())]);
        let mut stream = Stream::new(Rc::clone(&instance.filter));
        assert!(stream.on_request_headers(&instance.worker_host));

        // The request's count goes out before its response ends, in the
        // next minute.
        instance.sync.on_tick(&instance.sync_host);
        let (token, first) = instance.last_call();
        assert_eq!(record(&first, "acme").egress_bytes, 0);
        instance.reply(token, &acknowledge(1));
        instance.sync_host.advance_ms(60_000);
        stream.on_response_body(4_096);
        stream.on_log(&instance.worker_host);
        instance.filter.on_tick(&instance.worker_host);

        instance.sync.on_tick(&instance.sync_host);
        let (_, second) = instance.last_call();
        let acme = record(&second, "acme");
        assert_eq!(acme.egress_bytes, 4_096);
        assert_eq!(acme.admitted_requests, 0);
        assert_eq!(acme.minute_unix_s, record(&first, "acme").minute_unix_s);
    }

    fn overrides(version: u64, entries: &[(&str, &str)]) -> TierOverrides {
        TierOverrides {
            version,
            overrides: entries
                .iter()
                .map(|(customer, tier)| TierOverride {
                    customer: (*customer).to_owned(),
                    tier: (*tier).to_owned(),
                })
                .collect(),
        }
    }

    /// Sends a batch and replies to it with `set`.
    fn reply_with_overrides(instance: &mut Instance, set: TierOverrides) -> SyncRequest {
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, request) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: request.sequence,
            tier_overrides: Some(set),
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        request
    }

    #[test]
    fn override_version_is_echoed() {
        let mut instance = Instance::new();
        let set = overrides(5, &[("acme", "pro")]);
        let first = reply_with_overrides(&mut instance, set.clone());
        assert_eq!(first.tier_overrides_version, 0);
        assert_eq!(instance.sync.overrides_version(), 5);
        let stored = instance.sync_host.peek_shared_data(OVERRIDES_KEY).unwrap();
        assert_eq!(decode_overrides(&stored), Some(set));

        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, next) = instance.last_call();
        assert_eq!(next.tier_overrides_version, 5);

        // A poll carries the version too.
        let reply = SyncResponse {
            applied_sequence: next.sequence,
            remote_usage: vec![remote("acme", 0, None)],
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        instance.sync.on_tick(&instance.sync_host);
        let (_, poll) = instance.last_call();
        assert!(poll.usage.is_empty());
        assert_eq!(poll.tier_overrides_version, 5);

        instance.filter.on_tick(&instance.worker_host);
        assert!(instance.exchange("acme", None, &[]));
        assert_eq!(instance.forwarded_tier().as_deref(), Some("pro"));
    }

    #[test]
    fn unknown_override_tier_is_logged_once_per_set() {
        let mut instance = Instance::new();
        let set = overrides(2, &[("acme", "platinum"), ("zeta", "pro")]);
        reply_with_overrides(&mut instance, set.clone());
        instance.filter.on_tick(&instance.worker_host);
        // Basic admits 3 per window; the batch above used one.
        for _ in 0..2 {
            assert!(instance.exchange("acme", None, &[]));
            assert_eq!(instance.forwarded_tier().as_deref(), Some("basic"));
        }
        assert!(instance.exchange("zeta", None, &[]));
        assert_eq!(instance.forwarded_tier().as_deref(), Some("pro"));

        // The sidecar sends the same set again, as for a resent batch
        // with an older version.
        reply_with_overrides(&mut instance, set);
        instance.filter.on_tick(&instance.worker_host);

        let warnings = |host: &MemoryHost| {
            host.logs()
                .into_iter()
                .filter(|(level, line)| *level == LogLevel::Warn && line.contains("platinum"))
                .count()
        };
        assert_eq!(warnings(&instance.sync_host), 1);
        assert_eq!(warnings(&instance.worker_host), 0);
        assert_eq!(
            instance
                .sync_host
                .counter("veo.tier_overrides_ignored_total"),
            1
        );
        let published = instance
            .sync_host
            .logs()
            .into_iter()
            .filter(|(_, line)| line.contains("tier overrides in force"))
            .count();
        assert_eq!(published, 1);
    }

    #[test]
    fn empty_override_set_clears_through_sync() {
        let mut instance = Instance::new();
        reply_with_overrides(&mut instance, overrides(1, &[("acme", "enterprise")]));
        instance.filter.on_tick(&instance.worker_host);
        assert!(instance.exchange("acme", None, &[]));
        assert_eq!(instance.forwarded_tier().as_deref(), Some("enterprise"));

        let request = reply_with_overrides(&mut instance, overrides(2, &[]));
        assert_eq!(request.tier_overrides_version, 1);
        instance.filter.on_tick(&instance.worker_host);
        assert!(instance.exchange("acme", None, &[]));
        assert_eq!(instance.forwarded_tier().as_deref(), Some("basic"));
        assert_eq!(instance.sync.overrides_version(), 2);
    }

    /// Sends one request per customer in each of `minutes` minutes while
    /// the sidecar cannot be reached; returns the requests admitted.
    fn outage(instance: &mut Instance, customers: &[&str], minutes: u32) -> u64 {
        instance
            .sync_host
            .fail_grpc_dispatch(Some(crate::host::HostError(10)));
        let mut admitted = 0;
        for _ in 0..minutes {
            for customer in customers {
                admitted += instance.requests(customer, 1) as u64;
            }
            instance.sync.on_tick(&instance.sync_host);
            instance.sync_host.advance_ms(60_000);
        }
        instance.sync_host.fail_grpc_dispatch(None);
        admitted
    }

    /// Acknowledges every batch until the backlog is sent; returns the
    /// usage records sent.
    fn drain(instance: &mut Instance) -> Vec<veo_proto::sync::UsageRecord> {
        let mut records = Vec::new();
        for _ in 0..100 {
            let calls = instance.sync_host.grpc_calls().len();
            instance.sync.on_tick(&instance.sync_host);
            if instance.sync_host.grpc_calls().len() == calls {
                break;
            }
            let (token, request) = instance.last_call();
            records.extend(request.usage.iter().cloned());
            instance.reply(token, &acknowledge(request.sequence));
            if request.usage.is_empty() {
                break;
            }
        }
        records
    }

    /// Sets the clock to `offset` minutes past the hour of [`NOW_S`],
    /// which must not be before it.
    fn at_minute_of_hour(instance: &Instance, offset: u64) {
        let now_s = NOW_S / 3600 * 3600 + offset * 60;
        assert!(now_s >= NOW_S);
        instance.sync_host.set_now_ms(now_s * 1000);
    }

    #[test]
    fn backlog_merges_older_minutes_keeping_counts() {
        let mut instance = Instance::new();
        instance.sync.settings.max_backlog_records = 100;
        at_minute_of_hour(&instance, 10);
        let admitted = outage(&mut instance, &["a", "b", "c", "d"], 40);
        let records = drain(&mut instance);

        assert_eq!(admitted, 4 * 40);
        let sent: u64 = records.iter().map(|record| record.admitted_requests).sum();
        assert_eq!(sent, admitted);
        assert!(records.len() < 4 * 40, "{} records", records.len());
        assert!(instance.sync_host.counter("veo.usage_backlog_merged_total") > 0);
        assert_eq!(
            instance
                .sync_host
                .counter("veo.usage_backlog_dropped_total"),
            0
        );
        assert!(instance.sync_host.logs().iter().any(|(level, line)| {
            *level == LogLevel::Warn && line.contains("sidecar.max_backlog_records=100")
        }));
    }

    #[test]
    fn backlog_over_bound_drops_oldest() {
        let mut instance = Instance::new();
        instance.sync.settings.max_backlog_records = 100;
        at_minute_of_hour(&instance, 10);
        // 12 customers in each of 12 minutes: more records within ten
        // minutes than the bound, so merging cannot help.
        let customers: Vec<String> = (0..12).map(|customer| format!("c{customer}")).collect();
        let customers: Vec<&str> = customers.iter().map(String::as_str).collect();
        let admitted = outage(&mut instance, &customers, 12);
        let records = drain(&mut instance);

        let sent: u64 = records.iter().map(|record| record.admitted_requests).sum();
        let dropped = instance
            .sync_host
            .counter("veo.usage_backlog_dropped_total");
        assert!(dropped >= 24, "{dropped} dropped");
        assert_eq!(sent + dropped, admitted);
        assert!(instance.sync_host.logs().iter().any(|(level, line)| {
            *level == LogLevel::Error && line.contains("admitted requests")
        }));
    }
}
