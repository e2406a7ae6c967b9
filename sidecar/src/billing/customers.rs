//! The Stripe customer of each customer, in the usage store.

use rusqlite::{Connection, OptionalExtension, params};

use crate::identity::Identities;
use crate::privacy::to_sql;

/// Longest accepted Stripe customer id, in bytes.
pub const MAX_STRIPE_ID_BYTES: usize = 255;

/// Checks that `id` looks like a Stripe customer id (`cus_` and letters,
/// digits or underscores); returns the reason when it does not.
pub fn check_stripe_customer_id(id: &str) -> Result<(), String> {
    // The length comes first, so an error never echoes a huge value.
    if id.len() > MAX_STRIPE_ID_BYTES {
        return Err(format!(
            "is {} bytes long, more than {MAX_STRIPE_ID_BYTES}",
            id.len()
        ));
    }
    if !id.starts_with("cus_") || id.len() <= 4 {
        return Err(format!(
            "{id:?} is not a Stripe customer id; they start with cus_"
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(format!(
            "{id:?} contains {bad:?}; Stripe ids hold only letters, digits and underscores"
        ));
    }
    Ok(())
}

/// Result of setting a customer's Stripe customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetOutcome {
    /// The mapping is stored; `unparked` parked events of the customer were
    /// queued again.
    Stored {
        /// Parked events queued again.
        unparked: usize,
    },
    /// Another customer is billed to that Stripe customer already.
    Taken {
        /// The customer that has it.
        by: String,
    },
    /// The customer was erased and its tokens are still refused, so no
    /// new data about it is stored.
    Erased,
}

/// Stores `stripe_customer_id` as the Stripe customer of `customer` and
/// queues the customer's parked events again, in one transaction.
pub fn set(
    conn: &mut Connection,
    customer: &str,
    stripe_customer_id: &str,
    now_unix_s: i64,
) -> rusqlite::Result<SetOutcome> {
    set_audited(conn, None, customer, stripe_customer_id, now_unix_s, |_| {
        Ok(())
    })
}

/// Like [`set`], and runs `audit` in the same transaction once the mapping
/// is stored, so the change and its audit entry commit together. With
/// `identities`, the mapping names the customer and the Stripe customer by
/// their pseudonyms and stores the Stripe customer's encrypted id, and
/// [`SetOutcome::Taken`] names the holder by its customer id.
pub fn set_audited(
    conn: &mut Connection,
    identities: Option<&Identities>,
    customer: &str,
    stripe_customer_id: &str,
    now_unix_s: i64,
    audit: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> rusqlite::Result<SetOutcome> {
    let tx = conn.transaction()?;
    let pseudonym = match identities {
        Some(identities) => identities.pseudonym(customer),
        None => customer.to_owned(),
    };
    let erased = tx
        .prepare_cached("SELECT 1 FROM erased_customer WHERE pseudonym = ?1")?
        .exists([&pseudonym])?;
    if erased {
        return Ok(SetOutcome::Erased);
    }
    let customer = match identities {
        Some(identities) => identities.record(&tx, customer).map_err(to_sql)?,
        None => pseudonym,
    };
    let customer = customer.as_str();
    let stripe_key = match identities {
        Some(identities) => identities
            .record_stripe(&tx, stripe_customer_id)
            .map_err(to_sql)?,
        None => stripe_customer_id.to_owned(),
    };
    let holder: Option<String> = tx
        .query_row(
            "SELECT customer FROM stripe_customer WHERE stripe_pseudonym = ?1",
            [&stripe_key],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(holder) = holder
        && holder != customer
    {
        let by = match identities {
            Some(identities) => identities
                .reveal(&tx, &holder)
                .map_err(to_sql)?
                .unwrap_or(holder),
            None => holder,
        };
        return Ok(SetOutcome::Taken { by });
    }
    tx.execute(
        "INSERT INTO stripe_customer (customer, stripe_pseudonym, updated_unix_s)
         VALUES (?1, ?2, ?3)
         ON CONFLICT (customer) DO UPDATE SET
             stripe_pseudonym = excluded.stripe_pseudonym,
             updated_unix_s = excluded.updated_unix_s",
        params![customer, stripe_key, now_unix_s],
    )?;
    let unparked = super::queue::unpark_customer(&tx, customer)?;
    audit(&tx)?;
    tx.commit()?;
    Ok(SetOutcome::Stored { unparked })
}

/// Returns the Stripe customer id of `customer`, given as the pseudonym the
/// store names it by, if one is set and its encrypted id is readable.
pub fn get(
    conn: &Connection,
    identities: &Identities,
    customer: &str,
) -> rusqlite::Result<Option<String>> {
    let stripe_pseudonym: Option<String> = conn
        .query_row(
            "SELECT stripe_pseudonym FROM stripe_customer WHERE customer = ?1",
            [customer],
            |row| row.get(0),
        )
        .optional()?;
    match stripe_pseudonym {
        Some(pseudonym) => identities.reveal_stripe(conn, &pseudonym).map_err(to_sql),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erased_customer_is_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::test_support::open_writer(&dir.path().join("db"));
        conn.execute(
            "INSERT INTO erased_customer VALUES ('gone', x'00', 9999999999)",
            [],
        )
        .unwrap();

        assert_eq!(
            set(&mut conn, "gone", "cus_1", 1).unwrap(),
            SetOutcome::Erased
        );
        assert_eq!(
            set(&mut conn, "kept", "cus_2", 1).unwrap(),
            SetOutcome::Stored { unparked: 0 }
        );
        let mapped: i64 = conn
            .query_row("SELECT COUNT(*) FROM stripe_customer", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mapped, 1);
    }

    #[test]
    fn stripe_ids_are_checked() {
        assert!(check_stripe_customer_id("cus_NciAYcXfLnqBoz").is_ok());
        assert!(check_stripe_customer_id("cus_").is_err());
        assert!(check_stripe_customer_id("acct_1").is_err());
        assert!(check_stripe_customer_id("cus_a b").is_err());
        assert!(check_stripe_customer_id(&format!("cus_{}", "a".repeat(300))).is_err());
    }
}
