//! The attempts on one model for one request: the retry and backoff policy around
//! "admit each step, call, report" (DESIGN.md §4 "Which errors move on").

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use echelon_types::{
    Attempt, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, EmbeddingRequest,
    EmbeddingResponse, InputItem, Outcome, SkipReason,
};
use tokio::time::Instant;

use super::admit::{Admitted, PoolTicket, admit};
use super::cancel::Trace;
use super::model::Model;
use super::plan::{EchelonDefaults, Tier};
use crate::error::{GatewayError, GatewayErrorKind};
use crate::key::ApiKey;
use crate::provider::{
    ChunkStream, EmbedRequest, ErrorKind, NO_EMBEDDINGS, ProviderError, ProviderRequest,
};
use crate::resilience::admission::{Ask, Report};
use crate::resilience::key_pool::KeyState;
use crate::tokens::{Encoding, PromptBounds};

/// Longest wait the gateway spends on a live request for a rate-limited model: a
/// Retry-After (or a key cooldown) up to this may be waited out before the retry, but
/// only when no other candidate of the request's plan can take the request now
/// (`routing::execute`); a longer one moves on to the next candidate and is not waited
/// for.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Longest backoff between two retries of the same model.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Tokens reserved for the answer in a `tpm_limit` bucket when the request sets no
/// `max_tokens`.
const DEFAULT_OUTPUT_RESERVE: u64 = 512;

/// What a plan's run sends, one call at a time: a chat completion, a streamed one, or
/// embeddings. References only (`Copy`): the request is never copied per tier or
/// attempt, and asking it for its route, output cap or prompt tokens costs a match.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Job<'a> {
    /// A non-streamed chat completion.
    Chat(&'a ChatCompletionRequest),
    /// A streamed chat completion (answered once its first content chunk arrives).
    Stream(&'a ChatCompletionRequest),
    /// An embeddings request.
    Embed(&'a EmbeddingRequest),
}

impl<'a> Job<'a> {
    /// The route the client named (`model`).
    pub(crate) fn route(self) -> &'a str {
        match self {
            Job::Chat(r) | Job::Stream(r) => &r.model,
            Job::Embed(r) => &r.model,
        }
    }

    /// The output cap within an echelon (its `max_tokens` when the request sets none);
    /// `None` for embeddings, which generate nothing.
    pub(crate) fn max_output(self, defaults: &EchelonDefaults) -> Option<u32> {
        match self {
            Job::Chat(r) | Job::Stream(r) => defaults.max_output_tokens(r),
            Job::Embed(_) => None,
        }
    }

    /// `gen_ai.operation.name` of its calls: `chat` or `embeddings`.
    pub(crate) fn operation(self) -> &'static str {
        match self {
            Job::Chat(_) | Job::Stream(_) => "chat",
            Job::Embed(_) => "embeddings",
        }
    }

    /// The request field a context-length error names.
    fn prompt_param(self) -> &'static str {
        match self {
            Job::Chat(_) | Job::Stream(_) => "messages",
            Job::Embed(_) => "input",
        }
    }

    /// Bounds on [`PromptCount::largest`] without tokenizing.
    fn largest_bounds(self, encoding: Encoding) -> PromptBounds {
        match self {
            Job::Chat(r) | Job::Stream(r) => encoding.prompt_bounds(&r.messages),
            Job::Embed(r) => crate::tokens::largest_input_bounds(encoding, &r.input),
        }
    }

    /// A bound the prompt's [`PromptCount::total`] never exceeds, without tokenizing: its
    /// bytes plus the framing (a token of a byte-level BPE covers at least one byte).
    /// Token ids of an embeddings input count as given.
    fn total_upper_bound(self, encoding: Encoding) -> u64 {
        match self {
            Job::Chat(r) | Job::Stream(r) => encoding.prompt_bounds(&r.messages).upper,
            Job::Embed(r) => r.input.items().fold(0u64, |n, item| {
                n.saturating_add(match item {
                    InputItem::Text(t) => t.len() as u64,
                    InputItem::Tokens(ids) => ids.len() as u64,
                })
            }),
        }
    }

    /// The prompt's tokens in `encoding` (off the async workers when large).
    async fn count(self, encoding: Encoding) -> PromptCount {
        match self {
            Job::Chat(r) | Job::Stream(r) => {
                let n = encoding.prompt_tokens_async(&r.messages).await;
                PromptCount {
                    total: n,
                    largest: n,
                }
            }
            Job::Embed(r) => {
                let (total, largest) = crate::tokens::input_tokens_async(encoding, &r.input).await;
                PromptCount { total, largest }
            }
        }
    }
}

/// A prompt's tokens in one encoding.
#[derive(Debug, Clone, Copy)]
struct PromptCount {
    /// What the call reads (the `tpm_limit` reservation): a chat prompt, or every input
    /// of an embeddings request.
    total: u64,
    /// What must fit the context window: the chat prompt, or the largest input (each
    /// input is embedded on its own).
    largest: u64,
}

/// What one successful attempt produced.
pub(crate) enum Answer {
    Chat(ChatCompletion),
    Embeddings(EmbeddingResponse),
    Stream {
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
        /// The attempt's tickets, reported when the stream ends.
        admitted: Admitted,
    },
}

/// What the caller does after trying one model.
pub(crate) enum Flow {
    Answered(Answer),
    Next,
    Stop(GatewayError),
    /// The model is rate-limited until this instant (a 429's Retry-After or its keys'
    /// cooldown, at most [`MAX_RETRY_WAIT`] away; for a keyless model's 429 without
    /// Retry-After, its retry backoff), further away than its `rate_limit_wait`, and
    /// may take the request then: the caller tries the other candidates first and
    /// comes back to it (with the same [`ModelTry`]) only if none of them answers
    /// (issue 14, item 4).
    Later(Instant),
}

/// One model's attempts for one request, kept while the model is set aside
/// ([`Flow::Later`]), so that trying it again continues its retry count, its refused
/// keys and its backoff instead of starting over.
#[derive(Default)]
pub(crate) struct ModelTry {
    /// Whether the model was entered for this request (its retry budget got the
    /// request's deposit).
    entered: bool,
    /// Calls made to the model for this request.
    calls: u32,
    /// Times the model was set aside for its keys' cooldown.
    cooldown_waits: u32,
    /// Keys refused with 401/403 for this request.
    refused_keys: Vec<usize>,
    /// The next call is a retry not yet paid for from the retry budget.
    retry_unpaid: bool,
    /// The delays between retries (from the model's `retry_delay`), made at the first
    /// retry.
    backoff: Option<ExponentialBackoff>,
    /// Retries decided after a failure of each kind (indexed as [`ErrorKind::ALL`]):
    /// what `retry_on` bounds.
    retries: [u32; ErrorKind::ALL.len()],
}

impl ModelTry {
    fn slot(kind: ErrorKind) -> usize {
        ErrorKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default()
    }

    /// Retries decided after failures of `kind` so far.
    fn retries_after(&self, kind: ErrorKind) -> u32 {
        self.retries[Self::slot(kind)]
    }

    /// One more retry after a failure of `kind`.
    fn count_retry(&mut self, kind: ErrorKind) {
        self.retries[Self::slot(kind)] += 1;
    }
}

/// What a continuation of a failed stream changes in a plan's run (`routing/stream.rs`):
/// the body a `prefill: true` model is sent, and the models that may not take it.
#[derive(Debug)]
pub(crate) struct Resume {
    /// The request with the partial answer as its last message (an assistant prefill).
    /// Models without `prefill` get the run's own body: the partial answer and an
    /// instruction to go on.
    pub(crate) prefill: ChatCompletionRequest,
    /// Ids of the models whose stream failed: the continuation goes to another.
    pub(crate) exclude: Vec<String>,
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
    prompt_tokens: Vec<(Encoding, PromptCount)>,
    /// Candidates passed over because their wire does not serve the request's kind
    /// (embeddings): when they are all the attempts, the route cannot serve it (400).
    pub(crate) unserved: usize,
    /// HTTP calls made so far.
    calls: u32,
    /// Most calls allowed (`fallback_config.max_attempts`).
    max_calls: Option<u32>,
    /// The pool instance that answered, when a pool step answered.
    pub(crate) answered_by: Option<Arc<Model>>,
    /// Where the request's attempts are also written, so that an abandoned request can
    /// still be recorded (`cancel.rs`); `None` outside a traced request.
    trace: Option<Arc<Trace>>,
    /// The key id of the call in flight, when there is no trace to hold it.
    call_key: Option<String>,
    /// Set when this run continues a failed stream.
    pub(crate) resume: Option<Arc<Resume>>,
    /// Per model id, when it is known to be rate-limited until (its latest 429's
    /// Retry-After, or the end of its keys' cooldown): the Retry-After of the 429 the
    /// request ends with when every candidate was rate-limited.
    rate_limited_until: Vec<(String, Instant)>,
}

impl RequestState {
    pub(crate) fn new(max_calls: Option<u32>) -> Self {
        RequestState {
            attempts: Vec::new(),
            context_floor: None,
            context_refused: false,
            prompt_tokens: Vec::new(),
            unserved: 0,
            calls: 0,
            max_calls,
            answered_by: None,
            trace: Trace::current(),
            call_key: None,
            resume: None,
            rate_limited_until: Vec::new(),
        }
    }

    /// What the request learned of `model`'s rate limit: rate-limited until `until`, or
    /// (`None`) no known end. The latest word on a model replaces the earlier one.
    fn note_rate_limited(&mut self, model: &Model, until: Option<Instant>) {
        self.rate_limited_until.retain(|(id, _)| id != model.id());
        if let Some(until) = until {
            self.rate_limited_until.push((model.id().to_owned(), until));
        }
    }

    /// The shortest time until a rate-limited candidate may be called again, from now
    /// (zero when one's time has come): the smallest Retry-After among the providers'
    /// values and the cooling keys' remaining cooldowns; `None` when none is known.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        let now = Instant::now();
        self.rate_limited_until
            .iter()
            .map(|(_, until)| until.saturating_duration_since(now))
            .min()
    }

    /// A call to `model` with key `key_id` starts (the trace holds the key id meanwhile).
    fn call_started(&mut self, model: &Arc<Model>, key_id: Option<String>) {
        match &self.trace {
            Some(t) => t.call_started(model, key_id),
            None => self.call_key = key_id,
        }
    }

    /// The call in flight ended: its key id.
    fn call_ended(&mut self) -> Option<String> {
        match &self.trace {
            Some(t) => t.call_ended(),
            None => self.call_key.take(),
        }
    }

    /// Records a finished attempt that did not answer (a failure or a skip).
    fn push_failed(&mut self, attempt: Attempt) {
        if let Some(t) = &self.trace {
            t.push(&attempt);
        }
        self.attempts.push(attempt);
    }

    /// HTTP calls made so far for this request.
    pub(crate) fn calls(&self) -> u32 {
        self.calls
    }

    /// Whether another call is allowed under `max_attempts`.
    pub(crate) fn budget_left(&self) -> bool {
        self.max_calls.is_none_or(|m| self.calls < m)
    }

    /// The prompt's tokens in `model`'s encoding, counted once per encoding per request
    /// (off the async workers when the prompt is large: `tokens::count_off_runtime`).
    async fn prompt_tokens(&mut self, model: &Model, job: Job<'_>) -> PromptCount {
        let encoding = model.encoding();
        if let Some((_, n)) = self.prompt_tokens.iter().find(|(e, _)| *e == encoding) {
            return *n;
        }
        let n = job.count(encoding).await;
        self.prompt_tokens.push((encoding, n));
        n
    }

    /// Whether the prompt (counted with tiktoken) plus the requested output cannot fit
    /// `model`'s declared context window (for embeddings: whether the largest input
    /// cannot, each input being embedded on its own); if so the skip is recorded (kind
    /// `context_window`) and nothing is sent (issue 4: "before sending, not after the
    /// provider refuses").
    /// `max_output` is the request's output cap within its echelon.
    ///
    /// The prompt's byte bounds decide first ([`Encoding::prompt_bounds`]): a prompt
    /// whose upper bound fits is not counted, one whose lower bound does not fit is
    /// refused without tokenizing it (a 7 MB prompt took seconds to count); only one in
    /// between is counted, off the async workers when large.
    ///
    /// [`Encoding::prompt_bounds`]: crate::tokens::Encoding::prompt_bounds
    pub(crate) async fn exceeds_context(
        &mut self,
        model: &Model,
        job: Job<'_>,
        max_output: Option<u32>,
    ) -> bool {
        let Some(window) = model.context_window() else {
            return false;
        };
        let window = u64::from(window);
        let output = max_output.map_or(0, u64::from);
        let counted = self
            .prompt_tokens
            .iter()
            .find(|(e, _)| *e == model.encoding())
            .map(|(_, n)| n.largest);
        let (prompt, at_least) = match counted {
            Some(n) => (n, false),
            None => {
                let bounds = job.largest_bounds(model.encoding());
                if bounds.upper.saturating_add(output) <= window {
                    return false;
                }
                if bounds.lower.saturating_add(output) > window {
                    (bounds.lower, true)
                } else {
                    (self.prompt_tokens(model, job).await.largest, false)
                }
            }
        };
        if prompt.saturating_add(output) <= window {
            return false;
        }
        self.context_refused = true;
        let prompt = if at_least {
            format!("at least {prompt}")
        } else {
            prompt.to_string()
        };
        let message = match job {
            Job::Embed(_) => {
                format!("an input of {prompt} tokens exceeds the context window of {window}")
            }
            Job::Chat(_) | Job::Stream(_) => format!(
                "{prompt} prompt tokens + {output} max_tokens exceed the context window of {window}"
            ),
        };
        self.skip(model, SkipReason::ContextWindow, message);
        true
    }

    /// Records that `model` was passed over without a call.
    pub(crate) fn skip(&mut self, model: &Model, reason: SkipReason, message: String) {
        tracing::info!(
            model = model.id(),
            kind = reason.as_str(),
            "model skipped: {message}"
        );
        crate::telemetry::skipped(model.id(), model.provider(), reason.as_str());
        self.push_failed(Attempt {
            model: model.id().to_owned(),
            provider: model.provider().to_owned(),
            key_id: None,
            status: None,
            outcome: Outcome::Skipped(reason),
            message,
            latency_ms: 0,
        });
    }
}

/// Tries `model` for this request: a first call, then retries as the echelon's and the
/// model's `retry_on` allow (the rule of [`RetryOn`](crate::config::RetryOn): after a
/// failure of kind K, a retry only while the retries after kind-K failures for this
/// request are fewer than `retry_on[K]`; by default a timed-out model is not retried
/// and every other retryable kind is retried `max_retries` times), each call admitted
/// by the breaker, the token buckets, the concurrency limits and the key pool first
/// ([`admit`]), then sent, then reported to every step that admitted it. `pool` names
/// the polling pool instance the model stands for, whose health the outcome also feeds.
///
/// A rate-limited model (a 429, every key cooling down) is waited for here only when
/// its wait ends within its `rate_limit_wait` (the echelon's, else the model's; default
/// 0): then the request sleeps and retries the same model. Otherwise the answer is
/// [`Flow::Later`] with the time it may be tried again, and the caller calls this again
/// with the same `mt` if it comes back to it. A cooldown that turns away a model not
/// yet called is recorded as its skip (`key_cooldown`).
///
/// The same loop serves every [`Job`]: only the call itself ([`call`]) and the prompt
/// tokens asked of the job differ. A model whose wire does not serve embeddings
/// ([`Provider::serves_embeddings`](crate::provider::Provider::serves_embeddings)) is
/// passed over for an embeddings job before admission (recorded as a `not_found`
/// attempt without status; its breaker and buckets see nothing).
pub(crate) async fn try_model(
    tier: &Tier,
    model: &Arc<Model>,
    job: Job<'_>,
    st: &mut RequestState,
    pool: Option<(&Arc<super::pool::PollingPool>, usize)>,
    mt: &mut ModelTry,
) -> Flow {
    // A continuation is not sent to a model whose stream already failed; a prefill
    // model gets the partial answer as an assistant prefill.
    let resume = st.resume.clone();
    let job = match (resume.as_deref(), job) {
        (Some(r), _) if r.exclude.iter().any(|id| id == model.id()) => return Flow::Next,
        (Some(r), Job::Stream(_)) if model.prefill() => Job::Stream(&r.prefill),
        _ => job,
    };
    if matches!(job, Job::Embed(_)) && !model.upstream().serves_embeddings() {
        st.unserved += 1;
        st.push_failed(Attempt {
            model: model.id().to_owned(),
            provider: model.provider().to_owned(),
            key_id: None,
            status: None,
            outcome: Outcome::Failed(ErrorKind::NotFound),
            message: NO_EMBEDDINGS.to_owned(),
            latency_ms: 0,
        });
        return Flow::Next;
    }
    let defaults = &tier.defaults;
    let wait_in_place = defaults.rate_limit_wait(model);
    let rate_limited_retries = defaults.retries_on(model, ErrorKind::RateLimited);
    let req = match job {
        Job::Chat(body) | Job::Stream(body) => Outbound::Chat(ProviderRequest {
            body,
            model: model.upstream_model(),
            temperature: defaults.temperature,
            max_tokens: defaults.max_tokens,
            stream: matches!(job, Job::Stream(_)),
        }),
        Job::Embed(body) => Outbound::Embed(EmbedRequest {
            body,
            model: model.upstream_model(),
        }),
    };
    // The TPM reservation: the prompt plus the output cap the call is sent with (for
    // embeddings, the inputs alone). The prompt is reserved on its byte bound, which
    // needs no tokenizer (tiktoken's tables are 20–40 MB and its count was the largest
    // user-space cost of a small request, issue 16); the answer's usage settles the
    // reservation (the bucket ticket refunds the difference). A prompt whose bound
    // could never fit the bucket is counted exactly, so that the bound alone never
    // refuses a request the real count admits.
    let tokens = match &model.tpm {
        None => 0,
        Some(tpm) => {
            let output = match &req {
                Outbound::Chat(r) => r
                    .effective_max_tokens()
                    .map_or(DEFAULT_OUTPUT_RESERVE, u64::from),
                Outbound::Embed(_) => 0,
            };
            let bound = job.total_upper_bound(model.encoding());
            let prompt = if bound.saturating_add(output) as f64 <= tpm.capacity() {
                bound
            } else {
                st.prompt_tokens(model, job).await.total
            };
            prompt.saturating_add(output)
        }
    };
    if !mt.entered {
        mt.entered = true;
        model.retry_budget.deposit();
    }
    loop {
        let tried = mt.calls > 0;
        // The request's max_attempts is checked before anything is taken.
        if !st.budget_left() {
            return Flow::Next;
        }
        let ask = Ask {
            queue: model.queue_timeout(),
            tokens,
            exclude_keys: &mt.refused_keys,
        };
        let mut admitted = match admit(tier, model, &ask).await {
            Ok(a) => a,
            Err(refusal) => {
                if refusal.reason == SkipReason::KeyCooldown
                    && let Some(until) = refusal.retry_at
                {
                    st.note_rate_limited(model, Some(until));
                    let wait = until.saturating_duration_since(Instant::now());
                    mt.cooldown_waits += 1;
                    // Bounded: other requests may keep re-cooling the keys. Everything
                    // the earlier steps took has gone back with the refusal.
                    if mt.cooldown_waits <= rate_limited_retries + 1 && wait <= MAX_RETRY_WAIT {
                        if !tried {
                            st.skip(model, refusal.reason, refusal.message);
                        }
                        if !wait_in_place.is_zero() && wait <= wait_in_place {
                            tracing::debug!(
                                model = model.id(),
                                wait_ms = wait.as_millis() as u64,
                                "keys cooling down: waiting for them (rate_limit_wait)"
                            );
                            tokio::time::sleep_until(until).await;
                            continue;
                        }
                        return Flow::Later(until);
                    }
                }
                // A model already called for this request is not also listed as skipped
                // when its breaker or its keys turn the retry away.
                let quiet = tried
                    && matches!(
                        refusal.reason,
                        SkipReason::CircuitOpen | SkipReason::KeyCooldown | SkipReason::NoKey
                    );
                if !quiet {
                    st.skip(model, refusal.reason, refusal.message);
                }
                return Flow::Next;
            }
        };
        // A retry after a 429 is paid for once it can be sent (one set aside and never
        // retried costs the budget nothing); what was admitted goes back if it cannot.
        if mt.retry_unpaid {
            if !model.retry_budget.try_withdraw() {
                tracing::warn!(
                    model = model.id(),
                    "retry budget exhausted: moving on without retry"
                );
                return Flow::Next;
            }
            mt.retry_unpaid = false;
        }
        if let Some((p, i)) = pool {
            admitted = admitted.with_pool(PoolTicket::new(p.clone(), i));
        }
        admitted.commit(model);
        mt.calls += 1;
        st.calls += 1;
        st.call_started(model, admitted.key().map(|k| k.id().to_owned()));
        let key_index = admitted.key_index();
        // One span per call, a child of the request's (`telemetry`; none when off): the
        // upstream gets its `traceparent`, and for a stream it lives with the tickets.
        let span = crate::telemetry::attempt_span(
            job.operation(),
            job.route(),
            model.id(),
            model.provider(),
            model.upstream_model(),
            st.calls,
        );
        if let Some(k) = admitted.key() {
            crate::telemetry::record_key(&span, k.id());
        }
        let started = Instant::now();
        let result = match span.context() {
            None => call(model, admitted.key(), &req, defaults.timeout).await,
            Some(cx) => {
                use opentelemetry::context::FutureExt as _;
                call(model, admitted.key(), &req, defaults.timeout)
                    .with_context(cx.clone())
                    .await
            }
        };
        let admitted = admitted.with_span(span);
        let key_id = st.call_ended();
        let latency_ms = started.elapsed().as_millis() as u64;
        let e = match result {
            Ok(answer) => {
                st.attempts.push(Attempt {
                    model: model.id().to_owned(),
                    provider: model.provider().to_owned(),
                    key_id,
                    status: Some(200),
                    outcome: Outcome::Ok,
                    message: String::new(),
                    latency_ms,
                });
                return Flow::Answered(match answer {
                    CallAnswer::Chat(c) => {
                        crate::telemetry::record_usage(
                            admitted.span(),
                            Some(&c.model),
                            c.usage.as_ref().map(|u| u.prompt_tokens),
                            c.usage.as_ref().map(|u| u.completion_tokens),
                        );
                        admitted.report(&Report::ok(c.usage.as_ref().map(|u| u.total_tokens)));
                        Answer::Chat(c)
                    }
                    CallAnswer::Stream { buffered, rest } => {
                        // The tokens are recorded at the stream's end (`stream.rs`).
                        let served = buffered.front().map(|c| c.model.as_str());
                        crate::telemetry::record_usage(admitted.span(), served, None, None);
                        Answer::Stream {
                            buffered,
                            rest,
                            admitted,
                        }
                    }
                    CallAnswer::Embeddings(r) => {
                        crate::telemetry::record_usage(
                            admitted.span(),
                            Some(&r.model),
                            r.usage.as_ref().map(|u| u.prompt_tokens),
                            None,
                        );
                        admitted.report(&Report::ok(r.usage.as_ref().map(|u| u.total_tokens)));
                        Answer::Embeddings(r)
                    }
                });
            }
            Err(e) => e,
        };
        tracing::warn!(
            model = model.id(), tier = %tier.label, key_id = key_id.as_deref().unwrap_or("-"),
            kind = %e.kind, status = e.status, latency_ms, "attempt failed: {}", e.message
        );
        st.push_failed(failed_attempt(model, key_id, &e, latency_ms));
        // The breaker, the TPM bucket, the key and the pool learn the outcome; a 429
        // cools the key down and a 401/403 disables it.
        admitted.report(&failure_report(&e, model.key_cooldown()));
        if e.kind == ErrorKind::RateLimited {
            let until = match key_index {
                Some(_) => keys_cooling_until(model, &mt.refused_keys),
                None => e.retry_after.map(|ra| Instant::now() + ra),
            };
            st.note_rate_limited(model, until);
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
            // The declared window, else the one the provider's message states.
            return match model
                .context_window()
                .or_else(|| stated_context_window(&e.message))
            {
                Some(w) => {
                    st.context_floor = Some(st.context_floor.unwrap_or(0).max(w));
                    Flow::Next
                }
                // Nothing known about this model's window: do not guess.
                None => Flow::Stop(context_error(job, std::mem::take(&mut st.attempts))),
            };
        }
        // retry_on: 0 for a kind that is never retried, and by default for timeouts.
        if mt.retries_after(e.kind) >= defaults.retries_on(model, e.kind) {
            return Flow::Next;
        }
        mt.count_retry(e.kind);
        if e.is_key_fatal() {
            match key_index {
                Some(i) => {
                    mt.refused_keys.push(i);
                    continue;
                }
                None => return Flow::Next,
            }
        }
        let backoff = mt.backoff.get_or_insert_with(|| {
            ExponentialBuilder::new()
                .with_min_delay(model.retry_delay())
                .with_factor(2.0)
                .with_jitter()
                .with_max_delay(MAX_BACKOFF)
                .without_max_times()
                .build()
        });
        if e.kind == ErrorKind::RateLimited {
            mt.retry_unpaid = true;
            if key_index.is_some() {
                // The next pass takes another key at once, or waits for (or sets the
                // model aside until) its first key's cooldown end.
                continue;
            }
            // No key to cool down: the model itself is rate-limited for the Retry-After
            // (else for the backoff): waited out here within `rate_limit_wait`, else set
            // aside until then.
            let wait = match e.retry_after {
                Some(ra) if ra > MAX_RETRY_WAIT => return Flow::Next,
                Some(ra) => ra,
                None => backoff.next().unwrap_or(MAX_BACKOFF),
            };
            if !wait_in_place.is_zero() && wait <= wait_in_place {
                tracing::debug!(
                    model = model.id(),
                    wait_ms = wait.as_millis() as u64,
                    "model rate-limited: waiting to retry it (rate_limit_wait)"
                );
                tokio::time::sleep(wait).await;
                continue;
            }
            return Flow::Later(Instant::now() + wait);
        }
        if !model.retry_budget.try_withdraw() {
            tracing::warn!(
                model = model.id(),
                "retry budget exhausted: moving on without retry"
            );
            return Flow::Next;
        }
        tokio::time::sleep(backoff.next().unwrap_or(MAX_BACKOFF)).await;
    }
}

/// When every key of `model` that this request may still use is cooling down: the
/// earliest end of those cooldowns. `None` when one is usable now (the model is not
/// rate-limited as a whole) or none is left (all disabled or refused).
fn keys_cooling_until(model: &Model, refused: &[usize]) -> Option<Instant> {
    let mut earliest: Option<Instant> = None;
    for (i, key) in model.keys().snapshot().into_iter().enumerate() {
        if refused.contains(&i) {
            continue;
        }
        match key.state {
            KeyState::Ok => return None,
            KeyState::CoolingDown { until } => {
                earliest = Some(earliest.map_or(until, |e| e.min(until)));
            }
            KeyState::Disabled { .. } => {}
        }
    }
    earliest
}

/// The context window a context-length refusal states, in tokens: OpenAI's and vLLM's
/// "maximum context length is 8192 tokens", llama.cpp's "context size 8192 tokens" /
/// "context size (8192 tokens)", or "context window of 8192". `None` when the message
/// states none (then only a declared `context_window` says which models are larger).
fn stated_context_window(message: &str) -> Option<u32> {
    const AFTER: [&str; 4] = [
        "maximum context length is ",
        "context size (",
        "context size ",
        "context window of ",
    ];
    let lower = message.to_ascii_lowercase();
    AFTER.iter().find_map(|marker| {
        let at = lower.find(marker)? + marker.len();
        let digits: String = lower[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',')
            .filter(char::is_ascii_digit)
            .collect();
        digits.parse::<u32>().ok().filter(|w| *w > 0)
    })
}

/// The report of a failed call.
pub(crate) fn failure_report(e: &ProviderError, key_cooldown: Duration) -> Report<'_> {
    Report {
        outcome: Outcome::Failed(e.kind),
        status: e.status,
        retry_after: e.retry_after,
        tokens_used: None,
        message: &e.message,
        key_cooldown,
    }
}

/// What one call sends: a chat completion (streamed or not) or embeddings.
enum Outbound<'a> {
    Chat(ProviderRequest<'a>),
    Embed(EmbedRequest<'a>),
}

/// What one call returns.
enum CallAnswer {
    Chat(ChatCompletion),
    Stream {
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
    },
    Embeddings(EmbeddingResponse),
}

/// One HTTP call: the whole answer, or a stream up to its first content chunk.
async fn call(
    model: &Model,
    key: Option<&ApiKey>,
    req: &Outbound<'_>,
    bound: Option<Duration>,
) -> Result<CallAnswer, ProviderError> {
    let call = async {
        let req = match req {
            Outbound::Embed(r) => {
                return model
                    .upstream()
                    .embed(key, r)
                    .await
                    .map(CallAnswer::Embeddings);
            }
            Outbound::Chat(r) => r,
        };
        if !req.stream {
            return model.upstream().call(key, req).await.map(CallAnswer::Chat);
        }
        let mut rest = model.upstream().stream(key, req).await?;
        let mut buffered = VecDeque::new();
        // Hold chunks back until one carries content: a role-only first chunk (llama.cpp
        // sends `content: null`) must not commit the client to this candidate, and a
        // stream that ends before any (an empty answer) fails over like any failure.
        while let Some(chunk) = rest.next().await {
            let chunk = chunk?;
            let decisive =
                chunk.has_content() || chunk.choices.iter().any(|c| c.finish_reason.is_some());
            buffered.push_back(chunk);
            if decisive {
                return Ok(CallAnswer::Stream { buffered, rest });
            }
        }
        // The stream contract ends an answerless stream with an error; this is its
        // fallback should a wire end one without.
        Err(ProviderError::new(
            ErrorKind::Malformed,
            "stream ended without content (an empty answer)",
        ))
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
        outcome: Outcome::Failed(e.kind),
        message: e.message.clone(),
        latency_ms,
    }
}

pub(crate) fn context_error(job: Job<'_>, attempts: Vec<Attempt>) -> GatewayError {
    let message = match job {
        Job::Embed(_) => "an input does not fit the context window of any candidate model",
        Job::Chat(_) | Job::Stream(_) => {
            "the prompt does not fit the context window of any candidate model"
        }
    };
    GatewayError::new(GatewayErrorKind::BadRequest, message)
        .with_param(job.prompt_param())
        .with_code("context_length_exceeded")
        .with_attempts(attempts)
}

/// The error when no candidate of the route serves the request's kind (embeddings on
/// routes whose every model speaks a wire without them): 400, code
/// `embeddings_not_supported`, the attempts naming each model passed over.
pub(crate) fn unserved_error(route: &str, attempts: Vec<Attempt>) -> GatewayError {
    GatewayError::new(
        GatewayErrorKind::BadRequest,
        format!("route `{route}`: no model of it serves embeddings ({NO_EMBEDDINGS})"),
    )
    .with_param("model")
    .with_code("embeddings_not_supported")
    .with_attempts(attempts)
}

/// The error once every candidate failed or was skipped: 429 when all were rate-limited
/// (by a provider or a local limit; breakers may be open too), 503 when none could be
/// tried at all, 504 when all timed out (`timeout` or `first_token_timeout`), else 502.
///
/// `retry_after` is the shortest time until a rate-limited candidate may be called again
/// ([`RequestState::retry_after`]); the 429 carries it ([`GatewayError::retry_after`]),
/// the other statuses do not.
pub(crate) fn exhausted(
    route: &str,
    attempts: Vec<Attempt>,
    retry_after: Option<Duration>,
) -> GatewayError {
    let all_local_or_rate = attempts
        .iter()
        .all(|a| a.outcome.is_rate_limit() || a.outcome.is_unavailable());
    let kind = if attempts.is_empty() || attempts.iter().all(|a| a.outcome.is_unavailable()) {
        GatewayErrorKind::Unavailable
    } else if all_local_or_rate {
        GatewayErrorKind::RateLimited
    } else if attempts
        .iter()
        .all(|a| a.outcome.error_kind().is_some_and(ErrorKind::is_timeout))
    {
        GatewayErrorKind::Timeout
    } else {
        GatewayErrorKind::UpstreamFailed
    };
    let summary = attempts
        .iter()
        .map(|a| match a.status {
            Some(s) => format!("{} → {} (HTTP {s})", a.model, a.outcome),
            None => format!("{} → {}", a.model, a.outcome),
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
    let e = GatewayError::new(kind, message).with_attempts(attempts);
    match retry_after {
        Some(ra) if kind == GatewayErrorKind::RateLimited => e.with_retry_after(ra),
        _ => e,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn att(kind: &str) -> Attempt {
        Attempt {
            model: "m".into(),
            provider: "p".into(),
            key_id: None,
            status: None,
            outcome: kind.parse().unwrap(),
            message: String::new(),
            latency_ms: 1,
        }
    }

    #[test]
    fn a_refusal_states_its_context_window() {
        for (message, window) in [
            (
                "This model's maximum context length is 8192 tokens. However, your messages resulted in 9631 tokens.",
                Some(8192),
            ),
            (
                "the request exceeds the available context size: 900 prompt tokens, context size 512 tokens",
                Some(512),
            ),
            (
                "request (9631 tokens) exceeds the available context size (4,096 tokens)",
                Some(4096),
            ),
            (
                "prompt is longer than the context window of 200000",
                Some(200_000),
            ),
            (
                "the request exceeds the available context size, try increasing it",
                None,
            ),
            ("maximum context length is 99999999999999 tokens", None),
            ("context length exceeded", None),
        ] {
            assert_eq!(stated_context_window(message), window, "{message}");
        }
    }

    #[test]
    fn exhausted_status_follows_the_attempts() {
        assert_eq!(exhausted("r", vec![], None).status(), 503);
        assert_eq!(
            exhausted("r", vec![att("circuit_open")], None).status(),
            503
        );
        assert_eq!(
            exhausted("r", vec![att("rate_limited"), att("rate_limited")], None).status(),
            429
        );
        assert_eq!(
            exhausted("r", vec![att("token_bucket"), att("circuit_open")], None).status(),
            429
        );
        assert_eq!(exhausted("r", vec![att("timeout")], None).status(), 504);
        assert_eq!(
            exhausted("r", vec![att("first_token_timeout"), att("timeout")], None).status(),
            504,
            "a first-token deadline is a timeout too"
        );
        // The 429 carries the smallest Retry-After; the other statuses carry none.
        let ra = Some(Duration::from_millis(1500));
        let limited = exhausted("r", vec![att("rate_limited"), att("key_cooldown")], ra);
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.retry_after(), ra);
        assert_eq!(exhausted("r", vec![att("timeout")], ra).retry_after(), None);
        let mixed = exhausted("r", vec![att("timeout"), att("connect")], None);
        assert_eq!(mixed.status(), 502);
        assert_eq!(mixed.attempts().len(), 2);
        assert!(mixed.message().contains("m → connect"));
    }
}
