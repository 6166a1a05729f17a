//! Turning a route name into the ordered tiers of candidates to try.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use echelon_types::ChatCompletionRequest;

use super::model::Model;
use crate::resilience::concurrency::ConcurrencyLimit;
use crate::resilience::token_bucket::TokenBucket;

/// Request defaults an echelon applies when the request does not set them (seed 001).
#[derive(Debug, Clone, Default)]
pub(crate) struct EchelonDefaults {
    pub(crate) temperature: Option<f64>,
    pub(crate) max_tokens: Option<u32>,
    /// Overrides each model's `max_retries` within this echelon.
    pub(crate) max_retries: Option<u32>,
    /// Bounds each attempt within this echelon (non-streamed: the whole call; streamed:
    /// until the first content chunk).
    pub(crate) timeout: Option<Duration>,
}

impl EchelonDefaults {
    pub(crate) fn apply(&self, req: &mut ChatCompletionRequest) {
        if req.temperature.is_none() {
            req.temperature = self.temperature;
        }
        if req.max_output_tokens().is_none() {
            req.max_tokens = self.max_tokens;
        }
    }
}

/// Limits an echelon puts on the requests through it (seed 001).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct EchelonLimits {
    pub(crate) concurrency_limit: Option<u32>,
    pub(crate) rpm_limit: Option<u32>,
}

/// One tier: an echelon of a task group, or a lone model.
#[derive(Debug)]
pub(crate) struct Tier {
    /// `group.echelonN`, or the model id.
    pub(crate) label: String,
    pub(crate) models: Vec<Arc<Model>>,
    pub(crate) defaults: EchelonDefaults,
    /// The echelon's `concurrency_limit`, over all its models.
    pub(crate) concurrency: Option<ConcurrencyLimit>,
    /// The echelon's `rpm_limit`, over all its models.
    pub(crate) rpm: Option<TokenBucket>,
    /// Spreads requests over the tier's models: each request starts one further along.
    next: AtomicUsize,
}

impl Tier {
    pub(crate) fn new(
        label: String,
        models: Vec<Arc<Model>>,
        defaults: EchelonDefaults,
        limits: EchelonLimits,
    ) -> Self {
        Tier {
            label,
            models,
            defaults,
            concurrency: limits.concurrency_limit.map(ConcurrencyLimit::new),
            rpm: limits
                .rpm_limit
                .map(|rpm| TokenBucket::per_minute(f64::from(rpm))),
            next: AtomicUsize::new(0),
        }
    }

    /// The tier's models in the order this request tries them (rotated round-robin).
    pub(crate) fn ordered(&self) -> impl Iterator<Item = &Arc<Model>> {
        let n = self.models.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        self.models
            .iter()
            .cycle()
            .skip(start)
            .take(self.models.len())
    }
}

/// What a route name resolves to: its tiers, tried in order (the seeds' `echelon_down`).
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) tiers: Vec<Arc<Tier>>,
}

/// The kind of thing a route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    Model,
    TaskGroup,
    Echelon,
}

impl RouteKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RouteKind::Model => "model",
            RouteKind::TaskGroup => "task_group",
            RouteKind::Echelon => "echelon",
        }
    }
}
