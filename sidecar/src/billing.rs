//! Billing: usage from the ledger to Stripe metered billing exactly once,
//! Stripe webhooks that set customer tiers, and reconciliation.

pub mod webhook;
