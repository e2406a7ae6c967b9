//! A small seeded pseudo-random generator (SplitMix64) for synthetic traffic. Its output
//! depends only on the seed, so generated logs and plans are reproducible across platforms
//! and dependency upgrades. Not for cryptography.

/// SplitMix64 generator state.
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a float uniformly distributed in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Returns an integer uniformly distributed in `[low, high)`; `low` when the range is empty.
    pub(crate) fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next_u64() % (high - low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_sequence() {
        let mut first = SplitMix64::new(42);
        let mut second = SplitMix64::new(42);
        for _ in 0..100 {
            assert_eq!(first.next_u64(), second.next_u64());
        }
    }

    #[test]
    fn matches_reference_output() {
        // First outputs of SplitMix64 for seed 0, from the reference C implementation.
        let mut random = SplitMix64::new(0);
        assert_eq!(random.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(random.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn floats_and_ranges_stay_in_bounds() {
        let mut random = SplitMix64::new(7);
        for _ in 0..1_000 {
            let x = random.next_f64();
            assert!((0.0..1.0).contains(&x));
            let n = random.range(10, 20);
            assert!((10..20).contains(&n));
        }
        assert_eq!(random.range(5, 5), 5);
    }
}
