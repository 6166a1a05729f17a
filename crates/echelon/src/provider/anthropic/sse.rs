//! Anthropic's stream events (`event: <type>` and `data: <json>`), decoded into chat
//! chunks: `message_start` → a role chunk (and the prompt's usage, kept), a
//! `content_block_start` of a tool → the tool call's head (id, name), `text_delta` →
//! content, `input_json_delta` → the tool call's arguments, `thinking_delta` →
//! `reasoning_content` (the field DeepSeek and vLLM stream reasoning in),
//! `signature_delta` → `reasoning_signature`, `message_delta` → the finish chunk and a
//! usage chunk, `message_stop` → the end; `ping`, block stops and events Echelon does
//! not know (citations, new types) prove the stream alive. An
//! `error` event is a failure: `rate_limit_error` as rate-limited, anything else
//! (`overloaded_error`, `api_error`, …) as a server error.

use echelon_types::anthropic::{BlockDelta, MessagesUsage, StreamEvent as Event};
use echelon_types::{ChatCompletionChunk, ChunkChoice, Delta, Extra, Usage};
use futures::Stream;
use serde_json::{Value, json};

use super::request::{finish_reason, now_secs, usage};
use crate::provider::StreamEvent;
use crate::provider::error::{ErrorKind, ProviderError, upstream_text};
use crate::provider::stream::decoded_sse;

/// What the decoder remembers between events.
#[derive(Debug, Default)]
pub(super) struct Decoder {
    id: String,
    model: String,
    created: u64,
    /// The prompt's usage from `message_start`.
    input: MessagesUsage,
    /// The Anthropic block index of each tool call so far, in order: the position is
    /// the chat `tool_calls` index.
    tool_blocks: Vec<u32>,
    /// The name of the request's forced structured-output tool
    /// ([`structured_tool`](super::request::structured_tool)): its block streams as content.
    structured: Option<String>,
    /// The block index of that tool's `tool_use` block, once it started.
    structured_block: Option<u32>,
}

impl Decoder {
    /// A decoder for a request whose structured-output tool is `structured`.
    pub(super) fn new(structured: Option<String>) -> Decoder {
        Decoder {
            structured,
            ..Decoder::default()
        }
    }

    fn chunk(&self, delta: Delta, finish_reason: Option<String>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                extra: Extra::new(),
            }],
            usage: None,
            extra: Extra::new(),
            verbatim: Default::default(),
        }
    }

    fn tool_delta(&self, call: Value) -> Delta {
        let mut extra = Extra::new();
        extra.insert("tool_calls".into(), Value::Array(vec![call]));
        Delta {
            role: None,
            content: None,
            extra,
        }
    }

    /// The usage so far: the prompt's from `message_start`, updated by what a
    /// `message_delta` says (newer servers repeat the input counts there).
    fn usage(&self, delta: &MessagesUsage) -> Usage {
        let merged = MessagesUsage {
            input_tokens: if delta.input_tokens > 0 {
                delta.input_tokens
            } else {
                self.input.input_tokens
            },
            output_tokens: delta.output_tokens,
            cache_creation_input_tokens: delta
                .cache_creation_input_tokens
                .or(self.input.cache_creation_input_tokens),
            cache_read_input_tokens: delta
                .cache_read_input_tokens
                .or(self.input.cache_read_input_tokens),
            extra: Extra::new(),
        };
        usage(&merged)
    }

    /// The stream events of one SSE event's `data`.
    pub(super) fn decode(&mut self, data: &str) -> Vec<Result<StreamEvent, ProviderError>> {
        if data.trim().is_empty() {
            return vec![Ok(StreamEvent::Keepalive)];
        }
        let event: Event = match serde_json::from_str(data) {
            Ok(e) => e,
            Err(e) => {
                // JSON of an event type this version does not know: alive, not an answer.
                return match serde_json::from_str::<Value>(data) {
                    Ok(v) if v.get("type").and_then(Value::as_str).is_some() => {
                        vec![Ok(StreamEvent::Keepalive)]
                    }
                    _ => vec![Ok(StreamEvent::Malformed(format!(
                        "malformed Anthropic event: {e}"
                    )))],
                };
            }
        };
        let one = |e| vec![Ok(e)];
        match event {
            Event::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.created = now_secs();
                self.input = message.usage;
                one(StreamEvent::Chunk(self.chunk(
                    Delta {
                        role: Some("assistant".into()),
                        content: None,
                        extra: Extra::new(),
                    },
                    None,
                )))
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } if content_block.kind == "tool_use"
                && self.structured.is_some()
                && content_block.name == self.structured =>
            {
                self.structured_block = Some(index);
                one(StreamEvent::Keepalive)
            }
            Event::ContentBlockStart {
                index,
                content_block,
            } if content_block.kind == "tool_use" => {
                let position = self.tool_blocks.len();
                self.tool_blocks.push(index);
                let call = json!({
                    "index": position, "id": content_block.id.unwrap_or_default(),
                    "type": "function",
                    "function": {"name": content_block.name.unwrap_or_default(), "arguments": ""},
                });
                one(StreamEvent::Chunk(self.chunk(self.tool_delta(call), None)))
            }
            Event::ContentBlockDelta {
                delta: BlockDelta::TextDelta { text },
                ..
            } => one(StreamEvent::Chunk(self.chunk(
                Delta {
                    role: None,
                    content: Some(text),
                    extra: Extra::new(),
                },
                None,
            ))),
            Event::ContentBlockDelta {
                delta: BlockDelta::ThinkingDelta { thinking: text },
                ..
            } => one(StreamEvent::Chunk(
                self.chunk(Delta::extra_field("reasoning_content", text), None),
            )),
            Event::ContentBlockDelta {
                delta: BlockDelta::SignatureDelta { signature },
                ..
            } => one(StreamEvent::Chunk(self.chunk(
                Delta::extra_field("reasoning_signature", signature),
                None,
            ))),
            Event::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta { partial_json },
            } if self.structured_block == Some(index) => one(StreamEvent::Chunk(self.chunk(
                Delta {
                    role: None,
                    content: Some(partial_json),
                    extra: Extra::new(),
                },
                None,
            ))),
            Event::ContentBlockDelta {
                index,
                delta: BlockDelta::InputJsonDelta { partial_json },
            } => match self.tool_blocks.iter().position(|b| *b == index) {
                Some(position) => {
                    let call = json!({"index": position, "function": {"arguments": partial_json}});
                    one(StreamEvent::Chunk(self.chunk(self.tool_delta(call), None)))
                }
                None => one(StreamEvent::Malformed(format!(
                    "input_json_delta for block {index}, which is not a tool_use"
                ))),
            },
            Event::MessageDelta { delta, usage } => {
                let finish = match delta.stop_reason.as_deref() {
                    None => "stop".to_owned(),
                    Some("tool_use")
                        if self.structured_block.is_some() && self.tool_blocks.is_empty() =>
                    {
                        "stop".to_owned()
                    }
                    Some(r) => finish_reason(r),
                };
                let mut usage_chunk = self.chunk(Delta::default(), None);
                usage_chunk.choices.clear();
                usage_chunk.usage = Some(self.usage(&usage));
                vec![
                    Ok(StreamEvent::Chunk(
                        self.chunk(Delta::default(), Some(finish)),
                    )),
                    Ok(StreamEvent::Chunk(usage_chunk)),
                ]
            }
            Event::MessageStop => one(StreamEvent::Done),
            Event::Error { error } => {
                let kind = if error.kind == "rate_limit_error" {
                    ErrorKind::RateLimited
                } else {
                    ErrorKind::ServerError
                };
                let message = format!("{}: {}", error.kind, upstream_text(&error.message));
                vec![Err(ProviderError::new(kind, message))]
            }
            Event::Ping
            | Event::ContentBlockStart { .. }
            | Event::ContentBlockStop { .. }
            | Event::ContentBlockDelta { .. } => one(StreamEvent::Keepalive),
        }
    }
}

/// The decoded events of an Anthropic SSE body that arrives as `bytes`.
///
/// `structured` names the request's forced structured-output tool: its `tool_use`
/// block's `input_json_delta`s stream as content, and its `tool_use` stop as `stop`.
pub(super) fn events<S>(
    bytes: S,
    structured: Option<String>,
) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
{
    let mut decoder = Decoder::new(structured);
    decoded_sse(bytes, move |data| decoder.decode(data))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn decode_all(events: &[&str]) -> Vec<Result<StreamEvent, ProviderError>> {
        let mut d = Decoder::default();
        events.iter().flat_map(|e| d.decode(e)).collect()
    }

    fn chunk(e: &Result<StreamEvent, ProviderError>) -> &ChatCompletionChunk {
        match e {
            Ok(StreamEvent::Chunk(c)) => c,
            other => panic!("not a chunk: {other:?}"),
        }
    }

    /// The text-and-tool transcript of Anthropic's streaming reference, shortened.
    #[test]
    fn a_transcript_decodes_to_chat_chunks() {
        let out = decode_all(&[
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"output_tokens":2,"cache_creation_input_tokens":10,"cache_read_input_tokens":20}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Okay"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{}}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"location\":"}}"#,
            r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":" \"SF\"}"}}"#,
            r#"{"type":"content_block_stop","index":1}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
            r#"{"type":"message_stop"}"#,
        ]);
        assert_eq!(out.len(), 12);
        let role = chunk(&out[0]);
        assert_eq!(role.id, "msg_1");
        assert_eq!(role.choices[0].delta.role.as_deref(), Some("assistant"));
        assert!(matches!(out[1], Ok(StreamEvent::Keepalive)));
        assert!(matches!(out[2], Ok(StreamEvent::Keepalive)));
        assert_eq!(
            chunk(&out[3]).choices[0].delta.content.as_deref(),
            Some("Okay")
        );
        let head = &chunk(&out[5]).choices[0].delta.extra["tool_calls"][0];
        assert_eq!(
            *head,
            json!({"index": 0, "id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}})
        );
        assert_eq!(
            chunk(&out[6]).choices[0].delta.extra["tool_calls"][0],
            json!({"index": 0, "function": {"arguments": "{\"location\":"}})
        );
        assert_eq!(
            chunk(&out[9]).choices[0].finish_reason.as_deref(),
            Some("tool_calls")
        );
        let usage = chunk(&out[10]).usage.clone().unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (502, 89));
        assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], 20);
        assert_eq!(usage.extra["cache_creation_input_tokens"], 10);
        assert!(matches!(out[11], Ok(StreamEvent::Done)));
    }

    #[test]
    fn an_error_event_is_a_failure_and_junk_is_malformed() {
        let out = decode_all(&[
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow"}}"#,
            "{not json",
            r#"{"type":"brand_new_event","x":1}"#,
        ]);
        let e = out[0].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::ServerError);
        assert_eq!(e.message, "overloaded_error: Overloaded");
        assert_eq!(out[1].as_ref().unwrap_err().kind, ErrorKind::RateLimited);
        assert!(matches!(out[2], Ok(StreamEvent::Malformed(_))));
        assert!(matches!(out[3], Ok(StreamEvent::Keepalive)));
    }

    #[test]
    fn the_forced_tools_input_streams_as_content_finishing_stop() {
        let mut d = Decoder::new(Some("verdict".into()));
        let out: Vec<_> = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-x","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":4,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"verdict","input":{}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"score\":"}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":" 7}"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":5}}"#,
            r#"{"type":"message_stop"}"#,
        ]
        .iter()
        .flat_map(|e| d.decode(e))
        .collect();
        assert!(matches!(out[1], Ok(StreamEvent::Keepalive)));
        let text: String = out[2..4]
            .iter()
            .map(|e| chunk(e).choices[0].delta.content.clone().unwrap())
            .collect();
        assert_eq!(text, "{\"score\": 7}");
        assert!(
            chunk(&out[2]).choices[0]
                .delta
                .extra
                .get("tool_calls")
                .is_none()
        );
        assert_eq!(
            chunk(&out[5]).choices[0].finish_reason.as_deref(),
            Some("stop")
        );

        // Another tool's block stays a tool call.
        let mut d = Decoder::new(Some("verdict".into()));
        let out = d.decode(
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#,
        );
        assert!(
            chunk(&out[0]).choices[0]
                .delta
                .extra
                .contains_key("tool_calls")
        );
    }
}
