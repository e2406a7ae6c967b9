//! Tables of the webhook endpoint: processed events, the tier of each Stripe
//! customer, and the tier metadata still to write to Stripe.
//!
//! Every function takes a connection or transaction and runs synchronously;
//! callers run them through `Store::write` or `Store::read`.

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use crate::audit::NewEntry;
use crate::identity::Identities;
use crate::privacy::{Privacy, to_sql};

use super::event::Rank;

/// Tables of the webhook endpoint, created when missing. The
/// `stripe_customer` mapping table is not part of it.
pub const SCHEMA: &str = "
-- Every applied delivery, by event id, so that a replay or a concurrent
-- second delivery of one event is applied once.
CREATE TABLE IF NOT EXISTS stripe_webhook_event (
    event_id TEXT PRIMARY KEY NOT NULL,
    event_type TEXT NOT NULL,
    received_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX IF NOT EXISTS stripe_webhook_event_by_received
    ON stripe_webhook_event (received_unix_s);

-- Tier of each Stripe customer, by pseudonym, and the event that set it. An event replaces
-- the row only when (event_created_unix_s, rank) is greater. version grows
-- by one at each change of tier.
CREATE TABLE IF NOT EXISTS stripe_tier_state (
    stripe_pseudonym TEXT PRIMARY KEY NOT NULL,
    tier TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    event_id TEXT NOT NULL,
    event_created_unix_s INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    subscription_id TEXT,
    subscription_created_unix_s INTEGER,
    updated_unix_s INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

-- Tier to write to metadata[tier] of a Stripe customer, by pseudonym; one
-- row per customer, replaced by each newer version.
CREATE TABLE IF NOT EXISTS stripe_tier_metadata_pending (
    stripe_pseudonym TEXT PRIMARY KEY NOT NULL,
    tier TEXT NOT NULL,
    version INTEGER NOT NULL,
    attempts INTEGER NOT NULL CHECK (attempts >= 0),
    next_attempt_unix_ms INTEGER NOT NULL
) WITHOUT ROWID, STRICT;
";

/// How long processed event ids are kept. In live mode Stripe retries a
/// delivery for up to three days (Stripe webhook documentation), so 30 days
/// covers every automatic retry and manual resends within a month.
pub(super) const EVENT_RETENTION_S: i64 = 30 * 86_400;

/// Returns the tier of every Stripe customer that has a tier state and a
/// mapping to our customer, as `(customer, tier)` in ascending order of
/// customer, where `customer` is the value the mapping stores: the
/// customer's pseudonym in the sidecar's store.
pub fn tier_overrides(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut statement = conn.prepare_cached(
        "SELECT m.customer, s.tier FROM stripe_tier_state AS s \
         JOIN stripe_customer AS m ON m.stripe_pseudonym = s.stripe_pseudonym \
         ORDER BY m.customer",
    )?;
    let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// Returns [`tier_overrides`] with each customer named by its customer id,
/// in ascending order of customer id. A customer without a readable
/// identity is left out, with a warning when reading it failed.
pub fn named_tier_overrides(
    conn: &Connection,
    identities: &Identities,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut revealer = identities.revealer();
    let mut named = Vec::new();
    for (pseudonym, tier) in tier_overrides(conn)? {
        if let Some(customer) = revealer.reveal_or_skip(conn, &pseudonym) {
            named.push((customer, tier));
        }
    }
    named.sort();
    Ok(named)
}

/// A verified delivery to record, with what it changes.
#[derive(Debug)]
pub(super) struct Delivery {
    pub event_id: String,
    pub event_type: String,
    pub received_unix_s: i64,
    pub tier: Option<TierUpdate>,
    /// `(customer, stripe_customer_id)` to insert when the Stripe customer
    /// has no mapping yet.
    pub mapping: Option<(String, String)>,
    /// Delete processed events received before this time, in Unix seconds.
    pub prune_before_unix_s: Option<i64>,
}

/// A tier an event requests.
#[derive(Debug, Clone)]
pub(super) struct TierUpdate {
    pub stripe_customer_id: String,
    pub tier: String,
    pub event_created_unix_s: i64,
    pub rank: Rank,
    /// The subscription the tier comes from, or `None` for an operator's
    /// override in the customer's metadata.
    pub subscription: Option<SubscriptionSource>,
}

/// The subscription behind a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SubscriptionSource {
    pub id: String,
    pub created_unix_s: i64,
}

/// Result of recording a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Recorded {
    /// The event id was recorded before; nothing changed.
    Duplicate,
    /// The event id is recorded, with the outcome of its changes.
    Applied {
        tier: TierOutcome,
        mapping: MappingOutcome,
    },
}

/// Outcome of a tier update.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TierOutcome {
    /// The delivery requested no tier.
    None,
    /// The tier changed to `tier`, at state version `version`.
    Changed { tier: String, version: i64 },
    /// The event is newer than the state but requests the same tier.
    Unchanged,
    /// The state is newer than the event, or the event comes from an older
    /// subscription than the live one behind the state.
    Stale,
}

/// Outcome of a mapping insert.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum MappingOutcome {
    /// The delivery requested no mapping.
    None,
    /// The mapping row was inserted.
    Inserted,
    /// The Stripe customer already had this mapping.
    Exists,
    /// The Stripe customer is already mapped to another customer; that
    /// mapping was kept.
    StripeCustomerTaken,
    /// Our customer id is already mapped to another Stripe customer.
    CustomerTaken,
    /// Our customer id was erased; its tokens are still refused, and no
    /// new data about it is kept.
    Erased,
}

/// Stored tier state of one Stripe customer.
#[derive(Debug, Clone)]
struct TierState {
    tier: String,
    version: i64,
    event_created_unix_s: i64,
    rank: i64,
    subscription: Option<SubscriptionSource>,
}

/// Records `delivery` and applies its changes in one transaction. The event
/// id's primary key makes a second delivery of the same event a duplicate,
/// even when both arrive at once, because the writer connection runs one
/// transaction at a time.
#[cfg(test)]
pub(super) fn record(conn: &mut Connection, delivery: &Delivery) -> rusqlite::Result<Recorded> {
    record_audited(conn, delivery, None, None)
}

/// Like [`record`], and appends each change of tier to the audit log of
/// `privacy` in the same transaction. With `identities`, the tables name
/// customers and Stripe customers by their pseudonyms, and the Stripe
/// customer's encrypted id is stored.
pub(super) fn record_audited(
    conn: &mut Connection,
    delivery: &Delivery,
    privacy: Option<&Privacy>,
    identities: Option<&Identities>,
) -> rusqlite::Result<Recorded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

    let inserted = tx.execute(
        "INSERT INTO stripe_webhook_event (event_id, event_type, received_unix_s) \
         VALUES (?1, ?2, ?3) ON CONFLICT (event_id) DO NOTHING",
        params![
            delivery.event_id,
            delivery.event_type,
            delivery.received_unix_s
        ],
    )?;
    if inserted == 0 {
        return Ok(Recorded::Duplicate);
    }

    // The Stripe customer's encrypted id is stored only once a row names
    // it, so an ignored event (stale, or a mapping to an erased customer)
    // keeps nothing.
    let stored_key = |stripe_customer_id: &str| match identities {
        Some(identities) => identities.stripe_pseudonym(stripe_customer_id),
        None => stripe_customer_id.to_owned(),
    };
    let record_identity = |stripe_customer_id: &str| match identities {
        Some(identities) => identities
            .record_stripe(&tx, stripe_customer_id)
            .map(drop)
            .map_err(to_sql),
        None => Ok(()),
    };
    let tier = match &delivery.tier {
        Some(update) => {
            let stripe_key = stored_key(&update.stripe_customer_id);
            let tier = apply_tier(&tx, update, &stripe_key, delivery)?;
            if tier != TierOutcome::Stale {
                record_identity(&update.stripe_customer_id)?;
            }
            (tier, Some(stripe_key))
        }
        None => (TierOutcome::None, None),
    };
    let (tier, tier_stripe_key) = tier;
    let mapping = match &delivery.mapping {
        Some((customer, stripe_customer_id)) => {
            let stripe_key = stored_key(stripe_customer_id);
            let names = identities;
            let mapped =
                insert_mapping(&tx, names, customer, &stripe_key, delivery.received_unix_s)?;
            if mapped == MappingOutcome::Inserted {
                record_identity(stripe_customer_id)?;
            }
            mapped
        }
        None => MappingOutcome::None,
    };
    if let (Some(privacy), TierOutcome::Changed { tier, version }, Some(stripe_key)) =
        (privacy, &tier, &tier_stripe_key)
    {
        let change = TierChange {
            stripe_key,
            tier,
            version: *version,
        };
        audit_tier_change(&tx, privacy, identities, delivery, &change)?;
    }
    if let (Some(privacy), MappingOutcome::Inserted, Some((customer, _))) =
        (privacy, &mapping, &delivery.mapping)
    {
        privacy.append(
            &tx,
            &NewEntry {
                at_unix_ms: delivery.received_unix_s.saturating_mul(1_000),
                actor: "stripe-webhook".into(),
                action: "set_stripe_customer".into(),
                subject_hash: Some(privacy.subject(customer)),
                records: 1,
                details: serde_json::json!({ "event_id": delivery.event_id }),
            },
        )?;
    }
    if let Some(before) = delivery.prune_before_unix_s {
        tx.execute(
            "DELETE FROM stripe_webhook_event WHERE received_unix_s < ?1",
            [before],
        )?;
    }

    tx.commit()?;
    Ok(Recorded::Applied { tier, mapping })
}

/// A change of tier, with the Stripe customer as the tables name it.
struct TierChange<'a> {
    stripe_key: &'a str,
    tier: &'a str,
    version: i64,
}

/// Appends a change of tier to the audit log, with the customer's subject
/// hash when the Stripe customer is mapped to one. With `identities`, the
/// mapping names customers by pseudonym, and the customer id is revealed
/// to compute the hash.
fn audit_tier_change(
    tx: &Transaction<'_>,
    privacy: &Privacy,
    identities: Option<&Identities>,
    delivery: &Delivery,
    change: &TierChange<'_>,
) -> rusqlite::Result<()> {
    let mapped: Option<String> = tx
        .query_row(
            "SELECT customer FROM stripe_customer WHERE stripe_pseudonym = ?1",
            [change.stripe_key],
            |row| row.get(0),
        )
        .optional()?;
    let customer = match (mapped, identities) {
        (Some(pseudonym), Some(identities)) => {
            identities.reveal_readable(tx, &pseudonym).map_err(to_sql)?
        }
        (mapped, _) => mapped,
    };
    privacy.append(
        tx,
        &NewEntry {
            at_unix_ms: delivery.received_unix_s.saturating_mul(1_000),
            actor: "stripe-webhook".into(),
            action: "tier_change".into(),
            subject_hash: customer.map(|customer| privacy.subject(&customer)),
            records: 1,
            details: serde_json::json!({
                "event_id": delivery.event_id,
                "event_type": delivery.event_type,
                "tier": change.tier,
                "version": change.version,
            }),
        },
    )?;
    Ok(())
}

/// Applies `update` to the tier state of the Stripe customer stored as
/// `stripe_key`.
fn apply_tier(
    tx: &Transaction<'_>,
    update: &TierUpdate,
    stripe_key: &str,
    delivery: &Delivery,
) -> rusqlite::Result<TierOutcome> {
    let stored = load_state(tx, stripe_key)?;
    if let Some(stored) = &stored
        && !supersedes(update, stored)
    {
        return Ok(TierOutcome::Stale);
    }

    let changed = stored
        .as_ref()
        .is_none_or(|stored| stored.tier != update.tier);
    let version = match &stored {
        None => 1,
        Some(stored) if changed => stored.version + 1,
        Some(stored) => stored.version,
    };
    let subscription = update.subscription.as_ref();
    tx.execute(
        "INSERT INTO stripe_tier_state (stripe_pseudonym, tier, version, event_id, \
         event_created_unix_s, rank, subscription_id, subscription_created_unix_s, \
         updated_unix_s) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
         ON CONFLICT (stripe_pseudonym) DO UPDATE SET tier = excluded.tier, \
         version = excluded.version, event_id = excluded.event_id, \
         event_created_unix_s = excluded.event_created_unix_s, rank = excluded.rank, \
         subscription_id = excluded.subscription_id, \
         subscription_created_unix_s = excluded.subscription_created_unix_s, \
         updated_unix_s = excluded.updated_unix_s",
        params![
            stripe_key,
            update.tier,
            version,
            delivery.event_id,
            update.event_created_unix_s,
            update.rank.to_sql(),
            subscription.map(|source| source.id.as_str()),
            subscription.map(|source| source.created_unix_s),
            delivery.received_unix_s,
        ],
    )?;
    if !changed {
        return Ok(TierOutcome::Unchanged);
    }

    if update.subscription.is_some() {
        tx.execute(
            "INSERT INTO stripe_tier_metadata_pending (stripe_pseudonym, tier, version, \
             attempts, next_attempt_unix_ms) VALUES (?1, ?2, ?3, 0, 0) \
             ON CONFLICT (stripe_pseudonym) DO UPDATE SET tier = excluded.tier, \
             version = excluded.version, attempts = 0, next_attempt_unix_ms = 0",
            params![stripe_key, update.tier, version],
        )?;
    } else {
        // The tier came from the customer's metadata, which Stripe already
        // contains, and a pending write of an older tier would overwrite it.
        tx.execute(
            "DELETE FROM stripe_tier_metadata_pending WHERE stripe_pseudonym = ?1",
            [stripe_key],
        )?;
    }
    Ok(TierOutcome::Changed {
        tier: update.tier.clone(),
        version,
    })
}

/// Returns whether `update` replaces `stored`. Its (created, rank) must be
/// greater, so for equal keys the state received first stays. An event from
/// a subscription created before the live subscription behind the state
/// does not replace it either, so the end of an old subscription does not
/// cancel the tier of its successor.
///
/// NOTE: the state is kept per customer, not per subscription. When the
/// newer of two live subscriptions ends, the customer gets the canceled
/// tier until the older one sends its next event.
fn supersedes(update: &TierUpdate, stored: &TierState) -> bool {
    let update_key = (update.event_created_unix_s, update.rank.to_sql());
    if update_key <= (stored.event_created_unix_s, stored.rank) {
        return false;
    }

    let stored_live = stored.rank == Rank::Live.to_sql();
    match (&update.subscription, &stored.subscription) {
        (Some(new), Some(old)) if stored_live && new.id != old.id => {
            new.created_unix_s >= old.created_unix_s
        }
        _ => true,
    }
}

fn load_state(tx: &Transaction<'_>, stripe_key: &str) -> rusqlite::Result<Option<TierState>> {
    tx.query_row(
        "SELECT tier, version, event_created_unix_s, rank, subscription_id, \
         subscription_created_unix_s FROM stripe_tier_state WHERE stripe_pseudonym = ?1",
        [stripe_key],
        |row| {
            let subscription_id: Option<String> = row.get(4)?;
            let subscription_created: Option<i64> = row.get(5)?;
            Ok(TierState {
                tier: row.get(0)?,
                version: row.get(1)?,
                event_created_unix_s: row.get(2)?,
                rank: row.get(3)?,
                subscription: subscription_id
                    .zip(subscription_created)
                    .map(|(id, created)| SubscriptionSource {
                        id,
                        created_unix_s: created,
                    }),
            })
        },
    )
    .optional()
}

/// Maps `customer` to the Stripe customer stored as `stripe_key` when
/// neither has a mapping yet.
fn insert_mapping(
    tx: &Transaction<'_>,
    identities: Option<&Identities>,
    customer: &str,
    stripe_key: &str,
    now_unix_s: i64,
) -> rusqlite::Result<MappingOutcome> {
    let existing: Option<String> = tx
        .query_row(
            "SELECT customer FROM stripe_customer WHERE stripe_pseudonym = ?1",
            [stripe_key],
            |row| row.get(0),
        )
        .optional()?;
    let pseudonym = match identities {
        Some(identities) => identities.pseudonym(customer),
        None => customer.to_owned(),
    };
    if let Some(existing) = existing {
        return Ok(if existing == pseudonym {
            MappingOutcome::Exists
        } else {
            MappingOutcome::StripeCustomerTaken
        });
    }
    let erased: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM erased_customer WHERE pseudonym = ?1)",
        [&pseudonym],
        |row| row.get(0),
    )?;
    if erased {
        return Ok(MappingOutcome::Erased);
    }
    let name = match identities {
        Some(identities) => identities.record(tx, customer).map_err(to_sql)?,
        None => pseudonym,
    };

    let inserted = tx.execute(
        "INSERT INTO stripe_customer (customer, stripe_pseudonym, updated_unix_s) \
         VALUES (?1, ?2, ?3) ON CONFLICT (customer) DO NOTHING",
        params![name, stripe_key, now_unix_s],
    )?;
    Ok(if inserted == 0 {
        MappingOutcome::CustomerTaken
    } else {
        MappingOutcome::Inserted
    })
}

/// A tier waiting to be written to a Stripe customer's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PendingMetadata {
    /// The Stripe customer as the table names it.
    pub stripe_key: String,
    /// The Stripe customer id to write to.
    pub stripe_customer_id: String,
    pub tier: String,
    pub version: i64,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Returns up to `limit` pending writes due at `now_unix_ms`, oldest due
/// first. With `identities`, the table names Stripe customers by pseudonym
/// and each id is read from its encrypted identity. A write whose identity
/// row or data key is missing can never be sent, so it is deleted with an
/// error line.
pub(super) fn due_metadata(
    conn: &Connection,
    identities: Option<&Identities>,
    now_unix_ms: i64,
    limit: u32,
) -> rusqlite::Result<Vec<PendingMetadata>> {
    let mut statement = conn.prepare_cached(
        "SELECT stripe_pseudonym, tier, version, attempts FROM stripe_tier_metadata_pending \
         WHERE next_attempt_unix_ms <= ?1 ORDER BY next_attempt_unix_ms LIMIT ?2",
    )?;
    let rows = statement.query_map(params![now_unix_ms, limit], |row| {
        Ok(PendingMetadata {
            stripe_key: row.get(0)?,
            stripe_customer_id: row.get(0)?,
            tier: row.get(1)?,
            version: row.get(2)?,
            attempts: row.get(3)?,
        })
    })?;
    let pending = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    let Some(identities) = identities else {
        return Ok(pending);
    };
    let mut revealed = Vec::with_capacity(pending.len());
    for mut write in pending {
        match identities
            .reveal_stripe(conn, &write.stripe_key)
            .map_err(to_sql)?
        {
            Some(stripe_customer_id) => {
                write.stripe_customer_id = stripe_customer_id;
                revealed.push(write);
            }
            None => {
                conn.execute(
                    "DELETE FROM stripe_tier_metadata_pending WHERE stripe_pseudonym = ?1",
                    [&write.stripe_key],
                )?;
                tracing::error!(
                    stripe_pseudonym = write.stripe_key,
                    tier = write.tier,
                    "dropped a pending tier metadata write: the Stripe customer's id is missing \
                     from stripe_identity or its data key is gone. Set metadata.tier on the \
                     Stripe customer by hand"
                );
            }
        }
    }
    Ok(revealed)
}

/// Returns when the next pending write is due, in Unix milliseconds.
pub(super) fn next_metadata_due(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT MIN(next_attempt_unix_ms) FROM stripe_tier_metadata_pending",
        [],
        |row| row.get(0),
    )
}

/// Removes the pending write of `pending`'s version, once written or given
/// up. A newer version that replaced it stays.
pub(super) fn finish_metadata(
    conn: &Connection,
    pending: &PendingMetadata,
) -> rusqlite::Result<()> {
    conn.execute(
        "DELETE FROM stripe_tier_metadata_pending \
         WHERE stripe_pseudonym = ?1 AND version = ?2",
        params![pending.stripe_key, pending.version],
    )?;
    Ok(())
}

/// Counts a failed attempt of `pending`'s version and schedules the next
/// one at `next_attempt_unix_ms`.
pub(super) fn retry_metadata(
    conn: &Connection,
    pending: &PendingMetadata,
    next_attempt_unix_ms: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE stripe_tier_metadata_pending SET attempts = attempts + 1, \
         next_attempt_unix_ms = ?3 WHERE stripe_pseudonym = ?1 AND version = ?2",
        params![pending.stripe_key, pending.version, next_attempt_unix_ms],
    )?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The mapping table as the rest of the sidecar creates it.
    pub(in super::super) const MAPPING_SCHEMA: &str = "
        CREATE TABLE IF NOT EXISTS stripe_customer (
            customer TEXT PRIMARY KEY NOT NULL,
            stripe_pseudonym TEXT NOT NULL UNIQUE,
            updated_unix_s INTEGER NOT NULL
        ) WITHOUT ROWID, STRICT;
    ";

    fn open() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        conn.execute_batch(MAPPING_SCHEMA).unwrap();
        conn.execute_batch(crate::erasure::SCHEMA).unwrap();
        conn
    }

    fn subscription(id: &str, created: i64) -> Option<SubscriptionSource> {
        Some(SubscriptionSource {
            id: id.into(),
            created_unix_s: created,
        })
    }

    fn delivery(event_id: &str, tier: &str, created: i64, rank: Rank) -> Delivery {
        Delivery {
            event_id: event_id.into(),
            event_type: "customer.subscription.updated".into(),
            received_unix_s: 1_000,
            tier: Some(TierUpdate {
                stripe_customer_id: "cus_1".into(),
                tier: tier.into(),
                event_created_unix_s: created,
                rank,
                subscription: subscription("sub_1", 10),
            }),
            mapping: None,
            prune_before_unix_s: None,
        }
    }

    fn tier_outcome(recorded: Recorded) -> TierOutcome {
        match recorded {
            Recorded::Applied { tier, .. } => tier,
            Recorded::Duplicate => panic!("unexpected duplicate"),
        }
    }

    fn stored_tier(conn: &Connection) -> Option<(String, i64)> {
        conn.query_row(
            "SELECT tier, version FROM stripe_tier_state WHERE stripe_pseudonym = 'cus_1'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()
        .unwrap()
    }

    fn pending(conn: &Connection) -> Vec<PendingMetadata> {
        due_metadata(conn, None, i64::MAX, 10).unwrap()
    }

    #[test]
    fn first_event_creates_state_and_pending_write() {
        let mut conn = open();

        let outcome = record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();

        assert_eq!(
            tier_outcome(outcome),
            TierOutcome::Changed {
                tier: "pro".into(),
                version: 1
            }
        );
        assert_eq!(stored_tier(&conn), Some(("pro".into(), 1)));
        assert_eq!(
            pending(&conn),
            vec![PendingMetadata {
                stripe_key: "cus_1".into(),
                stripe_customer_id: "cus_1".into(),
                tier: "pro".into(),
                version: 1,
                attempts: 0
            }]
        );
    }

    #[test]
    fn same_event_id_is_duplicate() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();

        let again = record(&mut conn, &delivery("evt_1", "enterprise", 200, Rank::Live)).unwrap();

        assert_eq!(again, Recorded::Duplicate);
        assert_eq!(stored_tier(&conn), Some(("pro".into(), 1)));
    }

    #[test]
    fn older_event_is_stale() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_2", "enterprise", 200, Rank::Live)).unwrap();

        let outcome = record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();

        assert_eq!(tier_outcome(outcome), TierOutcome::Stale);
        assert_eq!(stored_tier(&conn), Some(("enterprise".into(), 1)));
    }

    #[test]
    fn equal_key_keeps_first_state() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();

        let outcome = record(&mut conn, &delivery("evt_2", "enterprise", 100, Rank::Live)).unwrap();

        assert_eq!(tier_outcome(outcome), TierOutcome::Stale);
        assert_eq!(stored_tier(&conn), Some(("pro".into(), 1)));
    }

    #[test]
    fn higher_rank_wins_same_second() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_2", "basic", 100, Rank::Ended)).unwrap();

        let live = record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();
        let deleted = record(&mut conn, &delivery("evt_3", "free", 100, Rank::Deleted)).unwrap();

        assert_eq!(tier_outcome(live), TierOutcome::Stale);
        assert_eq!(
            tier_outcome(deleted),
            TierOutcome::Changed {
                tier: "free".into(),
                version: 2
            }
        );
    }

    #[test]
    fn same_tier_keeps_version() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();
        finish_metadata(&conn, &pending(&conn)[0]).unwrap();

        let outcome = record(&mut conn, &delivery("evt_2", "pro", 200, Rank::Live)).unwrap();

        assert_eq!(tier_outcome(outcome), TierOutcome::Unchanged);
        assert_eq!(stored_tier(&conn), Some(("pro".into(), 1)));
        assert_eq!(pending(&conn), vec![]);
    }

    #[test]
    fn older_subscription_does_not_replace_live_newer_one() {
        let mut conn = open();
        let mut newer = delivery("evt_1", "enterprise", 100, Rank::Live);
        newer.tier.as_mut().unwrap().subscription = subscription("sub_2", 90);
        record(&mut conn, &newer).unwrap();

        let old_ended = record(&mut conn, &delivery("evt_2", "basic", 200, Rank::Deleted)).unwrap();

        assert_eq!(tier_outcome(old_ended), TierOutcome::Stale);
        assert_eq!(stored_tier(&conn), Some(("enterprise".into(), 1)));
    }

    #[test]
    fn older_subscription_replaces_ended_newer_one() {
        let mut conn = open();
        let mut newer = delivery("evt_1", "basic", 100, Rank::Deleted);
        newer.tier.as_mut().unwrap().subscription = subscription("sub_2", 90);
        record(&mut conn, &newer).unwrap();

        let old_live = record(&mut conn, &delivery("evt_2", "pro", 200, Rank::Live)).unwrap();

        assert_eq!(
            tier_outcome(old_live),
            TierOutcome::Changed {
                tier: "pro".into(),
                version: 2
            }
        );
    }

    #[test]
    fn override_cancels_pending_write() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();
        let mut manual = delivery("evt_2", "enterprise", 200, Rank::Override);
        manual.tier.as_mut().unwrap().subscription = None;

        let outcome = record(&mut conn, &manual).unwrap();

        assert_eq!(
            tier_outcome(outcome),
            TierOutcome::Changed {
                tier: "enterprise".into(),
                version: 2
            }
        );
        assert_eq!(pending(&conn), vec![]);
    }

    #[test]
    fn newer_version_survives_finish_of_older() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();
        let sent = pending(&conn).remove(0);
        record(&mut conn, &delivery("evt_2", "enterprise", 200, Rank::Live)).unwrap();

        finish_metadata(&conn, &sent).unwrap();
        retry_metadata(&conn, &sent, 5).unwrap();

        let left = pending(&conn);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].tier, "enterprise");
        assert_eq!(left[0].version, 2);
        assert_eq!(left[0].attempts, 0);
    }

    #[test]
    fn retry_schedules_next_attempt() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_1", "pro", 100, Rank::Live)).unwrap();
        let sent = pending(&conn).remove(0);

        retry_metadata(&conn, &sent, 5_000).unwrap();

        assert_eq!(due_metadata(&conn, None, 4_999, 10).unwrap(), vec![]);
        assert_eq!(due_metadata(&conn, None, 5_000, 10).unwrap()[0].attempts, 1);
        assert_eq!(next_metadata_due(&conn).unwrap(), Some(5_000));
    }

    #[test]
    fn erased_customer_is_not_mapped_again() {
        let mut conn = open();
        conn.execute(
            "INSERT INTO erased_customer VALUES ('gone', x'00', 9999999999)",
            [],
        )
        .unwrap();
        let mut delivery = delivery("evt_1", "pro", 100, Rank::Live);
        delivery.mapping = Some(("gone".into(), "cus_1".into()));

        let recorded = record(&mut conn, &delivery).unwrap();

        assert!(matches!(
            recorded,
            Recorded::Applied {
                mapping: MappingOutcome::Erased,
                ..
            }
        ));
        let mapped: i64 = conn
            .query_row("SELECT COUNT(*) FROM stripe_customer", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mapped, 0);
    }

    /// Opens a full store with identities, in `dir`.
    fn store_with_identities(dir: &std::path::Path) -> (Connection, Identities) {
        let mut conn = crate::store::test_support::open_writer(&dir.join("db"));
        let keys = crate::keys::LocalKeyFile::open_or_create(&dir.join("keys.json")).unwrap();
        let identities = Identities::open(&mut conn, std::sync::Arc::new(keys)).unwrap();
        (conn, identities)
    }

    fn count(conn: &Connection, table: &str) -> i64 {
        conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
            row.get(0)
        })
        .unwrap()
    }

    #[test]
    fn ignored_mappings_store_no_stripe_id() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, identities) = store_with_identities(dir.path());
        let erased = identities.pseudonym("gone");
        conn.execute(
            "INSERT INTO erased_customer VALUES (?1, x'00', 9999999999)",
            [&erased],
        )
        .unwrap();
        let mut first = delivery("evt_1", "pro", 100, Rank::Live);
        first.tier = None;
        first.mapping = Some(("gone".into(), "cus_erased".into()));
        let mut second = delivery("evt_2", "pro", 100, Rank::Live);
        second.tier = None;
        second.mapping = Some(("acme".into(), "cus_first".into()));
        let mut third = delivery("evt_3", "pro", 100, Rank::Live);
        third.tier = None;
        third.mapping = Some(("acme".into(), "cus_second".into()));

        for delivery in [&first, &second, &third] {
            record_audited(&mut conn, delivery, None, Some(&identities)).unwrap();
        }

        let stored: Vec<String> = conn
            .prepare("SELECT pseudonym FROM stripe_identity")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(stored, [identities.stripe_pseudonym("cus_first")]);
    }

    #[test]
    fn unreadable_pending_write_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, identities) = store_with_identities(dir.path());
        record_audited(
            &mut conn,
            &delivery("evt_1", "pro", 100, Rank::Live),
            None,
            Some(&identities),
        )
        .unwrap();
        let revealed = due_metadata(&conn, Some(&identities), i64::MAX, 10).unwrap();
        assert_eq!(revealed.len(), 1);
        assert_eq!(revealed[0].stripe_customer_id, "cus_1");
        assert_eq!(revealed[0].stripe_key, identities.stripe_pseudonym("cus_1"));

        conn.execute("DELETE FROM stripe_identity", []).unwrap();

        assert_eq!(
            due_metadata(&conn, Some(&identities), i64::MAX, 10).unwrap(),
            vec![]
        );
        assert_eq!(count(&conn, "stripe_tier_metadata_pending"), 0);
        assert_eq!(count(&conn, "stripe_tier_state"), 1);
    }

    #[test]
    fn tier_changes_are_audited_with_the_customer_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::test_support::open_writer(&dir.path().join("db"));
        let key_file = crate::keys::test_support::TestKeyFile::new();
        let keys: std::sync::Arc<dyn crate::keys::KeyProvider> = std::sync::Arc::new(key_file.keys);
        let identities = Identities::open(&mut conn, std::sync::Arc::clone(&keys)).unwrap();
        let privacy = Privacy {
            pushes: std::sync::Arc::new(crate::pushes::Pushes::new(1)),
            identities: identities.clone(),
            keys,
            token_lifetime_s: 60,
            erasure_peers: Vec::new().into(),
        };
        let mut first = delivery("evt_1", "pro", 100, Rank::Live);
        first.mapping = Some(("acme".into(), "cus_1".into()));
        let audited = |conn: &mut Connection, delivery: &Delivery| {
            record_audited(conn, delivery, Some(&privacy), Some(&identities)).unwrap();
        };

        audited(&mut conn, &first);
        audited(&mut conn, &delivery("evt_2", "pro", 200, Rank::Live));
        audited(&mut conn, &delivery("evt_3", "basic", 300, Rank::Live));

        let entries = crate::audit::entries(&conn, Some(privacy.keys.as_ref()), 0, 10).unwrap();
        let actions: Vec<&str> = entries.iter().map(|entry| entry.action.as_str()).collect();
        assert_eq!(
            actions,
            ["tier_change", "set_stripe_customer", "tier_change"],
            "the unchanged tier is not a change"
        );
        assert_eq!(entries[0].actor, "stripe-webhook");
        assert_eq!(entries[1].subject_hash, Some(privacy.subject("acme")));
        assert_eq!(entries[2].subject_hash, Some(privacy.subject("acme")));
        assert!(crate::audit::verify(&conn).unwrap().intact);
        let (mapped, _) = tier_overrides(&conn).unwrap().remove(0);
        assert_eq!(
            named_tier_overrides(&conn, &identities).unwrap(),
            [("acme".to_owned(), "basic".to_owned())]
        );
        assert_eq!(
            mapped,
            identities.pseudonym("acme"),
            "the mapping holds the pseudonym"
        );
        assert_ne!(mapped, privacy.subject("acme"));
        assert_eq!(
            identities.reveal(&conn, &mapped).unwrap().as_deref(),
            Some("acme")
        );
    }

    #[test]
    fn mapping_is_inserted_once() {
        let mut conn = open();
        let mut first = delivery("evt_1", "pro", 100, Rank::Live);
        first.mapping = Some(("acme".into(), "cus_1".into()));
        let mut again = delivery("evt_2", "pro", 200, Rank::Live);
        again.mapping = Some(("other".into(), "cus_1".into()));
        let mut taken = delivery("evt_3", "pro", 300, Rank::Live);
        taken.mapping = Some(("acme".into(), "cus_2".into()));
        let mut same = delivery("evt_4", "pro", 400, Rank::Live);
        same.mapping = Some(("acme".into(), "cus_1".into()));

        let outcomes =
            [first, again, taken, same].map(|delivery| record(&mut conn, &delivery).unwrap());

        let mappings: Vec<_> = outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Recorded::Applied { mapping, .. } => mapping,
                Recorded::Duplicate => panic!("unexpected duplicate"),
            })
            .collect();
        assert_eq!(
            mappings,
            [
                MappingOutcome::Inserted,
                MappingOutcome::StripeCustomerTaken,
                MappingOutcome::CustomerTaken,
                MappingOutcome::Exists,
            ]
        );
        assert_eq!(
            tier_overrides(&conn).unwrap(),
            [("acme".to_owned(), "pro".to_owned())]
        );
    }

    #[test]
    fn prune_removes_old_event_ids() {
        let mut conn = open();
        record(&mut conn, &delivery("evt_old", "pro", 100, Rank::Live)).unwrap();
        let mut later = delivery("evt_new", "pro", 200, Rank::Live);
        later.received_unix_s = 1_000 + EVENT_RETENTION_S + 1;
        later.prune_before_unix_s = Some(later.received_unix_s - EVENT_RETENTION_S);

        record(&mut conn, &later).unwrap();
        let replay = record(&mut conn, &delivery("evt_new", "pro", 200, Rank::Live)).unwrap();
        let ids: Vec<String> = conn
            .prepare("SELECT event_id FROM stripe_webhook_event")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();

        assert_eq!(ids, ["evt_new"]);
        assert_eq!(replay, Recorded::Duplicate);
    }
}
