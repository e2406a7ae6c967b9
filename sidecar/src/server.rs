//! Server lifecycle: open the store, bind, serve every gRPC service on one
//! port, announce readiness, and stop cleanly on SIGTERM or SIGINT.

mod billing;
mod privacy;
mod ready_file;
mod shutdown;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{error, info, warn};
use veo_proto::admin::admin_server::AdminServer;
use veo_proto::sync::sync_server::SyncServer;
use veo_proto::usage::usage_server::UsageServer;

use crate::admin_service::AdminService;
use crate::config::{Config, CountersConfig};
use crate::counters::redis::RedisCounters;
use crate::counters::shared::SharedCounters;
use crate::metrics::Metrics;
use crate::pushes::Pushes;
use crate::remote::DEFAULT_MAX_SERIES;
use crate::store::{Store, StoreError};
use crate::sync_service::SyncService;
use crate::usage_service::UsageService;
use billing::billing_parts;
use shutdown::StopSignals;

/// Maximum size of one encoded usage record inside a `SyncRequest`, in
/// bytes: a 256-byte customer, a 64-byte tier, the latest minute, the
/// maximum counts, quota and egress bytes, with their field tags and
/// lengths.
const MAX_ENCODED_RECORD_BYTES: usize = 367;

/// Upper bound on the rest of an encoded `SyncRequest`, in bytes: a
/// 256-byte instance id, the sequence and the creation time, with room to
/// spare.
const MAX_ENCODED_REQUEST_BYTES: usize = 1024;

/// Errors that stop the sidecar.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The usage store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("failed to bind {address}; choose another address with --listen")]
    Bind {
        /// The configured address.
        address: SocketAddr,
        /// Cause reported by the OS.
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("failed to install the SIGTERM and SIGINT handlers")]
    Signals(#[source] std::io::Error),
    /// The reflection service rejected the descriptor sets.
    #[error("failed to build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The ready file could not be written.
    #[error("failed to write the ready file {}; check that its directory exists", path.display())]
    ReadyFile {
        /// Path of the ready file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server stopped with an error.
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The shared counters could not be set up.
    #[error("failed to set up the shared counters")]
    Counters(#[source] crate::counters::CounterError),
    /// The metrics registry rejected a metric.
    #[error("failed to register the metrics")]
    Metrics(#[from] prometheus::Error),
    /// The Stripe client could not be built.
    #[error("failed to build the Stripe client; check STRIPE_API_KEY and STRIPE_API_BASE")]
    Stripe(#[source] stripe::StripeError),
    /// The HTTP address could not be bound.
    #[error("failed to bind the HTTP address {address}; choose another with --http-listen")]
    HttpBind {
        /// The configured address.
        address: SocketAddr,
        /// Cause reported by the OS.
        #[source]
        source: std::io::Error,
    },
    /// Another sidecar uses the data directory.
    #[error(
        "data directory {} is in use by a running veo-sidecar; stop it first for an offline \
         command such as rotate-keys, or give each sidecar its own --data-dir",
        path.display()
    )]
    DataDirInUse {
        /// The data directory.
        path: PathBuf,
    },
    /// The data directory's path names something other than a directory.
    #[error("data directory {} exists but is not a directory; give --data-dir (data_dir) a directory", path.display())]
    NotADirectory {
        /// The data directory.
        path: PathBuf,
    },
    /// The lock file of the data directory could not be opened.
    #[error("failed to open the lock file {}; check the data directory's permissions", path.display())]
    LockFile {
        /// The lock file.
        path: PathBuf,
        /// Cause reported by the file system.
        #[source]
        source: std::io::Error,
    },
    /// The encryption keys could not be opened.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// The keys, the erasures or the asset regions failed to load at start.
    #[error("failed to load the keys, erasures or asset regions: {0}")]
    Privacy(String),
    /// A blocking start-up task was cancelled or panicked.
    #[error("start-up task did not finish")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the sidecar until SIGTERM or SIGINT, then lets in-flight calls
/// finish (up to the configured grace period) and closes the store.
pub async fn run(config: Config) -> Result<(), ServerError> {
    info!(
        origin = %config.origin(),
        listen = %config.listen(),
        data_dir = %config.data_dir().display(),
        window_seconds = config.window_seconds(),
        max_records_per_batch = config.max_records_per_batch(),
        "config loaded"
    );

    // Two sidecars on one store would bill the same ledger twice under one
    // ledger id; the lock lasts until the process exits.
    let _lock = lock_data_dir(config.data_dir())?;
    let keys = privacy::open_keys(&config).await?;
    let data_dir = config.data_dir().to_path_buf();
    let store_keys = Arc::clone(&keys);
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, store_keys)).await??;
    info!(path = %store.path().display(), "usage store open");

    let (listener, address) = bind(config.listen()).await?;
    let http_address = config.billing().http_listen;
    let (http_listener, http_address) =
        crate::http::bind(http_address)
            .await
            .map_err(|source| ServerError::HttpBind {
                address: http_address,
                source,
            })?;
    let mut signals = StopSignals::install().map_err(ServerError::Signals)?;
    let metrics = Metrics::new()?;
    let pushes = Arc::new(Pushes::new(crate::sync_service::first_overrides_version()));
    let privacy = privacy::open(&config, &store, keys, Arc::clone(&pushes));
    let billing = billing_parts(&config, &store, &metrics, Some(privacy)).await?;
    privacy::load(&billing.admin).await?;
    let (health, router, shared, sync) = build_router(
        &config,
        &store,
        billing.admin.clone(),
        metrics.clone(),
        pushes,
    )
    .await?;
    let admin = billing
        .admin
        .clone()
        .with_counters(sync.recent(), shared.clone());
    let (stop_forwarding, forwarding_stopped) = tokio::sync::watch::channel(false);
    let forwarding = tokio::spawn(privacy::forward_erasures(admin.clone(), forwarding_stopped));
    let erased_reload = tokio::spawn(privacy::reload_erased(admin));
    let (stop_billing, billing_stopped) = tokio::sync::watch::channel(false);
    let billing_tasks = billing.spawn(
        &config,
        sync.clone(),
        metrics.clone(),
        http_listener,
        &billing_stopped,
    );
    info!(address = %http_address, webhook_path = crate::http::WEBHOOK_PATH, "HTTP listening (webhooks, metrics)");
    if let Some(path) = &config.billing().http_ready_file
        && let Err(source) = ready_file::write(path, http_address).await
    {
        return Err(ServerError::ReadyFile {
            path: path.clone(),
            source,
        });
    }
    let reload = tokio::spawn(reload_tiers_on_hangup(config.clone(), sync));
    let (stop_counters, counters_stopped) = tokio::sync::watch::channel(false);
    let counters_task =
        shared.map(|shared| tokio::spawn(shared.run(health.clone(), counters_stopped)));
    let (stop, stopped) = oneshot::channel::<()>();
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(
        // Without TCP_NODELAY, Nagle's algorithm holds back the reply's
        // last frames until the client's delayed ACK, which adds tens of
        // milliseconds to replies larger than one segment.
        TcpIncoming::from(listener).with_nodelay(Some(true)),
        async {
            let _ = stopped.await;
        },
    ));

    if let Some(path) = config.ready_file()
        && let Err(source) = ready_file::write(path, address).await
    {
        server.abort();
        return Err(ServerError::ReadyFile {
            path: path.to_path_buf(),
            source,
        });
    }
    info!(address = %address, "listening");

    tokio::select! {
        signal = signals.recv() => info!(signal, "shutting down"),
        result = &mut server => {
            // The server only returns on its own when it fails.
            result??;
            return Ok(());
        }
    }

    set_status(&health, ServingStatus::NotServing).await;
    let _ = stop.send(());
    // The billing loop's last round runs while the gRPC server drains,
    // because a connected Envoy can keep the drain waiting for the whole
    // grace period. Usage of a batch applied meanwhile is billed as one
    // more event at the next start.
    let _ = stop_billing.send(true);
    finish(server, config.shutdown_grace()).await;
    if let Some(task) = counters_task {
        // One last exchange writes the outbox to Redis. Rows it cannot
        // write stay in the outbox for the next start.
        let _ = stop_counters.send(true);
        if tokio::time::timeout(config.shutdown_grace(), task)
            .await
            .is_err()
        {
            warn!(
                "the last exchange with the shared counters did not finish; the outbox keeps its rows"
            );
        }
    }
    // What the last billing round cannot send stays queued in the store
    // for the next start.
    for task in billing_tasks {
        if tokio::time::timeout(config.shutdown_grace(), task)
            .await
            .is_err()
        {
            warn!("a billing task did not stop in time; its work stays queued in the store");
        }
    }
    for path in [
        config.ready_file(),
        config.billing().http_ready_file.as_deref(),
    ]
    .into_iter()
    .flatten()
    {
        if let Err(err) = ready_file::remove(path).await {
            warn!(path = %path.display(), error = %err, "failed to remove the ready file");
        }
    }
    reload.abort();
    erased_reload.abort();
    let _ = stop_forwarding.send(true);
    // The reload tasks keep a handle to the store; wait until they are gone
    // so that the store closes cleanly.
    let _ = reload.await;
    let _ = erased_reload.await;
    let _ = forwarding.await;
    store.close().await;
    info!("stopped");
    Ok(())
}

async fn bind(address: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let bind_error = |source| ServerError::Bind { address, source };
    let listener = TcpListener::bind(address).await.map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    Ok((listener, bound))
}

/// Builds the router of every service and marks them serving. With Redis
/// configured, it also builds the shared counters, which the caller runs.
async fn build_router(
    config: &Config,
    store: &Store,
    admin: AdminService,
    metrics: Metrics,
    pushes: Arc<Pushes>,
) -> Result<(HealthReporter, Router, Option<SharedCounters>, SyncService), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut sync = SyncService::new(
        store.clone(),
        config.window_seconds(),
        config.max_records_per_batch(),
        DEFAULT_MAX_SERIES,
    )
    .with_allowance(config.allowance())
    .with_metrics(metrics)
    .with_pushes(pushes);
    if config.billing().settings.customer_usage_metrics {
        let ledger_id = store
            .meta_or_insert("ledger_id", generated_sidecar_id)
            .await?;
        sync = sync.with_customer_usage(ledger_id);
    }
    sync.set_tiers(config.tiers().to_vec());
    let mut shared = None;
    if let CountersConfig::Redis(redis) = config.counters() {
        let sidecar_id = match &redis.sidecar_id {
            Some(id) => id.clone(),
            None => {
                store
                    .meta_or_insert("sidecar_id", generated_sidecar_id)
                    .await?
            }
        };
        let backend = RedisCounters::new(redis.settings.clone(), sidecar_id.clone())
            .map_err(ServerError::Counters)?;
        info!(
            target = %backend.describe_target(),
            sidecar_id = %sidecar_id,
            shards = redis.settings.shards,
            flush_interval_ms = redis.flush_interval.as_millis(),
            sealed_notices = redis.settings.notice_key.is_some(),
            "counters shared through Redis"
        );
        if redis.settings.notice_key.is_none() {
            warn!(
                "erasure notices in Redis name the erased customer in clear, and any Redis client \
                 can write one; set counters.notice_key_file on every sidecar sharing the key \
                 prefix to seal them"
            );
        }
        let counters = SharedCounters::new(
            backend,
            store.clone(),
            sync.recent(),
            config.window_seconds(),
            redis.flush_interval,
        );
        sync = sync.with_shared(counters.clone());
        shared = Some(counters);
    }
    let usage = UsageService::new(store.clone());

    let router = Server::builder()
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(
            SyncServer::new(sync.clone())
                .max_decoding_message_size(max_sync_message_bytes(config.max_records_per_batch())),
        )
        .add_service(UsageServer::new(usage))
        .add_service(AdminServer::new(
            admin.with_counters(sync.recent(), shared.clone()),
        ));
    set_status(&health, ServingStatus::Serving).await;
    Ok((health, router, shared, sync))
}

/// Reloads the tier limits from the config file on each SIGHUP. A file
/// that fails validation leaves the limits in force and logs the error.
async fn reload_tiers_on_hangup(config: Config, sync: SyncService) {
    let mut hangups = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => signal,
        Err(err) => {
            warn!(error = %err, "failed to install the SIGHUP handler; tier limits reload only on restart");
            return;
        }
    };
    while hangups.recv().await.is_some() {
        match config.reload_tiers() {
            Ok(tiers) => {
                let names: Vec<String> = tiers
                    .iter()
                    .map(|tier| {
                        format!(
                            "{} quota={} burst={}/{}",
                            tier.name,
                            tier.quota_requests,
                            tier.burst_size_requests,
                            tier.burst_rate_per_second
                        )
                    })
                    .collect();
                info!(tiers = %names.join("; "), "tier limits reloaded; instances apply them at their next sync");
                sync.set_tiers(tiers);
            }
            Err(err) => {
                error!(
                    error = %crate::error_chain(&err),
                    "tier limits not reloaded; keeping the limits in force"
                )
            }
        }
    }
}

/// Creates the data directory when missing and takes an exclusive lock on
/// `DATA_DIR/sidecar.lock`.
pub fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, ServerError> {
    let path = data_dir.join("sidecar.lock");
    let lock_error = |source| ServerError::LockFile {
        path: path.clone(),
        source,
    };
    if data_dir.exists() && !data_dir.is_dir() {
        return Err(ServerError::NotADirectory {
            path: data_dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(data_dir).map_err(lock_error)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_error)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(ServerError::DataDirInUse {
            path: data_dir.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(lock_error(source)),
    }
}

/// Returns a new sidecar id: `sidecar-` and 16 hex digits of a randomly
/// seeded hash of the clock and process id. The caller stores it in the
/// data directory so that it survives restarts.
fn generated_sidecar_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("sidecar-{:016x}", hasher.finish())
}

/// Returns the maximum size of an encoded `SyncRequest` of `max_records`
/// valid records, in bytes. tonic's default limit of 4 MB would reject a valid batch of
/// long identifiers with `RESOURCE_EXHAUSTED` before validation, and
/// without naming the field.
fn max_sync_message_bytes(max_records: usize) -> usize {
    max_records
        .saturating_mul(MAX_ENCODED_RECORD_BYTES)
        .saturating_add(MAX_ENCODED_REQUEST_BYTES)
}

/// Waits for the server to finish its in-flight calls after the stop
/// signal, aborting it after `grace`.
async fn finish(mut server: JoinHandle<Result<(), tonic::transport::Error>>, grace: Duration) {
    match tokio::time::timeout(grace, &mut server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(err))) => error!(error = %err, "gRPC server failed while stopping"),
        Ok(Err(err)) => error!(error = %err, "gRPC server task failed while stopping"),
        Err(_) => {
            warn!(
                grace_seconds = grace.as_secs(),
                "in-flight calls did not finish within the grace period; closing them"
            );
            server.abort();
            let _ = server.await;
        }
    }
}

/// Describes this server's services for both reflection versions.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(veo_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Sets the overall status (service name "") and each service's status.
async fn set_status(health: &HealthReporter, status: ServingStatus) {
    for name in [
        "",
        <SyncServer<SyncService> as NamedService>::NAME,
        <UsageServer<UsageService> as NamedService>::NAME,
    ] {
        health.set_service_status(name, status).await;
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use veo_proto::sync::sync_client::SyncClient;
    use veo_proto::sync::{SyncRequest, UsageRecord};

    use super::*;

    #[test]
    fn second_lock_of_data_dir_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let first = lock_data_dir(&data_dir).unwrap();

        let err = lock_data_dir(&data_dir).unwrap_err();
        assert!(matches!(err, ServerError::DataDirInUse { .. }), "{err}");
        assert!(err.to_string().contains("--data-dir"), "{err}");

        drop(first);
        assert!(lock_data_dir(&data_dir).is_ok());
    }

    #[test]
    fn data_dir_that_is_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("afile");
        std::fs::write(&data_dir, b"").unwrap();

        let err = lock_data_dir(&data_dir).unwrap_err().to_string();

        assert!(err.contains("is not a directory"), "{err}");
        assert!(err.contains("afile"), "{err}");
    }
    use crate::cli::Flags;
    use crate::validate::{
        MAX_EGRESS_BYTES_PER_RECORD, MAX_ID_BYTES, MAX_MINUTE_UNIX_S, MAX_QUOTA_REQUESTS,
        MAX_QUOTA_WINDOW_MS, MAX_REQUESTS_PER_RECORD, MAX_TIER_BYTES,
    };

    /// Returns a valid record with every field at its largest.
    fn longest_record(index: usize) -> UsageRecord {
        UsageRecord {
            customer: format!("{index:0>width$}", width = MAX_ID_BYTES),
            tier: "t".repeat(MAX_TIER_BYTES),
            minute_unix_s: MAX_MINUTE_UNIX_S,
            admitted_requests: MAX_REQUESTS_PER_RECORD,
            refused_requests: MAX_REQUESTS_PER_RECORD,
            quota_requests: MAX_QUOTA_REQUESTS,
            quota_window_ms: MAX_QUOTA_WINDOW_MS,
            egress_bytes: MAX_EGRESS_BYTES_PER_RECORD,
        }
    }

    #[test]
    fn record_bound_covers_longest_record() {
        let one = SyncRequest {
            usage: vec![longest_record(0)],
            tier_overrides_version: 0,
            asset_regions_version: 0,
            erasures_version: 0,
            ..SyncRequest::default()
        };

        assert_eq!(one.encoded_len(), MAX_ENCODED_RECORD_BYTES);
    }

    #[tokio::test]
    async fn full_batch_of_longest_records_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            data_dir: Some(dir.path().into()),
            ..Flags::default()
        };
        let config = Config::load(&flags).unwrap();
        let store = crate::store::test_support::open(dir.path());
        let (listener, address) = bind(config.listen()).await.unwrap();
        let metrics = Metrics::new().unwrap();
        let billing = billing_parts(&config, &store, &metrics, None)
            .await
            .unwrap();
        let pushes = Arc::new(Pushes::new(1));
        let (_health, router, _, _) = build_router(&config, &store, billing.admin, metrics, pushes)
            .await
            .unwrap();
        let server = tokio::spawn(router.serve_with_incoming(TcpIncoming::from(listener)));
        let request = SyncRequest {
            instance_id: "i".repeat(MAX_ID_BYTES),
            sequence: u64::try_from(i64::MAX).unwrap(),
            created_unix_ms: i64::MIN,
            // The sidecar's window, so the reply names every customer.
            usage: (0..config.max_records_per_batch())
                .map(|index| UsageRecord {
                    quota_window_ms: 60_000,
                    ..longest_record(index)
                })
                .collect(),
            tier_overrides_version: u64::MAX,
            asset_regions_version: u64::MAX,
            // The largest the store keeps.
            erasures_version: u64::try_from(i64::MAX).unwrap(),
        };
        assert!(request.encoded_len() > 4 * 1024 * 1024);

        let mut client = SyncClient::connect(format!("http://{address}"))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX);
        let reply = client.sync(request).await.unwrap().into_inner();

        assert!(!reply.duplicate);
        assert_eq!(reply.remote_usage.len(), config.max_records_per_batch());
        server.abort();
    }
}
