//! Token verification end to end: every invalid or missing token gets 401
//! with a JSON reason that never repeats the token, and nothing reaches the
//! upstream.

use anyhow::Context;
use veo_tests::Stack;
use veo_tests::client::{HttpClient, Reply};
use veo_tests::plugin::PluginConfig;
use veo_tests::tokens::{SigningKey, TokenSpec};

/// Size cap on tokens in this test's configuration, in bytes.
const MAX_TOKEN_BYTES: u64 = 4096;

async fn start() -> anyhow::Result<(Stack, SigningKey)> {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key)?
        .set("/jwt/max_token_bytes", MAX_TOKEN_BYTES.into())
        .set("/jwt/leeway_seconds", 60.into());
    let stack = Stack::start(&config).await?;
    Ok((stack, key))
}

/// Checks a 401 reply: JSON body with a reason, `WWW-Authenticate: Bearer`,
/// and no trace of `token`.
fn assert_unauthorized(case: &str, reply: &Reply, token: &str) -> anyhow::Result<()> {
    assert_eq!(reply.status, 401, "{case}: body {}", reply.body);
    let body = reply.json().with_context(|| format!("{case}: body"))?;
    assert_eq!(body["error"], "unauthorized", "{case}");
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(!reason.is_empty(), "{case}: no reason in {}", reply.body);
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{case}: www-authenticate `{challenge}`"
    );
    if !token.is_empty() {
        assert!(
            !reply.body.contains(token),
            "{case}: the body repeats the token"
        );
        for segment in token.split('.').filter(|segment| segment.len() > 8) {
            assert!(
                !reply.body.contains(segment),
                "{case}: the body repeats a token part"
            );
        }
    }
    Ok(())
}

async fn send(client: &HttpClient, token: &str) -> anyhow::Result<Reply> {
    Ok(client.get_with_token("/", token, &[]).await?)
}

/// Proves a missing Authorization header gets 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_gets_401() -> anyhow::Result<()> {
    let (stack, _key) = start().await?;

    let reply = stack.client().get("/", &[]).await?;

    assert_unauthorized("missing token", &reply, "")?;
    let reply = stack
        .client()
        .get("/", &[("authorization", "Basic dXNlcjpwYXNz")])
        .await?;
    assert_unauthorized("basic credentials", &reply, "dXNlcjpwYXNz")?;
    assert_eq!(stack.upstream.requests(), 0);
    Ok(())
}

/// Proves every kind of invalid token gets 401 and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_get_401() -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let client = stack.client();
    let valid = TokenSpec::new("attacker", "enterprise");

    let mut expired = valid.clone();
    expired.expires_in_seconds = -3600;
    let mut not_yet_valid = valid.clone();
    not_yet_valid.not_before_in_seconds = 3600;
    let mut wrong_issuer = valid.clone();
    wrong_issuer.issuer = Some("https://evil.test".to_owned());
    let mut wrong_audience = valid.clone();
    wrong_audience.audience = Some("other-api".to_owned());
    let mut oversized = valid.clone();
    oversized.padding_bytes = usize::try_from(MAX_TOKEN_BYTES)?;
    let other_key_same_kid = SigningKey::generate(key.key_id());
    let unknown_kid = SigningKey::generate("k-unknown");
    let public_pem = key.public_pem()?;
    let public_jwk = key.jwks()?["keys"][0].to_string();

    let cases = [
        ("expired", key.mint(&expired)?),
        ("not yet valid", key.mint(&not_yet_valid)?),
        ("wrong issuer", key.mint(&wrong_issuer)?),
        ("wrong audience", key.mint(&wrong_audience)?),
        ("forged signature", other_key_same_kid.mint(&valid)?),
        ("alg none", key.mint_alg_none(&valid)?),
        (
            "HS256 keyed with the public PEM",
            key.mint_hs256_with_public_key(&valid, public_pem.as_bytes())?,
        ),
        (
            "HS256 keyed with the public JWK",
            key.mint_hs256_with_public_key(&valid, public_jwk.as_bytes())?,
        ),
        ("unknown kid", unknown_kid.mint(&valid)?),
        ("oversized", key.mint(&oversized)?),
        ("malformed: one segment", "not-a-jwt".to_owned()),
        (
            "malformed: two segments",
            "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0".to_owned(),
        ),
        ("malformed: bad base64", "e$J.e$J.s$g".to_owned()),
        (
            "malformed: header not JSON",
            "bm90IGpzb24.e30.c2ln".to_owned(),
        ),
    ];
    for (case, token) in &cases {
        let reply = send(&client, token).await?;
        assert_unauthorized(case, &reply, token)?;
    }

    let reply = send(&client, &key.mint(&valid)?).await?;
    assert_eq!(reply.status, 200, "valid token: {}", reply.body);
    assert_eq!(stack.upstream.requests(), 1);
    Ok(())
}

/// Proves expiry is checked with the configured leeway of 60 s, not more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_allows_only_configured_leeway() -> anyhow::Result<()> {
    let (stack, key) = start().await?;
    let client = stack.client();

    let mut within_leeway = TokenSpec::new("leeway-in", "basic");
    within_leeway.expires_in_seconds = -20;
    let reply = send(&client, &key.mint(&within_leeway)?).await?;
    assert_eq!(reply.status, 200, "expired 20 s ago: {}", reply.body);

    let mut beyond_leeway = TokenSpec::new("leeway-out", "basic");
    beyond_leeway.expires_in_seconds = -120;
    let token = key.mint(&beyond_leeway)?;
    let reply = send(&client, &token).await?;
    assert_unauthorized("expired 120 s ago", &reply, &token)?;
    Ok(())
}
