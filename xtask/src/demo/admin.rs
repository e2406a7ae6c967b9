//! Reads from Envoy's admin interface: readiness, bound listener ports and
//! stats.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::error::XtaskError;

/// HTTP/1.1 client of one Envoy's admin interface.
pub struct Admin {
    address: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Admin {
    /// Returns a client of the admin interface at `address`.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Returns the body of `GET path`, failing unless the status is 200.
    pub async fn get(&self, path: &str) -> Result<String, XtaskError> {
        let target = format!("http://{}{path}", self.address);
        let request_error = |reason: String| XtaskError::Request {
            target: target.clone(),
            reason,
        };
        let uri: hyper::Uri = target
            .parse()
            .map_err(|err| request_error(format!("{err}")))?;
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.get(uri))
            .await
            .map_err(|_| request_error("timed out after 5s".to_owned()))?
            .map_err(|err| request_error(err.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|err| request_error(err.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(request_error(format!("status {status}: {text}")))
        }
    }

    /// Returns the port that the listener `name` is bound to, or `None` while
    /// it is not bound yet.
    pub async fn listener_port(&self, name: &str) -> Result<Option<u16>, XtaskError> {
        let text = self.get("/listeners?format=json").await?;
        let listeners: serde_json::Value =
            serde_json::from_str(&text).map_err(|err| XtaskError::Request {
                target: format!("http://{}/listeners", self.address),
                reason: format!("invalid JSON: {err}"),
            })?;
        let port = listeners["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|listener| listener["name"] == name)
            .and_then(|listener| listener["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|port| u16::try_from(port).ok())
            .filter(|port| *port != 0);
        Ok(port)
    }
}
