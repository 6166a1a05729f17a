//! A started stream: the client is committed to one model from here on.

use std::collections::VecDeque;
use std::sync::Arc;

use echelon_types::{Attempt, ChatCompletionChunk};

use super::attempt::{Guards, settle_tpm};
use super::model::Model;
use crate::error::{GatewayError, GatewayErrorKind};
use crate::provider::{ChunkStream, ErrorKind};

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
    /// Concurrency slots and key lease, held until the stream is dropped.
    _guards: Guards,
    /// Tokens reserved in the model's `tpm_limit` bucket, settled on the usage chunk.
    tpm_reserved: Option<u64>,
}

impl GatewayStream {
    pub(crate) fn new(
        model: Arc<Model>,
        attempts: Vec<Attempt>,
        buffered: VecDeque<ChatCompletionChunk>,
        rest: ChunkStream,
        guards: Guards,
        tpm_reserved: Option<u64>,
    ) -> Self {
        GatewayStream {
            model,
            attempts,
            buffered,
            rest,
            failed: false,
            _guards: guards,
            tpm_reserved,
        }
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

    fn settle(&mut self, chunk: &ChatCompletionChunk) {
        if let (Some(usage), Some(tpm)) = (&chunk.usage, &self.model.tpm)
            && let Some(reserved) = self.tpm_reserved.take()
        {
            settle_tpm(tpm, reserved, usage.total_tokens);
        }
    }

    /// The next chunk, `None` at a complete end, or the error that cut the stream.
    ///
    /// # Errors
    /// A [`GatewayError`] (504 kind for a timeout, 502 otherwise) whose attempts end with
    /// the streaming attempt, marked with what cut it.
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, GatewayError>> {
        if let Some(chunk) = self.buffered.pop_front() {
            self.settle(&chunk);
            return Some(Ok(chunk));
        }
        if self.failed {
            return None;
        }
        match self.rest.next().await? {
            Ok(chunk) => {
                self.settle(&chunk);
                Some(Ok(chunk))
            }
            Err(e) => {
                self.failed = true;
                tracing::warn!(model = self.model.id(), kind = %e.kind, "stream failed after its first chunk: {}", e.message);
                if let Some(last) = self.attempts.last_mut() {
                    last.error_kind = e.kind.as_str().to_owned();
                    last.message = e.message.clone();
                    last.status = e.status.or(last.status);
                }
                let kind = if e.kind == ErrorKind::Timeout {
                    GatewayErrorKind::Timeout
                } else {
                    GatewayErrorKind::UpstreamFailed
                };
                Some(Err(GatewayError::new(
                    kind,
                    format!(
                        "stream from model `{}` failed after it started: {}: {}",
                        self.model.id(),
                        e.kind,
                        e.message
                    ),
                )
                .with_code("stream_interrupted")
                .with_attempts(self.attempts.clone())))
            }
        }
    }
}
