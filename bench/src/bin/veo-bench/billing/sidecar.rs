//! One sidecar under measurement: the real `veo-sidecar` in a fresh temporary directory,
//! billing a fresh fake Stripe that has the two meters and one Stripe customer per customer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tempfile::TempDir;
use tonic::transport::Channel;
use veo_proto::admin::SetStripeCustomerRequest;
use veo_proto::admin::admin_client::AdminClient;
use veo_tests::sidecar::Sidecar;
use veo_tests::stripe::FakeStripe;

/// Secret key of the fake Stripe.
pub const API_KEY: &str = "sk_test_veo_bench_billing";

/// Stripe event names of the sidecar's meters.
pub const METER_EVENT_NAMES: [&str; 2] = ["api_requests", "egress_bytes"];

/// Pause after the customers are mapped. Every mapping starts a billing round, and those
/// rounds find nothing to bill, so they end within milliseconds. Usage sent before they end
/// could be billed early in parts of its buckets.
const SETTLE: Duration = Duration::from_millis(500);

/// Interval between polls of the fake's meter events.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Billing limits of the sidecar under measurement.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `billing.max_concurrent_requests`.
    pub max_concurrent_requests: usize,
    /// `billing.max_events_per_second`.
    pub max_events_per_second: u32,
}

/// A running sidecar, its fake Stripe and its customers' Stripe customers. Dropping it kills
/// the sidecar, stops the fake and removes the directory.
pub struct BillingSidecar {
    sidecar: Sidecar,
    stripe: FakeStripe,
    admin: AdminClient<Channel>,
    /// Customer and Stripe customer id of each mapping.
    mappings: Vec<(String, String)>,
    /// Declared last so that it is removed after the sidecar has stopped.
    _dir: TempDir,
}

/// Meter events that reached the fake after a billing round started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Events the fake contained when the wait ended.
    pub events: usize,
    /// Time from the start of the round until the fake contained the first event: the
    /// round's start, the closing of the buckets and the first request.
    pub first_event: Option<Duration>,
    /// Time from the start of the round until the fake contained the expected events; `None`
    /// when the wait timed out first.
    pub elapsed: Option<Duration>,
}

impl BillingSidecar {
    /// Starts a fake Stripe with the meters and a Stripe customer for each of `customers`,
    /// then the sidecar, and maps every customer to its Stripe customer. The sidecar runs a
    /// billing round at start and after each mapping. Its periodic rounds are an hour apart,
    /// so once those rounds end, none starts before [`BillingSidecar::start_round`].
    pub async fn start(customers: &[String], limits: Limits) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("veo-bench-billing-")
            .tempdir()
            .context("failed to create a temporary directory for the sidecar")?;
        let stripe = FakeStripe::start(API_KEY).await?;
        for name in METER_EVENT_NAMES {
            stripe.create_meter(name)?;
        }
        let mappings: Vec<(String, String)> = customers
            .iter()
            .map(|customer| {
                let stripe_id = stripe.create_customer(&[("veo_customer_id", customer.as_str())]);
                (customer.clone(), stripe_id)
            })
            .collect();

        let base_url = stripe.base_url();
        let env = [
            ("STRIPE_API_KEY", API_KEY),
            ("STRIPE_API_BASE", base_url.as_str()),
        ];
        let toml = sidecar_toml(limits);
        let sidecar = Sidecar::start_with_env(dir.path(), Some(toml.as_str()), &env).await?;
        let admin = sidecar.admin().await?;
        let mut billing = BillingSidecar {
            sidecar,
            stripe,
            admin,
            mappings,
            _dir: dir,
        };
        for index in 0..billing.mappings.len() {
            billing.map_customer(index).await?;
        }
        tokio::time::sleep(SETTLE).await;
        Ok(billing)
    }

    /// Returns the address of the sidecar's gRPC server.
    pub fn address(&self) -> SocketAddr {
        self.sidecar.address()
    }

    /// Returns the fake Stripe.
    pub fn stripe(&self) -> &FakeStripe {
        &self.stripe
    }

    /// Starts a billing round by setting the first customer's Stripe customer again, which
    /// wakes the billing loop. Fails when the fake already contains events, because then a
    /// round started earlier and the measurement would miss its work.
    pub async fn start_round(&mut self) -> anyhow::Result<()> {
        let early = self.stripe.meter_events().len();
        ensure!(
            early == 0,
            "the fake Stripe received {early} meter events before the measured billing round \
             started, so an earlier round billed part of the usage; run the benchmark again, \
             and if it repeats, check the sidecar's log for billing rounds"
        );
        self.map_customer(0).await
    }

    /// Polls the fake every 10 ms until it contains at least `expected` meter events or
    /// `timeout` passes, measuring from `started`.
    pub async fn wait_for_events(
        &self,
        started: Instant,
        expected: usize,
        timeout: Duration,
    ) -> Delivery {
        let mut first_event = None;
        loop {
            let events = self.stripe.meter_events().len();
            if events > 0 && first_event.is_none() {
                first_event = Some(started.elapsed());
            }
            if events >= expected {
                return Delivery {
                    events,
                    first_event,
                    elapsed: Some(started.elapsed()),
                };
            }
            if started.elapsed() > timeout {
                return Delivery {
                    events,
                    first_event,
                    elapsed: None,
                };
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Stops the sidecar with SIGTERM and waits for it to exit, so that its last billing
    /// round, which bills every bucket, has run. It must run on a multi-thread runtime, as
    /// `main`'s is.
    pub fn stop(&mut self) {
        // The harness waits for the exit in a blocking loop, while the fake Stripe of this
        // runtime still serves the last round.
        tokio::task::block_in_place(|| self.sidecar.stop());
    }

    async fn map_customer(&mut self, index: usize) -> anyhow::Result<()> {
        let Some((customer, stripe_id)) = self.mappings.get(index).cloned() else {
            return Ok(());
        };
        let request = SetStripeCustomerRequest {
            customer: customer.clone(),
            stripe_customer_id: stripe_id.clone(),
        };
        self.admin
            .set_stripe_customer(request)
            .await
            .with_context(|| {
                format!(
                    "SetStripeCustomer of {customer} to {stripe_id} failed at the sidecar {}",
                    self.sidecar.address()
                )
            })?;
        Ok(())
    }
}

/// Returns the sidecar's config file: billing rounds an hour apart and minutes closed as
/// soon as they end, so that only the rounds the benchmark starts bill anything.
fn sidecar_toml(limits: Limits) -> String {
    format!(
        "[billing]\n\
         region = \"bench\"\n\
         sync_interval_seconds = 3600\n\
         close_delay_seconds = 0\n\
         max_events_per_second = {}\n\
         max_concurrent_requests = {}\n\
         reconcile_interval_seconds = 0\n",
        limits.max_events_per_second, limits.max_concurrent_requests
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecar_toml_sets_limits() {
        let toml = sidecar_toml(Limits {
            max_concurrent_requests: 32,
            max_events_per_second: 10_000,
        });
        assert!(toml.contains("max_concurrent_requests = 32\n"));
        assert!(toml.contains("max_events_per_second = 10000\n"));
        assert!(toml.contains("sync_interval_seconds = 3600\n"));
    }
}
