//! `veo-replay`: generates signing keys, single tokens and synthetic access logs, and replays
//! an access log or synthetic overload against Envoy with per-customer JWTs, writing a
//! decisions file and a per-tier summary.

mod run;

use std::fs::File;
use std::io::BufWriter;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use veo_bench::generate::{GenerateOptions, generate_access_log};
use veo_bench::tokens::{DEFAULT_AUDIENCE, DEFAULT_ISSUER, SigningKey, TokenSpec, write_key_files};

#[derive(Parser)]
#[command(
    version,
    about = "Replay access logs against Veo Edge with per-customer JWTs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ES256 key pair: DIR/signing-key.pem (PKCS#8) and DIR/jwks.json.
    Keygen {
        /// Directory for the key files; created when missing.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print one signed ES256 token, for example for
    /// `curl -H "authorization: Bearer $(veo-replay token ...)"`.
    Token(TokenArgs),
    /// Replay an access log or synthetic overload and summarize the decisions per tier.
    Run(Box<run::RunArgs>),
    /// Check a decisions file against the rolling-window quota rules; exit with status 1 on a
    /// violation.
    Check(run::CheckArgs),
    /// Write a small country database in the MaxMind DB format for Envoy's
    /// geoip filter, mapping single IPv4 addresses to countries, for trials on
    /// loopback addresses.
    GeoipDb {
        /// Output file, such as countries.mmdb.
        #[arg(long)]
        out: PathBuf,
        /// Entries as ADDRESS=COUNTRY, such as 127.0.0.4=DE.
        #[arg(required = true, value_name = "ADDRESS=COUNTRY")]
        entries: Vec<String>,
    },
    /// Write a synthetic access log in the combined format.
    Generate {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Seed of every random choice; the same seed gives the same file.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Lines to write, including one malformed line.
        #[arg(long, default_value_t = 2_500)]
        lines: usize,
        /// Hours of log time the requests spread over.
        #[arg(long, default_value_t = 6)]
        span_hours: u64,
    },
}

/// Options of `veo-replay token`.
#[derive(clap::Args)]
struct TokenArgs {
    /// Signing key written by `keygen` (PKCS#8 PEM).
    #[arg(long)]
    key: PathBuf,
    /// Customer id, the `sub` claim.
    #[arg(long)]
    customer: String,
    /// The `tier` claim.
    #[arg(long, default_value = "basic")]
    tier: String,
    /// The `iss` claim.
    #[arg(long, default_value = DEFAULT_ISSUER)]
    issuer: String,
    /// The `aud` claim.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    audience: String,
    /// Seconds from now to the `exp` claim.
    #[arg(long, default_value_t = 3_600)]
    valid_for_seconds: u64,
}

/// Signs the token `args` describe.
fn mint_token(args: &TokenArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        !args.customer.is_empty(),
        "--customer is empty: give the customer id the token is for"
    );
    anyhow::ensure!(
        args.valid_for_seconds > 0,
        "--valid-for-seconds is 0: give the token's lifetime in seconds, at least 1"
    );
    let key = SigningKey::read_pem(&args.key)?;
    let spec = TokenSpec {
        issuer: args.issuer.clone(),
        audience: args.audience.clone(),
        valid_for_seconds: args.valid_for_seconds,
    };
    Ok(key.mint(&spec, &args.customer, &args.tier)?)
}

fn main() -> ExitCode {
    match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Keygen { dir } => {
            let (_, files) = write_key_files(&dir)?;
            println!("wrote {}", files.signing_key.display());
            println!("wrote {}", files.jwks.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(args) => {
            println!("{}", mint_token(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let runtime = tokio::runtime::Runtime::new().context("failed to start the runtime")?;
            runtime.block_on(run::run(*args))
        }
        Command::Check(args) => run::check_file(&args),
        Command::GeoipDb { out, entries } => {
            let entries = entries
                .iter()
                .map(|entry| parse_country_entry(entry))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let borrowed: Vec<(Ipv4Addr, &str)> = entries
                .iter()
                .map(|(address, country)| (*address, country.as_str()))
                .collect();
            veo_tests::mmdb::write_country_database(&out, &borrowed)?;
            println!("wrote {} with {} addresses", out.display(), borrowed.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            out,
            seed,
            lines,
            span_hours,
        } => {
            let options = GenerateOptions {
                seed,
                lines,
                span_seconds: span_hours * 3_600,
                ..GenerateOptions::default()
            };
            let file = File::create(&out)
                .with_context(|| format!("failed to create {}", out.display()))?;
            let log = generate_access_log(&options, &mut BufWriter::new(file))?;
            println!(
                "wrote {} lines from {} clients to {} (malformed line {})",
                log.lines,
                log.clients,
                out.display(),
                log.malformed_line
            );
            for (address, requests) in &log.heavy_clients {
                println!("heavy client {address}: {requests} requests");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Parses one `ADDRESS=COUNTRY` entry of `geoip-db`.
fn parse_country_entry(entry: &str) -> anyhow::Result<(Ipv4Addr, String)> {
    let Some((address, country)) = entry.split_once('=') else {
        anyhow::bail!("invalid entry {entry:?}: write it as ADDRESS=COUNTRY, such as 127.0.0.4=DE");
    };
    let address: Ipv4Addr = address.trim().parse().map_err(|_| {
        anyhow::anyhow!("invalid entry {entry:?}: {address:?} is not an IPv4 address")
    })?;
    let country = country.trim();
    if country.len() != 2 || !country.bytes().all(|byte| byte.is_ascii_alphabetic()) {
        anyhow::bail!(
            "invalid entry {entry:?}: {country:?} is not a two-letter country code such as DE"
        );
    }
    Ok((address, country.to_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use jwt_simple::prelude::{ECDSAP256PublicKeyLike, VerificationOptions};
    use veo_bench::tokens::TierClaim;

    use super::*;

    fn token_args(dir: &std::path::Path) -> TokenArgs {
        TokenArgs {
            key: dir.join("signing-key.pem"),
            customer: "acme".to_owned(),
            tier: "pro".to_owned(),
            issuer: DEFAULT_ISSUER.to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            valid_for_seconds: 600,
        }
    }

    #[test]
    fn token_carries_customer_and_tier() {
        let dir = tempfile::tempdir().unwrap();
        let (key, _) = write_key_files(dir.path()).unwrap();
        let token = mint_token(&token_args(dir.path())).unwrap();

        let claims = key
            .public_key()
            .verify_token::<TierClaim>(&token, Some(VerificationOptions::default()))
            .unwrap();
        assert_eq!(claims.subject.as_deref(), Some("acme"));
        assert_eq!(claims.custom.tier, "pro");
        assert_eq!(claims.issuer.as_deref(), Some(DEFAULT_ISSUER));
        let lifetime = claims.expires_at.unwrap() - claims.issued_at.unwrap();
        assert_eq!(lifetime.as_secs(), 600);
    }

    #[test]
    fn token_options_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let mut empty = token_args(dir.path());
        empty.customer.clear();
        let error = mint_token(&empty).unwrap_err().to_string();
        assert!(error.contains("--customer"), "{error}");

        let missing = token_args(dir.path());
        let error = format!("{:#}", mint_token(&missing).unwrap_err());
        assert!(error.contains("signing-key.pem"), "{error}");
    }

    #[test]
    fn country_entries_parse_or_name_the_problem() {
        let parsed = parse_country_entry(" 127.0.0.4 = de ").unwrap();
        assert_eq!(parsed, (Ipv4Addr::new(127, 0, 0, 4), "DE".to_owned()));

        let cases = [
            ("127.0.0.4", "ADDRESS=COUNTRY"),
            ("1.2.3=DE", "not an IPv4 address"),
            ("::1=DE", "not an IPv4 address"),
            ("127.0.0.4=DEU", "two-letter"),
            ("127.0.0.4=", "two-letter"),
        ];
        for (entry, expected) in cases {
            let error = parse_country_entry(entry).unwrap_err().to_string();
            assert!(error.contains(expected), "{entry}: {error}");
        }
    }
}
