//! Harness of the end-to-end tests: starts the real sidecar, real Envoy with
//! the built filter and an echo upstream on loopback ports, mints tokens, and
//! stops every process and removes every temporary folder when dropped.
//!
//! Envoy, the filter module and the binaries are found through environment
//! variables that `cargo xtask test` sets (see [`artifacts`]). A test whose
//! artifact is missing fails with a message naming that command.

pub mod artifacts;
pub mod client;
pub mod envoy;
pub mod error;
pub mod fleet;
pub mod health;
pub mod mmdb;
pub mod plugin;
pub mod process;
pub mod prometheus;
pub mod ratelimit;
pub mod redis;
pub mod replay;
pub mod residency;
pub mod sidecar;
pub mod stack;
pub mod stripe;
pub mod sync_api;
pub mod tokens;
pub mod upstream;

pub use error::HarnessError;
pub use fleet::{Fleet, FleetOptions};
pub use redis::{RedisCluster, RedisServer};
pub use stack::{Stack, StackOptions};
