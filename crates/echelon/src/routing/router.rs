//! The gateway: resolves a route and tries its candidates until one answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{Attempt, ChatCompletion, ChatCompletionRequest, SkipReason};

use super::attempt::{Answer, Flow, RequestState, context_error, exhausted, try_model};
use super::model::{Model, breaker_settings};
use super::plan::{EchelonDefaults, EchelonLimits, Plan, PoolStep, RouteKind, Step, Tier};
use super::pool::{PollingPool, PoolSettings, ProbeKind, Rotation};
use super::stats::{FallbackEvent, StatsSnapshot};
use super::stream::{GatewayStream, StreamAccounting};
use crate::config::{
    Config, FallbackStrategy, HealthCheckKind, PollingPoolConfig, PoolFallbackStrategy,
    RotationStrategy,
};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::provider::HttpClients;
use crate::resilience::breaker::CircuitBreaker;
use crate::resilience::key_pool::KeyPool;
use crate::usage::record::RequestRecord;
use crate::usage::{RecordSink, RequestMeta, TokenCount};

/// A route as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// What a request puts in `model`.
    pub id: String,
    /// `model`, `task_group`, `echelon`, `polling_pool` or `wrapper`.
    pub kind: &'static str,
    /// The model ids behind it, in the order they are tried (fallbacks included).
    pub models: Vec<String>,
}

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
#[derive(Debug)]
pub struct Gateway {
    models: BTreeMap<String, Arc<Model>>,
    echelons: Vec<Arc<Tier>>,
    pools: BTreeMap<String, Arc<PollingPool>>,
    routes: HashMap<String, Plan>,
    route_list: Vec<RouteInfo>,
    default_route: Option<String>,
    /// Every model as one probe set, for [`Gateway::health_check_all`].
    all_models: PollingPool,
    /// Where finished requests go (the ledger), besides the metrics.
    sink: Option<Arc<dyn RecordSink>>,
}

impl std::fmt::Debug for dyn RecordSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordSink")
    }
}

fn build_err(m: String) -> GatewayError {
    GatewayError::new(GatewayErrorKind::Unavailable, m)
}

/// Appends `more` to `steps`, skipping steps already present.
fn extend_unique(steps: &mut Vec<Step>, more: &[Step]) {
    for s in more {
        if !steps.iter().any(|x| x.same_as(s)) {
            steps.push(s.clone());
        }
    }
}

impl Gateway {
    /// Builds the models and routes of a validated config.
    ///
    /// Routes: every model id, every task group and every `group.echelonN`. A task group's
    /// plan is its echelons in order, then the steps of each `fallback_groups` entry (a
    /// group's own echelons, one echelon, or a model), without repeats.
    ///
    /// # Errors
    /// When a model's HTTP client cannot be built, or the config references something that
    /// does not exist (a config that passed validation never does).
    pub fn from_config(config: &Config) -> Result<Gateway, GatewayError> {
        let models = build_models(config)?;
        let mut routes = HashMap::new();
        let mut route_list = Vec::new();
        let mut echelons = Vec::new();
        // The steps each name stands for on its own, before any fallback.
        let mut base: HashMap<String, Vec<Step>> = HashMap::new();
        for (id, model) in &models {
            let tier = Tier::new(
                id.clone(),
                vec![model.clone()],
                EchelonDefaults::default(),
                EchelonLimits::default(),
            );
            base.insert(id.clone(), vec![Step::Tier(Arc::new(tier))]);
        }
        for (name, group) in &config.task_groups {
            let mut own = Vec::new();
            for ech in &group.echelons {
                let label = format!("{name}.{}", ech.name);
                let members = ech
                    .models
                    .iter()
                    .map(|m| {
                        models.get(m).cloned().ok_or_else(|| {
                            build_err(format!("task group `{label}`: unknown model `{m}`"))
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let defaults = EchelonDefaults {
                    temperature: ech.temperature,
                    max_tokens: ech.max_tokens,
                    max_retries: ech.max_retries,
                    timeout: ech.timeout,
                };
                let limits = EchelonLimits {
                    concurrency_limit: ech.concurrency_limit,
                    rpm_limit: ech.rpm_limit,
                };
                let tier = Arc::new(Tier::new(label.clone(), members, defaults, limits));
                echelons.push(tier.clone());
                base.insert(label, vec![Step::Tier(tier.clone())]);
                own.push(Step::Tier(tier));
            }
            base.insert(name.clone(), own);
        }

        let mut pools = BTreeMap::new();
        for (name, pc) in &config.polling_pools {
            let group = config.task_groups.get(&pc.task_group).ok_or_else(|| {
                build_err(format!(
                    "polling pool `{name}`: unknown task group `{}`",
                    pc.task_group
                ))
            })?;
            let mut instances: Vec<Arc<Model>> = Vec::new();
            for m in group.echelons.iter().flat_map(|e| e.models.iter()) {
                let model = models.get(m).ok_or_else(|| {
                    build_err(format!("polling pool `{name}`: unknown model `{m}`"))
                })?;
                if !instances.iter().any(|x| Arc::ptr_eq(x, model)) {
                    instances.push(model.clone());
                }
            }
            let settings = pool_settings(pc, &instances);
            let pool = Arc::new(PollingPool::new(name.clone(), instances.clone(), settings));
            let tier = Tier::new(
                name.clone(),
                instances,
                EchelonDefaults {
                    max_retries: Some(0),
                    ..EchelonDefaults::default()
                },
                EchelonLimits::default(),
            );
            let step = PoolStep {
                pool: pool.clone(),
                tier,
                simple_retry: pc.fallback_config.strategy == PoolFallbackStrategy::SimpleRetry,
                max_instance_attempts: pc.fallback_config.max_instance_attempts.max(1),
            };
            base.insert(name.clone(), vec![Step::Pool(Arc::new(step))]);
            pools.insert(name.clone(), pool);
        }

        for id in models.keys() {
            let steps = base.get(id).cloned().unwrap_or_default();
            routes.insert(id.clone(), Plan::simple(RouteKind::Model, steps));
        }
        for tier in &echelons {
            let steps = vec![Step::Tier(tier.clone())];
            routes.insert(tier.label.clone(), Plan::simple(RouteKind::Echelon, steps));
        }
        for (name, group) in &config.task_groups {
            let mut steps = base.get(name).cloned().unwrap_or_default();
            let own_steps = steps.len();
            let mut plan = Plan::simple(RouteKind::TaskGroup, Vec::new());
            if let Some(fb) = &group.fallback_config {
                for target in &fb.fallback_groups {
                    let more = base.get(target).ok_or_else(|| {
                        build_err(format!("task group `{name}`: unknown fallback `{target}`"))
                    })?;
                    extend_unique(&mut steps, more);
                }
                plan.provider_failover = fb.strategy == FallbackStrategy::ProviderFailover;
                plan.max_attempts = fb.max_attempts;
                plan.step_delay = fb.retry_delay;
                plan.group_breaker = fb.circuit_breaker.as_ref().map(|c| {
                    CircuitBreaker::new(format!("task group {name}"), breaker_settings(c))
                });
            }
            plan.steps = steps;
            plan.own_steps = own_steps;
            routes.insert(name.clone(), plan);
        }
        for name in pools.keys() {
            let steps = base.get(name).cloned().unwrap_or_default();
            routes.insert(name.clone(), Plan::simple(RouteKind::PollingPool, steps));
        }
        // Wrappers (seed 001's factory): the target's plan, then each fallback's steps.
        // Wrappers may name wrappers; validation has ruled out cycles.
        let mut pending: Vec<&String> = config.wrappers.keys().collect();
        while !pending.is_empty() {
            let before = pending.len();
            pending.retain(|name| {
                let w = &config.wrappers[*name];
                let Some(target) = routes.get(&w.target) else {
                    return true;
                };
                let mut refs = Vec::new();
                for f in &w.fallback_groups {
                    match (base.get(f), routes.get(f)) {
                        (Some(b), _) => refs.push(b.clone()),
                        (None, Some(p)) => refs.push(p.steps.clone()),
                        (None, None) => return true,
                    }
                }
                let mut steps = target.steps.clone();
                for more in &refs {
                    extend_unique(&mut steps, more);
                }
                let mut plan = Plan::simple(RouteKind::Wrapper, steps);
                plan.own_steps = target.steps.len();
                plan.provider_failover = target.provider_failover;
                plan.max_attempts = target.max_attempts;
                plan.step_delay = target.step_delay;
                routes.insert((*name).clone(), plan);
                false
            });
            if pending.len() == before {
                return Err(build_err(format!(
                    "wrappers with unresolvable targets: {}",
                    pending
                        .iter()
                        .map(|n| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }

        let mut names: Vec<&String> = routes.keys().collect();
        names.sort_by_key(|n| (kind_order(routes[*n].kind), (*n).clone()));
        for n in names {
            let plan = &routes[n];
            route_list.push(RouteInfo {
                id: n.clone(),
                kind: plan.kind.as_str(),
                models: plan_models(plan),
            });
        }
        // Echelons listed right after their group, as before.
        route_list.sort_by_key(group_key);
        let everything: Vec<Arc<Model>> = models.values().cloned().collect();
        let all_models = PollingPool::new(
            "all models".to_owned(),
            everything.clone(),
            PoolSettings {
                rotation: Rotation::RoundRobin,
                weights: vec![1; everything.len()],
                health_check_interval: Duration::ZERO,
                probe: ProbeKind::Models,
                failure_threshold: 1,
                recovery_time: Duration::ZERO,
                session_ttl: Duration::from_secs(60),
            },
        );
        let gateway = Gateway {
            models,
            echelons,
            pools,
            routes,
            route_list,
            default_route: config.default_route.clone(),
            all_models,
            sink: None,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            gateway.start_health_checks();
        }
        Ok(gateway)
    }

    /// Every route a request may name: models first, then task groups each followed by
    /// their echelons.
    pub fn routes(&self) -> &[RouteInfo] {
        &self.route_list
    }

    /// A model by id.
    pub fn model(&self, id: &str) -> Option<&Arc<Model>> {
        self.models.get(id)
    }

    /// Every model, by id.
    pub fn models(&self) -> impl Iterator<Item = (&str, &Arc<Model>)> {
        self.models.iter().map(|(id, m)| (id.as_str(), m))
    }

    /// Every echelon of every task group.
    pub(crate) fn tiers(&self) -> impl Iterator<Item = &Arc<Tier>> {
        self.echelons.iter()
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

    /// Starts the background health checks of every polling pool (one tokio task per
    /// pool, ending when the gateway is dropped). [`from_config`](Self::from_config) does
    /// this itself when called inside a tokio runtime; call it once otherwise.
    pub fn start_health_checks(&self) {
        for pool in self.pools.values() {
            pool.spawn_health_checks();
        }
    }

    /// Probes every model now (`GET {base_url}/models` with one of its keys) and returns
    /// the outcome per model id (seed 001's `health_check_all`). Pools also update their
    /// instances' health from their own probes.
    pub async fn health_check_all(&self) -> BTreeMap<String, Result<(), String>> {
        for pool in self.pools.values() {
            pool.probe_all().await;
        }
        let results = self.all_models.probe_all().await;
        self.all_models
            .instances()
            .iter()
            .zip(results)
            .map(|(m, r)| (m.id().to_owned(), r))
            .collect()
    }

    /// The polling pools, by name.
    pub(crate) fn pools(&self) -> impl Iterator<Item = (&str, &Arc<PollingPool>)> {
        self.pools.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The configured `default_route`.
    pub fn default_route(&self) -> Option<&str> {
        self.default_route.as_deref()
    }

    /// The route for an LLM node that may name several (seed 001's LLM node config):
    /// wrapper > task group > polling pool > the configured `default_route`. Names that
    /// are not routes of the right kind are passed over.
    pub fn resolve_node(&self, node: &NodeRoutes<'_>) -> Option<&str> {
        let pick = |name: Option<&str>, kind: RouteKind| {
            name.and_then(|n| {
                self.routes
                    .get_key_value(n)
                    .filter(|(_, p)| p.kind == kind)
                    .map(|(k, _)| k.as_str())
            })
        };
        pick(node.llm_wrapper, RouteKind::Wrapper)
            .or_else(|| pick(node.task_group, RouteKind::TaskGroup))
            .or_else(|| pick(node.polling_pool, RouteKind::PollingPool))
            .or(self.default_route.as_deref())
    }

    /// A handle on a route that behaves like a single model (seed 002: "a polling pool
    /// can be used directly as an LLM instance").
    ///
    /// # Errors
    /// 404 when `name` is not a route.
    pub fn llm(self: &Arc<Self>, name: &str) -> Result<LlmHandle, GatewayError> {
        let (route, _) = self.resolve(name)?;
        Ok(LlmHandle {
            gateway: self.clone(),
            route: route.to_owned(),
        })
    }

    /// The plan of each route, by name.
    pub(crate) fn plans(&self) -> impl Iterator<Item = (&str, &Plan)> {
        self.routes.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// A route's counters since start or the last [`reset_stats`](Self::reset_stats).
    pub fn stats(&self, route: &str) -> Option<StatsSnapshot> {
        self.routes.get(route).map(|p| p.stats.snapshot())
    }

    /// A route's last fallback events (at most 50), oldest first.
    pub fn fallback_history(&self, route: &str) -> Option<Vec<FallbackEvent>> {
        self.routes.get(route).map(|p| p.stats.history())
    }

    /// Zeroes a route's counters and history (`None` resets every route).
    pub fn reset_stats(&self, route: Option<&str>) {
        for (name, plan) in &self.routes {
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
    /// # Errors
    /// As [`chat`](Self::chat).
    pub async fn chat_with(
        &self,
        mut req: ChatCompletionRequest,
        options: &CallOptions,
    ) -> Result<Completion, GatewayError> {
        req.stream = None;
        let (meta, plan) = self.begin(&req, options, false);
        match self.execute(plan, &req, false, options).await {
            Ok((Answer::Chat(response), model, attempts)) => {
                let tokens = match &response.usage {
                    Some(u) => TokenCount::from_usage(u),
                    None => TokenCount::estimate(
                        &model,
                        &req,
                        response.first_text().unwrap_or_default(),
                    ),
                };
                let record = meta.record(Some(&model), 200, &attempts, tokens, None);
                Gateway::emit(self.sink.as_ref(), record).await;
                Ok(Completion {
                    response,
                    model: model.id().to_owned(),
                    provider: model.provider().to_owned(),
                    attempts,
                })
            }
            Ok((Answer::Stream { .. }, _, _)) => Err(GatewayError::new(
                GatewayErrorKind::UpstreamFailed,
                "internal: a stream answered a non-streamed request",
            )),
            Err(e) => {
                let record =
                    meta.record(None, e.status(), e.attempts(), TokenCount::default(), None);
                Gateway::emit(self.sink.as_ref(), record).await;
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
        let (meta, plan) = self.begin(&req, options, true);
        match self.execute(plan, &req, true, options).await {
            Ok((
                Answer::Stream {
                    buffered,
                    rest,
                    admitted,
                },
                model,
                attempts,
            )) => {
                let accounting =
                    StreamAccounting::new(meta, self.sink.clone(), client_wants_usage, req);
                Ok(GatewayStream::new(
                    model, attempts, buffered, rest, admitted, accounting,
                ))
            }
            Ok((Answer::Chat(_), _, _)) => Err(GatewayError::new(
                GatewayErrorKind::UpstreamFailed,
                "internal: a non-streamed answer to a streamed request",
            )),
            Err(e) => {
                let record =
                    meta.record(None, e.status(), e.attempts(), TokenCount::default(), None);
                Gateway::emit(self.sink.as_ref(), record).await;
                Err(e)
            }
        }
    }

    /// The route a request names, and its plan: the route itself, or the
    /// `default_route` for the name `default` when no route has that name.
    /// A request's usage header and its plan, from one lookup of its route: the record
    /// names the route it resolved to (`default` names the default route), or the name
    /// asked for when that resolves to nothing.
    fn begin(
        &self,
        req: &ChatCompletionRequest,
        options: &CallOptions,
        stream: bool,
    ) -> (RequestMeta, Result<&Plan, GatewayError>) {
        let resolved = self.resolve(&req.model);
        let route = resolved
            .as_ref()
            .map_or(req.model.as_str(), |(route, _)| route);
        let meta = RequestMeta::new(options.request_id.as_deref(), route, stream);
        (meta, resolved.map(|(_, plan)| plan))
    }

    fn resolve(&self, name: &str) -> Result<(&str, &Plan), GatewayError> {
        let found = self.routes.get_key_value(name).or_else(|| {
            if name == DEFAULT_ROUTE_ALIAS {
                let d = self.default_route.as_deref()?;
                self.routes.get_key_value(d)
            } else {
                None
            }
        });
        match found {
            Some((route, plan)) => Ok((route.as_str(), plan)),
            None => Err(GatewayError::new(
                GatewayErrorKind::UnknownRoute,
                format!(
                    "route `{name}` is not a route of this gateway (GET /v1/models lists them)"
                ),
            )
            .with_param("model")
            .with_code("model_not_found")),
        }
    }

    /// Runs the plan of a resolved route (`Err`: the resolution's error, recorded as is).
    async fn execute(
        &self,
        plan: Result<&Plan, GatewayError>,
        req: &ChatCompletionRequest,
        stream: bool,
        options: &CallOptions,
    ) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
        let plan = plan?;
        let session = session_key(req, options);
        let result = run_plan(plan, req, stream, session.as_deref()).await;
        match &result {
            Ok((_, _, attempts)) => plan.stats.record(attempts, true),
            Err(e) => plan.stats.record(e.attempts(), false),
        }
        result
    }
}

/// Tries a plan's steps in order under its fallback settings.
async fn run_plan(
    plan: &Plan,
    req: &ChatCompletionRequest,
    stream: bool,
    session: Option<&str>,
) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
    let mut st = RequestState::new(plan.max_attempts);
    let mut failed_providers: HashSet<String> = HashSet::new();
    // The group breaker guards the group's own steps as a whole.
    let mut group_permit = None;
    let mut skip_own = false;
    if let Some(b) = &plan.group_breaker {
        match b.try_acquire() {
            Ok(p) => group_permit = Some(p),
            Err(_) => {
                tracing::info!(route = %req.model, "group breaker open: going straight to the fallbacks");
                skip_own = true;
            }
        }
    }
    for (i, step) in plan.steps.iter().enumerate() {
        if i < plan.own_steps && skip_own {
            continue;
        }
        if i == plan.own_steps
            && let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take())
        {
            // Reaching the fallbacks means the group's own steps all failed.
            b.record(p, false);
        }
        if !st.budget_left() {
            break;
        }
        if i > 0
            && let Some(d) = plan.step_delay
            && st.calls() > 0
        {
            tokio::time::sleep(d).await;
        }
        let tier = match step {
            Step::Tier(t) => t,
            Step::Pool(ps) => {
                match run_pool(ps, req, stream, session, &mut st).await {
                    Flow::Answered(answer) => {
                        let model = st.answered_by.take();
                        if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                            b.record(p, i < plan.own_steps);
                        }
                        if let Some(model) = model {
                            return Ok((answer, model, st.attempts));
                        }
                    }
                    Flow::Stop(e) => return Err(e),
                    Flow::Next => {}
                }
                continue;
            }
        };
        let mut body = req.clone();
        tier.defaults.apply(&mut body);
        for model in tier.ordered() {
            if !st.budget_left() {
                break;
            }
            if let Some(floor) = st.context_floor
                && model.context_window().is_none_or(|w| w <= floor)
            {
                continue;
            }
            if plan.provider_failover && failed_providers.contains(model.provider()) {
                st.skip(
                    model,
                    SkipReason::ProviderFailed,
                    format!(
                        "provider `{}` already failed for this request",
                        model.provider()
                    ),
                );
                continue;
            }
            if st.exceeds_context(model, &body) {
                continue;
            }
            body.model.clear();
            body.model.push_str(model.upstream_model());
            let calls_before = st.calls();
            match try_model(tier, model, &body, stream, &mut st, None).await {
                Flow::Answered(answer) => {
                    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
                        b.record(p, i < plan.own_steps);
                    }
                    return Ok((answer, model.clone(), st.attempts));
                }
                Flow::Stop(e) => return Err(e),
                Flow::Next => {
                    if st.calls() > calls_before {
                        failed_providers.insert(model.provider().to_owned());
                    }
                }
            }
        }
    }
    if let (Some(b), Some(p)) = (&plan.group_breaker, group_permit.take()) {
        b.record(p, false);
    }
    if st.context_refused {
        return Err(context_error(st.attempts));
    }
    let stopped = !st.budget_left();
    let mut e = exhausted(&req.model, st.attempts);
    if let Some(max) = plan.max_attempts
        && stopped
    {
        e = e.with_note(format!("stopped at max_attempts = {max}"));
    }
    Err(e)
}

/// A polling pool's turn: instances picked by the pool (sticky for a session), each
/// tried once, moving on by `instance_rotation` or staying by `simple_retry`, up to
/// `max_instance_attempts` calls.
async fn run_pool(
    ps: &PoolStep,
    req: &ChatCompletionRequest,
    stream: bool,
    session: Option<&str>,
    st: &mut RequestState,
) -> Flow {
    let mut exclude: Vec<usize> = Vec::new();
    let mut last: Option<usize> = None;
    let mut body = req.clone();
    for _ in 0..ps.max_instance_attempts {
        if !st.budget_left() {
            break;
        }
        let pick = match (ps.simple_retry, last) {
            (true, Some(i)) => Some(i),
            _ => ps.pool.select(session, &exclude),
        };
        let Some(i) = pick else {
            break;
        };
        let model = &ps.pool.instances()[i];
        if st.exceeds_context(model, &body) {
            exclude.push(i);
            last = None;
            continue;
        }
        body.model.clear();
        body.model.push_str(model.upstream_model());
        // The attempt's outcome feeds the instance's health (for a stream, at its end).
        match try_model(&ps.tier, model, &body, stream, st, Some((&ps.pool, i))).await {
            Flow::Answered(answer) => {
                st.answered_by = Some(model.clone());
                return Flow::Answered(answer);
            }
            Flow::Stop(e) => return Flow::Stop(e),
            Flow::Next => {
                exclude.push(i);
                last = Some(i);
            }
        }
    }
    Flow::Next
}

/// The route name a request may use for the configured `default_route`.
pub const DEFAULT_ROUTE_ALIAS: &str = "default";

/// The key that keeps a conversation on one pool instance: the `x-session-id`, else the
/// request's `user`, else — for a request with prior assistant turns — a hash of the
/// conversation's opening (its messages up to the first assistant turn), which stays
/// the same as the conversation grows. Single-turn requests have none.
fn session_key(req: &ChatCompletionRequest, options: &CallOptions) -> Option<String> {
    if let Some(s) = options.session_id.as_deref().filter(|s| !s.is_empty()) {
        return Some(format!("session:{s}"));
    }
    if let Some(u) = req.user.as_deref().filter(|s| !s.is_empty()) {
        return Some(format!("user:{u}"));
    }
    let first_assistant = req
        .messages
        .iter()
        .position(|m| m.role == echelon_types::Role::Assistant)?;
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in &req.messages[..first_assistant] {
        m.text().hash(&mut h);
    }
    Some(format!("conversation:{:016x}", h.finish()))
}

/// Pool settings from config (seed 001 `polling_pools/*.yaml`).
fn pool_settings(pc: &PollingPoolConfig, instances: &[Arc<Model>]) -> PoolSettings {
    PoolSettings {
        rotation: match pc.rotation_strategy {
            RotationStrategy::RoundRobin => Rotation::RoundRobin,
            RotationStrategy::LeastBusy => Rotation::LeastBusy,
            RotationStrategy::Weighted => Rotation::Weighted,
        },
        weights: instances
            .iter()
            .map(|m| pc.weights.get(m.id()).copied().unwrap_or(1))
            .collect(),
        health_check_interval: pc.health_check_interval,
        probe: match pc.health_check {
            HealthCheckKind::Models => ProbeKind::Models,
            HealthCheckKind::Completion => ProbeKind::Completion,
        },
        failure_threshold: pc.failure_threshold,
        recovery_time: pc.recovery_time,
        session_ttl: SESSION_TTL,
    }
}

/// How long an idle conversation stays bound to its pool instance.
const SESSION_TTL: Duration = Duration::from_secs(30 * 60);

/// The names an LLM node may give (seed 001: `llm_wrapper`, `task_group`,
/// `polling_pool`); see [`Gateway::resolve_node`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeRoutes<'a> {
    /// A wrapper name.
    pub llm_wrapper: Option<&'a str>,
    /// A task group name.
    pub task_group: Option<&'a str>,
    /// A polling pool name.
    pub polling_pool: Option<&'a str>,
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
        Ok(done.response.first_text().unwrap_or_default().to_owned())
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

fn kind_order(k: RouteKind) -> u8 {
    match k {
        RouteKind::Model => 0,
        RouteKind::TaskGroup | RouteKind::Echelon => 1,
        RouteKind::PollingPool => 2,
        RouteKind::Wrapper => 3,
    }
}

/// Sort key: models, then each group followed by its echelons, then pools, wrappers.
fn group_key(r: &RouteInfo) -> (u8, String, u8) {
    match r.kind {
        "model" => (0, r.id.clone(), 0),
        "echelon" => {
            let group = r.id.rsplit_once('.').map_or(r.id.as_str(), |(g, _)| g);
            (1, group.to_owned(), 1)
        }
        "task_group" => (1, r.id.clone(), 0),
        "polling_pool" => (2, r.id.clone(), 0),
        _ => (3, r.id.clone(), 0),
    }
}

fn plan_models(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for step in &plan.steps {
        for m in step.models() {
            if !out.iter().any(|x| x == m.id()) {
                out.push(m.id().to_owned());
            }
        }
    }
    out
}

/// The models of a config, with their key pools: a provider's keys are one pool shared
/// by every model using them; a model naming its own keys has a pool of its own (seed
/// 004 APIKeyPool).
fn build_models(config: &Config) -> Result<BTreeMap<String, Arc<Model>>, GatewayError> {
    let mut models = BTreeMap::new();
    let mut pools: HashMap<String, Arc<KeyPool>> = HashMap::new();
    let mut http = HttpClients::new();
    for (id, mc) in &config.models {
        let provider = config.providers.get(&mc.provider).ok_or_else(|| {
            build_err(format!("model `{id}`: unknown provider `{}`", mc.provider))
        })?;
        let keys = match &mc.api_keys {
            Some(own) => KeyPool::new(
                format!("model {id}"),
                own.iter().cloned().map(ApiKey::new).collect(),
            ),
            None => pools
                .entry(mc.provider.clone())
                .or_insert_with(|| {
                    KeyPool::new(
                        format!("provider {}", mc.provider),
                        provider.api_keys.iter().cloned().map(ApiKey::new).collect(),
                    )
                })
                .clone(),
        };
        let model = Model::from_config(id, mc, provider, keys, &mut http)
            .map_err(|e| build_err(format!("model `{id}`: {e}")))?;
        models.insert(id.clone(), Arc::new(model));
    }
    Ok(models)
}
