//! Admission steps: each resilience unit an attempt must pass before its call is sent
//! (circuit breaker → token buckets → concurrency limits → key pool, DESIGN.md §3) is one
//! [`Admit`] implementation that hands out a [`Ticket`].
//!
//! A ticket holds what its step granted. Dropped before [`Ticket::commit`] (a later step
//! refused, or the request ran out of `max_attempts`), it gives everything back: no
//! token is spent on a call that is never made (issue 13, bug 1). Committed when the
//! HTTP call is actually sent, it keeps what it took, and [`Ticket::report`] hands it
//! the attempt's outcome — for a stream at its end — so that the breaker, the TPM
//! bucket and the key pool learn how the call went.
//!
//! A new admission step goes in this file (or one of its own next to it): implement
//! [`Admit`] for the unit and [`Ticket`] for what it grants, then add it, in its place in
//! the order, to `routing::admit`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{ErrorKind, Outcome, SkipReason};
use tokio::time::Instant;

use super::breaker::{BreakerOpen, BreakerPermit, CircuitBreaker};
use super::concurrency::{ConcurrencyLimit, LimitReached, Slot};
use super::key_pool::{KeyLease, KeyPool, NoKey};
use super::token_bucket::{Taken, TokenBucket};
use crate::key::ApiKey;
use crate::state::redis::Unavailable;

/// What one attempt asks of the admission steps.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Longest wait for a bucket or a concurrency slot before the step refuses
    /// (the model's `queue_timeout`).
    pub queue: Duration,
    /// Tokens to reserve in a `tpm_limit` bucket: the prompt plus the output allowance.
    pub tokens: u64,
    /// Key indexes this request must not use again (refused with 401/403).
    pub exclude_keys: &'a [usize],
}

/// A step turned the attempt away; nothing it or an earlier step took is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as the attempt list shows it.
    pub reason: SkipReason,
    /// What a person reads (never a key).
    pub message: String,
    /// When the step may admit again, if it knows (a cooling key's end of cooldown, an
    /// open breaker's end of its open period, a disabled key's next re-probe).
    pub retry_at: Option<Instant>,
}

impl Refusal {
    fn new(reason: SkipReason, message: String) -> Refusal {
        Refusal {
            reason,
            message,
            retry_at: None,
        }
    }

    /// The shared state backend did not answer (`state.on_unavailable: reject`): the
    /// step is refused with `reason`, and the message names the backend.
    fn unavailable(reason: SkipReason, _: Unavailable) -> Refusal {
        Refusal::new(reason, Unavailable.to_string())
    }
}

/// How one sent attempt went, as the tickets of its steps learn it.
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    /// The outcome: [`Outcome::Ok`], or the failure's kind.
    pub outcome: Outcome,
    /// The HTTP status the provider answered with, if it answered.
    pub status: Option<u16>,
    /// The provider's `Retry-After`, for a 429.
    pub retry_after: Option<Duration>,
    /// Tokens the call used in all (prompt + completion), when the provider said.
    pub tokens_used: Option<u64>,
    /// The failure's message (for a disabled key's reason); empty on success.
    pub message: &'a str,
    /// Cooldown of a key after a 429 without `Retry-After` (the model's `key_cooldown`).
    pub key_cooldown: Duration,
}

impl Report<'_> {
    /// A successful call that used `tokens_used` tokens, if known.
    pub fn ok(tokens_used: Option<u64>) -> Report<'static> {
        Report {
            outcome: Outcome::Ok,
            status: Some(200),
            retry_after: None,
            tokens_used,
            message: "",
            key_cooldown: Duration::ZERO,
        }
    }
}

/// What an admission step grants one attempt.
pub trait Ticket: Send + 'static {
    /// The call is being sent: keep what was taken.
    fn commit(&mut self);
    /// The sent call's outcome; consumes the ticket (what it holds is released).
    fn report(self, report: &Report<'_>);
}

/// One admission step: admits an attempt with a ticket, or refuses it.
///
/// In memory the future is ready at once unless the step queues (a bucket refilling, a
/// concurrency slot freeing up within [`Ask::queue`]); a shared state backend answers
/// after its round trip.
pub trait Admit {
    /// What it grants.
    type Ticket: Ticket;
    /// Admits the attempt, or refuses it. Dropping the future gives back anything taken.
    fn admit(&self, ask: &Ask<'_>) -> impl Future<Output = Result<Self::Ticket, Refusal>> + Send;
}

// ---- circuit breaker --------------------------------------------------------------

/// The breaker's permission for one call; reports success or failure to it.
#[derive(Debug)]
pub struct BreakerTicket {
    breaker: CircuitBreaker,
    permit: BreakerPermit,
}

impl Ticket for BreakerTicket {
    fn commit(&mut self) {}

    /// Success closes (or keeps closed), a failure that says the model is unhealthy
    /// counts toward opening; anything else (429, 400, a cancelled stream) only frees a
    /// half-open probe slot.
    fn report(self, report: &Report<'_>) {
        match report.outcome {
            Outcome::Ok => self.breaker.record(self.permit, true),
            o if o.counts_against_health() => self.breaker.record(self.permit, false),
            _ => drop(self.permit),
        }
    }
}

impl Admit for CircuitBreaker {
    type Ticket = BreakerTicket;

    async fn admit(&self, _ask: &Ask<'_>) -> Result<BreakerTicket, Refusal> {
        let answer = self
            .acquire()
            .await
            .map_err(|e| Refusal::unavailable(SkipReason::CircuitOpen, e))?;
        breaker_verdict(self, answer)
    }
}

/// The ticket of a permit `breaker` granted, or the refusal of an open one (the step's
/// answer, in memory, from Redis, or from a combined admission).
pub fn breaker_verdict(
    breaker: &CircuitBreaker,
    answer: Result<BreakerPermit, BreakerOpen>,
) -> Result<BreakerTicket, Refusal> {
    match answer {
        Ok(permit) => Ok(BreakerTicket {
            breaker: breaker.clone(),
            permit,
        }),
        Err(open) => {
            let left = open.until.saturating_duration_since(Instant::now());
            Err(Refusal {
                reason: SkipReason::CircuitOpen,
                message: format!("circuit breaker open for {} ms more", left.as_millis()),
                retry_at: Some(open.until),
            })
        }
    }
}

// ---- token buckets ----------------------------------------------------------------

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BucketUnit {
    /// One token per call (`rpm_limit`, `rate_limit_*`, an echelon's `rpm_limit`).
    Requests,
    /// The attempt's [`Ask::tokens`] (`tpm_limit`), settled against the real usage.
    Tokens,
}

/// A token bucket as an admission step: the bucket, what it counts and its name for the
/// refusal message (`rpm_limit`, `echelon \`g.echelon1\` rpm_limit`, …).
#[derive(Debug, Clone, Copy)]
pub struct BucketStep<'a> {
    /// The bucket.
    pub bucket: &'a Arc<TokenBucket>,
    /// What it counts.
    pub unit: BucketUnit,
    /// How a refusal names it.
    pub label: &'a str,
}

/// Tokens taken from a bucket for one call.
#[derive(Debug)]
pub struct BucketTicket {
    bucket: Arc<TokenBucket>,
    unit: BucketUnit,
    /// Tokens taken and not given back.
    taken: u64,
    committed: bool,
    /// Where they were taken (this process, or the fleet-wide bucket).
    at: Taken,
}

impl Ticket for BucketTicket {
    fn commit(&mut self) {
        self.committed = true;
    }

    /// A request token stays spent. A TPM reservation is settled against the usage the
    /// provider reported (the unused part back, any excess charged); a call the provider
    /// refused with a status (other than a timeout) used no tokens worth counting and is
    /// given back whole.
    fn report(mut self, report: &Report<'_>) {
        if self.unit == BucketUnit::Tokens {
            let refused = report.status.is_some()
                && report
                    .outcome
                    .error_kind()
                    .is_some_and(|k| k != ErrorKind::Timeout);
            if refused {
                self.committed = false;
            } else if let Some(used) = report.tokens_used {
                let reserved = self.taken;
                if used < reserved {
                    self.bucket.refund_to(self.at, (reserved - used) as f64);
                } else if used > reserved {
                    self.bucket.charge_to(self.at, (used - reserved) as f64);
                }
                self.taken = 0;
            }
        }
        drop(self);
    }
}

impl Drop for BucketTicket {
    fn drop(&mut self) {
        if !self.committed && self.taken > 0 {
            self.bucket.refund_to(self.at, self.taken as f64);
        }
    }
}

impl Admit for BucketStep<'_> {
    type Ticket = BucketTicket;

    async fn admit(&self, ask: &Ask<'_>) -> Result<BucketTicket, Refusal> {
        let n = self.tokens(ask);
        let answer = self
            .bucket
            .take(n as f64, ask.queue)
            .await
            .map_err(|e| Refusal::unavailable(SkipReason::TokenBucket, e))?;
        match answer {
            Ok(at) => Ok(self.ticket(n, at)),
            Err(_) => Err(self.refusal(n)),
        }
    }
}

impl BucketStep<'_> {
    /// The tokens this step takes for `ask`: 1 request, or the attempt's tokens.
    pub fn tokens(&self, ask: &Ask<'_>) -> u64 {
        match self.unit {
            BucketUnit::Requests => 1,
            BucketUnit::Tokens => ask.tokens,
        }
    }

    /// The ticket of `n` tokens taken `at`.
    pub fn ticket(&self, n: u64, at: Taken) -> BucketTicket {
        BucketTicket {
            bucket: self.bucket.clone(),
            unit: self.unit,
            taken: n,
            committed: false,
            at,
        }
    }

    /// The refusal of `n` tokens.
    pub fn refusal(&self, n: u64) -> Refusal {
        let message = match self.unit {
            BucketUnit::Requests => format!("{} reached", self.label),
            BucketUnit::Tokens => format!("{}: {n} tokens not available", self.label),
        };
        Refusal::new(SkipReason::TokenBucket, message)
    }
}

// ---- concurrency limits -----------------------------------------------------------

/// A concurrency limit as an admission step, with the name its refusal gives
/// (`echelon`, `model`).
#[derive(Debug, Clone, Copy)]
pub struct SlotStep<'a> {
    /// The limit.
    pub limit: &'a ConcurrencyLimit,
    /// Whose limit it is, for the refusal message.
    pub owner: &'static str,
}

/// A slot of a concurrency limit, free again when the ticket is dropped or reported.
#[derive(Debug)]
pub struct SlotTicket(#[allow(dead_code)] Slot);

impl Ticket for SlotTicket {
    fn commit(&mut self) {}
    fn report(self, _report: &Report<'_>) {}
}

impl Admit for SlotStep<'_> {
    type Ticket = SlotTicket;

    async fn admit(&self, ask: &Ask<'_>) -> Result<SlotTicket, Refusal> {
        let answer = self
            .limit
            .lease(ask.queue)
            .await
            .map_err(|e| Refusal::unavailable(SkipReason::Concurrency, e))?;
        match answer {
            Ok(slot) => Ok(SlotTicket(slot)),
            Err(e) => Err(self.refusal(e)),
        }
    }
}

impl SlotStep<'_> {
    /// The refusal of a full limit.
    pub fn refusal(&self, e: LimitReached) -> Refusal {
        Refusal::new(SkipReason::Concurrency, format!("{} {e}", self.owner))
    }
}

impl SlotTicket {
    /// The ticket of a slot held.
    pub fn new(slot: Slot) -> SlotTicket {
        SlotTicket(slot)
    }
}

// ---- key pool ---------------------------------------------------------------------

/// A leased key: cooled down after a 429, disabled after a 401/403.
#[derive(Debug)]
pub struct KeyTicket(KeyLease);

impl KeyTicket {
    /// The key to send.
    pub fn key(&self) -> &ApiKey {
        self.0.key()
    }

    /// Its stable index in the pool.
    pub fn index(&self) -> usize {
        self.0.index()
    }
}

impl Ticket for KeyTicket {
    fn commit(&mut self) {}

    fn report(self, report: &Report<'_>) {
        match report.outcome.error_kind() {
            Some(ErrorKind::RateLimited) => {
                self.0.cool_down(report.retry_after, report.key_cooldown);
            }
            Some(ErrorKind::Auth) => self.0.disable(report.message),
            // A success re-enables a key disabled meanwhile (or being re-probed).
            None if report.outcome == Outcome::Ok => self.0.succeed(),
            _ => {}
        }
    }
}

impl Admit for Arc<KeyPool> {
    type Ticket = KeyTicket;

    async fn admit(&self, ask: &Ask<'_>) -> Result<KeyTicket, Refusal> {
        self.sync_shared()
            .await
            .map_err(|e| Refusal::unavailable(SkipReason::NoKey, e))?;
        lease_key(self, ask, None)
    }
}

/// Leases a key of `pool` (its state already brought up to date with the shared one):
/// the ticket, or the refusal saying why none is usable. `picked`: the key id a
/// combined admission chose fleet-wide and the name of its fleet-wide lease
/// ([`KeyPool::acquire_picked`]).
pub fn lease_key(
    pool: &Arc<KeyPool>,
    ask: &Ask<'_>,
    picked: Option<(String, String)>,
) -> Result<KeyTicket, Refusal> {
    let got = match picked {
        Some((id, lease)) => pool.acquire_picked(ask.exclude_keys, &id, lease),
        None => pool.acquire(ask.exclude_keys),
    };
    match got {
        Ok(lease) => Ok(KeyTicket(lease)),
        Err(NoKey::CoolingDown { until }) => {
            let wait = until.saturating_duration_since(Instant::now());
            Err(Refusal {
                reason: SkipReason::KeyCooldown,
                message: format!("every key cooling down for {} ms more", wait.as_millis()),
                retry_at: Some(until),
            })
        }
        Err(NoKey::Exhausted) => Err(match pool.next_reprobe(ask.exclude_keys) {
            // The time of the next re-probe, for the attempt list and the log.
            Some(at) => Refusal {
                reason: SkipReason::NoKey,
                message: format!(
                    "every key is disabled; next re-probe in {} s",
                    at.saturating_duration_since(Instant::now())
                        .as_secs_f64()
                        .ceil()
                ),
                retry_at: Some(at),
            },
            None => Refusal::new(SkipReason::NoKey, "every key is disabled".to_owned()),
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::resilience::breaker::BreakerSettings;

    fn ask() -> Ask<'static> {
        Ask {
            queue: Duration::ZERO,
            tokens: 100,
            exclude_keys: &[],
        }
    }

    #[tokio::test]
    async fn an_uncommitted_bucket_ticket_gives_its_token_back() {
        let bucket = Arc::new(TokenBucket::new(2.0, 0.0));
        let step = BucketStep {
            bucket: &bucket,
            unit: BucketUnit::Requests,
            label: "rpm_limit",
        };
        let t = step.admit(&ask()).await.unwrap();
        assert!((bucket.available() - 1.0).abs() < 1e-9);
        drop(t);
        assert!((bucket.available() - 2.0).abs() < 1e-9);
        let mut t = step.admit(&ask()).await.unwrap();
        t.commit();
        t.report(&Report::ok(None));
        assert!(
            (bucket.available() - 1.0).abs() < 1e-9,
            "a sent call keeps its token"
        );
    }

    #[tokio::test]
    async fn a_tpm_ticket_settles_against_the_usage() {
        let bucket = Arc::new(TokenBucket::new(1000.0, 0.0));
        let step = BucketStep {
            bucket: &bucket,
            unit: BucketUnit::Tokens,
            label: "tpm_limit",
        };
        let mut t = step.admit(&ask()).await.unwrap();
        t.commit();
        t.report(&Report::ok(Some(30)));
        assert!((bucket.available() - 970.0).abs() < 1e-9);
        let mut t = step.admit(&ask()).await.unwrap();
        t.commit();
        let refused = Report {
            outcome: Outcome::Failed(ErrorKind::ServerError),
            status: Some(500),
            ..Report::ok(None)
        };
        t.report(&refused);
        assert!(
            (bucket.available() - 970.0).abs() < 1e-9,
            "a refused call is refunded"
        );
        let e = BucketStep {
            bucket: &bucket,
            unit: BucketUnit::Tokens,
            label: "tpm_limit",
        }
        .admit(&Ask {
            tokens: 5000,
            ..ask()
        })
        .await
        .unwrap_err();
        assert_eq!(e.reason, SkipReason::TokenBucket);
        assert_eq!(e.message, "tpm_limit: 5000 tokens not available");
    }

    #[tokio::test]
    async fn the_breaker_learns_only_health_failures() {
        let breaker = CircuitBreaker::new(
            "m",
            BreakerSettings {
                failure_threshold: 1,
                ..BreakerSettings::default()
            },
        );
        let t = breaker.admit(&ask()).await.unwrap();
        t.report(&Report {
            outcome: Outcome::Failed(ErrorKind::RateLimited),
            ..Report::ok(None)
        });
        assert_eq!(breaker.snapshot().state, "closed");
        let t = breaker.admit(&ask()).await.unwrap();
        t.report(&Report {
            outcome: Outcome::Failed(ErrorKind::StreamCut),
            ..Report::ok(None)
        });
        assert_eq!(breaker.snapshot().state, "open");
        let e = breaker.admit(&ask()).await.unwrap_err();
        assert_eq!(e.reason, SkipReason::CircuitOpen);
        assert!(e.retry_at.is_some());
    }

    #[tokio::test]
    async fn a_key_ticket_cools_and_disables_its_key() {
        let pool = KeyPool::new("p", vec![ApiKey::new("k1".into())]);
        let t = pool.admit(&ask()).await.unwrap();
        t.report(&Report {
            outcome: Outcome::Failed(ErrorKind::RateLimited),
            status: Some(429),
            retry_after: Some(Duration::from_secs(5)),
            ..Report::ok(None)
        });
        let e = pool.admit(&ask()).await.unwrap_err();
        assert_eq!(e.reason, SkipReason::KeyCooldown);
        let pool = KeyPool::new("p", vec![ApiKey::new("k1".into())]);
        let t = pool.admit(&ask()).await.unwrap();
        t.report(&Report {
            outcome: Outcome::Failed(ErrorKind::Auth),
            status: Some(401),
            message: "bad key",
            ..Report::ok(None)
        });
        assert_eq!(
            pool.admit(&ask()).await.unwrap_err().reason,
            SkipReason::NoKey
        );
    }
}
