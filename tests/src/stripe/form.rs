//! Parameters of a Stripe request: an `application/x-www-form-urlencoded`
//! body or query string with Stripe's bracket notation
//! (`payload[value]=5`, `metadata[tier]=pro`, `expand[0]=data`).

use std::collections::BTreeMap;

use super::error::ApiError;

/// Decoded name and value pairs, in the order they were sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Decodes `name=value&...`, where `+` is a space and `%XX` a byte.
    pub(crate) fn parse(text: &str) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for pair in text.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            pairs.push((decode(name)?, decode(value)?));
        }
        Ok(Self { pairs })
    }

    /// Returns the last value sent for `name`.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Returns the value of `name`, or a `parameter_missing` error when it is
    /// absent or empty.
    pub(crate) fn required(&self, name: &str) -> Result<&str, ApiError> {
        match self.get(name) {
            Some(value) if !value.is_empty() => Ok(value),
            _ => Err(ApiError::parameter_missing(name)),
        }
    }

    /// Returns the integer value of `name` when it is present.
    pub(crate) fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .parse::<i64>()
                .map(Some)
                .map_err(|_| ApiError::invalid_integer(name, value)),
        }
    }

    /// Returns the integer value of `name`, or `parameter_missing`.
    pub(crate) fn required_integer(&self, name: &str) -> Result<i64, ApiError> {
        self.integer(name)?
            .ok_or_else(|| ApiError::parameter_missing(name))
    }

    /// Returns the children of hash parameter `parent`: `parent[key]=value`
    /// becomes `key => value`.
    pub(crate) fn nested(&self, parent: &str) -> BTreeMap<String, String> {
        let mut children = BTreeMap::new();
        for (name, value) in &self.pairs {
            let child = name
                .strip_prefix(parent)
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.strip_suffix(']'));
            if let Some(key) = child {
                children.insert(key.to_owned(), value.clone());
            }
        }
        children
    }

    /// Rejects a parameter whose top-level name is not in `allowed`, as
    /// Stripe does with `parameter_unknown`.
    pub(crate) fn reject_unknown(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for (name, _) in &self.pairs {
            let top_level = name.split('[').next().unwrap_or(name);
            if !allowed.contains(&top_level) {
                return Err(ApiError::parameter_unknown(name));
            }
        }
        Ok(())
    }

    /// Returns the pairs sorted by name and value, so that two requests with
    /// the same parameters in another order compare equal.
    pub(crate) fn canonical(&self) -> Vec<(String, String)> {
        let mut pairs = self.pairs.clone();
        pairs.sort();
        pairs
    }
}

/// Decodes one form component.
fn decode(component: &str) -> Result<String, ApiError> {
    let invalid = || {
        ApiError::invalid_body(format!(
            "invalid form encoding in `{component}`: expected `%` followed by two hex digits \
             and UTF-8 text"
        ))
    };
    let bytes = component.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => decoded.push(b' '),
            b'%' => {
                let hex = bytes.get(index + 1..index + 3).ok_or_else(invalid)?;
                let text = std::str::from_utf8(hex).map_err(|_| invalid())?;
                decoded.push(u8::from_str_radix(text, 16).map_err(|_| invalid())?);
                index += 2;
            }
            byte => decoded.push(byte),
        }
        index += 1;
    }
    String::from_utf8(decoded).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_decodes_brackets_and_spaces() {
        let params =
            Params::parse("payload%5Bstripe_customer_id%5D=cus_1&payload[value]=5&name=a+b%20c")
                .unwrap();
        let payload = params.nested("payload");
        assert_eq!(
            payload.get("stripe_customer_id").map(String::as_str),
            Some("cus_1")
        );
        assert_eq!(payload.get("value").map(String::as_str), Some("5"));
        assert_eq!(params.get("name"), Some("a b c"));
    }

    #[test]
    fn parse_rejects_truncated_escape() {
        assert!(Params::parse("name=%4").is_err());
        assert!(Params::parse("name=%zz").is_err());
        assert!(Params::parse("name=%ff").is_err());
    }

    #[test]
    fn nested_ignores_similar_names() {
        let params = Params::parse("metadata[tier]=pro&metadata_x[a]=1&metadata=").unwrap();
        let metadata = params.nested("metadata");
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata.get("tier").map(String::as_str), Some("pro"));
    }

    #[test]
    fn reject_unknown_names_the_parameter() {
        let params = Params::parse("event_name=a&payload[value]=1&colour=red").unwrap();
        let error = params
            .reject_unknown(&["event_name", "payload"])
            .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("colour"));
    }

    #[test]
    fn required_rejects_empty_value() {
        let params = Params::parse("event_name=").unwrap();
        assert!(params.required("event_name").is_err());
        assert!(params.required("identifier").is_err());
    }

    #[test]
    fn canonical_ignores_order() {
        let first = Params::parse("a=1&b=2").unwrap();
        let second = Params::parse("b=2&a=1").unwrap();
        assert_eq!(first.canonical(), second.canonical());
    }
}
