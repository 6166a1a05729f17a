//! The state registry: where the live state of the resilience units (breakers, token
//! buckets, concurrency limits, retry budgets, key pools) is kept, keyed by stable ids,
//! so that building a topology again from a config (a reload) finds the units it already
//! has instead of starting them fresh.
//!
//! [`MemoryRegistry`] keeps them in this process (the default). A backend shared by
//! several replicas (Redis, issue 15) goes in a file of its own here, implementing
//! [`StateRegistry`]; the topology builder (`routing::topology`) only ever asks this
//! trait, and the admission steps (`resilience::admission`) are async so that a shared
//! backend can answer after its round trip while the memory one is ready at once.

pub mod batch;
mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryRegistry;
pub use redis::{BadUrl, RedisState, StateMode, Unavailable};

use crate::config::{StateBackend, StateConfig};

use crate::resilience::breaker::{BreakerSettings, CircuitBreaker};
use crate::resilience::concurrency::ConcurrencyLimit;
use crate::resilience::key_pool::KeyPool;
use crate::resilience::retry_budget::RetryBudget;
use crate::resilience::token_bucket::TokenBucket;

/// Which unit of a model or an echelon an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    /// The circuit breaker.
    Breaker,
    /// The `rpm_limit` token bucket.
    RpmLimit,
    /// The seed-004 `rate_limit_capacity` / `rate_limit_refill_rate` bucket.
    RateLimit,
    /// The `tpm_limit` token bucket.
    TpmLimit,
    /// The `concurrency_limit`.
    Concurrency,
    /// The retry budget.
    RetryBudget,
}

/// The stable id of one unit of state.
///
/// A model's units are keyed by its id **and** its identity (provider, upstream model
/// name, base URL): a model whose identity changed is another upstream and starts fresh.
/// A key pool is keyed by its name and the short ids of its keys, so a pool whose keys
/// stay keeps their cooldowns and disabled states.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StateId {
    /// A unit of a model.
    Model {
        /// The model id.
        id: String,
        /// `provider|upstream model|base URL`.
        identity: String,
        /// Which unit.
        unit: Unit,
    },
    /// A unit of a route of its own: an echelon (`group.echelonN`: its `rpm_limit`,
    /// `concurrency_limit`) or a task group (`group`: its group breaker).
    Route {
        /// The echelon's label or the group's name.
        label: String,
        /// Which unit.
        unit: Unit,
    },
    /// A key pool.
    KeyPool {
        /// `provider <id>` or `model <id>`.
        name: String,
        /// The short ids of its keys, in order.
        key_ids: Vec<String>,
    },
}

impl StateId {
    /// The id as a Redis key fragment (after `state.key_prefix` and the unit's kind):
    /// `model:<id>:<identity>:<unit>`, `route:<label>:<unit>`, `pool:<name>`.
    pub fn key(&self) -> String {
        match self {
            StateId::Model { id, identity, unit } => format!("model:{id}:{identity}:{unit:?}"),
            StateId::Route { label, unit } => format!("route:{label}:{unit:?}"),
            StateId::KeyPool { name, .. } => format!("pool:{name}"),
        }
    }
}

/// The registry `config` asks for: in memory, or sharing its units through Redis.
///
/// # Errors
/// [`BadUrl`] when `state.url` does not parse (a validated config never has one).
pub fn registry_for(config: &StateConfig) -> Result<Arc<dyn StateRegistry>, BadUrl> {
    Ok(match config.backend {
        StateBackend::Memory => Arc::new(MemoryRegistry::new()),
        StateBackend::Redis => Arc::new(MemoryRegistry::with_redis(RedisState::new(config)?)),
    })
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateId::Model { id, unit, .. } => write!(f, "model {id} {unit:?}"),
            StateId::Route { label, unit } => write!(f, "route {label} {unit:?}"),
            StateId::KeyPool { name, key_ids } => write!(f, "{name} keys [{}]", key_ids.join(",")),
        }
    }
}

/// Hands out the resilience units of a topology by stable id: the unit already held
/// under that id when its settings are the same, else a new one (which then replaces it).
///
/// Settings that changed start a unit fresh (a breaker with another threshold closed, a
/// concurrency limit with another limit empty), except a token bucket: one with another
/// capacity or refill under the same id starts at the fraction of its capacity the old
/// one held (a debt stays a debt), so a reload never refills a limit (issue 18).
pub trait StateRegistry: Send + Sync + fmt::Debug {
    /// The breaker under `id` with these settings (`name` is for its logs).
    fn breaker(&self, id: &StateId, name: &str, settings: &BreakerSettings) -> CircuitBreaker;
    /// The token bucket under `id` with this capacity (tokens) and refill (tokens/s);
    /// one held under `id` with other settings is replaced by a bucket rescaled to the
    /// same fraction of its capacity.
    fn bucket(&self, id: &StateId, capacity: f64, refill_per_sec: f64) -> Arc<TokenBucket>;
    /// The concurrency limit under `id` with this limit (requests in flight).
    fn concurrency(&self, id: &StateId, limit: u32) -> Arc<ConcurrencyLimit>;
    /// The retry budget under `id` (`ratio` of requests, over `window`, at least
    /// `min_per_sec` retries per second).
    fn retry_budget(
        &self,
        id: &StateId,
        ratio: f64,
        window: Duration,
        min_per_sec: f64,
    ) -> Arc<RetryBudget>;
    /// The key pool under `id` (its name and key ids), made by `make` when there is none.
    fn key_pool(&self, id: &StateId, make: &mut dyn FnMut() -> Arc<KeyPool>) -> Arc<KeyPool>;
    /// Forgets every unit whose id `keep` does not accept (the units of models and
    /// echelons a new topology no longer has; requests in flight keep theirs until they
    /// end).
    fn retain(&self, keep: &dyn Fn(&StateId) -> bool);
    /// How many units it holds.
    fn len(&self) -> usize;
    /// The shared backend its units' state lives in (`None`: in memory only).
    fn shared_state(&self) -> Option<&Arc<RedisState>> {
        None
    }
    /// Whether it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
