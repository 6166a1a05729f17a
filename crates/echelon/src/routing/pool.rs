//! The runtime state of a polling pool (DESIGN.md §2 "polling pool", "instance";
//! seeds 001 and 002): a named set of instances drawn from one task group, rotated by a
//! `rotation_strategy` and health-checked in the background.
//!
//! A pool is for single-turn requests first; a multi-turn conversation can pass a
//! session key to [`PollingPool::select`], which keeps it on the same instance while that
//! instance stays healthy (sticky sessions, forgotten after `session_ttl` idle).
//!
//! # Health
//! `failure_threshold` consecutive failures — failed probes and failed live requests
//! count alike, any success resets the count — mark an instance unhealthy and take it
//! out of the rotation. It comes back only when **both** `recovery_time` has passed
//! since it was marked unhealthy **and** a probe passes afterwards; a probe that passes
//! earlier does not bring it back. A live success counts as a passing probe (it can only
//! happen on an unhealthy instance through the all-unhealthy fallback of
//! [`select`](PollingPool::select), or when a request picked before the instance turned
//! unhealthy finishes), so it too restores the instance only after `recovery_time`.
//!
//! # Probes
//! [`ProbeKind::Models`] sends `GET {base_url}/models` (cheap, no tokens) with the
//! model's key when it has keys; [`ProbeKind::Completion`] sends a one-token chat
//! completion (`"ping"`, `max_tokens: 1`); the model's provider sends either
//! ([`Provider::probe`](crate::provider::Provider::probe)). Probes go straight
//! to the provider: they do not pass through the model's circuit breaker, token buckets
//! or concurrency limit, but they do lease a key like any request.

// The router does not use pools yet; drop this once it does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};

use super::model::Model;
use crate::resilience::key_pool::NoKey;
use crate::state::redis::{Arg, RedisState, Unavailable};

/// A shared sticky session (issue 15): `get` answers the instance's model id bound to
/// the session (refreshing its idle TTL), `set` binds it.
static SESSION_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if ARGV[1] == 'get' then
  local v = redis.call('GET', KEYS[1])
  if v then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3])) end
  return v
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return false
"#,
    )
});

/// Sticky sessions kept at most (the least recently used go first beyond that). With
/// [`SessionKey`]s of 16 bytes the map stays within a few MiB however large the values
/// clients send.
const MAX_SESSIONS: u64 = 100_000;
/// Longest `recovery_time` / `session_ttl` honoured (one year), so that adding it to an
/// instant cannot overflow (moka refuses TTLs over 1000 years).
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The key a sticky session is kept under: 128 bits of SHA-256 over what the key is
/// made of (its kind and the client's value), never the value itself, so that the
/// sticky map costs the same per entry whatever a client sends (issue 14, item 11: 1,000
/// requests with a 256 KiB `x-session-id` used to keep 256 MB). A collision needs about
/// 2^64 chosen values, and would only share an instance between two conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionKey([u8; 16]);

impl SessionKey {
    /// The key of `parts` under `kind` (`session`, `user`, `conversation`): each part is
    /// hashed with its length first, so that no two lists of parts hash alike by
    /// concatenation.
    pub(crate) fn new<'a>(kind: &str, parts: impl IntoIterator<Item = &'a [u8]>) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update((kind.len() as u64).to_le_bytes());
        h.update(kind.as_bytes());
        for part in parts {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        SessionKey(key)
    }

    /// The key in hex (a Redis key fragment).
    fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// How a pool spreads requests over its healthy instances (`rotation_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rotation {
    /// Each healthy instance in turn, in order (`round_robin`).
    RoundRobin,
    /// The healthy instance with the fewest requests in flight, ties in turn.
    LeastBusy,
    /// Smooth weighted round-robin (nginx's algorithm) by [`PoolSettings::weights`].
    Weighted,
}

/// What a health probe sends (moved to the provider, which sends it).
pub(crate) use crate::provider::ProbeKind;

/// A pool's rotation and health-check settings (seed 001 `polling_pools/*.yaml`).
#[derive(Debug, Clone)]
pub(crate) struct PoolSettings {
    /// How requests are spread.
    pub(crate) rotation: Rotation,
    /// Per instance, in the order of the pool's models, for [`Rotation::Weighted`].
    /// A missing entry or 0 counts as 1.
    pub(crate) weights: Vec<u32>,
    /// Time between two rounds of probes; zero disables the background checks.
    pub(crate) health_check_interval: Duration,
    /// What a probe sends.
    pub(crate) probe: ProbeKind,
    /// Consecutive failures (probes or live requests) that make an instance unhealthy;
    /// 0 counts as 1.
    pub(crate) failure_threshold: u32,
    /// Least time an unhealthy instance stays out; it then needs a passing probe. At most
    /// one year is honoured.
    pub(crate) recovery_time: Duration,
    /// Sticky sessions are forgotten after this long unused (e.g. 30 min). At most one
    /// year is honoured.
    pub(crate) session_ttl: Duration,
}

/// One instance's state as shown by the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceSnapshot {
    /// The model id.
    pub model: String,
    /// Whether it is in the rotation.
    pub healthy: bool,
    /// Failures (probes or live requests) since the last success.
    pub consecutive_failures: u32,
    /// How long it has been unhealthy, ms; `None` when healthy.
    pub unhealthy_for_ms: Option<u64>,
    /// Time left before a passing probe may bring it back, ms (0: the next passing probe
    /// will); `None` when healthy.
    pub recovery_in_ms: Option<u64>,
    /// Whether the last probe passed; `None` before the first probe.
    pub last_probe_ok: Option<bool>,
    /// Why the last probe failed (or was skipped).
    pub last_probe_error: Option<String>,
    /// Age of the last probe, ms.
    pub last_probe_age_ms: Option<u64>,
    /// Requests this pool sent to it since start.
    pub picked: u64,
    /// Requests in flight on the model now (through any route).
    pub in_flight: u32,
}

/// The health of one instance.
#[derive(Debug, Default, Clone)]
struct Health {
    unhealthy_since: Option<Instant>,
    consecutive_failures: u32,
    last_failure: Option<Instant>,
    last_probe: Option<(Instant, Result<(), String>)>,
}

/// Everything `select` and the health updates share, behind one lock (a few instances:
/// the critical sections are a handful of comparisons).
#[derive(Debug)]
struct Inner {
    health: Vec<Health>,
    /// Where the next round-robin scan starts.
    cursor: usize,
    /// Smooth weighted round-robin: each instance's current weight.
    current: Vec<i64>,
}

/// What one probe said.
enum Probe {
    Pass,
    Fail(String),
    /// No health signal (every key is cooling down): health is left as it is.
    Skipped(String),
}

/// A polling pool at run time: its instances, their health and the rotation state.
/// Cheap to share behind an `Arc`; every method takes `&self`.
pub(crate) struct PollingPool {
    name: String,
    instances: Vec<Arc<Model>>,
    settings: PoolSettings,
    /// Normalised weights, one per instance, ≥ 1.
    weights: Vec<i64>,
    inner: Mutex<Inner>,
    picked: Vec<AtomicU64>,
    sessions: moka::sync::Cache<SessionKey, usize>,
    /// Where sticky sessions are shared with the other replicas (Redis, key prefix).
    shared_sessions: OnceLock<(Arc<RedisState>, String)>,
}

impl std::fmt::Debug for PollingPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PollingPool")
            .field("name", &self.name)
            .field(
                "instances",
                &self.instances.iter().map(|m| m.id()).collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under this lock is a plain field write: a panic cannot leave it torn.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl PollingPool {
    /// A pool named `name` over `instances` (in config order), all healthy at first.
    pub(crate) fn new(name: String, instances: Vec<Arc<Model>>, settings: PoolSettings) -> Self {
        let n = instances.len();
        let weights = (0..n)
            .map(|i| i64::from(settings.weights.get(i).copied().unwrap_or(1).max(1)))
            .collect();
        let sessions = moka::sync::Cache::builder()
            .max_capacity(MAX_SESSIONS)
            .time_to_idle(settings.session_ttl.min(MAX_DURATION))
            .build();
        PollingPool {
            name,
            weights,
            inner: Mutex::new(Inner {
                health: (0..n).map(|_| Health::default()).collect(),
                cursor: 0,
                current: vec![0; n],
            }),
            picked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            instances,
            settings,
            sessions,
            shared_sessions: OnceLock::new(),
        }
    }

    /// Shares the pool's sticky sessions with every replica through Redis, under keys
    /// starting with `prefix` (once; a second call changes nothing).
    pub(crate) fn share_sessions(&self, state: Arc<RedisState>, prefix: String) {
        let _ = self.shared_sessions.set((state, prefix));
    }

    /// [`select`](Self::select), with the session's binding read from and written to
    /// Redis when the pool's sessions are shared: a conversation stays on its instance
    /// whichever replica gets the next turn. Redis down: this replica's own bindings.
    pub(crate) async fn select_shared(
        &self,
        session: Option<SessionKey>,
        exclude: &[usize],
    ) -> Option<usize> {
        let (Some(key), Some((state, prefix))) = (session, self.shared_sessions.get()) else {
            return self.select(session, exclude);
        };
        let rkey = format!("{prefix}{}", key.hex());
        let ttl_ms = i64::try_from(self.settings.session_ttl.min(MAX_DURATION).as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        let bound: Result<Option<String>, Unavailable> = state
            .run(&SESSION_SCRIPT, &[&rkey], &[&"get", &"", &ttl_ms])
            .await;
        let bound = bound.ok().flatten();
        if let Some(i) = bound
            .as_deref()
            .and_then(|id| self.instances.iter().position(|m| m.id() == id))
        {
            self.sessions.insert(key, i);
        }
        let pick = self.select(session, exclude)?;
        let id = self.instances[pick].id();
        if bound.as_deref() != Some(id) {
            state.spawn_run(
                &SESSION_SCRIPT,
                vec![rkey],
                vec![
                    Arg::S("set".to_owned()),
                    Arg::S(id.to_owned()),
                    Arg::I(ttl_ms),
                ],
            );
        }
        Some(pick)
    }

    /// The pool's name (its route).
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The instances, in config order; `select` returns indices into this.
    pub(crate) fn instances(&self) -> &[Arc<Model>] {
        &self.instances
    }

    fn recovery_time(&self) -> Duration {
        self.settings.recovery_time.min(MAX_DURATION)
    }

    /// The instance for the next request, or `None` when every instance is in `exclude`
    /// (or, while some instance is healthy, every healthy one is).
    ///
    /// - `session`: `Some(key)` for a multi-turn conversation. The instance bound to the
    ///   key is returned while it is healthy and not in `exclude`; otherwise an instance
    ///   is picked by rotation and the key is bound to it.
    /// - `exclude`: indices already tried by this request.
    ///
    /// Only healthy instances are picked. **When no instance of the pool is healthy**
    /// (e.g. every probe fails, or the provider is down for everyone), the pool does not
    /// refuse: it falls back to the non-excluded instance whose last failure is the
    /// oldest, so that a request still tries something (and a success there can bring
    /// the instance back once `recovery_time` has passed). While at least one instance
    /// is healthy, unhealthy ones are never picked.
    pub(crate) fn select(&self, session: Option<SessionKey>, exclude: &[usize]) -> Option<usize> {
        let n = self.instances.len();
        let bound = session.and_then(|key| self.sessions.get(&key));
        let pick = {
            let mut inner = lock(&self.inner);
            let sticky = bound.filter(|&i| {
                i < n && inner.health[i].unhealthy_since.is_none() && !exclude.contains(&i)
            });
            if let Some(i) = sticky {
                self.picked[i].fetch_add(1, Ordering::Relaxed);
                return Some(i);
            }
            if inner.health.iter().any(|h| h.unhealthy_since.is_none()) {
                let candidates: Vec<bool> = (0..n)
                    .map(|i| inner.health[i].unhealthy_since.is_none() && !exclude.contains(&i))
                    .collect();
                self.rotate(&mut inner, &candidates)?
            } else {
                // Fallback: nobody is healthy. `None < Some(_)`, so an instance that never
                // failed comes first; ties go to the lowest index.
                (0..n)
                    .filter(|i| !exclude.contains(i))
                    .min_by_key(|&i| inner.health[i].last_failure)?
            }
        };
        if let Some(key) = session {
            self.sessions.insert(key, pick);
        }
        self.picked[pick].fetch_add(1, Ordering::Relaxed);
        Some(pick)
    }

    /// Picks among `candidates` (a mask over the instances) by the pool's rotation.
    fn rotate(&self, inner: &mut Inner, candidates: &[bool]) -> Option<usize> {
        let n = candidates.len();
        let pick = match self.settings.rotation {
            Rotation::RoundRobin => (0..n)
                .map(|k| (inner.cursor + k) % n)
                .find(|&i| candidates[i])?,
            Rotation::LeastBusy => {
                let mut best: Option<(usize, u32)> = None;
                for i in (0..n).map(|k| (inner.cursor + k) % n) {
                    if !candidates[i] {
                        continue;
                    }
                    let load = self.instances[i].in_flight();
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((i, load));
                    }
                }
                best?.0
            }
            Rotation::Weighted => {
                let mut total = 0;
                let mut best: Option<usize> = None;
                for i in (0..n).filter(|&i| candidates[i]) {
                    inner.current[i] += self.weights[i];
                    total += self.weights[i];
                    if best.is_none_or(|b| inner.current[i] > inner.current[b]) {
                        best = Some(i);
                    }
                }
                let best = best?;
                inner.current[best] -= total;
                best
            }
        };
        inner.cursor = (pick + 1) % n;
        Some(pick)
    }

    /// A live request's outcome on instance `i`: a failure counts toward
    /// `failure_threshold` (consecutive, with failed probes); a success resets the count
    /// and, on an unhealthy instance, counts as a passing probe.
    pub(crate) fn record(&self, i: usize, success: bool) {
        if i >= self.instances.len() {
            return;
        }
        if success {
            self.on_success(i, "a live request succeeded");
        } else {
            self.on_failure(i, "live request failed");
        }
    }

    fn on_success(&self, i: usize, how: &str) {
        let now = Instant::now();
        let mut inner = lock(&self.inner);
        let h = &mut inner.health[i];
        h.consecutive_failures = 0;
        let Some(since) = h.unhealthy_since else {
            return;
        };
        let due = since.checked_add(self.recovery_time()).unwrap_or(since);
        if now >= due {
            h.unhealthy_since = None;
            drop(inner);
            tracing::info!(
                pool = %self.name,
                instance = self.instances[i].id(),
                reason = how,
                "instance healthy again: back in the rotation"
            );
        } else {
            tracing::debug!(
                pool = %self.name,
                instance = self.instances[i].id(),
                recovery_in_ms = ms(due - now),
                "{how}, but recovery_time has not passed: stays unhealthy"
            );
        }
    }

    fn on_failure(&self, i: usize, reason: &str) {
        let now = Instant::now();
        let threshold = self.settings.failure_threshold.max(1);
        let mut inner = lock(&self.inner);
        let h = &mut inner.health[i];
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.last_failure = Some(now);
        if h.unhealthy_since.is_none() && h.consecutive_failures >= threshold {
            h.unhealthy_since = Some(now);
            let failures = h.consecutive_failures;
            drop(inner);
            tracing::warn!(
                pool = %self.name,
                instance = self.instances[i].id(),
                failures,
                reason,
                recovery_time_ms = ms(self.recovery_time()),
                "instance unhealthy: out of the rotation"
            );
        }
    }

    /// Probes every instance once now, concurrently, and updates their health.
    ///
    /// Returns, per instance, `Ok(())` or why the probe failed. A probe that could not be
    /// sent because every key of the model is cooling down (429s) is reported as an
    /// `Err` but leaves the health as it is: it says nothing about the instance.
    pub(crate) async fn probe_all(&self) -> Vec<Result<(), String>> {
        let outcomes =
            futures::future::join_all((0..self.instances.len()).map(|i| self.probe(i))).await;
        outcomes
            .into_iter()
            .enumerate()
            .map(|(i, outcome)| {
                let now = Instant::now();
                let result = match outcome {
                    Probe::Pass => {
                        self.on_success(i, "a probe passed");
                        Ok(())
                    }
                    Probe::Fail(reason) => {
                        self.on_failure(i, &format!("probe failed: {reason}"));
                        Err(reason)
                    }
                    Probe::Skipped(reason) => Err(reason),
                };
                lock(&self.inner).health[i].last_probe = Some((now, result.clone()));
                result
            })
            .collect()
    }

    /// One probe of instance `i`.
    async fn probe(&self, i: usize) -> Probe {
        let model = &self.instances[i];
        let lease = if model.keys().is_empty() {
            None
        } else {
            match model.keys().acquire(&[]) {
                Ok(lease) => Some(lease),
                Err(NoKey::CoolingDown { .. }) => {
                    return Probe::Skipped("probe skipped: every key is cooling down".into());
                }
                Err(NoKey::Exhausted) => {
                    return Probe::Fail("every key is disabled".into());
                }
            }
        };
        let key = lease.as_ref().map(|l| l.key());
        let what = match self.settings.probe {
            ProbeKind::Models => "GET /models",
            ProbeKind::Completion => "completion",
        };
        let probe = model
            .upstream()
            .probe(key, self.settings.probe, model.upstream_model());
        match probe.await {
            Ok(()) => Probe::Pass,
            Err(e) => Probe::Fail(format!("{what}: {e}")),
        }
    }

    /// Spawns the background health checks: a tokio task that probes every instance
    /// every `health_check_interval` (the first round at once). It holds only a `Weak`
    /// to the pool and ends at the first tick after the pool is dropped. A zero interval
    /// spawns nothing. Must be called inside a tokio runtime.
    pub(crate) fn spawn_health_checks(
        self: &Arc<Self>,
        tasks: &tokio_util::task::TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let period = self.settings.health_check_interval;
        if period.is_zero() {
            tracing::debug!(pool = %self.name, "health_check_interval is 0: no health checks");
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        tasks.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                // Ends with its pool (a reload that drops the pool, or the gateway).
                let Some(pool) = pool.upgrade() else {
                    break;
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = pool.probe_all() => {}
                }
            }
        });
    }

    /// Every instance's state, in order.
    pub(crate) fn snapshot(&self) -> Vec<InstanceSnapshot> {
        let now = Instant::now();
        let inner = lock(&self.inner);
        self.instances
            .iter()
            .zip(&inner.health)
            .zip(&self.picked)
            .map(|((model, h), picked)| {
                let (last_probe_ok, last_probe_error, last_probe_age_ms) = match &h.last_probe {
                    None => (None, None, None),
                    Some((at, result)) => (
                        Some(result.is_ok()),
                        result.as_ref().err().cloned(),
                        Some(ms(now.saturating_duration_since(*at))),
                    ),
                };
                InstanceSnapshot {
                    model: model.id().to_owned(),
                    healthy: h.unhealthy_since.is_none(),
                    consecutive_failures: h.consecutive_failures,
                    unhealthy_for_ms: h
                        .unhealthy_since
                        .map(|s| ms(now.saturating_duration_since(s))),
                    recovery_in_ms: h.unhealthy_since.map(|s| {
                        let due = s.checked_add(self.recovery_time()).unwrap_or(s);
                        ms(due.saturating_duration_since(now))
                    }),
                    last_probe_ok,
                    last_probe_error,
                    last_probe_age_ms,
                    picked: picked.load(Ordering::Relaxed),
                    in_flight: model.in_flight(),
                }
            })
            .collect()
    }

    /// Takes over, from `old`, the health of its instances that are the same upstream
    /// here (same model id and state ids) and the sticky sessions bound to them: a hot
    /// reload keeps instance health and conversations stay on their instance (issue 18).
    /// A session bound to an instance the new config no longer has is dropped (its next
    /// turn is placed by rotation). Each kept session starts a new `session_ttl`.
    pub(crate) fn adopt_health(&self, old: &PollingPool) {
        // For each of `old`'s instances, its index here when it stayed.
        let moved: Vec<Option<usize>> = old
            .instances
            .iter()
            .map(|o| {
                self.instances
                    .iter()
                    .position(|m| o.id() == m.id() && o.state_ids() == m.state_ids())
            })
            .collect();
        let before = lock(&old.inner).health.clone();
        {
            let mut inner = lock(&self.inner);
            for (j, prev) in before.iter().enumerate() {
                if let Some(h) = moved
                    .get(j)
                    .copied()
                    .flatten()
                    .and_then(|i| inner.health.get_mut(i))
                {
                    *h = prev.clone();
                }
            }
        }
        for (key, j) in old.sessions.iter() {
            if let Some(i) = moved.get(j).copied().flatten() {
                self.sessions.insert(*key, i);
            }
        }
    }

    /// Instances in the rotation now.
    pub(crate) fn healthy_count(&self) -> usize {
        lock(&self.inner)
            .health
            .iter()
            .filter(|h| h.unhealthy_since.is_none())
            .count()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, ProviderApi, ProviderConfig};
    use crate::key::ApiKey;
    use crate::resilience::key_pool::KeyPool;
    use crate::routing::model::InFlight;
    use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
    use secrecy::SecretString;

    /// Nothing listens there: the discard port, refused.
    const NOWHERE: &str = "http://127.0.0.1:9/v1";

    fn sk(id: &str) -> SessionKey {
        SessionKey::new("session", [id.as_bytes()])
    }

    fn model(id: &str, base_url: &str, keys: &[&str]) -> Arc<Model> {
        let provider = ProviderConfig {
            base_url: base_url.to_owned(),
            api_keys: Vec::new(),
            api: ProviderApi::OpenAi,
            key_cooldown: ProviderConfig::DEFAULT_KEY_COOLDOWN,
            headers: Default::default(),
            responses: false,
        };
        let mut config = ModelConfig::new("local", format!("{id}-upstream"));
        config.timeout = Duration::from_secs(5);
        config.connect_timeout = Duration::from_secs(1);
        let keys = KeyPool::new(
            id,
            keys.iter()
                .map(|k| ApiKey::new(SecretString::from(*k)))
                .collect(),
        );
        let mut http = crate::provider::HttpClients::new();
        Arc::new(
            Model::from_config(
                id,
                &config,
                &provider,
                keys,
                &mut http,
                &crate::state::MemoryRegistry::new(),
            )
            .unwrap(),
        )
    }

    fn settings(rotation: Rotation) -> PoolSettings {
        PoolSettings {
            rotation,
            weights: Vec::new(),
            health_check_interval: Duration::from_secs(30),
            probe: ProbeKind::Models,
            failure_threshold: 3,
            recovery_time: Duration::from_secs(60),
            session_ttl: Duration::from_secs(1800),
        }
    }

    fn pool_at(urls: &[&str], settings: PoolSettings) -> PollingPool {
        let models = urls
            .iter()
            .enumerate()
            .map(|(i, u)| model(&format!("m{i}"), u, &[]))
            .collect();
        PollingPool::new("test_pool".into(), models, settings)
    }

    fn pool(n: usize, settings: PoolSettings) -> PollingPool {
        pool_at(&vec![NOWHERE; n], settings)
    }

    fn counts(pool: &PollingPool, picks: usize, exclude: &[usize]) -> Vec<usize> {
        let mut counts = vec![0; pool.instances().len()];
        for _ in 0..picks {
            counts[pool.select(None, exclude).unwrap()] += 1;
        }
        counts
    }

    fn fail(pool: &PollingPool, i: usize, times: u32) {
        for _ in 0..times {
            pool.record(i, false);
        }
    }

    #[test]
    fn round_robin_is_even_over_healthy_instances() {
        let p = pool(3, settings(Rotation::RoundRobin));
        let c = counts(&p, 1000, &[]);
        assert!(c.iter().all(|&k| (332..=334).contains(&k)), "{c:?}");
        assert_eq!(c.iter().sum::<usize>(), 1000);
        assert_eq!(p.snapshot()[0].picked, c[0] as u64);

        // Order: 0, 1, 2, 0, …
        let p = pool(3, settings(Rotation::RoundRobin));
        let seq: Vec<_> = (0..6).map(|_| p.select(None, &[]).unwrap()).collect();
        assert_eq!(seq, [0, 1, 2, 0, 1, 2]);

        // An unhealthy instance is skipped; the rest stay even.
        fail(&p, 1, 3);
        let c = counts(&p, 1000, &[]);
        assert_eq!(c[1], 0);
        assert!(c[0].abs_diff(c[2]) <= 1, "{c:?}");
    }

    #[test]
    fn least_busy_picks_fewest_in_flight_and_round_robins_ties() {
        let p = pool(3, settings(Rotation::LeastBusy));
        let _a = [
            InFlight::new(&p.instances()[0]),
            InFlight::new(&p.instances()[0]),
        ];
        let _b = InFlight::new(&p.instances()[1]);
        for _ in 0..5 {
            assert_eq!(p.select(None, &[]), Some(2));
        }
        // Excluded: the next least busy.
        assert_eq!(p.select(None, &[2]), Some(1));

        let _c = [InFlight::new(&p.instances()[2])];
        // 1 and 2 tie at one request each: they alternate.
        let seq: Vec<_> = (0..4).map(|_| p.select(None, &[]).unwrap()).collect();
        assert_eq!(seq.iter().filter(|&&i| i == 1).count(), 2, "{seq:?}");
        assert_eq!(seq.iter().filter(|&&i| i == 2).count(), 2, "{seq:?}");

        // All idle: plain round-robin.
        let p = pool(3, settings(Rotation::LeastBusy));
        let c = counts(&p, 999, &[]);
        assert_eq!(c, [333, 333, 333]);
    }

    #[test]
    fn weighted_follows_the_weights_smoothly() {
        let mut s = settings(Rotation::Weighted);
        s.weights = vec![3, 1];
        let p = pool(2, s);
        let seq: Vec<_> = (0..4).map(|_| p.select(None, &[]).unwrap()).collect();
        // Smooth: the light instance is not starved to the end of the cycle.
        assert_eq!(seq, [0, 0, 1, 0]);
        let c = counts(&p, 996, &[]);
        assert_eq!(c, [747, 249]);
        assert_eq!(p.snapshot()[0].picked, 750);
        assert_eq!(p.snapshot()[1].picked, 250);

        // 5:1:1 (nginx's example): a a b a c a a.
        let mut s = settings(Rotation::Weighted);
        s.weights = vec![5, 1, 1];
        let p = pool(3, s);
        let seq: Vec<_> = (0..7).map(|_| p.select(None, &[]).unwrap()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);

        // Unhealthy instances drop out; missing or zero weights count as 1.
        let mut s = settings(Rotation::Weighted);
        s.weights = vec![0];
        let p = pool(3, s);
        fail(&p, 0, 3);
        assert_eq!(counts(&p, 100, &[]), [0, 50, 50]);
    }

    #[test]
    fn exclusion_is_honoured_and_everything_excluded_gives_none() {
        for rotation in [
            Rotation::RoundRobin,
            Rotation::LeastBusy,
            Rotation::Weighted,
        ] {
            let p = pool(3, settings(rotation));
            let c = counts(&p, 100, &[0]);
            assert_eq!(c[0], 0, "{rotation:?}");
            assert_eq!(c[1] + c[2], 100, "{rotation:?}");
            assert_eq!(p.select(None, &[2, 0]), Some(1), "{rotation:?}");
            assert_eq!(p.select(None, &[0, 1, 2]), None, "{rotation:?}");
            assert_eq!(p.select(Some(sk("s")), &[0, 1, 2]), None, "{rotation:?}");
        }
        // Some instance healthy but every healthy one excluded: the unhealthy one is not
        // tried.
        let p = pool(2, settings(Rotation::RoundRobin));
        fail(&p, 1, 3);
        assert_eq!(p.select(None, &[0]), None);
    }

    #[test]
    fn sticky_session_stays_while_healthy_and_moves_when_not() {
        let p = pool(3, settings(Rotation::RoundRobin));
        let first = p.select(Some(sk("conv-1")), &[]).unwrap();
        let other = p.select(Some(sk("conv-2")), &[]).unwrap();
        assert_ne!(first, other);
        for _ in 0..20 {
            // Other traffic moves the rotation on; the session stays put.
            p.select(None, &[]).unwrap();
            assert_eq!(p.select(Some(sk("conv-1")), &[]), Some(first));
        }
        // Excluded for this request: another instance, and the session follows it.
        let moved = p.select(Some(sk("conv-1")), &[first]).unwrap();
        assert_ne!(moved, first);
        assert_eq!(p.select(Some(sk("conv-1")), &[]), Some(moved));

        // Its instance turns unhealthy: the session moves and stays on the new one.
        fail(&p, moved, 3);
        let next = p.select(Some(sk("conv-1")), &[]).unwrap();
        assert_ne!(next, moved);
        for _ in 0..10 {
            assert_eq!(p.select(Some(sk("conv-1")), &[]), Some(next));
        }
    }

    #[test]
    fn a_reload_keeps_sticky_sessions_on_instances_that_stayed() {
        let old = pool_at(&[NOWHERE, NOWHERE, NOWHERE], settings(Rotation::RoundRobin));
        let on: Vec<usize> = (0..3)
            .map(|k| old.select(Some(sk(&format!("conv-{k}"))), &[]).unwrap())
            .collect();
        assert_eq!(on, [0, 1, 2]);
        // The new config drops m0 and puts m2 first: m1 and m2 stay, at new indices.
        let models = vec![
            model("m2", NOWHERE, &[]),
            model("m1", NOWHERE, &[]),
            model("m9", NOWHERE, &[]),
        ];
        let new = PollingPool::new("test_pool".into(), models, settings(Rotation::RoundRobin));
        new.adopt_health(&old);
        new.sessions.run_pending_tasks();
        for _ in 0..5 {
            new.select(None, &[]).unwrap(); // other traffic moves the rotation on
            assert_eq!(
                new.select(Some(sk("conv-1")), &[]),
                Some(1),
                "m1 is now index 1"
            );
            assert_eq!(
                new.select(Some(sk("conv-2")), &[]),
                Some(0),
                "m2 is now index 0"
            );
        }
        // conv-0's instance is gone: it is placed by rotation, then stays there.
        let placed = new.select(Some(sk("conv-0")), &[]).unwrap();
        assert_eq!(new.select(Some(sk("conv-0")), &[]), Some(placed));
    }

    #[test]
    fn live_failures_past_the_threshold_take_an_instance_out() {
        let p = pool(3, settings(Rotation::RoundRobin));
        fail(&p, 0, 2);
        p.record(0, true); // resets the count
        fail(&p, 0, 2);
        assert_eq!(p.healthy_count(), 3);
        assert_eq!(p.snapshot()[0].consecutive_failures, 2);
        fail(&p, 0, 1);
        assert_eq!(p.healthy_count(), 2);
        let snap = &p.snapshot()[0];
        assert!(!snap.healthy);
        assert_eq!(snap.consecutive_failures, 3);
        assert!(snap.recovery_in_ms.unwrap() > 59_000);
        assert!(snap.unhealthy_for_ms.is_some());
        let c = counts(&p, 300, &[]);
        assert_eq!(c, [0, 150, 150]);
        // A live success before recovery_time does not bring it back.
        p.record(0, true);
        assert_eq!(p.healthy_count(), 2);
        // Out-of-range indices are ignored.
        p.record(7, false);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nobody_healthy_the_least_recently_failed_is_tried() {
        let p = pool(3, settings(Rotation::RoundRobin));
        fail(&p, 1, 3);
        tokio::time::advance(Duration::from_millis(10)).await;
        fail(&p, 0, 3);
        tokio::time::advance(Duration::from_millis(10)).await;
        fail(&p, 2, 3);
        assert_eq!(p.healthy_count(), 0);
        assert_eq!(p.select(None, &[]), Some(1));
        assert_eq!(p.select(None, &[1]), Some(0));
        assert_eq!(p.select(None, &[1, 0]), Some(2));
        assert_eq!(p.select(None, &[0, 1, 2]), None);
        // The tried instance fails again: the next-oldest failure is tried next.
        p.record(1, false);
        assert_eq!(p.select(Some(sk("s")), &[]), Some(0));

        // A live success there counts as a passing probe, once recovery_time is over.
        p.record(0, true);
        assert_eq!(p.healthy_count(), 0);
        tokio::time::advance(Duration::from_secs(60)).await;
        p.record(0, true);
        assert_eq!(p.healthy_count(), 1);
        assert_eq!(counts(&p, 5, &[]), [5, 0, 0]);
    }

    #[tokio::test]
    async fn probes_pass_against_a_live_upstream_and_fail_against_a_dead_one() {
        let up = TestUpstream::start().await.unwrap();
        let url = up.base_url();
        let mut s = settings(Rotation::RoundRobin);
        s.failure_threshold = 2;
        let p = pool_at(&[&url, NOWHERE], s);
        let results = p.probe_all().await;
        assert_eq!(results[0], Ok(()));
        let err = results[1].clone().unwrap_err();
        assert!(err.contains("GET /models"), "{err}");
        assert_eq!(p.healthy_count(), 2, "one failure is below the threshold");
        let snap = p.snapshot();
        assert_eq!(snap[0].last_probe_ok, Some(true));
        assert_eq!(snap[1].last_probe_ok, Some(false));
        assert_eq!(snap[1].last_probe_error.as_deref(), Some(err.as_str()));
        assert!(snap[1].last_probe_age_ms.is_some());
        assert!(p.probe_all().await[1].is_err());
        assert_eq!(p.healthy_count(), 1);
        assert_eq!(counts(&p, 10, &[]), [10, 0]);
        // Probes never touch chat completions.
        assert_eq!(up.chat_requests(), 0);

        // The upstream goes away: its probes fail too.
        up.shutdown().await;
        assert!(p.probe_all().await[0].is_err());
        assert!(p.probe_all().await[0].is_err());
        assert_eq!(p.healthy_count(), 0);
    }

    #[tokio::test]
    async fn models_probe_sends_the_key() {
        let up = TestUpstream::start_with(UpstreamOptions {
            api_key: Some("right".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let models = vec![
            model("good", &up.base_url(), &["right"]),
            model("bad", &up.base_url(), &["wrong"]),
            model("none", &up.base_url(), &[]),
        ];
        let p = PollingPool::new("p".into(), models, settings(Rotation::RoundRobin));
        let results = p.probe_all().await;
        assert_eq!(results[0], Ok(()));
        assert!(
            results[1].as_ref().unwrap_err().contains("401"),
            "{results:?}"
        );
        assert!(
            results[2].as_ref().unwrap_err().contains("401"),
            "{results:?}"
        );
        // The probe's key lease is returned.
        assert_eq!(p.instances()[0].keys().snapshot()[0].in_flight, 0);
    }

    #[tokio::test]
    async fn completion_probe_sends_a_one_token_ping() {
        let up = TestUpstream::start().await.unwrap();
        let mut s = settings(Rotation::RoundRobin);
        s.probe = ProbeKind::Completion;
        s.failure_threshold = 1;
        let p = pool_at(&[&up.base_url()], s);
        assert_eq!(p.probe_all().await, [Ok(())]);
        let recorded = up.recorded();
        assert_eq!(recorded.len(), 1);
        let body = recorded[0].body.clone().unwrap();
        assert_eq!(body["model"], "m0-upstream");
        assert_eq!(body["max_tokens"], 1);
        assert_eq!(body["messages"][0]["content"], "ping");

        up.set_behavior(Behavior::Status {
            status: 500,
            retry_after: None,
            message: "x".into(),
        });
        let err = p.probe_all().await[0].clone().unwrap_err();
        assert!(err.contains("500"), "{err}");
        assert_eq!(p.healthy_count(), 0);
    }

    #[tokio::test]
    async fn recovery_needs_recovery_time_and_a_passing_probe() {
        let up = TestUpstream::start().await.unwrap();
        let mut s = settings(Rotation::RoundRobin);
        s.probe = ProbeKind::Completion;
        s.failure_threshold = 2;
        // Long enough that the first probe surely comes before it on a loaded machine.
        s.recovery_time = Duration::from_millis(800);
        let p = pool_at(&[&up.base_url(), &up.base_url()], s);
        fail(&p, 0, 2);
        assert_eq!(p.healthy_count(), 1);

        // A passing probe before recovery_time: still out.
        assert_eq!(p.probe_all().await, [Ok(()), Ok(())]);
        assert_eq!(p.healthy_count(), 1);
        assert!(!p.snapshot()[0].healthy);
        assert_eq!(p.snapshot()[0].consecutive_failures, 0);

        tokio::time::sleep(Duration::from_millis(850)).await;
        assert_eq!(p.snapshot()[0].recovery_in_ms, Some(0));
        // recovery_time is over but the probe fails: still out.
        up.set_behavior(Behavior::Status {
            status: 500,
            retry_after: None,
            message: "x".into(),
        });
        assert!(p.probe_all().await[0].is_err());
        assert_eq!(p.healthy_count(), 1);
        assert!(!p.snapshot()[0].healthy);

        // Both: back in the rotation.
        up.set_behavior(Behavior::Normal);
        assert_eq!(p.probe_all().await, [Ok(()), Ok(())]);
        assert_eq!(p.healthy_count(), 2);
        let snap = &p.snapshot()[0];
        assert!(snap.healthy);
        assert_eq!(snap.unhealthy_for_ms, None);
        assert_eq!(snap.recovery_in_ms, None);
        let c = counts(&p, 10, &[]);
        assert_eq!(c, [5, 5]);
    }

    #[tokio::test]
    async fn health_checks_run_in_the_background_and_end_with_the_pool() {
        let up = TestUpstream::start().await.unwrap();
        let mut s = settings(Rotation::RoundRobin);
        s.probe = ProbeKind::Completion;
        s.failure_threshold = 1;
        s.health_check_interval = Duration::from_millis(40);
        let p = Arc::new(pool_at(&[&up.base_url()], s));
        p.spawn_health_checks(
            &tokio_util::task::TaskTracker::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        up.set_behavior(Behavior::Status {
            status: 503,
            retry_after: None,
            message: "down".into(),
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while up.chat_requests() < 3 || p.healthy_count() != 0 {
            assert!(Instant::now() < deadline, "no background probes");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(p.snapshot()[0].last_probe_ok, Some(false));

        let weak = Arc::downgrade(&p);
        drop(p);
        // The task holds a strong reference only during a round of probes.
        let deadline = Instant::now() + Duration::from_secs(5);
        while weak.upgrade().is_some() {
            assert!(
                Instant::now() < deadline,
                "the health-check task keeps the pool"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let seen = up.chat_requests();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            up.chat_requests(),
            seen,
            "probes went on after the pool was dropped"
        );
    }

    #[tokio::test]
    async fn zero_interval_spawns_nothing() {
        let up = TestUpstream::start().await.unwrap();
        let mut s = settings(Rotation::RoundRobin);
        s.probe = ProbeKind::Completion;
        s.health_check_interval = Duration::ZERO;
        let p = Arc::new(pool_at(&[&up.base_url()], s));
        p.spawn_health_checks(
            &tokio_util::task::TaskTracker::new(),
            tokio_util::sync::CancellationToken::new(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(up.chat_requests(), 0);
    }

    #[test]
    fn snapshot_serializes() {
        let p = pool(1, settings(Rotation::RoundRobin));
        p.select(None, &[]);
        let v = serde_json::to_value(p.snapshot()).unwrap();
        assert_eq!(v[0]["model"], "m0");
        assert_eq!(v[0]["healthy"], true);
        assert_eq!(v[0]["picked"], 1);
        assert_eq!(v[0]["in_flight"], 0);
        assert!(v[0]["last_probe_ok"].is_null());
        assert_eq!(p.name(), "test_pool");
    }
}
