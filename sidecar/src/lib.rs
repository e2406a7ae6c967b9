//! Veo Edge sidecar: the usage ledger beside each Envoy.
//!
//! It applies the filter's usage batches idempotently to an embedded SQLite
//! store, reports to each Envoy instance what the other instances admitted within
//! the current window, and serves usage queries, all over one gRPC port.

pub mod admin_cli;
pub mod admin_service;
pub mod allowance;
pub mod assets;
pub mod audit;
pub mod billing;
pub mod cli;
pub mod config;
pub mod counters;
pub mod erasure;
pub mod http;
pub mod identity;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod privacy;
pub mod pushes;
pub mod remote;
pub mod server;
pub mod status;
pub mod store;
pub mod sync_service;
pub mod usage_service;
pub mod validate;

/// Formats an error followed by its chain of causes, separated by `: `. A
/// cause whose text the message already ends with is left out, since many
/// errors repeat their source's text in their own.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !text.ends_with(&next_text) {
            text.push_str(": ");
            text.push_str(&next_text);
        }
        cause = next.source();
    }
    text
}
