//! Customers: `GET /v1/customers/{id}` and `POST /v1/customers/{id}`, which
//! merges `metadata[...]` and sets `name`, `email` and `description`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::error::ApiError;
use super::form::Params;
use super::state::State;

/// Stripe's metadata limits: keys per object, key length and value length.
const MAX_METADATA_KEYS: usize = 50;
const MAX_METADATA_KEY_LENGTH: usize = 40;
const MAX_METADATA_VALUE_LENGTH: usize = 500;

/// A customer stored by the fake.
#[derive(Debug, Clone)]
pub(crate) struct Customer {
    pub id: String,
    /// Creation time in Unix seconds.
    pub created: i64,
    pub metadata: BTreeMap<String, String>,
    pub name: Option<String>,
    pub email: Option<String>,
    pub description: Option<String>,
}

impl Customer {
    pub(crate) fn new(id: String, created: i64, metadata: BTreeMap<String, String>) -> Self {
        Self {
            id,
            created,
            metadata,
            name: None,
            email: None,
            description: None,
        }
    }

    /// Returns the customer as Stripe's `customer` object, with every field
    /// of a customer that has no payment details, balance or address.
    pub(crate) fn to_json(&self, livemode: bool) -> Value {
        customer_json(
            &self.id,
            self.created,
            livemode,
            &self.metadata,
            CustomerDetails {
                name: self.name.as_deref(),
                email: self.email.as_deref(),
                description: self.description.as_deref(),
            },
        )
    }
}

/// Optional text fields of a customer object.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CustomerDetails<'a> {
    pub name: Option<&'a str>,
    pub email: Option<&'a str>,
    pub description: Option<&'a str>,
}

/// Returns a `customer` object as Stripe sends it in API responses and
/// `customer.*` events.
pub(crate) fn customer_json(
    id: &str,
    created: i64,
    livemode: bool,
    metadata: &BTreeMap<String, String>,
    details: CustomerDetails<'_>,
) -> Value {
    // Stripe gives each customer its own 8-character invoice prefix, so the
    // first 8 characters of the id stand in for it.
    let invoice_prefix: String = id
        .trim_start_matches("cus_")
        .chars()
        .take(8)
        .collect::<String>()
        .to_uppercase();
    json!({
        "id": id,
        "object": "customer",
        "address": null,
        "balance": 0,
        "created": created,
        "currency": null,
        "default_source": null,
        "delinquent": false,
        "description": details.description,
        "discount": null,
        "email": details.email,
        "invoice_prefix": invoice_prefix,
        "invoice_settings": {
            "custom_fields": null,
            "default_payment_method": null,
            "footer": null,
            "rendering_options": null,
        },
        "livemode": livemode,
        "metadata": metadata,
        "name": details.name,
        "next_invoice_sequence": 1,
        "phone": null,
        "preferred_locales": [],
        "shipping": null,
        "tax_exempt": "none",
        "test_clock": null,
    })
}

/// Handles `GET /v1/customers/{id}`.
pub(crate) fn retrieve(state: &State, id: &str, params: &Params) -> Result<Value, ApiError> {
    params.reject_unknown(&["expand"])?;
    let customer = find(state, id)?;
    Ok(customer.to_json(state.livemode))
}

/// Handles `POST /v1/customers/{id}`. An empty `metadata[key]` removes that
/// key and an empty `metadata` removes all keys, as on Stripe.
pub(crate) fn update(state: &mut State, id: &str, params: &Params) -> Result<Value, ApiError> {
    let existing = find(state, id)?;
    params.reject_unknown(&["metadata", "name", "email", "description", "expand"])?;
    let mut metadata = existing.metadata.clone();
    if params.get("metadata") == Some("") {
        metadata.clear();
    }
    for (key, value) in params.nested("metadata") {
        if value.is_empty() {
            metadata.remove(&key);
        } else {
            check_metadata_entry(&key, &value)?;
            metadata.insert(key, value);
        }
    }
    if metadata.len() > MAX_METADATA_KEYS {
        return Err(ApiError::invalid_param(
            "metadata",
            format!(
                "Metadata can have up to {MAX_METADATA_KEYS} keys; this update would leave {}.",
                metadata.len()
            ),
        ));
    }

    let livemode = state.livemode;
    let customer = state
        .customers
        .get_mut(id)
        .ok_or_else(|| no_such_customer(id))?;
    customer.metadata = metadata;
    for (name, field) in [
        ("name", &mut customer.name),
        ("email", &mut customer.email),
        ("description", &mut customer.description),
    ] {
        if let Some(value) = params.get(name) {
            *field = (!value.is_empty()).then(|| value.to_owned());
        }
    }
    Ok(customer.to_json(livemode))
}

fn find<'a>(state: &'a State, id: &str) -> Result<&'a Customer, ApiError> {
    state.customers.get(id).ok_or_else(|| no_such_customer(id))
}

fn no_such_customer(id: &str) -> ApiError {
    ApiError::resource_missing(404, "id", format!("No such customer: '{id}'"))
}

fn check_metadata_entry(key: &str, value: &str) -> Result<(), ApiError> {
    let param = format!("metadata[{key}]");
    if key.chars().count() > MAX_METADATA_KEY_LENGTH {
        return Err(ApiError::invalid_param(
            &param,
            format!("Metadata keys can be at most {MAX_METADATA_KEY_LENGTH} characters long."),
        ));
    }
    if key.contains(['[', ']']) {
        return Err(ApiError::invalid_param(
            &param,
            "Metadata keys cannot contain square brackets.".to_owned(),
        ));
    }
    if value.chars().count() > MAX_METADATA_VALUE_LENGTH {
        return Err(ApiError::invalid_param(
            &param,
            format!("Metadata values can be at most {MAX_METADATA_VALUE_LENGTH} characters long."),
        ));
    }
    Ok(())
}
