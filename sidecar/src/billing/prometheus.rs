//! Usage per customer and meter as a Prometheus server recorded it from the
//! sidecar's `veo_customer_usage_total` series, for reconciliation.
//!
//! The series count usage when a filter batch is stored, by customer
//! pseudonym and meter, under the ledger id of the sidecar. Two queries
//! over Prometheus's HTTP API read them: the last value of each series at
//! the start of the range (looking back up to [`BASELINE_LOOKBACK`]), and
//! every sample within the range. The usage of a series is the sum of its
//! increases from that value, where a drop means the sidecar restarted and
//! the counter began again at 0. Series of one `job` are added up, since a
//! sidecar whose address changed appears as a new `instance`. When several
//! jobs scrape the same sidecar, the largest of their sums counts.
//!
//! NOTE: a restart followed by more usage than before, all between two
//! samples, looks like growth without a restart. Usage stored after the
//! last scrape before a crash is never seen. Both show as drift.

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

/// How far before the range the starting value of a series is looked for.
/// A series without a sample in that time starts at 0.
pub const BASELINE_LOOKBACK: &str = "1d";

/// Deadline of each query, reply included.
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

/// Labels of one series, without the metric name.
type Labels = BTreeMap<String, String>;

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
    let selector = format!("{SERIES}{{ledger=\"{}\"}}", escape(ledger_id));
    let baseline_query = format!("last_over_time({selector}[{BASELINE_LOOKBACK}])");
    let baseline = query(base_url, &baseline_query, range.start_unix_s, "vector")
        .await
        .map_err(error)?;
    let span_s = range.end_unix_s - range.start_unix_s;
    let samples_query = format!("{selector}[{span_s}s]");
    let in_range = query(base_url, &samples_query, range.end_unix_s, "matrix")
        .await
        .map_err(error)?;

    let mut starts: BTreeMap<Labels, i64> = BTreeMap::new();
    for series in baseline {
        let value = series.value.map(|(_, text)| text).unwrap_or_default();
        let value = parse_value(&value).map_err(error)?;
        starts.insert(labels(series.metric), value);
    }
    let mut per_job: BTreeMap<(String, Meter), BTreeMap<String, i64>> = BTreeMap::new();
    for series in in_range {
        let metric = labels(series.metric);
        let (Some(customer), Some(meter)) = (
            metric.get("customer"),
            metric.get("meter").and_then(|name| Meter::from_name(name)),
        ) else {
            continue;
        };
        let values = series
            .values
            .iter()
            .map(|(_, text)| parse_value(text))
            .collect::<Result<Vec<i64>, String>>()
            .map_err(error)?;
        let start = starts.get(&metric).copied().unwrap_or(0);
        let job = metric.get("job").cloned().unwrap_or_default();
        let sum = per_job
            .entry((customer.clone(), meter))
            .or_default()
            .entry(job)
            .or_default();
        *sum = sum.saturating_add(increase(start, &values));
    }
    Ok(per_job
        .into_iter()
        .map(|(key, jobs)| (key, jobs.into_values().max().unwrap_or(0)))
        .collect())
}

/// Returns the counter's increase from `start` over `values` in time
/// order, counting a drop as a restart from 0.
pub fn increase(start: i64, values: &[i64]) -> i64 {
    let mut previous = start;
    let mut total: i64 = 0;
    for &value in values {
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

/// Escapes a label value for a PromQL string.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Returns a series' labels without the metric name.
fn labels(mut metric: Labels) -> Labels {
    metric.remove("__name__");
    metric
}

/// Converts a sample value, which Prometheus writes as a string.
fn parse_value(text: &str) -> Result<i64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("sample value {text:?} is not a number"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("sample value {text:?} is not a counter value"));
    }
    // Counter values here are whole requests or bytes.
    #[allow(clippy::cast_possible_truncation)]
    Ok(value.round() as i64)
}

/// Evaluates `promql` at `time_unix_s` and returns the series of a result
/// of `result_type` ("vector" or "matrix").
async fn query(
    base_url: &str,
    promql: &str,
    time_unix_s: i64,
    result_type: &str,
) -> Result<Vec<Series>, String> {
    let parameters = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", promql)
        .append_pair("time", &time_unix_s.to_string())
        .finish();
    let target = format!(
        "{}/api/v1/query?{parameters}",
        base_url.trim_end_matches('/')
    );
    let (status, body) = tokio::time::timeout(TIMEOUT, fetch(&target))
        .await
        .map_err(|_| format!("no whole reply within {} s", TIMEOUT.as_secs()))??;
    let reply: Reply = match serde_json::from_slice(&body) {
        Ok(reply) => reply,
        Err(_) => {
            let start = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!(
                "HTTP status {status}, not a query result: {start:?}"
            ));
        }
    };
    if reply.status != "success" {
        return Err(format!(
            "the query {promql:?} failed with HTTP status {status}: {} {}",
            reply.error_type.unwrap_or_default(),
            reply.error.unwrap_or_default()
        ));
    }
    let data = reply.data.ok_or("the reply has no data")?;
    if data.result_type != result_type {
        return Err(format!(
            "expected a {result_type} result, got {:?}",
            data.result_type
        ));
    }
    Ok(data.result)
}

/// Sends `GET target` and returns the status and the body.
async fn fetch(target: &str) -> Result<(hyper::StatusCode, Bytes), String> {
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
    let response = client
        .request(request)
        .await
        .map_err(|err| format!("request failed: {err}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|err| {
            format!(
                "failed to read the reply ({err}); a reply over {} MiB needs a shorter range",
                MAX_REPLY_BYTES >> 20
            )
        })?
        .to_bytes();
    Ok((status, body))
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

/// One series of a vector or matrix result.
#[derive(Debug, Deserialize)]
struct Series {
    metric: Labels,
    /// The sample of a vector result.
    #[serde(default)]
    value: Option<(f64, String)>,
    /// The samples of a matrix result.
    #[serde(default)]
    values: Vec<(f64, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increase_counts_from_start_value() {
        assert_eq!(increase(4, &[5, 8, 8, 12]), 8);
    }

    #[test]
    fn new_series_starts_at_zero() {
        assert_eq!(increase(0, &[3, 9]), 9);
    }

    #[test]
    fn drop_counts_as_restart_from_zero() {
        assert_eq!(increase(10, &[15, 2, 6]), 5 + 2 + 4);
    }

    #[test]
    fn no_samples_give_zero() {
        assert_eq!(increase(3, &[]), 0);
    }

    #[test]
    fn sample_values_must_be_counter_values() {
        assert_eq!(parse_value("5").unwrap(), 5);
        assert_eq!(parse_value("7e0").unwrap(), 7);
        for bad in ["NaN", "-1", "+Inf", "five"] {
            assert!(parse_value(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }
}
