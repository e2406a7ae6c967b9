//! Prints what the sidecar's ledger and Envoy's stats recorded after the
//! replay.

use veo_tests::envoy::Admin;
use veo_tests::sidecar::{Sidecar, unix_seconds};

use crate::error::XtaskError;

/// Number of customers listed from the ledger.
const TOP_CUSTOMERS: u32 = 5;

/// Prints the customers with the most admitted requests since
/// `since_unix_s`, as the sidecar's usage query returns them.
pub async fn print_top_customers(sidecar: &Sidecar, since_unix_s: i64) -> Result<(), XtaskError> {
    // Minute buckets start on a minute boundary, so the range starts a minute
    // early to include the bucket that contains the replay's first request.
    let customers = sidecar
        .top_customers(since_unix_s - 60, unix_seconds() + 60, TOP_CUSTOMERS)
        .await?;

    println!("\nTop customers in the sidecar's usage ledger:");
    println!("{:<24} {:>10} {:>10}", "customer", "admitted", "refused");
    for (customer, usage) in &customers {
        println!(
            "{customer:<24} {:>10} {:>10}",
            usage.admitted, usage.refused
        );
    }
    if customers.is_empty() {
        println!("(no usage recorded)");
    }
    Ok(())
}

/// Prints Envoy's stats that the filter defines. Envoy 1.40 lists them
/// with the prefix `wasmcustom.`, as `wasmcustom.veo.requests_total`.
pub async fn print_filter_stats(admin: &Admin) -> Result<(), XtaskError> {
    let stats = admin.stats("veo.").await?;
    println!("\nEnvoy stats of the filter:");
    for (name, value) in &stats {
        println!("  {name}: {value}");
    }
    if stats.is_empty() {
        println!("  (none)");
    }
    Ok(())
}
