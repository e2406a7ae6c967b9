//! Stripe's error responses: `{"error": {"type", "code", "param", "message",
//! "doc_url"}}` with the HTTP status Stripe uses for each case.

use serde_json::{Map, Value};

/// Value of `error.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorType {
    /// A failure inside Stripe (HTTP 500).
    Api,
    /// An idempotency key reused with other parameters.
    Idempotency,
    /// Invalid parameters, missing objects, authentication and rate limits.
    InvalidRequest,
}

impl ErrorType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Api => "api_error",
            Self::Idempotency => "idempotency_error",
            Self::InvalidRequest => "invalid_request_error",
        }
    }
}

/// An error response of the fake.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Value of `error.type`.
    pub error_type: ErrorType,
    /// Value of `error.code`, one of Stripe's error codes.
    pub code: Option<&'static str>,
    /// Value of `error.param`: the request parameter at fault.
    pub param: Option<String>,
    /// Value of `error.message`.
    pub message: String,
    /// Value of the `Stripe-Should-Retry` response header, when sent.
    pub should_retry: Option<bool>,
    /// Whether the response is saved under the request's idempotency key.
    /// Stripe saves no result when parameters fail validation, because the
    /// endpoint never started executing.
    pub saved_for_replay: bool,
}

impl ApiError {
    fn invalid_request(status: u16, param: Option<&str>, message: String) -> Self {
        Self {
            status,
            error_type: ErrorType::InvalidRequest,
            code: None,
            param: param.map(str::to_owned),
            message,
            should_retry: None,
            saved_for_replay: false,
        }
    }

    fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Returns `parameter_missing` for an absent required parameter.
    pub(crate) fn parameter_missing(param: &str) -> Self {
        Self::invalid_request(
            400,
            Some(param),
            format!("Missing required param: {param}."),
        )
        .with_code("parameter_missing")
    }

    /// Returns `parameter_unknown` for a parameter the endpoint does not take.
    pub(crate) fn parameter_unknown(param: &str) -> Self {
        Self::invalid_request(
            400,
            Some(param),
            format!("Received unknown parameter: {param}"),
        )
        .with_code("parameter_unknown")
    }

    /// Returns `parameter_invalid_integer` for a value that is not an integer.
    pub(crate) fn invalid_integer(param: &str, value: &str) -> Self {
        Self::invalid_request(400, Some(param), format!("Invalid integer: {value}"))
            .with_code("parameter_invalid_integer")
    }

    /// Returns an error without code for any other invalid parameter value.
    pub(crate) fn invalid_param(param: &str, message: String) -> Self {
        Self::invalid_request(400, Some(param), message)
    }

    /// Returns the error for a request that cannot be decoded.
    pub(crate) fn invalid_body(message: String) -> Self {
        Self::invalid_request(400, None, message)
    }

    /// Returns `parameters_exclusive` for two parameters that exclude each other.
    pub(crate) fn parameters_exclusive(first: &str, second: &str) -> Self {
        Self::invalid_request(
            400,
            Some(first),
            format!("You may only specify one of these parameters: {first}, {second}."),
        )
        .with_code("parameters_exclusive")
    }

    /// Returns `resource_missing` for an object that does not exist. Stripe
    /// returns 404 when the id is in the URL and 400 when it is a parameter.
    pub(crate) fn resource_missing(status: u16, param: &str, message: String) -> Self {
        Self {
            saved_for_replay: true,
            ..Self::invalid_request(status, Some(param), message).with_code("resource_missing")
        }
    }

    /// Returns `resource_already_exists` for an object whose unique value is
    /// taken, with `Stripe-Should-Retry: false` because a retry cannot succeed.
    pub(crate) fn resource_already_exists(param: &str, message: String) -> Self {
        Self {
            should_retry: Some(false),
            saved_for_replay: true,
            ..Self::invalid_request(400, Some(param), message).with_code("resource_already_exists")
        }
    }

    /// Returns the 404 for a method and path that no endpoint serves.
    pub(crate) fn unrecognized_url(method: &str, path: &str) -> Self {
        Self::invalid_request(
            404,
            None,
            format!(
                "Unrecognized request URL ({method}: {path}). Please see https://stripe.com/docs \
                 or we can help at https://support.stripe.com/."
            ),
        )
    }

    /// Returns the 401 for a missing or wrong API key.
    pub(crate) fn authentication(message: String) -> Self {
        Self::invalid_request(401, None, message)
    }

    /// Returns the 400 `idempotency_error` for a key reused with another request.
    pub(crate) fn idempotency(message: String) -> Self {
        Self {
            error_type: ErrorType::Idempotency,
            ..Self::invalid_request(400, None, message)
        }
    }

    /// Returns Stripe's 429 with code `rate_limit`.
    pub(crate) fn rate_limited() -> Self {
        Self::invalid_request(
            429,
            None,
            "Request rate limit exceeded. You can learn more about rate limits here \
             https://stripe.com/docs/rate-limits."
                .to_owned(),
        )
        .with_code("rate_limit")
    }

    /// Returns the 500 `api_error` of a failure inside Stripe.
    pub(crate) fn internal() -> Self {
        Self {
            error_type: ErrorType::Api,
            ..Self::invalid_request(
                500,
                None,
                "An unknown error occurred while processing the request. Retry it with the \
                 same idempotency key."
                    .to_owned(),
            )
        }
    }

    /// Returns the response body `{"error": {...}}`.
    pub(crate) fn to_json(&self) -> Value {
        let mut error = Map::new();
        error.insert("type".to_owned(), self.error_type.as_str().into());
        error.insert("message".to_owned(), self.message.clone().into());
        if let Some(code) = self.code {
            error.insert("code".to_owned(), code.into());
            let doc_url = format!(
                "https://stripe.com/docs/error-codes/{}",
                code.replace('_', "-")
            );
            error.insert("doc_url".to_owned(), doc_url.into());
        }
        if let Some(param) = &self.param {
            error.insert("param".to_owned(), param.clone().into());
        }
        let mut body = Map::new();
        body.insert("error".to_owned(), Value::Object(error));
        Value::Object(body)
    }
}

/// Masks an API key for error messages the way Stripe does: the
/// `sk_test_`-style prefix and the last four characters stay, the rest
/// becomes `*`. A key too short to hide anything is masked whole.
pub(crate) fn mask_key(key: &str) -> String {
    let characters: Vec<char> = key.chars().collect();
    let prefix_length = key
        .match_indices('_')
        .nth(1)
        .map_or(0, |(index, _)| key[..=index].chars().count());
    let visible_suffix = 4;
    if characters.len() < prefix_length + visible_suffix + 8 {
        return "*".repeat(characters.len());
    }
    let prefix: String = characters[..prefix_length].iter().collect();
    let suffix: String = characters[characters.len() - visible_suffix..]
        .iter()
        .collect();
    let hidden = characters.len() - prefix_length - visible_suffix;
    format!("{prefix}{}{suffix}", "*".repeat(hidden))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_key_keeps_prefix_and_last_four() {
        let masked = mask_key("sk_test_abcdefghijklmnop1234");
        assert_eq!(masked, "sk_test_****************1234");
    }

    #[test]
    fn mask_key_hides_short_keys_whole() {
        assert_eq!(mask_key("sk_test_abc1234"), "***************");
        assert_eq!(mask_key("secret"), "******");
    }

    #[test]
    fn error_json_has_stripe_shape() {
        let body =
            ApiError::resource_missing(404, "id", "No such customer: 'cus_x'".into()).to_json();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "resource_missing");
        assert_eq!(body["error"]["param"], "id");
        assert_eq!(
            body["error"]["doc_url"],
            "https://stripe.com/docs/error-codes/resource-missing"
        );
    }
}
