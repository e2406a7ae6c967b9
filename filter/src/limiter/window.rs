//! Exact rolling-window quota as a sliding log: the times of the requests
//! admitted in the last window, stored as millisecond offsets from a base
//! time so each costs 4 bytes.
//!
//! A request at `now` is admitted iff fewer than `requests` were admitted
//! in the window `(now - window, now]`. A refused request is not logged,
//! so it consumes nothing. This holds for every window, so no customer
//! gets twice its quota across a window boundary.

use crate::config::Quota;

/// The admitted-request log of one customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlidingLog {
    /// Time the offsets count from, in milliseconds since the Unix epoch.
    pub base_ms: u64,
    /// Admission times as offsets from `base_ms`, ascending.
    pub offsets: Vec<u32>,
}

/// Outcome of a quota check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaCheck {
    /// Whether the quota has room for one more request.
    pub allowed: bool,
    /// Requests admitted in the window ending now.
    pub used: u32,
    /// Milliseconds until the window has room for one more request; 0
    /// when it has room now.
    pub wait_ms: u64,
    /// Milliseconds until the oldest logged admission leaves the window;
    /// 0 when none is logged.
    pub oldest_leaves_ms: u64,
}

impl SlidingLog {
    /// Drops admissions that have left the window ending at `now_ms` and
    /// moves the base to the oldest one kept.
    pub fn prune(&mut self, quota: &Quota, now_ms: u64) {
        let expired = self
            .offsets
            .iter()
            .take_while(|&&offset| self.base_ms + u64::from(offset) + quota.window_ms <= now_ms)
            .count();
        self.offsets.drain(..expired);

        match self.offsets.first().copied() {
            None => self.base_ms = now_ms,
            Some(shift) if shift > 0 => {
                self.base_ms += u64::from(shift);
                for offset in &mut self.offsets {
                    *offset -= shift;
                }
            }
            Some(_) => {}
        }
    }

    /// Checks the quota at `now_ms`; call [`SlidingLog::prune`] first.
    pub fn check(&self, quota: &Quota, now_ms: u64) -> QuotaCheck {
        let used = u32::try_from(self.offsets.len()).unwrap_or(u32::MAX);
        let leaves_ms = |index: usize| {
            self.offsets.get(index).map_or(0, |&offset| {
                (self.base_ms + u64::from(offset) + quota.window_ms).saturating_sub(now_ms)
            })
        };
        let allowed = used < quota.requests;

        // The window has room once `used - requests + 1` admissions have
        // left it, which happens when the one at that index leaves.
        let wait_ms = if allowed {
            0
        } else {
            leaves_ms((used - quota.requests) as usize)
        };
        QuotaCheck {
            allowed,
            used,
            wait_ms,
            oldest_leaves_ms: leaves_ms(0),
        }
    }

    /// Logs an admission at `now_ms`.
    pub fn record(&mut self, now_ms: u64) {
        if self.offsets.is_empty() {
            self.base_ms = now_ms;
        }
        // A clock that stepped back yields an offset below the newest one;
        // keep the log sorted so pruning stays a prefix cut.
        let offset = u32::try_from(now_ms.saturating_sub(self.base_ms)).unwrap_or(u32::MAX);
        let index = self.offsets.partition_point(|&logged| logged <= offset);
        self.offsets.insert(index, offset);
    }

    /// Returns the time from which this log no longer affects decisions:
    /// when its newest admission leaves the window.
    pub fn idle_at_ms(&self, quota: &Quota) -> u64 {
        let newest = self.offsets.last().map_or(0, |&offset| u64::from(offset));
        self.base_ms + newest + quota.window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUOTA: Quota = Quota {
        requests: 3,
        window_ms: 10_000,
    };

    /// Runs one request through the log and returns whether it was
    /// admitted.
    fn request(log: &mut SlidingLog, now_ms: u64) -> bool {
        log.prune(&QUOTA, now_ms);
        let check = log.check(&QUOTA, now_ms);
        if check.allowed {
            log.record(now_ms);
        }
        check.allowed
    }

    #[test]
    fn admits_exactly_the_quota_of_a_burst() {
        let mut log = SlidingLog::default();
        let admitted = (0..10).filter(|_| request(&mut log, 1_000)).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn oldest_admission_leaves_exactly_at_window_end() {
        let mut log = SlidingLog::default();
        for now in [1_000, 2_000, 3_000] {
            assert!(request(&mut log, now));
        }
        assert!(!request(&mut log, 10_999));
        assert!(request(&mut log, 11_000));
        assert!(!request(&mut log, 11_001));
        assert!(request(&mut log, 12_000));
    }

    #[test]
    fn no_double_quota_across_window_boundary() {
        // A burst at the end of one window and one at the start of the
        // next: a fixed window would admit 6 within 2 ms.
        let mut log = SlidingLog::default();
        let late = (0..3).filter(|_| request(&mut log, 9_999)).count();
        let early = (0..3).filter(|_| request(&mut log, 10_001)).count();
        assert_eq!(late + early, 3);
    }

    #[test]
    fn refused_requests_consume_nothing() {
        let mut log = SlidingLog::default();
        for _ in 0..3 {
            assert!(request(&mut log, 0));
        }
        for now in (1..10_000).step_by(7) {
            assert!(!request(&mut log, now));
        }
        let admitted = (0..5).filter(|_| request(&mut log, 10_000)).count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn any_window_holds_at_most_the_quota() {
        let mut log = SlidingLog::default();
        let mut admitted = Vec::new();
        let mut now = 0;
        for step in 0..2_000u64 {
            now += (step * 7_919) % 1_300;
            if request(&mut log, now) {
                admitted.push(now);
            }
        }
        for (index, &start) in admitted.iter().enumerate() {
            let within = admitted[index..]
                .iter()
                .take_while(|&&time| time < start + QUOTA.window_ms)
                .count();
            assert!(within <= 3, "{within} admitted from {start}");
        }
    }

    #[test]
    fn client_at_its_rate_is_never_refused() {
        let mut log = SlidingLog::default();
        // 3 per 10 s, evenly spaced.
        for step in 0..300u64 {
            let now = 5_000 + step * 3_334;
            assert!(request(&mut log, now), "refused at {now}");
        }
    }

    #[test]
    fn wait_is_time_until_oldest_leaves() {
        let mut log = SlidingLog::default();
        for now in [1_000, 4_000, 6_000] {
            assert!(request(&mut log, now));
        }
        log.prune(&QUOTA, 7_500);
        let check = log.check(&QUOTA, 7_500);
        assert!(!check.allowed);
        assert_eq!(check.used, 3);
        assert_eq!(check.wait_ms, 3_500);
        assert_eq!(check.oldest_leaves_ms, 3_500);
    }

    #[test]
    fn wait_after_quota_shrinks_counts_extra_admissions() {
        let mut log = SlidingLog::default();
        for now in [1_000, 2_000, 3_000] {
            log.record(now);
        }
        let smaller = Quota {
            requests: 1,
            window_ms: 10_000,
        };
        log.prune(&smaller, 3_000);
        let check = log.check(&smaller, 3_000);
        assert!(!check.allowed);
        // All three must leave; the newest leaves at 13 s.
        assert_eq!(check.wait_ms, 10_000);
    }

    #[test]
    fn prune_rebases_offsets() {
        let mut log = SlidingLog::default();
        for now in [1_000, 4_000, 6_000] {
            log.record(now);
        }
        log.prune(&QUOTA, 12_000);
        assert_eq!(log.base_ms, 4_000);
        assert_eq!(log.offsets, [0, 2_000]);
        assert_eq!(log.idle_at_ms(&QUOTA), 16_000);
    }

    #[test]
    fn clock_stepping_back_keeps_log_sorted() {
        let mut log = SlidingLog::default();
        log.record(5_000);
        log.record(4_000);
        log.record(6_000);
        assert_eq!(log.offsets, [0, 0, 1_000]);
    }
}
