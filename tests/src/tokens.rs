//! Test tokens: an ES256 signing key with its JWKS, valid tokens with chosen
//! claims, and the hand-made attack tokens that a filter must reject.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jwt_simple::prelude::*;
use serde_json::{Map, Value};

use crate::HarnessError;

/// Issuer that the harness's plugin configuration expects.
pub const ISSUER: &str = "https://auth.veo.test";

/// Audience that the harness's plugin configuration expects.
pub const AUDIENCE: &str = "veo-api";

/// Claims of one token; [`TokenSpec::new`] gives a valid one.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// `sub` claim, the customer.
    pub customer: String,
    /// `tier` claim, omitted when `None`.
    pub tier: Option<String>,
    /// `iss` claim, omitted when `None`.
    pub issuer: Option<String>,
    /// `aud` claim, omitted when `None`.
    pub audience: Option<String>,
    /// `exp` claim, in seconds relative to now; negative is in the past.
    pub expires_in_seconds: i64,
    /// `nbf` claim, in seconds relative to now; positive is in the future.
    pub not_before_in_seconds: i64,
    /// Length of an extra `pad` claim that makes the token larger, in bytes.
    pub padding_bytes: usize,
}

impl TokenSpec {
    /// Returns claims for `customer` in `tier` with the expected issuer and
    /// audience, valid from now for an hour.
    pub fn new(customer: &str, tier: &str) -> Self {
        Self {
            customer: customer.to_owned(),
            tier: Some(tier.to_owned()),
            issuer: Some(ISSUER.to_owned()),
            audience: Some(AUDIENCE.to_owned()),
            expires_in_seconds: 3600,
            not_before_in_seconds: 0,
            padding_bytes: 0,
        }
    }

    fn claims(&self) -> JWTClaims<Map<String, Value>> {
        let mut custom = Map::new();
        if let Some(tier) = &self.tier {
            custom.insert("tier".to_owned(), Value::from(tier.as_str()));
        }
        if self.padding_bytes > 0 {
            custom.insert(
                "pad".to_owned(),
                Value::from("x".repeat(self.padding_bytes)),
            );
        }
        let mut claims = Claims::with_custom_claims(custom, Duration::from_hours(1))
            .with_subject(&self.customer);
        if let Some(issuer) = &self.issuer {
            claims = claims.with_issuer(issuer);
        }
        if let Some(audience) = &self.audience {
            claims = claims.with_audience(audience);
        }
        let now = Clock::now_since_epoch().as_secs();
        claims.expires_at = Some(Duration::from_secs(
            now.saturating_add_signed(self.expires_in_seconds),
        ));
        claims.invalid_before = Some(Duration::from_secs(
            now.saturating_add_signed(self.not_before_in_seconds),
        ));
        claims
    }
}

/// An ES256 key pair with a key id, the identity provider's signing key.
pub struct SigningKey {
    key_pair: ES256KeyPair,
    key_id: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a new key pair with key id `key_id`.
    pub fn generate(key_id: &str) -> Self {
        Self {
            key_pair: ES256KeyPair::generate().with_key_id(key_id),
            key_id: key_id.to_owned(),
        }
    }

    /// Returns the key id, the `kid` of the tokens and of the JWKS entry.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Returns the public key as a JWKS with one entry.
    pub fn jwks(&self) -> Result<Value, HarnessError> {
        let jwk = self
            .key_pair
            .public_key()
            .with_key_id(&self.key_id)
            .to_jwk();
        let jwk: Value = serde_json::from_str(&jwk).map_err(|err| {
            HarnessError::Token(format!("jwt-simple wrote an invalid JWK: {err}"))
        })?;
        Ok(serde_json::json!({ "keys": [jwk] }))
    }

    /// Returns the public key in PEM, as anyone may read it.
    pub fn public_pem(&self) -> Result<String, HarnessError> {
        self.key_pair
            .public_key()
            .to_pem()
            .map_err(|err| HarnessError::Token(err.to_string()))
    }

    /// Signs a token with `spec`'s claims.
    pub fn mint(&self, spec: &TokenSpec) -> Result<String, HarnessError> {
        self.key_pair
            .sign(spec.claims())
            .map_err(|err| HarnessError::Token(err.to_string()))
    }

    /// Signs a token with `spec`'s claims, the algorithm named HS256 and the
    /// public key text `secret` as the HMAC key: the key-confusion attack on
    /// verifiers that take the algorithm from the token.
    pub fn mint_hs256_with_public_key(
        &self,
        spec: &TokenSpec,
        secret: &[u8],
    ) -> Result<String, HarnessError> {
        HS256Key::from_bytes(secret)
            .with_key_id(&self.key_id)
            .authenticate(spec.claims())
            .map_err(|err| HarnessError::Token(err.to_string()))
    }

    /// Returns an unsigned token (`alg: none`, empty signature) with `spec`'s
    /// claims and this key's id.
    pub fn mint_alg_none(&self, spec: &TokenSpec) -> Result<String, HarnessError> {
        let header = serde_json::json!({"alg": "none", "typ": "JWT", "kid": self.key_id});
        let payload = serde_json::to_vec(&spec.claims())
            .map_err(|err| HarnessError::Token(err.to_string()))?;
        Ok(format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_segment(token: &str, index: usize) -> Value {
        let segment = token.split('.').nth(index).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    #[test]
    fn minted_token_verifies_with_public_key() {
        let key = SigningKey::generate("k1");
        let token = key.mint(&TokenSpec::new("cust-1", "pro")).unwrap();
        let claims = key
            .key_pair
            .public_key()
            .verify_token::<Map<String, Value>>(&token, None)
            .unwrap();
        assert_eq!(claims.subject.as_deref(), Some("cust-1"));
        assert_eq!(claims.custom["tier"], "pro");
        assert_eq!(decode_segment(&token, 0)["kid"], "k1");
    }

    #[test]
    fn expired_spec_sets_past_expiry() {
        let key = SigningKey::generate("k1");
        let mut spec = TokenSpec::new("cust-1", "basic");
        spec.expires_in_seconds = -3600;
        let token = key.mint(&spec).unwrap();
        let now = Clock::now_since_epoch().as_secs();
        let exp = decode_segment(&token, 1)["exp"].as_u64().unwrap();
        assert!(exp < now - 3000);
    }

    #[test]
    fn alg_none_token_has_empty_signature() {
        let key = SigningKey::generate("k1");
        let token = key
            .mint_alg_none(&TokenSpec::new("cust-1", "basic"))
            .unwrap();
        assert!(token.ends_with('.'));
        assert_eq!(decode_segment(&token, 0)["alg"], "none");
    }

    #[test]
    fn jwks_carries_key_id_and_curve() {
        let jwks = SigningKey::generate("k9").jwks().unwrap();
        assert_eq!(jwks["keys"][0]["kid"], "k9");
        assert_eq!(jwks["keys"][0]["crv"], "P-256");
        assert_eq!(jwks["keys"][0]["kty"], "EC");
    }
}
