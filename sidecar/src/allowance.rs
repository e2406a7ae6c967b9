//! What each instance may admit of a customer's quota.
//!
//! Far from the quota an instance decides on its own count plus what the
//! others admitted, as of its last sync. Once the customer has used
//! `near_quota_fraction` of the quota across all instances, each instance
//! also gets a cap: its own admissions in the window plus its share of what
//! is left, weighted by the requests it received in the window. The shares
//! are rounded down, so the caps of all instances together never hand out
//! more than is left as this sidecar sees it.
//!
//! Over-admission therefore comes only from usage a grant could not yet
//! see: with `n` instances, each admitting at most `r` requests per second
//! of the customer, a sync interval `t`, a shared-store flush interval `f`
//! and call latency `l`, at most `(n - 1) * r * (t + f + l)` requests
//! beyond the quota in any window.

use crate::remote::Counts;

/// Tuning of allowances and sync intervals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AllowanceSettings {
    /// Share of the quota used across all instances from which each
    /// instance gets a cap, between 0 and 1.
    pub near_quota_fraction: f64,
    /// Sync interval asked of an instance while one of its customers is
    /// near the quota, in milliseconds.
    pub near_sync_ms: u32,
}

impl Default for AllowanceSettings {
    fn default() -> Self {
        AllowanceSettings {
            near_quota_fraction: 0.5,
            near_sync_ms: 100,
        }
    }
}

/// One customer as this sidecar sees it.
#[derive(Debug, Clone, Copy)]
pub struct CustomerView<'a> {
    /// Quota in requests per window, when the customer's tier has one.
    pub quota: Option<u64>,
    /// Window counts of each instance this sidecar serves.
    pub local: &'a [(&'a str, Counts)],
    /// Window counts of every other sidecar together.
    pub elsewhere: Counts,
}

/// What one instance is told about one customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Requests every other instance admitted within the window.
    pub others_admitted: u64,
    /// Most requests the instance may have admitted within the window,
    /// counting its own only; `None` far from the quota.
    pub cap: Option<u64>,
}

/// Works out the grant of `instance` for the customer in `view`.
pub fn grant(view: &CustomerView<'_>, instance: &str, settings: &AllowanceSettings) -> Grant {
    let mut global = view.elsewhere;
    let mut own = Counts::default();
    for &(name, counts) in view.local {
        global.admitted = global.admitted.saturating_add(counts.admitted);
        global.requests = global.requests.saturating_add(counts.requests);
        if name == instance {
            own = counts;
        }
    }
    let others_admitted = global.admitted.saturating_sub(own.admitted);

    let Some(quota) = view.quota else {
        return Grant {
            others_admitted,
            cap: None,
        };
    };
    let near = global.admitted as f64 >= settings.near_quota_fraction * quota as f64;
    if !near {
        return Grant {
            others_admitted,
            cap: None,
        };
    }

    let left = quota.saturating_sub(global.admitted);
    let share = if global.requests == 0 || own.requests == 0 {
        // An instance with no requests in the window gets nothing until it
        // shows demand; the next sync, at the near interval, corrects it.
        0
    } else {
        // u128 keeps left * requests exact; the quotient is at most `left`.
        let share = u128::from(left) * u128::from(own.requests) / u128::from(global.requests);
        u64::try_from(share).unwrap_or(left)
    };
    Grant {
        others_admitted,
        cap: Some(own.admitted.saturating_add(share)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(admitted: u64, requests: u64) -> Counts {
        Counts { admitted, requests }
    }

    const SETTINGS: AllowanceSettings = AllowanceSettings {
        near_quota_fraction: 0.5,
        near_sync_ms: 100,
    };

    #[test]
    fn far_from_quota_reports_others_without_cap() {
        let local = [("a", counts(10, 10)), ("b", counts(5, 5))];
        let view = CustomerView {
            quota: Some(60),
            local: &local,
            elsewhere: counts(3, 3),
        };
        let grant = grant(&view, "a", &SETTINGS);
        assert_eq!(
            grant,
            Grant {
                others_admitted: 8,
                cap: None
            }
        );
    }

    #[test]
    fn near_quota_shares_what_is_left_by_demand() {
        // 40 of 60 used; 20 left, split 3:1 by requests.
        let local = [("a", counts(20, 60)), ("b", counts(10, 20))];
        let view = CustomerView {
            quota: Some(60),
            local: &local,
            elsewhere: counts(10, 0),
        };
        let a = grant(&view, "a", &SETTINGS);
        let b = grant(&view, "b", &SETTINGS);
        assert_eq!(a.cap, Some(20 + 15));
        assert_eq!(b.cap, Some(10 + 5));
        assert_eq!(a.others_admitted, 20);
        assert_eq!(b.others_admitted, 30);
    }

    #[test]
    fn caps_never_hand_out_more_than_is_left() {
        for left_over in 0..40u64 {
            let local = [
                ("a", counts(7, 13)),
                ("b", counts(9, 17)),
                ("c", counts(11, 23)),
            ];
            let used = 27 + left_over % 5;
            let view = CustomerView {
                quota: Some(used + left_over),
                local: &local,
                elsewhere: counts(used - 27, 19),
            };
            let handed: u64 = ["a", "b", "c"]
                .iter()
                .map(|instance| {
                    let grant = grant(&view, instance, &SETTINGS);
                    let own = local.iter().find(|(name, _)| name == instance).unwrap().1;
                    grant.cap.map_or(0, |cap| cap - own.admitted)
                })
                .sum();
            assert!(handed <= left_over, "handed {handed} of {left_over}");
        }
    }

    #[test]
    fn over_quota_caps_at_own_count() {
        let local = [("a", counts(50, 80)), ("b", counts(30, 40))];
        let view = CustomerView {
            quota: Some(60),
            local: &local,
            elsewhere: Counts::default(),
        };
        assert_eq!(grant(&view, "a", &SETTINGS).cap, Some(50));
    }

    #[test]
    fn tier_without_quota_gets_no_cap() {
        let local = [("a", counts(500, 500))];
        let view = CustomerView {
            quota: None,
            local: &local,
            elsewhere: counts(100, 100),
        };
        assert_eq!(
            grant(&view, "a", &SETTINGS),
            Grant {
                others_admitted: 100,
                cap: None
            }
        );
    }
}
