//! Reconciliation: the ledger, the events sent, Stripe's meter event
//! summaries and, when a Prometheus server is configured, the exported
//! per-customer usage, per customer and meter over a time range, with
//! corrective events for usage Stripe is missing.

use std::collections::{BTreeMap, BTreeSet};

use stripe_billing::billing_meter::ListBillingMeter;
use stripe_billing::billing_meter_event_summary::{
    ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
};
use tracing::{error, info, warn};

use super::biller::{Biller, MAX_EVENT_AGE_S};
use super::meter::{EventKey, Meter};
use super::prometheus;
use super::queue::{self, Totals};
use crate::ledger::{MINUTE_SECONDS, TimeRange, unix_now_s};
use crate::metrics::Metrics;
use crate::privacy::to_sql;
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
    /// Usage in the exported `veo_customer_usage_total` series as
    /// Prometheus recorded it; `None` without `billing.prometheus_url`.
    pub metrics: Option<i64>,
    /// `(ledger - metrics) / ledger`; -1 when only Prometheus has usage,
    /// and 0 without Prometheus.
    pub metrics_drift_ratio: f64,
}

/// Result of a reconciliation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Rows in customer and meter order.
    pub rows: Vec<Row>,
    /// Largest absolute drift of any row, against Stripe (or the events
    /// sent) and against Prometheus.
    pub max_drift_ratio: f64,
    /// Corrective events queued.
    pub corrective_events: u64,
    /// Reason the Prometheus column is empty although
    /// `billing.prometheus_url` is set.
    pub metrics_error: Option<String>,
    /// Stripe's errors for the Stripe customers whose summaries could not
    /// be read. Their rows compare with the events sent instead, and their
    /// hours are not corrected.
    pub stripe_errors: Vec<String>,
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
        /// The data that was being read.
        what: String,
        /// Stripe's error.
        #[source]
        source: stripe::StripeError,
    },
    /// Stripe returned the summaries of none of the Stripe customers.
    #[error(
        "failed to read any meter event summaries from Stripe; check the key and the network, \
         then retry. First failure: {first}"
    )]
    NoSummaries {
        /// The first failure.
        first: String,
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

/// Seconds in one hour, the unit corrections are computed in.
const HOUR_SECONDS: i64 = 3_600;

/// Reconciles `range` and, with `correct`, queues corrective events for
/// usage that was sent but that Stripe's summaries lack.
///
/// The report covers `range`. Corrections are computed per UTC hour, over
/// the whole hours that cover the range, and per Stripe customer the usage
/// was sent to, so overlapping ranges and a customer moved to another
/// Stripe customer agree on what is missing. For each hour, the corrective
/// event carries `sent - stripe` and falls within that hour. Its
/// identifier is tied to the hour and the value Stripe reported. Stripe
/// aggregates meter events asynchronously, so an hour with a correction
/// that is queued, or with any event sent within the last
/// `billing.summary_settle_seconds` (10 minutes by default), is left alone
/// while Stripe catches up.
/// Usage still waiting in the queue shows as drift but is never corrected,
/// because it is on its way. A Stripe customer whose summaries Stripe does
/// not return is reported in [`Report::stripe_errors`] and skipped.
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
    let destinations = store
        .read("list the Stripe customers billed", move |conn| {
            billed_stripe_customers(conn, range)
        })
        .await?;

    let mut metrics_error = None;
    let exported = match biller.prometheus_url() {
        Some(url) => match prometheus::usage(url, &biller.ledger().ledger_id, range).await {
            Ok(usage) => Some(known_customers(biller, usage, &ledger, &sent).await?),
            Err(err) => {
                // The comparison with Stripe and its corrections go on.
                warn!(error = %err, "reconciliation goes on without the Prometheus column");
                metrics_error = Some(err.to_string());
                None
            }
        },
        None => None,
    };

    let keys: BTreeSet<(String, Meter)> = ledger
        .keys()
        .chain(sent.keys())
        .chain(exported.iter().flat_map(BTreeMap::keys))
        .cloned()
        .collect();
    let stripe = match biller.stripe() {
        Some(sink) => {
            let pseudonyms = destinations.values().flatten().cloned().collect();
            let stripe_ids = reveal_stripe_ids(biller, pseudonyms).await?;
            let billed_to = BilledTo {
                destinations: &destinations,
                stripe_ids: &stripe_ids,
            };
            Some(stripe_values(sink, &keys, &billed_to, range).await?)
        }
        None => None,
    };
    let (stripe, unread, mut stripe_errors) = match stripe {
        Some(read) => (Some(read.values), read.unread, read.errors),
        None => (None, BTreeSet::new(), Vec::new()),
    };
    if let Some(first) = stripe_errors.first()
        && stripe.as_ref().is_some_and(BTreeMap::is_empty)
    {
        // Not one Stripe customer could be read: a key or network
        // problem rather than one customer's.
        return Err(ReconcileError::NoSummaries {
            first: first.clone(),
        });
    }

    let mut report = Report {
        metrics_error,
        ..Report::default()
    };
    for (customer, meter) in keys {
        let key = (customer.clone(), meter);
        let ledger_value = ledger.get(&key).copied().unwrap_or(0);
        let sent_value = sent.get(&key).copied().unwrap_or(0);
        let stripe_value = stripe.as_ref().and_then(|values| values.get(&key).copied());
        let compared = match (&stripe, stripe_value) {
            (Some(_), Some(value)) => value,
            (Some(_), None) if unread.contains(&key) => sent_value,
            (Some(_), None) => 0,
            (None, _) => sent_value,
        };
        let drift_ratio = if ledger_value == 0 {
            0.0
        } else {
            (ledger_value - compared) as f64 / ledger_value as f64
        };
        let metrics_value = exported
            .as_ref()
            .map(|values| values.get(&key).copied().unwrap_or(0));
        let metrics_drift_ratio = match metrics_value {
            None | Some(0) if ledger_value == 0 => 0.0,
            Some(_) if ledger_value == 0 => -1.0,
            Some(value) => (ledger_value - value) as f64 / ledger_value as f64,
            None => 0.0,
        };
        report.max_drift_ratio = report
            .max_drift_ratio
            .max(drift_ratio.abs())
            .max(metrics_drift_ratio.abs());
        report.rows.push(Row {
            customer,
            meter,
            ledger: ledger_value,
            sent: sent_value,
            stripe: stripe_value,
            drift_ratio,
            metrics: metrics_value,
            metrics_drift_ratio,
        });
    }

    if correct && let Some(sink) = biller.stripe() {
        let (queued, errors) = correct_hours(biller, sink, range).await?;
        report.corrective_events = queued;
        for error in errors {
            if !stripe_errors.contains(&error) {
                stripe_errors.push(error);
            }
        }
    }
    if !stripe_errors.is_empty() {
        error!(
            stripe_customers = stripe_errors.len(),
            "reconciliation read no summaries for some Stripe customers; their rows compare the \
             ledger with the events sent, see the report"
        );
    }
    report.stripe_errors = stripe_errors;

    metrics.billing_drift_ratio.set(report.max_drift_ratio);
    if report.max_drift_ratio > ALERT_DRIFT_RATIO {
        metrics.billing_drift_alerts.inc();
        let billed = if biller.stripe().is_some() {
            "Stripe"
        } else {
            "the meter events sent"
        };
        let exported = if biller.prometheus_url().is_some() {
            " or Prometheus"
        } else {
            ""
        };
        error!(
            start_unix_s = range.start_unix_s,
            end_unix_s = range.end_unix_s,
            max_drift_ratio = report.max_drift_ratio,
            corrective_events = report.corrective_events,
            "billing drift above 1% between the ledger and {billed}{exported}; see the \
             reconciliation report"
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

/// Drops from `exported` the series that neither the ledger nor the events
/// sent know and whose customer has no identity: an erasure deleted the
/// customer's rows and identity, while Prometheus keeps its samples.
async fn known_customers(
    biller: &Biller,
    exported: prometheus::Usage,
    ledger: &BTreeMap<(String, Meter), i64>,
    sent: &BTreeMap<(String, Meter), i64>,
) -> Result<prometheus::Usage, StoreError> {
    let unknown: BTreeSet<String> = exported
        .keys()
        .filter(|key| !ledger.contains_key(*key) && !sent.contains_key(*key))
        .map(|(customer, _)| customer.clone())
        .collect();
    let erased = biller
        .store()
        .read("find customers without an identity", move |conn| {
            let mut statement =
                conn.prepare_cached("SELECT 1 FROM customer_identity WHERE pseudonym = ?1")?;
            let mut erased = BTreeSet::new();
            for pseudonym in unknown {
                if !statement.exists([&pseudonym])? {
                    erased.insert(pseudonym);
                }
            }
            Ok(erased)
        })
        .await?;
    Ok(exported
        .into_iter()
        .filter(|((customer, _), _)| !erased.contains(customer))
        .collect())
}

/// Usage sent per customer, Stripe customer pseudonym, meter and hour.
type HourlyTotals = BTreeMap<(String, String, Meter, i64), i64>;

/// Reads the Stripe customer id of each pseudonym in `pseudonyms` from its
/// encrypted identity. A pseudonym without a readable identity is left out
/// with a warning: its usage cannot be looked up in Stripe.
async fn reveal_stripe_ids(
    biller: &Biller,
    pseudonyms: BTreeSet<String>,
) -> Result<BTreeMap<String, String>, StoreError> {
    let identities = biller.store().identities().clone();
    biller
        .store()
        .read("read the Stripe customers billed", move |conn| {
            let mut ids = BTreeMap::new();
            for pseudonym in pseudonyms {
                match identities.reveal_stripe(conn, &pseudonym).map_err(to_sql)? {
                    Some(id) => {
                        ids.insert(pseudonym, id);
                    }
                    None => warn!(
                        stripe_pseudonym = pseudonym,
                        "failed to read the id of a Stripe customer that usage was billed to, so \
                         it is left out of the comparison. Check stripe_identity and the key file"
                    ),
                }
            }
            Ok(ids)
        })
        .await
}

/// The Stripe customers each customer's usage was sent to, by pseudonym,
/// and the id of each pseudonym.
struct BilledTo<'a> {
    destinations: &'a BTreeMap<String, BTreeSet<String>>,
    stripe_ids: &'a BTreeMap<String, String>,
}

/// Returns the pseudonyms of the Stripe customers each customer's usage in
/// `range` was sent to.
fn billed_stripe_customers(
    conn: &rusqlite::Connection,
    range: TimeRange,
) -> rusqlite::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut statement = conn.prepare_cached(
        "SELECT DISTINCT customer, stripe_pseudonym FROM meter_event
         WHERE state = 'sent' AND stripe_pseudonym IS NOT NULL
             AND minute_unix_s >= ?1 AND minute_unix_s < ?2",
    )?;
    let rows = statement.query_map([range.start_unix_s, range.end_unix_s], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
    })?;
    let mut destinations: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let (customer, stripe_customer) = row?;
        destinations
            .entry(customer)
            .or_default()
            .insert(stripe_customer);
    }
    Ok(destinations)
}

/// Sums the events of the normal flow sent within `hours`, per customer,
/// Stripe customer, meter and hour: what Stripe should hold.
fn billed_by_hour(conn: &rusqlite::Connection, hours: TimeRange) -> rusqlite::Result<HourlyTotals> {
    let mut statement = conn.prepare_cached(
        "SELECT customer, stripe_pseudonym, meter, minute_unix_s / 3600 * 3600, TOTAL(value)
         FROM meter_event
         WHERE state = 'sent' AND correction = 0 AND stripe_pseudonym IS NOT NULL
             AND minute_unix_s >= ?1 AND minute_unix_s < ?2
         GROUP BY 1, 2, 3, 4",
    )?;
    let rows = statement.query_map([hours.start_unix_s, hours.end_unix_s], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, i64>(3)?,
            queue::saturating(row.get(4)?),
        ))
    })?;
    let mut totals = HourlyTotals::new();
    for row in rows {
        let (customer, stripe_customer, meter, hour, value) = row?;
        if let Some(meter) = Meter::from_name(&meter) {
            totals.insert((customer, stripe_customer, meter, hour), value);
        }
    }
    Ok(totals)
}

/// Returns the (customer, Stripe customer, meter, hour) keys with a
/// correction that is queued, or with any event sent within the settle
/// time.
fn unsettled_hours(
    conn: &rusqlite::Connection,
    hours: TimeRange,
    settled_before_unix_s: i64,
) -> rusqlite::Result<BTreeSet<(String, String, Meter, i64)>> {
    let mut statement = conn.prepare_cached(
        "SELECT DISTINCT customer, COALESCE(stripe_pseudonym, ''), meter,
                minute_unix_s / 3600 * 3600
         FROM meter_event
         WHERE minute_unix_s >= ?1 AND minute_unix_s < ?2
             AND ((correction = 1 AND state = 'pending')
                 OR (state = 'sent' AND sent_unix_s > ?3))",
    )?;
    let rows = statement.query_map(
        [hours.start_unix_s, hours.end_unix_s, settled_before_unix_s],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
            ))
        },
    )?;
    let mut keys = BTreeSet::new();
    for row in rows {
        let (customer, stripe_customer, meter, hour) = row?;
        if let Some(meter) = Meter::from_name(&meter) {
            keys.insert((customer, stripe_customer, meter, hour));
        }
    }
    Ok(keys)
}

/// Queues one corrective event per hour, Stripe customer and meter whose
/// Stripe summary is below what was sent; returns how many, and the errors
/// of the Stripe customers whose summaries could not be read.
async fn correct_hours(
    biller: &Biller,
    sink: &super::sink::StripeSink,
    range: TimeRange,
) -> Result<(u64, Vec<String>), ReconcileError> {
    let hours = TimeRange {
        start_unix_s: range.start_unix_s.div_euclid(HOUR_SECONDS) * HOUR_SECONDS,
        end_unix_s: (range.end_unix_s + HOUR_SECONDS - 1).div_euclid(HOUR_SECONDS) * HOUR_SECONDS,
    };
    let now = unix_now_s();
    let settle_s = biller.summary_settle_s();
    let store = biller.store();
    let billed = store
        .read("sum billed meter events per hour", move |conn| {
            billed_by_hour(conn, hours)
        })
        .await?;
    let unsettled = store
        .read("list unsettled hours", move |conn| {
            unsettled_hours(conn, hours, now - settle_s)
        })
        .await?;
    let meter_ids = meter_ids(sink).await?;

    let targets: BTreeSet<(String, String, Meter)> = billed
        .keys()
        .map(|(customer, stripe_pseudonym, meter, _)| {
            (customer.clone(), stripe_pseudonym.clone(), *meter)
        })
        .collect();
    let pseudonyms = targets.iter().map(|(_, pseudonym, _)| pseudonym.clone());
    let stripe_ids = reveal_stripe_ids(biller, pseudonyms.collect()).await?;
    let mut queued = 0;
    let mut errors = Vec::new();
    let mut unsettled_short = 0u64;
    for (customer, stripe_pseudonym, meter) in targets {
        let Some(stripe_customer) = stripe_ids.get(&stripe_pseudonym) else {
            continue;
        };
        let event_name = sink.names().event_name(meter);
        let Some(meter_id) = meter_ids.get(event_name) else {
            return Err(ReconcileError::UnknownMeter {
                event_name: event_name.to_owned(),
            });
        };
        let summaries = ListIdBillingMeterEventSummary::new(
            meter_id.as_str(),
            stripe_customer.as_str(),
            hours.end_unix_s,
            hours.start_unix_s,
        )
        .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Hour)
        .limit(100)
        .send(sink.client())
        .await;
        let summaries = match summaries {
            Ok(summaries) => summaries,
            Err(err) => {
                errors.push(summary_error(
                    &stripe_pseudonym,
                    stripe_customer,
                    event_name,
                    &err,
                ));
                continue;
            }
        };
        let mut in_stripe: BTreeMap<i64, i64> = BTreeMap::new();
        for summary in &summaries.data {
            *in_stripe.entry(summary.start_time).or_default() +=
                summary.aggregated_value.round() as i64;
        }
        if summaries.has_more {
            // NOTE: more than 100 hours per request would need pagination;
            // ranges of up to four days fit in one page.
            warn!(
                stripe_customer,
                "more hourly summaries than one page; later hours are not corrected"
            );
        }

        let mut hour = hours.start_unix_s;
        while hour < hours.end_unix_s {
            let key = (customer.clone(), stripe_pseudonym.clone(), meter, hour);
            let expected = billed.get(&key).copied().unwrap_or(0);
            let found = in_stripe.get(&hour).copied().unwrap_or(0);
            let missing = expected - found;
            if missing > 0 && unsettled.contains(&key) {
                unsettled_short += 1;
            }
            if missing > 0 && !unsettled.contains(&key) {
                let correction = Correction {
                    customer: &customer,
                    stripe_pseudonym: &stripe_pseudonym,
                    stripe_customer,
                    meter,
                    hour,
                    stripe_value: found,
                    missing,
                };
                if queue_correction(biller, correction, now).await? {
                    queued += 1;
                }
            }
            hour += HOUR_SECONDS;
        }
    }
    if unsettled_short > 0 {
        info!(
            hours = unsettled_short,
            settle_seconds = settle_s,
            "left hours below what was sent uncorrected while Stripe's summaries settle; a later \
             reconciliation corrects them"
        );
    }
    Ok((queued, errors))
}

/// Describes, and logs, a failure to read a Stripe customer's summaries.
/// The log line names the Stripe customer by pseudonym only, because
/// Stripe's message may name it by id. The report, which the operator
/// reads, has both.
fn summary_error(
    stripe_pseudonym: &str,
    stripe_customer: &str,
    event_name: &str,
    err: &stripe::StripeError,
) -> String {
    let (status, reason) = match err {
        stripe::StripeError::Stripe(errors, status) => (
            status.to_string(),
            errors
                .message
                .clone()
                .unwrap_or_else(|| "no message".into()),
        ),
        other => ("no reply".to_owned(), other.to_string()),
    };
    warn!(
        stripe_pseudonym,
        event_name,
        status,
        "failed to read a Stripe customer's meter event summaries; reconciling the others"
    );
    format!(
        "failed to read the {event_name} summaries of Stripe customer {stripe_customer}: \
         Stripe returned {status}: {reason}; it is left out, check that the Stripe customer \
         exists"
    )
}

/// A corrective event to queue.
#[derive(Debug, Clone, Copy)]
struct Correction<'a> {
    customer: &'a str,
    stripe_pseudonym: &'a str,
    stripe_customer: &'a str,
    meter: Meter,
    hour: i64,
    stripe_value: i64,
    missing: i64,
}

async fn queue_correction(
    biller: &Biller,
    correction: Correction<'_>,
    now: i64,
) -> Result<bool, ReconcileError> {
    // The event falls within the hour it corrects, at its last minute or,
    // for the current hour, a minute ago: Stripe takes no timestamp more
    // than 5 minutes ahead and none older than 35 days.
    let latest = now.div_euclid(MINUTE_SECONDS) * MINUTE_SECONDS - MINUTE_SECONDS;
    let minute = (correction.hour + HOUR_SECONDS - MINUTE_SECONDS)
        .min(latest)
        .max(correction.hour);
    if minute < now - MAX_EVENT_AGE_S {
        warn!(
            customer_pseudonym = correction.customer,
            meter = correction.meter.name(),
            missing = correction.missing,
            "usage missing in Stripe is older than 35 days; bill it by hand"
        );
        return Ok(false);
    }
    let tie = format!(
        "{}-{}-{}",
        correction.hour, correction.stripe_customer, correction.stripe_value
    );
    let ledger = biller.ledger().clone();
    let identities = biller.store().identities().clone();
    let customer = correction.customer.to_owned();
    let stripe_pseudonym = correction.stripe_pseudonym.to_owned();
    let (meter, missing) = (correction.meter, correction.missing);
    let queued = biller
        .store()
        .write("queue a corrective meter event", move |conn| {
            let named = queue::correction_customer(conn, &identities, &customer)?;
            let key = EventKey {
                region: &ledger.region,
                ledger_id: &ledger.ledger_id,
                customer: &named,
                meter,
                minute_unix_s: minute,
                part: 0,
                correction: &tie,
            };
            queue::queue_correction(conn, &key, &customer, &stripe_pseudonym, missing, now)
        })
        .await?;
    if queued {
        info!(
            customer_pseudonym = correction.customer,
            stripe_customer = correction.stripe_customer,
            meter = correction.meter.name(),
            hour_unix_s = correction.hour,
            missing = correction.missing,
            "queued a corrective meter event for usage Stripe is missing"
        );
    }
    Ok(queued)
}

/// Stripe's summaries per key, and the keys whose summaries could not be
/// read with the errors.
struct StripeValues {
    values: Totals,
    unread: BTreeSet<(String, Meter)>,
    errors: Vec<String>,
}

/// Reads Stripe's summaries over `range` for every key, summed over the
/// Stripe customers the customer's usage was sent to.
async fn stripe_values(
    sink: &super::sink::StripeSink,
    keys: &BTreeSet<(String, Meter)>,
    billed_to: &BilledTo<'_>,
    range: TimeRange,
) -> Result<StripeValues, ReconcileError> {
    let meter_ids = meter_ids(sink).await?;
    let mut read = StripeValues {
        values: Totals::new(),
        unread: BTreeSet::new(),
        errors: Vec::new(),
    };
    'keys: for (customer, meter) in keys {
        let Some(pseudonyms) = billed_to.destinations.get(customer) else {
            continue;
        };
        let stripe_customers = pseudonyms.iter().filter_map(|pseudonym| {
            billed_to
                .stripe_ids
                .get(pseudonym)
                .map(|id| (pseudonym, id))
        });
        let event_name = sink.names().event_name(*meter);
        let Some(meter_id) = meter_ids.get(event_name) else {
            return Err(ReconcileError::UnknownMeter {
                event_name: event_name.to_owned(),
            });
        };
        let mut total = 0.0;
        for (pseudonym, stripe_customer) in stripe_customers {
            let list = ListIdBillingMeterEventSummary::new(
                meter_id.as_str(),
                stripe_customer.as_str(),
                range.end_unix_s,
                range.start_unix_s,
            )
            .send(sink.client())
            .await;
            let list = match list {
                Ok(list) => list,
                Err(err) => {
                    let error = summary_error(pseudonym, stripe_customer, event_name, &err);
                    if !read.errors.contains(&error) {
                        read.errors.push(error);
                    }
                    read.unread.insert((customer.clone(), *meter));
                    continue 'keys;
                }
            };
            total += list
                .data
                .iter()
                .map(|summary| summary.aggregated_value)
                .sum::<f64>();
        }
        read.values
            .insert((customer.clone(), *meter), total.round() as i64);
    }
    Ok(read)
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
