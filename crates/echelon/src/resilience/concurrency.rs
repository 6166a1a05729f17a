//! The concurrency limit: at most N requests in flight through a model or an echelon
//! (seed 001 `concurrency_limit`), with a bounded wait for a slot.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A limit on requests in flight.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    limit: u32,
    slots: Arc<Semaphore>,
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
