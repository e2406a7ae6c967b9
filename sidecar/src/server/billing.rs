//! Start-up of billing: the Stripe client, the billing loop, the webhook
//! handler, the admin service and their background tasks.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::{ServerError, generated_sidecar_id};
use crate::admin_service::AdminService;
use crate::billing::biller::{Biller, Destination};
use crate::billing::queue::LedgerKey;
use crate::billing::reconcile;
use crate::billing::sink::{FileSink, StripeSink};
use crate::billing::webhook::{self, WebhookHandler, WebhookSettings};
use crate::config::Config;
use crate::config::billing::StripeAccess;
use crate::ledger::{TimeRange, unix_now_s};
use crate::metrics::Metrics;
use crate::privacy::Privacy;
use crate::store::Store;
use crate::sync_service::SyncService;

/// Timeout of one request to Stripe.
const STRIPE_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval at which tier overrides are reloaded even without a change
/// notice, so a missed notice delays a change by this much at most.
const OVERRIDES_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// The billing parts the server runs.
pub(super) struct BillingParts {
    pub(super) admin: AdminService,
    biller: Biller,
    webhooks: WebhookHandler,
    overrides_changed: Arc<Notify>,
}

/// Builds the billing parts over `store`.
pub(super) async fn billing_parts(
    config: &Config,
    store: &Store,
    metrics: &Metrics,
    privacy: Option<Privacy>,
) -> Result<BillingParts, ServerError> {
    let billing = config.billing();
    let ledger_id = store
        .meta_or_insert("ledger_id", generated_sidecar_id)
        .await?;
    let stripe = billing.stripe.as_ref().map(stripe_client).transpose()?;
    let destination = match &stripe {
        Some(client) => {
            info!(
                ledger_id,
                region = billing.settings.region,
                "meter events go to Stripe"
            );
            Destination::Stripe(Box::new(StripeSink::new(
                client.clone(),
                billing.settings.names.clone(),
            )))
        }
        None => {
            info!(
                path = %billing.settings.outbox_path.display(),
                "no STRIPE_API_KEY; meter events go to the outbox file"
            );
            Destination::File(FileSink::new(
                billing.settings.outbox_path.clone(),
                billing.settings.names.clone(),
            ))
        }
    };
    let biller = Biller::new(
        store.clone(),
        LedgerKey {
            region: billing.settings.region.clone(),
            ledger_id,
        },
        billing.settings.clone(),
        destination,
        metrics.clone(),
    );
    let overrides_changed = Arc::new(Notify::new());
    let webhooks = WebhookHandler::new(
        store.clone(),
        WebhookSettings {
            secrets: billing.webhook.secrets.clone(),
            tolerance: billing.webhook.tolerance,
            price_tiers: billing.webhook.price_tiers.clone(),
            canceled_tier: billing.webhook.canceled_tier.clone(),
            known_tiers: config
                .tiers()
                .iter()
                .map(|tier| tier.name.clone())
                .collect(),
        },
        stripe,
        Arc::clone(&overrides_changed),
        privacy.clone(),
    );
    let mut admin = AdminService::new(
        biller.clone(),
        metrics.clone(),
        Arc::clone(&overrides_changed),
        tier_of,
    );
    if let Some(privacy) = privacy {
        admin = admin.with_privacy(privacy);
    }
    Ok(BillingParts {
        admin,
        biller,
        webhooks,
        overrides_changed,
    })
}

impl BillingParts {
    /// Starts the billing loop, the metadata writer, the override reloads,
    /// the reconciliation job and the HTTP server; each stops when `stop`
    /// turns true.
    pub(super) fn spawn(
        self,
        config: &Config,
        sync: SyncService,
        metrics: Metrics,
        http: TcpListener,
        stop: &watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.biller.clone().run(stop.clone())),
            tokio::spawn(self.webhooks.clone().run_metadata_writer(stop.clone())),
            tokio::spawn(reload_overrides(
                self.biller.store().clone(),
                sync,
                Arc::clone(&self.overrides_changed),
                stop.clone(),
            )),
            tokio::spawn(crate::http::serve(
                http,
                self.webhooks.clone(),
                metrics.clone(),
                stop.clone(),
            )),
        ];
        if let Some(interval) = config.billing().reconcile_interval {
            tasks.push(tokio::spawn(reconcile_daily(
                self.biller,
                metrics,
                interval,
                stop.clone(),
            )));
        }
        tasks
    }
}

fn stripe_client(access: &StripeAccess) -> Result<stripe::Client, ServerError> {
    let mut builder = stripe::ClientBuilder::new(access.api_key.clone()).timeout(STRIPE_TIMEOUT);
    if let Some(base) = &access.api_base {
        builder = builder.url(base.clone());
    }
    builder.build().map_err(ServerError::Stripe)
}

/// Returns the tier billing assigned to the customer of pseudonym
/// `customer`.
fn tier_of(conn: &rusqlite::Connection, customer: &str) -> rusqlite::Result<Option<String>> {
    Ok(webhook::tier_overrides(conn)?
        .into_iter()
        .find(|(candidate, _)| candidate == customer)
        .map(|(_, tier)| tier))
}

/// Loads the tier overrides into the sync service at start, after every
/// change notice and every few seconds.
async fn reload_overrides(
    store: Store,
    sync: SyncService,
    changed: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let identities = store.identities().clone();
        match store
            .read("read tier overrides", move |conn| {
                webhook::named_tier_overrides(conn, &identities)
            })
            .await
        {
            Ok(overrides) => sync.set_tier_overrides(overrides),
            Err(err) => {
                error!(error = %err, "failed to read the tier overrides; keeping the set in force")
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(OVERRIDES_RELOAD_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Reconciles the two previous UTC days every `interval`, correcting usage
/// that Stripe is missing. An hour whose events were sent just before a
/// run is left uncorrected while Stripe's summaries settle, so each day is
/// reconciled twice. Corrections are tied to the hour, so the overlap
/// corrects nothing twice.
async fn reconcile_daily(
    biller: Biller,
    metrics: Metrics,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let today = unix_now_s() / 86_400 * 86_400;
        let range = TimeRange {
            start_unix_s: today - 2 * 86_400,
            end_unix_s: today,
        };
        if let Err(err) = reconcile::reconcile(&biller, &metrics, range, true).await {
            error!(error = %err, start_unix_s = range.start_unix_s, "daily reconciliation failed; it runs again next interval, or run `veo-sidecar reconcile`");
        }
    }
}
