//! Client of Envoy's admin interface: readiness, bound listener ports and
//! stats.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::HarnessError;
use crate::client::{HttpClient, Reply};

/// Client of one Envoy's admin interface.
#[derive(Debug, Clone)]
pub struct Admin {
    address: SocketAddr,
    http: HttpClient,
}

impl Admin {
    /// Returns a client of the admin interface at `address`.
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            http: HttpClient::new(address),
        }
    }

    /// Returns the address of the admin interface.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sends `GET path` to the admin interface.
    pub async fn get(&self, path: &str) -> Result<Reply, HarnessError> {
        self.http.get(path, &[]).await
    }

    /// Sends `POST path` to the admin interface, as its commands such as
    /// `/drain_listeners` require.
    pub async fn post(&self, path: &str) -> Result<Reply, HarnessError> {
        self.http.post(path).await
    }

    /// Returns true when Envoy reports itself live on `/ready`.
    pub async fn is_live(&self) -> bool {
        self.http
            .get("/ready", &[])
            .await
            .is_ok_and(|reply| reply.status == 200)
    }

    /// Returns the port the listener `name` is bound to, or `None` while it
    /// is not bound.
    pub async fn listener_port(&self, name: &str) -> Result<Option<u16>, HarnessError> {
        let reply = self.http.get("/listeners?format=json", &[]).await?;
        let listeners: serde_json::Value =
            serde_json::from_str(&reply.body).map_err(|err| HarnessError::Request {
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

    /// Returns every counter and gauge whose name contains `fragment`.
    pub async fn stats(&self, fragment: &str) -> Result<BTreeMap<String, u64>, HarnessError> {
        let reply = self.http.get("/stats", &[]).await?;
        Ok(parse_stats(&reply.body, fragment))
    }

    /// Polls the stats every 100 ms until each counter in `expected` has its
    /// expected value or `timeout` passes, and returns the last values read,
    /// 0 for a counter not defined yet.
    ///
    /// The filter publishes its counters periodically, so a test waits here
    /// instead of sleeping a guessed time.
    pub async fn await_counters(
        &self,
        expected: &BTreeMap<String, u64>,
        timeout: Duration,
    ) -> Result<BTreeMap<String, u64>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats("").await?;
            let observed: BTreeMap<String, u64> = expected
                .keys()
                .map(|name| (name.clone(), stats.get(name).copied().unwrap_or(0)))
                .collect();
            if &observed == expected || Instant::now() > deadline {
                return Ok(observed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Parses Envoy's text stats (`name: value` per line), keeping the integer
/// values whose name contains `fragment`; histograms are skipped.
fn parse_stats(text: &str, fragment: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| line.split_once(": "))
        .filter(|(name, _)| name.contains(fragment))
        .filter_map(|(name, value)| Some((name.to_owned(), value.trim().parse().ok()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_and_skips_histograms() {
        let text = "veo.requests_total: 12\n\
                    listener.127.0.0.1_80.worker_0.downstream_cx_total: 3\n\
                    veo.latency: P0(nan,1) P25(nan,2)\n";
        let stats = parse_stats(text, "");
        assert_eq!(stats.get("veo.requests_total"), Some(&12));
        assert_eq!(
            stats.get("listener.127.0.0.1_80.worker_0.downstream_cx_total"),
            Some(&3)
        );
        assert!(!stats.contains_key("veo.latency"));
    }

    #[test]
    fn keeps_only_names_with_fragment() {
        let stats = parse_stats("a.veo.x: 1\nb.y: 2\n", "veo");
        assert_eq!(stats.len(), 1);
    }
}
