//! gRPC health checks of a sidecar, as Kubernetes or Envoy would send them.

use std::net::SocketAddr;

use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::HarnessError;

/// Serving status of one health service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `SERVING`.
    Serving,
    /// `NOT_SERVING`.
    NotServing,
    /// `SERVICE_UNKNOWN` or `UNKNOWN`.
    Unknown,
}

/// Queries the health service at `address` for the status of `service` (""
/// for the server as a whole).
pub async fn check(address: SocketAddr, service: &str) -> Result<Health, HarnessError> {
    let target = format!("http://{address}");
    let request_error = |reason: String| HarnessError::Request {
        target: target.clone(),
        reason,
    };
    let channel = Endpoint::from_shared(target.clone())
        .map_err(|err| request_error(err.to_string()))?
        .connect()
        .await
        .map_err(|err| request_error(err.to_string()))?;
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|status| request_error(status.to_string()))?;
    Ok(match reply.into_inner().status {
        1 => Health::Serving,
        2 => Health::NotServing,
        _ => Health::Unknown,
    })
}
