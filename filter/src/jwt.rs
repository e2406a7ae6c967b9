//! Bearer-token verification with jwt-simple: key chosen by `kid`,
//! algorithm pinned by the key, `exp` required, `nbf`, `iat`, `iss` and
//! `aud` checked against the host's clock with a configurable leeway.

pub mod keys;

use std::collections::HashSet;

use jwt_simple::JWTError;
use jwt_simple::prelude::{Duration, JWTClaims, Token, UnixTimeStamp, VerificationOptions};
use jwt_simple::reexports::ct_codecs::{Base64UrlSafeNoPadding, Decoder};
use serde_json::{Map, Value};

use keys::VerifyingKey;

/// Longest accepted customer id, in bytes.
pub const MAX_CUSTOMER_BYTES: usize = 128;

/// Reason a request was rejected with 401. The response body shows
/// [`AuthError::reason`], which never contains the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` header.
    #[error("missing token")]
    MissingToken,
    /// The header or token does not parse.
    #[error("malformed token")]
    Malformed,
    /// The token is longer than `max_token_bytes`.
    #[error("token too large")]
    TooLarge,
    /// No configured key has the token's `kid`.
    #[error("unknown key id")]
    UnknownKeyId,
    /// The header's `alg` is not the one the key is pinned to.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("expired")]
    Expired,
    /// `nbf` or `iat` is in the future, beyond the leeway.
    #[error("not yet valid")]
    NotYetValid,
    /// `iss` differs from the configured issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` names none of the configured audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// The token has no `exp` claim.
    #[error("missing exp claim")]
    MissingExpiry,
    /// The customer claim is missing, not a string, too long or not
    /// printable ASCII.
    #[error("invalid customer claim")]
    InvalidCustomer,
    /// The customer was erased; its tokens are refused until the time the
    /// sidecar set, even though they verify.
    #[error("token revoked")]
    Revoked,
}

impl AuthError {
    /// Returns the short reason shown in the 401 body.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingToken => "missing token",
            Self::Malformed => "malformed token",
            Self::TooLarge => "token too large",
            Self::UnknownKeyId => "unknown key id",
            Self::AlgorithmNotAllowed => "algorithm not allowed",
            Self::BadSignature => "bad signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not yet valid",
            Self::WrongIssuer => "wrong issuer",
            Self::WrongAudience => "wrong audience",
            Self::MissingExpiry => "missing exp claim",
            Self::InvalidCustomer => "invalid customer claim",
            Self::Revoked => "token revoked",
        }
    }
}

/// Claims the filter keeps from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Customer id from the customer claim.
    pub customer: String,
    /// Tier named by the tier claim, when it is a string.
    pub tier: Option<String>,
    /// The `exp` claim, in seconds since the Unix epoch.
    pub expires_at_s: u64,
}

/// Token verification settings; built by [`crate::config::Config`].
#[derive(Debug)]
pub struct Verifier {
    /// Keys with their `kid`; a `kid` may be absent only in a one-key set.
    pub keys: Vec<(Option<String>, VerifyingKey)>,
    /// Required issuer.
    pub issuer: Option<String>,
    /// Accepted audiences.
    pub audiences: Option<HashSet<String>>,
    /// Clock skew tolerated on time claims, in seconds.
    pub leeway_seconds: u64,
    /// Largest accepted token, in bytes.
    pub max_token_bytes: usize,
    /// Claim that names the customer.
    pub customer_claim: String,
    /// Claim that names the tier.
    pub tier_claim: String,
}

/// Extracts the token from an `authorization` header value: the `Bearer`
/// scheme (any case), one or more spaces, then the token.
pub fn bearer_token(header: Option<&[u8]>, max_token_bytes: usize) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::MissingToken)?;
    let Some((scheme, rest)) = header.split_at_checked(6) else {
        return Err(AuthError::MissingToken);
    };
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return Err(AuthError::MissingToken);
    }
    let token = rest.trim_ascii();
    if token.is_empty() {
        return Err(AuthError::MissingToken);
    }
    if token.len() > max_token_bytes {
        return Err(AuthError::TooLarge);
    }
    std::str::from_utf8(token).map_err(|_| AuthError::Malformed)
}

impl Verifier {
    /// Verifies `token` at `now_s` (seconds since the Unix epoch, from the
    /// host's clock) and returns the customer, tier and expiry.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<VerifiedToken, AuthError> {
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        if token.split('.').count() != 3 {
            return Err(AuthError::Malformed);
        }
        let metadata = Token::decode_metadata(token).map_err(|_| AuthError::Malformed)?;
        let key = self.key_for(metadata.key_id())?;

        // jwt-simple checks `alg` too; checking first gives `alg: none` and
        // HS256-with-the-public-key their own reason.
        if metadata.algorithm() != key.algorithm() {
            return Err(AuthError::AlgorithmNotAllowed);
        }

        let claims: JWTClaims<Map<String, Value>> = key
            .verify(token, self.options(now_s))
            .map_err(|error| self.classify(&error, token))?;
        let expires_at_s = claims.expires_at.ok_or(AuthError::MissingExpiry)?.as_secs();
        let customer = self.customer(&claims)?;
        let tier = claim_text(&claims, &self.tier_claim).map(str::to_owned);
        Ok(VerifiedToken {
            customer,
            tier,
            expires_at_s,
        })
    }

    /// Maps a jwt-simple error to the reason the 401 names.
    fn classify(&self, error: &jwt_simple::Error, token: &str) -> AuthError {
        // jwt-simple checks the signature before it reads the claims, so a
        // JSON error here comes from signed claims of the wrong type, such
        // as a `sub` that is not a string.
        if error.downcast_ref::<serde_json::Error>().is_some()
            && self.customer_claim == "sub"
            && subject_is_not_text(token)
        {
            return AuthError::InvalidCustomer;
        }
        classify(error)
    }

    fn key_for(&self, kid: Option<&str>) -> Result<&VerifyingKey, AuthError> {
        match (kid, self.keys.as_slice()) {
            (None, [(_, only)]) => Ok(only),
            (None, _) => Err(AuthError::UnknownKeyId),
            (Some(kid), keys) => keys
                .iter()
                .find(|(key_id, _)| key_id.as_deref() == Some(kid))
                .map(|(_, key)| key)
                .ok_or(AuthError::UnknownKeyId),
        }
    }

    fn options(&self, now_s: u64) -> VerificationOptions {
        VerificationOptions {
            allowed_issuers: self
                .issuer
                .as_ref()
                .map(|issuer| HashSet::from([issuer.clone()])),
            allowed_audiences: self.audiences.clone(),
            time_tolerance: Some(Duration::from_secs(self.leeway_seconds)),
            max_token_length: Some(self.max_token_bytes),
            artificial_time: Some(UnixTimeStamp::from_secs(now_s)),
            ..VerificationOptions::default()
        }
    }

    fn customer(&self, claims: &JWTClaims<Map<String, Value>>) -> Result<String, AuthError> {
        let customer =
            claim_text(claims, &self.customer_claim).ok_or(AuthError::InvalidCustomer)?;
        let printable = customer.bytes().all(|byte| byte.is_ascii_graphic());
        if customer.is_empty() || customer.len() > MAX_CUSTOMER_BYTES || !printable {
            return Err(AuthError::InvalidCustomer);
        }
        Ok(customer.to_owned())
    }
}

/// Returns a string claim; `sub` lives outside the custom claims.
fn claim_text<'a>(claims: &'a JWTClaims<Map<String, Value>>, name: &str) -> Option<&'a str> {
    if name == "sub" {
        return claims.subject.as_deref();
    }
    claims.custom.get(name).and_then(Value::as_str)
}

/// Returns whether the token's claims have a `sub` that is not a string.
fn subject_is_not_text(token: &str) -> bool {
    let Some(claims) = token.split('.').nth(1) else {
        return false;
    };
    let Ok(json) = Base64UrlSafeNoPadding::decode_to_vec(claims, None) else {
        return false;
    };
    serde_json::from_slice::<Map<String, Value>>(&json)
        .is_ok_and(|claims| claims.get("sub").is_some_and(|sub| !sub.is_string()))
}

fn classify(error: &jwt_simple::Error) -> AuthError {
    match error.downcast_ref::<JWTError>() {
        Some(JWTError::InvalidSignature) => AuthError::BadSignature,
        Some(JWTError::TokenHasExpired) => AuthError::Expired,
        Some(JWTError::TokenNotValidYet | JWTError::ClockDrift) => AuthError::NotYetValid,
        Some(JWTError::RequiredIssuerMismatch | JWTError::RequiredIssuerMissing) => {
            AuthError::WrongIssuer
        }
        Some(JWTError::RequiredAudienceMismatch | JWTError::RequiredAudienceMissing) => {
            AuthError::WrongAudience
        }
        Some(JWTError::AlgorithmMismatch) => AuthError::AlgorithmNotAllowed,
        Some(JWTError::TokenTooLong) => AuthError::TooLarge,
        _ => AuthError::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use jwt_simple::prelude::{
        ECDSAP256KeyPairLike, ES256KeyPair, EdDSAKeyPairLike, HS256Key, MACLike, RSAKeyPairLike,
        UnixTimeStamp,
    };
    use serde_json::json;

    use super::*;
    use crate::testing::{
        AUDIENCE, NOW_S, claims, claims_json, config, es256_token, keys, raw_token,
    };

    fn verify(token: &str) -> Result<VerifiedToken, AuthError> {
        config(json!({})).verifier.verify(token, NOW_S)
    }

    #[test]
    fn accepts_each_key_type() {
        let keys = keys();
        let tokens = [
            keys.es256.sign(claims("a", Some("pro"))).unwrap(),
            keys.rs256.sign(claims("a", Some("pro"))).unwrap(),
            keys.ed25519.sign(claims("a", Some("pro"))).unwrap(),
        ];
        for token in tokens {
            let verified = verify(&token).unwrap();
            assert_eq!(verified.customer, "a");
            assert_eq!(verified.tier.as_deref(), Some("pro"));
            assert_eq!(verified.expires_at_s, NOW_S + 3600);
        }
    }

    #[test]
    fn rejects_expired_token_beyond_leeway() {
        let mut expired = claims("a", None);
        expired.expires_at = Some(UnixTimeStamp::from_secs(NOW_S - 61));
        assert_eq!(verify(&es256_token(expired)), Err(AuthError::Expired));

        let mut within_leeway = claims("a", None);
        within_leeway.expires_at = Some(UnixTimeStamp::from_secs(NOW_S - 30));
        assert!(verify(&es256_token(within_leeway)).is_ok());
    }

    #[test]
    fn leeway_is_configurable() {
        let mut expired = claims("a", None);
        expired.expires_at = Some(UnixTimeStamp::from_secs(NOW_S - 30));
        let strict = config(json!({"jwt": {
            "jwks": crate::testing::jwks(), "leeway_seconds": 0
        }}));
        let result = strict.verifier.verify(&es256_token(expired), NOW_S);
        assert_eq!(result, Err(AuthError::Expired));
    }

    #[test]
    fn rejects_token_not_yet_valid() {
        let mut early = claims("a", None);
        early.invalid_before = Some(UnixTimeStamp::from_secs(NOW_S + 120));
        assert_eq!(verify(&es256_token(early)), Err(AuthError::NotYetValid));

        let mut future_issue = claims("a", None);
        future_issue.issued_at = Some(UnixTimeStamp::from_secs(NOW_S + 120));
        assert_eq!(
            verify(&es256_token(future_issue)),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn rejects_token_without_expiry() {
        let mut endless = claims("a", None);
        endless.expires_at = None;
        assert_eq!(verify(&es256_token(endless)), Err(AuthError::MissingExpiry));
    }

    #[test]
    fn rejects_wrong_or_missing_issuer() {
        let wrong = claims("a", None).with_issuer("https://evil.test");
        assert_eq!(verify(&es256_token(wrong)), Err(AuthError::WrongIssuer));
        let mut missing = claims("a", None);
        missing.issuer = None;
        assert_eq!(verify(&es256_token(missing)), Err(AuthError::WrongIssuer));
    }

    #[test]
    fn rejects_wrong_audience() {
        let wrong = claims("a", None).with_audience("other-api");
        assert_eq!(verify(&es256_token(wrong)), Err(AuthError::WrongAudience));
        let both = claims("a", None).with_audiences(
            ["other-api", AUDIENCE]
                .iter()
                .map(|aud| (*aud).to_owned())
                .collect(),
        );
        assert!(verify(&es256_token(both)).is_ok());
    }

    #[test]
    fn rejects_forged_signature() {
        let forger = ES256KeyPair::generate().with_key_id("es");
        let forged = forger.sign(claims("a", None)).unwrap();
        assert_eq!(verify(&forged), Err(AuthError::BadSignature));

        // Swap in claims for another customer under a genuine signature.
        let genuine = es256_token(claims("a", None));
        let other = es256_token(claims("b", Some("enterprise")));
        let parts: Vec<&str> = genuine.split('.').collect();
        let other_parts: Vec<&str> = other.split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], other_parts[1], parts[2]);
        assert_eq!(verify(&spliced), Err(AuthError::BadSignature));
    }

    #[test]
    fn rejects_alg_none() {
        let token = raw_token(
            &json!({"alg": "none", "typ": "JWT", "kid": "es"}),
            &claims_json("a", Some("enterprise")),
            b"",
        );
        assert_eq!(verify(&token), Err(AuthError::AlgorithmNotAllowed));
        let without_kid = raw_token(&json!({"alg": "none"}), &claims_json("a", None), b"");
        assert_eq!(verify(&without_kid), Err(AuthError::UnknownKeyId));
    }

    #[test]
    fn rejects_hs256_signed_with_public_key() {
        let keys = keys();
        let public_pem = keys.rs256.public_key().to_pem().unwrap();
        let mac = HS256Key::from_bytes(public_pem.as_bytes()).with_key_id("rs");
        let token = mac.authenticate(claims("a", Some("enterprise"))).unwrap();
        assert_eq!(verify(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn rejects_algorithm_of_another_key_type() {
        // An Ed25519 signature presented under the EC key's id.
        let keys = keys();
        let mismatched = keys.ed25519.clone().with_key_id("es");
        let token = mismatched.sign(claims("a", None)).unwrap();
        assert_eq!(verify(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn rejects_unknown_key_id() {
        let stranger = ES256KeyPair::generate().with_key_id("k9");
        let token = stranger.sign(claims("a", None)).unwrap();
        assert_eq!(verify(&token), Err(AuthError::UnknownKeyId));
    }

    #[test]
    fn rejects_oversized_token() {
        let mut big = claims("a", None);
        big.custom.insert("pad".to_owned(), json!("x".repeat(5000)));
        assert_eq!(verify(&es256_token(big)), Err(AuthError::TooLarge));
    }

    #[test]
    fn rejects_malformed_tokens() {
        for token in [
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.???.###",
            "eyJhbGciOiJFUzI1NiJ9.e30",
        ] {
            assert_eq!(verify(token), Err(AuthError::Malformed), "{token}");
        }
        let not_json = raw_token(&json!("text"), &json!({}), b"sig");
        assert_eq!(verify(&not_json), Err(AuthError::Malformed));
    }

    #[test]
    fn rejects_bad_customer_claim() {
        let mut missing = claims("a", None);
        missing.subject = None;
        assert_eq!(
            verify(&es256_token(missing)),
            Err(AuthError::InvalidCustomer)
        );
        for customer in ["", "has space", "line\nbreak", &"c".repeat(129)] {
            let token = es256_token(claims(customer, None));
            assert_eq!(
                verify(&token),
                Err(AuthError::InvalidCustomer),
                "{customer:?}"
            );
        }
    }

    #[test]
    fn non_string_subject_is_bad_customer() {
        for subject in [json!(12345), json!(true), json!(["a"])] {
            let mut numeric = claims("a", None);
            numeric.subject = None;
            numeric.custom.insert("sub".to_owned(), subject.clone());
            let token = es256_token(numeric);
            assert_eq!(verify(&token), Err(AuthError::InvalidCustomer), "{subject}");
        }
    }

    #[test]
    fn tampered_wrong_type_claim_is_bad_signature() {
        let mut numeric = claims("a", None);
        numeric.subject = None;
        numeric.custom.insert("sub".to_owned(), json!(12345));
        let token = es256_token(numeric);
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { "B" } else { "A" };
        let tampered = format!("{signed}.{flipped}{}", &signature[1..]);
        assert_eq!(verify(&tampered), Err(AuthError::BadSignature));
    }

    #[test]
    fn wrong_type_standard_claim_is_malformed() {
        let mut text_expiry = claims("a", None);
        text_expiry.expires_at = None;
        text_expiry.custom.insert("exp".to_owned(), json!("soon"));
        assert_eq!(verify(&es256_token(text_expiry)), Err(AuthError::Malformed));
    }

    #[test]
    fn customer_and_tier_claims_are_configurable() {
        let verifier = config(json!({"jwt": {
            "jwks": crate::testing::jwks(),
            "customer_claim": "org", "tier_claim": "plan"
        }}))
        .verifier;
        let mut custom = claims("user-1", Some("basic"));
        custom.custom.insert("org".to_owned(), json!("org-7"));
        custom.custom.insert("plan".to_owned(), json!("pro"));
        let verified = verifier.verify(&es256_token(custom), NOW_S).unwrap();
        assert_eq!(verified.customer, "org-7");
        assert_eq!(verified.tier.as_deref(), Some("pro"));
    }

    #[test]
    fn non_string_tier_claim_counts_as_missing() {
        let mut numeric = claims("a", None);
        numeric.custom.insert("tier".to_owned(), json!(3));
        assert_eq!(verify(&es256_token(numeric)).unwrap().tier, None);
    }

    #[test]
    fn bearer_header_parsing() {
        let max = 100;
        assert_eq!(bearer_token(None, max), Err(AuthError::MissingToken));
        assert_eq!(
            bearer_token(Some(b"Basic abc"), max),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            bearer_token(Some(b"Bearer"), max),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            bearer_token(Some(b"Bearer   "), max),
            Err(AuthError::MissingToken)
        );
        assert_eq!(
            bearer_token(Some(b"Bearerabc"), max),
            Err(AuthError::MissingToken)
        );
        assert_eq!(bearer_token(Some(b"bEaReR  a.b.c "), max), Ok("a.b.c"));
        assert_eq!(
            bearer_token(Some(b"Bearer \xff\xfe"), max),
            Err(AuthError::Malformed)
        );
        let long = [b"Bearer ".as_slice(), &[b'a'; 101]].concat();
        assert_eq!(bearer_token(Some(&long), max), Err(AuthError::TooLarge));
    }

    #[test]
    fn reasons_never_echo_the_token() {
        let token = es256_token(claims("secret-customer", None));
        let error = verify(&format!("{token}x")).unwrap_err();
        assert!(!error.reason().contains(&token[..20]));
        assert_eq!(error.to_string(), error.reason());
    }
}
