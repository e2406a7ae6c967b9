//! Lazy connection to Redis (standalone or Cluster), concurrent sending of
//! commands, and the mapping of client errors to [`CounterError`].

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use super::RedisTarget;
use crate::counters::CounterError;

/// Client for one target that connects on first use and again after
/// [`Link::disconnect`].
pub(super) struct Link {
    client: TargetClient,
    target: String,
    timeout: Duration,
    connection: Mutex<Option<Connection>>,
}

enum TargetClient {
    Standalone(Client),
    Cluster(Box<ClusterClient>),
}

/// Open connection, shared by its clones.
#[derive(Clone)]
pub(super) enum Connection {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// Consequence of a failed command for the caller and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailureKind {
    /// The server is a replica: reconnect and report [`CounterError::ReadOnly`].
    ReadOnly,
    /// The connection broke or timed out: reconnect and report
    /// [`CounterError::Unavailable`].
    Connection,
    /// The server rejected the command. The connection stays usable.
    Reply,
}

impl Link {
    /// Parses the target without connecting.
    pub(super) fn new(target: &RedisTarget, timeout: Duration) -> Result<Self, CounterError> {
        let description = describe(target);
        let invalid = |err: RedisError| CounterError::Invalid {
            detail: format!("invalid Redis address {description}: {err}"),
        };
        let client = match target {
            RedisTarget::Standalone(url) => {
                TargetClient::Standalone(Client::open(url.as_str()).map_err(invalid)?)
            }
            RedisTarget::Cluster(seeds) => {
                if seeds.is_empty() {
                    return Err(CounterError::Invalid {
                        detail: "the Redis Cluster seed list is empty: name at least one node"
                            .to_owned(),
                    });
                }
                let client = ClusterClient::builder(seeds.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(invalid)?;
                TargetClient::Cluster(Box::new(client))
            }
        };
        Ok(Self {
            client,
            target: description,
            timeout,
            connection: Mutex::new(None),
        })
    }

    /// Returns the address or seed list, without credentials.
    pub(super) fn target(&self) -> &str {
        &self.target
    }

    /// Returns the open connection, connecting first when there is none.
    pub(super) async fn connection(&self) -> Result<Connection, CounterError> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }

        let connected = match &self.client {
            TargetClient::Standalone(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout));
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Connection::Standalone)
            }
            TargetClient::Cluster(client) => {
                client.get_async_connection().await.map(Connection::Cluster)
            }
        };
        let connection = connected.map_err(|err| self.unavailable(&err.to_string()))?;
        tracing::debug!(target = %self.target, "connected to Redis");
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// Drops the connection so that the next call opens a new one.
    pub(super) async fn disconnect(&self) {
        if self.connection.lock().await.take().is_some() {
            tracing::debug!(target = %self.target, "dropped the Redis connection");
        }
    }

    /// Returns the error for an unreachable target.
    pub(super) fn unavailable(&self, detail: &str) -> CounterError {
        CounterError::Unavailable {
            target: self.target.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Maps a failed command to the caller's error and drops the connection
    /// when the failure calls for a new one.
    pub(super) async fn fail(&self, err: &RedisError) -> CounterError {
        match classify(err) {
            FailureKind::ReadOnly => {
                self.disconnect().await;
                CounterError::ReadOnly {
                    target: self.target.clone(),
                }
            }
            FailureKind::Connection => {
                self.disconnect().await;
                self.unavailable(&err.to_string())
            }
            FailureKind::Reply => CounterError::Rejected {
                target: self.target.clone(),
                detail: err.to_string(),
            },
        }
    }
}

impl Connection {
    pub(super) async fn query(&mut self, command: &Cmd) -> redis::RedisResult<Value> {
        match self {
            Self::Standalone(connection) => command.query_async(connection).await,
            Self::Cluster(connection) => command.query_async(connection).await,
        }
    }

    /// Sends `commands` concurrently, which the client pipelines on each
    /// node's connection, and returns their results in order.
    pub(super) async fn send_all(
        &self,
        commands: Vec<Cmd>,
    ) -> Result<Vec<redis::RedisResult<Value>>, String> {
        let count = commands.len();
        let mut tasks = JoinSet::new();
        for (index, command) in commands.into_iter().enumerate() {
            let mut connection = self.clone();
            tasks.spawn(async move { (index, connection.query(&command).await) });
        }

        let mut results: Vec<Option<redis::RedisResult<Value>>> =
            (0..count).map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (index, result) =
                joined.map_err(|err| format!("the task sending a Redis command failed: {err}"))?;
            if let Some(place) = results.get_mut(index) {
                *place = Some(result);
            }
        }
        results
            .into_iter()
            .map(|result| result.ok_or_else(|| "a Redis command got no result".to_owned()))
            .collect()
    }
}

/// Classifies a client error by what it means for the connection.
pub(super) fn classify(err: &RedisError) -> FailureKind {
    // A script that writes on a replica fails with the READONLY code of the
    // write command inside it.
    let read_only = err.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || err.code() == Some("READONLY");
    if read_only {
        return FailureKind::ReadOnly;
    }
    let connection_lost = err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
        || err.is_unrecoverable_error()
        || matches!(
            err.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::BusyLoading
                )
        );
    if connection_lost {
        FailureKind::Connection
    } else {
        FailureKind::Reply
    }
}

/// Describes the target without credentials: `host:port`, or
/// `cluster host:port,host:port` for a seed list.
pub(super) fn describe(target: &RedisTarget) -> String {
    match target {
        RedisTarget::Standalone(url) => address_of(url),
        RedisTarget::Cluster(seeds) => {
            let nodes: Vec<String> = seeds.iter().map(|seed| address_of(seed)).collect();
            format!("cluster {}", nodes.join(","))
        }
    }
}

/// Returns `host:port` of a Redis URL, or the URL without its user
/// information when it does not parse.
fn address_of(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(parsed) => {
            let host = parsed.host_str().unwrap_or_default();
            let port = parsed.port().unwrap_or(6379);
            format!("{host}:{port}")
        }
        None => without_user_info(url),
    }
}

fn without_user_info(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let rest = match rest[..authority_end].rfind('@') {
        Some(at) => &rest[at + 1..],
        None => rest,
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_hides_credentials() {
        let target = RedisTarget::Standalone("redis://user:secret@10.1.2.3:6380/2".to_owned());
        assert_eq!(describe(&target), "10.1.2.3:6380");
    }

    #[test]
    fn describe_defaults_the_port() {
        let target = RedisTarget::Standalone("redis://cache.internal".to_owned());
        assert_eq!(describe(&target), "cache.internal:6379");
    }

    #[test]
    fn describe_lists_cluster_seeds() {
        let target = RedisTarget::Cluster(vec![
            "redis://:secret@127.0.0.1:7000".to_owned(),
            "redis://127.0.0.1:7001".to_owned(),
        ]);
        assert_eq!(describe(&target), "cluster 127.0.0.1:7000,127.0.0.1:7001");
    }

    #[test]
    fn unparsable_url_loses_user_info() {
        assert_eq!(
            without_user_info("bogus://u:p@host:1/x"),
            "bogus://host:1/x"
        );
        assert_eq!(without_user_info("u:p@host"), "host");
        assert_eq!(without_user_info("host/a@b"), "host/a@b");
    }

    #[test]
    fn invalid_url_is_rejected_without_secret() {
        let target = RedisTarget::Standalone("http://user:secret@host:1".to_owned());
        let err = Link::new(&target, Duration::from_secs(1)).err();
        let message = err.map(|err| err.to_string()).unwrap_or_default();
        assert!(message.contains("invalid Redis address"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
