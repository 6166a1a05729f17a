//! A request whose caller goes away before its answer: when the client disconnects, the
//! server drops the request's future, and without this nothing would record it. The
//! request's [`Pending`] guard, dropped with the future, records it with status 499 and
//! what is known of its attempts: those finished, and the call in flight (kind
//! `cancelled`, its prompt tokens estimated: the provider may bill them), so the spend
//! shows in `echelon usage` (issue 14 item 12; a started stream has its own 499 record
//! in `stream.rs`).
//!
//! The plan runner learns of the [`Trace`] it writes to through a task-local (set by
//! [`Trace::scope`]) rather than a parameter: the trace is bookkeeping for this one
//! purpose, and every attempt pushes through `RequestState`, which picks it up once.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use echelon_types::{
    Attempt, ChatCompletion, ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse, ErrorKind,
    Outcome,
};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use super::gateway::Gateway;
use super::model::Model;
use crate::error::GatewayError;
use crate::usage::{RecordSink, RequestMeta, TokenCount};

/// The status recorded for a request the client abandoned (nginx's "client closed
/// request").
pub(crate) const CLIENT_CLOSED: u16 = 499;

tokio::task_local! {
    /// The trace of the request the current task is running.
    static TRACE: Arc<Trace>;
}

/// What is known of a request's attempts while it runs: those finished, and the call in
/// flight.
#[derive(Debug, Default)]
pub(crate) struct Trace {
    state: Mutex<TraceState>,
}

#[derive(Debug, Default)]
struct TraceState {
    attempts: Vec<Attempt>,
    call: Option<InFlight>,
}

/// A call made and not yet answered.
#[derive(Debug)]
struct InFlight {
    model: Arc<Model>,
    key_id: Option<String>,
    started: Instant,
}

impl Trace {
    /// The trace of the request this task runs, if [`scope`](Self::scope) set one.
    pub(crate) fn current() -> Option<Arc<Trace>> {
        TRACE.try_with(Arc::clone).ok()
    }

    /// Runs `f` with this trace as the current one.
    pub(crate) async fn scope<F: Future>(self: Arc<Self>, f: F) -> F::Output {
        TRACE.scope(self, f).await
    }

    fn lock(&self) -> MutexGuard<'_, TraceState> {
        // A panic while holding the lock leaves plain data behind: still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A finished attempt (or a skip).
    pub(crate) fn push(&self, attempt: &Attempt) {
        self.lock().attempts.push(attempt.clone());
    }

    /// A call to `model` with key `key_id` starts; the key id is held here until
    /// [`call_ended`](Self::call_ended) hands it back (no copy on the request path).
    pub(crate) fn call_started(&self, model: &Arc<Model>, key_id: Option<String>) {
        self.lock().call = Some(InFlight {
            model: model.clone(),
            key_id,
            started: Instant::now(),
        });
    }

    /// The call answered or failed: its key id back.
    pub(crate) fn call_ended(&self) -> Option<String> {
        self.lock().call.take().and_then(|c| c.key_id)
    }

    /// The attempts of an abandoned request, the call in flight last (kind `cancelled`),
    /// and the model it was calling.
    fn abandoned(&self) -> (Vec<Attempt>, Option<Arc<Model>>) {
        let mut state = self.lock();
        let mut attempts = std::mem::take(&mut state.attempts);
        let model = state.call.take().map(|c| {
            attempts.push(Attempt {
                model: c.model.id().to_owned(),
                provider: c.model.provider().to_owned(),
                key_id: c.key_id,
                status: None,
                outcome: Outcome::Failed(ErrorKind::Cancelled),
                message: "the client went away before the answer".to_owned(),
                latency_ms: c.started.elapsed().as_millis() as u64,
            });
            c.model
        });
        (attempts, model)
    }
}

/// A request body a [`Pending`] holds: what its prompt costs on a model, for the record
/// of a call the client abandoned (the provider may bill it).
pub(crate) trait PendingBody: Send + Sync + 'static {
    /// An empty body left behind when the real one is moved out.
    fn placeholder() -> Self;

    /// The prompt's tokens in `model`'s encoding (off the async workers when large).
    fn prompt_tokens(&self, model: &Model) -> impl Future<Output = u64> + Send;
}

impl PendingBody for ChatCompletionRequest {
    fn placeholder() -> Self {
        ChatCompletionRequest::new(String::new(), Vec::new())
    }

    async fn prompt_tokens(&self, model: &Model) -> u64 {
        crate::tokens::prompt_tokens_for(model, &self.messages).await
    }
}

impl PendingBody for EmbeddingRequest {
    fn placeholder() -> Self {
        EmbeddingRequest::new(String::new(), Vec::<String>::new())
    }

    async fn prompt_tokens(&self, model: &Model) -> u64 {
        crate::tokens::input_tokens_async(model.encoding(), &self.input)
            .await
            .0
    }
}

/// A request not yet recorded: dropped before [`done`](Self::done) or
/// [`into_parts`](Self::into_parts), it records itself with status 499 (by a task of the
/// gateway's tracker, which [`Gateway::shutdown`] waits for).
pub(crate) struct Pending<R: PendingBody = ChatCompletionRequest> {
    meta: RequestMeta,
    request: R,
    trace: Arc<Trace>,
    sink: Option<Arc<dyn RecordSink>>,
    tasks: TaskTracker,
    /// The model that answered, while its answer is being accounted for.
    answered_by: Option<Arc<Model>>,
    /// Its attempts, meanwhile (moved here, not copied).
    answered_attempts: Vec<Attempt>,
    done: bool,
}

impl<R: PendingBody> Pending<R> {
    pub(crate) fn new(
        meta: RequestMeta,
        request: R,
        sink: Option<Arc<dyn RecordSink>>,
        tasks: TaskTracker,
    ) -> Self {
        Pending {
            meta,
            request,
            trace: Arc::new(Trace::default()),
            sink,
            tasks,
            answered_by: None,
            answered_attempts: Vec::new(),
            done: false,
        }
    }

    /// Records a failed request (the error's status and attempts).
    pub(crate) async fn record_error(&mut self, e: &GatewayError) {
        self.done = true;
        let record = self
            .meta
            .record(None, e.status(), e.attempts(), TokenCount::default(), None);
        Gateway::emit(self.sink.as_ref(), record).await;
    }

    /// The request being served.
    pub(crate) fn request(&self) -> &R {
        &self.request
    }

    /// The trace its attempts are written to (run the plan in its [`Trace::scope`]).
    pub(crate) fn trace(&self) -> Arc<Trace> {
        self.trace.clone()
    }

    /// The request is recorded by its caller: nothing to do on drop.
    pub(crate) fn done(&mut self) {
        self.done = true;
    }

    /// The meta, leaving empty strings behind (no copy).
    fn take_meta(&mut self) -> RequestMeta {
        RequestMeta {
            request_id: std::mem::take(&mut self.meta.request_id),
            route: std::mem::take(&mut self.meta.route),
            ..self.meta.clone()
        }
    }

    /// The request, leaving an empty one behind (no copy).
    fn take_request(&mut self) -> R {
        std::mem::replace(&mut self.request, R::placeholder())
    }

    /// Records a 200 answered by `model` with `tokens` and hands its attempts back. A
    /// drop while the tokens were counted still recorded the request (499).
    async fn record_ok(
        &mut self,
        model: &Arc<Model>,
        attempts: Vec<Attempt>,
        tokens: TokenCount,
    ) -> Vec<Attempt> {
        let record = self.meta.record(Some(model), 200, &attempts, tokens, None);
        self.done = true;
        Gateway::emit(self.sink.as_ref(), record).await;
        attempts
    }
}

impl Pending<EmbeddingRequest> {
    /// Records an embeddings answer from `model` (status 200; its usage's prompt tokens,
    /// or the inputs counted when the provider sent none; no completion tokens) and
    /// hands its attempts back.
    pub(crate) async fn record_embeddings(
        &mut self,
        model: &Arc<Model>,
        attempts: Vec<Attempt>,
        response: &EmbeddingResponse,
    ) -> Vec<Attempt> {
        self.answered_by = Some(model.clone());
        self.answered_attempts = attempts;
        let tokens = match &response.usage {
            Some(u) => TokenCount {
                prompt: u.prompt_tokens,
                ..TokenCount::default()
            },
            None => TokenCount {
                prompt: self.request.prompt_tokens(model).await,
                estimated: true,
                ..TokenCount::default()
            },
        };
        let attempts = std::mem::take(&mut self.answered_attempts);
        self.record_ok(model, attempts, tokens).await
    }
}

impl Pending<ChatCompletionRequest> {
    /// Records a non-streamed answer from `model` (status 200; its usage, or the prompt
    /// and answer counted when the provider sent none) and hands its attempts back. A
    /// drop while it counts still records the request (499, with these attempts).
    pub(crate) async fn record_answer(
        &mut self,
        model: &Arc<Model>,
        attempts: Vec<Attempt>,
        response: &ChatCompletion,
    ) -> Vec<Attempt> {
        self.answered_by = Some(model.clone());
        self.answered_attempts = attempts;
        let tokens = match &response.usage {
            Some(u) => TokenCount::from_usage(u),
            None => {
                let text = response.first_text().unwrap_or_default();
                TokenCount::estimate(model, &self.request, text).await
            }
        };
        let attempts = std::mem::take(&mut self.answered_attempts);
        self.record_ok(model, attempts, tokens).await
    }

    /// The meta and the request, for a started stream that records itself from now on.
    pub(crate) fn into_parts(mut self) -> (RequestMeta, ChatCompletionRequest) {
        self.done = true;
        (self.take_meta(), self.take_request())
    }
}

impl<R: PendingBody> Drop for Pending<R> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (attempts, model) = match self.answered_by.take() {
            Some(m) => (std::mem::take(&mut self.answered_attempts), Some(m)),
            None => self.trace.abandoned(),
        };
        let meta = self.take_meta();
        let request = self.take_request();
        let sink = self.sink.clone();
        tracing::info!(
            request_id = %meta.request_id, route = %meta.route, attempts = attempts.len(),
            "the client went away before the answer: recorded as {CLIENT_CLOSED}"
        );
        // The prompt of the call in flight reached the provider, which may bill it.
        let record = async move {
            let tokens = match &model {
                Some(m) => TokenCount {
                    prompt: request.prompt_tokens(m).await,
                    estimated: true,
                    ..TokenCount::default()
                },
                None => TokenCount::default(),
            };
            meta.record(model.as_deref(), CLIENT_CLOSED, &attempts, tokens, None)
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(async move {
                let record = record.await;
                Gateway::emit(sink.as_ref(), record).await;
            });
        } else {
            // Outside a runtime (dropped after its runtime ended) only the metrics can
            // still see it; the count then runs here, with no runtime to block.
            let rt = tokio::runtime::Builder::new_current_thread().build();
            if let Ok(rt) = rt {
                crate::usage::metrics::observe(&rt.block_on(record));
            }
        }
    }
}
