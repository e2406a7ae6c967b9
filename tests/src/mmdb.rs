//! A small country database in the MaxMind DB format, laid out like
//! GeoIP2-Country (`{"country": {"iso_code": "DE"}}` per network), so that
//! Envoy's geoip filter can run in the tests without a downloaded database.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use mmdb_writer::{IpVersion, ReservedNetworks, Value, Writer};

use crate::HarnessError;

/// Database type written to the metadata, as in MaxMind's country files.
pub const DATABASE_TYPE: &str = "GeoIP2-Country";

/// Builds an IPv4 database that maps each address of `entries` (as a /32)
/// to its country code, such as `(127.0.0.4, "DE")`. Addresses not listed
/// have no entry, so a lookup of them finds nothing.
///
/// Fails when a country code is empty or an address is listed twice.
pub fn country_database(entries: &[(Ipv4Addr, &str)]) -> Result<Vec<u8>, HarnessError> {
    // Loopback and other reserved networks are what the tests connect from.
    let mut writer = Writer::builder(DATABASE_TYPE)
        .ip_version(IpVersion::V4)
        .reserved_networks(ReservedNetworks::Included)
        .description(&[("en", "Veo Edge test countries")])
        .build();
    for (index, (address, country)) in entries.iter().enumerate() {
        if country.is_empty() {
            return Err(invalid(format!("the country code of {address} is empty")));
        }
        if entries
            .iter()
            .take(index)
            .any(|(other, _)| other == address)
        {
            return Err(invalid(format!("{address} is listed twice")));
        }
        let record = Value::map([("country", Value::map([("iso_code", Value::from(*country))]))]);
        writer
            .insert_value(IpAddr::V4(*address), record)
            .map_err(|err| invalid(format!("failed to insert {address}: {err}")))?;
    }
    writer
        .to_bytes()
        .map_err(|err| invalid(format!("failed to serialize: {err}")))
}

/// Writes [`country_database`] of `entries` to `path`.
pub fn write_country_database(
    path: &Path,
    entries: &[(Ipv4Addr, &str)],
) -> Result<(), HarnessError> {
    let bytes = country_database(entries)?;
    std::fs::write(path, bytes).map_err(|source| HarnessError::Io {
        action: "write the geoip database",
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(reason: String) -> HarnessError {
    HarnessError::InvalidConfig {
        what: "geoip database",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use maxminddb::{PathElement, Reader};

    use super::*;

    const DE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
    const US: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

    fn country_of(reader: &Reader<Vec<u8>>, address: Ipv4Addr) -> Option<String> {
        let path = [PathElement::Key("country"), PathElement::Key("iso_code")];
        reader
            .lookup(IpAddr::V4(address))
            .unwrap()
            .decode_path(&path)
            .unwrap()
    }

    #[test]
    fn reader_finds_each_country() {
        let bytes = country_database(&[(DE, "DE"), (US, "US")]).unwrap();
        let reader = Reader::from_source(bytes).unwrap();
        assert_eq!(reader.metadata().database_type, DATABASE_TYPE);
        assert_eq!(reader.metadata().ip_version, 4);
        assert_eq!(country_of(&reader, DE).as_deref(), Some("DE"));
        assert_eq!(country_of(&reader, US).as_deref(), Some("US"));
    }

    #[test]
    fn unlisted_address_has_no_country() {
        let bytes = country_database(&[(DE, "DE")]).unwrap();
        let reader = Reader::from_source(bytes).unwrap();
        assert_eq!(country_of(&reader, Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(country_of(&reader, Ipv4Addr::new(127, 0, 0, 5)), None);
    }

    #[test]
    fn rejects_duplicate_and_empty_entries() {
        let error = country_database(&[(DE, "DE"), (DE, "FR")]).unwrap_err();
        assert!(
            error.to_string().contains("127.0.0.4 is listed twice"),
            "{error}"
        );
        let error = country_database(&[(US, "")]).unwrap_err();
        assert!(error.to_string().contains("127.0.0.5 is empty"), "{error}");
    }
}
