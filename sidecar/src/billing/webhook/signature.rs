//! Verification of the `Stripe-Signature` header over the raw request body.
//!
//! The header is `t=<unix s>,v1=<hex>[,v1=<hex>…][,v0=…]`. Each `v1` is the
//! hex HMAC-SHA256 of `"<t>.<raw body>"` keyed with an endpoint signing
//! secret (the whole `whsec_…` string), and Stripe sends one `v1` per active
//! secret while a secret is being rotated.

use std::time::Duration;

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Name of the header that carries the signature.
pub(super) const SIGNATURE_HEADER: &str = "stripe-signature";

/// Maximum number of `v1` entries accepted in one header, which bounds the
/// HMAC work an unauthenticated request can cause.
const MAX_V1_SIGNATURES: usize = 16;

/// Length of an HMAC-SHA256 output in bytes.
const SIGNATURE_LEN: usize = 32;

/// Reason a delivery was rejected with 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The request has no `Stripe-Signature` header.
    MissingHeader,
    /// The header is not valid UTF-8, is repeated, has no single integer
    /// `t`, has an entry without `=`, or a `v1` that is not 64 hex digits.
    MalformedHeader,
    /// The header carries no `v1` signature.
    NoV1Signature,
    /// No `v1` signature matches any configured signing secret.
    SignatureMismatch,
    /// The signature matches, but `t` is further from now than the tolerance.
    TimestampOutsideTolerance,
    /// The signature is valid, but the body is not an event this endpoint
    /// can read.
    InvalidPayload,
    /// The body is larger than the endpoint accepts, so it was not read.
    BodyTooLarge,
}

impl RejectReason {
    /// Every reason, for example to export one counter per reason.
    pub const ALL: [RejectReason; 7] = [
        RejectReason::MissingHeader,
        RejectReason::MalformedHeader,
        RejectReason::NoV1Signature,
        RejectReason::SignatureMismatch,
        RejectReason::TimestampOutsideTolerance,
        RejectReason::InvalidPayload,
        RejectReason::BodyTooLarge,
    ];

    /// Short snake_case name, used in log lines and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::MissingHeader => "missing_header",
            RejectReason::MalformedHeader => "malformed_header",
            RejectReason::NoV1Signature => "no_v1_signature",
            RejectReason::SignatureMismatch => "signature_mismatch",
            RejectReason::TimestampOutsideTolerance => "timestamp_outside_tolerance",
            RejectReason::InvalidPayload => "invalid_payload",
            RejectReason::BodyTooLarge => "body_too_large",
        }
    }

    /// Message for the response body. It never contains a secret or an
    /// expected signature.
    pub fn message(self) -> &'static str {
        match self {
            RejectReason::MissingHeader => "missing Stripe-Signature header",
            RejectReason::MalformedHeader => "malformed Stripe-Signature header",
            RejectReason::NoV1Signature => "no v1 signature in the Stripe-Signature header",
            RejectReason::SignatureMismatch => "no v1 signature matches a signing secret",
            RejectReason::TimestampOutsideTolerance => {
                "signature timestamp is outside the tolerance; check the clock"
            }
            RejectReason::InvalidPayload => "body is not a valid Stripe event",
            RejectReason::BodyTooLarge => {
                "body is larger than 1 MiB; Stripe's events are far smaller, so check the sender"
            }
        }
    }

    /// Position of the reason in [`RejectReason::ALL`].
    pub(super) fn index(self) -> usize {
        match self {
            RejectReason::MissingHeader => 0,
            RejectReason::MalformedHeader => 1,
            RejectReason::NoV1Signature => 2,
            RejectReason::SignatureMismatch => 3,
            RejectReason::TimestampOutsideTolerance => 4,
            RejectReason::InvalidPayload => 5,
            RejectReason::BodyTooLarge => 6,
        }
    }
}

/// Parsed `Stripe-Signature` header.
#[derive(Debug)]
struct SignatureHeader<'a> {
    /// The `t` value exactly as sent, because it is part of the signed text.
    timestamp_text: &'a str,
    timestamp_unix_s: i64,
    v1: Vec<[u8; SIGNATURE_LEN]>,
}

impl<'a> SignatureHeader<'a> {
    fn parse(value: &'a str) -> Result<SignatureHeader<'a>, RejectReason> {
        let mut timestamp = None;
        let mut v1 = Vec::new();

        for entry in value.split(',') {
            let (key, entry_value) = entry
                .trim()
                .split_once('=')
                .ok_or(RejectReason::MalformedHeader)?;
            match key {
                "t" => {
                    if timestamp.is_some() {
                        return Err(RejectReason::MalformedHeader);
                    }
                    timestamp = Some((entry_value, parse_timestamp(entry_value)?));
                }
                "v1" => {
                    if v1.len() == MAX_V1_SIGNATURES {
                        return Err(RejectReason::MalformedHeader);
                    }
                    let mut signature = [0_u8; SIGNATURE_LEN];
                    hex::decode_to_slice(entry_value, &mut signature)
                        .map_err(|_| RejectReason::MalformedHeader)?;
                    v1.push(signature);
                }
                // Other schemes, such as the test-mode `v0`, are not verified.
                _ => {}
            }
        }

        let (timestamp_text, timestamp_unix_s) = timestamp.ok_or(RejectReason::MalformedHeader)?;
        Ok(SignatureHeader {
            timestamp_text,
            timestamp_unix_s,
            v1,
        })
    }
}

/// Parses `t`, which must be decimal digits only (no sign, no spaces).
fn parse_timestamp(text: &str) -> Result<i64, RejectReason> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(RejectReason::MalformedHeader);
    }
    text.parse().map_err(|_| RejectReason::MalformedHeader)
}

/// Verifies the delivery's signature against every secret in `secrets`, in
/// constant time per comparison, and then its timestamp against
/// `now_unix_s` within `tolerance` in both directions.
pub(super) fn verify(
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[String],
    tolerance: Duration,
    now_unix_s: i64,
) -> Result<(), RejectReason> {
    let mut values = headers.get_all(SIGNATURE_HEADER).iter();
    let value = values.next().ok_or(RejectReason::MissingHeader)?;
    if values.next().is_some() {
        return Err(RejectReason::MalformedHeader);
    }
    let value = value.to_str().map_err(|_| RejectReason::MalformedHeader)?;

    let header = SignatureHeader::parse(value)?;
    if header.v1.is_empty() {
        return Err(RejectReason::NoV1Signature);
    }
    if !matches_any_secret(&header, body, secrets) {
        return Err(RejectReason::SignatureMismatch);
    }

    // Checked after the signature, so that a log line reports the timestamp
    // only for a genuine but delayed or replayed delivery.
    if now_unix_s.abs_diff(header.timestamp_unix_s) > tolerance.as_secs() {
        return Err(RejectReason::TimestampOutsideTolerance);
    }
    Ok(())
}

fn matches_any_secret(header: &SignatureHeader<'_>, body: &[u8], secrets: &[String]) -> bool {
    for secret in secrets {
        // HMAC takes keys of any length, and hmac 0.12 returns no error for any.
        let Ok(mut mac) = HmacSha256::new_from_slice(secret.as_bytes()) else {
            continue;
        };
        mac.update(header.timestamp_text.as_bytes());
        mac.update(b".");
        mac.update(body);

        for signature in &header.v1 {
            if mac.clone().verify_slice(signature).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Computes the `Stripe-Signature` header value Stripe would send for
/// `body` at `timestamp_unix_s`, signed with each of `secrets`.
#[cfg(test)]
pub(super) fn sign(body: &[u8], timestamp_unix_s: i64, secrets: &[&str]) -> String {
    let mut header = format!("t={timestamp_unix_s}");
    for secret in secrets {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{timestamp_unix_s}.").as_bytes());
        mac.update(body);
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac.finalize().into_bytes()));
    }
    header
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    const SECRET: &str = "whsec_test_primary";
    const NOW: i64 = 1_700_000_000;
    const TOLERANCE: Duration = Duration::from_secs(300);
    const BODY: &[u8] = br#"{"id":"evt_1","type":"customer.updated"}"#;

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(SIGNATURE_HEADER, HeaderValue::from_str(value).unwrap());
        headers
    }

    fn check(value: &str) -> Result<(), RejectReason> {
        verify(&headers(value), BODY, &[SECRET.to_owned()], TOLERANCE, NOW)
    }

    #[test]
    fn valid_signature_is_accepted() {
        assert_eq!(check(&sign(BODY, NOW, &[SECRET])), Ok(()));
    }

    #[test]
    fn missing_header_is_rejected() {
        let result = verify(&HeaderMap::new(), BODY, &[SECRET.into()], TOLERANCE, NOW);

        assert_eq!(result, Err(RejectReason::MissingHeader));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let valid = sign(BODY, NOW, &[SECRET]);
        let v1 = valid.split_once(",v1=").unwrap().1;
        let cases = [
            String::new(),
            "garbage".to_owned(),
            format!("v1={v1}"),
            format!("t=,v1={v1}"),
            format!("t=-{NOW},v1={v1}"),
            format!("t=+{NOW},v1={v1}"),
            format!("t=1e9,v1={v1}"),
            format!("t=99999999999999999999,v1={v1}"),
            format!("t={NOW},t={NOW},v1={v1}"),
            format!("t={NOW},v1=zz{}", &v1[2..]),
            format!("t={NOW},v1={}", &v1[2..]),
            format!("t={NOW},v1"),
        ];

        for case in cases {
            assert_eq!(
                check(&case),
                Err(RejectReason::MalformedHeader),
                "header {case:?}"
            );
        }
    }

    #[test]
    fn repeated_header_is_rejected() {
        let value = HeaderValue::from_str(&sign(BODY, NOW, &[SECRET])).unwrap();
        let mut headers = HeaderMap::new();
        headers.append(SIGNATURE_HEADER, value.clone());
        headers.append(SIGNATURE_HEADER, value);

        let result = verify(&headers, BODY, &[SECRET.into()], TOLERANCE, NOW);

        assert_eq!(result, Err(RejectReason::MalformedHeader));
    }

    #[test]
    fn header_without_v1_is_rejected() {
        assert_eq!(
            check(&format!("t={NOW},v0=abcd")),
            Err(RejectReason::NoV1Signature)
        );
    }

    #[test]
    fn too_many_v1_are_rejected() {
        let secrets = [SECRET; MAX_V1_SIGNATURES + 1];

        assert_eq!(
            check(&sign(BODY, NOW, &secrets)),
            Err(RejectReason::MalformedHeader)
        );
    }

    #[test]
    fn wrong_secret_is_rejected() {
        assert_eq!(
            check(&sign(BODY, NOW, &["whsec_other"])),
            Err(RejectReason::SignatureMismatch)
        );
    }

    #[test]
    fn one_matching_v1_among_several_is_accepted() {
        let header = sign(BODY, NOW, &["whsec_old", SECRET, "whsec_other"]);

        assert_eq!(check(&header), Ok(()));
    }

    #[test]
    fn second_secret_is_accepted() {
        let secrets = ["whsec_old".to_owned(), SECRET.to_owned()];
        let value = sign(BODY, NOW, &[SECRET]);

        let result = verify(&headers(&value), BODY, &secrets, TOLERANCE, NOW);

        assert_eq!(result, Ok(()));
    }

    #[test]
    fn signature_over_timestamp_text_is_checked() {
        // Same number, other digits: the signed text differs.
        let value = sign(BODY, NOW, &[SECRET]).replacen("t=", "t=0", 1);

        assert_eq!(check(&value), Err(RejectReason::SignatureMismatch));
    }

    #[test]
    fn changed_body_is_rejected() {
        let value = sign(BODY, NOW, &[SECRET]);
        for index in 0..BODY.len() {
            let mut body = BODY.to_vec();
            body[index] ^= 1;

            let result = verify(&headers(&value), &body, &[SECRET.into()], TOLERANCE, NOW);

            assert_eq!(result, Err(RejectReason::SignatureMismatch), "byte {index}");
        }
    }

    #[test]
    fn timestamps_beyond_tolerance_are_rejected() {
        for timestamp in [NOW - 301, NOW + 301, 0] {
            assert_eq!(
                check(&sign(BODY, timestamp, &[SECRET])),
                Err(RejectReason::TimestampOutsideTolerance),
                "t={timestamp}"
            );
        }
    }

    #[test]
    fn timestamps_within_tolerance_are_accepted() {
        for timestamp in [NOW - 300, NOW - 1, NOW + 1, NOW + 300] {
            assert_eq!(
                check(&sign(BODY, timestamp, &[SECRET])),
                Ok(()),
                "t={timestamp}"
            );
        }
    }

    #[test]
    fn reasons_match_their_index() {
        for (index, reason) in RejectReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), index, "{reason:?}");
        }
    }
}
