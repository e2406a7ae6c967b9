//! The asset region registry. The sidecar sends the complete registry
//! whenever its version differs from the one this instance reported. The
//! sync role stores it in shared data under [`ASSETS_KEY`]. Each worker
//! reads it on its timer into an [`AssetTable`], where the request path
//! looks assets up without a host call. A registry entry replaces the
//! configured rule of the same asset.

use prost::Message;
use veo_proto::sync::AssetRegions;

use super::Sync;
use crate::geo::AssetTable;
use crate::host::{Host, LogLevel};

/// Shared-data key of the asset region registry in force, as an encoded
/// `AssetRegions`. Missing until the first registry arrives.
pub const ASSETS_KEY: &str = "veo.sync.assets";

/// Maximum ignored registry parts one log line names.
const MAX_LOGGED_PROBLEMS: usize = 10;

/// Reads the registry published under [`ASSETS_KEY`]; `None` for bytes
/// that do not decode.
pub fn decode_asset_regions(bytes: &[u8]) -> Option<AssetRegions> {
    AssetRegions::decode(bytes).ok()
}

impl Sync {
    /// Publishes the asset region registry of a sync reply for the workers
    /// to apply on their next tick. `None` means the registry in force is
    /// current.
    pub(super) fn apply_asset_regions(&mut self, host: &impl Host, set: Option<&AssetRegions>) {
        let Some(set) = set else {
            return;
        };
        // As with tier overrides, a resent batch with an older version
        // gets the registry in force again.
        if set.version == self.asset_regions_version {
            return;
        }

        // The workers build the same table from the same configuration, so
        // warning here logs it once per instance, not once per worker.
        if let Some(geo) = &self.geo {
            let (_, problems) = AssetTable::from_registry(set, geo, &self.base_tiers);
            if !problems.is_empty() {
                host.log(LogLevel::Warn, &describe_problems(set.version, &problems));
            }
        }
        if let Err(error) = host.set_shared_data(ASSETS_KEY, &set.encode_to_vec(), None) {
            host.log(
                LogLevel::Error,
                &format!(
                    "failed to publish asset regions version={}: {error}; the sidecar sends \
                     them again with the next reply",
                    set.version
                ),
            );
            return;
        }
        self.asset_regions_version = set.version;
        let off = if self.geo.is_none() {
            "; geo-fencing is off because the plugin configuration has no `geo` section"
        } else {
            ""
        };
        host.log(
            LogLevel::Info,
            &format!(
                "asset regions in force version={} assets={}{off}",
                set.version,
                set.assets.len()
            ),
        );
    }

    /// Returns the version of the asset region registry this instance
    /// applies, 0 before the first.
    pub fn asset_regions_version(&self) -> u64 {
        self.asset_regions_version
    }
}

/// Describes the ignored parts of one registry for a warning, naming at
/// most [`MAX_LOGGED_PROBLEMS`] of them.
fn describe_problems(version: u64, problems: &[String]) -> String {
    let named: Vec<&str> = problems
        .iter()
        .take(MAX_LOGGED_PROBLEMS)
        .map(String::as_str)
        .collect();
    let more = problems.len().saturating_sub(MAX_LOGGED_PROBLEMS);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "ignoring {} parts of the asset regions of version={version}: {}{more}; the entries \
         keep their other regions, and a region or tier left out admits no one",
        problems.len(),
        named.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use veo_proto::sync::{AssetRegion, SyncResponse};

    use super::*;
    use crate::testing::Instance;

    fn registry(version: u64, assets: &[(&str, &[&str])]) -> AssetRegions {
        AssetRegions {
            version,
            assets: assets
                .iter()
                .map(|(asset, regions)| AssetRegion {
                    asset: (*asset).to_owned(),
                    allowed_regions: regions.iter().map(|name| (*name).to_owned()).collect(),
                    ..AssetRegion::default()
                })
                .collect(),
        }
    }

    /// Sends a batch and replies to it with `set`.
    fn reply_with_registry(instance: &mut Instance, set: AssetRegions) -> u64 {
        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (token, request) = instance.last_call();
        let reply = SyncResponse {
            applied_sequence: request.sequence,
            asset_regions: Some(set),
            ..SyncResponse::default()
        };
        instance.reply(token, &reply);
        request.asset_regions_version
    }

    #[test]
    fn registry_is_stored_and_its_version_echoed() {
        let mut instance = Instance::with_geo();
        let set = registry(4, &[("a1", &["eu-west"])]);
        assert_eq!(reply_with_registry(&mut instance, set.clone()), 0);
        let stored = instance.sync_host.peek_shared_data(ASSETS_KEY).unwrap();
        assert_eq!(decode_asset_regions(&stored), Some(set));
        assert_eq!(instance.sync.asset_regions_version(), 4);

        instance.requests("acme", 1);
        instance.sync.on_tick(&instance.sync_host);
        let (_, next) = instance.last_call();
        assert_eq!(next.asset_regions_version, 4);
    }

    #[test]
    fn ignored_registry_parts_are_logged_once() {
        let mut instance = Instance::with_geo();
        let set = registry(2, &[("a1", &["mars"])]);
        reply_with_registry(&mut instance, set.clone());
        reply_with_registry(&mut instance, set);
        instance.filter.on_tick(&instance.worker_host);

        let warnings = |host: &crate::host::MemoryHost| {
            host.logs()
                .into_iter()
                .filter(|(level, line)| *level == LogLevel::Warn && line.contains("mars"))
                .count()
        };
        assert_eq!(warnings(&instance.sync_host), 1);
        assert_eq!(warnings(&instance.worker_host), 0);
    }

    #[test]
    fn problems_line_names_at_most_ten() {
        let problems: Vec<String> = (0..12).map(|index| format!("problem-{index}")).collect();
        let line = describe_problems(3, &problems);
        assert!(line.contains("problem-9"), "{line}");
        assert!(!line.contains("problem-10"), "{line}");
        assert!(line.contains("and 2 more"), "{line}");
    }
}
