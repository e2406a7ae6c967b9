//! `cargo xtask demo`: replays an access log through Envoy with the filter
//! and prints what was admitted, refused and recorded.

mod report;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use veo_tests::artifacts;
use veo_tests::plugin::PluginConfig;
use veo_tests::replay::{self, ReplayKeys};
use veo_tests::sidecar::unix_seconds;
use veo_tests::stack::temp_dir_named;
use veo_tests::{Stack, StackOptions};

use crate::error::XtaskError;
use crate::{compile, tools};

/// Default replay speed-up factor.
pub const DEFAULT_SPEED: f64 = 1000.0;

/// Quota window of the demo's tiers, in seconds. The sample log spans 6 hours,
/// which the default speed replays in about 22 s. A 60 s window would span the
/// whole replay, so the window is short enough for the heavy customers to
/// reach 429 several times.
const WINDOW_SECONDS: u64 = 10;

/// How often the filter sends usage to the sidecar, in milliseconds.
const SYNC_INTERVAL_MS: u64 = 500;

/// Runs the demo: installs and builds what is missing, starts the stack,
/// replays `log` (the shipped sample when `None`) at `speed` times the
/// recorded pace, prints the summary and stops every process.
pub fn run(log: Option<&Path>, speed: f64) -> Result<(), XtaskError> {
    let log = match log {
        Some(path) => path.to_path_buf(),
        None => artifacts::sample_access_log(),
    };
    if !log.is_file() {
        return Err(XtaskError::Tool(format!(
            "access log {} not found; pass an existing file with --log",
            log.display()
        )));
    }

    tools::install(false)?;
    compile::build_all()?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| XtaskError::Io {
            action: "start the async runtime for",
            path: PathBuf::from("the demo"),
            source,
        })?;
    runtime.block_on(async {
        tokio::select! {
            result = replay_through_stack(&log, speed) => result,
            _ = tokio::signal::ctrl_c() => Err(XtaskError::Interrupted),
        }
    })
}

async fn replay_through_stack(log: &Path, speed: f64) -> Result<(), XtaskError> {
    let dir = temp_dir_named("veo-demo")?;
    let keys = replay::keygen(&dir.path().join("keys"))?;
    // The decisions file outlives the demo's temporary folder, so a reader
    // can check it with `veo-replay check` afterwards.
    let out_dir = artifacts::workspace_root().join("out");
    std::fs::create_dir_all(&out_dir).map_err(|source| XtaskError::Io {
        action: "create",
        path: out_dir.clone(),
        source,
    })?;
    let decisions = out_dir.join("demo-decisions.jsonl");
    let options = StackOptions {
        concurrency: 2,
        ..StackOptions::default()
    };
    let mut stack = Stack::start_in(dir, &plugin_config(&keys), options).await?;
    print_setup(&stack, log, speed);

    let started_unix_s = unix_seconds();
    let port = stack.envoy.listener_port();
    let mut replay = replay::run_command(&keys, port, log, speed, &decisions)?;
    let status = replay.status().await.map_err(|source| XtaskError::Spawn {
        program: "veo-replay".to_owned(),
        hint: "run `cargo xtask build` first".to_owned(),
        source,
    })?;
    if !status.success() {
        return Err(XtaskError::CommandFailed {
            command: "veo-replay run".to_owned(),
            status,
            hint: "see its message above".to_owned(),
        });
    }

    // Two sync intervals let the last counted requests reach the ledger.
    tokio::time::sleep(Duration::from_millis(2 * SYNC_INTERVAL_MS + 500)).await;
    report::print_top_customers(&stack.sidecar, started_unix_s).await?;
    report::print_filter_stats(stack.envoy.admin()).await?;

    // Stopping the sidecar runs its last billing round, which turns every
    // minute of usage into meter events in the outbox file.
    stack.sidecar.stop();
    report::print_billed(
        &stack.sidecar.data_dir().join("meter_events.jsonl"),
        &out_dir.join("demo-meter-events.jsonl"),
    )?;
    println!(
        "\nThe decisions are in {}. Check them again against the demo's {WINDOW_SECONDS} s \
         windows with:\n  target/release/veo-replay check --decisions out/demo-decisions.jsonl \
         --window-seconds {WINDOW_SECONDS}",
        decisions.display()
    );
    println!("\nStopping Envoy and the upstream.");
    Ok(())
}

fn print_setup(stack: &Stack, log: &Path, speed: f64) {
    println!(
        "\nEnvoy listens on 127.0.0.1:{}, the sidecar on {}.",
        stack.envoy.listener_port(),
        stack.sidecar.address()
    );
    println!(
        "Demo tiers: basic 60 and pro 600 requests per rolling {WINDOW_SECONDS} s window \
         (60 s in the default configuration, shortened so that heavy customers reach 429 \
         during the replay); enterprise a token bucket of 100 requests/s, burst 200."
    );
    println!(
        "Replaying {} at {speed}x the recorded pace.\n",
        log.display()
    );
}

/// Returns the demo's plugin configuration, trusting `keys`: the harness's
/// issuer, audience and sidecar cluster with the demo's tiers and pace.
fn plugin_config(keys: &ReplayKeys) -> PluginConfig {
    PluginConfig::for_jwks(keys.jwks.clone())
        .quota("basic", 60, WINDOW_SECONDS)
        .quota("pro", 600, WINDOW_SECONDS)
        .set(
            "/tiers/enterprise/burst",
            json!({"tokens_per_second": 100, "size": 200}),
        )
        .remove("/forged_headers")
        .set("/sidecar/sync_interval_ms", json!(SYNC_INTERVAL_MS))
        .set("/sidecar/timeout_ms", json!(1000))
}
