//! Admin calls on the asset region registry, customer erasure and the
//! audit log. Every change is appended to the audit log in the
//! transaction that makes it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;
use tracing::{info, warn};
use veo_proto::admin::{
    AssetRegions, AuditReceipt, DeleteAssetRegionsRequest, DeleteAssetRegionsResponse,
    EraseCustomerRequest, ErasedRecords, Erasure, ErasureState, GetAssetRegionsRequest,
    GetErasureRequest, ListAssetRegionsRequest, ListAssetRegionsResponse, PendingPeer,
    SetAssetRegionsRequest, VerifyAuditLogResponse,
};
use veo_proto::sync::ErasedCustomer;

use super::AdminService;
use crate::assets::{self, PutOutcome};
use crate::audit::{self, NewEntry};
use crate::counters::redis::{ErasureNotice, ErasureSource, NoticeEntry};
use crate::erasure::{self, EraseRequest, forward};
use crate::keys;
use crate::ledger::unix_now_s;
use crate::privacy::{Privacy, key_owner, to_sql};
use crate::status::ServiceError;
use crate::store::Store;
use crate::validate::{self, MAX_ID_BYTES};

/// Request metadata naming the author of a change, recorded in the audit
/// log.
pub const ACTOR_METADATA: &str = "x-veo-actor";
/// Actor recorded when a request names none.
const UNKNOWN_ACTOR: &str = "unknown";
/// Maximum length of an actor name, in bytes.
const MAX_ACTOR_BYTES: usize = 128;

/// Maximum length of a customer id in a token's customer claim, in bytes,
/// as the filter accepts it.
const MAX_TOKEN_CUSTOMER_BYTES: usize = 128;

/// How far ahead of this sidecar's clock a peer's or a notice's erasure
/// time may be, in seconds.
const MAX_PEER_CLOCK_AHEAD_S: i64 = 60;

/// Time allowed for a peer sidecar to erase a customer, in seconds.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// Erasure notices read from the shared counters at a time.
const NOTICES_PER_READ: usize = 100;

/// Registry entries per `ListAssetRegions` page when the request names no
/// size.
const DEFAULT_PAGE_SIZE: u32 = 1_000;

/// Most registry entries per `ListAssetRegions` page.
const MAX_PAGE_SIZE: u32 = 10_000;

/// Source of an erasure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A request to this sidecar. It is announced to the other sidecars
    /// sharing the counters, and the customer's tokens are refused from now.
    Request,
    /// Another sidecar's notice. It is not announced again, and the
    /// customer's tokens are refused from that sidecar's erasure on.
    Notice {
        /// When the other sidecar erased the customer, in Unix
        /// milliseconds.
        erased_at_unix_ms: i64,
    },
    /// A peer sidecar that passed its erasure on, one of whose
    /// `privacy.erasure_peers` this sidecar is. It is announced to the
    /// sidecars sharing this one's counters but not passed on again, and
    /// the customer's tokens are refused from the peer's erasure on.
    Peer {
        /// When the peer erased the customer, in Unix milliseconds.
        erased_at_unix_ms: i64,
    },
}

/// Checks that `customer` is an id a token can carry (1 to 128 printable
/// ASCII characters without spaces), so a mistyped id is rejected instead
/// of reported as erased.
fn check_token_customer(customer: &str) -> Result<(), ServiceError> {
    let valid = !customer.is_empty()
        && customer.len() <= MAX_TOKEN_CUSTOMER_BYTES
        && customer.bytes().all(|byte| byte.is_ascii_graphic());
    if valid {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            "customer",
            format!(
                "{customer:?} is not a customer id a token can carry: use 1 to \
                 {MAX_TOKEN_CUSTOMER_BYTES} printable ASCII characters without spaces"
            ),
        ))
    }
}

/// Returns the actor named in a request's metadata, or "unknown" when it
/// names none. A value that is not 1 to 128 printable ASCII characters is
/// rejected, so the audit log never records a changed or lost actor.
pub fn actor(metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let Some(value) = metadata.get(ACTOR_METADATA) else {
        return Ok(UNKNOWN_ACTOR.to_owned());
    };
    let text = value.to_str().unwrap_or_default();
    let valid = !text.is_empty()
        && text.len() <= MAX_ACTOR_BYTES
        && text
            .bytes()
            .all(|byte| byte == b' ' || byte.is_ascii_graphic());
    if valid {
        Ok(text.to_owned())
    } else {
        Err(ServiceError::invalid(
            ACTOR_METADATA,
            format!(
                "{value:?} is not an actor name: use 1 to {MAX_ACTOR_BYTES} printable ASCII \
                 characters"
            ),
        )
        .into())
    }
}

impl AdminService {
    fn privacy(&self) -> Result<&Privacy, Status> {
        self.privacy
            .as_ref()
            .ok_or_else(|| Status::unimplemented("this sidecar runs without the privacy services"))
    }

    fn store(&self) -> &Store {
        self.biller.store()
    }

    /// Appends an audit entry inside a store closure.
    fn append(
        conn: &rusqlite::Connection,
        privacy: &Privacy,
        entry: &NewEntry,
    ) -> rusqlite::Result<audit::Receipt> {
        privacy.append(conn, entry)
    }

    /// Stores a registry entry and pushes the registry to the instances.
    pub async fn set_asset_regions(
        &self,
        request: SetAssetRegionsRequest,
        actor: String,
    ) -> Result<AssetRegions, Status> {
        let privacy = self.privacy()?.clone();
        let entry = request
            .asset
            .ok_or_else(|| ServiceError::invalid("asset", "is missing; set the asset entry"))?;
        assets::check(&entry)?;
        let entry = assets::normalized(&entry);
        let stored = entry.clone();
        let now_ms = unix_now_s().saturating_mul(1_000);
        let outcome = self
            .store()
            .write("set asset regions", move |conn| {
                let tx = conn.transaction()?;
                let outcome = assets::put(&tx, &stored, now_ms)?;
                if outcome == PutOutcome::Stored {
                    let details = serde_json::json!({
                        "asset": stored.asset,
                        "allowed_regions": stored.allowed_regions,
                        "tier_regions": stored.tier_regions.iter()
                            .map(|rule| (rule.tier.clone(), rule.regions.clone()))
                            .collect::<BTreeMap<_, _>>(),
                        "storage_region": stored.storage_region,
                    });
                    Self::append(
                        &tx,
                        &privacy,
                        &NewEntry {
                            at_unix_ms: now_ms,
                            actor,
                            action: "set_asset_regions".into(),
                            subject_hash: None,
                            records: 1,
                            details,
                        },
                    )?;
                }
                tx.commit()?;
                Ok(outcome)
            })
            .await
            .map_err(ServiceError::from)?;
        if outcome == PutOutcome::Full {
            return Err(ServiceError::invalid(
                "asset.asset",
                format!(
                    "the registry holds {} assets, its maximum; delete unused entries first",
                    assets::MAX_ASSETS
                ),
            )
            .into());
        }
        info!(asset = entry.asset, "asset regions set");
        self.reload_assets().await?;
        Ok(entry)
    }

    /// Returns one registry entry.
    pub async fn get_asset_regions(
        &self,
        request: GetAssetRegionsRequest,
    ) -> Result<AssetRegions, Status> {
        validate::identifier("asset", &request.asset, MAX_ID_BYTES)?;
        let asset = request.asset.clone();
        let entry = self
            .store()
            .read("read asset regions", move |conn| assets::get(conn, &asset))
            .await
            .map_err(ServiceError::from)?;
        entry.ok_or_else(|| {
            Status::not_found(format!(
                "asset {:?} is not in the registry; set it with set-asset-regions or \
                 SetAssetRegions",
                request.asset
            ))
        })
    }

    /// Returns one page of the registry, in order of asset.
    pub async fn list_asset_regions(
        &self,
        request: ListAssetRegionsRequest,
    ) -> Result<ListAssetRegionsResponse, Status> {
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size @ 1..=MAX_PAGE_SIZE => size,
            size => {
                return Err(ServiceError::invalid(
                    "page_size",
                    format!("{size} is above {MAX_PAGE_SIZE}; ask for fewer entries per page"),
                )
                .into());
            }
        };
        let after = request.page_token;
        if !after.is_empty() {
            validate::identifier("page_token", &after, MAX_ID_BYTES)?;
        }
        let assets = self
            .store()
            .read("list asset regions", move |conn| {
                assets::list_page(conn, &after, page_size)
            })
            .await
            .map_err(ServiceError::from)?;
        let full = u32::try_from(assets.len()).is_ok_and(|count| count == page_size);
        let next_page_token = match assets.last() {
            Some(last) if full => last.asset.clone(),
            _ => String::new(),
        };
        Ok(ListAssetRegionsResponse {
            assets,
            next_page_token,
        })
    }

    /// Removes a registry entry.
    pub async fn delete_asset_regions(
        &self,
        request: DeleteAssetRegionsRequest,
        actor: String,
    ) -> Result<DeleteAssetRegionsResponse, Status> {
        let privacy = self.privacy()?.clone();
        validate::identifier("asset", &request.asset, MAX_ID_BYTES)?;
        let asset = request.asset.clone();
        let now_ms = unix_now_s().saturating_mul(1_000);
        let deleted = self
            .store()
            .write("delete asset regions", move |conn| {
                let tx = conn.transaction()?;
                let deleted = assets::delete(&tx, &asset)?;
                if deleted {
                    Self::append(
                        &tx,
                        &privacy,
                        &NewEntry {
                            at_unix_ms: now_ms,
                            actor,
                            action: "delete_asset_regions".into(),
                            subject_hash: None,
                            records: 1,
                            details: serde_json::json!({ "asset": asset }),
                        },
                    )?;
                }
                tx.commit()?;
                Ok(deleted)
            })
            .await
            .map_err(ServiceError::from)?;
        if deleted {
            info!(asset = request.asset, "asset regions deleted");
            self.reload_assets().await?;
        }
        Ok(DeleteAssetRegionsResponse { deleted })
    }

    /// Loads the registry into the set pushed to the instances.
    pub async fn reload_assets(&self) -> Result<(), Status> {
        let privacy = self.privacy()?;
        let entries = self
            .store()
            .read("read asset regions", |conn| assets::list(conn))
            .await
            .map_err(ServiceError::from)?;
        privacy.pushes.set_assets(assets::to_sync(entries));
        Ok(())
    }

    /// Loads the erased customers into the set pushed to the instances,
    /// dropping those whose tokens have expired, and returns its version.
    pub async fn reload_erased(&self) -> Result<u64, Status> {
        let privacy = self.privacy()?;
        let now = unix_now_s();
        let keys = Arc::clone(&privacy.keys);
        let erased = self
            .store()
            .write("read erased customers", move |conn| {
                erasure::erased_customers(conn, keys.as_ref(), now)
            })
            .await
            .map_err(ServiceError::from)?;
        Ok(privacy.pushes.set_erased(
            erased
                .into_iter()
                .map(|(customer, refuse_until_unix_s)| ErasedCustomer {
                    customer,
                    refuse_until_unix_s,
                })
                .collect(),
        ))
    }

    /// Loads the instances' acknowledgements kept in the store, and moves
    /// the erased-customer set's version past every version stored.
    pub async fn load_acks(&self) -> Result<(), Status> {
        let privacy = self.privacy()?;
        let (stored, newest_erasure) = self
            .store()
            .read("read erasure acknowledgements", |conn| {
                Ok((erasure::stored_acks(conn)?, erasure::newest_version(conn)?))
            })
            .await
            .map_err(ServiceError::from)?;
        let newest_ack = stored.iter().map(|(_, version, _)| *version).max();
        privacy
            .pushes
            .move_versions_past(newest_ack.unwrap_or(0).max(newest_erasure));
        privacy.pushes.load_acks(
            stored
                .into_iter()
                .map(|(instance, erasures_version, last_seen_unix_s)| {
                    (
                        instance,
                        crate::pushes::InstanceAck {
                            erasures_version,
                            last_seen_unix_s,
                        },
                    )
                })
                .collect(),
        );
        Ok(())
    }

    /// Erases a customer, or returns its earlier erasure.
    pub async fn erase_customer(
        &self,
        request: EraseCustomerRequest,
        actor: String,
    ) -> Result<Erasure, Status> {
        check_token_customer(&request.customer)?;
        let origin = match request.erased_at_unix_ms {
            0 => Origin::Request,
            erased_at_unix_ms => {
                if !(1..=latest_erasure_time_ms()).contains(&erased_at_unix_ms) {
                    return Err(Status::invalid_argument(format!(
                        "erased_at_unix_ms = {erased_at_unix_ms} is not a past time in \
                         milliseconds since the Unix epoch; leave it 0 unless passing on another \
                         sidecar's erasure"
                    )));
                }
                Origin::Peer { erased_at_unix_ms }
            }
        };
        let (erasure, _) = self.erase(request.customer, actor, origin).await?;
        Ok(erasure)
    }

    /// Erases `customer`. An erasure requested here is announced to the
    /// other sidecars sharing the counters. Returns the erasure's progress
    /// and whether this call erased the customer, which is false when an
    /// erasure of the customer is still in force. A notice then extends
    /// that erasure's refusal period to its own.
    async fn erase(
        &self,
        customer: String,
        actor: String,
        origin: Origin,
    ) -> Result<(Erasure, bool), Status> {
        let privacy = self.privacy()?.clone();
        let hash = privacy.subject(&customer);
        let pseudonym = privacy.identities.pseudonym(&customer);
        let now_s = unix_now_s();
        let request_customer = customer.clone();
        let row_pseudonym = pseudonym.clone();
        let (announce, refused_from_s) = match origin {
            Origin::Request => (true, now_s),
            Origin::Notice { erased_at_unix_ms } => {
                (false, erased_at_unix_ms.div_euclid(1_000).min(now_s))
            }
            Origin::Peer { erased_at_unix_ms } => {
                (true, erased_at_unix_ms.div_euclid(1_000).min(now_s))
            }
        };
        let forward_to = match origin {
            Origin::Request => Arc::clone(&privacy.erasure_peers),
            Origin::Notice { .. } | Origin::Peer { .. } => Vec::new().into(),
        };
        let now_ms = now_s.saturating_mul(1_000);
        // A peer's time is kept as sent, up to a minute ahead of this
        // clock, so that the same erasure sent again finds this one.
        // Another sidecar's notice keeps its time too, so a late notice of
        // an erasure already applied here finds that erasure.
        let first_erased_unix_ms = match origin {
            Origin::Peer { erased_at_unix_ms } | Origin::Notice { erased_at_unix_ms } => {
                erased_at_unix_ms
            }
            Origin::Request => now_ms,
        };
        let refuse_until_unix_s = refused_from_s.saturating_add(privacy.token_lifetime_s);
        let keys_for_tx = privacy.clone();
        let shared_counters = self.shared.is_some();
        let (erasure, performed) = self
            .store()
            .write("erase a customer", move |conn| {
                erasure::erase(
                    conn,
                    keys_for_tx.keys.as_ref(),
                    EraseRequest {
                        customer: &customer,
                        subject_hash: &hash,
                        pseudonym: &row_pseudonym,
                        now_unix_ms: now_ms,
                        first_erased_unix_ms,
                        refuse_until_unix_s,
                        shared_counters,
                        announce,
                        extends_refusal: origin != Origin::Request,
                        forward_to: &forward_to,
                    },
                    &mut |tx, erasure_id, records| {
                        let destroyed =
                            keys::destroy(tx, &key_owner(&row_pseudonym)).map_err(to_sql)?;
                        records.insert("data_key".into(), u64::from(destroyed));
                        let total = records.values().sum();
                        let receipt = Self::append(
                            tx,
                            &keys_for_tx,
                            &NewEntry {
                                at_unix_ms: now_s.saturating_mul(1_000),
                                actor: actor.clone(),
                                action: "erase_customer".into(),
                                subject_hash: Some(hash.clone()),
                                records: total,
                                details: serde_json::json!({
                                    "erasure_id": erasure_id,
                                    "records": records,
                                    "refuse_tokens_until_unix_s": refuse_until_unix_s,
                                }),
                            },
                        )?;
                        Ok(erasure::Receipt {
                            position: receipt.position,
                            entry_hash: receipt.entry_hash,
                        })
                    },
                )
            })
            .await
            .map_err(ServiceError::from)?;
        if performed {
            let notice = announce.then(|| ErasureSource {
                erasure_id: &erasure.erasure_id,
                erased_at_unix_ms: erasure.requested_unix_ms,
            });
            self.clear_counters(&request_customer, notice, now_s)
                .await?;
            let version = self.reload_erased().await?;
            // After the reload, so that batches stored from now on leave
            // the customer out and do not bring the series back.
            self.remove_usage_series(&pseudonym);
            let id = erasure.erasure_id.clone();
            self.store()
                .write("record an erasure's version", move |conn| {
                    erasure::set_version(conn, &id, version)
                })
                .await
                .map_err(ServiceError::from)?;
            self.biller.waker().notify_one();
            self.mapping_changed.notify_one();
            info!(erasure_id = erasure.erasure_id, "customer erased");
        }
        let progress = self.erasure_progress(&erasure.erasure_id).await?;
        Ok((progress, performed))
    }

    /// Removes the erased customer's `veo_customer_usage_total` series, so
    /// that the next scrape no longer carries its pseudonym.
    fn remove_usage_series(&self, pseudonym: &str) {
        let ledger = &self.biller.ledger().ledger_id;
        for meter in ["api_requests", "egress_bytes"] {
            // A customer without usage since the start has no series.
            let _ = self
                .metrics
                .customer_usage
                .remove_label_values(&[ledger, pseudonym, meter]);
        }
    }

    /// Drops the customer's counts kept in memory and in Redis, and with
    /// `notice` announces the erasure to the other sidecars. Counts that
    /// Redis cannot remove now, or an announcement it cannot take, stay
    /// queued in the store, and [`AdminService::retry_counter_cleanup`]
    /// tries again. An erasure is announced with its own time, also when
    /// that is older than the token lifetime: the other sidecars judge a
    /// notice's age by when it was announced.
    async fn clear_counters(
        &self,
        customer: &str,
        notice: Option<ErasureSource<'_>>,
        now_s: i64,
    ) -> Result<(), Status> {
        if let Some(recent) = &self.recent {
            recent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .forget(customer);
        }
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let privacy = self.privacy()?;
        let mut result = shared.erase_customer(customer, now_s).await;
        if let (Ok(_), Some(source)) = (&result, &notice) {
            let retention = Duration::from_secs(privacy.token_lifetime_s.unsigned_abs());
            if let Err(err) = shared.announce_erasure(customer, source, retention).await {
                result = Err(err);
            }
        }
        let pseudonym = privacy.identities.pseudonym(customer);
        let cleared = result.is_ok();
        self.store()
            .write("record an erased customer's counters", move |conn| {
                if cleared {
                    erasure::counters_cleared(conn, &pseudonym)
                } else {
                    erasure::counters_failed(conn, &pseudonym)
                }
            })
            .await
            .map_err(ServiceError::from)?;
        match result {
            Ok(removed) => info!(
                removed,
                announced = notice.is_some(),
                "erased customer's counts removed from Redis"
            ),
            Err(err) => warn!(
                error = %err,
                "failed to remove an erased customer's counts from Redis or to announce the \
                 erasure to the other sidecars; retrying every 10 s"
            ),
        }
        Ok(())
    }

    /// Tries again to remove the Redis counts of erased customers that
    /// Redis could not remove before.
    pub async fn retry_counter_cleanup(&self) -> Result<(), Status> {
        if self.shared.is_none() {
            return Ok(());
        }
        let keys = Arc::clone(&self.privacy()?.keys);
        let pending = self
            .store()
            .read("read pending counter removals", move |conn| {
                erasure::counters_pending(conn, keys.as_ref())
            })
            .await
            .map_err(ServiceError::from)?;
        for pending in pending {
            info!(
                erasure_id = pending.erasure_id,
                "retrying the removal of an erased customer's Redis counts"
            );
            let notice = pending.announce.then(|| ErasureSource {
                erasure_id: &pending.erasure_id,
                erased_at_unix_ms: pending.requested_unix_ms,
            });
            self.clear_counters(&pending.customer, notice, unix_now_s())
                .await?;
        }
        Ok(())
    }

    /// Erases here the customers that other sidecars sharing the counters
    /// erased since the last call, reading at most 100 notices. A notice of
    /// an erasure older than the token lifetime is skipped, because by then
    /// the customer may have come back, and so is an entry that is not a
    /// notice.
    pub async fn apply_erasure_notices(&self) -> Result<(), Status> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        let lifetime_ms = self.privacy()?.token_lifetime_s.saturating_mul(1_000);
        let after = self.cursor().clone();
        let entries = shared
            .erasure_notices(&after, NOTICES_PER_READ)
            .await
            .map_err(|err| {
                Status::unavailable(format!("failed to read the erasure notices: {err}"))
            })?;
        for entry in entries {
            let entry_id = entry.entry_id().to_owned();
            match entry {
                NoticeEntry::Notice(notice) => {
                    let now_ms = unix_now_s().saturating_mul(1_000);
                    let own = notice.sidecar_id == shared.sidecar_id();
                    // Judged by when the notice was announced, since an
                    // erasure may be announced long after it was made.
                    let stale = notice.announced_at_unix_ms() < now_ms.saturating_sub(lifetime_ms);
                    if !own && !stale {
                        self.apply_notice(&notice).await?;
                    }
                }
                NoticeEntry::Unreadable { entry_id, detail } => warn!(
                    notice = entry_id,
                    error = detail,
                    "skipped an entry of the erasure notice stream that this sidecar cannot read"
                ),
            }
            *self.cursor() = entry_id;
        }
        Ok(())
    }

    /// Erases the customer of another sidecar's `notice`.
    async fn apply_notice(&self, notice: &ErasureNotice) -> Result<(), Status> {
        if let Err(err) = check_token_customer(&notice.customer) {
            warn!(
                notice = notice.entry_id,
                origin_sidecar = notice.sidecar_id,
                error = %Status::from(err).message(),
                "skipped an erasure notice with an invalid customer id"
            );
            return Ok(());
        }
        let actor = format!("sidecar:{}", notice.sidecar_id);
        // A time far ahead, from a wrong clock or a forged notice, would
        // make every later erasure of the customer here return this one.
        let origin = Origin::Notice {
            erased_at_unix_ms: notice.erased_at_unix_ms.min(latest_erasure_time_ms()),
        };
        let (erasure, performed) = self.erase(notice.customer.clone(), actor, origin).await?;
        if performed {
            info!(
                erasure_id = erasure.erasure_id,
                notice = notice.entry_id,
                origin_sidecar = notice.sidecar_id,
                origin_erasure_id = notice.erasure_id,
                "erased a customer that another sidecar erased"
            );
        }
        Ok(())
    }

    /// Returns the erasures due to be passed on, per peer, including those
    /// of peers `privacy.erasure_peers` no longer lists.
    pub async fn due_forwards(
        &self,
    ) -> Result<BTreeMap<String, Vec<forward::PendingForward>>, Status> {
        let privacy = self.privacy()?;
        let mut by_peer: BTreeMap<String, Vec<forward::PendingForward>> = BTreeMap::new();
        let keys = Arc::clone(&privacy.keys);
        let now_ms = unix_now_s().saturating_mul(1_000);
        let due = self
            .store()
            .read("read the erasures to pass on", move |conn| {
                forward::due(conn, keys.as_ref(), now_ms)
            })
            .await
            .map_err(ServiceError::from)?;
        for pending in due {
            by_peer
                .entry(pending.peer.clone())
                .or_default()
                .push(pending);
        }
        Ok(by_peer)
    }

    /// Passes the erasures `rows` on to `peer` in turn and notes which the
    /// peer erased. It stops at the first failure, so a peer that fails is
    /// asked once per call; the rest stay due. When the peer cannot be
    /// reached at all, every row counts a failed attempt.
    pub async fn forward_to_peer(
        &self,
        peer: &str,
        rows: &[forward::PendingForward],
    ) -> Result<PeerOutcome, Status> {
        let error = match connect_peer(peer).await {
            Ok(mut client) => {
                let ledger = self.biller.ledger();
                let actor = format!("sidecar:{}:{}", ledger.region, ledger.ledger_id);
                let mut stopped_by = None;
                for row in rows {
                    let result = erase_at_peer(&mut client, row, &actor).await;
                    stopped_by = result.as_ref().err().cloned();
                    self.record_forward(row, result).await?;
                    if stopped_by.is_some() {
                        break;
                    }
                }
                stopped_by
            }
            Err(error) => {
                for row in rows {
                    self.record_forward(row, Err(error.clone())).await?;
                }
                Some(error)
            }
        };

        let owned_peer = peer.to_owned();
        let failing = self
            .store()
            .read("count the erasures failing for a peer", move |conn| {
                forward::failing(conn, &owned_peer)
            })
            .await
            .map_err(ServiceError::from)?;
        Ok(PeerOutcome { error, failing })
    }

    /// Stores the outcome of passing `row` on (the peer's erasure id or the
    /// error) and logs a success.
    async fn record_forward(
        &self,
        row: &forward::PendingForward,
        result: Result<String, String>,
    ) -> Result<(), Status> {
        let (erasure_id, peer) = (row.erasure_id.clone(), row.peer.clone());
        let error = result.as_ref().err().cloned();
        let now_ms = unix_now_s().saturating_mul(1_000);
        self.store()
            .write("record an erasure passed on", move |conn| match &error {
                None => forward::done(conn, &erasure_id, &peer),
                Some(error) => forward::failed(conn, &erasure_id, &peer, error, now_ms),
            })
            .await
            .map_err(ServiceError::from)?;
        if let Ok(peer_erasure_id) = result {
            info!(
                erasure_id = row.erasure_id,
                peer = row.peer,
                peer_erasure_id,
                "peer sidecar erased the customer"
            );
        }
        Ok(())
    }

    /// Warns about each peer that erasures wait for but
    /// `privacy.erasure_peers` no longer lists. Those erasures are still
    /// passed on to it, so a peer listed under another address by mistake
    /// loses none. For a peer that is gone for good,
    /// `veo-sidecar drop-erasure-peer` drops them.
    pub async fn warn_unlisted_peers(&self) -> Result<(), Status> {
        let peers = Arc::clone(&self.privacy()?.erasure_peers);
        let unlisted = self
            .store()
            .read("read the peers erasures wait for", move |conn| {
                forward::unlisted(conn, &peers)
            })
            .await
            .map_err(ServiceError::from)?;
        for (peer, waiting) in unlisted {
            warn!(
                peer,
                erasures = waiting,
                "erasures wait for a peer sidecar that privacy.erasure_peers no longer lists; \
                 they are still passed on to it. List it again, or, if it is gone for good, \
                 stop this sidecar and run `veo-sidecar drop-erasure-peer` and erase those \
                 customers by hand"
            );
        }
        Ok(())
    }

    /// Locks the id of the last erasure notice read.
    fn cursor(&self) -> std::sync::MutexGuard<'_, String> {
        self.notice_cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Returns an erasure's progress.
    pub async fn get_erasure(&self, request: GetErasureRequest) -> Result<Erasure, Status> {
        self.privacy()?;
        validate::identifier("erasure_id", &request.erasure_id, MAX_ID_BYTES)?;
        self.erasure_progress(&request.erasure_id).await
    }

    async fn erasure_progress(&self, erasure_id: &str) -> Result<Erasure, Status> {
        let privacy = self.privacy()?;
        let id = erasure_id.to_owned();
        let found = self
            .store()
            .read("read an erasure", move |conn| erasure::by_id(conn, &id))
            .await
            .map_err(ServiceError::from)?;
        let Some(found) = found else {
            return Err(Status::not_found(format!(
                "no erasure {erasure_id:?}; check the id that erase-customer or EraseCustomer \
                 returned"
            )));
        };
        // Until its version is recorded, the erasure waits for every
        // instance at or below the version in force.
        let version = match found.erasures_version {
            0 => privacy.pushes.erasures_version(),
            version => version,
        };
        let pending = privacy.pushes.pending_instances(version, unix_now_s());
        let id = found.erasure_id.clone();
        let counters_pending = self
            .store()
            .read("read pending counter removals", move |conn| {
                erasure::counters_pending_for(conn, &id)
            })
            .await
            .map_err(ServiceError::from)?;
        let id = found.erasure_id.clone();
        let pending_peers = self
            .store()
            .read("read the peers an erasure waits for", move |conn| {
                forward::pending_for(conn, &id)
            })
            .await
            .map_err(ServiceError::from)?;
        let state = if counters_pending {
            ErasureState::PendingSharedCounters
        } else if !pending_peers.is_empty() {
            ErasureState::PendingPeers
        } else if pending.is_empty() {
            ErasureState::Complete
        } else {
            ErasureState::PendingInstances
        };
        Ok(Erasure {
            erasure_id: found.erasure_id,
            state: state.into(),
            requested_unix_ms: found.requested_unix_ms,
            records: found
                .records
                .into_iter()
                .map(|(kind, count)| ErasedRecords { kind, count })
                .collect(),
            pending_instances: pending,
            receipt: Some(AuditReceipt {
                position: found.receipt.position,
                entry_hash: found.receipt.entry_hash,
                subject_hash: found.subject_hash,
            }),
            pending_peers: pending_peers
                .into_iter()
                .map(|peer| PendingPeer {
                    peer: peer.peer,
                    attempts: peer.attempts,
                    last_error: peer.last_error,
                })
                .collect(),
        })
    }

    /// Checks the audit log's hash chain.
    pub async fn verify_audit_log(&self) -> Result<VerifyAuditLogResponse, Status> {
        self.privacy()?;
        let verification = self
            .store()
            .read("verify the audit log", |conn| {
                let mut verification = audit::verify(conn).map_err(to_sql)?;
                erasure::check_receipts(conn, &mut verification)?;
                Ok(verification)
            })
            .await
            .map_err(ServiceError::from)?;
        if !verification.intact {
            warn!(
                first_bad_position = verification.first_bad_position,
                problem = verification.problem,
                "the audit log fails verification"
            );
        }
        Ok(VerifyAuditLogResponse {
            intact: verification.intact,
            entries: verification.entries,
            first_bad_position: verification.first_bad_position,
            problem: verification.problem,
            head_hash: verification.head_hash,
        })
    }
}

/// Outcome of one call of [`AdminService::forward_to_peer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerOutcome {
    /// The error that stopped the call, if any.
    pub error: Option<String>,
    /// Erasures for the peer that have failed and still wait, in erasures.
    pub failing: u64,
}

/// Maximum length of a peer's error text kept in the store, in bytes.
const MAX_PEER_ERROR_BYTES: usize = 512;

/// Returns the latest erasure time accepted from a peer or a notice, in
/// Unix milliseconds: [`MAX_PEER_CLOCK_AHEAD_S`] ahead of this clock.
fn latest_erasure_time_ms() -> i64 {
    unix_now_s()
        .saturating_add(MAX_PEER_CLOCK_AHEAD_S)
        .saturating_mul(1_000)
}

/// A client of a peer sidecar's admin API.
type PeerClient = veo_proto::admin::admin_client::AdminClient<tonic::transport::Channel>;

/// Connects to the peer sidecar at `peer`, within [`PEER_TIMEOUT`].
async fn connect_peer(peer: &str) -> Result<PeerClient, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(peer.to_owned())
        .map_err(|err| format!("invalid peer address: {err}"))?
        .connect_timeout(PEER_TIMEOUT)
        .timeout(PEER_TIMEOUT);
    let channel = tokio::time::timeout(PEER_TIMEOUT, endpoint.connect())
        .await
        .map_err(|_| format!("no connection within {} s", PEER_TIMEOUT.as_secs()))?
        .map_err(|err| format!("could not connect: {}", crate::error_chain(&err)))?;
    Ok(PeerClient::new(channel))
}

/// Asks the peer sidecar of `row` to erase its customer, and returns the
/// peer's erasure id or the error. The customer id is removed from the
/// peer's error text, because that text is stored and logged.
async fn erase_at_peer(
    client: &mut PeerClient,
    row: &forward::PendingForward,
    actor: &str,
) -> Result<String, String> {
    let mut request = tonic::Request::new(EraseCustomerRequest {
        customer: row.customer.clone(),
        erased_at_unix_ms: row.erased_at_unix_ms,
    });
    let actor = actor
        .parse()
        .map_err(|_| format!("{actor:?} is not a valid actor name"))?;
    request.metadata_mut().insert(ACTOR_METADATA, actor);
    request.set_timeout(PEER_TIMEOUT);
    // The channel's timeout covers the reply's headers only, so this
    // bounds the whole call.
    let status = match tokio::time::timeout(PEER_TIMEOUT, client.erase_customer(request)).await {
        Ok(Ok(reply)) => return Ok(reply.into_inner().erasure_id),
        Ok(Err(status)) => status,
        Err(_) => {
            return Err(format!(
                "no reply within {} s; check that the peer runs and is not overloaded",
                PEER_TIMEOUT.as_secs()
            ));
        }
    };
    let mut message = without_customer(status.message(), &row.customer);
    if message.len() > MAX_PEER_ERROR_BYTES {
        let mut end = MAX_PEER_ERROR_BYTES;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let hint = match status.code() {
        tonic::Code::Unimplemented | tonic::Code::Internal | tonic::Code::Unknown => {
            "; check that the address is the gRPC address (`listen`) of a veo-sidecar"
        }
        _ => "",
    };
    Err(format!("{:?}: {message}{hint}", status.code()))
}

/// Replaces `customer` in `text` with `<customer>`, also where it is
/// escaped once or twice as a Rust or JSON string would escape it.
fn without_customer(text: &str, customer: &str) -> String {
    let escaped_once = format!("{customer:?}");
    let once = escaped_once.trim_matches('"').to_owned();
    let escaped_twice = format!("{once:?}");
    let twice = escaped_twice.trim_matches('"').to_owned();
    let mut cleaned = text.to_owned();
    // The longest form first, so that a shorter one inside it cannot
    // leave part of it behind.
    for form in [twice, once, customer.to_owned()] {
        cleaned = cleaned.replace(&form, "<customer>");
    }
    cleaned
}

#[cfg(test)]
mod peer_error_tests {
    use super::without_customer;

    #[test]
    fn customer_is_removed_in_every_form() {
        let customer = r#"id"with\quote"#;
        for text in [
            format!("customer {customer} rejected"),
            format!("customer {customer:?} rejected"),
            format!("customer {:?} rejected", format!("{customer:?}")),
        ] {
            let cleaned = without_customer(&text, customer);
            assert!(!cleaned.contains("with"), "{cleaned}");
            assert!(cleaned.contains("<customer>"), "{cleaned}");
        }
    }
}
