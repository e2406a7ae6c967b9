//! The meter event queue in the usage store: closing minute buckets into
//! events, and the state of each event on its way to Stripe.
//!
//! Every function runs on one SQLite connection. Those that change more
//! than one row do so in one transaction, so a crash leaves either all of
//! a bucket's change or none of it.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tracing::error;

use super::meter::{EventKey, Meter};
use crate::identity::Identities;
use crate::ledger::{MINUTE_SECONDS, TimeRange};
use crate::privacy::to_sql;

/// Identity of the ledger that events are created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerKey {
    /// Region of the sidecar.
    pub region: String,
    /// Identifier of the sidecar's ledger within the region.
    pub ledger_id: String,
}

/// A meter event waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedEvent {
    /// Position in the queue.
    pub id: i64,
    /// Stripe identifier of the event.
    pub identifier: String,
    /// Customer the usage belongs to.
    pub customer: String,
    /// Meter of the usage.
    pub meter: Meter,
    /// Start of the minute bucket, the event's timestamp.
    pub minute_unix_s: i64,
    /// Usage in the meter's unit.
    pub value: i64,
    /// Earlier failed attempts.
    pub attempts: i64,
    /// Idempotency keys given up on; see [`QueuedEvent::idempotency_key`].
    pub key_generation: i64,
    /// Pseudonym of the Stripe customer the usage is billed to, when one
    /// is set; [`Identities::reveal_stripe`](crate::identity::Identities::reveal_stripe)
    /// gives its id.
    pub stripe_pseudonym: Option<String>,
}

impl QueuedEvent {
    /// Returns the idempotency key of the next attempt: the identifier, with
    /// `:k<generation>` appended once a key was given up on. A new key is
    /// safe, because Stripe also rejects a second event with the same
    /// identifier.
    pub fn idempotency_key(&self) -> String {
        if self.key_generation == 0 {
            self.identifier.clone()
        } else {
            format!("{}:k{}", self.identifier, self.key_generation)
        }
    }
}

/// A meter event that Stripe rejected for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// Stripe identifier of the event.
    pub identifier: String,
    /// Customer the usage belongs to.
    pub customer: String,
    /// Meter name.
    pub meter: String,
    /// Start of the minute bucket.
    pub minute_unix_s: i64,
    /// Usage in the meter's unit.
    pub value: i64,
    /// Stripe's reason for the rejection.
    pub reason: String,
}

/// Counts of events by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Events waiting to be sent.
    pub pending: i64,
    /// Events rejected for good.
    pub parked: i64,
}

const INSERT_EVENT: &str = "
INSERT INTO meter_event
    (identifier, customer, meter, minute_unix_s, value, correction, state, created_unix_s,
     stripe_pseudonym)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)
ON CONFLICT (identifier) DO NOTHING";

/// Turns the closed minute buckets whose usage changed into meter events,
/// at most `limit` buckets per call, and returns the number of events
/// created.
///
/// A bucket is closed once `close_delay_s` seconds have passed since its
/// minute ended; `None` closes every bucket. Its first event carries all of its usage. Usage that
/// reaches the ledger later (a filter's backlog after an outage) becomes
/// one more event with the difference, so each unit is billed once.
pub fn close_buckets(
    conn: &mut Connection,
    ledger: &LedgerKey,
    now_unix_s: i64,
    close_delay_s: Option<i64>,
    limit: usize,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let closed_before = match close_delay_s {
        Some(delay) => now_unix_s.saturating_sub(MINUTE_SECONDS.saturating_add(delay)),
        None => i64::MAX,
    };
    let dirty: Vec<(String, i64)> = {
        let mut statement = tx.prepare_cached(
            "SELECT customer, minute_unix_s FROM billing_dirty
             WHERE minute_unix_s <= ?1 ORDER BY minute_unix_s, customer LIMIT ?2",
        )?;
        let rows = statement.query_map(
            params![closed_before, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        rows.collect::<rusqlite::Result<_>>()?
    };

    let mut created = 0;
    for (customer, minute_unix_s) in &dirty {
        for meter in Meter::ALL {
            if close_meter(&tx, ledger, customer, meter, *minute_unix_s, now_unix_s)? {
                created += 1;
            }
        }
        tx.execute(
            "DELETE FROM billing_dirty WHERE customer = ?1 AND minute_unix_s = ?2",
            params![customer, minute_unix_s],
        )?;
    }
    tx.commit()?;
    Ok(created)
}

/// Queues the difference between the ledger and what is billed for one
/// bucket and meter; returns whether an event was created.
fn close_meter(
    tx: &Transaction<'_>,
    ledger: &LedgerKey,
    customer: &str,
    meter: Meter,
    minute_unix_s: i64,
    now_unix_s: i64,
) -> rusqlite::Result<bool> {
    // The sum is computed here rather than in SQL, because `TOTAL()` is a
    // float that is inexact past 2^53 and `SUM()` fails past 2^63 - 1. A
    // bucket has one row per tier, so there are few.
    let mut statement = tx.prepare_cached(&format!(
        "SELECT {} FROM usage_minute WHERE customer = ?1 AND minute_unix_s = ?2",
        meter.ledger_column()
    ))?;
    let mut total: i64 = 0;
    let mut rows = statement.query(params![customer, minute_unix_s])?;
    while let Some(row) = rows.next()? {
        total = total.saturating_add(row.get::<_, i64>(0)?.max(0));
    }
    let (billed, parts): (i64, i64) = tx
        .query_row(
            "SELECT billed, parts FROM meter_bucket
             WHERE customer = ?1 AND meter = ?2 AND minute_unix_s = ?3",
            params![customer, meter.name(), minute_unix_s],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?
        .unwrap_or((0, 0));
    if total <= billed {
        if total < billed {
            // The ledger only grows, so this means someone edited the
            // store by hand. Billing never sends negative usage.
            error!(
                customer_pseudonym = customer,
                meter = meter.name(),
                minute_unix_s,
                ledger = total,
                billed,
                "ledger total below the billed usage; check the usage store for manual changes"
            );
        }
        return Ok(false);
    }

    let part = parts + 1;
    let identifier = EventKey {
        region: &ledger.region,
        ledger_id: &ledger.ledger_id,
        customer,
        meter,
        minute_unix_s,
        part,
        correction: "",
    }
    .identifier();
    tx.execute(
        INSERT_EVENT,
        params![
            identifier,
            customer,
            meter.name(),
            minute_unix_s,
            total - billed,
            0,
            now_unix_s,
            Option::<String>::None
        ],
    )?;
    tx.execute(
        "INSERT INTO meter_bucket (customer, meter, minute_unix_s, billed, parts)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (customer, meter, minute_unix_s) DO UPDATE SET
             billed = excluded.billed, parts = excluded.parts",
        params![customer, meter.name(), minute_unix_s, total, part],
    )?;
    Ok(true)
}

/// Returns what names the customer of `pseudonym` in a corrective event's
/// identifier: its subject hash, which `rotate-keys` does not change, so a
/// correction queued before a rotation keeps its identifier after it. A
/// customer whose id can no longer be read is named by its pseudonym.
pub fn correction_customer(
    conn: &Connection,
    identities: &Identities,
    pseudonym: &str,
) -> rusqlite::Result<String> {
    let customer = identities
        .reveal_readable(conn, pseudonym)
        .map_err(to_sql)?;
    Ok(match customer {
        Some(customer) => identities.subject(&customer),
        None => pseudonym.to_owned(),
    })
}

/// Queues a corrective event of the customer of pseudonym `customer` for
/// the Stripe customer of pseudonym `stripe_pseudonym` unless one with the
/// same identifier exists, and returns whether it was queued. `key.customer`
/// names the customer in the identifier, as [`correction_customer`]
/// returns it.
pub fn queue_correction(
    conn: &Connection,
    key: &EventKey<'_>,
    customer: &str,
    stripe_pseudonym: &str,
    value: i64,
    now_unix_s: i64,
) -> rusqlite::Result<bool> {
    let inserted = conn.execute(
        INSERT_EVENT,
        params![
            key.identifier(),
            customer,
            key.meter.name(),
            key.minute_unix_s,
            value,
            1,
            now_unix_s,
            stripe_pseudonym
        ],
    )?;
    Ok(inserted == 1)
}

/// Returns up to `limit` pending events after queue position `after_id`,
/// oldest first, with their Stripe customer: the one the event was first
/// tried with, or else the customer's current one.
pub fn pending(
    conn: &Connection,
    after_id: i64,
    limit: usize,
) -> rusqlite::Result<Vec<QueuedEvent>> {
    let mut statement = conn.prepare_cached(
        "SELECT e.id, e.identifier, e.customer, e.meter, e.minute_unix_s, e.value, e.attempts,
                COALESCE(e.stripe_pseudonym, c.stripe_pseudonym), e.key_generation
         FROM meter_event e LEFT JOIN stripe_customer c ON c.customer = e.customer
         WHERE e.state = 'pending' AND e.id > ?1
         ORDER BY e.id LIMIT ?2",
    )?;
    let rows = statement.query_map(
        params![after_id, i64::try_from(limit).unwrap_or(i64::MAX)],
        |row| {
            let meter: String = row.get(3)?;
            Ok((
                meter,
                QueuedEvent {
                    id: row.get(0)?,
                    identifier: row.get(1)?,
                    customer: row.get(2)?,
                    meter: Meter::ApiRequests,
                    minute_unix_s: row.get(4)?,
                    value: row.get(5)?,
                    attempts: row.get(6)?,
                    stripe_pseudonym: row.get(7)?,
                    key_generation: row.get(8)?,
                },
            ))
        },
    )?;
    let mut events = Vec::new();
    for row in rows {
        let (meter, mut event) = row?;
        match Meter::from_name(&meter) {
            Some(known) => {
                event.meter = known;
                events.push(event);
            }
            None => error!(
                identifier = event.identifier,
                meter, "meter event names an unknown meter; it stays queued"
            ),
        }
    }
    Ok(events)
}

/// Marks events as accepted by Stripe (or already recorded there), each
/// with the Stripe customer it was sent to.
pub fn mark_sent(
    conn: &mut Connection,
    sent: &[(i64, Option<String>)],
    now_unix_s: i64,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut statement = tx.prepare_cached(
            "UPDATE meter_event SET state = 'sent', sent_unix_s = ?2, reason = NULL,
                 stripe_pseudonym = COALESCE(?3, stripe_pseudonym)
             WHERE id = ?1",
        )?;
        for (id, stripe_pseudonym) in sent {
            statement.execute(params![id, now_unix_s, stripe_pseudonym])?;
        }
    }
    tx.commit()
}

/// Counts a failed attempt of an event that will be retried, and pins the
/// Stripe customer it was tried with: a retry must repeat the request
/// exactly, because Stripe rejects an idempotency key reused with other
/// parameters. With `new_key` the retry uses the next idempotency key,
/// because Stripe would replay the failure saved under this one.
pub fn record_attempt(
    conn: &Connection,
    id: i64,
    stripe_pseudonym: &str,
    reason: &str,
    new_key: bool,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meter_event SET attempts = attempts + 1, reason = ?2, stripe_pseudonym = ?3,
             key_generation = key_generation + ?4
         WHERE id = ?1",
        params![id, reason, stripe_pseudonym, i64::from(new_key)],
    )?;
    Ok(())
}

/// Parks an event that can never be accepted as it is, with the reason.
pub fn park(conn: &Connection, id: i64, reason: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meter_event SET state = 'parked', attempts = attempts + 1, reason = ?2
         WHERE id = ?1",
        params![id, reason],
    )?;
    Ok(())
}

/// Queues a customer's parked events again, for example after its Stripe
/// customer changed; returns how many. Each gets the next idempotency key,
/// because Stripe replays the rejection saved under the old one, and
/// rejects that key with another Stripe customer.
pub fn unpark_customer(conn: &Connection, customer: &str) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE meter_event SET state = 'pending', stripe_pseudonym = NULL,
             key_generation = key_generation + 1
         WHERE customer = ?1 AND state = 'parked' AND correction = 0",
        [customer],
    )
}

/// Returns up to `limit` parked events, oldest first.
pub fn parked(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<ParkedEvent>> {
    let mut statement = conn.prepare_cached(
        "SELECT identifier, customer, meter, minute_unix_s, value, COALESCE(reason, '')
         FROM meter_event WHERE state = 'parked' ORDER BY id LIMIT ?1",
    )?;
    let rows = statement.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
        Ok(ParkedEvent {
            identifier: row.get(0)?,
            customer: row.get(1)?,
            meter: row.get(2)?,
            minute_unix_s: row.get(3)?,
            value: row.get(4)?,
            reason: row.get(5)?,
        })
    })?;
    rows.collect()
}

/// Counts events by state.
pub fn counts(conn: &Connection) -> rusqlite::Result<QueueCounts> {
    conn.query_row(
        "SELECT COALESCE(SUM(state = 'pending'), 0), COALESCE(SUM(state = 'parked'), 0)
         FROM meter_event",
        [],
        |row| {
            Ok(QueueCounts {
                pending: row.get(0)?,
                parked: row.get(1)?,
            })
        },
    )
}

/// Marks the pending events whose identifiers are in `identifiers` as sent;
/// returns how many. Used at start with the identifiers already written to
/// the outbox file, so a crash between the write and the commit does not
/// write an event twice.
pub fn mark_sent_by_identifier(
    conn: &mut Connection,
    identifiers: &[String],
    now_unix_s: i64,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut changed = 0;
    {
        let mut statement = tx.prepare_cached(
            "UPDATE meter_event SET state = 'sent', sent_unix_s = ?2
             WHERE identifier = ?1 AND state = 'pending'",
        )?;
        for identifier in identifiers {
            changed += statement.execute(params![identifier, now_unix_s])?;
        }
    }
    tx.commit()?;
    Ok(changed)
}

/// Usage per customer and meter, keyed by customer then meter.
pub type Totals = BTreeMap<(String, Meter), i64>;

/// Converts a `TOTAL()` to an integer, saturating at `i64::MAX`.
///
/// Sums use `TOTAL()`, a float, because `SUM()` fails on a sum beyond
/// 2^63 - 1, which one forged batch can reach by spreading a minute's bytes
/// over many tiers, and that failure would stop billing for everyone. Sums
/// of integers stay exact up to 2^53.
pub fn saturating(total: f64) -> i64 {
    // `as` saturates and turns NaN into 0.
    #[allow(clippy::cast_possible_truncation)]
    let value = total as i64;
    value
}

/// Sums the ledger per customer and meter over the minutes in `range`.
pub fn ledger_totals(conn: &Connection, range: TimeRange) -> rusqlite::Result<Totals> {
    let mut statement = conn.prepare_cached(
        "SELECT customer, TOTAL(admitted), TOTAL(egress_bytes)
         FROM usage_minute WHERE minute_unix_s >= ?1 AND minute_unix_s < ?2
         GROUP BY customer",
    )?;
    let rows = statement.query_map(params![range.start_unix_s, range.end_unix_s], |row| {
        Ok((
            row.get::<_, String>(0)?,
            saturating(row.get(1)?),
            saturating(row.get(2)?),
        ))
    })?;
    let mut totals = Totals::new();
    for row in rows {
        let (customer, requests, bytes) = row?;
        if requests > 0 {
            totals.insert((customer.clone(), Meter::ApiRequests), requests);
        }
        if bytes > 0 {
            totals.insert((customer, Meter::EgressBytes), bytes);
        }
    }
    Ok(totals)
}

/// Sums the events sent (or written to the outbox file) per customer and
/// meter whose minute is in `range`, corrections included.
pub fn sent_totals(conn: &Connection, range: TimeRange) -> rusqlite::Result<Totals> {
    let mut statement = conn.prepare_cached(
        "SELECT customer, meter, TOTAL(value) FROM meter_event
         WHERE state = 'sent' AND minute_unix_s >= ?1 AND minute_unix_s < ?2
         GROUP BY customer, meter",
    )?;
    let rows = statement.query_map(params![range.start_unix_s, range.end_unix_s], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, String>(1)?,
            saturating(row.get(2)?),
        ))
    })?;
    let mut totals = Totals::new();
    for row in rows {
        let (customer, meter, value) = row?;
        if let Some(meter) = Meter::from_name(&meter) {
            totals.insert((customer, meter), value);
        }
    }
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Batch, UsageEntry};
    use crate::store::Store;

    const MINUTE: i64 = 1_700_000_040;

    fn ledger_key() -> LedgerKey {
        LedgerKey {
            region: "eu-west".into(),
            ledger_id: "sc-1".into(),
        }
    }

    fn entry(customer: &str, minute_unix_s: i64, admitted: i64, egress_bytes: i64) -> UsageEntry {
        UsageEntry {
            customer: customer.into(),
            tier: "basic".into(),
            minute_unix_s,
            admitted,
            refused: 1,
            egress_bytes,
            quota: None,
        }
    }

    async fn apply(store: &Store, sequence: i64, records: Vec<UsageEntry>) {
        let batch = Batch {
            instance_id: "i1".into(),
            sequence,
            records,
        };
        store.apply(batch, MINUTE + 120).await.unwrap();
    }

    async fn close(store: &Store, now: i64) -> usize {
        store
            .write("close", move |conn| {
                close_buckets(conn, &ledger_key(), now, Some(5), 100)
            })
            .await
            .unwrap()
    }

    async fn all_pending(store: &Store) -> Vec<QueuedEvent> {
        store
            .read("pending", |conn| pending(conn, 0, 1000))
            .await
            .unwrap()
    }

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_support::open(dir.path());
        (dir, store)
    }

    #[tokio::test]
    async fn open_minute_is_not_billed() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 100)]).await;

        assert_eq!(close(&store, MINUTE + 60 + 4).await, 0);
        assert_eq!(close(&store, MINUTE + 60 + 5).await, 2);
    }

    #[tokio::test]
    async fn closed_minute_becomes_one_event_per_meter() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 100)]).await;
        apply(&store, 2, vec![entry("acme", MINUTE, 2, 50)]).await;

        close(&store, MINUTE + 120).await;
        let events = all_pending(&store).await;

        assert_eq!(events.len(), 2);
        assert_eq!(events[0].meter, Meter::ApiRequests);
        assert_eq!(events[0].value, 7);
        assert_eq!(events[1].meter, Meter::EgressBytes);
        assert_eq!(events[1].value, 150);
        assert_eq!(events[0].minute_unix_s, MINUTE);
        assert_eq!(events[0].stripe_pseudonym, None);
    }

    #[tokio::test]
    async fn bytes_beyond_two_to_53_are_billed_exactly() {
        let (_dir, store) = open();
        let tiers = ["a", "b", "c", "d", "e", "f", "g", "h", "i"];
        let records: Vec<UsageEntry> = tiers
            .into_iter()
            .enumerate()
            .map(|(index, tier)| UsageEntry {
                tier: tier.into(),
                // Eight rows of 2^50 bytes and one of 1 byte: 2^53 + 1.
                ..entry("acme", MINUTE, 1, if index < 8 { 1 << 50 } else { 1 })
            })
            .collect();
        apply(&store, 1, records).await;

        close(&store, MINUTE + 120).await;
        let events = all_pending(&store).await;

        let bytes = events
            .iter()
            .find(|event| event.meter == Meter::EgressBytes)
            .unwrap();
        assert_eq!(bytes.value, (1 << 53) + 1);
    }

    #[tokio::test]
    async fn bytes_beyond_i64_over_tiers_keep_billing() {
        let (_dir, store) = open();
        // One minute's bytes spread over three tiers sum beyond i64::MAX,
        // and the minute sorts before the other customer's.
        let forged: Vec<UsageEntry> = ["a", "b", "c"]
            .into_iter()
            .map(|tier| UsageEntry {
                tier: tier.into(),
                ..entry("forged", MINUTE - 60, 1, i64::MAX / 2)
            })
            .collect();
        apply(&store, 1, forged).await;
        apply(&store, 2, vec![entry("acme", MINUTE, 5, 0)]).await;

        close(&store, MINUTE + 120).await;
        let events = all_pending(&store).await;

        let bytes = events
            .iter()
            .find(|event| event.meter == Meter::EgressBytes)
            .unwrap();
        assert_eq!(bytes.value, i64::MAX);
        let acme = store.identities().pseudonym("acme");
        assert!(
            events
                .iter()
                .any(|event| event.customer == acme && event.value == 5)
        );
        let range = TimeRange {
            start_unix_s: MINUTE - 60,
            end_unix_s: MINUTE + 60,
        };
        let totals = store
            .read("sum", move |conn| ledger_totals(conn, range))
            .await
            .unwrap();
        let forged = store.identities().pseudonym("forged");
        assert_eq!(totals[&(forged, Meter::EgressBytes)], i64::MAX);
    }

    #[tokio::test]
    async fn closing_again_creates_nothing() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;

        assert_eq!(close(&store, MINUTE + 120).await, 1);
        assert_eq!(close(&store, MINUTE + 180).await, 0);
        assert_eq!(all_pending(&store).await.len(), 1);
    }

    #[tokio::test]
    async fn late_usage_becomes_a_second_part() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;
        close(&store, MINUTE + 120).await;
        apply(&store, 2, vec![entry("acme", MINUTE, 3, 0)]).await;

        assert_eq!(close(&store, MINUTE + 180).await, 1);
        let events = all_pending(&store).await;

        assert_eq!(
            events.iter().map(|event| event.value).collect::<Vec<_>>(),
            [5, 3]
        );
        assert_ne!(events[0].identifier, events[1].identifier);
    }

    #[tokio::test]
    async fn refusals_alone_are_not_billed() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 0, 0)]).await;

        assert_eq!(close(&store, MINUTE + 120).await, 0);
    }

    #[tokio::test]
    async fn duplicate_batch_is_not_billed_twice() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;

        close(&store, MINUTE + 120).await;

        let events = all_pending(&store).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].value, 5);
    }

    #[tokio::test]
    async fn sent_and_parked_leave_the_queue() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 9)]).await;
        close(&store, MINUTE + 120).await;
        let events = all_pending(&store).await;
        let (first, second) = (events[0].id, events[1].id);

        store
            .write("sent", move |conn| {
                mark_sent(conn, &[(first, None)], MINUTE + 130)
            })
            .await
            .unwrap();
        store
            .write("park", move |conn| park(conn, second, "no such customer"))
            .await
            .unwrap();

        assert!(all_pending(&store).await.is_empty());
        let parked_events = store.read("parked", |conn| parked(conn, 10)).await.unwrap();
        assert_eq!(parked_events.len(), 1);
        assert_eq!(parked_events[0].reason, "no such customer");
        let counts = store.read("counts", |conn| counts(conn)).await.unwrap();
        assert_eq!(
            counts,
            QueueCounts {
                pending: 0,
                parked: 1
            }
        );
    }

    #[tokio::test]
    async fn setting_stripe_customer_unparks_events() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;
        close(&store, MINUTE + 120).await;
        let id = all_pending(&store).await[0].id;
        store
            .write("park", move |conn| park(conn, id, "no such customer"))
            .await
            .unwrap();

        let acme = store.identities().pseudonym("acme");
        let outcome = store
            .write("set", move |conn| {
                super::super::customers::set(conn, &acme, "cus_A1", 1)
            })
            .await
            .unwrap();

        assert_eq!(
            outcome,
            super::super::customers::SetOutcome::Stored { unparked: 1 }
        );
        let events = all_pending(&store).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].stripe_pseudonym.as_deref(), Some("cus_A1"));
        // Stripe replays the rejection saved under the first key.
        assert_eq!(events[0].key_generation, 1);
        assert_eq!(
            events[0].idempotency_key(),
            format!("{}:k1", events[0].identifier)
        );
    }

    #[tokio::test]
    async fn server_error_moves_to_the_next_key() {
        let (_dir, store) = open();
        apply(&store, 1, vec![entry("acme", MINUTE, 5, 0)]).await;
        close(&store, MINUTE + 120).await;
        let first = all_pending(&store).await[0].clone();
        assert_eq!(first.idempotency_key(), first.identifier);

        let id = first.id;
        store
            .write("retry", move |conn| {
                record_attempt(conn, id, "cus_A1", "rate limited", false)?;
                record_attempt(conn, id, "cus_A1", "Stripe returned 500", true)
            })
            .await
            .unwrap();

        let retried = all_pending(&store).await[0].clone();
        assert_eq!(retried.attempts, 2);
        assert_eq!(retried.key_generation, 1);
        assert_eq!(
            retried.idempotency_key(),
            format!("{}:k1", first.identifier)
        );
    }

    #[tokio::test]
    async fn totals_compare_ledger_with_sent() {
        let (_dir, store) = open();
        apply(
            &store,
            1,
            vec![entry("acme", MINUTE, 5, 10), entry("beta", MINUTE, 2, 0)],
        )
        .await;
        close(&store, MINUTE + 120).await;
        let acme = store.identities().pseudonym("acme");
        let first = all_pending(&store)
            .await
            .iter()
            .find(|event| event.customer == acme && event.meter == Meter::ApiRequests)
            .unwrap()
            .id;
        store
            .write("sent", move |conn| {
                mark_sent(conn, &[(first, None)], MINUTE + 130)
            })
            .await
            .unwrap();
        let range = TimeRange {
            start_unix_s: MINUTE,
            end_unix_s: MINUTE + 60,
        };

        let ledger = store
            .read("ledger", move |conn| ledger_totals(conn, range))
            .await
            .unwrap();
        let sent = store
            .read("sent", move |conn| sent_totals(conn, range))
            .await
            .unwrap();

        let beta = store.identities().pseudonym("beta");
        assert_eq!(ledger.get(&(acme.clone(), Meter::ApiRequests)), Some(&5));
        assert_eq!(ledger.get(&(acme.clone(), Meter::EgressBytes)), Some(&10));
        assert_eq!(ledger.get(&(beta, Meter::ApiRequests)), Some(&2));
        assert_eq!(sent.get(&(acme, Meter::ApiRequests)), Some(&5));
        assert_eq!(sent.len(), 1);
    }

    #[test]
    fn correction_customer_survives_new_index_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let keys: std::sync::Arc<dyn crate::keys::KeyProvider> =
            std::sync::Arc::new(crate::keys::LocalKeyFile::open_or_create(&path).unwrap());
        let mut conn = crate::store::test_support::open_writer(&dir.path().join("db"));
        let before = Identities::open(&mut conn, std::sync::Arc::clone(&keys)).unwrap();
        let pseudonym = before.record(&conn, "acme").unwrap();
        let named = correction_customer(&conn, &before, &pseudonym).unwrap();
        let key = |customer| EventKey {
            region: "eu-west",
            ledger_id: "sc-1",
            customer,
            meter: Meter::ApiRequests,
            minute_unix_s: MINUTE,
            part: 0,
            correction: "1700000000-cus_A-5",
        };
        assert!(queue_correction(&conn, &key(&named), &pseudonym, "sp", 2, 1).unwrap());

        crate::identity::replace_index_key(&mut conn, std::sync::Arc::clone(&keys)).unwrap();
        let after = Identities::open(&mut conn, keys).unwrap();

        let renamed = after.pseudonym("acme");
        let again = correction_customer(&conn, &after, &renamed).unwrap();
        assert!(
            !queue_correction(&conn, &key(&again), &renamed, "sp", 2, 2).unwrap(),
            "the correction queued before the rotation is found"
        );
        assert_ne!(renamed, pseudonym);
        assert_eq!(named, before.subject("acme"));
        assert_eq!(correction_customer(&conn, &after, &renamed).unwrap(), named);
        assert_eq!(
            correction_customer(&conn, &after, "unknown").unwrap(),
            "unknown",
            "a customer without an identity keeps its pseudonym"
        );
    }
}
