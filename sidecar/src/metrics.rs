//! The sidecar's Prometheus metrics, served as text on the HTTP port at
//! `/metrics`.

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Every metric the sidecar exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Meter events Stripe accepted or already had, by meter and outcome.
    pub meter_events_sent: IntCounterVec,
    /// Usage carried by those events, by meter, in the meter's unit.
    pub billed_usage: IntCounterVec,
    /// Meter events parked because Stripe rejected them for good, by meter.
    pub meter_events_parked: IntCounterVec,
    /// Failed sends that will be retried.
    pub meter_event_retries: IntCounter,
    /// Meter events waiting to be sent.
    pub meter_events_pending: IntGauge,
    /// Meter events parked now.
    pub meter_events_parked_now: IntGauge,
    /// Largest drift of the last reconciliation, as a fraction of the
    /// ledger (0.01 is 1%).
    pub billing_drift_ratio: Gauge,
    /// Reconciliations whose drift exceeded the alert threshold.
    pub billing_drift_alerts: IntCounter,
    /// Webhook deliveries by outcome (applied, duplicate, stale, ignored,
    /// rejected, failed).
    pub webhook_deliveries: IntCounterVec,
    /// Usage the sidecar stored from filter batches, by meter, in the
    /// meter's unit.
    pub ledger_usage: IntCounterVec,
    /// The same usage by ledger id, customer pseudonym and meter; series
    /// appear only when `billing.customer_usage_metrics` is on.
    pub customer_usage: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(vec.clone()))?;
            Ok::<_, prometheus::Error>(vec)
        };
        let meter_events_sent = counter_vec(
            "veo_meter_events_sent_total",
            "Meter events Stripe accepted or already had, by meter and outcome.",
            &["meter", "outcome"],
        )?;
        let billed_usage = counter_vec(
            "veo_billed_usage_total",
            "Usage carried by sent meter events, in requests or bytes.",
            &["meter"],
        )?;
        let meter_events_parked = counter_vec(
            "veo_meter_events_parked_total",
            "Meter events Stripe rejected for good.",
            &["meter"],
        )?;
        let webhook_deliveries = counter_vec(
            "veo_webhook_deliveries_total",
            "Stripe webhook deliveries by outcome.",
            &["outcome"],
        )?;
        let ledger_usage = counter_vec(
            "veo_ledger_usage_total",
            "Usage stored from filter batches, in requests or bytes.",
            &["meter"],
        )?;
        let customer_usage = counter_vec(
            crate::billing::prometheus::SERIES,
            "Usage stored from filter batches per customer pseudonym, in requests or bytes.",
            &["ledger", "customer", "meter"],
        )?;
        let meter_event_retries = IntCounter::new(
            "veo_meter_event_retries_total",
            "Meter event sends that failed and will be retried.",
        )?;
        let meter_events_pending = IntGauge::new(
            "veo_meter_events_pending",
            "Meter events waiting to be sent.",
        )?;
        let meter_events_parked_now =
            IntGauge::new("veo_meter_events_parked", "Meter events parked now.")?;
        let billing_drift_ratio = Gauge::new(
            "veo_billing_drift_ratio",
            "Largest drift between the ledger and Stripe in the last reconciliation.",
        )?;
        let billing_drift_alerts = IntCounter::new(
            "veo_billing_drift_alerts_total",
            "Reconciliations whose drift exceeded the alert threshold.",
        )?;
        registry.register(Box::new(meter_event_retries.clone()))?;
        registry.register(Box::new(meter_events_pending.clone()))?;
        registry.register(Box::new(meter_events_parked_now.clone()))?;
        registry.register(Box::new(billing_drift_ratio.clone()))?;
        registry.register(Box::new(billing_drift_alerts.clone()))?;
        // Every series starts at 0, so dashboards and alerts see it before
        // the first event.
        for meter in ["api_requests", "egress_bytes"] {
            billed_usage.with_label_values(&[meter]);
            meter_events_parked.with_label_values(&[meter]);
            ledger_usage.with_label_values(&[meter]);
            for outcome in ["accepted", "already_recorded", "written"] {
                meter_events_sent.with_label_values(&[meter, outcome]);
            }
        }
        for outcome in [
            "applied",
            "unchanged",
            "stale",
            "duplicate",
            "ignored",
            "rejected",
            "failed",
        ] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        Ok(Metrics {
            registry,
            meter_events_sent,
            billed_usage,
            meter_events_parked,
            meter_event_retries,
            meter_events_pending,
            meter_events_parked_now,
            billing_drift_ratio,
            billing_drift_alerts,
            webhook_deliveries,
            ledger_usage,
            customer_usage,
        })
    }

    /// Renders every metric in Prometheus's text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %err, "failed to render the metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
