//! Key names of the Redis counters and the customer-to-shard mapping.

/// Seconds in one minute-totals key.
pub(super) const MINUTE_SECONDS: i64 = 60;

/// Key names of one shard. All of them carry the hash tag
/// `{<prefix>:<shard>}`, so they live in one cluster slot.
#[derive(Debug, Clone)]
pub(super) struct ShardKeys {
    tag: String,
}

impl ShardKeys {
    pub(super) fn new(prefix: &str, shard: u16) -> Self {
        Self {
            tag: format!("{{{prefix}:{shard}}}"),
        }
    }

    /// Hash of the window sums: `a:<customer>` and `r:<customer>`.
    pub(super) fn window(&self) -> String {
        format!("{}:window", self.tag)
    }

    /// Hash of the counts per bucket: `a:<bucket>:<customer>` and
    /// `r:<bucket>:<customer>`.
    pub(super) fn buckets(&self) -> String {
        format!("{}:buckets", self.tag)
    }

    /// Sorted set of `<bucket>:<customer>` entries scored by bucket, so that
    /// the entries leaving the window are found without a scan.
    pub(super) fn expiry(&self) -> String {
        format!("{}:expiry", self.tag)
    }

    /// String of the highest contribution id of `sidecar_id` applied to
    /// this shard.
    pub(super) fn applied(&self, sidecar_id: &str) -> String {
        format!("{}:applied:{sidecar_id}", self.tag)
    }

    /// Hash of the requests admitted per customer in the minute starting at
    /// `minute_unix_s`.
    pub(super) fn minute(&self, minute_unix_s: i64) -> String {
        format!("{}:m:{minute_unix_s}", self.tag)
    }
}

/// Returns the shard of `customer`: FNV-1a (64 bits) of its UTF-8 bytes
/// modulo `shards`, which is stable across processes and versions.
pub(super) fn shard_of(customer: &str, shards: u16) -> u16 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    let hash = customer.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    });
    let shard = hash % u64::from(shards.max(1));
    // The remainder is below `shards`, so it fits in u16.
    u16::try_from(shard).unwrap_or(0)
}

/// Returns the start of the minute that contains `unix_s`, saturating at
/// `i64::MIN` when that start is below `i64::MIN`.
pub(super) fn minute_start(unix_s: i64) -> i64 {
    unix_s.saturating_sub(unix_s.rem_euclid(MINUTE_SECONDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_values() {
        // Reference values of 64-bit FNV-1a: "" -> cbf29ce484222325,
        // "a" -> af63dc4c8601ec8c, "foobar" -> 85944171f73967e8.
        assert_eq!(
            shard_of("", u16::MAX),
            (0xcbf2_9ce4_8422_2325_u64 % 65_535) as u16
        );
        assert_eq!(
            shard_of("a", u16::MAX),
            (0xaf63_dc4c_8601_ec8c_u64 % 65_535) as u16
        );
        assert_eq!(
            shard_of("foobar", u16::MAX),
            (0x8594_4171_f739_67e8_u64 % 65_535) as u16
        );
    }

    #[test]
    fn shard_spreads_customers() {
        let shards = 8;
        let mut used = [0_u32; 8];
        for index in 0..800 {
            let shard = shard_of(&format!("cus_{index}"), shards);
            used[usize::from(shard)] += 1;
        }
        for (shard, count) in used.iter().enumerate() {
            assert!(
                *count > 50,
                "shard {shard} got only {count} of 800 customers"
            );
        }
    }

    #[test]
    fn single_shard_takes_everything() {
        assert_eq!(shard_of("cus_a", 1), 0);
        assert_eq!(shard_of("cus_b", 1), 0);
    }

    #[test]
    fn keys_share_the_hash_tag() {
        let keys = ShardKeys::new("veo", 3);
        assert_eq!(keys.window(), "{veo:3}:window");
        assert_eq!(keys.buckets(), "{veo:3}:buckets");
        assert_eq!(keys.expiry(), "{veo:3}:expiry");
        assert_eq!(keys.applied("side-a"), "{veo:3}:applied:side-a");
        assert_eq!(keys.minute(1_700_000_040), "{veo:3}:m:1700000040");
    }

    #[test]
    fn minute_start_rounds_down() {
        assert_eq!(minute_start(1_700_000_039), 1_699_999_980);
        assert_eq!(minute_start(1_700_000_040), 1_700_000_040);
        assert_eq!(minute_start(-1), -60);
        assert_eq!(minute_start(i64::MIN), i64::MIN);
        assert_eq!(minute_start(i64::MAX), i64::MAX - 7);
    }
}
