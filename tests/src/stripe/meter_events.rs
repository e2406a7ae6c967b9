//! Meter events: `POST /v1/billing/meter_events` with its checks of the meter,
//! customer, value, timestamp and identifier.

use serde_json::{Value, json};

use super::error::ApiError;
use super::form::Params;
use super::ids::random_id;
use super::meters::{CUSTOMER_PAYLOAD_KEY, VALUE_PAYLOAD_KEY};
use super::state::{RETENTION_SECONDS, State};

/// Maximum age of an event timestamp relative to the fake's clock: 35 days.
const MAX_AGE_SECONDS: i64 = 35 * 24 * 60 * 60;
/// Maximum time an event timestamp may be ahead of the fake's clock: 5 minutes.
const MAX_FUTURE_SECONDS: i64 = 5 * 60;
/// Maximum length of `event_name` and `identifier` on Stripe.
const MAX_NAME_LENGTH: usize = 100;

/// A meter event the fake accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEventRecord {
    /// The event's `identifier`, sent or generated.
    pub identifier: String,
    /// The event's `event_name`.
    pub event_name: String,
    /// The Stripe customer id from `payload[stripe_customer_id]`.
    pub customer: String,
    /// The value from `payload[value]`.
    pub value: u64,
    /// The event's `timestamp` in Unix seconds.
    pub timestamp: i64,
    /// Fake-clock time when the event was accepted, in Unix seconds.
    pub created: i64,
}

/// Handles `POST /v1/billing/meter_events`.
pub(crate) fn create(state: &mut State, params: &Params) -> Result<Value, ApiError> {
    params.reject_unknown(&["event_name", "payload", "identifier", "timestamp", "expand"])?;
    let event_name = params.required("event_name")?.to_owned();
    check_length("event_name", &event_name)?;
    let payload = params.nested("payload");
    let customer_param = format!("payload[{CUSTOMER_PAYLOAD_KEY}]");
    let value_param = format!("payload[{VALUE_PAYLOAD_KEY}]");
    let customer = payload
        .get(CUSTOMER_PAYLOAD_KEY)
        .filter(|customer| !customer.is_empty())
        .ok_or_else(|| ApiError::parameter_missing(&customer_param))?
        .clone();
    let value = payload
        .get(VALUE_PAYLOAD_KEY)
        .ok_or_else(|| ApiError::parameter_missing(&value_param))?;
    let value = parse_value(&value_param, value)?;
    let now = state.now();
    let timestamp = params.integer("timestamp")?.unwrap_or(now);
    check_timestamp(timestamp, now)?;
    let identifier = match params.get("identifier") {
        Some(identifier) => {
            check_length("identifier", identifier)?;
            identifier.to_owned()
        }
        None => random_id("mevt_"),
    };

    // NOTE: Stripe checks the event name and customer after accepting the
    // event and reports failures in `v1.billing.meter.no_meter_found` and
    // `v1.billing.meter.error_report_triggered` events (Stripe's v2 event
    // types). The fake rejects them at once, so that tests see the mistake.
    if !state
        .meters
        .iter()
        .any(|meter| meter.event_name == event_name)
    {
        return Err(ApiError::resource_missing(
            400,
            "event_name",
            format!("No active meter was found that matches the event_name '{event_name}'."),
        ));
    }
    if !state.customers.contains_key(&customer) {
        return Err(ApiError::resource_missing(
            400,
            &customer_param,
            format!("No such customer: '{customer}'"),
        ));
    }
    if let Some(accepted_at) = state.identifiers.get(&identifier)
        && now - accepted_at < RETENTION_SECONDS
    {
        return Err(ApiError::resource_already_exists(
            "identifier",
            format!("An event already exists with identifier {identifier}."),
        ));
    }

    state.identifiers.insert(identifier.clone(), now);
    state.events.push(MeterEventRecord {
        identifier: identifier.clone(),
        event_name: event_name.clone(),
        customer,
        value,
        timestamp,
        created: now,
    });
    Ok(json!({
        "object": "billing.meter_event",
        "created": now,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": state.livemode,
        "payload": payload,
        "timestamp": timestamp,
    }))
}

fn check_length(param: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::parameter_missing(param));
    }
    if value.chars().count() > MAX_NAME_LENGTH {
        return Err(ApiError::invalid_param(
            param,
            format!("Invalid {param}: must be at most {MAX_NAME_LENGTH} characters."),
        ));
    }
    Ok(())
}

/// Parses a usage value: a non-negative whole number written in digits.
// NOTE: Stripe also accepts negative values, which correct earlier usage.
// The fake rejects them, so a negative value from the sidecar fails tests.
fn parse_value(param: &str, text: &str) -> Result<u64, ApiError> {
    let invalid = || {
        ApiError::invalid_param(
            param,
            format!("Invalid {param} '{text}': expected a non-negative whole number such as 5."),
        )
    };
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(invalid());
    }
    text.parse().map_err(|_| invalid())
}

fn check_timestamp(timestamp: i64, now: i64) -> Result<(), ApiError> {
    let oldest = now.saturating_sub(MAX_AGE_SECONDS);
    let latest = now.saturating_add(MAX_FUTURE_SECONDS);
    if (oldest..=latest).contains(&timestamp) {
        return Ok(());
    }
    Err(ApiError::invalid_param(
        "timestamp",
        format!(
            "Timestamp {timestamp} must be within the past 35 calendar days and at most 5 \
             minutes in the future (now {now})."
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_value_takes_digits_only() {
        assert_eq!(parse_value("v", "0").unwrap(), 0);
        assert_eq!(parse_value("v", "42").unwrap(), 42);
        for text in [
            "",
            "-1",
            "+1",
            "1.5",
            " 1",
            "abc",
            "99999999999999999999999",
        ] {
            assert!(parse_value("v", text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn check_timestamp_bounds_are_inclusive() {
        let now = 1_700_000_000;
        assert!(check_timestamp(now - MAX_AGE_SECONDS, now).is_ok());
        assert!(check_timestamp(now + MAX_FUTURE_SECONDS, now).is_ok());
        assert!(check_timestamp(now - MAX_AGE_SECONDS - 1, now).is_err());
        assert!(check_timestamp(now + MAX_FUTURE_SECONDS + 1, now).is_err());
    }
}
