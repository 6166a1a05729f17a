//! Server-sent events (the `text/event-stream` format of the WHATWG HTML spec, §9.2) over
//! a byte stream, by the `eventsource-stream` crate.

use std::pin::Pin;

use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};

use super::error::{ErrorKind, ProviderError};

/// A response body as it arrives, in pieces split anywhere; transport errors already
/// classified.
pub(crate) type ByteStream =
    Pin<Box<dyn Stream<Item = Result<bytes::Bytes, ProviderError>> + Send>>;

/// One event of an OpenAI stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SseEvent {
    /// A `data:` payload (JSON, not yet parsed).
    Data(String),
    /// `data: [DONE]`.
    Done,
}

/// The events of a response body.
pub(crate) struct SseEvents {
    inner: Pin<
        Box<
            dyn Stream<Item = Result<eventsource_stream::Event, EventStreamError<ProviderError>>>
                + Send,
        >,
    >,
}

impl SseEvents {
    pub(crate) fn new(bytes: ByteStream) -> Self {
        SseEvents {
            inner: Box::pin(bytes.eventsource()),
        }
    }

    /// The next event; `None` when the body ends.
    pub(crate) async fn next(&mut self) -> Option<Result<SseEvent, ProviderError>> {
        let event = match self.inner.next().await? {
            Ok(e) => e,
            Err(EventStreamError::Transport(e)) => return Some(Err(e)),
            Err(e) => {
                return Some(Err(ProviderError::new(
                    ErrorKind::Malformed,
                    format!("malformed SSE: {e}"),
                )));
            }
        };
        if event.data.trim() == "[DONE]" {
            Some(Ok(SseEvent::Done))
        } else {
            Some(Ok(SseEvent::Data(event.data)))
        }
    }
}
