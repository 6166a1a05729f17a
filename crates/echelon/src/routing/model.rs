//! A model: one callable target (provider endpoint + upstream model name + keys + limits),
//! with its resilience units in the order DESIGN.md §3 draws: circuit breaker → token
//! buckets → concurrency limit → key pool → retry.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::config::{CircuitBreakerConfig, ModelConfig, ProviderConfig, RetryOn, TokenEncoding};
use crate::provider::{ErrorKind, HttpClients, Provider, ProviderError, Timeouts};
use crate::resilience::breaker::{BreakerSettings, CircuitBreaker, FailureRate};
use crate::resilience::concurrency::ConcurrencyLimit;
use crate::resilience::key_pool::KeyPool;
use crate::resilience::retry_budget::RetryBudget;
use crate::resilience::token_bucket::TokenBucket;
use crate::state::{StateId, StateRegistry, Unit};
use crate::tokens::Encoding;
use crate::usage::pricing::{Price, price_for};

/// Window over which the retry budget is counted.
const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries per second always allowed by the budget, so that low traffic can retry.
const RETRY_BUDGET_MIN_PER_SEC: f64 = 1.0;

/// A named token bucket of a model: requests (`rpm_limit`, `rate_limit_*`) or tokens
/// (`tpm_limit`).
#[derive(Debug)]
pub(crate) struct NamedBucket {
    /// `rpm_limit`, `rate_limit` or `tpm_limit`.
    pub(crate) name: &'static str,
    /// The bucket.
    pub(crate) bucket: Arc<TokenBucket>,
}

/// One model of the configuration, ready to call (DESIGN.md §2 "model").
#[derive(Debug)]
pub struct Model {
    id: String,
    provider: String,
    upstream_model: String,
    upstream: Arc<dyn Provider>,
    keys: Arc<KeyPool>,
    /// `provider|upstream model|base URL`: with the id, what keys its units in the
    /// state registry.
    identity: String,
    key_cooldown: Duration,
    max_retries: u32,
    retry_on: RetryOn,
    rate_limit_wait: Duration,
    retry_delay: Duration,
    context_window: Option<u32>,
    /// Whether it continues an answer given as a last assistant message (`prefill`).
    prefill: bool,
    /// Whether it constrains its output to a JSON schema (`structured_output`).
    structured_output: bool,
    queue_timeout: Duration,
    pub(crate) breaker: CircuitBreaker,
    /// Request buckets: one request each.
    pub(crate) request_buckets: Vec<NamedBucket>,
    /// The `tpm_limit` bucket: prompt tokens + max_tokens reserved per request.
    pub(crate) tpm: Option<Arc<TokenBucket>>,
    pub(crate) concurrency: Option<Arc<ConcurrencyLimit>>,
    pub(crate) retry_budget: Arc<RetryBudget>,
    in_flight: AtomicU32,
    encoding: Encoding,
    price: Option<Price>,
}

/// Counts one request in flight on a model until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Model>);

impl InFlight {
    pub(crate) fn new(model: &Arc<Model>) -> Self {
        model.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(model.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Breaker settings from config (seed 001 `circuit_breaker`).
pub(crate) fn breaker_settings(c: &CircuitBreakerConfig) -> BreakerSettings {
    BreakerSettings {
        failure_threshold: c.failure_threshold,
        recovery_time: c.recovery_time,
        half_open_requests: c.half_open_requests,
        failure_rate: c.failure_rate.map(|threshold| FailureRate {
            threshold,
            window: c.window,
            min_requests: c.min_requests,
        }),
    }
}

impl Model {
    /// Builds model `id` from its config and its provider's. `keys` is the key pool it
    /// draws from: the provider's (shared with every model using it) or its own, whose
    /// keys its upstream scrubs from error messages; its
    /// HTTP client comes from `http`, shared with the other models of the gateway; its
    /// provider's `api` selects the wire ([`crate::provider::build`]); its breaker,
    /// buckets, concurrency limit and retry budget come from `registry`, keyed by its id
    /// and identity (provider, upstream model, base URL), so a rebuild of an unchanged
    /// model keeps their state.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn from_config(
        id: &str,
        config: &ModelConfig,
        provider: &ProviderConfig,
        keys: Arc<KeyPool>,
        http: &mut HttpClients,
        registry: &dyn StateRegistry,
    ) -> Result<Model, ProviderError> {
        let total = config.timeout;
        let timeouts = Timeouts {
            connect: config.connect_timeout,
            total,
            first_token: config.effective_first_token_timeout(),
            chunk_gap: config.chunk_timeout,
        };
        let base_url = config.base_url.as_deref().unwrap_or(&provider.base_url);
        let identity = format!("{}|{}|{base_url}", config.provider, config.model);
        let key = identity.clone();
        let unit_id = |unit| StateId::Model {
            id: id.to_owned(),
            identity: key.clone(),
            unit,
        };
        let per_minute = |unit, limit: u32| {
            let limit = f64::from(limit);
            registry.bucket(&unit_id(unit), limit, limit / 60.0)
        };
        let mut request_buckets = Vec::new();
        if let Some(rpm) = config.rpm_limit {
            request_buckets.push(NamedBucket {
                name: "rpm_limit",
                bucket: per_minute(Unit::RpmLimit, rpm),
            });
        }
        if let (Some(cap), Some(rate)) = (config.rate_limit_capacity, config.rate_limit_refill_rate)
        {
            request_buckets.push(NamedBucket {
                name: "rate_limit",
                bucket: registry.bucket(&unit_id(Unit::RateLimit), cap, rate),
            });
        }
        Ok(Model {
            id: id.to_owned(),
            provider: config.provider.clone(),
            upstream_model: config.model.clone(),
            upstream: crate::provider::build(
                provider,
                http.get_with(timeouts.connect, &provider.headers)?,
                base_url,
                timeouts,
                keys.redactor(),
                config.max_response_bytes,
                config.malformed_event,
            ),
            keys,
            identity,
            key_cooldown: config.key_cooldown.unwrap_or(provider.key_cooldown),
            max_retries: config.max_retries,
            retry_on: config.retry_on,
            rate_limit_wait: config.rate_limit_wait,
            retry_delay: config.retry_delay,
            context_window: config.context_window,
            prefill: config.prefill,
            structured_output: config.structured_output,
            queue_timeout: config.queue_timeout,
            breaker: registry.breaker(
                &unit_id(Unit::Breaker),
                id,
                &breaker_settings(&config.circuit_breaker),
            ),
            request_buckets,
            tpm: config.tpm_limit.map(|tpm| per_minute(Unit::TpmLimit, tpm)),
            concurrency: config
                .concurrency_limit
                .map(|n| registry.concurrency(&unit_id(Unit::Concurrency), n)),
            retry_budget: registry.retry_budget(
                &unit_id(Unit::RetryBudget),
                config.retry_budget,
                RETRY_BUDGET_WINDOW,
                RETRY_BUDGET_MIN_PER_SEC,
            ),
            in_flight: AtomicU32::new(0),
            encoding: match config.token_encoding() {
                TokenEncoding::Cl100kBase => Encoding::Cl100kBase,
                TokenEncoding::O200kBase => Encoding::O200kBase,
            },
            price: price_for(config.pricing.as_ref(), &config.model),
        })
    }

    /// The state ids of its units (breaker, buckets, limits, retry budget, key pool).
    pub(crate) fn state_ids(&self) -> Vec<StateId> {
        let unit = |unit| StateId::Model {
            id: self.id.clone(),
            identity: self.identity.clone(),
            unit,
        };
        let mut ids: Vec<StateId> = [
            Unit::Breaker,
            Unit::RpmLimit,
            Unit::RateLimit,
            Unit::TpmLimit,
            Unit::Concurrency,
            Unit::RetryBudget,
        ]
        .into_iter()
        .map(unit)
        .collect();
        ids.push(StateId::KeyPool {
            name: self.keys.name().to_owned(),
            key_ids: self.keys.snapshot().into_iter().map(|k| k.id).collect(),
        });
        ids
    }

    /// The model id of the config.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The provider id.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// The name the provider knows the model by (sent as the request's `model`).
    pub fn upstream_model(&self) -> &str {
        &self.upstream_model
    }

    /// The upstream it calls: its provider's wire at its `base_url`, with its timeouts.
    pub fn upstream(&self) -> &Arc<dyn Provider> {
        &self.upstream
    }

    /// The key pool it draws from (possibly shared with other models).
    pub fn keys(&self) -> &Arc<KeyPool> {
        &self.keys
    }

    /// Cooldown of a key after a 429 without Retry-After.
    pub fn key_cooldown(&self) -> Duration {
        self.key_cooldown
    }

    /// Retries of the same model after a retryable error (seed 004 `max_retries`).
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// Its own `retry_on` entries (an echelon's override them, key by key).
    pub fn retry_on(&self) -> &RetryOn {
        &self.retry_on
    }

    /// Retries of the same model after failures of `kind` by its own settings
    /// ([`ModelConfig::retries_on`]); `None` for a kind never retried.
    pub fn retries_on(&self, kind: ErrorKind) -> Option<u32> {
        self.retry_on.limit(kind, self.max_retries)
    }

    /// Longest wait in place for this model when it is rate-limited
    /// ([`ModelConfig::rate_limit_wait`]).
    pub fn rate_limit_wait(&self) -> Duration {
        self.rate_limit_wait
    }

    /// Base delay before a retry; grows exponentially with jitter (seed 004 `retry_delay`).
    pub fn retry_delay(&self) -> Duration {
        self.retry_delay
    }

    /// The declared context window, tokens.
    pub fn context_window(&self) -> Option<u32> {
        self.context_window
    }

    /// Whether it continues an answer given as a last assistant message (the model's
    /// `prefill` setting): a stream continued on it is sent the partial answer that way.
    pub fn prefill(&self) -> bool {
        self.prefill
    }

    /// Whether it constrains its output to a JSON schema given as OpenAI
    /// `response_format` (the model's `structured_output` setting).
    pub fn structured_output(&self) -> bool {
        self.structured_output
    }

    /// Longest wait for a bucket or a concurrency slot before the model is skipped.
    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }

    /// The tiktoken encoding for local counts (`encoding`, else by upstream name).
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Its price (`pricing`, else the built-in table), when known.
    pub fn price(&self) -> Option<&Price> {
        self.price.as_ref()
    }

    /// The cost of an answer, USD; 0 when the price is unknown.
    pub fn cost_usd(&self, prompt: u64, completion: u64, cached: u64) -> f64 {
        self.price
            .as_ref()
            .map_or(0.0, |p| p.cost_usd(prompt, completion, cached))
    }

    /// As [`cost_usd`](Self::cost_usd), `cache_write` prompt tokens written to the
    /// provider's cache priced at `cache_write_per_1m` ([`Price::cost_usd_with_cache_write`]).
    pub fn cost_usd_with_cache_write(
        &self,
        prompt: u64,
        completion: u64,
        cached: u64,
        cache_write: u64,
    ) -> f64 {
        self.price.as_ref().map_or(0.0, |p| {
            p.cost_usd_with_cache_write(prompt, completion, cached, cache_write)
        })
    }

    /// The circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// Requests in flight on this model now (calls and streams holding a slot or key).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}
