//! Erased customers. The sidecar sends the complete set whenever its
//! version differs from the one this instance reported. Until an entry's
//! `refuse_until_unix_s`, the workers reject the customer's tokens with
//! 401, and the sync role drops the customer's usage and counters.
//!
//! On a new set, the sync role stores it in shared data under
//! [`ERASURES_KEY`], drops the customers' usage not yet in a batch, and
//! clears their limiter records. A worker reads the set on its next tick,
//! so until then it may still count a request and write a record. So the
//! sync role clears the records once more [`FINAL_PURGE_DELAY_MS`] later,
//! and only then reports the set's version. A batch already built and not
//! yet acknowledged is resent unchanged; the sidecar drops the erased
//! customers' records on its side.

use std::collections::HashMap;

use prost::Message;
use veo_proto::sync::Erasures;

use super::Sync;
use crate::host::{Host, LogLevel};

/// Shared-data key of the erased customers in force, as an encoded
/// `Erasures`. Missing until the first set arrives.
pub const ERASURES_KEY: &str = "veo.sync.erasures";

/// Time from storing a set to the final purge, in milliseconds. Workers
/// read the set every 250 ms, and the margin covers a worker whose timer
/// runs late.
pub const FINAL_PURGE_DELAY_MS: u64 = 1_000;

/// Reads the set published under [`ERASURES_KEY`]; `None` for bytes that
/// do not decode.
pub fn decode_erasures(bytes: &[u8]) -> Option<Erasures> {
    Erasures::decode(bytes).ok()
}

/// Erased customers as the request path uses them: customer id to the
/// time until which its tokens are rejected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErasureTable {
    until_s: HashMap<String, i64>,
}

impl ErasureTable {
    /// Builds the table of `set`. When the set names a customer twice, the
    /// later time applies.
    pub fn build(set: &Erasures) -> Self {
        let mut until_s = HashMap::with_capacity(set.customers.len());
        for entry in &set.customers {
            let until = until_s.entry(entry.customer.clone()).or_insert(i64::MIN);
            *until = (*until).max(entry.refuse_until_unix_s);
        }
        Self { until_s }
    }

    /// Returns whether the tokens and usage of `customer` are rejected at
    /// `now_s` (seconds since the Unix epoch).
    pub fn rejects(&self, customer: &str, now_s: u64) -> bool {
        // Most instances have no erasure in force, and then this skips
        // hashing the id.
        if self.until_s.is_empty() {
            return false;
        }
        let now_s = i64::try_from(now_s).unwrap_or(i64::MAX);
        self.until_s
            .get(customer)
            .is_some_and(|&until_s| now_s < until_s)
    }

    /// Returns the customers rejected at `now_s`.
    pub fn rejected_customers(&self, now_s: u64) -> impl Iterator<Item = &str> {
        self.until_s
            .keys()
            .map(String::as_str)
            .filter(move |customer| self.rejects(customer, now_s))
    }

    /// Returns whether the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.until_s.is_empty()
    }
}

/// The sync role's progress through the erasure sets.
#[derive(Debug, Default)]
pub(super) struct ErasureState {
    /// The last set stored, which filters collected usage.
    pub(super) table: ErasureTable,
    /// Version of `table`; 0 before the first set.
    received_version: u64,
    /// Version reported to the sidecar; 0 before the first.
    acknowledged_version: u64,
    /// Time from which the final purge of `table` may run, in
    /// milliseconds since the Unix epoch; `None` when none is due.
    final_purge_at_ms: Option<u64>,
}

impl Sync {
    /// Stores the erased customers of a sync reply for the workers and
    /// purges their usage and limiter records on this instance. `None` means the set in
    /// force is current.
    pub(super) fn apply_erasures(&mut self, host: &impl Host, set: Option<&Erasures>) {
        let Some(set) = set else {
            return;
        };
        if set.version == self.erasures.received_version {
            return;
        }
        if let Err(error) = host.set_shared_data(ERASURES_KEY, &set.encode_to_vec(), None) {
            host.log(
                LogLevel::Error,
                &format!(
                    "failed to publish erasures version={}: {error}; the sidecar sends them \
                     again with the next reply",
                    set.version
                ),
            );
            return;
        }

        let now_ms = host.now_ms();
        let now_s = now_ms / 1000;
        self.erasures.table = ErasureTable::build(set);
        self.erasures.received_version = set.version;
        self.erasures.final_purge_at_ms = Some(now_ms.saturating_add(FINAL_PURGE_DELAY_MS));
        let table = &self.erasures.table;
        let before = self.collected.len();
        self.collected
            .retain(|key, _| !table.rejects(&key.customer, now_s));
        let dropped = before - self.collected.len();
        let removed = self.purge_erased_records(host);
        host.log(
            LogLevel::Info,
            &format!(
                "erasures received version={} customers={} usage_records_dropped={dropped} \
                 limiter_records_removed={}; the version is reported after the final purge",
                set.version,
                self.erasures.table.rejected_customers(now_s).count(),
                removed.unwrap_or_default()
            ),
        );
    }

    /// Runs the final purge once it is due, then reports the set's version
    /// from the next request on. A failed purge is tried again at the next
    /// tick.
    pub(super) fn finish_erasures(&mut self, host: &impl Host) {
        let Some(due_ms) = self.erasures.final_purge_at_ms else {
            return;
        };
        if host.now_ms() < due_ms {
            return;
        }
        let Some(removed) = self.purge_erased_records(host) else {
            return;
        };
        self.erasures.final_purge_at_ms = None;
        self.erasures.acknowledged_version = self.erasures.received_version;
        // The next call reports the version, even on an idle instance.
        self.poll_due = true;
        host.log(
            LogLevel::Info,
            &format!(
                "erasures applied version={} limiter_records_removed={removed}",
                self.erasures.acknowledged_version
            ),
        );
    }

    /// Clears the limiter records of the erased customers; returns how
    /// many it cleared, or `None` after logging a failure.
    fn purge_erased_records(&self, host: &impl Host) -> Option<usize> {
        let now_s = host.now_ms() / 1000;
        let mut removed = 0;
        let mut failed = 0;
        let mut last_error = None;
        for customer in self.erasures.table.rejected_customers(now_s) {
            match self.limiter.remove(host, customer) {
                Ok(Some(_)) => removed += 1,
                Ok(None) => {}
                Err(error) => {
                    failed += 1;
                    last_error = Some(error);
                }
            }
        }
        if let Some(error) = last_error {
            host.log(
                LogLevel::Warn,
                &format!(
                    "failed to clear the limiter records of {failed} erased customers: {error}; \
                     retrying at the next tick before the erasures version is reported"
                ),
            );
            return None;
        }
        Some(removed)
    }

    /// Returns whether usage of `customer` is dropped at `now_s`.
    pub(super) fn is_erased(&self, customer: &str, now_s: u64) -> bool {
        self.erasures.table.rejects(customer, now_s)
    }

    /// Returns the version of the erased customers this instance has
    /// purged and reports, 0 before the first.
    pub fn erasures_version(&self) -> u64 {
        self.erasures.acknowledged_version
    }
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::{ErasedCustomer, SyncRequest, SyncResponse};

    use super::*;
    use crate::host::MemoryHost;
    use crate::limiter::KEY_PREFIX;
    use crate::limiter::record::Record;
    use crate::testing::{Instance, NOW_S};

    fn erasures(version: u64, entries: &[(&str, u64)]) -> Erasures {
        Erasures {
            version,
            customers: entries
                .iter()
                .map(|(customer, until)| ErasedCustomer {
                    customer: (*customer).to_owned(),
                    refuse_until_unix_s: *until as i64,
                })
                .collect(),
        }
    }

    /// Returns the customers with a limiter record.
    fn recorded_customers(host: &MemoryHost) -> Vec<String> {
        let mut customers: Vec<String> = host
            .shared_data_keys(KEY_PREFIX)
            .iter()
            .filter_map(|key| Record::decode(&host.peek_shared_data(key)?))
            .map(|record| record.customer)
            .collect();
        customers.sort();
        customers
    }

    fn customers_in(request: &SyncRequest) -> Vec<&str> {
        let mut customers: Vec<&str> = request
            .usage
            .iter()
            .map(|record| record.customer.as_str())
            .collect();
        customers.dedup();
        customers
    }

    /// Replies to the call in flight with `set` and returns its request.
    fn reply_with_erasures(instance: &mut Instance, set: Erasures) -> SyncRequest {
        let (token, request) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: request.sequence,
            erasures: Some(set),
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        request
    }

    #[test]
    fn erasure_drops_queued_usage_and_records() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);

        // Usage collected while the first batch is in flight, and usage
        // still in a record with its slot on the queue.
        assert_eq!(instance.requests("acme", 1), 1);
        assert_eq!(instance.requests("zeta", 1), 1);
        assert!(instance.exchange("acme", None, &[500]));
        instance.filter.on_tick(&instance.worker_host);
        instance.sync.on_tick(&instance.sync_host);
        assert_eq!(instance.requests("acme", 1), 0);
        assert_eq!(recorded_customers(&instance.sync_host), ["acme", "zeta"]);

        let set = erasures(7, &[("acme", NOW_S + 3600)]);
        reply_with_erasures(&mut instance, set.clone());
        let stored = instance.sync_host.peek_shared_data(ERASURES_KEY).unwrap();
        assert_eq!(decode_erasures(&stored), Some(set));
        assert_eq!(recorded_customers(&instance.sync_host), ["zeta"]);

        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(customers_in(&next), ["zeta"]);
        assert_eq!(next.erasures_version, 0);
    }

    #[test]
    fn version_is_reported_only_after_final_purge() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        reply_with_erasures(&mut instance, erasures(3, &[("acme", NOW_S + 3600)]));
        assert!(recorded_customers(&instance.sync_host).is_empty());

        // The worker has not read the set yet, so it admits and records
        // one more request of the customer.
        assert_eq!(instance.requests("acme", 1), 1);
        assert_eq!(instance.requests("zeta", 1), 1);
        assert_eq!(recorded_customers(&instance.sync_host), ["acme", "zeta"]);
        instance.sync.on_tick(&instance.sync_host);
        let (token, second) = instance.last_call();
        assert_eq!(second.erasures_version, 0);
        assert_eq!(customers_in(&second), ["zeta"]);
        instance.reply(token, &SyncResponse::default());

        instance.sync_host.advance_ms(FINAL_PURGE_DELAY_MS - 1);
        assert_eq!(instance.requests("zeta", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, third) = instance.last_call();
        assert_eq!(third.erasures_version, 0);
        assert_eq!(recorded_customers(&instance.sync_host), ["acme", "zeta"]);
        instance.reply(token, &SyncResponse::default());

        instance.sync_host.advance_ms(1);
        assert_eq!(instance.requests("zeta", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (_, fourth) = instance.last_call();
        assert_eq!(fourth.erasures_version, 3);
        assert_eq!(instance.sync.erasures_version(), 3);
        assert_eq!(recorded_customers(&instance.sync_host), ["zeta"]);

        // Once the worker reads the set, the customer is rejected.
        instance.filter.on_tick(&instance.worker_host);
        assert_eq!(instance.requests("acme", 1), 0);
    }

    #[test]
    fn expired_entries_are_ignored() {
        let mut instance = Instance::new();
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        reply_with_erasures(&mut instance, erasures(2, &[("acme", NOW_S)]));
        assert_eq!(recorded_customers(&instance.sync_host), ["acme"]);

        instance.filter.on_tick(&instance.worker_host);
        assert_eq!(instance.requests("acme", 1), 1);
        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(customers_in(&next), ["acme"]);
    }

    #[test]
    fn repeated_set_is_applied_once() {
        let mut instance = Instance::new();
        let set = erasures(4, &[("acme", NOW_S + 60)]);
        for _ in 0..2 {
            assert_eq!(instance.requests("zeta", 1), 1);
            instance.sync.on_tick(&instance.sync_host);
            reply_with_erasures(&mut instance, set.clone());
        }
        let received = instance
            .sync_host
            .logs()
            .into_iter()
            .filter(|(_, line)| line.contains("erasures received"))
            .count();
        assert_eq!(received, 1);
    }

    #[test]
    fn table_keeps_latest_time_of_repeated_customer() {
        let table = ErasureTable::build(&erasures(
            1,
            &[
                ("acme", NOW_S + 10),
                ("acme", NOW_S + 60),
                ("acme", NOW_S + 5),
            ],
        ));
        assert!(table.rejects("acme", NOW_S + 59));
        assert!(!table.rejects("acme", NOW_S + 60));
        assert!(!table.rejects("zeta", NOW_S));
        assert_eq!(table.rejected_customers(NOW_S).count(), 1);
    }
}
