//! Start-up and background work of the privacy services: the keys, the
//! asset region registry and the erased customers pushed to the filter
//! instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::ServerError;
use crate::admin_service::{AdminService, PeerOutcome};
use crate::config::Config;
use crate::keys::{KeyProvider, LocalKeyFile};
use crate::privacy::Privacy;
use crate::pushes::Pushes;
use crate::store::Store;

/// Interval at which the erasures due are passed on to the peer sidecars.
const FORWARD_INTERVAL: Duration = Duration::from_secs(2);

/// Interval at which the erasure notices of other sidecars are read.
const NOTICE_INTERVAL: Duration = Duration::from_secs(2);

/// Interval at which erased customers whose tokens have expired are
/// dropped from the set pushed to the instances, and failed removals of
/// Redis counts are retried.
const ERASED_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Opens the key file, creating it with one key when missing.
pub(super) async fn open_keys(config: &Config) -> Result<Arc<dyn KeyProvider>, ServerError> {
    let path = config.privacy().key_file.clone();
    let keys: Arc<dyn KeyProvider> =
        Arc::new(tokio::task::spawn_blocking(move || LocalKeyFile::open_or_create(&path)).await??);
    info!(
        key_file = %config.privacy().key_file.display(),
        key_encryption_key = %keys.current_kek_id(),
        "encryption keys loaded"
    );
    Ok(keys)
}

/// Builds the privacy services' state on the store's key of the customer
/// id hashes.
pub(super) fn open(
    config: &Config,
    store: &Store,
    keys: Arc<dyn KeyProvider>,
    pushes: Arc<Pushes>,
) -> Privacy {
    Privacy {
        pushes,
        keys,
        identities: store.identities().clone(),
        token_lifetime_s: config.privacy().token_lifetime_seconds,
        erasure_peers: config.privacy().erasure_peers.clone().into(),
    }
}

/// Loads the registry, the erased customers and the instances'
/// acknowledgements into the pushed sets.
pub(super) async fn load(admin: &AdminService) -> Result<(), ServerError> {
    let status = |err: tonic::Status| ServerError::Privacy(err.message().to_owned());
    admin.reload_assets().await.map_err(status)?;
    admin.reload_erased().await.map_err(status)?;
    admin.load_acks().await.map_err(status)?;
    admin.warn_unlisted_peers().await.map_err(status)?;
    Ok(())
}

/// Drops, every 10 s, erased customers whose tokens have expired and
/// retries removing erased customers' counts from Redis. With Redis, reads
/// every 2 s the erasures that other sidecars announced and applies them.
pub(super) async fn reload_erased(admin: AdminService) {
    let mut last_reload = Instant::now();
    let mut notices_failing = false;
    loop {
        tokio::time::sleep(NOTICE_INTERVAL).await;
        match admin.apply_erasure_notices().await {
            Ok(()) => {
                if notices_failing {
                    info!("erasure notices of the other sidecars are read again");
                }
                notices_failing = false;
            }
            Err(err) => {
                // Once per outage: Redis being down is logged by the
                // shared counters already.
                if !notices_failing {
                    warn!(error = %err.message(), "failed to apply the erasure notices of the other sidecars; retrying every 2 s");
                }
                notices_failing = true;
            }
        }
        if last_reload.elapsed() < ERASED_RELOAD_INTERVAL {
            continue;
        }
        last_reload = Instant::now();
        if let Err(err) = admin.reload_erased().await {
            warn!(error = %err.message(), "failed to reload the erased customers; keeping the set in force");
        }
        if let Err(err) = admin.retry_counter_cleanup().await {
            warn!(error = %err.message(), "failed to retry removing erased customers' Redis counts");
        }
    }
}

/// Passes, every 2 s, the erasures that are due on to their peer
/// sidecars, until `stop` turns true. Each peer gets a task of its own, and
/// a peer whose task still runs is skipped, so a peer that is slow to
/// reply delays neither the others nor any other work. On stop, the
/// peers' tasks are cancelled and awaited.
pub(super) async fn forward_erasures(
    admin: AdminService,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut running = tokio::task::JoinSet::new();
    let mut busy: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut health: HashMap<String, PeerHealth> = HashMap::new();
    let mut reading_failed = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(FORWARD_INTERVAL) => {}
            _ = stop.changed() => break,
        }
        while let Some(finished) = running.try_join_next_with_id() {
            let (id, outcome) = match finished {
                Ok((id, outcome)) => (id, outcome),
                Err(err) => {
                    let message = format!("passing erasures on stopped: {err}");
                    (err.id(), Err(tonic::Status::internal(message)))
                }
            };
            if let Some(peer) = busy.remove(&id) {
                health.entry(peer.clone()).or_default().note(&peer, outcome);
            }
        }
        let due = match admin.due_forwards().await {
            Ok(due) => {
                reading_failed = false;
                due
            }
            Err(err) => {
                if !reading_failed {
                    warn!(error = %err.message(), "failed to read the erasures to pass on to the peer sidecars; retrying every 2 s");
                }
                reading_failed = true;
                continue;
            }
        };
        for (peer, rows) in due {
            if busy.values().any(|running_peer| running_peer == &peer) {
                continue;
            }
            let admin = admin.clone();
            let task_peer = peer.clone();
            let handle =
                running.spawn(async move { admin.forward_to_peer(&task_peer, &rows).await });
            busy.insert(handle.id(), peer);
        }
    }
    running.shutdown().await;
}

/// How often a peer that keeps failing is logged again.
const PEER_WARN_INTERVAL: Duration = Duration::from_secs(3_600);

/// Whether a peer sidecar is failing, for logging each outage once and
/// then hourly, whatever the number of erasures waiting for it. An outage
/// lasts while any erasure for the peer fails, also when others succeed.
#[derive(Debug, Default)]
struct PeerHealth {
    /// Failed calls since the outage began.
    failures: u64,
    /// When the outage was last logged.
    logged_at: Option<Instant>,
}

/// The log line, if any, that a peer's latest call calls for.
#[derive(Debug, PartialEq, Eq)]
enum PeerLog {
    /// Nothing to log.
    Quiet,
    /// The peer fails, and the outage is new or was last logged an hour
    /// ago or more.
    Failing { failed_calls: u64, error: String },
    /// The outage is over: nothing for the peer fails any more.
    Recovered { failed_calls: u64 },
}

impl PeerHealth {
    /// Notes the outcome of a call to `peer` and logs what is due.
    fn note(&mut self, peer: &str, outcome: Result<PeerOutcome, tonic::Status>) {
        match self.record(outcome, Instant::now()) {
            PeerLog::Quiet => {}
            PeerLog::Failing {
                failed_calls,
                error,
            } => warn!(
                peer,
                failed_calls,
                error,
                "failed to pass erasures on to a peer sidecar; retrying with a delay of up to 5 \
                 minutes, and GetErasure lists the peer until it succeeds"
            ),
            PeerLog::Recovered { failed_calls } => {
                info!(peer, failed_calls, "peer sidecar erases customers again")
            }
        }
    }

    /// Notes the outcome of a call that ended at `now`.
    fn record(&mut self, outcome: Result<PeerOutcome, tonic::Status>, now: Instant) -> PeerLog {
        let error = match outcome {
            Ok(PeerOutcome {
                error: None,
                failing,
            }) => {
                if failing == 0 && self.failures > 0 {
                    let failed_calls = self.failures;
                    *self = PeerHealth::default();
                    return PeerLog::Recovered { failed_calls };
                }
                return PeerLog::Quiet;
            }
            Ok(PeerOutcome {
                error: Some(error), ..
            }) => error,
            Err(status) => status.message().to_owned(),
        };
        self.failures += 1;
        let due = self
            .logged_at
            .is_none_or(|logged| now.saturating_duration_since(logged) >= PEER_WARN_INTERVAL);
        if !due {
            return PeerLog::Quiet;
        }
        self.logged_at = Some(now);
        PeerLog::Failing {
            failed_calls: self.failures,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(error: &str) -> Result<PeerOutcome, tonic::Status> {
        Ok(PeerOutcome {
            error: Some(error.to_owned()),
            failing: 1,
        })
    }

    fn succeeded(failing: u64) -> Result<PeerOutcome, tonic::Status> {
        Ok(PeerOutcome {
            error: None,
            failing,
        })
    }

    fn failing(failed_calls: u64, error: &str) -> PeerLog {
        PeerLog::Failing {
            failed_calls,
            error: error.to_owned(),
        }
    }

    #[test]
    fn outage_logged_once_then_hourly() {
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        let mut health = PeerHealth::default();
        assert_eq!(
            health.record(failed("refused"), start),
            failing(1, "refused")
        );
        for calls in 1..60 {
            let at = start + minute * calls;
            assert_eq!(health.record(failed("refused"), at), PeerLog::Quiet);
        }
        let hour_later = start + PEER_WARN_INTERVAL;
        assert_eq!(
            health.record(failed("timed out"), hour_later),
            failing(61, "timed out")
        );
        let status = Err(tonic::Status::internal("task stopped"));
        assert_eq!(health.record(status, hour_later + minute), PeerLog::Quiet);
    }

    #[test]
    fn recovery_is_logged_once_nothing_fails() {
        let now = Instant::now();
        let mut health = PeerHealth::default();
        assert_eq!(health.record(succeeded(0), now), PeerLog::Quiet);
        assert_eq!(health.record(failed("refused"), now), failing(1, "refused"));
        assert_eq!(health.record(failed("refused"), now), PeerLog::Quiet);
        // One erasure went through, but another still fails.
        assert_eq!(health.record(succeeded(1), now), PeerLog::Quiet);
        assert_eq!(
            health.record(succeeded(0), now),
            PeerLog::Recovered { failed_calls: 2 }
        );
        assert_eq!(health.record(succeeded(0), now), PeerLog::Quiet);
        // A new outage is logged at once.
        assert_eq!(health.record(failed("refused"), now), failing(1, "refused"));
    }
}
