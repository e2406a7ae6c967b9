//! Commands that Redis served, from `INFO commandstats` read on the benchmark's own
//! connection, so that a run's count is the difference of two readings.
//!
//! Those stats count the commands that a Lua script runs as well (`redis.call` inside
//! `EVALSHA`), as calls of their own, so the benchmark counts only the commands that clients
//! send to run scripts and manage connections.

use std::collections::BTreeMap;

use anyhow::Context;
use redis::aio::MultiplexedConnection;

/// Commands that a sidecar issues to keep its counters, by their base name (`client` covers
/// `client|setname` and the other subcommands). They are what the benchmark counts.
pub const COUNTED_COMMANDS: [&str; 6] = ["evalsha", "eval", "script", "ping", "hello", "client"];

/// Commands the benchmark itself sends: reading the stats and emptying Redis between runs.
const BENCHMARK_COMMANDS: [&str; 3] = ["info", "flushall", "config"];

/// The benchmark's connection to Redis.
pub struct StatsClient {
    connection: MultiplexedConnection,
}

impl StatsClient {
    /// Connects to the Redis at `url`.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).with_context(|| format!("invalid Redis URL {url}"))?;
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("failed to connect to Redis at {url}"))?;
        Ok(Self { connection })
    }

    /// Reads the calls of every command so far.
    pub async fn command_stats(&mut self) -> anyhow::Result<CommandStats> {
        let text: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.connection)
            .await
            .context("failed to read INFO commandstats from Redis")?;
        Ok(CommandStats::parse(&text))
    }

    /// Deletes every key, so that a run starts with no count of an earlier one.
    pub async fn flush_all(&mut self) -> anyhow::Result<()> {
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut self.connection)
            .await
            .context("failed to empty Redis with FLUSHALL")
    }
}

/// Calls per command, such as `evalsha` or `client|setname`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandStats {
    calls: BTreeMap<String, u64>,
}

impl CommandStats {
    /// Parses the `cmdstat_NAME:calls=N,...` lines of `INFO commandstats`; other lines are
    /// skipped.
    pub fn parse(text: &str) -> Self {
        let calls = text
            .lines()
            .filter_map(|line| line.trim().strip_prefix("cmdstat_"))
            .filter_map(|line| {
                let (name, fields) = line.split_once(':')?;
                let calls = fields
                    .split(',')
                    .find_map(|field| field.strip_prefix("calls="))?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect();
        Self { calls }
    }

    /// Returns the calls made after `earlier` was read, leaving out the benchmark's own
    /// commands.
    pub fn since(&self, earlier: &CommandStats) -> CommandStats {
        let calls = self
            .calls
            .iter()
            .filter(|(name, _)| !BENCHMARK_COMMANDS.contains(&base_name(name)))
            .map(|(name, calls)| {
                let before = earlier.calls.get(name).copied().unwrap_or(0);
                (name.clone(), calls.saturating_sub(before))
            })
            .filter(|(_, calls)| *calls > 0)
            .collect();
        CommandStats { calls }
    }

    /// Returns the calls of [`COUNTED_COMMANDS`].
    pub fn counted(&self) -> u64 {
        self.sum(|name| COUNTED_COMMANDS.contains(&name))
    }

    /// Returns the calls of every other command.
    pub fn other(&self) -> u64 {
        self.sum(|name| !COUNTED_COMMANDS.contains(&name))
    }

    /// Returns the calls per command of [`COUNTED_COMMANDS`], such as
    /// `client|setname=2 evalsha=120`.
    pub fn counted_breakdown(&self) -> String {
        self.breakdown(|name| COUNTED_COMMANDS.contains(&name))
    }

    /// Returns the calls per command of every other command, such as `hincrby=300`.
    pub fn other_breakdown(&self) -> String {
        self.breakdown(|name| !COUNTED_COMMANDS.contains(&name))
    }

    fn breakdown(&self, include: impl Fn(&str) -> bool) -> String {
        let parts: Vec<String> = self
            .calls
            .iter()
            .filter(|(name, _)| include(base_name(name)))
            .map(|(name, calls)| format!("{name}={calls}"))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(" ")
        }
    }

    fn sum(&self, include: impl Fn(&str) -> bool) -> u64 {
        self.calls
            .iter()
            .filter(|(name, _)| include(base_name(name)))
            .map(|(_, calls)| calls)
            .sum()
    }
}

/// Returns the command of a `command|subcommand` name.
fn base_name(name: &str) -> &str {
    name.split('|').next().unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=1,usec=20,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n";

    const AFTER: &str = "# Commandstats\r\n\
        cmdstat_evalsha:calls=70,usec=350,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_script|load:calls=2,usec=9,usec_per_call=4.50,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_client|setname:calls=4,usec=4,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_get:calls=5,usec=5,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=3,usec=60,usec_per_call=20.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_flushall:calls=1,usec=60,usec_per_call=60.00,rejected_calls=0,failed_calls=0\r\n";

    #[test]
    fn parses_calls_per_command() {
        let stats = CommandStats::parse(AFTER);
        assert_eq!(stats.calls.get("evalsha"), Some(&70));
        assert_eq!(stats.calls.get("script|load"), Some(&2));
        assert_eq!(stats.calls.len(), 6);
    }

    #[test]
    fn difference_leaves_out_benchmark_commands() {
        let delta = CommandStats::parse(AFTER).since(&CommandStats::parse(BEFORE));
        assert_eq!(
            delta.counted_breakdown(),
            "client|setname=4 evalsha=60 script|load=2"
        );
        assert_eq!(delta.other_breakdown(), "get=5");
        assert_eq!(delta.counted(), 66);
        assert_eq!(delta.other(), 5);
    }

    #[test]
    fn empty_difference_reads_none() {
        let stats = CommandStats::parse(BEFORE);
        assert_eq!(stats.since(&stats).counted_breakdown(), "none");
        assert_eq!(stats.since(&stats).other_breakdown(), "none");
        assert_eq!(stats.since(&stats).counted(), 0);
    }
}
