//! Per-customer rate limiting in Envoy shared data, shared by every
//! worker of one Envoy: one record per customer in a bounded slot table
//! (`veo.rl.<slot>`), read with `get_shared_data` and written back with
//! its compare-and-swap token, retried when another worker wrote first.
//!
//! A customer's record lives in one of [`PROBES`] consecutive slots from
//! the hash of its id. When none contains it, a cleared or unreadable slot
//! is taken, else the first free slot, else the idle record seen longest
//! ago, else the record seen longest ago. An evicted record's pending usage is handed to the sync role, not
//! dropped.

pub mod bucket;
pub mod decide;
pub mod record;
pub mod window;

use crate::config::Tier;
use crate::host::{Host, HostError, SetError};
use crate::usage::UsageMessage;
pub use decide::{Decision, LimitState};
use record::{Record, RemoteState};

/// Prefix of the shared-data keys of the limiter; the slot index follows.
pub const KEY_PREFIX: &str = "veo.rl.";

/// Consecutive slots a customer's record may occupy.
pub const PROBES: u32 = 4;

/// Compare-and-swap attempts before a request is decided without the
/// shared record.
pub const MAX_ATTEMPTS: u32 = 32;

/// Age after which an unchanged remote state is written again, so that it
/// never looks older than a window, in milliseconds. Windows are at least
/// one second long.
const REMOTE_REFRESH_MS: u64 = 1_000;

/// Token passed when writing a slot that did not exist at read time.
/// proxy-wasm-cpp-host checks a token only against an existing key, so
/// this creates the key when it is still missing and fails with a
/// mismatch when another worker created it first.
// NOTE: the host hands out tokens from one global counter, so a key whose
// current token is exactly u32::MAX would accept this write. That takes
// the counter wrapping and landing on this key during the race.
const CREATE_ONLY_CAS: u32 = u32::MAX;

/// Value that clears a slot. Keys cannot be deleted, and probing stops at
/// a missing key, so a cleared slot must still exist. It contains one byte
/// that no record version starts with, so it reads as an unreadable slot,
/// which the next new customer takes first.
const CLEARED_SLOT: &[u8] = &[0];

/// Failure to decide from shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimiterError {
    /// A shared-data call failed.
    #[error("shared data call failed: {0}")]
    Host(#[from] HostError),
    /// Other workers kept changing the record.
    #[error("record changed on each of {0} compare-and-swap attempts")]
    Contention(u32),
}

/// The outcome of [`Limiter::admit`], with the queue messages the caller
/// must send.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// The decision and header values.
    pub decision: Decision,
    /// Slot that contains the customer's record now.
    pub slot: u32,
    /// Messages for the usage queue.
    pub messages: Vec<UsageMessage>,
    /// Set when another customer's record was evicted; `true` when that
    /// record was not idle, so its limit state was lost.
    pub evicted_active: Option<bool>,
}

/// Slot of a customer's record, found or chosen.
struct Placement {
    slot: u32,
    /// Shared-data key of `slot`.
    key: String,
    cas: u32,
    own: Option<Record>,
    displaced: Option<Record>,
}

/// Preference for taking a slot, lower first.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Unreadable,
    Idle(u64),
    Active(u64),
}

/// The shared limiter table.
#[derive(Debug, Clone)]
pub struct Limiter {
    slots: u32,
    share_before_sync: f64,
}

impl Limiter {
    /// Creates a table of `slots` customer records.
    pub fn new(slots: u32) -> Self {
        Self {
            slots: slots.max(1),
            share_before_sync: 1.0,
        }
    }

    /// Sets the share of a quota admitted for a customer without a recent
    /// sync reply about it (see [`decide::apply_with`]).
    pub fn with_share_before_sync(mut self, share: f64) -> Self {
        self.share_before_sync = share;
        self
    }

    /// Decides one request of `customer` under `tier` at `now_ms`, counts
    /// it as pending usage, and stores the record. `hint` is the slot the
    /// customer was found in before.
    pub fn admit(
        &self,
        host: &impl Host,
        customer: &str,
        tier: &Tier,
        now_ms: u64,
        mut hint: Option<u32>,
    ) -> Result<Admission, LimiterError> {
        for _ in 0..MAX_ATTEMPTS {
            let placement = self.locate(host, customer, hint, now_ms)?;
            let had_pending = placement
                .own
                .as_ref()
                .or(placement.displaced.as_ref())
                .is_some_and(|record| !record.pending.is_empty());
            let mut record = placement.own.unwrap_or_else(|| Record::new(customer));
            let decision = decide::apply_with(&mut record, tier, now_ms, self.share_before_sync);

            match host.set_shared_data(&placement.key, &record.encode(), Some(placement.cas)) {
                Ok(()) => {}
                Err(SetError::CasMismatch) => {
                    hint = Some(placement.slot);
                    continue;
                }
                Err(SetError::Host(error)) => return Err(error.into()),
            }

            // A slot with pending usage already has a message on the
            // queue that the sync role has not processed.
            let mut messages = Vec::new();
            if !had_pending {
                messages.push(UsageMessage::Slot(placement.slot));
            }
            let evicted_active = placement.displaced.map(|displaced| {
                let active = !displaced.is_idle(now_ms);
                if !displaced.pending.is_empty() {
                    messages.push(UsageMessage::Detached {
                        customer: displaced.customer,
                        pending: displaced.pending,
                    });
                }
                active
            });
            return Ok(Admission {
                decision,
                slot: placement.slot,
                messages,
                evicted_active,
            });
        }
        Err(LimiterError::Contention(MAX_ATTEMPTS))
    }

    /// Stores the usage at other instances from the last sync reply in the
    /// record of `customer`. Returns `false` when this instance has no
    /// record of the customer, so a record created later starts without it.
    pub fn set_remote(
        &self,
        host: &impl Host,
        customer: &str,
        remote: RemoteState,
    ) -> Result<bool, LimiterError> {
        let start = self.home_slot(customer);
        'probes: for probe in 0..PROBES.min(self.slots) {
            let key = slot_key((start + probe) % self.slots);
            for _ in 0..MAX_ATTEMPTS {
                let value = host.get_shared_data(&key)?;
                let (Some(bytes), Some(cas)) = (value.bytes, value.cas) else {
                    // Slots are never deleted, so no later slot contains the
                    // customer either.
                    return Ok(false);
                };
                let Some(mut record) = Record::decode(&bytes) else {
                    continue 'probes;
                };
                if record.customer != customer {
                    continue 'probes;
                }
                let unchanged = record.remote.is_some_and(|current| {
                    current.others_admitted == remote.others_admitted
                        && current.cap == remote.cap
                        && current.cap_quota == remote.cap_quota
                        && remote.updated_ms.saturating_sub(current.updated_ms) < REMOTE_REFRESH_MS
                });
                if unchanged {
                    return Ok(true);
                }
                record.remote = Some(remote);
                match host.set_shared_data(&key, &record.encode(), Some(cas)) {
                    Ok(()) => return Ok(true),
                    Err(SetError::CasMismatch) => {}
                    Err(SetError::Host(error)) => return Err(error.into()),
                }
            }
            return Err(LimiterError::Contention(MAX_ATTEMPTS));
        }
        Ok(false)
    }

    /// Clears the record of `customer`, its counters and its pending usage,
    /// and returns it; `None` when this instance has no record of the
    /// customer.
    pub fn remove(&self, host: &impl Host, customer: &str) -> Result<Option<Record>, LimiterError> {
        let start = self.home_slot(customer);
        'probes: for probe in 0..PROBES.min(self.slots) {
            let key = slot_key((start + probe) % self.slots);
            for _ in 0..MAX_ATTEMPTS {
                let value = host.get_shared_data(&key)?;
                let (Some(bytes), Some(cas)) = (value.bytes, value.cas) else {
                    return Ok(None);
                };
                let Some(record) = Record::decode(&bytes) else {
                    continue 'probes;
                };
                if record.customer != customer {
                    continue 'probes;
                }
                match host.set_shared_data(&key, CLEARED_SLOT, Some(cas)) {
                    Ok(()) => return Ok(Some(record)),
                    Err(SetError::CasMismatch) => {}
                    Err(SetError::Host(error)) => return Err(error.into()),
                }
            }
            return Err(LimiterError::Contention(MAX_ATTEMPTS));
        }
        Ok(None)
    }

    /// Returns the number of slots.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    fn locate(
        &self,
        host: &impl Host,
        customer: &str,
        hint: Option<u32>,
        now_ms: u64,
    ) -> Result<Placement, HostError> {
        if let Some(slot) = hint.filter(|&slot| slot < self.slots) {
            let key = slot_key(slot);
            let value = host.get_shared_data(&key)?;
            let record = value.bytes.as_deref().and_then(Record::decode);
            if let (Some(record), Some(cas)) = (record, value.cas)
                && record.customer == customer
            {
                return Ok(own(slot, key, cas, record));
            }
        }

        let start = self.home_slot(customer);
        let mut best: Option<(Rank, Placement)> = None;
        for probe in 0..PROBES.min(self.slots) {
            let slot = (start + probe) % self.slots;
            let key = slot_key(slot);
            let value = host.get_shared_data(&key)?;
            let (Some(bytes), Some(cas)) = (value.bytes, value.cas) else {
                // Slots are never deleted, so the record cannot be in a
                // later slot: it would have taken this one. A cleared or
                // unreadable slot before this one is reused first.
                if let Some((Rank::Unreadable, placement)) = best {
                    return Ok(placement);
                }
                return Ok(Placement {
                    slot,
                    key,
                    cas: CREATE_ONLY_CAS,
                    own: None,
                    displaced: None,
                });
            };
            let record = Record::decode(&bytes);
            let rank = match &record {
                Some(record) if record.customer == customer => {
                    return Ok(own(slot, key, cas, record.clone()));
                }
                Some(record) if record.is_idle(now_ms) => Rank::Idle(record.last_seen_ms),
                Some(record) => Rank::Active(record.last_seen_ms),
                None => Rank::Unreadable,
            };
            if best.as_ref().is_none_or(|(best_rank, _)| rank < *best_rank) {
                let placement = Placement {
                    slot,
                    key,
                    cas,
                    own: None,
                    displaced: record,
                };
                best = Some((rank, placement));
            }
        }
        match best {
            Some((_, placement)) => Ok(placement),
            // Unreachable with at least one probe; take the home slot.
            None => Ok(Placement {
                slot: start,
                key: slot_key(start),
                cas: CREATE_ONLY_CAS,
                own: None,
                displaced: None,
            }),
        }
    }

    fn home_slot(&self, customer: &str) -> u32 {
        (fnv1a(customer.as_bytes()) % u64::from(self.slots)) as u32
    }
}

fn own(slot: u32, key: String, cas: u32, record: Record) -> Placement {
    Placement {
        slot,
        key,
        cas,
        own: Some(record),
        displaced: None,
    }
}

/// Returns the shared-data key of a slot. Built without `format!`: every
/// request reads and writes one.
pub fn slot_key(slot: u32) -> String {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(slot);
    let mut key = String::with_capacity(KEY_PREFIX.len() + digits.len());
    key.push_str(KEY_PREFIX);
    key.push_str(digits);
    key
}

/// FNV-1a, 64 bit: the same on every worker, unlike the standard hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Quota;
    use crate::host::MemoryHost;

    const NOW: u64 = 1_700_000_000_000;

    fn basic() -> Tier {
        Tier {
            name: "basic".to_owned(),
            quota: Some(Quota {
                requests: 3,
                window_ms: 60_000,
            }),
            burst: None,
            policy_header: String::new(),
            failure_policy: crate::config::tier::FailurePolicy::Local,
        }
    }

    fn admitted(limiter: &Limiter, host: &MemoryHost, customer: &str) -> bool {
        let admission = limiter.admit(host, customer, &basic(), host.now_ms(), None);
        admission.unwrap().decision.admitted
    }

    fn stored(host: &MemoryHost, slot: u32) -> Record {
        Record::decode(&host.peek_shared_data(&slot_key(slot)).unwrap()).unwrap()
    }

    /// Finds a customer id whose home slot is `slot`.
    fn customer_at(limiter: &Limiter, slot: u32, skip: usize) -> String {
        (0..)
            .map(|index| format!("customer-{index}"))
            .filter(|customer| limiter.home_slot(customer) == slot)
            .nth(skip)
            .unwrap()
    }

    #[test]
    fn workers_share_one_count() {
        let first = MemoryHost::new(NOW);
        let second = first.worker();
        let limiter = Limiter::new(64);
        let results: Vec<bool> = (0..8)
            .map(|index| {
                let host = if index % 2 == 0 { &first } else { &second };
                admitted(&limiter, host, "acme")
            })
            .collect();
        assert_eq!(results.iter().filter(|&&admitted| admitted).count(), 3);
        assert_eq!(results[..3], [true, true, true]);
    }

    #[test]
    fn compare_and_swap_conflict_is_retried() {
        let first = MemoryHost::new(NOW);
        let second = first.worker();
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &first, "acme"));
        let slot = limiter.home_slot("acme");

        // The second worker admits a request between the first worker's
        // read and its write.
        let interloper = limiter.clone();
        first.before_next_set(&slot_key(slot), move || {
            assert!(admitted(&interloper, &second, "acme"));
        });
        assert!(admitted(&limiter, &first, "acme"));

        let record = stored(&first, slot);
        assert_eq!(record.log.map(|log| log.offsets.len()), Some(3));
        assert_eq!(record.pending[0].admitted, 3);
        assert!(!admitted(&limiter, &first, "acme"));
    }

    #[test]
    fn concurrent_creation_keeps_both_requests() {
        let first = MemoryHost::new(NOW);
        let second = first.worker();
        let limiter = Limiter::new(64);
        let slot = limiter.home_slot("acme");

        let interloper = limiter.clone();
        first.before_next_set(&slot_key(slot), move || {
            assert!(admitted(&interloper, &second, "acme"));
        });
        assert!(admitted(&limiter, &first, "acme"));

        let record = stored(&first, slot);
        assert_eq!(record.pending[0].admitted, 2);
        assert_eq!(first.shared_data_keys(KEY_PREFIX).len(), 1);
    }

    #[test]
    fn endless_conflicts_end_in_contention_error() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &host, "acme"));
        let key = slot_key(limiter.home_slot("acme"));
        for _ in 0..MAX_ATTEMPTS {
            let writer = host.worker();
            let key_for_hook = key.clone();
            host.before_next_set(&key, move || {
                let bytes = writer.peek_shared_data(&key_for_hook).unwrap();
                writer.set_shared_data(&key_for_hook, &bytes, None).unwrap();
            });
        }
        let result = limiter.admit(&host, "acme", &basic(), NOW, None);
        assert_eq!(result, Err(LimiterError::Contention(MAX_ATTEMPTS)));
    }

    #[test]
    fn hinted_request_costs_two_shared_data_calls() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        let first = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        let before = host.shared_data_calls();
        limiter
            .admit(&host, "acme", &basic(), NOW, Some(first.slot))
            .unwrap();
        assert_eq!(host.shared_data_calls() - before, 2);
    }

    #[test]
    fn slot_message_only_when_pending_usage_starts() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        let first = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        assert_eq!(first.messages, [UsageMessage::Slot(first.slot)]);
        let second = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        assert!(second.messages.is_empty());

        // The sync role takes the pending usage; the next request starts
        // a new batch and announces the slot again.
        let mut record = stored(&host, first.slot);
        record.pending.clear();
        host.set_shared_data(&slot_key(first.slot), &record.encode(), None)
            .unwrap();
        let third = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        assert_eq!(third.messages, [UsageMessage::Slot(first.slot)]);
    }

    #[test]
    fn idle_customer_is_evicted_with_usage_forwarded() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(1);
        assert!(admitted(&limiter, &host, "old"));
        host.advance_ms(60_000);

        let admission = limiter
            .admit(&host, "new", &basic(), NOW + 60_000, None)
            .unwrap();
        assert!(admission.decision.admitted);
        assert_eq!(admission.evicted_active, Some(false));
        // The slot already had a message pending, so only the evicted
        // usage is sent.
        match admission.messages.as_slice() {
            [UsageMessage::Detached { customer, pending }] => {
                assert_eq!(customer, "old");
                assert_eq!(pending[0].admitted, 1);
            }
            other => panic!("unexpected messages {other:?}"),
        }
        assert_eq!(stored(&host, 0).customer, "new");
        assert_eq!(stored(&host, 0).pending[0].admitted, 1);
    }

    #[test]
    fn idle_record_is_evicted_before_active_one() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(PROBES);
        let home = 0;
        let customers: Vec<String> = (0..PROBES as usize + 1)
            .map(|skip| customer_at(&limiter, home, skip))
            .collect();

        // Fill every probed slot; the second customer then goes idle.
        for (index, customer) in customers[..PROBES as usize].iter().enumerate() {
            host.set_now_ms(if index == 1 { NOW } else { NOW + 59_000 });
            assert!(admitted(&limiter, &host, customer));
        }
        host.set_now_ms(NOW + 60_500);

        let newcomer = &customers[PROBES as usize];
        let admission = limiter
            .admit(&host, newcomer, &basic(), NOW + 60_500, None)
            .unwrap();
        assert_eq!(admission.slot, 1);
        assert_eq!(admission.evicted_active, Some(false));
    }

    #[test]
    fn least_recently_seen_is_evicted_when_none_idle() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(2);
        let home = limiter.home_slot("a");
        let other = customer_at(&limiter, home, 1);
        assert!(admitted(&limiter, &host, "a"));
        host.advance_ms(1_000);
        assert!(admitted(&limiter, &host, &other));
        host.advance_ms(1_000);

        let newcomer = customer_at(&limiter, home, 2);
        let admission = limiter
            .admit(&host, &newcomer, &basic(), host.now_ms(), None)
            .unwrap();
        assert_eq!(admission.slot, home);
        assert_eq!(admission.evicted_active, Some(true));
    }

    #[test]
    fn unreadable_slot_is_reused() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(1);
        host.set_shared_data(&slot_key(0), b"\xffgarbage", None)
            .unwrap();
        let admission = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        assert!(admission.decision.admitted);
        assert_eq!(admission.evicted_active, None);
        assert_eq!(stored(&host, 0).customer, "acme");
    }

    #[test]
    fn other_instances_usage_shrinks_the_local_quota() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &host, "acme"));
        let remote = RemoteState {
            others_admitted: 1,
            cap: None,
            updated_ms: NOW,
            cap_quota: None,
        };
        assert_eq!(limiter.set_remote(&host, "acme", remote), Ok(true));

        // Quota 3: one here, one elsewhere, so one more.
        assert!(admitted(&limiter, &host, "acme"));
        assert!(!admitted(&limiter, &host, "acme"));

        // A reply older than the window no longer counts.
        host.advance_ms(30_000);
        assert!(!admitted(&limiter, &host, "acme"));
        host.advance_ms(30_000);
        assert!(admitted(&limiter, &host, "acme"));
    }

    #[test]
    fn cap_limits_own_admissions_near_the_quota() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &host, "acme"));
        let remote = RemoteState {
            others_admitted: 0,
            cap: Some(2),
            updated_ms: NOW,
            cap_quota: None,
        };
        assert_eq!(limiter.set_remote(&host, "acme", remote), Ok(true));
        assert!(admitted(&limiter, &host, "acme"));
        let rejected = limiter.admit(&host, "acme", &basic(), NOW, None).unwrap();
        assert!(!rejected.decision.admitted);
        assert_eq!(
            rejected.decision.quota.map(|state| state.remaining),
            Some(0)
        );
    }

    #[test]
    fn share_before_sync_applies_until_reply() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64).with_share_before_sync(0.5);
        // Half of 3, rounded up.
        assert!(admitted(&limiter, &host, "acme"));
        assert!(admitted(&limiter, &host, "acme"));
        assert!(!admitted(&limiter, &host, "acme"));

        let remote = RemoteState {
            others_admitted: 0,
            cap: None,
            updated_ms: NOW,
            cap_quota: None,
        };
        assert_eq!(limiter.set_remote(&host, "acme", remote), Ok(true));
        assert!(admitted(&limiter, &host, "acme"));
        assert!(!admitted(&limiter, &host, "acme"));
    }

    #[test]
    fn unchanged_remote_state_is_not_written_again() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &host, "acme"));
        let remote = RemoteState {
            others_admitted: 1,
            cap: Some(2),
            updated_ms: NOW,
            cap_quota: None,
        };
        assert_eq!(limiter.set_remote(&host, "acme", remote), Ok(true));
        let slot = limiter.home_slot("acme");
        let written = host.peek_shared_data(&slot_key(slot));

        let again = RemoteState {
            updated_ms: NOW + 500,
            ..remote
        };
        assert_eq!(limiter.set_remote(&host, "acme", again), Ok(true));
        assert_eq!(host.peek_shared_data(&slot_key(slot)), written);

        let refreshed = RemoteState {
            updated_ms: NOW + 1_000,
            ..remote
        };
        assert_eq!(limiter.set_remote(&host, "acme", refreshed), Ok(true));
        assert_eq!(stored(&host, slot).remote, Some(refreshed));
    }

    #[test]
    fn remote_state_for_unknown_customer_is_skipped() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(64);
        assert!(admitted(&limiter, &host, "acme"));
        let remote = RemoteState {
            others_admitted: 1,
            cap: None,
            updated_ms: NOW,
            cap_quota: None,
        };
        assert_eq!(limiter.set_remote(&host, "other", remote), Ok(false));
    }

    #[test]
    fn removed_record_frees_its_slot() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(PROBES);
        let home = 0;
        let first = customer_at(&limiter, home, 0);
        let second = customer_at(&limiter, home, 1);
        assert!(admitted(&limiter, &host, &first));
        assert!(admitted(&limiter, &host, &second));
        assert!(admitted(&limiter, &host, &second));

        let removed = limiter.remove(&host, &first).unwrap().unwrap();
        assert_eq!(removed.customer, first);
        assert_eq!(limiter.remove(&host, &first), Ok(None));
        assert_eq!(host.shared_data_keys(KEY_PREFIX).len(), 2);

        // The customer behind the cleared slot is still found, and the
        // cleared slot goes to the next new customer without an eviction.
        assert!(admitted(&limiter, &host, &second));
        assert!(!admitted(&limiter, &host, &second));
        let newcomer = customer_at(&limiter, home, 2);
        let admission = limiter
            .admit(&host, &newcomer, &basic(), NOW, None)
            .unwrap();
        assert_eq!(admission.slot, home);
        assert_eq!(admission.evicted_active, None);
        // A removed customer starts afresh.
        for _ in 0..3 {
            assert!(admitted(&limiter, &host, &first));
        }
    }

    #[test]
    fn table_never_grows_past_its_slots() {
        let host = MemoryHost::new(NOW);
        let limiter = Limiter::new(16);
        for index in 0..500 {
            host.advance_ms(10);
            assert!(admitted(&limiter, &host, &format!("customer-{index}")));
        }
        assert_eq!(host.shared_data_keys(KEY_PREFIX).len(), 16);
    }
}
