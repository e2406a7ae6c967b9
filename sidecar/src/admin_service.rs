//! The `veo.admin.v1.Admin` service: the Stripe customer of each customer,
//! reconciliation on demand, the parked meter events, the asset region
//! registry, customer erasure and the audit log.

mod privacy;

pub use privacy::{ACTOR_METADATA, PeerOutcome, actor};

use crate::audit::NewEntry;
use crate::privacy::{Privacy, to_sql};

use std::sync::Arc;

use tokio::sync::Notify;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use veo_proto::admin::admin_server::Admin as AdminRpc;
use veo_proto::admin::{
    AssetRegions, DeleteAssetRegionsRequest, DeleteAssetRegionsResponse, EraseCustomerRequest,
    Erasure, GetAssetRegionsRequest, GetErasureRequest, GetStripeCustomerRequest,
    ListAssetRegionsRequest, ListAssetRegionsResponse, ListParkedMeterEventsRequest,
    ListParkedMeterEventsResponse, ParkedMeterEvent, ReconcileReport, ReconcileRequest,
    ReconcileRow, SetAssetRegionsRequest, SetStripeCustomerRequest, StripeCustomer,
    VerifyAuditLogRequest, VerifyAuditLogResponse,
};

use crate::billing::biller::Biller;
use crate::billing::customers::{self, SetOutcome};
use crate::billing::{queue, reconcile};
use crate::ledger::{MINUTE_SECONDS, TimeRange, unix_now_s};
use crate::metrics::Metrics;
use crate::status::ServiceError;
use crate::validate::{self, MAX_ID_BYTES};

/// Parked events listed when a request leaves `limit` at 0.
const DEFAULT_PARKED_LIMIT: u32 = 100;
/// Largest `limit` served.
const MAX_PARKED_LIMIT: u32 = 1_000;
/// Maximum range one reconciliation covers, in seconds: 35 days, the age
/// of the oldest event Stripe accepts.
const MAX_RECONCILE_SECONDS: i64 = 35 * 86_400;

/// Stream entry id before every erasure notice.
const FIRST_NOTICE_CURSOR: &str = "0-0";

/// Handler of `veo.admin.v1.Admin`.
#[derive(Debug, Clone)]
pub struct AdminService {
    biller: Biller,
    metrics: Metrics,
    /// Woken when a mapping changes, so the sync service reloads the tier
    /// overrides that depend on it.
    mapping_changed: Arc<Notify>,
    tier_of: fn(&rusqlite::Connection, &str) -> rusqlite::Result<Option<String>>,
    privacy: Option<Privacy>,
    /// Usage of other instances held for the sync replies.
    recent: Option<Arc<std::sync::Mutex<crate::remote::RecentUsage>>>,
    /// Counters shared through Redis, when configured.
    shared: Option<crate::counters::shared::SharedCounters>,
    /// Last erasure notice read from the shared counters.
    notice_cursor: Arc<std::sync::Mutex<String>>,
}

impl AdminService {
    /// Creates the service. `tier_of` returns the tier billing assigned to
    /// a customer.
    pub fn new(
        biller: Biller,
        metrics: Metrics,
        mapping_changed: Arc<Notify>,
        tier_of: fn(&rusqlite::Connection, &str) -> rusqlite::Result<Option<String>>,
    ) -> Self {
        AdminService {
            biller,
            metrics,
            mapping_changed,
            tier_of,
            privacy: None,
            recent: None,
            shared: None,
            notice_cursor: Arc::new(std::sync::Mutex::new(FIRST_NOTICE_CURSOR.to_owned())),
        }
    }

    /// Adds the counters an erasure clears: the recent usage of the sync
    /// replies and, with Redis, the shared counters.
    pub fn with_counters(
        mut self,
        recent: Arc<std::sync::Mutex<crate::remote::RecentUsage>>,
        shared: Option<crate::counters::shared::SharedCounters>,
    ) -> Self {
        self.recent = Some(recent);
        self.shared = shared;
        self
    }

    /// Adds the asset region registry, customer erasure and the audit log.
    pub fn with_privacy(mut self, privacy: Privacy) -> Self {
        self.privacy = Some(privacy);
        self
    }

    /// Stores a customer's Stripe customer.
    pub async fn set_stripe_customer(
        &self,
        request: SetStripeCustomerRequest,
        actor: String,
    ) -> Result<StripeCustomer, ServiceError> {
        validate::identifier("customer", &request.customer, MAX_ID_BYTES)?;
        customers::check_stripe_customer_id(&request.stripe_customer_id)
            .map_err(|reason| ServiceError::invalid("stripe_customer_id", reason))?;
        let customer = request.customer.clone();
        let stripe_id = request.stripe_customer_id.clone();
        let now = unix_now_s();
        let privacy = self.privacy.clone();
        let identities = self.biller.store().identities().clone();
        let outcome = self
            .biller
            .store()
            .write("set a Stripe customer", move |conn| {
                let names = Some(&identities);
                customers::set_audited(conn, names, &customer, &stripe_id, now, |tx| {
                    let Some(privacy) = &privacy else {
                        return Ok(());
                    };
                    privacy.append(
                        tx,
                        &NewEntry {
                            at_unix_ms: now.saturating_mul(1_000),
                            actor,
                            action: "set_stripe_customer".into(),
                            subject_hash: Some(privacy.subject(&customer)),
                            records: 1,
                            details: serde_json::json!({}),
                        },
                    )?;
                    Ok(())
                })
            })
            .await?;
        match outcome {
            SetOutcome::Erased => Err(ServiceError::invalid(
                "customer",
                format!(
                    "{:?} was erased, and no data about it is stored while its tokens are \
                     refused (privacy.token_lifetime_seconds after the erasure); map it after \
                     that",
                    request.customer
                ),
            )),
            SetOutcome::Taken { by } => Err(ServiceError::invalid(
                "stripe_customer_id",
                format!(
                    "{} already bills customer {by:?}; one Stripe customer bills one customer",
                    request.stripe_customer_id
                ),
            )),
            SetOutcome::Stored { unparked } => {
                info!(
                    customer_pseudonym = self
                        .biller
                        .store()
                        .identities()
                        .pseudonym(&request.customer),
                    unparked, "Stripe customer set"
                );
                self.biller.waker().notify_one();
                self.mapping_changed.notify_one();
                self.get_stripe_customer(GetStripeCustomerRequest {
                    customer: request.customer,
                })
                .await
            }
        }
    }

    /// Returns a customer's Stripe customer and billed tier.
    pub async fn get_stripe_customer(
        &self,
        request: GetStripeCustomerRequest,
    ) -> Result<StripeCustomer, ServiceError> {
        validate::identifier("customer", &request.customer, MAX_ID_BYTES)?;
        let customer = self
            .biller
            .store()
            .identities()
            .pseudonym(&request.customer);
        let tier_of = self.tier_of;
        let identities = self.biller.store().identities().clone();
        let (stripe_id, tier) = self
            .biller
            .store()
            .read("read a Stripe customer", move |conn| {
                let stripe_id = customers::get(conn, &identities, &customer)?;
                Ok((stripe_id, tier_of(conn, &customer)?))
            })
            .await?;
        Ok(StripeCustomer {
            customer: request.customer,
            stripe_customer_id: stripe_id.unwrap_or_default(),
            tier: tier.unwrap_or_default(),
        })
    }

    /// Reconciles a range.
    pub async fn reconcile(
        &self,
        request: ReconcileRequest,
        actor: String,
    ) -> Result<ReconcileReport, Status> {
        let range = reconcile_range(request.start_unix_s, request.end_unix_s)?;
        let report = reconcile::reconcile(&self.biller, &self.metrics, range, request.correct)
            .await
            .map_err(|err| match err {
                reconcile::ReconcileError::Store(source) => {
                    Status::from(ServiceError::Store(source))
                }
                other => {
                    warn!(error = %other, "reconciliation failed");
                    Status::unavailable(other.to_string())
                }
            })?;
        if request.correct
            && report.corrective_events > 0
            && let Some(privacy) = self.privacy.clone()
        {
            // The corrections are queued already; a failed entry is logged
            // and does not undo them.
            let corrections = report.corrective_events;
            let entry = NewEntry {
                at_unix_ms: unix_now_s().saturating_mul(1_000),
                actor,
                action: "reconcile_correct".into(),
                subject_hash: None,
                records: corrections,
                details: serde_json::json!({
                    "start_unix_s": range.start_unix_s,
                    "end_unix_s": range.end_unix_s,
                    "corrective_events": corrections,
                }),
            };
            let appended = self
                .biller
                .store()
                .write("audit a reconciliation", move |conn| {
                    privacy.append(conn, &entry)
                })
                .await;
            if let Err(err) = appended {
                warn!(error = %err, corrections, "failed to append a reconciliation's corrections to the audit log");
            }
        }
        let identities = self.biller.store().identities().clone();
        let mut rows = report.rows;
        let rows = self
            .biller
            .store()
            .read("name the reconciled customers", move |conn| {
                let mut revealer = identities.revealer();
                for row in &mut rows {
                    if let Some(customer) = revealer.reveal(conn, &row.customer).map_err(to_sql)? {
                        row.customer = customer;
                    }
                }
                rows.sort_by(|a, b| (&a.customer, a.meter).cmp(&(&b.customer, b.meter)));
                Ok(rows)
            })
            .await
            .map_err(|err| Status::from(ServiceError::Store(err)))?;
        Ok(ReconcileReport {
            rows: rows
                .into_iter()
                .map(|row| ReconcileRow {
                    customer: row.customer,
                    meter: row.meter.name().to_owned(),
                    ledger_value: u64::try_from(row.ledger).unwrap_or(0),
                    sent_value: u64::try_from(row.sent).unwrap_or(0),
                    stripe_value: row.stripe.map(|value| u64::try_from(value).unwrap_or(0)),
                    metrics_value: row.metrics.map(|value| u64::try_from(value).unwrap_or(0)),
                    drift_ratio: row.drift_ratio,
                    metrics_drift_ratio: row.metrics_drift_ratio,
                })
                .collect(),
            max_drift_ratio: report.max_drift_ratio,
            corrective_events: report.corrective_events,
            metrics_error: report.metrics_error.unwrap_or_default(),
            stripe_errors: report.stripe_errors,
        })
    }

    /// Lists parked events.
    pub async fn parked(
        &self,
        request: ListParkedMeterEventsRequest,
    ) -> Result<ListParkedMeterEventsResponse, ServiceError> {
        let limit = match request.limit {
            0 => DEFAULT_PARKED_LIMIT,
            limit => limit.min(MAX_PARKED_LIMIT),
        };
        let identities = self.biller.store().identities().clone();
        let events = self
            .biller
            .store()
            .read("list parked meter events", move |conn| {
                let mut events = queue::parked(conn, limit as usize)?;
                let mut revealer = identities.revealer();
                for event in &mut events {
                    // An event whose customer was erased is deleted with it,
                    // so every parked event has an identity.
                    if let Some(customer) =
                        revealer.reveal(conn, &event.customer).map_err(to_sql)?
                    {
                        event.customer = customer;
                    }
                }
                Ok(events)
            })
            .await?;
        Ok(ListParkedMeterEventsResponse {
            events: events
                .into_iter()
                .map(|event| ParkedMeterEvent {
                    identifier: event.identifier,
                    customer: event.customer,
                    meter: event.meter,
                    minute_unix_s: event.minute_unix_s,
                    value: u64::try_from(event.value).unwrap_or(0),
                    reason: event.reason,
                })
                .collect(),
        })
    }
}

/// Checks a reconciliation range: whole minutes, start before end, at most
/// 35 days, and not in the future.
pub fn reconcile_range(start_unix_s: i64, end_unix_s: i64) -> Result<TimeRange, ServiceError> {
    for (field, value) in [("start_unix_s", start_unix_s), ("end_unix_s", end_unix_s)] {
        if value < 0 || value % MINUTE_SECONDS != 0 {
            return Err(ServiceError::invalid(
                field,
                format!("{value} is not a non-negative multiple of {MINUTE_SECONDS} seconds"),
            ));
        }
    }
    if start_unix_s >= end_unix_s {
        return Err(ServiceError::invalid(
            "end_unix_s",
            format!("{end_unix_s} is not after start_unix_s {start_unix_s}"),
        ));
    }
    if end_unix_s - start_unix_s > MAX_RECONCILE_SECONDS {
        return Err(ServiceError::invalid(
            "end_unix_s",
            format!(
                "[{start_unix_s}, {end_unix_s}) is longer than {MAX_RECONCILE_SECONDS} seconds \
                 (35 days); reconcile it in parts"
            ),
        ));
    }
    let now = unix_now_s();
    if end_unix_s > now + MINUTE_SECONDS {
        return Err(ServiceError::invalid(
            "end_unix_s",
            format!("{end_unix_s} is in the future (now is {now})"),
        ));
    }
    Ok(TimeRange {
        start_unix_s,
        end_unix_s,
    })
}

#[tonic::async_trait]
impl AdminRpc for AdminService {
    async fn set_stripe_customer(
        &self,
        request: Request<SetStripeCustomerRequest>,
    ) -> Result<Response<StripeCustomer>, Status> {
        let actor = actor(request.metadata())?;
        Ok(Response::new(
            AdminService::set_stripe_customer(self, request.into_inner(), actor).await?,
        ))
    }

    async fn get_stripe_customer(
        &self,
        request: Request<GetStripeCustomerRequest>,
    ) -> Result<Response<StripeCustomer>, Status> {
        Ok(Response::new(
            AdminService::get_stripe_customer(self, request.into_inner()).await?,
        ))
    }

    async fn reconcile(
        &self,
        request: Request<ReconcileRequest>,
    ) -> Result<Response<ReconcileReport>, Status> {
        let actor = actor(request.metadata())?;
        Ok(Response::new(
            AdminService::reconcile(self, request.into_inner(), actor).await?,
        ))
    }

    async fn list_parked_meter_events(
        &self,
        request: Request<ListParkedMeterEventsRequest>,
    ) -> Result<Response<ListParkedMeterEventsResponse>, Status> {
        Ok(Response::new(self.parked(request.into_inner()).await?))
    }

    async fn set_asset_regions(
        &self,
        request: Request<SetAssetRegionsRequest>,
    ) -> Result<Response<AssetRegions>, Status> {
        let actor = actor(request.metadata())?;
        Ok(Response::new(
            AdminService::set_asset_regions(self, request.into_inner(), actor).await?,
        ))
    }

    async fn get_asset_regions(
        &self,
        request: Request<GetAssetRegionsRequest>,
    ) -> Result<Response<AssetRegions>, Status> {
        Ok(Response::new(
            AdminService::get_asset_regions(self, request.into_inner()).await?,
        ))
    }

    async fn list_asset_regions(
        &self,
        request: Request<ListAssetRegionsRequest>,
    ) -> Result<Response<ListAssetRegionsResponse>, Status> {
        Ok(Response::new(
            AdminService::list_asset_regions(self, request.into_inner()).await?,
        ))
    }

    async fn delete_asset_regions(
        &self,
        request: Request<DeleteAssetRegionsRequest>,
    ) -> Result<Response<DeleteAssetRegionsResponse>, Status> {
        let actor = actor(request.metadata())?;
        Ok(Response::new(
            AdminService::delete_asset_regions(self, request.into_inner(), actor).await?,
        ))
    }

    async fn erase_customer(
        &self,
        request: Request<EraseCustomerRequest>,
    ) -> Result<Response<Erasure>, Status> {
        let actor = actor(request.metadata())?;
        Ok(Response::new(
            AdminService::erase_customer(self, request.into_inner(), actor).await?,
        ))
    }

    async fn get_erasure(
        &self,
        request: Request<GetErasureRequest>,
    ) -> Result<Response<Erasure>, Status> {
        Ok(Response::new(
            AdminService::get_erasure(self, request.into_inner()).await?,
        ))
    }

    async fn verify_audit_log(
        &self,
        _request: Request<VerifyAuditLogRequest>,
    ) -> Result<Response<VerifyAuditLogResponse>, Status> {
        Ok(Response::new(AdminService::verify_audit_log(self).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_range_checks_bounds() {
        assert!(reconcile_range(60, 120).is_ok());
        assert!(reconcile_range(61, 120).is_err());
        assert!(reconcile_range(120, 120).is_err());
        assert!(reconcile_range(-60, 120).is_err());
        assert!(reconcile_range(0, MAX_RECONCILE_SECONDS + 60).is_err());
        let future = (unix_now_s() / 60 + 10) * 60;
        assert!(reconcile_range(future - 60, future).is_err());
    }
}
