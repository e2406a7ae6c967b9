//! Veo Edge's proxy-wasm filter.
//!
//! The core (everything but `shell`) is plain Rust that reaches Envoy only
//! through [`host::Host`], so it runs natively in unit tests. The `shell`
//! module, built only for wasm32, wires the core to proxy-wasm. The same
//! module runs in two roles: the HTTP filter ([`filter::Filter`]) on every
//! worker, and the usage sync ([`sync::Sync`]) as a singleton on the main
//! thread.

#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod filter;
pub mod geo;
pub mod host;
pub mod jwt;
pub mod limiter;
pub mod metrics;
pub mod response;
pub mod sync;
pub mod token_cache;
pub mod usage;

#[cfg(target_arch = "wasm32")]
mod shell;

#[cfg(test)]
mod testing;

/// Crate name and version, as the VM start log line shows them.
pub const NAME_AND_VERSION: &str = concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION"));
