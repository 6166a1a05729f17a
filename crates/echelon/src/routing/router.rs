//! The gateway: resolves a route and tries its candidates until one answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{Attempt, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest};
use tokio::time::Instant;

use super::model::Model;
use super::plan::{EchelonDefaults, Route, RouteKind, Tier};
use super::stream::GatewayStream;
use crate::config::{Config, FallbackStrategy};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::provider::{ChunkStream, ErrorKind, ProviderError};

/// Longest `Retry-After` the gateway waits out on a live request before a retry of the
/// same model; a longer one moves on to the next candidate at once.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Longest backoff between two retries of the same model.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
    routes: HashMap<String, Route>,
    route_list: Vec<RouteInfo>,
}

/// What one successful attempt produced.
enum Answer {
    Chat(ChatCompletion),
    Stream {
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
    },
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
            let model = Model::from_config(id, mc, provider)
                .map_err(|e| build_err(format!("model `{id}`: {e}")))?;
            models.insert(id.clone(), Arc::new(model));
        }
        let mut routes = HashMap::new();
        let mut route_list = Vec::new();
        for (id, model) in &models {
            let tier = Tier::new(id.clone(), vec![model.clone()], EchelonDefaults::default());
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
                let tier = Arc::new(Tier::new(label.clone(), members, defaults));
                routes.insert(
                    label.clone(),
                    Route {
                        tiers: vec![tier.clone()],
                    },
                );
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
            Answer::Stream { buffered, rest } => {
                Ok(GatewayStream::new(model, attempts, buffered, rest))
            }
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
        let mut attempts = Vec::new();
        // After a context-length refusal by a model with window W, only models with a
        // declared window larger than W are worth trying (DESIGN.md §4).
        let mut context_floor: Option<u32> = None;
        let mut context_refused = false;
        for tier in &route.tiers {
            let mut body = req.clone();
            tier.defaults.apply(&mut body);
            for model in tier.ordered() {
                if let Some(floor) = context_floor
                    && model.context_window().is_none_or(|w| w <= floor)
                {
                    continue;
                }
                body.model.clear();
                body.model.push_str(model.upstream_model());
                let max_retries = tier.defaults.max_retries.unwrap_or(model.max_retries());
                let mut refused_keys = Vec::new();
                let mut retries = 0;
                while let Ok(key) = model.pick_key(&refused_keys) {
                    let started = Instant::now();
                    let result = attempt(
                        model,
                        key.map(|k| k.1),
                        &body,
                        stream,
                        tier.defaults.timeout,
                    )
                    .await;
                    let latency_ms = started.elapsed().as_millis() as u64;
                    let key_id = key.map(|(_, k)| k.id().to_owned());
                    let e = match result {
                        Ok(answer) => {
                            tracing::debug!(route = %req.model, model = model.id(), latency_ms, "attempt succeeded");
                            attempts.push(Attempt {
                                model: model.id().to_owned(),
                                provider: model.provider().to_owned(),
                                key_id,
                                status: Some(200),
                                error_kind: "ok".to_owned(),
                                message: String::new(),
                                latency_ms,
                            });
                            return Ok((answer, model.clone(), attempts));
                        }
                        Err(e) => e,
                    };
                    tracing::warn!(
                        route = %req.model, tier = %tier.label, model = model.id(),
                        key_id = key_id.as_deref().unwrap_or("-"), kind = %e.kind,
                        status = e.status, latency_ms, "attempt failed: {}", e.message
                    );
                    attempts.push(failed_attempt(model, key_id, &e, latency_ms));
                    if e.is_client_fault() {
                        return Err(GatewayError::new(
                            GatewayErrorKind::BadRequest,
                            format!("model `{}` refused the request: {}", model.id(), e.message),
                        )
                        .with_attempts(attempts));
                    }
                    if e.is_context_length() {
                        context_refused = true;
                        match model.context_window() {
                            Some(w) => context_floor = Some(context_floor.unwrap_or(0).max(w)),
                            // Nothing known about the other windows: do not guess.
                            None => return Err(context_error(attempts)),
                        }
                        break;
                    }
                    if e.is_key_fatal() {
                        match key {
                            Some((i, _)) => {
                                refused_keys.push(i);
                                continue;
                            }
                            None => break,
                        }
                    }
                    if !e.is_retryable() || retries >= max_retries {
                        break;
                    }
                    match backoff(model.retry_delay(), retries, e.retry_after) {
                        Some(wait) => {
                            retries += 1;
                            tokio::time::sleep(wait).await;
                        }
                        None => break,
                    }
                }
            }
        }
        if context_refused {
            return Err(context_error(attempts));
        }
        Err(exhausted(&req.model, attempts))
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

/// One call to one model: the whole answer, or a stream up to its first content chunk.
async fn attempt(
    model: &Model,
    key: Option<&ApiKey>,
    body: &ChatCompletionRequest,
    stream: bool,
    bound: Option<Duration>,
) -> Result<Answer, ProviderError> {
    let call = async {
        if !stream {
            return model.client().chat(key, body).await.map(Answer::Chat);
        }
        let mut rest = model.client().chat_stream(key, body).await?;
        let mut buffered = VecDeque::new();
        // Hold chunks back until one carries content: a role-only first chunk (llama.cpp
        // sends `content: null`) must not commit the client to this candidate.
        while let Some(chunk) = rest.next().await {
            let chunk = chunk?;
            let decisive =
                chunk.has_content() || chunk.choices.iter().any(|c| c.finish_reason.is_some());
            buffered.push_back(chunk);
            if decisive {
                break;
            }
        }
        Ok(Answer::Stream { buffered, rest })
    };
    match bound {
        None => call.await,
        Some(limit) => tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(ProviderError::new(
                ErrorKind::Timeout,
                format!("echelon timeout of {} ms", limit.as_millis()),
            ))
        }),
    }
}

pub(crate) fn failed_attempt(
    model: &Model,
    key_id: Option<String>,
    e: &ProviderError,
    latency_ms: u64,
) -> Attempt {
    Attempt {
        model: model.id().to_owned(),
        provider: model.provider().to_owned(),
        key_id,
        status: e.status,
        error_kind: e.kind.as_str().to_owned(),
        message: e.message.clone(),
        latency_ms,
    }
}

/// The wait before retry number `retries + 1` of the same model, or `None` to move on.
///
/// Retry-After is honoured when it is at most [`MAX_RETRY_WAIT`]; otherwise exponential:
/// `retry_delay × 2^retries`, capped at 30 s.
fn backoff(retry_delay: Duration, retries: u32, retry_after: Option<Duration>) -> Option<Duration> {
    match retry_after {
        Some(ra) if ra > MAX_RETRY_WAIT => None,
        Some(ra) => Some(ra),
        None => Some(
            retry_delay
                .saturating_mul(1u32 << retries.min(16))
                .min(MAX_BACKOFF),
        ),
    }
}

fn context_error(attempts: Vec<Attempt>) -> GatewayError {
    GatewayError::new(
        GatewayErrorKind::BadRequest,
        "the prompt does not fit the context window of any candidate model",
    )
    .with_param("messages")
    .with_code("context_length_exceeded")
    .with_attempts(attempts)
}

/// The error once every candidate failed: 429 if all were rate-limited, 504 if all timed
/// out, 503 if none could be tried, else 502.
fn exhausted(route: &str, attempts: Vec<Attempt>) -> GatewayError {
    let all = |kind: &str| attempts.iter().all(|a| a.error_kind == kind);
    let kind = if attempts.is_empty() {
        GatewayErrorKind::Unavailable
    } else if all("rate_limited") {
        GatewayErrorKind::RateLimited
    } else if all("timeout") {
        GatewayErrorKind::Timeout
    } else {
        GatewayErrorKind::UpstreamFailed
    };
    let summary = attempts
        .iter()
        .map(|a| match a.status {
            Some(s) => format!("{} → {} (HTTP {s})", a.model, a.error_kind),
            None => format!("{} → {}", a.model, a.error_kind),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let message = if attempts.is_empty() {
        format!("route `{route}`: no candidate model could be tried")
    } else {
        format!(
            "route `{route}`: all {} attempts failed: {summary}",
            attempts.len()
        )
    };
    GatewayError::new(kind, message).with_attempts(attempts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_honours_retry_after() {
        let d = Duration::from_millis(100);
        assert_eq!(backoff(d, 0, None), Some(Duration::from_millis(100)));
        assert_eq!(backoff(d, 2, None), Some(Duration::from_millis(400)));
        assert_eq!(backoff(d, 30, None), Some(MAX_BACKOFF));
        assert_eq!(
            backoff(d, 0, Some(Duration::from_secs(2))),
            Some(Duration::from_secs(2))
        );
        assert_eq!(backoff(d, 0, Some(Duration::from_secs(60))), None);
    }

    fn att(kind: &str) -> Attempt {
        Attempt {
            model: "m".into(),
            provider: "p".into(),
            key_id: None,
            status: None,
            error_kind: kind.into(),
            message: String::new(),
            latency_ms: 1,
        }
    }

    #[test]
    fn exhausted_status_follows_the_attempts() {
        assert_eq!(exhausted("r", vec![]).status(), 503);
        assert_eq!(
            exhausted("r", vec![att("rate_limited"), att("rate_limited")]).status(),
            429
        );
        assert_eq!(exhausted("r", vec![att("timeout")]).status(), 504);
        let mixed = exhausted("r", vec![att("timeout"), att("connect")]);
        assert_eq!(mixed.status(), 502);
        assert_eq!(mixed.attempts().len(), 2);
        assert!(mixed.message().contains("m → connect"));
    }
}
