//! HTTP/1.1 client for the tests: plain GET requests to one loopback address,
//! on pooled or on fresh connections, optionally from a chosen source address.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::HarnessError;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A response with its body read to the end.
#[derive(Debug, Clone)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body, decoded as UTF-8 with replacement characters.
    pub body: String,
}

impl Reply {
    /// Returns the value of header `name` when it is present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Parses the body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, HarnessError> {
        serde_json::from_str(&self.body).map_err(|err| HarnessError::Request {
            target: "response body".to_owned(),
            reason: format!("invalid JSON ({err}): {}", self.body),
        })
    }
}

/// Client of one `http://address`.
#[derive(Debug, Clone)]
pub struct HttpClient {
    address: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl HttpClient {
    /// Returns a client that reuses idle connections.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Returns a client that opens a new connection for every request, so
    /// that requests spread over Envoy's worker threads.
    pub fn fresh_connections(address: SocketAddr) -> Self {
        Self {
            address,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
        }
    }

    /// Returns a client that reuses idle connections and binds each
    /// connection to `source`, such as 127.0.0.2, so that address is the
    /// downstream address at the server. Linux routes all of 127.0.0.0/8 to the loopback
    /// interface, so any such address works without setup.
    pub fn from_source(address: SocketAddr, source: IpAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_local_address(Some(source));
        Self {
            address,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    /// Sends `GET path` with `headers` and reads the whole response.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<Reply, HarnessError> {
        self.send(Method::GET, path, headers).await
    }

    /// Sends `POST path` without a body and reads the whole response.
    pub async fn post(&self, path: &str) -> Result<Reply, HarnessError> {
        self.send(Method::POST, path, &[]).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, HarnessError> {
        let target = format!("http://{}{path}", self.address);
        let request_error = |reason: String| HarnessError::Request {
            target: target.clone(),
            reason,
        };

        let mut request = hyper::Request::builder()
            .method(method)
            .uri(target.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|err| request_error(err.to_string()))?;
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|err| request_error(format!("header name {name}: {err}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|err| request_error(format!("value of header {name}: {err}")))?;
            request.headers_mut().append(name, value);
        }

        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| request_error(format!("no response in {REQUEST_TIMEOUT:?}")))?
            .map_err(|err| request_error(crate::error::chain(&err)))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| request_error(err.to_string()))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Sends `GET path` with `Authorization: Bearer token` and `headers`.
    pub async fn get_with_token(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, HarnessError> {
        let authorization = format!("Bearer {token}");
        let mut all = vec![("authorization", authorization.as_str())];
        all.extend_from_slice(headers);
        self.get(path, &all).await
    }
}

/// Sends `count` requests one after another with `token`, as one client in a
/// rapid burst, and returns the replies in order.
pub async fn burst(
    client: &HttpClient,
    token: &str,
    count: usize,
) -> Result<Vec<Reply>, HarnessError> {
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        replies.push(client.get_with_token("/", token, &[]).await?);
    }
    Ok(replies)
}

/// Returns how many replies have status `status`.
pub fn count_status(replies: &[Reply], status: u16) -> usize {
    replies
        .iter()
        .filter(|reply| reply.status == status)
        .count()
}
