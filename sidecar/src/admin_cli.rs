//! The operator commands of `veo-sidecar`: admin gRPC calls to a running
//! sidecar, printed as tables.

use std::fmt::Write as _;

use tonic::Request;
use veo_proto::admin::admin_client::AdminClient;
use veo_proto::admin::{
    AssetRegions, DeleteAssetRegionsRequest, EraseCustomerRequest, Erasure, ErasureState,
    GetAssetRegionsRequest, GetErasureRequest, GetStripeCustomerRequest, ListAssetRegionsRequest,
    ListParkedMeterEventsRequest, ReconcileReport, ReconcileRequest, SetAssetRegionsRequest,
    SetStripeCustomerRequest, StripeCustomer, TierRegions, VerifyAuditLogRequest,
    VerifyAuditLogResponse,
};
use veo_proto::usage::usage_client::UsageClient;
use veo_proto::usage::{GetUsageRequest, Granularity, ListTopCustomersRequest};

use crate::admin_service::ACTOR_METADATA;

use crate::billing::reconcile::ALERT_DRIFT_RATIO;
use crate::cli::Command;
use crate::ledger::unix_now_s;

/// Errors of an operator command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The sidecar could not be reached.
    #[error("failed to connect to the sidecar at {url}; check --sidecar and that it runs")]
    Connect {
        /// The URL given.
        url: String,
        /// Cause.
        #[source]
        source: tonic::transport::Error,
    },
    /// The sidecar returned an error.
    #[error("the sidecar rejected the command: {0}")]
    Call(String),
    /// An argument is malformed.
    #[error("invalid {argument} {value:?}: {reason}")]
    Argument {
        /// The argument, such as `--tier`.
        argument: &'static str,
        /// The value given.
        value: String,
        /// Problem with the value and the value to give instead.
        reason: String,
    },
    /// The keys could not be rotated.
    #[error("failed to rotate the keys: {0}")]
    Rotate(String),
    /// The erasures waiting for a peer could not be dropped.
    #[error("failed to drop the erasures waiting for the peer: {0}")]
    DropPeer(String),
    /// A notice key could not be written.
    #[error("failed to write the notice key; --out must name a new file in an existing directory")]
    NoticeKey(#[from] crate::counters::redis::NoticeKeyError),
    /// The audit log fails its check.
    #[error("{0}")]
    Broken(String),
    /// The audit log of a data directory could not be read.
    #[error("failed to check the audit log in {}", path.display())]
    Audit {
        /// The store file.
        path: std::path::PathBuf,
        /// Cause.
        #[source]
        source: crate::audit::AuditError,
    },
}

fn call_error(status: tonic::Status) -> CommandError {
    CommandError::Call(status.message().to_owned())
}

/// Returns the actor recorded for a command: the one given, or `cli:$USER`.
fn actor_or_user(actor: Option<String>) -> String {
    actor.unwrap_or_else(|| {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned());
        format!("cli:{user}")
    })
}

/// Wraps `message` in a request that names `actor`.
fn with_actor<T>(message: T, actor: &str) -> Result<Request<T>, CommandError> {
    let mut request = Request::new(message);
    let value = actor.parse().map_err(|_| CommandError::Argument {
        argument: "--actor",
        value: actor.to_owned(),
        reason: "must be printable ASCII".into(),
    })?;
    request.metadata_mut().insert(ACTOR_METADATA, value);
    Ok(request)
}

/// Parses `--tier TIER=REGION,REGION` values.
fn tier_rules(values: &[String]) -> Result<Vec<TierRegions>, CommandError> {
    values
        .iter()
        .map(|value| {
            let Some((tier, regions)) = value.split_once('=') else {
                return Err(CommandError::Argument {
                    argument: "--tier",
                    value: value.clone(),
                    reason: "give TIER=REGION,REGION, such as enterprise=us-east,ap-southeast"
                        .into(),
                });
            };
            Ok(TierRegions {
                tier: tier.to_owned(),
                regions: regions
                    .split(',')
                    .filter(|region| !region.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
        })
        .collect()
}

fn asset_line(entry: &AssetRegions) -> String {
    let tiers: Vec<String> = entry
        .tier_regions
        .iter()
        .map(|rule| format!("{}={}", rule.tier, rule.regions.join(",")))
        .collect();
    format!(
        "{} allowed={} tiers=[{}] storage={}\n",
        entry.asset,
        entry.allowed_regions.join(","),
        tiers.join(" "),
        if entry.storage_region.is_empty() {
            "-"
        } else {
            &entry.storage_region
        }
    )
}

/// Formats a customer's Stripe customer and billed tier.
fn stripe_customer_text(stored: &StripeCustomer) -> String {
    let billed_to = match stored.stripe_customer_id.as_str() {
        "" => "no Stripe customer".to_owned(),
        id => id.to_owned(),
    };
    let tier = match stored.tier.as_str() {
        "" => "none".to_owned(),
        tier => tier.to_owned(),
    };
    format!(
        "customer {} is billed to {billed_to}; tier from billing: {tier}\n",
        stored.customer
    )
}

/// Formats an erasure and its receipt.
pub fn erasure_text(erasure: &Erasure) -> String {
    let mut text = String::new();
    let state = match erasure.state() {
        ErasureState::Complete => "complete",
        ErasureState::PendingInstances => "pending: waiting for filter instances",
        ErasureState::PendingSharedCounters => {
            "pending: Redis was unreachable; its counts are removed on a retry every 10 s"
        }
        ErasureState::PendingPeers => {
            "pending: some peer sidecars have not erased the customer yet; retrying"
        }
        ErasureState::Unspecified => "unknown",
    };
    let _ = writeln!(text, "erasure {} {state}", erasure.erasure_id);
    for records in &erasure.records {
        let _ = writeln!(text, "  {:<30} {}", records.kind, records.count);
    }
    for instance in &erasure.pending_instances {
        let _ = writeln!(text, "  waiting for instance {instance}");
    }
    for peer in &erasure.pending_peers {
        let _ = match peer.attempts {
            0 => writeln!(text, "  waiting for peer {}", peer.peer),
            attempts => writeln!(
                text,
                "  waiting for peer {} ({attempts} failed attempts, last: {})",
                peer.peer, peer.last_error
            ),
        };
    }
    if let Some(receipt) = &erasure.receipt {
        let _ = writeln!(
            text,
            "receipt: audit entry {} hash {} subject {}",
            receipt.position, receipt.entry_hash, receipt.subject_hash
        );
    }
    text
}

/// Returns the store file and the key file of the sidecar whose data
/// directory is `data_dir` (`key_file`, or `DATA_DIR/keys.json`), or an
/// error naming the one that is missing.
fn stopped_store_files(
    data_dir: &std::path::Path,
    key_file: Option<std::path::PathBuf>,
) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let store = crate::store::store_path(data_dir);
    if !store.is_file() {
        return Err(format!(
            "no store at {}; give the --data-dir of a sidecar that has run",
            store.display()
        ));
    }
    let key_file = key_file.unwrap_or_else(|| data_dir.join("keys.json"));
    if !key_file.is_file() {
        return Err(format!(
            "no key file at {}; give the sidecar's privacy.key_file with --key-file",
            key_file.display()
        ));
    }
    Ok((store, key_file))
}

/// Options of `rotate-keys`: the keys it keeps.
#[derive(Debug, Clone, Copy)]
struct Rotation {
    /// Keep the old key-encryption keys in the key file.
    keep_old: bool,
    /// Keep the index key and the rows' pseudonyms.
    keep_index_key: bool,
}

/// Rotates the keys of the store in `data_dir`. A new key-encryption key
/// becomes current, and the index key is replaced with the rows renamed
/// under it. Every data key is then wrapped with the new key, and the old
/// keys leave the file once nothing is wrapped under them. `options` keeps
/// some keys.
fn rotate_keys(
    data_dir: &std::path::Path,
    key_file: Option<std::path::PathBuf>,
    options: Rotation,
) -> Result<String, CommandError> {
    use crate::keys;
    let fail = |err: &dyn std::fmt::Display| CommandError::Rotate(err.to_string());
    let (store, key_file) =
        stopped_store_files(data_dir, key_file).map_err(CommandError::Rotate)?;
    // The lock keeps a running sidecar from using the keys meanwhile.
    let _lock = crate::server::lock_data_dir(data_dir).map_err(|err| fail(&err))?;
    let mut provider = keys::LocalKeyFile::open_or_create(&key_file).map_err(|err| fail(&err))?;
    let old = provider.kek_ids();
    // A key file that cannot unwrap the store's keys is left unchanged.
    check_key_file(&store, &provider)
        .map_err(|err| fail(&err))?
        .map_err(|err| {
            CommandError::Rotate(format!(
                "key file {} does not unwrap the store's data keys: {err}; pass the sidecar's \
                 privacy.key_file with --key-file",
                key_file.display()
            ))
        })?;
    let current = provider.rotate().map_err(|err| fail(&err))?;
    let mut text = String::new();
    // From here on the new key is in the file and the old ones stay until
    // the end, so a failed run loses nothing and running again finishes it.
    let failed = |text: &str, err: &dyn std::fmt::Display| {
        CommandError::Rotate(format!(
            "{text}{err}\nkey-encryption key {current} was added to {} and is current, and the \
             old keys that data keys still need are kept; fix the cause and run rotate-keys \
             again",
            key_file.display()
        ))
    };
    if !options.keep_index_key {
        // A second handle on the key file, which now has the new key.
        let keys = keys::LocalKeyFile::open_or_create(&key_file).map_err(|err| failed("", &err))?;
        let renamed = crate::store::replace_index_key(data_dir, std::sync::Arc::new(keys))
            .map_err(|err| failed("", &crate::error_chain(&err)))?;
        let _ = writeln!(
            text,
            "index key replaced; rows of {} customers and {} Stripe customers renamed under it",
            renamed.customers, renamed.stripe_customers
        );
        if renamed.unidentified > 0 {
            let _ = writeln!(
                text,
                "{} pseudonyms without a readable identity got random ones",
                renamed.unidentified
            );
        }
    }
    let conn = open_stopped_store(&store).map_err(|err| failed(&text, &err))?;
    let rewrapped = keys::rewrap_all(&conn, &provider).map_err(|err| failed(&text, &err))?;
    let _ = writeln!(
        text,
        "key-encryption key {current} is current; {rewrapped} data keys re-wrapped with it"
    );
    if !options.keep_old {
        for kek in old {
            let left = keys::count_wrapped_under(&conn, &kek).map_err(|err| failed(&text, &err))?;
            if left == 0 {
                provider.retire(&kek).map_err(|err| failed(&text, &err))?;
                let _ = writeln!(text, "retired {kek}");
            } else {
                let _ = writeln!(text, "kept {kek}: {left} data keys still wrapped under it");
            }
        }
    }
    Ok(text)
}

/// Unwraps one data key of each key-encryption key that `store` uses, so a
/// key file that is not the store's fails before anything changes. The
/// outer error is the store's, the inner one the key file's.
fn check_key_file(
    store: &std::path::Path,
    provider: &dyn crate::keys::KeyProvider,
) -> rusqlite::Result<Result<(), crate::keys::KeyError>> {
    let conn = open_stopped_store(store)?;
    let mut statement = conn.prepare("SELECT kek_id, wrapped FROM data_key GROUP BY kek_id")?;
    let read = |row: &rusqlite::Row<'_>| {
        Ok(crate::keys::WrappedKey {
            kek_id: row.get(0)?,
            bytes: row.get(1)?,
        })
    };
    for key in statement.query_map([], read)? {
        if let Err(err) = provider.unwrap(&key?) {
            return Ok(Err(err));
        }
    }
    Ok(Ok(()))
}

/// Hands the erasures waiting for `peer` in the stopped sidecar's store
/// to `successor`, or drops them, and returns what was done.
fn drop_erasure_peer(
    data_dir: &std::path::Path,
    key_file: Option<std::path::PathBuf>,
    peer: &str,
    successor: Option<&str>,
    actor: &str,
) -> Result<String, CommandError> {
    let fail = |err: &dyn std::fmt::Display| CommandError::DropPeer(err.to_string());
    let address = |argument: &'static str, value: &str| {
        crate::config::canonical_peer_address(value).ok_or_else(|| CommandError::Argument {
            argument,
            value: value.to_owned(),
            reason: "expected http://HOST:PORT, as in privacy.erasure_peers".into(),
        })
    };
    let peer = address("PEER", peer)?;
    let successor = successor.map(|to| address("--to", to)).transpose()?;
    if successor.as_ref() == Some(&peer) {
        return Err(CommandError::Argument {
            argument: "--to",
            value: peer,
            reason: "names the same peer as PEER; give the address of its successor".into(),
        });
    }

    let (store, key_file) =
        stopped_store_files(data_dir, key_file).map_err(CommandError::DropPeer)?;
    // The lock keeps a running sidecar from passing them on meanwhile.
    let _lock = crate::server::lock_data_dir(data_dir).map_err(|err| fail(&err))?;
    let keys = crate::keys::LocalKeyFile::open_or_create(&key_file).map_err(|err| fail(&err))?;
    let mut conn = open_stopped_store(&store).map_err(|err| fail(&err))?;
    let now_ms = crate::ledger::unix_now_s().saturating_mul(1_000);
    let erasure_ids = crate::erasure::forward::drop_peer(
        &mut conn,
        &keys,
        &peer,
        successor.as_deref(),
        actor,
        now_ms,
    )
    .map_err(|err| fail(&crate::error_chain(&err)))?;

    if erasure_ids.is_empty() {
        return Ok(format!(
            "no erasure waits for {peer}; `veo-sidecar erasure ERASURE_ID` lists the peers an \
             erasure waits for\n"
        ));
    }
    let mut text = match &successor {
        Some(successor) => format!(
            "{} waiting for {peer} now wait for {successor}; list it in \
             privacy.erasure_peers:\n",
            erasures(erasure_ids.len())
        ),
        None => format!(
            "dropped {} waiting for {peer}:\n",
            erasures(erasure_ids.len())
        ),
    };
    for erasure_id in erasure_ids {
        let _ = writeln!(text, "  {erasure_id}");
    }
    Ok(text)
}

/// Returns "1 erasure" or "N erasures".
fn erasures(count: usize) -> String {
    match count {
        1 => "1 erasure".to_owned(),
        count => format!("{count} erasures"),
    }
}

/// Opens the store file of a stopped sidecar for a change, with deleted
/// rows overwritten by zeros and a wait for locks, as the sidecar opens it.
fn open_stopped_store(store: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(store)?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Formats the result of an audit log check.
pub fn verification_text(result: &VerifyAuditLogResponse) -> String {
    if result.intact {
        format!(
            "audit log intact: {} entries, head {}\n",
            result.entries, result.head_hash
        )
    } else {
        format!(
            "audit log BROKEN at entry {}: {} ({} entries checked)\n",
            result.first_bad_position, result.problem, result.entries
        )
    }
}

/// Seconds before now that the default reconciliation range ends: usage
/// of the last minutes may still wait in the billing queue, and Stripe
/// updates its summaries asynchronously, so both would show as drift.
const RECONCILE_SETTLE_S: i64 = 600;

/// Returns the default end of a reconciliation range at `now_s`: the start
/// of the minute [`RECONCILE_SETTLE_S`] seconds ago.
fn default_reconcile_end(now_s: i64) -> i64 {
    (now_s - RECONCILE_SETTLE_S).div_euclid(60) * 60
}

/// Runs `command` and returns what to print.
pub async fn run(command: Command) -> Result<String, CommandError> {
    match command {
        Command::Reconcile {
            sidecar,
            start,
            end,
            correct,
        } => {
            let end = end.unwrap_or_else(|| default_reconcile_end(unix_now_s()));
            let start = start.unwrap_or(end - 86_400);
            let mut client = connect(&sidecar).await?;
            let request = with_actor(
                ReconcileRequest {
                    start_unix_s: start,
                    end_unix_s: end,
                    correct,
                },
                &actor_or_user(None),
            )?;
            let report = client
                .reconcile(request)
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            Ok(reconcile_table(&report, start, end))
        }
        Command::SetStripeCustomer {
            sidecar,
            customer,
            stripe_customer_id,
        } => {
            let mut client = connect(&sidecar).await?;
            let request = with_actor(
                SetStripeCustomerRequest {
                    customer,
                    stripe_customer_id,
                },
                &actor_or_user(None),
            )?;
            let stored = client
                .set_stripe_customer(request)
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            Ok(format!(
                "customer {} is billed to {}\n",
                stored.customer, stored.stripe_customer_id
            ))
        }
        Command::StripeCustomer { sidecar, customer } => {
            let stored = connect(&sidecar)
                .await?
                .get_stripe_customer(GetStripeCustomerRequest { customer })
                .await
                .map_err(call_error)?
                .into_inner();
            Ok(stripe_customer_text(&stored))
        }
        Command::Usage {
            sidecar,
            range,
            granularity,
            customer,
        } => {
            let (start, end) = range.resolve(unix_now_s());
            let granularity = match granularity.as_str() {
                "minute" => Granularity::Minute,
                "day" => Granularity::Day,
                _ => Granularity::Hour,
            };
            let mut client = UsageClient::new(channel(&sidecar).await?);
            let usage = client
                .get_usage(GetUsageRequest {
                    customer,
                    start_unix_s: start,
                    end_unix_s: end,
                    granularity: granularity as i32,
                })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            let mut text = String::new();
            let _ = writeln!(text, "usage of {} in [{start}, {end})", usage.customer);
            let mut row = |label: &dyn std::fmt::Display, counts: [&dyn std::fmt::Display; 3]| {
                usage_row(&mut text, 12, label, counts);
            };
            row(&"start_unix_s", [&"admitted", &"refused", &"egress_bytes"]);
            for bucket in &usage.buckets {
                row(
                    &bucket.start_unix_s,
                    [
                        &bucket.admitted_requests,
                        &bucket.refused_requests,
                        &bucket.egress_bytes,
                    ],
                );
            }
            row(
                &"total",
                [
                    &usage.admitted_requests,
                    &usage.refused_requests,
                    &usage.egress_bytes,
                ],
            );
            Ok(text)
        }
        Command::TopCustomers {
            sidecar,
            range,
            limit,
        } => {
            let (start, end) = range.resolve(unix_now_s());
            let mut client = UsageClient::new(channel(&sidecar).await?);
            let top = client
                .list_top_customers(ListTopCustomersRequest {
                    start_unix_s: start,
                    end_unix_s: end,
                    limit,
                })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            let mut text = String::new();
            let _ = writeln!(text, "top customers in [{start}, {end})");
            usage_row(
                &mut text,
                32,
                &"customer",
                [&"admitted", &"refused", &"egress_bytes"],
            );
            for total in &top.customers {
                usage_row(
                    &mut text,
                    32,
                    &total.customer,
                    [
                        &total.admitted_requests,
                        &total.refused_requests,
                        &total.egress_bytes,
                    ],
                );
            }
            Ok(text)
        }
        Command::ParkedEvents { sidecar, limit } => {
            let mut client = connect(&sidecar).await?;
            let parked = client
                .list_parked_meter_events(ListParkedMeterEventsRequest { limit })
                .await
                .map_err(|status| CommandError::Call(status.message().to_owned()))?
                .into_inner();
            let mut text = String::new();
            for event in &parked.events {
                let _ = writeln!(
                    text,
                    "{} customer={} meter={} minute={} value={}: {}",
                    event.identifier,
                    event.customer,
                    event.meter,
                    event.minute_unix_s,
                    event.value,
                    event.reason
                );
            }
            let _ = writeln!(text, "{} parked meter events", parked.events.len());
            Ok(text)
        }
        Command::SetAssetRegions {
            sidecar,
            actor,
            asset,
            allow,
            tiers,
            storage,
        } => {
            let entry = AssetRegions {
                asset,
                allowed_regions: allow,
                tier_regions: tier_rules(&tiers)?,
                storage_region: storage,
            };
            let request = with_actor(
                SetAssetRegionsRequest { asset: Some(entry) },
                &actor_or_user(actor),
            )?;
            let stored = connect(&sidecar)
                .await?
                .set_asset_regions(request)
                .await
                .map_err(call_error)?
                .into_inner();
            Ok(asset_line(&stored))
        }
        Command::AssetRegions { sidecar, asset } => {
            let mut client = connect(&sidecar).await?;
            let entries = match asset {
                Some(asset) => vec![
                    client
                        .get_asset_regions(GetAssetRegionsRequest { asset })
                        .await
                        .map_err(call_error)?
                        .into_inner(),
                ],
                None => {
                    let mut entries = Vec::new();
                    let mut page_token = String::new();
                    loop {
                        let request = ListAssetRegionsRequest {
                            page_size: 0,
                            page_token,
                        };
                        let page = client
                            .list_asset_regions(request)
                            .await
                            .map_err(call_error)?
                            .into_inner();
                        entries.extend(page.assets);
                        if page.next_page_token.is_empty() {
                            break entries;
                        }
                        page_token = page.next_page_token;
                    }
                }
            };
            if entries.is_empty() {
                return Ok("no asset has regions in the registry\n".to_owned());
            }
            Ok(entries.iter().map(asset_line).collect())
        }
        Command::DeleteAssetRegions {
            sidecar,
            actor,
            asset,
        } => {
            let request = with_actor(
                DeleteAssetRegionsRequest {
                    asset: asset.clone(),
                },
                &actor_or_user(actor),
            )?;
            let deleted = connect(&sidecar)
                .await?
                .delete_asset_regions(request)
                .await
                .map_err(call_error)?
                .into_inner()
                .deleted;
            Ok(if deleted {
                format!("asset {asset} removed from the registry\n")
            } else {
                format!("asset {asset} was not in the registry\n")
            })
        }
        Command::EraseCustomer {
            sidecar,
            actor,
            customer,
        } => {
            let request = with_actor(
                EraseCustomerRequest {
                    customer,
                    ..Default::default()
                },
                &actor_or_user(actor),
            )?;
            let erasure = connect(&sidecar)
                .await?
                .erase_customer(request)
                .await
                .map_err(call_error)?
                .into_inner();
            Ok(erasure_text(&erasure))
        }
        Command::Erasure {
            sidecar,
            erasure_id,
        } => {
            let erasure = connect(&sidecar)
                .await?
                .get_erasure(GetErasureRequest { erasure_id })
                .await
                .map_err(call_error)?
                .into_inner();
            Ok(erasure_text(&erasure))
        }
        Command::NewNoticeKey { out } => {
            crate::counters::redis::NoticeKey::create(&out)?;
            Ok(format!(
                "wrote a new notice key to {}; copy it to every sidecar sharing the key prefix \
                 and set counters.notice_key_file to it\n",
                out.display()
            ))
        }
        Command::RotateKeys {
            data_dir,
            key_file,
            keep_old,
            keep_index_key,
        } => tokio::task::spawn_blocking(move || {
            let options = Rotation {
                keep_old,
                keep_index_key,
            };
            rotate_keys(&data_dir, key_file, options)
        })
        .await
        .map_err(|err| CommandError::Rotate(err.to_string()))?,
        Command::DropErasurePeer {
            data_dir,
            key_file,
            actor,
            to,
            peer,
        } => {
            let actor = actor_or_user(actor);
            tokio::task::spawn_blocking(move || {
                drop_erasure_peer(&data_dir, key_file, &peer, to.as_deref(), &actor)
            })
            .await
            .map_err(|err| CommandError::DropPeer(err.to_string()))?
        }
        Command::VerifyAuditLog { sidecar, data_dir } => {
            let result = match data_dir {
                Some(dir) => {
                    let path = crate::store::store_path(&dir);
                    let mut verification =
                        crate::audit::verify_file(&path).map_err(|source| CommandError::Audit {
                            path: path.clone(),
                            source,
                        })?;
                    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
                    rusqlite::Connection::open_with_flags(&path, flags)
                        .and_then(|conn| crate::erasure::check_receipts(&conn, &mut verification))
                        .map_err(|source| CommandError::Audit {
                            path,
                            source: source.into(),
                        })?;
                    VerifyAuditLogResponse {
                        intact: verification.intact,
                        entries: verification.entries,
                        first_bad_position: verification.first_bad_position,
                        problem: verification.problem,
                        head_hash: verification.head_hash,
                    }
                }
                None => connect(&sidecar)
                    .await?
                    .verify_audit_log(VerifyAuditLogRequest {})
                    .await
                    .map_err(call_error)?
                    .into_inner(),
            };
            if result.intact {
                Ok(verification_text(&result))
            } else {
                Err(CommandError::Broken(verification_text(&result)))
            }
        }
    }
}

async fn connect(url: &str) -> Result<AdminClient<tonic::transport::Channel>, CommandError> {
    Ok(AdminClient::new(channel(url).await?))
}

/// Connects to the sidecar at `url`, a gRPC URL or a bare IP:PORT as the
/// ready file contains.
async fn channel(url: &str) -> Result<tonic::transport::Channel, CommandError> {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|source| {
        CommandError::Connect {
            url: url.clone(),
            source,
        }
    })?;
    endpoint
        .connect()
        .await
        .map_err(|source| CommandError::Connect { url, source })
}

/// Appends one row of a usage table: `label` left-aligned in `width`
/// columns, then the admitted, refused and egress-bytes columns.
fn usage_row(
    text: &mut String,
    width: usize,
    label: &dyn std::fmt::Display,
    counts: [&dyn std::fmt::Display; 3],
) {
    let [admitted, refused, bytes] = counts;
    let label = label.to_string();
    let _ = writeln!(
        text,
        "{label:<width$} {:>12} {:>12} {:>16}",
        admitted.to_string(),
        refused.to_string(),
        bytes.to_string()
    );
}

/// Formats a reconciliation as a table with one row per customer and
/// meter.
pub fn reconcile_table(report: &ReconcileReport, start: i64, end: i64) -> String {
    let mut text = String::new();
    let _ = writeln!(text, "reconciliation of [{start}, {end})");
    let _ = writeln!(
        text,
        "{:<24} {:<14} {:>14} {:>14} {:>14} {:>9} {:>14} {:>9}",
        "customer", "meter", "ledger", "sent", "stripe", "drift", "prometheus", "drift"
    );
    for row in &report.rows {
        let value_or_dash =
            |value: Option<u64>| value.map_or_else(|| "-".to_owned(), |value| value.to_string());
        let metrics_drift = match row.metrics_value {
            Some(_) => format!("{:.3}%", row.metrics_drift_ratio * 100.0),
            None => "-".to_owned(),
        };
        let _ = writeln!(
            text,
            "{:<24} {:<14} {:>14} {:>14} {:>14} {:>8.3}% {:>14} {:>9}",
            row.customer,
            row.meter,
            row.ledger_value,
            row.sent_value,
            value_or_dash(row.stripe_value),
            row.drift_ratio * 100.0,
            value_or_dash(row.metrics_value),
            metrics_drift
        );
    }
    let verdict = if report.max_drift_ratio > ALERT_DRIFT_RATIO {
        "ALERT: drift above 1%"
    } else {
        "within 1%"
    };
    let _ = writeln!(
        text,
        "max drift {:.3}% ({verdict}); corrective events queued: {}",
        report.max_drift_ratio * 100.0,
        report.corrective_events
    );
    for error in &report.stripe_errors {
        let _ = writeln!(text, "no Stripe column: {error}");
    }
    if !report.metrics_error.is_empty() {
        let _ = writeln!(text, "no Prometheus column: {}", report.metrics_error);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_reconcile_end_leaves_ten_minutes() {
        let now = 1_000_000_000;
        let end = default_reconcile_end(now);
        assert_eq!(end % 60, 0);
        assert!(end <= now - RECONCILE_SETTLE_S, "{end}");
        assert!(end > now - RECONCILE_SETTLE_S - 60, "{end}");
    }

    #[test]
    fn failed_rotation_names_the_new_key_and_reruns() {
        let dir = tempfile::tempdir().unwrap();
        let keys =
            crate::keys::LocalKeyFile::open_or_create(&dir.path().join("keys.json")).unwrap();
        let keys: std::sync::Arc<dyn crate::keys::KeyProvider> = std::sync::Arc::new(keys);
        let path = dir.path().join(crate::store::DATABASE_FILE);
        let mut conn = crate::store::test_support::open_writer(&path);
        let identities = crate::identity::Identities::open(&mut conn, keys).unwrap();
        identities.record(&conn, "acme").unwrap();
        conn.execute_batch(
            "CREATE TRIGGER keep_identities BEFORE UPDATE ON customer_identity
             BEGIN SELECT RAISE(ABORT, 'identities are read-only'); END;",
        )
        .unwrap();
        drop(conn);
        let options = Rotation {
            keep_old: false,
            keep_index_key: false,
        };
        let other = dir.path().join("other.json");
        crate::keys::LocalKeyFile::open_or_create(&other).unwrap();
        let other_before = std::fs::read(&other).unwrap();

        let wrong = rotate_keys(dir.path(), Some(other.clone()), options).unwrap_err();
        let failed = rotate_keys(dir.path(), None, options).unwrap_err();

        let wrong = wrong.to_string();
        assert!(
            wrong.contains("does not unwrap the store's data keys"),
            "{wrong}"
        );
        assert_eq!(std::fs::read(&other).unwrap(), other_before, "{wrong}");
        let failed = failed.to_string();
        assert!(failed.contains("identities are read-only"), "{failed}");
        assert!(
            failed.contains("key-encryption key kek-2 was added"),
            "{failed}"
        );

        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("DROP TRIGGER keep_identities").unwrap();
        drop(conn);
        let text = rotate_keys(dir.path(), None, options).unwrap();

        assert!(text.contains("rows of 1 customers"), "{text}");
        assert!(text.contains("kek-3 is current"), "{text}");
        assert!(text.contains("retired kek-1"), "{text}");
        assert!(text.contains("retired kek-2"), "{text}");
    }
}
