//! `veo-bench memory`: Envoy's heap per customer that the filter tracks in shared data.
//!
//! Each run starts the real stack: Envoy with one worker, the sidecar and an echo upstream.
//! It reads `allocated` from Envoy's admin `/memory` three times: after a warm-up, after one
//! request from each of N new basic-tier customers, and after some of them filled their quota
//! log. The first run gives nearly every token a cache slot of its own. The second has a token
//! cache of one slot, so it measures the limiter record alone, and the difference between the
//! runs is the token-cache entry.

mod figures;
mod traffic;

use std::time::Instant;

use anyhow::{Context, ensure};
use serde_json::json;
use veo_bench::tokens::{SigningKey, TokenSpec};
use veo_tests::Stack;
use veo_tests::envoy::Admin;
use veo_tests::plugin::PluginConfig;

use figures::{Layout, RunFigures, Sample};
use traffic::Customer;

/// Tier of every measured customer.
const TIER: &str = "basic";

/// Requests per window of [`TIER`], as the filter's default tier table sets it.
const QUOTA: usize = 60;

/// Quota window of [`TIER`], in seconds.
const WINDOW_SECONDS: u64 = 60;

/// Customers that send requests before the baseline, so that first-use allocations of Envoy,
/// the filter and the sync call fall before it.
const WARMUP_CUSTOMERS: usize = 100;

/// Largest table the filter accepts for `max_customers` and `token_cache_entries`.
const MAX_TABLE_SLOTS: u32 = 1_000_000;

/// Options of `veo-bench memory`.
#[derive(Debug, clap::Args)]
pub struct MemoryArgs {
    /// New customers per run, each sending one request with a token of its own.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Customers of the first run that then send requests until one gets 429, which fills
    /// their quota log (60 entries). They are the last ones that sent their first request.
    #[arg(long, default_value_t = 2_000)]
    full_log_customers: usize,
    /// The filter's `max_customers`, and `token_cache_entries` of the first run. The default
    /// is the largest the filter accepts, so that records are almost never evicted and tokens
    /// almost never share a slot. It costs nothing up front, because Envoy creates a key only
    /// when it is first written.
    #[arg(long, default_value_t = MAX_TABLE_SLOTS)]
    table_slots: u32,
}

/// Runs both measurements and prints the figures. Envoy, the filter module and the sidecar
/// are found like the end-to-end tests find them (`ENVOY_BIN`, `VEO_FILTER_WASM`,
/// `VEO_SIDECAR_BIN`, else the release builds and `.tools/`).
pub async fn run(args: &MemoryArgs) -> anyhow::Result<bool> {
    ensure!(
        args.customers >= 1,
        "invalid --customers 0: measure at least 1 customer"
    );
    ensure!(
        args.full_log_customers <= args.customers,
        "invalid --full-log-customers {}: at most --customers ({})",
        args.full_log_customers,
        args.customers
    );
    let table_slots = args.table_slots;
    ensure!(
        (1..=MAX_TABLE_SLOTS).contains(&table_slots),
        "invalid --table-slots {table_slots}: must be 1 to {MAX_TABLE_SLOTS}"
    );

    let started = Instant::now();
    let (key, warmup, customers) = mint_customers(SigningKey::generate(), args.customers).await?;
    eprintln!(
        "minted {} tokens in {:.1} s",
        warmup.len() + customers.len(),
        started.elapsed().as_secs_f64()
    );

    let with_cache = measure(
        &format!("run 1, token_cache_entries {table_slots}"),
        &key,
        &warmup,
        &customers,
        table_slots,
        table_slots,
        args.full_log_customers,
    )
    .await?;
    let without_cache = measure(
        "run 2, token_cache_entries 1",
        &key,
        &warmup,
        &customers,
        table_slots,
        1,
        0,
    )
    .await?;

    let layout = Layout {
        customer_len: customers[0].id.len(),
        tier_len: TIER.len(),
        token_len: customers.iter().map(|c| c.token.len()).sum::<usize>() / customers.len(),
        quota: QUOTA,
    };
    print!(
        "{}",
        figures::render(&layout, table_slots, &with_cache, &without_cache)
    );
    Ok(true)
}

/// Starts the stack with `token_cache_entries`, warms it up and takes the samples of one run.
async fn measure(
    name: &str,
    key: &SigningKey,
    warmup: &[Customer],
    customers: &[Customer],
    max_customers: u32,
    token_cache_entries: u32,
    full_log_customers: usize,
) -> anyhow::Result<RunFigures> {
    eprintln!("{name}: starting Envoy, the sidecar and the upstream");
    let config = plugin_config(key, max_customers, token_cache_entries)?;
    let stack = Stack::start(&config).await?;
    let admin = stack.envoy.admin();
    let client = stack.client();
    let pid = traffic::envoy_pid(stack.dir());

    traffic::send_one_each(&client, warmup).await?;
    traffic::fill_quota_logs(&client, &warmup[..1], QUOTA).await?;
    traffic::wait_for_sync(admin, warmup.len()).await?;
    let baseline = sample(admin, pid).await?;
    let evictions_before = traffic::counter(admin, "limiter_evictions_total").await?;

    let started = Instant::now();
    traffic::send_one_each(&client, customers).await?;
    eprintln!(
        "{name}: {} customers sent one request each in {:.1} s",
        customers.len(),
        started.elapsed().as_secs_f64()
    );
    traffic::wait_for_sync(admin, warmup.len() + customers.len()).await?;
    let fresh = sample(admin, pid).await?;
    let evictions = traffic::counter(admin, "limiter_evictions_total").await? - evictions_before;

    let full_log = if full_log_customers > 0 {
        let started = Instant::now();
        let filled = &customers[customers.len() - full_log_customers..];
        traffic::fill_quota_logs(&client, filled, QUOTA).await?;
        eprintln!(
            "{name}: {full_log_customers} customers filled their quota log in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        traffic::wait_for_sync(admin, warmup.len() + customers.len()).await?;
        Some(sample(admin, pid).await?)
    } else {
        None
    };

    let limiter_errors = traffic::counter(admin, "limiter_errors_total").await?;
    ensure!(
        limiter_errors == 0,
        "{name}: {limiter_errors} requests were admitted without the limiter (see \
         veo.limiter_errors_total), so some records were not written; see {}",
        stack.dir().join("envoy.log").display()
    );
    Ok(RunFigures {
        token_cache_entries,
        baseline,
        fresh,
        full_log,
        customers: customers.len() as u64,
        full_log_customers: full_log_customers as u64,
        new_records: (customers.len() as u64).saturating_sub(evictions),
        new_token_entries: new_token_slots(warmup, customers, token_cache_entries),
    })
}

/// Reads Envoy's allocated heap and resident set size.
async fn sample(admin: &Admin, pid: Option<u32>) -> anyhow::Result<Sample> {
    Ok(Sample {
        allocated: traffic::allocated_bytes(admin).await?,
        resident: pid.and_then(traffic::resident_bytes),
    })
}

/// Returns the plugin configuration: the bench key, one basic tier of [`QUOTA`] requests per
/// [`WINDOW_SECONDS`], and the two table sizes.
fn plugin_config(
    key: &SigningKey,
    max_customers: u32,
    token_cache_entries: u32,
) -> anyhow::Result<PluginConfig> {
    let spec = TokenSpec::default();
    let jwks = serde_json::to_value(key.jwks()).context("failed to encode the JWKS")?;
    let tier = json!({"quota": {"requests": QUOTA, "window_seconds": WINDOW_SECONDS}});
    Ok(PluginConfig::for_jwks(jwks)
        .set("/jwt/issuer", json!(spec.issuer))
        .set("/jwt/audiences", json!([spec.audience]))
        .set("/tiers", json!({ TIER: tier }))
        .set("/default_tier", json!(TIER))
        .remove("/forged_headers")
        .set("/max_customers", json!(max_customers))
        .set("/token_cache_entries", json!(token_cache_entries)))
}

/// Mints one basic-tier token each for [`WARMUP_CUSTOMERS`] customers named
/// `warmup-{index:06}` and `count` customers named `customer-{index:06}`, and hands the key
/// back.
async fn mint_customers(
    key: SigningKey,
    count: usize,
) -> anyhow::Result<(SigningKey, Vec<Customer>, Vec<Customer>)> {
    tokio::task::spawn_blocking(move || {
        let spec = TokenSpec::default();
        let mint = |prefix: &str, count: usize| -> anyhow::Result<Vec<Customer>> {
            (0..count)
                .map(|index| {
                    let id = format!("{prefix}-{index:06}");
                    let token = key.mint(&spec, &id, TIER)?;
                    Ok(Customer { id, token })
                })
                .collect()
        };
        let warmup = mint("warmup", WARMUP_CUSTOMERS)?;
        let customers = mint("customer", count)?;
        Ok((key, warmup, customers))
    })
    .await
    .context("token minting stopped")?
}

/// Returns how many token-cache slots the customers' tokens take that no warm-up token took.
/// The slot is the filter's: the first 8 bytes of the token's SHA-256, little-endian, modulo
/// `token_cache_entries`.
fn new_token_slots(warmup: &[Customer], customers: &[Customer], token_cache_entries: u32) -> u64 {
    let slots = |group: &[Customer]| -> std::collections::HashSet<u64> {
        group
            .iter()
            .map(|customer| figures::token_slot(&customer.token, token_cache_entries))
            .collect()
    };
    let warmup_slots = slots(warmup);
    slots(customers).difference(&warmup_slots).count() as u64
}
