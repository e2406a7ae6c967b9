//! SVG plots of the requests admitted within the rolling window, against the quota, over the
//! run: one panel per plotted customer and one line per fleet size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;
use veo_bench::decisions::Decision;

use crate::run::RunResult;
use crate::setup::Setup;
use crate::workload::{Workload, synthetic_customer};

/// Time between two points of a line, in seconds.
const STEP_SECONDS: f64 = 0.1;

/// Size of one panel, in pixels.
const PANEL_SIZE: (u32, u32) = (960, 360);

/// A customer whose admissions are plotted.
struct Plotted {
    customer: String,
    tier: String,
    quota: u64,
}

/// Writes `out/admitted-WORKLOAD.svg` for the runs of `workload` in `results` and returns
/// its path.
pub fn write_admitted_plot(
    out: &Path,
    setup: &Setup,
    workload: &Workload,
    results: &[RunResult],
) -> anyhow::Result<PathBuf> {
    let path = out.join(format!("admitted-{}.svg", workload.name()));
    let runs: Vec<&RunResult> = results
        .iter()
        .filter(|result| result.workload == workload.name())
        .collect();
    let plotted = plotted_customers(setup, workload);
    draw(&path, setup, workload, &runs, &plotted)
        .with_context(|| format!("failed to draw the plot {}", path.display()))?;
    Ok(path)
}

fn draw(
    path: &Path,
    setup: &Setup,
    workload: &Workload,
    runs: &[&RunResult],
    plotted: &[Plotted],
) -> anyhow::Result<()> {
    let panels = u32::try_from(plotted.len().max(1)).unwrap_or(1);
    let root = SVGBackend::new(path, (PANEL_SIZE.0, PANEL_SIZE.1 * panels)).into_drawing_area();
    root.fill(&WHITE)?;
    let window = setup.window_seconds as f64;
    let end = runs
        .iter()
        .flat_map(|run| run.decisions.last())
        .map(|decision| decision.t)
        .fold(workload.duration().as_secs_f64(), f64::max);

    for (customer, area) in plotted
        .iter()
        .zip(root.split_evenly((plotted.len().max(1), 1)))
    {
        let lines: Vec<(usize, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|run| {
                let points = rolling_admitted(&run.decisions, &customer.customer, window, end);
                (run.instances, points)
            })
            .collect();
        let highest = lines
            .iter()
            .flat_map(|(_, points)| points.iter().map(|(_, y)| *y))
            .fold(customer.quota as f64, f64::max);

        let mut chart = ChartBuilder::on(&area)
            .caption(
                format!(
                    "{} ({}): requests admitted in the last {} s, {}",
                    customer.customer,
                    customer.tier,
                    setup.window_seconds,
                    workload.name()
                ),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..end, 0.0..highest * 1.15 + 1.0)?;
        chart
            .configure_mesh()
            .x_desc("seconds from the start of the replay")
            .y_desc("admitted requests")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;

        let quota = customer.quota as f64;
        chart
            .draw_series(LineSeries::new(
                [(0.0, quota), (end, quota)],
                BLACK.stroke_width(2),
            ))?
            .label(format!("quota {}", customer.quota))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        for (index, (instances, points)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(index).to_rgba();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(format!("{instances} instance(s)"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Returns the customers to plot. For the overload they are the first pro and the first basic
/// customer, and for the replay the customer of a tier with a quota that sent the most.
fn plotted_customers(setup: &Setup, workload: &Workload) -> Vec<Plotted> {
    let mut sent: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for request in workload.plan() {
        *sent
            .entry((request.customer.as_str(), request.tier.as_str()))
            .or_default() += 1;
    }
    let with_quota = |(customer, tier): (&str, &str)| {
        setup.quota_of(tier).map(|quota| Plotted {
            customer: customer.to_owned(),
            tier: tier.to_owned(),
            quota,
        })
    };

    let synthetic: Vec<String> = (0..2).map(synthetic_customer).collect();
    let chosen: Vec<Plotted> = sent
        .keys()
        .filter(|(customer, _)| synthetic.iter().any(|name| name == customer))
        .filter_map(|key| with_quota(*key))
        .collect();
    if !chosen.is_empty() {
        return chosen;
    }
    sent.iter()
        .filter(|((_, tier), _)| setup.quota_of(tier).is_some())
        .max_by_key(|(_, count)| **count)
        .and_then(|(key, _)| with_quota(*key))
        .into_iter()
        .collect()
}

/// Returns, every [`STEP_SECONDS`] from 0 to `end`, how many of `customer`'s requests were
/// admitted within the `window` seconds up to that time, by send time.
fn rolling_admitted(
    decisions: &[Decision],
    customer: &str,
    window: f64,
    end: f64,
) -> Vec<(f64, f64)> {
    let mut admitted: Vec<f64> = decisions
        .iter()
        .filter(|decision| decision.customer == customer && decision.is_admitted())
        .map(|decision| decision.t)
        .collect();
    admitted.sort_by(f64::total_cmp);

    let steps = (end / STEP_SECONDS).ceil() as usize;
    let mut points = Vec::with_capacity(steps + 1);
    let (mut first, mut last) = (0, 0);
    for step in 0..=steps {
        let time = step as f64 * STEP_SECONDS;
        while last < admitted.len() && admitted[last] <= time {
            last += 1;
        }
        while first < last && admitted[first] <= time - window {
            first += 1;
        }
        points.push((time, (last - first) as f64));
    }
    points
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(t: f64, customer: &str, status: u16) -> Decision {
        Decision {
            t,
            customer: customer.to_owned(),
            tier: "basic".to_owned(),
            status,
            latency_ms: None,
            lateness_ms: None,
            line: None,
            error: None,
            instance: None,
            filter_admitted: None,
        }
    }

    #[test]
    fn rolling_count_drops_admissions_older_than_the_window() {
        let decisions = [
            decision(0.05, "a", 200),
            decision(0.15, "a", 200),
            decision(0.15, "b", 200),
            decision(0.25, "a", 429),
        ];
        let points = rolling_admitted(&decisions, "a", 1.0, 1.2);
        let counts: Vec<f64> = points.iter().map(|(_, count)| *count).collect();
        assert_eq!(points.len(), 13);
        // At 0.0 none; from 0.1 one; from 0.2 two; from 1.1 the one at 0.05 has left.
        assert_eq!(counts[0], 0.0);
        assert_eq!(counts[1], 1.0);
        assert_eq!(counts[2], 2.0);
        assert_eq!(counts[10], 2.0);
        assert_eq!(counts[11], 1.0);
    }
}
