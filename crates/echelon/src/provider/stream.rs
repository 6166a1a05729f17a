//! The stream contract every wire's streams keep: chunks within the first-token and
//! chunk-gap timeouts, a complete end (`[DONE]` or a finish reason) or an error, an
//! answer before the end (content, a tool call or a finish reason: a stream of only a
//! role chunk is an empty answer), and nothing after the end (DESIGN.md §4 "Streams").
//! An event that is not a chunk is skipped and counted, or ends the stream, as the
//! model's `malformed_event` says ([`MalformedEvent`]).

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use echelon_types::ChatCompletionChunk;
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::Timeouts;
use super::error::{ErrorKind, ProviderError};
use crate::config::MalformedEvent;

/// Malformed events in a row (no chunk between them) a stream survives with
/// `malformed_event: skip`: the next one (the 9th) ends it as [`ErrorKind::Malformed`].
/// An upstream that recovers sends a chunk long before; one that sends nothing else
/// never will, and would otherwise hold the client until the chunk-gap or total
/// timeout while every event it sends is thrown away (issue 19: "a stream that never
/// recovers is a failure").
pub const MAX_MALFORMED_IN_A_ROW: u32 = 8;

/// One event of a wire's stream, already decoded from the wire's format.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// A chunk of the answer.
    Chunk(ChatCompletionChunk),
    /// An event without a chunk (an empty `data:`): it proves the stream alive (it
    /// resets the chunk-gap timeout) and is not passed on.
    Keepalive,
    /// The provider's end of stream (OpenAI: `data: [DONE]`).
    Done,
    /// An event whose data is not a chunk (not JSON, or JSON that is not a chunk), with
    /// the reason (already scrubbed of keys by the wire). With `malformed_event: skip`
    /// it is counted and skipped: it does not prove the stream alive (the chunk-gap
    /// timeout goes on running) and it is not an answer (the first-token timeout goes
    /// on too). With `fail`, or after [`MAX_MALFORMED_IN_A_ROW`] in a row, it ends the
    /// stream as [`ErrorKind::Malformed`]. An error event from the provider is not one
    /// of these: the wire yields it as an `Err`, which always ends the stream.
    Malformed(String),
}

type Chunks = Pin<Box<dyn Stream<Item = Result<ChatCompletionChunk, ProviderError>> + Send>>;

/// The chunks of a streamed completion, read one at a time (with [`next`](Self::next)
/// or as a [`futures::Stream`]).
///
/// Yields the chunks in order, then `None` on a complete end; a failure yields one
/// `Err`, then `None`. Every chunk is decoded once, by the wire.
pub struct ChunkStream {
    chunks: Chunks,
    /// Malformed events seen (skipped or not), shared with the reader so that it can
    /// be read after the stream ended.
    anomalies: Arc<AtomicU32>,
}

impl fmt::Debug for ChunkStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkStream").finish_non_exhaustive()
    }
}

impl ChunkStream {
    /// The chunks of a wire's decoded `events`, checked against the stream contract with
    /// `timeouts` (the first-token timeout counts from now).
    ///
    /// `events` ends (`None`) when the body ends; an `Err` event ends the stream with
    /// that error; a [`StreamEvent::Malformed`] is skipped (the default
    /// [`MalformedEvent::Skip`]). [`next`](Self::next) needs a Tokio runtime with the
    /// time driver.
    pub fn from_events<S>(events: S, timeouts: Timeouts) -> ChunkStream
    where
        S: Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static,
    {
        ChunkStream::from_events_with(events, timeouts, MalformedEvent::default())
    }

    /// As [`from_events`](Self::from_events), a [`StreamEvent::Malformed`] handled as
    /// `malformed_event` says.
    pub fn from_events_with<S>(
        events: S,
        timeouts: Timeouts,
        malformed_event: MalformedEvent,
    ) -> ChunkStream
    where
        S: Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static,
    {
        ChunkStream::with_deadline(
            events,
            timeouts,
            Instant::now() + timeouts.first_token,
            malformed_event,
        )
    }

    /// As [`from_events_with`](Self::from_events_with), the first-token timeout ending
    /// at `first_token_deadline` (it started with the request).
    pub(crate) fn with_deadline<S>(
        events: S,
        timeouts: Timeouts,
        first_token_deadline: Instant,
        malformed_event: MalformedEvent,
    ) -> ChunkStream
    where
        S: Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static,
    {
        let anomalies = Arc::new(AtomicU32::new(0));
        let reader = Reader {
            events: Box::pin(events),
            first_token_deadline: Some(first_token_deadline),
            timeouts,
            finished: false,
            done: false,
            malformed_event,
            anomalies: anomalies.clone(),
            malformed_in_a_row: 0,
        };
        let chunks = futures::stream::unfold(reader, |mut reader| async move {
            let item = reader.next().await?;
            Some((item, reader))
        });
        ChunkStream {
            // Fused: polled again after its end, it stays ended.
            chunks: Box::pin(chunks.fuse()),
            anomalies,
        }
    }

    /// Malformed events the stream has seen so far ([`StreamEvent::Malformed`]: the ones
    /// skipped, and the one that ended it, if one did); readable after the end.
    pub fn anomalies(&self) -> u32 {
        self.anomalies.load(Ordering::Relaxed)
    }

    /// The next chunk; `None` after the provider's end of stream (or a clean end after a
    /// finish reason), and after an error.
    ///
    /// # Errors
    /// `FirstTokenTimeout` when the first content chunk does not come within the
    /// first-token timeout; `Timeout` when a gap exceeds the chunk-gap timeout; `StreamCut` when the stream ends
    /// or drops before it is complete; `Malformed` when it ends (`[DONE]`) without any
    /// content, tool call or finish reason (an empty answer), and for a malformed event
    /// with `malformed_event: fail` or the one past [`MAX_MALFORMED_IN_A_ROW`] in a
    /// row; the wire's errors (`ServerError` for an error event from the provider).
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        self.chunks.next().await
    }
}

impl Stream for ChunkStream {
    type Item = Result<ChatCompletionChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.chunks.as_mut().poll_next(cx)
    }
}

/// The error of a first-token timeout of `limit`: kind
/// [`FirstTokenTimeout`](ErrorKind::FirstTokenTimeout), whether the deadline fired
/// before the response head (the wire's send) or before the first content chunk
/// ([`Reader`]).
pub(crate) fn first_token_timeout(limit: std::time::Duration) -> ProviderError {
    ProviderError::new(
        ErrorKind::FirstTokenTimeout,
        format!("no first token within {} ms", limit.as_millis()),
    )
}

/// The state of a [`ChunkStream`].
struct Reader {
    events: Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>,
    /// Until a chunk carries content or a finish reason.
    first_token_deadline: Option<Instant>,
    timeouts: Timeouts,
    /// A finish reason was seen: the body may end without `[DONE]`.
    finished: bool,
    done: bool,
    /// What a [`StreamEvent::Malformed`] does.
    malformed_event: MalformedEvent,
    /// Malformed events seen ([`ChunkStream::anomalies`]).
    anomalies: Arc<AtomicU32>,
    /// Malformed events since the last chunk.
    malformed_in_a_row: u32,
}

impl Reader {
    async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        if self.done {
            return None;
        }
        let result = self.read().await;
        match &result {
            None | Some(Err(_)) => self.done = true,
            Some(Ok(_)) => {}
        }
        result
    }

    async fn read(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        // Reset only by what proves the stream alive (a keepalive; a chunk returns),
        // never by a malformed event.
        let mut gap_deadline = Instant::now() + self.timeouts.chunk_gap;
        loop {
            let (deadline, first) = match self.first_token_deadline {
                Some(ft) if ft < gap_deadline => (ft, true),
                _ => (gap_deadline, false),
            };
            let event = match tokio::time::timeout_at(deadline, self.events.next()).await {
                Err(_) if first => {
                    return Some(Err(first_token_timeout(self.timeouts.first_token)));
                }
                Err(_) => {
                    return Some(Err(ProviderError::new(
                        ErrorKind::Timeout,
                        format!("no chunk within {} ms", self.timeouts.chunk_gap.as_millis()),
                    )));
                }
                Ok(e) => e,
            };
            match event {
                None if self.finished => return None,
                None => {
                    return Some(Err(ProviderError::new(
                        ErrorKind::StreamCut,
                        "stream ended before [DONE]",
                    )));
                }
                Some(Err(e)) => return Some(Err(e)),
                // Still waiting for the first token: nothing was answered.
                Some(Ok(StreamEvent::Done)) if self.first_token_deadline.is_some() => {
                    return Some(Err(ProviderError::new(
                        ErrorKind::Malformed,
                        "stream ended without content, tool call or finish reason (an empty answer)",
                    )));
                }
                Some(Ok(StreamEvent::Done)) => return None,
                Some(Ok(StreamEvent::Keepalive)) => {
                    gap_deadline = Instant::now() + self.timeouts.chunk_gap;
                }
                Some(Ok(StreamEvent::Malformed(why))) => {
                    self.anomalies.fetch_add(1, Ordering::Relaxed);
                    self.malformed_in_a_row = self.malformed_in_a_row.saturating_add(1);
                    match self.malformed_event {
                        MalformedEvent::Fail => {
                            return Some(Err(ProviderError::new(ErrorKind::Malformed, why)));
                        }
                        MalformedEvent::Skip
                            if self.malformed_in_a_row > MAX_MALFORMED_IN_A_ROW =>
                        {
                            return Some(Err(ProviderError::new(
                                ErrorKind::Malformed,
                                format!(
                                    "{} malformed events in a row (more than {MAX_MALFORMED_IN_A_ROW}); the last: {why}",
                                    self.malformed_in_a_row
                                ),
                            )));
                        }
                        MalformedEvent::Skip => {
                            tracing::debug!("malformed stream event skipped: {why}");
                        }
                    }
                }
                Some(Ok(StreamEvent::Chunk(chunk))) => {
                    self.malformed_in_a_row = 0;
                    let finish = chunk.choices.iter().any(|c| c.finish_reason.is_some());
                    if finish || chunk.has_content() {
                        self.first_token_deadline = None;
                    }
                    if finish {
                        self.finished = true;
                    }
                    return Some(Ok(chunk));
                }
            }
        }
    }
}

/// The events of an SSE body arriving as `bytes` (pieces split anywhere), each event's
/// `data` turned into zero or more [`StreamEvent`]s by `decode` (which keeps whatever
/// state the wire needs between events); a transport error passes through, and a
/// frame the SSE parser refuses is [`ErrorKind::Malformed`].
pub(super) fn decoded_sse<S, D>(
    bytes: S,
    mut decode: D,
) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
    D: FnMut(&str) -> Vec<Result<StreamEvent, ProviderError>> + Send,
{
    use eventsource_stream::{EventStreamError, Eventsource};
    bytes.eventsource().flat_map(move |event| {
        futures::stream::iter(match event {
            Ok(e) => decode(&e.data),
            Err(EventStreamError::Transport(e)) => vec![Err(e)],
            Err(e) => vec![Err(ProviderError::new(
                ErrorKind::Malformed,
                format!("malformed SSE: {e}"),
            ))],
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: Duration = Duration::from_secs(5);
    const TIMEOUTS: Timeouts = Timeouts {
        connect: T,
        total: T,
        first_token: T,
        chunk_gap: T,
    };

    fn chunk(content: &str, finish: Option<&str>) -> StreamEvent {
        let json = serde_json::json!({
            "choices": [{"delta": {"content": content}, "finish_reason": finish}]
        });
        StreamEvent::Chunk(serde_json::from_value(json).unwrap())
    }

    #[tokio::test]
    async fn is_a_futures_stream_that_stays_ended_after_an_error() {
        let events = futures::stream::iter(vec![
            Ok(StreamEvent::Keepalive),
            Ok(chunk("a", None)),
            Err(ProviderError::new(ErrorKind::Malformed, "bad")),
            Ok(chunk("b", None)),
        ]);
        let stream = ChunkStream::from_events(events, TIMEOUTS);
        let items: Vec<_> = StreamExt::collect(stream).await;
        assert_eq!(items.len(), 2);
        assert!(items[0].is_ok());
        assert_eq!(items[1].as_ref().unwrap_err().kind, ErrorKind::Malformed);
    }

    #[tokio::test]
    async fn an_end_without_done_is_complete_only_after_a_finish_reason() {
        let events = futures::stream::iter(vec![Ok(chunk("a", Some("stop")))]);
        let mut stream = ChunkStream::from_events(events, TIMEOUTS);
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
        assert!(stream.next().await.is_none());

        let events = futures::stream::iter(vec![Ok(chunk("a", None))]);
        let mut stream = ChunkStream::from_events(events, TIMEOUTS);
        assert!(stream.next().await.unwrap().is_ok());
        let cut = stream.next().await.unwrap().unwrap_err();
        assert_eq!(cut.kind, ErrorKind::StreamCut);
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_ends_without_an_answer_is_malformed() {
        let role: StreamEvent = StreamEvent::Chunk(
            serde_json::from_value(
                serde_json::json!({"choices": [{"delta": {"role": "assistant", "content": null}}]}),
            )
            .unwrap(),
        );
        for events in [
            vec![Ok(role.clone()), Ok(StreamEvent::Done)],
            vec![Ok(StreamEvent::Done)],
            vec![Ok(role.clone()), Ok(chunk("", None)), Ok(StreamEvent::Done)],
        ] {
            let n = events.len();
            let items: Vec<_> = StreamExt::collect(ChunkStream::from_events(
                futures::stream::iter(events),
                TIMEOUTS,
            ))
            .await;
            assert_eq!(items.len(), n, "the chunks, then one error");
            let e = items.last().unwrap().as_ref().unwrap_err();
            assert_eq!(e.kind, ErrorKind::Malformed, "{e}");
        }
        // A finish reason alone is an answer (e.g. `length` with nothing generated).
        let events = vec![
            Ok(role),
            Ok(chunk("", Some("length"))),
            Ok(StreamEvent::Done),
        ];
        let items: Vec<_> = StreamExt::collect(ChunkStream::from_events(
            futures::stream::iter(events),
            TIMEOUTS,
        ))
        .await;
        assert!(items.iter().all(Result::is_ok));
        assert_eq!(items.len(), 2);
    }

    /// `first`, then `then` every 60 ms, `n` times, then `last` (paused time).
    fn paced(
        first: StreamEvent,
        then: StreamEvent,
        n: usize,
        last: StreamEvent,
    ) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send {
        let mut events = vec![(Duration::ZERO, first)];
        events.extend(std::iter::repeat_n((Duration::from_millis(60), then), n));
        events.push((Duration::from_millis(60), last));
        futures::stream::iter(events).then(|(wait, e)| async move {
            tokio::time::sleep(wait).await;
            Ok(e)
        })
    }

    #[tokio::test(start_paused = true)]
    async fn malformed_events_do_not_keep_a_stream_alive_but_keepalives_do() {
        let t = Timeouts {
            chunk_gap: Duration::from_millis(100),
            ..TIMEOUTS
        };
        let bad = || StreamEvent::Malformed("malformed SSE data: x".into());
        // Skipped events 60 ms apart: the gap since the last chunk passes 100 ms.
        let events = paced(chunk("a", None), bad(), 5, chunk("b", Some("stop")));
        let mut stream = ChunkStream::from_events(events, t);
        assert!(stream.next().await.unwrap().is_ok());
        let e = stream.next().await.unwrap().unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::Timeout, "no chunk within 100 ms")
        );
        assert_eq!(stream.anomalies(), 1);
        // Keepalives 60 ms apart keep it alive.
        let events = paced(
            chunk("a", None),
            StreamEvent::Keepalive,
            5,
            chunk("b", Some("stop")),
        );
        let items: Vec<_> = StreamExt::collect(ChunkStream::from_events(events, t)).await;
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(Result::is_ok));
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_provider_times_out_at_the_first_token() {
        let t = Timeouts {
            first_token: Duration::from_millis(100),
            ..TIMEOUTS
        };
        let mut stream = ChunkStream::from_events(futures::stream::pending(), t);
        let e = stream.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind, ErrorKind::FirstTokenTimeout);
        assert_eq!(e.message, "no first token within 100 ms");
    }
}
