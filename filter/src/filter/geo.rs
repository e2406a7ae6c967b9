//! The geo-fence step of the request path, between tier resolution and
//! the rate limiter. It removes region headers a client could forge, finds
//! the asset in the path, and for a locked asset compares the client's
//! region with the asset's rule.
//!
//! Host calls happen only with a `geo` section. The step always reads the
//! `:path` and storage region headers, and the CDN header when one is
//! configured. It reads `source.address` only when that header is present
//! and trusted ranges are configured, and the geoip header only for a
//! locked asset.

use std::rc::Rc;

use super::Filter;
use crate::config::Tier;
use crate::geo::{AssetTable, BeforeRegistry, ClientRegion, Geo};
use crate::host::{Host, LogLevel};
use crate::metrics::Counter;
use crate::response;
use crate::sync::{ASSETS_KEY, decode_asset_regions};

/// Envoy attribute of the downstream address, `ip:port`.
const SOURCE_ADDRESS: [&str; 2] = ["source", "address"];

/// Outcome of the geo-fence for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Fence {
    /// Go on to the rate limiter.
    Pass {
        /// Storage region to send upstream when the request is forwarded.
        storage_region: Option<Rc<str>>,
    },
    /// A 451 was sent.
    Refused,
}

const PASS: Fence = Fence::Pass {
    storage_region: None,
};

impl Filter {
    /// Geo-fences a request of `customer` decided under `tier`, the tier at
    /// index `tier_index`.
    pub(super) fn fence(
        &self,
        host: &impl Host,
        customer: &str,
        tier: &Tier,
        tier_index: usize,
    ) -> Fence {
        let Some(geo) = &self.config.geo else {
            return PASS;
        };
        let cdn_country = self.remove_forged_region_headers(host, geo);

        let Some(path) = host.request_header(":path").ok().flatten() else {
            return PASS;
        };
        let Some(asset) = geo.asset_in(&path) else {
            return PASS;
        };
        if !self.assets_loaded.get() {
            // Until the registry arrives, read shared data on each request
            // for an asset rather than wait for the next tick.
            self.refresh_assets(host);
            if !self.assets_loaded.get() && geo.before_registry == BeforeRegistry::Refuse {
                self.metrics.add(Counter::GeoRegistryPending, 1);
                if !self.registry_wait_logged.replace(true) {
                    host.log(
                        LogLevel::Warn,
                        "no asset region registry from the sidecar yet, so requests for assets \
                         get 503 until it arrives; check that the sidecar is reachable, or set \
                         geo.before_registry = \"configured_rules\"",
                    );
                }
                self.send(host, &response::asset_regions_pending(&asset));
                return Fence::Refused;
            }
        }
        let registry = self.assets.borrow();
        let Some(rule) = geo.rule(&registry, &asset) else {
            return PASS;
        };

        let region = client_region(host, geo, cdn_country.as_deref());
        let rejection = match geo.decide(rule, region, tier_index) {
            Ok(()) => {
                return Fence::Pass {
                    storage_region: rule.storage_region.clone(),
                };
            }
            Err(rejection) => rejection,
        };
        self.metrics.add_geo_blocked(region);
        if self.debug.get() {
            let message = format!(
                "request rejected status=451 customer={customer} tier={} asset={} region={} \
                 reason={}",
                tier.name,
                asset.escape_debug(),
                geo.region_name(region),
                rejection.reason()
            );
            host.log(LogLevel::Debug, &message);
        }
        self.send(
            host,
            &response::unavailable_for_legal_reasons(&asset, rejection),
        );
        Fence::Refused
    }

    /// Removes a client-sent storage region header, and the CDN country
    /// header unless the request comes from a trusted address. Returns the
    /// trusted CDN country value.
    fn remove_forged_region_headers(&self, host: &impl Host, geo: &Geo) -> Option<Vec<u8>> {
        let storage_header = geo.storage_region_header.as_str();
        if host.request_header(storage_header).ok().flatten().is_some()
            && host.remove_request_header(storage_header).is_ok()
        {
            self.metrics.add(Counter::GeoHeadersRemoved, 1);
        }

        let cdn = geo.cdn.as_ref()?;
        let value = host.request_header(&cdn.header).ok().flatten()?;
        if !cdn.trusted.is_empty() {
            let address = host.property(&SOURCE_ADDRESS).ok().flatten();
            if address.is_some_and(|address| cdn.trusts(&address)) {
                return Some(value);
            }
        }
        if host.remove_request_header(&cdn.header).is_ok() {
            self.metrics.add(Counter::GeoHeadersRemoved, 1);
        }
        None
    }

    /// Applies the asset region registry the sync role published since the
    /// last call. An empty registry leaves the configured rules alone.
    pub(super) fn refresh_assets(&self, host: &impl Host) {
        let Some(geo) = &self.config.geo else {
            return;
        };
        let Ok(value) = host.get_shared_data(ASSETS_KEY) else {
            return;
        };
        if value.cas == self.assets_cas.get() {
            return;
        }
        let Some(bytes) = value.bytes else {
            return;
        };
        self.assets_cas.set(value.cas);
        let Some(set) = decode_asset_regions(&bytes) else {
            host.log(
                LogLevel::Error,
                "failed to decode the asset regions published under veo.sync.assets; keeping \
                 the asset regions in force",
            );
            return;
        };
        // The sync role logged what the table leaves out.
        let (table, _) = AssetTable::from_registry(&set, geo, &self.config.tiers);
        *self.assets.borrow_mut() = table;
        self.assets_loaded.set(true);
    }
}

/// Returns the client's region: from the geoip header when it is present
/// and not empty, else from the trusted CDN country, else unknown.
fn client_region(host: &impl Host, geo: &Geo, cdn_country: Option<&[u8]>) -> ClientRegion {
    let geoip = host.request_header(&geo.geoip_header).ok().flatten();
    match geoip {
        Some(value) if !value.trim_ascii().is_empty() => geo.region_of_country(&value),
        _ => cdn_country.map_or(ClientRegion::Unknown, |value| geo.region_of_country(value)),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use serde_json::{Value, json};
    use veo_proto::sync::{AssetRegion, AssetRegions, TierRegions};

    use super::*;
    use crate::host::MemoryHost;
    use crate::testing::{NOW_S, Worker, claims, es256_token, geo_json};

    const NOW_MS: u64 = NOW_S * 1000;

    /// Returns a worker with the geo section of [`geo_json`] that has read
    /// an empty asset region registry, as after the first sync reply.
    fn geo_worker() -> Worker {
        with_empty_registry(Worker::with_config(
            MemoryHost::new(NOW_MS),
            json!({"geo": geo_json()}),
        ))
    }

    fn geo_worker_with(key: &str, value: Value) -> Worker {
        let mut geo = geo_json();
        geo[key] = value;
        with_empty_registry(Worker::with_config(
            MemoryHost::new(NOW_MS),
            json!({"geo": geo}),
        ))
    }

    fn with_empty_registry(worker: Worker) -> Worker {
        publish_registry(&worker.host, 1, Vec::new());
        worker.filter.on_tick(&worker.host);
        worker
    }

    fn bearer(customer: &str, tier: Option<&str>) -> String {
        format!("Bearer {}", es256_token(claims(customer, tier)))
    }

    /// Sends a request of `customer` for `path` with `headers` added and
    /// returns its status.
    fn send(worker: &Worker, customer: &str, path: &str, headers: &[(&str, &str)]) -> u32 {
        send_as(worker, customer, None, path, headers)
    }

    fn send_as(
        worker: &Worker,
        customer: &str,
        tier: Option<&str>,
        path: &str,
        headers: &[(&str, &str)],
    ) -> u32 {
        let bearer = bearer(customer, tier);
        let mut all: Vec<(&str, &[u8])> = vec![
            ("authorization", bearer.as_bytes()),
            (":path", path.as_bytes()),
        ];
        all.extend(
            headers
                .iter()
                .map(|(name, value)| (*name, value.as_bytes())),
        );
        worker.send(&all)
    }

    fn storage_header(worker: &Worker) -> Option<String> {
        worker.host.request_header_text("x-veo-storage-region")
    }

    fn cdn_header(worker: &Worker) -> Option<String> {
        worker.host.request_header_text("cf-ipcountry")
    }

    fn set_source(worker: &Worker, address: &str) {
        worker
            .host
            .set_property(&SOURCE_ADDRESS, Some(address.as_bytes()));
    }

    #[test]
    fn geoip_country_in_allowed_region_is_admitted() {
        let worker = geo_worker();
        let status = send(
            &worker,
            "acme",
            "/videos/a1/seg.ts",
            &[("x-geoip-country", "DE")],
        );
        assert_eq!(status, 200);
        assert_eq!(storage_header(&worker).as_deref(), Some("eu-west"));

        let status = send(
            &worker,
            "zeta",
            "/videos/a1/seg.ts",
            &[("x-geoip-country", "fr")],
        );
        assert_eq!(status, 200);
    }

    #[test]
    fn region_not_allowed_gets_451() {
        let worker = geo_worker();
        let status = send(
            &worker,
            "acme",
            "/videos/a1/seg.ts",
            &[("x-geoip-country", "US")],
        );
        assert_eq!(status, 451);
        assert_eq!(
            worker.reply_json(),
            json!({
                "error": "unavailable_for_legal_reasons",
                "asset": "a1",
                "reason": "region_not_allowed"
            })
        );
        let reply = worker.host.local_response().unwrap();
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert!(!reply.body_text().contains("US"), "{}", reply.body_text());
        assert_eq!(worker.counter("veo.geo_blocked_total.region.us-east"), 1);
    }

    #[test]
    fn geoip_header_wins_over_trusted_cdn() {
        let worker = geo_worker();
        set_source(&worker, "173.245.48.7:443");
        let headers = [("x-geoip-country", "US"), ("cf-ipcountry", "DE")];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &headers), 451);
        assert_eq!(worker.reply_json()["reason"], "region_not_allowed");
    }

    #[test]
    fn empty_geoip_header_falls_back_to_trusted_cdn() {
        let worker = geo_worker();
        set_source(&worker, "173.245.48.7:443");
        let headers = [("x-geoip-country", " "), ("cf-ipcountry", "DE")];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &headers), 200);
        assert_eq!(cdn_header(&worker).as_deref(), Some("DE"));
    }

    #[test]
    fn cdn_country_from_trusted_ranges_is_used() {
        let worker = geo_worker();
        for address in ["173.245.48.7:443", "[2400:cb00::1]:443"] {
            set_source(&worker, address);
            let status = send(&worker, "acme", "/videos/a1/", &[("cf-ipcountry", "DE")]);
            assert_eq!(status, 200, "{address}");
            assert_eq!(cdn_header(&worker).as_deref(), Some("DE"), "{address}");
            assert_eq!(storage_header(&worker).as_deref(), Some("eu-west"));
        }
        assert_eq!(worker.counter("veo.geo_headers_removed_total"), 0);
    }

    #[test]
    fn cdn_country_from_untrusted_source_is_removed() {
        let worker = geo_worker();
        for address in [
            "198.51.100.7:443",
            "[2001:db8::1]:443",
            "garbage",
            "[::1:443",
        ] {
            set_source(&worker, address);
            let status = send(&worker, "acme", "/videos/a1/", &[("cf-ipcountry", "DE")]);
            assert_eq!(status, 451, "{address}");
            assert_eq!(worker.reply_json()["reason"], "region_unknown");
        }
        worker.host.set_property(&SOURCE_ADDRESS, None);
        assert_eq!(
            send(&worker, "acme", "/videos/a1/", &[("cf-ipcountry", "DE")]),
            451
        );

        // Removed from unlocked requests too, so the upstream never receives it.
        set_source(&worker, "198.51.100.7:443");
        assert_eq!(
            send(&worker, "acme", "/public/x", &[("cf-ipcountry", "DE")]),
            200
        );
        assert_eq!(cdn_header(&worker), None);
        assert_eq!(worker.counter("veo.geo_headers_removed_total"), 6);
        assert_eq!(worker.counter("veo.geo_blocked_total.region.unknown"), 5);
    }

    #[test]
    fn cdn_header_without_ranges_is_never_trusted() {
        let worker = geo_worker_with("cdn_trusted_ranges", json!([]));
        set_source(&worker, "173.245.48.7:443");
        assert_eq!(
            send(&worker, "acme", "/videos/a1/", &[("cf-ipcountry", "DE")]),
            451
        );
        assert_eq!(cdn_header(&worker), None);
        assert_eq!(worker.host.property_reads(), 0);
    }

    #[test]
    fn source_address_is_read_only_for_cdn_header() {
        let worker = geo_worker();
        set_source(&worker, "173.245.48.7:443");
        assert_eq!(
            send(&worker, "acme", "/videos/a1/", &[("x-geoip-country", "DE")]),
            200
        );
        assert_eq!(worker.host.property_reads(), 0);
        assert_eq!(
            send(&worker, "acme", "/videos/a1/", &[("cf-ipcountry", "DE")]),
            200
        );
        assert_eq!(worker.host.property_reads(), 1);
    }

    #[test]
    fn spoofed_storage_region_is_removed() {
        let worker = geo_worker();
        let spoofed = [
            ("x-geoip-country", "DE"),
            ("x-veo-storage-region", "us-east"),
        ];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &spoofed), 200);
        assert_eq!(storage_header(&worker).as_deref(), Some("eu-west"));
        assert_eq!(worker.host.request_header_count("x-veo-storage-region"), 1);

        // An asset without a storage region, and a request of no asset.
        let spoofed = [
            ("x-geoip-country", "US"),
            ("x-veo-storage-region", "eu-west"),
        ];
        assert_eq!(send(&worker, "acme", "/videos/a2/", &spoofed), 200);
        assert_eq!(storage_header(&worker), None);
        assert_eq!(send(&worker, "acme", "/about", &spoofed), 200);
        assert_eq!(storage_header(&worker), None);
        assert_eq!(worker.counter("veo.geo_headers_removed_total"), 3);
    }

    #[test]
    fn unknown_countries_follow_policy() {
        let rejecting = geo_worker();
        let allowing = geo_worker_with("unknown_country", json!("allow"));
        let unknown = ["XX", "T1", "A1", "A2", "BR", "x", "DEU"];
        for country in unknown {
            let headers = [("x-geoip-country", country)];
            assert_eq!(
                send(&rejecting, "acme", "/live/a1", &headers),
                451,
                "{country}"
            );
            assert_eq!(
                rejecting.reply_json()["reason"],
                "region_unknown",
                "{country}"
            );
            // Basic admits 3 per window, so each admission is a new customer.
            let customer = format!("customer-{country}");
            assert_eq!(
                send(&allowing, &customer, "/live/a1", &headers),
                200,
                "{country}"
            );
            assert_eq!(storage_header(&allowing).as_deref(), Some("eu-west"));
        }

        // No source at all.
        assert_eq!(send(&rejecting, "acme", "/live/a1", &[]), 451);
        assert_eq!(send(&allowing, "acme", "/live/a1", &[]), 200);

        // A known region that is not allowed stays rejected under "allow".
        let headers = [("x-geoip-country", "SG")];
        assert_eq!(send(&allowing, "acme", "/live/a1", &headers), 451);
        assert_eq!(allowing.reply_json()["reason"], "region_not_allowed");
        assert_eq!(
            rejecting.counter("veo.geo_blocked_total.region.unknown"),
            unknown.len() as u64 + 1
        );
    }

    #[test]
    fn unlocked_and_unmatched_paths_pass() {
        let worker = geo_worker();
        let us = [("x-geoip-country", "US")];
        for path in [
            "/videos/a9/seg.ts",
            "/videos/a1",
            "/images/a1/",
            "/",
            "/live/",
        ] {
            // Basic admits 3 per window, so each path is a new customer.
            let customer = format!("customer-{path}");
            assert_eq!(send(&worker, &customer, path, &us), 200, "{path}");
            assert_eq!(storage_header(&worker), None, "{path}");
        }
        // Query string ignored, percent-encoding decoded.
        for path in ["/live/a1?region=eu", "/videos/%61%31/seg.ts"] {
            assert_eq!(send(&worker, "acme", path, &us), 451, "{path}");
        }
    }

    #[test]
    fn tier_regions_extend_allowed_regions() {
        let worker = geo_worker();
        let us = [("x-geoip-country", "US")];
        assert_eq!(
            send_as(&worker, "big", Some("enterprise"), "/live/a1", &us),
            200
        );
        assert_eq!(storage_header(&worker).as_deref(), Some("eu-west"));
        assert_eq!(send_as(&worker, "pro", Some("pro"), "/live/a1", &us), 451);
    }

    #[test]
    fn geo_refusal_consumes_no_quota() {
        let worker = geo_worker();
        let queue = worker
            .host
            .register_shared_queue(crate::usage::QUEUE_NAME)
            .unwrap();
        let us = [("x-geoip-country", "US")];
        for _ in 0..5 {
            assert_eq!(send(&worker, "acme", "/live/a1", &us), 451);
        }
        assert!(
            worker
                .host
                .shared_data_keys(crate::limiter::KEY_PREFIX)
                .is_empty()
        );
        assert_eq!(worker.host.queue_len(queue), 0);

        // Basic admits 3 per window, all still available.
        let de = [("x-geoip-country", "DE")];
        let statuses: Vec<u32> = (0..4)
            .map(|_| send(&worker, "acme", "/live/a1", &de))
            .collect();
        assert_eq!(statuses, [200, 200, 200, 429]);
        assert_eq!(worker.counter("veo.geo_blocked_total.region.us-east"), 5);
        assert_eq!(worker.counter("veo.rate_limited_total.tier.basic"), 1);
    }

    #[test]
    fn without_geo_section_no_region_header_is_read() {
        let worker = Worker::new(MemoryHost::new(NOW_MS));
        let token = es256_token(claims("acme", None));
        assert_eq!(worker.send_token(&token), 200);
        let before = worker.host.request_header_reads();
        let headers = [
            ("x-geoip-country", "US"),
            ("x-veo-storage-region", "eu-west"),
        ];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &headers), 200);
        assert_eq!(worker.host.request_header_reads() - before, 1);
        assert_eq!(storage_header(&worker).as_deref(), Some("eu-west"));
        assert_eq!(worker.host.property_reads(), 0);
    }

    fn publish_registry(host: &MemoryHost, version: u64, assets: Vec<AssetRegion>) {
        let set = AssetRegions { version, assets };
        host.set_shared_data(ASSETS_KEY, &set.encode_to_vec(), None)
            .unwrap();
    }

    fn entry(asset: &str, allowed: &[&str], storage: &str) -> AssetRegion {
        AssetRegion {
            asset: asset.to_owned(),
            allowed_regions: allowed.iter().map(|name| (*name).to_owned()).collect(),
            tier_regions: Vec::new(),
            storage_region: storage.to_owned(),
        }
    }

    #[test]
    fn registry_entry_replaces_configured_rule() {
        let worker = geo_worker();
        let mut a1 = entry("a1", &["us-east"], "us-east");
        a1.tier_regions = vec![TierRegions {
            tier: "pro".to_owned(),
            regions: vec!["ap-southeast".to_owned()],
        }];
        publish_registry(&worker.host, 1, vec![a1, entry("a3", &["eu-west"], "")]);
        worker.filter.on_tick(&worker.host);

        let de = [("x-geoip-country", "DE")];
        let us = [("x-geoip-country", "US")];
        let sg = [("x-geoip-country", "SG")];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &de), 451);
        assert_eq!(send(&worker, "acme", "/videos/a1/", &us), 200);
        assert_eq!(storage_header(&worker).as_deref(), Some("us-east"));
        assert_eq!(
            send_as(&worker, "pro", Some("pro"), "/videos/a1/", &sg),
            200
        );
        // A registry-only asset, and a configured one the registry omits.
        assert_eq!(send(&worker, "acme", "/videos/a3/", &us), 451);
        assert_eq!(send(&worker, "acme", "/videos/a2/", &us), 200);
    }

    #[test]
    fn asset_before_registry_gets_503() {
        let worker = Worker::with_config(MemoryHost::new(NOW_MS), json!({"geo": geo_json()}));
        let de = [("x-geoip-country", "DE")];

        assert_eq!(send(&worker, "acme", "/videos/a1/", &de), 503);
        let reply = worker.host.local_response().unwrap();
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(worker.reply_json()["error"], "asset_regions_unavailable");
        assert_eq!(worker.reply_json()["asset"], "a1");
        assert_eq!(send(&worker, "acme", "/live/a2", &de), 503);
        // A path without an asset does not depend on the registry.
        assert_eq!(send(&worker, "acme", "/api/v1/videos", &de), 200);
        assert_eq!(worker.counter("veo.geo_registry_pending_total"), 2);
        let waits = worker
            .host
            .logs()
            .into_iter()
            .filter(|(_, line)| line.contains("no asset region registry"))
            .count();
        assert_eq!(waits, 1, "logged once per worker");

        // The first registry ends the wait at once.
        publish_registry(&worker.host, 7, vec![entry("a3", &["us-east"], "")]);
        assert_eq!(send(&worker, "acme", "/videos/a1/", &de), 200);
        assert_eq!(send(&worker, "acme", "/videos/a3/", &de), 451);
    }

    #[test]
    fn configured_rules_apply_before_registry() {
        let mut geo = geo_json();
        geo["before_registry"] = json!("configured_rules");
        let worker = Worker::with_config(MemoryHost::new(NOW_MS), json!({"geo": geo}));
        let de = [("x-geoip-country", "DE")];
        let us = [("x-geoip-country", "US")];

        assert_eq!(send(&worker, "acme", "/videos/a1/", &de), 200);
        assert_eq!(send(&worker, "acme", "/videos/a1/", &us), 451);
        assert_eq!(worker.counter("veo.geo_registry_pending_total"), 0);
    }

    #[test]
    fn registry_removal_falls_back_to_configuration() {
        let worker = geo_worker();
        publish_registry(&worker.host, 1, vec![entry("a1", &["us-east"], "")]);
        worker.filter.on_tick(&worker.host);
        let us = [("x-geoip-country", "US")];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &us), 200);

        publish_registry(&worker.host, 2, Vec::new());
        worker.filter.on_tick(&worker.host);
        assert_eq!(send(&worker, "acme", "/videos/a1/", &us), 451);
    }

    #[test]
    fn undecodable_registry_keeps_table_in_force() {
        let worker = geo_worker();
        publish_registry(&worker.host, 1, vec![entry("a1", &["us-east"], "")]);
        worker.filter.on_tick(&worker.host);
        worker
            .host
            .set_shared_data(ASSETS_KEY, b"\xff\xff", None)
            .unwrap();
        worker.filter.on_tick(&worker.host);

        let us = [("x-geoip-country", "US")];
        assert_eq!(send(&worker, "acme", "/videos/a1/", &us), 200);
        let logs = worker.host.logs();
        assert!(
            logs.iter()
                .any(|(level, line)| *level == LogLevel::Error && line.contains("veo.sync.assets"))
        );
    }
}
