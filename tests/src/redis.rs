//! Real `redis-server` processes for tests: one server, a replica of one,
//! or a Redis Cluster, on free loopback ports with their data in the test's
//! folder. Dropping one stops its processes.
//!
//! The binary is `REDIS_SERVER_BIN`, else `redis-server` on `PATH`.
//! `cargo xtask install-tools --redis` installs it. Cluster nodes need
//! redis-server 7.0 or later (`cluster-port`, `CLUSTER MEET` with a bus port).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ::redis::{Cmd, FromRedisValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::HarnessError;
use crate::process::ChildProcess;

/// How long a server gets to reply to PING, and a cluster to reach
/// `cluster_state:ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Start attempts before giving up when another process took the chosen
/// port first.
const PORT_ATTEMPTS: usize = 5;

/// Arguments that keep every acknowledged write through a crash.
const DURABLE: [&str; 4] = ["--appendonly", "yes", "--appendfsync", "always"];

/// Number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: usize = 16_384;

/// Returns the `redis-server` binary: `REDIS_SERVER_BIN`, else the first
/// `redis-server` on `PATH`.
pub fn redis_server_path() -> Result<PathBuf, HarnessError> {
    let missing = HarnessError::MissingTool {
        tool: "redis-server",
        install: "cargo xtask install-tools --redis",
        variable: "REDIS_SERVER_BIN",
    };
    if let Some(path) = std::env::var_os("REDIS_SERVER_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(missing)
        };
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&search)
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
        .ok_or(missing)
}

/// Role of a server, which decides its extra arguments.
#[derive(Debug, Clone, Copy)]
enum Role {
    Primary,
    ReplicaOf(u16),
    ClusterNode { bus_port: u16 },
}

/// One running `redis-server`. A primary or cluster node fsyncs its
/// append-only file on every write, so its data survives
/// [`RedisServer::stop`] and [`RedisServer::kill_hard`]; a replica keeps no
/// file and copies its primary again when started.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    role: Role,
    process: Option<ChildProcess>,
}

impl RedisServer {
    /// Starts a server on a free loopback port with its data and log in
    /// `dir`, and waits until it replies to PING.
    pub async fn start(dir: &Path) -> Result<Self, HarnessError> {
        Self::start_as(dir, || Ok(Role::Primary)).await
    }

    /// Starts a read-only replica of `primary` in `dir` and waits until it
    /// has synchronized.
    pub async fn start_replica_of(dir: &Path, primary: &RedisServer) -> Result<Self, HarnessError> {
        let primary_port = primary.port;
        let replica = Self::start_as(dir, || Ok(Role::ReplicaOf(primary_port))).await?;
        replica
            .wait_for_info("replication", "master_link_status:up")
            .await?;
        Ok(replica)
    }

    async fn start_as(
        dir: &Path,
        role: impl Fn() -> Result<Role, HarnessError>,
    ) -> Result<Self, HarnessError> {
        std::fs::create_dir_all(dir).map_err(|source| HarnessError::Io {
            action: "create the redis-server folder",
            path: dir.to_path_buf(),
            source,
        })?;
        let mut attempt = 1;
        loop {
            let mut server = Self {
                dir: dir.to_path_buf(),
                port: free_port()?,
                role: role()?,
                process: None,
            };
            match server.launch().await {
                Ok(()) => return Ok(server),
                Err(err) if attempt < PORT_ATTEMPTS && server.lost_port_race() => {
                    attempt += 1;
                    drop(err);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// URL of the server, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill_hard(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill_hard();
        }
    }

    /// Starts the server again on the same port and folder after
    /// [`RedisServer::stop`] or [`RedisServer::kill_hard`]; it reloads its
    /// data from the append-only file.
    pub async fn start_again(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.launch().await
    }

    /// Returns the server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Sends `command` on a new connection and returns the reply.
    pub async fn query<T: FromRedisValue>(&self, command: &Cmd) -> Result<T, HarnessError> {
        let request_error = |err: ::redis::RedisError| HarnessError::Request {
            target: self.url(),
            reason: err.to_string(),
        };
        let client = ::redis::Client::open(self.url()).map_err(request_error)?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(request_error)?;
        command
            .query_async(&mut connection)
            .await
            .map_err(request_error)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis-server.log")
    }

    async fn launch(&mut self) -> Result<(), HarnessError> {
        let mut command = Command::new(redis_server_path()?);
        command
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", ""])
            // A replica gets its first copy at once rather than after 5 s.
            .args(["--repl-diskless-sync-delay", "0"]);
        match self.role {
            Role::Primary => {
                command.args(DURABLE);
            }
            Role::ReplicaOf(primary_port) => {
                // A replica copies the primary again when it starts, so it
                // needs no append-only file. With one, redis-server ignores
                // SIGTERM while it writes the first file after the copy.
                command
                    .args(["--appendonly", "no"])
                    .args(["--replicaof", "127.0.0.1"])
                    .arg(primary_port.to_string());
            }
            Role::ClusterNode { bus_port } => {
                command
                    .args(DURABLE)
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", "nodes.conf"])
                    .args(["--cluster-node-timeout", "2000"])
                    .arg("--cluster-port")
                    .arg(bus_port.to_string());
            }
        }
        let name = format!("redis-server on port {}", self.port);
        self.process = Some(ChildProcess::spawn(&name, &mut command, &self.log_path())?);
        self.wait_for_ping().await
    }

    /// Returns whether the last start failed because the port was taken
    /// between choosing it and binding it.
    fn lost_port_race(&self) -> bool {
        self.log().contains("Address already in use")
    }

    async fn wait_for_ping(&mut self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let Some(process) = self.process.as_mut() else {
                return Err(HarnessError::Request {
                    target: self.url(),
                    reason: "the server is stopped".to_owned(),
                });
            };
            process.ensure_running()?;
            // PING returns -LOADING until the append-only file is loaded.
            if ping(self.port).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(process.not_ready(READY_TIMEOUT));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `INFO section` contains `line`.
    async fn wait_for_info(&self, section: &str, line: &str) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info: String = self.query(::redis::cmd("INFO").arg(section)).await?;
            if info.lines().any(|candidate| candidate.trim() == line) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    name: format!("redis-server on port {} ({line})", self.port),
                    timeout: READY_TIMEOUT,
                    log_tail: info,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A Redis Cluster of masters without replicas, each a [`RedisServer`] in
/// its own subfolder.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes under `dir`, splits the hash slots evenly
    /// between them, joins them, and waits until every node reports
    /// `cluster_state:ok` and lists every other node.
    pub async fn start(dir: &Path, masters: usize) -> Result<Self, HarnessError> {
        let mut nodes = Vec::with_capacity(masters);
        for index in 0..masters {
            let node_dir = dir.join(format!("node-{index}"));
            let node = RedisServer::start_as(&node_dir, || {
                Ok(Role::ClusterNode {
                    bus_port: free_port()?,
                })
            })
            .await?;
            nodes.push(node);
        }
        let cluster = Self { nodes };

        for (index, node) in cluster.nodes.iter().enumerate() {
            let first = index * CLUSTER_SLOTS / masters;
            let end = (index + 1) * CLUSTER_SLOTS / masters;
            let mut add_slots = ::redis::cmd("CLUSTER");
            add_slots
                .arg("ADDSLOTS")
                .arg((first..end).collect::<Vec<_>>());
            let _: () = node.query(&add_slots).await?;
        }
        if let Some((first, others)) = cluster.nodes.split_first() {
            for node in others {
                let Role::ClusterNode { bus_port } = node.role else {
                    continue;
                };
                let mut meet = ::redis::cmd("CLUSTER");
                meet.arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port)
                    .arg(bus_port);
                let _: () = first.query(&meet).await?;
            }
        }

        let known = format!("cluster_known_nodes:{masters}");
        for node in &cluster.nodes {
            node.wait_for_cluster_info(&["cluster_state:ok", &known])
                .await?;
        }
        Ok(cluster)
    }

    /// URLs of every node, to seed a cluster client.
    pub fn seed_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Returns the nodes, in start order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }
}

impl RedisServer {
    async fn wait_for_cluster_info(&self, lines: &[&str]) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let info: String = self.query(::redis::cmd("CLUSTER").arg("INFO")).await?;
            let has_all = lines
                .iter()
                .all(|line| info.lines().any(|candidate| candidate.trim() == *line));
            if has_all {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    name: format!(
                        "Redis Cluster node on port {} ({})",
                        self.port,
                        lines.join(", ")
                    ),
                    timeout: READY_TIMEOUT,
                    log_tail: info,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> Result<u16, HarnessError> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let listener = TcpListener::bind(address).map_err(|source| HarnessError::Io {
        action: "bind a free port on",
        path: PathBuf::from(address.to_string()),
        source,
    })?;
    let port = listener
        .local_addr()
        .map_err(|source| HarnessError::Io {
            action: "read the port of",
            path: PathBuf::from(address.to_string()),
            source,
        })?
        .port();
    Ok(port)
}

/// Returns whether the server on `port` replies `+PONG` to PING.
async fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut reply = [0_u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut reply)).await;
    matches!(read, Ok(Ok(length)) if reply[..length].starts_with(b"+PONG"))
}
