//! Billing meters: `GET /v1/billing/meters`, `GET /v1/billing/meters/{id}`
//! and the event summaries of `GET /v1/billing/meters/{id}/event_summaries`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::error::ApiError;
use super::form::Params;
use super::list;
use super::meter_events::MeterEventRecord;
use super::state::State;

/// Payload key that names the customer, Stripe's default for a meter.
pub(crate) const CUSTOMER_PAYLOAD_KEY: &str = "stripe_customer_id";
/// Payload key that carries the value, Stripe's default for a meter.
pub(crate) const VALUE_PAYLOAD_KEY: &str = "value";

/// Seconds in the windows of `value_grouping_window`.
const MINUTE: i64 = 60;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// How a meter aggregates the values of its events (`default_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeterAggregation {
    /// Sum of the values.
    Sum,
    /// Number of events, whatever their values.
    Count,
    /// Value of the event with the latest timestamp.
    Last,
}

impl MeterAggregation {
    fn formula(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Count => "count",
            Self::Last => "last",
        }
    }

    /// Aggregates `events`, which are in arrival order.
    fn aggregate<'a>(self, events: impl Iterator<Item = &'a MeterEventRecord>) -> u64 {
        match self {
            Self::Sum => events.map(|event| event.value).sum(),
            Self::Count => events.map(|_| 1).sum(),
            // Of events with the same timestamp, the one that arrived last wins.
            Self::Last => events
                .enumerate()
                .max_by_key(|(arrival, event)| (event.timestamp, *arrival))
                .map_or(0, |(_, event)| event.value),
        }
    }
}

/// A meter stored by the fake. Every meter is active.
#[derive(Debug, Clone)]
pub(crate) struct Meter {
    pub id: String,
    pub event_name: String,
    pub aggregation: MeterAggregation,
    /// Creation time in Unix seconds.
    pub created: i64,
}

impl Meter {
    /// Returns the meter as Stripe's `billing.meter` object.
    pub(crate) fn to_json(&self, livemode: bool) -> Value {
        json!({
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {
                "event_payload_key": CUSTOMER_PAYLOAD_KEY,
                "type": "by_id",
            },
            "default_aggregation": { "formula": self.aggregation.formula() },
            "display_name": self.event_name,
            "event_name": self.event_name,
            "event_time_window": null,
            "livemode": livemode,
            "status": "active",
            "status_transitions": { "deactivated_at": null },
            "updated": self.created,
            "value_settings": { "event_payload_key": VALUE_PAYLOAD_KEY },
        })
    }
}

/// Handles `GET /v1/billing/meters`, newest meter first.
pub(crate) fn list(state: &State, params: &Params) -> Result<Value, ApiError> {
    params.reject_unknown(&[
        "limit",
        "starting_after",
        "ending_before",
        "status",
        "expand",
    ])?;
    let status = params.get("status");
    if let Some(status) = status
        && status != "active"
        && status != "inactive"
    {
        return Err(ApiError::invalid_param(
            "status",
            format!("Invalid status: must be one of active or inactive; got '{status}'."),
        ));
    }

    let items = state
        .meters
        .iter()
        .rev()
        .filter(|_| status != Some("inactive"))
        .map(|meter| (meter.id.clone(), meter.to_json(state.livemode)))
        .collect();
    list::page(items, params, "/v1/billing/meters", "billing meter")
}

/// Handles `GET /v1/billing/meters/{id}`.
pub(crate) fn retrieve(state: &State, id: &str, params: &Params) -> Result<Value, ApiError> {
    params.reject_unknown(&["expand"])?;
    Ok(find(state, id)?.to_json(state.livemode))
}

/// Handles `GET /v1/billing/meters/{id}/event_summaries`.
///
/// Without `value_grouping_window` the list has one summary of the whole
/// range. With `hour` or `day` it has one summary per window that contains
/// events, newest first, as Stripe's list does. An event counts when its
/// timestamp is in `[start_time, end_time)` and it was accepted at least the
/// summary lag ago.
pub(crate) fn event_summaries(
    state: &State,
    meter_id: &str,
    params: &Params,
) -> Result<Value, ApiError> {
    let meter = find(state, meter_id)?;
    let query = SummaryQuery::parse(params)?;
    if !state.customers.contains_key(&query.customer) {
        return Err(ApiError::resource_missing(
            400,
            "customer",
            format!("No such customer: '{}'", query.customer),
        ));
    }

    let aggregated_before = state.now().saturating_sub(state.summary_lag_s);
    let events = state.events.iter().filter(|event| {
        event.event_name == meter.event_name
            && event.customer == query.customer
            && (query.start_time..query.end_time).contains(&event.timestamp)
            && event.created <= aggregated_before
    });
    let windows: Vec<(i64, i64, u64)> = match query.window {
        None => {
            let value = meter.aggregation.aggregate(events);
            vec![(query.start_time, query.end_time, value)]
        }
        Some(length) => {
            let mut by_window: BTreeMap<i64, Vec<&MeterEventRecord>> = BTreeMap::new();
            for event in events {
                let start =
                    query.start_time + (event.timestamp - query.start_time) / length * length;
                by_window.entry(start).or_default().push(event);
            }
            by_window
                .into_iter()
                .rev()
                .map(|(start, events)| {
                    let value = meter.aggregation.aggregate(events.into_iter());
                    (start, start + length, value)
                })
                .collect()
        }
    };

    let items = windows
        .into_iter()
        .map(|(start, end, value)| {
            let id = summary_id(state, meter, &query.customer, start, end);
            let object = json!({
                "id": id,
                "object": "billing.meter_event_summary",
                "aggregated_value": value,
                "end_time": end,
                "livemode": state.livemode,
                "meter": meter.id,
                "start_time": start,
            });
            (id, object)
        })
        .collect();
    let url = format!("/v1/billing/meters/{}/event_summaries", meter.id);
    list::page(items, params, &url, "billing meter event summary")
}

/// Validated query of the event summaries endpoint.
struct SummaryQuery {
    customer: String,
    start_time: i64,
    end_time: i64,
    /// Window length in seconds, when grouped.
    window: Option<i64>,
}

impl SummaryQuery {
    fn parse(params: &Params) -> Result<Self, ApiError> {
        params.reject_unknown(&[
            "customer",
            "start_time",
            "end_time",
            "value_grouping_window",
            "limit",
            "starting_after",
            "ending_before",
            "expand",
        ])?;
        let customer = params.required("customer")?.to_owned();
        let start_time = params.required_integer("start_time")?;
        let end_time = params.required_integer("end_time")?;
        let window = match params.get("value_grouping_window") {
            None => None,
            Some("hour") => Some(HOUR),
            Some("day") => Some(DAY),
            Some(other) => {
                return Err(ApiError::invalid_param(
                    "value_grouping_window",
                    format!(
                        "Invalid value_grouping_window: must be one of day or hour; got '{other}'."
                    ),
                ));
            }
        };

        for (param, time) in [("start_time", start_time), ("end_time", end_time)] {
            check_alignment(param, time, MINUTE, "minute")?;
            match window {
                Some(HOUR) => check_alignment(param, time, HOUR, "hour")?,
                Some(DAY) => check_alignment(param, time, DAY, "UTC day")?,
                _ => {}
            }
        }
        if end_time <= start_time {
            return Err(ApiError::invalid_param(
                "end_time",
                format!("end_time ({end_time}) must be after start_time ({start_time})."),
            ));
        }
        Ok(Self {
            customer,
            start_time,
            end_time,
            window,
        })
    }
}

fn check_alignment(param: &str, time: i64, length: i64, unit: &str) -> Result<(), ApiError> {
    if time.rem_euclid(length) == 0 {
        return Ok(());
    }
    Err(ApiError::invalid_param(
        param,
        format!(
            "{param} ({time}) must be aligned with {unit} boundaries (a multiple of {length} seconds)."
        ),
    ))
}

fn find<'a>(state: &'a State, id: &str) -> Result<&'a Meter, ApiError> {
    state
        .meters
        .iter()
        .find(|meter| meter.id == id)
        .ok_or_else(|| {
            ApiError::resource_missing(404, "id", format!("No such billing meter: '{id}'"))
        })
}

/// Returns a summary id that is the same for the same meter, customer and
/// window, so that it works as a pagination cursor across requests.
fn summary_id(state: &State, meter: &Meter, customer: &str, start: i64, end: i64) -> String {
    let key = format!("{}:{customer}:{start}:{end}", meter.id);
    format!("mtrusg_{}{}", state.mode_infix(), hex::encode(key))
}
