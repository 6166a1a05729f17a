//! The key pool: the API keys of one provider (or of one model that names its own),
//! shared by every model that uses them (seed 004 `APIKeyPool`).
//!
//! Selection is least-loaded (fewest requests in flight across all the models sharing
//! the pool), ties broken round-robin. A 429 cools a key down for its Retry-After (or
//! the configured cooldown), capped. A 401/403 disables it with the reason, and it is
//! re-probed with backoff (issue 14 item 8: one transient refusal must not take a key
//! out until restart): [`REPROBE_INITIAL`] after the refusal the key may serve ONE live
//! request again (the probe); a success re-enables it fully, another 401/403 doubles the
//! wait (up to [`REPROBE_MAX`]). Time is tokio's ([`tokio::time::Instant`]), so tests
//! can pause and advance it.
//!
//! With shared state (issue 15) the cooldowns and disabled keys of a pool are also kept
//! in one Redis hash (`c:<key id>` → end of the cooldown, `d:<key id>` → `re-probe
//! time|failures|reason`, times in Redis `TIME` ms): a replica writes there what its
//! calls learn, and [`KeyPool::sync_shared`], one round trip before each lease, brings
//! what the other replicas learnt into this pool, so a key cooled by a 429 on one
//! replica is not used by another before its Retry-After.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use super::concurrency::Lease;
use crate::key::{ApiKey, Redactor};
use crate::state::batch::{Step, StepKind};
use crate::state::redis::{Arg, NOW_MS, RedisState, Unavailable};

/// `read` answers `{now, [field, value, …]}`; `pick` (args: lease TTL ms, lease name,
/// candidate key ids in preference order) also leases the candidate with the fewest
/// requests in flight fleet-wide that is neither cooling nor disabled there (a sorted
/// set of leases per key, `<hash>:f:<key id>`, expiring like concurrency leases) and
/// answers `{now, fields, its id or ''}`; `cool`, `disable` and `enable` write one
/// key's state (a cooldown only ever lengthens).
///
/// The pool's Lua function `pool(key, args)`: the body of [`POOL_SCRIPT`] and one step
/// of the combined admission script (`state::batch`).
pub(crate) const POOL_LUA: &str = r#"
local function pool(k, A)
local op = A[1]
if op == 'read' then
  return {now, redis.call('HGETALL', k)}
end
if op == 'pick' then
  local ttl = tonumber(A[2]); local best = ''; local least
  for i = 4, #A do
    local id = A[i]
    local c = tonumber(redis.call('HGET', k, 'c:' .. id) or '0') or 0
    local d = redis.call('HGET', k, 'd:' .. id)
    local due = true
    if d then due = (tonumber(string.match(d, '^[^|]*')) or 0) <= now end
    if c <= now and due then
      local f = k .. ':f:' .. id
      redis.call('ZREMRANGEBYSCORE', f, '-inf', now)
      local n = redis.call('ZCARD', f)
      if least == nil or n < least then best = id; least = n end
    end
  end
  if best ~= '' then
    local f = k .. ':f:' .. best
    redis.call('ZADD', f, now + ttl, A[3])
    redis.call('PEXPIRE', f, ttl * 2)
  end
  return {now, redis.call('HGETALL', k), best}
end
if op == 'cool' then
  local field = 'c:' .. A[2]; local till = now + tonumber(A[3])
  local old = tonumber(redis.call('HGET', k, field) or '0') or 0
  if till > old then redis.call('HSET', k, field, tostring(till)) end
elseif op == 'disable' then
  redis.call('HSET', k, 'd:' .. A[2],
    tostring(now + tonumber(A[3])) .. '|' .. A[4] .. '|' .. A[5])
else
  redis.call('HDEL', k, 'd:' .. A[2])
end
redis.call('PEXPIRE', k, 7200000)
return {now, {}}
end
"#;

static POOL_SCRIPT: LazyLock<Script> =
    LazyLock::new(|| Script::new(&format!("{NOW_MS}{POOL_LUA}return pool(KEYS[1], ARGV)\n")));

/// Longest cooldown a 429 can put a key into, whatever its Retry-After says.
pub const MAX_KEY_COOLDOWN: Duration = Duration::from_secs(300);

/// Wait after a key's first 401/403 before it is re-probed (1 min). Each further
/// refusal of a re-probe doubles the wait, up to [`REPROBE_MAX`].
pub const REPROBE_INITIAL: Duration = Duration::from_secs(60);

/// Longest wait between two re-probes of a disabled key (1 h).
pub const REPROBE_MAX: Duration = Duration::from_secs(3600);

/// The wait before the re-probe of a key refused `failures` times in a row (≥ 1):
/// [`REPROBE_INITIAL`] × 2^(failures − 1), at most [`REPROBE_MAX`].
pub fn reprobe_delay(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    REPROBE_INITIAL.saturating_mul(factor).min(REPROBE_MAX)
}

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
    /// Refused by the provider (401/403): not used until its re-probe.
    Disabled {
        /// The provider's message (scrubbed of keys).
        reason: String,
        /// 401/403 answers in a row: the first refusal, then each failed re-probe.
        consecutive_failures: u32,
        /// From when one live request may use it again as a probe (tokio time).
        reprobe_at: Instant,
        /// Whether that probe request is in flight now.
        probe_in_flight: bool,
    },
}

/// A slot's state behind its lock; [`KeyState`] is what the outside sees of it.
#[derive(Debug)]
enum Health {
    Ok,
    CoolingDown {
        until: Instant,
    },
    Disabled {
        reason: String,
        failures: u32,
        reprobe_at: Instant,
        /// The number of the probe lease in flight, if one is.
        probe: Option<u64>,
    },
}

#[derive(Debug)]
struct Slot {
    key: ApiKey,
    in_flight: AtomicU32,
    state: Mutex<Health>,
}

/// The keys of one provider or model.
#[derive(Debug)]
pub struct KeyPool {
    name: String,
    slots: Vec<Slot>,
    next: AtomicUsize,
    /// Numbers the probe leases, so that only the probe in flight can end its probe.
    probes: AtomicU64,
    /// The pool's hash in Redis, when the state is shared.
    remote: OnceLock<(Arc<RedisState>, String)>,
}

/// Why no key could be leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoKey {
    /// Every usable key is cooling down; the first is usable again at `until`.
    CoolingDown {
        /// Earliest end of a cooldown.
        until: Instant,
    },
    /// Every key is disabled or excluded ([`KeyPool::next_reprobe`] says when a
    /// disabled one may be tried again).
    Exhausted,
}

/// A key in use: counts as in flight until dropped.
#[derive(Debug)]
pub struct KeyLease {
    pool: Arc<KeyPool>,
    index: usize,
    /// For the re-probe of a disabled key: the probe's number.
    probe: Option<u64>,
    /// Its count in the fleet-wide in-flight set of the key (shared state), removed
    /// when the lease drops.
    _fleet: Option<Lease>,
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

    /// Whether this lease is the re-probe of a disabled key.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    fn slot(&self) -> &Slot {
        &self.pool.slots[self.index]
    }

    /// Puts the key into cooldown after a 429: for `retry_after` when given, else
    /// `default`; capped at [`MAX_KEY_COOLDOWN`]. A disabled key stays disabled; when
    /// this lease was its re-probe, the probe proved nothing and the next one waits at
    /// least for the cooldown.
    pub fn cool_down(&self, retry_after: Option<Duration>, default: Duration) {
        let wait = retry_after.unwrap_or(default).min(MAX_KEY_COOLDOWN);
        let until = Instant::now() + wait;
        let slot = self.slot();
        let mut state = lock(&slot.state);
        match &mut *state {
            Health::Disabled {
                reprobe_at, probe, ..
            } => {
                if self.probe.is_some() && *probe == self.probe {
                    *probe = None;
                    *reprobe_at = (*reprobe_at).max(until);
                }
            }
            _ => {
                tracing::warn!(pool = %self.pool.name, key_id = slot.key.id(), cooldown_ms = wait.as_millis() as u64, "key rate-limited: cooling down");
                *state = Health::CoolingDown { until };
            }
        }
        drop(state);
        self.pool.write(
            "cool",
            slot.key.id(),
            wait,
            vec![Arg::S(String::new()), Arg::S(String::new())],
        );
    }

    /// Disables the key after a 401/403, keeping the provider's message as the reason.
    ///
    /// A first refusal schedules the re-probe [`REPROBE_INITIAL`] from now; the refusal
    /// of the re-probe itself counts one more failure and schedules the next one
    /// [`reprobe_delay`] away. The refusal of a request that was already in flight when
    /// the key was disabled changes nothing (it is the same outage, not a new failure).
    pub fn disable(&self, reason: &str) {
        let slot = self.slot();
        let now = Instant::now();
        let mut state = lock(&slot.state);
        let failures = match &*state {
            Health::Disabled {
                failures, probe, ..
            } if self.probe.is_some() && *probe == self.probe => failures.saturating_add(1),
            Health::Disabled { .. } => return,
            Health::Ok | Health::CoolingDown { .. } => 1,
        };
        let delay = reprobe_delay(failures);
        tracing::error!(
            pool = %self.pool.name, key_id = slot.key.id(), consecutive_failures = failures,
            reprobe_in_s = delay.as_secs(), "key refused by the provider: disabled until its re-probe: {reason}"
        );
        *state = Health::Disabled {
            reason: reason.to_owned(),
            failures,
            reprobe_at: now + delay,
            probe: None,
        };
        drop(state);
        self.pool.write(
            "disable",
            slot.key.id(),
            delay,
            vec![
                Arg::S(failures.to_string()),
                Arg::S(reason.replace('|', "/")),
            ],
        );
    }

    /// The call with the key succeeded: a disabled key (this lease was its re-probe,
    /// or it was disabled while the call was in flight) is re-enabled fully, its
    /// failure count and backoff reset.
    pub fn succeed(&self) {
        let slot = self.slot();
        let mut state = lock(&slot.state);
        if let Health::Disabled { failures, .. } = &*state {
            tracing::info!(pool = %self.pool.name, key_id = slot.key.id(), consecutive_failures = *failures, "key accepted again: re-enabled");
            *state = Health::Ok;
            drop(state);
            self.pool.write(
                "enable",
                slot.key.id(),
                Duration::ZERO,
                vec![Arg::S(String::new()), Arg::S(String::new())],
            );
        }
    }
}

impl Drop for KeyLease {
    fn drop(&mut self) {
        let slot = &self.pool.slots[self.index];
        if self.probe.is_some() {
            // A probe that ended without a verdict (cancelled, or failed in another
            // way): the next request may probe.
            if let Health::Disabled { probe, .. } = &mut *lock(&slot.state)
                && *probe == self.probe
            {
                *probe = None;
            }
        }
        slot.in_flight.fetch_sub(1, Ordering::Relaxed);
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
    /// What the provider's rate-limit headers last said about it, and when.
    pub rate_limits: Option<(crate::key::RateLimits, Instant)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave a key state half-written.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What [`KeyPool::acquire`] may do with one slot.
enum Candidate {
    /// Lease it.
    Usable,
    /// Lease it as the re-probe of a disabled key.
    Probe,
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
                    state: Mutex::new(Health::Ok),
                })
                .collect(),
            next: AtomicUsize::new(0),
            probes: AtomicU64::new(0),
            remote: OnceLock::new(),
        })
    }

    /// Takes over the state of every key this pool has in common with `old` (same key id):
    /// a key that stays across a reload keeps its cooldown or disabled state even when
    /// other keys were added or removed (issue 18). A probe lease in flight in `old` is
    /// not carried over: the disabled key is re-probed from this pool when its time comes.
    pub fn adopt_states(&self, old: &KeyPool) {
        for slot in &self.slots {
            let Some(from) = old.slots.iter().find(|s| s.key.id() == slot.key.id()) else {
                continue;
            };
            let health = match &*lock(&from.state) {
                Health::Ok => Health::Ok,
                Health::CoolingDown { until } => Health::CoolingDown { until: *until },
                Health::Disabled {
                    reason,
                    failures,
                    reprobe_at,
                    ..
                } => Health::Disabled {
                    reason: reason.clone(),
                    failures: *failures,
                    reprobe_at: *reprobe_at,
                    probe: None,
                },
            };
            *lock(&slot.state) = health;
        }
    }

    /// Shares the pool's cooldowns and disabled keys with every replica through the
    /// hash `key` in Redis (once; a second call changes nothing).
    pub fn share_through(&self, state: Arc<RedisState>, key: String) {
        let _ = self.remote.set((state, key));
    }

    /// Whether the pool's key states are shared through Redis.
    pub fn is_shared(&self) -> bool {
        self.remote.get().is_some()
    }

    /// Brings the cooldowns and disabled keys other replicas wrote into this pool (one
    /// round trip; nothing when the pool is not shared). A cooldown only lengthens a
    /// local one; a disabled key stays disabled here until its own re-probe succeeds.
    ///
    /// # Errors
    /// [`Unavailable`] when Redis did not answer and `state.on_unavailable` is `reject`
    /// (with `local`, the pool goes on with what it knows).
    pub async fn sync_shared(&self) -> Result<(), Unavailable> {
        let Some((state, key)) = self.remote.get() else {
            return Ok(());
        };
        let answer: Result<(i64, Vec<String>), Unavailable> =
            state.run(&POOL_SCRIPT, &[key], &[&"read"]).await;
        match answer {
            Ok((now_ms, fields)) => {
                self.apply_shared(now_ms, &fields);
                Ok(())
            }
            Err(Unavailable) => state.fallback(),
        }
    }

    /// The shared hash's `read`, as one step of a combined admission (`state::batch`);
    /// `None` when the pool is not shared.
    ///
    /// With `lease` (a name from [`RedisState::lease_name`]) the step is a `pick`: it
    /// also leases, in Redis, the usable key not in `exclude` with the fewest requests
    /// in flight **across the fleet** (ties: this replica's round-robin order), for
    /// [`acquire_picked`](Self::acquire_picked).
    pub fn shared_step(&self, exclude: &[usize], lease: Option<&str>) -> Option<Step> {
        let (state, key) = self.remote.get()?;
        let Some(lease) = lease else {
            return Some(Step {
                kind: StepKind::Pool,
                key: key.clone(),
                args: vec![Arg::S("read".to_owned())],
            });
        };
        let ttl_ms = i64::try_from(state.lease_ttl().as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let mut args = vec![
            Arg::S("pick".to_owned()),
            Arg::I(ttl_ms),
            Arg::S(lease.to_owned()),
        ];
        let now = Instant::now();
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in (0..n).map(|k| (start + k) % n) {
            if !exclude.contains(&i) && self.candidacy(i, now).is_ok() {
                args.push(Arg::S(self.slots[i].key.id().to_owned()));
            }
        }
        Some(Step {
            kind: StepKind::Pool,
            key: key.clone(),
            args,
        })
    }

    /// Leases the key `picked` (its id) that a `pick` step leased fleet-wide under
    /// `lease`, when it is still usable here; else (or with no pick: `picked` empty) as
    /// [`acquire`](Self::acquire) does, and the fleet-wide lease is given back. Call it
    /// inside a tokio runtime (the fleet-wide lease is renewed by a task of its own).
    ///
    /// # Errors
    /// As [`acquire`](Self::acquire).
    pub fn acquire_picked(
        self: &Arc<Self>,
        exclude: &[usize],
        picked: &str,
        lease: String,
    ) -> Result<KeyLease, NoKey> {
        let fleet = self
            .remote
            .get()
            .filter(|_| !picked.is_empty())
            .map(|(state, key)| Lease::held(state.clone(), format!("{key}:f:{picked}"), lease));
        let found = self
            .slots
            .iter()
            .position(|s| s.key.id() == picked)
            .filter(|i| !exclude.contains(i));
        let lease = found.and_then(|i| match self.candidacy(i, Instant::now()) {
            Ok(Candidate::Usable) => {
                self.slots[i].in_flight.fetch_add(1, Ordering::Relaxed);
                Some(KeyLease {
                    pool: self.clone(),
                    index: i,
                    probe: None,
                    _fleet: None,
                })
            }
            Ok(Candidate::Probe) => self.claim_probe(i),
            Err(_) => None,
        });
        match lease {
            Some(mut lease) => {
                lease._fleet = fleet;
                Ok(lease)
            }
            None => self.acquire(exclude),
        }
    }

    /// Brings what the shared hash held (`fields`: field, value, …, read at Redis time
    /// `now_ms`) into this pool: a cooldown only lengthens a local one; a disabled key
    /// stays disabled here until its own re-probe succeeds.
    pub fn apply_shared(&self, now_ms: i64, fields: &[String]) {
        let now = Instant::now();
        let at = |ms: i64| now + Duration::from_millis(u64::try_from(ms - now_ms).unwrap_or(0));
        for pair in fields.chunks_exact(2) {
            let (field, value) = (&pair[0], &pair[1]);
            let (kind, id) = field.split_at(field.find(':').map_or(0, |i| i + 1));
            let Some(slot) = self.slots.iter().find(|s| s.key.id() == id) else {
                continue;
            };
            let mut health = lock(&slot.state);
            match kind {
                "c:" => {
                    let Ok(till) = value.parse::<f64>() else {
                        continue;
                    };
                    let till = till as i64;
                    if till <= now_ms {
                        continue;
                    }
                    let until = at(till);
                    match &*health {
                        Health::Ok => *health = Health::CoolingDown { until },
                        Health::CoolingDown { until: mine } if *mine < until => {
                            *health = Health::CoolingDown { until }
                        }
                        _ => {}
                    }
                }
                "d:" => {
                    if matches!(&*health, Health::Disabled { .. }) {
                        continue;
                    }
                    let mut parts = value.splitn(3, '|');
                    let reprobe = parts.next().and_then(|v| v.parse::<f64>().ok());
                    let failures = parts.next().and_then(|v| v.parse::<u32>().ok());
                    let reason = parts.next().unwrap_or("").to_owned();
                    if let (Some(reprobe), Some(failures)) = (reprobe, failures) {
                        *health = Health::Disabled {
                            reason,
                            failures,
                            reprobe_at: at(reprobe as i64),
                            probe: None,
                        };
                    }
                }
                _ => {}
            }
        }
    }

    /// Writes one key's new state to the shared hash, in the background.
    fn write(&self, op: &str, key_id: &str, wait: Duration, extra: Vec<Arg>) {
        let Some((state, key)) = self.remote.get() else {
            return;
        };
        let mut args = vec![
            Arg::S(op.to_owned()),
            Arg::S(key_id.to_owned()),
            Arg::I(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)),
        ];
        args.extend(extra);
        state.spawn_run(&POOL_SCRIPT, vec![key.clone()], args);
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

    /// A [`Redactor`] of the pool's keys, for the upstream of a model drawing from it.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(self.slots.iter().map(|s| s.key.clone()))
    }

    /// Leases the least-loaded usable key not in `exclude`, ties broken round-robin. A
    /// disabled key whose re-probe is due (and not already in flight) is a candidate
    /// too: the lease is then its probe ([`KeyLease::is_probe`]), and no other request
    /// gets the key until the probe's verdict.
    ///
    /// # Errors
    /// [`NoKey::CoolingDown`] when every candidate is cooling down (with the earliest
    /// end), [`NoKey::Exhausted`] when every key is disabled or excluded.
    pub fn acquire(self: &Arc<Self>, exclude: &[usize]) -> Result<KeyLease, NoKey> {
        // A second pass only when another request claimed the probe chosen first.
        for _ in 0..=self.slots.len() {
            match self.choose(exclude) {
                Ok((i, Candidate::Usable)) => {
                    self.slots[i].in_flight.fetch_add(1, Ordering::Relaxed);
                    return Ok(KeyLease {
                        pool: self.clone(),
                        index: i,
                        probe: None,
                        _fleet: None,
                    });
                }
                Ok((i, Candidate::Probe)) => {
                    if let Some(lease) = self.claim_probe(i) {
                        return Ok(lease);
                    }
                }
                Err(no) => return Err(no),
            }
        }
        Err(NoKey::Exhausted)
    }

    /// The least-loaded candidate slot.
    fn choose(&self, exclude: &[usize]) -> Result<(usize, Candidate), NoKey> {
        let now = Instant::now();
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(usize, u32, Candidate)> = None;
        let mut earliest: Option<Instant> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if exclude.contains(&i) {
                continue;
            }
            let slot = &self.slots[i];
            let candidate = match self.candidacy(i, now) {
                Ok(c) => c,
                Err(Some(until)) => {
                    earliest = Some(earliest.map_or(until, |e| e.min(until)));
                    continue;
                }
                Err(None) => continue,
            };
            let load = slot.in_flight.load(Ordering::Relaxed);
            if best.as_ref().is_none_or(|(_, l, _)| load < *l) {
                best = Some((i, load, candidate));
            }
        }
        match (best, earliest) {
            (Some((i, _, candidate)), _) => Ok((i, candidate)),
            (None, Some(until)) => Err(NoKey::CoolingDown { until }),
            (None, None) => Err(NoKey::Exhausted),
        }
    }

    /// What slot `i` may be at `now`: usable, a due re-probe, or not a candidate
    /// (`Err(Some(until))`: cooling down until then; `Err(None)`: disabled). A cooldown
    /// that has ended is cleared.
    fn candidacy(&self, i: usize, now: Instant) -> Result<Candidate, Option<Instant>> {
        let mut state = lock(&self.slots[i].state);
        match &*state {
            Health::Disabled {
                reprobe_at,
                probe: None,
                ..
            } if *reprobe_at <= now => Ok(Candidate::Probe),
            Health::Disabled { .. } => Err(None),
            Health::CoolingDown { until } if *until > now => Err(Some(*until)),
            Health::CoolingDown { .. } => {
                *state = Health::Ok;
                Ok(Candidate::Usable)
            }
            Health::Ok => Ok(Candidate::Usable),
        }
    }

    /// Claims the re-probe of disabled slot `i`, unless another request did first.
    fn claim_probe(self: &Arc<Self>, i: usize) -> Option<KeyLease> {
        let slot = &self.slots[i];
        let mut state = lock(&slot.state);
        let Health::Disabled {
            reprobe_at,
            probe: probe @ None,
            failures,
            ..
        } = &mut *state
        else {
            return None;
        };
        if *reprobe_at > Instant::now() {
            return None;
        }
        let number = self.probes.fetch_add(1, Ordering::Relaxed);
        *probe = Some(number);
        tracing::info!(pool = %self.name, key_id = slot.key.id(), consecutive_failures = *failures, "re-probing a disabled key with one request");
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(KeyLease {
            pool: self.clone(),
            index: i,
            probe: Some(number),
            _fleet: None,
        })
    }

    /// The earliest re-probe of a disabled key not in `exclude` whose probe is not in
    /// flight: when a request refused with [`NoKey::Exhausted`] may find a key again.
    /// `None` when no such key is disabled (a probe in flight, or only excluded keys).
    pub fn next_reprobe(&self, exclude: &[usize]) -> Option<Instant> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(i, _)| !exclude.contains(i))
            .filter_map(|(_, s)| match &*lock(&s.state) {
                Health::Disabled {
                    reprobe_at,
                    probe: None,
                    ..
                } => Some(*reprobe_at),
                _ => None,
            })
            .min()
    }

    /// Every key's id, state and in-flight count.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = Instant::now();
        self.slots
            .iter()
            .map(|s| {
                let state = match &*lock(&s.state) {
                    Health::Ok => KeyState::Ok,
                    Health::CoolingDown { until } if *until <= now => KeyState::Ok,
                    Health::CoolingDown { until } => KeyState::CoolingDown { until: *until },
                    Health::Disabled {
                        reason,
                        failures,
                        reprobe_at,
                        probe,
                    } => KeyState::Disabled {
                        reason: reason.clone(),
                        consecutive_failures: *failures,
                        reprobe_at: *reprobe_at,
                        probe_in_flight: probe.is_some(),
                    },
                };
                KeySnapshot {
                    id: s.key.id().to_owned(),
                    state,
                    in_flight: s.in_flight.load(Ordering::Relaxed),
                    rate_limits: s.key.rate_limits(),
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
                reason: "Invalid API Key".into(),
                consecutive_failures: 1,
                reprobe_at: Instant::now() + REPROBE_INITIAL - Duration::from_secs(2),
                probe_in_flight: false,
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
        let disabled_at = Instant::now();
        // Until its re-probe is due (then see `a_disabled_key_is_re_probed_with_backoff`).
        tokio::time::advance(REPROBE_INITIAL - Duration::from_secs(1)).await;
        let snap = p.snapshot();
        for (i, key) in snap.iter().enumerate() {
            let expected = if i == disabled {
                KeyState::Disabled {
                    reason: "invalid x-api-key".into(),
                    consecutive_failures: 1,
                    reprobe_at: disabled_at + REPROBE_INITIAL,
                    probe_in_flight: false,
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

    #[test]
    fn reprobe_delays_double_from_a_minute_to_an_hour() {
        let mins: Vec<u64> = (1..=9).map(|f| reprobe_delay(f).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(reprobe_delay(0), REPROBE_INITIAL);
        assert_eq!(reprobe_delay(u32::MAX), REPROBE_MAX);
    }

    fn disabled_state(p: &KeyPool, i: usize) -> (u32, Instant, bool) {
        match &p.snapshot()[i].state {
            KeyState::Disabled {
                consecutive_failures,
                reprobe_at,
                probe_in_flight,
                ..
            } => (*consecutive_failures, *reprobe_at, *probe_in_flight),
            other => panic!("expected disabled, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_key_is_re_probed_with_backoff() {
        let p = pool(1);
        let t0 = Instant::now();
        p.acquire(&[]).unwrap().disable("invalid key");
        assert_eq!(disabled_state(&p, 0), (1, t0 + REPROBE_INITIAL, false));
        assert_eq!(p.acquire(&[]).unwrap_err(), NoKey::Exhausted);
        assert_eq!(p.next_reprobe(&[]), Some(t0 + REPROBE_INITIAL));
        assert_eq!(
            p.next_reprobe(&[0]),
            None,
            "an excluded key is not waited for"
        );

        // Due: one request gets it as a probe, no other while it is in flight.
        tokio::time::advance(REPROBE_INITIAL).await;
        let probe = p.acquire(&[]).unwrap();
        assert!(probe.is_probe());
        assert_eq!(p.acquire(&[]).unwrap_err(), NoKey::Exhausted);
        assert!(disabled_state(&p, 0).2, "probe in flight");
        assert_eq!(p.next_reprobe(&[]), None);

        // Refused again: 2 failures, the next probe 2 min away; then 4 min.
        let t1 = Instant::now();
        probe.disable("still invalid");
        drop(probe);
        assert_eq!(disabled_state(&p, 0), (2, t1 + reprobe_delay(2), false));
        tokio::time::advance(reprobe_delay(2) - Duration::from_millis(1)).await;
        assert_eq!(p.acquire(&[]).unwrap_err(), NoKey::Exhausted);
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = p.acquire(&[]).unwrap();
        let t2 = Instant::now();
        probe.disable("still invalid");
        drop(probe);
        assert_eq!(
            disabled_state(&p, 0),
            (3, t2 + Duration::from_secs(240), false)
        );

        // A success re-enables it and resets the backoff: the next refusal waits 1 min.
        tokio::time::advance(Duration::from_secs(240)).await;
        let probe = p.acquire(&[]).unwrap();
        probe.succeed();
        drop(probe);
        assert_eq!(p.snapshot()[0].state, KeyState::Ok);
        let lease = p.acquire(&[]).unwrap();
        assert!(!lease.is_probe());
        let t3 = Instant::now();
        lease.disable("glitch");
        assert_eq!(disabled_state(&p, 0), (1, t3 + REPROBE_INITIAL, false));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_refusals_count_once_and_a_probe_without_verdict_frees_the_slot() {
        let p = pool(1);
        let a = p.acquire(&[]).unwrap();
        let b = p.acquire(&[]).unwrap();
        let t0 = Instant::now();
        a.disable("invalid");
        // b was in flight before the key was disabled: the same outage.
        b.disable("invalid");
        drop((a, b));
        assert_eq!(disabled_state(&p, 0), (1, t0 + REPROBE_INITIAL, false));

        tokio::time::advance(REPROBE_INITIAL).await;
        // A probe dropped without a verdict (cancelled, or a 5xx): the next request probes.
        drop(p.acquire(&[]).unwrap());
        assert_eq!(disabled_state(&p, 0), (1, t0 + REPROBE_INITIAL, false));
        // A 429 on the probe proves nothing either; the next probe waits the cooldown.
        let probe = p.acquire(&[]).unwrap();
        assert!(probe.is_probe());
        probe.cool_down(Some(Duration::from_secs(5)), Duration::from_secs(30));
        drop(probe);
        assert_eq!(
            disabled_state(&p, 0),
            (1, Instant::now() + Duration::from_secs(5), false)
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(p.acquire(&[]).unwrap().is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn a_due_probe_competes_by_load_with_the_healthy_keys() {
        let p = pool(2);
        let bad = p.acquire(&[]).unwrap();
        let bad_index = bad.index();
        bad.disable("invalid");
        drop(bad);
        tokio::time::advance(REPROBE_INITIAL).await;
        // Requests held at once: the disabled key serves exactly one of them.
        let held: Vec<_> = (0..6).map(|_| p.acquire(&[]).unwrap()).collect();
        let probes: Vec<_> = held.iter().filter(|l| l.is_probe()).collect();
        assert_eq!(probes.len(), 1);
        assert_eq!(probes[0].index(), bad_index);
        assert_eq!(
            held.iter().filter(|l| l.index() == bad_index).count(),
            1,
            "one live request on the disabled key"
        );
    }

    #[test]
    fn the_pools_redactor_knows_its_keys() {
        let p = pool(2);
        let out = p.redactor().scrub("k0 and k1");
        assert!(!out.contains("k0") && !out.contains("k1"), "{out}");
    }
}
