//! Requests, sync waits and memory readings of the memory measurement.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::task::JoinSet;
use veo_tests::client::HttpClient;
use veo_tests::envoy::Admin;

/// Path of every request; the echo upstream accepts any.
const PATH: &str = "/videos/1/manifest.m3u8";

/// Concurrent senders. Envoy has one worker, so more only queue there.
const SENDERS: usize = 8;

/// How often the sync counters are read while waiting.
const SYNC_POLL: Duration = Duration::from_millis(100);

/// Maximum wait for the sync calls that drain the records.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// Usage records per sync batch, as the filter caps them (`MAX_RECORDS_PER_BATCH`).
const RECORDS_PER_BATCH: usize = 10_000;

/// Readings of `/memory` per sample, of which the lowest is kept.
const MEMORY_READINGS: usize = 5;

/// Time between two readings of `/memory`.
const MEMORY_READING_GAP: Duration = Duration::from_millis(150);

/// A customer and its token.
#[derive(Debug, Clone)]
pub struct Customer {
    /// Customer id (`sub`).
    pub id: String,
    /// Bearer token.
    pub token: String,
}

/// Sends one request per customer, and each must be admitted.
pub async fn send_one_each(client: &HttpClient, customers: &[Customer]) -> anyhow::Result<()> {
    send(client, customers, Load::OneRequest).await
}

/// Sends requests per customer until one gets 429, which leaves `quota` entries in its quota
/// log. The customer may have one admitted request in the log already, or none when it left
/// the window.
pub async fn fill_quota_logs(
    client: &HttpClient,
    customers: &[Customer],
    quota: usize,
) -> anyhow::Result<()> {
    send(client, customers, Load::FillQuotaLog(quota)).await
}

/// Requests of one customer.
#[derive(Debug, Clone, Copy)]
enum Load {
    OneRequest,
    FillQuotaLog(usize),
}

/// Serves [`SENDERS`] customers at a time, in the order given, each one's requests in turn.
async fn send(client: &HttpClient, customers: &[Customer], load: Load) -> anyhow::Result<()> {
    let mut senders = JoinSet::new();
    for first in 0..SENDERS.min(customers.len()) {
        let client = client.clone();
        let group: Vec<Customer> = customers
            .iter()
            .skip(first)
            .step_by(SENDERS)
            .cloned()
            .collect();
        senders.spawn(async move {
            for customer in &group {
                match load {
                    Load::OneRequest => send_admitted(&client, customer).await?,
                    Load::FillQuotaLog(quota) => fill_quota_log(&client, customer, quota).await?,
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = senders.join_next().await {
        result.context("a request sender stopped")??;
    }
    Ok(())
}

async fn send_admitted(client: &HttpClient, customer: &Customer) -> anyhow::Result<()> {
    let reply = client.get_with_token(PATH, &customer.token, &[]).await?;
    if reply.status != 200 {
        bail!(
            "the request of customer {} returned {} (expected 200): {}",
            customer.id,
            reply.status,
            reply.body
        );
    }
    Ok(())
}

async fn fill_quota_log(
    client: &HttpClient,
    customer: &Customer,
    quota: usize,
) -> anyhow::Result<()> {
    for admitted in 0..=quota {
        let reply = client.get_with_token(PATH, &customer.token, &[]).await?;
        match reply.status {
            200 => continue,
            429 if admitted + 1 >= quota => return Ok(()),
            status => bail!(
                "request {} of customer {} returned {status} after {admitted} admitted (expected \
                 200 until the quota of {quota} is used up, then 429): {}",
                admitted + 1,
                customer.id,
                reply.body
            ),
        }
    }
    bail!(
        "customer {} had {} requests admitted, more than its quota of {quota}",
        customer.id,
        quota + 1
    )
}

/// Waits until the records of `customers` customers, who just sent requests, are in their
/// synced state: pending usage drained and the sidecar's reply about them stored.
///
/// The sync role drains the records on every tick and sends one call at a time. So this waits
/// for enough successful calls after this point. It needs one per batch the usage can fill,
/// with two usage records per customer when its requests straddle a minute. Then it needs one
/// whose reply names every customer, and one more, which proves that reply was handled. It counts calls because the
/// sync role keeps polling as long as the sidecar's replies name customers, so the counters
/// do not settle.
pub async fn wait_for_sync(admin: &Admin, customers: usize) -> anyhow::Result<()> {
    let batches = (2 * customers).div_ceil(RECORDS_PER_BATCH) as u64;
    let needed = batches + 2;
    let (sent_before, failed_before) = sync_counters(admin).await?;
    let started = Instant::now();
    loop {
        tokio::time::sleep(SYNC_POLL).await;
        let (sent, failed) = sync_counters(admin).await?;
        let succeeded = (sent - sent_before).saturating_sub(failed - failed_before);
        if succeeded >= needed {
            return Ok(());
        }
        if started.elapsed() > SYNC_TIMEOUT {
            bail!(
                "only {succeeded} of {needed} sync calls succeeded in {} s ({} failed); check \
                 the sidecar's log",
                SYNC_TIMEOUT.as_secs(),
                failed - failed_before
            );
        }
    }
}

/// Returns the batches sent and the failed sync calls.
async fn sync_counters(admin: &Admin) -> anyhow::Result<(u64, u64)> {
    Ok((
        counter(admin, "sync_batches_sent_total").await?,
        counter(admin, "sync_failures_total").await?,
    ))
}

/// Returns the filter's counter `veo.<name>`, 0 while it is not defined.
pub async fn counter(admin: &Admin, name: &str) -> anyhow::Result<u64> {
    let full_name = format!("wasmcustom.veo.{name}");
    let stats = admin.stats(&full_name).await?;
    Ok(stats.get(&full_name).copied().unwrap_or(0))
}

/// Returns the lowest of [`MEMORY_READINGS`] readings of `allocated` from `/memory`: the
/// bytes of Envoy's heap in use, as tcmalloc counts them. The lowest leaves out the buffers of
/// a sync call in flight, which the sync role's polls make likely at any moment.
pub async fn allocated_bytes(admin: &Admin) -> anyhow::Result<u64> {
    let mut lowest = u64::MAX;
    for reading in 0..MEMORY_READINGS {
        if reading > 0 {
            tokio::time::sleep(MEMORY_READING_GAP).await;
        }
        let reply = admin.get("/memory").await?;
        let memory = reply.json()?;
        // The admin API renders uint64 fields as JSON strings.
        let allocated = &memory["allocated"];
        let value = allocated
            .as_str()
            .and_then(|text| text.parse().ok())
            .or_else(|| allocated.as_u64())
            .with_context(|| {
                format!("invalid /memory reply without `allocated`: {}", reply.body)
            })?;
        lowest = lowest.min(value);
    }
    Ok(lowest)
}

/// Returns the process id of the Envoy that runs the bootstrap in `dir`, found through its
/// command line in `/proc`, or `None` when no such process is found.
// NOTE: relies on the harness writing the bootstrap to `envoy.yaml` in the stack's folder.
pub fn envoy_pid(dir: &Path) -> Option<u32> {
    let bootstrap = dir.join("envoy.yaml");
    let bootstrap = bootstrap.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let command_line = std::fs::read(entry.path().join("cmdline")).ok()?;
            command_line
                .split(|&byte| byte == 0)
                .any(|argument| argument == bootstrap)
                .then_some(pid)
        })
        .next()
}

/// Returns the resident set size of process `pid` in bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
