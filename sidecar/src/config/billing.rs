//! The `[billing]` table, the HTTP listener and the Stripe settings from
//! flags and the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, Origin};
use crate::billing::biller::BillingSettings;
use crate::billing::sink::MeterNames;
use crate::cli::Flags;

/// HTTP address served when neither the file nor `--http-listen` sets one.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:50052";
/// Default interval between billing rounds, in seconds.
pub const DEFAULT_SYNC_INTERVAL_SECONDS: i64 = 60;
/// Default delay after a minute ends before it is billed, in seconds.
pub const DEFAULT_CLOSE_DELAY_SECONDS: i64 = 5;
/// Default cap on meter events per second: Stripe's live-mode limit for
/// the Billing Meter Events API.
pub const DEFAULT_MAX_EVENTS_PER_SECOND: i64 = 1_000;
/// Default number of requests to Stripe in flight at once.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: i64 = 8;
/// Default tolerance of a webhook signature's timestamp, in seconds.
pub const DEFAULT_WEBHOOK_TOLERANCE_SECONDS: i64 = 300;
/// Default interval of the reconciliation job, in seconds (one day).
pub const DEFAULT_RECONCILE_INTERVAL_SECONDS: i64 = 86_400;
/// Default `billing.summary_settle_seconds`: 10 minutes.
pub const DEFAULT_SUMMARY_SETTLE_SECONDS: i64 = 600;
/// File name of the outbox file in the data directory.
pub const OUTBOX_FILE: &str = "meter_events.jsonl";

/// The `[billing]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileBilling {
    region: Option<String>,
    http_listen: Option<String>,
    http_ready_file: Option<PathBuf>,
    sync_interval_seconds: Option<i64>,
    close_delay_seconds: Option<i64>,
    max_events_per_second: Option<i64>,
    max_concurrent_requests: Option<i64>,
    outbox_file: Option<PathBuf>,
    reconcile_interval_seconds: Option<i64>,
    summary_settle_seconds: Option<i64>,
    meter_event_names: Option<FileMeterNames>,
    webhook_secrets: Option<Vec<String>>,
    webhook_tolerance_seconds: Option<i64>,
    canceled_tier: Option<String>,
    prices: Option<BTreeMap<String, String>>,
    customer_usage_metrics: Option<bool>,
    prometheus_url: Option<String>,
}

/// The `[billing.meter_event_names]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMeterNames {
    api_requests: Option<String>,
    egress_bytes: Option<String>,
}

/// Stripe API access.
#[derive(Clone)]
pub struct StripeAccess {
    /// Secret key; never logged.
    pub api_key: String,
    /// Base URL, `None` for Stripe's own.
    pub api_base: Option<String>,
}

impl std::fmt::Debug for StripeAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeAccess")
            .field("api_key", &"<redacted>")
            .field("api_base", &self.api_base)
            .finish()
    }
}

/// Webhook settings.
#[derive(Clone, Default)]
pub struct WebhookConfig {
    /// Signing secrets. With none, the endpoint rejects every delivery
    /// with 500, so Stripe keeps retrying until a secret is set.
    pub secrets: Vec<String>,
    /// Accepted distance of a signature's timestamp from now.
    pub tolerance: Duration,
    /// Stripe price or product id to tier.
    pub price_tiers: BTreeMap<String, String>,
    /// Tier of a customer whose subscription ended.
    pub canceled_tier: String,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("tolerance", &self.tolerance)
            .field("price_tiers", &self.price_tiers)
            .field("canceled_tier", &self.canceled_tier)
            .finish()
    }
}

/// Validated billing configuration.
#[derive(Debug, Clone)]
pub struct BillingConfig {
    /// Billing loop settings.
    pub settings: BillingSettings,
    /// HTTP address for webhooks and metrics.
    pub http_listen: SocketAddr,
    /// File that receives the bound HTTP address.
    pub http_ready_file: Option<PathBuf>,
    /// Stripe access; `None` writes the outbox file instead.
    pub stripe: Option<StripeAccess>,
    /// Webhook settings.
    pub webhook: WebhookConfig,
    /// Interval of the reconciliation job; `None` turns it off.
    pub reconcile_interval: Option<Duration>,
}

pub(super) fn billing_config(
    file: Option<FileBilling>,
    origin: &Origin,
    flags: &Flags,
    data_dir: &Path,
) -> Result<BillingConfig, ConfigError> {
    let file = file.unwrap_or_default();
    let invalid = |key: &'static str, value: String, reason: &str| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        value,
        reason: reason.to_owned(),
    };
    let int =
        |key: &'static str, value: Option<i64>, default: i64, min: i64, max: i64, unit: &str| {
            let value = value.unwrap_or(default);
            if (min..=max).contains(&value) {
                Ok(value)
            } else {
                Err(ConfigError::Invalid {
                    origin: origin.clone(),
                    key,
                    value: value.to_string(),
                    reason: format!("must be between {min} and {max} {unit}"),
                })
            }
        };

    let region = file.region.unwrap_or_else(|| "local".into());
    let region_ok = !region.is_empty()
        && region.len() <= 32
        && region
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-');
    if !region_ok {
        return Err(invalid(
            "billing.region",
            format!("{region:?}"),
            "must be 1 to 32 characters of a-z, 0-9 and `-`, such as eu-west",
        ));
    }

    let (http_text, http_origin) = match (&flags.http_listen, file.http_listen) {
        (Some(text), _) => (text.clone(), Origin::Flag("--http-listen")),
        (None, Some(text)) => (text, origin.clone()),
        (None, None) => (DEFAULT_HTTP_LISTEN.to_owned(), Origin::Default),
    };
    let http_listen: SocketAddr = http_text.parse().map_err(|_| ConfigError::Invalid {
        origin: http_origin,
        key: "billing.http_listen",
        value: format!("{http_text:?}"),
        reason: "expected IP:PORT such as 127.0.0.1:50052 (port 0 picks a free port)".into(),
    })?;
    let http_ready_file = flags.http_ready_file.clone().or(file.http_ready_file);

    let names = match file.meter_event_names {
        Some(names) => MeterNames {
            api_requests: names
                .api_requests
                .unwrap_or_else(|| MeterNames::default().api_requests),
            egress_bytes: names
                .egress_bytes
                .unwrap_or_else(|| MeterNames::default().egress_bytes),
        },
        None => MeterNames::default(),
    };
    if names.api_requests == names.egress_bytes {
        return Err(invalid(
            "billing.meter_event_names",
            format!("{:?}", names.api_requests),
            "the two meters need different Stripe event names, or their usage is summed",
        ));
    }
    for name in [&names.api_requests, &names.egress_bytes] {
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(invalid(
                "billing.meter_event_names",
                format!("{name:?}"),
                "Stripe event names are 1 to 100 printable characters",
            ));
        }
    }

    let interval = int(
        "billing.sync_interval_seconds",
        file.sync_interval_seconds,
        DEFAULT_SYNC_INTERVAL_SECONDS,
        1,
        86_400,
        "seconds",
    )?;
    let close_delay = int(
        "billing.close_delay_seconds",
        file.close_delay_seconds,
        DEFAULT_CLOSE_DELAY_SECONDS,
        0,
        3_600,
        "seconds",
    )?;
    let summary_settle = int(
        "billing.summary_settle_seconds",
        file.summary_settle_seconds,
        DEFAULT_SUMMARY_SETTLE_SECONDS,
        0,
        86_400,
        "seconds",
    )?;
    let rate = int(
        "billing.max_events_per_second",
        file.max_events_per_second,
        DEFAULT_MAX_EVENTS_PER_SECOND,
        1,
        10_000,
        "events per second",
    )?;
    let concurrency = int(
        "billing.max_concurrent_requests",
        file.max_concurrent_requests,
        DEFAULT_MAX_CONCURRENT_REQUESTS,
        1,
        256,
        "requests",
    )?;
    let tolerance = int(
        "billing.webhook_tolerance_seconds",
        file.webhook_tolerance_seconds,
        DEFAULT_WEBHOOK_TOLERANCE_SECONDS,
        1,
        3_600,
        "seconds",
    )?;
    let reconcile = int(
        "billing.reconcile_interval_seconds",
        file.reconcile_interval_seconds,
        DEFAULT_RECONCILE_INTERVAL_SECONDS,
        0,
        30 * 86_400,
        "seconds; 0 turns the job off",
    )?;

    let stripe = stripe_access(flags)?;

    let secrets: Vec<String> = match &flags.stripe_webhook_secret {
        Some(text) => {
            let secrets: Vec<String> = text
                .split(',')
                .map(|secret| secret.trim().to_owned())
                .filter(|secret| !secret.is_empty())
                .collect();
            if secrets.is_empty() {
                return Err(ConfigError::Invalid {
                    origin: Origin::Flag("--stripe-webhook-secret or STRIPE_WEBHOOK_SECRET"),
                    key: "STRIPE_WEBHOOK_SECRET",
                    value: "<redacted>".into(),
                    reason: "contains no secret; give the endpoint's whsec_ secret or unset it"
                        .into(),
                });
            }
            check_secrets(
                &secrets,
                Origin::Flag("--stripe-webhook-secret or STRIPE_WEBHOOK_SECRET"),
            )?;
            secrets
        }
        None => {
            let secrets = file.webhook_secrets.unwrap_or_default();
            check_secrets(&secrets, origin.clone())?;
            secrets
        }
    };

    let canceled_tier = file.canceled_tier.unwrap_or_else(|| "basic".into());
    if !is_tier_name(&canceled_tier) {
        return Err(invalid(
            "billing.canceled_tier",
            format!("{canceled_tier:?}"),
            "tier names are 1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`",
        ));
    }
    let price_tiers = file.prices.unwrap_or_default();
    for (price, tier) in &price_tiers {
        let id_ok = (price.starts_with("price_") || price.starts_with("prod_"))
            && price
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        if !id_ok || !is_tier_name(tier) {
            return Err(invalid(
                "billing.prices",
                format!("{price:?} = {tier:?}"),
                "map a Stripe price id (price_...) or product id (prod_...) to a tier name of \
                 1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`",
            ));
        }
    }

    let prometheus_url = file
        .prometheus_url
        .map(|url| {
            prometheus_url(&url).map_err(|reason| {
                invalid(
                    "billing.prometheus_url",
                    format!("{:?}", without_credentials(&url)),
                    reason,
                )
            })
        })
        .transpose()?;
    let customer_usage_metrics = file.customer_usage_metrics.unwrap_or(false);
    if let Some(url) = &prometheus_url
        && !customer_usage_metrics
    {
        return Err(invalid(
            "billing.prometheus_url",
            format!("{url:?}"),
            "reconciliation reads veo_customer_usage_total, which only \
             billing.customer_usage_metrics = true exports; set it too",
        ));
    }

    if let Some(path) = &file.outbox_file
        && let Some(reason) = outbox_file_problem(path)
    {
        return Err(invalid(
            "billing.outbox_file",
            format!("{:?}", path.display().to_string()),
            reason,
        ));
    }

    Ok(BillingConfig {
        settings: BillingSettings {
            region,
            interval: Duration::from_secs(interval.unsigned_abs()),
            close_delay: Duration::from_secs(close_delay.unsigned_abs()),
            summary_settle_s: summary_settle,
            max_events_per_second: u32::try_from(rate).unwrap_or(1),
            max_concurrent_requests: usize::try_from(concurrency).unwrap_or(1),
            retry_base: Duration::from_millis(500),
            retry_cap: Duration::from_secs(60),
            names,
            outbox_path: file
                .outbox_file
                .unwrap_or_else(|| data_dir.join(OUTBOX_FILE)),
            customer_usage_metrics,
            prometheus_url,
        },
        http_listen,
        http_ready_file,
        stripe,
        webhook: WebhookConfig {
            secrets,
            tolerance: Duration::from_secs(tolerance.unsigned_abs()),
            price_tiers,
            canceled_tier,
        },
        reconcile_interval: (reconcile > 0).then(|| Duration::from_secs(reconcile.unsigned_abs())),
    })
}

/// Returns why `path` cannot be the outbox file, or `None` when it can.
/// The sidecar writes meter events to it and replaces it as a whole.
fn outbox_file_problem(path: &std::path::Path) -> Option<&'static str> {
    if path.as_os_str().is_empty() {
        return Some(
            "must be the path of a file; remove the key to use meter_events.jsonl in the data directory",
        );
    }
    if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Some("must end with a file name, not a directory");
    }
    if path.is_dir() {
        return Some(
            "is a directory; give the path of a file in it, such as DIR/meter_events.jsonl",
        );
    }
    None
}

/// Checks the base URL of a Prometheus server: `http` or `https`, a host,
/// and no query or fragment. Returns it without a trailing `/`.
fn prometheus_url(url: &str) -> Result<String, &'static str> {
    const REASON: &str = "must be the http:// or https:// base URL of the Prometheus server \
                          that scrapes this sidecar, with a host and no credentials, query or \
                          fragment, such as http://prometheus:9090";
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or(REASON)?;
    let host = rest.split('/').next().unwrap_or_default();
    // Credentials in the URL would be logged with every error.
    let valid = !host.is_empty()
        && !host.contains('@')
        && url.len() <= 2_048
        && url
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && !b"?#\"\\".contains(&byte));
    if valid {
        Ok(url.trim_end_matches('/').to_owned())
    } else {
        Err(REASON)
    }
}

/// Returns `url` with anything before an `@` in its host part replaced by
/// `***`, so that an error never shows a password.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((_, host)) if scheme.is_empty() => format!("***@{host}{path}"),
        Some((_, host)) => format!("{scheme}://***@{host}{path}"),
        None => url.to_owned(),
    }
}

/// Returns whether `name` is a valid tier name, as in `[tiers.<name>]`.
pub fn is_tier_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-')
}

/// Reads the Stripe key and base URL from the flags or the environment.
fn stripe_access(flags: &Flags) -> Result<Option<StripeAccess>, ConfigError> {
    let key_error = |reason: &str| ConfigError::Invalid {
        origin: Origin::Flag("--stripe-api-key or STRIPE_API_KEY"),
        key: "STRIPE_API_KEY",
        value: "<redacted>".into(),
        reason: reason.to_owned(),
    };
    let base = match flags.stripe_api_base.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(base) => Some(check_api_base(base)?),
    };
    let key = match flags.stripe_api_key.as_deref().map(str::trim) {
        None | Some("") => {
            if base.is_some() {
                return Err(ConfigError::Invalid {
                    origin: Origin::Flag("--stripe-api-base or STRIPE_API_BASE"),
                    key: "STRIPE_API_BASE",
                    value: base.unwrap_or_default(),
                    reason: "is set without STRIPE_API_KEY; set the key too, or unset the base \
                             to write meter events to the outbox file"
                        .into(),
                });
            }
            return Ok(None);
        }
        Some(key) => key,
    };
    if !(key.starts_with("sk_") || key.starts_with("rk_")) {
        return Err(key_error(
            "Stripe secret keys start with sk_ (or rk_ for restricted keys)",
        ));
    }
    if !key.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(key_error(
            "contains a space, control or non-ASCII character; copy the key again",
        ));
    }
    Ok(Some(StripeAccess {
        api_key: key.to_owned(),
        api_base: base,
    }))
}

/// Checks a Stripe API base URL and returns it ending in `/`, the form the
/// client appends `v1/...` to.
fn check_api_base(base: &str) -> Result<String, ConfigError> {
    let invalid = |reason: &str| ConfigError::Invalid {
        origin: Origin::Flag("--stripe-api-base or STRIPE_API_BASE"),
        key: "STRIPE_API_BASE",
        value: format!("{base:?}"),
        reason: reason.to_owned(),
    };
    let rest = base
        .strip_prefix("https://")
        .or_else(|| base.strip_prefix("http://"))
        .ok_or_else(|| invalid("must start with https:// or http://"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.chars().any(char::is_whitespace) {
        return Err(invalid("must name a host, such as https://api.stripe.com/"));
    }
    let trimmed = base.trim_end_matches('/');
    if trimmed.ends_with("/v1") || trimmed.contains("/v1/") {
        return Err(invalid(
            "must not contain /v1, which the client adds; use the server root such as \
             http://127.0.0.1:12111/",
        ));
    }
    Ok(format!("{trimmed}/"))
}

fn check_secrets(secrets: &[String], origin: Origin) -> Result<(), ConfigError> {
    if secrets.len() > 2 {
        return Err(ConfigError::Invalid {
            origin,
            key: "billing.webhook_secrets",
            value: format!("{} secrets", secrets.len()),
            reason: "give one signing secret, or two while rotating".into(),
        });
    }
    if secrets.iter().any(|secret| {
        !secret.starts_with("whsec_") || !secret.bytes().all(|byte| byte.is_ascii_graphic())
    }) {
        return Err(ConfigError::Invalid {
            origin,
            key: "billing.webhook_secrets",
            value: "<redacted>".into(),
            reason: "Stripe webhook signing secrets start with whsec_ and hold no spaces".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(key: Option<&str>, base: Option<&str>) -> Flags {
        Flags {
            stripe_api_key: key.map(str::to_owned),
            stripe_api_base: base.map(str::to_owned),
            ..Flags::default()
        }
    }

    #[test]
    fn outbox_file_must_name_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let directory = dir.path().join("events");
        std::fs::create_dir(&directory).unwrap();

        let reason = outbox_file_problem(&directory).unwrap();
        assert!(reason.starts_with("is a directory"), "{reason}");
        let reason = outbox_file_problem(std::path::Path::new("")).unwrap();
        assert!(reason.starts_with("must be the path of a file"), "{reason}");
        let reason = outbox_file_problem(std::path::Path::new("events/")).unwrap();
        assert!(reason.starts_with("must end with a file name"), "{reason}");
        assert_eq!(
            outbox_file_problem(&directory.join("meter_events.jsonl")),
            None
        );
    }

    #[test]
    fn api_base_is_normalised() {
        assert_eq!(
            check_api_base("http://127.0.0.1:1").unwrap(),
            "http://127.0.0.1:1/"
        );
        assert_eq!(
            check_api_base("https://api.stripe.com/").unwrap(),
            "https://api.stripe.com/"
        );
    }

    #[test]
    fn api_base_mistakes_are_named() {
        for base in [
            "ftp://x/",
            "not a url",
            "http://",
            "http://h/v1",
            "http://h/v1/",
        ] {
            let err = check_api_base(base).unwrap_err().to_string();
            assert!(err.contains("STRIPE_API_BASE"), "{base}: {err}");
        }
    }

    #[test]
    fn key_must_be_a_secret_key() {
        assert!(
            stripe_access(&flags(Some("sk_test_1"), None))
                .unwrap()
                .is_some()
        );
        assert!(stripe_access(&flags(Some("pk_test_1"), None)).is_err());
        assert!(stripe_access(&flags(Some("sk_test_\u{7}x"), None)).is_err());
        assert!(stripe_access(&flags(None, None)).unwrap().is_none());
    }

    #[test]
    fn prices_need_stripe_ids_and_tier_names() {
        let origin = Origin::Default;
        let data_dir = Path::new("/tmp");
        for prices in ["sub_123 = 'basic'", "price_1 = ''", "price_1 = 'pro '"] {
            let text = format!("[prices]\n{prices}\n");
            let file: FileBilling = toml::from_str(&text).unwrap();
            let err = billing_config(Some(file), &origin, &Flags::default(), data_dir).unwrap_err();
            assert!(
                err.to_string().contains("billing.prices"),
                "{prices}: {err}"
            );
        }
        let file: FileBilling = toml::from_str("[prices]\nprice_1 = 'pro'\n").unwrap();
        assert!(billing_config(Some(file), &origin, &Flags::default(), data_dir).is_ok());
    }

    #[test]
    fn base_without_key_is_rejected() {
        let err = stripe_access(&flags(None, Some("http://127.0.0.1:1/"))).unwrap_err();
        assert!(err.to_string().contains("without STRIPE_API_KEY"), "{err}");
    }

    #[test]
    fn key_error_never_shows_the_key() {
        let err = stripe_access(&flags(Some("pk_live_zq7x"), None)).unwrap_err();
        assert!(!err.to_string().contains("zq7x"), "{err}");
    }

    #[test]
    fn prometheus_settings_are_read() {
        let data_dir = Path::new("/tmp");
        let file: FileBilling = toml::from_str(
            "customer_usage_metrics = true\nprometheus_url = 'https://prom.example:9090/'\n",
        )
        .unwrap();
        let config =
            billing_config(Some(file), &Origin::Default, &Flags::default(), data_dir).unwrap();
        assert!(config.settings.customer_usage_metrics);
        assert_eq!(
            config.settings.prometheus_url.as_deref(),
            Some("https://prom.example:9090")
        );
        let defaults = billing_config(None, &Origin::Default, &Flags::default(), data_dir).unwrap();
        assert!(!defaults.settings.customer_usage_metrics);
        assert_eq!(defaults.settings.prometheus_url, None);
    }

    #[test]
    fn prometheus_url_mistakes_are_named() {
        let data_dir = Path::new("/tmp");
        for url in [
            "prom:9090",
            "ftp://prom/",
            "http://",
            "http://prom:9090/api?x=1",
            "http://prom 9090",
            "http://prom/#top",
            "http://user:secret@prom:9090",
        ] {
            let text = format!("customer_usage_metrics = true\nprometheus_url = {url:?}\n");
            let file: FileBilling = toml::from_str(&text).unwrap();
            let err = billing_config(Some(file), &Origin::Default, &Flags::default(), data_dir)
                .unwrap_err()
                .to_string();
            assert!(err.contains("billing.prometheus_url"), "{url}: {err}");
            assert!(err.contains("http://prometheus:9090"), "{url}: {err}");
        }
        let file: FileBilling = toml::from_str(
            "customer_usage_metrics = true\nprometheus_url = 'http://user:pw@prom:9090/x'\n",
        )
        .unwrap();
        let err = billing_config(Some(file), &Origin::Default, &Flags::default(), data_dir)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("pw"), "{err}");
        assert!(err.contains("http://***@prom:9090/x"), "{err}");
        let file: FileBilling = toml::from_str("prometheus_url = 'http://prom:9090'\n").unwrap();
        let err = billing_config(Some(file), &Origin::Default, &Flags::default(), data_dir)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("billing.customer_usage_metrics = true"),
            "{err}"
        );
    }
}
