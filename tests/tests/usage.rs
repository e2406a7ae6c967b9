//! Usage counting end to end: what the filter admits and refuses reaches the
//! sidecar's ledger exactly once, also when the sidecar is killed mid-run
//! and when Envoy is stopped after a drain.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use veo_tests::client::{HttpClient, burst};
use veo_tests::plugin::{BASIC_QUOTA, PluginConfig, SYNC_INTERVAL_MS};
use veo_tests::sidecar::CustomerUsage;
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Stack, artifacts};

/// How long usage may take to reach the ledger, in sync intervals.
const SETTLE_INTERVALS: u64 = 50;

fn settle_timeout() -> Duration {
    Duration::from_millis(SYNC_INTERVAL_MS * SETTLE_INTERVALS)
}

/// Counts 200 and 429 replies per customer.
#[derive(Debug, Default)]
struct Tally(BTreeMap<String, CustomerUsage>);

impl Tally {
    fn record(&mut self, customer: &str, status: u16) -> anyhow::Result<()> {
        let usage = self.0.entry(customer.to_owned()).or_insert(CustomerUsage {
            admitted: 0,
            refused: 0,
        });
        match status {
            200 => usage.admitted += 1,
            429 => usage.refused += 1,
            other => anyhow::bail!("{customer}: request not decided, status {other}"),
        }
        Ok(())
    }
}

/// Waits until the ledger contains exactly `tally`, then checks that later
/// batches leave it unchanged, so that nothing is counted twice.
async fn assert_ledger_settles_on(stack: &Stack, tally: &Tally) -> anyhow::Result<()> {
    let ledger = stack
        .sidecar
        .await_usage(&tally.0, settle_timeout())
        .await?;
    assert_eq!(
        ledger, tally.0,
        "ledger (left) against client-side counts (right)"
    );

    tokio::time::sleep(Duration::from_millis(SYNC_INTERVAL_MS * 5)).await;
    let ledger = stack.sidecar.usage_of(tally.0.keys()).await?;
    assert_eq!(ledger, tally.0, "ledger changed after it had settled");
    Ok(())
}

/// Proves the usage query returns exactly the admitted and refused requests per customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_query_matches_admitted_requests() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start(&PluginConfig::for_key(&key)?).await?;
    let client = stack.client();
    let quota = usize::try_from(BASIC_QUOTA)?;
    let plan = [
        ("usage-light", "basic", 3),
        ("usage-heavy", "basic", quota + 4),
        ("usage-pro", "pro", 7),
    ];

    let mut tally = Tally::default();
    for (customer, tier, count) in plan {
        let token = key.mint(&TokenSpec::new(customer, tier))?;
        for reply in burst(&client, &token, count).await? {
            tally.record(customer, reply.status)?;
        }
    }
    assert_eq!(tally.0["usage-heavy"].refused, 4);

    assert_ledger_settles_on(&stack, &tally).await?;

    // The operator command prints the same totals.
    let output = std::process::Command::new(artifacts::sidecar_binary()?)
        .args(["usage", "--sidecar", &stack.sidecar.address().to_string()])
        .args(["--granularity", "day", "usage-heavy"])
        .output()?;
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{table}");
    let total: Vec<&str> = table
        .lines()
        .find(|line| line.starts_with("total"))
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    let heavy = &tally.0["usage-heavy"];
    assert_eq!(
        total[1..3],
        [heavy.admitted.to_string(), heavy.refused.to_string()],
        "{table}"
    );
    Ok(())
}

/// Sends requests for `customers` in turn every 20 ms until aborted, and
/// returns the tally when stopped.
fn spawn_traffic(
    client: HttpClient,
    tokens: Vec<(String, String)>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<Tally>> {
    tokio::spawn(async move {
        let mut tally = Tally::default();
        let mut turn = 0;
        while !*stop.borrow() {
            let (customer, token) = &tokens[turn % tokens.len()];
            let reply = client.get_with_token("/", token, &[]).await?;
            tally.record(customer, reply.status)?;
            turn += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(tally)
    })
}

/// Starts a stack and a traffic task for a basic and a pro customer named
/// `<prefix>-basic` and `<prefix>-pro`. Sending `true` on the returned
/// sender stops the traffic.
async fn start_with_traffic(
    prefix: &str,
) -> anyhow::Result<(
    Stack,
    tokio::sync::watch::Sender<bool>,
    JoinHandle<anyhow::Result<Tally>>,
)> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start(&PluginConfig::for_key(&key)?).await?;
    let mut tokens = Vec::new();
    for tier in ["basic", "pro"] {
        let customer = format!("{prefix}-{tier}");
        let token = key.mint(&TokenSpec::new(&customer, tier))?;
        tokens.push((customer, token));
    }
    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let traffic = spawn_traffic(stack.client(), tokens, stop);
    Ok((stack, stop_sender, traffic))
}

/// Proves a sidecar killed with SIGKILL loses and doubles nothing, and requests stay decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_crash_keeps_every_admission_once() -> anyhow::Result<()> {
    let (mut stack, stop_sender, traffic) = start_with_traffic("crash").await?;

    tokio::time::sleep(Duration::from_millis(1500)).await;
    stack.sidecar.kill_hard();
    // Requests during the outage are decided locally; the traffic task fails
    // on any status other than 200 or 429.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stack.sidecar.restart().await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop_sender.send(true)?;
    let tally = traffic.await.context("traffic task panicked")??;
    assert!(
        tally.0.values().all(|usage| usage.admitted > 0),
        "{tally:?}"
    );

    assert_ledger_settles_on(&stack, &tally).await?;

    // The outage is counted and logged, never silent.
    let failures_stat = "wasmcustom.veo.sync_failures_total";
    let stats = stack.envoy.admin().stats(failures_stat).await?;
    let failures = stats.get(failures_stat).copied().unwrap_or(0);
    assert!(failures > 0, "{failures_stat} is 0 after a 2 s outage");
    let log = stack.envoy.log();
    let filter_lines: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("wasm log"))
        .collect();
    assert!(
        filter_lines
            .iter()
            .any(|line| line.contains("[warning]") && line.contains("sync")),
        "no warning about the failed sync in Envoy's log; the filter's lines:\n{}",
        filter_lines.join("\n")
    );
    Ok(())
}

/// Proves a planned Envoy stop loses nothing when traffic stops, listeners
/// drain and one sync interval plus a second passes before SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_envoy_stop_keeps_usage() -> anyhow::Result<()> {
    let (mut stack, stop_sender, traffic) = start_with_traffic("stop").await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The load balancer takes the host out first, so the last requests
    // reach Envoy just before the drain starts.
    stop_sender.send(true)?;
    let tally = traffic.await.context("traffic task panicked")??;

    let drain = stack
        .envoy
        .admin()
        .post("/drain_listeners?graceful")
        .await?;
    assert_eq!(drain.status, 200, "drain_listeners: {}", drain.body);
    tokio::time::sleep(Duration::from_millis(SYNC_INTERVAL_MS + 1000)).await;
    stack.envoy.stop();

    assert_ledger_settles_on(&stack, &tally).await
}

/// A sync server that rejects the first batch with usage as the sidecar
/// rejects an invalid record, then acknowledges everything, and keeps every
/// batch it receives.
#[derive(Clone, Default)]
struct RejectingSync {
    batches: std::sync::Arc<std::sync::Mutex<Vec<veo_proto::sync::SyncRequest>>>,
}

#[tonic::async_trait]
impl veo_proto::sync::sync_server::Sync for RejectingSync {
    async fn sync(
        &self,
        request: tonic::Request<veo_proto::sync::SyncRequest>,
    ) -> Result<tonic::Response<veo_proto::sync::SyncResponse>, tonic::Status> {
        let request = request.into_inner();
        if request.usage.is_empty() {
            return Ok(tonic::Response::new(Default::default()));
        }
        let mut batches = self
            .batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        batches.push(request.clone());
        if batches.len() == 1 {
            return Err(tonic::Status::invalid_argument(
                "invalid usage[0].customer: rejected by the test",
            ));
        }
        Ok(tonic::Response::new(veo_proto::sync::SyncResponse {
            applied_sequence: request.sequence,
            ..Default::default()
        }))
    }
}

/// Proves a record the sidecar rejects as invalid is dropped, counted and
/// logged, and the rest of its batch is sent again under the same sequence
/// number, through Envoy's gRPC client and status message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_record_is_dropped_from_batch() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let upstream = veo_tests::upstream::EchoUpstream::start().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sync_port = listener.local_addr()?.port();
    let sync = RejectingSync::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(veo_proto::sync::sync_server::SyncServer::new(sync.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let key = SigningKey::generate("k1");
    let values = veo_tests::envoy::BootstrapValues {
        node_id: format!("veo-test-{}", std::process::id()),
        upstream_port: upstream.address().port(),
        sidecar_port: sync_port,
        plugin_config: PluginConfig::for_key(&key)?.to_json(),
    };
    let envoy = veo_tests::envoy::EnvoyProcess::spawn(dir.path(), &values, 1)?
        .wait_ready()
        .await?;
    let client = envoy.client();
    // Both requests before the first sync, so that they share a batch.
    for customer in ["rejected-a", "rejected-b"] {
        let token = key.mint(&TokenSpec::new(customer, "basic"))?;
        let reply = client.get_with_token("/", &token, &[]).await?;
        assert_eq!(reply.status, 200, "{customer}");
    }

    let deadline = std::time::Instant::now() + settle_timeout();
    let batches = loop {
        let batches = sync
            .batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let sent: std::collections::BTreeSet<String> = batches
            .iter()
            .skip(1)
            .flat_map(|batch| batch.usage.iter().map(|record| record.customer.clone()))
            .collect();
        let rejected = batches.first().map(|batch| batch.usage[0].customer.clone());
        let others_sent = ["rejected-a", "rejected-b"]
            .iter()
            .all(|customer| Some(customer.to_string()) == rejected || sent.contains(*customer));
        if (batches.len() >= 2 && others_sent) || std::time::Instant::now() > deadline {
            break batches;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let customers = |batch: &veo_proto::sync::SyncRequest| -> Vec<String> {
        batch
            .usage
            .iter()
            .map(|record| record.customer.clone())
            .collect()
    };
    assert!(batches.len() >= 2, "{} batches", batches.len());
    // Usually both requests share the first batch, but a tick between them
    // splits them. Either way only the first record of the rejected batch
    // is dropped.
    let first = customers(&batches[0]);
    let rejected = first[0].clone();
    for later in &batches[1..] {
        assert!(
            !customers(later).contains(&rejected),
            "{rejected} sent again"
        );
    }
    if first.len() == 2 {
        assert_eq!(customers(&batches[1]), first[1..]);
        assert_eq!(batches[1].sequence, batches[0].sequence);
    } else {
        // A batch left empty gives up its sequence number.
        assert!(batches[1].sequence > batches[0].sequence);
    }

    let rejected_stat = "wasmcustom.veo.usage_rejected_records_total";
    let expected = BTreeMap::from([(rejected_stat.to_owned(), 1)]);
    let observed = envoy
        .admin()
        .await_counters(&expected, settle_timeout())
        .await?;
    assert_eq!(observed, expected);
    let log = envoy.log();
    assert!(
        log.lines()
            .any(|line| line.contains("sidecar rejected a usage record")
                && line.contains(&rejected)
                && line.contains("rejected by the test")),
        "no error line for the dropped record in Envoy's log:\n{log}"
    );
    server.abort();
    Ok(())
}
