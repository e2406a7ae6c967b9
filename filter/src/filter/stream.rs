//! One HTTP stream through the filter: the request's decision, the
//! rate-limit fields of its response, and the response body bytes of an
//! admitted request.
//!
//! The bytes are the sizes Envoy passes to each response body callback.
//! They cost no host call, unlike reading the `response.size` property at
//! the end of the stream, and the callback runs for every chunk anyway.
//! With this filter first in `http_filters`, it is the last filter on the
//! response path, so the chunks are exactly the body bytes Envoy sends to
//! the client. Each chunk is counted once because the filter never buffers
//! the body. Checked with Envoy 1.40.0: a 1,000,000-byte response reached
//! the sync batch as 1,000,000 bytes.

use std::rc::Rc;

use super::{Filter, RequestOutcome, ResponseFields};
use crate::host::Host;
use crate::token_cache::CachedToken;
use crate::usage::minute_of;

/// The usage bucket of one admitted request and its response body bytes
/// so far.
#[derive(Debug, Clone)]
pub struct RequestEgress {
    /// The request's verified token, which names the customer.
    pub token: Rc<CachedToken>,
    /// Index of the tier the request was decided under.
    pub tier: usize,
    /// Minute of the request, in minutes since the Unix epoch. The bytes
    /// count here even when the response ends in a later minute.
    pub minute: u32,
    /// Response body bytes counted, saturating at `u64::MAX`.
    pub bytes: u64,
}

impl RequestEgress {
    /// Starts counting for a request of `token` decided under the tier at
    /// index `tier` at `now_ms`.
    pub fn new(token: Rc<CachedToken>, tier: usize, now_ms: u64) -> Self {
        Self {
            token,
            tier,
            minute: minute_of(now_ms),
            bytes: 0,
        }
    }

    /// Adds one response body chunk of `chunk_bytes`.
    pub fn add(&mut self, chunk_bytes: usize) {
        let chunk_bytes = u64::try_from(chunk_bytes).unwrap_or(u64::MAX);
        self.bytes = self.bytes.saturating_add(chunk_bytes);
    }
}

/// State of one HTTP stream, driven by the proxy-wasm HTTP context.
#[derive(Debug)]
pub struct Stream {
    filter: Rc<Filter>,
    response: Option<ResponseFields>,
    /// Set only for a request sent upstream, so the body of a local reply
    /// (401, 429, or a tier's refusal) is never counted.
    egress: Option<RequestEgress>,
}

impl Stream {
    /// Creates the state of a new stream.
    pub fn new(filter: Rc<Filter>) -> Self {
        Self {
            filter,
            response: None,
            egress: None,
        }
    }

    /// Decides the request and returns whether it goes upstream. `false`
    /// means the filter sent a local reply.
    pub fn on_request_headers(&mut self, host: &impl Host) -> bool {
        match self.filter.on_request_headers(host) {
            RequestOutcome::Replied => false,
            RequestOutcome::Forward { fields, egress } => {
                self.response = fields;
                self.egress = Some(egress);
                true
            }
        }
    }

    /// Adds the rate-limit fields to the response of an admitted request.
    pub fn on_response_headers(&mut self, host: &impl Host) {
        if let Some(fields) = self.response.take() {
            self.filter.on_response_headers(host, &fields);
        }
    }

    /// Counts one response body chunk of `chunk_bytes`.
    pub fn on_response_body(&mut self, chunk_bytes: usize) {
        if let Some(egress) = &mut self.egress {
            egress.add(chunk_bytes);
        }
    }

    /// Ends the stream: hands the counted bytes to the worker. Envoy calls
    /// this once per stream, also after a reset.
    pub fn on_log(&mut self, host: &impl Host) {
        if let Some(egress) = self.egress.take() {
            self.filter.record_egress(host, &egress);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::host::MemoryHost;
    use crate::sync::STATE_KEY;
    use crate::testing::{NOW_S, Worker, claims, es256_token};
    use crate::usage::{EgressUsage, QUEUE_NAME, UsageMessage};

    const NOW_MS: u64 = NOW_S * 1000;

    /// Dequeues every message and returns the egress entries among them,
    /// sorted.
    fn queued_egress(host: &MemoryHost, queue: u32) -> Vec<(String, String, u32, u64)> {
        let mut entries = Vec::new();
        while let Some(bytes) = host.dequeue_shared_queue(queue).unwrap() {
            if let Some(UsageMessage::Egress(batch)) = UsageMessage::decode(&bytes) {
                entries.extend(batch.into_iter().map(|entry: EgressUsage| {
                    (entry.customer, entry.tier, entry.minute, entry.bytes)
                }));
            }
        }
        entries.sort();
        entries
    }

    fn bearer(customer: &str, tier: Option<&str>) -> String {
        format!("Bearer {}", es256_token(claims(customer, tier)))
    }

    fn entry(customer: &str, tier: &str, minute: u64, bytes: u64) -> (String, String, u32, u64) {
        (customer.to_owned(), tier.to_owned(), minute as u32, bytes)
    }

    #[test]
    fn forwarded_bytes_are_summed_per_bucket() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let acme = bearer("acme", Some("pro"));
        let zeta = bearer("zeta", None);
        let acme = [("authorization", acme.as_bytes())];
        let zeta = [("authorization", zeta.as_bytes())];

        assert_eq!(worker.exchange(&acme, &[100, 250]), 200);
        assert_eq!(worker.exchange(&acme, &[7]), 200);
        assert_eq!(worker.exchange(&zeta, &[1]), 200);
        assert_eq!(worker.exchange(&zeta, &[]), 200);
        worker.host.advance_ms(60_000);
        assert_eq!(worker.exchange(&acme, &[5]), 200);
        assert_eq!(queued_egress(&worker.host, queue), []);

        worker.filter.on_tick(&worker.host);
        let minute = NOW_MS / 60_000;
        assert_eq!(
            queued_egress(&worker.host, queue),
            [
                entry("acme", "pro", minute, 357),
                entry("acme", "pro", minute + 1, 5),
                entry("zeta", "basic", minute, 1),
            ]
        );
        worker.filter.on_tick(&worker.host);
        assert_eq!(queued_egress(&worker.host, queue), []);
    }

    #[test]
    fn local_replies_are_not_counted() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let acme = bearer("acme", None);
        let acme = [("authorization", acme.as_bytes())];
        let statuses: Vec<u32> = (0..5).map(|_| worker.exchange(&acme, &[10])).collect();
        assert_eq!(statuses, [200, 200, 200, 429, 429]);
        assert_eq!(worker.exchange(&[], &[10]), 401);

        worker.filter.on_tick(&worker.host);
        let minute = NOW_MS / 60_000;
        assert_eq!(
            queued_egress(&worker.host, queue),
            [entry("acme", "basic", minute, 30)]
        );
    }

    #[test]
    fn refused_tier_reply_is_not_counted() {
        let refusing = json!({"tiers": {"basic": {
            "quota": {"requests": 3, "window_seconds": 60},
            "failure_policy": "refuse"
        }}});
        let worker = Worker::with_config(MemoryHost::new(NOW_MS), refusing);
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        worker.host.set_shared_data(STATE_KEY, &[1], None).unwrap();
        worker.filter.on_tick(&worker.host);

        let acme = bearer("acme", None);
        assert_eq!(
            worker.exchange(&[("authorization", acme.as_bytes())], &[10]),
            503
        );
        worker.filter.on_tick(&worker.host);
        assert_eq!(queued_egress(&worker.host, queue), []);
    }

    #[test]
    fn retired_filter_sends_bytes_at_once() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let queue = worker.host.register_shared_queue(QUEUE_NAME).unwrap();
        let acme = bearer("acme", None);
        let acme = [("authorization", acme.as_bytes())];
        assert_eq!(worker.exchange(&acme, &[10]), 200);

        // A request in flight when a newer configuration replaces the
        // filter.
        worker.host.start_request(&acme);
        let mut stream = Stream::new(Rc::clone(&worker.filter));
        assert!(stream.on_request_headers(&worker.host));
        worker.filter.retire(&worker.host);
        let minute = NOW_MS / 60_000;
        assert_eq!(
            queued_egress(&worker.host, queue),
            [entry("acme", "basic", minute, 10)]
        );

        stream.on_response_headers(&worker.host);
        stream.on_response_body(20);
        stream.on_log(&worker.host);
        assert_eq!(
            queued_egress(&worker.host, queue),
            [entry("acme", "basic", minute, 20)]
        );
    }

    #[test]
    fn chunk_sizes_saturate() {
        let host = MemoryHost::new(NOW_MS);
        let token = Rc::new(CachedToken {
            customer: "acme".to_owned(),
            tier: 0,
            expires_at_s: NOW_S + 60,
            limiter_slot: std::cell::Cell::new(None),
        });
        let mut egress = RequestEgress::new(token, 0, host.now_ms());
        egress.add(10);
        assert_eq!(egress.bytes, 10);
        egress.bytes = u64::MAX - 5;
        egress.add(10);
        assert_eq!(egress.bytes, u64::MAX);
        assert_eq!(u64::from(egress.minute), NOW_MS / 60_000);
    }
}
