//! Paced storage requests for one region, each recorded with the site that
//! served it, so that a test or a benchmark can see when traffic moved.

use std::time::{Duration, Instant};

use super::storage::SITE_HEADER;
use super::{Region, STORAGE_REGION_HEADER};
use crate::client::HttpClient;

/// Path that the probe requests; any path reaches the storage routes.
const PROBE_PATH: &str = "/videos/probe/segment-1.ts";

/// Outcome of one request.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the request was sent.
    pub sent: Instant,
    /// When the response arrived, or the request failed.
    pub done: Instant,
    /// HTTP status, `None` when no response arrived.
    pub status: Option<u16>,
    /// Site that returned the 200, from its response header.
    pub site: Option<String>,
}

impl Sample {
    /// Returns true for a 200 from `site`.
    pub fn served_by(&self, site: &str) -> bool {
        self.site.as_deref() == Some(site)
    }

    /// Returns true unless the response was a 200.
    pub fn failed(&self) -> bool {
        self.status != Some(200)
    }
}

/// Sends storage requests for one region through Envoy.
#[derive(Debug, Clone)]
pub struct Probe {
    client: HttpClient,
    token: String,
    region: Option<Region>,
}

impl Probe {
    /// Returns a probe that sends `token` and, as the filter would for a
    /// locked asset, the storage header of `region`. With `region` `None`
    /// it sends no storage header.
    ///
    /// NOTE: The header is client-sent. The filter passes it through only
    /// while its configuration has no `geo` section. With one, the filter
    /// removes the client's header and sets its own from the asset.
    pub fn new(client: HttpClient, token: &str, region: Option<Region>) -> Self {
        Self {
            client,
            token: token.to_owned(),
            region,
        }
    }

    /// Sends one request and records its outcome.
    pub async fn send(&self) -> Sample {
        let mut headers = Vec::new();
        if let Some(region) = self.region {
            headers.push((STORAGE_REGION_HEADER, region.header_value()));
        }
        let sent = Instant::now();
        let reply = self
            .client
            .get_with_token(PROBE_PATH, &self.token, &headers)
            .await;
        let done = Instant::now();
        match reply {
            Ok(reply) => Sample {
                sent,
                done,
                status: Some(reply.status),
                site: (reply.status == 200)
                    .then(|| reply.header(SITE_HEADER).map(str::to_owned))
                    .flatten(),
            },
            Err(_) => Sample {
                sent,
                done,
                status: None,
                site: None,
            },
        }
    }

    /// Sends one request every `pace`, one at a time, until `done` returns
    /// true for the samples so far or `timeout` passes, and returns the
    /// samples.
    pub async fn run_until(
        &self,
        pace: Duration,
        timeout: Duration,
        mut done: impl FnMut(&[Sample]) -> bool,
    ) -> Vec<Sample> {
        let deadline = Instant::now() + timeout;
        let mut samples = Vec::new();
        let mut next = Instant::now();
        while Instant::now() < deadline {
            samples.push(self.send().await);
            if done(&samples) {
                break;
            }
            // A slow response delays the next request instead of causing a
            // burst to catch up.
            next = (next + pace).max(Instant::now());
            tokio::time::sleep_until(next.into()).await;
        }
        samples
    }
}
