//! State shared by erasure, the asset region registry and the audit log:
//! the pushed sets, the encryption keys, the key of the customer id hashes
//! and the maximum token lifetime.

use std::sync::Arc;

use rusqlite::Connection;

use crate::audit::{self, NewEntry};
use crate::identity::Identities;
use crate::keys::KeyProvider;
use crate::pushes::Pushes;

/// The privacy services' shared state; cheap to clone.
#[derive(Clone)]
pub struct Privacy {
    /// Sets pushed to the filter instances.
    pub pushes: Arc<Pushes>,
    /// Key-encryption keys of the data keys.
    pub keys: Arc<dyn KeyProvider>,
    /// The store's customer identities: the pseudonyms of its rows, and the
    /// subject hashes that the audit log and the erasures record.
    pub identities: Identities,
    /// Maximum lifetime of a token, in seconds: an erased customer's tokens
    /// are rejected this long.
    pub token_lifetime_s: i64,
    /// Addresses of the peer sidecars that erasures asked of this one are
    /// passed on to.
    pub erasure_peers: Arc<[String]>,
}

impl std::fmt::Debug for Privacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Privacy")
            .field("token_lifetime_s", &self.token_lifetime_s)
            .finish_non_exhaustive()
    }
}

impl Privacy {
    /// Returns the subject hash of a customer id, as the audit log and the
    /// erasures store it.
    pub fn subject(&self, customer: &str) -> String {
        self.identities.subject(customer)
    }

    /// Appends `entry` to the audit log on `conn`, inside the caller's
    /// transaction.
    /// The entry's position and hash are also recorded as the last entry,
    /// which verification checks, so entries cut from the end show.
    pub fn append(&self, conn: &Connection, entry: &NewEntry) -> rusqlite::Result<audit::Receipt> {
        let receipt = audit::append(conn, self.keys.as_ref(), entry).map_err(to_sql)?;
        crate::erasure::record_head(
            conn,
            &crate::erasure::Receipt {
                position: receipt.position,
                entry_hash: receipt.entry_hash.clone(),
            },
        )?;
        Ok(receipt)
    }
}

/// Wraps an error of the key or audit modules for a store closure.
pub fn to_sql<E: std::error::Error + Send + Sync + 'static>(err: E) -> rusqlite::Error {
    rusqlite::Error::ToSqlConversionFailure(Box::new(err))
}

pub use crate::identity::key_owner;
