//! Prints what the sidecar's ledger and Envoy's stats recorded after the
//! replay.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use veo_proto::usage::ListTopCustomersRequest;
use veo_proto::usage::usage_client::UsageClient;

use super::admin::Admin;
use crate::error::XtaskError;

/// Number of customers listed from the ledger.
const TOP_CUSTOMERS: u32 = 5;

/// Prints the customers with the most admitted requests since
/// `since_unix_s`, as the sidecar's usage query returns them.
pub async fn print_top_customers(sidecar: SocketAddr, since_unix_s: i64) -> Result<(), XtaskError> {
    let target = format!("http://{sidecar}");
    let request_error = |reason: String| XtaskError::Request {
        target: format!("{target} (veo.usage.v1.Usage)"),
        reason,
    };
    let mut client = UsageClient::connect(target.clone())
        .await
        .map_err(|err| request_error(err.to_string()))?;
    let now = unix_seconds();
    // Minute buckets start on a minute boundary, so the range starts a minute
    // early to include the bucket that contains the replay's first request.
    let response = client
        .list_top_customers(ListTopCustomersRequest {
            start_unix_s: since_unix_s - 60,
            end_unix_s: now + 60,
            limit: TOP_CUSTOMERS,
        })
        .await
        .map_err(|status| request_error(status.message().to_owned()))?
        .into_inner();

    println!("\nTop customers in the sidecar's usage ledger:");
    println!("{:<24} {:>10} {:>10}", "customer", "admitted", "refused");
    for customer in &response.customers {
        println!(
            "{:<24} {:>10} {:>10}",
            customer.customer, customer.admitted_requests, customer.refused_requests
        );
    }
    if response.customers.is_empty() {
        println!("(no usage recorded)");
    }
    Ok(())
}

/// Prints Envoy's stats that the filter defines. Envoy 1.40 lists them
/// with the prefix `wasmcustom.`, as `wasmcustom.veo.requests_total`.
pub async fn print_filter_stats(admin: &Admin) -> Result<(), XtaskError> {
    let stats = admin.get("/stats").await?;
    println!("\nEnvoy stats of the filter:");
    let mut printed = false;
    for line in stats.lines().filter(|line| line.contains("veo.")) {
        println!("  {line}");
        printed = true;
    }
    if !printed {
        println!("  (none)");
    }
    Ok(())
}

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}
