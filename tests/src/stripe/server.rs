//! HTTP/1.1 side of the fake: reads each request into an [`ApiRequest`] and
//! writes the JSON response with Stripe's headers.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::dispatch::{self, ApiRequest, ApiResponse};
use super::error::ApiError;
use super::ids::random_id;
use super::state::State;

/// Accepts connections until the task running it is aborted.
pub(crate) async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |request| handle(Arc::clone(&state), request));
            // A client that resets its connection ends only that connection.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    let mut api_request = ApiRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        body: String::new(),
    };

    let body = match body.collect().await {
        Ok(collected) => String::from_utf8(collected.to_bytes().to_vec())
            .map_err(|_| "the request body is not UTF-8 text".to_owned()),
        Err(err) => Err(format!("failed to read the request body: {err}")),
    };
    let response = match body {
        Ok(body) => {
            api_request.body = body;
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            dispatch::process(&mut state, &api_request)
        }
        Err(reason) => {
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            state.count_request(&api_request.path, 400);
            let error = ApiError::invalid_body(reason);
            ApiResponse {
                status: error.status,
                body: error.to_json(),
                request_id: random_id("req_"),
                should_retry: None,
                replay_of: None,
            }
        }
    };
    Ok(to_http(response, &parts.headers))
}

fn to_http(response: ApiResponse, request_headers: &HeaderMap) -> Response<Full<Bytes>> {
    let mut http = Response::new(Full::new(Bytes::from(response.body.to_string())));
    *http.status_mut() =
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = http.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    insert_text(headers, "request-id", &response.request_id);
    if let Some(original) = &response.replay_of {
        headers.insert(
            HeaderName::from_static("idempotent-replayed"),
            HeaderValue::from_static("true"),
        );
        insert_text(headers, "original-request", original);
    }
    if let Some(should_retry) = response.should_retry {
        insert_text(headers, "stripe-should-retry", &should_retry.to_string());
    }
    // Stripe echoes these request headers.
    for name in ["idempotency-key", "stripe-version"] {
        if let Some(value) = request_headers.get(name) {
            headers.insert(HeaderName::from_static(name), value.clone());
        }
    }
    http
}

fn insert_text(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(HeaderName::from_static(name), value);
    }
}
