//! Validated values the store works with: usage batches, time ranges and
//! the totals queries return.

/// Seconds in one minute bucket of the ledger.
pub const MINUTE_SECONDS: i64 = 60;

/// One validated usage batch from a filter instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Identifier of the sending instance, never empty.
    pub instance_id: String,
    /// Position of the batch in the instance's stream, at least 1.
    pub sequence: i64,
    /// Usage to add, possibly empty.
    pub records: Vec<UsageEntry>,
}

/// Requests of one customer and tier within one minute bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEntry {
    /// Customer identifier, never empty.
    pub customer: String,
    /// Tier the requests were decided under, never empty.
    pub tier: String,
    /// Start of the minute bucket in seconds since the Unix epoch; a
    /// non-negative multiple of 60.
    pub minute_unix_s: i64,
    /// Requests admitted.
    pub admitted: i64,
    /// Requests refused with 429.
    pub refused: i64,
    /// Response body bytes sent for the admitted requests.
    pub egress_bytes: i64,
    /// Quota the requests were decided under, when the tier has one.
    pub quota: Option<QuotaSpec>,
}

/// A tier's rolling-window quota as the filter reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    /// Requests admitted per window.
    pub requests: u64,
    /// Window length, in milliseconds.
    pub window_ms: u64,
}

/// Result of applying a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// The batch was stored; `previous` is the instance's sequence before it,
    /// 0 for an instance seen for the first time.
    Applied {
        /// Last applied sequence before this batch.
        previous: i64,
    },
    /// The batch's sequence was at or below `last`, so nothing changed.
    Duplicate {
        /// Last applied sequence of the instance.
        last: i64,
    },
}

/// Bucket size of a usage query; buckets are aligned in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// 60-second buckets.
    Minute,
    /// 3,600-second buckets.
    Hour,
    /// 86,400-second buckets, starting at midnight UTC.
    Day,
}

impl Granularity {
    /// Length of one bucket, in seconds. Unix time has no leap seconds, so
    /// every UTC day is exactly 86,400 seconds long.
    pub fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => 60,
            Granularity::Hour => 3_600,
            Granularity::Day => 86_400,
        }
    }
}

/// A half-open time range `[start, end)` in seconds since the Unix epoch,
/// with `start < end`. A minute bucket belongs to the range when its start
/// does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    /// Inclusive start.
    pub start_unix_s: i64,
    /// Exclusive end.
    pub end_unix_s: i64,
}

/// Totals of one bucket of a usage query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketTotal {
    /// Start of the bucket in seconds since the Unix epoch.
    pub start_unix_s: i64,
    /// Requests admitted in the bucket.
    pub admitted: u64,
    /// Requests refused in the bucket.
    pub refused: u64,
    /// Response body bytes of the bucket's admitted requests.
    pub egress_bytes: u64,
}

/// Totals of one customer over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerTotal {
    /// Customer identifier.
    pub customer: String,
    /// Requests admitted in the range.
    pub admitted: u64,
    /// Requests refused in the range.
    pub refused: u64,
    /// Response body bytes of the admitted requests in the range.
    pub egress_bytes: u64,
}

/// Returns the current wall-clock time in seconds since the Unix epoch, or
/// 0 when the clock is set before 1970.
pub fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}
