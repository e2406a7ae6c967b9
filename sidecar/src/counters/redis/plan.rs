//! Grouping of an exchange or a minute-totals read into one script call
//! per shard, and the checks the exchange script relies on.

use std::collections::{BTreeMap, HashMap};

use redis::Cmd;

use super::keys::{MINUTE_SECONDS, ShardKeys, minute_start, shard_of};
use super::{RedisCounters, WINDOW_TTL_MARGIN_SECONDS};
use crate::counters::{Contribution, CounterError, Exchange};

/// One script call on one shard.
pub(super) struct ScriptCall {
    pub(super) keys: Vec<String>,
    pub(super) args: Vec<String>,
    pub(super) customers: Vec<String>,
}

impl ScriptCall {
    pub(super) fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut command = redis::cmd(verb);
        command
            .arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        command
    }
}

impl RedisCounters {
    /// Groups the exchange by shard and builds one script call per shard.
    pub(super) fn plan_exchange(
        &self,
        exchange: &Exchange<'_>,
    ) -> Result<Vec<ScriptCall>, CounterError> {
        check_contributions(exchange.contributions)?;

        let mut shards: BTreeMap<u16, (Vec<&Contribution>, Vec<String>)> = BTreeMap::new();
        for contribution in exchange.contributions {
            let shard = shard_of(&contribution.customer, self.shards);
            shards.entry(shard).or_default().0.push(contribution);
        }
        for customer in exchange.customers {
            let shard = shard_of(customer, self.shards);
            shards.entry(shard).or_default().1.push(customer.clone());
        }

        let window_ttl = u64::from(exchange.window_seconds) + WINDOW_TTL_MARGIN_SECONDS;
        let header = [
            exchange.now_unix_s.to_string(),
            exchange.window_seconds.to_string(),
            window_ttl.to_string(),
            self.totals_ttl_seconds.max(window_ttl).to_string(),
            self.totals_ttl_seconds.to_string(),
        ];
        let calls = shards
            .into_iter()
            .map(|(shard, (contributions, customers))| {
                let keys = ShardKeys::new(&self.key_prefix, shard);
                let mut call = ScriptCall {
                    keys: vec![
                        keys.window(),
                        keys.buckets(),
                        keys.expiry(),
                        keys.applied(&self.sidecar_id),
                    ],
                    args: header.to_vec(),
                    customers,
                };
                call.args.push(contributions.len().to_string());
                let mut minute_keys: HashMap<i64, usize> = HashMap::new();
                for contribution in contributions {
                    let minute = minute_start(contribution.bucket_unix_s);
                    let key_index = *minute_keys.entry(minute).or_insert_with(|| {
                        call.keys.push(keys.minute(minute));
                        // Lua indexes KEYS from 1.
                        call.keys.len()
                    });
                    call.args.extend([
                        contribution.id.to_string(),
                        contribution.customer.clone(),
                        contribution.bucket_unix_s.to_string(),
                        contribution.admitted.to_string(),
                        contribution.requests.to_string(),
                        key_index.to_string(),
                    ]);
                }
                call.args.extend(call.customers.iter().cloned());
                call
            })
            .collect();
        Ok(calls)
    }

    /// Builds one script call per shard reading `minutes` minute-totals
    /// hashes from `first`.
    pub(super) fn plan_minute_totals(
        &self,
        customers: &[String],
        first: i64,
        minutes: i64,
    ) -> Vec<ScriptCall> {
        let mut shards: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for customer in customers {
            let shard = shard_of(customer, self.shards);
            shards.entry(shard).or_default().push(customer.clone());
        }
        shards
            .into_iter()
            .map(|(shard, customers)| {
                let keys = ShardKeys::new(&self.key_prefix, shard);
                ScriptCall {
                    keys: (0..minutes)
                        .map(|offset| keys.minute(first + offset * MINUTE_SECONDS))
                        .collect(),
                    args: customers.clone(),
                    customers,
                }
            })
            .collect()
    }
}

/// Checks what the script relies on: ids non-negative and strictly
/// ascending, counts within Redis integers.
fn check_contributions(contributions: &[Contribution]) -> Result<(), CounterError> {
    let mut previous: Option<i64> = None;
    for contribution in contributions {
        let invalid = |problem: String| {
            Err(CounterError::Invalid {
                detail: format!(
                    "invalid contribution {} of customer {}: {problem}",
                    contribution.id, contribution.customer
                ),
            })
        };
        if contribution.id < 0 {
            return invalid("the id is negative; outbox ids start at 0".to_owned());
        }
        if previous.is_some_and(|previous| contribution.id <= previous) {
            return invalid("ids must be strictly ascending within an exchange".to_owned());
        }
        if i64::try_from(contribution.admitted).is_err()
            || i64::try_from(contribution.requests).is_err()
        {
            return invalid(format!(
                "counts {} admitted and {} requests exceed the Redis integer maximum {}",
                contribution.admitted,
                contribution.requests,
                i64::MAX
            ));
        }
        previous = Some(contribution.id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::redis::tests::settings;

    fn contribution(id: i64, customer: &str, bucket: i64) -> Contribution {
        Contribution {
            id,
            customer: customer.to_owned(),
            bucket_unix_s: bucket,
            admitted: 2,
            requests: 3,
        }
    }

    #[test]
    fn contributions_must_ascend() {
        let ok = [contribution(1, "a", 100), contribution(2, "b", 100)];
        assert!(check_contributions(&ok).is_ok());

        let repeated = [contribution(2, "a", 100), contribution(2, "b", 100)];
        assert!(matches!(
            check_contributions(&repeated),
            Err(CounterError::Invalid { .. })
        ));
        let negative = [contribution(-1, "a", 100)];
        assert!(matches!(
            check_contributions(&negative),
            Err(CounterError::Invalid { .. })
        ));
        let mut huge = contribution(1, "a", 100);
        huge.requests = u64::MAX;
        assert!(matches!(
            check_contributions(&[huge]),
            Err(CounterError::Invalid { .. })
        ));
    }

    #[test]
    fn plan_sends_one_call_per_shard() -> Result<(), CounterError> {
        let counters = RedisCounters::new(settings(4), "side-a".to_owned())?;
        let contributions: Vec<Contribution> = (0..40)
            .map(|index| contribution(index, &format!("cus_{index}"), 120 + index % 2 * 60))
            .collect();
        let customers: Vec<String> = (0..40).map(|index| format!("cus_{index}")).collect();
        let exchange = Exchange {
            contributions: &contributions,
            customers: &customers,
            now_unix_s: 200,
            window_seconds: 60,
        };

        let calls = counters.plan_exchange(&exchange)?;

        assert_eq!(calls.len(), 4);
        let planned: usize = calls.iter().map(|call| call.customers.len()).sum();
        assert_eq!(planned, 40);
        for call in &calls {
            let tag_end = call.keys[0].find('}').unwrap_or(0);
            let tag = &call.keys[0][..=tag_end];
            assert!(tag.ends_with('}'), "{tag}");
            assert!(
                call.keys.iter().all(|key| key.starts_with(tag)),
                "{:?}",
                call.keys
            );
            // Two minutes (120 and 180) among the contributions of each shard.
            assert_eq!(call.keys.len(), 6, "{:?}", call.keys);
            let count: usize = call.args[5].parse().unwrap_or(usize::MAX);
            assert_eq!(call.args.len(), 6 + 6 * count + call.customers.len());
        }
        Ok(())
    }

    #[test]
    fn plan_skips_empty_exchange() -> Result<(), CounterError> {
        let counters = RedisCounters::new(settings(4), "side-a".to_owned())?;
        let exchange = Exchange {
            contributions: &[],
            customers: &[],
            now_unix_s: 200,
            window_seconds: 60,
        };
        assert!(counters.plan_exchange(&exchange)?.is_empty());
        Ok(())
    }
}
