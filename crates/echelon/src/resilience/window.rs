//! Counts over a sliding window of time: the circuit breaker's failure-rate rule
//! (requests and failures) and the retry budget (deposits and withdrawals).
//!
//! The window is kept as [`SLOTS`] buckets of `window / SLOTS`, the approximation of
//! Finagle's and tower's retry budgets: bucket `i` holds what was added between
//! `origin + i × bucket` and `origin + (i + 1) × bucket`, where `origin` is the first
//! instant seen, and the totals at `now` are the sum of the `SLOTS` buckets up to and
//! including `now`'s. So a count is forgotten at the end of its bucket plus the window:
//! it counts for between `(SLOTS - 1) / SLOTS` of the window (added at the end of its
//! bucket) and the whole window (added at its start). Memory and time per call are
//! fixed (`SLOTS × K` counters), whatever the traffic.
//!
//! The clock never goes back: an instant earlier than the latest one seen is taken as
//! the latest one, so a caller with a stale `now` neither reopens a bucket that has
//! already expired nor counts into an older one.
//!
//! Not synchronised: each owner keeps its window behind its own lock. Methods take
//! the current time (`_at`), so tests drive the clock.

use std::time::Duration;

use tokio::time::Instant;

/// Buckets per window.
pub(crate) const SLOTS: usize = 10;

/// `K` counters (say requests and failures) summed over a sliding window of time, in
/// [`SLOTS`] buckets (see the module documentation for the exact rule).
///
/// Counters saturate at `u64::MAX` instead of wrapping.
#[derive(Debug, Clone)]
pub(crate) struct Window<const K: usize> {
    /// The length of one bucket: `window / SLOTS`, at least 1 ns.
    bucket_len: Duration,
    /// The first instant seen since creation or the last [`clear`](Self::clear);
    /// bucket indices count `bucket_len`s from it.
    origin: Option<Instant>,
    /// The highest bucket index seen, so time going backwards never reuses a bucket.
    latest: u64,
    /// A ring: index `i` lives at `i % SLOTS`.
    buckets: [Bucket<K>; SLOTS],
}

/// The counts added within one bucket's time span.
#[derive(Debug, Clone, Copy)]
struct Bucket<const K: usize> {
    /// Which span of `bucket_len` (counted from the origin) these counts belong to.
    index: u64,
    counts: [u64; K],
}

impl<const K: usize> Bucket<K> {
    const EMPTY: Self = Bucket {
        index: 0,
        counts: [0; K],
    };
}

impl<const K: usize> Window<K> {
    /// An empty window of length `window`. A window shorter than [`SLOTS`] ns is
    /// taken as [`SLOTS`] ns (buckets of 1 ns).
    pub(crate) fn new(window: Duration) -> Self {
        Window {
            bucket_len: (window / SLOTS as u32).max(Duration::from_nanos(1)),
            origin: None,
            latest: 0,
            buckets: [Bucket::EMPTY; SLOTS],
        }
    }

    /// Adds `counts` (counter by counter) at `now`.
    pub(crate) fn add_at(&mut self, now: Instant, counts: [u64; K]) {
        self.origin.get_or_insert(now);
        let index = self.index_at(now);
        self.latest = index;
        let bucket = &mut self.buckets[(index % SLOTS as u64) as usize];
        if bucket.index != index {
            // The ring has come round: what this bucket held is a window old.
            *bucket = Bucket {
                index,
                ..Bucket::EMPTY
            };
        }
        for (total, count) in bucket.counts.iter_mut().zip(counts) {
            *total = total.saturating_add(count);
        }
    }

    /// Each counter summed over the window ending at `now` (all zero before the first
    /// [`add_at`](Self::add_at)).
    pub(crate) fn totals_at(&self, now: Instant) -> [u64; K] {
        let mut totals = [0; K];
        if self.origin.is_none() {
            return totals;
        }
        let current = self.index_at(now);
        for bucket in &self.buckets {
            // No bucket is ahead of `current`; those `SLOTS` or more behind have expired.
            if current.saturating_sub(bucket.index) < SLOTS as u64 {
                for (total, count) in totals.iter_mut().zip(bucket.counts) {
                    *total = total.saturating_add(count);
                }
            }
        }
        totals
    }

    /// Forgets every count and the origin: the next [`add_at`](Self::add_at) starts
    /// bucket 0 afresh.
    pub(crate) fn clear(&mut self) {
        *self = Window {
            bucket_len: self.bucket_len,
            origin: None,
            latest: 0,
            buckets: [Bucket::EMPTY; SLOTS],
        };
    }

    /// The bucket index of `now` (never below the latest seen; the latest seen before
    /// any origin).
    fn index_at(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return self.latest;
        };
        let index = now.saturating_duration_since(origin).as_nanos() / self.bucket_len.as_nanos();
        u64::try_from(index).unwrap_or(u64::MAX).max(self.latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A 10 s window: buckets of 1 s.
    fn ten_seconds() -> Window<2> {
        Window::new(secs(10))
    }

    #[test]
    fn an_empty_window_totals_zero() {
        let w = ten_seconds();
        let t0 = Instant::now();
        assert_eq!(w.totals_at(t0), [0, 0]);
        assert_eq!(w.totals_at(t0 + secs(3600)), [0, 0]);
    }

    #[test]
    fn counters_add_up_independently() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [1, 0]);
        w.add_at(t0 + ms(300), [1, 1]);
        w.add_at(t0 + secs(4), [2, 0]);
        w.add_at(t0 + secs(9), [0, 5]);
        assert_eq!(w.totals_at(t0 + secs(9)), [4, 6]);
    }

    #[test]
    fn a_count_added_at_the_origin_lasts_exactly_one_window() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [1, 1]);
        assert_eq!(w.totals_at(t0 + secs(10) - Duration::from_nanos(1)), [1, 1]);
        assert_eq!(w.totals_at(t0 + secs(10)), [0, 0]);
    }

    #[test]
    fn a_count_added_late_in_its_bucket_lasts_nine_tenths_of_a_window() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [0, 0]); // sets the origin
        w.add_at(t0 + ms(999), [1, 0]); // still bucket 0
        assert_eq!(w.totals_at(t0 + ms(9_999)), [1, 0]);
        // Forgotten with its bucket, 9.001 s after it was added.
        assert_eq!(w.totals_at(t0 + secs(10)), [0, 0]);
    }

    #[test]
    fn the_window_slides_bucket_by_bucket() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        for i in 0..10 {
            w.add_at(t0 + secs(i), [1, i]);
        }
        assert_eq!(w.totals_at(t0 + secs(9)), [10, 45]);
        // Each second one more of the oldest buckets leaves the window.
        for k in 1..=10 {
            let expected_requests = 10 - k;
            let expected_sum: u64 = (k..10).sum();
            assert_eq!(
                w.totals_at(t0 + secs(9 + k)),
                [expected_requests, expected_sum],
                "{k} s after the last add"
            );
        }
    }

    #[test]
    fn a_reused_bucket_is_emptied_first() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [7, 7]);
        // Bucket 10 lives where bucket 0 did: its counts replace bucket 0's.
        w.add_at(t0 + secs(10), [1, 0]);
        assert_eq!(w.totals_at(t0 + secs(10)), [1, 0]);
        // Long gaps too: bucket 1000 also lands on slot 0.
        w.add_at(t0 + secs(1000), [0, 2]);
        assert_eq!(w.totals_at(t0 + secs(1000)), [0, 2]);
    }

    #[test]
    fn time_going_backwards_counts_in_the_latest_bucket() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [1, 0]);
        w.add_at(t0 + secs(12), [1, 0]);
        // An earlier instant: bucket 1 would already be outside the window of bucket 12,
        // so the count goes to bucket 12 instead of being lost.
        w.add_at(t0 + secs(1), [0, 1]);
        assert_eq!(w.totals_at(t0 + secs(12)), [1, 1]);
        // Totals at a stale instant are those of the latest window, and bucket 0 (which
        // the window has passed) does not come back.
        assert_eq!(w.totals_at(t0), [1, 1]);
        assert_eq!(w.totals_at(t0 + secs(22)), [0, 0]);
    }

    #[test]
    fn clear_forgets_counts_and_origin() {
        let mut w = ten_seconds();
        let t0 = Instant::now();
        w.add_at(t0, [3, 3]);
        w.add_at(t0 + secs(15), [3, 3]);
        w.clear();
        assert_eq!(w.totals_at(t0 + secs(15)), [0, 0]);
        // The next add is the new origin: its bucket starts there, half a bucket past
        // the old grid, and lasts a whole window from it.
        let t1 = t0 + ms(15_500);
        w.add_at(t1, [1, 0]);
        assert_eq!(w.totals_at(t1 + ms(9_999)), [1, 0]);
        assert_eq!(w.totals_at(t1 + secs(10)), [0, 0]);
    }

    #[test]
    fn a_zero_window_has_one_nanosecond_buckets() {
        let mut w: Window<1> = Window::new(Duration::ZERO);
        let t0 = Instant::now();
        w.add_at(t0, [1]);
        assert_eq!(w.totals_at(t0 + Duration::from_nanos(9)), [1]);
        assert_eq!(w.totals_at(t0 + Duration::from_nanos(10)), [0]);
    }

    #[test]
    fn an_index_past_u64_saturates_instead_of_panicking() {
        let mut w: Window<1> = Window::new(Duration::ZERO);
        let t0 = Instant::now();
        w.add_at(t0, [1]);
        // 600 years in 1 ns buckets is more than u64::MAX buckets.
        let Some(far) = t0.checked_add(secs(600 * 365 * 24 * 3600)) else {
            return;
        };
        assert_eq!(w.totals_at(far), [0]);
        w.add_at(far, [2]);
        w.add_at(far + secs(1), [3]);
        assert_eq!(w.totals_at(far + secs(2)), [5]);
    }

    #[test]
    fn counters_saturate() {
        let mut w: Window<1> = Window::new(secs(10));
        let t0 = Instant::now();
        w.add_at(t0, [u64::MAX]);
        w.add_at(t0, [1]);
        w.add_at(t0 + secs(1), [u64::MAX]);
        assert_eq!(w.totals_at(t0 + secs(1)), [u64::MAX]);
    }
}
