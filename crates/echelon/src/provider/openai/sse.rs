//! OpenAI's stream events: server-sent events (the `text/event-stream` format of the
//! WHATWG HTML spec, §9.2, by the `eventsource-stream` crate) whose `data:` is a chunk's
//! JSON, an `{"error": …}` object, or `[DONE]`; any other `data:` is a
//! [`StreamEvent::Malformed`] (skipped or fatal as the model's `malformed_event` says).

use echelon_types::ChatCompletionChunk;
use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};

use crate::config::MalformedEvent;
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
    /// from [`OpenAiProvider`](super::OpenAiProvider) of a model with the default
    /// `malformed_event: skip`; the first-token timeout counts from now.
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
        ChunkStream::from_sse_bytes_with(bytes, timeouts, MalformedEvent::default())
    }

    /// As [`from_sse_bytes`](Self::from_sse_bytes), an event that is not a chunk
    /// handled as `malformed_event` says.
    pub fn from_sse_bytes_with<S>(
        bytes: S,
        timeouts: Timeouts,
        malformed_event: MalformedEvent,
    ) -> ChunkStream
    where
        S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
    {
        ChunkStream::from_events_with(events(bytes), timeouts, malformed_event)
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
        Ok(mut chunk) => match chunk.extra.get("error") {
            Some(err) => Err(error_event(err)),
            None => {
                // Relayed as it came unless the gateway changes it.
                chunk.verbatim = echelon_types::Verbatim::new(data);
                Ok(StreamEvent::Chunk(chunk))
            }
        },
        Err(_) => decode_slowly(data),
    }
}

/// The data of an event that is not a chunk as it stands (a failure path): parsed as
/// any JSON first, so that an error object whose other fields are not a chunk's is
/// still an error event, and the reason says which layer failed.
fn decode_slowly(data: &str) -> Result<StreamEvent, ProviderError> {
    let value: serde_json::Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => return Ok(StreamEvent::Malformed(format!("malformed SSE data: {e}"))),
    };
    if let Some(err) = value.get("error") {
        return Err(error_event(err));
    }
    Ok(serde_json::from_value(value).map_or_else(
        |e| StreamEvent::Malformed(format!("malformed chunk: {e}")),
        StreamEvent::Chunk,
    ))
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
        let StreamEvent::Malformed(why) = decode("{not json").unwrap() else {
            panic!("not a malformed event");
        };
        assert!(why.starts_with("malformed SSE data: "), "{why}");
        let StreamEvent::Malformed(why) = decode(r#"{"choices":"none"}"#).unwrap() else {
            panic!("not a malformed event");
        };
        assert!(why.starts_with("malformed chunk: "), "{why}");
    }

    fn body(events: &[&str]) -> Vec<Result<bytes::Bytes, ProviderError>> {
        events
            .iter()
            .map(|e| Ok(bytes::Bytes::from(format!("data: {e}\n\n"))))
            .collect()
    }

    async fn read_all(stream: &mut ChunkStream) -> (String, Option<ProviderError>) {
        let mut text = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(c) => text.extend(c.choices.iter().filter_map(|c| c.delta.content.clone())),
                Err(e) => return (text, Some(e)),
            }
        }
        (text, None)
    }

    const CHUNK_A: &str = r#"{"choices":[{"delta":{"content":"a"}}]}"#;
    const CHUNK_B: &str = r#"{"choices":[{"delta":{"content":"b"},"finish_reason":"stop"}]}"#;

    #[tokio::test]
    async fn a_malformed_event_is_skipped_or_fatal_as_configured() {
        let t = std::time::Duration::from_secs(5);
        let timeouts = Timeouts {
            connect: t,
            total: t,
            first_token: t,
            chunk_gap: t,
        };
        let events = [
            "{not json",
            CHUNK_A,
            r#"{"choices":"none"}"#,
            CHUNK_B,
            "[DONE]",
        ];
        let mut stream =
            ChunkStream::from_sse_bytes(futures::stream::iter(body(&events)), timeouts);
        let (text, err) = read_all(&mut stream).await;
        assert_eq!((text.as_str(), err.map(|e| e.kind)), ("ab", None));
        assert_eq!(stream.anomalies(), 2);

        let mut stream = ChunkStream::from_sse_bytes_with(
            futures::stream::iter(body(&events[1..])),
            timeouts,
            MalformedEvent::Fail,
        );
        let (text, err) = read_all(&mut stream).await;
        let err = err.unwrap();
        assert_eq!((text.as_str(), err.kind), ("a", ErrorKind::Malformed));
        assert!(
            err.message.starts_with("malformed chunk: "),
            "{}",
            err.message
        );
        assert_eq!(stream.anomalies(), 1);

        // An error event ends the stream in either mode.
        for mode in [MalformedEvent::Skip, MalformedEvent::Fail] {
            let events = [CHUNK_A, r#"{"error":{"message":"overloaded"}}"#, CHUNK_B];
            let mut stream = ChunkStream::from_sse_bytes_with(
                futures::stream::iter(body(&events)),
                timeouts,
                mode,
            );
            let (text, err) = read_all(&mut stream).await;
            assert_eq!(
                (text.as_str(), err.map(|e| e.kind)),
                ("a", Some(ErrorKind::ServerError)),
                "{mode:?}"
            );
            assert_eq!(stream.anomalies(), 0);
        }
    }

    #[tokio::test]
    async fn a_stream_that_never_recovers_fails_after_the_limit() {
        let t = std::time::Duration::from_secs(5);
        let timeouts = Timeouts {
            connect: t,
            total: t,
            first_token: t,
            chunk_gap: t,
        };
        let limit = super::super::super::MAX_MALFORMED_IN_A_ROW as usize;
        // The limit in a row, twice (a chunk between resets the run): delivered.
        let mut events = vec![CHUNK_A];
        events.extend(std::iter::repeat_n("{not json", limit));
        events.push(CHUNK_A);
        events.extend(std::iter::repeat_n("{not json", limit));
        events.extend([CHUNK_B, "[DONE]"]);
        let mut stream =
            ChunkStream::from_sse_bytes(futures::stream::iter(body(&events)), timeouts);
        let (text, err) = read_all(&mut stream).await;
        assert_eq!((text.as_str(), err.map(|e| e.kind)), ("aab", None));
        assert_eq!(stream.anomalies() as usize, 2 * limit);
        // One more in a row: the stream ends as malformed.
        let mut events = vec![CHUNK_A];
        events.extend(std::iter::repeat_n("{not json", limit + 1));
        events.extend([CHUNK_B, "[DONE]"]);
        let mut stream =
            ChunkStream::from_sse_bytes(futures::stream::iter(body(&events)), timeouts);
        let (text, err) = read_all(&mut stream).await;
        let err = err.unwrap();
        assert_eq!((text.as_str(), err.kind), ("a", ErrorKind::Malformed));
        let expected = format!("{} malformed events in a row", limit + 1);
        assert!(err.message.starts_with(&expected), "{}", err.message);
        assert_eq!(stream.anomalies() as usize, limit + 1);
        assert!(stream.next().await.is_none());
    }
}
