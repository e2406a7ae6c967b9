//! `cargo xtask demo`: replays an access log through Envoy with the filter
//! and prints what was admitted, refused and recorded.

mod admin;
mod bootstrap;
mod report;
mod stack;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::XtaskError;
use crate::{compile, paths, run, tools};

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
        None => sample_log(),
    };
    if !log.is_file() {
        return Err(XtaskError::Tool(format!(
            "access log {} not found; pass an existing file with --log",
            log.display()
        )));
    }

    let tools = tools::install(false)?;
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
            result = replay_through_stack(&tools.envoy, &log, speed) => result,
            _ = tokio::signal::ctrl_c() => Err(XtaskError::Interrupted),
        }
    })
}

/// Returns the path of the access log that ships with the repository.
pub fn sample_log() -> PathBuf {
    paths::workspace_root()
        .join("bench")
        .join("sample")
        .join("access.log")
}

async fn replay_through_stack(envoy: &Path, log: &Path, speed: f64) -> Result<(), XtaskError> {
    let dir = tempfile::Builder::new()
        .prefix("veo-demo-")
        .tempdir()
        .map_err(|source| XtaskError::Io {
            action: "create a temporary folder in",
            path: std::env::temp_dir(),
            source,
        })?;
    let keys = dir.path().join("keys");
    run::status(
        Command::new(paths::release_binary("veo-replay"))
            .arg("keygen")
            .arg("--dir")
            .arg(&keys),
        "veo-replay could not write a signing key; see its message above",
    )?;
    let plugin_config = plugin_config(&read_jwks(&keys.join("jwks.json"))?);

    let stack = stack::start(envoy, dir.path(), &plugin_config).await?;
    print_setup(&stack, log, speed);

    let started_unix_s = report::unix_seconds();
    let mut replay = tokio::process::Command::new(paths::release_binary("veo-replay"));
    replay
        .arg("run")
        .arg("--key")
        .arg(keys.join("signing-key.pem"))
        .arg("--target")
        .arg(format!("http://127.0.0.1:{}", stack.listener_port))
        .arg("--log")
        .arg(log)
        .arg("--speed")
        .arg(speed.to_string())
        .arg("--decisions")
        .arg(dir.path().join("decisions.jsonl"))
        .kill_on_drop(true);
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
    report::print_top_customers(stack.sidecar_address, started_unix_s).await?;
    report::print_filter_stats(&stack.admin).await?;
    println!("\nStopping Envoy, the sidecar and the upstream.");
    Ok(())
}

fn print_setup(stack: &stack::Stack, log: &Path, speed: f64) {
    println!(
        "\nEnvoy listens on 127.0.0.1:{}, the sidecar on {}.",
        stack.listener_port, stack.sidecar_address
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

fn read_jwks(path: &Path) -> Result<serde_json::Value, XtaskError> {
    let text = std::fs::read_to_string(path).map_err(|source| XtaskError::Io {
        action: "read the JWKS written by veo-replay keygen from",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|err| XtaskError::Tool(format!("{} is not valid JSON: {err}", path.display())))
}

/// Returns the demo's plugin configuration, trusting the keys in `jwks`.
fn plugin_config(jwks: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "jwt": {
            "jwks": jwks,
            "issuer": "https://auth.veo.test",
            "audiences": ["veo-api"],
        },
        "tiers": {
            "basic": {"quota": {"requests": 60, "window_seconds": WINDOW_SECONDS}},
            "pro": {"quota": {"requests": 600, "window_seconds": WINDOW_SECONDS}},
            "enterprise": {"burst": {"tokens_per_second": 100, "size": 200}},
        },
        "sidecar": {
            "cluster": "veo_sidecar",
            "sync_interval_ms": SYNC_INTERVAL_MS,
            "timeout_ms": 1000,
        },
    })
}
