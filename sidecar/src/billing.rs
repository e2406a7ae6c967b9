//! Billing: usage from the ledger to Stripe metered billing exactly once,
//! Stripe webhooks that set customer tiers, and reconciliation.
//!
//! Each batch marks its minutes in the store. Once a minute has closed, the
//! [`biller`] turns its usage into one meter event per customer and meter,
//! with an identifier derived from the ledger, customer, meter and minute,
//! and sends the queue in order. A retry, a restart or a lost reply sends
//! the same identifier again, which Stripe records once.

pub mod biller;
pub mod customers;
pub mod meter;
pub mod prometheus;
pub mod queue;
pub mod reconcile;
pub mod sink;
pub mod webhook;
