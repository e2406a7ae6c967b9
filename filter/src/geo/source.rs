//! Sources of a client's region: ISO 3166-1 alpha-2 country codes in a
//! header, and the address ranges a CDN's country header is trusted from.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use super::RegionId;

/// Codes that geolocation databases and CDNs send in place of a country:
/// `XX` (unknown), `T1` (Tor), `A1` (anonymous proxy), `A2` (satellite
/// provider). They always count as an unknown region.
pub const NO_COUNTRY_CODES: [[u8; 2]; 4] = [*b"XX", *b"T1", *b"A1", *b"A2"];

/// A client's region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRegion {
    /// A region that a configured country maps to.
    Known(RegionId),
    /// No trusted source, or a country that no region covers.
    Unknown,
}

/// The country header of a CDN in front of Envoy, trusted only when the
/// request comes from one of the CDN's address ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CdnSource {
    /// Lowercase header name, such as `cf-ipcountry`.
    pub header: String,
    /// The CDN's address ranges; empty trusts no address.
    pub trusted: Vec<IpNet>,
}

impl CdnSource {
    /// Returns whether `address`, the `source.address` attribute as Envoy
    /// reports it (`ip:port`, IPv6 as `[ip]:port`), lies in a trusted
    /// range. Text that is not an address is not trusted.
    pub fn trusts(&self, address: &[u8]) -> bool {
        let Some(ip) = source_ip(address) else {
            return false;
        };
        self.trusted.iter().any(|range| range.contains(&ip))
    }
}

/// Parses the `source.address` attribute. An IPv4-mapped IPv6 address, as
/// a dual-stack listener reports IPv4 clients, becomes its IPv4 address.
pub fn source_ip(address: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(address).ok()?;
    let ip = match text.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => text.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// Returns the uppercase country code of a header value: two ASCII
/// letters or digits after trimming whitespace. `None` for anything else
/// and for the codes in [`NO_COUNTRY_CODES`].
pub fn country_code(value: &[u8]) -> Option<[u8; 2]> {
    let &[first, second] = value.trim_ascii() else {
        return None;
    };
    if !first.is_ascii_alphanumeric() || !second.is_ascii_alphanumeric() {
        return None;
    }
    let code = [first.to_ascii_uppercase(), second.to_ascii_uppercase()];
    (!NO_COUNTRY_CODES.contains(&code)).then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cdn(ranges: &[&str]) -> CdnSource {
        CdnSource {
            header: "cf-ipcountry".to_owned(),
            trusted: ranges.iter().map(|range| range.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn source_address_is_matched_against_ranges() {
        let cdn = cdn(&["173.245.48.0/20", "2400:cb00::/32"]);
        let cases: [(&[u8], bool); 9] = [
            (b"173.245.48.7:443", true),
            (b"173.245.63.255:1", true),
            (b"173.245.64.0:443", false),
            (b"[2400:cb00::1]:443", true),
            (b"[2400:cb01::1]:443", false),
            (b"[::ffff:173.245.48.7]:443", true),
            (b"173.245.48.7", true),
            (b"not-an-address:80", false),
            (b"\xff\xfe", false),
        ];
        for (address, trusted) in cases {
            assert_eq!(
                cdn.trusts(address),
                trusted,
                "{}",
                String::from_utf8_lossy(address)
            );
        }
    }

    #[test]
    fn country_codes_are_normalized() {
        assert_eq!(country_code(b"DE"), Some(*b"DE"));
        assert_eq!(country_code(b" de\t"), Some(*b"DE"));
        for none in [
            b"".as_slice(),
            b"D",
            b"DEU",
            b"D-",
            b"XX",
            b"xx",
            b"T1",
            b"a1",
            b"A2",
        ] {
            assert_eq!(country_code(none), None, "{none:?}");
        }
    }
}
