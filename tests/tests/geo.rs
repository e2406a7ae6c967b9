//! Geo-fencing in real Envoy on `envoy/geo.yaml`. The client's region comes
//! from Envoy's geoip filter, which reads a generated country database, or
//! from a CDN header sent from a trusted address. The tests cover spoofed
//! region headers and `x-forwarded-for` entries, unknown countries under
//! both policies, tier rules, the 451 reply and its counter, quota after
//! 451s, the storage region header upstream, and the sidecar's asset region
//! registry.
//!
//! Clients bind their connections to addresses of 127.0.0.0/8, which Linux
//! routes to the loopback interface: 127.0.0.2 is the trusted CDN edge,
//! 127.0.0.3 an untrusted client, and the database maps a few other
//! addresses to countries.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use tempfile::TempDir;
use veo_proto::admin::{
    AssetRegions, DeleteAssetRegionsRequest, GetAssetRegionsRequest, ListAssetRegionsRequest,
    SetAssetRegionsRequest, TierRegions,
};
use veo_tests::client::{HttpClient, Reply};
use veo_tests::envoy::{BootstrapValues, Envoy, EnvoyProcess, GeoValues};
use veo_tests::mmdb;
use veo_tests::plugin::{BASIC_QUOTA, PluginConfig, SYNC_INTERVAL_MS, WINDOW_SECONDS};
use veo_tests::sidecar::{CustomerUsage, Sidecar};
use veo_tests::stack::temp_dir_named;
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::upstream::EchoUpstream;

/// Envoy's default client address: no database entry, not trusted.
const PLAIN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// The CDN edge, the only address in `cdn_trusted_ranges` without a
/// database entry.
const CDN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A client outside the trusted ranges without a database entry.
const UNTRUSTED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const GEOIP_DE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const GEOIP_US: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);
const GEOIP_SG: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const GEOIP_TOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 7);
const GEOIP_XX: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 8);
/// Brazil, which `geo.countries` does not map to a region.
const GEOIP_BR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
/// France by the database, and also a trusted CDN address, so both
/// sources are present.
const GEOIP_FR_CDN: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);

/// A proxy in front of Envoy, trusted through `xff_num_trusted_hops: 1`.
/// Not 127.0.0.1, for which Envoy appends its own address to
/// `x-forwarded-for` instead of the client's (seen with Envoy 1.40.0).
const PROXY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

/// Entries of the generated country database.
const COUNTRIES: [(Ipv4Addr, &str); 7] = [
    (GEOIP_DE, "DE"),
    (GEOIP_US, "US"),
    (GEOIP_SG, "SG"),
    (GEOIP_TOR, "T1"),
    (GEOIP_XX, "XX"),
    (GEOIP_BR, "BR"),
    (GEOIP_FR_CDN, "FR"),
];

/// Locked to eu-west, stored in eu-west.
const EU_ASSET: &str = "/videos/eu-film/seg-1.ts";
/// Locked to us-east, plus ap-southeast for enterprise, and stored in
/// us-east.
const US_ASSET: &str = "/live/us-film/index.m3u8";
/// Matches a pattern but has no rule.
const FREE_ASSET: &str = "/videos/free-film/seg-1.ts";
/// Names the locked asset but matches no pattern.
const OTHER_PATH: &str = "/catalog/eu-film";
/// Matches no pattern because `/videos/{asset}/` needs the slash after the
/// asset.
const EU_ASSET_NO_SLASH: &str = "/videos/eu-film";
/// Locked to us-east by the configuration. The registry test changes it.
const REGISTRY_ASSET: &str = "/videos/reg-film/seg-1.ts";

const STORAGE: &str = "x-veo-storage-region";
const GEOIP: &str = "x-geoip-country";
const CDN_COUNTRY: &str = "cf-ipcountry";
const XFF: &str = "x-forwarded-for";

/// Returns the `geo` section: `unknown_country` is "refuse" or "allow".
fn geo_section(unknown_country: &str) -> Value {
    json!({
        "geoip_header": GEOIP,
        "cdn_country_header": CDN_COUNTRY,
        "cdn_trusted_ranges": [format!("{CDN}/32"), format!("{GEOIP_FR_CDN}/32")],
        "unknown_country": unknown_country,
        "countries": {"DE": "eu-west", "FR": "eu-west", "US": "us-east", "SG": "ap-southeast"},
        "asset_patterns": ["/videos/{asset}/", "/live/{asset}"],
        "assets": [
            {"asset": "eu-film", "allowed_regions": ["eu-west"], "storage_region": "eu-west"},
            {"asset": "us-film", "allowed_regions": ["us-east"],
             "tier_regions": {"enterprise": ["ap-southeast"]}, "storage_region": "us-east"},
            {"asset": "reg-film", "allowed_regions": ["us-east"], "storage_region": "us-east"},
        ],
    })
}

fn geo_config(key: &SigningKey, unknown_country: &str) -> anyhow::Result<PluginConfig> {
    Ok(PluginConfig::for_key(key)?.set("/geo", geo_section(unknown_country)))
}

/// Envoy on `envoy/geo.yaml` with the sidecar, the echo upstream and the
/// generated country database. Fields drop in order: Envoy first.
struct GeoStack {
    envoy: Envoy,
    sidecar: Sidecar,
    upstream: EchoUpstream,
    _dir: TempDir,
}

impl GeoStack {
    async fn start(config: &PluginConfig, xff_trusted_hops: u32) -> anyhow::Result<Self> {
        let stack = Self::start_with_registry(config, xff_trusted_hops, &[]).await?;
        stack.envoy.wait_for_asset_regions().await?;
        Ok(stack)
    }

    /// Starts the sidecar, stores `registry` in it and stops it when the
    /// registry is not empty, then starts Envoy without waiting for the
    /// registry to reach it.
    async fn start_with_registry(
        config: &PluginConfig,
        xff_trusted_hops: u32,
        registry: &[AssetRegions],
    ) -> anyhow::Result<Self> {
        let dir = temp_dir_named("veo-geo")?;
        let database = dir.path().join("countries.mmdb");
        mmdb::write_country_database(&database, &COUNTRIES)?;
        let upstream = EchoUpstream::start().await?;
        let mut sidecar = Sidecar::start(dir.path()).await?;
        if !registry.is_empty() {
            let mut admin = sidecar.admin().await?;
            for entry in registry {
                let request = SetAssetRegionsRequest {
                    asset: Some(entry.clone()),
                };
                admin.set_asset_regions(request).await?;
            }
            sidecar.stop();
        }
        let values = BootstrapValues {
            node_id: format!("veo-geo-{}", std::process::id()),
            upstream_port: upstream.address().port(),
            sidecar_port: sidecar.address().port(),
            plugin_config: config.to_json(),
        };
        let geo = GeoValues {
            geoip_db_path: database,
            xff_trusted_hops,
        };
        let envoy = EnvoyProcess::spawn_geo(dir.path(), &values, &geo, 1)?
            .wait_ready()
            .await?;
        Ok(Self {
            envoy,
            sidecar,
            upstream,
            _dir: dir,
        })
    }

    fn client(&self, source: Ipv4Addr) -> HttpClient {
        self.envoy.client_from(IpAddr::V4(source))
    }
}

/// What a request must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 200 from the upstream, which saw each header with the given value,
    /// or without it for `None`.
    Admitted(&'static [(&'static str, Option<&'static str>)]),
    /// 451 for `asset` with `reason`, counted under the client's `region`.
    Blocked {
        asset: &'static str,
        reason: &'static str,
        region: &'static str,
    },
}

/// One request: who sends it from where, and what it must get.
#[derive(Debug, Clone, Copy)]
struct Case {
    name: &'static str,
    source: Ipv4Addr,
    tier: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    expect: Expect,
}

const NOT_ALLOWED: &str = "region_not_allowed";
const UNKNOWN: &str = "region_unknown";

const fn blocked(asset: &'static str, reason: &'static str, region: &'static str) -> Expect {
    Expect::Blocked {
        asset,
        reason,
        region,
    }
}

/// Decisions with `unknown_country: refuse` and clients connecting directly
/// (`xff_num_trusted_hops: 0`).
const REFUSE_CASES: &[Case] = &[
    // Region from Envoy's geoip filter.
    Case {
        name: "geoip DE admitted to eu asset",
        source: GEOIP_DE,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (GEOIP, Some("DE"))]),
    },
    Case {
        name: "geoip US blocked from eu asset",
        source: GEOIP_US,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    Case {
        name: "geoip US admitted to us asset",
        source: GEOIP_US,
        tier: "basic",
        path: US_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("us-east"))]),
    },
    Case {
        name: "geoip SG basic blocked from us asset",
        source: GEOIP_SG,
        tier: "basic",
        path: US_ASSET,
        headers: &[],
        expect: blocked("us-film", NOT_ALLOWED, "ap-southeast"),
    },
    Case {
        name: "geoip SG pro blocked from us asset",
        source: GEOIP_SG,
        tier: "pro",
        path: US_ASSET,
        headers: &[],
        expect: blocked("us-film", NOT_ALLOWED, "ap-southeast"),
    },
    Case {
        name: "geoip SG enterprise admitted to us asset",
        source: GEOIP_SG,
        tier: "enterprise",
        path: US_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("us-east"))]),
    },
    Case {
        name: "geoip DE enterprise blocked from us asset",
        source: GEOIP_DE,
        tier: "enterprise",
        path: US_ASSET,
        headers: &[],
        expect: blocked("us-film", NOT_ALLOWED, "eu-west"),
    },
    Case {
        name: "geoip wins over trusted CDN header",
        source: GEOIP_FR_CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "US")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (GEOIP, Some("FR"))]),
    },
    // Region from the CDN header.
    Case {
        name: "trusted CDN DE admitted to eu asset",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "DE")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (CDN_COUNTRY, Some("DE"))]),
    },
    Case {
        name: "trusted CDN lowercase de admitted",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "de")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "trusted CDN US blocked from eu asset",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "US")],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    Case {
        name: "untrusted CDN header DE blocked as unknown",
        source: UNTRUSTED,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "DE")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "untrusted CDN header removed before upstream",
        source: UNTRUSTED,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[(CDN_COUNTRY, "DE")],
        expect: Expect::Admitted(&[(CDN_COUNTRY, None), (STORAGE, None)]),
    },
    // No source.
    Case {
        name: "no source blocked from eu asset",
        source: PLAIN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "no source admitted to asset without rule",
        source: PLAIN,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, None), (GEOIP, None)]),
    },
    Case {
        name: "no source admitted to path without pattern",
        source: PLAIN,
        tier: "basic",
        path: OTHER_PATH,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, None)]),
    },
    Case {
        name: "no source admitted to asset path without slash",
        source: PLAIN,
        tier: "basic",
        path: EU_ASSET_NO_SLASH,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, None)]),
    },
    // Spoofed geoip header.
    Case {
        name: "client geoip header removed without lookup hit",
        source: PLAIN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(GEOIP, "DE")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "client geoip header never reaches upstream",
        source: PLAIN,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[(GEOIP, "DE")],
        expect: Expect::Admitted(&[(GEOIP, None)]),
    },
    Case {
        name: "client geoip header replaced by lookup",
        source: GEOIP_US,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(GEOIP, "DE")],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    Case {
        name: "client geoip header from CDN address ignored",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(GEOIP, "DE"), (CDN_COUNTRY, "US")],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    // Spoofed storage region header.
    Case {
        name: "client storage region replaced for locked asset",
        source: GEOIP_DE,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(STORAGE, "us-east")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "client storage region removed for asset without rule",
        source: PLAIN,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[(STORAGE, "us-east")],
        expect: Expect::Admitted(&[(STORAGE, None)]),
    },
    Case {
        name: "client storage region removed for path without pattern",
        source: PLAIN,
        tier: "basic",
        path: OTHER_PATH,
        headers: &[(STORAGE, "us-east")],
        expect: Expect::Admitted(&[(STORAGE, None)]),
    },
    // x-forwarded-for naming the CDN: without trusted hops it never counts.
    Case {
        name: "xff naming CDN does not trust header",
        source: UNTRUSTED,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.2"), (CDN_COUNTRY, "DE")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "xff naming CDN twice does not trust header",
        source: UNTRUSTED,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.2, 127.0.0.2"), (CDN_COUNTRY, "DE")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "xff naming CDN leaves header removed",
        source: UNTRUSTED,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[(XFF, "127.0.0.2"), (CDN_COUNTRY, "DE")],
        expect: Expect::Admitted(&[(CDN_COUNTRY, None)]),
    },
    Case {
        name: "xff naming geoip address does not change lookup",
        source: PLAIN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.4")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    // Countries without a region.
    Case {
        name: "geoip T1 blocked as unknown",
        source: GEOIP_TOR,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "geoip XX blocked as unknown",
        source: GEOIP_XX,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "geoip unmapped country blocked as unknown",
        source: GEOIP_BR,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "trusted CDN T1 blocked as unknown",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "T1")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "trusted CDN XX blocked as unknown",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "XX")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "geoip T1 admitted to asset without rule",
        source: GEOIP_TOR,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, None)]),
    },
];

/// Decisions with `unknown_country: allow`.
const ALLOW_CASES: &[Case] = &[
    Case {
        name: "geoip T1 admitted",
        source: GEOIP_TOR,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "geoip XX admitted",
        source: GEOIP_XX,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "geoip unmapped country admitted",
        source: GEOIP_BR,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "trusted CDN T1 admitted",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "T1")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "trusted CDN XX admitted",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "XX")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "no source admitted",
        source: PLAIN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west"))]),
    },
    Case {
        name: "untrusted CDN header admitted as unknown",
        source: UNTRUSTED,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "US")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (CDN_COUNTRY, None)]),
    },
    Case {
        name: "known region still blocked",
        source: GEOIP_US,
        tier: "basic",
        path: EU_ASSET,
        headers: &[],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    Case {
        name: "trusted CDN known region still blocked",
        source: CDN,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(CDN_COUNTRY, "SG")],
        expect: blocked("eu-film", NOT_ALLOWED, "ap-southeast"),
    },
];

/// Decisions behind one trusted proxy (`xff_num_trusted_hops: 1`), which
/// connects from [`PROXY`] and appends the address it saw to
/// `x-forwarded-for`. Only that last entry counts.
const ONE_HOP_CASES: &[Case] = &[
    Case {
        name: "last xff entry CDN trusts header",
        source: PROXY,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.3, 127.0.0.2"), (CDN_COUNTRY, "DE")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (CDN_COUNTRY, Some("DE"))]),
    },
    Case {
        name: "leftmost xff entry CDN does not trust header",
        source: PROXY,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.2, 127.0.0.3"), (CDN_COUNTRY, "DE")],
        expect: blocked("eu-film", UNKNOWN, "unknown"),
    },
    Case {
        name: "leftmost xff CDN entry leaves header removed",
        source: PROXY,
        tier: "basic",
        path: FREE_ASSET,
        headers: &[(XFF, "127.0.0.2, 127.0.0.3"), (CDN_COUNTRY, "DE")],
        expect: Expect::Admitted(&[(CDN_COUNTRY, None)]),
    },
    Case {
        name: "geoip looks up last xff entry",
        source: PROXY,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.4, 127.0.0.5")],
        expect: blocked("eu-film", NOT_ALLOWED, "us-east"),
    },
    Case {
        name: "geoip DE from last xff entry admitted",
        source: PROXY,
        tier: "basic",
        path: EU_ASSET,
        headers: &[(XFF, "127.0.0.4")],
        expect: Expect::Admitted(&[(STORAGE, Some("eu-west")), (GEOIP, Some("DE"))]),
    },
];

/// Sends `case` as customer `customer` and checks the reply against its
/// expectation.
async fn check_case(
    stack: &GeoStack,
    key: &SigningKey,
    customer: &str,
    case: &Case,
) -> anyhow::Result<()> {
    let token = key.mint(&TokenSpec::new(customer, case.tier))?;
    let reply = stack
        .client(case.source)
        .get_with_token(case.path, &token, case.headers)
        .await?;
    let name = case.name;
    match case.expect {
        Expect::Admitted(upstream_headers) => {
            assert_eq!(reply.status, 200, "{name}: body {}", reply.body);
            let seen = reply.json()?;
            for (header, expected) in upstream_headers {
                let values = seen["headers"].get(*header);
                match expected {
                    Some(value) => {
                        assert_eq!(values, Some(&json!([value])), "{name}: upstream {header}")
                    }
                    None => assert_eq!(values, None, "{name}: upstream {header}"),
                }
            }
        }
        Expect::Blocked { asset, reason, .. } => {
            assert_blocked(&reply, asset, reason, &case.source.to_string(), name)?;
        }
    }
    Ok(())
}

/// Checks a 451 reply: JSON content type and exactly the documented body,
/// which never names the client's address.
fn assert_blocked(
    reply: &Reply,
    asset: &str,
    reason: &str,
    client_address: &str,
    name: &str,
) -> anyhow::Result<()> {
    assert_eq!(reply.status, 451, "{name}: body {}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "{name}: content-type"
    );
    assert_eq!(
        reply.json()?,
        json!({"error": "unavailable_for_legal_reasons", "asset": asset, "reason": reason}),
        "{name}: 451 body"
    );
    ensure!(
        !reply.body.contains(client_address),
        "{name}: 451 body names the client address: {}",
        reply.body
    );
    Ok(())
}

/// Sends every case, each as its own customer, and returns the 451s
/// expected per region counter.
async fn check_cases(
    stack: &GeoStack,
    key: &SigningKey,
    label: &str,
    cases: &[Case],
) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut blocked = BTreeMap::new();
    for (index, case) in cases.iter().enumerate() {
        check_case(stack, key, &format!("{label}-{index}"), case).await?;
        if let Expect::Blocked { region, .. } = case.expect {
            *blocked.entry(region.to_owned()).or_insert(0) += 1;
        }
    }
    Ok(blocked)
}

/// Returns how many region headers the filter removes from `cases` sent
/// straight to Envoy: every storage region header, and every CDN header
/// from an address outside `cdn_trusted_ranges`.
fn removed_headers(cases: &[Case]) -> u64 {
    let mut removed = 0;
    for case in cases {
        for (name, _) in case.headers {
            let untrusted = ![CDN, GEOIP_FR_CDN].contains(&case.source);
            if *name == STORAGE || (*name == CDN_COUNTRY && untrusted) {
                removed += 1;
            }
        }
    }
    removed
}

/// Returns how many admitted cases reach the upstream.
fn admitted(cases: &[Case]) -> u64 {
    let count = cases
        .iter()
        .filter(|case| matches!(case.expect, Expect::Admitted(_)))
        .count();
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// Returns the stat names of the 451 counters with their expected values,
/// 0 for a region without 451s.
fn blocked_stats(blocked: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    ["eu-west", "us-east", "ap-southeast", "unknown"]
        .into_iter()
        .map(|region| {
            let name = format!("wasmcustom.veo.geo_blocked_total.region.{region}");
            (name, blocked.get(region).copied().unwrap_or(0))
        })
        .collect()
}

/// Proves the decision of every region source, spoofed header and unknown
/// country under `refuse`, the 451 body, the storage region header
/// upstream, the 451 counter per region and the removed-header counter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuse_policy_decides_every_source() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = GeoStack::start(&geo_config(&key, "refuse")?, 0).await?;

    let blocked = check_cases(&stack, &key, "refuse", REFUSE_CASES).await?;

    assert_eq!(
        stack.upstream.requests(),
        admitted(REFUSE_CASES),
        "requests that reached the upstream"
    );
    let mut expected = blocked_stats(&blocked);
    expected.insert(
        "wasmcustom.veo.geo_headers_removed_total".to_owned(),
        removed_headers(REFUSE_CASES),
    );
    let observed = stack
        .envoy
        .admin()
        .await_counters(&expected, Duration::from_secs(5))
        .await?;
    assert_eq!(
        observed, expected,
        "geo counters (left) against requests sent (right)"
    );
    Ok(())
}

/// Proves `unknown_country: allow` admits T1, XX, unmapped and missing
/// countries while a known region outside the rule is still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_policy_admits_unknown_regions() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = GeoStack::start(&geo_config(&key, "allow")?, 0).await?;

    let blocked = check_cases(&stack, &key, "allow", ALLOW_CASES).await?;

    let expected = blocked_stats(&blocked);
    let observed = stack
        .envoy
        .admin()
        .await_counters(&expected, Duration::from_secs(5))
        .await?;
    assert_eq!(
        observed, expected,
        "451 counters (left) against 451s sent (right)"
    );
    Ok(())
}

/// Proves that behind one trusted hop only the last `x-forwarded-for` entry
/// decides the address, for the CDN header and the geoip lookup alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xff_counts_only_through_trusted_hops() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = GeoStack::start(&geo_config(&key, "refuse")?, 1).await?;

    check_cases(&stack, &key, "hop", ONE_HOP_CASES).await?;
    Ok(())
}

/// Proves 451s consume no quota and no usage: after many 451s the customer
/// still gets its whole basic quota of 200s, then a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_requests_keep_the_quota() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = GeoStack::start(&geo_config(&key, "refuse")?, 0).await?;
    let customer = "geo-quota";
    let token = key.mint(&TokenSpec::new(customer, "basic"))?;
    let blocked_count = 3 * BASIC_QUOTA;
    let started = Instant::now();

    let from_us = stack.client(GEOIP_US);
    for _ in 0..blocked_count {
        let reply = from_us.get_with_token(EU_ASSET, &token, &[]).await?;
        assert_blocked(&reply, "eu-film", NOT_ALLOWED, "127.0.0.5", "quota")?;
    }
    let from_de = stack.client(GEOIP_DE);
    for attempt in 0..BASIC_QUOTA {
        let reply = from_de.get_with_token(EU_ASSET, &token, &[]).await?;
        assert_eq!(
            reply.status, 200,
            "request {attempt} after the 451s: {}",
            reply.body
        );
    }
    let over = from_de.get_with_token(EU_ASSET, &token, &[]).await?;
    // Past one window the first 200s no longer count, so a 200 here would
    // prove nothing.
    ensure!(
        started.elapsed() < Duration::from_secs(WINDOW_SECONDS),
        "the requests took {:?}, longer than one quota window",
        started.elapsed()
    );
    assert_eq!(over.status, 429, "request over the quota: {}", over.body);

    let expected = BTreeMap::from([(
        customer.to_owned(),
        CustomerUsage {
            admitted: BASIC_QUOTA,
            refused: 1,
        },
    )]);
    let usage = stack
        .sidecar
        .await_usage(&expected, Duration::from_secs(5))
        .await?;
    assert_eq!(
        usage, expected,
        "ledger (left) against requests sent (right)"
    );
    Ok(())
}

/// Sends `GET path` with `token` every 10 ms until `done` holds for a reply
/// or `timeout` passes, and returns that reply and the time it took.
async fn poll_until(
    client: &HttpClient,
    token: &str,
    path: &str,
    timeout: Duration,
    done: impl Fn(&Reply) -> bool,
) -> anyhow::Result<(Reply, Duration)> {
    let started = Instant::now();
    loop {
        let reply = client.get_with_token(path, token, &[]).await?;
        if done(&reply) {
            return Ok((reply, started.elapsed()));
        }
        ensure!(
            started.elapsed() < timeout,
            "no change after {timeout:?}; last reply {}: {}",
            reply.status,
            reply.body
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Proves SetAssetRegions on the sidecar changes the decision in Envoy
/// within a few sync intervals, tier rules included, and that
/// DeleteAssetRegions brings the configured rule back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_changes_reach_envoy() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    // Polling sends many requests; a large quota keeps 429s out of the way.
    let config = geo_config(&key, "refuse")?
        .quota("basic", 100_000, 3)
        .quota("pro", 100_000, 3);
    let stack = GeoStack::start(&config, 0).await?;
    let bound = Duration::from_millis(5 * SYNC_INTERVAL_MS + 1000);
    let basic = key.mint(&TokenSpec::new("geo-registry-basic", "basic"))?;
    let from_de = stack.client(GEOIP_DE);
    let from_sg = stack.client(GEOIP_SG);

    let first = from_de.get_with_token(REGISTRY_ASSET, &basic, &[]).await?;
    assert_blocked(
        &first,
        "reg-film",
        NOT_ALLOWED,
        "127.0.0.4",
        "configured rule",
    )?;
    let free = from_de.get_with_token(FREE_ASSET, &basic, &[]).await?;
    assert_eq!(free.status, 200, "asset without rule: {}", free.body);

    let entry = AssetRegions {
        asset: "reg-film".to_owned(),
        allowed_regions: vec!["eu-west".to_owned()],
        tier_regions: vec![TierRegions {
            tier: "pro".to_owned(),
            regions: vec!["ap-southeast".to_owned()],
        }],
        storage_region: "eu-west".to_owned(),
    };
    let mut admin = stack.sidecar.admin().await?;
    admin
        .set_asset_regions(SetAssetRegionsRequest {
            asset: Some(entry.clone()),
        })
        .await
        .context("SetAssetRegions reg-film")?;
    let (reply, took) = poll_until(&from_de, &basic, REGISTRY_ASSET, bound, |reply| {
        reply.status != 451
    })
    .await?;
    println!(
        "registry entry reached Envoy {} ms after SetAssetRegions returned (sync interval \
         {SYNC_INTERVAL_MS} ms, bound {} ms)",
        took.as_millis(),
        bound.as_millis()
    );
    assert_eq!(reply.status, 200, "after SetAssetRegions: {}", reply.body);
    assert_eq!(
        reply.json()?["headers"][STORAGE],
        json!(["eu-west"]),
        "storage region from the registry"
    );

    let pro = key.mint(&TokenSpec::new("geo-registry-pro", "pro"))?;
    let pro_reply = from_sg.get_with_token(REGISTRY_ASSET, &pro, &[]).await?;
    assert_eq!(pro_reply.status, 200, "pro from SG: {}", pro_reply.body);
    let basic_sg = from_sg.get_with_token(REGISTRY_ASSET, &basic, &[]).await?;
    assert_blocked(
        &basic_sg,
        "reg-film",
        NOT_ALLOWED,
        "127.0.0.6",
        "basic from SG",
    )?;

    let stored = admin
        .get_asset_regions(GetAssetRegionsRequest {
            asset: "reg-film".to_owned(),
        })
        .await
        .context("GetAssetRegions reg-film")?
        .into_inner();
    assert_eq!(stored, entry, "GetAssetRegions");
    let listed = admin
        .list_asset_regions(ListAssetRegionsRequest::default())
        .await
        .context("ListAssetRegions")?
        .into_inner();
    assert_eq!(listed.assets, vec![entry], "ListAssetRegions");

    // A registry entry also locks an asset that has no configured rule.
    let lock_free = AssetRegions {
        asset: "free-film".to_owned(),
        allowed_regions: vec!["us-east".to_owned()],
        tier_regions: Vec::new(),
        storage_region: "us-east".to_owned(),
    };
    admin
        .set_asset_regions(SetAssetRegionsRequest {
            asset: Some(lock_free),
        })
        .await
        .context("SetAssetRegions free-film")?;
    let (reply, took) = poll_until(&from_de, &basic, FREE_ASSET, bound, |reply| {
        reply.status == 451
    })
    .await?;
    println!("new registry lock reached Envoy in {} ms", took.as_millis());
    assert_blocked(
        &reply,
        "free-film",
        NOT_ALLOWED,
        "127.0.0.4",
        "registry lock",
    )?;
    // Two entries, listed one per page.
    let mut pages = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_asset_regions(ListAssetRegionsRequest {
                page_size: 1,
                page_token,
            })
            .await
            .context("ListAssetRegions page")?
            .into_inner();
        pages.push(
            page.assets
                .iter()
                .map(|entry| entry.asset.clone())
                .collect::<Vec<_>>(),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        pages,
        [
            vec!["free-film".to_owned()],
            vec!["reg-film".to_owned()],
            vec![]
        ],
        "ListAssetRegions pages"
    );
    let oversized = admin
        .list_asset_regions(ListAssetRegionsRequest {
            page_size: 10_001,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), tonic::Code::InvalidArgument);

    let deleted = admin
        .delete_asset_regions(DeleteAssetRegionsRequest {
            asset: "reg-film".to_owned(),
        })
        .await
        .context("DeleteAssetRegions reg-film")?
        .into_inner();
    assert!(
        deleted.deleted,
        "DeleteAssetRegions reported nothing deleted"
    );
    let (reply, took) = poll_until(&from_de, &basic, REGISTRY_ASSET, bound, |reply| {
        reply.status == 451
    })
    .await?;
    println!("deletion reached Envoy in {} ms", took.as_millis());
    assert_blocked(&reply, "reg-film", NOT_ALLOWED, "127.0.0.4", "after delete")?;
    let from_us = stack.client(GEOIP_US);
    let us_reply = from_us.get_with_token(REGISTRY_ASSET, &basic, &[]).await?;
    assert_eq!(
        us_reply.status, 200,
        "configured rule after delete: {}",
        us_reply.body
    );
    assert_eq!(
        us_reply.json()?["headers"][STORAGE],
        json!(["us-east"]),
        "configured storage region after delete"
    );
    Ok(())
}

/// Proves a lock that only the sidecar's registry contains applies from
/// Envoy's start: while the sidecar is down, requests for assets get 503
/// and other paths are served, and once the sidecar is back the lock
/// decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_lock_applies_from_envoy_start() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let lock = AssetRegions {
        asset: "free-film".to_owned(),
        allowed_regions: vec!["us-east".to_owned()],
        tier_regions: Vec::new(),
        storage_region: "us-east".to_owned(),
    };
    let mut stack = GeoStack::start_with_registry(&geo_config(&key, "refuse")?, 0, &[lock]).await?;
    let token = key.mint(&TokenSpec::new("geo-start", "basic"))?;
    let from_de = stack.client(GEOIP_DE);

    let pending = from_de.get_with_token(FREE_ASSET, &token, &[]).await?;
    assert_eq!(
        pending.status, 503,
        "asset before the registry: {}",
        pending.body
    );
    assert_eq!(pending.header("retry-after"), Some("1"));
    assert_eq!(pending.json()?["error"], "asset_regions_unavailable");
    let other = from_de.get_with_token(OTHER_PATH, &token, &[]).await?;
    assert_eq!(other.status, 200, "path without an asset: {}", other.body);

    stack.sidecar.restart().await?;
    let bound = Duration::from_millis(5 * SYNC_INTERVAL_MS + 5000);
    let (reply, took) = poll_until(&from_de, &token, FREE_ASSET, bound, |reply| {
        reply.status != 503
    })
    .await?;
    println!(
        "registry reached Envoy {} ms after the sidecar restarted",
        took.as_millis()
    );
    assert_blocked(
        &reply,
        "free-film",
        NOT_ALLOWED,
        "127.0.0.4",
        "registry lock",
    )?;
    // The workers add their counts to Envoy's stats on their timer.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = stack
            .envoy
            .admin()
            .stats("veo.geo_registry_pending_total")
            .await?;
        let counted = stats
            .get("wasmcustom.veo.geo_registry_pending_total")
            .copied()
            .unwrap_or(0);
        if counted >= 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no 503 counted after 5 s: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Proves the CLI sets, lists and deletes an asset's regions, and prints
/// a line for an empty registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_asset_regions() -> anyhow::Result<()> {
    let dir = temp_dir_named("veo-test")?;
    let sidecar = Sidecar::start_with_config(dir.path(), "").await?;
    let url = format!("http://{}", sidecar.address());
    let cli = |args: &[&str]| -> anyhow::Result<String> {
        let output = std::process::Command::new(veo_tests::artifacts::sidecar_binary()?)
            .args(args)
            .output()?;
        ensure!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    };
    let empty = "no asset has regions in the registry\n";

    assert_eq!(cli(&["asset-regions", "--sidecar", &url])?, empty);
    let set = [
        "set-asset-regions",
        "--sidecar",
        &url,
        "a1",
        "--allow",
        "eu-west",
        "--storage",
        "eu-west",
    ];
    cli(&set)?;
    let listed = cli(&["asset-regions", "--sidecar", &url])?;
    assert!(listed.starts_with("a1 allowed=eu-west "), "{listed}");
    assert!(listed.ends_with(" storage=eu-west\n"), "{listed}");
    cli(&["delete-asset-regions", "--sidecar", &url, "a1"])?;
    assert_eq!(cli(&["asset-regions", "--sidecar", &url])?, empty);
    Ok(())
}
