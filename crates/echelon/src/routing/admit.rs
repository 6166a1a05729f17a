//! The admission of one attempt on one model: every step in DESIGN.md §3's order, and
//! the tickets it holds until the call's outcome is reported (for a stream, at its end).

use std::sync::Arc;

use super::model::{InFlight, Model};
use super::plan::Tier;
use super::pool::PollingPool;
use crate::key::ApiKey;
use crate::resilience::admission::{
    Admit, Ask, BreakerTicket, BucketStep, BucketTicket, BucketUnit, KeyTicket, Refusal, Report,
    SlotStep, SlotTicket, Ticket,
};

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
    /// The attempt's span (`telemetry`; [`tracing::Span::none`] when off): held as long
    /// as the tickets, so a stream's attempt span stays open until its last chunk, and
    /// handed the outcome with them.
    span: tracing::Span,
}

impl Admitted {
    /// The key to send, if the model has keys.
    pub(crate) fn key(&self) -> Option<&ApiKey> {
        self.key.as_ref().map(KeyTicket::key)
    }

    /// The key's index in its pool.
    pub(crate) fn key_index(&self) -> Option<usize> {
        self.key.as_ref().map(KeyTicket::index)
    }

    /// The same tickets holding the attempt's `span` (`telemetry`).
    pub(crate) fn with_span(mut self, span: tracing::Span) -> Self {
        self.span = span;
        self
    }

    /// The attempt's span ([`tracing::Span::none`] when telemetry is off).
    pub(crate) fn span(&self) -> &tracing::Span {
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
        crate::telemetry::record_outcome(&self.span, report.outcome, report.status);
        // The exporter ends a span at its last exit: entered here, a stream's attempt
        // span ends with the stream, not with its first chunk.
        let _entered = (!self.span.is_none()).then(|| self.span.enter());
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
pub(crate) async fn admit(tier: &Tier, model: &Model, ask: &Ask<'_>) -> Result<Admitted, Refusal> {
    let breaker = model.breaker.admit(ask).await?;
    let mut buckets = Vec::new();
    if let Some(rpm) = &tier.rpm {
        let step = BucketStep {
            bucket: rpm,
            unit: BucketUnit::Requests,
            label: &tier.rpm_label,
        };
        buckets.push(step.admit(ask).await?);
    }
    for nb in &model.request_buckets {
        let step = BucketStep {
            bucket: &nb.bucket,
            unit: BucketUnit::Requests,
            label: nb.name,
        };
        buckets.push(step.admit(ask).await?);
    }
    if let Some(tpm) = &model.tpm {
        let step = BucketStep {
            bucket: tpm,
            unit: BucketUnit::Tokens,
            label: "tpm_limit",
        };
        buckets.push(step.admit(ask).await?);
    }
    let mut slots = Vec::new();
    for (owner, limit) in [
        ("echelon", &tier.concurrency),
        ("model", &model.concurrency),
    ] {
        if let Some(limit) = limit {
            slots.push(SlotStep { limit, owner }.admit(ask).await?);
        }
    }
    let key = if model.keys().is_empty() {
        None
    } else {
        Some(model.keys().admit(ask).await?)
    };
    Ok(Admitted {
        breaker,
        buckets,
        slots,
        key,
        pool: None,
        _in_flight: None,
        span: tracing::Span::none(),
    })
}
