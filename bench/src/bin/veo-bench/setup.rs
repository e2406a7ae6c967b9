//! The four measured setups, run one after another against one upstream.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veo_bench::tokens::{SigningKey, TokenSpec};

use crate::envoy::{self, EnvoyProcess, Upstream};
use crate::wrk::{self, Measurement};
use crate::{Args, UpstreamKind};
use crate::{mint, report};

/// Tier of every benchmark token: a token bucket of a million tokens refilled at a million per
/// second, so the limiter runs on every request but never refuses one.
pub const BENCH_TIER: &str = "enterprise";

/// Wait before reading the filter's counters; its stats timer fires every 250 ms.
const STATS_SETTLE: Duration = Duration::from_secs(1);

/// One proxy configuration to measure.
pub struct Setup {
    /// Name in the result table.
    pub label: &'static str,
    /// Short name for file names.
    pub name: &'static str,
    /// The wasm filter the proxy runs, if any.
    pub filter: Filter,
    /// Tokens the measured run sends.
    pub tokens: PathBuf,
}

/// The wasm filter of a setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// No wasm filter: HTTP connection manager and router only.
    None,
    /// The module that does nothing, in the same runtime as the Veo Edge filter.
    Empty,
    /// The module that makes the host calls of a cached request and nothing else.
    HostCalls,
    /// The Veo Edge filter.
    VeoEdge,
}

/// Runs every setup and prints the table; returns false when a run is not valid (errors,
/// non-2xx responses or reused unique tokens).
pub async fn run(args: &Args) -> anyhow::Result<bool> {
    let envoy_bin = args.envoy_path();
    let wasm = args.wasm_path();
    ensure!(
        envoy_bin.is_file(),
        "Envoy not found at {}: set ENVOY_BIN or run `cargo xtask install-tools`",
        envoy_bin.display()
    );
    ensure!(
        wasm.is_file(),
        "filter module not found at {}: build it with \
         `cargo build --release -p veo-filter --target wasm32-wasip1`",
        wasm.display()
    );
    let noop_wasm = args.noop_wasm_path();
    ensure!(
        noop_wasm.is_file(),
        "empty filter module not found at {}: build it with \
         `cargo build --release -p veo-noop-filter --target wasm32-wasip1`",
        noop_wasm.display()
    );
    let host_calls_wasm = args.host_calls_wasm_path();
    ensure!(
        host_calls_wasm.is_file(),
        "host-calls filter module not found at {}: build it with \
         `cargo build --release -p veo-host-calls-filter --target wasm32-wasip1`",
        host_calls_wasm.display()
    );

    let load_before = report::load_average();
    let dir = tempfile::Builder::new().prefix("veo-bench-").tempdir()?;
    let script = dir.path().join("tokens.lua");
    std::fs::write(&script, wrk::SCRIPT)?;
    let key = SigningKey::generate();
    let cached = dir.path().join("cached-tokens.txt");
    let unique = dir.path().join("unique-tokens.txt");
    let key = mint::mint_token_files(
        key,
        args.cached_tokens,
        &cached,
        args.unique_tokens,
        &unique,
    )
    .await?;
    let veo_edge = envoy::wasm_filter("veo_edge", &wasm, Some(&plugin_config(&key)));
    let empty = envoy::wasm_filter("veo_noop", &noop_wasm, None);
    let host_calls = envoy::wasm_filter("veo_host_calls", &host_calls_wasm, None);

    // The upstream Envoy, if any, lives until this function returns.
    let (_upstream_envoy, upstream) = start_upstream(args, &envoy_bin, dir.path()).await?;
    let setups: Vec<Setup> = setups(&cached, &unique)
        .into_iter()
        .filter(|setup| {
            setup.filter == Filter::None
                || args.setups.is_empty()
                || args.setups.iter().any(|name| name == setup.name)
        })
        .collect();

    let mut rounds: Vec<Vec<Outcome>> = setups.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.rounds.max(1) {
        for (setup, outcomes) in setups.iter().zip(&mut rounds) {
            eprintln!("round {round}: {}", setup.label);
            let filter = match setup.filter {
                Filter::None => None,
                Filter::Empty => Some(empty.clone()),
                Filter::HostCalls => Some(host_calls.clone()),
                Filter::VeoEdge => Some(veo_edge.clone()),
            };
            let config = envoy::proxy_config(upstream, filter);
            let outcome = measure(
                args,
                &envoy_bin,
                dir.path(),
                &script,
                &cached,
                setup,
                &config,
            )
            .await?;
            outcomes.push(outcome);
        }
    }

    let results: Vec<(&Setup, Vec<Outcome>)> = setups.iter().zip(rounds).collect();
    print!("{}", report::render(args, &load_before, &results));
    if args.keep_dir {
        let kept = dir.keep();
        println!("working directory kept at {}", kept.display());
    }
    Ok(results.iter().all(|(setup, outcomes)| {
        outcomes
            .iter()
            .all(|o| report::problems(setup, o).is_empty())
    }))
}

/// Starts the upstream Envoy when `--upstream` is `envoy`.
async fn start_upstream(
    args: &Args,
    envoy_bin: &Path,
    dir: &Path,
) -> anyhow::Result<(Option<EnvoyProcess>, Upstream)> {
    match args.upstream {
        UpstreamKind::Envoy => {
            let config = envoy::upstream_config();
            let process = EnvoyProcess::start(envoy_bin, dir, "upstream", &config).await?;
            let upstream = Upstream::Cluster(process.listener);
            Ok((Some(process), upstream))
        }
        UpstreamKind::Direct => Ok((None, Upstream::DirectResponse)),
    }
}

/// Names of the setups, in the order they run, for `--setups`.
pub const NAMES: [&str; 5] = ["no-filter", "empty-wasm", "host-calls", "cached", "verify"];

/// Returns the five setups: the baseline, the empty wasm filter, the host calls alone, the
/// filter on the cached tokens, and the filter on the unique tokens.
fn setups(cached: &Path, unique: &Path) -> [Setup; 5] {
    [
        Setup {
            label: "no filter",
            name: "no-filter",
            filter: Filter::None,
            tokens: cached.to_path_buf(),
        },
        Setup {
            label: "empty wasm filter",
            name: "empty-wasm",
            filter: Filter::Empty,
            tokens: cached.to_path_buf(),
        },
        Setup {
            label: "host calls only",
            name: "host-calls",
            filter: Filter::HostCalls,
            tokens: cached.to_path_buf(),
        },
        Setup {
            label: "filter, cached tokens",
            name: "cached",
            filter: Filter::VeoEdge,
            tokens: cached.to_path_buf(),
        },
        Setup {
            label: "filter, every token verified",
            name: "verify",
            filter: Filter::VeoEdge,
            tokens: unique.to_path_buf(),
        },
    ]
}

/// Starts the proxy of `setup`, checks that the Veo Edge filter decides requests (or that the
/// empty one lets them through), warms it up and measures it.
async fn measure(
    args: &Args,
    envoy_bin: &Path,
    dir: &Path,
    script: &Path,
    warmup_tokens: &Path,
    setup: &Setup,
    config: &Value,
) -> anyhow::Result<Outcome> {
    let proxy = EnvoyProcess::start(envoy_bin, dir, setup.name, config).await?;
    if matches!(setup.filter, Filter::Empty | Filter::HostCalls) {
        let status = probe(proxy.listener, None).await?;
        if status != 200 {
            bail!(
                "the wasm filter did not let a request through in setup {:?}: status \
                 {status} (expected 200); see {}",
                setup.label,
                proxy.log.display()
            );
        }
    }
    if setup.filter == Filter::VeoEdge {
        let token = std::fs::read_to_string(warmup_tokens)?;
        let token = token.lines().next().unwrap_or_default();
        let without = probe(proxy.listener, None).await?;
        let with = probe(proxy.listener, Some(token)).await?;
        if without != 401 || with != 200 {
            bail!(
                "the filter is not deciding requests in setup {:?}: status {without} without a \
                 token (expected 401) and {with} with one (expected 200); see {}",
                setup.label,
                proxy.log.display()
            );
        }
    }

    eprintln!("  warming up for {} s", args.warmup_seconds);
    wrk::run(
        &args.wrk,
        script,
        warmup_tokens,
        proxy.listener,
        args.load(args.warmup_seconds),
    )
    .await?;
    let before = cache_counters(&proxy, setup).await;
    eprintln!("  measuring for {} s", args.duration_seconds);
    let measurement = wrk::run(
        &args.wrk,
        script,
        &setup.tokens,
        proxy.listener,
        args.load(args.duration_seconds),
    )
    .await?;
    let after = cache_counters(&proxy, setup).await;

    let cache = match (before, after) {
        (Some(before), Some(after)) => Some(CacheCounts {
            hits: after.hits.saturating_sub(before.hits),
            misses: after.misses.saturating_sub(before.misses),
        }),
        _ => None,
    };
    Ok(Outcome { measurement, cache })
}

/// Token-cache counters of the filter.
#[derive(Debug, Clone, Copy)]
pub struct CacheCounts {
    /// Tokens found in the verified-token cache.
    pub hits: u64,
    /// Tokens verified.
    pub misses: u64,
}

/// Figures of one setup.
pub struct Outcome {
    /// wrk's figures.
    pub measurement: Measurement,
    /// Token-cache hits and misses during the measured run, for setups with the filter.
    pub cache: Option<CacheCounts>,
}

/// Reads the filter's token-cache counters. It first waits for the filter's 250 ms stats
/// timer to publish the latest requests. Returns `None` without the Veo Edge filter or when
/// the stats are missing.
async fn cache_counters(proxy: &EnvoyProcess, setup: &Setup) -> Option<CacheCounts> {
    if setup.filter != Filter::VeoEdge {
        return None;
    }
    tokio::time::sleep(STATS_SETTLE).await;
    let stats = envoy::admin_get(proxy.admin, "/stats?filter=token_cache").await?;
    let counter = |suffix: &str| {
        stats.lines().find_map(|line| {
            let (name, value) = line.split_once(": ")?;
            name.ends_with(suffix)
                .then(|| value.trim().parse::<u64>().ok())?
        })
    };
    Some(CacheCounts {
        hits: counter("token_cache_hits_total")?,
        misses: counter("token_cache_misses_total")?,
    })
}

/// Returns the filter configuration: the bench key's JWKS and one burst-only tier that admits
/// every request.
fn plugin_config(key: &SigningKey) -> Value {
    let spec = TokenSpec::default();
    json!({
        "jwt": {
            "jwks": key.jwks(),
            "issuer": spec.issuer,
            "audiences": [spec.audience],
        },
        "default_tier": BENCH_TIER,
        "tiers": {BENCH_TIER: {"burst": {"tokens_per_second": 1_000_000, "size": 1_000_000}}},
    })
}

/// Sends one `GET` with an optional bearer token and returns the response status.
async fn probe(address: SocketAddr, token: Option<&str>) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(address).await?;
    let authorization =
        token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET /videos/1/manifest.m3u8 HTTP/1.1\r\nHost: bench\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    text.split(' ')
        .nth(1)
        .and_then(|status| status.parse().ok())
        .with_context(|| format!("invalid HTTP response from {address}: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_names_match_accepted_names() {
        let names: Vec<&str> = setups(Path::new("c"), Path::new("u"))
            .iter()
            .map(|setup| setup.name)
            .collect();
        assert_eq!(names, NAMES);
    }
}
