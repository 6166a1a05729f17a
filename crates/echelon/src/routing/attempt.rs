//! The attempts on one model for one request: the resilience units in order
//! (breaker → token buckets → concurrency limits → key pool), the call, and what its
//! outcome means (retry with backoff, next key, next model, or stop).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use echelon_types::{Attempt, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::model::{InFlight, Model};
use super::plan::Tier;
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::provider::{ChunkStream, ErrorKind, ProviderError, ProviderRequest};
use crate::resilience::key_pool::{KeyLease, NoKey};

/// Longest wait the gateway spends on a live request for a rate-limited model: a
/// Retry-After (or a key cooldown) up to this is waited out before the retry; a longer
/// one moves on to the next candidate at once.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Longest backoff between two retries of the same model.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Tokens reserved for the answer in a `tpm_limit` bucket when the request sets no
/// `max_tokens`.
const DEFAULT_OUTPUT_RESERVE: u64 = 512;

/// Attempt kinds that record a candidate passed over without a call: every `error_kind`
/// of an attempt in `attempts`, the ledger or the metrics that is not a call's outcome
/// (README "Resilience (per model)").
pub const SKIP_KINDS: [&str; 7] = [
    "circuit_open",
    "token_bucket",
    "concurrency",
    "key_cooldown",
    "no_key",
    "provider_failed",
    "context_window",
];

/// Attempt kinds that mean "rate-limited" (by the provider or by a local limit).
const RATE_KINDS: [&str; 4] = [
    "rate_limited",
    "key_cooldown",
    "token_bucket",
    "concurrency",
];
/// Attempt kinds that mean "not callable now" without a call being made.
const UNAVAILABLE_KINDS: [&str; 3] = ["circuit_open", "no_key", "provider_failed"];

/// What a successful attempt holds for as long as the answer is being produced: the
/// concurrency slots and the key lease (which counts as in flight).
#[derive(Debug, Default)]
pub(crate) struct Guards {
    _slots: Vec<OwnedSemaphorePermit>,
    _lease: Option<KeyLease>,
    _in_flight: Option<InFlight>,
}

/// What one successful attempt produced.
pub(crate) enum Answer {
    Chat(ChatCompletion),
    Stream {
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
        guards: Guards,
        /// Tokens reserved in the model's `tpm_limit` bucket, settled on the usage chunk.
        tpm_reserved: Option<u64>,
    },
}

/// What the caller does after trying one model.
pub(crate) enum Flow {
    Answered(Answer),
    Next,
    Stop(GatewayError),
}

/// State of one request across the models it tries.
pub(crate) struct RequestState {
    pub(crate) attempts: Vec<Attempt>,
    /// After a context-length refusal by a model with window W, only models with a
    /// declared window larger than W are worth trying (DESIGN.md §4).
    pub(crate) context_floor: Option<u32>,
    /// A provider refused the prompt as too long, or every window was too small.
    pub(crate) context_refused: bool,
    /// Prompt token counts already made, per encoding.
    prompt_tokens: Vec<(crate::tokens::Encoding, u64)>,
    /// HTTP calls made so far.
    calls: u32,
    /// Most calls allowed (`fallback_config.max_attempts`).
    max_calls: Option<u32>,
    /// The pool instance that answered, when a pool step answered.
    pub(crate) answered_by: Option<Arc<Model>>,
}

impl RequestState {
    pub(crate) fn new(max_calls: Option<u32>) -> Self {
        RequestState {
            attempts: Vec::new(),
            context_floor: None,
            context_refused: false,
            prompt_tokens: Vec::new(),
            calls: 0,
            max_calls,
            answered_by: None,
        }
    }

    /// HTTP calls made so far for this request.
    pub(crate) fn calls(&self) -> u32 {
        self.calls
    }

    /// Whether another call is allowed under `max_attempts`.
    pub(crate) fn budget_left(&self) -> bool {
        self.max_calls.is_none_or(|m| self.calls < m)
    }

    /// The prompt's tokens in `model`'s encoding, counted once per encoding per request.
    fn prompt_tokens(&mut self, model: &Model, req: &ChatCompletionRequest) -> u64 {
        let encoding = model.encoding();
        if let Some((_, n)) = self.prompt_tokens.iter().find(|(e, _)| *e == encoding) {
            return *n;
        }
        let n = encoding.prompt_tokens(&req.messages);
        self.prompt_tokens.push((encoding, n));
        n
    }

    /// Whether the prompt (counted with tiktoken) plus the requested output cannot fit
    /// `model`'s declared context window; if so the skip is recorded (kind
    /// `context_window`) and nothing is sent (issue 4: "before sending, not after the
    /// provider refuses").
    pub(crate) fn exceeds_context(&mut self, model: &Model, body: &ChatCompletionRequest) -> bool {
        let Some(window) = model.context_window() else {
            return false;
        };
        let prompt = self.prompt_tokens(model, body);
        let output = body.max_output_tokens().map_or(0, u64::from);
        if prompt + output <= u64::from(window) {
            return false;
        }
        self.context_refused = true;
        self.skip(
            model,
            "context_window",
            format!(
                "{prompt} prompt tokens + {output} max_tokens exceed the context window of {window}"
            ),
        );
        true
    }

    /// Records that `model` was passed over without a call.
    pub(crate) fn skip(&mut self, model: &Model, kind: &str, message: String) {
        tracing::info!(model = model.id(), kind, "model skipped: {message}");
        self.attempts.push(Attempt {
            model: model.id().to_owned(),
            provider: model.provider().to_owned(),
            key_id: None,
            status: None,
            error_kind: kind.to_owned(),
            message,
            latency_ms: 0,
        });
    }
}

/// Whether a failure says the model is unhealthy (feeds its circuit breaker). Key and
/// request problems (401/403, 429, 400) do not.
fn counts_against_health(e: &ProviderError) -> bool {
    matches!(
        e.kind,
        ErrorKind::Timeout
            | ErrorKind::Connect
            | ErrorKind::ServerError
            | ErrorKind::Malformed
            | ErrorKind::StreamCut
            | ErrorKind::NotFound
    )
}

/// Tries `model` for this request: up to `max_retries + 1` calls, each passing the
/// breaker, the token buckets, the concurrency limits and the key pool first.
pub(crate) async fn try_model(
    tier: &Tier,
    model: &Arc<Model>,
    body: &ChatCompletionRequest,
    stream: bool,
    st: &mut RequestState,
) -> Flow {
    let max_retries = tier.defaults.max_retries.unwrap_or(model.max_retries());
    let mut backoff = ExponentialBuilder::new()
        .with_min_delay(model.retry_delay())
        .with_factor(2.0)
        .with_jitter()
        .with_max_delay(MAX_BACKOFF)
        .without_max_times()
        .build();
    let queue = model.queue_timeout();
    let mut refused_keys: Vec<usize> = Vec::new();
    let mut calls: u32 = 0;
    let mut cooldown_waits: u32 = 0;
    let req = ProviderRequest {
        body,
        model: model.upstream_model(),
        temperature: tier.defaults.temperature,
        max_tokens: tier.defaults.max_tokens,
        stream,
    };
    model.retry_budget.deposit();
    loop {
        let tried = calls > 0;
        // 1. Circuit breaker.
        let permit = match model.breaker.try_acquire() {
            Ok(p) => p,
            Err(open) => {
                if !tried {
                    let left = open.until.saturating_duration_since(Instant::now());
                    st.skip(
                        model,
                        "circuit_open",
                        format!("circuit breaker open for {} ms more", left.as_millis()),
                    );
                }
                return Flow::Next;
            }
        };
        // 2. Token buckets: the echelon's, the model's request buckets, then tpm_limit.
        if let Some(b) = &tier.rpm
            && b.acquire(1.0, queue).await.is_err()
        {
            st.skip(
                model,
                "token_bucket",
                format!("echelon `{}` rpm_limit reached", tier.label),
            );
            return Flow::Next;
        }
        for nb in &model.request_buckets {
            if nb.bucket.acquire(1.0, queue).await.is_err() {
                st.skip(model, "token_bucket", format!("{} reached", nb.name));
                return Flow::Next;
            }
        }
        let tpm_reserved = match &model.tpm {
            None => None,
            Some(tpm) => {
                let need = st.prompt_tokens(model, body)
                    + body
                        .max_output_tokens()
                        .map_or(DEFAULT_OUTPUT_RESERVE, u64::from);
                if tpm.acquire(need as f64, queue).await.is_err() {
                    st.skip(
                        model,
                        "token_bucket",
                        format!("tpm_limit: {need} tokens not available"),
                    );
                    return Flow::Next;
                }
                Some(need)
            }
        };
        let give_back = |n: Option<u64>| {
            if let (Some(tpm), Some(n)) = (&model.tpm, n) {
                tpm.refund(n as f64);
            }
        };
        // 3. Concurrency limits: the echelon's, then the model's.
        let mut guards = Guards::default();
        for (what, limit) in [
            ("echelon", &tier.concurrency),
            ("model", &model.concurrency),
        ] {
            if let Some(limit) = limit {
                match limit.acquire(queue).await {
                    Ok(slot) => guards._slots.push(slot),
                    Err(e) => {
                        give_back(tpm_reserved);
                        st.skip(model, "concurrency", format!("{what} {e}"));
                        return Flow::Next;
                    }
                }
            }
        }
        // 4. Key pool.
        if !model.keys().is_empty() {
            match model.keys().acquire(&refused_keys) {
                Ok(lease) => guards._lease = Some(lease),
                Err(NoKey::CoolingDown { until }) => {
                    give_back(tpm_reserved);
                    let wait = until.saturating_duration_since(Instant::now());
                    cooldown_waits += 1;
                    // Bounded: other requests may keep re-cooling the keys.
                    if calls <= max_retries
                        && cooldown_waits <= max_retries + 1
                        && wait <= MAX_RETRY_WAIT
                    {
                        drop(permit);
                        drop(guards);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    if !tried {
                        st.skip(
                            model,
                            "key_cooldown",
                            format!("every key cooling down for {} ms more", wait.as_millis()),
                        );
                    }
                    return Flow::Next;
                }
                Err(NoKey::Exhausted) => {
                    give_back(tpm_reserved);
                    if !tried {
                        st.skip(model, "no_key", "every key is disabled".to_owned());
                    }
                    return Flow::Next;
                }
            }
        }
        // 5. The call, if the request's max_attempts allows one more.
        if !st.budget_left() {
            give_back(tpm_reserved);
            return Flow::Next;
        }
        calls += 1;
        st.calls += 1;
        guards._in_flight = Some(InFlight::new(model));
        let key = guards._lease.as_ref().map(KeyLease::key);
        let key_id = key.map(|k| k.id().to_owned());
        let started = Instant::now();
        let result = call(model, key, &req, tier.defaults.timeout).await;
        let latency_ms = started.elapsed().as_millis() as u64;
        let e = match result {
            Ok(answer) => {
                model.breaker.record(permit, true);
                st.attempts.push(Attempt {
                    model: model.id().to_owned(),
                    provider: model.provider().to_owned(),
                    key_id,
                    status: Some(200),
                    error_kind: "ok".to_owned(),
                    message: String::new(),
                    latency_ms,
                });
                return Flow::Answered(match answer {
                    CallAnswer::Chat(c) => {
                        if let (Some(tpm), Some(reserved), Some(usage)) =
                            (&model.tpm, tpm_reserved, c.usage.as_ref())
                        {
                            settle_tpm(tpm, reserved, usage.total_tokens);
                        }
                        Answer::Chat(c)
                    }
                    CallAnswer::Stream { buffered, rest } => Answer::Stream {
                        buffered,
                        rest,
                        guards,
                        tpm_reserved,
                    },
                });
            }
            Err(e) => e,
        };
        tracing::warn!(
            model = model.id(), tier = %tier.label, key_id = key_id.as_deref().unwrap_or("-"),
            kind = %e.kind, status = e.status, latency_ms, "attempt failed: {}", e.message
        );
        st.attempts
            .push(failed_attempt(model, key_id, &e, latency_ms));
        if counts_against_health(&e) {
            model.breaker.record(permit, false);
        } else {
            drop(permit);
        }
        // A refused call used no tokens worth counting.
        if e.status.is_some() && e.kind != ErrorKind::Timeout {
            give_back(tpm_reserved);
        }
        if e.is_client_fault() {
            return Flow::Stop(
                GatewayError::new(
                    GatewayErrorKind::BadRequest,
                    format!("model `{}` refused the request: {}", model.id(), e.message),
                )
                .with_attempts(std::mem::take(&mut st.attempts)),
            );
        }
        if e.is_context_length() {
            st.context_refused = true;
            return match model.context_window() {
                Some(w) => {
                    st.context_floor = Some(st.context_floor.unwrap_or(0).max(w));
                    Flow::Next
                }
                // Nothing known about the other windows: do not guess.
                None => Flow::Stop(context_error(std::mem::take(&mut st.attempts))),
            };
        }
        if calls > max_retries {
            return Flow::Next;
        }
        if e.is_key_fatal() {
            match &guards._lease {
                Some(lease) => {
                    lease.disable(&e.message);
                    refused_keys.push(lease.index());
                    continue;
                }
                None => return Flow::Next,
            }
        }
        if !e.is_retryable() {
            return Flow::Next;
        }
        if !model.retry_budget.try_withdraw() {
            tracing::warn!(
                model = model.id(),
                "retry budget exhausted: moving on without retry"
            );
            return Flow::Next;
        }
        if e.kind == ErrorKind::RateLimited {
            if let Some(lease) = &guards._lease {
                // The next pass takes another key at once, or waits out the cooldown.
                lease.cool_down(e.retry_after, model.key_cooldown());
                continue;
            }
            match e.retry_after {
                Some(ra) if ra > MAX_RETRY_WAIT => return Flow::Next,
                Some(ra) => {
                    drop(guards);
                    tokio::time::sleep(ra).await;
                    continue;
                }
                None => {}
            }
        }
        drop(guards);
        tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
    }
}

/// Gives back the unused part of a `tpm_limit` reservation, or charges the excess.
pub(crate) fn settle_tpm(
    tpm: &crate::resilience::token_bucket::TokenBucket,
    reserved: u64,
    used: u64,
) {
    if used < reserved {
        tpm.refund((reserved - used) as f64);
    } else if used > reserved {
        tpm.charge((used - reserved) as f64);
    }
}

enum CallAnswer {
    Chat(ChatCompletion),
    Stream {
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
    },
}

/// One HTTP call: the whole answer, or a stream up to its first content chunk.
async fn call(
    model: &Model,
    key: Option<&ApiKey>,
    req: &ProviderRequest<'_>,
    bound: Option<Duration>,
) -> Result<CallAnswer, ProviderError> {
    let call = async {
        if !req.stream {
            return model.upstream().call(key, req).await.map(CallAnswer::Chat);
        }
        let mut rest = model.upstream().stream(key, req).await?;
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
        Ok(CallAnswer::Stream { buffered, rest })
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

fn failed_attempt(
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

pub(crate) fn context_error(attempts: Vec<Attempt>) -> GatewayError {
    GatewayError::new(
        GatewayErrorKind::BadRequest,
        "the prompt does not fit the context window of any candidate model",
    )
    .with_param("messages")
    .with_code("context_length_exceeded")
    .with_attempts(attempts)
}

/// The error once every candidate failed or was skipped: 429 when all were rate-limited
/// (by a provider or a local limit; breakers may be open too), 503 when none could be
/// tried at all, 504 when all timed out, else 502.
pub(crate) fn exhausted(route: &str, attempts: Vec<Attempt>) -> GatewayError {
    let is = |a: &Attempt, set: &[&str]| set.contains(&a.error_kind.as_str());
    let all_local_or_rate = attempts
        .iter()
        .all(|a| is(a, &RATE_KINDS) || is(a, &UNAVAILABLE_KINDS));
    let kind = if attempts.is_empty() || attempts.iter().all(|a| is(a, &UNAVAILABLE_KINDS)) {
        GatewayErrorKind::Unavailable
    } else if all_local_or_rate {
        GatewayErrorKind::RateLimited
    } else if attempts.iter().all(|a| a.error_kind == "timeout") {
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
        assert_eq!(exhausted("r", vec![att("circuit_open")]).status(), 503);
        assert_eq!(
            exhausted("r", vec![att("rate_limited"), att("rate_limited")]).status(),
            429
        );
        assert_eq!(
            exhausted("r", vec![att("token_bucket"), att("circuit_open")]).status(),
            429
        );
        assert_eq!(exhausted("r", vec![att("timeout")]).status(), 504);
        let mixed = exhausted("r", vec![att("timeout"), att("connect")]);
        assert_eq!(mixed.status(), 502);
        assert_eq!(mixed.attempts().len(), 2);
        assert!(mixed.message().contains("m → connect"));
    }
}
