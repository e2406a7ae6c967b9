//! The `veo.usage.v1.Usage` service: read-only queries over the ledger.

use tonic::{Request, Response, Status};
use tracing::debug;
use veo_proto::usage::usage_server::Usage as UsageRpc;
use veo_proto::usage::{
    self, GetUsageRequest, GetUsageResponse, ListTopCustomersRequest, ListTopCustomersResponse,
    UsageBucket,
};

use crate::status::ServiceError;
use crate::store::Store;
use crate::validate;

/// Handler of `veo.usage.v1.Usage`.
#[derive(Debug, Clone)]
pub struct UsageService {
    store: Store,
}

impl UsageService {
    /// Creates the service over `store`.
    pub fn new(store: Store) -> UsageService {
        UsageService { store }
    }

    /// Returns one customer's buckets and totals over the requested range.
    pub async fn usage(&self, request: GetUsageRequest) -> Result<GetUsageResponse, ServiceError> {
        let (range, granularity) = validate::usage_query(&request)?;

        let buckets = self
            .store
            .usage(request.customer.clone(), range, granularity)
            .await?;
        debug!(
            customer = %request.customer,
            ?granularity,
            buckets = buckets.len(),
            "served usage"
        );

        let admitted_requests = buckets
            .iter()
            .fold(0u64, |sum, bucket| sum.saturating_add(bucket.admitted));
        let refused_requests = buckets
            .iter()
            .fold(0u64, |sum, bucket| sum.saturating_add(bucket.refused));
        let egress_bytes = buckets
            .iter()
            .fold(0u64, |sum, bucket| sum.saturating_add(bucket.egress_bytes));
        Ok(GetUsageResponse {
            customer: request.customer,
            buckets: buckets
                .into_iter()
                .map(|bucket| UsageBucket {
                    start_unix_s: bucket.start_unix_s,
                    admitted_requests: bucket.admitted,
                    refused_requests: bucket.refused,
                    egress_bytes: bucket.egress_bytes,
                })
                .collect(),
            admitted_requests,
            refused_requests,
            egress_bytes,
        })
    }

    /// Returns the customers with the most admitted requests over the range.
    pub async fn top_customers(
        &self,
        request: ListTopCustomersRequest,
    ) -> Result<ListTopCustomersResponse, ServiceError> {
        let (range, limit) = validate::top_query(&request)?;

        let totals = self.store.top_customers(range, limit).await?;
        debug!(limit, customers = totals.len(), "served top customers");

        Ok(ListTopCustomersResponse {
            customers: totals
                .into_iter()
                .map(|total| usage::CustomerTotal {
                    customer: total.customer,
                    admitted_requests: total.admitted,
                    refused_requests: total.refused,
                    egress_bytes: total.egress_bytes,
                })
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl UsageRpc for UsageService {
    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        Ok(Response::new(self.usage(request.into_inner()).await?))
    }

    async fn list_top_customers(
        &self,
        request: Request<ListTopCustomersRequest>,
    ) -> Result<Response<ListTopCustomersResponse>, Status> {
        Ok(Response::new(
            self.top_customers(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Batch, UsageEntry};

    const HOUR: i64 = 3_600;

    async fn service_with(records: &[(&str, i64, i64, i64)]) -> (tempfile::TempDir, UsageService) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_support::open(dir.path());
        let batch = Batch {
            instance_id: "a".into(),
            sequence: 1,
            records: records
                .iter()
                .map(|&(customer, minute_unix_s, admitted, refused)| UsageEntry {
                    customer: customer.into(),
                    tier: "basic".into(),
                    minute_unix_s,
                    admitted,
                    refused,
                    // 100 bytes per admitted request.
                    egress_bytes: admitted * 100,
                    quota: None,
                })
                .collect(),
        };
        store.apply(batch, 0).await.unwrap();
        (dir, UsageService::new(store))
    }

    #[tokio::test]
    async fn usage_totals_match_buckets() {
        let (_dir, service) = service_with(&[
            ("c1", HOUR, 3, 1),
            ("c1", HOUR + 60, 4, 0),
            ("c1", 2 * HOUR, 5, 2),
        ])
        .await;
        let request = GetUsageRequest {
            customer: "c1".into(),
            start_unix_s: 0,
            end_unix_s: 3 * HOUR,
            granularity: usage::Granularity::Hour as i32,
        };

        let reply = service.usage(request).await.unwrap();

        assert_eq!(reply.customer, "c1");
        let starts: Vec<_> = reply.buckets.iter().map(|b| b.start_unix_s).collect();
        assert_eq!(starts, [HOUR, 2 * HOUR]);
        assert_eq!(reply.buckets[0].admitted_requests, 7);
        assert_eq!(reply.buckets[0].egress_bytes, 700);
        assert_eq!(reply.admitted_requests, 12);
        assert_eq!(reply.refused_requests, 3);
        assert_eq!(reply.egress_bytes, 1_200);
    }

    #[tokio::test]
    async fn top_customers_maps_totals() {
        let (_dir, service) = service_with(&[("c1", 60, 3, 1), ("c2", 60, 9, 0)]).await;
        let request = ListTopCustomersRequest {
            start_unix_s: 0,
            end_unix_s: HOUR,
            limit: 0,
        };

        let reply = service.top_customers(request).await.unwrap();

        let names: Vec<_> = reply
            .customers
            .iter()
            .map(|c| c.customer.as_str())
            .collect();
        assert_eq!(names, ["c2", "c1"]);
        assert_eq!(reply.customers[1].refused_requests, 1);
        assert_eq!(reply.customers[0].egress_bytes, 900);
    }

    #[tokio::test]
    async fn reversed_range_is_invalid_argument() {
        let (_dir, service) = service_with(&[]).await;
        let request = GetUsageRequest {
            customer: "c1".into(),
            start_unix_s: HOUR,
            end_unix_s: 0,
            granularity: 0,
        };

        let status = Status::from(service.usage(request).await.unwrap_err());

        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("end_unix_s"),
            "{}",
            status.message()
        );
    }
}
