//! Stripe webhook endpoint: signature verification and tier changes.
