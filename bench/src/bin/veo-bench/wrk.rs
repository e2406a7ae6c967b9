//! Load generation with wrk: a Lua script that sends each request with the next bearer token
//! from a file, and parsing of the result line the script prints.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

/// The wrk script. Each thread takes every n-th token of the file given after `--`, cycles
/// through its share, and counts how often it started over, so the caller can tell whether
/// tokens were reused.
pub const SCRIPT: &str = r#"
local threads = {}
local tokens = {}
local next_token = 0
wrapped = 0

function setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, thread_count = args[1], tonumber(args[2])
  local line_number = 0
  for line in io.lines(path) do
    if line_number % thread_count == thread_index then
      table.insert(tokens, "Bearer " .. line)
    end
    line_number = line_number + 1
  end
end

function request()
  next_token = next_token + 1
  if next_token > #tokens then
    next_token = 1
    wrapped = wrapped + 1
  end
  return wrk.format(nil, nil, {["Authorization"] = tokens[next_token]})
end

function done(summary, latency, requests)
  local restarts = 0
  for _, thread in ipairs(threads) do
    restarts = restarts + thread:get("wrapped")
  end
  local errors = summary.errors
  io.write(string.format(
    "veo-bench-result requests=%d duration_us=%d p50_us=%d p99_us=%d non2xx=%d " ..
    "socket_errors=%d token_restarts=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect + errors.read + errors.write + errors.timeout, restarts))
end
"#;

/// Settings of one wrk run.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// wrk threads.
    pub threads: u32,
    /// Open connections.
    pub connections: u32,
    /// How long to send.
    pub duration: Duration,
}

/// Figures of one wrk run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measurement {
    /// Completed requests.
    pub requests: u64,
    /// Requests per second.
    pub requests_per_second: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency in milliseconds.
    pub p99_ms: f64,
    /// Responses with a status outside 2xx and 3xx.
    pub non_2xx: u64,
    /// Connect, read, write and timeout errors.
    pub socket_errors: u64,
    /// Times a thread ran out of tokens and started its list over; 0 means no token was sent
    /// twice.
    pub token_restarts: u64,
}

/// Runs wrk against `target` with the tokens in `tokens_file`.
///
/// # Errors
/// Fails when wrk cannot run, exits with an error or prints no result line.
pub async fn run(
    wrk: &Path,
    script: &Path,
    tokens_file: &Path,
    target: SocketAddr,
    load: Load,
) -> anyhow::Result<Measurement> {
    let output = Command::new(wrk)
        .arg(format!("--threads={}", load.threads))
        .arg(format!("--connections={}", load.connections))
        .arg(format!("--duration={}s", load.duration.as_secs().max(1)))
        .arg("--timeout=5s")
        .arg("--script")
        .arg(script)
        .arg(format!("http://{target}/videos/1/manifest.m3u8"))
        .arg("--")
        .arg(tokens_file)
        .arg(load.threads.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("failed to run {}", wrk.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk exited with {}:\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_result(&stdout).with_context(|| format!("wrk printed no result line:\n{stdout}"))
}

/// Parses the `veo-bench-result key=value ...` line that the script's `done` prints.
pub fn parse_result(output: &str) -> Option<Measurement> {
    let line = output
        .lines()
        .find_map(|line| line.strip_prefix("veo-bench-result "))?;
    let field = |name: &str| -> Option<u64> {
        line.split(' ')
            .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let requests = field("requests")?;
    let duration_us = field("duration_us")?;
    if duration_us == 0 {
        return None;
    }
    Some(Measurement {
        requests,
        requests_per_second: requests as f64 * 1e6 / duration_us as f64,
        p50_ms: field("p50_us")? as f64 / 1_000.0,
        p99_ms: field("p99_us")? as f64 / 1_000.0,
        non_2xx: field("non2xx")?,
        socket_errors: field("socket_errors")?,
        token_restarts: field("token_restarts")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_line() {
        let output = "Running 10s test\nveo-bench-result requests=500000 duration_us=10000000 \
                      p50_us=450 p99_us=2100 non2xx=3 socket_errors=0 token_restarts=1\n";
        let measurement = parse_result(output).unwrap();
        assert_eq!(measurement.requests, 500_000);
        assert_eq!(measurement.requests_per_second, 50_000.0);
        assert_eq!(measurement.p50_ms, 0.45);
        assert_eq!(measurement.p99_ms, 2.1);
        assert_eq!(measurement.non_2xx, 3);
        assert_eq!(measurement.token_restarts, 1);
    }

    #[test]
    fn missing_or_partial_result_is_none() {
        assert!(parse_result("Running 10s test\n").is_none());
        assert!(parse_result("veo-bench-result requests=5 duration_us=0 p50_us=1").is_none());
        assert!(parse_result("veo-bench-result requests=5").is_none());
    }
}
