//! Retry budget: retries may add at most a set share of extra load.
//!
//! The rule of Finagle's `RetryBudget` and tower's `retry::budget::TpsBudget`: every
//! original request deposits into a budget, every retry withdraws from it, and within
//! a sliding window the retries allowed are `ratio × requests + min_per_sec × window`.
//! Per-attempt limits (`max_retries`, DESIGN.md §2 echelon) bound one request; the
//! budget bounds them all together, so a failing upstream does not get hit with
//! `1 + max_retries` times the traffic exactly when it is struggling.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::window::Window;

/// What an original request adds to the window: `[deposits, withdrawals]`.
const DEPOSIT: [u64; 2] = [1, 0];

/// What a retry adds to the window.
const WITHDRAWAL: [u64; 2] = [0, 1];

/// Slack for floating-point rounding when comparing counts with the allowance.
const EPSILON: f64 = 1e-9;

/// The shortest window honoured.
const MIN_WINDOW: Duration = Duration::from_millis(1);

/// A retry budget over a sliding window.
///
/// `Send + Sync`; share it behind an `Arc`. Each call holds a `std::sync::Mutex` for a
/// few additions. Methods ending in `_at` take the current time (tests drive the
/// clock); the others read [`Instant::now`].
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    window: Duration,
    min_per_sec: f64,
    /// `[deposits, withdrawals]` over `window`.
    counts: Mutex<Window<2>>,
}

impl Default for RetryBudget {
    /// 20% extra load over 10 s, plus 1 retry per second (the defaults of Finagle and
    /// tower, except their floor of 10 retries per second, which is too generous for
    /// a per-model LLM budget).
    fn default() -> Self {
        RetryBudget::new(0.2, RetryBudget::DEFAULT_WINDOW, 1.0)
    }
}

impl RetryBudget {
    /// The window of Finagle's and tower's budgets: 10 s.
    pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);

    /// A budget allowing `ratio` retries per original request (0.2: at most 20% extra
    /// load) over a sliding `window`, plus `min_per_sec` retries per second whatever
    /// the traffic (so a model with little traffic can still retry).
    ///
    /// A negative or NaN `ratio` or `min_per_sec` is taken as 0; a window shorter than
    /// 1 ms as 1 ms. The window is kept as 10 sub-buckets of `window / 10`: a request
    /// or retry counts for between 9/10 of the window and the whole window
    /// (`resilience/window.rs`).
    pub fn new(ratio: f64, window: Duration, min_per_sec: f64) -> Self {
        let window = window.max(MIN_WINDOW);
        RetryBudget {
            ratio: non_negative(ratio),
            window,
            min_per_sec: non_negative(min_per_sec),
            counts: Mutex::new(Window::new(window)),
        }
    }

    /// Retries allowed per original request.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// The sliding window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Retries allowed per second whatever the traffic.
    pub fn min_per_sec(&self) -> f64 {
        self.min_per_sec
    }

    /// Records one original request (not a retry) at `now`.
    pub fn deposit_at(&self, now: Instant) {
        self.lock().add_at(now, DEPOSIT);
    }

    /// [`deposit_at`](Self::deposit_at) now.
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Withdraws one retry at `now`: true (and counted) if the window's allowance,
    /// `ratio × deposits + min_per_sec × window`, covers it after the retries already
    /// withdrawn; false (and nothing counted) otherwise.
    pub fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut counts = self.lock();
        let [deposits, withdrawals] = counts.totals_at(now);
        if withdrawals as f64 + 1.0 > self.allowance(deposits) + EPSILON {
            return false;
        }
        counts.add_at(now, WITHDRAWAL);
        true
    }

    /// [`try_withdraw_at`](Self::try_withdraw_at) now.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    /// Retries still allowed in the window at `now` (may be fractional), for
    /// `/admin/state` and metrics.
    pub fn remaining_at(&self, now: Instant) -> f64 {
        let [deposits, withdrawals] = self.lock().totals_at(now);
        (self.allowance(deposits) - withdrawals as f64).max(0.0)
    }

    /// Retries allowed in a window holding `deposits` original requests.
    fn allowance(&self, deposits: u64) -> f64 {
        self.ratio * deposits as f64 + self.min_per_sec * self.window.as_secs_f64()
    }

    fn lock(&self) -> MutexGuard<'_, Window<2>> {
        // A few counters, never left half-written: a poisoned lock is still consistent.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `x`, or 0 if it is negative or NaN.
fn non_negative(x: f64) -> f64 {
    if x > 0.0 { x } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn withdrawals(b: &RetryBudget, now: Instant, most: usize) -> usize {
        (0..most).take_while(|_| b.try_withdraw_at(now)).count()
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<RetryBudget>();
    }

    #[test]
    fn a_hundred_requests_allow_exactly_twenty_retries() {
        let b = RetryBudget::new(0.2, secs(10), 0.0);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit_at(t0);
        }
        assert_eq!(withdrawals(&b, t0, 1_000), 20);
        assert!(!b.try_withdraw_at(t0));
        assert_eq!(b.remaining_at(t0), 0.0);
    }

    #[test]
    fn nothing_is_allowed_without_requests_or_floor() {
        let b = RetryBudget::new(0.2, secs(10), 0.0);
        assert!(!b.try_withdraw_at(Instant::now()));
    }

    #[test]
    fn deposits_expire_with_the_window() {
        let b = RetryBudget::new(0.2, secs(10), 0.0);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit_at(t0);
        }
        assert_eq!(withdrawals(&b, t0 + secs(5), 5), 5);
        // Still inside the window: the rest of the 20 are there.
        assert!((b.remaining_at(t0 + Duration::from_millis(9_999)) - 15.0).abs() < 1e-9);
        // A window later, with no new requests, nothing is left.
        let t1 = t0 + secs(10);
        assert!(!b.try_withdraw_at(t1));
        assert!(!b.try_withdraw_at(t1 + secs(60)));
    }

    #[test]
    fn the_window_slides_slot_by_slot() {
        let b = RetryBudget::new(0.5, secs(10), 0.0);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.deposit_at(t0); // slot 0
        }
        for _ in 0..10 {
            b.deposit_at(t0 + secs(5)); // slot 5
        }
        // At 12 s slot 0 has expired but slot 5 has not: 10 deposits, 5 retries.
        assert_eq!(withdrawals(&b, t0 + secs(12), 100), 5);
    }

    #[test]
    fn withdrawals_expire_too() {
        let b = RetryBudget::new(1.0, secs(10), 0.0);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.deposit_at(t0);
        }
        assert_eq!(withdrawals(&b, t0, 100), 3);
        // New requests 6 s later: the old withdrawals still count against them...
        let t1 = t0 + secs(6);
        for _ in 0..3 {
            b.deposit_at(t1);
        }
        assert_eq!(withdrawals(&b, t1, 100), 3);
        // ...and 12 s after t0 the first 3 deposits and 3 withdrawals are gone.
        assert_eq!(withdrawals(&b, t0 + secs(12), 100), 0);
        assert!((b.remaining_at(t0 + secs(12))).abs() < 1e-9);
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let b = RetryBudget::new(0.2, secs(10), 1.0);
        let t0 = Instant::now();
        assert_eq!(withdrawals(&b, t0, 100), 10);
        // The floor's retries are spent for this window, and come back with the next.
        assert!(!b.try_withdraw_at(t0 + secs(5)));
        assert_eq!(withdrawals(&b, t0 + secs(10), 100), 10);
    }

    #[test]
    fn floor_and_ratio_add_up() {
        let b = RetryBudget::new(0.1, secs(10), 0.5);
        let t0 = Instant::now();
        for _ in 0..30 {
            b.deposit_at(t0);
        }
        // 0.1 × 30 + 0.5 × 10 = 8.
        assert_eq!(withdrawals(&b, t0, 100), 8);
    }

    #[test]
    fn bad_parameters_are_made_safe() {
        let b = RetryBudget::new(f64::NAN, Duration::ZERO, -1.0);
        assert_eq!(b.ratio(), 0.0);
        assert_eq!(b.min_per_sec(), 0.0);
        assert_eq!(b.window(), MIN_WINDOW);
        let t0 = Instant::now();
        b.deposit_at(t0);
        assert!(!b.try_withdraw_at(t0));
    }

    #[test]
    fn default_is_twenty_percent_over_ten_seconds_plus_one_per_second() {
        let b = RetryBudget::default();
        assert_eq!(
            (b.ratio(), b.window(), b.min_per_sec()),
            (0.2, secs(10), 1.0)
        );
    }
}
