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

/// Number of customers listed from the outbox file.
const BILLED_CUSTOMERS: usize = 10;

/// Prints what would be billed per customer, summed from the meter events
/// the sidecar wrote to its outbox file, and copies the file to `copy_to`.
pub fn print_billed(outbox: &std::path::Path, copy_to: &std::path::Path) -> Result<(), XtaskError> {
    let text = match std::fs::read_to_string(outbox) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(XtaskError::Io {
                action: "read",
                path: outbox.to_path_buf(),
                source,
            });
        }
    };
    std::fs::write(copy_to, &text).map_err(|source| XtaskError::Io {
        action: "write",
        path: copy_to.to_path_buf(),
        source,
    })?;

    // customer -> (events, requests, bytes)
    let mut billed: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let customer = event["customer"].as_str().unwrap_or("?").to_owned();
        let value = event["value"].as_u64().unwrap_or(0);
        let entry = billed.entry(customer).or_default();
        entry.0 += 1;
        match event["meter"].as_str() {
            Some("api_requests") => entry.1 += value,
            Some("egress_bytes") => entry.2 += value,
            _ => {}
        }
    }
    let mut rows: Vec<_> = billed.into_iter().collect();
    rows.sort_by(|a, b| b.1.1.cmp(&a.1.1).then_with(|| a.0.cmp(&b.0)));

    println!(
        "\nWhat would be billed (meter events in {}, no STRIPE_API_KEY set):",
        copy_to.display()
    );
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "customer", "api_requests", "egress_bytes", "events"
    );
    for (customer, (events, requests, bytes)) in rows.iter().take(BILLED_CUSTOMERS) {
        println!("{customer:<24} {requests:>14} {bytes:>14} {events:>8}");
    }
    let (events, requests, bytes) = rows.iter().fold((0, 0, 0), |sum, (_, row)| {
        (sum.0 + row.0, sum.1 + row.1, sum.2 + row.2)
    });
    println!(
        "{:<24} {requests:>14} {bytes:>14} {events:>8}",
        format!("all {} customers", rows.len())
    );
    Ok(())
}
