//! Gemini's stream events: `streamGenerateContent?alt=sse` answers server-sent events
//! whose every `data:` is a whole `GenerateContentResponse` (no `[DONE]`: the
//! response with a `finishReason` is the last), or an `{"error": …}` object.

use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::error::classify_error;
use super::response::ChunkMapper;
use crate::key::Redactor;
use crate::provider::StreamEvent;
use crate::provider::error::{ErrorKind, ProviderError};

/// The decoded events of a Gemini SSE body arriving as `bytes` (pieces split
/// anywhere; transport errors already classified), each response mapped to a chunk;
/// an error event is classified by its `status` and scrubbed by `redactor`.
pub(super) fn events<S>(
    bytes: S,
    redactor: Redactor,
) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
{
    let mut mapper = ChunkMapper::default();
    bytes.eventsource().map(move |event| match event {
        Ok(e) => decode(&e.data, &mut mapper, &redactor),
        Err(EventStreamError::Transport(e)) => Err(e),
        Err(e) => Err(ProviderError::new(
            ErrorKind::Malformed,
            format!("malformed SSE: {e}"),
        )),
    })
}

/// One event's `data`.
fn decode(
    data: &str,
    mapper: &mut ChunkMapper,
    redactor: &Redactor,
) -> Result<StreamEvent, ProviderError> {
    if data.trim().is_empty() {
        return Ok(StreamEvent::Keepalive);
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return Ok(StreamEvent::Malformed(
                "SSE data is not a JSON object".into(),
            ));
        }
        Err(e) => return Ok(StreamEvent::Malformed(format!("malformed SSE data: {e}"))),
    };
    if let Some(error) = value.get("error") {
        return Err(classify_error(None, None, error, redactor));
    }
    mapper.chunk(&value).map(StreamEvent::Chunk)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn decodes_responses_errors_and_junk() {
        let mut m = ChunkMapper::default();
        let r = Redactor::default();
        let text =
            r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"Hi"}]},"index":0}]}"#;
        let StreamEvent::Chunk(c) = decode(text, &mut m, &r).unwrap() else {
            panic!("not a chunk")
        };
        assert_eq!(c.choices[0].delta.content.as_deref(), Some("Hi"));
        assert_eq!(decode(" ", &mut m, &r).unwrap(), StreamEvent::Keepalive);
        assert!(matches!(
            decode("{not json", &mut m, &r).unwrap(),
            StreamEvent::Malformed(_)
        ));
        assert!(matches!(
            decode("[1]", &mut m, &r).unwrap(),
            StreamEvent::Malformed(_)
        ));
        let e = decode(
            r#"{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}"#,
            &mut m,
            &r,
        )
        .unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (ErrorKind::ServerError, "The model is overloaded.")
        );
    }
}
