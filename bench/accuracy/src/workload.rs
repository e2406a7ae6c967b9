//! The two workloads: synthetic customers far over their quota, and a recorded access log
//! sped up to the benchmark's duration.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use veo_bench::access_log::read_access_log;
use veo_bench::replay::{PlannedRequest, SyntheticLoad, plan_from_log, plan_synthetic};
use veo_bench::tiers::{DEFAULT_TIER, TierAssignment};

use crate::setup::Setup;

/// Every how many synthetic customers one is pro; the others are basic.
const PRO_EVERY: usize = 4;

/// One workload: a plan that every fleet size replays unchanged.
pub struct Workload {
    name: &'static str,
    description: String,
    plan: Vec<PlannedRequest>,
    duration: Duration,
}

impl Workload {
    /// Builds the synthetic overload: `setup.customers` customers, every fourth one pro and
    /// the others basic, each sending evenly spaced requests at `setup.overload` times its
    /// quota's rate.
    pub fn overload(setup: &Setup) -> anyhow::Result<Self> {
        let load = SyntheticLoad {
            customers: setup.customers,
            overload: setup.overload,
            duration: setup.duration,
            seed: setup.seed,
        };
        let tiers: BTreeMap<String, String> = (0..setup.customers)
            .filter(|index| index % PRO_EVERY == 0)
            .map(|index| (synthetic_customer(index), "pro".to_owned()))
            .collect();
        let assignment = TierAssignment::Mapping {
            tiers,
            fallback: DEFAULT_TIER.to_owned(),
        };
        let plan = plan_synthetic(&load, &assignment, &setup.limits)?;
        let description = format!(
            "{} customers (every {PRO_EVERY}th pro, the others basic), each at {}x its quota's \
             rate for {} s",
            setup.customers,
            setup.overload,
            setup.duration.as_secs()
        );
        Ok(Self {
            name: "overload",
            description,
            plan,
            duration: setup.duration,
        })
    }

    /// Builds the replay of the access log at `log`, sped up so that it lasts
    /// `setup.duration`. Each client address is a customer, with a seeded tier (80% basic,
    /// 15% pro, 5% enterprise).
    pub fn replay(setup: &Setup, log: &Path) -> anyhow::Result<Self> {
        let parsed = read_access_log(log)?;
        let first = parsed
            .entries
            .iter()
            .map(|entry| entry.time.unix_seconds)
            .min();
        let last = parsed
            .entries
            .iter()
            .map(|entry| entry.time.unix_seconds)
            .max();
        let (Some(first), Some(last)) = (first, last) else {
            bail!("access log {} has no well-formed line", log.display());
        };
        let span = (last - first).max(1) as f64;
        let speed = span / setup.duration.as_secs_f64();
        let plan = plan_from_log(&parsed.entries, &TierAssignment::seeded(setup.seed), speed)
            .with_context(|| format!("failed to plan the replay of {}", log.display()))?;
        let description = format!(
            "{} ({} requests over {:.1} h, {} malformed lines skipped) at {speed:.0}x, \
             lasting {} s",
            log.display(),
            plan.len(),
            span / 3600.0,
            parsed.malformed.len(),
            setup.duration.as_secs()
        );
        Ok(Self {
            name: "replay",
            description,
            plan,
            duration: setup.duration,
        })
    }

    /// Returns the short name used in tables and file names.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Returns one sentence on what the workload sends.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Returns the planned requests, ordered by send time.
    pub fn plan(&self) -> &[PlannedRequest] {
        &self.plan
    }

    /// Returns how long the workload lasts.
    pub fn duration(&self) -> Duration {
        self.duration
    }
}

/// Returns the name `plan_synthetic` gives customer `index`.
pub fn synthetic_customer(index: usize) -> String {
    format!("synthetic-{index:04}")
}
