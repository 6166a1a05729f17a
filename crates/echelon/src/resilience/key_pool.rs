//! The key pool: the API keys of one provider (or of one model that names its own),
//! shared by every model that uses them (seed 004 `APIKeyPool`).
//!
//! Selection is least-loaded (fewest requests in flight across all the models sharing
//! the pool), ties broken round-robin. A 429 cools a key down for its Retry-After (or
//! the configured cooldown), capped; a 401/403 disables it with the reason.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::key::ApiKey;

/// Longest cooldown a 429 can put a key into, whatever its Retry-After says.
pub const MAX_KEY_COOLDOWN: Duration = Duration::from_secs(300);

/// What a key can be used for right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Usable.
    Ok,
    /// Rate-limited by the provider until this instant.
    CoolingDown {
        /// When it becomes usable again.
        until: Instant,
    },
    /// Refused by the provider (401/403); not used again until restart.
    Disabled {
        /// The provider's message.
        reason: String,
    },
}

#[derive(Debug)]
struct Slot {
    key: ApiKey,
    in_flight: AtomicU32,
    state: Mutex<KeyState>,
}

/// The keys of one provider or model.
#[derive(Debug)]
pub struct KeyPool {
    name: String,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

/// Why no key could be leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// Every usable key is cooling down; the first is usable again at `until`.
    CoolingDown {
        /// Earliest end of a cooldown.
        until: Instant,
    },
    /// Every key is disabled or excluded.
    Exhausted,
}

/// A key in use: counts as in flight until dropped.
#[derive(Debug)]
pub struct KeyLease {
    pool: Arc<KeyPool>,
    index: usize,
}

impl KeyLease {
    /// The key.
    pub fn key(&self) -> &ApiKey {
        &self.pool.slots[self.index].key
    }

    /// Its position in the pool (stable), for exclusion within one request.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Puts the key into cooldown after a 429: for `retry_after` when given, else
    /// `default`; capped at [`MAX_KEY_COOLDOWN`].
    pub fn cool_down(&self, retry_after: Option<Duration>, default: Duration) {
        let wait = retry_after.unwrap_or(default).min(MAX_KEY_COOLDOWN);
        let until = Instant::now() + wait;
        let slot = &self.pool.slots[self.index];
        let mut state = lock(&slot.state);
        if !matches!(*state, KeyState::Disabled { .. }) {
            tracing::warn!(pool = %self.pool.name, key_id = slot.key.id(), cooldown_ms = wait.as_millis() as u64, "key rate-limited: cooling down");
            *state = KeyState::CoolingDown { until };
        }
    }

    /// Disables the key after a 401/403, keeping the provider's message as the reason.
    pub fn disable(&self, reason: &str) {
        let slot = &self.pool.slots[self.index];
        tracing::error!(pool = %self.pool.name, key_id = slot.key.id(), "key refused by the provider: disabled: {reason}");
        *lock(&slot.state) = KeyState::Disabled {
            reason: reason.to_owned(),
        };
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        self.pool.slots[self.index]
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A key's state as shown by `/admin/state` (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// Short id of the key.
    pub id: String,
    /// Its state now.
    pub state: KeyState,
    /// Requests in flight with it, across every model sharing the pool.
    pub in_flight: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave a key state half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl KeyPool {
    /// A pool named `name` (the provider or model id, for logs) over `keys`.
    pub fn new(name: impl Into<String>, keys: Vec<ApiKey>) -> Arc<KeyPool> {
        Arc::new(KeyPool {
            name: name.into(),
            slots: keys
                .into_iter()
                .map(|key| Slot {
                    key,
                    in_flight: AtomicU32::new(0),
                    state: Mutex::new(KeyState::Ok),
                })
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the pool has no keys (the provider needs none).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Leases the least-loaded usable key not in `exclude`, ties broken round-robin.
    ///
    /// # Errors
    /// [`NoKey::CoolingDown`] when every candidate is cooling down (with the earliest
    /// end), [`NoKey::Exhausted`] when every key is disabled or excluded.
    pub fn acquire(self: &Arc<Self>, exclude: &[usize]) -> Result<KeyLease, NoKey> {
        let now = Instant::now();
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u32)> = None;
        let mut earliest: Option<Instant> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if exclude.contains(&i) {
                continue;
            }
            let slot = &self.slots[i];
            {
                let mut state = lock(&slot.state);
                match &*state {
                    KeyState::Disabled { .. } => continue,
                    KeyState::CoolingDown { until } if *until > now => {
                        earliest = Some(earliest.map_or(*until, |e| e.min(*until)));
                        continue;
                    }
                    KeyState::CoolingDown { .. } => *state = KeyState::Ok,
                    KeyState::Ok => {}
                }
            }
            let load = slot.in_flight.load(Ordering::Relaxed);
            if best.is_none_or(|(_, l)| load < l) {
                best = Some((i, load));
            }
        }
        match (best, earliest) {
            (Some((i, _)), _) => {
                self.slots[i].in_flight.fetch_add(1, Ordering::Relaxed);
                Ok(KeyLease {
                    pool: self.clone(),
                    index: i,
                })
            }
            (None, Some(until)) => Err(NoKey::CoolingDown { until }),
            (None, None) => Err(NoKey::Exhausted),
        }
    }

    /// Every key's id, state and in-flight count.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = Instant::now();
        self.slots
            .iter()
            .map(|s| {
                let state = match &*lock(&s.state) {
                    KeyState::CoolingDown { until } if *until <= now => KeyState::Ok,
                    other => other.clone(),
                };
                KeySnapshot {
                    id: s.key.id().to_owned(),
                    state,
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn pool(n: usize) -> Arc<KeyPool> {
        KeyPool::new(
            "p",
            (0..n)
                .map(|i| ApiKey::new(SecretString::from(format!("k{i}"))))
                .collect(),
        )
    }

    #[test]
    fn picks_the_least_loaded_key_and_round_robins_ties() {
        let p = pool(3);
        let a = p.acquire(&[]).unwrap();
        let b = p.acquire(&[]).unwrap();
        let c = p.acquire(&[]).unwrap();
        let mut used = vec![a.index(), b.index(), c.index()];
        used.sort_unstable();
        assert_eq!(used, vec![0, 1, 2], "each key once while loads are equal");
        drop(b);
        let d = p.acquire(&[]).unwrap();
        assert_eq!(d.index(), 1, "the only key with nothing in flight");
        let snap = p.snapshot();
        assert_eq!(snap.iter().map(|s| s.in_flight).sum::<u32>(), 3);
    }

    #[test]
    fn in_flight_is_shared_between_holders_of_the_pool() {
        let p = pool(2);
        let other_model = p.clone();
        let held = other_model.acquire(&[]).unwrap();
        for _ in 0..4 {
            assert_ne!(p.acquire(&[]).unwrap().index(), held.index());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cooling_and_disabled_keys_are_skipped() {
        let p = pool(2);
        let a = p.acquire(&[]).unwrap();
        let ai = a.index();
        a.cool_down(Some(Duration::from_secs(2)), Duration::from_secs(30));
        drop(a);
        for _ in 0..3 {
            assert_ne!(p.acquire(&[]).unwrap().index(), ai);
        }
        let b = p.acquire(&[]).unwrap();
        b.disable("Invalid API Key");
        let bi = b.index();
        drop(b);
        match p.acquire(&[]) {
            Err(NoKey::CoolingDown { until }) => {
                assert_eq!(until - Instant::now(), Duration::from_secs(2));
            }
            other => panic!("expected cooling down, got {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.acquire(&[]).unwrap().index(), ai, "cooldown over");
        assert_eq!(p.acquire(&[ai]).unwrap_err(), NoKey::Exhausted);
        let snap = p.snapshot();
        assert_eq!(
            snap[bi].state,
            KeyState::Disabled {
                reason: "Invalid API Key".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cooldowns_are_capped() {
        let p = pool(1);
        let a = p.acquire(&[]).unwrap();
        a.cool_down(Some(Duration::from_secs(86_400)), Duration::from_secs(30));
        drop(a);
        match p.acquire(&[]) {
            Err(NoKey::CoolingDown { until }) => {
                assert_eq!(until - Instant::now(), MAX_KEY_COOLDOWN)
            }
            other => panic!("{other:?}"),
        }
    }

    /// Lease durations of 1 to 10 ticks, uneven and independent of the key: a fixed
    /// pseudo-random sequence (xorshift64*), the same on every run.
    ///
    /// Not a short repeating pattern: with K a multiple of 3 every key holds the same
    /// number of leases, so a key whose lease ends is the only least-loaded one and
    /// takes the next request; a short cycle of durations then lines up with the keys
    /// (an 11-step cycle gave one key 9 % fewer leases than another).
    struct Durations(u64);

    impl Durations {
        fn new() -> Self {
            Durations(0x9E37_79B9_7F4A_7C15)
        }

        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            1 + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % 10
        }
    }

    /// Leases taken in each load-balancing simulation.
    const ACQUISITIONS: u64 = 30_000;

    /// In-flight count of each key, as the pool reports it.
    fn loads(p: &KeyPool) -> Vec<u32> {
        p.snapshot().iter().map(|s| s.in_flight).collect()
    }

    fn spread(loads: &[u32]) -> u32 {
        loads.iter().max().unwrap() - loads.iter().min().unwrap()
    }

    /// Acquires a key, checking that it was a least-loaded one, and that the pool's
    /// in-flight counts match the leases the simulation holds (`held` per key).
    fn acquire_least_loaded(p: &Arc<KeyPool>, held: &mut [u32]) -> KeyLease {
        let before = loads(p);
        assert_eq!(
            before, held,
            "the pool's in-flight counts are the leases held"
        );
        let lease = p.acquire(&[]).unwrap();
        let min = *before.iter().min().unwrap();
        assert_eq!(
            before[lease.index()],
            min,
            "picked key {} with loads {before:?}",
            lease.index()
        );
        held[lease.index()] += 1;
        lease
    }

    fn assert_totals_even(totals: &[u64], tolerance: f64) {
        let mean = totals.iter().sum::<u64>() as f64 / totals.len() as f64;
        for &t in totals {
            assert!(
                (t as f64 - mean).abs() <= tolerance * mean,
                "leases per key {totals:?} differ by more than {}% from the mean",
                tolerance * 100.0
            );
        }
    }

    /// K clients, each taking a key, holding it for an uneven time and coming straight
    /// back for another (leases end one at a time, in order of their end tick): the
    /// loads never differ by more than 1, at every acquire, and the keys serve the same
    /// number of leases within 3 %.
    #[test]
    fn with_3_keys_and_uneven_completion_times_load_stays_balanced() {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;

        for k in [2usize, 3, 5, 7, 12] {
            let p = pool(3);
            let mut held = vec![0u32; 3];
            let mut totals = vec![0u64; 3];
            // (end tick, sequence number) → lease, earliest first.
            let mut ends = BinaryHeap::new();
            let mut leases = std::collections::HashMap::new();
            let mut durations = Durations::new();
            let mut now = 0u64;
            for seq in 0..ACQUISITIONS {
                if ends.len() == k {
                    // Wait for the next lease to end and give its key back.
                    let Reverse((end, done)) = ends.pop().unwrap();
                    now = end;
                    let lease: KeyLease = leases.remove(&done).unwrap();
                    held[lease.index()] -= 1;
                    drop(lease);
                }
                let lease = acquire_least_loaded(&p, &mut held);
                let after = loads(&p);
                assert!(
                    spread(&after) <= 1,
                    "k = {k}, tick {now}: loads {after:?} after acquire {seq}"
                );
                totals[lease.index()] += 1;
                ends.push(Reverse((now + durations.next(), seq)));
                leases.insert(seq, lease);
            }
            assert_totals_even(&totals, 0.03);
            drop(leases);
            assert_eq!(
                loads(&p),
                vec![0, 0, 0],
                "every lease dropped gives its key back"
            );
        }
    }

    /// The same with leases ending in batches: each tick every lease whose end has
    /// passed is given back, then new requests take keys until K are held. The batch
    /// can leave the loads uneven for a moment (the pool cannot choose which leases
    /// end), but every acquire takes a least-loaded key, so once the K leases are held
    /// again the loads differ by at most 1.
    #[test]
    fn batched_releases_are_rebalanced_by_the_next_acquires() {
        for k in [3usize, 4, 8, 13] {
            let p = pool(3);
            let mut held = vec![0u32; 3];
            let mut totals = vec![0u64; 3];
            let mut leases: Vec<(u64, KeyLease)> = Vec::new();
            let mut acquired = 0usize;
            let mut durations = Durations::new();
            let mut tick = 0u64;
            while acquired < ACQUISITIONS as usize {
                let (ended, kept): (Vec<_>, Vec<_>) =
                    leases.into_iter().partition(|(end, _)| *end <= tick);
                leases = kept;
                for (_, lease) in ended {
                    held[lease.index()] -= 1;
                }
                while leases.len() < k {
                    let lease = acquire_least_loaded(&p, &mut held);
                    totals[lease.index()] += 1;
                    leases.push((tick + durations.next(), lease));
                    acquired += 1;
                }
                let after = loads(&p);
                assert!(spread(&after) <= 1, "k = {k}, tick {tick}: loads {after:?}");
                tick += 1;
            }
            assert_totals_even(&totals, 0.03);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_on_one_key_leaves_the_other_two_serving() {
        let p = pool(3);
        let lease = p.acquire(&[]).unwrap();
        let cooled = lease.index();
        lease.cool_down(Some(Duration::from_secs(60)), Duration::from_secs(30));
        drop(lease);
        let snap = p.snapshot();
        for (i, key) in snap.iter().enumerate() {
            if i == cooled {
                assert_eq!(
                    key.state,
                    KeyState::CoolingDown {
                        until: Instant::now() + Duration::from_secs(60)
                    }
                );
            } else {
                assert_eq!(key.state, KeyState::Ok, "key {i} untouched by the 429");
            }
        }
        // 20 requests held at once: all on the other two keys, 10 each.
        let held: Vec<_> = (0..20).map(|_| p.acquire(&[]).unwrap()).collect();
        let mut per_key = [0; 3];
        for lease in &held {
            per_key[lease.index()] += 1;
        }
        assert_eq!(per_key[cooled], 0);
        assert!(
            per_key
                .iter()
                .enumerate()
                .all(|(i, &n)| i == cooled || n == 10)
        );
        drop(held);
        // Excluding one of the two healthy keys leaves the other, not the cooled one.
        let other = (cooled + 1) % 3;
        assert_eq!(p.acquire(&[other]).unwrap().index(), (cooled + 2) % 3);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(
            p.acquire(&[other, (cooled + 2) % 3]).unwrap().index(),
            cooled,
            "back in service once the cooldown is over"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_401_disables_only_that_key() {
        let p = pool(3);
        let lease = p.acquire(&[]).unwrap();
        let disabled = lease.index();
        lease.disable("invalid x-api-key");
        // A later 429 on the same key does not bring it back as merely cooling.
        lease.cool_down(Some(Duration::from_secs(1)), Duration::from_secs(1));
        drop(lease);
        tokio::time::advance(Duration::from_secs(3_600)).await;
        let snap = p.snapshot();
        for (i, key) in snap.iter().enumerate() {
            let expected = if i == disabled {
                KeyState::Disabled {
                    reason: "invalid x-api-key".into(),
                }
            } else {
                KeyState::Ok
            };
            assert_eq!(key.state, expected, "key {i}");
        }
        let held: Vec<_> = (0..30).map(|_| p.acquire(&[]).unwrap()).collect();
        assert!(held.iter().all(|lease| lease.index() != disabled));
        assert_eq!(
            loads(&p).iter().filter(|&&n| n == 15).count(),
            2,
            "the two other keys share the load"
        );
        drop(held);
        let others: Vec<usize> = (0..3).filter(|&i| i != disabled).collect();
        assert_eq!(p.acquire(&others).unwrap_err(), NoKey::Exhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn all_keys_cooling_down_is_no_key_until_the_first_cooldown_ends() {
        let p = pool(3);
        let leases: Vec<_> = (0..3).map(|_| p.acquire(&[]).unwrap()).collect();
        let secs = [5, 2, 9];
        for (lease, s) in leases.iter().zip(secs) {
            lease.cool_down(Some(Duration::from_secs(s)), Duration::from_secs(30));
        }
        let first = leases[1].index();
        drop(leases);
        let start = Instant::now();
        assert_eq!(
            p.acquire(&[]).unwrap_err(),
            NoKey::CoolingDown {
                until: start + Duration::from_secs(2)
            }
        );
        tokio::time::advance(Duration::from_millis(1_999)).await;
        assert!(matches!(p.acquire(&[]), Err(NoKey::CoolingDown { .. })));
        tokio::time::advance(Duration::from_millis(1)).await;
        // Only the key whose cooldown ended serves; the others are still cooling.
        for _ in 0..3 {
            assert_eq!(p.acquire(&[]).unwrap().index(), first);
        }
        assert_eq!(
            p.acquire(&[first]).unwrap_err(),
            NoKey::CoolingDown {
                until: start + Duration::from_secs(5)
            }
        );
    }
}
