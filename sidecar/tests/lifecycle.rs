//! Runs the built `veo-sidecar` binary on loopback: durability across
//! `kill -9`, clean stop on SIGTERM, health checking and reflection.

// Tests fail by panicking; helpers outside `#[test]` functions panic too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use veo_proto::sync::sync_client::SyncClient;
use veo_proto::sync::{SyncRequest, SyncResponse, UsageRecord};
use veo_proto::usage::usage_client::UsageClient;
use veo_proto::usage::{GetUsageRequest, Granularity, ListTopCustomersRequest};

/// 2023-11-14T22:14:00Z, the start of a minute.
const MINUTE: i64 = 1_700_000_040;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running sidecar process, killed when dropped so that a failing test
/// leaves no process behind.
struct Sidecar {
    child: Child,
    address: SocketAddr,
    ready_file: PathBuf,
    log: PathBuf,
}

impl Sidecar {
    /// Starts the binary on an ephemeral port with `data_dir` and waits for
    /// its ready file.
    fn start(work: &Path, data_dir: &Path, name: &str) -> Sidecar {
        let ready_file = work.join(format!("{name}.ready"));
        let log = work.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_veo-sidecar"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(data_dir)
            .arg("--ready-file")
            .arg(&ready_file)
            .env("RUST_LOG", "info,veo_sidecar=debug")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut sidecar = Sidecar {
            child,
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            ready_file,
            log,
        };

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(&sidecar.ready_file) {
                sidecar.address = text.parse().unwrap();
                return sidecar;
            }
            if let Some(status) = sidecar.child.try_wait().unwrap() {
                panic!(
                    "sidecar exited with {status} before ready:\n{}",
                    sidecar.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not ready:\n{}",
                sidecar.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn sync_client(&self) -> SyncClient<Channel> {
        SyncClient::connect(self.url()).await.unwrap()
    }

    async fn usage_client(&self) -> UsageClient<Channel> {
        UsageClient::connect(self.url()).await.unwrap()
    }

    fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        kill(pid, signal).unwrap();
    }

    /// Waits for the process to exit, failing after [`STOP_TIMEOUT`]. The
    /// wait yields to the runtime, so the test's clients keep running and
    /// can reply to the server's GOAWAY.
    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar did not exit:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn batch(instance: &str, sequence: u64, usage: &[(&str, i64, u64, u64)]) -> SyncRequest {
    SyncRequest {
        instance_id: instance.into(),
        sequence,
        created_unix_ms: 1_700_000_050_000,
        usage: usage
            .iter()
            .map(
                |&(customer, minute_unix_s, admitted, refused)| UsageRecord {
                    customer: customer.into(),
                    tier: "basic".into(),
                    minute_unix_s,
                    admitted_requests: admitted,
                    refused_requests: refused,
                    ..UsageRecord::default()
                },
            )
            .collect(),
        tier_overrides_version: 0,
        asset_regions_version: 0,
        erasures_version: 0,
    }
}

async fn send(client: &mut SyncClient<Channel>, request: SyncRequest) -> SyncResponse {
    client.sync(request).await.unwrap().into_inner()
}

/// Returns (bucket start, admitted, refused) per minute and the totals.
async fn minutes(sidecar: &Sidecar, customer: &str) -> (Vec<(i64, u64, u64)>, u64, u64) {
    let request = GetUsageRequest {
        customer: customer.into(),
        start_unix_s: MINUTE,
        end_unix_s: MINUTE + 3_600,
        granularity: Granularity::Minute as i32,
    };
    let reply = sidecar
        .usage_client()
        .await
        .get_usage(request)
        .await
        .unwrap();
    let reply = reply.into_inner();
    let buckets = reply
        .buckets
        .iter()
        .map(|b| (b.start_unix_s, b.admitted_requests, b.refused_requests))
        .collect();
    (buckets, reply.admitted_requests, reply.refused_requests)
}

async fn top(sidecar: &Sidecar) -> Vec<(String, u64)> {
    let request = ListTopCustomersRequest {
        start_unix_s: MINUTE,
        end_unix_s: MINUTE + 3_600,
        limit: 0,
    };
    let reply = sidecar
        .usage_client()
        .await
        .list_top_customers(request)
        .await;
    let customers = reply.unwrap().into_inner().customers;
    customers
        .into_iter()
        .map(|total| (total.customer, total.admitted_requests))
        .collect()
}

/// Proves that acknowledged batches survive `kill -9` exactly once and that
/// resent batches are still recognised as duplicates after the restart.
#[tokio::test]
async fn acknowledged_usage_survives_kill_9() {
    let work = tempfile::tempdir().unwrap();
    let data_dir = work.path().join("data");
    let expected_c1 = (vec![(MINUTE, 7, 1), (MINUTE + 60, 2, 0)], 9, 1);
    let expected_top = vec![("c2".to_string(), 5), ("c1".to_string(), 9)];
    let expected_top: Vec<_> = expected_top.into_iter().rev().collect();

    let mut first = Sidecar::start(work.path(), &data_dir, "first");
    let mut sync = first.sync_client().await;
    let reply_1 = send(
        &mut sync,
        batch("i1", 1, &[("c1", MINUTE, 3, 1), ("c2", MINUTE, 5, 0)]),
    )
    .await;
    let reply_2 = send(&mut sync, batch("i1", 2, &[("c1", MINUTE + 60, 2, 0)])).await;
    let resent = send(&mut sync, batch("i1", 2, &[("c1", MINUTE + 60, 2, 0)])).await;
    let other = send(&mut sync, batch("i2", 1, &[("c1", MINUTE, 4, 0)])).await;

    assert_eq!((reply_1.applied_sequence, reply_1.duplicate), (1, false));
    assert_eq!((reply_2.applied_sequence, reply_2.duplicate), (2, false));
    assert_eq!((resent.applied_sequence, resent.duplicate), (2, true));
    assert_eq!((other.applied_sequence, other.duplicate), (1, false));
    assert_eq!(other.window_seconds, 60);
    assert_eq!(minutes(&first, "c1").await, expected_c1);
    assert_eq!(top(&first).await, expected_top);

    first.signal(Signal::SIGKILL);
    let status = first.wait().await;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    drop(first);

    let second = Sidecar::start(work.path(), &data_dir, "second");
    assert_eq!(minutes(&second, "c1").await, expected_c1);
    assert_eq!(top(&second).await, expected_top);

    let mut sync = second.sync_client().await;
    let resent = send(&mut sync, batch("i1", 2, &[("c1", MINUTE + 60, 2, 0)])).await;
    let resent_other = send(&mut sync, batch("i2", 1, &[("c1", MINUTE, 4, 0)])).await;
    let reply_3 = send(&mut sync, batch("i1", 3, &[("c1", MINUTE + 60, 1, 0)])).await;

    assert_eq!((resent.applied_sequence, resent.duplicate), (2, true));
    assert_eq!(
        (resent_other.applied_sequence, resent_other.duplicate),
        (1, true)
    );
    assert_eq!((reply_3.applied_sequence, reply_3.duplicate), (3, false));
    let (_, admitted, refused) = minutes(&second, "c1").await;
    assert_eq!((admitted, refused), (10, 1));
}

/// Proves that SIGTERM stops the sidecar with exit status 0 well within the
/// grace period while a client connection is open, closes the store, logs
/// `stopped` and removes the ready file.
#[tokio::test]
async fn sigterm_stops_cleanly() {
    let work = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(work.path(), &work.path().join("data"), "sidecar");
    let mut sync = sidecar.sync_client().await;
    send(&mut sync, batch("i1", 1, &[("c1", MINUTE, 1, 0)])).await;

    let signalled = Instant::now();
    sidecar.signal(Signal::SIGTERM);
    let status = sidecar.wait().await;
    let stop_time = signalled.elapsed();

    let logs = sidecar.logs();
    assert!(status.success(), "{status}:\n{logs}");
    assert!(logs.contains("stopped"), "{logs}");
    assert!(logs.contains("usage store closed"), "{logs}");
    assert!(!sidecar.ready_file.exists());
    assert!(
        stop_time < Duration::from_secs(5),
        "stopping took {stop_time:?}"
    );
    drop(sync);
}

/// Proves the overall status and each service report SERVING.
#[tokio::test]
async fn health_reports_serving() {
    let work = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(work.path(), &work.path().join("data"), "sidecar");
    let mut health = HealthClient::new(sidecar.channel().await);

    for service in ["", "veo.sync.v1.Sync", "veo.usage.v1.Usage"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let reply = health.check(request).await.unwrap().into_inner();

        assert_eq!(
            reply.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

/// Proves server reflection lists the sidecar's services.
#[tokio::test]
async fn reflection_lists_services() {
    let work = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(work.path(), &work.path().join("data"), "sidecar");
    let mut reflection = ServerReflectionClient::new(sidecar.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };

    let mut replies = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();

    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<_> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in [
        "veo.sync.v1.Sync",
        "veo.usage.v1.Usage",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|name| name == expected), "{names:?}");
    }
}

/// Proves invalid input is rejected with INVALID_ARGUMENT naming the field
/// and leaves the ledger unchanged.
#[tokio::test]
async fn invalid_batch_is_rejected_over_grpc() {
    let work = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(work.path(), &work.path().join("data"), "sidecar");
    let mut sync = sidecar.sync_client().await;

    let zero = sync
        .sync(batch("i1", 0, &[("c1", MINUTE, 1, 0)]))
        .await
        .unwrap_err();
    let unaligned = sync
        .sync(batch("i1", 1, &[("c1", MINUTE + 1, 1, 0)]))
        .await
        .unwrap_err();

    assert_eq!(zero.code(), tonic::Code::InvalidArgument);
    assert!(zero.message().contains("sequence"), "{}", zero.message());
    assert_eq!(unaligned.code(), tonic::Code::InvalidArgument);
    assert!(
        unaligned.message().contains("usage[0].minute_unix_s"),
        "{}",
        unaligned.message()
    );
    assert_eq!(minutes(&sidecar, "c1").await, (vec![], 0, 0));
}
