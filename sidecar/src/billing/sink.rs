//! Destinations of meter events: Stripe's Billing Meter Events API, or
//! without a Stripe key a local outbox file that shows what would be billed.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use stripe::{ApiErrorsType, StripeError};
use stripe::{IdempotencyKey, RequestStrategy, StripeRequest};
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;

use super::meter::Meter;
use super::queue::QueuedEvent;

/// Stripe event names of the meters, as configured on Stripe's meters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterNames {
    /// Event name of admitted requests.
    pub api_requests: String,
    /// Event name of response body bytes.
    pub egress_bytes: String,
}

impl Default for MeterNames {
    fn default() -> Self {
        MeterNames {
            api_requests: Meter::ApiRequests.name().into(),
            egress_bytes: Meter::EgressBytes.name().into(),
        }
    }
}

impl MeterNames {
    /// Returns the Stripe event name of `meter`.
    pub fn event_name(&self, meter: Meter) -> &str {
        match meter {
            Meter::ApiRequests => &self.api_requests,
            Meter::EgressBytes => &self.egress_bytes,
        }
    }
}

/// Outcome of sending one meter event to Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Stripe recorded the event.
    Accepted,
    /// Stripe already has an event with this identifier, from an earlier
    /// attempt whose reply was lost.
    AlreadyRecorded,
    /// A transient failure (rate limit, network): send again later, the
    /// same event with the same identifier and idempotency key.
    Retry(String),
    /// A failure that Stripe saved under the idempotency key (a 5xx), or a
    /// key Stripe refuses to reuse: send the same event again later with
    /// the next idempotency key.
    RetryNewKey(String),
    /// Stripe rejected the event for a reason a retry cannot fix, such as
    /// an unknown customer or meter.
    Reject(String),
}

/// Sends meter events to Stripe.
#[derive(Clone)]
pub struct StripeSink {
    client: stripe::Client,
    names: MeterNames,
}

impl std::fmt::Debug for StripeSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeSink")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl StripeSink {
    /// Wraps a Stripe client.
    pub fn new(client: stripe::Client, names: MeterNames) -> Self {
        StripeSink { client, names }
    }

    /// Returns the Stripe client.
    pub fn client(&self) -> &stripe::Client {
        &self.client
    }

    /// Stripe event names of the meters.
    pub fn names(&self) -> &MeterNames {
        &self.names
    }

    /// Sends one event billed to `stripe_customer_id`.
    ///
    /// The idempotency key is [`QueuedEvent::idempotency_key`], so Stripe
    /// replays its first response to a retry, and Stripe rejects a second
    /// event with the same identifier under any key.
    // NOTE: Stripe keeps idempotency keys and enforces identifier
    // uniqueness for at least 24 hours, per its API reference. An event
    // whose reply was lost and that is retried only after a longer outage
    // could be recorded twice; reconciliation shows that as negative drift.
    pub async fn send(&self, event: &QueuedEvent, stripe_customer_id: &str) -> SendOutcome {
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                stripe_customer_id.to_owned(),
            ),
            ("value".to_owned(), event.value.to_string()),
        ]);
        let request = CreateBillingMeterEvent::new(self.names.event_name(event.meter), payload)
            .identifier(event.identifier.clone())
            .timestamp(event.minute_unix_s);
        let strategy = match IdempotencyKey::new(event.idempotency_key()) {
            Ok(key) => RequestStrategy::Idempotent(key),
            Err(_) => RequestStrategy::Once,
        };
        match request
            .customize()
            .request_strategy(strategy)
            .send(&self.client)
            .await
        {
            Ok(_) => SendOutcome::Accepted,
            Err(err) => classify(&err),
        }
    }
}

/// Sorts a Stripe error into retry, reject or already recorded.
pub fn classify(err: &StripeError) -> SendOutcome {
    match err {
        StripeError::Stripe(errors, status) => {
            let code = errors.code.as_ref().map(|code| code.as_str()).unwrap_or("");
            let param = errors.param.as_deref().unwrap_or("");
            let message = errors.message.as_deref().unwrap_or("no message");
            let reason = if code.is_empty() {
                format!("Stripe returned {status}: {message}")
            } else {
                format!("Stripe returned {status} {code}: {message}")
            };
            match status {
                // NOTE: Stripe documents identifier uniqueness but not the
                // exact error; this takes code `resource_already_exists` or a
                // 400 about the `identifier` parameter as "already recorded".
                400 if code == "resource_already_exists" || param == "identifier" => {
                    SendOutcome::AlreadyRecorded
                }
                // The key was first used with other parameters, such as
                // another Stripe customer before a remap.
                400 if errors.type_ == ApiErrorsType::IdempotencyError => {
                    SendOutcome::RetryNewKey(reason)
                }
                409 | 429 => SendOutcome::Retry(reason),
                // A 404 on the meter events endpoint means the URL is wrong
                // (STRIPE_API_BASE), not the event: fix and retry.
                404 => SendOutcome::Retry(reason),
                // Stripe replays a 5xx to every retry with the same key.
                status if *status >= 500 => SendOutcome::RetryNewKey(reason),
                // 401 and 403 are a wrong or restricted key: waiting for an
                // operator to fix the key loses nothing, parking would.
                401 | 403 => SendOutcome::Retry(reason),
                _ => SendOutcome::Reject(reason),
            }
        }
        StripeError::Timeout => SendOutcome::Retry("Stripe did not respond in time".into()),
        StripeError::ClientError(message) => {
            SendOutcome::Retry(format!("failed to reach Stripe: {message}"))
        }
        StripeError::JSONDeserialize(message) => {
            SendOutcome::Retry(format!("unreadable answer from Stripe: {message}"))
        }
        StripeError::ConfigError(message) => {
            SendOutcome::Retry(format!("invalid Stripe client configuration: {message}"))
        }
    }
}

/// One line of the outbox file: the Stripe request that would be sent,
/// plus the customer and meter it bills.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutboxLine {
    /// Stripe identifier of the event.
    pub identifier: String,
    /// Stripe event name.
    pub event_name: String,
    /// Start of the minute bucket, in seconds since the Unix epoch.
    pub timestamp: i64,
    /// Customer the usage belongs to.
    pub customer: String,
    /// Meter name.
    pub meter: String,
    /// Usage in the meter's unit.
    pub value: i64,
    /// Stripe customer, when one is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stripe_customer_id: Option<String>,
}

/// A queued event with its customer and Stripe customer named by their ids,
/// as the outbox file names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEvent {
    /// The event as queued, customers named by pseudonym.
    pub event: QueuedEvent,
    /// Customer id of the event's customer.
    pub customer: String,
    /// Id of the event's Stripe customer, when one is set.
    pub stripe_customer_id: Option<String>,
}

/// Appends meter events to a JSON Lines file, one event per line.
#[derive(Debug, Clone)]
pub struct FileSink {
    path: PathBuf,
    names: MeterNames,
}

impl FileSink {
    /// Uses the outbox file at `path`, created on the first write.
    pub fn new(path: PathBuf, names: MeterNames) -> Self {
        FileSink { path, names }
    }

    /// Path of the outbox file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `events` and syncs the file; returns only once they are on
    /// disk, so the caller may mark them sent.
    pub fn write(&self, events: &[NamedEvent]) -> std::io::Result<()> {
        let mut text = String::new();
        for named in events {
            let event = &named.event;
            let line = OutboxLine {
                identifier: event.identifier.clone(),
                event_name: self.names.event_name(event.meter).to_owned(),
                timestamp: event.minute_unix_s,
                customer: named.customer.clone(),
                meter: event.meter.name().to_owned(),
                value: event.value,
                stripe_customer_id: named.stripe_customer_id.clone(),
            };
            text.push_str(&serde_json::to_string(&line).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        // A crash or a full disk can leave the last line cut short. Its
        // event is still pending and is written again whole, but the next
        // line must start on a line of its own.
        if ends_mid_line(&mut file)? {
            text.insert(0, '\n');
        }
        file.write_all(text.as_bytes())?;
        file.sync_data()
    }

    /// Returns the identifiers already in the file. A line that does not
    /// parse (a write cut short by a crash) is skipped; its event is still
    /// pending and is written again whole.
    pub fn written_identifiers(&self) -> std::io::Result<HashSet<String>> {
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
            Err(err) => return Err(err),
        };
        let mut identifiers = HashSet::new();
        for line in BufReader::new(file).lines() {
            if let Ok(parsed) = serde_json::from_str::<OutboxLine>(&line?) {
                identifiers.insert(parsed.identifier);
            }
        }
        Ok(identifiers)
    }
}

/// Returns whether the file is non-empty and its last byte is not a
/// newline.
fn ends_mid_line(file: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let length = file.metadata()?.len();
    if length == 0 {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(length - 1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// Delay before the next attempt after `failures` failures in a row:
/// exponential from `base` up to `cap`, with full jitter so that many
/// sidecars retrying at once spread out.
pub fn backoff(failures: u32, base: Duration, cap: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let ceiling = base.saturating_mul(1 << exponent).min(cap);
    let mut bytes = [0u8; 8];
    let fraction = match getrandom::fill(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 1.0,
    };
    // At least half the ceiling, so a retry never comes right away.
    ceiling.mul_f64(0.5 + fraction / 2.0)
}

/// Returns Stripe's error body with `type_`, `code` and the message
/// "test", for tests of error handling.
#[cfg(test)]
pub(crate) fn test_api_error(type_: ApiErrorsType, code: Option<&str>) -> Box<stripe::ApiErrors> {
    Box::new(stripe::ApiErrors {
        advice_code: None,
        charge: None,
        code: code.map(|code| code.parse().unwrap()),
        decline_code: None,
        doc_url: None,
        message: Some("test".into()),
        network_advice_code: None,
        network_decline_code: None,
        param: None,
        payment_intent: None,
        payment_method: None,
        payment_method_type: None,
        request_log_url: None,
        setup_intent: None,
        source: None,
        type_,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(identifier: &str, value: i64) -> NamedEvent {
        NamedEvent {
            event: QueuedEvent {
                id: 1,
                identifier: identifier.into(),
                customer: "p-acme".into(),
                meter: Meter::ApiRequests,
                minute_unix_s: 1_700_000_040,
                value,
                attempts: 0,
                stripe_pseudonym: None,
                key_generation: 0,
            },
            customer: "acme".into(),
            stripe_customer_id: None,
        }
    }

    #[test]
    fn saved_failures_get_new_key() {
        let invalid = ApiErrorsType::InvalidRequestError;
        let cases = [
            (
                test_api_error(ApiErrorsType::ApiError, None),
                500,
                "new key",
            ),
            (
                test_api_error(ApiErrorsType::ApiError, None),
                503,
                "new key",
            ),
            (
                test_api_error(ApiErrorsType::IdempotencyError, None),
                400,
                "new key",
            ),
            (
                test_api_error(ApiErrorsType::ApiError, None),
                429,
                "same key",
            ),
            (
                test_api_error(invalid.clone(), Some("resource_missing")),
                400,
                "reject",
            ),
            (
                test_api_error(invalid, Some("resource_already_exists")),
                400,
                "recorded",
            ),
        ];

        for (errors, status, expected) in cases {
            let outcome = classify(&StripeError::Stripe(errors, status));
            let kind = match outcome {
                SendOutcome::RetryNewKey(_) => "new key",
                SendOutcome::Retry(_) => "same key",
                SendOutcome::Reject(_) => "reject",
                SendOutcome::AlreadyRecorded => "recorded",
                SendOutcome::Accepted => "accepted",
            };
            assert_eq!(kind, expected, "status {status}");
        }
        let timeout = classify(&StripeError::Timeout);
        assert!(matches!(timeout, SendOutcome::Retry(_)), "{timeout:?}");
    }

    #[test]
    fn file_sink_appends_and_reads_identifiers() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("events.jsonl"), MeterNames::default());

        sink.write(&[event("a", 3)]).unwrap();
        sink.write(&[event("b", 4)]).unwrap();

        let identifiers = sink.written_identifiers().unwrap();
        assert_eq!(identifiers.len(), 2);
        assert!(identifiers.contains("a"));
        assert!(identifiers.contains("b"));
        let text = std::fs::read_to_string(sink.path()).unwrap();
        assert!(text.contains("\"value\":4"), "{text}");
        assert!(text.contains("\"event_name\":\"api_requests\""), "{text}");
    }

    #[test]
    fn file_sink_skips_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let sink = FileSink::new(dir.path().join("events.jsonl"), MeterNames::default());
        sink.write(&[event("a", 3)]).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(sink.path())
            .unwrap();
        file.write_all(b"{\"identifier\":\"b\",\"ev").unwrap();

        let identifiers = sink.written_identifiers().unwrap();
        assert_eq!(identifiers.len(), 1);

        sink.write(&[event("c", 5)]).unwrap();

        let identifiers = sink.written_identifiers().unwrap();
        assert_eq!(identifiers.len(), 2);
        assert!(identifiers.contains("c"), "{identifiers:?}");
    }

    #[test]
    fn backoff_grows_and_stays_under_cap() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for failures in 1..40 {
            let delay = backoff(failures, base, cap);
            assert!(delay <= cap, "{failures}: {delay:?}");
            assert!(delay >= base / 2, "{failures}: {delay:?}");
        }
        assert!(backoff(10, base, cap) >= cap / 2);
    }
}
