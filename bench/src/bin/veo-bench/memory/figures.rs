//! Bytes per customer from the memory samples, next to the sizes of the filter's encodings.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// Envoy's memory at one point of a run.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Heap bytes in use (`allocated` of `/memory`).
    pub allocated: u64,
    /// Resident set size in bytes, when the process was found.
    pub resident: Option<u64>,
}

/// The samples of one run and what changed in shared data between them.
#[derive(Debug, Clone)]
pub struct RunFigures {
    /// The filter's `token_cache_entries`.
    pub token_cache_entries: u32,
    /// After the warm-up.
    pub baseline: Sample,
    /// After one request from each new customer, synced.
    pub fresh: Sample,
    /// After the full-log customers filled their quota log, synced.
    pub full_log: Option<Sample>,
    /// New customers.
    pub customers: u64,
    /// Customers that filled their quota log.
    pub full_log_customers: u64,
    /// New `veo.rl.<slot>` keys: the customers less the records evicted to make room.
    pub new_records: u64,
    /// New `veo.tok.<slot>` keys.
    pub new_token_entries: u64,
}

/// Lengths that the encoded sizes depend on.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Bytes of the customer id.
    pub customer_len: usize,
    /// Bytes of the tier name in the token's claim.
    pub tier_len: usize,
    /// Mean bytes of a token.
    pub token_len: usize,
    /// Requests per window of the tier: the entries of a full quota log.
    pub quota: usize,
}

/// Bytes per customer, derived from both runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerCustomer {
    /// Heap growth per new customer in the run with a token-cache slot per token.
    pub fresh_customer: f64,
    /// One limiter record with one log entry, from the run without a token cache.
    pub record: f64,
    /// Growth per customer whose log went from 1 to a full quota of entries.
    pub full_log_growth: Option<f64>,
    /// One token-cache entry: the first run's growth less its records, per new entry.
    pub token_entry: f64,
    /// One token in the worker's own map, in wasm memory, which `allocated` leaves out: the
    /// first run's resident growth less the second's and the shared entries, per customer.
    /// An estimate, since resident memory also moves with what allocators keep.
    pub worker_token: Option<f64>,
}

/// Returns the encoded size of a synced limiter record of a quota tier with `log_entries`
/// admissions in its log. It is the header, customer, times and flags (19 + C), the log
/// (12 + 4 per entry), the remote usage that the sidecar's reply stored (16), the empty
/// pending list (1) and the quota of this instance's cap (4), as
/// `filter/src/limiter/record.rs` lays them out.
pub fn record_bytes(customer_len: usize, log_entries: usize) -> usize {
    19 + customer_len + 12 + 4 * log_entries + 16 + 1 + 4
}

/// Returns the encoded size of a token-cache entry with a tier claim: version, SHA-256, `exp`,
/// customer and tier with their lengths, and the tier flag (`filter/src/token_cache/entry.rs`).
pub fn token_entry_bytes(customer_len: usize, tier_len: usize) -> usize {
    1 + 32 + 8 + 1 + customer_len + 1 + 1 + tier_len
}

/// Returns the filter's token-cache slot of `token`: the first 8 bytes of its SHA-256,
/// little-endian, modulo `entries`.
pub fn token_slot(token: &str, entries: u32) -> u64 {
    let hash = Sha256::digest(token.as_bytes());
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(prefix) % u64::from(entries.max(1))
}

/// Splits the growth of both runs into the record, the full log and the token-cache entry.
/// `without_cache` must have a token cache of one slot, so its growth is records only.
pub fn per_customer(with_cache: &RunFigures, without_cache: &RunFigures) -> PerCustomer {
    let record = ratio(
        growth(&without_cache.baseline, &without_cache.fresh),
        without_cache.new_records,
    );
    let records_share = record * with_cache.new_records as f64;
    let token_entry = ratio(
        growth(&with_cache.baseline, &with_cache.fresh) - records_share,
        with_cache.new_token_entries,
    );
    let full_log_growth = with_cache.full_log.map(|full| {
        ratio(
            growth(&with_cache.fresh, &full),
            with_cache.full_log_customers,
        )
    });
    let resident_growth =
        |run: &RunFigures| Some(run.fresh.resident? as f64 - run.baseline.resident? as f64);
    let worker_token = resident_growth(with_cache)
        .zip(resident_growth(without_cache))
        .map(|(with, without)| {
            let shared = token_entry * with_cache.new_token_entries as f64;
            ratio(with - without - shared, with_cache.customers)
        });
    PerCustomer {
        fresh_customer: ratio(
            growth(&with_cache.baseline, &with_cache.fresh),
            with_cache.customers,
        ),
        record,
        full_log_growth,
        token_entry,
        worker_token,
    }
}

/// Renders both runs and the bytes per customer next to the encoded sizes.
pub fn render(
    layout: &Layout,
    max_customers: u32,
    with_cache: &RunFigures,
    without_cache: &RunFigures,
) -> String {
    let mut text = format!(
        "\nEnvoy heap per tracked customer (`allocated` of the admin /memory), Envoy \
         --concurrency 1, max_customers {max_customers}, customer ids of {} bytes, tier claim \
         of {} bytes, tokens of {} bytes\n",
        layout.customer_len, layout.tier_len, layout.token_len
    );
    for (number, run) in [(1, with_cache), (2, without_cache)] {
        render_run(&mut text, number, run);
    }

    let per = per_customer(with_cache, without_cache);
    let _ = writeln!(
        text,
        "\n{:<46} {:>9} {:>8} {:>15}",
        "bytes", "measured", "encoded", "Envoy overhead"
    );
    let mut row = |label: &str, measured: f64, encoded: Option<usize>| {
        let (encoded, overhead) = encoded.map_or_else(
            || ("-".to_string(), "-".to_string()),
            |bytes| (bytes.to_string(), format!("{:.1}", measured - bytes as f64)),
        );
        let _ = writeln!(
            text,
            "{label:<46} {measured:>9.1} {encoded:>8} {overhead:>15}"
        );
    };
    let customer = layout.customer_len;
    row(
        "limiter record, 1 log entry",
        per.record,
        Some(record_bytes(customer, 1)),
    );
    if let Some(full_growth) = per.full_log_growth {
        row(
            &format!("limiter record, {} log entries", layout.quota),
            per.record + full_growth,
            Some(record_bytes(customer, layout.quota)),
        );
    }
    row(
        "token-cache entry",
        per.token_entry,
        Some(token_entry_bytes(customer, layout.tier_len)),
    );
    if let Some(worker_token) = per.worker_token {
        row(
            "worker's token map entry, resident (estimate)",
            worker_token,
            None,
        );
    }
    row(
        "new customer, record and token entry",
        per.fresh_customer,
        None,
    );
    if let Some(full_growth) = per.full_log_growth {
        row(
            "customer with a full log, record and entry",
            per.record + per.token_entry + full_growth,
            None,
        );
    }
    text
}

fn render_run(text: &mut String, number: u32, run: &RunFigures) {
    let _ = writeln!(
        text,
        "run {number}, token_cache_entries {}: {} new customers, {} new limiter records, {} \
         new token-cache entries",
        run.token_cache_entries, run.customers, run.new_records, run.new_token_entries
    );
    let _ = writeln!(
        text,
        "  {:<26} {:>11} bytes{}",
        "after warm-up",
        run.baseline.allocated,
        resident(&run.baseline, None, 0)
    );
    let _ = writeln!(
        text,
        "  {:<26} {:>11} bytes, {:+.1} per customer{}",
        "after 1 request each",
        run.fresh.allocated,
        ratio(growth(&run.baseline, &run.fresh), run.customers),
        resident(&run.fresh, Some(&run.baseline), run.customers)
    );
    if let Some(full) = run.full_log {
        let _ = writeln!(
            text,
            "  {:<26} {:>11} bytes, {:+.1} per full-log customer{}",
            format!("after {} full logs", run.full_log_customers),
            full.allocated,
            ratio(growth(&run.fresh, &full), run.full_log_customers),
            resident(&full, Some(&run.fresh), run.full_log_customers)
        );
    }
}

/// Returns the resident set size of `sample`, with its growth per customer since `before`.
fn resident(sample: &Sample, before: Option<&Sample>, customers: u64) -> String {
    let Some(now) = sample.resident else {
        return String::new();
    };
    match before.and_then(|before| before.resident) {
        Some(before) => format!(
            " (resident {:.1} MiB, {:+.1} per customer)",
            now as f64 / MIB,
            ratio(now as f64 - before as f64, customers)
        ),
        None => format!(" (resident {:.1} MiB)", now as f64 / MIB),
    }
}

const MIB: f64 = 1024.0 * 1024.0;

fn growth(before: &Sample, after: &Sample) -> f64 {
    after.allocated as f64 - before.allocated as f64
}

fn ratio(bytes: f64, count: u64) -> f64 {
    if count == 0 {
        0.0
    } else {
        bytes / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(allocated: u64) -> Sample {
        Sample {
            allocated,
            resident: None,
        }
    }

    fn run(token_cache_entries: u32, growth: u64, full_log: Option<u64>) -> RunFigures {
        RunFigures {
            token_cache_entries,
            baseline: sample(1_000_000),
            fresh: sample(1_000_000 + growth),
            full_log: full_log.map(|extra| sample(1_000_000 + growth + extra)),
            customers: 100,
            full_log_customers: 10,
            new_records: 100,
            new_token_entries: if token_cache_entries > 1 { 50 } else { 0 },
        }
    }

    #[test]
    fn growth_splits_into_record_and_token_entry() {
        // 100 records of 150 bytes, plus 50 token entries of 170 bytes in the first run.
        let with_cache = run(400, 100 * 150 + 50 * 170, Some(10 * 240));
        let without_cache = run(1, 100 * 150, None);
        let per = per_customer(&with_cache, &without_cache);
        assert_eq!(per.record, 150.0);
        assert_eq!(per.token_entry, 170.0);
        assert_eq!(per.full_log_growth, Some(240.0));
        assert_eq!(per.fresh_customer, 235.0);
    }

    #[test]
    fn shrinking_heap_gives_negative_growth() {
        let mut with_cache = run(400, 0, None);
        with_cache.fresh = sample(999_000);
        let per = per_customer(&with_cache, &run(1, 0, None));
        assert_eq!(per.fresh_customer, -10.0);
    }

    #[test]
    fn encoded_sizes_follow_the_layouts() {
        // A 15-byte id: 19 + 15 header, 12 + 4 log, 16 remote usage, 1 pending count, 4 cap
        // quota.
        assert_eq!(record_bytes(15, 1), 71);
        assert_eq!(record_bytes(15, 60), 307);
        assert_eq!(token_entry_bytes(15, 5), 64);
    }

    #[test]
    fn token_slot_is_within_the_table() {
        for entries in [1, 7, 40_000] {
            assert!(token_slot("a.b.c", entries) < u64::from(entries));
        }
        assert_eq!(token_slot("a.b.c", 1), 0);
    }

    #[test]
    fn render_shows_each_row() {
        let with_cache = run(400, 100 * 150 + 50 * 170, Some(10 * 240));
        let without_cache = run(1, 100 * 150, None);
        let layout = Layout {
            customer_len: 15,
            tier_len: 5,
            token_len: 300,
            quota: 60,
        };
        let text = render(&layout, 400, &with_cache, &without_cache);
        let row = |label: &str| {
            text.lines()
                .find(|line| line.starts_with(label))
                .map(|line| line[label.len()..].split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(row("limiter record, 1 log entry"), ["150.0", "71", "79.0"]);
        assert_eq!(
            row("limiter record, 60 log entries"),
            ["390.0", "307", "83.0"]
        );
        assert_eq!(row("token-cache entry"), ["170.0", "64", "106.0"]);
        assert_eq!(
            row("new customer, record and token entry"),
            ["235.0", "-", "-"]
        );
        assert!(!text.contains("worker's token map"));
    }

    #[test]
    fn worker_token_estimate_subtracts_shared_entries() {
        let resident = |mut run: RunFigures, growth: u64| {
            run.baseline.resident = Some(100_000_000);
            run.fresh.resident = Some(100_000_000 + growth);
            run
        };
        // Run 1 grows by 100 records of 150, 50 shared entries of 170 and 100 tokens of 400.
        let with_cache = resident(
            run(400, 100 * 150 + 50 * 170, None),
            100 * 150 + 50 * 170 + 100 * 400,
        );
        let without_cache = resident(run(1, 100 * 150, None), 100 * 150);
        let per = per_customer(&with_cache, &without_cache);
        assert_eq!(per.worker_token, Some(400.0));
    }
}
