//! ES256 signing keys and JWT minting for the replay: key generation, PKCS#8 PEM files, the
//! JWKS that the filter's plugin configuration embeds, and tokens carrying a customer and tier.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use jwt_simple::prelude::{
    Base64UrlSafeNoPadding, Claims, Duration, ECDSAP256KeyPairLike, ECDSAP256PublicKeyLike,
    ES256KeyPair, ES256PublicKey,
};
use jwt_simple::reexports::ct_codecs::Encoder;
use serde::{Deserialize, Serialize};

/// Key id (`kid`) of replay keys, in the JWKS and in every token header.
pub const KEY_ID: &str = "replay-1";
/// Default `iss` claim of minted tokens.
pub const DEFAULT_ISSUER: &str = "https://auth.veo.test";
/// Default `aud` claim of minted tokens.
pub const DEFAULT_AUDIENCE: &str = "veo-api";
/// File name of the private key that `write_key_files` creates.
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
/// File name of the public JWKS that `write_key_files` creates.
pub const JWKS_FILE: &str = "jwks.json";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors from key handling and token minting.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A key file could not be read or written.
    #[error("failed to access key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// The PEM text is not an ES256 (P-256) private key in PKCS#8 form.
    #[error("invalid ES256 private key in {origin}: expected a PKCS#8 PEM P-256 key: {source}")]
    InvalidKey {
        /// Source of the key: a path or a description.
        origin: String,
        /// The parser's error.
        #[source]
        source: BoxError,
    },
    /// The key could not be encoded or a token could not be signed.
    #[error("failed to {action}: {source}")]
    Signing {
        /// The operation that failed.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
}

/// An ES256 private key with the key id [`KEY_ID`].
pub struct SigningKey {
    key_pair: ES256KeyPair,
}

impl std::fmt::Debug for SigningKey {
    /// Shows the key id only, never the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &KEY_ID)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a new random P-256 key.
    pub fn generate() -> Self {
        SigningKey {
            key_pair: ES256KeyPair::generate().with_key_id(KEY_ID),
        }
    }

    /// Parses a PKCS#8 PEM private key; `origin` names its source in errors.
    ///
    /// # Errors
    /// Returns [`TokenError::InvalidKey`] when the text is not a P-256 PKCS#8 key.
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, TokenError> {
        let key_pair = ES256KeyPair::from_pem(pem).map_err(|error| TokenError::InvalidKey {
            origin: origin.to_string(),
            source: error.into(),
        })?;
        Ok(SigningKey {
            key_pair: key_pair.with_key_id(KEY_ID),
        })
    }

    /// Reads a PKCS#8 PEM private key file.
    ///
    /// # Errors
    /// Returns [`TokenError::Io`] or [`TokenError::InvalidKey`].
    pub fn read_pem(path: &Path) -> Result<Self, TokenError> {
        let pem = fs::read_to_string(path).map_err(|source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Encodes the private key as PKCS#8 PEM.
    ///
    /// # Errors
    /// Returns [`TokenError::Signing`] when encoding fails.
    pub fn to_pem(&self) -> Result<String, TokenError> {
        self.key_pair.to_pem().map_err(|error| TokenError::Signing {
            action: "encode the private key as PEM",
            source: error.into(),
        })
    }

    /// Writes the private key as PKCS#8 PEM, readable by the owner only on Unix.
    ///
    /// # Errors
    /// Returns [`TokenError::Io`] or [`TokenError::Signing`].
    pub fn write_pem(&self, path: &Path) -> Result<(), TokenError> {
        let pem = self.to_pem()?;
        write_private_file(path, pem.as_bytes()).map_err(|source| TokenError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Returns the public key, for verifying minted tokens.
    pub fn public_key(&self) -> ES256PublicKey {
        self.key_pair.public_key()
    }

    /// Returns the public key as a JWKS with one EC P-256 key (`kid` [`KEY_ID`]).
    pub fn jwks(&self) -> Jwks {
        // SEC1 uncompressed point: 0x04, then the 32-byte x and y coordinates.
        let point = self.public_key().public_key().to_bytes_uncompressed();
        let coordinates = point.get(1..).unwrap_or_default();
        let (x, y) = coordinates.split_at(coordinates.len() / 2);
        Jwks {
            keys: vec![Jwk {
                kty: "EC".to_string(),
                crv: "P-256".to_string(),
                kid: KEY_ID.to_string(),
                alg: "ES256".to_string(),
                key_use: "sig".to_string(),
                x: encode_base64url(x),
                y: encode_base64url(y),
            }],
        }
    }

    /// Signs a token for `customer` in `tier`; see [`TokenSpec`] for the other claims.
    ///
    /// # Errors
    /// Returns [`TokenError::Signing`] when signing fails.
    pub fn mint(&self, spec: &TokenSpec, customer: &str, tier: &str) -> Result<String, TokenError> {
        self.mint_claims(spec, customer, tier, None)
    }

    /// Signs a token like [`SigningKey::mint`] with a unique `jti`, so each token is distinct.
    ///
    /// # Errors
    /// Returns [`TokenError::Signing`] when signing fails.
    pub fn mint_unique(
        &self,
        spec: &TokenSpec,
        customer: &str,
        tier: &str,
        token_id: &str,
    ) -> Result<String, TokenError> {
        self.mint_claims(spec, customer, tier, Some(token_id))
    }

    fn mint_claims(
        &self,
        spec: &TokenSpec,
        customer: &str,
        tier: &str,
        token_id: Option<&str>,
    ) -> Result<String, TokenError> {
        let tier_claim = TierClaim {
            tier: tier.to_string(),
        };
        let mut claims =
            Claims::with_custom_claims(tier_claim, Duration::from_secs(spec.valid_for_seconds))
                .with_subject(customer)
                .with_issuer(&spec.issuer)
                .with_audience(&spec.audience);
        if let Some(token_id) = token_id {
            claims = claims.with_jwt_id(token_id);
        }
        self.key_pair
            .sign(claims)
            .map_err(|error| TokenError::Signing {
                action: "sign a token",
                source: error.into(),
            })
    }
}

/// The claims of minted tokens besides the customer (`sub`) and tier.
///
/// `iat` and `nbf` are the time of minting and `exp` is `valid_for_seconds` later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// `iss` claim.
    pub issuer: String,
    /// `aud` claim.
    pub audience: String,
    /// Lifetime in seconds.
    pub valid_for_seconds: u64,
}

impl Default for TokenSpec {
    /// Issuer [`DEFAULT_ISSUER`], audience [`DEFAULT_AUDIENCE`], valid for one hour.
    fn default() -> Self {
        TokenSpec {
            issuer: DEFAULT_ISSUER.to_string(),
            audience: DEFAULT_AUDIENCE.to_string(),
            valid_for_seconds: 3_600,
        }
    }
}

/// The custom `tier` claim of minted tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierClaim {
    /// Subscription tier, such as `basic`.
    pub tier: String,
}

/// A JSON Web Key Set, as embedded in the filter's `jwt.jwks` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// One EC public key of a [`Jwks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type, `EC`.
    pub kty: String,
    /// Curve, `P-256`.
    pub crv: String,
    /// Key id.
    pub kid: String,
    /// Algorithm, `ES256`.
    pub alg: String,
    /// Public key use, `sig`.
    #[serde(rename = "use")]
    pub key_use: String,
    /// x coordinate, base64url without padding.
    pub x: String,
    /// y coordinate, base64url without padding.
    pub y: String,
}

/// Paths of the files written by [`write_key_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFiles {
    /// The private key, PKCS#8 PEM.
    pub signing_key: PathBuf,
    /// The public JWKS.
    pub jwks: PathBuf,
}

/// Generates a key and writes `dir/signing-key.pem` and `dir/jwks.json`, creating `dir`.
///
/// # Errors
/// Returns [`TokenError::Io`] when the directory or a file cannot be written.
pub fn write_key_files(dir: &Path) -> Result<(SigningKey, KeyFiles), TokenError> {
    fs::create_dir_all(dir).map_err(|source| TokenError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = SigningKey::generate();
    let files = KeyFiles {
        signing_key: dir.join(SIGNING_KEY_FILE),
        jwks: dir.join(JWKS_FILE),
    };

    key.write_pem(&files.signing_key)?;
    let mut jwks =
        serde_json::to_string_pretty(&key.jwks()).map_err(|error| TokenError::Signing {
            action: "encode the JWKS",
            source: error.into(),
        })?;
    jwks.push('\n');
    fs::write(&files.jwks, jwks).map_err(|source| TokenError::Io {
        path: files.jwks.clone(),
        source,
    })?;
    Ok((key, files))
}

fn encode_base64url(bytes: &[u8]) -> String {
    // `encode_to_string` allocates a buffer of the right size, so it does not fail.
    Base64UrlSafeNoPadding::encode_to_string(bytes).unwrap_or_default()
}

fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;

    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents)
}

#[cfg(test)]
mod tests {
    use jwt_simple::prelude::{HashSet, VerificationOptions};
    use jwt_simple::reexports::ct_codecs::Decoder;

    use super::*;

    fn verify(key: &SigningKey, token: &str) -> jwt_simple::prelude::JWTClaims<TierClaim> {
        let options = VerificationOptions {
            allowed_issuers: Some(HashSet::from([DEFAULT_ISSUER.to_string()])),
            allowed_audiences: Some(HashSet::from([DEFAULT_AUDIENCE.to_string()])),
            ..Default::default()
        };
        key.public_key()
            .verify_token::<TierClaim>(token, Some(options))
            .unwrap()
    }

    #[test]
    fn minted_token_verifies_with_public_key() {
        let key = SigningKey::generate();
        let spec = TokenSpec::default();
        let token = key.mint(&spec, "cust-1.2.3.4", "pro").unwrap();

        let claims = verify(&key, &token);
        assert_eq!(claims.subject.as_deref(), Some("cust-1.2.3.4"));
        assert_eq!(claims.custom.tier, "pro");
        assert_eq!(claims.issuer.as_deref(), Some(DEFAULT_ISSUER));
        let issued_at = claims.issued_at.unwrap().as_secs();
        assert_eq!(claims.invalid_before.unwrap().as_secs(), issued_at);
        assert_eq!(claims.expires_at.unwrap().as_secs(), issued_at + 3_600);
        assert_eq!(claims.jwt_id, None);
    }

    #[test]
    fn token_header_names_key_id() {
        let key = SigningKey::generate();
        let token = key.mint(&TokenSpec::default(), "c", "basic").unwrap();
        let metadata = jwt_simple::token::Token::decode_metadata(&token).unwrap();
        assert_eq!(metadata.key_id(), Some(KEY_ID));
        assert_eq!(metadata.algorithm(), "ES256");
    }

    #[test]
    fn unique_tokens_differ_and_carry_jti() {
        let key = SigningKey::generate();
        let spec = TokenSpec::default();
        let first = key.mint_unique(&spec, "c", "basic", "t-1").unwrap();
        let second = key.mint_unique(&spec, "c", "basic", "t-2").unwrap();
        assert_ne!(first, second);
        assert_eq!(verify(&key, &first).jwt_id.as_deref(), Some("t-1"));
    }

    #[test]
    fn token_from_other_key_fails_verification() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let token = other.mint(&TokenSpec::default(), "c", "basic").unwrap();
        assert!(
            key.public_key()
                .verify_token::<TierClaim>(&token, None)
                .is_err()
        );
    }

    #[test]
    fn pem_round_trip_keeps_key() {
        let key = SigningKey::generate();
        let pem = key.to_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        let restored = SigningKey::from_pem(&pem, "test").unwrap();
        let token = restored.mint(&TokenSpec::default(), "c", "basic").unwrap();
        verify(&key, &token);
    }

    #[test]
    fn rejects_invalid_pem() {
        let error = SigningKey::from_pem("not a key", "memory").unwrap_err();
        assert!(error.to_string().contains("memory"));
    }

    #[test]
    fn jwks_matches_public_key() {
        let key = SigningKey::generate();
        let jwks = key.jwks();
        assert_eq!(jwks.keys.len(), 1);
        let jwk = &jwks.keys[0];
        assert_eq!((jwk.kty.as_str(), jwk.crv.as_str()), ("EC", "P-256"));
        assert_eq!(jwk.kid, KEY_ID);

        let x = Base64UrlSafeNoPadding::decode_to_vec(&jwk.x, None).unwrap();
        let y = Base64UrlSafeNoPadding::decode_to_vec(&jwk.y, None).unwrap();
        assert_eq!(x.len(), 32);
        assert_eq!(y.len(), 32);
        let point = [&[4u8][..], &x, &y].concat();
        let public = ES256PublicKey::from_bytes(&point).unwrap();
        let token = key.mint(&TokenSpec::default(), "c", "basic").unwrap();
        assert!(public.verify_token::<TierClaim>(&token, None).is_ok());

        let parsed = ES256PublicKey::from_jwk(&serde_json::to_string(jwk).unwrap()).unwrap();
        assert_eq!(parsed.to_bytes(), key.public_key().to_bytes());
    }

    #[test]
    fn key_files_are_written_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (key, files) = write_key_files(&dir.path().join("keys")).unwrap();
        let restored = SigningKey::read_pem(&files.signing_key).unwrap();
        let token = restored.mint(&TokenSpec::default(), "c", "basic").unwrap();
        verify(&key, &token);

        let jwks: Jwks = serde_json::from_slice(&fs::read(&files.jwks).unwrap()).unwrap();
        assert_eq!(jwks, key.jwks());
        let text = fs::read_to_string(&files.jwks).unwrap();
        assert!(text.contains("\"use\": \"sig\""));
    }
}
