//! Rejection of erased customers. The worker reads the set the sync role
//! published on its timer. A token of a customer in the set gets 401
//! `token revoked` until the entry's time, and its cache entries are
//! removed, so later requests do not find it either.

use super::Filter;
use crate::host::{Host, LogLevel};
use crate::sync::{ERASURES_KEY, ErasureTable, decode_erasures};

impl Filter {
    /// Returns whether tokens of `customer` are rejected at `now_s`.
    pub(super) fn is_erased(&self, customer: &str, now_s: u64) -> bool {
        self.erasures.borrow().rejects(customer, now_s)
    }

    /// Applies the erased customers the sync role published since the
    /// last tick.
    pub(super) fn refresh_erasures(&self, host: &impl Host) {
        let Ok(value) = host.get_shared_data(ERASURES_KEY) else {
            return;
        };
        if value.cas == self.erasures_cas.get() {
            return;
        }
        self.erasures_cas.set(value.cas);
        let bytes = value.bytes.unwrap_or_default();
        let Some(set) = decode_erasures(&bytes) else {
            host.log(
                LogLevel::Error,
                "failed to decode the erasures published under veo.sync.erasures; keeping the \
                 erasures in force",
            );
            return;
        };
        *self.erasures.borrow_mut() = ErasureTable::build(&set);
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use serde_json::json;
    use veo_proto::sync::{ErasedCustomer, Erasures};

    use super::*;
    use crate::host::MemoryHost;
    use crate::testing::{NOW_S, Worker, claims, es256_token};
    use crate::token_cache::KEY_PREFIX;
    use crate::usage::QUEUE_NAME;

    const NOW_MS: u64 = NOW_S * 1000;

    fn publish_erasures(host: &MemoryHost, version: u64, entries: &[(&str, u64)]) {
        let set = Erasures {
            version,
            customers: entries
                .iter()
                .map(|(customer, until)| ErasedCustomer {
                    customer: (*customer).to_owned(),
                    refuse_until_unix_s: *until as i64,
                })
                .collect(),
        };
        host.set_shared_data(ERASURES_KEY, &set.encode_to_vec(), None)
            .unwrap();
    }

    #[test]
    fn erased_customer_gets_401_until_refuse_time() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let token = es256_token(claims("acme", None));
        publish_erasures(&worker.host, 1, &[("acme", NOW_S + 60)]);
        worker.filter.on_tick(&worker.host);

        assert_eq!(worker.send_token(&token), 401);
        assert_eq!(
            worker.reply_json(),
            json!({"error": "unauthorized", "reason": "token revoked"})
        );
        let reply = worker.host.local_response().unwrap();
        assert_eq!(
            reply.header("www-authenticate"),
            Some(
                "Bearer realm=\"veo\", error=\"invalid_token\", \
                 error_description=\"token revoked\""
            )
        );
        // Neither counted as usage nor stored as a verified token.
        assert_eq!(worker.host.queue_len(queue), 0);
        assert!(
            worker
                .host
                .shared_data_keys(crate::limiter::KEY_PREFIX)
                .is_empty()
        );
        assert!(worker.host.shared_data_keys(KEY_PREFIX).is_empty());
        assert_eq!(worker.counter("veo.auth_failures_total"), 1);

        // Other customers are unaffected.
        assert_eq!(worker.send_token(&es256_token(claims("zeta", None))), 200);

        worker.host.advance_ms(59_999);
        assert_eq!(worker.send_token(&token), 401);
        worker.host.advance_ms(1);
        assert_eq!(worker.send_token(&token), 200);
    }

    #[test]
    fn cached_token_of_erased_customer_is_removed() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let other = Worker::new(worker.host.worker());
        let token = es256_token(claims("acme", None));
        assert_eq!(worker.send_token(&token), 200);
        assert_eq!(other.send_token(&token), 200);
        assert_eq!(worker.filter.tokens.local_len(), 1);

        publish_erasures(&worker.host, 1, &[("acme", NOW_S + 60)]);
        worker.filter.on_tick(&worker.host);
        assert_eq!(worker.send_token(&token), 401);
        assert_eq!(worker.filter.tokens.local_len(), 0);
        let tiers = &worker.filter.config().tiers;
        let fresh = crate::token_cache::TokenCache::new(64);
        assert!(fresh.get(&worker.host, tiers, &token, NOW_S).is_none());

        // The other worker still has the token locally until it reads the
        // set, then drops it on its next hit.
        other.filter.on_tick(&other.host);
        assert_eq!(other.send_token(&token), 401);
        assert_eq!(other.filter.tokens.local_len(), 0);
    }

    #[test]
    fn undecodable_erasures_keep_those_in_force() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        publish_erasures(&worker.host, 1, &[("acme", NOW_S + 60)]);
        worker.filter.on_tick(&worker.host);
        worker
            .host
            .set_shared_data(ERASURES_KEY, b"\xff\xff", None)
            .unwrap();
        worker.filter.on_tick(&worker.host);

        assert_eq!(worker.send_token(&es256_token(claims("acme", None))), 401);
        let logs = worker.host.logs();
        assert!(
            logs.iter()
                .any(|(level, line)| *level == LogLevel::Error && line.contains("erasures"))
        );
    }
}
