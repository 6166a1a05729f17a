//! The in-process state registry: one map from stable id to unit, behind a mutex taken
//! only while a topology is built (never on the request path).
//!
//! With a shared backend ([`MemoryRegistry::with_redis`], `state.backend: redis`) the
//! units it makes also get their fleet-wide twin in Redis (breakers, token buckets,
//! concurrency limits, key pools; retry budgets stay per replica), and their own
//! in-process limits are the configured ones divided by `state.replicas`: what a
//! replica enforces alone while Redis is down (`on_unavailable: local`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::redis::RedisState;
use super::{StateId, StateRegistry};
use crate::resilience::breaker::{BreakerSettings, CircuitBreaker};
use crate::resilience::concurrency::ConcurrencyLimit;
use crate::resilience::key_pool::KeyPool;
use crate::resilience::retry_budget::RetryBudget;
use crate::resilience::token_bucket::TokenBucket;

/// One unit held by the registry.
#[derive(Debug, Clone)]
enum Held {
    Breaker(CircuitBreaker),
    Bucket(Arc<TokenBucket>),
    Concurrency(Arc<ConcurrencyLimit>),
    RetryBudget(Arc<RetryBudget>),
    KeyPool(Arc<KeyPool>),
}

/// The state of one process's units (the default state backend, `memory`).
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    units: Mutex<HashMap<StateId, Held>>,
    /// The shared backend the units' twins live in, if any.
    shared: Option<Arc<RedisState>>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        MemoryRegistry::default()
    }

    /// An empty registry whose units share their state through `state` (Redis).
    pub fn with_redis(state: Arc<RedisState>) -> Self {
        MemoryRegistry {
            units: Mutex::default(),
            shared: Some(state),
        }
    }

    /// The divisor of the in-process limits (`state.replicas` when shared, else 1).
    fn replicas(&self) -> f64 {
        self.shared
            .as_ref()
            .map_or(1.0, |s| f64::from(s.replicas()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<StateId, Held>> {
        // The map is only ever changed by whole inserts and removals.
        self.units.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The unit under `id` if `pick` accepts it, else a new one from `make`, kept.
    fn get_or<T>(
        &self,
        id: &StateId,
        pick: impl Fn(&Held) -> Option<T>,
        make: impl FnOnce() -> (T, Held),
    ) -> T {
        let mut units = self.lock();
        if let Some(found) = units.get(id).and_then(&pick) {
            return found;
        }
        let (unit, held) = make();
        units.insert(id.clone(), held);
        unit
    }
}

impl StateRegistry for MemoryRegistry {
    fn breaker(&self, id: &StateId, name: &str, settings: &BreakerSettings) -> CircuitBreaker {
        self.get_or(
            id,
            |h| match h {
                Held::Breaker(b) if b.settings() == settings => Some(b.clone()),
                _ => None,
            },
            || {
                let b = match &self.shared {
                    None => CircuitBreaker::new(name, settings.clone()),
                    Some(state) => CircuitBreaker::with_shared(
                        name,
                        settings.clone(),
                        state.clone(),
                        state.key(&format!("breaker:{}", id.key())),
                    ),
                };
                (b.clone(), Held::Breaker(b))
            },
        )
    }

    fn bucket(&self, id: &StateId, capacity: f64, refill_per_sec: f64) -> Arc<TokenBucket> {
        let fresh = match &self.shared {
            None => TokenBucket::new(capacity, refill_per_sec),
            Some(state) => {
                let n = self.replicas();
                // A limit divided among replicas still grants one request each.
                let local = if capacity >= 1.0 {
                    (capacity / n).max(1.0)
                } else {
                    capacity
                };
                TokenBucket::new(local, refill_per_sec / n).with_shared(
                    state.clone(),
                    state.key(&format!("bucket:{}:{capacity}:{refill_per_sec}", id.key())),
                    capacity,
                    refill_per_sec,
                )
            }
        };
        let (cap, rate) = (fresh.capacity(), fresh.refill_per_sec());
        let mut units = self.lock();
        let old = match units.get(id) {
            Some(Held::Bucket(b)) if b.capacity() == cap && b.refill_per_sec() == rate => {
                return b.clone();
            }
            Some(Held::Bucket(b)) => Some(b.clone()),
            _ => None,
        };
        // Another limit under the same id (a reload changed it): the new bucket holds the
        // same fraction of its capacity as the old one did (a debt stays a debt), not a
        // full bucket, so a reload cannot be used to reset a limit.
        if let Some(old) = old {
            rescale(&fresh, &old);
        }
        let b = Arc::new(fresh);
        units.insert(id.clone(), Held::Bucket(b.clone()));
        b
    }

    fn concurrency(&self, id: &StateId, limit: u32) -> Arc<ConcurrencyLimit> {
        let fresh = match &self.shared {
            None => ConcurrencyLimit::new(limit),
            Some(state) => ConcurrencyLimit::new(limit.div_ceil(state.replicas().max(1)))
                .with_shared(
                    state.clone(),
                    state.key(&format!("slots:{}:{limit}", id.key())),
                    limit,
                ),
        };
        let limit = fresh.limit();
        self.get_or(
            id,
            |h| match h {
                Held::Concurrency(c) if c.limit() == limit => Some(c.clone()),
                _ => None,
            },
            || {
                let c = Arc::new(fresh);
                (c.clone(), Held::Concurrency(c))
            },
        )
    }

    fn retry_budget(
        &self,
        id: &StateId,
        ratio: f64,
        window: Duration,
        min_per_sec: f64,
    ) -> Arc<RetryBudget> {
        let fresh = RetryBudget::new(ratio, window, min_per_sec);
        let same = (fresh.ratio(), fresh.window(), fresh.min_per_sec());
        self.get_or(
            id,
            |h| match h {
                Held::RetryBudget(r) if (r.ratio(), r.window(), r.min_per_sec()) == same => {
                    Some(r.clone())
                }
                _ => None,
            },
            || {
                let r = Arc::new(fresh);
                (r.clone(), Held::RetryBudget(r))
            },
        )
    }

    fn key_pool(&self, id: &StateId, make: &mut dyn FnMut() -> Arc<KeyPool>) -> Arc<KeyPool> {
        let mut units = self.lock();
        if let Some(Held::KeyPool(p)) = units.get(id) {
            return p.clone();
        }
        let p = make();
        if let StateId::KeyPool { name, .. } = id {
            // The same pool with another key list (a reload added or removed keys): the
            // keys that stay keep their cooldown or disabled state.
            let before = units.iter().find_map(|(other, held)| match (other, held) {
                (StateId::KeyPool { name: n, .. }, Held::KeyPool(old)) if n == name => {
                    Some(old.clone())
                }
                _ => None,
            });
            if let Some(old) = before {
                p.adopt_states(&old);
            }
            if let Some(state) = &self.shared {
                p.share_through(state.clone(), state.key(&format!("keys:{name}")));
            }
        }
        units.insert(id.clone(), Held::KeyPool(p.clone()));
        p
    }

    fn retain(&self, keep: &dyn Fn(&StateId) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn shared_state(&self) -> Option<&Arc<RedisState>> {
        self.shared.as_ref()
    }
}

/// Brings `fresh` (full) down to the fraction of its capacity that `old` holds now.
/// Nothing changes when either capacity is not a positive finite number.
fn rescale(fresh: &TokenBucket, old: &TokenBucket) {
    let (new_cap, old_cap) = (fresh.capacity(), old.capacity());
    if !(new_cap.is_finite() && old_cap.is_finite() && new_cap > 0.0 && old_cap > 0.0) {
        return;
    }
    let fraction = old.available() / old_cap;
    fresh.charge(new_cap - fraction * new_cap);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resilience::breaker::BreakerSettings;
    use crate::state::Unit;

    fn id(unit: Unit) -> StateId {
        StateId::Model {
            id: "m".into(),
            identity: "p|up|http://x".into(),
            unit,
        }
    }

    #[test]
    fn the_same_id_and_settings_give_the_same_unit() {
        let r = MemoryRegistry::new();
        let a = r.bucket(&id(Unit::RpmLimit), 10.0, 1.0);
        assert!(a.try_acquire(4.0));
        let b = r.bucket(&id(Unit::RpmLimit), 10.0, 1.0);
        assert!(Arc::ptr_eq(&a, &b), "the level carries over");
        let c = r.bucket(&id(Unit::RpmLimit), 20.0, 1.0);
        assert!(!Arc::ptr_eq(&a, &c), "another limit is another bucket");
        // 6 of 10 left (plus a few µs of refill): 12 of 20, not a full bucket.
        assert!((c.available() - 12.0).abs() < 0.01, "{}", c.available());
        let s = BreakerSettings::default();
        let b1 = r.breaker(&id(Unit::Breaker), "m", &s);
        let p = b1.try_acquire().unwrap();
        b1.record(p, false);
        let b2 = r.breaker(&id(Unit::Breaker), "m", &s);
        assert_eq!(b2.snapshot().consecutive_failures, 1, "same breaker state");
        let other = StateId::Model {
            id: "m".into(),
            identity: "p|up|http://elsewhere".into(),
            unit: Unit::Breaker,
        };
        assert_eq!(
            r.breaker(&other, "m", &s).snapshot().consecutive_failures,
            0
        );
    }

    #[test]
    fn a_changed_limit_rescales_the_level_and_keeps_a_debt() {
        let r = MemoryRegistry::new();
        let a = r.bucket(&id(Unit::TpmLimit), 100.0, 0.0);
        a.charge(150.0);
        assert!((a.available() + 50.0).abs() < 1e-9);
        let b = r.bucket(&id(Unit::TpmLimit), 200.0, 0.0);
        assert!((b.available() + 100.0).abs() < 1e-9, "{}", b.available());
        // Unlimited on either side: nothing to scale, the new bucket starts full.
        let c = r.bucket(&id(Unit::TpmLimit), f64::INFINITY, 0.0);
        assert!(c.available().is_infinite());
    }

    #[test]
    fn retain_forgets_what_a_topology_no_longer_has() {
        let r = MemoryRegistry::new();
        r.concurrency(&id(Unit::Concurrency), 2);
        r.retry_budget(&id(Unit::RetryBudget), 0.2, Duration::from_secs(10), 1.0);
        let e = StateId::Route {
            label: "g.echelon1".into(),
            unit: Unit::RpmLimit,
        };
        r.bucket(&e, 5.0, 0.1);
        assert_eq!(r.len(), 3);
        r.retain(&|i| matches!(i, StateId::Route { .. }));
        assert_eq!(r.len(), 1);
    }
}
