//! The two usage meters and the deterministic identifiers of their events.

use std::fmt;

use sha2::{Digest, Sha256};

/// A usage meter billed through Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Meter {
    /// Admitted requests, in requests.
    ApiRequests,
    /// Response body bytes of admitted requests, in bytes.
    EgressBytes,
}

impl Meter {
    /// Every meter, in the order reports list them.
    pub const ALL: [Meter; 2] = [Meter::ApiRequests, Meter::EgressBytes];

    /// Name of the meter in the ledger, reports and the default Stripe
    /// event name.
    pub fn name(self) -> &'static str {
        match self {
            Meter::ApiRequests => "api_requests",
            Meter::EgressBytes => "egress_bytes",
        }
    }

    /// Parses a meter name as [`Meter::name`] writes it.
    pub fn from_name(name: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|meter| meter.name() == name)
    }

    /// Returns the ledger column that contains the meter's usage.
    pub(crate) fn ledger_column(self) -> &'static str {
        match self {
            Meter::ApiRequests => "admitted",
            Meter::EgressBytes => "egress_bytes",
        }
    }
}

impl fmt::Display for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Fields an event identifier is derived from. Two events have the same
/// identifier only when every field is equal, so a retried or re-created
/// event can never be billed twice, and two ledgers (regions, or sidecars
/// within a region) never share one.
#[derive(Debug, Clone, Copy)]
pub struct EventKey<'a> {
    /// Region of the sidecar, such as `eu-west`.
    pub region: &'a str,
    /// Identifier of the sidecar's ledger, unique within the region.
    pub ledger_id: &'a str,
    /// Customer the usage belongs to.
    pub customer: &'a str,
    /// Meter of the usage.
    pub meter: Meter,
    /// Start of the minute bucket, in seconds since the Unix epoch.
    pub minute_unix_s: i64,
    /// Part number within the bucket: 1 for the bucket's first event, one
    /// more for each event of usage that arrived after the bucket was
    /// billed. Corrective events use 0 and carry `correction`.
    pub part: i64,
    /// For corrective events, what the correction is tied to; empty
    /// otherwise.
    pub correction: &'a str,
}

impl EventKey<'_> {
    /// Returns the identifier: the meter and minute in clear, for people
    /// reading Stripe's dashboard, then a SHA-256 digest of every field.
    /// The result is at most 70 bytes, within Stripe's 100.
    pub fn identifier(&self) -> String {
        let mut digest = Sha256::new();
        for field in [
            self.region,
            self.ledger_id,
            self.customer,
            self.meter.name(),
            &self.minute_unix_s.to_string(),
            &self.part.to_string(),
            self.correction,
        ] {
            // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
            digest.update((field.len() as u64).to_be_bytes());
            digest.update(field.as_bytes());
        }
        let hash = hex::encode(digest.finalize());
        let kind = match self.meter {
            Meter::ApiRequests => "req",
            Meter::EgressBytes => "egr",
        };
        format!("veo_{kind}_{}_{}", self.minute_unix_s, &hash[..40])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(part: i64) -> EventKey<'static> {
        EventKey {
            region: "eu-west",
            ledger_id: "sc-1",
            customer: "acme",
            meter: Meter::ApiRequests,
            minute_unix_s: 1_700_000_040,
            part,
            correction: "",
        }
    }

    #[test]
    fn identifier_is_deterministic() {
        assert_eq!(key(1).identifier(), key(1).identifier());
    }

    #[test]
    fn identifier_differs_by_every_field() {
        let base = key(1).identifier();
        let variants = [
            EventKey {
                region: "us-east",
                ..key(1)
            },
            EventKey {
                ledger_id: "sc-2",
                ..key(1)
            },
            EventKey {
                customer: "acme2",
                ..key(1)
            },
            EventKey {
                meter: Meter::EgressBytes,
                ..key(1)
            },
            EventKey {
                minute_unix_s: 1_700_000_100,
                ..key(1)
            },
            key(2),
            EventKey {
                correction: "range",
                ..key(1)
            },
        ];
        for variant in variants {
            assert_ne!(variant.identifier(), base, "{variant:?}");
        }
    }

    #[test]
    fn identifier_fits_stripe_limit() {
        let long = "x".repeat(256);
        let identifier = EventKey {
            customer: &long,
            minute_unix_s: i64::MAX,
            part: i64::MAX,
            ..key(1)
        }
        .identifier();
        assert!(identifier.len() <= 100, "{} bytes", identifier.len());
    }

    #[test]
    fn meter_names_round_trip() {
        for meter in Meter::ALL {
            assert_eq!(Meter::from_name(meter.name()), Some(meter));
        }
        assert_eq!(Meter::from_name("bytes"), None);
    }
}
