//! One run: a fleet of a given size replays one workload, and the decisions, the Redis
//! commands and the sync calls of that run are measured.

use std::time::{Duration, Instant};

use anyhow::Context;
use veo_bench::decisions::Decision;
use veo_bench::oracle::accuracy::{AccuracyReport, measure_accuracy};
use veo_bench::replay::{ReplayOptions, run_replay_across};
use veo_tests::{Fleet, FleetOptions};

use crate::Counters;
use crate::redis_stats::{CommandStats, StatsClient};
use crate::setup::Setup;
use crate::workload::Workload;

/// Envoy stat of the filter's sync role: batches sent to the sidecar. Envoy shows the
/// filter's own metrics with the prefix `wasmcustom.`.
pub const SYNC_BATCHES_STAT: &str = "wasmcustom.veo.sync_batches_sent_total";

/// Measurements of one run.
pub struct RunResult {
    /// Instances in the fleet.
    pub instances: usize,
    /// Name of the workload.
    pub workload: &'static str,
    /// Every decision, ordered by send time, with the instance that made it.
    pub decisions: Vec<Decision>,
    /// Time between the readings of the Redis and Envoy stats before and after the replay.
    pub measured: Duration,
    /// Largest delay between a request's planned and actual send time.
    pub max_lateness: Duration,
    /// Redis commands served during the run, the benchmark's own left out.
    pub redis_commands: CommandStats,
    /// Sync batches sent by all Envoys during the run.
    pub sync_batches: u64,
    /// The decisions measured against the oracle.
    pub accuracy: AccuracyReport,
}

impl RunResult {
    /// Returns the requests admitted (2xx), of every tier.
    pub fn admitted(&self) -> usize {
        self.decisions
            .iter()
            .filter(|decision| decision.is_admitted())
            .count()
    }

    /// Returns the requests neither admitted nor refused with 429: no response, 401, 5xx.
    pub fn errors(&self) -> usize {
        self.decisions
            .iter()
            .filter(|decision| !decision.is_admitted() && decision.status != 429)
            .count()
    }

    /// Returns the counted Redis commands per admitted request, `None` when none was
    /// admitted.
    pub fn redis_commands_per_admitted(&self) -> Option<f64> {
        let admitted = self.admitted();
        (admitted > 0).then(|| self.redis_commands.counted() as f64 / admitted as f64)
    }

    /// Returns the sync calls of all Envoys together per second of the run.
    pub fn sync_calls_per_second(&self) -> f64 {
        let seconds = self.measured.as_secs_f64();
        if seconds > 0.0 {
            self.sync_batches as f64 / seconds
        } else {
            0.0
        }
    }
}

/// Starts a fleet of `instances` with counters in the Redis at `redis_url`, replays
/// `workload` spread over its Envoys at random, stops the fleet and measures the run.
///
/// Redis is emptied first, so no count of an earlier run is left.
pub async fn measure(
    setup: &Setup,
    workload: &Workload,
    instances: usize,
    redis_url: &str,
    redis: &mut StatsClient,
) -> anyhow::Result<RunResult> {
    redis.flush_all().await?;
    let options = FleetOptions {
        instances,
        concurrency: 1,
        sidecar_config: setup.sidecar_config(redis_url),
    };
    // Each instance admits its share of a new customer's quota until the
    // first sync reply about that customer.
    let plugin_config = match setup.counters {
        Counters::Embedded => setup.plugin_config.clone(),
        Counters::Redis => setup.plugin_config.clone().set(
            "/quota_share_before_sync",
            serde_json::json!(1.0 / instances as f64),
        ),
    };
    let mut fleet = Fleet::start(&plugin_config, &options)
        .await
        .with_context(|| format!("failed to start a fleet of {instances} instance(s)"))?;
    let targets = fleet.listener_urls();
    let replay_options = ReplayOptions {
        progress: false,
        ..ReplayOptions::new(targets.first().cloned().unwrap_or_default())
    };

    let redis_before = redis.command_stats().await?;
    let sync_before = sync_batches_sent(&fleet).await?;
    let started = Instant::now();
    let outcome = run_replay_across(
        workload.plan().to_vec(),
        &setup.key,
        &replay_options,
        &targets,
        setup.seed,
    )
    .await
    .context("the replay failed")?;
    let sync_after = sync_batches_sent(&fleet).await?;
    let redis_after = redis.command_stats().await?;
    let measured = started.elapsed();

    for instance in fleet.instances_mut() {
        instance.envoy.ensure_running()?;
    }
    drop(fleet);

    let accuracy = measure_accuracy(&outcome.decisions, &setup.limits, setup.tolerance_seconds);
    Ok(RunResult {
        instances,
        workload: workload.name(),
        decisions: outcome.decisions,
        measured,
        max_lateness: outcome.max_lateness,
        redis_commands: redis_after.since(&redis_before),
        sync_batches: sync_after.saturating_sub(sync_before),
        accuracy,
    })
}

/// Returns the sum of [`SYNC_BATCHES_STAT`] over the fleet's Envoys, 0 for an Envoy that has
/// not defined it yet.
async fn sync_batches_sent(fleet: &Fleet) -> anyhow::Result<u64> {
    let mut total = 0;
    for instance in fleet.instances() {
        let stats = instance.envoy.admin().stats(SYNC_BATCHES_STAT).await?;
        total += stats.get(SYNC_BATCHES_STAT).copied().unwrap_or(0);
    }
    Ok(total)
}
