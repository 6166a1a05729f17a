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
}
