//! Token files for the load generator, minted on every core.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use veo_bench::tokens::{SigningKey, TokenSpec};

use crate::setup::BENCH_TIER;

/// Writes `cached` tokens for as many customers, and `unique` tokens with distinct `jti`
/// spread over the same customers, minting on every core.
pub async fn mint_token_files(
    key: SigningKey,
    cached: usize,
    cached_path: &Path,
    unique: usize,
    unique_path: &Path,
) -> anyhow::Result<SigningKey> {
    let cached_path = cached_path.to_path_buf();
    let unique_path = unique_path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let customers = cached.max(1);
        let cached_tokens = mint_parallel(&key, cached, customers, None)?;
        std::fs::write(&cached_path, cached_tokens.join("\n") + "\n")?;
        let unique_tokens = mint_parallel(&key, unique, customers, Some("bench"))?;
        std::fs::write(&unique_path, unique_tokens.join("\n") + "\n")?;
        eprintln!(
            "minted {} tokens in {:.1} s",
            cached + unique,
            started.elapsed().as_secs_f64()
        );
        Ok(key)
    })
    .await
    .context("token minting stopped")?
}

fn mint_parallel(
    key: &SigningKey,
    count: usize,
    customers: usize,
    id_prefix: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    let spec = TokenSpec::default();
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let chunk = count.div_ceil(workers).max(1);
    let chunks: Vec<anyhow::Result<Vec<String>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|start| {
                let spec = &spec;
                scope.spawn(move || {
                    (start..(start + chunk).min(count))
                        .map(|index| {
                            let customer = format!("bench-{:04}", index % customers);
                            let token = match id_prefix {
                                Some(prefix) => key.mint_unique(
                                    spec,
                                    &customer,
                                    BENCH_TIER,
                                    &format!("{prefix}-{index}"),
                                ),
                                None => key.mint(spec, &customer, BENCH_TIER),
                            };
                            Ok(token?)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("minting thread panicked")))
            })
            .collect()
    });
    let mut tokens = Vec::with_capacity(count);
    for chunk in chunks {
        tokens.extend(chunk?);
    }
    Ok(tokens)
}
