//! Test keys, JWKS documents, tokens, configurations, a worker that sends
//! requests through the filter, and an instance with a sync role.

use std::rc::Rc;
use std::time::Duration;

use jwt_simple::prelude::*;
use prost::Message;
use serde_json::{Map, Value, json};
use veo_proto::sync::{SyncRequest, SyncResponse};

use crate::config::{Config, SidecarSettings};
use crate::filter::{Filter, RequestOutcome, Stream};
use crate::host::{Host, MemoryHost};
use crate::limiter::Limiter;
use crate::metrics::Metrics;
use crate::sync::Sync;

/// Test clock, in seconds since the Unix epoch.
pub const NOW_S: u64 = 1_750_000_000;
/// Issuer the test configuration requires.
pub const ISSUER: &str = "https://auth.veo.test";
/// Audience the test configuration requires.
pub const AUDIENCE: &str = "veo-api";

/// One signing key of each supported type, with kids `es`, `rs`, `ed`.
pub struct Keys {
    /// ES256 key, kid `es`.
    pub es256: ES256KeyPair,
    /// RS256 key, kid `rs`.
    pub rs256: RS256KeyPair,
    /// Ed25519 key, kid `ed`.
    pub ed25519: Ed25519KeyPair,
}

/// A 2048-bit RSA key made for these tests only; generating one in an
/// unoptimized test build takes minutes.
const TEST_RSA_KEY: &str = "
-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCeif2iKLjVCmKE
uhWXLOVqASMPgQslk850ldIFmmhMihqDKxuVyxVByaAO2YvqvKQdr6lFg9zP+E/E
IV85UNnSMYOFTG6NWuPDq96K1jYWLBYZGherV0tZ6UFKTaWqZNNiqaK5NbGbvY8Q
t8exPrfImzeXYmOmgL6E7EPtmyJnK+5Sly1D/0vc9gIi0Hfcvi9Fp2Nypwx2H3NU
zSeJJ9O5tyubzNbJxdRqo2DMJHr/v2E4YuBbj7PBFVKBHPdUojzCywNbLFQ5ccuf
HoDOTnJ/i07qlNCVXpqW4K8wxZ0o1/cn8ka6YyoDFV7u2HalXq5kZVjC2N0VnuYF
xouauPrJAgMBAAECggEABBUKhlvlEns/eSpvduKNj7Kyy+nnNxL8vGzFKSbGK75c
m2cHQU6m3/hImklIvIUZ9re4tJUGIQbESwkO8iNeUHa867hBmnsuJTIuO0Xzw5Nk
CEZvOJa5VnnWmAqyytXoyYATtBApYBi779LDnhE+2zf/8PJ0HWvwO+z3fM1DUAO7
rlzhyQEF+uZDZjir0erLK5hy66YNmk+tPhomGHy12elN6f/0Q/gdrnUdqR3dJoq0
5d0pUWBFjgMYwliuaU7vM1HVUK7/08dw66ZfkBWuTPB+OCRUT3jpo8arHzj3a/FA
M3aNJXOguNSnj8mSQ2JiW8w1TrtZOTTte9jIRwmW1wKBgQDT8KBRrDXk9Lx8lNZB
1HWQesPZAqPUeHti6s1VyYw2SqEowH4+kdGybmIp4pkIbWijZuSWTnHokt+GeRGS
iKGW9yHeo7OJ0RD3xSoR+k6iOrup4eXWyyuzW0Y50+715Wz5GtfafatzjNRqGIsl
9QHImp2VNhTSq1CJpQ1lsbvVxwKBgQC/f2Ke7cGEC8MlwYvDtdDC1seMi+4YAHsY
kFIqGGJLpaz7msbuZdyr8uE+dlJxOHneujKjK+YNlWvqAGR7BeahDd/P6WkWceUV
OM0IlhEzdvsCAgBL0NcHl8reDgPW1hbZ1mAwnf50x9AuV3UhNl7opJpQCV3gAXS2
hidXi2hq7wKBgQDBYW+G1hEe5cgODGgrDMZwm/OTUPtXZM+AhCnzOsF60EGYQ3tt
b/PcUSe0fBOSQvIVFk9Abjc1NL5LnrBP+ecnLjtzP/8TovVOflJSsQeKsviEm5/x
itRHBONg5GXHbB0wdjO6IqyL9FXksJxWd+W2uo1KllwNlU8ZKMa+oZt4BQKBgEWF
yNcsODJpVsrxTn2aF5V1BnNXJfSe0BHl636O5bjTCE88LPbGEmx2vCHCMUIbn9sl
vFaTDG1oDwqgY9pqFQXplJTWB6n3ZZTjz0RLvyjxDEX5VgQwaLDAAg3GBszLYvZp
Jvjfk07wb/szEzoglCpgAAoIrIUz4hyV7diRqzIPAoGBALaj1rd+4waY6cSzsMC0
qVlVS/BP2KK2mriuWdOZAHOum2pQkAvJkRloUyKCipbFkeeF9kI6Sk7OPHqfjYoq
nQnevXgQuBIBbLjcLlqh7Th1h6zszA5mHfYFPU3Z0EGUSWcnFwhp4U4Xc70THPVX
gar9nRMNftm1k7a+qcsL98j/
-----END PRIVATE KEY-----
";

static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();

/// Returns the test keys, made once per test run.
pub fn keys() -> &'static Keys {
    KEYS.get_or_init(|| Keys {
        es256: ES256KeyPair::generate().with_key_id("es"),
        rs256: RS256KeyPair::from_pem(TEST_RSA_KEY)
            .unwrap()
            .with_key_id("rs"),
        ed25519: Ed25519KeyPair::generate().with_key_id("ed"),
    })
}

fn b64(bytes: &[u8]) -> String {
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap()
}

/// Returns the public JWKS of [`keys`].
pub fn jwks() -> Value {
    let keys = keys();
    let point = keys.es256.public_key().public_key().to_bytes_uncompressed();
    let rsa = keys.rs256.public_key().to_components();
    json!({"keys": [
        {"kty": "EC", "crv": "P-256", "kid": "es", "alg": "ES256", "use": "sig",
         "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        {"kty": "RSA", "kid": "rs", "n": b64(&rsa.n), "e": b64(&rsa.e)},
        {"kty": "OKP", "crv": "Ed25519", "kid": "ed",
         "x": b64(&keys.ed25519.public_key().to_bytes())},
    ]})
}

/// Returns a configuration JSON with the test JWKS, issuer and audience,
/// 3-request basic tier over 60 s, and `extra` merged in at top level.
pub fn config_json(extra: Value) -> Value {
    let mut config = json!({
        "jwt": {"jwks": jwks(), "issuer": ISSUER, "audiences": [AUDIENCE]},
        "default_tier": "basic",
        "tiers": {
            "basic": {"quota": {"requests": 3, "window_seconds": 60}},
            "pro": {"quota": {"requests": 5, "window_seconds": 60}},
            "enterprise": {"burst": {"tokens_per_second": 1, "size": 4}}
        },
        "max_customers": 64,
        "token_cache_entries": 64,
        "forged_headers": ["x-veo-region"]
    });
    if let (Some(target), Value::Object(extra)) = (config.as_object_mut(), extra) {
        target.extend(extra);
    }
    config
}

/// Returns a `geo` section with four countries in three regions, a CDN
/// trusted from one IPv4 and one IPv6 range, and two path patterns. Asset
/// `a1` is locked to eu-west (and us-east for enterprise) and stored in
/// eu-west. Asset `a2` is locked to us-east and ap-southeast, without a
/// storage region.
pub fn geo_json() -> Value {
    json!({
        "geoip_header": "x-geoip-country",
        "cdn_country_header": "cf-ipcountry",
        "cdn_trusted_ranges": ["173.245.48.0/20", "2400:cb00::/32"],
        "countries": {"DE": "eu-west", "FR": "eu-west", "US": "us-east", "SG": "ap-southeast"},
        "asset_patterns": ["/videos/{asset}/", "/live/{asset}"],
        "assets": [
            {"asset": "a1", "allowed_regions": ["eu-west"],
             "tier_regions": {"enterprise": ["us-east"]}, "storage_region": "eu-west"},
            {"asset": "a2", "allowed_regions": ["us-east", "ap-southeast"]}
        ]
    })
}

/// Parses [`config_json`].
pub fn config(extra: Value) -> Config {
    Config::from_bytes(config_json(extra).to_string().as_bytes()).unwrap()
}

/// Returns valid claims for `customer` in `tier`, issued now, valid for an
/// hour.
pub fn claims(customer: &str, tier: Option<&str>) -> JWTClaims<Map<String, Value>> {
    let mut custom = Map::new();
    if let Some(tier) = tier {
        custom.insert("tier".to_owned(), json!(tier));
    }
    JWTClaims {
        issued_at: Some(UnixTimeStamp::from_secs(NOW_S)),
        expires_at: Some(UnixTimeStamp::from_secs(NOW_S + 3600)),
        invalid_before: Some(UnixTimeStamp::from_secs(NOW_S)),
        issuer: Some(ISSUER.to_owned()),
        subject: Some(customer.to_owned()),
        audiences: Some(Audiences::AsString(AUDIENCE.to_owned())),
        jwt_id: None,
        nonce: None,
        custom,
    }
}

/// Signs claims with the ES256 test key.
pub fn es256_token(claims: JWTClaims<Map<String, Value>>) -> String {
    keys().es256.sign(claims).unwrap()
}

/// Builds a token from a raw header, claims and signature bytes.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

/// Returns the claims of [`claims`] as JSON, as they appear in a token.
pub fn claims_json(customer: &str, tier: Option<&str>) -> Value {
    serde_json::to_value(claims(customer, tier)).unwrap()
}

/// One worker's filter on a [`MemoryHost`], with the test configuration.
pub struct Worker {
    /// The worker's host.
    pub host: MemoryHost,
    /// The worker's filter.
    pub filter: Rc<Filter>,
}

impl Worker {
    /// Creates a worker with [`config`] of no extra keys.
    pub fn new(host: MemoryHost) -> Self {
        Self::with_config(host, json!({}))
    }

    /// Creates a worker with [`config`] of `extra`.
    pub fn with_config(host: MemoryHost, extra: Value) -> Self {
        let filter = Rc::new(Filter::new(&host, config(extra), "veo_edge"));
        Self { host, filter }
    }

    /// Sends one request and returns its status: 200 when forwarded.
    pub fn send(&self, headers: &[(&str, &[u8])]) -> u32 {
        self.exchange(headers, &[])
    }

    /// Sends one request with a bearer token and returns its status.
    pub fn send_token(&self, token: &str) -> u32 {
        let header = format!("Bearer {token}");
        self.send(&[("authorization", header.as_bytes())])
    }

    /// Sends one request through a [`Stream`] as Envoy drives it and
    /// returns its status. The upstream of a forwarded request responds with
    /// a body in chunks of `chunk_sizes` bytes. A local reply's body passes
    /// the filter's response path too, as one chunk.
    pub fn exchange(&self, headers: &[(&str, &[u8])], chunk_sizes: &[usize]) -> u32 {
        self.host.start_request(headers);
        let mut stream = Stream::new(Rc::clone(&self.filter));
        let forwarded = stream.on_request_headers(&self.host);
        stream.on_response_headers(&self.host);
        let status = if forwarded {
            for &size in chunk_sizes {
                stream.on_response_body(size);
            }
            200
        } else {
            let reply = self.host.local_response().unwrap();
            stream.on_response_body(reply.body.len());
            reply.status
        };
        stream.on_log(&self.host);
        status
    }

    /// Returns the JSON body of the last local reply.
    pub fn reply_json(&self) -> Value {
        serde_json::from_str(self.host.local_response().unwrap().body_text()).unwrap()
    }

    /// Runs the worker's tick, then returns the counter named `name`.
    pub fn counter(&self, name: &str) -> u64 {
        self.filter.on_tick(&self.host);
        self.host.counter(name)
    }
}

/// One Envoy instance: the sync role on the main thread and one worker's
/// filter, sharing shared data and the usage queue.
pub struct Instance {
    /// The sync role's host.
    pub sync_host: MemoryHost,
    /// The sync role.
    pub sync: Sync,
    /// The worker's host.
    pub worker_host: MemoryHost,
    /// The worker's filter.
    pub filter: Rc<Filter>,
}

impl Instance {
    /// Creates an instance with [`config`] of no extra keys.
    pub fn new() -> Self {
        Self::with_config(json!({}))
    }

    /// Creates an instance with the `geo` section of [`geo_json`].
    pub fn with_geo() -> Self {
        Self::with_config(json!({"geo": geo_json()}))
    }

    /// Creates an instance with [`config`] of `extra`.
    pub fn with_config(extra: Value) -> Self {
        let sync_host = MemoryHost::new(NOW_S * 1000);
        let queue_id = sync_host
            .register_shared_queue(crate::usage::QUEUE_NAME)
            .unwrap();
        let worker_host = sync_host.worker();
        let filter = Rc::new(Filter::new(&worker_host, config(extra.clone()), "veo_edge"));
        let tiers = filter.config().tiers.clone();
        let settings = SidecarSettings {
            cluster: "veo_sidecar".to_owned(),
            sync_interval: Duration::from_millis(100),
            timeout: Duration::from_millis(50),
            max_backlog_records: 1_000,
        };
        let metrics = Metrics::define(&sync_host, &tiers);
        let sync = Sync::new(
            settings,
            "node-1/abcd".to_owned(),
            queue_id,
            metrics,
            tiers,
            Limiter::new(filter.config().max_customers),
            config(extra).geo,
        );
        Self {
            sync_host,
            sync,
            worker_host,
            filter,
        }
    }

    /// Sends `count` requests of `customer` and returns how many were
    /// forwarded.
    pub fn requests(&self, customer: &str, count: usize) -> usize {
        let header = format!("Bearer {}", es256_token(claims(customer, None)));
        (0..count)
            .filter(|_| {
                self.worker_host
                    .start_request(&[("authorization", header.as_bytes())]);
                matches!(
                    self.filter.on_request_headers(&self.worker_host),
                    RequestOutcome::Forward { .. }
                )
            })
            .count()
    }

    /// Sends one request of `customer` with the tier claim `tier`
    /// whose response body comes in chunks of `chunk_sizes` bytes;
    /// returns whether it was forwarded.
    pub fn exchange(&self, customer: &str, tier: Option<&str>, chunk_sizes: &[usize]) -> bool {
        let header = format!("Bearer {}", es256_token(claims(customer, tier)));
        self.worker_host
            .start_request(&[("authorization", header.as_bytes())]);
        let mut stream = Stream::new(Rc::clone(&self.filter));
        let forwarded = stream.on_request_headers(&self.worker_host);
        stream.on_response_headers(&self.worker_host);
        if forwarded {
            for &size in chunk_sizes {
                stream.on_response_body(size);
            }
        }
        stream.on_log(&self.worker_host);
        forwarded
    }

    /// Returns the tier the upstream saw on the last forwarded request.
    pub fn forwarded_tier(&self) -> Option<String> {
        self.worker_host.request_header_text("x-veo-tier")
    }

    /// Returns the token and request of the last gRPC call.
    pub fn last_call(&self) -> (u32, SyncRequest) {
        let call = self.sync_host.grpc_calls().pop().unwrap();
        (
            call.token,
            SyncRequest::decode(call.message.as_slice()).unwrap(),
        )
    }

    /// Hands the sync role a successful reply to the call `token`.
    pub fn reply(&mut self, token: u32, reply: &SyncResponse) {
        let body = reply.encode_to_vec();
        self.sync
            .on_response(&self.sync_host, token, 0, None, Some(&body));
    }
}
