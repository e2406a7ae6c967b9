//! Usage sent straight to a sidecar's sync API, as a filter would send it,
//! for tests of the sidecar without Envoy.

use veo_proto::sync::sync_client::SyncClient;
use veo_proto::sync::{SyncRequest, UsageRecord};

use crate::HarnessError;
use crate::sidecar::{Sidecar, unix_seconds};

/// Returns the start of the minute `minutes_ago` minutes before the
/// current one, in seconds since the Unix epoch.
pub fn minute_ago(minutes_ago: i64) -> i64 {
    (unix_seconds() / 60 - minutes_ago) * 60
}

/// Returns a basic-tier usage record of `customer` for the minute starting
/// at `minute_unix_s`, with `admitted` requests and `bytes` response bytes.
pub fn usage_record(customer: &str, minute_unix_s: i64, admitted: u64, bytes: u64) -> UsageRecord {
    UsageRecord {
        customer: customer.into(),
        tier: "basic".into(),
        minute_unix_s,
        admitted_requests: admitted,
        refused_requests: 0,
        quota_requests: 0,
        quota_window_ms: 0,
        egress_bytes: bytes,
    }
}

/// Sends `usage` as batch `sequence` of `instance` to the sidecar.
pub async fn send_batch(
    sidecar: &Sidecar,
    instance: &str,
    sequence: u64,
    usage: Vec<UsageRecord>,
) -> Result<(), HarnessError> {
    let target = format!("http://{}", sidecar.address());
    let request_error = |reason: String| HarnessError::Request {
        target: format!("{target} Sync"),
        reason,
    };
    let mut client = SyncClient::connect(target.clone())
        .await
        .map_err(|err| request_error(err.to_string()))?;
    client
        .sync(SyncRequest {
            instance_id: instance.into(),
            sequence,
            created_unix_ms: unix_seconds() * 1000,
            usage,
            tier_overrides_version: 0,
            asset_regions_version: 0,
            erasures_version: 0,
        })
        .await
        .map_err(|status| request_error(status.to_string()))?;
    Ok(())
}
