//! Counters the filter exports as Envoy stats. Requests bump plain
//! in-memory cells; a timer adds the totals to Envoy's counters, so
//! counting costs no host call on the request path.
//!
//! Envoy files these under the `wasmcustom.` stat namespace; see the
//! crate README for the names as `/stats` shows them.

use std::cell::Cell;

use crate::config::Tiers;
use crate::geo::{ClientRegion, UNKNOWN_REGION};
use crate::host::{Host, LogLevel};

/// A counter that exists once per filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    /// Requests seen by the HTTP filter.
    Requests,
    /// Requests rejected with 401.
    AuthFailures,
    /// Tokens found in the verified-token cache (either level).
    TokenCacheHits,
    /// Tokens that had to be verified.
    TokenCacheMisses,
    /// Customer records evicted from the limiter table.
    LimiterEvictions,
    /// Requests admitted without the shared limiter after a shared-data
    /// failure or endless compare-and-swap conflicts.
    LimiterErrors,
    /// Usage messages dropped because no sync role took them.
    UsageDropped,
    /// Sync calls to the sidecar dispatched.
    SyncBatchesSent,
    /// Sync calls that failed or timed out.
    SyncFailures,
    /// Sync replies and failures while the counters shared with other
    /// instances were unreachable.
    SyncDegraded,
    /// Requests admitted under the "local" failure policy while the shared
    /// counters were unreachable.
    FailOpen,
    /// Requests rejected under the "refuse" failure policy while the shared
    /// counters were unreachable.
    FailClosed,
    /// Customer tier overrides from the sidecar ignored because they name a
    /// tier the plugin configuration does not define, counted once per
    /// received set.
    TierOverridesIgnored,
    /// Client-sent region headers removed before the geo-fence read them:
    /// a CDN country header from an untrusted address, or a storage region
    /// header.
    GeoHeadersRemoved,
    /// Usage records held for the sidecar that were folded into an older
    /// record of their hour, day or ten minutes to stay within
    /// `sidecar.max_backlog_records`.
    BacklogRecordsMerged,
    /// Admitted requests whose usage was dropped because merging could not
    /// keep the records held for the sidecar within the bound.
    BacklogRequestsDropped,
    /// Response body bytes dropped with those records.
    BacklogBytesDropped,
    /// Requests for an asset rejected with 503 because no asset region
    /// registry had arrived from the sidecar yet.
    GeoRegistryPending,
    /// Usage records the sidecar rejected as invalid, dropped from their
    /// batch.
    UsageRejectedRecords,
}

impl Counter {
    /// Every counter, in id order.
    pub const ALL: [Counter; 19] = [
        Counter::Requests,
        Counter::AuthFailures,
        Counter::TokenCacheHits,
        Counter::TokenCacheMisses,
        Counter::LimiterEvictions,
        Counter::LimiterErrors,
        Counter::UsageDropped,
        Counter::SyncBatchesSent,
        Counter::SyncFailures,
        Counter::SyncDegraded,
        Counter::FailOpen,
        Counter::FailClosed,
        Counter::TierOverridesIgnored,
        Counter::GeoHeadersRemoved,
        Counter::BacklogRecordsMerged,
        Counter::BacklogRequestsDropped,
        Counter::BacklogBytesDropped,
        Counter::GeoRegistryPending,
        Counter::UsageRejectedRecords,
    ];

    /// Returns the metric name passed to Envoy.
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "veo.requests_total",
            Self::AuthFailures => "veo.auth_failures_total",
            Self::TokenCacheHits => "veo.token_cache_hits_total",
            Self::TokenCacheMisses => "veo.token_cache_misses_total",
            Self::LimiterEvictions => "veo.limiter_evictions_total",
            Self::LimiterErrors => "veo.limiter_errors_total",
            Self::UsageDropped => "veo.usage_dropped_total",
            Self::SyncBatchesSent => "veo.sync_batches_sent_total",
            Self::SyncFailures => "veo.sync_failures_total",
            Self::SyncDegraded => "veo.sync_degraded_total",
            Self::FailOpen => "veo.fail_open_total",
            Self::FailClosed => "veo.fail_closed_total",
            Self::TierOverridesIgnored => "veo.tier_overrides_ignored_total",
            Self::GeoHeadersRemoved => "veo.geo_headers_removed_total",
            Self::BacklogRecordsMerged => "veo.usage_backlog_merged_total",
            Self::BacklogRequestsDropped => "veo.usage_backlog_dropped_total",
            Self::BacklogBytesDropped => "veo.usage_backlog_dropped_bytes_total",
            Self::GeoRegistryPending => "veo.geo_registry_pending_total",
            Self::UsageRejectedRecords => "veo.usage_rejected_records_total",
        }
    }
}

/// Returns the metric name of the per-tier 429 counter.
pub fn rate_limited_name(tier: &str) -> String {
    format!("veo.rate_limited_total.tier.{tier}")
}

/// Returns the metric name of the per-region 451 counter.
pub fn geo_blocked_name(region: &str) -> String {
    format!("veo.geo_blocked_total.region.{region}")
}

/// Unflushed counts and the host's metric ids.
#[derive(Debug)]
pub struct Metrics {
    counts: [Cell<u64>; Counter::ALL.len()],
    rate_limited: Vec<Cell<u64>>,
    ids: Vec<Option<u32>>,
    rate_limited_ids: Vec<Option<u32>>,
    /// 451 counts per region id, then one for the unknown region.
    geo_blocked: Vec<Cell<u64>>,
    geo_blocked_ids: Vec<Option<u32>>,
}

impl Metrics {
    /// Defines every counter with the host, one 429 counter per tier.
    pub fn define(host: &impl Host, tiers: &Tiers) -> Self {
        let mut failed = Vec::new();
        let mut define = |name: &str| match host.define_counter(name) {
            Ok(id) => Some(id),
            Err(_) => {
                failed.push(name.to_owned());
                None
            }
        };
        let ids = Counter::ALL
            .iter()
            .map(|counter| define(counter.name()))
            .collect();
        let rate_limited_ids = tiers
            .all()
            .iter()
            .map(|tier| define(&rate_limited_name(&tier.name)))
            .collect();
        if !failed.is_empty() {
            host.log(
                LogLevel::Warn,
                &format!("could not define metrics names={}", failed.join(",")),
            );
        }
        Self {
            counts: Default::default(),
            rate_limited: tiers.all().iter().map(|_| Cell::new(0)).collect(),
            ids,
            rate_limited_ids,
            geo_blocked: Vec::new(),
            geo_blocked_ids: Vec::new(),
        }
    }

    /// Defines one 451 counter per region in `regions`, whose indexes are
    /// the region ids, and one for the unknown region.
    pub fn define_geo_blocked(&mut self, host: &impl Host, regions: &[String]) {
        let names = regions.iter().map(String::as_str).chain([UNKNOWN_REGION]);
        let mut failed = Vec::new();
        self.geo_blocked_ids = names
            .map(|region| {
                let name = geo_blocked_name(region);
                let id = host.define_counter(&name).ok();
                if id.is_none() {
                    failed.push(name);
                }
                id
            })
            .collect();
        self.geo_blocked = self.geo_blocked_ids.iter().map(|_| Cell::new(0)).collect();
        if !failed.is_empty() {
            host.log(
                LogLevel::Warn,
                &format!("could not define metrics names={}", failed.join(",")),
            );
        }
    }

    /// Counts one 451 of a client in `region`.
    pub fn add_geo_blocked(&self, region: ClientRegion) {
        let index = match region {
            ClientRegion::Known(id) => usize::from(id),
            ClientRegion::Unknown => self.geo_blocked.len().saturating_sub(1),
        };
        if let Some(cell) = self.geo_blocked.get(index) {
            cell.set(cell.get() + 1);
        }
    }

    /// Adds `count` to `counter`.
    pub fn add(&self, counter: Counter, count: u64) {
        // Variants are declared in `ALL` order, so the discriminant is the
        // index.
        if let Some(cell) = self.counts.get(counter as usize) {
            cell.set(cell.get() + count);
        }
    }

    /// Counts one 429 of the tier at `tier` (its index in the table).
    pub fn add_rate_limited(&self, tier: usize) {
        if let Some(cell) = self.rate_limited.get(tier) {
            cell.set(cell.get() + 1);
        }
    }

    /// Adds the unflushed counts to the host's counters.
    pub fn flush(&self, host: &impl Host) {
        let cells = self.counts.iter().zip(&self.ids);
        let tier_cells = self.rate_limited.iter().zip(&self.rate_limited_ids);
        let region_cells = self.geo_blocked.iter().zip(&self.geo_blocked_ids);
        for (cell, id) in cells.chain(tier_cells).chain(region_cells) {
            let count = cell.replace(0);
            if let (Some(id), true) = (id, count > 0)
                && host.increment_metric(*id, count).is_err()
            {
                cell.set(cell.get() + count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tier::{build_tiers, default_raw_tiers};
    use crate::host::MemoryHost;

    #[test]
    fn counts_reach_host_only_on_flush() {
        let host = MemoryHost::new(0);
        let tiers = build_tiers(&default_raw_tiers(), "basic").unwrap();
        let metrics = Metrics::define(&host, &tiers);
        metrics.add(Counter::Requests, 2);
        metrics.add_rate_limited(tiers.resolve(Some("pro")));
        assert_eq!(host.counter("veo.requests_total"), 0);

        metrics.flush(&host);
        assert_eq!(host.counter("veo.requests_total"), 2);
        assert_eq!(host.counter("veo.rate_limited_total.tier.pro"), 1);
        assert_eq!(host.counter("veo.rate_limited_total.tier.basic"), 0);

        metrics.flush(&host);
        assert_eq!(host.counter("veo.requests_total"), 2);
    }

    #[test]
    fn geo_blocked_counts_per_region() {
        let host = MemoryHost::new(0);
        let tiers = build_tiers(&default_raw_tiers(), "basic").unwrap();
        let mut metrics = Metrics::define(&host, &tiers);
        metrics.define_geo_blocked(&host, &["eu-west".to_owned(), "us-east".to_owned()]);
        metrics.add_geo_blocked(ClientRegion::Known(1));
        metrics.add_geo_blocked(ClientRegion::Unknown);
        metrics.add_geo_blocked(ClientRegion::Unknown);
        metrics.add_geo_blocked(ClientRegion::Known(7));
        metrics.flush(&host);

        assert_eq!(host.counter("veo.geo_blocked_total.region.us-east"), 1);
        assert_eq!(host.counter("veo.geo_blocked_total.region.eu-west"), 0);
        assert_eq!(host.counter("veo.geo_blocked_total.region.unknown"), 2);
    }

    #[test]
    fn every_counter_is_defined() {
        let host = MemoryHost::new(0);
        let tiers = build_tiers(&default_raw_tiers(), "basic").unwrap();
        Metrics::define(&host, &tiers);
        let names = host.counter_names();
        assert_eq!(names.len(), Counter::ALL.len() + 3);
        assert!(names.contains(&"veo.sync_failures_total".to_owned()));
        assert!(names.contains(&"veo.rate_limited_total.tier.enterprise".to_owned()));
    }
}
