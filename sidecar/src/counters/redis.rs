//! Redis backend of the global counters, for one Redis server or a Redis
//! Cluster.
//!
//! Customers are spread over `shards` shards by FNV-1a (64 bits) of the
//! customer id modulo `shards`. Every key of a shard carries the hash tag
//! `{<prefix>:<shard>}`, so a shard lives in one cluster slot and one Lua
//! script updates it atomically. An exchange sends one `EVALSHA` per shard
//! that has contributions or requested customers, all at once. An exchange
//! therefore costs at most `shards` commands whatever the number of
//! customers, plus one `EVAL` per shard whose server does not have the
//! script cached yet.
//!
//! # Key layout
//!
//! | key | type | content | TTL |
//! | --- | --- | --- | --- |
//! | `{<prefix>:<shard>}:window` | hash | `a:<customer>` and `r:<customer>`: requests admitted and received in the window | window + 60 s, renewed by every exchange |
//! | `{<prefix>:<shard>}:buckets` | hash | `a:<bucket>:<customer>` and `r:<bucket>:<customer>`: the same per one-second bucket still in the window | as `window` |
//! | `{<prefix>:<shard>}:expiry` | sorted set | `<bucket>:<customer>` scored by bucket start, to find the buckets leaving the window | as `window` |
//! | `{<prefix>:<shard>}:applied:<sidecar id>` | string | highest contribution id of that sidecar applied to this shard | the larger of `totals_ttl_seconds` and the window's TTL, renewed by every exchange of that sidecar on this shard |
//! | `{<prefix>:<shard>}:m:<minute>` | hash | customer → requests admitted in the minute starting at `<minute>` (Unix seconds) | `totals_ttl_seconds`, renewed by every write |
//! | `{<prefix>:erasures}` | stream | one entry per erasure: `customer`, `sidecar` (the sidecar that erased it), `erasure` (its erasure id) and `erased_at_ms` (when, in Unix milliseconds), or with a notice key the one field `sealed` that contains them encrypted | the retention the erasing sidecar gives, renewed by every entry; older entries are trimmed |
//!
//! Bucket starts and minutes are Unix seconds. Each exchange first subtracts
//! from the window sums the buckets at or before `now - window_seconds`, then
//! applies the contributions with an id above the sidecar's highest applied
//! id, then reads the window sums. The work of a call is proportional to its
//! contributions, its customers and the buckets leaving the window. A
//! contribution whose bucket has already left the window counts in the
//! minute totals only. The window keys of a shard share one TTL renewed by
//! every exchange, so an idle shard expires as a whole and never keeps a sum
//! without the buckets it must subtract later.
//!
//! # Requirements on the callers
//!
//! - Every sidecar sharing a key prefix uses the same `shards`. Changing it
//!   needs a new prefix, because customers would move to other shards and
//!   their totals would split between the old and the new shard.
//! - Every sidecar sharing a key prefix uses the same window length, because
//!   each exchange removes the buckets that left its own window, so the
//!   shortest window wins.
//! - A sidecar id belongs to one running sidecar and its outbox. A sidecar
//!   whose outbox restarts its ids from the beginning needs a new sidecar id,
//!   or its contributions are skipped until their ids pass the old ones.
//! - Contributions of a failed exchange are sent again in the next one,
//!   before any newer ones, because each shard skips ids at or below the
//!   highest it applied.
//!
//! NOTE: the highest applied id of a sidecar expires after its TTL without
//! an exchange from that sidecar. A sidecar that comes back later and
//! resends contributions Redis had already applied counts them again, in
//! the minute totals that other sidecars kept alive meanwhile.

mod connection;
mod keys;
mod notice;
mod plan;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::{Cmd, ErrorKind, Script, ServerErrorKind, Value};
use tokio::sync::Mutex;

use self::connection::{Connection, FailureKind, Link, classify};
use self::keys::{MINUTE_SECONDS, ShardKeys, minute_start, shard_of};
pub use self::notice::{ErasureNotice, ErasureSource, NoticeEntry, NoticeKey, NoticeKeyError};
use self::plan::ScriptCall;
use super::{CounterError, Exchange, ExchangeResult, WindowTotals};

const EXCHANGE_LUA: &str = include_str!("redis/exchange.lua");
const MINUTE_TOTALS_LUA: &str = include_str!("redis/minute_totals.lua");
const ERASE_LUA: &str = include_str!("redis/erase.lua");
const ANNOUNCE_LUA: &str = include_str!("redis/announce.lua");
/// Minute totals keys one erasure script call clears: one day, so that one
/// call blocks Redis for a few milliseconds at most.
const ERASE_MINUTES_PER_CALL: i64 = 24 * 60;

/// Seconds the window state outlives the window, so that sidecars whose
/// clocks differ by less than this still subtract every bucket.
const WINDOW_TTL_MARGIN_SECONDS: u64 = 60;

/// Maximum minutes one [`RedisCounters::minute_totals`] call reads: one week.
const MAX_MINUTES_PER_READ: i64 = 7 * 24 * 60;

/// Settings of the Redis counters: server, key layout, TTL and timeout.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Redis server or cluster.
    pub target: RedisTarget,
    /// Start of every key. Sidecars with the same prefix share counters.
    /// Must not contain `{` or `}`, which delimit the cluster hash tag.
    pub key_prefix: String,
    /// Number of shards, at least 1. Each shard is one cluster slot and one
    /// script call per exchange.
    pub shards: u16,
    /// TTL of the per-minute totals, in seconds, at least 1.
    pub totals_ttl_seconds: u64,
    /// Bound on each call, connecting included.
    pub timeout: Duration,
    /// Key that seals erasure notices; `None` writes and reads them in
    /// clear.
    pub notice_key: Option<NoticeKey>,
}

/// Redis deployment to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, as a URL such as `redis://user:password@host:6379/0`.
    Standalone(String),
    /// A Redis Cluster, as the URLs of some of its nodes.
    Cluster(Vec<String>),
}

/// Global counters in Redis, shared by every sidecar using the same key
/// prefix.
///
/// Connects on the first call, not at construction, and again after a
/// connection error, a timeout or a `READONLY` reply.
pub struct RedisCounters {
    link: Link,
    sidecar_id: String,
    key_prefix: String,
    shards: u16,
    totals_ttl_seconds: u64,
    timeout: Duration,
    notice_key: Option<NoticeKey>,
    exchange_script: Script,
    minute_totals_script: Script,
    erase_script: Script,
    exchange_lock: Mutex<()>,
    commands_sent: AtomicU64,
}

impl RedisCounters {
    /// Checks the settings; connects only on the first call, so this
    /// succeeds while Redis is down.
    ///
    /// # Errors
    ///
    /// [`CounterError::Invalid`] for an unparsable address, an empty seed
    /// list, zero shards, a zero TTL or timeout, a key prefix with `{` or
    /// `}`, or an empty sidecar id.
    pub fn new(settings: RedisSettings, sidecar_id: String) -> Result<Self, CounterError> {
        let invalid = |detail: &str| {
            Err(CounterError::Invalid {
                detail: detail.to_owned(),
            })
        };
        if settings.shards == 0 {
            return invalid("invalid Redis shards = 0: set at least 1");
        }
        if settings.totals_ttl_seconds == 0 {
            return invalid("invalid Redis totals TTL of 0 s: set at least 1 s");
        }
        if settings.timeout.is_zero() {
            return invalid("invalid Redis timeout of 0 ms: set at least 1 ms");
        }
        if settings.key_prefix.contains(['{', '}']) {
            return Err(CounterError::Invalid {
                detail: format!(
                    "invalid Redis key prefix {:?}: remove the braces, which delimit the \
                     cluster hash tag",
                    settings.key_prefix
                ),
            });
        }
        if sidecar_id.is_empty() {
            return invalid("invalid empty sidecar id: set an id unique to this sidecar");
        }

        Ok(Self {
            link: Link::new(&settings.target, settings.timeout)?,
            sidecar_id,
            key_prefix: settings.key_prefix,
            shards: settings.shards,
            totals_ttl_seconds: settings.totals_ttl_seconds,
            timeout: settings.timeout,
            notice_key: settings.notice_key,
            exchange_script: Script::new(EXCHANGE_LUA),
            minute_totals_script: Script::new(MINUTE_TOTALS_LUA),
            erase_script: Script::new(ERASE_LUA),
            exchange_lock: Mutex::new(()),
            commands_sent: AtomicU64::new(0),
        })
    }

    /// Adds `exchange.contributions` and returns the window totals of
    /// `exchange.customers` over every sidecar sharing the key prefix.
    ///
    /// The window is `(now - window_seconds, now]` in one-second buckets.
    /// Each shard applies a contribution at most once per sidecar id, so a
    /// retry after any error counts nothing twice. Exchanges and pings are
    /// serialized, and each is bounded by the timeout, waiting for an
    /// earlier call included.
    ///
    /// # Errors
    ///
    /// [`CounterError::Unavailable`] when Redis cannot be reached or does not
    /// reply in time, [`CounterError::ReadOnly`] from a replica,
    /// [`CounterError::Rejected`] for an error reply, and
    /// [`CounterError::Invalid`] for contributions with a negative id, ids not
    /// in ascending order, or counts above `i64::MAX`. Contributions of a
    /// failed call may have been applied on some shards, so send them again.
    pub async fn exchange(&self, exchange: Exchange<'_>) -> Result<ExchangeResult, CounterError> {
        let calls = self.plan_exchange(&exchange)?;
        if calls.is_empty() {
            return Ok(ExchangeResult::default());
        }

        let replies = self
            .bounded(async {
                let _serialized = self.exchange_lock.lock().await;
                self.run_script(&self.exchange_script, EXCHANGE_LUA, &calls)
                    .await
            })
            .await?;

        let mut totals = HashMap::new();
        for (call, reply) in calls.iter().zip(replies) {
            let counts = self.parse_counts(reply, call.customers.len() * 2)?;
            for (customer, pair) in call.customers.iter().zip(counts.chunks_exact(2)) {
                let window = WindowTotals {
                    admitted: pair[0],
                    requests: pair[1],
                };
                if window != WindowTotals::default() {
                    totals.insert(customer.clone(), window);
                }
            }
        }
        Ok(ExchangeResult { totals })
    }

    /// Returns the requests admitted per customer, summed over the minutes
    /// from `from_minute` to `to_minute` inclusive (Unix seconds, each
    /// rounded down to the start of its minute), over every sidecar.
    ///
    /// Customers with nothing admitted are absent. Minutes older than
    /// `totals_ttl_seconds` may have expired.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::exchange`], and [`CounterError::Invalid`] for a
    /// range of more than one week.
    pub async fn minute_totals(
        &self,
        customers: &[String],
        from_minute: i64,
        to_minute: i64,
    ) -> Result<HashMap<String, u64>, CounterError> {
        let first = minute_start(from_minute);
        let last = minute_start(to_minute);
        if customers.is_empty() || first > last {
            return Ok(HashMap::new());
        }
        let minutes = last
            .checked_sub(first)
            .map(|span| span / MINUTE_SECONDS + 1);
        let minutes = match minutes {
            Some(minutes) if minutes <= MAX_MINUTES_PER_READ => minutes,
            _ => {
                return Err(CounterError::Invalid {
                    detail: format!(
                        "invalid minute range {from_minute}..={to_minute}: read at most \
                         {MAX_MINUTES_PER_READ} minutes per call"
                    ),
                });
            }
        };

        let calls = self.plan_minute_totals(customers, first, minutes);
        let replies = self
            .bounded(self.run_script(&self.minute_totals_script, MINUTE_TOTALS_LUA, &calls))
            .await?;

        let mut totals = HashMap::new();
        for (call, reply) in calls.iter().zip(replies) {
            let counts = self.parse_counts(reply, call.customers.len())?;
            for (customer, admitted) in call.customers.iter().zip(counts) {
                if admitted > 0 {
                    totals.insert(customer.clone(), admitted);
                }
            }
        }
        Ok(totals)
    }

    /// Removes every count of `customer`: its window sums, its buckets and
    /// its minute totals of the last `totals_ttl_seconds` before
    /// `now_unix_s`. Returns the fields and entries removed.
    ///
    /// Other sidecars may still hold usage of the customer in their
    /// outboxes, so [`RedisCounters::announce_erasure`] announces the
    /// erasure to them.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::exchange`].
    pub async fn erase_customer(
        &self,
        customer: &str,
        now_unix_s: i64,
    ) -> Result<u64, CounterError> {
        let keys = ShardKeys::new(&self.key_prefix, shard_of(customer, self.shards));
        let ttl_minutes = i64::try_from(self.totals_ttl_seconds / 60).unwrap_or(i64::MAX);
        // One minute ahead covers a clock of another sidecar running ahead.
        let newest = minute_start(now_unix_s).saturating_add(MINUTE_SECONDS);
        let minutes: Vec<i64> = (0..=ttl_minutes.saturating_add(1))
            .map(|offset| newest.saturating_sub(offset.saturating_mul(MINUTE_SECONDS)))
            .collect();
        let mut removed = 0;
        for chunk in minutes.chunks(usize::try_from(ERASE_MINUTES_PER_CALL).unwrap_or(1)) {
            // Every call names the three window keys, which the first call
            // already emptied of the customer.
            let mut call_keys = vec![keys.window(), keys.buckets(), keys.expiry()];
            call_keys.extend(chunk.iter().map(|minute| keys.minute(*minute)));
            let call = ScriptCall {
                keys: call_keys,
                args: vec![customer.to_owned()],
                customers: vec![customer.to_owned()],
            };
            let replies = self
                .bounded(self.run_script(
                    &self.erase_script,
                    ERASE_LUA,
                    std::slice::from_ref(&call),
                ))
                .await?;
            for reply in replies {
                let count: i64 =
                    redis::from_redis_value(reply).map_err(|err| CounterError::Rejected {
                        target: self.link.target().to_owned(),
                        detail: format!("unexpected erase script reply: {err}"),
                    })?;
                removed += u64::try_from(count).unwrap_or(0);
            }
        }
        Ok(removed)
    }

    /// Appends an erasure notice for `customer` to the stream that every
    /// sidecar sharing the key prefix reads, sealed under the notice key
    /// when there is one, trims notices older than `retention`, and sets
    /// the stream's TTL to `retention`, all in one script so the stream
    /// never lacks its TTL.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::exchange`].
    pub async fn announce_erasure(
        &self,
        customer: &str,
        erasure: &ErasureSource<'_>,
        retention: Duration,
    ) -> Result<(), CounterError> {
        let retention_ms = u64::try_from(retention.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let now_ms = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        let key = self.erasures_key();
        let fields = notice::entry_fields(
            self.notice_key.as_ref(),
            &key,
            customer,
            &self.sidecar_id,
            erasure,
        )
        .map_err(|detail| CounterError::Rejected {
            target: self.link.target().to_owned(),
            detail: format!("failed to seal an erasure notice: {detail}"),
        })?;
        let mut append = redis::cmd("EVAL");
        append
            .arg(ANNOUNCE_LUA)
            .arg(1)
            .arg(&key)
            .arg(now_ms.saturating_sub(retention_ms))
            .arg(retention_ms);
        for (name, value) in fields {
            append.arg(name).arg(value);
        }
        self.bounded(async {
            let mut connection = self.link.connection().await?;
            self.commands_sent.fetch_add(1, Ordering::Relaxed);
            match connection.query(&append).await {
                Ok(_) => Ok(()),
                Err(err) => Err(self.link.fail(&err).await),
            }
        })
        .await
    }

    /// Returns up to `count` entries of the erasure notice stream after the
    /// entry `after_entry_id` (`0-0` for all), oldest first, this sidecar's
    /// own included. An entry this sidecar cannot read, such as one that
    /// lacks a field or is sealed under another key, is returned as
    /// [`NoticeEntry::Unreadable`], so one bad entry does not hide the
    /// others.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::exchange`], and [`CounterError::Rejected`] for a
    /// reply that is not a stream range, for example when the key has
    /// another type.
    pub async fn erasure_notices(
        &self,
        after_entry_id: &str,
        count: usize,
    ) -> Result<Vec<NoticeEntry>, CounterError> {
        let key = self.erasures_key();
        let mut range = redis::cmd("XRANGE");
        range
            .arg(&key)
            .arg(format!("({after_entry_id}"))
            .arg("+")
            .arg("COUNT")
            .arg(count.max(1));
        let reply = self
            .bounded(async {
                let mut connection = self.link.connection().await?;
                self.commands_sent.fetch_add(1, Ordering::Relaxed);
                match connection.query(&range).await {
                    Ok(reply) => Ok(reply),
                    Err(err) => Err(self.link.fail(&err).await),
                }
            })
            .await?;
        let entries: redis::streams::StreamRangeReply =
            redis::from_redis_value(reply).map_err(|err| CounterError::Rejected {
                target: self.link.target().to_owned(),
                detail: format!(
                    "failed to read the erasure notice stream {key}: {err}; it must be a stream"
                ),
            })?;
        let notice_key = self.notice_key.as_ref();
        Ok(entries
            .ids
            .into_iter()
            .map(|entry| notice::parse(entry, notice_key, &key))
            .collect())
    }

    /// Returns this sidecar's id.
    pub fn sidecar_id(&self) -> &str {
        &self.sidecar_id
    }

    /// Key of the erasure notice stream. Its hash tag is its own, so it
    /// may live in any cluster slot.
    fn erasures_key(&self) -> String {
        format!("{{{}:erasures}}", self.key_prefix)
    }

    /// Sends one `PING` to check that Redis responds. The exchange loop calls
    /// it when there is nothing to exchange, so the health status still
    /// follows Redis.
    ///
    /// # Errors
    ///
    /// As [`RedisCounters::exchange`].
    pub async fn ping(&self) -> Result<(), CounterError> {
        self.bounded(async {
            let _serialized = self.exchange_lock.lock().await;
            let mut connection = self.link.connection().await?;
            self.commands_sent.fetch_add(1, Ordering::Relaxed);
            match connection.query(&redis::cmd("PING")).await {
                Ok(_) => Ok(()),
                Err(err) => Err(self.link.fail(&err).await),
            }
        })
        .await
    }

    /// Returns the number of commands this instance sent to Redis: script
    /// calls, their `EVAL` fallbacks and `PING`s, but not the client's own
    /// handshake and cluster topology commands.
    pub fn commands_sent(&self) -> u64 {
        self.commands_sent.load(Ordering::Relaxed)
    }

    /// Returns the address, or `cluster` and the seed addresses, without
    /// credentials.
    pub fn describe_target(&self) -> String {
        self.link.target().to_owned()
    }

    /// Runs `future` within the timeout. On timeout it drops the connection,
    /// which may be stuck.
    async fn bounded<T>(
        &self,
        future: impl Future<Output = Result<T, CounterError>>,
    ) -> Result<T, CounterError> {
        match tokio::time::timeout(self.timeout, future).await {
            Ok(result) => result,
            Err(_) => {
                self.link.disconnect().await;
                let detail = format!("no reply within {} ms", self.timeout.as_millis());
                Err(self.link.unavailable(&detail))
            }
        }
    }

    /// Runs `script` once per call with `EVALSHA`, again with `EVAL` on the
    /// shards whose server lacks it, and returns the replies in order.
    async fn run_script(
        &self,
        script: &Script,
        source: &str,
        calls: &[ScriptCall],
    ) -> Result<Vec<Value>, CounterError> {
        let connection = self.link.connection().await?;
        let by_hash = calls
            .iter()
            .map(|call| call.command("EVALSHA", script.get_hash()))
            .collect();
        let mut results = self.send(&connection, by_hash).await?;

        let missing: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, result)| {
                matches!(result, Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript))
            })
            .map(|(index, _)| index)
            .collect();
        if !missing.is_empty() {
            let by_source = missing
                .iter()
                .map(|&index| calls[index].command("EVAL", source))
                .collect();
            let retried = self.send(&connection, by_source).await?;
            for (index, result) in missing.into_iter().zip(retried) {
                results[index] = result;
            }
        }

        // Report the failure that matters most, so that a broken connection
        // is dropped even when another shard only got an error reply.
        let worst = results
            .iter()
            .filter_map(|result| result.as_ref().err())
            .min_by_key(|err| match classify(err) {
                FailureKind::ReadOnly => 0,
                FailureKind::Connection => 1,
                FailureKind::Reply => 2,
            });
        if let Some(err) = worst {
            return Err(self.link.fail(err).await);
        }
        Ok(results.into_iter().filter_map(Result::ok).collect())
    }

    async fn send(
        &self,
        connection: &Connection,
        commands: Vec<Cmd>,
    ) -> Result<Vec<redis::RedisResult<Value>>, CounterError> {
        self.commands_sent
            .fetch_add(commands.len() as u64, Ordering::Relaxed);
        connection
            .send_all(commands)
            .await
            .map_err(|detail| self.link.unavailable(&detail))
    }

    /// Parses a script reply of `expected` non-negative integers.
    fn parse_counts(&self, reply: Value, expected: usize) -> Result<Vec<u64>, CounterError> {
        let rejected = |detail: String| CounterError::Rejected {
            target: self.link.target().to_owned(),
            detail,
        };
        let counts: Vec<i64> = redis::from_redis_value(reply)
            .map_err(|err| rejected(format!("unexpected script reply: {err}")))?;
        if counts.len() != expected {
            return Err(rejected(format!(
                "unexpected script reply of {} values, expected {expected}",
                counts.len()
            )));
        }
        // The script deletes sums that reach zero, so a negative count never
        // comes back. Should one come back all the same, it reads as zero.
        Ok(counts
            .into_iter()
            .map(|count| u64::try_from(count).unwrap_or(0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns settings for a server that is never reached, with `shards`
    /// shards; the tests of `plan` use them too.
    pub(super) fn settings(shards: u16) -> RedisSettings {
        RedisSettings {
            target: RedisTarget::Standalone("redis://127.0.0.1:1".to_owned()),
            key_prefix: "veo".to_owned(),
            shards,
            totals_ttl_seconds: 3600,
            timeout: Duration::from_millis(200),
            notice_key: None,
        }
    }

    fn invalid_detail(result: Result<RedisCounters, CounterError>) -> String {
        match result {
            Err(CounterError::Invalid { detail }) => detail,
            Err(other) => format!("unexpected error: {other}"),
            Ok(_) => "accepted".to_owned(),
        }
    }

    #[test]
    fn rejects_zero_shards() {
        let detail = invalid_detail(RedisCounters::new(settings(0), "a".to_owned()));
        assert!(detail.contains("shards = 0"), "{detail}");
    }

    #[test]
    fn rejects_braces_in_prefix() {
        let mut settings = settings(1);
        settings.key_prefix = "veo{x}".to_owned();
        let detail = invalid_detail(RedisCounters::new(settings, "a".to_owned()));
        assert!(detail.contains("veo{x}"), "{detail}");
    }

    #[test]
    fn rejects_empty_sidecar_id() {
        let detail = invalid_detail(RedisCounters::new(settings(1), String::new()));
        assert!(detail.contains("sidecar id"), "{detail}");
    }

    #[test]
    fn rejects_empty_seed_list() {
        let mut settings = settings(1);
        settings.target = RedisTarget::Cluster(Vec::new());
        let detail = invalid_detail(RedisCounters::new(settings, "a".to_owned()));
        assert!(detail.contains("seed list is empty"), "{detail}");
    }
}
