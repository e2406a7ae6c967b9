//! Public keys from a JWKS, each pinned to the one algorithm its type
//! allows: EC P-256 to ES256, RSA to RS256, OKP Ed25519 to EdDSA.

use jwt_simple::prelude::{
    ECDSAP256PublicKeyLike as _, ES256PublicKey, Ed25519PublicKey, EdDSAPublicKeyLike as _,
    JWTClaims, RS256PublicKey, RSAPublicKeyLike as _, VerificationOptions,
};
use serde::de::DeserializeOwned;

use crate::config::ConfigError;
use crate::config::raw::RawJwk;

/// A verification key and the algorithm it is pinned to.
#[derive(Debug, Clone)]
pub enum VerifyingKey {
    /// ECDSA over P-256 with SHA-256.
    Es256(ES256PublicKey),
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256(Box<RS256PublicKey>),
    /// Ed25519.
    EdDsa(Ed25519PublicKey),
}

impl VerifyingKey {
    /// Returns the JWS `alg` value this key accepts.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Es256(_) => "ES256",
            Self::Rs256(_) => "RS256",
            Self::EdDsa(_) => "EdDSA",
        }
    }

    /// Verifies the signature and the registered claims of `token`.
    pub fn verify<Custom: DeserializeOwned>(
        &self,
        token: &str,
        options: VerificationOptions,
    ) -> Result<JWTClaims<Custom>, jwt_simple::Error> {
        match self {
            Self::Es256(key) => key.verify_token(token, Some(options)),
            Self::Rs256(key) => key.verify_token(token, Some(options)),
            Self::EdDsa(key) => key.verify_token(token, Some(options)),
        }
    }

    /// Builds a key from one JWK; `field` names it in errors, for example
    /// `jwt.jwks.keys[0]`.
    pub fn from_jwk(jwk: &RawJwk, field: &str) -> Result<Self, ConfigError> {
        reject_private_members(jwk, field)?;
        if let Some(key_use) = &jwk.key_use
            && key_use != "sig"
        {
            return Err(ConfigError::invalid(
                format!("{field}.use"),
                key_use,
                "only signature keys (`sig`) can verify tokens",
            ));
        }

        let key = match jwk.kty.as_str() {
            "EC" => ec_key(jwk, field)?,
            "RSA" => rsa_key(jwk, field)?,
            "OKP" => okp_key(jwk, field)?,
            other => {
                return Err(ConfigError::invalid(
                    format!("{field}.kty"),
                    other,
                    "supported key types are EC (P-256), RSA and OKP (Ed25519)",
                ));
            }
        };

        if let Some(alg) = &jwk.alg
            && alg != key.algorithm()
        {
            return Err(ConfigError::invalid(
                format!("{field}.alg"),
                alg,
                &format!("a {} key verifies only {}", jwk.kty, key.algorithm()),
            ));
        }
        Ok(key)
    }
}

fn reject_private_members(jwk: &RawJwk, field: &str) -> Result<(), ConfigError> {
    let members = [
        ("d", &jwk.d),
        ("p", &jwk.p),
        ("q", &jwk.q),
        ("dp", &jwk.dp),
        ("dq", &jwk.dq),
        ("qi", &jwk.qi),
        ("k", &jwk.k),
    ];
    for (name, value) in members {
        if value.is_some() {
            return Err(ConfigError::invalid(
                format!("{field}.{name}"),
                "(secret, not shown)",
                "the JWKS must hold public keys only; remove private and symmetric key members",
            ));
        }
    }
    Ok(())
}

fn ec_key(jwk: &RawJwk, field: &str) -> Result<VerifyingKey, ConfigError> {
    require_curve(jwk, field, "P-256")?;
    let x = member_bytes(&jwk.x, &format!("{field}.x"), Some(32))?;
    let y = member_bytes(&jwk.y, &format!("{field}.y"), Some(32))?;

    // SEC1 uncompressed point: 0x04 || x || y.
    let mut point = Vec::with_capacity(65);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    let key = ES256PublicKey::from_bytes(&point).map_err(|_| {
        ConfigError::invalid(
            format!("{field}.x"),
            jwk.x.as_deref().unwrap_or_default(),
            "x and y are not a point on P-256",
        )
    })?;
    Ok(VerifyingKey::Es256(key))
}

fn rsa_key(jwk: &RawJwk, field: &str) -> Result<VerifyingKey, ConfigError> {
    let n = member_bytes(&jwk.n, &format!("{field}.n"), None)?;
    let e = member_bytes(&jwk.e, &format!("{field}.e"), None)?;
    // Checked here so that the error names `e`. The RSA library rejects
    // other exponents too, but reports them as an unusable key.
    let first_nonzero = e.iter().position(|&byte| byte != 0).unwrap_or(e.len());
    if e[first_nonzero..] != [1, 0, 1] {
        return Err(ConfigError::invalid(
            format!("{field}.e"),
            jwk.e.as_deref().unwrap_or_default(),
            "only the public exponent 65537 (`AQAB`) is accepted",
        ));
    }
    let key = RS256PublicKey::from_components(&n, &e).map_err(|error| {
        ConfigError::invalid(
            format!("{field}.n"),
            &format!("({} bit modulus)", n.len() * 8),
            &format!("not a usable RSA public key ({error}); use 2048 to 4096 bits, e = 65537"),
        )
    })?;
    Ok(VerifyingKey::Rs256(Box::new(key)))
}

fn okp_key(jwk: &RawJwk, field: &str) -> Result<VerifyingKey, ConfigError> {
    require_curve(jwk, field, "Ed25519")?;
    let x = member_bytes(&jwk.x, &format!("{field}.x"), Some(32))?;
    let key = Ed25519PublicKey::from_bytes(&x).map_err(|_| {
        ConfigError::invalid(
            format!("{field}.x"),
            jwk.x.as_deref().unwrap_or_default(),
            "not an Ed25519 public key",
        )
    })?;
    Ok(VerifyingKey::EdDsa(key))
}

fn require_curve(jwk: &RawJwk, field: &str, expected: &str) -> Result<(), ConfigError> {
    match jwk.crv.as_deref() {
        Some(crv) if crv == expected => Ok(()),
        other => Err(ConfigError::invalid(
            format!("{field}.crv"),
            other.unwrap_or("(missing)"),
            &format!("a {} key must use curve {expected}", jwk.kty),
        )),
    }
}

/// Decodes a base64url key member, tolerating `=` padding.
fn member_bytes(
    value: &Option<String>,
    field: &str,
    expected_len: Option<usize>,
) -> Result<Vec<u8>, ConfigError> {
    let Some(text) = value else {
        return Err(ConfigError::invalid(
            field,
            "(missing)",
            "this key member is required",
        ));
    };
    let bytes = decode_base64url(text.trim_end_matches('='))
        .ok_or_else(|| ConfigError::invalid(field, text, "not base64url"))?;
    if let Some(len) = expected_len
        && bytes.len() != len
    {
        return Err(ConfigError::invalid(
            field,
            text,
            &format!("expected {len} bytes, got {}", bytes.len()),
        ));
    }
    Ok(bytes)
}

fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    // The prelude is the only path that brings ct-codecs' `Decoder` trait.
    use jwt_simple::prelude::*;
    Base64UrlSafeNoPadding::decode_to_vec(text, None).ok()
}
