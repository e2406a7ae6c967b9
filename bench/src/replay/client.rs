//! The HTTP/1.1 client of the replay: one connection pool to the target, a bearer token per
//! request, and the whole response body read so connections are reused.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HeaderValue, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::ReplayError;

/// The parts of one response that the replay keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Response {
    /// HTTP status.
    pub status: u16,
    /// Whether the response carried the filter's `ratelimit` field.
    pub ratelimit_field: bool,
}

/// Sends replayed requests to one `http://host:port` target.
pub(crate) struct TargetClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    base: String,
    timeout: Duration,
}

impl TargetClient {
    /// Builds a client for `target`, an `http://` URL whose path, if any, prefixes every
    /// request path.
    pub(crate) fn new(
        target: &str,
        max_connections: usize,
        timeout: Duration,
    ) -> Result<Self, ReplayError> {
        let invalid = |reason: &str| ReplayError::InvalidTarget {
            target: target.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = target.parse().map_err(|_| invalid("not a valid URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid("only http:// targets are supported"));
        }
        if uri.authority().is_none() {
            return Err(invalid("missing host and port"));
        }

        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_connections)
            .build(connector);
        Ok(TargetClient {
            client,
            base: target.trim_end_matches('/').to_string(),
            timeout,
        })
    }

    /// Sends one request and returns the response status, or a description of why no
    /// response arrived.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        token: &str,
    ) -> Result<Response, String> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("invalid method {method:?}"))?;
        let uri = self.request_uri(path)?;
        let authorization = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "token is not a valid header value".to_string())?;
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(AUTHORIZATION, authorization)
            .header(USER_AGENT, "veo-replay")
            .body(Empty::new())
            .map_err(|error| format!("failed to build request: {error}"))?;

        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("request failed: {}", error_chain(&error)))?;
            let status = response.status().as_u16();
            let ratelimit_field = response.headers().contains_key("ratelimit");
            response
                .into_body()
                .collect()
                .await
                .map_err(|error| format!("failed to read response body: {error}"))?;
            Ok(Response {
                status,
                ratelimit_field,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("timed out after {} ms", self.timeout.as_millis()))?
    }

    fn request_uri(&self, path: &str) -> Result<Uri, String> {
        // Absolute-form targets (`GET http://host/path`) keep only their path.
        let path = match path.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |start| &rest[start..]),
            None => path,
        };
        let direct = format!("{}{path}", self.base);
        if let Ok(uri) = direct.parse() {
            return Ok(uri);
        }
        let encoded = format!("{}{}", self.base, percent_encode_path(path));
        encoded
            .parse()
            .map_err(|_| format!("request path {path:?} cannot be sent as a URL"))
    }
}

/// Percent-encodes the bytes that `http::Uri` rejects in a path and query.
fn percent_encode_path(path: &str) -> String {
    let mut encoded = String::with_capacity(path.len());
    for byte in path.bytes() {
        let allowed = byte.is_ascii_alphanumeric() || b"/?&=%-._~:@!$'()*+,;[]".contains(&byte);
        if allowed {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> TargetClient {
        TargetClient::new("http://127.0.0.1:9/", 4, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn rejects_non_http_targets() {
        for target in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "not a url",
            "http:///x",
        ] {
            assert!(
                TargetClient::new(target, 1, Duration::from_secs(1)).is_err(),
                "{target} was accepted"
            );
        }
    }

    #[test]
    fn joins_target_and_path() {
        let uri = client()
            .request_uri("/videos/1/manifest.m3u8?q=hd")
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "http://127.0.0.1:9/videos/1/manifest.m3u8?q=hd"
        );
    }

    #[test]
    fn absolute_form_keeps_path() {
        let uri = client().request_uri("http://example.com/a/b").unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/a/b");
    }

    #[test]
    fn encodes_characters_uri_rejects() {
        let uri = client().request_uri("/search?q=a b|\"c\"{}").unwrap();
        assert_eq!(
            uri.path_and_query().unwrap().as_str(),
            "/search?q=a%20b%7C%22c%22%7B%7D"
        );
    }

    #[tokio::test]
    async fn reports_refused_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let client = TargetClient::new(
            &format!("http://127.0.0.1:{port}"),
            1,
            Duration::from_secs(2),
        )
        .unwrap();
        let error = client.send("GET", "/", "token").await.unwrap_err();
        assert!(error.starts_with("request failed"), "{error}");
    }
}
