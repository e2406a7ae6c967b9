//! The results as a Markdown table with the setup above it, and the decisions files.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use veo_bench::decisions::write_decisions as write_decisions_file;

use crate::redis_stats::COUNTED_COMMANDS;
use crate::run::{RunResult, SYNC_BATCHES_STAT};
use crate::setup::Setup;
use crate::workload::Workload;

/// Writes `result`'s decisions to `out/decisions-N-WORKLOAD.jsonl` and returns the path.
pub fn write_decisions(out: &Path, result: &RunResult) -> anyhow::Result<PathBuf> {
    let path = out.join(format!(
        "decisions-{}-{}.jsonl",
        result.instances, result.workload
    ));
    write_decisions_file(&path, &result.decisions)
        .with_context(|| format!("failed to write the decisions of {}", path.display()))?;
    Ok(path)
}

/// Returns one line on `result` for the progress output.
pub fn one_line(result: &RunResult) -> String {
    format!(
        "  {} requests, {} admitted, over-admission max {} mean {}, false refusals {}, \
         {} errors",
        result.decisions.len(),
        result.admitted(),
        percent(result.accuracy.max_over_admission_percent()),
        optional_percent(result.accuracy.mean_over_admission_percent()),
        percent(result.accuracy.false_refusal_percent()),
        result.errors()
    )
}

/// Renders the setup, the table of every run and the details below it as Markdown.
pub fn render(setup: &Setup, workloads: &[Workload], results: &[RunResult]) -> String {
    let mut text = String::new();
    render_setup(&mut text, setup, workloads);
    render_table(&mut text, results);
    render_details(&mut text, results);
    text
}

fn render_setup(text: &mut String, setup: &Setup, workloads: &[Workload]) {
    let quota = |tier| setup.quota_of(tier).unwrap_or(0);
    let _ = writeln!(text, "# Accuracy of the global quota\n");
    let _ = writeln!(
        text,
        "- Counters: `{}`. Tiers: basic {} and pro {} requests per rolling {} s, enterprise a \
         token bucket (not checked).",
        setup.counters.name(),
        quota("basic"),
        quota("pro"),
        setup.window_seconds
    );
    let _ = writeln!(
        text,
        "- Each instance: Envoy with `--concurrency 1` and the filter, which sends its usage \
         every {} ms, and its own sidecar. Each request goes to an instance drawn at random \
         (seed {}).",
        setup.sync_interval_ms, setup.seed
    );
    for workload in workloads {
        let _ = writeln!(text, "- `{}`: {}.", workload.name(), workload.description());
    }
    let _ = writeln!(
        text,
        "- Oracle tolerance between send and decision: {} s.\n",
        setup.tolerance_seconds
    );
}

fn render_table(text: &mut String, results: &[RunResult]) {
    let _ = writeln!(
        text,
        "| instances | workload | requests | admitted | over-admission max | over-admission \
         mean | windows over quota | false refusals | Redis commands / admitted | sync calls/s \
         | errors | max lateness ms |"
    );
    let _ = writeln!(
        text,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for result in results {
        let accuracy = &result.accuracy;
        let _ = writeln!(
            text,
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {:.1} | {} | {:.0} |",
            result.instances,
            result.workload,
            result.decisions.len(),
            result.admitted(),
            percent(accuracy.max_over_admission_percent()),
            optional_percent(accuracy.mean_over_admission_percent()),
            accuracy.windows_over_quota_demand().count(),
            percent(accuracy.false_refusal_percent()),
            accuracy.false_refusals,
            result
                .redis_commands_per_admitted()
                .map_or_else(|| "-".to_owned(), |ratio| format!("{ratio:.3}")),
            result.sync_calls_per_second(),
            result.errors(),
            result.max_lateness.as_secs_f64() * 1000.0,
        );
    }
}

fn render_details(text: &mut String, results: &[RunResult]) {
    let _ = writeln!(
        text,
        "\nOver-admission: per customer and tumbling window of the quota's length, the most \
         requests admitted within one rolling window ending there beyond the quota, in percent \
         of the quota; the mean covers the windows where the customer sent more than its \
         quota. False refusals: 429s while fewer than the quota were admitted in the window \
         before, in percent of the admitted and refused requests of tiers with a quota. Redis \
         commands: calls of {} from `INFO commandstats`, all clients together; the commands \
         that scripts run inside Redis are left out. Sync calls: \
         `{SYNC_BATCHES_STAT}` summed over the Envoys, per second of the run.\n",
        COUNTED_COMMANDS.join(", ")
    );
    for result in results {
        let worst = result.accuracy.worst_window().map_or_else(
            || "no window over its quota".to_owned(),
            |window| {
                format!(
                    "worst window {} ({}) from t={:.0} s: {} admitted of {}",
                    window.customer, window.tier, window.start, window.peak_admitted, window.quota
                )
            },
        );
        let _ = writeln!(
            text,
            "- {} instance(s), {}: {worst}. Redis commands counted: {}. Other commands, those \
             that scripts run included: {} ({}).",
            result.instances,
            result.workload,
            result.redis_commands.counted_breakdown(),
            result.redis_commands.other(),
            result.redis_commands.other_breakdown()
        );
    }
}

fn percent(value: f64) -> String {
    format!("{value:.1}%")
}

fn optional_percent(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), percent)
}
