//! Usage per customer and meter as a Prometheus server recorded it from the
//! sidecar's `veo_customer_usage_total` series, for reconciliation.
//!
//! The series count usage when a filter batch is stored, by customer
//! pseudonym and meter, under the ledger id of the sidecar. One query over
//! Prometheus's HTTP API returns every sample of the range plus a look-back
//! before it. The usage of a series is the sum of its increases between
//! consecutive samples, where a drop means the sidecar restarted and the
//! counter began again at 0. The value before the range is the last sample
//! at or before its start, or 0 for a series that appeared within it.

use std::collections::BTreeMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::meter::Meter;
use crate::ledger::TimeRange;

/// Name of the per-customer usage counter.
pub const SERIES: &str = "veo_customer_usage_total";

/// Time before the range whose samples give each series' starting value,
/// in seconds: more than any usual scrape interval.
pub const LOOKBACK_S: i64 = 300;

/// Deadline of the query.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Largest reply read, in bytes.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Failure to read usage from Prometheus.
#[derive(Debug, thiserror::Error)]
#[error(
    "failed to read {SERIES} from Prometheus at {url}: {reason}; check billing.prometheus_url \
     and that Prometheus scrapes this sidecar's /metrics"
)]
pub struct PrometheusError {
    /// Base URL of the server.
    pub url: String,
    /// Description of the failure.
    pub reason: String,
}

/// Usage per customer pseudonym and meter.
pub type Usage = BTreeMap<(String, Meter), i64>;

/// Returns the usage that the series of `ledger_id` recorded within
/// `range`, read from the Prometheus server at `base_url`.
pub async fn usage(
    base_url: &str,
    ledger_id: &str,
    range: TimeRange,
) -> Result<Usage, PrometheusError> {
    let error = |reason: String| PrometheusError {
        url: base_url.to_owned(),
        reason,
    };
    let span_s = range.end_unix_s - range.start_unix_s + LOOKBACK_S;
    let query = format!("{SERIES}{{ledger=\"{ledger_id}\"}}[{span_s}s]");
    let parameters = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", &query)
        .append_pair("time", &range.end_unix_s.to_string())
        .finish();
    let target = format!(
        "{}/api/v1/query?{parameters}",
        base_url.trim_end_matches('/')
    );

    let body = fetch(&target).await.map_err(error)?;
    let reply: Reply = serde_json::from_slice(&body)
        .map_err(|err| error(format!("the reply is not a Prometheus query result: {err}")))?;
    if reply.status != "success" {
        return Err(error(format!(
            "the query failed: {} {}",
            reply.error_type.unwrap_or_default(),
            reply.error.unwrap_or_default()
        )));
    }
    let data = reply
        .data
        .ok_or_else(|| error("the reply has no data".to_owned()))?;
    if data.result_type != "matrix" {
        return Err(error(format!(
            "expected a matrix result, got {:?}",
            data.result_type
        )));
    }

    let mut usage = Usage::new();
    for series in data.result {
        let (Some(customer), Some(meter)) = (
            series.metric.get("customer"),
            series
                .metric
                .get("meter")
                .and_then(|name| Meter::from_name(name)),
        ) else {
            continue;
        };
        let samples = parse_samples(&series.values).map_err(error)?;
        let total = usage.entry((customer.clone(), meter)).or_default();
        *total = total.saturating_add(increase(&samples, range.start_unix_s));
    }
    Ok(usage)
}

/// Returns the counter's increase after `start_unix_s` from samples in
/// time order, counting a drop as a restart from 0.
pub fn increase(samples: &[(f64, i64)], start_unix_s: i64) -> i64 {
    #[allow(clippy::cast_precision_loss)]
    let start = start_unix_s as f64;
    let mut previous = samples
        .iter()
        .take_while(|(at, _)| *at <= start)
        .last()
        .map_or(0, |(_, value)| *value);
    let mut total: i64 = 0;
    for &(_, value) in samples.iter().filter(|(at, _)| *at > start) {
        let step = if value >= previous {
            value - previous
        } else {
            value
        };
        total = total.saturating_add(step);
        previous = value;
    }
    total
}

/// Converts Prometheus's `[seconds, "value"]` pairs.
fn parse_samples(values: &[(f64, String)]) -> Result<Vec<(f64, i64)>, String> {
    values
        .iter()
        .map(|(at, text)| {
            let value: f64 = text
                .parse()
                .map_err(|_| format!("sample value {text:?} is not a number"))?;
            if !value.is_finite() || value < 0.0 {
                return Err(format!("sample value {text:?} is not a counter value"));
            }
            // Counter values here are whole requests or bytes.
            #[allow(clippy::cast_possible_truncation)]
            Ok((*at, value.round() as i64))
        })
        .collect()
}

/// Sends `GET target` and returns the body of a 200 reply.
async fn fetch(target: &str) -> Result<Bytes, String> {
    let uri: hyper::Uri = target
        .parse()
        .map_err(|err| format!("invalid URL {target}: {err}"))?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let request = hyper::Request::get(uri)
        .body(Empty::new())
        .map_err(|err| err.to_string())?;
    let response = tokio::time::timeout(TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("no reply within {} s", TIMEOUT.as_secs()))?
        .map_err(|err| format!("request failed: {err}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|err| format!("failed to read the reply: {err}"))?
        .to_bytes();
    // Prometheus replies to a bad query with 400 and a JSON error body.
    if !status.is_success() && status != hyper::StatusCode::BAD_REQUEST {
        return Err(format!("HTTP status {status}"));
    }
    Ok(body)
}

/// A reply of `/api/v1/query`.
#[derive(Debug, Deserialize)]
struct Reply {
    status: String,
    data: Option<Data>,
    #[serde(rename = "errorType")]
    error_type: Option<String>,
    error: Option<String>,
}

/// The `data` of a query reply.
#[derive(Debug, Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    #[serde(default)]
    result: Vec<Series>,
}

/// One series of a matrix result.
#[derive(Debug, Deserialize)]
struct Series {
    metric: BTreeMap<String, String>,
    #[serde(default)]
    values: Vec<(f64, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increase_starts_at_last_earlier_sample() {
        let samples = [(90.0, 4), (100.0, 5), (110.0, 8), (120.0, 8), (130.0, 12)];
        assert_eq!(increase(&samples, 100), 7);
    }

    #[test]
    fn new_series_starts_at_zero() {
        assert_eq!(increase(&[(110.0, 3), (120.0, 9)], 100), 9);
    }

    #[test]
    fn drop_counts_as_restart_from_zero() {
        let samples = [(100.0, 10), (110.0, 15), (120.0, 2), (130.0, 6)];
        assert_eq!(increase(&samples, 100), 5 + 2 + 4);
    }

    #[test]
    fn samples_only_before_the_range_give_zero() {
        assert_eq!(increase(&[(80.0, 3), (90.0, 3)], 100), 0);
        assert_eq!(increase(&[], 100), 0);
    }

    #[test]
    fn sample_values_must_be_counter_values() {
        assert_eq!(
            parse_samples(&[(1.0, "5".into()), (2.0, "7e0".into())]).unwrap(),
            [(1.0, 5), (2.0, 7)]
        );
        for bad in ["NaN", "-1", "+Inf", "five"] {
            assert!(parse_samples(&[(1.0, bad.into())]).is_err(), "{bad}");
        }
    }
}
