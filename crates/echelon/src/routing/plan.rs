//! Turning a route name into the ordered tiers of candidates to try.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use echelon_types::ChatCompletionRequest;

use super::model::Model;
use super::pool::PollingPool;
use super::stats::RouteStats;
use crate::config::RetryOn;
use crate::config::StreamFailureConfig;
use crate::provider::ErrorKind;
use crate::resilience::breaker::CircuitBreaker;
use crate::resilience::concurrency::ConcurrencyLimit;
use crate::resilience::token_bucket::TokenBucket;
use crate::state::{StateId, StateRegistry, Unit};

/// Request defaults an echelon applies when the request does not set them (seed 001).
#[derive(Debug, Clone, Default)]
pub(crate) struct EchelonDefaults {
    pub(crate) temperature: Option<f64>,
    pub(crate) max_tokens: Option<u32>,
    /// Overrides each model's `max_retries` within this echelon.
    pub(crate) max_retries: Option<u32>,
    /// Overrides each model's `retry_on`, key by key, within this echelon.
    pub(crate) retry_on: RetryOn,
    /// Overrides each model's `rate_limit_wait` within this echelon.
    pub(crate) rate_limit_wait: Option<Duration>,
    /// Bounds each attempt within this echelon (non-streamed: the whole call; streamed:
    /// until the first content chunk).
    pub(crate) timeout: Option<Duration>,
}

impl EchelonDefaults {
    /// The output cap a request has within this echelon: its own, else the echelon's
    /// `max_tokens` (the same rule the provider request applies when serialized).
    pub(crate) fn max_output_tokens(&self, req: &ChatCompletionRequest) -> Option<u32> {
        req.max_output_tokens().or(self.max_tokens)
    }

    /// Retries of `model` through this echelon after failures of `kind` (the rule of
    /// [`RetryOn`]): the echelon's `retry_on` entry, else (but for the timeouts) its
    /// `max_retries`, else the model's own ([`Model::retries_on`]). A 401/403 may move
    /// on to another key `max_retries` times (the echelon's, else the model's); any
    /// other kind is never retried (0).
    pub(crate) fn retries_on(&self, model: &Model, kind: ErrorKind) -> u32 {
        if kind == ErrorKind::Auth {
            return self.max_retries.unwrap_or(model.max_retries());
        }
        if let Some(n) = self.retry_on.get(kind) {
            return n;
        }
        if let Some(n) = self.max_retries
            && RetryOn::KINDS.contains(&kind)
            && !kind.is_timeout()
        {
            return n;
        }
        model.retries_on(kind).unwrap_or(0)
    }

    /// How long a request may wait in place for `model` through this echelon when it
    /// is rate-limited: the echelon's `rate_limit_wait`, else the model's.
    pub(crate) fn rate_limit_wait(&self, model: &Model) -> Duration {
        self.rate_limit_wait.unwrap_or(model.rate_limit_wait())
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
    pub(crate) concurrency: Option<Arc<ConcurrencyLimit>>,
    /// The echelon's `rpm_limit`, over all its models.
    pub(crate) rpm: Option<Arc<TokenBucket>>,
    /// How a refusal by `rpm` names it: ``echelon `g.echelon1` rpm_limit``.
    pub(crate) rpm_label: String,
    /// Spreads requests over the tier's models: each request starts one further along.
    next: AtomicUsize,
}

impl Tier {
    /// A tier over `models`; its own limits (an echelon's `concurrency_limit` and
    /// `rpm_limit`) come from `registry`, keyed by `label`.
    pub(crate) fn new(
        label: String,
        models: Vec<Arc<Model>>,
        defaults: EchelonDefaults,
        limits: EchelonLimits,
        registry: &dyn StateRegistry,
    ) -> Self {
        let unit_id = |unit| StateId::Route {
            label: label.clone(),
            unit,
        };
        Tier {
            rpm_label: format!("echelon `{label}` rpm_limit"),
            concurrency: limits
                .concurrency_limit
                .map(|n| registry.concurrency(&unit_id(Unit::Concurrency), n)),
            rpm: limits.rpm_limit.map(|rpm| {
                let rpm = f64::from(rpm);
                registry.bucket(&unit_id(Unit::RpmLimit), rpm, rpm / 60.0)
            }),
            label,
            models,
            defaults,
            next: AtomicUsize::new(0),
        }
    }

    /// The tier's models in the order this request tries them: fewest requests in flight
    /// first, ties in round-robin order (issue 4: "least in-flight, then round-robin").
    pub(crate) fn ordered(&self) -> Vec<&Arc<Model>> {
        let n = self.models.len();
        if n <= 1 {
            return self.models.iter().collect();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut order: Vec<&Arc<Model>> = self.models.iter().cycle().skip(start).take(n).collect();
        // Stable: equal loads keep their round-robin order.
        order.sort_by_key(|m| m.in_flight());
        order
    }
}

/// One step of a plan: a tier of models (an echelon, or a lone model), or a polling pool.
#[derive(Debug, Clone)]
pub(crate) enum Step {
    Tier(Arc<Tier>),
    Pool(Arc<PoolStep>),
}

impl Step {
    /// Identity for de-duplication when fallbacks repeat a step.
    pub(crate) fn same_as(&self, other: &Step) -> bool {
        match (self, other) {
            (Step::Tier(a), Step::Tier(b)) => Arc::ptr_eq(a, b),
            (Step::Pool(a), Step::Pool(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// The models this step may call.
    pub(crate) fn models(&self) -> &[Arc<Model>] {
        match self {
            Step::Tier(t) => &t.models,
            Step::Pool(p) => p.pool.instances(),
        }
    }
}

/// A polling pool as a step: its instances, and its own fallback (seed 001/002:
/// `instance_rotation` takes the next healthy instance, `simple_retry` retries the same
/// one), each up to `max_instance_attempts` calls.
#[derive(Debug)]
pub(crate) struct PoolStep {
    pub(crate) pool: Arc<PollingPool>,
    /// The instances as a tier without limits, and with no per-model retries: the
    /// pool's own fallback does the retrying.
    pub(crate) tier: Tier,
    pub(crate) simple_retry: bool,
    pub(crate) max_instance_attempts: u32,
}

/// What a route name resolves to: its steps in order, and how to move between them
/// (the group's `fallback_config`, seed 001/002).
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) kind: RouteKind,
    /// The route's own steps first, then those of its `fallback_groups`, without repeats.
    pub(crate) steps: Vec<Step>,
    /// How many of `steps` are the route's own (the rest come from fallbacks).
    pub(crate) own_steps: usize,
    /// `provider_failover`: after a failure, only models of providers that have not
    /// failed for this request are tried.
    pub(crate) provider_failover: bool,
    /// Most calls in total for one request (`max_attempts`).
    pub(crate) max_attempts: Option<u32>,
    /// Pause before moving to the next step after a step failed (`retry_delay`).
    pub(crate) step_delay: Option<Duration>,
    /// The group's own breaker (`fallback_config.circuit_breaker`): when the group's own
    /// steps keep failing, they are skipped and the request goes straight to the
    /// fallbacks until it half-opens.
    pub(crate) group_breaker: Option<CircuitBreaker>,
    /// Counters and fallback history.
    pub(crate) stats: Arc<RouteStats>,
    /// What a stream that fails after its first content chunk does (`stream_failure:`).
    pub(crate) stream_failure: StreamFailureConfig,
}

impl Plan {
    /// A plan of plain steps with no fallback settings.
    pub(crate) fn simple(kind: RouteKind, steps: Vec<Step>) -> Self {
        let own_steps = steps.len();
        Plan {
            kind,
            steps,
            own_steps,
            provider_failover: false,
            max_attempts: None,
            step_delay: None,
            group_breaker: None,
            stats: Arc::default(),
            stream_failure: StreamFailureConfig::default(),
        }
    }
}

/// The kind of thing a route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteKind {
    Model,
    TaskGroup,
    Echelon,
    PollingPool,
    Wrapper,
}

impl RouteKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RouteKind::Model => "model",
            RouteKind::TaskGroup => "task_group",
            RouteKind::Echelon => "echelon",
            RouteKind::PollingPool => "polling_pool",
            RouteKind::Wrapper => "wrapper",
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, ProviderApi, ProviderConfig};
    use crate::resilience::key_pool::KeyPool;

    fn model(configure: impl FnOnce(&mut ModelConfig)) -> Model {
        let provider = ProviderConfig {
            base_url: "http://127.0.0.1:9/v1".to_owned(),
            api_keys: Vec::new(),
            api: ProviderApi::OpenAi,
            key_cooldown: ProviderConfig::DEFAULT_KEY_COOLDOWN,
            headers: Default::default(),
            responses: false,
        };
        let mut config = ModelConfig::new("p", "m");
        configure(&mut config);
        Model::from_config(
            "m",
            &config,
            &provider,
            KeyPool::new("m", Vec::new()),
            &mut crate::provider::HttpClients::new(),
            &crate::state::MemoryRegistry::new(),
        )
        .unwrap()
    }

    /// `retry_on` resolution through an echelon: its entry, else (not for timeouts) its
    /// `max_retries`, else the model's entry, else the model's default.
    #[test]
    fn the_echelon_overrides_the_models_retry_on_key_by_key() {
        let m = model(|c| {
            c.max_retries = 4;
            c.retry_on.server_error = Some(1);
            c.retry_on.timeout = Some(3);
            c.rate_limit_wait = Duration::from_secs(2);
        });
        let plain = EchelonDefaults::default();
        assert_eq!(plain.retries_on(&m, ErrorKind::ServerError), 1);
        assert_eq!(plain.retries_on(&m, ErrorKind::Timeout), 3);
        assert_eq!(plain.retries_on(&m, ErrorKind::FirstTokenTimeout), 0);
        assert_eq!(plain.retries_on(&m, ErrorKind::Connect), 4);
        assert_eq!(plain.retries_on(&m, ErrorKind::Auth), 4, "other keys");
        assert_eq!(plain.retries_on(&m, ErrorKind::BadRequest), 0);
        assert_eq!(plain.rate_limit_wait(&m), Duration::from_secs(2));

        let echelon = EchelonDefaults {
            max_retries: Some(1),
            retry_on: RetryOn {
                connect: Some(0),
                first_token_timeout: Some(2),
                ..RetryOn::default()
            },
            rate_limit_wait: Some(Duration::ZERO),
            ..EchelonDefaults::default()
        };
        assert_eq!(echelon.retries_on(&m, ErrorKind::Connect), 0, "its entry");
        assert_eq!(echelon.retries_on(&m, ErrorKind::FirstTokenTimeout), 2);
        assert_eq!(
            echelon.retries_on(&m, ErrorKind::ServerError),
            1,
            "its max_retries over the model's entry"
        );
        assert_eq!(
            echelon.retries_on(&m, ErrorKind::Timeout),
            3,
            "max_retries is not a timeout's limit: the model's entry"
        );
        assert_eq!(echelon.retries_on(&m, ErrorKind::Auth), 1);
        assert_eq!(echelon.rate_limit_wait(&m), Duration::ZERO);

        // A polling pool's tier: no per-model retry of any kind.
        let pool = EchelonDefaults {
            max_retries: Some(0),
            retry_on: RetryOn::all(0),
            ..EchelonDefaults::default()
        };
        for kind in ErrorKind::ALL {
            assert_eq!(pool.retries_on(&m, kind), 0, "{kind}");
        }
    }
}
