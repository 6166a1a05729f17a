//! Token bucket: the rate limiter behind a model's RPM and TPM limits.
//!
//! DESIGN.md §2 "token bucket" (`capacity` tokens, refilled at `refill_rate` per second)
//! and seed 004 `TokenBucket` (provider.json `rate_limit_capacity` /
//! `rate_limit_refill_rate`). An RPM limit is a bucket of `rpm` tokens refilled at
//! `rpm / 60` per second, one token per request; a TPM limit reserves the estimated
//! tokens of a request up front and settles with [`TokenBucket::refund`] /
//! [`TokenBucket::charge`] once the real usage is known.
//!
//! Waiting ([`TokenBucket::acquire`]) is first come, first served: a waiter reserves its
//! tokens at once (the level may go below zero) and sleeps until the refill has paid
//! them back, so a large request is never starved by a stream of small ones and nobody
//! polls.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::Script;

use tokio::time::Instant;

use crate::state::batch::{Step, StepKind};
use crate::state::redis::{Arg, NOW_MS, RedisState, Unavailable};

/// Slack for floating-point rounding when comparing a level with a request (tokens).
const EPSILON: f64 = 1e-9;

/// A token bucket: at most `capacity` tokens, refilled continuously at `refill_per_sec`.
///
/// `Send + Sync`; share it behind an `Arc`. Every operation takes a `std::sync::Mutex`
/// for a few arithmetic operations and never awaits while holding it.
///
/// Methods ending in `_at` take the current time, so tests can drive the clock; the
/// others read [`Instant::now`]. All instants given to one bucket must come from the
/// same clock; an instant earlier than one already seen counts as no time passed.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    refill_per_sec: f64,
    level: Mutex<Level>,
    /// The fleet-wide bucket in Redis, when the state is shared (issue 15); the local
    /// level above is then the fallback (its limits divided by `state.replicas`).
    shared: Option<SharedBucket>,
}

/// A bucket's fleet-wide twin: a Redis hash `{t: tokens, a: as of (ms, Redis TIME)}`.
#[derive(Debug)]
struct SharedBucket {
    state: Arc<RedisState>,
    key: String,
    capacity: f64,
    refill_per_sec: f64,
    /// How long the hash outlives its last write (ms): a full refill plus a minute.
    ttl_ms: i64,
}

/// Where [`TokenBucket::take`] took its tokens, so that they are settled there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// From this process's level.
    Local,
    /// From the fleet-wide bucket in Redis.
    Shared,
}

/// The bucket's Lua function `bucket(key, args)`, the body of [`BUCKET_SCRIPT`] and one
/// step of the combined admission script (`state::batch`); `args` are `{op, capacity,
/// refill/s, n, max wait ms, ttl ms}` and `now` is the prelude's Redis `TIME`.
pub(crate) const BUCKET_LUA: &str = r#"
local function bucket(k, A)
local cap = tonumber(A[2]); local rate = tonumber(A[3]); local n = tonumber(A[4])
local h = redis.call('HMGET', k, 't', 'a')
local tokens = tonumber(h[1]); local at = tonumber(h[2])
if tokens == nil or at == nil then tokens = cap; at = now end
if now > at then
  if tokens < cap then tokens = math.min(cap, tokens + (now - at) / 1000 * rate) end
  at = now
end
local op = A[1]; local result = 0
if op == 'reserve' then
  if n > cap then return -1 end
  local deficit = n - tokens
  if deficit > 1e-9 then
    if rate <= 0 then return -1 end
    result = math.ceil(deficit / rate * 1000)
  end
  if result > tonumber(A[5]) then return -1 end
  tokens = tokens - n
elseif op == 'refund' then
  tokens = math.min(cap, tokens + n)
else
  tokens = tokens - n
end
redis.call('HSET', k, 't', tostring(tokens), 'a', tostring(at))
redis.call('PEXPIRE', k, tonumber(A[6]))
return result
end
"#;

/// The bucket's one script: `reserve` (the wait in ms, or -1: refused), `refund` and
/// `charge`, each after refilling up to Redis `TIME`; the same arithmetic as
/// [`TokenBucket::reserve_at`], [`TokenBucket::refund_at`] and
/// [`TokenBucket::charge_at`].
static BUCKET_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{NOW_MS}{BUCKET_LUA}return bucket(KEYS[1], ARGV)\n"
    ))
});

/// The mutable part: the level (tokens, may be negative) as of `at`.
#[derive(Debug)]
struct Level {
    tokens: f64,
    at: Instant,
}

/// Why [`TokenBucket::acquire`] gave up: the tokens could not be had within `max_wait`
/// (or never: more than the capacity was asked for, or the bucket never refills).
///
/// It fails at once, without sleeping, when the wait it would need already exceeds
/// `max_wait` (seed 004: acquire with a timeout).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("token bucket: {needed} tokens not available within {} ms", max_wait.as_millis())]
pub struct AcquireTimeout {
    /// The tokens asked for.
    pub needed: f64,
    /// The longest the caller was willing to wait.
    pub max_wait: Duration,
}

impl TokenBucket {
    /// A bucket holding at most `capacity` tokens, refilled at `refill_per_sec` tokens
    /// per second; it starts full.
    ///
    /// Both should be > 0 (config validation rejects anything else). Here a negative or
    /// NaN value is taken as 0: a capacity of 0 grants nothing but zero-token requests,
    /// a refill of 0 never refills. Infinite values mean "no limit".
    pub fn new(capacity: f64, refill_per_sec: f64) -> Self {
        let capacity = non_negative(capacity);
        TokenBucket {
            capacity,
            refill_per_sec: non_negative(refill_per_sec),
            level: Mutex::new(Level {
                tokens: capacity,
                at: Instant::now(),
            }),
            shared: None,
        }
    }

    /// This bucket (the in-process fallback) with a fleet-wide twin under `key` in
    /// Redis, of `capacity` tokens refilled at `refill_per_sec` (the full limits; this
    /// bucket's own are the limits divided by `state.replicas`).
    pub fn with_shared(
        mut self,
        state: Arc<RedisState>,
        key: String,
        capacity: f64,
        refill_per_sec: f64,
    ) -> Self {
        let capacity = non_negative(capacity);
        let refill_per_sec = non_negative(refill_per_sec);
        let full = if refill_per_sec > 0.0 {
            (capacity / refill_per_sec * 1000.0).min(86_400_000.0)
        } else {
            86_400_000.0
        };
        self.shared = Some(SharedBucket {
            state,
            key,
            capacity,
            refill_per_sec,
            ttl_ms: full as i64 + 60_000,
        });
        self
    }

    /// Whether the bucket has a fleet-wide twin in Redis.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Takes `n` tokens within `max_wait`, from the fleet-wide bucket when there is one
    /// and Redis answers, else from this process's level ([`acquire`](Self::acquire)).
    /// Dropped while it waits, it gives the tokens back where it took them.
    ///
    /// # Errors
    /// `Ok(Err(AcquireTimeout))` when the tokens are not to be had in time;
    /// `Err(Unavailable)` when Redis did not answer and `state.on_unavailable` is
    /// `reject`.
    pub async fn take(
        &self,
        n: f64,
        max_wait: Duration,
    ) -> Result<Result<Taken, AcquireTimeout>, Unavailable> {
        let Some(sh) = &self.shared else {
            return Ok(self.acquire(n, max_wait).await.map(|()| Taken::Local));
        };
        let timeout = AcquireTimeout {
            needed: n,
            max_wait,
        };
        if !(n.is_finite() && n <= sh.capacity) {
            return Ok(Err(timeout));
        }
        if n <= 0.0 {
            return Ok(Ok(Taken::Shared));
        }
        let max_ms = i64::try_from(max_wait.as_millis()).unwrap_or(i64::MAX);
        let answer: Result<i64, Unavailable> = sh
            .state
            .run(
                &BUCKET_SCRIPT,
                &[&sh.key],
                &[
                    &"reserve",
                    &sh.capacity,
                    &sh.refill_per_sec,
                    &n,
                    &max_ms,
                    &sh.ttl_ms,
                ],
            )
            .await;
        match answer {
            Ok(wait) if wait < 0 => Ok(Err(timeout)),
            Ok(0) => Ok(Ok(Taken::Shared)),
            Ok(wait) => {
                let mut guard = SharedRefund {
                    bucket: self,
                    tokens: n,
                };
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                guard.tokens = 0.0;
                Ok(Ok(Taken::Shared))
            }
            Err(Unavailable) => {
                sh.state.fallback()?;
                Ok(self.acquire(n, max_wait).await.map(|()| Taken::Local))
            }
        }
    }

    /// The fleet-wide `reserve` of `n` tokens within `max_wait`, as one step of a
    /// combined admission (`state::batch`; its answer is the wait in ms before the
    /// reserved tokens are paid back by the refill, 0 when they are there, -1 when
    /// refused). `None` when the bucket is not shared.
    pub fn shared_step(&self, n: f64, max_wait: Duration) -> Option<Step> {
        let sh = self.shared.as_ref()?;
        Some(Step {
            kind: StepKind::Bucket,
            key: sh.key.clone(),
            args: vec![
                Arg::S("reserve".to_owned()),
                Arg::F(sh.capacity),
                Arg::F(sh.refill_per_sec),
                Arg::F(n),
                Arg::I(i64::try_from(max_wait.as_millis()).unwrap_or(i64::MAX)),
                Arg::I(sh.ttl_ms),
            ],
        })
    }

    /// Gives back `n` tokens where they were taken ([`refund`](Self::refund) locally;
    /// in Redis in the background).
    pub fn refund_to(&self, at: Taken, n: f64) {
        match (at, &self.shared) {
            (Taken::Shared, Some(sh)) => sh.update("refund", n),
            _ => self.refund(n),
        }
    }

    /// Takes `n` more tokens where the reservation was taken ([`charge`](Self::charge)
    /// locally; in Redis in the background).
    pub fn charge_to(&self, at: Taken, n: f64) {
        match (at, &self.shared) {
            (Taken::Shared, Some(sh)) => sh.update("charge", n),
            _ => self.charge(n),
        }
    }

    /// A per-minute limit (RPM or TPM, DESIGN.md §2 echelon `rpm_limit`): a burst of
    /// `limit` tokens, refilled at `limit / 60` tokens per second.
    pub fn per_minute(limit: f64) -> Self {
        TokenBucket::new(limit, limit / 60.0)
    }

    /// The most tokens the bucket holds.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Tokens added per second.
    pub fn refill_per_sec(&self) -> f64 {
        self.refill_per_sec
    }

    /// The level in tokens after refilling up to `now`; negative while waiters hold
    /// reservations or after a [`charge`](Self::charge) beyond the level.
    pub fn available_at(&self, now: Instant) -> f64 {
        self.refilled(now).tokens
    }

    /// [`available_at`](Self::available_at) now.
    pub fn available(&self) -> f64 {
        self.available_at(Instant::now())
    }

    /// Takes `n` tokens if the level (refilled up to `now`) covers them and returns
    /// true; otherwise takes nothing and returns false. A request above the capacity
    /// (or not a number) can never be granted and returns false; `n <= 0` is granted
    /// and takes nothing.
    pub fn try_acquire_at(&self, n: f64, now: Instant) -> bool {
        if !self.grantable(n) {
            return false;
        }
        if n <= 0.0 {
            return true;
        }
        let mut level = self.refilled(now);
        if level.tokens + EPSILON >= n {
            level.tokens -= n;
            true
        } else {
            false
        }
    }

    /// [`try_acquire_at`](Self::try_acquire_at) now.
    pub fn try_acquire(&self, n: f64) -> bool {
        self.try_acquire_at(n, Instant::now())
    }

    /// How long from `now` until `n` tokens are available, if nobody else takes any:
    /// `Duration::ZERO` if they are available now, `None` if they never will be
    /// (`n` above the capacity, or a bucket that never refills).
    pub fn wait_time_at(&self, n: f64, now: Instant) -> Option<Duration> {
        if !self.grantable(n) {
            return None;
        }
        let level = self.refilled(now);
        self.wait_for(n, level.tokens)
    }

    /// [`wait_time_at`](Self::wait_time_at) now.
    pub fn wait_time(&self, n: f64) -> Option<Duration> {
        self.wait_time_at(n, Instant::now())
    }

    /// Reserves `n` tokens in order of arrival and returns how long after `now` the
    /// caller must wait before using them (`Duration::ZERO`: at once).
    ///
    /// The tokens are taken right away, so the level may go below zero and later
    /// callers queue behind this one. If that wait would exceed `max_wait`, or the
    /// tokens can never be granted, nothing is taken and it fails. A caller that
    /// reserves and then gives up must [`refund`](Self::refund) `n`.
    /// [`acquire`](Self::acquire) is this plus the sleep.
    pub fn reserve_at(
        &self,
        n: f64,
        max_wait: Duration,
        now: Instant,
    ) -> Result<Duration, AcquireTimeout> {
        let timeout = AcquireTimeout {
            needed: n,
            max_wait,
        };
        if !self.grantable(n) {
            return Err(timeout);
        }
        if n <= 0.0 {
            return Ok(Duration::ZERO);
        }
        let mut level = self.refilled(now);
        match self.wait_for(n, level.tokens) {
            Some(wait) if wait <= max_wait => {
                level.tokens -= n;
                Ok(wait)
            }
            _ => Err(timeout),
        }
    }

    /// Waits up to `max_wait` for `n` tokens and takes them (seed 004: acquire with a
    /// timeout).
    ///
    /// Callers are served first come, first served (see [`reserve_at`](Self::reserve_at)):
    /// it sleeps once, exactly as long as the refill needs, and never polls. It fails at
    /// once, without sleeping, if the wait would exceed `max_wait` or `n` can never be
    /// granted. If the future is dropped while it sleeps (the request was cancelled),
    /// the reserved tokens are given back.
    pub async fn acquire(&self, n: f64, max_wait: Duration) -> Result<(), AcquireTimeout> {
        self.acquire_with(n, max_wait, Instant::now(), tokio::time::sleep_until)
            .await
    }

    /// [`acquire`](Self::acquire) with the clock and the sleep given (tests).
    async fn acquire_with<F>(
        &self,
        n: f64,
        max_wait: Duration,
        now: Instant,
        sleep_until: impl FnOnce(Instant) -> F,
    ) -> Result<(), AcquireTimeout>
    where
        F: std::future::Future<Output = ()>,
    {
        let wait = self.reserve_at(n, max_wait, now)?;
        if wait.is_zero() {
            return Ok(());
        }
        let mut guard = RefundOnDrop {
            bucket: self,
            tokens: n,
        };
        sleep_until(now + wait).await;
        guard.tokens = 0.0;
        Ok(())
    }

    /// Gives back `n` tokens as of `now` (e.g. a TPM reservation larger than the real
    /// usage, or a reservation not used); the level never goes above the capacity.
    pub fn refund_at(&self, n: f64, now: Instant) {
        if n.is_nan() || n <= 0.0 {
            return;
        }
        let mut level = self.refilled(now);
        level.tokens = (level.tokens + n).min(self.capacity);
    }

    /// [`refund_at`](Self::refund_at) now.
    pub fn refund(&self, n: f64) {
        self.refund_at(n, Instant::now());
    }

    /// Takes `n` more tokens as of `now` unconditionally (e.g. the real usage came out
    /// above the TPM reservation); the level may go below zero, and later acquires wait
    /// until the refill has paid the debt.
    pub fn charge_at(&self, n: f64, now: Instant) {
        if !n.is_finite() || n <= 0.0 {
            return;
        }
        let mut level = self.refilled(now);
        level.tokens -= n;
    }

    /// [`charge_at`](Self::charge_at) now.
    pub fn charge(&self, n: f64) {
        self.charge_at(n, Instant::now());
    }

    /// Whether `n` tokens could ever be granted.
    fn grantable(&self, n: f64) -> bool {
        n.is_finite() && n <= self.capacity
    }

    /// The wait until `tokens` (the current level) has grown to `n`; `None` if never.
    fn wait_for(&self, n: f64, tokens: f64) -> Option<Duration> {
        let deficit = n - tokens;
        if deficit <= EPSILON {
            return Some(Duration::ZERO);
        }
        if self.refill_per_sec <= 0.0 {
            return None;
        }
        Some(ceil_duration(deficit / self.refill_per_sec))
    }

    /// Locks the level and refills it up to `now`.
    fn refilled(&self, now: Instant) -> MutexGuard<'_, Level> {
        // The level is a pair of numbers that is never left half-written, so a panic
        // elsewhere while holding the lock cannot have broken it.
        let mut level = self.level.lock().unwrap_or_else(PoisonError::into_inner);
        if now > level.at {
            if level.tokens < self.capacity {
                let elapsed = (now - level.at).as_secs_f64();
                level.tokens = (level.tokens + elapsed * self.refill_per_sec).min(self.capacity);
            }
            level.at = now;
        }
        level
    }
}

impl SharedBucket {
    /// A refund or a charge of `n` tokens, in the background.
    fn update(&self, op: &'static str, n: f64) {
        if !n.is_finite() || n <= 0.0 {
            return;
        }
        self.state.spawn_run(
            &BUCKET_SCRIPT,
            vec![self.key.clone()],
            vec![
                Arg::S(op.to_owned()),
                Arg::F(self.capacity),
                Arg::F(self.refill_per_sec),
                Arg::F(n),
                Arg::I(0),
                Arg::I(self.ttl_ms),
            ],
        );
    }
}

/// Gives tokens reserved in Redis back if [`TokenBucket::take`] is dropped while it
/// waits for them.
struct SharedRefund<'a> {
    bucket: &'a TokenBucket,
    tokens: f64,
}

impl Drop for SharedRefund<'_> {
    fn drop(&mut self) {
        if self.tokens > 0.0 {
            self.bucket.refund_to(Taken::Shared, self.tokens);
        }
    }
}

/// Gives reserved tokens back if [`TokenBucket::acquire`] is dropped while sleeping.
struct RefundOnDrop<'a> {
    bucket: &'a TokenBucket,
    tokens: f64,
}

impl Drop for RefundOnDrop<'_> {
    fn drop(&mut self) {
        if self.tokens > 0.0 {
            self.bucket.refund(self.tokens);
        }
    }
}

/// `x`, or 0 if it is negative or NaN.
fn non_negative(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}

/// `secs` as a duration, rounded up to the nanosecond so that the refill is complete
/// when it has passed; saturates at `Duration::MAX`.
fn ceil_duration(secs: f64) -> Duration {
    let nanos = (secs * 1e9).ceil();
    if nanos.is_nan() || nanos <= 0.0 {
        Duration::ZERO
    } else if nanos >= u64::MAX as f64 {
        Duration::MAX
    } else {
        Duration::from_nanos(nanos as u64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt;

    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TokenBucket>();
    }

    #[test]
    fn starts_full_and_grants_up_to_capacity() {
        let b = TokenBucket::new(5.0, 1.0);
        let t0 = Instant::now();
        assert!(close(b.available_at(t0), 5.0));
        for _ in 0..5 {
            assert!(b.try_acquire_at(1.0, t0));
        }
        assert!(!b.try_acquire_at(1.0, t0));
        assert!(close(b.available_at(t0), 0.0));
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let b = TokenBucket::new(5.0, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(3.0, t0));
        assert!(!b.try_acquire_at(3.0, t0));
        assert!(close(b.available_at(t0), 2.0));
        assert!(b.try_acquire_at(2.0, t0));
    }

    #[test]
    fn refills_at_the_rate_and_stops_at_capacity() {
        let b = TokenBucket::new(10.0, 2.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(10.0, t0));
        assert!(close(b.available_at(t0 + ms(500)), 1.0));
        assert!(close(b.available_at(t0 + ms(2_500)), 5.0));
        assert!(close(b.available_at(t0 + Duration::from_secs(3_600)), 10.0));
    }

    #[test]
    fn per_minute_is_a_burst_of_the_limit_refilled_over_a_minute() {
        let b = TokenBucket::per_minute(120.0);
        assert!(close(b.capacity(), 120.0));
        assert!(close(b.refill_per_sec(), 2.0));
        let t0 = Instant::now();
        assert!(b.try_acquire_at(120.0, t0));
        assert!(!b.try_acquire_at(1.0, t0));
        assert!(b.try_acquire_at(60.0, t0 + Duration::from_secs(30)));
    }

    #[test]
    fn more_than_the_capacity_is_never_granted() {
        let b = TokenBucket::new(5.0, 1.0);
        let t0 = Instant::now();
        assert!(!b.try_acquire_at(5.5, t0 + Duration::from_secs(100)));
        assert_eq!(b.wait_time_at(5.5, t0), None);
        assert_eq!(b.wait_time_at(f64::NAN, t0), None);
        assert_eq!(
            b.reserve_at(6.0, Duration::from_secs(3_600), t0),
            Err(AcquireTimeout {
                needed: 6.0,
                max_wait: Duration::from_secs(3_600)
            })
        );
        assert!(close(b.available_at(t0), 5.0));
    }

    #[test]
    fn wait_time_is_exactly_the_refill_needed() {
        let b = TokenBucket::new(10.0, 2.0);
        let t0 = Instant::now();
        assert_eq!(b.wait_time_at(3.0, t0), Some(Duration::ZERO));
        assert!(b.try_acquire_at(10.0, t0));
        let wait = b.wait_time_at(3.0, t0).unwrap();
        assert_eq!(wait, ms(1_500));
        assert!(!b.try_acquire_at(3.0, t0 + wait - ms(1)));
        assert!(b.try_acquire_at(3.0, t0 + wait));
    }

    #[test]
    fn a_bucket_that_never_refills_has_no_wait_time() {
        let b = TokenBucket::new(2.0, 0.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(2.0, t0));
        assert_eq!(b.wait_time_at(1.0, t0 + Duration::from_secs(10)), None);
    }

    #[test]
    fn an_earlier_instant_counts_as_no_time_passed() {
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now() + Duration::from_secs(10);
        assert!(b.try_acquire_at(10.0, t0));
        assert!(close(b.available_at(t0 - Duration::from_secs(5)), 0.0));
        assert!(close(b.available_at(t0 + Duration::from_secs(1)), 1.0));
    }

    #[test]
    fn charge_goes_into_debt_and_delays_later_requests() {
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(8.0, t0));
        b.charge_at(5.0, t0);
        assert!(close(b.available_at(t0), -3.0));
        assert_eq!(b.wait_time_at(1.0, t0), Some(Duration::from_secs(4)));
        assert!(!b.try_acquire_at(1.0, t0 + ms(3_999)));
        assert!(b.try_acquire_at(1.0, t0 + Duration::from_secs(4)));
    }

    #[test]
    fn charge_counts_the_refill_before_it() {
        // Full after a long idle period: the charge comes off a full bucket.
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(10.0, t0));
        b.charge_at(4.0, t0 + Duration::from_secs(100));
        assert!(close(b.available_at(t0 + Duration::from_secs(100)), 6.0));
    }

    #[test]
    fn refund_never_rises_above_capacity() {
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(6.0, t0));
        b.refund_at(2.0, t0);
        assert!(close(b.available_at(t0), 6.0));
        b.refund_at(100.0, t0);
        assert!(close(b.available_at(t0), 10.0));
    }

    #[test]
    fn reservations_queue_first_come_first_served() {
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now();
        let max = Duration::from_secs(60);
        assert_eq!(b.reserve_at(10.0, max, t0), Ok(Duration::ZERO));
        assert_eq!(b.reserve_at(2.0, max, t0), Ok(Duration::from_secs(2)));
        // The second waiter queues behind the first one's tokens.
        assert_eq!(b.reserve_at(3.0, max, t0), Ok(Duration::from_secs(5)));
        // Someone arriving later cannot jump the queue with try_acquire.
        assert!(!b.try_acquire_at(1.0, t0 + Duration::from_secs(4)));
        assert!(b.try_acquire_at(1.0, t0 + Duration::from_secs(6)));
    }

    #[test]
    fn a_reservation_beyond_max_wait_fails_and_takes_nothing() {
        let b = TokenBucket::new(10.0, 1.0);
        let t0 = Instant::now();
        assert!(b.try_acquire_at(10.0, t0));
        let err = b.reserve_at(5.0, ms(4_999), t0).unwrap_err();
        assert_eq!(err.needed, 5.0);
        assert_eq!(
            err.to_string(),
            "token bucket: 5 tokens not available within 4999 ms"
        );
        assert!(close(b.available_at(t0), 0.0));
        assert_eq!(b.reserve_at(5.0, ms(5_000), t0), Ok(ms(5_000)));
    }

    #[tokio::test]
    async fn acquire_takes_available_tokens_at_once() {
        let b = TokenBucket::new(10.0, 0.001);
        b.acquire(4.0, Duration::ZERO).await.unwrap();
        assert!((b.available() - 6.0).abs() < 0.01);
    }

    #[tokio::test]
    async fn acquire_fails_at_once_when_the_wait_exceeds_max_wait() {
        // 1 token per 1000 s: the wait is far beyond max_wait, so it must fail on the
        // first poll instead of sleeping.
        let b = TokenBucket::new(1.0, 0.001);
        assert!(b.try_acquire(1.0));
        let result = b.acquire(1.0, Duration::from_secs(60)).now_or_never();
        assert!(matches!(result, Some(Err(AcquireTimeout { needed, .. })) if needed == 1.0));
        let never = b.acquire(2.0, Duration::from_secs(3_600)).now_or_never();
        assert!(matches!(never, Some(Err(_))));
        assert!(b.available() < 0.01);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_waits_for_the_refill() {
        // Paused tokio time: the sleep inside acquire advances the clock, no real wait.
        let b = Arc::new(TokenBucket::new(10.0, 2.0));
        assert!(b.try_acquire(10.0));
        let start = Instant::now();
        let task = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(3.0, Duration::from_secs(5)).await }
        });
        task.await.unwrap().unwrap();
        assert_eq!(start.elapsed(), ms(1_500));
        assert!(b.available().abs() < 1e-6, "the tokens stay taken");
        assert!(!b.try_acquire(1.0));
    }

    #[tokio::test]
    async fn acquire_sleeps_once_until_the_tokens_are_paid_and_keeps_them() {
        let b = TokenBucket::new(10.0, 2.0);
        let t0 = Instant::now() + Duration::from_secs(1);
        assert!(b.try_acquire_at(10.0, t0));
        let mut slept_until = Vec::new();
        let sleep = |deadline| {
            slept_until.push(deadline);
            std::future::ready(())
        };
        b.acquire_with(4.0, Duration::from_secs(2), t0, sleep)
            .await
            .unwrap();
        assert_eq!(slept_until, vec![t0 + Duration::from_secs(2)]);
        // The tokens stay taken once the sleep is over: at the deadline the refill has
        // just paid for them.
        assert!(close(b.available_at(t0), -4.0));
        assert!(close(b.available_at(t0 + Duration::from_secs(2)), 0.0));
    }

    #[tokio::test]
    async fn acquire_does_not_sleep_past_max_wait() {
        let b = TokenBucket::new(10.0, 2.0);
        let t0 = Instant::now() + Duration::from_secs(1);
        assert!(b.try_acquire_at(10.0, t0));
        let sleep = |_| -> std::future::Ready<()> { panic!("must not sleep") };
        let err = b.acquire_with(4.0, ms(1_999), t0, sleep).await.unwrap_err();
        assert_eq!(err.max_wait, ms(1_999));
        assert!(close(b.available_at(t0), 0.0));
    }

    #[tokio::test]
    async fn a_cancelled_acquire_gives_its_tokens_back() {
        let b = TokenBucket::new(10.0, 0.001);
        assert!(b.try_acquire(10.0));
        // Needs ~5000 s; allowed to wait that long, so it reserves and sleeps.
        let mut fut = Box::pin(b.acquire(5.0, Duration::from_secs(10_000)));
        assert!((&mut fut).now_or_never().is_none());
        assert!(b.available() < -4.9, "the waiter holds a reservation");
        drop(fut);
        assert!(b.available().abs() < 0.01, "the reservation was refunded");
    }

    // Property tests: the bucket against the arithmetic it promises, on arbitrary
    // capacities, rates and request sequences, with the clock driven by hand.

    use proptest::prelude::*;

    /// Float slack for a sum of many grants: relative to the size of the numbers.
    fn slack(scale: f64) -> f64 {
        1e-6 * (1.0 + scale)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the sequence of requests, the bucket never grants more than it can
        /// have held: by time t at most `capacity + refill × t` tokens in all, and never
        /// more than `capacity` in one grant. It also never refuses a request its level
        /// (tracked independently here) covers.
        #[test]
        fn grants_never_exceed_capacity_plus_refill(
            capacity in 1.0f64..1000.0,
            refill in 0.1f64..1000.0,
            // (time step in µs, request as a fraction of the capacity; > 1 is oversize)
            ops in prop::collection::vec((0u64..3_000_000, 0.0f64..1.3), 1..200),
        ) {
            let b = TokenBucket::new(capacity, refill);
            let t0 = Instant::now();
            let mut now = t0;
            let mut granted = 0.0;
            // The level as the spec defines it, kept apart from the bucket's own.
            let mut model = capacity;
            let mut last = t0;
            for (step_us, fraction) in ops {
                now += Duration::from_micros(step_us);
                let n = fraction * capacity;
                model = (model + (now - last).as_secs_f64() * refill).min(capacity);
                last = now;
                let ok = b.try_acquire_at(n, now);
                if ok {
                    prop_assert!(n <= capacity, "granted {n} > capacity {capacity}");
                    prop_assert!(model >= n - slack(capacity), "granted {n} with only {model}");
                    granted += n;
                    model -= n;
                } else if n <= capacity {
                    prop_assert!(model < n + slack(capacity), "refused {n} with {model} available");
                }
                let t = (now - t0).as_secs_f64();
                let bound = capacity + refill * t;
                prop_assert!(
                    granted <= bound + slack(bound),
                    "granted {granted} by t = {t} s, bound {bound}"
                );
                let level = b.available_at(now);
                prop_assert!(level <= capacity + EPSILON, "level {level} above capacity");
                prop_assert!((level - model).abs() <= slack(capacity), "level {level}, model {model}");
            }
        }

    }

    proptest! {
        // Each case simulates up to ~150,000 requests: cap the shrinking so that a
        // failure is reported in seconds rather than minutes.
        #![proptest_config(ProptestConfig {
            max_shrink_iters: 64,
            ..ProptestConfig::with_cases(64)
        })]

        /// Small requests arriving faster than the refill, over a long simulated run:
        /// the admitted rate converges on the refill rate (within ±2 %).
        #[test]
        fn long_run_admitted_rate_is_the_refill_rate(
            capacity in 1.0f64..1000.0,
            // Seconds to refill from empty: an RPM/TPM bucket takes 60 s.
            refill_secs in 10.0f64..600.0,
            // Requests as a fraction of the capacity ("small").
            size_fraction in 0.02f64..0.1,
            // Offered load over the refill rate.
            overload in 1.2f64..3.0,
            // Irregular arrivals: the gaps cycle through these multipliers, scaled to a
            // mean of 1 (bounded away from 0 so that simulated time always advances).
            jitter in prop::collection::vec(0.05f64..2.0, 1..16),
        ) {
            let refill = capacity / refill_secs;
            let size = size_fraction * capacity;
            let b = TokenBucket::new(capacity, refill);
            // Long enough for the initial burst (one capacity) to be under 0.5 % of
            // the total, and at least 10,000 s.
            let horizon = (200.0 * refill_secs).max(10_000.0);
            let mean_gap = size / (overload * refill);
            let jitter_mean = jitter.iter().sum::<f64>() / jitter.len() as f64;
            let t0 = Instant::now();
            let mut now = t0;
            let mut elapsed = 0.0;
            let mut admitted = 0.0;
            let mut offered = 0.0;
            let mut i = 0;
            while elapsed < horizon {
                let gap = mean_gap * jitter[i % jitter.len()] / jitter_mean;
                now += Duration::from_secs_f64(gap);
                elapsed = (now - t0).as_secs_f64();
                offered += size;
                if b.try_acquire_at(size, now) {
                    admitted += size;
                }
                i += 1;
            }
            let rate = admitted / elapsed;
            prop_assert!(offered > 1.1 * admitted, "the load must exceed the refill");
            prop_assert!(
                (rate - refill).abs() <= 0.02 * refill,
                "admitted {rate}/s vs refill {refill}/s over {elapsed} s ({i} requests)"
            );
        }

        /// TPM settlement: reserve R up front, refund R − U once the usage U is known,
        /// and the level is exactly what was there minus U; a charge beyond the level
        /// puts the bucket in debt and delays the next grant by exactly debt / refill.
        #[test]
        fn reserve_refund_and_charge_arithmetic(
            capacity in 1.0f64..1000.0,
            refill in 0.1f64..1000.0,
            spent_fraction in 0.0f64..1.0,
            reserve_fraction in 0.0f64..1.0,
            used_fraction in 0.0f64..1.0,
            idle_ms in 0u64..5_000,
            overcharge_fraction in 0.01f64..3.0,
            next_fraction in 0.01f64..1.0,
        ) {
            let b = TokenBucket::new(capacity, refill);
            let t0 = Instant::now();
            // Some earlier traffic, so the level is below the capacity.
            let spent = spent_fraction * capacity;
            prop_assert!(b.try_acquire_at(spent, t0));
            let before = capacity - spent;
            // Reserve R out of what is left, then settle with the real usage U ≤ R.
            let reserved = reserve_fraction * before;
            prop_assert!(b.try_acquire_at(reserved, t0));
            prop_assert!((b.available_at(t0) - (before - reserved)).abs() <= slack(capacity));
            let used = used_fraction * reserved;
            b.refund_at(reserved - used, t0);
            let level = before - used;
            prop_assert!(
                (b.available_at(t0) - level).abs() <= slack(capacity),
                "level {} after reserving {reserved} and using {used}, expected {level}",
                b.available_at(t0)
            );

            // Later, the usage of another request comes out above the level.
            let t1 = t0 + Duration::from_millis(idle_ms);
            let level = (level + refill * (idle_ms as f64 / 1000.0)).min(capacity);
            prop_assert!((b.available_at(t1) - level).abs() <= slack(capacity));
            let debt = overcharge_fraction * capacity;
            b.charge_at(level + debt, t1);
            prop_assert!(
                (b.available_at(t1) + debt).abs() <= slack(capacity),
                "level {} after charging {debt} beyond it", b.available_at(t1)
            );

            // The next request of n tokens waits for the debt and then for n itself.
            let n = next_fraction * capacity;
            let expected = (debt + n) / refill;
            let wait = b.wait_time_at(n, t1).unwrap();
            prop_assert!(
                (wait.as_secs_f64() - expected).abs() <= 1e-6 * (1.0 + expected),
                "wait {wait:?}, expected {expected} s"
            );
            // The same n from an empty bucket with no debt would wait n / refill: the
            // debt adds exactly debt / refill.
            let without_debt = n / refill;
            prop_assert!(
                ((wait.as_secs_f64() - without_debt) - debt / refill).abs()
                    <= 1e-6 * (1.0 + expected)
            );
            let early = wait - wait / 1000;
            prop_assert!(!b.try_acquire_at(n, t1 + early), "granted before the debt was paid");
            prop_assert!(b.try_acquire_at(n, t1 + wait), "refused once the debt was paid");
            prop_assert!(b.available_at(t1 + wait).abs() <= slack(capacity));
        }
    }
}
