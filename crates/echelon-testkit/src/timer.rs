//! Sleeps that end within tens of microseconds of their deadline.
//!
//! tokio's timer works in whole milliseconds: a deadline is rounded up to the
//! next millisecond tick, and the driver then parks in `epoll_wait` with a
//! timeout in milliseconds, rounded up again ("Sleep operates at millisecond
//! granularity", `tokio::time::sleep` docs). Measured with `echelon probe`
//! at concurrency 1, `--latency-ms 50` answered in 51.8 ms at p50. An upstream
//! whose latency is a benchmark's unit of account (the judge's ideal is
//! `items × 50 ms / concurrency`) must take the time it was told to take.
//!
//! So the last few milliseconds of every wait are handed to one timer thread,
//! which keeps the pending deadlines in a heap and sleeps on a condition
//! variable until the earliest one. `Condvar::wait_timeout` is a futex wait
//! with a relative timeout, which Linux ends within the thread's timer slack
//! (50 µs by default). The longer part of a wait stays on tokio's timer, so
//! the heap only ever holds requests that are about to be answered, and a
//! dropped wait (a cut connection) leaves at most a few milliseconds of
//! garbage behind.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// How much before its deadline a wait leaves tokio's timer for the timer
/// thread: tokio can be up to about 2 ms late, so 3 ms leaves room.
const HANDOVER: Duration = Duration::from_millis(3);

/// Waits `d`, ending within tens of microseconds of `now + d` (see the module
/// docs). Zero returns at once.
pub(crate) async fn sleep(d: Duration) {
    if !d.is_zero() {
        sleep_until(Instant::now() + d).await;
    }
}

/// Waits until `deadline`, ending within tens of microseconds of it (see the module
/// docs). A deadline that has passed returns at once.
pub(crate) async fn sleep_until(deadline: Instant) {
    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
        return;
    };
    if let Some(coarse) = left.checked_sub(HANDOVER) {
        tokio::time::sleep(coarse).await;
    }
    match thread() {
        Some(timers) => {
            let (done, fired) = oneshot::channel();
            timers.push(deadline, done);
            // The thread never drops a sender without firing it, except when
            // it dies; then the wait ends early rather than never.
            let _ = fired.await;
        }
        None => tokio::time::sleep_until(deadline.into()).await,
    }
}

/// The deadlines the timer thread is waiting for.
struct Timers {
    /// Pending deadlines, earliest first; the sequence number keeps the order
    /// total without comparing senders.
    queue: Mutex<BinaryHeap<Reverse<Entry>>>,
    /// Signalled when a deadline earlier than every pending one arrives.
    earlier: Condvar,
}

struct Entry {
    at: Instant,
    seq: u64,
    done: oneshot::Sender<()>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Starts the timer thread now rather than inside the first request that waits (a
/// thread start in the middle of a burst of connections).
pub(crate) fn start() {
    let _ = thread();
}

/// The process's timer thread, started on first use; `None` if it could not
/// be started (the caller then falls back to tokio's timer).
fn thread() -> Option<&'static Timers> {
    static TIMERS: OnceLock<Option<&'static Timers>> = OnceLock::new();
    *TIMERS.get_or_init(|| {
        let timers: &'static Timers = Box::leak(Box::new(Timers {
            queue: Mutex::new(BinaryHeap::new()),
            earlier: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("testkit-timer".to_owned())
            .spawn(move || timers.run())
            .ok()
            .map(|_| timers)
    })
}

impl Timers {
    fn push(&self, at: Instant, done: oneshot::Sender<()>) {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let first = queue.peek().is_none_or(|Reverse(e)| at < e.at);
        queue.push(Reverse(Entry { at, seq, done }));
        drop(queue);
        if first {
            self.earlier.notify_one();
        }
    }

    /// Fires every deadline as it passes; never returns.
    fn run(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            while queue.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = queue.pop() {
                    // The waiter may be gone (its connection was cut).
                    let _ = e.done.send(());
                }
            }
            queue = match queue.peek() {
                Some(Reverse(e)) => {
                    let wait = e.at.saturating_duration_since(now);
                    self.earlier
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .earlier
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_at_least_the_duration_and_fires_in_deadline_order() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let started = Instant::now();
        for (name, ms) in [("late", 12u64), ("early", 4), ("middle", 8), ("now", 0)] {
            let tx = tx.clone();
            tokio::spawn(async move {
                sleep(Duration::from_millis(ms)).await;
                let _ = tx.send((name, started.elapsed()));
            });
        }
        drop(tx);
        let mut order = Vec::new();
        while let Some((name, elapsed)) = rx.recv().await {
            let ms = match name {
                "late" => 12,
                "early" => 4,
                "middle" => 8,
                _ => 0,
            };
            assert!(
                elapsed >= Duration::from_millis(ms),
                "{name} woke after {elapsed:?}, before its {ms} ms"
            );
            order.push(name);
        }
        assert_eq!(order, ["now", "early", "middle", "late"]);
    }

    #[tokio::test]
    async fn a_dropped_wait_does_not_stop_the_others() {
        // A wait shorter than the hand-over goes to the timer thread at its first poll;
        // let it get there, then drop it, so the thread holds a sender nobody awaits.
        let dropped = tokio::spawn(sleep(Duration::from_millis(2)));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        dropped.abort();
        let started = Instant::now();
        // A lost wake-up would hang here; the bound turns that into a failure.
        tokio::time::timeout(Duration::from_secs(5), sleep(Duration::from_millis(5)))
            .await
            .unwrap_or_else(|_| panic!("a wait after a dropped one never ended"));
        assert!(started.elapsed() >= Duration::from_millis(5));
    }
}
