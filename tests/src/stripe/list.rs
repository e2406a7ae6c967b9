//! Stripe's list object (`{"object": "list", "data", "has_more", "url"}`)
//! with cursor pagination by `limit`, `starting_after` and `ending_before`.

use serde_json::{Value, json};

use super::error::ApiError;
use super::form::Params;

/// Default page size of Stripe's list endpoints.
const DEFAULT_LIMIT: usize = 10;
/// Maximum page size on Stripe.
const MAX_LIMIT: usize = 100;

/// Returns one page of `items`, which are `(id, object)` pairs in list
/// order, as a list object whose `url` is `url`.
///
/// `object_name` names the objects in the error for an unknown cursor, as in
/// Stripe's `No such billing meter: 'mtr_x'`.
pub(crate) fn page(
    items: Vec<(String, Value)>,
    params: &Params,
    url: &str,
    object_name: &str,
) -> Result<Value, ApiError> {
    let limit = match params.integer("limit")? {
        None => DEFAULT_LIMIT,
        Some(limit) => usize::try_from(limit)
            .ok()
            .filter(|limit| (1..=MAX_LIMIT).contains(limit))
            .ok_or_else(|| {
                ApiError::invalid_param(
                    "limit",
                    format!("Invalid limit {limit}: it must be between 1 and {MAX_LIMIT}."),
                )
            })?,
    };
    let starting_after = params.get("starting_after");
    let ending_before = params.get("ending_before");
    let cursor_index = |param: &str, id: &str| {
        items
            .iter()
            .position(|(item_id, _)| item_id == id)
            .ok_or_else(|| {
                ApiError::resource_missing(400, param, format!("No such {object_name}: '{id}'"))
            })
    };

    let (range, has_more) = match (starting_after, ending_before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::parameters_exclusive(
                "starting_after",
                "ending_before",
            ));
        }
        (Some(id), None) => {
            let start = cursor_index("starting_after", id)? + 1;
            let end = (start + limit).min(items.len());
            (start..end, end < items.len())
        }
        (None, Some(id)) => {
            let end = cursor_index("ending_before", id)?;
            let start = end.saturating_sub(limit);
            (start..end, start > 0)
        }
        (None, None) => {
            let end = limit.min(items.len());
            (0..end, end < items.len())
        }
    };

    let data: Vec<Value> = items
        .into_iter()
        .skip(range.start)
        .take(range.len())
        .map(|(_, object)| object)
        .collect();
    Ok(json!({
        "object": "list",
        "data": data,
        "has_more": has_more,
        "url": url,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(count: usize) -> Vec<(String, Value)> {
        (0..count)
            .map(|index| {
                (
                    format!("obj_{index}"),
                    json!({ "id": format!("obj_{index}") }),
                )
            })
            .collect()
    }

    fn ids(list: &Value) -> Vec<String> {
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|object| object["id"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn page_walks_forward_with_starting_after() {
        let first = page(items(5), &Params::parse("limit=2").unwrap(), "/v1/x", "x").unwrap();
        assert_eq!(ids(&first), ["obj_0", "obj_1"]);
        assert_eq!(first["has_more"], true);

        let params = Params::parse("limit=2&starting_after=obj_3").unwrap();
        let last = page(items(5), &params, "/v1/x", "x").unwrap();
        assert_eq!(ids(&last), ["obj_4"]);
        assert_eq!(last["has_more"], false);
        assert_eq!(last["url"], "/v1/x");
    }

    #[test]
    fn page_walks_back_with_ending_before() {
        let params = Params::parse("limit=2&ending_before=obj_3").unwrap();
        let list = page(items(5), &params, "/v1/x", "x").unwrap();
        assert_eq!(ids(&list), ["obj_1", "obj_2"]);
        assert_eq!(list["has_more"], true);
    }

    #[test]
    fn page_rejects_bad_limit_and_cursor() {
        for query in ["limit=0", "limit=101", "limit=x", "starting_after=obj_9"] {
            let params = Params::parse(query).unwrap();
            assert!(page(items(3), &params, "/v1/x", "x").is_err(), "{query}");
        }
        let both = Params::parse("starting_after=obj_1&ending_before=obj_2").unwrap();
        let error = page(items(3), &both, "/v1/x", "x").unwrap_err();
        assert_eq!(error.code, Some("parameters_exclusive"));
    }
}
