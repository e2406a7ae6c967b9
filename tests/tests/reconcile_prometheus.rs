//! Reconciliation against the usage a real Prometheus server scraped from
//! the sidecar's `veo_customer_usage_total` series: equal to the ledger
//! while nothing is lost, and drift above 1% once ledger rows are lost.
//! An erased customer's series leave the metrics. Usage goes straight to
//! the sync API, without Envoy.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use veo_proto::admin::{EraseCustomerRequest, ReconcileReport, ReconcileRequest};
use veo_tests::artifacts;
use veo_tests::client::HttpClient;
use veo_tests::prometheus::{JOB, PrometheusServer, free_address};
use veo_tests::sidecar::{Sidecar, unix_seconds};
use veo_tests::stack::temp_dir;
use veo_tests::sync_api::{minute_ago, send_batch, usage_record};

async fn reconcile(sidecar: &Sidecar, start: i64, end: i64) -> anyhow::Result<ReconcileReport> {
    Ok(sidecar
        .admin()
        .await?
        .reconcile(ReconcileRequest {
            start_unix_s: start,
            end_unix_s: end,
            correct: false,
        })
        .await
        .context("Reconcile")?
        .into_inner())
}

/// Returns (ledger, Prometheus, Prometheus drift) per customer and meter.
fn columns(report: &ReconcileReport) -> BTreeMap<(String, String), (u64, Option<u64>, f64)> {
    report
        .rows
        .iter()
        .map(|row| {
            (
                (row.customer.clone(), row.meter.clone()),
                (row.ledger_value, row.metrics_value, row.metrics_drift_ratio),
            )
        })
        .collect()
}

/// Proves reconciliation reads the scraped per-customer usage and reports the ledger's losses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_usage_matches_ledger_then_shows_loss() -> anyhow::Result<()> {
    // The range ends at the next minute, which must come after the last
    // scrape the test waits for: start early in a minute.
    let into_minute = unix_seconds() % 60;
    if into_minute > 20 {
        let wait = u64::try_from(61 - into_minute)?;
        tokio::time::sleep(Duration::from_secs(wait)).await;
    }
    let dir = temp_dir()?;
    let prometheus_address = free_address()?;
    let config = format!(
        "[billing]\nregion = \"test\"\nreconcile_interval_seconds = 0\nsummary_settle_seconds = 0\n\
         customer_usage_metrics = true\nprometheus_url = \"http://{prometheus_address}\"\n"
    );
    let mut sidecar = Sidecar::start_with_config(dir.path(), &config).await?;
    let prometheus =
        PrometheusServer::start(dir.path(), prometheus_address, &[sidecar.http_address()]).await?;
    let up = format!("up{{job=\"{JOB}\"}}");
    let scraped = prometheus
        .await_value(&up, 1.0, Duration::from_secs(20))
        .await?;
    assert_eq!(scraped, [1.0], "Prometheus log:\n{}", prometheus.log());

    let (earlier, later) = (minute_ago(3), minute_ago(2));
    send_batch(
        &sidecar,
        "prometheus-test",
        1,
        vec![
            usage_record("ann", earlier, 40, 4_000),
            usage_record("bob", later, 7, 0),
        ],
    )
    .await?;
    send_batch(
        &sidecar,
        "prometheus-test",
        2,
        vec![usage_record("ann", later, 5, 500)],
    )
    .await?;
    let total = "sum(veo_customer_usage_total{meter=\"api_requests\"})";
    let seen = prometheus
        .await_value(total, 52.0, Duration::from_secs(20))
        .await?;
    assert_eq!(seen, [52.0], "Prometheus never scraped the usage");

    // The range covers the usage's minutes and the scrapes that saw it.
    let (start, end) = (minute_ago(5), minute_ago(-1));
    let report = reconcile(&sidecar, start, end).await?;
    let expected = BTreeMap::from([
        (("ann".into(), "api_requests".into()), (45, Some(45), 0.0)),
        (
            ("ann".into(), "egress_bytes".into()),
            (4_500, Some(4_500), 0.0),
        ),
        (("bob".into(), "api_requests".into()), (7, Some(7), 0.0)),
    ]);
    // bob sent no bytes, so neither the ledger nor Prometheus has a row.
    assert_eq!(columns(&report), expected, "{report:?}");
    assert_eq!(report.metrics_error, "");

    // A store restored from a backup taken before the second batch lost
    // ann's later minute; Prometheus still has it, across the restart that
    // sets the counters back to 0.
    sidecar.stop();
    let store = sidecar.data_dir().join("usage.sqlite3");
    let conn = rusqlite::Connection::open(&store)?;
    let removed = conn.execute(
        "DELETE FROM usage_minute WHERE minute_unix_s = ?1 AND admitted = 5",
        [later],
    )?;
    assert_eq!(removed, 1);
    drop(conn);
    sidecar.restart().await?;
    send_batch(
        &sidecar,
        "prometheus-test",
        3,
        vec![usage_record("bob", later, 1, 0)],
    )
    .await?;
    let seen = prometheus
        .await_value(total, 1.0, Duration::from_secs(20))
        .await?;
    assert_eq!(
        seen,
        [1.0],
        "Prometheus never scraped the restarted sidecar"
    );

    let report = reconcile(&sidecar, start, end).await?;
    let rows = columns(&report);
    assert_eq!(rows[&("ann".into(), "api_requests".into())].0, 40);
    assert_eq!(rows[&("ann".into(), "api_requests".into())].1, Some(45));
    assert!((rows[&("ann".into(), "api_requests".into())].2 + 0.125).abs() < 1e-9);
    assert_eq!(
        rows[&("bob".into(), "api_requests".into())],
        (8, Some(8), 0.0)
    );
    assert!(report.max_drift_ratio > 0.01, "{report:?}");

    // The operator command prints the Prometheus column and the alert.
    let output = std::process::Command::new(artifacts::sidecar_binary()?)
        .args(["reconcile", "--sidecar", &sidecar.address().to_string()])
        .args(["--start", &start.to_string(), "--end", &end.to_string()])
        .output()?;
    let table = String::from_utf8_lossy(&output.stdout);
    println!("{table}");
    assert!(output.status.success(), "{table}");
    assert!(table.contains("prometheus"), "{table}");
    assert!(table.contains("ALERT: drift above 1%"), "{table}");

    // Erasing bob, the only customer with usage since the restart, takes
    // its series out of the scraped metrics, and its samples that
    // Prometheus keeps raise no drift once its ledger rows are gone.
    let metrics = HttpClient::new(sidecar.http_address());
    let series_lines = |text: &str| {
        text.lines()
            .filter(|line| line.starts_with("veo_customer_usage_total{"))
            .count()
    };
    let before = metrics.get("/metrics", &[]).await?.body;
    assert_eq!(series_lines(&before), 1, "{before}");
    sidecar
        .admin()
        .await?
        .erase_customer(EraseCustomerRequest {
            customer: "bob".into(),
            ..Default::default()
        })
        .await
        .context("EraseCustomer")?;
    let after = metrics.get("/metrics", &[]).await?.body;
    assert_eq!(series_lines(&after), 0, "{after}");
    let report = reconcile(&sidecar, start, end).await?;
    assert!(
        report.rows.iter().all(|row| row.customer == "ann"),
        "{report:?}"
    );

    // Without Prometheus, reconciliation still compares with what was sent
    // and reports why the column is empty.
    drop(prometheus);
    let report = reconcile(&sidecar, start, end).await?;
    assert!(
        report
            .metrics_error
            .contains("failed to read veo_customer_usage_total"),
        "{report:?}"
    );
    assert!(report.rows.iter().all(|row| row.metrics_value.is_none()));
    assert_eq!(report.rows.len(), 2, "{report:?}");
    Ok(())
}
