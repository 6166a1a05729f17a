//! OpenAI's stream events: server-sent events (the `text/event-stream` format of the
//! WHATWG HTML spec, §9.2, by the `eventsource-stream` crate) whose `data:` is a chunk's
//! JSON, an `{"error": …}` object, or `[DONE]`.

use echelon_types::ChatCompletionChunk;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};

use crate::provider::error::{ErrorKind, ProviderError};
use crate::provider::{ChunkStream, StreamEvent, Timeouts};

/// The decoded events of an SSE body that arrives as `bytes` (pieces split anywhere;
/// transport errors already classified).
pub(super) fn events<S>(bytes: S) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
{
    bytes.eventsource().map(|event| match event {
        Ok(e) => decode(&e.data),
        Err(EventStreamError::Transport(e)) => Err(e),
        Err(e) => Err(ProviderError::new(
            ErrorKind::Malformed,
            format!("malformed SSE: {e}"),
        )),
    })
}

impl ChunkStream {
    /// The chunks of an OpenAI SSE body that did not come over HTTP (a recorded
    /// transcript, a test or fuzz input), decoded and checked exactly as a live stream
    /// from [`OpenAiProvider`](super::OpenAiProvider); the first-token timeout counts
    /// from now.
    ///
    /// `bytes` yields the body in pieces split anywhere (inside a line, a UTF-8
    /// character or a `\r\n`); an `Err` piece ends the stream with that error.
    /// [`next`](Self::next) needs a Tokio runtime with the time driver enabled.
    ///
    /// ```
    /// use echelon::provider::{ChunkStream, Timeouts};
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let body = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    /// let pieces = body.as_bytes().chunks(7).map(|p| Ok(bytes::Bytes::copy_from_slice(p)));
    /// let t = Duration::from_secs(5);
    /// let timeouts = Timeouts { connect: t, total: t, first_token: t, chunk_gap: t };
    /// let mut chunks = ChunkStream::from_sse_bytes(futures::stream::iter(pieces.collect::<Vec<_>>()), timeouts);
    /// assert_eq!(chunks.next().await.unwrap().unwrap().choices[0].delta.content.as_deref(), Some("Hi"));
    /// assert!(chunks.next().await.is_none());
    /// # });
    /// ```
    pub fn from_sse_bytes<S>(bytes: S, timeouts: Timeouts) -> ChunkStream
    where
        S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
    {
        ChunkStream::from_events(events(bytes), timeouts)
    }
}

/// One event's `data`, parsed once on the way every normal chunk takes.
fn decode(data: &str) -> Result<StreamEvent, ProviderError> {
    let trimmed = data.trim();
    if trimmed == "[DONE]" {
        return Ok(StreamEvent::Done);
    }
    if trimmed.is_empty() {
        return Ok(StreamEvent::Keepalive);
    }
    match serde_json::from_str::<ChatCompletionChunk>(data) {
        // An error object has none of a chunk's required fields: it parses as an
        // empty chunk with `error` among the unknown fields.
        Ok(chunk) => match chunk.extra.get("error") {
            Some(err) => Err(error_event(err)),
            None => Ok(StreamEvent::Chunk(chunk)),
        },
        Err(_) => decode_slowly(data),
    }
}

/// The data of an event that is not a chunk as it stands (a failure path): parsed as
/// any JSON first, so that an error object whose other fields are not a chunk's is
/// still an error event, and the message says which layer failed.
fn decode_slowly(data: &str) -> Result<StreamEvent, ProviderError> {
    let value: serde_json::Value = serde_json::from_str(data).map_err(|e| {
        ProviderError::new(ErrorKind::Malformed, format!("malformed SSE data: {e}"))
    })?;
    if let Some(err) = value.get("error") {
        return Err(error_event(err));
    }
    serde_json::from_value(value)
        .map(StreamEvent::Chunk)
        .map_err(|e| ProviderError::new(ErrorKind::Malformed, format!("malformed chunk: {e}")))
}

/// An `{"error": …}` event from the provider.
fn error_event(err: &serde_json::Value) -> ProviderError {
    // Bounded here (an event may be as long as the whole answer), cut to the message
    // limit once scrubbed (`ProviderError::redacted`).
    let message = super::super::error::upstream_text(
        err.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("error event in stream"),
    );
    ProviderError::new(ErrorKind::ServerError, message)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunks_done_keepalives_and_error_events() {
        let chunk = decode(r#"{"id":"c","choices":[{"delta":{"content":"Hi"}}]}"#).unwrap();
        let StreamEvent::Chunk(chunk) = chunk else {
            panic!("{chunk:?}");
        };
        assert_eq!(chunk.choices[0].delta.content.as_deref(), Some("Hi"));
        assert_eq!(decode(" [DONE] ").unwrap(), StreamEvent::Done);
        assert_eq!(decode("  ").unwrap(), StreamEvent::Keepalive);

        let e = decode(r#"{"error":{"message":"overloaded"}}"#).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::ServerError, "overloaded")
        );
        // An error object with fields a chunk cannot hold is still an error event.
        let e = decode(r#"{"error":"x","created":"yesterday"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ServerError);
        assert_eq!(e.message, "error event in stream");
    }

    #[test]
    fn names_the_layer_that_failed() {
        let e = decode("{not json").unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
        assert!(
            e.message.starts_with("malformed SSE data: "),
            "{}",
            e.message
        );
        let e = decode(r#"{"choices":"none"}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
        assert!(e.message.starts_with("malformed chunk: "), "{}", e.message);
    }
}
