//! Writer of `metadata[tier]` to Stripe customers after a tier change.
//!
//! Each pending write carries the version of the tier state it comes from.
//! The writer sends one customer's writes in order. It removes a row only
//! when its version is still the stored one, so a newer tier that arrives
//! during a send is written after it, and a stale tier is not written last.

use std::collections::HashMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_core::customer::UpdateCustomer;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::event::{OWN_WRITE_KEY_PREFIX, TIER_METADATA_KEY};
use super::state::{self, PendingMetadata};
use super::{WebhookHandler, root_cause, unix_now_ms};
use crate::store::StoreError;

/// Pending writes read per round.
const BATCH_SIZE: u32 = 32;

/// Deadline of one request to Stripe.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Backoff after the first failed attempt; it doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// Maximum backoff between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Maximum wait between two reads of the pending writes when nothing wakes
/// the writer.
const IDLE_POLL: Duration = Duration::from_secs(60);

/// Wait after the store failed to read or update the pending writes.
const STORE_RETRY: Duration = Duration::from_secs(5);

/// Attempts given to a response the client could not decode. It is either
/// an error page of a proxy (worth a retry) or a success whose body does
/// not parse (already applied), and the two look the same.
const MAX_UNDECODED_ATTEMPTS: u32 = 5;

/// Outcome of one attempt.
#[derive(Debug)]
enum Attempt {
    /// Stripe stored the tier.
    Written,
    /// No Stripe client is configured; the write is dropped.
    Skipped,
    /// A failure worth another attempt: 429, 5xx, a network error or a
    /// timeout.
    Retry(String),
    /// A failure another attempt cannot fix, such as a 4xx other than 429.
    GiveUp(String),
}

impl WebhookHandler {
    /// Runs until `stop` is true or its sender is dropped: writes pending
    /// `tier` metadata to Stripe customers, with retry and backoff. Without
    /// a Stripe client it marks them done without sending.
    pub async fn run_metadata_writer(self, mut stop: watch::Receiver<bool>) {
        info!(
            stripe = self.inner.stripe.is_some(),
            "tier metadata writer started"
        );
        while !*stop.borrow() {
            let Some(wait) = self.write_due(&mut stop).await else {
                break;
            };
            if wait.is_zero() {
                continue;
            }
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = self.inner.metadata_wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        info!("tier metadata writer stopped");
    }

    /// Sends every write that is due and returns how long to wait before
    /// the next read, or `None` when `stop` became true or its sender was
    /// dropped during a send.
    async fn write_due(&self, stop: &mut watch::Receiver<bool>) -> Option<Duration> {
        let now_ms = unix_now_ms();
        let identities = self.inner.store.identities().clone();
        let due = self
            .inner
            .store
            .write("read pending tier metadata", move |conn| {
                state::due_metadata(conn, Some(&identities), now_ms, BATCH_SIZE)
            })
            .await;
        let due = match due {
            Ok(due) => due,
            Err(err) => {
                log_store_failure(&err);
                return Some(STORE_RETRY);
            }
        };

        for pending in &due {
            let attempt = tokio::select! {
                attempt = self.attempt(pending) => attempt,
                changed = stop.changed() => {
                    // The abandoned attempt is sent again later, which
                    // stores the same tier.
                    if changed.is_err() || *stop.borrow() {
                        return None;
                    }
                    return Some(Duration::ZERO);
                }
            };
            if let Err(err) = self.finish(pending, attempt).await {
                log_store_failure(&err);
                return Some(STORE_RETRY);
            }
        }
        if due.len() == BATCH_SIZE as usize {
            return Some(Duration::ZERO);
        }

        let next = self
            .inner
            .store
            .read("read pending tier metadata", |conn| {
                state::next_metadata_due(conn)
            })
            .await;
        match next {
            Ok(Some(due_ms)) => {
                let wait_ms = u64::try_from(due_ms.saturating_sub(unix_now_ms())).unwrap_or(0);
                Some(Duration::from_millis(wait_ms).clamp(Duration::from_millis(1), IDLE_POLL))
            }
            Ok(None) => Some(IDLE_POLL),
            Err(err) => {
                log_store_failure(&err);
                Some(STORE_RETRY)
            }
        }
    }

    async fn attempt(&self, pending: &PendingMetadata) -> Attempt {
        let Some(client) = &self.inner.stripe else {
            return Attempt::Skipped;
        };

        let metadata = HashMap::from([(TIER_METADATA_KEY.to_owned(), pending.tier.clone())]);
        let request = UpdateCustomer::new(pending.stripe_customer_id.as_str()).metadata(metadata);
        let key = match IdempotencyKey::new(idempotency_key(pending)) {
            Ok(key) => key,
            Err(err) => return Attempt::GiveUp(err.to_string()),
        };
        let sent = request
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .timeout(ATTEMPT_TIMEOUT)
            .send(client)
            .await;

        match sent {
            Ok(_) => Attempt::Written,
            Err(err) => classify(&err, pending.attempts),
        }
    }

    async fn finish(&self, pending: &PendingMetadata, attempt: Attempt) -> Result<(), StoreError> {
        let customer = pending.stripe_customer_id.as_str();
        let retry_at_ms = match &attempt {
            Attempt::Written => {
                debug!(stripe_customer = customer, tier = %pending.tier, "tier metadata written");
                None
            }
            Attempt::Skipped => {
                debug!(
                    stripe_customer = customer,
                    tier = %pending.tier,
                    "no Stripe client configured; tier metadata not written"
                );
                None
            }
            Attempt::GiveUp(reason) => {
                error!(
                    stripe_customer = customer,
                    tier = %pending.tier,
                    attempts = pending.attempts + 1,
                    error = %reason,
                    "failed to write the tier metadata; giving up on this tier"
                );
                None
            }
            Attempt::Retry(reason) => {
                let delay = backoff(pending.attempts);
                warn!(
                    stripe_customer = customer,
                    tier = %pending.tier,
                    attempts = pending.attempts + 1,
                    retry_in_ms = delay.as_millis(),
                    error = %reason,
                    "failed to write the tier metadata; retrying"
                );
                let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                Some(unix_now_ms().saturating_add(delay_ms))
            }
        };

        let pending = pending.clone();
        self.inner
            .store
            .write(
                "update pending tier metadata",
                move |conn| match retry_at_ms {
                    Some(at_ms) => state::retry_metadata(conn, &pending, at_ms),
                    None => state::finish_metadata(conn, &pending),
                },
            )
            .await
    }
}

fn log_store_failure(err: &StoreError) {
    error!(
        error = %err,
        cause = %root_cause(err),
        retry_in_s = STORE_RETRY.as_secs(),
        "tier metadata writer failed to access the store; retrying"
    );
}

/// Sorts a failed request into retry or give up, after `attempts` earlier
/// failures.
fn classify(err: &StripeError, attempts: u32) -> Attempt {
    match err {
        StripeError::Stripe(api_error, status) => {
            let message = format!(
                "Stripe returned status {status}: {}",
                api_error.message.as_deref().unwrap_or("no message")
            );
            if *status == 429 || *status >= 500 {
                Attempt::Retry(message)
            } else {
                Attempt::GiveUp(message)
            }
        }
        StripeError::ClientError(_) | StripeError::Timeout => Attempt::Retry(err.to_string()),
        StripeError::JSONDeserialize(_) if attempts + 1 < MAX_UNDECODED_ATTEMPTS => {
            Attempt::Retry(err.to_string())
        }
        StripeError::JSONDeserialize(_) | StripeError::ConfigError(_) => {
            Attempt::GiveUp(err.to_string())
        }
    }
}

/// Idempotency key of one attempt. Each attempt gets a new key, because
/// Stripe returns the saved response of a known key, 500 errors included
/// (docs.stripe.com/idempotency). The key starts with
/// [`OWN_WRITE_KEY_PREFIX`] so that the `customer.updated` event the write
/// causes is recognised as ours.
fn idempotency_key(pending: &PendingMetadata) -> String {
    let mut hash = Sha256::new();
    hash.update(pending.stripe_customer_id.as_bytes());
    hash.update(pending.version.to_le_bytes());
    hash.update(pending.attempts.to_le_bytes());
    hash.update(unix_now_ms().to_le_bytes());
    format!("{OWN_WRITE_KEY_PREFIX}{}", hex::encode(hash.finalize()))
}

/// Delay before the attempt after `attempts` earlier failures: exponential
/// from [`BACKOFF_BASE`] up to [`BACKOFF_MAX`], with a random half of it
/// (jitter) so that many customers do not retry in step.
fn backoff(attempts: u32) -> Duration {
    let exponent = attempts.min(16);
    let ceiling = BACKOFF_BASE
        .saturating_mul(1_u32 << exponent)
        .min(BACKOFF_MAX);
    let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    let half_ms = ceiling_ms / 2;

    // Without randomness the delay stays valid, only without jitter.
    let random = getrandom::u64().unwrap_or(0);
    let jitter_ms = random.checked_rem(half_ms + 1).unwrap_or(0);
    Duration::from_millis(ceiling_ms - half_ms + jitter_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        for attempts in 0..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << attempts.min(16))
                .min(BACKOFF_MAX);

            let delay = backoff(attempts);

            assert!(delay <= ceiling, "attempts {attempts}: {delay:?}");
            assert!(delay >= ceiling / 2, "attempts {attempts}: {delay:?}");
        }
    }

    #[test]
    fn statuses_are_classified() {
        let api_error =
            || crate::billing::sink::test_api_error(stripe::ApiErrorsType::ApiError, None);
        let cases = [
            (StripeError::Stripe(api_error(), 429), true),
            (StripeError::Stripe(api_error(), 500), true),
            (StripeError::Stripe(api_error(), 503), true),
            (StripeError::Stripe(api_error(), 400), false),
            (StripeError::Stripe(api_error(), 404), false),
            (StripeError::ClientError("connection refused".into()), true),
            (StripeError::Timeout, true),
            (StripeError::ConfigError("bad account".into()), false),
        ];

        for (err, retry) in cases {
            let attempt = classify(&err, 0);

            assert_eq!(
                matches!(attempt, Attempt::Retry(_)),
                retry,
                "{err}: {attempt:?}"
            );
        }
    }

    #[test]
    fn undecoded_responses_are_retried_a_few_times() {
        let err = StripeError::JSONDeserialize("error deserializing Stripe error".into());

        let early = classify(&err, 0);
        let last = classify(&err, MAX_UNDECODED_ATTEMPTS - 1);

        assert!(matches!(early, Attempt::Retry(_)), "{early:?}");
        assert!(matches!(last, Attempt::GiveUp(_)), "{last:?}");
    }

    #[test]
    fn idempotency_keys_are_ours_and_differ_per_attempt() {
        let pending = PendingMetadata {
            stripe_key: "cus_1".into(),
            stripe_customer_id: "cus_1".into(),
            tier: "pro".into(),
            version: 3,
            attempts: 0,
        };
        let retried = PendingMetadata {
            attempts: 1,
            ..pending.clone()
        };

        let first = idempotency_key(&pending);
        let second = idempotency_key(&retried);

        assert!(first.starts_with(OWN_WRITE_KEY_PREFIX), "{first}");
        assert!(first.len() <= 255, "{first}");
        assert_ne!(first, second);
    }
}
