//! Residency routing under test: Envoy on `envoy/residency.yaml` with the
//! built filter and the sidecar, one storage site per region and
//! jurisdiction, and a default storage, each on a free loopback port.
//!
//! The routes match `x-veo-storage-region`, which the filter sets for
//! region-locked assets. Each region's cluster has its own site at priority
//! 0 and a second site of the same jurisdiction at priority 1.

pub mod bootstrap;
pub mod probe;
pub mod stack;
pub mod storage;

pub use bootstrap::FailoverSettings;
pub use probe::{Probe, Sample};
pub use stack::{HostHealth, ResidencyOptions, ResidencyStack};
pub use storage::StorageServer;

/// Client addresses and their countries in the country database that the
/// residency stack gives Envoy's geoip filter. A test sends a client
/// address in `x-forwarded-for`, which Envoy trusts for
/// [`XFF_TRUSTED_HOPS`] proxy.
pub const CLIENT_COUNTRIES: [(std::net::Ipv4Addr, &str); 2] = [
    (std::net::Ipv4Addr::new(127, 0, 0, 4), "DE"),
    (std::net::Ipv4Addr::new(127, 0, 0, 5), "US"),
];

/// Proxies in front of the residency stack's Envoy whose
/// `x-forwarded-for` entries count.
pub const XFF_TRUSTED_HOPS: u32 = 1;

/// Request header that selects the storage region, set by the filter.
pub const STORAGE_REGION_HEADER: &str = "x-veo-storage-region";

/// Name of the default storage, which serves assets without a region.
pub const DEFAULT_SITE: &str = "default";

/// A storage region: a value of [`STORAGE_REGION_HEADER`] with its own
/// cluster in `envoy/residency.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Region {
    /// EU, served from `eu-west`, else `eu-central`.
    EuWest,
    /// US, served from `us-east`, else `us-west`.
    UsEast,
    /// Singapore, served from `ap-southeast`, else `ap-southeast-b`.
    ApSoutheast,
}

impl Region {
    /// Every region of the template.
    pub const ALL: [Region; 3] = [Region::EuWest, Region::UsEast, Region::ApSoutheast];

    /// Returns the header value that selects the region.
    pub fn header_value(self) -> &'static str {
        match self {
            Region::EuWest => "eu-west",
            Region::UsEast => "us-east",
            Region::ApSoutheast => "ap-southeast",
        }
    }

    /// Returns the name of the region's cluster.
    pub fn cluster(self) -> &'static str {
        match self {
            Region::EuWest => "storage_eu_west",
            Region::UsEast => "storage_us_east",
            Region::ApSoutheast => "storage_ap_southeast",
        }
    }

    /// Returns the site at priority 0 of the region's cluster.
    pub fn primary(self) -> Site {
        match self {
            Region::EuWest => Site::EuWest,
            Region::UsEast => Site::UsEast,
            Region::ApSoutheast => Site::ApSoutheast,
        }
    }

    /// Returns the site at priority 1, in the same jurisdiction.
    pub fn secondary(self) -> Site {
        match self {
            Region::EuWest => Site::EuCentral,
            Region::UsEast => Site::UsWest,
            Region::ApSoutheast => Site::ApSoutheastB,
        }
    }
}

/// A storage site: one endpoint of a region's cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Site {
    /// Primary of [`Region::EuWest`].
    EuWest,
    /// Secondary of [`Region::EuWest`], also in the EU.
    EuCentral,
    /// Primary of [`Region::UsEast`].
    UsEast,
    /// Secondary of [`Region::UsEast`], also in the US.
    UsWest,
    /// Primary of [`Region::ApSoutheast`].
    ApSoutheast,
    /// Secondary of [`Region::ApSoutheast`], in the same country.
    ApSoutheastB,
}

impl Site {
    /// Every site of the template.
    pub const ALL: [Site; 6] = [
        Site::EuWest,
        Site::EuCentral,
        Site::UsEast,
        Site::UsWest,
        Site::ApSoutheast,
        Site::ApSoutheastB,
    ];

    /// Returns the site's name, which its storage server sends as the body.
    pub fn name(self) -> &'static str {
        match self {
            Site::EuWest => "eu-west",
            Site::EuCentral => "eu-central",
            Site::UsEast => "us-east",
            Site::UsWest => "us-west",
            Site::ApSoutheast => "ap-southeast",
            Site::ApSoutheastB => "ap-southeast-b",
        }
    }

    /// Returns the site's position in [`Site::ALL`].
    pub fn index(self) -> usize {
        match self {
            Site::EuWest => 0,
            Site::EuCentral => 1,
            Site::UsEast => 2,
            Site::UsWest => 3,
            Site::ApSoutheast => 4,
            Site::ApSoutheastB => 5,
        }
    }

    /// Returns the region whose cluster contains the site.
    pub fn region(self) -> Region {
        match self {
            Site::EuWest | Site::EuCentral => Region::EuWest,
            Site::UsEast | Site::UsWest => Region::UsEast,
            Site::ApSoutheast | Site::ApSoutheastB => Region::ApSoutheast,
        }
    }

    /// Returns the template's placeholder for the site's port.
    pub fn port_placeholder(self) -> &'static str {
        match self {
            Site::EuWest => "EU_WEST_PORT",
            Site::EuCentral => "EU_CENTRAL_PORT",
            Site::UsEast => "US_EAST_PORT",
            Site::UsWest => "US_WEST_PORT",
            Site::ApSoutheast => "AP_SOUTHEAST_PORT",
            Site::ApSoutheastB => "AP_SOUTHEAST_B_PORT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_sites_share_region() {
        for region in Region::ALL {
            assert_eq!(region.primary().region(), region);
            assert_eq!(region.secondary().region(), region);
            assert_ne!(region.primary(), region.secondary());
        }
    }

    #[test]
    fn indexes_sites_in_order() {
        for (index, site) in Site::ALL.iter().enumerate() {
            assert_eq!(site.index(), index);
        }
    }
}
