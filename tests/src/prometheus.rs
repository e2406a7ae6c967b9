//! A real Prometheus server on a free loopback port that scrapes given
//! targets every second, with its data in a folder of the test.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::HarnessError;
use crate::client::HttpClient;
use crate::process::ChildProcess;

/// How long Prometheus gets to open its storage and serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Job name of the scraped targets.
pub const JOB: &str = "veo-sidecar";

/// A running Prometheus; dropping it stops the process.
#[derive(Debug)]
pub struct PrometheusServer {
    process: ChildProcess,
    address: SocketAddr,
}

/// Returns a loopback address with a port that was free a moment ago.
///
/// Prometheus cannot report a port it picked itself, so the port is chosen
/// here before the server starts, and a sidecar can name it in its config.
pub fn free_address() -> Result<SocketAddr, HarnessError> {
    let io_error = |source| HarnessError::Io {
        action: "find a free port on",
        path: "127.0.0.1:0".into(),
        source,
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_error)?;
    listener.local_addr().map_err(io_error)
}

impl PrometheusServer {
    /// Starts Prometheus on `address` with its files in `dir`, scraping
    /// `/metrics` of each of `targets` every second, and waits until it is
    /// ready.
    pub async fn start(
        dir: &Path,
        address: SocketAddr,
        targets: &[SocketAddr],
    ) -> Result<Self, HarnessError> {
        let targets: Vec<String> = targets
            .iter()
            .map(|target| format!("\"{target}\""))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      \
             - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).map_err(|source| HarnessError::Io {
            action: "write the Prometheus config",
            path: config_path.clone(),
            source,
        })?;
        let mut process = ChildProcess::spawn(
            "prometheus",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("prometheus-data").display()
                ))
                .arg(format!("--web.listen-address={address}"))
                .arg("--log.level=warn"),
            &dir.join("prometheus.log"),
        )?;

        let client = HttpClient::new(address);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            process.ensure_running()?;
            if let Ok(reply) = client.get("/-/ready", &[]).await
                && reply.status == 200
            {
                return Ok(Self { process, address });
            }
            if Instant::now() > deadline {
                return Err(process.not_ready(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Returns the base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Evaluates the instant query `query` now and returns the values of
    /// the result's series; an empty list when no series matches.
    pub async fn query(&self, query: &str) -> Result<Vec<f64>, HarnessError> {
        let parameters = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .finish();
        let path = format!("/api/v1/query?{parameters}");
        let reply = HttpClient::new(self.address).get(&path, &[]).await?;
        let body: Value = reply.json()?;
        let request_error = |reason: String| HarnessError::Request {
            target: format!("{} {path}", self.url()),
            reason,
        };
        if body["status"] != "success" {
            return Err(request_error(format!("query failed: {body}")));
        }
        body["data"]["result"]
            .as_array()
            .ok_or_else(|| request_error(format!("no result list: {body}")))?
            .iter()
            .map(|series| {
                series["value"][1]
                    .as_str()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| request_error(format!("no sample value: {series}")))
            })
            .collect()
    }

    /// Polls `query` every 200 ms until its first value is `expected` or
    /// `timeout` passes; returns the values seen last.
    pub async fn await_value(
        &self,
        query: &str,
        expected: f64,
        timeout: Duration,
    ) -> Result<Vec<f64>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let values = self.query(query).await?;
            if values.first() == Some(&expected) || Instant::now() > deadline {
                return Ok(values);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Returns the whole log written so far.
    pub fn log(&self) -> String {
        self.process.log()
    }
}
