//! Token bucket for burst tiers: `size` tokens, refilled continuously at
//! `tokens_per_second`; a request takes one token or is refused.

use crate::config::Burst;

/// Tolerance for floating-point drift in the token count.
const EPSILON: f64 = 1e-6;

/// The bucket state of one customer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Tokens available at `updated_ms`.
    pub tokens: f64,
    /// Time of the last refill, in milliseconds since the Unix epoch.
    pub updated_ms: u64,
}

/// Outcome of a bucket check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BurstCheck {
    /// Whether a token is available.
    pub allowed: bool,
    /// Whole tokens available before this request.
    pub available: u64,
    /// Milliseconds until a token is available; 0 when one is now.
    pub wait_ms: u64,
}

impl TokenBucket {
    /// Creates a full bucket.
    pub fn full(burst: &Burst, now_ms: u64) -> Self {
        Self {
            tokens: f64::from(burst.size),
            updated_ms: now_ms,
        }
    }

    /// Adds the tokens accrued up to `now_ms`, capped at the size.
    pub fn refill(&mut self, burst: &Burst, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.updated_ms);
        let accrued = elapsed_ms as f64 * burst.tokens_per_second / 1000.0;
        self.tokens = (self.tokens + accrued).min(f64::from(burst.size));
        self.updated_ms = self.updated_ms.max(now_ms);
    }

    /// Checks for a token; call [`TokenBucket::refill`] first.
    pub fn check(&self, burst: &Burst) -> BurstCheck {
        let allowed = self.tokens + EPSILON >= 1.0;
        BurstCheck {
            allowed,
            available: (self.tokens + EPSILON).floor().max(0.0) as u64,
            wait_ms: if allowed {
                0
            } else {
                ms_until(1.0 - self.tokens, burst)
            },
        }
    }

    /// Takes one token.
    pub fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// Returns milliseconds until the whole-token count grows by one; 0
    /// when the bucket is full.
    pub fn next_token_ms(&self, burst: &Burst) -> u64 {
        if self.tokens + EPSILON >= f64::from(burst.size) {
            return 0;
        }
        let fraction = self.tokens - (self.tokens + EPSILON).floor();
        ms_until(1.0 - fraction.max(0.0), burst)
    }

    /// Returns the time from which the bucket is full again and so no
    /// longer affects decisions.
    pub fn idle_at_ms(&self, burst: &Burst) -> u64 {
        let missing = (f64::from(burst.size) - self.tokens).max(0.0);
        self.updated_ms + ms_until(missing, burst)
    }
}

fn ms_until(tokens: f64, burst: &Burst) -> u64 {
    (tokens * 1000.0 / burst.tokens_per_second - EPSILON)
        .ceil()
        .max(0.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const BURST: Burst = Burst {
        tokens_per_second: 10.0,
        size: 5,
    };

    fn request(bucket: &mut TokenBucket, now_ms: u64) -> bool {
        bucket.refill(&BURST, now_ms);
        let allowed = bucket.check(&BURST).allowed;
        if allowed {
            bucket.take();
        }
        allowed
    }

    #[test]
    fn full_bucket_admits_its_size_at_once() {
        let mut bucket = TokenBucket::full(&BURST, 0);
        let admitted = (0..20).filter(|_| request(&mut bucket, 0)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn tokens_return_at_the_refill_rate() {
        let mut bucket = TokenBucket::full(&BURST, 0);
        while request(&mut bucket, 0) {}
        assert!(!request(&mut bucket, 99));
        assert!(request(&mut bucket, 100));
        assert!(!request(&mut bucket, 150));
        assert!(request(&mut bucket, 200));
    }

    #[test]
    fn client_at_refill_rate_is_never_refused() {
        let mut bucket = TokenBucket::full(&BURST, 0);
        for step in 1..10_000 {
            assert!(request(&mut bucket, step * 100), "refused at step {step}");
        }
    }

    #[test]
    fn wait_is_time_until_next_token() {
        let mut bucket = TokenBucket::full(&BURST, 0);
        while request(&mut bucket, 0) {}
        bucket.refill(&BURST, 30);
        let check = bucket.check(&BURST);
        assert!(!check.allowed);
        assert_eq!(check.wait_ms, 70);
        assert_eq!(check.available, 0);
    }

    #[test]
    fn idle_when_full_again() {
        let mut bucket = TokenBucket::full(&BURST, 1_000);
        assert!(request(&mut bucket, 1_000));
        assert!(request(&mut bucket, 1_000));
        assert_eq!(bucket.idle_at_ms(&BURST), 1_200);
        assert_eq!(bucket.next_token_ms(&BURST), 100);
    }
}
