//! The operator commands of `veo-sidecar`: admin gRPC calls to a running
//! sidecar, printed as tables.

use std::fmt::Write as _;

use veo_proto::admin::admin_client::AdminClient;
use veo_proto::admin::{
    ListParkedMeterEventsRequest, ReconcileReport, ReconcileRequest, SetStripeCustomerRequest,
};

use crate::billing::reconcile::ALERT_DRIFT_RATIO;
use crate::cli::Command;
use crate::ledger::unix_now_s;

/// Errors of an operator command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The sidecar could not be reached.
    #[error("failed to connect to the sidecar at {url}; check --sidecar and that it runs")]
    Connect {
        /// The URL given.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The sidecar returned an error.
    #[error("the sidecar rejected the command: {0}")]
    Call(String),
}

/// Runs `command` and returns what to print.
pub async fn run(command: Command) -> Result<String, CommandError> {
    match command {
        Command::Reconcile {
            sidecar,
            start,
            end,
            correct,
        } => {
            let end = end.unwrap_or_else(|| unix_now_s() / 60 * 60);
            let start = start.unwrap_or(end - 86_400);
            let mut client = connect(&sidecar).await?;
            let report = client
                .reconcile(ReconcileRequest {
                    start_unix_s: start,
                    end_unix_s: end,
                    correct,
                })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            Ok(reconcile_table(&report, start, end))
        }
        Command::SetStripeCustomer {
            sidecar,
            customer,
            stripe_customer_id,
        } => {
            let mut client = connect(&sidecar).await?;
            let stored = client
                .set_stripe_customer(SetStripeCustomerRequest {
                    customer,
                    stripe_customer_id,
                })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            Ok(format!(
                "customer {} is billed to {}\n",
                stored.customer, stored.stripe_customer_id
            ))
        }
        Command::ParkedEvents { sidecar, limit } => {
            let mut client = connect(&sidecar).await?;
            let parked = client
                .list_parked_meter_events(ListParkedMeterEventsRequest { limit })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            let mut text = String::new();
            for event in &parked.events {
                let _ = writeln!(
                    text,
                    "{} customer={} meter={} minute={} value={}: {}",
                    event.identifier,
                    event.customer,
                    event.meter,
                    event.minute_unix_s,
                    event.value,
                    event.reason
                );
            }
            let _ = writeln!(text, "{} parked meter events", parked.events.len());
            Ok(text)
        }
    }
}

async fn connect(url: &str) -> Result<AdminClient<tonic::transport::Channel>, CommandError> {
    // The ready file contains a bare IP:PORT, so accept that form too.
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let url = url.as_str();
    AdminClient::connect(url.to_owned())
        .await
        .map_err(|source| CommandError::Connect {
            url: url.to_owned(),
            source,
        })
}

/// Formats a reconciliation as a table with one row per customer and
/// meter.
pub fn reconcile_table(report: &ReconcileReport, start: i64, end: i64) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "reconciliation of [{start}, {end})");
    let _ = writeln!(
        text,
        "{:<24} {:<14} {:>14} {:>14} {:>14} {:>9}",
        "customer", "meter", "ledger", "sent", "stripe", "drift"
    );
    for row in &report.rows {
        let stripe = row
            .stripe_value
            .map_or_else(|| "-".to_owned(), |value| value.to_string());
        let _ = writeln!(
            text,
            "{:<24} {:<14} {:>14} {:>14} {:>14} {:>8.3}%",
            row.customer,
            row.meter,
            row.ledger_value,
            row.sent_value,
            stripe,
            row.drift_ratio * 100.0
        );
    }
    let verdict = if report.max_drift_ratio > ALERT_DRIFT_RATIO {
        "ALERT: drift above 1%"
    } else {
        "within 1%"
    };
    let _ = writeln!(
        text,
        "max drift {:.3}% ({verdict}); corrective events queued: {}",
        report.max_drift_ratio * 100.0,
        report.corrective_events
    );
    text
}
