//! A started stream: the client is committed to one model from here on.

use std::collections::VecDeque;
use std::sync::Arc;

use echelon_types::{Attempt, ChatCompletionChunk, ChatCompletionRequest, Outcome, Usage};

use super::admit::Admitted;
use super::attempt::failure_report;
use super::cancel::CLIENT_CLOSED;
use super::gateway::Gateway;
use super::model::Model;
use crate::error::{GatewayError, GatewayErrorKind};
use crate::provider::{ChunkStream, ErrorKind, ProviderError};
use crate::resilience::admission::Report;
use crate::usage::record::RequestRecord;
use crate::usage::{RecordSink, RequestMeta, TokenCount};

/// The chunks of a streamed completion whose first content chunk has arrived.
///
/// [`next`](Self::next) yields the chunks in order, then `None` on a complete end. A
/// failure after the start yields one `Err` (then `None`): the caller must show it as an
/// error event, never as a normal end (DESIGN.md §4 "Streams").
#[derive(Debug)]
pub struct GatewayStream {
    model: Arc<Model>,
    attempts: Vec<Attempt>,
    buffered: VecDeque<ChatCompletionChunk>,
    rest: ChunkStream,
    failed: bool,
    /// The streaming attempt's tickets (breaker permit, bucket tokens, concurrency slots,
    /// key lease, pool instance): held while the stream runs, reported when it ends, so
    /// a stream cut after its first chunk counts against the model's health.
    admitted: Option<Admitted>,
    accounting: StreamAccounting,
}

/// What a stream needs to account for itself when it ends: the request's meta, the
/// usage the provider sent (always asked for) or the text to count when it sent none.
#[derive(Debug)]
pub(crate) struct StreamAccounting {
    meta: RequestMeta,
    sink: Option<Arc<dyn RecordSink>>,
    /// The gateway's background tasks: an abandoned stream's record is written by one,
    /// which the gateway's shutdown waits for.
    tasks: tokio_util::task::TaskTracker,
    client_wants_usage: bool,
    request: ChatCompletionRequest,
    usage: Option<Usage>,
    text: String,
    ttft_ms: u64,
    /// A chunk carried a `finish_reason` (a complete end without one is flagged).
    finished: bool,
    recorded: bool,
}

impl StreamAccounting {
    pub(crate) fn new(
        meta: RequestMeta,
        sink: Option<Arc<dyn RecordSink>>,
        tasks: tokio_util::task::TaskTracker,
        client_wants_usage: bool,
        request: ChatCompletionRequest,
    ) -> Self {
        let ttft_ms = meta.started.elapsed().as_millis() as u64;
        StreamAccounting {
            meta,
            sink,
            tasks,
            client_wants_usage,
            request,
            usage: None,
            text: String::new(),
            ttft_ms,
            finished: false,
            recorded: false,
        }
    }
}

impl GatewayStream {
    pub(crate) fn new(
        model: Arc<Model>,
        attempts: Vec<Attempt>,
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
        admitted: Admitted,
        accounting: StreamAccounting,
    ) -> Self {
        GatewayStream {
            model,
            attempts,
            buffered,
            rest,
            failed: false,
            admitted: Some(admitted),
            accounting,
        }
    }

    /// Hands the streaming attempt's outcome to its tickets, once.
    fn report(&mut self, report: &Report<'_>) {
        if let Some(admitted) = self.admitted.take() {
            admitted.report(report);
        }
    }

    /// [`report`](Self::report) of the failure that cut the stream.
    fn report_failure(&mut self, e: &ProviderError) {
        let cooldown = self.model.key_cooldown();
        self.report(&failure_report(e, cooldown));
    }

    /// The model id that is answering.
    pub fn model(&self) -> &str {
        self.model.id()
    }

    /// Its provider id.
    pub fn provider(&self) -> &str {
        self.model.provider()
    }

    /// The attempts so far; the last one is the streaming one.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// Takes what accounting needs from a chunk; returns the chunk to hand to the
    /// client, or `None` for a usage-only chunk the client did not ask for.
    fn account(&mut self, mut chunk: ChatCompletionChunk) -> Option<ChatCompletionChunk> {
        for c in &chunk.choices {
            if let Some(t) = &c.delta.content {
                self.accounting.text.push_str(t);
            }
            self.accounting.finished |= c.finish_reason.is_some();
        }
        if let Some(usage) = &chunk.usage {
            self.accounting.usage = Some(usage.clone());
            if !self.accounting.client_wants_usage {
                if chunk.choices.is_empty() {
                    return None;
                }
                chunk.usage = None;
            }
        }
        Some(chunk)
    }

    /// What the request's record needs, once: `status` 200 for a complete stream, the
    /// error's for a cut one, 499 for one the client abandoned.
    fn take_record(&mut self, status: u16) -> Option<PendingRecord> {
        let a = &mut self.accounting;
        if a.recorded {
            return None;
        }
        a.recorded = true;
        let no_finish_reason = status == 200 && !a.finished;
        // The usual case, the provider's usage: the record is complete now.
        if let Some(u) = &a.usage {
            let mut record = a.meta.record(
                Some(&self.model),
                status,
                &self.attempts,
                TokenCount::from_usage(u),
                Some(a.ttft_ms),
            );
            record.no_finish_reason = no_finish_reason;
            return Some(PendingRecord::Ready(record));
        }
        Some(PendingRecord::Count(Box::new(ToCount {
            meta: a.meta.clone(),
            model: self.model.clone(),
            status,
            attempts: self.attempts.clone(),
            messages: std::mem::take(&mut a.request.messages),
            text: std::mem::take(&mut a.text),
            ttft_ms: a.ttft_ms,
            no_finish_reason,
        })))
    }

    async fn finish(&mut self, status: u16) {
        if let Some(record) = self.take_record(status) {
            let record = record.build().await;
            Gateway::emit(self.accounting.sink.as_ref(), record).await;
        }
    }

    /// The next chunk, `None` at a complete end, or the error that cut the stream.
    ///
    /// # Errors
    /// A [`GatewayError`] (504 kind for a timeout, 502 otherwise) whose attempts end with
    /// the streaming attempt, marked with what cut it.
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, GatewayError>> {
        loop {
            if let Some(chunk) = self.buffered.pop_front() {
                match self.account(chunk) {
                    Some(c) => return Some(Ok(c)),
                    None => continue,
                }
            }
            if self.failed {
                return None;
            }
            match self.rest.next().await {
                None => {
                    let used = self.accounting.usage.as_ref().map(|u| u.total_tokens);
                    self.report(&Report::ok(used));
                    if !self.accounting.finished {
                        // Delivered (the provider said `[DONE]`), but flagged: the answer
                        // may be incomplete (DESIGN.md §4 "Streams").
                        tracing::warn!(
                            model = self.model.id(),
                            "stream ended with [DONE] but no finish_reason"
                        );
                    }
                    self.finish(200).await;
                    return None;
                }
                Some(Ok(chunk)) => match self.account(chunk) {
                    Some(c) => return Some(Ok(c)),
                    None => continue,
                },
                Some(Err(e)) => {
                    self.failed = true;
                    tracing::warn!(model = self.model.id(), kind = %e.kind, "stream failed after its first chunk: {}", e.message);
                    self.report_failure(&e);
                    if let Some(last) = self.attempts.last_mut() {
                        last.outcome = Outcome::Failed(e.kind);
                        last.message = e.message.clone();
                        last.status = e.status.or(last.status);
                    }
                    let kind = if e.kind.is_timeout() {
                        GatewayErrorKind::Timeout
                    } else {
                        GatewayErrorKind::UpstreamFailed
                    };
                    let err = GatewayError::new(
                        kind,
                        format!(
                            "stream from model `{}` failed after it started: {}: {}",
                            self.model.id(),
                            e.kind,
                            e.message
                        ),
                    )
                    .with_code("stream_interrupted")
                    .with_attempts(self.attempts.clone());
                    self.finish(err.status()).await;
                    return Some(Err(err));
                }
            }
        }
    }
}

impl Drop for GatewayStream {
    /// A stream dropped before its end (the client went away) is still accounted for,
    /// with status 499, by a task of its own.
    fn drop(&mut self) {
        // The client went away: nothing is learnt about the model's health.
        self.report(&Report {
            outcome: Outcome::Failed(ErrorKind::Cancelled),
            status: None,
            ..Report::ok(None)
        });
        let Some(record) = self.take_record(CLIENT_CLOSED) else {
            return;
        };
        let sink = self.accounting.sink.clone();
        // Outside a runtime (a stream dropped after its runtime ended) only the metrics
        // can still see it; the count then runs here, with no runtime to block.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.accounting.tasks.spawn(async move {
                let record = record.build().await;
                Gateway::emit(sink.as_ref(), record).await;
            });
        } else if let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() {
            crate::usage::metrics::observe(&rt.block_on(record.build()));
        }
    }
}

/// A finished stream's record: complete, or waiting for its tokens to be counted (the
/// provider sent no usage), which is done off the async workers ([`PendingRecord::build`]).
enum PendingRecord {
    Ready(RequestRecord),
    Count(Box<ToCount>),
}

/// What a record without the provider's usage is built from.
struct ToCount {
    meta: RequestMeta,
    model: Arc<Model>,
    status: u16,
    attempts: Vec<Attempt>,
    messages: Vec<echelon_types::ChatMessage>,
    text: String,
    ttft_ms: u64,
    no_finish_reason: bool,
}

impl PendingRecord {
    async fn build(self) -> RequestRecord {
        let c = match self {
            PendingRecord::Ready(record) => return record,
            PendingRecord::Count(c) => c,
        };
        let tokens = TokenCount {
            prompt: crate::tokens::prompt_tokens_for(&c.model, &c.messages).await,
            completion: crate::tokens::text_tokens_for(&c.model, &c.text).await,
            cached: 0,
            estimated: true,
        };
        let mut record = c.meta.record(
            Some(&c.model),
            c.status,
            &c.attempts,
            tokens,
            Some(c.ttft_ms),
        );
        record.no_finish_reason = c.no_finish_reason;
        record
    }
}
