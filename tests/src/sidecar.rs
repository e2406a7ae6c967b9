//! The real `veo-sidecar` with its embedded store, started on a free loopback
//! port, plus a client of its usage query API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;
use veo_proto::usage::usage_client::UsageClient;
use veo_proto::usage::{GetUsageRequest, ListTopCustomersRequest};

use crate::HarnessError;
use crate::artifacts;
use crate::process::ChildProcess;

/// How long the sidecar gets to write its ready file.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running sidecar; dropping it stops the process.
#[derive(Debug)]
pub struct Sidecar {
    process: ChildProcess,
    address: SocketAddr,
    http_address: SocketAddr,
    data_dir: PathBuf,
    dir: PathBuf,
    config_file: Option<PathBuf>,
    env: Vec<(String, String)>,
}

/// Admitted and refused requests of one customer in the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustomerUsage {
    /// Requests admitted, in requests.
    pub admitted: u64,
    /// Requests refused with 429, in requests.
    pub refused: u64,
}

impl Sidecar {
    /// Starts the sidecar on a free port with its store and log under `dir`.
    pub async fn start(dir: &Path) -> Result<Self, HarnessError> {
        Self::start_in(dir, None).await
    }

    /// Starts the sidecar like [`Sidecar::start`] with `toml` as its config
    /// file, written to `dir/sidecar.toml` and passed with `--config`.
    ///
    /// The flags that the harness passes (`--listen`, `--data-dir`,
    /// `--ready-file`) override the file's keys of the same name.
    pub async fn start_with_config(dir: &Path, toml: &str) -> Result<Self, HarnessError> {
        Self::start_with_env(dir, Some(toml), &[]).await
    }

    /// Starts the sidecar like [`Sidecar::start_with_config`] with `toml`
    /// when given and the environment variables `env` (such as
    /// `STRIPE_API_KEY`) added to its environment.
    pub async fn start_with_env(
        dir: &Path,
        toml: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let config_file = match toml {
            Some(toml) => {
                let config_file = dir.join("sidecar.toml");
                std::fs::write(&config_file, toml).map_err(|source| HarnessError::Io {
                    action: "write the sidecar config file",
                    path: config_file.clone(),
                    source,
                })?;
                Some(config_file)
            }
            None => None,
        };
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        Self::start_in_with(dir, config_file, env).await
    }

    async fn start_in(dir: &Path, config_file: Option<PathBuf>) -> Result<Self, HarnessError> {
        Self::start_in_with(dir, config_file, Vec::new()).await
    }

    async fn start_in_with(
        dir: &Path,
        config_file: Option<PathBuf>,
        env: Vec<(String, String)>,
    ) -> Result<Self, HarnessError> {
        let data_dir = dir.join("sidecar-data");
        let ports = Ports {
            grpc: "127.0.0.1:0".into(),
            http: "127.0.0.1:0".into(),
        };
        let (process, address, http_address) =
            launch(dir, &data_dir, &ports, config_file.as_deref(), &env).await?;
        Ok(Self {
            process,
            address,
            http_address,
            data_dir,
            dir: dir.to_path_buf(),
            config_file,
            env,
        })
    }

    /// Returns the address of the gRPC server.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the address of the HTTP server (webhooks and metrics).
    pub fn http_address(&self) -> SocketAddr {
        self.http_address
    }

    /// Returns the sidecar's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the sidecar with SIGTERM and waits for it to exit, so its
    /// last billing round has run.
    pub fn stop(&mut self) {
        self.process.stop();
    }

    /// Connects a client of the admin API.
    pub async fn admin(
        &self,
    ) -> Result<veo_proto::admin::admin_client::AdminClient<Channel>, HarnessError> {
        veo_proto::admin::admin_client::AdminClient::connect(format!("http://{}", self.address))
            .await
            .map_err(|err| self.request_error("Admin", err.to_string()))
    }

    /// Kills the sidecar with SIGKILL, as `kill -9` does.
    pub fn kill_hard(&mut self) {
        self.process.kill_hard();
    }

    /// Starts the sidecar again on the same port with the same store and
    /// config file, after [`Sidecar::kill_hard`] or when it exited.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.process.stop();
        let ports = Ports {
            grpc: self.address.to_string(),
            http: self.http_address.to_string(),
        };
        let (process, address, http_address) = launch(
            &self.dir,
            &self.data_dir,
            &ports,
            self.config_file.as_deref(),
            &self.env,
        )
        .await?;
        self.process = process;
        self.address = address;
        self.http_address = http_address;
        Ok(())
    }

    /// Replaces the sidecar's config file with `toml` and sends SIGHUP, so the
    /// sidecar reloads its tier limits. Fails for a sidecar started without
    /// a config file.
    pub fn reload_config(&mut self, toml: &str) -> Result<(), HarnessError> {
        let Some(path) = &self.config_file else {
            return Err(HarnessError::InvalidConfig {
                what: "sidecar config reload",
                reason: "the sidecar was started without a config file".to_owned(),
            });
        };
        std::fs::write(path, toml).map_err(|source| HarnessError::Io {
            action: "write the sidecar config",
            path: path.clone(),
            source,
        })?;
        self.process.signal(nix::sys::signal::Signal::SIGHUP)
    }

    /// Returns the whole log of the sidecar, across restarts.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Returns `customer`'s totals in the ledger over the last and the next
    /// hour, through the usage query API.
    pub async fn usage(&self, customer: &str) -> Result<CustomerUsage, HarnessError> {
        let now = unix_seconds();
        let request = GetUsageRequest {
            customer: customer.to_owned(),
            start_unix_s: now - 3600,
            end_unix_s: now + 3600,
            granularity: 0,
        };
        let response = self
            .client("GetUsage")
            .await?
            .get_usage(request)
            .await
            .map_err(|status| self.request_error("GetUsage", status.to_string()))?
            .into_inner();
        Ok(CustomerUsage {
            admitted: response.admitted_requests,
            refused: response.refused_requests,
        })
    }

    /// Returns at most `limit` customers with the most admitted requests
    /// between `start_unix_s` and `end_unix_s`, most admitted first.
    pub async fn top_customers(
        &self,
        start_unix_s: i64,
        end_unix_s: i64,
        limit: u32,
    ) -> Result<Vec<(String, CustomerUsage)>, HarnessError> {
        let request = ListTopCustomersRequest {
            start_unix_s,
            end_unix_s,
            limit,
        };
        let response = self
            .client("ListTopCustomers")
            .await?
            .list_top_customers(request)
            .await
            .map_err(|status| self.request_error("ListTopCustomers", status.to_string()))?
            .into_inner();
        Ok(response
            .customers
            .into_iter()
            .map(|total| {
                let usage = CustomerUsage {
                    admitted: total.admitted_requests,
                    refused: total.refused_requests,
                };
                (total.customer, usage)
            })
            .collect())
    }

    /// Connects a client of the usage query API for a call of `method`.
    async fn client(&self, method: &str) -> Result<UsageClient<Channel>, HarnessError> {
        UsageClient::connect(format!("http://{}", self.address))
            .await
            .map_err(|err| self.request_error(method, err.to_string()))
    }

    fn request_error(&self, method: &str, reason: String) -> HarnessError {
        HarnessError::Request {
            target: format!("http://{} {method}", self.address),
            reason,
        }
    }

    /// Polls the ledger every 100 ms until every customer in `expected` has
    /// exactly the expected usage or `timeout` passes, and returns what the
    /// ledger held last.
    ///
    /// Usage reaches the ledger one sync interval after the requests, so a
    /// test waits here instead of sleeping a guessed time.
    pub async fn await_usage(
        &self,
        expected: &BTreeMap<String, CustomerUsage>,
        timeout: Duration,
    ) -> Result<BTreeMap<String, CustomerUsage>, HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let observed = self.usage_of(expected.keys()).await;
            match observed {
                Ok(observed) if &observed == expected => return Ok(observed),
                Ok(observed) if Instant::now() > deadline => return Ok(observed),
                Err(err) if Instant::now() > deadline => return Err(err),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Returns the usage of each of `customers`.
    pub async fn usage_of(
        &self,
        customers: impl IntoIterator<Item = &String>,
    ) -> Result<BTreeMap<String, CustomerUsage>, HarnessError> {
        let mut usage = BTreeMap::new();
        for customer in customers {
            usage.insert(customer.clone(), self.usage(customer).await?);
        }
        Ok(usage)
    }
}

/// Addresses the sidecar listens on, as IP:PORT.
struct Ports {
    grpc: String,
    http: String,
}

/// Starts the sidecar listening on `ports`, with `config_file` when given,
/// and waits for its ready files.
async fn launch(
    dir: &Path,
    data_dir: &Path,
    ports: &Ports,
    config_file: Option<&Path>,
    env: &[(String, String)],
) -> Result<(ChildProcess, SocketAddr, SocketAddr), HarnessError> {
    let ready_file = dir.join("sidecar.addr");
    let http_ready_file = dir.join("sidecar.http");
    // A stale file from a previous run would look like readiness.
    let _ = std::fs::remove_file(&ready_file);
    let _ = std::fs::remove_file(&http_ready_file);
    let mut command = Command::new(artifacts::sidecar_binary()?);
    if let Some(config_file) = config_file {
        command.arg("--config").arg(config_file);
    }
    command
        .arg("--listen")
        .arg(&ports.grpc)
        .arg("--http-listen")
        .arg(&ports.http)
        .arg("--http-ready-file")
        .arg(&http_ready_file)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--ready-file")
        .arg(&ready_file)
        // A Stripe key in the developer's shell must not reach the tests'
        // sidecars; tests that bill Stripe pass the fake's key themselves.
        .env_remove("STRIPE_API_KEY")
        .env_remove("STRIPE_API_BASE")
        .env_remove("STRIPE_WEBHOOK_SECRET")
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .env("RUST_LOG", "info");
    let mut process = ChildProcess::spawn("veo-sidecar", &mut command, &dir.join("sidecar.log"))?;

    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready_file)
            && let Ok(address) = text.trim().parse()
            && let Ok(http_text) = std::fs::read_to_string(&http_ready_file)
            && let Ok(http_address) = http_text.trim().parse()
        {
            return Ok((process, address, http_address));
        }
        process.ensure_running()?;
        if Instant::now() > deadline {
            return Err(process.not_ready(READY_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Returns the current time in seconds since the Unix epoch.
pub fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}
