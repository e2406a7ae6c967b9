//! Reconciliation: the ledger, the events sent and Stripe's meter event
//! summaries per customer and meter over a time range, with corrective
//! events for usage Stripe is missing.

use std::collections::{BTreeMap, BTreeSet};

use stripe_billing::billing_meter::ListBillingMeter;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;
use tracing::{error, info, warn};

use super::biller::{Biller, MAX_EVENT_AGE_S};
use super::customers;
use super::meter::{EventKey, Meter};
use super::queue::{self, Totals};
use crate::ledger::{MINUTE_SECONDS, TimeRange, unix_now_s};
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Drift above which reconciliation raises an alert: 1%.
pub const ALERT_DRIFT_RATIO: f64 = 0.01;

/// One customer and meter of a reconciliation.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Customer.
    pub customer: String,
    /// Meter.
    pub meter: Meter,
    /// Usage in the ledger.
    pub ledger: i64,
    /// Usage in events sent, corrections included.
    pub sent: i64,
    /// Usage in Stripe's summary; `None` without Stripe or without a
    /// Stripe customer.
    pub stripe: Option<i64>,
    /// `(ledger - stripe) / ledger`, or against `sent` without Stripe.
    pub drift_ratio: f64,
}

/// Result of a reconciliation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Rows in customer and meter order.
    pub rows: Vec<Row>,
    /// Largest absolute drift of any row.
    pub max_drift_ratio: f64,
    /// Corrective events queued.
    pub corrective_events: u64,
}

/// Errors of a reconciliation.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stripe failed to list meters or summaries.
    #[error("failed to read {what} from Stripe; check the key and retry")]
    Stripe {
        /// What was being read.
        what: String,
        /// Stripe's error.
        #[source]
        source: stripe::StripeError,
    },
    /// No Stripe meter has the configured event name.
    #[error(
        "no Stripe meter has the event name {event_name:?}; create it or fix billing.meter_event_names"
    )]
    UnknownMeter {
        /// The configured event name.
        event_name: String,
    },
}

/// Reconciles `range` and, with `correct`, queues corrective events for
/// usage that was sent but that Stripe's summaries lack.
///
/// Stripe aggregates meter events asynchronously, so reconcile ranges that
/// closed some minutes ago. Usage still in the queue shows as drift but is
/// never corrected: the correction covers only events already sent. A
/// corrective event's identifier is tied to the range and the value Stripe
/// reported, so running again before Stripe counts the correction queues
/// nothing new.
pub async fn reconcile(
    biller: &Biller,
    metrics: &Metrics,
    range: TimeRange,
    correct: bool,
) -> Result<Report, ReconcileError> {
    let store = biller.store();
    let ledger = store
        .read("sum the ledger", move |conn| {
            queue::ledger_totals(conn, range)
        })
        .await?;
    let sent = store
        .read("sum sent meter events", move |conn| {
            queue::sent_totals(conn, range)
        })
        .await?;
    let billed = store
        .read("sum billed meter events", move |conn| {
            billed_totals(conn, range)
        })
        .await?;
    let stripe_customers: BTreeMap<String, String> = store
        .read("list Stripe customers", |conn| customers::all(conn))
        .await?
        .into_iter()
        .collect();

    let keys: BTreeSet<(String, Meter)> = ledger.keys().chain(sent.keys()).cloned().collect();
    let stripe = match biller.stripe() {
        Some(sink) => Some(stripe_values(sink, &keys, &stripe_customers, range).await?),
        None => None,
    };

    let mut report = Report::default();
    for (customer, meter) in keys {
        let key = (customer.clone(), meter);
        let ledger_value = ledger.get(&key).copied().unwrap_or(0);
        let sent_value = sent.get(&key).copied().unwrap_or(0);
        let stripe_value = stripe.as_ref().and_then(|values| values.get(&key).copied());
        let compared = match (&stripe, stripe_value) {
            (Some(_), Some(value)) => value,
            (Some(_), None) => 0,
            (None, _) => sent_value,
        };
        let drift_ratio = if ledger_value == 0 {
            0.0
        } else {
            (ledger_value - compared) as f64 / ledger_value as f64
        };
        report.max_drift_ratio = report.max_drift_ratio.max(drift_ratio.abs());

        if correct && let Some(stripe_value) = stripe_value {
            let expected = billed.get(&key).copied().unwrap_or(0);
            let missing = expected - stripe_value;
            if missing > 0
                && queue_correction(biller, &customer, meter, range, stripe_value, missing).await?
            {
                report.corrective_events += 1;
            }
        }
        report.rows.push(Row {
            customer,
            meter,
            ledger: ledger_value,
            sent: sent_value,
            stripe: stripe_value,
            drift_ratio,
        });
    }

    metrics.billing_drift_ratio.set(report.max_drift_ratio);
    if report.max_drift_ratio > ALERT_DRIFT_RATIO {
        metrics.billing_drift_alerts.inc();
        error!(
            start_unix_s = range.start_unix_s,
            end_unix_s = range.end_unix_s,
            max_drift_ratio = report.max_drift_ratio,
            corrective_events = report.corrective_events,
            "billing drift above 1% between the ledger and Stripe; see the reconciliation report"
        );
    } else {
        info!(
            start_unix_s = range.start_unix_s,
            end_unix_s = range.end_unix_s,
            rows = report.rows.len(),
            max_drift_ratio = report.max_drift_ratio,
            "reconciliation finished"
        );
    }
    if report.corrective_events > 0 {
        biller.waker().notify_one();
    }
    Ok(report)
}

/// Sums the events sent for closed buckets, without corrections: what
/// Stripe should have from the normal flow.
fn billed_totals(conn: &rusqlite::Connection, range: TimeRange) -> rusqlite::Result<Totals> {
    let mut statement = conn.prepare_cached(
        "SELECT customer, meter, SUM(value) FROM meter_event
         WHERE state = 'sent' AND correction = 0 AND minute_unix_s >= ?1 AND minute_unix_s < ?2
         GROUP BY customer, meter",
    )?;
    let rows = statement.query_map([range.start_unix_s, range.end_unix_s], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })?;
    let mut totals = Totals::new();
    for row in rows {
        let (customer, meter, value) = row?;
        if let Some(meter) = Meter::from_name(&meter) {
            totals.insert((customer, meter), value);
        }
    }
    Ok(totals)
}

async fn queue_correction(
    biller: &Biller,
    customer: &str,
    meter: Meter,
    range: TimeRange,
    stripe_value: i64,
    missing: i64,
) -> Result<bool, ReconcileError> {
    // The event falls in the range's last minute, so Stripe counts it in
    // the same period; Stripe takes no timestamp older than 35 days.
    let minute = range.end_unix_s - MINUTE_SECONDS;
    let now = unix_now_s();
    if minute < now - MAX_EVENT_AGE_S {
        warn!(
            customer,
            meter = meter.name(),
            missing,
            "usage missing in Stripe is older than 35 days; bill it by hand"
        );
        return Ok(false);
    }
    let tie = format!("{}-{}-{stripe_value}", range.start_unix_s, range.end_unix_s);
    let ledger = biller.ledger().clone();
    let customer = customer.to_owned();
    let queued = biller
        .store()
        .write("queue a corrective meter event", move |conn| {
            let key = EventKey {
                region: &ledger.region,
                ledger_id: &ledger.ledger_id,
                customer: &customer,
                meter,
                minute_unix_s: minute,
                part: 0,
                correction: &tie,
            };
            queue::queue_correction(conn, &key, missing, now)
        })
        .await?;
    Ok(queued)
}

/// Reads Stripe's summary for every key whose customer has a Stripe
/// customer.
async fn stripe_values(
    sink: &super::sink::StripeSink,
    keys: &BTreeSet<(String, Meter)>,
    stripe_customers: &BTreeMap<String, String>,
    range: TimeRange,
) -> Result<Totals, ReconcileError> {
    let meter_ids = meter_ids(sink).await?;
    let mut values = Totals::new();
    for (customer, meter) in keys {
        let Some(stripe_customer) = stripe_customers.get(customer) else {
            continue;
        };
        let event_name = sink.names().event_name(*meter);
        let Some(meter_id) = meter_ids.get(event_name) else {
            return Err(ReconcileError::UnknownMeter {
                event_name: event_name.to_owned(),
            });
        };
        let list = ListIdBillingMeterEventSummary::new(
            meter_id.as_str(),
            stripe_customer.as_str(),
            range.end_unix_s,
            range.start_unix_s,
        )
        .send(sink.client())
        .await
        .map_err(|source| ReconcileError::Stripe {
            what: format!("the {event_name} summary of {stripe_customer}"),
            source,
        })?;
        let total: f64 = list
            .data
            .iter()
            .map(|summary| summary.aggregated_value)
            .sum();
        values.insert((customer.clone(), *meter), total.round() as i64);
    }
    Ok(values)
}

/// Maps each Stripe meter's event name to its id.
async fn meter_ids(
    sink: &super::sink::StripeSink,
) -> Result<BTreeMap<String, String>, ReconcileError> {
    let list = ListBillingMeter::new()
        .limit(100)
        .send(sink.client())
        .await
        .map_err(|source| ReconcileError::Stripe {
            what: "the list of meters".into(),
            source,
        })?;
    Ok(list
        .data
        .into_iter()
        .map(|meter| (meter.event_name, meter.id.to_string()))
        .collect())
}
