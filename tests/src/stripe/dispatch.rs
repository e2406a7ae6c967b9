//! One API request from start to end: authentication, injected failures,
//! idempotency keys, routing to an endpoint and counting the response.

use serde_json::Value;

use super::error::{ApiError, mask_key};
use super::form::Params;
use super::ids::random_id;
use super::state::{InjectedFailure, SavedResponse, State};
use super::{customers, meter_events, meters};

/// Maximum length of an idempotency key on Stripe.
const MAX_IDEMPOTENCY_KEY_LENGTH: usize = 255;

/// The parts of an HTTP request the fake reads.
#[derive(Debug, Clone)]
pub(crate) struct ApiRequest {
    /// HTTP method in upper case.
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// Query string without `?`.
    pub query: String,
    /// Value of the `Authorization` header.
    pub authorization: Option<String>,
    /// Value of the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// Body as text.
    pub body: String,
}

/// A response before it becomes HTTP.
#[derive(Debug, Clone)]
pub(crate) struct ApiResponse {
    pub status: u16,
    pub body: Value,
    /// `Request-Id` header.
    pub request_id: String,
    /// `Stripe-Should-Retry` header.
    pub should_retry: Option<bool>,
    /// `Request-Id` of the first request when this response is a replay,
    /// sent as `Original-Request` beside `Idempotent-Replayed: true`.
    pub replay_of: Option<String>,
}

impl ApiResponse {
    fn from_result(result: &Result<Value, ApiError>, request_id: String) -> Self {
        match result {
            Ok(body) => Self {
                status: 200,
                body: body.clone(),
                request_id,
                should_retry: None,
                replay_of: None,
            },
            Err(error) => Self::from_error(error, request_id),
        }
    }

    fn from_error(error: &ApiError, request_id: String) -> Self {
        Self {
            status: error.status,
            body: error.to_json(),
            request_id,
            should_retry: error.should_retry,
            replay_of: None,
        }
    }
}

/// Handles `request` and counts its response by path and status.
pub(crate) fn process(state: &mut State, request: &ApiRequest) -> ApiResponse {
    state.expire();
    let request_id = random_id("req_");
    let response = respond(state, request, request_id);
    state.count_request(&request.path, response.status);
    response
}

fn respond(state: &mut State, request: &ApiRequest, request_id: String) -> ApiResponse {
    if let Err(error) = authenticate(state, request.authorization.as_deref()) {
        return ApiResponse::from_error(&error, request_id);
    }
    let failure = state.take_failure(&request.path);
    match failure {
        Some(InjectedFailure::RateLimited) => {
            return ApiResponse::from_error(&ApiError::rate_limited(), request_id);
        }
        Some(InjectedFailure::ServerError) => {
            return ApiResponse::from_error(&ApiError::internal(), request_id);
        }
        Some(InjectedFailure::LostReply | InjectedFailure::SavedServerError) | None => {}
    }

    let post = request.method == "POST";
    let params_text = if post { &request.body } else { &request.query };
    let params = match Params::parse(params_text) {
        Ok(params) => params,
        Err(error) => return ApiResponse::from_error(&error, request_id),
    };
    // Stripe applies idempotency keys to POST requests only.
    let response = match request.idempotency_key.as_deref() {
        Some(key) if post => {
            let saved_error = failure == Some(InjectedFailure::SavedServerError);
            respond_idempotent(state, request, &params, key, request_id, saved_error)
        }
        _ => {
            let result = route(state, request, &params);
            ApiResponse::from_result(&result, request_id)
        }
    };

    if failure == Some(InjectedFailure::LostReply) {
        // The effect and the response saved under the idempotency key stay,
        // so only the client sees a failure.
        return ApiResponse::from_error(&ApiError::internal(), response.request_id);
    }
    response
}

fn authenticate(state: &State, authorization: Option<&str>) -> Result<(), ApiError> {
    let Some(authorization) = authorization else {
        return Err(ApiError::authentication(
            "You did not provide an API key. You need to provide your API key in the \
             Authorization header, using Bearer auth (e.g. 'Authorization: Bearer \
             YOUR_SECRET_KEY')."
                .to_owned(),
        ));
    };
    let Some(key) = authorization.strip_prefix("Bearer ") else {
        return Err(ApiError::authentication(
            "Invalid Authorization header: expected Bearer auth ('Authorization: Bearer \
             YOUR_SECRET_KEY')."
                .to_owned(),
        ));
    };
    if key.trim() != state.api_key {
        return Err(ApiError::authentication(format!(
            "Invalid API Key provided: {}",
            mask_key(key.trim())
        )));
    }
    Ok(())
}

/// Replays the response saved under `key`, or runs the request and saves
/// its response when Stripe would. With `saved_error` a request that is
/// not a replay gets a 500 instead of running, and the 500 is saved.
fn respond_idempotent(
    state: &mut State,
    request: &ApiRequest,
    params: &Params,
    key: &str,
    request_id: String,
    saved_error: bool,
) -> ApiResponse {
    if key.chars().count() > MAX_IDEMPOTENCY_KEY_LENGTH {
        let error = ApiError::invalid_body(format!(
            "Invalid Idempotency-Key: it can be at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters \
             long."
        ));
        return ApiResponse::from_error(&error, request_id);
    }
    let endpoint = format!("{} {}", request.method, request.path);
    let canonical = params.canonical();

    if let Some(saved) = state.idempotency.get(key) {
        let mismatch = if saved.endpoint != endpoint {
            Some(format!(
                "Keys for idempotent requests can only be used for the same endpoint they were \
                 first used for ('{}' vs '{endpoint}'). Try using a key other than '{key}' if \
                 you meant to execute a different request.",
                saved.endpoint
            ))
        } else if saved.params != canonical {
            Some(format!(
                "Keys for idempotent requests can only be used with the same parameters they \
                 were first used with. Try using a key other than '{key}' if you meant to \
                 execute a different request."
            ))
        } else {
            None
        };
        if let Some(message) = mismatch {
            return ApiResponse::from_error(&ApiError::idempotency(message), request_id);
        }
        return ApiResponse {
            status: saved.status,
            body: saved.body.clone(),
            request_id,
            should_retry: saved.should_retry,
            replay_of: Some(saved.request_id.clone()),
        };
    }

    let result = if saved_error {
        Err(ApiError {
            saved_for_replay: true,
            ..ApiError::internal()
        })
    } else {
        route(state, request, params)
    };
    let response = ApiResponse::from_result(&result, request_id);
    let saved = match &result {
        Ok(_) => true,
        Err(error) => error.saved_for_replay,
    };
    if saved {
        let saved_at = state.now();
        state.idempotency.insert(
            key.to_owned(),
            SavedResponse {
                endpoint,
                params: canonical,
                status: response.status,
                body: response.body.clone(),
                should_retry: response.should_retry,
                request_id: response.request_id.clone(),
                saved_at,
            },
        );
    }
    response
}

/// Runs the endpoint that serves the request's method and path.
fn route(state: &mut State, request: &ApiRequest, params: &Params) -> Result<Value, ApiError> {
    let segments: Vec<&str> = request.path.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), segments.as_slice()) {
        ("POST", ["v1", "billing", "meter_events"]) => meter_events::create(state, params),
        ("GET", ["v1", "billing", "meters"]) => meters::list(state, params),
        ("GET", ["v1", "billing", "meters", id]) => meters::retrieve(state, id, params),
        ("GET", ["v1", "billing", "meters", id, "event_summaries"]) => {
            meters::event_summaries(state, id, params)
        }
        ("GET", ["v1", "customers", id]) => customers::retrieve(state, id, params),
        ("POST", ["v1", "customers", id]) => customers::update(state, id, params),
        _ => Err(ApiError::unrecognized_url(&request.method, &request.path)),
    }
}
