//! Per-route counters and fallback history (seed 001's wrapper stats and seed 002's
//! "fallback success rate" monitoring), kept off the hot path's locks: counters are
//! atomics; the history is a short ring behind a mutex touched once per request that
//! fell back.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use echelon_types::Attempt;
use serde::Serialize;

/// How many fallback events each route keeps.
pub const FALLBACK_HISTORY_LEN: usize = 50;

/// Counters of one route since start or the last reset.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    total: AtomicU64,
    successful: AtomicU64,
    fallbacks: AtomicU64,
    attempts: AtomicU64,
    history: Mutex<VecDeque<FallbackEvent>>,
}

/// A snapshot of a route's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct StatsSnapshot {
    /// Requests received.
    pub total_requests: u64,
    /// Requests answered.
    pub successful_requests: u64,
    /// Requests that moved past their first candidate (answered or not).
    pub fallbacks: u64,
    /// Attempts made, skips included.
    pub attempts: u64,
}

/// One move from a candidate to the next within a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FallbackEvent {
    /// Unix time, milliseconds.
    pub at_unix_ms: u64,
    /// The model that failed or was skipped.
    pub from: String,
    /// The model tried next.
    pub to: String,
    /// Why: the attempt's outcome (`timeout`, `circuit_open`, …).
    pub reason: echelon_types::Outcome,
}

impl RouteStats {
    /// Counts a finished request from its attempts.
    pub(crate) fn record(&self, attempts: &[Attempt], success: bool) {
        self.total.fetch_add(1, Ordering::Relaxed);
        if success {
            self.successful.fetch_add(1, Ordering::Relaxed);
        }
        self.attempts
            .fetch_add(attempts.len() as u64, Ordering::Relaxed);
        let moves: Vec<FallbackEvent> = attempts
            .windows(2)
            .filter(|w| w[0].model != w[1].model)
            .map(|w| FallbackEvent {
                at_unix_ms: now_unix_ms(),
                from: w[0].model.clone(),
                to: w[1].model.clone(),
                reason: w[0].outcome,
            })
            .collect();
        if moves.is_empty() {
            return;
        }
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let mut h = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for m in moves {
            if h.len() == FALLBACK_HISTORY_LEN {
                h.pop_front();
            }
            h.push_back(m);
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            total_requests: self.total.load(Ordering::Relaxed),
            successful_requests: self.successful.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            attempts: self.attempts.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn history(&self) -> Vec<FallbackEvent> {
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    pub(crate) fn reset(&self) {
        for c in [
            &self.total,
            &self.successful,
            &self.fallbacks,
            &self.attempts,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn att(model: &str, kind: &str) -> Attempt {
        Attempt {
            model: model.into(),
            provider: "p".into(),
            key_id: None,
            status: None,
            outcome: kind.parse().unwrap(),
            message: String::new(),
            latency_ms: 0,
        }
    }

    #[test]
    fn counts_requests_fallbacks_and_keeps_the_moves() {
        let s = RouteStats::default();
        s.record(&[att("a", "ok")], true);
        s.record(
            &[att("a", "timeout"), att("a", "timeout"), att("b", "ok")],
            true,
        );
        s.record(&[att("a", "connect"), att("b", "connect")], false);
        assert_eq!(
            s.snapshot(),
            StatsSnapshot {
                total_requests: 3,
                successful_requests: 2,
                fallbacks: 2,
                attempts: 6
            }
        );
        let h = s.history();
        assert_eq!(h.len(), 2);
        assert_eq!((h[0].from.as_str(), h[0].to.as_str()), ("a", "b"));
        assert_eq!(h[0].reason, "timeout");
        s.reset();
        assert_eq!(s.snapshot(), StatsSnapshot::default());
        assert!(s.history().is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let s = RouteStats::default();
        for _ in 0..(FALLBACK_HISTORY_LEN + 10) {
            s.record(&[att("a", "timeout"), att("b", "ok")], true);
        }
        assert_eq!(s.history().len(), FALLBACK_HISTORY_LEN);
    }
}
