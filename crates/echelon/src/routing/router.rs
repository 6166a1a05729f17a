//! The gateway: resolves a route and tries its candidates until one answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{Attempt, ChatCompletion, ChatCompletionRequest};

use super::attempt::{Answer, Flow, RequestState, context_error, exhausted, try_model};
use super::model::{Model, breaker_settings};
use super::plan::{EchelonDefaults, EchelonLimits, Plan, RouteKind, Step, Tier};
use super::stats::{FallbackEvent, StatsSnapshot};
use super::stream::GatewayStream;
use crate::config::{Config, FallbackStrategy};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::resilience::breaker::CircuitBreaker;
use crate::resilience::key_pool::KeyPool;

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
}

/// The gateway: every model and route of a [`Config`], ready to serve requests.
#[derive(Debug)]
pub struct Gateway {
    models: BTreeMap<String, Arc<Model>>,
    echelons: Vec<Arc<Tier>>,
    routes: HashMap<String, Plan>,
    route_list: Vec<RouteInfo>,
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
                if ech.priority.is_some() {
                    tracing::warn!(
                        "echelon `{label}`: priority is accepted but not acted on: echelons are tried in number order"
                    );
                }
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
                    timeout: ech.timeout.map(|s| Duration::from_secs_f64(s.max(0.001))),
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
                plan.step_delay = fb.retry_delay.map(|s| Duration::from_secs_f64(s.max(0.0)));
                plan.group_breaker = fb.circuit_breaker.as_ref().map(|c| {
                    CircuitBreaker::new(format!("task group {name}"), breaker_settings(c))
                });
            }
            plan.steps = steps;
            plan.own_steps = own_steps;
            routes.insert(name.clone(), plan);
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
        Ok(Gateway {
            models,
            echelons,
            routes,
            route_list,
        })
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
        let (answer, model, attempts) = self.execute(&req, false, options).await?;
        match answer {
            Answer::Chat(response) => Ok(Completion {
                response,
                model: model.id().to_owned(),
                provider: model.provider().to_owned(),
                attempts,
            }),
            Answer::Stream { .. } => Err(GatewayError::new(
                GatewayErrorKind::UpstreamFailed,
                "internal: a stream answered a non-streamed request",
            )),
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
        let (answer, model, attempts) = self.execute(&req, true, options).await?;
        match answer {
            Answer::Stream {
                buffered,
                rest,
                guards,
                tpm_reserved,
            } => Ok(GatewayStream::new(
                model,
                attempts,
                buffered,
                rest,
                guards,
                tpm_reserved,
            )),
            Answer::Chat(_) => Err(GatewayError::new(
                GatewayErrorKind::UpstreamFailed,
                "internal: a non-streamed answer to a streamed request",
            )),
        }
    }

    async fn execute(
        &self,
        req: &ChatCompletionRequest,
        stream: bool,
        _options: &CallOptions,
    ) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
        let plan = self.routes.get(&req.model).ok_or_else(|| {
            GatewayError::new(
                GatewayErrorKind::UnknownRoute,
                format!(
                    "route `{}` is not a route of this gateway (GET /v1/models lists them)",
                    req.model
                ),
            )
            .with_param("model")
            .with_code("model_not_found")
        })?;
        let result = run_plan(plan, req, stream).await;
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
        let Step::Tier(tier) = step;
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
                    "provider_failed",
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
            match try_model(tier, model, &body, stream, &mut st).await {
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

fn kind_order(k: RouteKind) -> u8 {
    match k {
        RouteKind::Model => 0,
        RouteKind::TaskGroup | RouteKind::Echelon => 1,
    }
}

/// Sort key keeping models first, then each group followed by its echelons.
fn group_key(r: &RouteInfo) -> (u8, String, u8) {
    match r.kind {
        "model" => (0, r.id.clone(), 0),
        "echelon" => {
            let group = r.id.rsplit_once('.').map_or(r.id.as_str(), |(g, _)| g);
            (1, group.to_owned(), 1)
        }
        _ => (1, r.id.clone(), 0),
    }
}

fn plan_models(plan: &Plan) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for step in &plan.steps {
        let Step::Tier(t) = step;
        for m in &t.models {
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
        let model = Model::from_config(id, mc, provider, keys)
            .map_err(|e| build_err(format!("model `{id}`: {e}")))?;
        models.insert(id.clone(), Arc::new(model));
    }
    Ok(models)
}
