//! The concurrency limit: at most N requests in flight through a model or an echelon
//! (seed 001 `concurrency_limit`), with a bounded wait for a slot.

//!
//! With shared state (issue 15) the limit is fleet-wide: a slot is a **lease** in a
//! Redis sorted set (member: the lease's name, score: its expiry in Redis `TIME` ms),
//! renewed every third of `state.lease_ttl` while the request runs, so the slots of a
//! replica killed with `kill -9` expire within the TTL.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::state::batch::{Step, StepKind};
use crate::state::redis::{Arg, NOW_MS, RedisState, Unavailable};

/// `acquire` (1: leased, 0: full), `renew` and `release` of one lease.
///
/// The lease's Lua function `lease(key, args)`: the body of [`LEASE_SCRIPT`] and one
/// step of the combined admission script (`state::batch`).
pub(crate) const LEASE_LUA: &str = r#"
local function lease(k, A)
local op = A[1]; local ttl = tonumber(A[4])
if op == 'acquire' then
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  if redis.call('ZCARD', k) < tonumber(A[2]) then
    redis.call('ZADD', k, now + ttl, A[3])
    redis.call('PEXPIRE', k, ttl * 2)
    return 1
  end
  return 0
elseif op == 'renew' then
  if redis.call('ZSCORE', k, A[3]) then
    redis.call('ZADD', k, 'XX', now + ttl, A[3])
    redis.call('PEXPIRE', k, ttl * 2)
    return 1
  end
  return 0
end
redis.call('ZREM', k, A[3])
return 1
end
"#;

static LEASE_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW_MS}{LEASE_LUA}return lease(KEYS[1], ARGV)\n")));

/// How often a waiter asks Redis again for a fleet-wide slot.
pub(crate) const LEASE_POLL: Duration = Duration::from_millis(10);

/// A limit on requests in flight.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    limit: u32,
    slots: Arc<Semaphore>,
    /// The fleet-wide limit in Redis, when the state is shared; `slots` is then the
    /// fallback (the limit divided by `state.replicas`).
    shared: Option<SharedLimit>,
}

#[derive(Debug)]
struct SharedLimit {
    state: Arc<RedisState>,
    key: String,
    limit: u32,
}

impl SharedLimit {
    /// The lease `name`, granted: renewed every third of the TTL until dropped.
    fn granted(&self, name: String) -> Lease {
        Lease::held(self.state.clone(), self.key.clone(), name)
    }
}

impl Lease {
    /// The lease `name` already added to the sorted set `key` (by a script): renewed
    /// every third of `state.lease_ttl` until dropped, then removed. Also what counts a
    /// key's requests in flight fleet-wide (`resilience::key_pool`). Inside a tokio
    /// runtime only (the renewal is a task).
    pub fn held(state: Arc<RedisState>, key: String, name: String) -> Lease {
        let ttl = state.lease_ttl();
        let renew = tokio::spawn(renew(state.clone(), key.clone(), name.clone(), ttl));
        Lease {
            state,
            key,
            name,
            renew,
        }
    }
}

/// A slot held: in this process, or a lease in Redis. Freed when dropped.
#[derive(Debug)]
pub enum Slot {
    /// A slot of this process's semaphore.
    Local(OwnedSemaphorePermit),
    /// A fleet-wide lease.
    Shared(Lease),
}

/// A fleet-wide lease: renewed while held, released when dropped.
#[derive(Debug)]
pub struct Lease {
    state: Arc<RedisState>,
    key: String,
    name: String,
    renew: JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        self.state.spawn_run(
            &LEASE_SCRIPT,
            vec![self.key.clone()],
            vec![
                Arg::S("release".to_owned()),
                Arg::I(0),
                Arg::S(self.name.clone()),
                Arg::I(0),
            ],
        );
    }
}

/// No slot freed up within the wait.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("concurrency limit of {limit} reached; no slot within {} ms", waited.as_millis())]
pub struct LimitReached {
    /// The limit.
    pub limit: u32,
    /// How long it waited.
    pub waited: Duration,
}

impl ConcurrencyLimit {
    /// At most `limit` (≥ 1) in flight.
    pub fn new(limit: u32) -> Self {
        let limit = limit.max(1);
        ConcurrencyLimit {
            limit,
            slots: Arc::new(Semaphore::new(limit as usize)),
            shared: None,
        }
    }

    /// This limit (the in-process fallback) with a fleet-wide twin of `limit` leases
    /// under `key` in Redis.
    pub fn with_shared(mut self, state: Arc<RedisState>, key: String, limit: u32) -> Self {
        self.shared = Some(SharedLimit {
            state,
            key,
            limit: limit.max(1),
        });
        self
    }

    /// Takes a slot within `max_wait`: a fleet-wide lease when the limit is shared and
    /// Redis answers, else a slot of this process ([`acquire`](Self::acquire)).
    ///
    /// # Errors
    /// `Ok(Err(LimitReached))` when no slot frees up in time; `Err(Unavailable)` when
    /// Redis did not answer and `state.on_unavailable` is `reject`.
    pub async fn lease(
        &self,
        max_wait: Duration,
    ) -> Result<Result<Slot, LimitReached>, Unavailable> {
        let Some(sh) = &self.shared else {
            return Ok(self.acquire(max_wait).await.map(Slot::Local));
        };
        let deadline = tokio::time::Instant::now() + max_wait;
        let ttl = sh.state.lease_ttl();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let name = sh.state.lease_name();
        loop {
            let got: Result<i64, Unavailable> = sh
                .state
                .run(
                    &LEASE_SCRIPT,
                    &[&sh.key],
                    &[&"acquire", &i64::from(sh.limit), &name, &ttl_ms],
                )
                .await;
            match got {
                Ok(1) => return Ok(Ok(Slot::Shared(sh.granted(name)))),
                Ok(_) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Ok(Err(LimitReached {
                            limit: sh.limit,
                            waited: max_wait,
                        }));
                    }
                    tokio::time::sleep(LEASE_POLL.min(deadline - now)).await;
                }
                Err(Unavailable) => {
                    sh.state.fallback()?;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    return Ok(self.acquire(left).await.map(Slot::Local));
                }
            }
        }
    }

    /// The fleet-wide `acquire` of a lease named `name` (from
    /// [`RedisState::lease_name`]), as one step of a combined admission
    /// (`state::batch`; its answer is 1 when leased, 0 when full). `None` when the
    /// limit is not shared.
    pub fn shared_step(&self, name: &str) -> Option<Step> {
        let sh = self.shared.as_ref()?;
        let ttl_ms = i64::try_from(sh.state.lease_ttl().as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        Some(Step {
            kind: StepKind::Lease,
            key: sh.key.clone(),
            args: vec![
                Arg::S("acquire".to_owned()),
                Arg::I(i64::from(sh.limit)),
                Arg::S(name.to_owned()),
                Arg::I(ttl_ms),
            ],
        })
    }

    /// The slot of the lease `name` that a combined admission granted: renewed while
    /// held, released when dropped. `None` when the limit is not shared.
    pub fn shared_slot(&self, name: String) -> Option<Slot> {
        Some(Slot::Shared(self.shared.as_ref()?.granted(name)))
    }

    /// Why a combined admission found the fleet-wide limit full (`waited`: the wait
    /// the attempt allowed).
    pub fn reached(&self, waited: Duration) -> LimitReached {
        LimitReached {
            limit: self.shared.as_ref().map_or(self.limit, |sh| sh.limit),
            waited,
        }
    }

    /// The limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u32 {
        self.limit - self.slots.available_permits() as u32
    }

    /// Takes a slot, waiting up to `max_wait`; the slot frees when the permit drops.
    ///
    /// # Errors
    /// [`LimitReached`] when no slot frees up in time.
    pub async fn acquire(&self, max_wait: Duration) -> Result<OwnedSemaphorePermit, LimitReached> {
        let err = LimitReached {
            limit: self.limit,
            waited: max_wait,
        };
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        match tokio::time::timeout(max_wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(err),
        }
    }
}

/// Renews a lease every third of its TTL until aborted.
async fn renew(state: Arc<RedisState>, key: String, name: String, ttl: Duration) {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
    let every = (ttl / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let _: Result<i64, Unavailable> = state
            .run(&LEASE_SCRIPT, &[&key], &[&"renew", &0i64, &name, &ttl_ms])
            .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_a_bounded_time_for_a_slot() {
        let limit = ConcurrencyLimit::new(2);
        let a = limit.acquire(Duration::ZERO).await.unwrap();
        let _b = limit.acquire(Duration::ZERO).await.unwrap();
        assert_eq!(limit.in_flight(), 2);
        let e = limit.acquire(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.limit, 2);
        let waiter = tokio::spawn(async move {
            let got = limit.acquire(Duration::from_millis(100)).await.is_ok();
            (got, limit)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(a);
        let (got, limit) = waiter.await.unwrap();
        assert!(got, "a slot freed within the wait");
        assert_eq!(limit.in_flight(), 1);
    }
}
