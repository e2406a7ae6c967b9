//! Global counters: usage that several sidecars share, so that a customer's
//! quota applies across every Envoy instance that serves it.
//!
//! Each sidecar contributes the requests its own instances admitted, in
//! one-second buckets, and reads back the window totals of every sidecar
//! sharing the store. With the embedded store only this sidecar counts;
//! with Redis (standalone or Cluster) every sidecar pointed at the same
//! key prefix does.

pub mod redis;
pub mod shared;

use std::collections::HashMap;

/// Requests of one customer in one one-second bucket that this sidecar
/// has not yet written to the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contribution {
    /// Position in this sidecar's outbox; strictly increasing in the order
    /// contributions were made, and never reused. Each shard of the store
    /// applies an id at most once per sidecar id, so a resent contribution
    /// counts once.
    pub id: i64,
    /// Customer identifier.
    pub customer: String,
    /// Start of the bucket, in seconds since the Unix epoch.
    pub bucket_unix_s: i64,
    /// Requests admitted.
    pub admitted: u64,
    /// Requests received, admitted or rejected.
    pub requests: u64,
}

/// Totals of one customer over the window, summed over every sidecar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowTotals {
    /// Requests admitted within the window.
    pub admitted: u64,
    /// Requests received within the window.
    pub requests: u64,
}

/// One round trip to the shared store.
#[derive(Debug, Clone)]
pub struct Exchange<'a> {
    /// Contributions to add, in ascending `id` order.
    pub contributions: &'a [Contribution],
    /// Customers whose window totals are requested.
    pub customers: &'a [String],
    /// Current time, in seconds since the Unix epoch.
    pub now_unix_s: i64,
    /// Window length, in seconds.
    pub window_seconds: u32,
}

/// Result of an [`Exchange`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeResult {
    /// Window totals of each requested customer; customers with no usage
    /// in the window are absent.
    pub totals: HashMap<String, WindowTotals>,
}

/// Failure of the shared store. Every variant leaves the contributions to
/// be sent again; none was applied twice.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    /// The store could not be reached or the connection broke.
    #[error("Redis at {target} is unreachable: {detail}")]
    Unavailable {
        /// Address or cluster seed list, without credentials.
        target: String,
        /// Cause as reported by the client.
        detail: String,
    },
    /// The server rejected writes because it is a replica, as after a
    /// failover. The next call reconnects.
    #[error("Redis at {target} is read-only (a replica); reconnecting on the next call")]
    ReadOnly {
        /// Address or cluster seed list, without credentials.
        target: String,
    },
    /// The store returned an error or a reply of the wrong shape.
    #[error("Redis at {target} returned an error or an unexpected reply: {detail}")]
    Rejected {
        /// Address or cluster seed list, without credentials.
        target: String,
        /// Error or reply as reported.
        detail: String,
    },
    /// The settings or the request cannot be used, whatever the store's
    /// state: an unparsable address, zero shards, a negative id.
    #[error("{detail}")]
    Invalid {
        /// Description of the problem, naming the value and the fix.
        detail: String,
    },
}
