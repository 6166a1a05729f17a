//! The gateway: the current topology (swappable), the state registry its units live
//! in, where finished requests go, and the background tasks it runs. It resolves a
//! request's route and hands the plan to the plan runner (`execute`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use echelon_types::{
    Attempt, ChatCompletion, ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse,
    NativeRequest,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::attempt::{Answer, Job};
use super::cancel::Pending;
use super::execute::{embed_session_key, run_plan, session_key};
use super::model::Model;
use super::plan::{Plan, Step};
use super::stats::{FallbackEvent, StatsSnapshot};
use super::stream::{Continuation, GatewayStream, StreamAccounting};
use super::topology::{NodeRoutes, RouteInfo, Topology};
use crate::config::{Config, StreamFailureMode};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::state::StateRegistry;
use crate::usage::record::{Endpoint, RequestRecord};
use crate::usage::{RecordSink, RequestMeta};

/// A successful non-streamed completion and how it was obtained.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The provider's answer, unknown fields included.
    pub response: ChatCompletion,
    /// The model id that answered.
    pub model: String,
    /// Its provider id.
    pub provider: String,
    /// Every attempt, the successful last one included.
    pub attempts: Vec<Attempt>,
}

/// A successful embeddings request and how it was obtained.
#[derive(Debug, Clone)]
pub struct Embeddings {
    /// The provider's answer, its vectors in the encoding the request asked for
    /// (`float` or `base64`), unknown fields included.
    pub response: EmbeddingResponse,
    /// The model id that answered.
    pub model: String,
    /// Its provider id.
    pub provider: String,
    /// Every attempt, the successful last one included.
    pub attempts: Vec<Attempt>,
}

/// Per-request options that do not travel in the body.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// A conversation id (the `x-session-id` header): a polling pool keeps the
    /// conversation on one instance while it is healthy.
    pub session_id: Option<String>,
    /// The request id to record (the server's `x-request-id`); a new one when `None`.
    pub request_id: Option<String>,
}

/// The gateway: every model and route of a [`Config`], ready to serve requests.
///
/// Build it with [`from_config`](Self::from_config), call [`start`](Self::start) inside a
/// tokio runtime to run its background tasks (polling pools' health checks), and
/// [`shutdown`](Self::shutdown) to stop them and wait for the records still being
/// written (requests and streams the client abandoned, recorded with status 499).
#[derive(Debug)]
pub struct Gateway {
    /// The models and routes requests are served over; a request keeps the one it
    /// started with.
    topology: ArcSwap<Topology>,
    /// Where the resilience units' state lives, by stable id.
    registry: Arc<dyn StateRegistry>,
    /// Where finished requests go (the ledger), besides the metrics.
    sink: Option<Arc<dyn RecordSink>>,
    /// Background tasks: health checks and the records of abandoned requests.
    tasks: TaskTracker,
    /// Ends the health checks at shutdown.
    stop: CancellationToken,
    /// Whether [`start`](Self::start) ran (a reload then starts the new pools' checks).
    started: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for dyn RecordSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSink")
    }
}

impl Gateway {
    /// Builds the models and routes of a validated config over the state registry its
    /// `state:` section asks for (in memory by default, shared through Redis with
    /// `backend: redis`). Nothing runs until [`start`](Self::start).
    ///
    /// # Errors
    /// When a model's HTTP client cannot be built, or the config references something that
    /// does not exist (a config that passed validation never does).
    pub fn from_config(config: &Config) -> Result<Gateway, GatewayError> {
        let registry = crate::state::registry_for(&config.state).map_err(|e| {
            GatewayError::new(crate::error::GatewayErrorKind::Unavailable, e.to_string())
        })?;
        Gateway::with_registry(config, registry)
    }

    /// [`from_config`](Self::from_config) over the given state registry.
    ///
    /// # Errors
    /// As [`from_config`](Self::from_config).
    pub fn with_registry(
        config: &Config,
        registry: Arc<dyn StateRegistry>,
    ) -> Result<Gateway, GatewayError> {
        let topology = Topology::build(config, registry.as_ref())?;
        Ok(Gateway {
            topology: ArcSwap::from_pointee(topology),
            registry,
            sink: None,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Starts the background tasks: each polling pool's health checks (every
    /// `health_check_interval`). Call it once, inside a tokio runtime; later calls do
    /// nothing.
    ///
    /// # Errors
    /// When called outside a tokio runtime.
    pub fn start(&self) -> Result<(), GatewayError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(GatewayError::new(
                GatewayErrorKind::Unavailable,
                "Gateway::start must be called inside a tokio runtime",
            ));
        }
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        self.spawn_health_checks(&self.topology());
        Ok(())
    }

    fn spawn_health_checks(&self, topology: &Topology) {
        for (_, pool) in topology.pools() {
            pool.spawn_health_checks(&self.tasks, self.stop.clone());
        }
    }

    /// Stops the background tasks and waits for those still finishing (the records of
    /// abandoned requests and streams reach the sink before this returns).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Builds a new topology from `config` over the same state registry and swaps it in:
    /// new requests use it at once, requests in flight finish on the old one. Units whose
    /// id did not change (a model with the same provider, upstream model and base URL; a
    /// key pool with the same keys) keep their state, a bucket whose limit changed is
    /// rescaled to the same fraction of its new capacity; the rest start fresh, and the
    /// registry forgets units the new topology no longer has. Routes keep their counters
    /// and fallback history, polling pools their instances' health, by name.
    ///
    /// # Errors
    /// As [`from_config`](Self::from_config); the old topology then keeps serving.
    pub fn reload(&self, config: &Config) -> Result<(), GatewayError> {
        let mut topology = Topology::build(config, self.registry.as_ref())?;
        topology.adopt(&self.topology());
        let topology = Arc::new(topology);
        let live = topology.state_ids();
        self.topology.store(topology.clone());
        self.registry.retain(&|id| live.contains(id));
        if self.started.load(std::sync::atomic::Ordering::SeqCst) {
            self.spawn_health_checks(&topology);
        }
        Ok(())
    }

    /// The topology new requests are routed over now.
    pub fn topology(&self) -> Arc<Topology> {
        self.topology.load_full()
    }

    /// The state registry the units live in.
    pub fn registry(&self) -> &Arc<dyn StateRegistry> {
        &self.registry
    }

    /// Every route a request may name: models first, then task groups each followed by
    /// their echelons, then pools and wrappers.
    pub fn routes(&self) -> Arc<[RouteInfo]> {
        self.topology.load().routes().clone()
    }

    /// A model by id.
    pub fn model(&self, id: &str) -> Option<Arc<Model>> {
        self.topology.load().model(id).cloned()
    }

    /// The configured `default_route`.
    pub fn default_route(&self) -> Option<String> {
        self.topology.load().default_route().map(str::to_owned)
    }

    /// The route for an LLM node that may name several (seed 001's LLM node config):
    /// wrapper > task group > polling pool > the configured `default_route`
    /// ([`Topology::resolve_node`]).
    pub fn resolve_node(&self, node: &NodeRoutes<'_>) -> Option<String> {
        self.topology.load().resolve_node(node).map(str::to_owned)
    }

    /// Sends every finished request's record to `sink` (the ledger writer) as well as to
    /// the metrics.
    pub fn with_record_sink(mut self, sink: Arc<dyn RecordSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Records waiting in the sink's queue (0 without a sink).
    pub fn record_queue_depth(&self) -> usize {
        self.sink.as_ref().map_or(0, |s| s.queue_depth())
    }

    /// Observes a finished request: metrics at once, then the sink (which may wait for
    /// room: a full ledger queue slows intake rather than dropping rows).
    pub(crate) async fn emit(sink: Option<&Arc<dyn RecordSink>>, record: RequestRecord) {
        crate::usage::metrics::observe(&record);
        if let Some(sink) = sink {
            sink.send(record).await;
        }
    }

    /// Probes every model now (`GET {base_url}/models` with one of its keys) and returns
    /// the outcome per model id (seed 001's `health_check_all`). Pools also update their
    /// instances' health from their own probes.
    pub async fn health_check_all(&self) -> BTreeMap<String, Result<(), String>> {
        let topology = self.topology();
        for (_, pool) in topology.pools() {
            pool.probe_all().await;
        }
        let all = topology.all_models();
        let results = all.probe_all().await;
        all.instances()
            .iter()
            .zip(results)
            .map(|(m, r)| (m.id().to_owned(), r))
            .collect()
    }

    /// A handle on a route that behaves like a single model (seed 002: "a polling pool
    /// can be used directly as an LLM instance").
    ///
    /// # Errors
    /// 404 when `name` is not a route.
    pub fn llm(self: &Arc<Self>, name: &str) -> Result<LlmHandle, GatewayError> {
        let topology = self.topology();
        let (route, _) = topology.resolve(name)?;
        Ok(LlmHandle {
            gateway: self.clone(),
            route: route.to_owned(),
        })
    }

    /// A route's counters since start or the last [`reset_stats`](Self::reset_stats).
    pub fn stats(&self, route: &str) -> Option<StatsSnapshot> {
        self.topology.load().plan(route).map(|p| p.stats.snapshot())
    }

    /// A route's last fallback events (at most 50), oldest first.
    pub fn fallback_history(&self, route: &str) -> Option<Vec<FallbackEvent>> {
        self.topology.load().plan(route).map(|p| p.stats.history())
    }

    /// Zeroes a route's counters and history (`None` resets every route).
    pub fn reset_stats(&self, route: Option<&str>) {
        for (name, plan) in self.topology.load().plans() {
            if route.is_none_or(|r| r == name) {
                plan.stats.reset();
            }
        }
    }

    /// A non-streamed chat completion on the route named by `req.model`.
    ///
    /// # Errors
    /// A [`GatewayError`] naming every attempt: 404 for an unknown route, 400 when the
    /// request is at fault, else 429/502/503/504 as DESIGN.md §4 says. Never a placeholder.
    pub async fn chat(&self, req: ChatCompletionRequest) -> Result<Completion, GatewayError> {
        self.chat_with(req, &CallOptions::default()).await
    }

    /// [`chat`](Self::chat) with per-request options.
    ///
    /// Dropped before it returns (the client went away), the request is still recorded,
    /// with status 499 and its attempts, the call in flight as `cancelled`.
    ///
    /// # Errors
    /// As [`chat`](Self::chat).
    pub async fn chat_with(
        &self,
        mut req: ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        req.stream = None;
        let topology = self.topology();
        let (meta, plan) = begin(&topology, &req.model, options, false, endpoint(&req));
        // Dropped before it is recorded (the client went away), it records a 499.
        let mut pending = Pending::new(meta, req, self.sink.clone(), self.tasks.clone());
        let result = pending
            .trace()
            .scope(execute(plan, Job::Chat(pending.request()), options))
            .await;
        match result {
            Ok((Answer::Chat(response), model, attempts)) => {
                let attempts = pending.record_answer(&model, attempts, &response).await;
                Ok(Completion {
                    response,
                    model: model.id().to_owned(),
                    provider: model.provider().to_owned(),
                    attempts,
                })
            }
            Ok(_) => {
                pending.done();
                Err(GatewayError::new(
                    GatewayErrorKind::UpstreamFailed,
                    "internal: a stream answered a non-streamed request",
                ))
            }
            Err(e) => {
                pending.record_error(&e).await;
                Err(e)
            }
        }
    }

    /// A streamed chat completion on the route named by `req.model`.
    ///
    /// Returns once a candidate has produced its first content chunk (or finished): until
    /// then every failure fails over transparently. After that, a failure surfaces as an
    /// error item of the [`GatewayStream`], never as a normal end.
    ///
    /// # Errors
    /// As [`chat`](Self::chat).
    pub async fn chat_stream(
        &self,
        req: ChatCompletionRequest,
    ) -> Result<GatewayStream, GatewayError> {
        self.chat_stream_with(req, &CallOptions::default()).await
    }

    /// [`chat_stream`](Self::chat_stream) with per-request options.
    ///
    /// # Errors
    /// As [`chat`](Self::chat).
    pub async fn chat_stream_with(
        &self,
        mut req: ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<GatewayStream, GatewayError> {
        req.stream = Some(true);
        // Always ask the provider for usage; the client gets the usage chunk only if it
        // asked for it.
        let client_wants_usage = req.wants_stream_usage();
        req.stream_options
            .get_or_insert_with(Default::default)
            .include_usage = Some(true);
        let topology = self.topology();
        let (meta, plan) = begin(&topology, &req.model, options, true, endpoint(&req));
        let continuation = plan
            .as_ref()
            .ok()
            .map(|p| p.stream_failure)
            .filter(|f| f.mode == StreamFailureMode::Continue)
            .map(|f| Continuation::new(topology.clone(), f.max_continuations));
        // Dropped before the stream starts (the client went away), it records a 499.
        let mut pending = Pending::new(meta, req, self.sink.clone(), self.tasks.clone());
        let result = pending
            .trace()
            .scope(execute(plan, Job::Stream(pending.request()), options))
            .await;
        match result {
            Ok((
                Answer::Stream {
                    buffered,
                    rest,
                    admitted,
                },
                model,
                attempts,
            )) => {
                let (meta, req) = pending.into_parts();
                let accounting = StreamAccounting::new(
                    meta,
                    self.sink.clone(),
                    self.tasks.clone(),
                    client_wants_usage,
                    req,
                );
                Ok(GatewayStream::new(
                    model,
                    attempts,
                    buffered,
                    rest,
                    admitted,
                    accounting,
                    continuation,
                ))
            }
            Ok(_) => {
                pending.done();
                Err(GatewayError::new(
                    GatewayErrorKind::UpstreamFailed,
                    "internal: a non-streamed answer to a streamed request",
                ))
            }
            Err(e) => {
                pending.record_error(&e).await;
                Err(e)
            }
        }
    }

    /// Embeddings on the route named by `req.model` (OpenAI's `POST /v1/embeddings`),
    /// through the same plan and resilience as a chat completion: breakers, the
    /// echelon's and model's request buckets, `tpm_limit` (reserving the inputs'
    /// tokens), concurrency limits, keys, `retry_on`, failover. Models whose wire does
    /// not serve embeddings are passed over. The ledger gets one record: the prompt
    /// tokens (the provider's usage, else counted with tiktoken and marked estimated),
    /// no completion tokens, and their cost.
    ///
    /// # Errors
    /// As [`chat`](Self::chat); also 400 when `input` is empty, and 400 (code
    /// `embeddings_not_supported`) when no model of the route serves embeddings.
    pub async fn embed(&self, req: EmbeddingRequest) -> Result<Embeddings, GatewayError> {
        self.embed_with(req, &CallOptions::default()).await
    }

    /// [`embed`](Self::embed) with per-request options (a polling pool keeps a session
    /// by `session_id`, else by the request's `user`).
    ///
    /// # Errors
    /// As [`embed`](Self::embed).
    pub async fn embed_with(
        &self,
        req: EmbeddingRequest,
        options: &CallOptions,
    ) -> Result<Embeddings, GatewayError> {
        let topology = self.topology();
        let (meta, plan) = begin(&topology, &req.model, options, false, Endpoint::Embeddings);
        let plan = match plan {
            Ok(_) if req.input.is_empty() => Err(GatewayError::new(
                GatewayErrorKind::BadRequest,
                "input: must not be empty",
            )
            .with_param("input")),
            other => other,
        };
        let mut pending = Pending::new(meta, req, self.sink.clone(), self.tasks.clone());
        let result = pending
            .trace()
            .scope(execute(plan, Job::Embed(pending.request()), options))
            .await;
        match result {
            Ok((Answer::Embeddings(response), model, attempts)) => {
                let attempts = pending.record_embeddings(&model, attempts, &response).await;
                Ok(Embeddings {
                    response,
                    model: model.id().to_owned(),
                    provider: model.provider().to_owned(),
                    attempts,
                })
            }
            Ok(_) => {
                pending.done();
                Err(GatewayError::new(
                    GatewayErrorKind::UpstreamFailed,
                    "internal: a chat answer to an embeddings request",
                ))
            }
            Err(e) => {
                pending.record_error(&e).await;
                Err(e)
            }
        }
    }
}

/// A request's usage header and its plan, from one lookup of its route: the record names
/// the route it resolved to (`default` names the default route), or the name asked for
/// when that resolves to nothing.
fn begin<'t>(
    topology: &'t Topology,
    name: &str,
    options: &CallOptions,
    stream: bool,
    endpoint: Endpoint,
) -> (RequestMeta, Result<&'t Plan, GatewayError>) {
    let resolved = topology.resolve(name);
    let route = resolved.as_ref().map_or(name, |(route, _)| route);
    let meta = RequestMeta::new(options.request_id.as_deref(), route, stream, endpoint);
    (meta, resolved.map(|(_, plan)| plan))
}

/// The endpoint a chat request came in by, for its record: `messages` or `responses`
/// when it carries the client's own request of that dialect, else `chat`.
fn endpoint(req: &ChatCompletionRequest) -> Endpoint {
    match req.native.as_deref() {
        Some(NativeRequest::Anthropic(_)) => Endpoint::Messages,
        Some(NativeRequest::Responses(_)) => Endpoint::Responses,
        None => Endpoint::Chat,
    }
}

/// Runs the plan of a resolved route (`Err`: the resolution's error, recorded as is).
async fn execute(
    plan: Result<&Plan, GatewayError>,
    job: Job<'_>,
    options: &CallOptions,
) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
    let plan = plan?;
    // Only a polling pool keeps sessions: no key (and no hashing) for other routes.
    let session = plan
        .steps
        .iter()
        .any(|s| matches!(s, Step::Pool(_)))
        .then(|| match job {
            Job::Chat(r) | Job::Stream(r) => session_key(r, options),
            Job::Embed(r) => embed_session_key(r, options),
        })
        .flatten();
    let result = run_plan(plan, job, session, None).await;
    match &result {
        Ok((_, _, attempts)) => plan.stats.record(attempts, true),
        Err(e) => plan.stats.record(e.attempts(), false),
    }
    result
}

/// A route used like a single model (seed 000/002): chat, stream, or a plain prompt, with
/// the route's counters.
#[derive(Debug, Clone)]
pub struct LlmHandle {
    gateway: Arc<Gateway>,
    route: String,
}

impl LlmHandle {
    /// The route name.
    pub fn name(&self) -> &str {
        &self.route
    }

    /// A chat completion on this route (`req.model` is replaced by the route).
    ///
    /// # Errors
    /// As [`Gateway::chat`].
    pub async fn chat(&self, mut req: ChatCompletionRequest) -> Result<Completion, GatewayError> {
        req.model.clone_from(&self.route);
        self.gateway.chat(req).await
    }

    /// A streamed chat completion on this route.
    ///
    /// # Errors
    /// As [`Gateway::chat_stream`].
    pub async fn chat_stream(
        &self,
        mut req: ChatCompletionRequest,
    ) -> Result<GatewayStream, GatewayError> {
        req.model.clone_from(&self.route);
        self.gateway.chat_stream(req).await
    }

    /// Embeddings on this route (`req.model` is replaced by the route).
    ///
    /// # Errors
    /// As [`Gateway::embed`].
    pub async fn embed(&self, mut req: EmbeddingRequest) -> Result<Embeddings, GatewayError> {
        req.model.clone_from(&self.route);
        self.gateway.embed(req).await
    }

    /// Sends `prompt` as one user message and returns the answer's text (seed 000's
    /// `await llm(prompt) -> str`).
    ///
    /// # Errors
    /// As [`Gateway::chat`]; never a placeholder text.
    pub async fn complete(&self, prompt: &str) -> Result<String, GatewayError> {
        let req = ChatCompletionRequest::new(
            self.route.clone(),
            vec![echelon_types::ChatMessage::new(
                echelon_types::Role::User,
                prompt,
            )],
        );
        let done = self.gateway.chat(req).await?;
        match done.response.first_text() {
            Some(text) => Ok(text.to_owned()),
            // An answer without text (only tool calls, or no content) is not an empty
            // string: the caller asked for text and gets told it has none.
            None => Err(GatewayError::new(
                GatewayErrorKind::UpstreamFailed,
                format!(
                    "model `{}` answered without text ({}): use chat() to read the answer",
                    done.model,
                    if has_tool_calls(&done.response) {
                        "tool calls only"
                    } else {
                        "no content"
                    }
                ),
            )
            .with_code("no_text_in_answer")
            .with_attempts(done.attempts)),
        }
    }

    /// The route's counters: total and successful requests, fallbacks, attempts.
    pub fn stats(&self) -> StatsSnapshot {
        self.gateway.stats(&self.route).unwrap_or_default()
    }

    /// Zeroes the route's counters and fallback history.
    pub fn reset_stats(&self) {
        self.gateway.reset_stats(Some(&self.route));
    }
}

/// Whether the first choice's message carries tool calls.
fn has_tool_calls(c: &ChatCompletion) -> bool {
    c.choices
        .first()
        .and_then(|ch| ch.message.get("tool_calls"))
        .and_then(serde_json::Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const YAML: &str = r#"
providers:
  p: { base_url: "http://127.0.0.1:9/v1" }
models:
  a: { provider: p, circuit_breaker: { failure_threshold: 1, recovery_time: 60 } }
  b: { provider: p }
polling_pools:
  pool: { task_groups: [g], health_check_interval: 0.01 }
task_groups:
  g: { echelon1: { models: [a, b] } }
"#;

    fn trip(gw: &Gateway, model: &str) {
        let m = gw.model(model).unwrap();
        let permit = m.breaker().try_acquire().unwrap();
        m.breaker().record(permit, false);
    }

    #[tokio::test]
    async fn reload_keeps_the_state_of_unchanged_models() {
        let gw = Gateway::from_config(&Config::from_str(YAML, "t.yaml").unwrap()).unwrap();
        trip(&gw, "a");
        assert_eq!(gw.model("a").unwrap().breaker().snapshot().state, "open");
        let before = gw.topology();
        gw.reload(&Config::from_str(YAML, "t.yaml").unwrap())
            .unwrap();
        assert!(!Arc::ptr_eq(&before, &gw.topology()), "a new topology");
        assert_eq!(gw.model("a").unwrap().breaker().snapshot().state, "open");
        // b's upstream name changes: another upstream, a fresh breaker; a stays open.
        trip(&gw, "b");
        let changed = YAML.replace("b: { provider: p }", "b: { provider: p, model: other }");
        gw.reload(&Config::from_str(&changed, "t.yaml").unwrap())
            .unwrap();
        assert_eq!(gw.model("b").unwrap().breaker().snapshot().state, "closed");
        assert_eq!(gw.model("a").unwrap().breaker().snapshot().state, "open");
        // A config that does not build leaves the old topology serving.
        let current = gw.topology();
        let bad = Config::from_str(&changed, "t.yaml").map(|mut c| {
            c.task_groups.clear();
            c
        });
        assert!(gw.reload(&bad.unwrap()).is_err());
        assert!(Arc::ptr_eq(&current, &gw.topology()));
    }

    #[tokio::test]
    async fn reload_keeps_route_counters_and_pool_health() {
        let gw = Gateway::from_config(&Config::from_str(YAML, "t.yaml").unwrap()).unwrap();
        gw.topology().plan("g").unwrap().stats.record(&[], true);
        let pool = |gw: &Gateway| {
            gw.topology()
                .pools()
                .map(|(_, p)| p.clone())
                .next()
                .unwrap()
        };
        for _ in 0..10 {
            pool(&gw).record(0, false);
        }
        assert_eq!(pool(&gw).healthy_count(), 1);
        gw.reload(&Config::from_str(YAML, "t.yaml").unwrap())
            .unwrap();
        assert_eq!(gw.stats("g").unwrap().total_requests, 1);
        assert_eq!(pool(&gw).healthy_count(), 1, "a stays out of the rotation");
        // a's identity changes: another upstream, healthy again.
        let changed = YAML.replace("a: { provider: p,", "a: { provider: p, model: elsewhere,");
        gw.reload(&Config::from_str(&changed, "t.yaml").unwrap())
            .unwrap();
        assert_eq!(pool(&gw).healthy_count(), 2);
    }

    #[tokio::test]
    async fn start_runs_the_health_checks_and_shutdown_ends_them() {
        let gw = Gateway::from_config(&Config::from_str(YAML, "t.yaml").unwrap()).unwrap();
        gw.start().unwrap();
        assert_eq!(gw.tasks.len(), 1, "one pool, one health-check task");
        gw.shutdown().await;
        assert!(gw.tasks.is_empty());
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let gw = Gateway::from_config(&Config::from_str(YAML, "t.yaml").unwrap()).unwrap();
        assert!(gw.start().is_err());
    }

    #[test]
    fn tool_calls_are_recognised() {
        let with: ChatCompletion = serde_json::from_value(serde_json::json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": "{}"}}]}}]
        }))
        .unwrap();
        assert!(with.first_text().is_none());
        assert!(has_tool_calls(&with));
        let without: ChatCompletion = serde_json::from_value(serde_json::json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]
        }))
        .unwrap();
        assert!(!has_tool_calls(&without));
    }
}
