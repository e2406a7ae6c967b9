//! Load-testing tools for Veo Edge: an access-log parser, JWT minting, tier assignment,
//! a replay engine that drives Envoy with real or synthetic traffic, the decisions file it
//! writes, and an oracle that checks those decisions against the rolling-window quota rules.
//!
//! The `veo-replay` binary is a command line over this library; the end-to-end tests use it
//! directly:
//!
//! ```no_run
//! use veo_bench::{access_log, limits::TierLimits, oracle, replay, tiers, tokens};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let key = tokens::SigningKey::generate();
//! // Put `key.jwks()` into the filter's `jwt.jwks` and start Envoy, then:
//! let log = access_log::read_access_log("access.log".as_ref())?;
//! for malformed in &log.malformed {
//!     eprintln!("skipped {malformed}");
//! }
//! let plan = replay::plan_from_log(&log.entries, &tiers::TierAssignment::seeded(1), 1000.0)?;
//! let options = replay::ReplayOptions::new("http://127.0.0.1:10000");
//! let outcome = replay::run_replay(plan, &key, &options).await?;
//!
//! let report = oracle::check_decisions(&outcome.decisions, &TierLimits::default_tiers(), 0.5);
//! assert!(report.passed(), "{:?}", report.violations);
//! # Ok(())
//! # }
//! ```

pub mod access_log;
pub mod decisions;
pub mod generate;
pub mod limits;
pub mod oracle;
mod random;
pub mod replay;
pub mod summary;
pub mod tiers;
pub mod tokens;
