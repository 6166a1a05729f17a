//! A started stream: the client is committed to one model from here on.

use std::collections::VecDeque;
use std::sync::Arc;

use echelon_types::{
    Attempt, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Outcome, Role, Usage,
};

use super::admit::Admitted;
use super::attempt::{Answer, Job, Resume, failure_report};
use super::cancel::CLIENT_CLOSED;
use super::execute::run_plan;
use super::gateway::Gateway;
use super::model::Model;
use super::topology::Topology;
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
    /// Set when the route continues a stream that fails after its start
    /// (`stream_failure: continue`).
    continuation: Option<Continuation>,
    /// Malformed events skipped by the streams this one continued.
    anomalies_before: u32,
}

/// The instruction sent after the partial answer to a continuing model without
/// `prefill`.
pub(crate) const CONTINUE_INSTRUCTION: &str = "Your previous answer above was cut off. \
Continue it exactly where it stops, without repeating any of it.";

/// How a stream is continued on another candidate when it fails after its start
/// (`stream_failure: continue`; [`crate::config::StreamFailureConfig`]).
#[derive(Debug)]
pub(crate) struct Continuation {
    /// The topology the request started on: the continuation runs the same route's plan.
    topology: Arc<Topology>,
    /// Continuations still allowed (`max_continuations`).
    left: u32,
    /// The models whose stream failed, in order: none of them continues.
    failed: Vec<String>,
    /// While the continuing model's answer may still be restating what was sent.
    seam: Option<Seam>,
    /// The failed streams' usage (prompt and partial answer, counted locally unless the
    /// provider sent it), added to the continuing model's.
    carried: Usage,
    /// Where the current attempt's text starts in the stream's text.
    attempt_start: usize,
    /// The first stream's completion id, kept on every chunk: one response.
    id: Option<String>,
}

impl Continuation {
    /// Continuation of a stream of a route whose plan allows `max` continuations.
    pub(crate) fn new(topology: Arc<Topology>, max: u32) -> Self {
        Continuation {
            topology,
            left: max,
            failed: Vec::new(),
            seam: None,
            carried: Usage::default(),
            attempt_start: 0,
            id: None,
        }
    }
}

/// Drops a restated beginning from a continuing model's answer: a model asked to go on
/// may answer from the start anyway. Its text is held back while it is still a prefix
/// of what the client already has; once it covers all of that, only what follows is
/// passed on; once it departs from it, everything held is passed on (a true
/// continuation). Leading whitespace is ignored in the comparison.
#[derive(Debug)]
struct Seam {
    sent: String,
    held: String,
}

impl Seam {
    /// Takes the next piece of the continuing answer: `None` while holding, else the
    /// text to pass on (the seam is then resolved).
    fn feed(&mut self, piece: &str) -> Option<String> {
        self.held.push_str(piece);
        let held = self.held.trim_start();
        let sent = self.sent.trim_start();
        if held.is_empty() {
            return None;
        }
        if held.len() >= sent.len() {
            return Some(match held.strip_prefix(sent) {
                Some(rest) => rest.to_owned(),
                None => std::mem::take(&mut self.held),
            });
        }
        if sent.starts_with(held) {
            None
        } else {
            Some(std::mem::take(&mut self.held))
        }
    }
}

/// What [`GatewayStream::continue_stream`] did.
enum Continued {
    /// Another model streams the rest.
    Yes,
    /// Not continued (mode `error`, none left, nothing to continue): the error as is.
    No,
    /// Tried, and no candidate could continue: this error ends the stream.
    Failed(GatewayError),
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
    /// A chunk carried something a continuation cannot carry on (a tool-call delta, a
    /// second choice): such a stream is not continued.
    not_text: bool,
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
            not_text: false,
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
        continuation: Option<Continuation>,
    ) -> Self {
        GatewayStream {
            model,
            attempts,
            buffered,
            rest,
            failed: false,
            admitted: Some(admitted),
            accounting,
            continuation,
            anomalies_before: 0,
        }
    }

    /// Malformed events skipped so far (`malformed_event: skip`), over every stream of
    /// this answer.
    fn anomalies(&self) -> u32 {
        self.anomalies_before.saturating_add(self.rest.anomalies())
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
    /// client, or `None` for one with nothing left to pass on (a usage-only chunk the
    /// client did not ask for; a continuing model's restatement of what was sent).
    fn account(&mut self, mut chunk: ChatCompletionChunk) -> Option<ChatCompletionChunk> {
        if let Some(c) = self.continuation.as_mut() {
            match &c.id {
                None => c.id = Some(chunk.id.clone()),
                Some(id) if !c.failed.is_empty() => chunk.id.clone_from(id),
                Some(_) => {}
            }
        }
        let continued = self
            .continuation
            .as_ref()
            .is_some_and(|c| !c.failed.is_empty());
        // A continuation rewrites its chunks (id, role, the seam's text): serialized
        // from the fields, not relayed as the upstream wrote them.
        let mut changed = continued;
        let mut passed_text = false;
        for c in &mut chunk.choices {
            if continued {
                // The client has had its role chunk.
                c.delta.role = None;
                if let (Some(t), Some(cont)) = (c.delta.content.take(), self.continuation.as_mut())
                {
                    c.delta.content = match cont.seam.as_mut() {
                        None => Some(t),
                        Some(seam) => {
                            let out = seam.feed(&t);
                            if out.is_some() {
                                cont.seam = None;
                            }
                            out
                        }
                    };
                }
            }
            if let Some(t) = &c.delta.content {
                self.accounting.text.push_str(t);
                passed_text |= !t.is_empty();
            }
            self.accounting.finished |= c.finish_reason.is_some();
            self.accounting.not_text |= c.index != 0 || c.delta.extra.contains_key("tool_calls");
        }
        if let Some(usage) = &mut chunk.usage {
            if let Some(c) = &self.continuation {
                add_usage(usage, &c.carried);
                changed = true;
            }
            self.accounting.usage = Some(usage.clone());
            if !self.accounting.client_wants_usage {
                if chunk.choices.is_empty() {
                    return None;
                }
                chunk.usage = None;
                changed = true;
            }
        }
        let finish = chunk.choices.iter().any(|c| c.finish_reason.is_some());
        if finish {
            // The client learns what the answer went through: a continuation, and from
            // what; malformed events skipped.
            let mut echelon = serde_json::Map::new();
            if let Some(c) = self.continuation.as_ref().filter(|_| continued) {
                echelon.insert("continued_from".into(), c.failed.first().cloned().into());
                echelon.insert("continued_on".into(), self.model.id().into());
                echelon.insert("continuations".into(), c.failed.len().into());
                echelon.insert(
                    "attempts".into(),
                    serde_json::to_value(&self.attempts).unwrap_or_default(),
                );
            }
            let anomalies = self.anomalies();
            if anomalies > 0 {
                echelon.insert("stream_anomalies".into(), anomalies.into());
            }
            if !echelon.is_empty() {
                chunk.extra.insert("echelon".to_owned(), echelon.into());
                changed = true;
            }
        }
        if continued {
            // Nothing left of a chunk that only restated what was sent.
            let empty = !passed_text
                && !finish
                && chunk.usage.is_none()
                && chunk
                    .choices
                    .iter()
                    .all(|c| c.delta.extra.is_empty() && c.delta.role.is_none());
            if empty {
                return None;
            }
        }
        if changed {
            chunk.verbatim.clear();
        }
        Some(chunk)
    }

    /// Has the route's next candidate continue the answer after the stream failed with
    /// `e` (`stream_failure: continue`): the request goes again through the route's
    /// plan, with the partial answer — as an assistant prefill to a `prefill` model,
    /// else followed by [`CONTINUE_INSTRUCTION`] — to any candidate whose stream has not
    /// failed. The failed stream's usage (its own, else counted locally) is carried over.
    async fn continue_stream(&mut self, e: &ProviderError) -> Continued {
        let Some(c) = self.continuation.as_mut() else {
            return Continued::No;
        };
        let partial = &self.accounting.text;
        if c.left == 0 || partial.is_empty() || self.accounting.not_text {
            return Continued::No;
        }
        c.left -= 1;
        c.failed.push(self.model.id().to_owned());
        // What the failed attempt used: its own usage if it sent one, else counted.
        let failed_usage = match self.accounting.usage.take() {
            Some(u) => u,
            None => {
                let prompt = crate::tokens::prompt_tokens_for(
                    &self.model,
                    &self.accounting.request.messages,
                )
                .await;
                let completion = crate::tokens::text_tokens_for(
                    &self.model,
                    partial.get(c.attempt_start..).unwrap_or_default(),
                )
                .await;
                Usage {
                    prompt_tokens: prompt,
                    completion_tokens: completion,
                    total_tokens: prompt.saturating_add(completion),
                    extra: Default::default(),
                }
            }
        };
        add_usage(&mut c.carried, &failed_usage);
        c.attempt_start = partial.len();

        let mut prefill = self.accounting.request.clone();
        prefill
            .messages
            .push(ChatMessage::new(Role::Assistant, partial.clone()));
        let mut instructed = prefill.clone();
        instructed
            .messages
            .push(ChatMessage::new(Role::User, CONTINUE_INSTRUCTION));
        let resume = Arc::new(Resume {
            prefill,
            exclude: c.failed.clone(),
        });
        tracing::info!(
            model = self.model.id(),
            kind = %e.kind,
            sent_bytes = partial.len(),
            "stream failed after it started: continuing it on the next candidate"
        );
        let topology = c.topology.clone();
        let result = match topology.resolve(&instructed.model) {
            Ok((_, plan)) => {
                let r = run_plan(plan, Job::Stream(&instructed), None, Some(resume)).await;
                match &r {
                    Ok((_, _, attempts)) => plan.stats.record(attempts, true),
                    Err(err) => plan.stats.record(err.attempts(), false),
                }
                r
            }
            Err(err) => Err(err),
        };
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
                tracing::info!(
                    from = %self.model.id(),
                    to = model.id(),
                    "stream continued"
                );
                self.attempts.extend(attempts);
                self.model = model;
                self.buffered = buffered;
                self.anomalies_before = self.anomalies();
                self.rest = rest;
                self.admitted = Some(admitted);
                if let Some(c) = self.continuation.as_mut() {
                    c.seam = Some(Seam {
                        sent: self.accounting.text.clone(),
                        held: String::new(),
                    });
                }
                Continued::Yes
            }
            Ok((_, _, attempts)) => {
                self.attempts.extend(attempts);
                Continued::Failed(GatewayError::new(
                    GatewayErrorKind::UpstreamFailed,
                    "internal: a non-streamed answer to a stream's continuation",
                ))
            }
            Err(err) => {
                self.attempts.extend(err.attempts().iter().cloned());
                Continued::Failed(err)
            }
        }
    }

    /// What the request's record needs, once: `status` 200 for a complete stream, the
    /// error's for a cut one, 499 for one the client abandoned.
    fn take_record(&mut self, status: u16) -> Option<PendingRecord> {
        let anomalies = self.anomalies();
        let a = &mut self.accounting;
        if a.recorded {
            return None;
        }
        a.recorded = true;
        let no_finish_reason = status == 200 && !a.finished;
        // Counted by the stream since its start, the events before the first chunk too.
        let stream_anomalies = anomalies;
        if stream_anomalies > 0 {
            tracing::warn!(
                model = self.model.id(),
                stream_anomalies,
                "stream had malformed events (skipped, or the last one ended it)"
            );
        }
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
            record.stream_anomalies = stream_anomalies;
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
            stream_anomalies,
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
                    if let (Some(a), Some(u)) = (&self.admitted, &self.accounting.usage) {
                        let (input, output) = (Some(u.prompt_tokens), Some(u.completion_tokens));
                        crate::telemetry::record_usage(a.span(), None, input, output);
                    }
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
                    tracing::warn!(model = self.model.id(), kind = %e.kind, "stream failed after its first chunk: {}", e.message);
                    self.report_failure(&e);
                    if let Some(last) = self.attempts.last_mut() {
                        last.outcome = Outcome::Failed(e.kind);
                        last.message = e.message.clone();
                        last.status = e.status.or(last.status);
                    }
                    let failed_model = self.model.id().to_owned();
                    let continuation = match self.continue_stream(&e).await {
                        Continued::Yes => continue,
                        Continued::No => None,
                        Continued::Failed(err) => Some(err),
                    };
                    self.failed = true;
                    let kind = if e.kind.is_timeout() {
                        GatewayErrorKind::Timeout
                    } else {
                        GatewayErrorKind::UpstreamFailed
                    };
                    let mut message = format!(
                        "stream from model `{failed_model}` failed after it started: {}: {}",
                        e.kind, e.message
                    );
                    if let Some(err) = &continuation {
                        message.push_str(&format!(
                            "; no candidate could continue it: {}",
                            err.message()
                        ));
                    }
                    let err = GatewayError::new(kind, message)
                        .with_code("stream_interrupted")
                        .with_attempts(self.attempts.clone());
                    self.finish(err.status()).await;
                    return Some(Err(err));
                }
            }
        }
    }
}

/// Adds `more` to `usage` (saturating).
fn add_usage(usage: &mut Usage, more: &Usage) {
    usage.prompt_tokens = usage.prompt_tokens.saturating_add(more.prompt_tokens);
    usage.completion_tokens = usage
        .completion_tokens
        .saturating_add(more.completion_tokens);
    usage.total_tokens = usage.total_tokens.saturating_add(more.total_tokens);
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
    stream_anomalies: u32,
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
            cache_write: 0,
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
        record.stream_anomalies = c.stream_anomalies;
        record
    }
}

#[cfg(test)]
mod tests {
    use super::Seam;

    fn seam(sent: &str) -> Seam {
        Seam {
            sent: sent.to_owned(),
            held: String::new(),
        }
    }

    /// Feeds `pieces` and returns what was passed on, piece by piece.
    fn feed(s: &mut Seam, pieces: &[&str]) -> Vec<Option<String>> {
        pieces.iter().map(|p| s.feed(p)).collect()
    }

    #[test]
    fn a_restated_prefix_is_held_then_dropped() {
        let mut s = seam("The sky is");
        assert_eq!(
            feed(&mut s, &["The", " sky", " is"]),
            [None, None, Some(String::new())],
            "held while a prefix, then nothing to pass on from the restatement"
        );
        // Once resolved the caller stops feeding; a piece that covers the sent text and
        // more passes on only the rest.
        let mut s = seam("The sky is");
        assert_eq!(s.feed("The sky is blue"), Some(" blue".to_owned()));
        // Leading whitespace is not compared.
        let mut s = seam("  The sky");
        assert_eq!(
            feed(&mut s, &["\n", "The", " sky"]),
            [None, None, Some(String::new())]
        );
    }

    #[test]
    fn a_true_continuation_is_passed_on_whole() {
        let mut s = seam("The sky is");
        assert_eq!(s.feed(" blue"), Some(" blue".to_owned()));
        // A piece that starts like the sent text, then departs: everything held goes.
        let mut s = seam("The sky is");
        assert_eq!(
            feed(&mut s, &["The", " sea"]),
            [None, Some("The sea".to_owned())]
        );
        // A longer piece that is not the sent text is passed on as it came.
        let mut s = seam("ab");
        assert_eq!(s.feed("xyz"), Some("xyz".to_owned()));
    }
}
