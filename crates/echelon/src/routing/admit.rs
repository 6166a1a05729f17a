//! The admission of one attempt on one model: every step in DESIGN.md §3's order, and
//! the tickets it holds until the call's outcome is reported (for a stream, at its end).

use std::sync::Arc;
use std::time::Duration;

use super::model::{InFlight, Model};
use super::plan::Tier;
use super::pool::PollingPool;
use redis::FromRedisValue;
use tokio::time::Instant;

use crate::key::ApiKey;
use crate::resilience::admission::{
    Admit, Ask, BreakerTicket, BucketStep, BucketTicket, BucketUnit, KeyTicket, Refusal, Report,
    SlotStep, SlotTicket, Ticket, breaker_verdict, lease_key,
};
use crate::resilience::concurrency::LEASE_POLL;
use crate::resilience::token_bucket::Taken;
use crate::state::batch::{self, BatchAnswer};
use crate::telemetry::TraceSpan;

/// A polling pool's instance as a reporter: the attempt's outcome feeds its health.
#[derive(Debug)]
pub(crate) struct PoolTicket {
    pool: Arc<PollingPool>,
    index: usize,
}

impl PoolTicket {
    pub(crate) fn new(pool: Arc<PollingPool>, index: usize) -> Self {
        PoolTicket { pool, index }
    }
}

impl Ticket for PoolTicket {
    fn commit(&mut self) {}

    fn report(self, report: &Report<'_>) {
        if report.outcome == echelon_types::Outcome::Ok {
            self.pool.record(self.index, true);
        } else if report.outcome.counts_against_health() {
            self.pool.record(self.index, false);
        }
    }
}

/// Everything one attempt was granted, in admission order. Dropped unreported (the
/// attempt was refused by a later step, or never sent), each ticket gives back what it
/// took; [`report`](Self::report) hands every ticket the outcome.
#[derive(Debug)]
pub(crate) struct Admitted {
    breaker: BreakerTicket,
    buckets: Vec<BucketTicket>,
    slots: Vec<SlotTicket>,
    key: Option<KeyTicket>,
    pool: Option<PoolTicket>,
    _in_flight: Option<InFlight>,
    /// The attempt's span (`telemetry`; none when off): held as long as the tickets, so
    /// a stream's attempt span stays open until its last chunk, and handed the outcome
    /// with them.
    span: TraceSpan,
}

impl Admitted {
    /// What one admission granted, in admission order, before any pool ticket, in-flight
    /// count or span is attached.
    fn new(
        breaker: BreakerTicket,
        buckets: Vec<BucketTicket>,
        slots: Vec<SlotTicket>,
        key: Option<KeyTicket>,
    ) -> Self {
        Admitted {
            breaker,
            buckets,
            slots,
            key,
            pool: None,
            _in_flight: None,
            span: TraceSpan::none(),
        }
    }

    /// The key to send, if the model has keys.
    pub(crate) fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref().map(KeyTicket::key)
    }

    /// The key's index in its pool.
    pub(crate) fn key_index(&self) -> Option<usize> {
        self.key.as_ref().map(KeyTicket::index)
    }

    /// The same tickets holding the attempt's `span` (`telemetry`).
    pub(crate) fn with_span(mut self, span: TraceSpan) -> Self {
        self.span = span;
        self
    }

    /// The attempt's span (none when telemetry is off).
    pub(crate) fn span(&self) -> &TraceSpan {
        &self.span
    }

    /// Feeds the outcome of this attempt to a polling pool's instance health too.
    pub(crate) fn with_pool(mut self, pool: PoolTicket) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The call is being sent: every ticket keeps what it took, and the model counts
    /// one more request in flight.
    pub(crate) fn commit(&mut self, model: &Arc<Model>) {
        self.breaker.commit();
        for b in &mut self.buckets {
            b.commit();
        }
        for s in &mut self.slots {
            s.commit();
        }
        if let Some(k) = &mut self.key {
            k.commit();
        }
        self._in_flight = Some(InFlight::new(model));
    }

    /// Hands every ticket the sent call's outcome and releases what they hold.
    pub(crate) fn report(self, report: &Report<'_>) {
        // The span ends when `self` is dropped, at the end of this call: a stream's
        // attempt span ends with the stream, not with its first chunk.
        crate::telemetry::record_outcome(&self.span, report.outcome, report.status);
        self.breaker.report(report);
        for b in self.buckets {
            b.report(report);
        }
        for s in self.slots {
            s.report(report);
        }
        if let Some(k) = self.key {
            k.report(report);
        }
        if let Some(p) = self.pool {
            p.report(report);
        }
    }
}

/// Admits one attempt on `model` within `tier`: the breaker, the echelon's `rpm_limit`,
/// the model's request buckets, its `tpm_limit`, the echelon's and the model's
/// concurrency limits, then a key. The first refusal ends it, and whatever the earlier
/// steps took goes back as their tickets drop.
///
/// With shared state every step is asked of Redis in one round trip ([`admit_shared`]);
/// this step-by-step path is the one of the memory backend and of a replica whose Redis
/// is down.
pub(crate) async fn admit(tier: &Tier, model: &Model, ask: &Ask<'_>) -> Result<Admitted, Refusal> {
    if let Some(done) = admit_shared(tier, model, ask).await {
        return done;
    }
    let breaker = model.breaker.admit(ask).await?;
    let mut buckets = Vec::new();
    for step in bucket_steps(tier, model) {
        buckets.push(step.admit(ask).await?);
    }
    let mut slots = Vec::new();
    for step in slot_steps(tier, model) {
        slots.push(step.admit(ask).await?);
    }
    let key = if model.keys().is_empty() {
        None
    } else {
        Some(model.keys().admit(ask).await?)
    };
    Ok(Admitted::new(breaker, buckets, slots, key))
}

/// The token-bucket steps of a candidate, in admission order: the echelon's
/// `rpm_limit`, the model's request buckets, its `tpm_limit`.
fn bucket_steps<'a>(tier: &'a Tier, model: &'a Model) -> Vec<BucketStep<'a>> {
    let mut steps = Vec::new();
    if let Some(rpm) = &tier.rpm {
        steps.push(BucketStep {
            bucket: rpm,
            unit: BucketUnit::Requests,
            label: &tier.rpm_label,
        });
    }
    for nb in &model.request_buckets {
        steps.push(BucketStep {
            bucket: &nb.bucket,
            unit: BucketUnit::Requests,
            label: nb.name,
        });
    }
    if let Some(tpm) = &model.tpm {
        steps.push(BucketStep {
            bucket: tpm,
            unit: BucketUnit::Tokens,
            label: "tpm_limit",
        });
    }
    steps
}

/// The concurrency steps of a candidate: the echelon's limit, then the model's.
fn slot_steps<'a>(tier: &'a Tier, model: &'a Model) -> Vec<SlotStep<'a>> {
    [
        ("echelon", &tier.concurrency),
        ("model", &model.concurrency),
    ]
    .into_iter()
    .filter_map(|(owner, limit)| limit.as_deref().map(|limit| SlotStep { limit, owner }))
    .collect()
}

/// What one step of a combined admission stands for.
enum Part<'a> {
    Breaker,
    Bucket(BucketStep<'a>, u64),
    Slot(SlotStep<'a>, String),
    Keys(String),
}

/// The admission of a candidate whose units are shared, in **one** Redis round trip
/// (`state::batch`): every step's script in one, atomically, admitting all or refusing
/// at the first step that refuses with nothing held. The answers are read by the same
/// functions as the step-by-step path's, so the tickets and the refusals are the same.
///
/// A bucket's wait is part of the round trip: its tokens are reserved (first come, first
/// served) and the candidate sleeps until the refill has paid them, holding its other
/// grants. A full concurrency limit is asked again, the whole candidate in one round
/// trip each time, every [`LEASE_POLL`] within the candidate's `queue_timeout` (holding
/// nothing meanwhile), as the step-by-step path polls for a slot.
///
/// `None`: take the step-by-step path instead: the units are not shared, or Redis is
/// down or did not answer (the units then fall back as `state.on_unavailable` says).
async fn admit_shared(
    tier: &Tier,
    model: &Model,
    ask: &Ask<'_>,
) -> Option<Result<Admitted, Refusal>> {
    let deadline = Instant::now() + ask.queue;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let now = Ask {
            queue: left,
            ..*ask
        };
        match admit_shared_once(tier, model, &now, ask.queue).await? {
            Once::Done(done) => return Some(done),
            Once::SlotFull(refused) if left.is_zero() => return Some(Err(refused)),
            Once::SlotFull(_) => tokio::time::sleep(LEASE_POLL.min(left)).await,
        }
    }
}

/// What one combined admission came to.
// Returned once per admission and matched at once, never stored: boxing would only add
// an allocation per candidate.
#[allow(clippy::large_enum_variant)]
enum Once {
    /// Admitted, or refused for good.
    Done(Result<Admitted, Refusal>),
    /// A concurrency limit was full (nothing is held): may be asked again.
    SlotFull(Refusal),
}

/// One round trip of [`admit_shared`]; `queue` is the candidate's whole wait (for the
/// refusal's message), `ask.queue` what is left of it.
async fn admit_shared_once(
    tier: &Tier,
    model: &Model,
    ask: &Ask<'_>,
    queue: Duration,
) -> Option<Once> {
    let state = model.breaker.shared_state()?;
    if !state.is_up() {
        return None;
    }
    let mut parts = vec![Part::Breaker];
    let mut steps = vec![model.breaker.shared_step()?];
    let mut buckets = Vec::new();
    for b in bucket_steps(tier, model) {
        let n = b.tokens(ask);
        if n == 0 {
            buckets.push(b.ticket(0, Taken::Shared));
            continue;
        }
        steps.push(b.bucket.shared_step(n as f64, ask.queue)?);
        parts.push(Part::Bucket(b, n));
    }
    for s in slot_steps(tier, model) {
        let name = state.lease_name();
        steps.push(s.limit.shared_step(&name)?);
        parts.push(Part::Slot(s, name));
    }
    if !model.keys().is_empty() {
        let name = state.lease_name();
        steps.push(model.keys().shared_step(ask.exclude_keys, Some(&name))?);
        parts.push(Part::Keys(name));
    }
    let answers = match batch::admit(state, &steps).await.ok()? {
        BatchAnswer::Refused { step, answer } => {
            return match parts.into_iter().nth(step)? {
                Part::Breaker => {
                    let v = Vec::<i64>::from_redis_value(answer).ok()?;
                    match breaker_verdict(&model.breaker, model.breaker.shared_answer(&v)?) {
                        Err(refused) => Some(Once::Done(Err(refused))),
                        Ok(_) => None,
                    }
                }
                Part::Bucket(b, n) => Some(Once::Done(Err(b.refusal(n)))),
                Part::Slot(s, _) => Some(Once::SlotFull(s.refusal(s.limit.reached(queue)))),
                Part::Keys(_) => None,
            };
        }
        BatchAnswer::Admitted(answers) => answers,
    };
    let mut breaker = None;
    let mut slots = Vec::new();
    let mut synced = true;
    let mut picked = None;
    // The longest a bucket's reserved tokens take to be paid back by its refill (ms).
    let mut wait = 0u64;
    for (part, answer) in parts.into_iter().zip(answers) {
        match part {
            Part::Breaker => {
                breaker = Vec::<i64>::from_redis_value(answer)
                    .ok()
                    .and_then(|v| model.breaker.shared_answer(&v))
                    .and_then(|granted| breaker_verdict(&model.breaker, granted).ok());
            }
            Part::Bucket(b, n) => {
                // Never past the candidate's own queue wait, whatever Redis answers.
                let ms = u64::try_from(i64::from_redis_value(answer).unwrap_or(0)).unwrap_or(0);
                let left = u64::try_from(ask.queue.as_millis()).unwrap_or(u64::MAX);
                wait = wait.max(ms.min(left));
                buckets.push(b.ticket(n, Taken::Shared));
            }
            Part::Slot(s, name) => slots.extend(s.limit.shared_slot(name).map(SlotTicket::new)),
            Part::Keys(lease) => match <(i64, Vec<String>, String)>::from_redis_value(answer) {
                Ok((now_ms, fields, id)) => {
                    model.keys().apply_shared(now_ms, &fields);
                    picked = Some((id, lease));
                }
                Err(_) => synced = false,
            },
        }
    }
    // An answer not of the script's shape (never from a sound Redis): what was granted
    // goes back as its tickets drop, and the step-by-step path decides.
    let breaker = breaker.filter(|_| synced)?;
    let key = if model.keys().is_empty() {
        None
    } else {
        match lease_key(model.keys(), ask, picked) {
            Ok(k) => Some(k),
            Err(refused) => return Some(Once::Done(Err(refused))),
        }
    };
    let admitted = Admitted::new(breaker, buckets, slots, key);
    // A bucket queued the candidate (within its `queue_timeout`): it waits holding what
    // it was granted; dropped meanwhile, every ticket gives its share back.
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    Some(Once::Done(Ok(admitted)))
}
