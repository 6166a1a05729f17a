//! Anthropic Messages API wire types (`POST /v1/messages`, `POST /v1/messages/count_tokens`,
//! and the stream events), shared by the inbound endpoint (echelon-server) and the
//! outbound `api: anthropic` wire (echelon).
//!
//! Shapes follow the Anthropic API reference for the Messages API
//! (<https://docs.anthropic.com/en/api/messages>, streaming:
//! <https://docs.anthropic.com/en/api/messages-streaming>). Like the chat types, only the
//! fields Echelon acts on are typed; every other field stays in an `extra` map and
//! passes through untouched.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Extra;

/// The `anthropic-version` Echelon speaks and sends to an Anthropic upstream.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// A Messages API request (`POST /v1/messages`; also the body of `count_tokens`,
/// where `max_tokens` is absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessagesRequest {
    /// The route: a model id or a task group.
    pub model: String,
    /// The conversation, alternating `user` and `assistant` turns.
    pub messages: Vec<Message>,
    /// The system prompt: a string or an array of text blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<Content>,
    /// Upper bound on generated tokens (required by Anthropic on `/v1/messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Texts that end generation when produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequences: Option<Vec<String>>,
    /// Sampling temperature, 0–1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Tool definitions (`name`, `description`, `input_schema`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// `{"type": "auto" | "any" | "tool" | "none", "name"?, "disable_parallel_tool_use"?}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// `true` asks for a server-sent-event stream of [`StreamEvent`]s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// `{"user_id": …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Every other field (`thinking`, `service_tier`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// `metadata` of a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// An opaque end-user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One turn of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// A string or an array of content blocks.
    pub content: Content,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Content as a plain string or as blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// A plain text.
    Text(String),
    /// Content blocks.
    Blocks(Vec<ContentBlock>),
}

impl Content {
    /// The blocks: a plain text is one text block.
    pub fn into_blocks(self) -> Vec<ContentBlock> {
        match self {
            Content::Text(t) => vec![ContentBlock::text(t)],
            Content::Blocks(b) => b,
        }
    }

    /// The text of the content: the string, or the text blocks' texts joined by
    /// newlines (other blocks ignored).
    pub fn text(&self) -> String {
        match self {
            Content::Text(t) => t.clone(),
            Content::Blocks(b) => b
                .iter()
                .filter_map(|b| b.text.as_deref())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// One content block, of any `type` (`text`, `image`, `tool_use`, `tool_result`,
/// `thinking`, …). A struct rather than an enum so that a block type Echelon does not
/// know still parses and passes through: the fields of the known types are typed, the
/// rest stay in [`extra`](Self::extra).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentBlock {
    /// The block's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `text`: the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// `image`: `{"type": "base64", "media_type", "data"}` or `{"type": "url", "url"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Value>,
    /// `tool_use`: the call's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `tool_use`: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `tool_use`: the arguments, a JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// `tool_result`: the id of the `tool_use` it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_use_id: Option<String>,
    /// `tool_result`: a string or an array of blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
    /// `tool_result`: whether the tool failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// Other fields (`cache_control`, `citations`, `thinking`, `signature`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

impl ContentBlock {
    /// A `text` block.
    pub fn text(text: impl Into<String>) -> Self {
        ContentBlock {
            kind: "text".into(),
            text: Some(text.into()),
            ..Default::default()
        }
    }

    /// A `tool_use` block.
    pub fn tool_use(id: impl Into<String>, name: impl Into<String>, input: Value) -> Self {
        ContentBlock {
            kind: "tool_use".into(),
            id: Some(id.into()),
            name: Some(name.into()),
            input: Some(input),
            ..Default::default()
        }
    }
}

/// A client tool definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The tool's name.
    pub name: String,
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its input. Absent on Anthropic's server tools (which have a `type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<Value>,
    /// Other fields (`type` of a server tool, `cache_control`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// A non-streamed answer (`type: message`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessagesResponse {
    /// The message id (`msg_…`).
    #[serde(default)]
    pub id: String,
    /// `message`.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// `assistant`.
    #[serde(default)]
    pub role: String,
    /// The answer's blocks (`text`, `tool_use`, …).
    #[serde(default)]
    pub content: Vec<ContentBlock>,
    /// The model that answered.
    #[serde(default)]
    pub model: String,
    /// `end_turn`, `max_tokens`, `stop_sequence`, `tool_use`, `pause_turn`, `refusal`.
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// The stop sequence that ended generation, if one did.
    #[serde(default)]
    pub stop_sequence: Option<String>,
    /// Token usage.
    #[serde(default)]
    pub usage: MessagesUsage,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Token usage of a message. `input_tokens` excludes the cached prompt tokens: the
/// whole prompt is `input_tokens + cache_creation_input_tokens + cache_read_input_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesUsage {
    /// Prompt tokens neither written to nor read from the cache.
    #[serde(default)]
    pub input_tokens: u64,
    /// Generated tokens.
    #[serde(default)]
    pub output_tokens: u64,
    /// Prompt tokens written to the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_creation_input_tokens: Option<u64>,
    /// Prompt tokens read from the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_input_tokens: Option<u64>,
    /// Other fields (`server_tool_use`, `service_tier`, …).
    #[serde(flatten)]
    pub extra: Extra,
}

/// One event of a streamed message, by its `type` (the SSE `event:` name is the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    /// The first event: the message, its content empty, its input usage known.
    MessageStart {
        /// The message so far.
        message: MessagesResponse,
    },
    /// A content block begins at `index`.
    ContentBlockStart {
        /// The block's position in `content`.
        index: u32,
        /// The block, its text or input empty.
        content_block: ContentBlock,
    },
    /// More of the block at `index`.
    ContentBlockDelta {
        /// The block's position.
        index: u32,
        /// What it adds.
        delta: BlockDelta,
    },
    /// The block at `index` is complete.
    ContentBlockStop {
        /// The block's position.
        index: u32,
    },
    /// Top-level changes: the stop reason, and the cumulative usage.
    MessageDelta {
        /// `stop_reason`, `stop_sequence`.
        delta: MessageDeltaBody,
        /// Cumulative usage (`output_tokens`; newer servers add the input counts).
        #[serde(default)]
        usage: MessagesUsage,
    },
    /// The last event of a complete stream.
    MessageStop,
    /// A keepalive.
    Ping,
    /// A failure in the stream.
    Error {
        /// `{"type", "message"}`.
        error: ErrorDetail,
    },
}

impl StreamEvent {
    /// The event's `type`, the SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::MessageStart { .. } => "message_start",
            StreamEvent::ContentBlockStart { .. } => "content_block_start",
            StreamEvent::ContentBlockDelta { .. } => "content_block_delta",
            StreamEvent::ContentBlockStop { .. } => "content_block_stop",
            StreamEvent::MessageDelta { .. } => "message_delta",
            StreamEvent::MessageStop => "message_stop",
            StreamEvent::Ping => "ping",
            StreamEvent::Error { .. } => "error",
        }
    }
}

/// The `delta` of a `content_block_delta`, by its `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    /// Text added to a `text` block.
    TextDelta {
        /// The text.
        text: String,
    },
    /// A piece of a `tool_use` block's input, as JSON text (the pieces concatenated
    /// are the input).
    InputJsonDelta {
        /// The piece.
        partial_json: String,
    },
    /// Text added to a `thinking` block (extended thinking).
    ThinkingDelta {
        /// The text.
        thinking: String,
    },
    /// The signature of a `thinking` block, sent once before the block stops; a client
    /// must send it back with the block in a later turn.
    SignatureDelta {
        /// The signature (opaque).
        signature: String,
    },
    /// Any other delta (`citations_delta`, …).
    #[serde(other)]
    Other,
}

/// The `delta` of a `message_delta`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageDeltaBody {
    /// Why generation stopped.
    #[serde(default)]
    pub stop_reason: Option<String>,
    /// The stop sequence that ended it, if one did.
    #[serde(default)]
    pub stop_sequence: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{"type": "error", "error": {"type", "message"}}`: Anthropic's error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The error.
    pub error: ErrorDetail,
}

/// The `error` of an [`ErrorResponse`] or an `error` stream event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `request_too_large`, `rate_limit_error`, `api_error`,
    /// `overloaded_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// Other fields (Echelon adds `attempts`).
    #[serde(flatten)]
    pub extra: Extra,
}

/// The Anthropic error `type` for an HTTP status: 400 `invalid_request_error`, 401
/// `authentication_error`, 403 `permission_error`, 404 `not_found_error`, 413
/// `request_too_large`, 429 `rate_limit_error`, 503 and 529 `overloaded_error`, anything
/// else `api_error` (Anthropic's table of errors: <https://docs.anthropic.com/en/api/errors>).
pub fn error_type_for_status(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// `count_tokens`' answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountTokensResponse {
    /// Tokens of the prompt (system, messages, tools).
    pub input_tokens: u64,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_request_round_trips_with_unknown_fields_and_blocks() {
        let body = json!({
            "model": "claude", "max_tokens": 64,
            "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "42", "is_error": false},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}
            ],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "metadata": {"user_id": "u"}
        });
        let req: MessagesRequest = serde_json::from_value(body.clone()).unwrap();
        assert!(req.extra.contains_key("thinking"));
        let Content::Blocks(b) = &req.messages[1].content else {
            panic!()
        };
        assert_eq!(b[0].extra["thinking"], "hmm");
        assert_eq!(serde_json::to_value(&req).unwrap(), body);
    }

    #[test]
    fn stream_events_parse_by_type() {
        let e: StreamEvent = serde_json::from_value(json!({
            "type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{\"a\""}
        }))
        .unwrap();
        assert_eq!(e.name(), "content_block_delta");
        let e: StreamEvent = serde_json::from_value(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "x"}}),
        )
        .unwrap();
        assert!(matches!(
            e,
            StreamEvent::ContentBlockDelta {
                delta: BlockDelta::ThinkingDelta { ref thinking },
                ..
            } if thinking == "x"
        ));
        let e: StreamEvent = serde_json::from_value(
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {}}}),
        )
        .unwrap();
        assert!(matches!(
            e,
            StreamEvent::ContentBlockDelta {
                delta: BlockDelta::Other,
                ..
            }
        ));
        let e: StreamEvent =
            serde_json::from_value(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}))
                .unwrap();
        assert_eq!(e.name(), "error");
        assert_eq!(
            serde_json::to_value(StreamEvent::MessageStop).unwrap(),
            json!({"type": "message_stop"})
        );
    }

    #[test]
    fn error_types_follow_the_status() {
        assert_eq!(error_type_for_status(400), "invalid_request_error");
        assert_eq!(error_type_for_status(529), "overloaded_error");
        assert_eq!(error_type_for_status(502), "api_error");
        assert_eq!(error_type_for_status(429), "rate_limit_error");
    }
}
