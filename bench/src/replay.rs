//! The replay engine: sends a plan's requests on schedule with bounded concurrency, one
//! pre-minted token per customer, and records a [`Decision`] per request.
//!
//! Each request is sent at its planned offset from the start. When all concurrency permits
//! are taken the request waits, and the delay is recorded as its lateness.

mod client;
mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

pub use plan::{PlanError, PlannedRequest, SyntheticLoad, plan_from_log, plan_synthetic};

use crate::decisions::{Decision, NO_RESPONSE};
use crate::random::SplitMix64;
use crate::tokens::{SigningKey, TokenError, TokenSpec};
use client::TargetClient;

/// Seconds added to a token's lifetime beyond the planned replay duration.
const TOKEN_LIFETIME_MARGIN_SECONDS: u64 = 300;

/// Errors that stop a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The target URL cannot be used.
    #[error("invalid target {target:?}: {reason}; expected http://HOST:PORT")]
    InvalidTarget {
        /// The target as given.
        target: String,
        /// Description of the problem.
        reason: String,
    },
    /// A customer's token could not be minted.
    #[error("failed to mint a token for customer {customer}: {source}")]
    Token {
        /// The customer.
        customer: String,
        /// The minting error.
        #[source]
        source: TokenError,
    },
    /// A request task ended abnormally.
    #[error("replay task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Settings of a replay run.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Base URL of the proxy, such as `http://127.0.0.1:10000`.
    pub target: String,
    /// Maximum requests in flight.
    pub concurrency: usize,
    /// Time allowed for one request, from sending to the end of the response body.
    pub request_timeout: Duration,
    /// Issuer, audience and lifetime of the tokens. The lifetime is raised when shorter than
    /// the plan plus five minutes.
    pub token_spec: TokenSpec,
    /// Shows a progress bar on standard error when it is a terminal.
    pub progress: bool,
}

impl ReplayOptions {
    /// Options for `target` with 256 requests in flight, a 10 s timeout, default token claims
    /// and a progress bar.
    pub fn new(target: impl Into<String>) -> Self {
        ReplayOptions {
            target: target.into(),
            concurrency: 256,
            request_timeout: Duration::from_secs(10),
            token_spec: TokenSpec::default(),
            progress: true,
        }
    }
}

/// The result of a replay.
#[derive(Debug, Clone)]
pub struct ReplayOutcome {
    /// One decision per planned request, ordered by send time.
    pub decisions: Vec<Decision>,
    /// Wall-clock time from the first send to the last response.
    pub elapsed: Duration,
    /// Largest delay between a request's planned and actual send time.
    pub max_lateness: Duration,
}

/// Replays `plan` against `options.target`, signing tokens with `key`.
///
/// Tokens are minted for every customer before the first request is sent. Requests that get
/// no response are recorded with status [`NO_RESPONSE`] and an error; they do not stop the
/// replay.
///
/// # Errors
/// Returns [`ReplayError`] for an invalid target, a minting failure or a failed task.
pub async fn run_replay(
    plan: Vec<PlannedRequest>,
    key: &SigningKey,
    options: &ReplayOptions,
) -> Result<ReplayOutcome, ReplayError> {
    let client = TargetClient::new(
        &options.target,
        options.concurrency.max(1),
        options.request_timeout,
    )?;
    let tokens = mint_tokens(&plan, key, &options.token_spec)?;
    let routed = plan
        .into_iter()
        .map(|request| RoutedRequest {
            target: 0,
            instance: None,
            request,
        })
        .collect();
    replay_routed(routed, vec![client], tokens, options).await
}

/// Replays `plan` like [`run_replay`], spread over several proxy instances: each request goes
/// to one of `targets`, drawn at random with `seed`. The same plan and seed send every request
/// to the same target again. Each decision records the index of its target in `instance`.
/// `options.target` is not used.
///
/// # Errors
/// Returns [`ReplayError`] for an empty or invalid target list, a minting failure or a failed
/// task.
pub async fn run_replay_across(
    plan: Vec<PlannedRequest>,
    key: &SigningKey,
    options: &ReplayOptions,
    targets: &[String],
    seed: u64,
) -> Result<ReplayOutcome, ReplayError> {
    if targets.is_empty() {
        return Err(ReplayError::InvalidTarget {
            target: String::new(),
            reason: "the list of targets is empty".to_string(),
        });
    }
    let clients = targets
        .iter()
        .map(|target| {
            TargetClient::new(target, options.concurrency.max(1), options.request_timeout)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = mint_tokens(&plan, key, &options.token_spec)?;

    let mut random = SplitMix64::new(seed);
    let routed = plan
        .into_iter()
        .map(|request| {
            let target = random.range(0, targets.len() as u64) as usize;
            RoutedRequest {
                target,
                instance: Some(target),
                request,
            }
        })
        .collect();
    replay_routed(routed, clients, tokens, options).await
}

/// A planned request with the index of the client that sends it.
struct RoutedRequest {
    target: usize,
    /// Index recorded in the decision, `None` for single-target replays.
    instance: Option<usize>,
    request: PlannedRequest,
}

/// Sends each request of `plan` on schedule with `clients[target]`.
async fn replay_routed(
    plan: Vec<RoutedRequest>,
    clients: Vec<TargetClient>,
    tokens: HashMap<String, String>,
    options: &ReplayOptions,
) -> Result<ReplayOutcome, ReplayError> {
    let clients: Vec<Arc<TargetClient>> = clients.into_iter().map(Arc::new).collect();
    let tokens = Arc::new(tokens);
    let progress = progress_bar(plan.len(), options.progress);
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));

    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut decisions = Vec::with_capacity(plan.len());
    for routed in plan {
        // Every target index is drawn from `0..clients.len()`, so none is skipped.
        let Some(client) = clients.get(routed.target).map(Arc::clone) else {
            continue;
        };
        let due = start + routed.request.at;
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            break;
        };
        while let Some(done) = tasks.try_join_next() {
            decisions.push(done?);
        }

        let tokens = Arc::clone(&tokens);
        let progress = progress.clone();
        tasks.spawn(async move {
            let mut decision = send_planned(&client, &tokens, routed.request, start, due).await;
            decision.instance = routed.instance;
            drop(permit);
            progress.inc(1);
            decision
        });
    }
    while let Some(done) = tasks.join_next().await {
        decisions.push(done?);
    }
    let elapsed = start.elapsed();
    progress.finish_and_clear();

    decisions.sort_by(|a, b| a.t.total_cmp(&b.t));
    let max_lateness = decisions
        .iter()
        .filter_map(|decision| decision.lateness_ms)
        .fold(0.0, f64::max);
    Ok(ReplayOutcome {
        decisions,
        elapsed,
        max_lateness: Duration::from_secs_f64(max_lateness / 1_000.0),
    })
}

async fn send_planned(
    client: &TargetClient,
    tokens: &HashMap<String, String>,
    request: PlannedRequest,
    start: Instant,
    due: Instant,
) -> Decision {
    let token = tokens.get(&request.customer).map_or("", String::as_str);
    let sent = Instant::now();
    let result = client.send(&request.method, &request.path, token).await;
    let latency = sent.elapsed();

    let (status, filter_admitted, error) = match result {
        // The filter adds `ratelimit` to the responses of the requests it
        // admits and to its 429s, so the field separates an upstream's
        // 5xx, which used quota, from a 5xx of the filter.
        Ok(response) => (
            response.status,
            (response.ratelimit_field && response.status != 429).then_some(true),
            None,
        ),
        Err(error) => (NO_RESPONSE, None, Some(error)),
    };
    Decision {
        t: sent.duration_since(start).as_micros() as f64 / 1e6,
        customer: request.customer,
        tier: request.tier,
        status,
        latency_ms: Some(milliseconds(latency)),
        lateness_ms: Some(milliseconds(sent.saturating_duration_since(due))),
        line: request.line,
        error,
        instance: None,
        filter_admitted,
    }
}

/// Returns milliseconds with microsecond precision, which prints without binary noise.
fn milliseconds(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1_000.0
}

/// Mints one token per customer of the plan, valid for the whole replay.
fn mint_tokens(
    plan: &[PlannedRequest],
    key: &SigningKey,
    spec: &TokenSpec,
) -> Result<HashMap<String, String>, ReplayError> {
    let duration = plan.last().map_or(0, |request| request.at.as_secs());
    let spec = TokenSpec {
        valid_for_seconds: spec
            .valid_for_seconds
            .max(duration + TOKEN_LIFETIME_MARGIN_SECONDS),
        ..spec.clone()
    };

    let mut tokens = HashMap::new();
    for request in plan {
        if tokens.contains_key(&request.customer) {
            continue;
        }
        let token = key
            .mint(&spec, &request.customer, &request.tier)
            .map_err(|source| ReplayError::Token {
                customer: request.customer.clone(),
                source,
            })?;
        tokens.insert(request.customer.clone(), token);
    }
    Ok(tokens)
}

fn progress_bar(total: usize, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {pos}/{len} requests ({eta} left)",
    ) {
        bar.set_style(style);
    }
    bar
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Serves HTTP/1.1 keep-alive connections: 200 for the first `admit` requests that carry a
    /// bearer token, 429 after that, 401 without a token.
    async fn start_server(admit: usize) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&served);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = find_header_end(&buffer) else {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buffer[..end]).to_lowercase();
                        buffer.drain(..end);
                        let status = if !head.contains("authorization: bearer ey") {
                            "401 Unauthorized"
                        } else if counter.fetch_add(1, Ordering::SeqCst) < admit {
                            "200 OK"
                        } else {
                            "429 Too Many Requests"
                        };
                        let response = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{address}"), served)
    }

    fn find_header_end(buffer: &[u8]) -> Option<usize> {
        buffer
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .map(|position| position + 4)
    }

    fn planned(at_ms: u64, customer: &str) -> PlannedRequest {
        PlannedRequest {
            at: Duration::from_millis(at_ms),
            customer: customer.to_string(),
            tier: "basic".to_string(),
            method: "GET".to_string(),
            path: format!("/videos/{at_ms}/manifest.m3u8"),
            line: Some(usize::try_from(at_ms).unwrap()),
        }
    }

    #[tokio::test]
    async fn replay_records_one_decision_per_request() {
        let (target, served) = start_server(5).await;
        let plan: Vec<_> = (0..8).map(|i| planned(i * 20, "cust-a")).collect();
        let options = ReplayOptions {
            concurrency: 4,
            progress: false,
            ..ReplayOptions::new(target)
        };

        let outcome = run_replay(plan, &SigningKey::generate(), &options)
            .await
            .unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 8);
        let statuses: Vec<u16> = outcome.decisions.iter().map(|d| d.status).collect();
        assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
        assert!(outcome.decisions.iter().all(|d| d.customer == "cust-a"));
        assert!(outcome.decisions.iter().all(|d| d.latency_ms.is_some()));
        assert_eq!(outcome.decisions[3].line, Some(60));
    }

    #[tokio::test]
    async fn replay_across_targets_records_each_instance() {
        let (first, first_served) = start_server(100).await;
        let (second, second_served) = start_server(100).await;
        let plan: Vec<_> = (0..40).map(|i| planned(i * 5, "cust-a")).collect();
        let options = ReplayOptions {
            progress: false,
            ..ReplayOptions::new("http://unused")
        };
        let targets = [first, second];

        let outcome =
            run_replay_across(plan.clone(), &SigningKey::generate(), &options, &targets, 3)
                .await
                .unwrap();
        let to_first = outcome
            .decisions
            .iter()
            .filter(|d| d.instance == Some(0))
            .count();
        let to_second = outcome
            .decisions
            .iter()
            .filter(|d| d.instance == Some(1))
            .count();
        assert_eq!(to_first + to_second, 40);
        assert_eq!(to_first, first_served.load(Ordering::SeqCst));
        assert_eq!(to_second, second_served.load(Ordering::SeqCst));
        assert!(to_first > 0, "no request went to the first target");
        assert!(to_second > 0, "no request went to the second target");

        let again = run_replay_across(plan, &SigningKey::generate(), &options, &targets, 3)
            .await
            .unwrap();
        let routes = |outcome: &ReplayOutcome| -> Vec<Option<usize>> {
            let mut by_line: Vec<_> = outcome
                .decisions
                .iter()
                .map(|d| (d.line, d.instance))
                .collect();
            by_line.sort();
            by_line.into_iter().map(|(_, instance)| instance).collect()
        };
        assert_eq!(routes(&outcome), routes(&again), "same seed, other routes");
    }

    #[tokio::test]
    async fn replay_across_no_targets_fails() {
        let options = ReplayOptions::new("http://unused");
        let error = run_replay_across(vec![], &SigningKey::generate(), &options, &[], 1)
            .await
            .unwrap_err();
        assert!(
            matches!(error, ReplayError::InvalidTarget { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn single_target_replay_records_no_instance() {
        let (target, _) = start_server(10).await;
        let options = ReplayOptions {
            progress: false,
            ..ReplayOptions::new(target)
        };
        let outcome = run_replay(vec![planned(0, "a")], &SigningKey::generate(), &options)
            .await
            .unwrap();
        assert_eq!(outcome.decisions[0].instance, None);
    }

    #[tokio::test]
    async fn replay_keeps_the_schedule() {
        let (target, _) = start_server(100).await;
        let plan = vec![planned(0, "a"), planned(150, "b"), planned(300, "a")];
        let options = ReplayOptions {
            progress: false,
            ..ReplayOptions::new(target)
        };

        let outcome = run_replay(plan, &SigningKey::generate(), &options)
            .await
            .unwrap();
        // A request is never sent early; the upper bounds leave room for a loaded machine.
        let times: Vec<f64> = outcome.decisions.iter().map(|d| d.t).collect();
        assert!(times[0] < 0.2, "{times:?}");
        assert!(times[1] >= 0.15, "{times:?}");
        assert!(times[1] < 0.35, "{times:?}");
        assert!(times[2] >= 0.30, "{times:?}");
        assert!(times[2] < 0.50, "{times:?}");
        assert!(outcome.elapsed >= Duration::from_millis(300));
        assert!(outcome.max_lateness < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn unreachable_target_is_recorded_not_fatal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let options = ReplayOptions {
            progress: false,
            ..ReplayOptions::new(target)
        };

        let outcome = run_replay(vec![planned(0, "a")], &SigningKey::generate(), &options)
            .await
            .unwrap();
        assert_eq!(outcome.decisions[0].status, NO_RESPONSE);
        assert!(outcome.decisions[0].error.is_some());
    }

    #[test]
    fn tokens_outlive_the_replay() {
        let key = SigningKey::generate();
        let plan = vec![planned(0, "a"), planned(7_200_000, "b")];
        let tokens = mint_tokens(&plan, &key, &TokenSpec::default()).unwrap();
        assert_eq!(tokens.len(), 2);

        let claims = jwt_simple::prelude::ECDSAP256PublicKeyLike::verify_token::<
            crate::tokens::TierClaim,
        >(&key.public_key(), &tokens["b"], None)
        .unwrap();
        let lifetime = claims.expires_at.unwrap().as_secs() - claims.issued_at.unwrap().as_secs();
        assert_eq!(lifetime, 7_200 + TOKEN_LIFETIME_MARGIN_SECONDS);
    }
}
