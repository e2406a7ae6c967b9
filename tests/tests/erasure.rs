//! Customer erasure against real Envoy and the real sidecar: traffic of the
//! erased customer racing the erasure leaves no trace, its still-valid
//! tokens are refused, other customers are untouched, and the audit log
//! proves the erasure and detects tampering.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tonic::Request;
use tonic::transport::Channel;
use veo_proto::admin::admin_client::AdminClient;
use veo_proto::admin::{
    EraseCustomerRequest, Erasure, ErasureState, GetErasureRequest, GetStripeCustomerRequest,
    SetStripeCustomerRequest, VerifyAuditLogRequest,
};
use veo_tests::artifacts::sidecar_binary;
use veo_tests::plugin::{PluginConfig, SYNC_INTERVAL_MS};
use veo_tests::sidecar::Sidecar;
use veo_tests::sync_api::{minute_ago, send_batch, usage_record};
use veo_tests::tokens::{SigningKey, TokenSpec};
use veo_tests::{Stack, StackOptions};

/// Tables with a `customer` column.
const CUSTOMER_TABLES: [&str; 6] = [
    "usage_minute",
    "billing_dirty",
    "meter_bucket",
    "meter_event",
    "counter_outbox",
    "stripe_customer",
];

fn options() -> StackOptions {
    StackOptions {
        // A one-hour token lifetime bounds how long the id is kept to
        // refuse its tokens.
        sidecar_toml: Some("[privacy]\ntoken_lifetime_seconds = 3600\n".into()),
        ..StackOptions::default()
    }
}

/// Polls erasure `erasure_id` every 100 ms until it reaches `state`; fails
/// with the last state and the instances still pending after `timeout`.
async fn await_erasure(
    admin: &mut AdminClient<Channel>,
    erasure_id: &str,
    timeout: Duration,
    state: ErasureState,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let progress = admin
            .get_erasure(GetErasureRequest {
                erasure_id: erasure_id.to_owned(),
            })
            .await?
            .into_inner();
        if progress.state() == state {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "erasure {erasure_id} is {:?} after {timeout:?}, expected {state:?}; pending \
                 instances: {:?}",
                progress.state(),
                progress.pending_instances
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends requests with `token` until `stop`, and returns the statuses.
fn traffic(
    stack: &Stack,
    token: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(Instant, u16)>> {
    let client = stack.client();
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(reply) = client.get_with_token("/videos/clip", &token, &[]).await {
                statuses.push((Instant::now(), reply.status));
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        statuses
    })
}

/// Customer erased in the traffic test; distinct enough that its bytes
/// occur nowhere else in a store.
const DOOMED: &str = "cust-doomed-5d1e";

/// Customer kept in the traffic test.
const KEPT: &str = "cust-kept-5d1e";

/// Returns the bytes of the store's database and WAL files in `data_dir`.
fn store_bytes(data_dir: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = std::fs::read(data_dir.join("usage.sqlite3"))?;
    match std::fs::read(data_dir.join("usage.sqlite3-wal")) {
        Ok(wal) => bytes.extend(wal),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err.into()),
    }
    Ok(bytes)
}

/// Returns whether `needle` occurs in `bytes`.
fn contains(bytes: &[u8], needle: &str) -> bool {
    bytes
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

/// Returns the values of the `customer` columns of the store: the
/// pseudonyms of the customers it has rows of.
fn customers_named(store: &std::path::Path) -> anyhow::Result<BTreeSet<String>> {
    let conn = rusqlite::Connection::open(store)?;
    let mut named = BTreeSet::new();
    for table in CUSTOMER_TABLES {
        let mut statement = conn.prepare(&format!("SELECT DISTINCT customer FROM {table}"))?;
        for customer in statement.query_map([], |row| row.get::<_, String>(0))? {
            named.insert(customer?);
        }
    }
    Ok(named)
}

/// Proves an erasure during traffic leaves no usage of the customer,
/// refuses its tokens, spares the others and is in an intact audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_racing_traffic_leaves_no_trace() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let config = PluginConfig::for_key(&key)?.quota("basic", 1_000, 3);
    let mut stack = Stack::start_with(&config, options()).await?;
    let doomed_token = key.mint(&TokenSpec::new(DOOMED, "basic"))?;
    let kept_token = key.mint(&TokenSpec::new(KEPT, "basic"))?;
    let mut admin = stack.sidecar.admin().await?;
    for (customer, stripe_id) in [(DOOMED, "cus_doomed"), (KEPT, "cus_kept")] {
        admin
            .set_stripe_customer(SetStripeCustomerRequest {
                customer: customer.into(),
                stripe_customer_id: stripe_id.into(),
            })
            .await?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let doomed = traffic(&stack, doomed_token.clone(), Arc::clone(&stop));
    let kept = traffic(&stack, kept_token.clone(), Arc::clone(&stop));
    // Usage of the customer is in the ledger and in flight when it is
    // erased.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    ensure!(
        stack.sidecar.usage(DOOMED).await?.admitted > 0,
        "no usage before the erasure"
    );

    let mut request = Request::new(EraseCustomerRequest {
        customer: DOOMED.into(),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("x-veo-actor", "privacy-team".parse()?);
    let erasure = admin.erase_customer(request).await?.into_inner();
    let erased_at = Instant::now();
    let receipt = erasure
        .receipt
        .clone()
        .context("erasure without a receipt")?;
    ensure!(
        receipt.position >= 2,
        "the mapping change and the erasure are both audited"
    );

    // Every instance acknowledges within a few sync intervals.
    await_erasure(
        &mut admin,
        &erasure.erasure_id,
        Duration::from_secs(10),
        ErasureState::Complete,
    )
    .await?;
    let completed_at = Instant::now();
    // Traffic goes on after the erasure, so batches built before and after
    // it reach the sidecar.
    tokio::time::sleep(Duration::from_millis(SYNC_INTERVAL_MS * 5)).await;
    stop.store(true, Ordering::Relaxed);
    let doomed = doomed.await?;
    let kept = kept.await?;

    let refused_after: Vec<u16> = doomed
        .iter()
        .filter(|(at, _)| *at > completed_at)
        .map(|(_, status)| *status)
        .collect();
    ensure!(
        !refused_after.is_empty(),
        "no request after the erasure completed"
    );
    ensure!(
        refused_after.iter().all(|status| *status == 401),
        "statuses after the erasure: {refused_after:?}"
    );
    let reply = stack
        .client()
        .get_with_token("/", &doomed_token, &[])
        .await?;
    assert_eq!(reply.status, 401);
    ensure!(
        !reply.body.contains(DOOMED),
        "the 401 names the customer: {}",
        reply.body
    );
    ensure!(
        kept.iter().all(|(_, status)| *status == 200),
        "another customer was refused"
    );
    ensure!(
        erased_at.elapsed() > Duration::from_millis(SYNC_INTERVAL_MS * 3),
        "too little traffic after the erasure"
    );

    tokio::time::sleep(Duration::from_millis(SYNC_INTERVAL_MS * 3)).await;
    assert_eq!(stack.sidecar.usage(DOOMED).await?.admitted, 0);
    ensure!(
        stack.sidecar.usage(KEPT).await?.admitted > 0,
        "kept customer lost usage"
    );
    let mapping = admin
        .get_stripe_customer(GetStripeCustomerRequest {
            customer: DOOMED.into(),
        })
        .await?
        .into_inner();
    assert_eq!(mapping.stripe_customer_id, "");
    let remapped = admin
        .set_stripe_customer(SetStripeCustomerRequest {
            customer: DOOMED.into(),
            stripe_customer_id: "cus_doomed".into(),
        })
        .await;
    let Err(rejected) = remapped else {
        bail!("the erased customer was mapped to a Stripe customer again");
    };
    assert_eq!(rejected.code(), tonic::Code::InvalidArgument);
    ensure!(
        rejected.message().contains("was erased"),
        "{}",
        rejected.message()
    );
    // The operator command reads the mappings back.
    let address = stack.sidecar.address().to_string();
    for (customer, expected) in [
        (KEPT, "is billed to cus_kept"),
        (DOOMED, "no Stripe customer"),
    ] {
        let output = Command::new(sidecar_binary()?)
            .args(["stripe-customer", "--sidecar", &address, customer])
            .output()?;
        let printed = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "{printed}");
        ensure!(printed.contains(expected), "{customer}: {printed}");
    }

    // Erasing again returns the same receipt.
    let again = admin
        .erase_customer(EraseCustomerRequest {
            customer: DOOMED.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(again.erasure_id, erasure.erasure_id);
    assert_eq!(again.receipt, erasure.receipt);

    let verified = admin
        .verify_audit_log(VerifyAuditLogRequest {})
        .await?
        .into_inner();
    ensure!(verified.intact, "audit log: {}", verified.problem);

    stack.sidecar.stop();
    // The tables name customers by pseudonym, which is not the receipt's
    // subject hash. Only the kept customer's pseudonym is left, the same in
    // every table that has rows.
    let store = stack.sidecar.data_dir().join("usage.sqlite3");
    let named = customers_named(&store)?;
    ensure!(named.len() == 1, "customers named in the store: {named:?}");
    ensure!(
        !named.contains(&receipt.subject_hash),
        "rows are named by the subject hash"
    );
    // No customer id or Stripe customer id is stored in clear, neither the
    // erased customer's nor the kept one's. The actor is stored in clear, so
    // finding it shows the scan works.
    let bytes = store_bytes(stack.sidecar.data_dir())?;
    for id in [DOOMED, KEPT, "cus_doomed", "cus_kept"] {
        ensure!(
            !contains(&bytes, id),
            "the store files contain {id:?} in clear"
        );
    }
    ensure!(contains(&bytes, "privacy-team"), "the scan found no actor");
    Ok(())
}

/// Proves a changed byte in the stored audit log is found by the offline
/// check, which names the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_audit_log_is_detected() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut stack = Stack::start_with(&PluginConfig::for_key(&key)?, options()).await?;
    let mut admin = stack.sidecar.admin().await?;
    for customer in ["c1", "c2", "c3"] {
        admin
            .erase_customer(EraseCustomerRequest {
                customer: customer.into(),
                ..Default::default()
            })
            .await?;
    }
    stack.sidecar.stop();
    let data_dir = stack.sidecar.data_dir().to_path_buf();
    let verify = || -> anyhow::Result<(bool, String)> {
        let output = Command::new(sidecar_binary()?)
            .arg("verify-audit-log")
            .arg("--data-dir")
            .arg(&data_dir)
            .output()?;
        Ok((
            output.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ))
    };
    let (intact, text) = verify()?;
    ensure!(intact, "untouched log fails: {text}");
    ensure!(text.contains("3 entries"), "{text}");

    let conn = rusqlite::Connection::open(data_dir.join("usage.sqlite3"))?;
    // An attacker with write access to the file removes the guard first.
    let triggers: Vec<String> = {
        let mut statement = conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'",
        )?;
        statement
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?
    };
    for trigger in triggers {
        conn.execute_batch(&format!("DROP TRIGGER {trigger}"))?;
    }
    let details: Vec<u8> = conn.query_row(
        "SELECT details FROM audit_log WHERE position = 2",
        [],
        |row| row.get(0),
    )?;
    let mut changed = details.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0x01;
    conn.execute(
        "UPDATE audit_log SET details = ?1 WHERE position = 2",
        [changed],
    )?;
    drop(conn);

    let (intact, text) = verify()?;
    ensure!(!intact, "tampered log passes: {text}");
    ensure!(
        text.contains("entry 2"),
        "the check does not name entry 2: {text}"
    );
    Ok(())
}

/// Returns every key, hash field and sorted-set member in Redis that names
/// `customer`.
async fn redis_traces(url: &str, customer: &str) -> anyhow::Result<Vec<String>> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut conn).await?;
    let mut traces = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
        let members: Vec<String> = match kind.as_str() {
            "hash" => redis::cmd("HKEYS").arg(&key).query_async(&mut conn).await?,
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?
            }
            _ => Vec::new(),
        };
        traces.extend(
            members
                .into_iter()
                .chain(std::iter::once(key.clone()))
                .filter(|member| member.contains(customer))
                .map(|member| format!("{key}: {member}")),
        );
    }
    Ok(traces)
}

/// Proves an erasure removes the customer's counts from the counters
/// shared through Redis, and only the customer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_clears_the_shared_counters() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let redis = veo_tests::redis::RedisServer::start(&dir.path().join("redis")).await?;
    let key = SigningKey::generate("k1");
    let options = StackOptions {
        sidecar_toml: Some(format!(
            "[counters]\nbackend = \"redis\"\nredis_url = \"{}\"\nflush_interval_ms = 100\n\
             [privacy]\ntoken_lifetime_seconds = 3600\n",
            redis.url()
        )),
        ..StackOptions::default()
    };
    let stack = Stack::start_in(dir, &PluginConfig::for_key(&key)?, options).await?;
    let client = stack.client();
    for customer in ["doomed", "kept"] {
        let token = key.mint(&TokenSpec::new(customer, "basic"))?;
        for _ in 0..3 {
            assert_eq!(client.get_with_token("/", &token, &[]).await?.status, 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_traces(&redis.url(), "doomed").await?.is_empty() {
        ensure!(Instant::now() < deadline, "the usage never reached Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stack
        .sidecar
        .admin()
        .await?
        .erase_customer(EraseCustomerRequest {
            customer: "doomed".into(),
            ..Default::default()
        })
        .await?;

    let traces = redis_traces(&redis.url(), "doomed").await?;
    ensure!(traces.is_empty(), "left in Redis: {traces:?}");
    ensure!(
        !redis_traces(&redis.url(), "kept").await?.is_empty(),
        "another customer's counts are gone"
    );
    Ok(())
}

/// Runs `veo-sidecar rotate-keys` on the stopped sidecar's `data_dir` and
/// returns its output.
fn rotate_keys(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let output = Command::new(sidecar_binary()?)
        .arg("rotate-keys")
        .arg("--data-dir")
        .arg(data_dir)
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(text)
}

/// Proves key rotation re-wraps the data keys of a stopped sidecar, retires
/// the old key, and leaves the audit log readable and extendable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_keep_the_store_readable() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut stack = Stack::start_with(&PluginConfig::for_key(&key)?, options()).await?;
    stack
        .sidecar
        .admin()
        .await?
        .erase_customer(EraseCustomerRequest {
            customer: "c1".into(),
            ..Default::default()
        })
        .await?;
    stack.sidecar.stop();
    let data_dir = stack.sidecar.data_dir().to_path_buf();
    let store = data_dir.join("usage.sqlite3");
    let stored_details = |position: i64| -> anyhow::Result<Vec<u8>> {
        let conn = rusqlite::Connection::open(&store)?;
        Ok(conn.query_row(
            "SELECT details FROM audit_log WHERE position = ?1",
            [position],
            |row| row.get(0),
        )?)
    };
    let before = stored_details(1)?;

    let text = rotate_keys(&data_dir)?;
    ensure!(text.contains("kek-2 is current"), "{text}");
    ensure!(text.contains("retired kek-1"), "{text}");
    let keys = std::fs::read_to_string(data_dir.join("keys.json"))?;
    ensure!(
        !keys.contains("kek-1"),
        "the old key is still in the key file"
    );
    assert_eq!(stored_details(1)?, before, "rotation re-encrypted data");

    // The restarted sidecar unwraps the audit data key with the new key
    // only; appending and verifying need it.
    stack.sidecar.restart().await?;
    let mut admin = stack.sidecar.admin().await?;
    let second = admin
        .erase_customer(EraseCustomerRequest {
            customer: "c2".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(second.receipt.context("no receipt")?.position, 2);
    let verified = admin
        .verify_audit_log(VerifyAuditLogRequest {})
        .await?
        .into_inner();
    ensure!(verified.intact, "{}", verified.problem);
    Ok(())
}

/// Copies the store file of the stopped sidecar in `data_dir` into
/// `backup/sidecar-data`, with the key file as it is now, as an operator's
/// restore of a database backup would find them.
fn restore_backup(
    store: &[u8],
    data_dir: &std::path::Path,
    backup: &std::path::Path,
) -> anyhow::Result<()> {
    let restored = backup.join("sidecar-data");
    std::fs::create_dir_all(&restored)?;
    std::fs::write(restored.join("usage.sqlite3"), store)?;
    std::fs::copy(data_dir.join("keys.json"), restored.join("keys.json"))?;
    Ok(())
}

/// Proves a backup taken before an erasure still names the customer while
/// the key-encryption key it was wrapped under exists, and is unreadable
/// once rotation has retired that key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_backup_unreadable_after_rotation() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut stack = Stack::start_with(&PluginConfig::for_key(&key)?, options()).await?;
    let mapping = SetStripeCustomerRequest {
        customer: DOOMED.into(),
        stripe_customer_id: "cus_backup".into(),
    };
    stack
        .sidecar
        .admin()
        .await?
        .set_stripe_customer(mapping)
        .await?;
    stack.sidecar.stop();
    let data_dir = stack.sidecar.data_dir().to_path_buf();
    // The sidecar checkpoints the WAL when it stops, so the file is whole.
    let backup = std::fs::read(data_dir.join("usage.sqlite3"))?;
    for id in [DOOMED, "cus_backup"] {
        ensure!(
            !contains(&backup, id),
            "the backup contains {id:?} in clear"
        );
    }
    stack.sidecar.restart().await?;
    stack
        .sidecar
        .admin()
        .await?
        .erase_customer(EraseCustomerRequest {
            customer: DOOMED.into(),
            ..Default::default()
        })
        .await?;
    stack.sidecar.stop();

    // Restored with the key file in use, the backup still names the
    // customer's Stripe customer: the erased data key is in the backup.
    let before_rotation = tempfile::tempdir()?;
    restore_backup(&backup, &data_dir, before_rotation.path())?;
    let mut restored = veo_tests::sidecar::Sidecar::start(before_rotation.path()).await?;
    let lookup = GetStripeCustomerRequest {
        customer: DOOMED.into(),
    };
    let found = restored
        .admin()
        .await?
        .get_stripe_customer(lookup.clone())
        .await?;
    assert_eq!(found.into_inner().stripe_customer_id, "cus_backup");
    restored.stop();

    rotate_keys(&data_dir)?;

    // After rotation the key file no longer has the key that wrapped the
    // backup's data keys.
    let after_rotation = tempfile::tempdir()?;
    restore_backup(&backup, &data_dir, after_rotation.path())?;
    let Err(err) = veo_tests::sidecar::Sidecar::start(after_rotation.path()).await else {
        bail!("a sidecar started on the backup after the key was retired");
    };
    ensure!(err.to_string().contains("kek-1"), "{err}");

    // The live store is readable with the new key, and the customer is gone.
    stack.sidecar.restart().await?;
    let live = stack
        .sidecar
        .admin()
        .await?
        .get_stripe_customer(lookup)
        .await?;
    assert_eq!(live.into_inner().stripe_customer_id, "");
    Ok(())
}

/// Returns the distinct values of `usage_minute.customer` in the stopped
/// sidecar's store: the customers' pseudonyms.
fn ledger_pseudonyms(data_dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let conn = rusqlite::Connection::open(data_dir.join("usage.sqlite3"))?;
    let mut statement = conn.prepare("SELECT DISTINCT customer FROM usage_minute")?;
    let rows = statement.query_map([], |row| row.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Proves the rows of a backup taken before an erasure cannot be matched
/// with the live store once `rotate-keys` has replaced the index key, while
/// the live store keeps the other customer's usage and the erasure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_unlinks_rows_of_old_backups() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let mut sidecar = Sidecar::start(dir.path()).await?;
    let minute = minute_ago(1);
    let usage = vec![
        usage_record(DOOMED, minute, 5, 100),
        usage_record(KEPT, minute, 3, 60),
    ];
    send_batch(&sidecar, "envoy-1", 1, usage).await?;
    ensure!(sidecar.usage(KEPT).await?.admitted == 3, "usage not stored");
    sidecar.stop();
    let data_dir = sidecar.data_dir().to_path_buf();
    let backup = ledger_pseudonyms(&data_dir)?;
    ensure!(backup.len() == 2, "expected two customers: {backup:?}");
    sidecar.restart().await?;
    let erased = erase_on(&sidecar, DOOMED).await?;
    sidecar.stop();
    // The kept customer's rows carry the same pseudonym as in the backup,
    // which is how a backup's rows are linked to the live store.
    let live = store_bytes(&data_dir)?;
    ensure!(
        backup.iter().any(|pseudonym| contains(&live, pseudonym)),
        "the live store shares no pseudonym with the backup before rotation"
    );

    let text = rotate_keys(&data_dir)?;
    ensure!(
        text.contains("index key replaced; rows of 1 customers"),
        "{text}"
    );

    let live = store_bytes(&data_dir)?;
    for pseudonym in &backup {
        ensure!(
            !contains(&live, pseudonym),
            "the live store still contains the backup's pseudonym {pseudonym}"
        );
    }
    sidecar.restart().await?;
    ensure!(
        sidecar.usage(KEPT).await?.admitted == 3,
        "the kept customer's usage is lost"
    );
    // The erasure is still in force and found by its subject hash.
    let again = erase_on(&sidecar, DOOMED).await?;
    assert_eq!(again.erasure_id, erased.erasure_id);
    assert_eq!(again.receipt, erased.receipt);
    verified_audit_entries(&sidecar).await?;
    Ok(())
}

/// Proves an erasure while Redis is down stays pending until the sidecar
/// has removed the customer's counts from Redis once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_while_redis_is_down_finishes_when_it_returns() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let mut redis = veo_tests::redis::RedisServer::start(&dir.path().join("redis")).await?;
    let key = SigningKey::generate("k1");
    let options = StackOptions {
        sidecar_toml: Some(format!(
            "[counters]\nbackend = \"redis\"\nredis_url = \"{}\"\nflush_interval_ms = 100\n\
             timeout_ms = 200\n[privacy]\ntoken_lifetime_seconds = 3600\n",
            redis.url()
        )),
        ..StackOptions::default()
    };
    let stack = Stack::start_in(dir, &PluginConfig::for_key(&key)?, options).await?;
    let token = key.mint(&TokenSpec::new("doomed", "basic"))?;
    for _ in 0..3 {
        assert_eq!(
            stack
                .client()
                .get_with_token("/", &token, &[])
                .await?
                .status,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_traces(&redis.url(), "doomed").await?.is_empty() {
        ensure!(Instant::now() < deadline, "the usage never reached Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redis writes its data to disk before it stops, so the counts come back
    // with it.
    let url = redis.url();
    redis::cmd("SAVE")
        .query_async::<()>(
            &mut redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await?,
        )
        .await?;
    redis.stop();

    let mut admin = stack.sidecar.admin().await?;
    let erasure = admin
        .erase_customer(EraseCustomerRequest {
            customer: "doomed".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(erasure.state(), ErasureState::PendingSharedCounters);

    redis.start_again().await?;
    // Complete needs both: the Redis counts gone and the idle Envoy's
    // acknowledgement.
    await_erasure(
        &mut admin,
        &erasure.erasure_id,
        Duration::from_secs(30),
        ErasureState::Complete,
    )
    .await?;
    let traces = redis_traces(&redis.url(), "doomed").await?;
    ensure!(traces.is_empty(), "left in Redis: {traces:?}");
    Ok(())
}

/// Proves an Envoy without traffic still receives and acknowledges an
/// erasure, so the customer's first request afterwards is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_envoy_applies_an_erasure() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let stack = Stack::start_with(&PluginConfig::for_key(&key)?, options()).await?;
    let token = key.mint(&TokenSpec::new("solo", "basic"))?;
    for _ in 0..3 {
        assert_eq!(
            stack
                .client()
                .get_with_token("/", &token, &[])
                .await?
                .status,
            200
        );
    }
    // Long enough for the usage to be sent and the replies to stop naming
    // the customer, so only the heartbeat polls remain.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut admin = stack.sidecar.admin().await?;
    let erasure = admin
        .erase_customer(EraseCustomerRequest {
            customer: "solo".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    await_erasure(
        &mut admin,
        &erasure.erasure_id,
        Duration::from_secs(5),
        ErasureState::Complete,
    )
    .await?;
    let reply = stack.client().get_with_token("/", &token, &[]).await?;
    assert_eq!(reply.status, 401, "body: {}", reply.body);
    Ok(())
}

/// Proves that removing the newest audit entries, which leaves an intact
/// chain, is still found through the erasure receipts and the recorded
/// last entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_newest_audit_entry_is_detected() -> anyhow::Result<()> {
    let key = SigningKey::generate("k1");
    let mut stack = Stack::start_with(&PluginConfig::for_key(&key)?, options()).await?;
    let mut admin = stack.sidecar.admin().await?;
    for customer in ["c1", "c2"] {
        admin
            .erase_customer(EraseCustomerRequest {
                customer: customer.into(),
                ..Default::default()
            })
            .await?;
    }
    stack.sidecar.stop();
    let data_dir = stack.sidecar.data_dir().to_path_buf();
    let conn = rusqlite::Connection::open(data_dir.join("usage.sqlite3"))?;
    conn.execute_batch("DROP TRIGGER audit_log_no_delete")?;
    conn.execute("DELETE FROM audit_log WHERE position = 2", [])?;
    drop(conn);

    let output = Command::new(sidecar_binary()?)
        .arg("verify-audit-log")
        .arg("--data-dir")
        .arg(&data_dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(!output.status.success(), "a shortened log passes: {text}");
    ensure!(
        text.contains("entry 2"),
        "the check does not name entry 2: {text}"
    );
    Ok(())
}

/// Returns every key of `redis` with its fields, members and values, as
/// text.
async fn redis_contents(redis: &veo_tests::redis::RedisServer) -> anyhow::Result<String> {
    let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("*")).await?;
    let mut contents = String::new();
    for key in keys {
        let kind: String = redis.query(redis::cmd("TYPE").arg(&key)).await?;
        let read = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(&key).clone(),
            "zset" => redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).clone(),
            "stream" => redis::cmd("XRANGE").arg(&key).arg("-").arg("+").clone(),
            "string" => redis::cmd("GET").arg(&key).clone(),
            other => bail!("Redis key {key} has the unexpected type {other}"),
        };
        let value: redis::Value = redis.query(&read).await?;
        contents.push_str(&format!("{key}: {value:?}\n"));
    }
    Ok(contents)
}

/// Proves an erasure on one sidecar reaches another sidecar sharing its
/// Redis: the other deletes the customer's ledger rows, drops its later
/// usage and records an erasure of its own, while other customers keep
/// theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_sidecars_sharing_redis() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let redis = veo_tests::redis::RedisServer::start(&dir.path().join("redis")).await?;
    let notice_key = dir.path().join("notice.key");
    let output = Command::new(sidecar_binary()?)
        .arg("new-notice-key")
        .arg("--out")
        .arg(&notice_key)
        .output()?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let toml = format!(
        "[counters]\nbackend = \"redis\"\nredis_url = \"{}\"\nflush_interval_ms = 100\n\
         notice_key_file = {:?}\n[privacy]\ntoken_lifetime_seconds = 3600\n",
        redis.url(),
        notice_key.display().to_string()
    );
    let mut sidecars = Vec::new();
    for name in ["first", "second"] {
        let sidecar_dir = dir.path().join(name);
        std::fs::create_dir_all(&sidecar_dir)?;
        sidecars.push(Sidecar::start_with_config(&sidecar_dir, &toml).await?);
    }
    let minute = minute_ago(1);
    for sidecar in &sidecars {
        let usage = vec![
            usage_record(DOOMED, minute, 5, 100),
            usage_record(KEPT, minute, 3, 60),
        ];
        send_batch(sidecar, "envoy-1", 1, usage).await?;
    }
    let (first, second) = (&sidecars[0], &sidecars[1]);
    ensure!(
        second.usage(DOOMED).await?.admitted == 5,
        "usage not stored"
    );

    let requested = EraseCustomerRequest {
        customer: DOOMED.into(),
        ..Default::default()
    };
    first.admin().await?.erase_customer(requested).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while second.usage(DOOMED).await?.admitted > 0 {
        ensure!(
            Instant::now() < deadline,
            "the second sidecar kept the erased customer's usage for 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_eq!(second.usage(KEPT).await?.admitted, 3);
    // The notice is sealed, so Redis names the erased customer nowhere,
    // while the kept one's counts still name it.
    let contents = redis_contents(&redis).await?;
    ensure!(
        contents.contains(KEPT),
        "Redis lacks the kept customer: {contents}"
    );
    ensure!(
        !contents.contains(DOOMED),
        "Redis still names the erased customer: {contents}"
    );
    let late = vec![usage_record(DOOMED, minute, 4, 10)];
    send_batch(second, "envoy-1", 2, late).await?;
    assert_eq!(second.usage(DOOMED).await?.admitted, 0);
    // The second sidecar was asked nothing, so its one audit entry is the
    // erasure it made from the notice.
    let verified = second
        .admin()
        .await?
        .verify_audit_log(VerifyAuditLogRequest {})
        .await?
        .into_inner();
    assert_eq!(verified.entries, 1);
    ensure!(verified.intact, "audit log: {}", verified.problem);
    ensure!(
        second
            .log()
            .contains("erased a customer that another sidecar erased"),
        "the second sidecar logged no erasure from a notice"
    );
    ensure!(
        !first
            .log()
            .contains("erased a customer that another sidecar erased"),
        "the first sidecar applied its own notice"
    );
    Ok(())
}

/// Erases `customer` on `sidecar` and returns the erasure.
async fn erase_on(sidecar: &Sidecar, customer: &str) -> anyhow::Result<Erasure> {
    let request = EraseCustomerRequest {
        customer: customer.to_owned(),
        ..Default::default()
    };
    Ok(sidecar
        .admin()
        .await?
        .erase_customer(request)
        .await?
        .into_inner())
}

/// Checks the audit log of `sidecar` and returns its number of entries.
async fn verified_audit_entries(sidecar: &Sidecar) -> anyhow::Result<u64> {
    let verified = sidecar
        .admin()
        .await?
        .verify_audit_log(VerifyAuditLogRequest {})
        .await?
        .into_inner();
    ensure!(verified.intact, "audit log: {}", verified.problem);
    Ok(verified.entries)
}

/// Returns the addresses of the peers `erasure` waits for.
fn pending_peer_names(erasure: &Erasure) -> Vec<String> {
    erasure
        .pending_peers
        .iter()
        .map(|pending| pending.peer.clone())
        .collect()
}

/// Reads erasure `erasure_id` on `sidecar`.
async fn erasure_on(sidecar: &Sidecar, erasure_id: &str) -> anyhow::Result<Erasure> {
    let request = GetErasureRequest {
        erasure_id: erasure_id.to_owned(),
    };
    Ok(sidecar
        .admin()
        .await?
        .get_erasure(request)
        .await?
        .into_inner())
}

/// Writes a sidecar config file whose `privacy.erasure_peers` names `peers`.
fn peer_config(peers: &[&Sidecar]) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|peer| format!("\"http://{}\"", peer.address()))
        .collect();
    format!(
        "[privacy]\ntoken_lifetime_seconds = 3600\nerasure_peers = [{}]\n",
        peers.join(", ")
    )
}

/// A sidecar with its own store, such as one of another region, receives
/// an erasure from the sidecar that listed it in `privacy.erasure_peers`,
/// also when it was down at the time, and does not pass it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_reaches_peer_sidecars() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let (first_dir, peer_dir) = (dir.path().join("first"), dir.path().join("peer"));
    std::fs::create_dir_all(&first_dir)?;
    std::fs::create_dir_all(&peer_dir)?;
    let mut peer = Sidecar::start_with_config(&peer_dir, &peer_config(&[])).await?;
    let first = Sidecar::start_with_config(&first_dir, &peer_config(&[&peer])).await?;
    let minute = minute_ago(1);
    for sidecar in [&first, &peer] {
        let usage = vec![
            usage_record(DOOMED, minute, 5, 100),
            usage_record(KEPT, minute, 3, 60),
        ];
        send_batch(sidecar, "envoy-1", 1, usage).await?;
    }

    // The peer is down when the customer is erased, and lists the first
    // sidecar as its own peer when it comes back.
    peer.stop();
    std::fs::write(peer_dir.join("sidecar.toml"), peer_config(&[&first]))?;
    let erased = erase_on(&first, DOOMED).await?;
    let peer_address = format!("http://{}", peer.address());
    let waiting = pending_peer_names(&erased);
    assert_eq!(waiting, std::slice::from_ref(&peer_address));
    assert_eq!(erased.state(), ErasureState::PendingPeers);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let progress = erasure_on(&first, &erased.erasure_id).await?;
        if let Some(failed) = progress.pending_peers.first()
            && failed.attempts > 0
        {
            ensure!(
                failed.last_error.contains("connect"),
                "unexpected error: {}",
                failed.last_error
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no attempt to reach the peer in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    peer.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progress = erasure_on(&first, &erased.erasure_id).await?;
        if progress.pending_peers.is_empty() {
            ensure!(
                progress.state() != ErasureState::PendingPeers,
                "no peer pending, yet the state is {:?}",
                progress.state()
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the peer did not erase the customer within 30 s of its restart: {:?}",
            progress.pending_peers
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(peer.usage(DOOMED).await?.admitted, 0);
    assert_eq!(peer.usage(KEPT).await?.admitted, 3);
    // Usage arriving late is dropped on the peer too.
    send_batch(
        &peer,
        "envoy-1",
        2,
        vec![usage_record(DOOMED, minute, 4, 10)],
    )
    .await?;
    assert_eq!(peer.usage(DOOMED).await?.admitted, 0);

    // Asking the peer again returns its erasure, which waits for no peer
    // of its own: an erasure received from a peer is not passed on.
    let on_peer = erase_on(&peer, DOOMED).await?;
    ensure!(
        on_peer.pending_peers.is_empty(),
        "the peer passed the erasure on: {:?}",
        on_peer.pending_peers
    );
    assert_eq!(
        on_peer.requested_unix_ms, erased.requested_unix_ms,
        "the peer's erasure dates from the first sidecar's"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (sidecar, name) in [(&first, "first"), (&peer, "peer")] {
        assert_eq!(
            verified_audit_entries(sidecar).await?,
            1,
            "{name} sidecar erased the customer once"
        );
    }
    ensure!(
        first.log().contains("peer sidecar erased the customer"),
        "the first sidecar logged no erasure passed on"
    );
    ensure!(
        !peer.log().contains("peer sidecar erased the customer"),
        "the peer passed the erasure back"
    );
    Ok(())
}

/// A peer that accepts connections and never replies delays no other peer:
/// the one that replies erases every customer within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_delays_no_other_peer() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let (first_dir, peer_dir) = (dir.path().join("first"), dir.path().join("peer"));
    std::fs::create_dir_all(&first_dir)?;
    std::fs::create_dir_all(&peer_dir)?;
    let peer = Sidecar::start_with_config(&peer_dir, &peer_config(&[])).await?;
    // A silent peer whose address sorts first, so that a sidecar serving
    // its peers one after the other in order of address reaches it first.
    // Its port is the first free one of the local range whose digits sort
    // before the other peer's.
    let peer_port = peer.address().port().to_string();
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let bounds: Vec<u16> = range
        .split_whitespace()
        .filter_map(|bound| bound.parse().ok())
        .collect();
    let (low, high) = match bounds[..] {
        [low, high] => (low, high),
        _ => bail!("unexpected ip_local_port_range: {range:?}"),
    };
    let mut silent = None;
    for port in (low..=high).filter(|port| port.to_string() < peer_port) {
        if let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            silent = Some(listener);
            break;
        }
    }
    let silent = silent.with_context(|| format!("no free port sorts before {peer_port}"))?;
    let silent_address = silent.local_addr()?;
    let holder = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            connections.push(stream);
        }
    });
    let toml = format!(
        "[privacy]\ntoken_lifetime_seconds = 3600\nerasure_peers = [\"http://{silent_address}\", \
         \"http://{}\"]\n",
        peer.address()
    );
    let first = Sidecar::start_with_config(&first_dir, &toml).await?;
    let customers = ["gone-1", "gone-2", "gone-3"];
    let minute = minute_ago(1);
    let usage = customers
        .iter()
        .map(|customer| usage_record(customer, minute, 2, 10))
        .collect();
    send_batch(&peer, "envoy-1", 1, usage).await?;

    let started = Instant::now();
    let mut erasure_ids = Vec::new();
    for customer in customers {
        let erased = erase_on(&first, customer).await?;
        erasure_ids.push(erased.erasure_id);
    }
    for customer in customers {
        while peer.usage(customer).await?.admitted > 0 {
            ensure!(
                started.elapsed() < Duration::from_secs(8),
                "the answering peer kept {customer} for 8 s behind the silent one"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let silent_peer = format!("http://{silent_address}");
    for erasure_id in &erasure_ids {
        let progress = erasure_on(&first, erasure_id).await?;
        let waiting = pending_peer_names(&progress);
        assert_eq!(waiting, std::slice::from_ref(&silent_peer));
    }
    holder.abort();
    Ok(())
}

/// A peer that sends the headers of its reply to an erasure and then
/// stalls: each call to it fails after the whole-call limit of 10 s, and
/// the erasure lists the peer with the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_peer_call_fails_after_ten_seconds() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let stalled_address = listener.local_addr()?;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server_calls = Arc::clone(&calls);
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let calls = Arc::clone(&server_calls);
            let service = hyper::service::service_fn(move |_request| {
                calls.fetch_add(1, Ordering::SeqCst);
                let reply = hyper::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(EndlessBody);
                async move { reply }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let toml = format!(
        "[privacy]\ntoken_lifetime_seconds = 3600\nerasure_peers = [\"http://{stalled_address}\"]\n"
    );
    let sidecar = Sidecar::start_with_config(dir.path(), &toml).await?;
    let started = Instant::now();
    let erased = erase_on(&sidecar, DOOMED).await?;

    let failed = loop {
        let progress = erasure_on(&sidecar, &erased.erasure_id).await?;
        let attempted = progress
            .pending_peers
            .iter()
            .find(|pending| pending.attempts > 0)
            .cloned();
        if let Some(pending) = attempted {
            break pending;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no failed call to the stalled peer within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed();
    assert_eq!(failed.peer, format!("http://{stalled_address}"));
    assert!(
        failed.last_error.starts_with("no reply within 10 s"),
        "{}",
        failed.last_error
    );
    assert!(
        elapsed >= Duration::from_secs(10),
        "failed after {elapsed:?}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 1);
    server.abort();
    Ok(())
}

/// A response body that never yields a frame.
struct EndlessBody;

impl hyper::body::Body for EndlessBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Pending
    }
}

/// Erasures waiting for a peer that the config no longer lists stay
/// pending, and `drop-erasure-peer` on the stopped sidecar drops them with
/// an audit entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasures_for_a_removed_peer_wait_until_dropped() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    // Nothing listens on the peer's port.
    let unused_address = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let absent_peer = format!("http://{unused_address}");
    let toml = |peers: &str| {
        format!("[privacy]\ntoken_lifetime_seconds = 3600\nerasure_peers = [{peers}]\n")
    };
    let mut sidecar =
        Sidecar::start_with_config(dir.path(), &toml(&format!("{absent_peer:?}"))).await?;
    let erased = erase_on(&sidecar, DOOMED).await?;

    // The peer leaves the list: the erasure still waits for it, and it is
    // still tried.
    let deadline = Instant::now() + Duration::from_secs(15);
    let attempts_before = loop {
        let progress = erasure_on(&sidecar, &erased.erasure_id).await?;
        if let Some(pending) = progress.pending_peers.first()
            && pending.attempts > 0
        {
            break pending.attempts;
        }
        ensure!(
            Instant::now() < deadline,
            "the peer was not tried within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    sidecar.stop();
    std::fs::write(dir.path().join("sidecar.toml"), toml(""))?;
    sidecar.restart().await?;
    let progress = erasure_on(&sidecar, &erased.erasure_id).await?;
    let waiting = pending_peer_names(&progress);
    assert_eq!(waiting, std::slice::from_ref(&absent_peer));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let progress = erasure_on(&sidecar, &erased.erasure_id).await?;
        let attempts = progress.pending_peers.first().map_or(0, |p| p.attempts);
        if attempts > attempts_before {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the unlisted peer was not tried again within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        sidecar
            .log()
            .contains("privacy.erasure_peers no longer lists"),
        "no warning about the unlisted peer"
    );

    sidecar.stop();
    let output = Command::new(sidecar_binary()?)
        .arg("drop-erasure-peer")
        .arg("--data-dir")
        .arg(sidecar.data_dir())
        .args(["--actor", "cli:ops", &absent_peer])
        .output()?;
    let printed = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(printed.contains(&erased.erasure_id), "{printed}");
    sidecar.restart().await?;
    let progress = erasure_on(&sidecar, &erased.erasure_id).await?;
    ensure!(
        progress.pending_peers.is_empty(),
        "still waiting: {:?}",
        progress.pending_peers
    );
    assert_eq!(
        verified_audit_entries(&sidecar).await?,
        2,
        "the erasure and the dropped peer"
    );
    Ok(())
}

/// A notice dated far ahead, from a wrong clock or a forged entry, is
/// applied with its time capped at a minute ahead, so it cannot stop a later
/// erasure of the customer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_notice_time_is_capped() -> anyhow::Result<()> {
    let dir = veo_tests::stack::temp_dir()?;
    let redis = veo_tests::redis::RedisServer::start(&dir.path().join("redis")).await?;
    let toml = format!(
        "[counters]\nbackend = \"redis\"\nredis_url = \"{}\"\nflush_interval_ms = 100\n\
         [privacy]\ntoken_lifetime_seconds = 3600\n",
        redis.url()
    );
    let sidecar = Sidecar::start_with_config(dir.path(), &toml).await?;
    send_batch(
        &sidecar,
        "envoy-1",
        1,
        vec![usage_record(DOOMED, minute_ago(1), 5, 100)],
    )
    .await?;
    let hour_ahead_ms = veo_tests::sidecar::unix_seconds().saturating_add(3_600) * 1_000;
    let append = redis::cmd("XADD")
        .arg("{veo:erasures}")
        .arg("*")
        .arg("customer")
        .arg(DOOMED)
        .arg("sidecar")
        .arg("other-sidecar")
        .arg("erasure")
        .arg("er_other")
        .arg("erased_at_ms")
        .arg(hour_ahead_ms)
        .clone();
    let _: String = redis.query(&append).await?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while sidecar.usage(DOOMED).await?.admitted > 0 {
        ensure!(
            Instant::now() < deadline,
            "the notice was not applied in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let erasure = erase_on(&sidecar, DOOMED).await?;
    let latest_ms = (veo_tests::sidecar::unix_seconds() + 61) * 1_000;
    ensure!(
        erasure.requested_unix_ms <= latest_ms,
        "the erasure dates from {} ms, more than a minute ahead",
        erasure.requested_unix_ms
    );
    Ok(())
}
