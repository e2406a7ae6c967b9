//! Redis backend of the global counters against real redis-server processes:
//! sums across sidecars, exactly-once application of resent contributions,
//! the sliding window, minute totals, outages, a read-only replica and a
//! Redis Cluster.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use veo_sidecar::counters::redis::{
    ErasureSource, NoticeEntry, NoticeKey, RedisCounters, RedisSettings, RedisTarget,
};
use veo_sidecar::counters::{Contribution, CounterError, Exchange, ExchangeResult, WindowTotals};
use veo_tests::{RedisCluster, RedisServer};

/// A fixed clock for the tests that do not depend on real time.
const NOW: i64 = 1_700_000_000;

/// Window length of the tests that do not set their own, in seconds.
const WINDOW: u32 = 60;

const TIMEOUT: Duration = Duration::from_millis(500);

fn settings(target: RedisTarget, shards: u16) -> RedisSettings {
    RedisSettings {
        target,
        key_prefix: "veo-test".to_owned(),
        shards,
        totals_ttl_seconds: 3600,
        timeout: TIMEOUT,
        notice_key: None,
    }
}

fn counters(server: &RedisServer, sidecar_id: &str) -> anyhow::Result<RedisCounters> {
    let target = RedisTarget::Standalone(server.url());
    Ok(RedisCounters::new(
        settings(target, 4),
        sidecar_id.to_owned(),
    )?)
}

fn contribution(id: i64, customer: &str, bucket: i64, admitted: u64) -> Contribution {
    Contribution {
        id,
        customer: customer.to_owned(),
        bucket_unix_s: bucket,
        admitted,
        requests: admitted + 1,
    }
}

fn customers(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| (*name).to_owned()).collect()
}

fn unix_now() -> anyhow::Result<i64> {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH)?;
    Ok(i64::try_from(elapsed.as_secs())?)
}

/// Sleeps until just after the next whole second, so a test that waits
/// about one second stays within the second after it.
async fn align_to_second() -> anyhow::Result<()> {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let into_second = Duration::from_nanos(u64::from(elapsed.subsec_nanos()));
    tokio::time::sleep(Duration::from_secs(1) - into_second + Duration::from_millis(20)).await;
    Ok(())
}

/// Exchanges at `now` with the default window.
async fn exchange_at(
    counters: &RedisCounters,
    contributions: &[Contribution],
    customers: &[String],
    now: i64,
) -> Result<ExchangeResult, CounterError> {
    exchange_in_window(counters, contributions, customers, now, WINDOW).await
}

async fn exchange_in_window(
    counters: &RedisCounters,
    contributions: &[Contribution],
    customers: &[String],
    now: i64,
    window_seconds: u32,
) -> Result<ExchangeResult, CounterError> {
    counters
        .exchange(Exchange {
            contributions,
            customers,
            now_unix_s: now,
            window_seconds,
        })
        .await
}

/// Sums admitted and requests per customer, as the window totals should.
fn expected_totals(contributions: &[&[Contribution]]) -> HashMap<String, WindowTotals> {
    let mut totals: HashMap<String, WindowTotals> = HashMap::new();
    for contribution in contributions.iter().flat_map(|batch| batch.iter()) {
        let entry = totals.entry(contribution.customer.clone()).or_default();
        entry.admitted += contribution.admitted;
        entry.requests += contribution.requests;
    }
    totals
}

/// Proves two sidecars on one server each read the sum of both.
#[tokio::test]
async fn two_sidecars_read_the_sum() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let side_b = counters(&server, "side-b")?;
    let names: Vec<String> = (0..20).map(|index| format!("cus_{index}")).collect();
    let from_a: Vec<Contribution> = (0..20)
        .map(|index| contribution(index + 1, &names[index as usize], NOW - 5, 3))
        .collect();
    let from_b: Vec<Contribution> = (0..10)
        .map(|index| contribution(index + 1, &names[index as usize], NOW - 1, 7))
        .collect();

    exchange_at(&side_a, &from_a, &[], NOW).await?;
    let read_by_b = exchange_at(&side_b, &from_b, &names, NOW).await?;
    let read_by_a = exchange_at(&side_a, &[], &names, NOW).await?;

    let expected = expected_totals(&[&from_a, &from_b]);
    assert_eq!(read_by_b.totals, expected, "totals read by side-b");
    assert_eq!(read_by_a.totals, expected, "totals read by side-a");
    assert_eq!(
        read_by_a.totals.get("cus_0"),
        Some(&WindowTotals {
            admitted: 10,
            requests: 12
        })
    );
    Ok(())
}

/// Proves an exchange costs at most one command per shard, whatever the
/// number of customers.
#[tokio::test]
async fn exchange_costs_one_command_per_shard() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names: Vec<String> = (0..200).map(|index| format!("cus_{index}")).collect();
    let batch: Vec<Contribution> = (0..200)
        .map(|index| contribution(index + 1, &names[index as usize], NOW, 1))
        .collect();

    exchange_at(&side_a, &batch[..100], &names, NOW).await?;
    let before = side_a.commands_sent();
    let result = exchange_at(&side_a, &batch[100..], &names, NOW).await?;
    let sent = side_a.commands_sent() - before;

    assert_eq!(result.totals.len(), 200);
    assert_eq!(sent, 4, "commands of one exchange with 4 shards");
    Ok(())
}

/// Proves resent contributions count once, from the same instance and from
/// a new instance with the same sidecar id, as after a restart.
#[tokio::test]
async fn resent_contributions_count_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let names = customers(&["cus_a", "cus_b", "cus_c"]);
    let first = [
        contribution(1, "cus_a", NOW - 2, 4),
        contribution(2, "cus_b", NOW - 2, 5),
        contribution(3, "cus_c", NOW - 1, 6),
    ];
    let later = [contribution(4, "cus_a", NOW, 10)];

    let side_a = counters(&server, "side-a")?;
    let once = exchange_at(&side_a, &first, &names, NOW).await?;
    let again = exchange_at(&side_a, &first, &names, NOW).await?;
    assert_eq!(once.totals, expected_totals(&[&first]));
    assert_eq!(
        again.totals, once.totals,
        "totals after resending the same ids"
    );

    let restarted = counters(&server, "side-a")?;
    let mut resent = first.to_vec();
    resent.extend_from_slice(&later);
    let after_restart = exchange_at(&restarted, &resent, &names, NOW).await?;
    assert_eq!(after_restart.totals, expected_totals(&[&first, &later]));

    let minutes = restarted.minute_totals(&names, NOW - 120, NOW).await?;
    let expected: HashMap<String, u64> = HashMap::from([
        ("cus_a".into(), 14),
        ("cus_b".into(), 5),
        ("cus_c".into(), 6),
    ]);
    assert_eq!(minutes, expected);
    Ok(())
}

/// Proves a partly applied exchange can be resent whole: ids at or below a
/// shard's highest applied id are skipped, newer ones are applied.
#[tokio::test]
async fn resending_with_new_ids_applies_only_new() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names = customers(&["cus_a"]);
    let batch: Vec<Contribution> = (1..=6)
        .map(|id| contribution(id, "cus_a", NOW, 1))
        .collect();

    exchange_at(&side_a, &batch[..3], &[], NOW).await?;
    let result = exchange_at(&side_a, &batch, &names, NOW).await?;

    assert_eq!(
        result.totals.get("cus_a"),
        Some(&WindowTotals {
            admitted: 6,
            requests: 12
        })
    );
    Ok(())
}

/// Proves the window slides by one-second buckets: a bucket leaves exactly
/// when it is `window_seconds` old, whichever sidecar contributed to it.
#[tokio::test]
async fn window_slides_by_buckets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let side_b = counters(&server, "side-b")?;
    let names = customers(&["cus_a"]);
    let oldest = NOW - i64::from(WINDOW) + 1;
    let from_a = [
        contribution(1, "cus_a", oldest, 3),
        contribution(2, "cus_a", NOW, 4),
    ];
    let from_b = [contribution(1, "cus_a", oldest, 10)];

    exchange_at(&side_a, &from_a, &[], NOW).await?;
    let full = exchange_at(&side_b, &from_b, &names, NOW).await?;
    let slid = exchange_at(&side_a, &[], &names, NOW + 1).await?;
    let repeated = exchange_at(&side_b, &[], &names, NOW + 1).await?;
    let empty = exchange_at(&side_a, &[], &names, NOW + i64::from(WINDOW)).await?;

    let admitted = |result: &ExchangeResult| result.totals.get("cus_a").map(|t| t.admitted);
    assert_eq!(admitted(&full), Some(17), "both buckets in the window");
    assert_eq!(admitted(&slid), Some(4), "after the oldest bucket left");
    assert_eq!(admitted(&repeated), Some(4), "a bucket is subtracted once");
    assert_eq!(admitted(&empty), None, "after every bucket left");
    Ok(())
}

/// Proves ids are ordered as integers across digit counts and up to
/// `i64::MAX`, beyond what a Lua number represents exactly.
#[tokio::test]
async fn large_ids_keep_their_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names = customers(&["cus_a"]);
    let ids = [
        9,
        10,
        99_999_999_999,
        9_007_199_254_740_992,
        i64::MAX - 1,
        i64::MAX,
    ];
    let batch: Vec<Contribution> = ids
        .iter()
        .map(|&id| contribution(id, "cus_a", NOW, 1))
        .collect();

    for end in 1..=batch.len() {
        // Each exchange resends everything before the newest id.
        exchange_at(&side_a, &batch[..end], &[], NOW).await?;
    }
    let result = exchange_at(&side_a, &batch, &names, NOW).await?;

    assert_eq!(result.totals.get("cus_a").map(|t| t.admitted), Some(6));
    Ok(())
}

/// Proves window totals drop once buckets leave the window, on the real
/// clock, while the minute totals keep them.
#[tokio::test]
async fn window_totals_drop_after_window() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names = customers(&["cus_a", "cus_b"]);

    // Starting at the top of a second keeps `second` below `start + 2`
    // after the 1.1 s sleep, even on a loaded machine.
    align_to_second().await?;
    let start = unix_now()?;
    let early = [contribution(1, "cus_a", start, 3)];
    let inside = exchange_in_window(&side_a, &early, &names, start, 2).await?;
    assert_eq!(inside.totals.get("cus_a").map(|t| t.admitted), Some(3));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = unix_now()?;
    let late = [contribution(2, "cus_b", second, 4)];
    let both = exchange_in_window(&side_a, &late, &names, second, 2).await?;
    assert_eq!(both.totals.get("cus_a").map(|t| t.admitted), Some(3));
    assert_eq!(both.totals.get("cus_b").map(|t| t.admitted), Some(4));

    // Wait until the first bucket is at or before now - 2.
    while unix_now()? < start + 2 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = unix_now()?;
    let after = exchange_in_window(&side_a, &[], &names, now, 2).await?;
    assert_eq!(
        after.totals.get("cus_a"),
        None,
        "cus_a after its bucket left"
    );
    if now < second + 2 {
        assert_eq!(after.totals.get("cus_b").map(|t| t.admitted), Some(4));
    }

    let minutes = side_a.minute_totals(&names, start - 60, now).await?;
    assert_eq!(minutes.get("cus_a"), Some(&3));
    assert_eq!(minutes.get("cus_b"), Some(&4));
    Ok(())
}

/// Proves a contribution whose bucket is already outside the window counts
/// in the minute totals and not in the window.
#[tokio::test]
async fn late_contribution_counts_in_minutes_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names = customers(&["cus_a"]);
    let late = [
        contribution(1, "cus_a", NOW - i64::from(WINDOW), 5),
        contribution(2, "cus_a", NOW - i64::from(WINDOW) + 1, 2),
    ];

    let result = exchange_at(&side_a, &late, &names, NOW).await?;
    let minutes = side_a.minute_totals(&names, NOW - 3600, NOW).await?;

    assert_eq!(result.totals.get("cus_a").map(|t| t.admitted), Some(2));
    assert_eq!(minutes.get("cus_a"), Some(&7));
    Ok(())
}

/// Proves the minute totals equal the contributions of all sidecars, per
/// minute range.
#[tokio::test]
async fn minute_totals_sum_contributions() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let side_b = counters(&server, "side-b")?;
    let names: Vec<String> = (0..12).map(|index| format!("cus_{index}")).collect();
    // Three minutes of contributions, every 7 s, from both sidecars.
    let start = NOW - NOW % 60;
    let batch = |offset: i64| -> Vec<Contribution> {
        (0..26)
            .map(|index| {
                let customer = &names[(index as usize * 5 + offset as usize) % names.len()];
                contribution(
                    index + 1,
                    customer,
                    start + index * 7,
                    (index + offset) as u64 % 4,
                )
            })
            .collect()
    };
    let from_a = batch(0);
    let from_b = batch(3);

    exchange_at(&side_a, &from_a, &[], start + 180).await?;
    exchange_at(&side_b, &from_b, &[], start + 180).await?;

    for (first, last) in [
        (start, start + 179),
        (start + 60, start + 60),
        (start - 60, start),
    ] {
        let mut expected: HashMap<String, u64> = HashMap::new();
        for contribution in from_a.iter().chain(&from_b) {
            let in_range = contribution.bucket_unix_s >= first
                && contribution.bucket_unix_s < last - last % 60 + 60;
            if in_range && contribution.admitted > 0 {
                *expected.entry(contribution.customer.clone()).or_default() +=
                    contribution.admitted;
            }
        }
        let totals = side_a.minute_totals(&names, first, last).await?;
        assert_eq!(totals, expected, "minutes {first}..={last}");
    }
    Ok(())
}

/// Proves every key the counters write has a TTL.
#[tokio::test]
async fn every_key_has_a_ttl() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names: Vec<String> = (0..8).map(|index| format!("cus_{index}")).collect();
    let batch: Vec<Contribution> = (0..8)
        .map(|index| contribution(index + 1, &names[index as usize], NOW - 100 + index * 20, 2))
        .collect();
    exchange_at(&side_a, &batch, &names, NOW).await?;
    exchange_at(&side_a, &[], &names, NOW + 90).await?;

    let keys: Vec<String> = server.query(redis::cmd("KEYS").arg("*")).await?;
    ensure!(
        keys.len() >= 5,
        "expected the keys of several shards, got {keys:?}"
    );
    for key in keys {
        ensure!(
            key.starts_with("{veo-test:"),
            "key {key} lacks the hash tag"
        );
        let ttl: i64 = server.query(redis::cmd("TTL").arg(&key)).await?;
        ensure!(ttl > 0, "key {key} has TTL {ttl}");
    }
    Ok(())
}

/// Proves erasure notices reach every sidecar in order, each read once
/// after the last one seen, an entry that is not a notice is returned as
/// such, and the stream has a TTL.
#[tokio::test]
async fn erasure_notices_are_read_in_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let side_b = counters(&server, "side-b")?;
    let retention = Duration::from_secs(3600);
    let source = |erasure_id, erased_at_unix_ms| ErasureSource {
        erasure_id,
        erased_at_unix_ms,
    };

    side_a
        .announce_erasure("acme", &source("er_1", 1_000), retention)
        .await?;
    let _: String = server
        .query(
            redis::cmd("XADD")
                .arg("{veo-test:erasures}")
                .arg("*")
                .arg("customer")
                .arg("no-sidecar"),
        )
        .await?;
    side_b
        .announce_erasure("globex", &source("er_2", 2_000), retention)
        .await?;
    let all = side_b.erasure_notices("0-0", 10).await?;

    assert_eq!(all.len(), 3);
    let read: Vec<(&str, &str, &str, i64)> = all
        .iter()
        .filter_map(|entry| match entry {
            NoticeEntry::Notice(notice) => Some((
                notice.customer.as_str(),
                notice.sidecar_id.as_str(),
                notice.erasure_id.as_str(),
                notice.erased_at_unix_ms,
            )),
            NoticeEntry::Unreadable { .. } => None,
        })
        .collect();
    assert_eq!(
        read,
        [
            ("acme", "side-a", "er_1", 1_000),
            ("globex", "side-b", "er_2", 2_000)
        ]
    );
    ensure!(
        matches!(&all[1], NoticeEntry::Unreadable { detail, .. } if detail.contains("erased_at_ms")),
        "{:?}",
        all[1]
    );
    let after_first = side_a.erasure_notices(all[0].entry_id(), 10).await?;
    assert_eq!(after_first, all[1..]);
    let after_last = side_a.erasure_notices(all[2].entry_id(), 10).await?;
    assert_eq!(after_last, []);
    let first_only = side_a.erasure_notices("0-0", 1).await?;
    assert_eq!(first_only, all[..1]);
    let ttl: i64 = server
        .query(redis::cmd("TTL").arg("{veo-test:erasures}"))
        .await?;
    ensure!((3_590..=3_600).contains(&ttl), "stream TTL {ttl}");
    Ok(())
}

/// Proves that with a notice key the stream contains no customer id, that a
/// sidecar with the same key reads the notice, and that one with another
/// key, or an entry written in clear, is not applied.
#[tokio::test]
async fn sealed_notices_hold_no_customer_id() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(&dir.path().join("redis")).await?;
    let keyed = |sidecar_id: &str, key_file: &str| -> anyhow::Result<RedisCounters> {
        let path = dir.path().join(key_file);
        if !path.exists() {
            NoticeKey::create(&path)?;
        }
        let mut settings = settings(RedisTarget::Standalone(server.url()), 4);
        settings.notice_key = Some(NoticeKey::read(&path)?);
        Ok(RedisCounters::new(settings, sidecar_id.to_owned())?)
    };
    let side_a = keyed("side-a", "shared.key")?;
    let side_b = keyed("side-b", "shared.key")?;
    let stranger = keyed("side-c", "other.key")?;
    let source = ErasureSource {
        erasure_id: "er_1",
        erased_at_unix_ms: 1_000,
    };

    side_a
        .announce_erasure("acme-customer", &source, Duration::from_secs(3600))
        .await?;
    let _: String = server
        .query(
            redis::cmd("XADD")
                .arg("{veo-test:erasures}")
                .arg("*")
                .arg("customer")
                .arg("forged")
                .arg("sidecar")
                .arg("side-x")
                .arg("erasure")
                .arg("er_x")
                .arg("erased_at_ms")
                .arg(2_000),
        )
        .await?;
    let raw: redis::Value = server
        .query(
            redis::cmd("XRANGE")
                .arg("{veo-test:erasures}")
                .arg("-")
                .arg("+"),
        )
        .await?;
    let read = side_b.erasure_notices("0-0", 10).await?;
    let strange = stranger.erasure_notices("0-0", 10).await?;

    ensure!(
        !format!("{raw:?}").contains("acme-customer"),
        "the stream holds the customer id: {raw:?}"
    );
    let NoticeEntry::Notice(notice) = &read[0] else {
        anyhow::bail!("the shared key did not open the notice: {:?}", read[0]);
    };
    assert_eq!(
        (notice.customer.as_str(), notice.sidecar_id.as_str()),
        ("acme-customer", "side-a")
    );
    ensure!(
        matches!(&read[1], NoticeEntry::Unreadable { detail, .. } if detail.contains("not sealed")),
        "an entry in clear was read: {:?}",
        read[1]
    );
    ensure!(
        matches!(&strange[0], NoticeEntry::Unreadable { detail, .. } if detail.contains("does not open")),
        "another key opened the notice: {:?}",
        strange[0]
    );
    Ok(())
}

/// Proves a key of another type at the notice stream's name is an error
/// that names the key.
#[tokio::test]
async fn notice_stream_of_another_type_is_an_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let _: String = server
        .query(redis::cmd("SET").arg("{veo-test:erasures}").arg("x"))
        .await?;

    let err = side_a.erasure_notices("0-0", 10).await.unwrap_err();

    ensure!(err.to_string().contains("WRONGTYPE"), "{err}");
    Ok(())
}

/// Proves an exchange fails fast while Redis is down at construction, and
/// the next one after Redis starts succeeds.
#[tokio::test]
async fn unavailable_until_redis_starts() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = RedisServer::start(dir.path()).await?;
    server.stop();
    let side_a = counters(&server, "side-a")?;
    let batch = [contribution(1, "cus_a", NOW, 2)];
    let names = customers(&["cus_a"]);

    let started = Instant::now();
    let down = exchange_at(&side_a, &batch, &names, NOW).await;
    let elapsed = started.elapsed();
    ensure!(
        matches!(down, Err(CounterError::Unavailable { .. })),
        "expected Unavailable, got {down:?}"
    );
    ensure!(
        elapsed <= TIMEOUT + Duration::from_millis(200),
        "took {elapsed:?}"
    );

    server.start_again().await?;
    let up = exchange_at(&side_a, &batch, &names, NOW).await?;
    assert_eq!(up.totals.get("cus_a").map(|t| t.admitted), Some(2));
    Ok(())
}

/// Proves a cluster target whose seeds are all down fails within the
/// timeout.
#[tokio::test]
async fn cluster_down_is_unavailable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = RedisServer::start(dir.path()).await?;
    server.stop();
    let target = RedisTarget::Cluster(vec![server.url()]);
    let side_a = RedisCounters::new(settings(target, 8), "side-a".to_owned())?;
    let batch = [contribution(1, "cus_a", NOW, 2)];

    let started = Instant::now();
    let down = exchange_at(&side_a, &batch, &[], NOW).await;
    let elapsed = started.elapsed();

    ensure!(
        matches!(down, Err(CounterError::Unavailable { .. })),
        "expected Unavailable, got {down:?}"
    );
    ensure!(
        elapsed <= TIMEOUT + Duration::from_millis(200),
        "took {elapsed:?}"
    );
    Ok(())
}

/// Proves contributions kept by the caller across a Redis crash and restart
/// count exactly once, whether or not Redis applied them before the crash.
#[tokio::test]
async fn outage_mid_run_counts_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut server = RedisServer::start(dir.path()).await?;
    let side_a = counters(&server, "side-a")?;
    let names = customers(&["cus_a", "cus_b"]);
    let applied = [
        contribution(1, "cus_a", NOW, 3),
        contribution(2, "cus_b", NOW, 1),
    ];
    let pending = [contribution(3, "cus_a", NOW, 5)];

    exchange_at(&side_a, &applied, &names, NOW).await?;
    server.kill_hard();
    let down = exchange_at(&side_a, &pending, &names, NOW).await;
    ensure!(
        matches!(down, Err(CounterError::Unavailable { .. })),
        "expected Unavailable, got {down:?}"
    );

    server.start_again().await?;
    // The caller does not know whether the first batch survived the crash,
    // so it sends everything again.
    let mut outbox = applied.to_vec();
    outbox.extend_from_slice(&pending);
    let first = exchange_at(&side_a, &outbox, &names, NOW).await?;
    let second = exchange_at(&side_a, &outbox, &names, NOW).await?;

    let expected = expected_totals(&[&outbox]);
    assert_eq!(first.totals, expected);
    assert_eq!(second.totals, expected);
    let minutes = side_a.minute_totals(&names, NOW, NOW).await?;
    assert_eq!(minutes.get("cus_a"), Some(&8));
    assert_eq!(minutes.get("cus_b"), Some(&1));
    Ok(())
}

/// Proves a replica returns ReadOnly, and the same counters work once the
/// replica is promoted.
#[tokio::test]
async fn replica_is_read_only_until_promoted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let primary = RedisServer::start(&dir.path().join("primary")).await?;
    let replica = RedisServer::start_replica_of(&dir.path().join("replica"), &primary).await?;
    let side_a = counters(&replica, "side-a")?;
    let batch = [contribution(1, "cus_a", NOW, 2)];
    let names = customers(&["cus_a"]);

    let rejected = exchange_at(&side_a, &batch, &names, NOW).await;
    ensure!(
        matches!(rejected, Err(CounterError::ReadOnly { .. })),
        "expected ReadOnly, got {rejected:?}"
    );

    let _: () = replica
        .query(redis::cmd("REPLICAOF").arg("NO").arg("ONE"))
        .await?;
    let promoted = exchange_at(&side_a, &batch, &names, NOW).await?;
    assert_eq!(promoted.totals.get("cus_a").map(|t| t.admitted), Some(2));
    Ok(())
}

/// Proves two sidecars on a three-master Redis Cluster with 8 shards read
/// the sum, with the shards spread over the masters.
#[tokio::test]
async fn cluster_sidecars_read_the_sum() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = RedisCluster::start(dir.path(), 3).await?;
    let cluster_counters = |sidecar_id: &str| -> anyhow::Result<RedisCounters> {
        let target = RedisTarget::Cluster(cluster.seed_urls());
        let mut settings = settings(target, 8);
        settings.timeout = Duration::from_secs(2);
        Ok(RedisCounters::new(settings, sidecar_id.to_owned())?)
    };
    let side_a = cluster_counters("side-a")?;
    let side_b = cluster_counters("side-b")?;
    let names: Vec<String> = (0..40).map(|index| format!("cus_{index}")).collect();
    let from_a: Vec<Contribution> = (0..40)
        .map(|index| contribution(index + 1, &names[index as usize], NOW - 3, 2))
        .collect();
    let from_b: Vec<Contribution> = (0..40)
        .map(|index| contribution(index + 1, &names[index as usize], NOW - 2, 5))
        .collect();

    exchange_at(&side_a, &from_a, &[], NOW).await?;
    exchange_at(&side_b, &from_b, &names, NOW).await?;
    let again = exchange_at(&side_b, &from_b, &names, NOW).await?;
    let read_by_a = exchange_at(&side_a, &[], &names, NOW).await?;

    let expected = expected_totals(&[&from_a, &from_b]);
    assert_eq!(
        again.totals, expected,
        "totals read by side-b after a resend"
    );
    assert_eq!(read_by_a.totals, expected, "totals read by side-a");
    let minutes = side_a.minute_totals(&names, NOW, NOW).await?;
    assert_eq!(minutes.get("cus_7"), Some(&7));

    let mut masters_with_keys = 0;
    for node in cluster.nodes() {
        let keys: i64 = node.query(&redis::cmd("DBSIZE")).await?;
        if keys > 0 {
            masters_with_keys += 1;
        }
    }
    ensure!(
        masters_with_keys >= 2,
        "shards landed on {masters_with_keys} master(s)"
    );
    Ok(())
}

/// Proves the target description carries no credentials.
#[tokio::test]
async fn target_description_hides_password() -> anyhow::Result<()> {
    let target = RedisTarget::Standalone("redis://user:hunter2@127.0.0.1:6390/1".to_owned());
    let side_a = RedisCounters::new(settings(target, 1), "side-a".to_owned())
        .context("settings with credentials")?;
    assert_eq!(side_a.describe_target(), "127.0.0.1:6390");
    Ok(())
}
