//! The `veo.sync.v1.Sync` service: applies usage batches and returns what
//! other instances admitted within the window.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tonic::{Request, Response, Status};
use tracing::{debug, warn};
use veo_proto::sync::sync_server::Sync as SyncRpc;
use veo_proto::sync::{RemoteUsage, SyncRequest, SyncResponse};

use crate::ledger::{ApplyOutcome, MINUTE_SECONDS, UsageEntry, unix_now_s};
use crate::remote::RecentUsage;
use crate::status::ServiceError;
use crate::store::Store;
use crate::validate;

/// Handler of `veo.sync.v1.Sync`.
#[derive(Debug, Clone)]
pub struct SyncService {
    store: Store,
    recent: Arc<Mutex<RecentUsage>>,
    window_seconds: u32,
    max_records: usize,
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
            window_seconds,
            max_records,
        }
    }

    /// Validates and applies one batch, then builds the reply.
    pub async fn apply(&self, request: SyncRequest) -> Result<SyncResponse, ServiceError> {
        let now_s = unix_now_s();
        let batch = validate::sync_batch(request, self.max_records)?;
        let instance = batch.instance_id.clone();
        let sequence = batch.sequence;
        let records = batch.records.len();
        let admitted = admitted_in_window(&batch.records, now_s, self.window_seconds);

        // The store returns after the commit, so the reply below never
        // acknowledges a batch that a crash could lose.
        let outcome = self.store.apply(batch, now_s).await?;

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
        Ok(SyncResponse {
            applied_sequence: u64::try_from(applied_sequence).unwrap_or(0),
            duplicate,
            remote_usage: self.remote_usage(&instance, &admitted, !duplicate, now),
            window_seconds: self.window_seconds,
        })
    }

    /// Adds an applied batch's `admitted` requests to recent usage, then
    /// returns what the other instances admitted for each customer in it.
    fn remote_usage(
        &self,
        instance: &str,
        admitted: &BTreeMap<String, u64>,
        applied: bool,
        now_s: u64,
    ) -> Vec<RemoteUsage> {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if applied {
            for (customer, &count) in admitted {
                recent.record(instance, customer, count, now_s);
            }
        }
        admitted
            .keys()
            .map(|customer| RemoteUsage {
                customer: customer.clone(),
                admitted_requests: recent.admitted_by_others(instance, customer, now_s),
            })
            .collect()
    }
}

#[tonic::async_trait]
impl SyncRpc for SyncService {
    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let reply = self.apply(request.into_inner()).await?;
        Ok(Response::new(reply))
    }
}

/// Sums admitted requests per customer of the batch, counting only minutes
/// that overlap the window ending at `now_s`, so a batch retried after a
/// long outage does not inflate recent usage. Every customer of the batch
/// has an entry, possibly 0.
fn admitted_in_window(
    records: &[UsageEntry],
    now_s: i64,
    window_seconds: u32,
) -> BTreeMap<String, u64> {
    let window_start = now_s - i64::from(window_seconds);
    let mut admitted = BTreeMap::new();
    for record in records {
        let count: &mut u64 = admitted.entry(record.customer.clone()).or_default();
        if record.minute_unix_s + MINUTE_SECONDS > window_start {
            *count = count.saturating_add(u64::try_from(record.admitted).unwrap_or(0));
        }
    }
    admitted
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::UsageRecord;

    use super::*;

    fn service(dir: &tempfile::TempDir) -> SyncService {
        let store = Store::open(dir.path()).unwrap();
        SyncService::new(store, 60, 100, 1_000)
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
                })
                .collect(),
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
}
