//! Allowance of each instance within a customer's quota.
//!
//! Far from the quota an instance decides on its own count plus what the
//! others admitted, as of its last sync. Once the customer has used
//! `near_quota_fraction` of the quota across all instances, each instance
//! also gets a cap: its own admissions in the window plus its share of what
//! is left, weighted by the requests it received in the window. The shares
//! are rounded down and the remaining units go to the largest remainders,
//! so the caps of all instances together hand out exactly what is left by
//! this sidecar's counts, never more.
//!
//! Over-admission therefore comes only from usage that had not reached this
//! sidecar when it computed a grant. With `n` instances, each admitting at most `r` requests per second
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
    /// Sync interval requested of an instance while one of its customers is
    /// near the quota, in milliseconds.
    pub near_sync_ms: u32,
}

impl Default for AllowanceSettings {
    fn default() -> Self {
        AllowanceSettings {
            near_quota_fraction: 0.0,
            near_sync_ms: 100,
        }
    }
}

/// One customer's window counts, as recorded by this sidecar.
#[derive(Debug, Clone, Copy)]
pub struct CustomerView<'a> {
    /// Quota in requests per window, when the customer's tier has one.
    pub quota: Option<u64>,
    /// Window counts of each instance this sidecar serves.
    pub local: &'a [(&'a str, Counts)],
    /// Window counts of every other sidecar together.
    pub elsewhere: Counts,
}

/// Usage of one customer sent to one instance in a sync reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Requests every other instance admitted within the window.
    pub others_admitted: u64,
    /// Maximum requests the instance may have admitted within the window,
    /// counting its own only; `None` far from the quota.
    pub cap: Option<u64>,
}

/// Computes the grant of `instance` for the customer in `view`.
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
    Grant {
        others_admitted,
        cap: Some(own.admitted.saturating_add(share_of(view, instance, left))),
    }
}

/// Splits `left` among this sidecar's instances and the other sidecars by
/// their requests in the window, and returns the part of `instance`.
///
/// Each part is rounded down, and the units left over go one each to the
/// parts with the largest fractions, ties to the lowest name (the other
/// sidecars last). So the parts add up to exactly `left`: rounding down
/// alone could leave a unit that no instance may use, for the rest of the
/// window. Each local instance counts one request more than it received,
/// so an instance whose demand is new gets a small share at once.
fn share_of(view: &CustomerView<'_>, instance: &str, left: u64) -> u64 {
    if left == 0 {
        return 0;
    }
    // Entries: (name, weight, part); `None` names the other sidecars
    // together. Each local instance weighs one request more than it
    // received, so an instance whose demand is new still gets a share.
    let mut parts: Vec<(Option<&str>, u128, u128)> = view
        .local
        .iter()
        .map(|&(name, counts)| (Some(name), u128::from(counts.requests) + 1, 0))
        .collect();
    parts.push((None, u128::from(view.elsewhere.requests), 0));

    let left = u128::from(left);
    let total: u128 = parts.iter().map(|part| part.1).sum();
    if total == 0 {
        return 0;
    }
    let mut handed = 0u128;
    for part in &mut parts {
        // left * requests fits u128; the quotient is at most `left`.
        part.2 = left * part.1 / total;
        handed += part.2;
    }
    let mut spare = left.saturating_sub(handed);
    if spare > 0 {
        let mut order: Vec<usize> = (0..parts.len())
            .filter(|&index| parts[index].1 > 0)
            .collect();
        order.sort_by(|&a, &b| {
            let fraction = |index: usize| left * parts[index].1 % total;
            fraction(b)
                .cmp(&fraction(a))
                .then_with(|| match (parts[a].0, parts[b].0) {
                    (Some(x), Some(y)) => x.cmp(y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                })
        });
        for index in order {
            if spare == 0 {
                break;
            }
            parts[index].2 += 1;
            spare -= 1;
        }
    }
    parts
        .iter()
        .find(|part| part.0 == Some(instance))
        .map_or(0, |part| u64::try_from(part.2).unwrap_or(u64::MAX))
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

    #[test]
    fn last_unit_goes_to_one_instance() {
        // 59 of 60 used with equal demand: rounding down alone would give the
        // last request to no instance.
        let local = [("a", counts(30, 50)), ("b", counts(29, 50))];
        let view = CustomerView {
            quota: Some(60),
            local: &local,
            elsewhere: Counts::default(),
        };
        assert_eq!(grant(&view, "a", &SETTINGS).cap, Some(31));
        assert_eq!(grant(&view, "b", &SETTINGS).cap, Some(29));
    }

    #[test]
    fn parts_add_up_to_what_is_left() {
        for left in 0..50u64 {
            let local = [
                ("a", counts(1, 7)),
                ("b", counts(1, 11)),
                ("c", counts(1, 13)),
            ];
            let view = CustomerView {
                quota: Some(3 + left),
                local: &local,
                elsewhere: counts(0, 5),
            };
            let total = 7 + 11 + 13 + 5;
            let local_parts: u64 = ["a", "b", "c"]
                .iter()
                .map(|name| share_of(&view, name, left))
                .sum();
            let elsewhere_part = left * 5 / total;
            assert!(local_parts <= left, "{local_parts} of {left}");
            assert!(
                local_parts + elsewhere_part + 1 >= left,
                "{local_parts} of {left}"
            );
        }
    }
}
