//! Circuit breaker: stops sending attempts to a model that keeps failing.
//!
//! DESIGN.md §2 "circuit breaker" and seed 001 `fallback_config.circuit_breaker:
//! {failure_threshold, recovery_time, half_open_requests}`: closed → open after
//! `failure_threshold` consecutive failures (or, optionally, a failure rate over a
//! sliding window) → half-open after `recovery_time`, letting `half_open_requests`
//! probes through → closed when a probe succeeds, open again when one fails.
//!
//! Ask [`CircuitBreaker::try_acquire`] before an attempt and report its outcome with
//! [`CircuitBreaker::record`]. Which failures say something about the model's health
//! (not a 400, not a cancelled request) is the caller's decision.
//!
//! With shared state (issue 15) the breaker's state machine (consecutive failures,
//! open until, half-open probes) lives in one Redis hash and runs in one Lua script,
//! so one replica opening it opens it for all and half-open admits
//! `half_open_requests` probes fleet-wide; [`CircuitBreaker::acquire`] asks it. The
//! failure-rate rule stays per replica: when it fires, the replica opens the shared
//! breaker.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::Script;
use tokio::time::Instant;

use crate::state::batch::{Step, StepKind};
use crate::state::redis::{Arg, NOW_MS, RedisState, ToRedisArgsDyn, Unavailable};

/// The shared breaker: a hash `{s: 0 closed | 1 open | 2 half-open, u: open until (ms),
/// e: epoch, f: consecutive failures, p: probes in flight}`. `acquire` answers
/// `{granted, probe, epoch, ms until it may grant}`; `record` and `release` answer
/// `{state before, state after, failures, 0}`. The same rules as the in-process one.
///
/// The breaker's Lua function `breaker(key, args)`: the body of [`BREAKER_SCRIPT`] and
/// one step of the combined admission script (`state::batch`).
pub(crate) const BREAKER_LUA: &str = r#"
local function breaker(k, A)
local h = redis.call('HMGET', k, 's', 'u', 'e', 'f', 'p')
local s = tonumber(h[1]) or 0; local u = tonumber(h[2]) or 0; local e = tonumber(h[3]) or 0
local f = tonumber(h[4]) or 0; local p = tonumber(h[5]) or 0
local op = A[1]
local ret
if s == 1 and now >= u then s = 2; p = 0; e = e + 1 end
if op == 'acquire' then
  if s == 0 then ret = {1, 0, e, 0}
  elseif s == 1 then ret = {0, 0, e, u - now}
  elseif p < tonumber(A[2]) then p = p + 1; ret = {1, 1, e, 0}
  else ret = {0, 0, e, 0} end
elseif op == 'record' then
  local before = s
  local pe = tonumber(A[2]); local probe = A[3] == '1'; local ok = A[4] == '1'
  local thr = tonumber(A[5]); local rec = tonumber(A[6]); local rate = A[7] == '1'
  if pe == e then
    if probe then
      if ok then s = 0; f = 0; e = e + 1 else s = 1; u = now + rec; e = e + 1 end
    elseif s == 0 then
      if ok then f = 0 else
        f = f + 1
        if f >= thr or rate then s = 1; u = now + rec; e = e + 1 end
      end
    end
  end
  ret = {before, s, f, 0}
else
  local pe = tonumber(A[2])
  if s == 2 and pe == e and p > 0 then p = p - 1 end
  ret = {s, s, f, 0}
end
redis.call('HSET', k, 's', s, 'u', tostring(u), 'e', e, 'f', f, 'p', p)
redis.call('PEXPIRE', k, 86400000)
return ret
end
"#;

static BREAKER_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW_MS}{BREAKER_LUA}return breaker(KEYS[1], ARGV)\n"
    ))
});

use super::window::Window;

/// The longest `recovery_time` honoured (one year), so that `now + recovery_time`
/// cannot overflow.
const MAX_RECOVERY: Duration = Duration::from_secs(365 * 24 * 3600);

/// How a breaker trips and recovers (seed 001 `circuit_breaker`).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive failures that open a closed breaker (seed `failure_threshold`).
    /// 0 is taken as 1.
    pub failure_threshold: u32,
    /// How long an open breaker rejects attempts before it lets probes through (seed
    /// `recovery_time`, in seconds there). At most one year is honoured.
    pub recovery_time: Duration,
    /// Probes let through at the same time while half-open (seed
    /// `half_open_requests`). 0 is taken as 1.
    pub half_open_requests: u32,
    /// Also open when the share of failures over a sliding window is too high; `None`:
    /// only consecutive failures count (the seed's rule).
    pub failure_rate: Option<FailureRate>,
}

impl Default for BreakerSettings {
    /// The seed's example values: 5 failures, 60 s, 1 probe, no failure-rate rule.
    fn default() -> Self {
        BreakerSettings {
            failure_threshold: 5,
            recovery_time: Duration::from_secs(60),
            half_open_requests: 1,
            failure_rate: None,
        }
    }
}

/// The failure-rate rule: open when `failures / requests ≥ threshold` over the last
/// `window`, once the window holds at least `min_requests` requests.
///
/// An Echelon addition to the seed's consecutive-failure rule: it catches a model
/// that fails every other request, which never makes `failure_threshold` in a row.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRate {
    /// Share of failed requests, 0.0 to 1.0, at which the breaker opens. Clamped to
    /// that range; NaN is taken as 1.0.
    pub threshold: f64,
    /// The sliding window, kept as 10 sub-buckets of `window / 10`: a request counts
    /// for between 9/10 of the window and the whole window (`resilience/window.rs`).
    pub window: Duration,
    /// No decision while the window holds fewer requests than this. 0 is taken as 1.
    pub min_requests: u32,
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Attempts go through; failures are counted.
    Closed,
    /// Attempts are rejected until `until`, then the breaker turns half-open.
    Open {
        /// When the breaker starts letting probes through.
        until: Instant,
    },
    /// Up to `half_open_requests` probes go through at a time.
    HalfOpen {
        /// Probes granted and not yet reported.
        probes_in_flight: u32,
    },
}

impl BreakerState {
    /// `closed`, `open` or `half_open`, as shown in logs, metrics and `/admin/state`.
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }
}

/// The breaker refused an attempt: it is open until `until`, or half-open with every
/// probe slot taken (then `until` is the time of the refusal: it changes as soon as a
/// probe reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker open")]
pub struct BreakerOpen {
    /// The earliest time the breaker may grant an attempt again.
    pub until: Instant,
}

/// The breaker as seen at one instant, for `/admin/state` and metrics (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSnapshot {
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// When it changes next on its own: the end of the open period; `None` otherwise.
    pub next_change: Option<Instant>,
    /// Time left until `next_change`.
    pub next_change_in: Option<Duration>,
    /// Probes granted and not reported (half-open only; 0 otherwise).
    pub probes_in_flight: u32,
    /// Failures in a row since the last success (reset when the breaker closes).
    pub consecutive_failures: u32,
    /// Requests reported within the failure-rate window (0 without that rule).
    pub window_requests: u32,
    /// Failures among them.
    pub window_failures: u32,
    /// Why the breaker last changed state, e.g. `5 consecutive failures`; `None` if it
    /// never has.
    pub reason: Option<String>,
}

/// A circuit breaker for one model (DESIGN.md §2).
///
/// `Send + Sync`, and a cheap handle: clones share the same state. Each call holds a
/// `std::sync::Mutex` for a few comparisons; state changes are logged after it is
/// released. Methods ending in `_at` take the current time (tests drive the clock);
/// the others read [`Instant::now`].
#[derive(Clone)]
pub struct CircuitBreaker {
    shared: Arc<Shared>,
}

/// Permission for one attempt, from [`CircuitBreaker::try_acquire`].
///
/// Hand it back to [`CircuitBreaker::record`] with the outcome. Dropping it instead
/// (the request was cancelled, or failed for a reason that says nothing about the
/// model) reports nothing, but frees its probe slot if it was a half-open probe.
#[must_use = "report the attempt's outcome with CircuitBreaker::record"]
pub struct BreakerPermit {
    shared: Arc<Shared>,
    /// The state generation it was granted in; outcomes from an earlier one are stale.
    epoch: u64,
    probe: bool,
    settled: bool,
    /// Granted by the shared breaker: its epoch there.
    remote: Option<i64>,
}

struct Shared {
    name: String,
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    /// The fleet-wide breaker in Redis, when the state is shared.
    remote: Option<(Arc<RedisState>, String)>,
    /// What the shared breaker last answered (state, consecutive failures), for
    /// `/admin/state`.
    seen: Mutex<Option<(BreakerState, u32)>>,
}

struct Inner {
    state: BreakerState,
    /// Bumped on every state change.
    epoch: u64,
    consecutive_failures: u32,
    /// `[requests, failures]` over the failure-rate window, with that rule only.
    window: Option<Window<2>>,
    reason: Option<String>,
}

/// A state change, logged once the lock is released.
enum Transition {
    Opened { reason: String, recovery: Duration },
    HalfOpened,
    Closed { reason: &'static str },
}

impl CircuitBreaker {
    /// A closed breaker for the model `name` (used in logs only).
    pub fn new(name: impl Into<String>, settings: BreakerSettings) -> Self {
        let settings = sanitize(settings);
        let window = settings
            .failure_rate
            .as_ref()
            .map(|rate| Window::new(rate.window));
        CircuitBreaker {
            shared: Arc::new(Shared {
                name: name.into(),
                inner: Mutex::new(Inner {
                    state: BreakerState::Closed,
                    epoch: 0,
                    consecutive_failures: 0,
                    window,
                    reason: None,
                }),
                settings,
                remote: None,
                seen: Mutex::new(None),
            }),
        }
    }

    /// A closed breaker whose state is shared by every replica through the hash `key`
    /// in Redis; this process's own state is the fallback while Redis is down.
    pub fn with_shared(
        name: impl Into<String>,
        settings: BreakerSettings,
        state: Arc<RedisState>,
        key: String,
    ) -> Self {
        let mut b = CircuitBreaker::new(name, settings);
        if let Some(shared) = Arc::get_mut(&mut b.shared) {
            shared.remote = Some((state, key));
        }
        b
    }

    /// The shared state backend its state lives in, if it is shared.
    pub fn shared_state(&self) -> Option<&Arc<RedisState>> {
        self.shared.remote.as_ref().map(|(state, _)| state)
    }

    /// Whether the breaker's state is shared through Redis.
    pub fn is_shared(&self) -> bool {
        self.shared.remote.is_some()
    }

    /// Asks whether an attempt may start: the shared breaker when there is one and Redis
    /// answers, else [`try_acquire`](Self::try_acquire).
    ///
    /// # Errors
    /// `Ok(Err(BreakerOpen))` when refused; `Err(Unavailable)` when Redis did not
    /// answer and `state.on_unavailable` is `reject`.
    pub async fn acquire(&self) -> Result<Result<BreakerPermit, BreakerOpen>, Unavailable> {
        let Some(step) = self.shared_step() else {
            return Ok(self.try_acquire());
        };
        let Some((state, _)) = &self.shared.remote else {
            return Ok(self.try_acquire());
        };
        let args: Vec<&dyn ToRedisArgsDyn> =
            step.args.iter().map(|a| a as &dyn ToRedisArgsDyn).collect();
        let answer: Result<Vec<i64>, Unavailable> =
            state.run(&BREAKER_SCRIPT, &[&step.key], &args).await;
        match answer.ok().and_then(|v| self.shared_answer(&v)) {
            Some(granted) => Ok(granted),
            None => {
                state.fallback()?;
                Ok(self.try_acquire())
            }
        }
    }

    /// The shared breaker's `acquire` as one step of a combined admission
    /// (`state::batch`); `None` when the breaker is not shared.
    pub fn shared_step(&self) -> Option<Step> {
        let (_, key) = self.shared.remote.as_ref()?;
        Some(Step {
            kind: StepKind::Breaker,
            key: key.clone(),
            args: vec![
                Arg::S("acquire".to_owned()),
                Arg::I(i64::from(self.shared.settings.half_open_requests)),
            ],
        })
    }

    /// Reads the shared breaker's answer to `acquire` (`{granted, probe, epoch, ms
    /// until it may grant}`): a permit, or open until when. `None` when the answer is
    /// not of that shape.
    pub fn shared_answer(&self, v: &[i64]) -> Option<Result<BreakerPermit, BreakerOpen>> {
        if v.len() != 4 {
            return None;
        }
        let wait = Duration::from_millis(u64::try_from(v[3]).unwrap_or(0));
        let seen = match (v[0], v[1]) {
            (1, 0) => BreakerState::Closed,
            (0, _) if !wait.is_zero() => BreakerState::Open {
                until: Instant::now() + wait,
            },
            _ => BreakerState::HalfOpen {
                probes_in_flight: 1,
            },
        };
        self.shared.see(seen, None);
        Some(if v[0] == 1 {
            Ok(BreakerPermit {
                shared: Arc::clone(&self.shared),
                epoch: 0,
                probe: v[1] == 1,
                settled: false,
                remote: Some(v[2]),
            })
        } else {
            Err(BreakerOpen {
                until: Instant::now() + wait,
            })
        })
    }

    /// Reports a permit of the shared breaker (in the background).
    fn record_remote(&self, epoch: i64, probe: bool, success: bool, rate_fired: bool) {
        let Some((state, key)) = &self.shared.remote else {
            return;
        };
        let settings = &self.shared.settings;
        let recovery = i64::try_from(settings.recovery_time.as_millis()).unwrap_or(i64::MAX);
        let (state, key, name) = (state.clone(), key.clone(), self.shared.name.clone());
        let me = Arc::clone(&self.shared);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let threshold = i64::from(settings.failure_threshold);
        handle.spawn(async move {
            let args: [&dyn crate::state::redis::ToRedisArgsDyn; 7] = [
                &"record",
                &epoch,
                &if probe { "1" } else { "0" },
                &if success { "1" } else { "0" },
                &threshold,
                &recovery,
                &if rate_fired { "1" } else { "0" },
            ];
            let answer: Result<Vec<i64>, Unavailable> =
                state.run(&BREAKER_SCRIPT, &[&key], &args).await;
            if let Ok(v) = &answer
                && v.len() == 4
            {
                let seen = match v[1] {
                    0 => BreakerState::Closed,
                    1 => BreakerState::Open {
                        until: Instant::now()
                            + Duration::from_millis(u64::try_from(recovery).unwrap_or(0)),
                    },
                    _ => BreakerState::HalfOpen {
                        probes_in_flight: 0,
                    },
                };
                me.see(seen, Some(u32::try_from(v[2]).unwrap_or(u32::MAX)));
            }
            if let Ok(v) = answer
                && v.len() == 4
                && v[0] != v[1]
            {
                match v[1] {
                    1 => tracing::warn!(
                        model = %name,
                        consecutive_failures = v[2],
                        recovery_secs = recovery as f64 / 1000.0,
                        "circuit breaker opened (shared): {}",
                        if probe { "probe failed" } else { "failures" }
                    ),
                    0 => tracing::info!(model = %name, "circuit breaker closed (shared): probe succeeded"),
                    _ => {}
                }
            }
        });
    }

    /// The model name given to [`new`](Self::new).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The settings in force (0 thresholds raised to 1, rates clamped).
    pub fn settings(&self) -> &BreakerSettings {
        &self.shared.settings
    }

    /// Asks whether an attempt may start at `now`.
    ///
    /// Closed: granted. Open before `until`: refused with that `until`. Open at or
    /// after `until`: turns half-open and grants a probe. Half-open: grants a probe
    /// while fewer than `half_open_requests` are in flight, otherwise refused.
    pub fn try_acquire_at(&self, now: Instant) -> Result<BreakerPermit, BreakerOpen> {
        let mut inner = self.shared.lock();
        let transition = self.shared.advance(&mut inner, now);
        let result = match &mut inner.state {
            BreakerState::Closed => Ok(false),
            BreakerState::Open { until } => Err(BreakerOpen { until: *until }),
            BreakerState::HalfOpen { probes_in_flight } => {
                if *probes_in_flight < self.shared.settings.half_open_requests {
                    *probes_in_flight += 1;
                    Ok(true)
                } else {
                    Err(BreakerOpen { until: now })
                }
            }
        };
        let epoch = inner.epoch;
        drop(inner);
        self.shared.log(transition);
        result.map(|probe| BreakerPermit {
            shared: Arc::clone(&self.shared),
            epoch,
            probe,
            settled: false,
            remote: None,
        })
    }

    /// [`try_acquire_at`](Self::try_acquire_at) now.
    pub fn try_acquire(&self) -> Result<BreakerPermit, BreakerOpen> {
        self.try_acquire_at(Instant::now())
    }

    /// Reports the outcome of a permitted attempt, at `now`.
    ///
    /// Closed: a success resets the consecutive-failure count; a failure increments
    /// it and opens the breaker for `recovery_time` at `failure_threshold`, or when the
    /// failure-rate rule fires. Half-open: a probe success closes the breaker and
    /// resets its counts; a probe failure opens it for another `recovery_time`.
    /// Outcomes of attempts granted before the last state change are ignored (the
    /// breaker has already decided), as is a permit from another breaker.
    pub fn record_at(&self, mut permit: BreakerPermit, success: bool, now: Instant) {
        if !Arc::ptr_eq(&permit.shared, &self.shared) {
            tracing::debug!(
                model = %self.shared.name,
                "circuit breaker: ignored a permit from another breaker"
            );
            return;
        }
        permit.settled = true;
        let settings = &self.shared.settings;
        let mut inner = self.shared.lock();
        if let Some(epoch) = permit.remote {
            // The failure-rate rule is counted here; the shared script does the rest.
            let mut rate_fired = false;
            if !permit.probe
                && let (Some(window), Some(rate)) = (&mut inner.window, &settings.failure_rate)
            {
                window.add_at(now, [1, u64::from(!success)]);
                let (requests, failures) = totals(window, now);
                rate_fired = !success
                    && requests >= rate.min_requests
                    && f64::from(failures) >= rate.threshold * f64::from(requests);
            }
            drop(inner);
            self.record_remote(epoch, permit.probe, success, rate_fired);
            return;
        }
        if permit.epoch != inner.epoch {
            return;
        }
        let transition = if permit.probe {
            if success {
                Some(inner.close("probe succeeded"))
            } else {
                Some(inner.open(now, settings.recovery_time, "probe failed".to_owned()))
            }
        } else {
            let mut rate_reason = None;
            if let (Some(window), Some(rate)) = (&mut inner.window, &settings.failure_rate) {
                window.add_at(now, [1, u64::from(!success)]);
                if !success {
                    let (requests, failures) = totals(window, now);
                    if requests >= rate.min_requests
                        && f64::from(failures) >= rate.threshold * f64::from(requests)
                    {
                        let pct = (100.0 * f64::from(failures) / f64::from(requests)).round();
                        rate_reason = Some(format!(
                            "failure rate {pct}% over {requests} requests in {} s",
                            rate.window.as_secs_f64()
                        ));
                    }
                }
            }
            if success {
                inner.consecutive_failures = 0;
                None
            } else {
                inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
                let reason = if inner.consecutive_failures >= settings.failure_threshold {
                    Some(format!(
                        "{} consecutive failures",
                        inner.consecutive_failures
                    ))
                } else {
                    rate_reason
                };
                reason.map(|reason| inner.open(now, settings.recovery_time, reason))
            }
        };
        drop(inner);
        self.shared.log(transition);
    }

    /// [`record_at`](Self::record_at) now.
    pub fn record(&self, permit: BreakerPermit, success: bool) {
        self.record_at(permit, success, Instant::now());
    }

    /// The state at `now` (an open breaker past its `until` turns half-open here).
    pub fn state_at(&self, now: Instant) -> BreakerState {
        let mut inner = self.shared.lock();
        let transition = self.shared.advance(&mut inner, now);
        let state = inner.state;
        drop(inner);
        self.shared.log(transition);
        state
    }

    /// The breaker at `now`, for `/admin/state` (an open breaker past its `until`
    /// turns half-open here).
    pub fn snapshot_at(&self, now: Instant) -> BreakerSnapshot {
        if let (Some((state, _)), Some((seen, failures))) = (
            &self.shared.remote,
            *self
                .shared
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        ) && state.is_up()
        {
            // Shared: what Redis last answered (an open period past its end shows as
            // half-open, as the script will turn it at the next attempt).
            let seen = match seen {
                BreakerState::Open { until } if now >= until => BreakerState::HalfOpen {
                    probes_in_flight: 0,
                },
                s => s,
            };
            let next_change = match seen {
                BreakerState::Open { until } => Some(until),
                _ => None,
            };
            return BreakerSnapshot {
                state: seen.name(),
                next_change,
                next_change_in: next_change.map(|u| u.saturating_duration_since(now)),
                probes_in_flight: match seen {
                    BreakerState::HalfOpen { probes_in_flight } => probes_in_flight,
                    _ => 0,
                },
                consecutive_failures: failures,
                window_requests: 0,
                window_failures: 0,
                reason: Some("shared through Redis: as last answered there".to_owned()),
            };
        }
        let mut inner = self.shared.lock();
        let transition = self.shared.advance(&mut inner, now);
        let (window_requests, window_failures) = inner
            .window
            .as_ref()
            .map_or((0, 0), |window| totals(window, now));
        let (next_change, probes_in_flight) = match inner.state {
            BreakerState::Closed => (None, 0),
            BreakerState::Open { until } => (Some(until), 0),
            BreakerState::HalfOpen { probes_in_flight } => (None, probes_in_flight),
        };
        let snapshot = BreakerSnapshot {
            state: inner.state.name(),
            next_change,
            next_change_in: next_change.map(|until| until.saturating_duration_since(now)),
            probes_in_flight,
            consecutive_failures: inner.consecutive_failures,
            window_requests,
            window_failures,
            reason: inner.reason.clone(),
        };
        drop(inner);
        self.shared.log(transition);
        snapshot
    }

    /// [`snapshot_at`](Self::snapshot_at) now.
    pub fn snapshot(&self) -> BreakerSnapshot {
        self.snapshot_at(Instant::now())
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock().state;
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.name)
            .field("state", &state)
            .finish()
    }
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("model", &self.shared.name)
            .field("probe", &self.probe)
            .finish()
    }
}

impl Drop for BreakerPermit {
    /// An unreported probe gives its slot back, so a cancelled probe cannot leave the
    /// breaker half-open with no slot free.
    fn drop(&mut self) {
        if self.settled || !self.probe {
            return;
        }
        if let (Some(epoch), Some((state, key))) = (self.remote, &self.shared.remote) {
            state.spawn_run(
                &BREAKER_SCRIPT,
                vec![key.clone()],
                vec![Arg::S("release".to_owned()), Arg::I(epoch)],
            );
            return;
        }
        let mut inner = self.shared.lock();
        if inner.epoch == self.epoch
            && let BreakerState::HalfOpen { probes_in_flight } = &mut inner.state
        {
            *probes_in_flight = probes_in_flight.saturating_sub(1);
        }
    }
}

impl Shared {
    /// Keeps what the shared breaker answered (`failures`: when it said).
    fn see(&self, state: BreakerState, failures: Option<u32>) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let failures = failures.or_else(|| seen.map(|(_, f)| f)).unwrap_or(0);
        *seen = Some((state, failures));
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state whole before the next statement can panic, so
        // a poisoned lock still guards a consistent state.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Turns an open breaker half-open once its `until` has come.
    fn advance(&self, inner: &mut Inner, now: Instant) -> Option<Transition> {
        match inner.state {
            BreakerState::Open { until } if now >= until => {
                inner.state = BreakerState::HalfOpen {
                    probes_in_flight: 0,
                };
                inner.epoch += 1;
                inner.reason = Some("recovery time elapsed".to_owned());
                Some(Transition::HalfOpened)
            }
            _ => None,
        }
    }

    fn log(&self, transition: Option<Transition>) {
        let model = self.name.as_str();
        match transition {
            None => {}
            Some(Transition::Opened { reason, recovery }) => tracing::warn!(
                model,
                reason = %reason,
                recovery_secs = recovery.as_secs_f64(),
                "circuit breaker opened: {reason}"
            ),
            Some(Transition::HalfOpened) => tracing::info!(
                model,
                probes = self.settings.half_open_requests,
                "circuit breaker half-open: recovery time elapsed, letting probes through"
            ),
            Some(Transition::Closed { reason }) => {
                tracing::info!(model, reason, "circuit breaker closed: {reason}")
            }
        }
    }
}

impl Inner {
    fn open(&mut self, now: Instant, recovery: Duration, reason: String) -> Transition {
        let until = now.checked_add(recovery).unwrap_or(now);
        self.state = BreakerState::Open { until };
        self.epoch += 1;
        self.reason = Some(reason.clone());
        Transition::Opened { reason, recovery }
    }

    fn close(&mut self, reason: &'static str) -> Transition {
        self.state = BreakerState::Closed;
        self.epoch += 1;
        self.consecutive_failures = 0;
        if let Some(window) = &mut self.window {
            window.clear();
        }
        self.reason = Some(reason.to_owned());
        Transition::Closed { reason }
    }
}

/// Raises zero thresholds to 1, clamps the failure rate, caps the recovery time.
fn sanitize(mut settings: BreakerSettings) -> BreakerSettings {
    settings.failure_threshold = settings.failure_threshold.max(1);
    settings.half_open_requests = settings.half_open_requests.max(1);
    settings.recovery_time = settings.recovery_time.min(MAX_RECOVERY);
    if let Some(rate) = &mut settings.failure_rate {
        rate.threshold = if rate.threshold.is_nan() {
            1.0
        } else {
            rate.threshold.clamp(0.0, 1.0)
        };
        rate.min_requests = rate.min_requests.max(1);
    }
    settings
}

/// Requests and failures in `window` at `now`, each saturated at `u32::MAX`.
fn totals(window: &Window<2>, now: Instant) -> (u32, u32) {
    let [requests, failures] = window
        .totals_at(now)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    (requests, failures)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn settings(threshold: u32, recovery: u64, probes: u32) -> BreakerSettings {
        BreakerSettings {
            failure_threshold: threshold,
            recovery_time: secs(recovery),
            half_open_requests: probes,
            failure_rate: None,
        }
    }

    fn fail(b: &CircuitBreaker, now: Instant) {
        let permit = b.try_acquire_at(now).unwrap();
        b.record_at(permit, false, now);
    }

    fn succeed(b: &CircuitBreaker, now: Instant) {
        let permit = b.try_acquire_at(now).unwrap();
        b.record_at(permit, true, now);
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CircuitBreaker>();
        check::<BreakerPermit>();
    }

    #[test]
    fn default_settings_are_the_seed_example() {
        let s = BreakerSettings::default();
        assert_eq!(s.failure_threshold, 5);
        assert_eq!(s.recovery_time, secs(60));
        assert_eq!(s.half_open_requests, 1);
        assert_eq!(s.failure_rate, None);
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let b = CircuitBreaker::new("m", settings(3, 60, 1));
        let t0 = Instant::now();
        fail(&b, t0);
        fail(&b, t0);
        assert_eq!(b.state_at(t0), BreakerState::Closed);
        fail(&b, t0);
        assert_eq!(
            b.state_at(t0),
            BreakerState::Open {
                until: t0 + secs(60)
            }
        );
        let err = b.try_acquire_at(t0 + secs(59)).unwrap_err();
        assert_eq!(err.until, t0 + secs(60));
        let snap = b.snapshot_at(t0 + secs(10));
        assert_eq!(snap.state, "open");
        assert_eq!(snap.next_change_in, Some(secs(50)));
        assert_eq!(snap.consecutive_failures, 3);
        assert_eq!(snap.reason.as_deref(), Some("3 consecutive failures"));
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let b = CircuitBreaker::new("m", settings(3, 60, 1));
        let t0 = Instant::now();
        for _ in 0..5 {
            fail(&b, t0);
            fail(&b, t0);
            succeed(&b, t0);
        }
        assert_eq!(b.state_at(t0), BreakerState::Closed);
        assert_eq!(b.snapshot_at(t0).consecutive_failures, 0);
    }

    #[test]
    fn half_open_after_recovery_time_grants_only_the_probes() {
        let b = CircuitBreaker::new("m", settings(1, 60, 2));
        let t0 = Instant::now();
        fail(&b, t0);
        assert!(b.try_acquire_at(t0 + secs(59)).is_err());
        let t1 = t0 + secs(60);
        let p1 = b.try_acquire_at(t1).unwrap();
        let p2 = b.try_acquire_at(t1).unwrap();
        assert_eq!(b.try_acquire_at(t1).unwrap_err().until, t1);
        assert_eq!(
            b.state_at(t1),
            BreakerState::HalfOpen {
                probes_in_flight: 2
            }
        );
        let snap = b.snapshot_at(t1);
        assert_eq!((snap.state, snap.probes_in_flight), ("half_open", 2));
        b.record_at(p1, true, t1);
        assert_eq!(b.state_at(t1), BreakerState::Closed);
        // The other probe's late outcome belongs to a finished half-open period.
        b.record_at(p2, false, t1);
        assert_eq!(b.state_at(t1), BreakerState::Closed);
        assert_eq!(b.snapshot_at(t1).consecutive_failures, 0);
        assert_eq!(b.snapshot_at(t1).reason.as_deref(), Some("probe succeeded"));
    }

    #[test]
    fn a_failed_probe_reopens_for_another_recovery_time() {
        let b = CircuitBreaker::new("m", settings(1, 30, 1));
        let t0 = Instant::now();
        fail(&b, t0);
        let t1 = t0 + secs(30);
        let probe = b.try_acquire_at(t1).unwrap();
        b.record_at(probe, false, t1 + secs(2));
        assert_eq!(
            b.state_at(t1 + secs(2)),
            BreakerState::Open {
                until: t1 + secs(32)
            }
        );
        assert_eq!(b.snapshot_at(t1).reason.as_deref(), Some("probe failed"));
        assert!(b.try_acquire_at(t1 + secs(31)).is_err());
        assert!(b.try_acquire_at(t1 + secs(32)).is_ok());
    }

    #[test]
    fn a_dropped_probe_frees_its_slot() {
        let b = CircuitBreaker::new("m", settings(1, 10, 1));
        let t0 = Instant::now();
        fail(&b, t0);
        let t1 = t0 + secs(10);
        let probe = b.try_acquire_at(t1).unwrap();
        assert!(b.try_acquire_at(t1).is_err());
        drop(probe);
        assert_eq!(
            b.state_at(t1),
            BreakerState::HalfOpen {
                probes_in_flight: 0
            }
        );
        assert!(b.try_acquire_at(t1).is_ok());
    }

    #[test]
    fn a_stale_probe_dropped_later_does_not_free_a_newer_slot() {
        let b = CircuitBreaker::new("m", settings(1, 10, 2));
        let t0 = Instant::now();
        fail(&b, t0);
        let t1 = t0 + secs(10);
        let failing = b.try_acquire_at(t1).unwrap();
        let stale = b.try_acquire_at(t1).unwrap();
        b.record_at(failing, false, t1); // reopens until t1 + 10
        let t2 = t1 + secs(10);
        let _a = b.try_acquire_at(t2).unwrap();
        let _b = b.try_acquire_at(t2).unwrap();
        drop(stale);
        assert_eq!(
            b.state_at(t2),
            BreakerState::HalfOpen {
                probes_in_flight: 2
            }
        );
        assert!(b.try_acquire_at(t2).is_err());
    }

    #[test]
    fn outcomes_granted_before_the_breaker_opened_are_ignored() {
        let b = CircuitBreaker::new("m", settings(2, 60, 1));
        let t0 = Instant::now();
        let late = b.try_acquire_at(t0).unwrap();
        fail(&b, t0);
        fail(&b, t0);
        b.record_at(late, false, t0 + secs(30));
        // The late failure neither extends the open period nor counts.
        assert_eq!(
            b.state_at(t0),
            BreakerState::Open {
                until: t0 + secs(60)
            }
        );
        assert_eq!(b.snapshot_at(t0).consecutive_failures, 2);
    }

    #[test]
    fn zero_thresholds_are_taken_as_one() {
        let b = CircuitBreaker::new("m", settings(0, 5, 0));
        let t0 = Instant::now();
        fail(&b, t0);
        assert_eq!(b.state_at(t0).name(), "open");
        let _probe = b.try_acquire_at(t0 + secs(5)).unwrap();
        assert!(b.try_acquire_at(t0 + secs(5)).is_err());
    }

    fn rate_settings() -> BreakerSettings {
        BreakerSettings {
            failure_threshold: 100,
            recovery_time: secs(60),
            half_open_requests: 1,
            failure_rate: Some(FailureRate {
                threshold: 0.5,
                window: secs(10),
                min_requests: 10,
            }),
        }
    }

    #[test]
    fn failure_rate_opens_once_min_requests_is_reached() {
        let b = CircuitBreaker::new("m", rate_settings());
        let t0 = Instant::now();
        // Alternating, so never two failures in a row; 50% after 10 requests.
        for i in 0..9u64 {
            let now = t0 + Duration::from_millis(100 * i);
            if i % 2 == 0 {
                fail(&b, now)
            } else {
                succeed(&b, now)
            }
        }
        // 9 requests, 5 failures: above the threshold but below min_requests.
        let snap = b.snapshot_at(t0 + secs(1));
        assert_eq!(
            (snap.state, snap.window_requests, snap.window_failures),
            ("closed", 9, 5)
        );
        succeed(&b, t0 + secs(1));
        assert_eq!(
            b.state_at(t0 + secs(1)),
            BreakerState::Closed,
            "successes never open it"
        );
        fail(&b, t0 + secs(1));
        assert_eq!(b.state_at(t0 + secs(1)).name(), "open");
        assert_eq!(
            b.snapshot_at(t0 + secs(1)).reason.as_deref(),
            Some("failure rate 55% over 11 requests in 10 s")
        );
    }

    #[test]
    fn failure_rate_below_threshold_stays_closed() {
        let b = CircuitBreaker::new("m", rate_settings());
        let t0 = Instant::now();
        for i in 0..40u64 {
            let now = t0 + Duration::from_millis(50 * i);
            // 1 failure in 3: 33% < 50%.
            if i % 3 == 0 {
                fail(&b, now)
            } else {
                succeed(&b, now)
            }
        }
        assert_eq!(b.state_at(t0 + secs(2)), BreakerState::Closed);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let b = CircuitBreaker::new("m", rate_settings());
        let t0 = Instant::now();
        for _ in 0..4 {
            fail(&b, t0);
            succeed(&b, t0);
        }
        assert_eq!(
            b.snapshot_at(t0 + Duration::from_millis(9_999))
                .window_requests,
            8
        );
        // A window later those 8 requests have expired: 2 new failures are below
        // min_requests and must not open it.
        let t1 = t0 + secs(10);
        assert_eq!(b.snapshot_at(t1).window_requests, 0);
        succeed(&b, t1);
        fail(&b, t1);
        fail(&b, t1);
        assert_eq!(b.state_at(t1), BreakerState::Closed);
        assert_eq!(b.snapshot_at(t1).window_failures, 2);
    }

    #[test]
    fn closing_clears_the_window() {
        let b = CircuitBreaker::new(
            "m",
            BreakerSettings {
                recovery_time: secs(1),
                ..rate_settings()
            },
        );
        let t0 = Instant::now();
        for _ in 0..10 {
            fail(&b, t0);
        }
        assert_eq!(b.state_at(t0).name(), "open");
        // Still within the window of those 10 failures.
        let t1 = t0 + secs(1);
        succeed(&b, t1);
        let snap = b.snapshot_at(t1);
        assert_eq!((snap.state, snap.window_requests), ("closed", 0));
        // One failure after closing must not reopen on the old window's rate.
        fail(&b, t1);
        assert_eq!(b.state_at(t1), BreakerState::Closed);
    }

    #[test]
    fn a_permit_from_another_breaker_is_ignored() {
        let a = CircuitBreaker::new("a", settings(1, 60, 1));
        let b = CircuitBreaker::new("b", settings(1, 60, 1));
        let t0 = Instant::now();
        let permit = a.try_acquire_at(t0).unwrap();
        b.record_at(permit, false, t0);
        assert_eq!(a.state_at(t0), BreakerState::Closed);
        assert_eq!(b.state_at(t0), BreakerState::Closed);
    }

    #[test]
    fn clones_share_state() {
        let a = CircuitBreaker::new("m", settings(1, 60, 1));
        let b = a.clone();
        fail(&a, Instant::now());
        assert_eq!(b.state_at(Instant::now()).name(), "open");
    }

    /// Opens a breaker allowing `probes` half-open probes, then lets 16 threads race
    /// `try_acquire_at` at the same instant, just past the recovery time. Returns the
    /// breaker, that instant, the permits granted and the refusals.
    fn race_for_probes(
        probes: u32,
    ) -> (
        CircuitBreaker,
        Instant,
        Vec<BreakerPermit>,
        Vec<BreakerOpen>,
    ) {
        const THREADS: usize = 16;
        let b = CircuitBreaker::new("m", settings(1, 30, probes));
        let t0 = Instant::now();
        fail(&b, t0);
        assert_eq!(b.state_at(t0).name(), "open");
        let t1 = t0 + secs(30);
        let barrier = std::sync::Barrier::new(THREADS);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let b = b.clone();
                    let barrier = &barrier;
                    // Each thread keeps what it got until the race is over: a permit
                    // dropped early would free its slot for a later thread.
                    scope.spawn(move || {
                        barrier.wait();
                        b.try_acquire_at(t1)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut granted = Vec::new();
        let mut refused = Vec::new();
        for result in results {
            match result {
                Ok(permit) => granted.push(permit),
                Err(open) => refused.push(open),
            }
        }
        (b, t1, granted, refused)
    }

    #[test]
    fn exactly_the_half_open_probes_are_granted_under_concurrent_requests() {
        for probes in [1, 3] {
            // Repeated: each round is a fresh race between the threads.
            for _ in 0..20 {
                let (b, t1, granted, refused) = race_for_probes(probes);
                assert_eq!(granted.len(), probes as usize, "{probes} probe(s) allowed");
                assert_eq!(refused.len(), 16 - probes as usize);
                assert!(granted.iter().all(|permit| permit.probe));
                // Refused while half-open with every slot taken: `until` is now.
                assert!(refused.iter().all(|open| open.until == t1));
                assert_eq!(
                    b.state_at(t1),
                    BreakerState::HalfOpen {
                        probes_in_flight: probes
                    }
                );
                assert!(b.try_acquire_at(t1).is_err(), "no slot left after the race");
            }
        }
    }

    #[test]
    fn one_successful_probe_out_of_a_concurrent_race_closes_the_breaker() {
        for probes in [1, 3] {
            let (b, t1, granted, _) = race_for_probes(probes);
            assert_eq!(granted.len(), probes as usize);
            let mut granted = granted.into_iter();
            b.record_at(granted.next().unwrap(), true, t1);
            assert_eq!(b.state_at(t1), BreakerState::Closed);
            assert_eq!(b.snapshot_at(t1).reason.as_deref(), Some("probe succeeded"));
            // The other probes' late outcomes (even failures) no longer count.
            for permit in granted {
                b.record_at(permit, false, t1);
            }
            assert_eq!(b.state_at(t1), BreakerState::Closed);
            assert_eq!(b.snapshot_at(t1).consecutive_failures, 0);
            // Closed: everyone goes through again.
            for _ in 0..16 {
                let permit = b.try_acquire_at(t1).unwrap();
                assert!(!permit.probe);
            }
        }
    }

    #[test]
    fn one_failed_probe_out_of_a_concurrent_race_reopens_the_breaker() {
        for probes in [1, 3] {
            let (b, t1, granted, _) = race_for_probes(probes);
            assert_eq!(granted.len(), probes as usize);
            let mut granted = granted.into_iter();
            b.record_at(granted.next().unwrap(), false, t1);
            let reopened = BreakerState::Open {
                until: t1 + secs(30),
            };
            assert_eq!(b.state_at(t1), reopened);
            assert_eq!(b.snapshot_at(t1).reason.as_deref(), Some("probe failed"));
            // The other probes' late successes do not close it again.
            for permit in granted {
                b.record_at(permit, true, t1);
            }
            assert_eq!(b.state_at(t1), reopened);
            assert_eq!(
                b.try_acquire_at(t1 + secs(29)).unwrap_err().until,
                t1 + secs(30)
            );
        }
    }
}
