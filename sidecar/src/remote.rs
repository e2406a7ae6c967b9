//! Requests decided recently per instance and customer, kept in memory so
//! that the sync reply can report to each instance what the others admitted
//! within the window, and share what is left of a quota by demand.
//!
//! Counts are kept in time buckets of at least one second, at most about 60
//! per window, so a bucket that straddles the window's start counts in
//! full. The estimate therefore errs towards more remote usage, which a
//! global quota can only make stricter.

use std::collections::{BTreeSet, HashMap, VecDeque};

use tracing::warn;

/// Default cap on tracked (instance, customer) pairs; beyond it, new pairs
/// are not tracked until old ones expire.
pub const DEFAULT_MAX_SERIES: usize = 100_000;

/// Buckets per window, which bounds the memory of one series.
const BUCKETS_PER_WINDOW: u64 = 60;

/// Requests of one customer at one instance within the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests received, admitted or rejected.
    pub requests: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.admitted = self.admitted.saturating_add(other.admitted);
        self.requests = self.requests.saturating_add(other.requests);
    }
}

/// Recent requests per customer and instance.
#[derive(Debug)]
pub struct RecentUsage {
    window_s: u64,
    bucket_s: u64,
    max_series: usize,
    /// Customer, then instance, then buckets in ascending order of start.
    customers: HashMap<String, HashMap<String, VecDeque<Bucket>>>,
    /// Customers of each instance, for the replies to that instance.
    by_instance: HashMap<String, BTreeSet<String>>,
    /// Quota of each customer's tier, as last reported, in requests per
    /// window.
    quotas: HashMap<String, u64>,
    series: usize,
    pruned_at_s: u64,
    dropped: u64,
    warned_at_s: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start_s: u64,
    counts: Counts,
}

impl RecentUsage {
    /// Creates an empty tracker for a window of `window_seconds` that tracks
    /// at most `max_series` (instance, customer) pairs.
    pub fn new(window_seconds: u32, max_series: usize) -> RecentUsage {
        let window_s = u64::from(window_seconds.max(1));
        RecentUsage {
            window_s,
            bucket_s: window_s.div_ceil(BUCKETS_PER_WINDOW),
            max_series,
            customers: HashMap::new(),
            by_instance: HashMap::new(),
            quotas: HashMap::new(),
            series: 0,
            pruned_at_s: 0,
            dropped: 0,
            warned_at_s: None,
        }
    }

    /// Returns the window length, in seconds.
    pub fn window_seconds(&self) -> u64 {
        self.window_s
    }

    /// Number of (instance, customer) pairs currently tracked.
    pub fn series(&self) -> usize {
        self.series
    }

    /// Drops everything known of `customer`, for its erasure.
    pub fn forget(&mut self, customer: &str) {
        if let Some(instances) = self.customers.remove(customer) {
            self.series = self.series.saturating_sub(instances.len());
            for instance in instances.keys() {
                if let Some(customers) = self.by_instance.get_mut(instance) {
                    customers.remove(customer);
                    if customers.is_empty() {
                        self.by_instance.remove(instance);
                    }
                }
            }
        }
        self.quotas.remove(customer);
    }

    /// Adds `admitted` requests of `customer` that `instance` reported at
    /// `now_s` (seconds since the Unix epoch), out of `requests` received.
    pub fn record(&mut self, instance: &str, customer: &str, counts: Counts, now_s: u64) {
        if counts.requests == 0 && counts.admitted == 0 {
            return;
        }
        if now_s != self.pruned_at_s {
            self.prune(now_s);
        }

        let known = self
            .customers
            .get(customer)
            .is_some_and(|instances| instances.contains_key(instance));
        if !known && self.series >= self.max_series {
            self.report_dropped(now_s);
            return;
        }
        if !known {
            self.series += 1;
            self.by_instance
                .entry(instance.to_owned())
                .or_default()
                .insert(customer.to_owned());
        }
        let buckets = self
            .customers
            .entry(customer.to_owned())
            .or_default()
            .entry(instance.to_owned())
            .or_default();

        let start_s = now_s - now_s % self.bucket_s;
        match buckets.back_mut() {
            // A clock that stepped back adds to the newest bucket, which
            // keeps the buckets in order.
            Some(last) if last.start_s >= start_s => last.counts.add(counts),
            _ => buckets.push_back(Bucket { start_s, counts }),
        }
        let (window_s, bucket_s) = (self.window_s, self.bucket_s);
        while buckets
            .front()
            .is_some_and(|bucket| expired(bucket, window_s, bucket_s, now_s))
        {
            buckets.pop_front();
        }
    }

    /// Records the quota of `customer`'s tier; `None` for a tier without
    /// one.
    pub fn set_quota(&mut self, customer: &str, quota: Option<u64>) {
        match quota {
            Some(requests) => {
                self.quotas.insert(customer.to_owned(), requests);
            }
            None => {
                self.quotas.remove(customer);
            }
        }
    }

    /// Returns the quota last recorded for `customer`.
    pub fn quota(&self, customer: &str) -> Option<u64> {
        self.quotas.get(customer).copied()
    }

    /// Returns the window counts of `customer` at each instance that
    /// decided requests of it within the window ending at `now_s`.
    pub fn by_instance(&self, customer: &str, now_s: u64) -> Vec<(&str, Counts)> {
        let Some(instances) = self.customers.get(customer) else {
            return Vec::new();
        };
        instances
            .iter()
            .map(|(instance, buckets)| {
                let mut counts = Counts::default();
                for bucket in buckets {
                    if !expired(bucket, self.window_s, self.bucket_s, now_s) {
                        counts.add(bucket.counts);
                    }
                }
                (instance.as_str(), counts)
            })
            .collect()
    }

    /// Sums the requests of `customer` that every instance except
    /// `instance` admitted within the window ending at `now_s`.
    pub fn admitted_by_others(&self, instance: &str, customer: &str, now_s: u64) -> u64 {
        self.by_instance(customer, now_s)
            .into_iter()
            .filter(|(other, _)| *other != instance)
            .fold(0u64, |sum, (_, counts)| sum.saturating_add(counts.admitted))
    }

    /// Returns the customers `instance` decided requests of within the
    /// window, as of the last prune.
    pub fn customers_of(&self, instance: &str) -> Vec<String> {
        self.by_instance
            .get(instance)
            .map(|customers| customers.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Returns every customer tracked, as of the last prune.
    pub fn customers(&self) -> Vec<String> {
        self.customers.keys().cloned().collect()
    }

    /// Prunes as [`RecentUsage::prune`] does, unless it already pruned at
    /// `now_s`, so a second's calls prune once.
    pub fn prune_if_due(&mut self, now_s: u64) {
        if now_s != self.pruned_at_s {
            self.prune(now_s);
        }
    }

    /// Drops buckets that ended before the window ending at `now_s`, then
    /// series and customers left without buckets.
    pub fn prune(&mut self, now_s: u64) {
        let (window_s, bucket_s) = (self.window_s, self.bucket_s);
        let mut series = 0;
        let by_instance = &mut self.by_instance;
        self.customers.retain(|customer, instances| {
            instances.retain(|instance, buckets| {
                buckets.retain(|bucket| !expired(bucket, window_s, bucket_s, now_s));
                let keep = !buckets.is_empty();
                if !keep && let Some(customers) = by_instance.get_mut(instance) {
                    customers.remove(customer);
                }
                keep
            });
            series += instances.len();
            !instances.is_empty()
        });
        self.by_instance
            .retain(|_, customers| !customers.is_empty());
        let customers = &self.customers;
        self.quotas
            .retain(|customer, _| customers.contains_key(customer));
        self.series = series;
        self.pruned_at_s = now_s;
    }

    /// Counts a pair that did not fit and warns at most once per window.
    fn report_dropped(&mut self, now_s: u64) {
        self.dropped += 1;
        let due = self
            .warned_at_s
            .is_none_or(|at| now_s.saturating_sub(at) >= self.window_s);
        if due {
            warn!(
                max_series = self.max_series,
                dropped = self.dropped,
                "remote usage tracker is full; usage of new customers is not shared \
                 until older entries expire"
            );
            self.dropped = 0;
            self.warned_at_s = Some(now_s);
        }
    }
}

/// Checks whether `bucket` ended at or before the start of the window ending at
/// `now_s`, that is `bucket.start + bucket_s <= now_s - window_s`.
fn expired(bucket: &Bucket, window_s: u64, bucket_s: u64, now_s: u64) -> bool {
    bucket
        .start_s
        .saturating_add(bucket_s)
        .saturating_add(window_s)
        <= now_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(count: u64) -> Counts {
        Counts {
            admitted: count,
            requests: count,
        }
    }

    const T: u64 = 1_700_000_000;

    #[test]
    fn excludes_callers_own_instance() {
        let mut usage = RecentUsage::new(60, 100);
        usage.record("a", "c1", admitted(5), T);
        usage.record("b", "c1", admitted(7), T);
        usage.record("c", "c1", admitted(11), T);

        assert_eq!(usage.admitted_by_others("a", "c1", T), 18);
        assert_eq!(usage.admitted_by_others("b", "c1", T), 16);
        assert_eq!(usage.admitted_by_others("new", "c1", T), 23);
    }

    #[test]
    fn customers_are_counted_separately() {
        let mut usage = RecentUsage::new(60, 100);
        usage.record("b", "c1", admitted(5), T);
        usage.record("b", "c2", admitted(9), T);

        assert_eq!(usage.admitted_by_others("a", "c1", T), 5);
        assert_eq!(usage.admitted_by_others("a", "c2", T), 9);
        assert_eq!(usage.admitted_by_others("a", "c3", T), 0);
    }

    #[test]
    fn drops_buckets_older_than_window() {
        let mut usage = RecentUsage::new(60, 100);
        usage.record("b", "c1", admitted(5), T);
        usage.record("b", "c1", admitted(3), T + 30);

        assert_eq!(usage.admitted_by_others("a", "c1", T + 60), 8);
        assert_eq!(usage.admitted_by_others("a", "c1", T + 61), 3);
        assert_eq!(usage.admitted_by_others("a", "c1", T + 91), 0);
    }

    #[test]
    fn prune_forgets_expired_series() {
        let mut usage = RecentUsage::new(60, 100);
        usage.record("b", "c1", admitted(5), T);
        usage.record("c", "c2", admitted(5), T + 50);
        assert_eq!(usage.series(), 2);

        usage.prune(T + 61);

        assert_eq!(usage.series(), 1);
        assert_eq!(usage.admitted_by_others("a", "c2", T + 61), 5);
    }

    #[test]
    fn full_tracker_ignores_new_pairs_until_old_expire() {
        let mut usage = RecentUsage::new(60, 2);
        usage.record("b", "c1", admitted(1), T);
        usage.record("b", "c2", admitted(1), T);

        usage.record("b", "c3", admitted(1), T + 1);
        usage.record("b", "c1", admitted(1), T + 1);
        assert_eq!(usage.admitted_by_others("a", "c3", T + 1), 0);
        assert_eq!(usage.admitted_by_others("a", "c1", T + 1), 2);

        usage.record("b", "c3", admitted(4), T + 120);
        assert_eq!(usage.admitted_by_others("a", "c3", T + 120), 4);
    }

    #[test]
    fn series_keeps_bounded_buckets() {
        let mut usage = RecentUsage::new(60, 10);
        for second in 0..600 {
            usage.record("b", "c1", admitted(1), T + second);
        }

        let buckets = &usage.customers["c1"]["b"];
        assert!(buckets.len() <= 61, "{} buckets", buckets.len());
        // 60 whole seconds plus the bucket straddling the window's start.
        assert_eq!(usage.admitted_by_others("a", "c1", T + 599), 61);
    }

    #[test]
    fn long_window_uses_coarser_buckets() {
        let mut usage = RecentUsage::new(3_600, 10);
        for minute in 0..120 {
            usage.record("b", "c1", admitted(1), T + minute * 60);
        }

        assert!(usage.customers["c1"]["b"].len() <= 61);
        let others = usage.admitted_by_others("a", "c1", T + 119 * 60);
        assert!((60..=61).contains(&others), "{others}");
    }
}
