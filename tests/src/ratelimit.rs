//! Parses the `RateLimit` and `RateLimit-Policy` response fields: one
//! structured-field list item, a quoted policy name with parameters such as
//! `"basic";r=0;t=3`.

use std::collections::BTreeMap;

/// One item of a `RateLimit` or `RateLimit-Policy` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitItem {
    /// Policy name, without quotes.
    pub name: String,
    /// Parameters by key, such as `q`, `w`, `r` and `t`.
    pub params: BTreeMap<String, String>,
}

impl RateLimitItem {
    /// Returns parameter `key` as an integer.
    pub fn integer(&self, key: &str) -> Option<u64> {
        self.params.get(key)?.parse().ok()
    }
}

/// Parses the first item of a field value; `None` when it is not a quoted
/// name followed by `;key=value` parameters.
pub fn parse_item(value: &str) -> Option<RateLimitItem> {
    let item = value.split(',').next()?.trim();
    let mut parts = item.split(';');
    let name = parts.next()?.trim();
    let name = name.strip_prefix('"')?.strip_suffix('"')?.to_owned();
    let mut params = BTreeMap::new();
    for part in parts {
        let (key, value) = part.trim().split_once('=')?;
        params.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Some(RateLimitItem { name, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy_item() {
        let item = parse_item("\"basic\";q=60;w=60").unwrap();
        assert_eq!(item.name, "basic");
        assert_eq!(item.integer("q"), Some(60));
        assert_eq!(item.integer("w"), Some(60));
    }

    #[test]
    fn rejects_unquoted_name() {
        assert_eq!(parse_item("basic;q=60"), None);
    }
}
