//! The gateway: resolves a route and tries its candidates until one answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{Attempt, ChatCompletion, ChatCompletionRequest};

use super::attempt::{Answer, Flow, RequestState, context_error, exhausted, try_model};
use super::model::Model;
use super::plan::{EchelonDefaults, EchelonLimits, Route, RouteKind, Tier};
use super::stream::GatewayStream;
use crate::config::{Config, FallbackStrategy};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::resilience::key_pool::KeyPool;

/// A route as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    /// What a request puts in `model`.
    pub id: String,
    /// `model`, `task_group` or `echelon`.
    pub kind: &'static str,
    /// The model ids behind it, in tier order.
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

/// The gateway: every model and route of a [`Config`], ready to serve requests.
#[derive(Debug)]
pub struct Gateway {
    models: BTreeMap<String, Arc<Model>>,
    echelons: Vec<Arc<Tier>>,
    routes: HashMap<String, Route>,
    route_list: Vec<RouteInfo>,
}

impl Gateway {
    /// Builds the models and routes of a validated config.
    ///
    /// Routes: every model id, every task group, and every `group.echelonN`.
    ///
    /// # Errors
    /// When a model's HTTP client cannot be built, or the config references a provider or
    /// model that does not exist (a config that passed validation never does).
    pub fn from_config(config: &Config) -> Result<Gateway, GatewayError> {
        let build_err = |m: String| GatewayError::new(GatewayErrorKind::Unavailable, m);
        let mut models = BTreeMap::new();
        // Key pools: a provider's keys are one pool shared by every model using them; a
        // model naming its own keys has a pool of its own (seed 004 APIKeyPool).
        let mut pools: HashMap<String, Arc<KeyPool>> = HashMap::new();
        for (id, mc) in &config.models {
            let provider = config.providers.get(&mc.provider).ok_or_else(|| {
                build_err(format!("model `{id}`: unknown provider `{}`", mc.provider))
            })?;
            warn_unenforced(
                &format!("model `{id}`"),
                &[
                    ("rate_limit_capacity", mc.rate_limit_capacity.is_some()),
                    (
                        "rate_limit_refill_rate",
                        mc.rate_limit_refill_rate.is_some(),
                    ),
                    ("rpm_limit", mc.rpm_limit.is_some()),
                    ("tpm_limit", mc.tpm_limit.is_some()),
                    ("concurrency_limit", mc.concurrency_limit.is_some()),
                ],
            );
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
        let mut routes = HashMap::new();
        let mut route_list = Vec::new();
        let mut echelons = Vec::new();
        for (id, model) in &models {
            let tier = Tier::new(
                id.clone(),
                vec![model.clone()],
                EchelonDefaults::default(),
                EchelonLimits::default(),
            );
            routes.insert(
                id.clone(),
                Route {
                    tiers: vec![Arc::new(tier)],
                },
            );
            route_list.push(RouteInfo {
                id: id.clone(),
                kind: RouteKind::Model.as_str(),
                models: vec![id.clone()],
            });
        }
        for (name, group) in &config.task_groups {
            if let Some(fb) = &group.fallback_config {
                warn_unenforced(
                    &format!("task group `{name}` fallback_config"),
                    &[
                        (
                            "a strategy other than echelon_down",
                            fb.strategy != FallbackStrategy::EchelonDown,
                        ),
                        ("fallback_groups", !fb.fallback_groups.is_empty()),
                        ("max_attempts", fb.max_attempts.is_some()),
                        ("retry_delay", fb.retry_delay.is_some()),
                        ("circuit_breaker", fb.circuit_breaker.is_some()),
                    ],
                );
            }
            let mut tiers = Vec::new();
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
                warn_unenforced(
                    &format!("echelon `{label}`"),
                    &[
                        ("concurrency_limit", ech.concurrency_limit.is_some()),
                        ("rpm_limit", ech.rpm_limit.is_some()),
                        ("priority", ech.priority.is_some()),
                    ],
                );
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
                routes.insert(
                    label.clone(),
                    Route {
                        tiers: vec![tier.clone()],
                    },
                );
                echelons.push(tier.clone());
                tiers.push(tier);
            }
            let all_models = tiers
                .iter()
                .flat_map(|t| t.models.iter().map(|m| m.id().to_owned()))
                .collect();
            route_list.push(RouteInfo {
                id: name.clone(),
                kind: RouteKind::TaskGroup.as_str(),
                models: all_models,
            });
            for t in &tiers {
                route_list.push(RouteInfo {
                    id: t.label.clone(),
                    kind: RouteKind::Echelon.as_str(),
                    models: t.models.iter().map(|m| m.id().to_owned()).collect(),
                });
            }
            routes.insert(name.clone(), Route { tiers });
        }
        Ok(Gateway {
            models,
            echelons,
            routes,
            route_list,
        })
    }

    /// Every route a request may name, models first, then task groups with their echelons.
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

    /// A non-streamed chat completion on the route named by `req.model`.
    ///
    /// # Errors
    /// A [`GatewayError`] naming every attempt: 404 for an unknown route, 400 when the
    /// request is at fault, else 429/502/503/504 as DESIGN.md §4 says. Never a placeholder.
    pub async fn chat(&self, mut req: ChatCompletionRequest) -> Result<Completion, GatewayError> {
        req.stream = None;
        let (answer, model, attempts) = self.execute(&req, false).await?;
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
        mut req: ChatCompletionRequest,
    ) -> Result<GatewayStream, GatewayError> {
        req.stream = Some(true);
        let (answer, model, attempts) = self.execute(&req, true).await?;
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
    ) -> Result<(Answer, Arc<Model>, Vec<Attempt>), GatewayError> {
        let route = self.routes.get(&req.model).ok_or_else(|| {
            GatewayError::new(
                GatewayErrorKind::UnknownRoute,
                format!(
                    "route `{}` is not a model or task group of this gateway (GET /v1/models lists them)",
                    req.model
                ),
            )
            .with_param("model")
            .with_code("model_not_found")
        })?;
        let mut st = RequestState::new();
        for tier in &route.tiers {
            let mut body = req.clone();
            tier.defaults.apply(&mut body);
            for model in tier.ordered() {
                if let Some(floor) = st.context_floor
                    && model.context_window().is_none_or(|w| w <= floor)
                {
                    continue;
                }
                body.model.clear();
                body.model.push_str(model.upstream_model());
                match try_model(tier, model, &body, stream, &mut st).await {
                    Flow::Answered(answer) => return Ok((answer, model.clone(), st.attempts)),
                    Flow::Stop(e) => return Err(e),
                    Flow::Next => {}
                }
            }
        }
        if st.context_refused {
            return Err(context_error(st.attempts));
        }
        Err(exhausted(&req.model, st.attempts))
    }
}

/// Says which configured keys this build accepts but does not act on yet, so that a
/// limit nobody enforces is never silently trusted.
fn warn_unenforced(what: &str, keys: &[(&str, bool)]) {
    let set: Vec<&str> = keys.iter().filter(|k| k.1).map(|k| k.0).collect();
    if !set.is_empty() {
        tracing::warn!("{what}: {} accepted but not enforced yet", set.join(", "));
    }
}
