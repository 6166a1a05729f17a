//! `Config → Topology`: the models, echelons, polling pools and route plans of a
//! validated config, built without side effects (nothing is spawned, nothing is sent).
//! Their resilience units come from the [`StateRegistry`], so a topology built again from
//! the same config (a reload) shares the state of the one before.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use super::model::{Model, breaker_settings};
use super::plan::{EchelonDefaults, EchelonLimits, Plan, PoolStep, RouteKind, Step, Tier};
use super::pool::{PollingPool, PoolSettings, ProbeKind, Rotation};
use crate::config::{
    Config, FallbackStrategy, HealthCheckKind, PollingPoolConfig, PoolFallbackStrategy,
    RotationStrategy,
};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::provider::HttpClients;
use crate::resilience::key_pool::KeyPool;
use crate::state::{StateId, StateRegistry, Unit};

/// The route name a request may use for the configured `default_route`.
pub const DEFAULT_ROUTE_ALIAS: &str = "default";

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

/// Every model and route of one config: what a request is routed over. Immutable once
/// built; the gateway swaps in a new one on reload while requests in flight finish on
/// theirs.
#[derive(Debug)]
pub struct Topology {
    models: BTreeMap<String, Arc<Model>>,
    echelons: Vec<Arc<Tier>>,
    pools: BTreeMap<String, Arc<PollingPool>>,
    routes: HashMap<String, Plan>,
    route_list: Arc<[RouteInfo]>,
    default_route: Option<String>,
    /// Every model as one probe set, for `Gateway::health_check_all`.
    all_models: PollingPool,
}

/// The names an LLM node may give (seed 001: `llm_wrapper`, `task_group`,
/// `polling_pool`); see [`Topology::resolve_node`].
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeRoutes<'a> {
    /// A wrapper name.
    pub llm_wrapper: Option<&'a str>,
    /// A task group name.
    pub task_group: Option<&'a str>,
    /// A polling pool name.
    pub polling_pool: Option<&'a str>,
}

impl Topology {
    /// Builds the models and routes of a validated config, taking their units from
    /// `registry`.
    ///
    /// Routes: every model id, every task group and every `group.echelonN`, every polling
    /// pool and wrapper. A task group's plan is its echelons in order, then the steps of
    /// each `fallback_groups` entry (a group's own echelons, one echelon, or a model),
    /// without repeats.
    ///
    /// # Errors
    /// When a model's HTTP client cannot be built, or the config references something that
    /// does not exist (a config that passed validation never does).
    pub fn build(config: &Config, registry: &dyn StateRegistry) -> Result<Topology, GatewayError> {
        let models = build_models(config, registry)?;
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
                registry,
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
                    retry_on: ech.retry_on,
                    rate_limit_wait: ech.rate_limit_wait,
                    timeout: ech.timeout,
                };
                let limits = EchelonLimits {
                    concurrency_limit: ech.concurrency_limit,
                    rpm_limit: ech.rpm_limit,
                };
                let tier = Arc::new(Tier::new(
                    label.clone(),
                    members,
                    defaults,
                    limits,
                    registry,
                ));
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
            if let Some(state) = registry.shared_state() {
                pool.share_sessions(state.clone(), state.key(&format!("session:{name}:")));
            }
            let tier = Tier::new(
                name.clone(),
                instances,
                // No per-model retries of any kind: the pool's own fallback retries.
                EchelonDefaults {
                    max_retries: Some(0),
                    retry_on: crate::config::RetryOn::all(0),
                    ..EchelonDefaults::default()
                },
                EchelonLimits::default(),
                registry,
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
                    let id = StateId::Route {
                        label: name.clone(),
                        unit: Unit::Breaker,
                    };
                    registry.breaker(&id, &format!("task group {name}"), &breaker_settings(c))
                });
            }
            plan.steps = steps;
            plan.own_steps = own_steps;
            plan.stream_failure = group.stream_failure.unwrap_or_default();
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
                plan.stream_failure = w.stream_failure.unwrap_or(target.stream_failure);
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
        Ok(Topology {
            models,
            echelons,
            pools,
            routes,
            route_list: route_list.into(),
            default_route: config.default_route.clone(),
            all_models,
        })
    }

    /// Every route a request may name: models first, then task groups each followed by
    /// their echelons, then polling pools and wrappers.
    pub fn routes(&self) -> &Arc<[RouteInfo]> {
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

    /// The polling pools, by name.
    pub(crate) fn pools(&self) -> impl Iterator<Item = (&str, &Arc<PollingPool>)> {
        self.pools.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// Every model as one probe set (seed 001's `health_check_all`).
    pub(crate) fn all_models(&self) -> &PollingPool {
        &self.all_models
    }

    /// The plan of each route, by name.
    pub(crate) fn plans(&self) -> impl Iterator<Item = (&str, &Plan)> {
        self.routes.iter().map(|(n, p)| (n.as_str(), p))
    }

    /// The state ids of every unit this topology uses (what a reload keeps in the
    /// registry).
    pub(crate) fn state_ids(&self) -> std::collections::HashSet<StateId> {
        let mut ids = std::collections::HashSet::new();
        for m in self.models.values() {
            ids.extend(m.state_ids());
        }
        for t in &self.echelons {
            for unit in [Unit::RpmLimit, Unit::Concurrency] {
                ids.insert(StateId::Route {
                    label: t.label.clone(),
                    unit,
                });
            }
        }
        for (name, plan) in &self.routes {
            if plan.group_breaker.is_some() {
                ids.insert(StateId::Route {
                    label: name.clone(),
                    unit: Unit::Breaker,
                });
            }
        }
        ids
    }

    /// Carries `old`'s route counters and fallback history over to the routes of the same
    /// name (shared: requests still in flight on `old` count here too), and its polling
    /// pools' instance health to the pools of the same name (a hot reload, issue 18).
    pub(crate) fn adopt(&mut self, old: &Topology) {
        for (name, plan) in &mut self.routes {
            if let Some(p) = old.routes.get(name) {
                plan.stats = p.stats.clone();
            }
        }
        for (name, pool) in &self.pools {
            if let Some(o) = old.pools.get(name) {
                pool.adopt_health(o);
            }
        }
    }

    /// The plan of one route.
    pub(crate) fn plan(&self, route: &str) -> Option<&Plan> {
        self.routes.get(route)
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

    /// The route a name resolves to and its plan: the route itself, or the
    /// `default_route` for the name `default` when no route has that name.
    ///
    /// # Errors
    /// 404 (`model_not_found`) when the name is not a route; the message names it
    /// cut to [`echelon_types::MAX_ECHOED_NAME_BYTES`].
    pub(crate) fn resolve(&self, name: &str) -> Result<(&str, &Plan), GatewayError> {
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
                // The name is the client's: echoed bounded (issue 14, item 11).
                format!(
                    "route `{}` is not a route of this gateway (GET /v1/models lists them)",
                    echelon_types::bounded_name(name)
                ),
            )
            .with_param("model")
            .with_code("model_not_found")),
        }
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
fn build_models(
    config: &Config,
    registry: &dyn StateRegistry,
) -> Result<BTreeMap<String, Arc<Model>>, GatewayError> {
    let mut models = BTreeMap::new();
    let mut pools: HashMap<String, Arc<KeyPool>> = HashMap::new();
    let mut http = HttpClients::new();
    for (id, mc) in &config.models {
        let provider = config.providers.get(&mc.provider).ok_or_else(|| {
            build_err(format!("model `{id}`: unknown provider `{}`", mc.provider))
        })?;
        let keys = match &mc.api_keys {
            Some(own) => key_pool(registry, format!("model {id}"), own),
            None => pools
                .entry(mc.provider.clone())
                .or_insert_with(|| {
                    key_pool(
                        registry,
                        format!("provider {}", mc.provider),
                        &provider.api_keys,
                    )
                })
                .clone(),
        };
        let model = Model::from_config(id, mc, provider, keys, &mut http, registry)
            .map_err(|e| build_err(format!("model `{id}`: {e}")))?;
        models.insert(id.clone(), Arc::new(model));
    }
    Ok(models)
}

/// The key pool `name` over `keys`, from the registry when one with the same keys exists
/// (a kept key keeps its cooldown or disabled state).
fn key_pool(registry: &dyn StateRegistry, name: String, keys: &[SecretString]) -> Arc<KeyPool> {
    let keys: Vec<ApiKey> = keys.iter().cloned().map(ApiKey::new).collect();
    let id = StateId::KeyPool {
        name: name.clone(),
        key_ids: keys.iter().map(|k| k.id().to_owned()).collect(),
    };
    let mut keys = Some(keys);
    registry.key_pool(&id, &mut || {
        KeyPool::new(name.clone(), keys.take().unwrap_or_default())
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::state::MemoryRegistry;

    const YAML: &str = r#"
providers:
  p: { base_url: "http://127.0.0.1:9/v1", api_keys: ["k1", "k2"] }
  q: { base_url: "http://127.0.0.1:9/v2" }
models:
  a: { provider: p, rpm_limit: 60 }
  b: { provider: p }
  c: { provider: q, concurrency_limit: 2 }
task_groups:
  g:
    echelon1: { models: [c], priority: 2 }
    echelon2: { models: [a, b], priority: 1, rpm_limit: 10 }
    fallback_config: { fallback_groups: [h, a], circuit_breaker: { failure_threshold: 2 } }
  h: { echelon1: { models: [b] } }
polling_pools:
  pool: { task_groups: [h] }
wrappers:
  w: { target: g.echelon1, fallback_groups: [h] }
default_route: g
"#;

    fn build(yaml: &str, registry: &MemoryRegistry) -> Topology {
        Topology::build(&Config::from_str(yaml, "t.yaml").unwrap(), registry).unwrap()
    }

    fn step_models(plan: &Plan) -> Vec<Vec<String>> {
        plan.steps
            .iter()
            .map(|s| s.models().iter().map(|m| m.id().to_owned()).collect())
            .collect()
    }

    #[test]
    fn routes_and_plans_follow_the_config() {
        let t = build(YAML, &MemoryRegistry::new());
        let ids: Vec<&str> = t.routes().iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "a",
                "b",
                "c",
                "g",
                "g.echelon1",
                "g.echelon2",
                "h",
                "h.echelon1",
                "pool",
                "w"
            ]
        );
        // Echelons by priority (echelon2 first), then the fallbacks without repeats (h's
        // echelon holds b, already tried in a step of its own; a is a step of its own).
        let g = t.plan("g").unwrap();
        assert_eq!(
            step_models(g),
            [vec!["a", "b"], vec!["c"], vec!["b"], vec!["a"]]
        );
        assert_eq!(g.own_steps, 2);
        assert!(g.group_breaker.is_some());
        let w = t.plan("w").unwrap();
        assert_eq!(step_models(w), [vec!["c"], vec!["b"]]);
        assert_eq!(t.resolve("default").unwrap().0, "g");
        assert!(t.resolve("nope").is_err());
        // A provider's keys are one pool, shared by its models.
        assert!(Arc::ptr_eq(
            t.model("a").unwrap().keys(),
            t.model("b").unwrap().keys()
        ));
    }

    #[test]
    fn a_key_that_stays_keeps_its_cooldown_and_disabled_state_when_the_key_list_changes() {
        use crate::resilience::key_pool::KeyState;
        let registry = MemoryRegistry::new();
        let first = build(YAML, &registry);
        let pool = first.model("a").unwrap().keys().clone();
        let lease = pool.acquire(&[]).unwrap();
        let cooled = lease.key().id().to_owned();
        lease.cool_down(Some(Duration::from_secs(600)), Duration::from_secs(1));
        let lease = pool.acquire(&[]).unwrap();
        let disabled = lease.key().id().to_owned();
        lease.disable("401 invalid key");
        assert_ne!(cooled, disabled);
        // k3 added: both old keys stay, each with its state; the new key starts ok.
        let added = YAML.replace(r#"["k1", "k2"]"#, r#"["k1", "k2", "k3"]"#);
        let second = build(&added, &registry);
        let states: HashMap<String, KeyState> = second
            .model("a")
            .unwrap()
            .keys()
            .snapshot()
            .into_iter()
            .map(|k| (k.id, k.state))
            .collect();
        assert_eq!(states.len(), 3);
        assert!(
            matches!(states[&cooled], KeyState::CoolingDown { .. }),
            "{states:?}"
        );
        assert!(
            matches!(states[&disabled], KeyState::Disabled { .. }),
            "{states:?}"
        );
        let k3 = crate::key::key_id("k3");
        assert!(matches!(states[&k3], KeyState::Ok), "{states:?}");
        // k3 removed again and the disabled key with it: the cooling one still cools.
        let kept_one = YAML.replace(
            r#"["k1", "k2"]"#,
            &format!(
                r#"["{}"]"#,
                if cooled == crate::key::key_id("k1") {
                    "k1"
                } else {
                    "k2"
                }
            ),
        );
        let third = build(&kept_one, &registry);
        let snap = third.model("a").unwrap().keys().snapshot();
        assert_eq!(snap.len(), 1);
        assert_eq!(snap[0].id, cooled);
        assert!(
            matches!(snap[0].state, KeyState::CoolingDown { .. }),
            "{snap:?}"
        );
    }

    #[test]
    fn a_second_build_over_the_same_registry_keeps_unchanged_units() {
        let registry = MemoryRegistry::new();
        let first = build(YAML, &registry);
        let a = first.model("a").unwrap();
        let permit = a.breaker().try_acquire().unwrap();
        a.breaker().record(permit, false);
        assert!(a.request_buckets[0].bucket.try_acquire(5.0));
        let again = build(YAML, &registry);
        let a2 = again.model("a").unwrap();
        assert_eq!(a2.breaker().snapshot().consecutive_failures, 1);
        assert!(Arc::ptr_eq(
            &a.request_buckets[0].bucket,
            &a2.request_buckets[0].bucket
        ));
        assert!(Arc::ptr_eq(a.keys(), a2.keys()));
        // A model pointed elsewhere is another upstream: fresh state.
        let moved = YAML.replace("http://127.0.0.1:9/v1", "http://127.0.0.1:9/v3");
        let third = build(&moved, &registry);
        assert_eq!(
            third
                .model("a")
                .unwrap()
                .breaker()
                .snapshot()
                .consecutive_failures,
            0
        );
        // Every unit a topology uses is named by its state ids: forgetting the rest
        // (the old identity's units) keeps the third topology's.
        let a3 = third.model("a").unwrap();
        let permit = a3.breaker().try_acquire().unwrap();
        a3.breaker().record(permit, false);
        let held = registry.len();
        let ids = third.state_ids();
        registry.retain(&|id| ids.contains(id));
        assert!(
            registry.len() < held,
            "the moved model's old units are gone"
        );
        let fourth = build(&moved, &registry);
        assert_eq!(
            fourth
                .model("a")
                .unwrap()
                .breaker()
                .snapshot()
                .consecutive_failures,
            1
        );
    }
}
