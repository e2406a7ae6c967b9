//! The `veo.sync.v1.Sync` service: applies usage batches and returns, for
//! every customer the instance served within the window, what the other
//! instances admitted and, near the quota, the instance's cap.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use veo_proto::sync::sync_server::Sync as SyncRpc;
use veo_proto::sync::{
    RemoteUsage, SyncRequest, SyncResponse, TierLimits, TierOverride, TierOverrides,
};

use crate::allowance::{AllowanceSettings, CustomerView, grant};
use crate::counters::shared::SharedCounters;
use crate::ledger::{ApplyOutcome, MINUTE_SECONDS, UsageEntry, unix_now_s};
use crate::metrics::Metrics;
use crate::pushes::Pushes;
use crate::remote::{Counts, RecentUsage};
use crate::status::ServiceError;
use crate::store::Store;
use crate::validate;

/// Handler of `veo.sync.v1.Sync`.
#[derive(Debug, Clone)]
pub struct SyncService {
    store: Store,
    recent: Arc<Mutex<RecentUsage>>,
    shared: Option<SharedCounters>,
    allowance: AllowanceSettings,
    tiers: Arc<RwLock<Vec<TierLimits>>>,
    overrides: Arc<RwLock<TierOverrides>>,
    pushes: Arc<Pushes>,
    metrics: Option<Metrics>,
    /// Ledger id that labels the per-customer usage series; `None` exports
    /// none.
    customer_usage_ledger: Option<String>,
    warned_other_window: Arc<std::sync::atomic::AtomicBool>,
    window_seconds: u32,
    max_records: usize,
}

/// Returns the version of the first override set: the start time in
/// milliseconds, so that after a restart every instance receives the set
/// again even when it held an earlier sidecar's version.
pub fn first_overrides_version() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(1).max(1)
        })
}

/// Quota recorded for a customer whose tier's window differs from the
/// sidecar's `window_seconds`.
const OTHER_WINDOW: u64 = u64::MAX;

/// One customer's part of a batch.
#[derive(Debug, Clone, Default)]
struct BatchCustomer {
    /// Tier of the customer's last record in the batch.
    tier: String,
    /// Requests of the batch in minutes that overlap the window ending now.
    recent: Counts,
    /// Quota of the customer's tier, in requests per window.
    quota: Option<u64>,
    /// Whether that quota's window differs from the sidecar's.
    other_window: bool,
}

impl SyncService {
    /// Creates the service over `store`; remote usage covers
    /// `window_seconds` and tracks at most `max_series` (instance, customer)
    /// pairs.
    pub fn new(
        store: Store,
        window_seconds: u32,
        max_records: usize,
        max_series: usize,
    ) -> SyncService {
        SyncService {
            store,
            recent: Arc::new(Mutex::new(RecentUsage::new(window_seconds, max_series))),
            shared: None,
            allowance: AllowanceSettings::default(),
            tiers: Arc::new(RwLock::new(Vec::new())),
            overrides: Arc::new(RwLock::new(TierOverrides {
                version: first_overrides_version(),
                overrides: Vec::new(),
            })),
            pushes: Arc::new(Pushes::new(first_overrides_version())),
            metrics: None,
            customer_usage_ledger: None,
            warned_other_window: Arc::default(),
            window_seconds,
            max_records,
        }
    }

    /// Sets the allowance settings: when caps start and the sync interval
    /// near a quota.
    pub fn with_allowance(mut self, allowance: AllowanceSettings) -> SyncService {
        self.allowance = allowance;
        self
    }

    /// Adds the counters shared with other sidecars; batches then also go
    /// to their outbox.
    pub fn with_shared(mut self, shared: SharedCounters) -> SyncService {
        self.shared = Some(shared);
        self
    }

    /// Sets the tier limits sent to every instance; empty leaves each
    /// instance's own. Takes effect with the next reply.
    pub fn set_tiers(&self, tiers: Vec<TierLimits>) {
        *self.tiers.write().unwrap_or_else(PoisonError::into_inner) = tiers;
    }

    /// Shares the asset regions, the erased customers and the
    /// instances' acknowledgements with the admin service.
    pub fn with_pushes(mut self, pushes: Arc<Pushes>) -> SyncService {
        self.pushes = pushes;
        self
    }

    /// Counts the stored usage in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> SyncService {
        self.metrics = Some(metrics);
        self
    }

    /// Counts the usage of each applied batch in `veo_customer_usage_total`
    /// per customer pseudonym, labelled with `ledger_id`.
    pub fn with_customer_usage(mut self, ledger_id: String) -> SyncService {
        self.customer_usage_ledger = Some(ledger_id);
        self
    }

    /// Sets the customer tier overrides sent to every instance, as
    /// (customer, tier) pairs. A set that differs from the current one gets
    /// a new version, so each instance receives it with its next reply.
    pub fn set_tier_overrides(&self, mut overrides: Vec<(String, String)>) {
        overrides.sort();
        let mut current = self
            .overrides
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let unchanged = current.overrides.len() == overrides.len()
            && current
                .overrides
                .iter()
                .zip(&overrides)
                .all(|(old, (customer, tier))| &old.customer == customer && &old.tier == tier);
        if unchanged {
            return;
        }
        current.version = current.version.wrapping_add(1).max(1);
        current.overrides = overrides
            .into_iter()
            .map(|(customer, tier)| TierOverride { customer, tier })
            .collect();
    }

    /// Returns the overrides when the instance has another version.
    fn overrides_for(&self, known_version: u64) -> Option<TierOverrides> {
        let current = self
            .overrides
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        (current.version != known_version).then(|| current.clone())
    }

    /// Logs once that a tier's quota window differs from the sidecar's.
    fn warn_other_window(&self, tier: &str) {
        if !self
            .warned_other_window
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            warn!(
                tier,
                window_seconds = self.window_seconds,
                "tier quota window differs from the sidecar's window_seconds; its customers \
                 get no remote usage and each instance enforces the quota alone; set \
                 window_seconds to the tier's window or push the tier from [tiers]"
            );
        }
    }

    /// Returns the recent usage the replies are built from, for the shared
    /// counters to read.
    pub fn recent(&self) -> Arc<Mutex<RecentUsage>> {
        Arc::clone(&self.recent)
    }

    /// Validates and applies one batch, then builds the reply.
    pub async fn apply(&self, request: SyncRequest) -> Result<SyncResponse, ServiceError> {
        let now_s = unix_now_s();
        let known_overrides = request.tier_overrides_version;
        let known_assets = request.asset_regions_version;
        let known_erasures = request.erasures_version;
        let instance = request.instance_id.clone();
        let mut response = self.apply_batch(request, now_s).await?;
        response.tier_overrides = self.overrides_for(known_overrides);
        response.asset_regions = self.pushes.assets_for(known_assets);
        response.erasures = self.pushes.erasures_for(known_erasures);
        self.record_ack(&instance, known_erasures, now_s).await;
        Ok(response)
    }

    /// Notes that `instance` applies the erased customers of `version`, and
    /// keeps a change in the store so that erasure progress survives a
    /// restart.
    async fn record_ack(&self, instance: &str, version: u64, now_s: i64) {
        let previous = self.pushes.record_ack(instance, version, now_s);
        if previous.is_some_and(|ack| ack.erasures_version == version) {
            return;
        }
        let instance = instance.to_owned();
        let stored = self
            .store
            .write("store an erasure acknowledgement", move |conn| {
                crate::erasure::store_ack(conn, &instance, version, now_s)
            })
            .await;
        if let Err(err) = stored {
            warn!(error = %err, "failed to store an instance's erasure acknowledgement; it is kept in memory");
        }
    }

    async fn apply_batch(
        &self,
        request: SyncRequest,
        now_s: i64,
    ) -> Result<SyncResponse, ServiceError> {
        let (instance, sequence) = (request.instance_id.clone(), request.sequence);
        let batch = match validate::sync_batch(request, self.max_records) {
            Ok(batch) => batch,
            Err(err) => {
                return self
                    .reject_unless_applied(&instance, sequence, err, now_s)
                    .await;
            }
        };
        let instance = batch.instance_id.clone();
        let sequence = batch.sequence;
        let records = batch.records.len();
        if records == 0 {
            // A poll: nothing to store, only the reply.
            let now = u64::try_from(now_s).unwrap_or(0);
            return Ok(self.reply(
                &instance,
                u64::try_from(sequence).unwrap_or(0),
                false,
                &BTreeMap::new(),
                now,
            ));
        }
        let mut customers = batch_customers(&batch.records, now_s, self.window_seconds);
        // The store drops an erased customer's usage; remote usage must not
        // name it either.
        customers.retain(|customer, _| !self.pushes.is_erased(customer));
        {
            // The sidecar's own tier limits, when configured, set the quota
            // that caps are computed from.
            let tiers = self.tiers.read().unwrap_or_else(PoisonError::into_inner);
            for part in customers.values_mut() {
                if let Some(limits) = tiers.iter().find(|limits| limits.name == part.tier) {
                    part.quota = (limits.quota_requests > 0).then_some(limits.quota_requests);
                    part.other_window = false;
                }
            }
        }

        let per_customer = self
            .customer_usage_ledger
            .is_some()
            .then(|| self.usage_per_customer(&batch.records));
        let (admitted, egress) = batch.records.iter().fold((0u64, 0u64), |(a, e), record| {
            (
                a.saturating_add(u64::try_from(record.admitted).unwrap_or(0)),
                e.saturating_add(u64::try_from(record.egress_bytes).unwrap_or(0)),
            )
        });

        // The store returns after the commit, so the reply below never
        // acknowledges a batch that a crash could lose. The store and the
        // metrics run in a task of their own, so a caller that gives up
        // cannot leave a stored batch uncounted.
        let service = self.clone();
        let outcome = tokio::spawn(async move {
            let outcome = match &service.shared {
                Some(_) => {
                    service
                        .store
                        .apply_with_outbox(batch, now_s, service.window_seconds)
                        .await?
                }
                None => service.store.apply(batch, now_s).await?,
            };
            if let ApplyOutcome::Applied { .. } = outcome {
                service.count_stored(admitted, egress, per_customer);
            }
            Ok::<_, ServiceError>(outcome)
        })
        .await
        .map_err(|err| ServiceError::Task(err.to_string()))??;

        let (applied_sequence, duplicate) = match outcome {
            ApplyOutcome::Applied { previous } => {
                if sequence > previous + 1 {
                    warn!(
                        instance = %instance,
                        sequence,
                        last_sequence = previous,
                        "sequence gap: the batches in between were never applied; \
                         accepting this batch"
                    );
                }
                debug!(instance = %instance, sequence, records, "applied batch");
                (sequence, false)
            }
            ApplyOutcome::Duplicate { last } => {
                debug!(instance = %instance, sequence, last_sequence = last, records, "duplicate batch");
                (last, true)
            }
        };

        let now = u64::try_from(now_s).unwrap_or(0);
        let applied = if duplicate {
            BTreeMap::new()
        } else {
            customers
        };
        Ok(self.reply(
            &instance,
            u64::try_from(applied_sequence).unwrap_or(0),
            duplicate,
            &applied,
            now,
        ))
    }

    /// Returns `invalid`, the validation error of batch `sequence` of
    /// `instance`, unless that sequence was applied before. Such a batch is
    /// a resend of a batch that was valid when it arrived, under limits
    /// that changed since, so it gets the duplicate reply. Otherwise a
    /// filter that changes a rejected batch before resending it could
    /// apply part of it twice.
    async fn reject_unless_applied(
        &self,
        instance: &str,
        sequence: u64,
        invalid: ServiceError,
        now_s: i64,
    ) -> Result<SyncResponse, ServiceError> {
        let Ok(sequence) = i64::try_from(sequence) else {
            return Err(invalid);
        };
        if sequence == 0
            || validate::identifier("instance_id", instance, validate::MAX_ID_BYTES).is_err()
        {
            return Err(invalid);
        }
        match self.store.last_sequence(instance).await? {
            Some(last) if sequence <= last => {
                debug!(
                    instance,
                    sequence,
                    last_sequence = last,
                    "duplicate batch that is no longer valid"
                );
                let now = u64::try_from(now_s).unwrap_or(0);
                let last = u64::try_from(last).unwrap_or(0);
                Ok(self.reply(instance, last, true, &BTreeMap::new(), now))
            }
            _ => Err(invalid),
        }
    }

    /// Adds a stored batch to `veo_ledger_usage_total` and, when exported,
    /// its customers' usage to `veo_customer_usage_total`. A customer
    /// erased since the batch was checked is left out, so that its removed
    /// series do not come back.
    fn count_stored(
        &self,
        admitted: u64,
        egress: u64,
        per_customer: Option<BTreeMap<String, (u64, u64)>>,
    ) {
        let Some(metrics) = &self.metrics else {
            return;
        };
        metrics
            .ledger_usage
            .with_label_values(&["api_requests"])
            .inc_by(admitted);
        metrics
            .ledger_usage
            .with_label_values(&["egress_bytes"])
            .inc_by(egress);
        let (Some(ledger), Some(per_customer)) = (&self.customer_usage_ledger, per_customer) else {
            return;
        };
        let identities = self.store.identities();
        for (customer, (admitted, egress)) in per_customer {
            if self.pushes.is_erased(&customer) {
                continue;
            }
            let pseudonym = identities.pseudonym(&customer);
            for (meter, value) in [("api_requests", admitted), ("egress_bytes", egress)] {
                // A series appears with the meter's first usage, not before.
                if value > 0 {
                    metrics
                        .customer_usage
                        .with_label_values(&[ledger, &pseudonym, meter])
                        .inc_by(value);
                }
            }
        }
    }

    /// Sums admitted requests and response bytes per customer, leaving out
    /// erased customers, whose usage the store drops.
    fn usage_per_customer(&self, records: &[UsageEntry]) -> BTreeMap<String, (u64, u64)> {
        let mut sums: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for record in records {
            if self.pushes.is_erased(&record.customer) {
                continue;
            }
            let sum = sums.entry(record.customer.clone()).or_default();
            sum.0 = sum
                .0
                .saturating_add(u64::try_from(record.admitted).unwrap_or(0));
            sum.1 = sum
                .1
                .saturating_add(u64::try_from(record.egress_bytes).unwrap_or(0));
        }
        sums
    }

    /// Adds an applied batch's customers to recent usage, then builds the
    /// reply for every customer the instance served within the window.
    fn reply(
        &self,
        instance: &str,
        applied_sequence: u64,
        duplicate: bool,
        applied: &BTreeMap<String, BatchCustomer>,
        now_s: u64,
    ) -> SyncResponse {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        // Without the prune, a poll would keep naming customers whose
        // usage left the window, and the instance would poll for ever.
        recent.prune_if_due(now_s);
        for (customer, part) in applied {
            recent.record(instance, customer, part.recent, now_s);
            let quota = if part.other_window {
                self.warn_other_window(&part.tier);
                Some(OTHER_WINDOW)
            } else {
                part.quota
            };
            recent.set_quota(customer, quota);
        }
        let mut customers: BTreeSet<String> = recent.customers_of(instance).into_iter().collect();
        customers.extend(applied.keys().cloned());

        let mut near = false;
        let remote_usage = customers
            .into_iter()
            .filter(|customer| recent.quota(customer) != Some(OTHER_WINDOW))
            .map(|customer| {
                let local = recent.by_instance(&customer, now_s);
                let elsewhere = self
                    .shared
                    .as_ref()
                    .map_or(Counts::default(), |shared| shared.elsewhere(&customer));
                let view = CustomerView {
                    quota: recent.quota(&customer),
                    local: &local,
                    elsewhere,
                };
                let grant = grant(&view, instance, &self.allowance);
                near |= grant.cap.is_some();
                RemoteUsage {
                    customer,
                    admitted_requests: grant.others_admitted,
                    instance_cap_requests: grant.cap,
                    cap_quota_requests: grant.cap.and(view.quota),
                }
            })
            .collect();
        SyncResponse {
            applied_sequence,
            duplicate,
            remote_usage,
            window_seconds: self.window_seconds,
            next_sync_ms: if near { self.allowance.near_sync_ms } else { 0 },
            counters_degraded: self.shared.as_ref().is_some_and(SharedCounters::degraded),
            tiers: self
                .tiers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            tier_overrides: None,
            asset_regions: None,
            erasures: None,
        }
    }
}

#[tonic::async_trait]
impl SyncRpc for SyncService {
    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let reply = self.apply(request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}

/// Sums each customer's requests of the batch, counting only minutes that
/// overlap the window ending at `now_s`, so a batch retried after a long
/// outage does not inflate recent usage. Every customer of the batch has
/// an entry, possibly empty.
fn batch_customers(
    records: &[UsageEntry],
    now_s: i64,
    window_seconds: u32,
) -> BTreeMap<String, BatchCustomer> {
    let window_start = now_s - i64::from(window_seconds);
    let mut customers: BTreeMap<String, BatchCustomer> = BTreeMap::new();
    for record in records {
        let part = customers.entry(record.customer.clone()).or_default();
        part.quota = record.quota.map(|quota| quota.requests);
        // Counts over this sidecar's window do not give the usage over another
        // window, so customers of such a quota get no remote usage.
        part.other_window = record
            .quota
            .is_some_and(|quota| quota.window_ms != u64::from(window_seconds) * 1000);
        part.tier.clone_from(&record.tier);
        if record.minute_unix_s + MINUTE_SECONDS > window_start {
            let admitted = u64::try_from(record.admitted).unwrap_or(0);
            let refused = u64::try_from(record.refused).unwrap_or(0);
            part.recent.admitted = part.recent.admitted.saturating_add(admitted);
            part.recent.requests = part
                .recent
                .requests
                .saturating_add(admitted.saturating_add(refused));
        }
    }
    customers
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::UsageRecord;

    use super::*;

    fn service(dir: &tempfile::TempDir) -> SyncService {
        let store = crate::store::test_support::open(dir.path());
        // Caps from half the quota on, so the tests see both modes.
        SyncService::new(store, 60, 100, 1_000).with_allowance(AllowanceSettings {
            near_quota_fraction: 0.5,
            near_sync_ms: 100,
        })
    }

    fn current_minute() -> i64 {
        let now = unix_now_s();
        now - now % MINUTE_SECONDS
    }

    fn request(instance: &str, sequence: u64, usage: &[(&str, i64, u64)]) -> SyncRequest {
        SyncRequest {
            instance_id: instance.into(),
            sequence,
            created_unix_ms: 0,
            usage: usage
                .iter()
                .map(|&(customer, minute_unix_s, admitted)| UsageRecord {
                    customer: customer.into(),
                    tier: "basic".into(),
                    minute_unix_s,
                    admitted_requests: admitted,
                    refused_requests: 0,
                    quota_requests: 60,
                    quota_window_ms: 60_000,
                    egress_bytes: 0,
                })
                .collect(),
            tier_overrides_version: 0,
            asset_regions_version: 0,
            erasures_version: 0,
        }
    }

    fn remote(reply: &SyncResponse) -> Vec<(&str, u64)> {
        reply
            .remote_usage
            .iter()
            .map(|usage| (usage.customer.as_str(), usage.admitted_requests))
            .collect()
    }

    #[tokio::test]
    async fn reply_reports_other_instances_usage() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();

        let first = sync
            .apply(request("a", 1, &[("c1", minute, 5)]))
            .await
            .unwrap();
        let second = sync
            .apply(request("b", 1, &[("c1", minute, 2), ("c2", minute, 1)]))
            .await
            .unwrap();
        let third = sync
            .apply(request("a", 2, &[("c1", minute, 1)]))
            .await
            .unwrap();

        assert_eq!(remote(&first), [("c1", 0)]);
        assert_eq!(remote(&second), [("c1", 5), ("c2", 0)]);
        assert_eq!(remote(&third), [("c1", 2)]);
        assert_eq!(third.window_seconds, 60);
        assert_eq!(third.applied_sequence, 2);
        assert!(!third.duplicate);
    }

    #[tokio::test]
    async fn duplicate_is_acknowledged_without_counting_twice() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();
        sync.apply(request("a", 3, &[("c1", minute, 5)]))
            .await
            .unwrap();

        let resent = sync
            .apply(request("a", 2, &[("c1", minute, 5)]))
            .await
            .unwrap();
        let other = sync
            .apply(request("b", 1, &[("c1", minute, 0)]))
            .await
            .unwrap();

        assert!(resent.duplicate);
        assert_eq!(resent.applied_sequence, 3);
        assert_eq!(remote(&other), [("c1", 5)]);
    }

    #[tokio::test]
    async fn old_minutes_are_stored_but_not_remote() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let old = current_minute() - 10 * MINUTE_SECONDS;
        sync.apply(request("a", 1, &[("c1", old, 5)]))
            .await
            .unwrap();

        let reply = sync
            .apply(request("b", 1, &[("c1", old, 1)]))
            .await
            .unwrap();

        assert_eq!(remote(&reply), [("c1", 0)]);
    }

    #[tokio::test]
    async fn invalid_batch_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();
        let mut invalid = request("a", 1, &[("c1", minute, 5), ("", minute, 1)]);
        invalid.usage[1].customer.clear();

        let status = Status::from(sync.apply(invalid).await.unwrap_err());
        let retry = sync
            .apply(request("a", 1, &[("c1", minute, 5)]))
            .await
            .unwrap();

        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("usage[1].customer"));
        assert!(!retry.duplicate);
    }

    #[tokio::test]
    async fn applied_batch_resent_invalid_is_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();
        sync.apply(request("a", 1, &[("c1", minute, 5), ("c2", minute, 1)]))
            .await
            .unwrap();

        // The same sequence, no longer valid, for example under a lower
        // limit after a restart: the sidecar applied it already.
        let mut resent = request("a", 1, &[("c1", minute, 5), ("c2", minute, 1)]);
        resent.usage[1].customer.clear();
        let reply = sync.apply(resent).await.unwrap();
        assert!(reply.duplicate);
        assert_eq!(reply.applied_sequence, 1);

        let mut next = request("a", 2, &[("c1", minute, 1)]);
        next.usage[0].customer.clear();
        let status = Status::from(sync.apply(next).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let mut unknown = request("b", 1, &[("c1", minute, 1)]);
        unknown.usage[0].customer.clear();
        let status = Status::from(sync.apply(unknown).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    fn caps(reply: &SyncResponse) -> Vec<(&str, Option<u64>)> {
        reply
            .remote_usage
            .iter()
            .map(|usage| (usage.customer.as_str(), usage.instance_cap_requests))
            .collect()
    }

    #[tokio::test]
    async fn near_quota_gets_cap_and_short_interval() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();

        let far = sync
            .apply(request("a", 1, &[("c1", minute, 20)]))
            .await
            .unwrap();
        assert_eq!(caps(&far), [("c1", None)]);
        assert_eq!(far.remote_usage[0].cap_quota_requests, None);
        assert_eq!(far.next_sync_ms, 0);

        // 20 + 20 of 60 used with equal demand: 10 more for each instance.
        let near = sync
            .apply(request("b", 1, &[("c1", minute, 20)]))
            .await
            .unwrap();
        assert_eq!(caps(&near), [("c1", Some(30))]);
        // The cap names the quota it shares out.
        assert_eq!(near.remote_usage[0].cap_quota_requests, Some(60));
        assert_eq!(near.next_sync_ms, 100);
        assert!(!near.counters_degraded);
    }

    #[tokio::test]
    async fn poll_reports_every_customer_of_the_instance() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();
        sync.apply(request("a", 1, &[("c1", minute, 2), ("c2", minute, 1)]))
            .await
            .unwrap();
        sync.apply(request("b", 1, &[("c2", minute, 4)]))
            .await
            .unwrap();

        let poll = sync.apply(request("a", 1, &[])).await.unwrap();
        assert_eq!(remote(&poll), [("c1", 0), ("c2", 4)]);
        assert!(!poll.duplicate);
        assert_eq!(poll.applied_sequence, 1);

        // A poll stores nothing, so the next batch is not a duplicate.
        let next = sync
            .apply(request("a", 2, &[("c1", minute, 1)]))
            .await
            .unwrap();
        assert!(!next.duplicate);
    }

    #[tokio::test]
    async fn poll_before_any_batch_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let poll = sync.apply(request("a", 0, &[])).await.unwrap();
        assert!(poll.remote_usage.is_empty());
    }

    #[tokio::test]
    async fn poll_stops_naming_customers_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_support::open(dir.path());
        let sync = SyncService::new(store, 1, 100, 1_000);
        let minute = current_minute();
        let mut batch = request("a", 1, &[("c1", minute, 2)]);
        batch.usage[0].quota_window_ms = 1_000;
        sync.apply(batch).await.unwrap();

        let soon = sync.apply(request("a", 1, &[])).await.unwrap();
        assert_eq!(remote(&soon), [("c1", 0)]);

        tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
        let later = sync.apply(request("a", 1, &[])).await.unwrap();
        assert!(later.remote_usage.is_empty(), "{:?}", later.remote_usage);
    }

    #[tokio::test]
    async fn quota_of_another_window_gets_no_remote_usage() {
        let dir = tempfile::tempdir().unwrap();
        let sync = service(&dir);
        let minute = current_minute();
        let mut hourly = request("a", 1, &[("c1", minute, 2)]);
        hourly.usage[0].quota_window_ms = 3_600_000;
        sync.apply(hourly).await.unwrap();

        let other = sync
            .apply(request("b", 1, &[("c2", minute, 1)]))
            .await
            .unwrap();
        let poll = sync.apply(request("a", 1, &[])).await.unwrap();

        assert_eq!(remote(&other), [("c2", 0)]);
        assert!(poll.remote_usage.is_empty(), "{:?}", poll.remote_usage);
    }
}
