//! Request and response bodies of `POST /v1/chat/completions`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Extra;
use crate::anthropic::{MessagesRequest, MessagesResponse};

/// A chat-completion request as a client sends it.
///
/// Only the fields the gateway reads are typed; the rest stay in [`extra`](Self::extra).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// The route: a model id or a task group (DESIGN.md §2 "route").
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// `true` asks for a server-sent-event stream of [`ChatCompletionChunk`](crate::ChatCompletionChunk)s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Stream options; `include_usage` asks for a final chunk carrying usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Upper bound on generated tokens (legacy name, still the one most servers read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Upper bound on generated tokens (newer OpenAI name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0–2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// An end-user id; the gateway may use it as a session key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every other field, passed to the provider untouched.
    #[serde(flatten)]
    pub extra: Extra,
    /// The client's own request when it came in another dialect that a provider wire also
    /// speaks (an Anthropic Messages request): a provider of that wire sends it as it
    /// came instead of translating this request back, so fields and blocks the neutral
    /// shape has no place for are not lost. Never serialized; `None` for chat completions.
    #[serde(skip)]
    pub native: Option<Arc<NativeRequest>>,
}

/// A client's request in its own dialect, kept beside its neutral translation
/// ([`ChatCompletionRequest::native`]).
// Always behind an `Arc` (one allocation per request): the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum NativeRequest {
    /// `POST /v1/messages`.
    Anthropic(NativeMessages),
    /// `POST /v1/responses`.
    Responses(NativeResponses),
}

/// A Responses request as the client sent it: sent as it is to a provider that declares
/// `responses: true`.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeResponses {
    /// The request's JSON object.
    pub body: serde_json::Map<String, Value>,
    /// How many chat messages its translation had (see [`NativeMessages::chat_messages`]):
    /// when the gateway changed the conversation since, the chat translation is sent.
    pub chat_messages: usize,
}

/// An Anthropic Messages request as the client sent it, with the headers that go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeMessages {
    /// The request, every unknown field and block kept.
    pub request: MessagesRequest,
    /// How many chat messages its translation had: when the gateway changed the
    /// conversation since (a prefill, a continuation), the number differs and the provider
    /// translates the changed chat messages instead, keeping only the top-level fields.
    pub chat_messages: usize,
    /// The client's `anthropic-version` header, forwarded instead of the provider's own.
    pub version: Option<String>,
    /// The client's `anthropic-beta` header, forwarded.
    pub beta: Option<String>,
}

/// An answer in a provider's own dialect, kept beside its neutral translation
/// ([`ChatCompletion::native`]) for a client that speaks the same dialect.
// Always behind an `Arc`, as [`NativeRequest`].
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum NativeResponse {
    /// An Anthropic Messages answer.
    Anthropic(MessagesResponse),
    /// A Response object (`POST /v1/responses`), as JSON.
    Responses(Value),
}

impl ChatCompletionRequest {
    /// A request for `model` (a route) with `messages` and nothing else set.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        ChatCompletionRequest {
            model: model.into(),
            messages,
            stream: None,
            stream_options: None,
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            user: None,
            extra: Extra::new(),
            native: None,
        }
    }

    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// Whether the client asked for a final usage chunk in a stream.
    pub fn wants_stream_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// The generation cap the request sets, from `max_completion_tokens` or `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }
}

/// `stream_options` of a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a last chunk with `usage` and no choices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Other stream options, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the application (`system`).
    System,
    /// Instructions from the application, newer name (`developer`).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool result.
    Tool,
    /// A function result (deprecated OpenAI form).
    Function,
}

impl Role {
    /// The wire names, in the order of the variants; used in error messages.
    pub const NAMES: [&'static str; 6] = [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "function",
    ];
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// A string, an array of content parts, or null (assistant turns with tool calls).
    #[serde(default)]
    pub content: Value,
    /// Other fields (`name`, `tool_calls`, `tool_call_id`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChatMessage {
    /// A message with plain text content.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Value::String(text.into()),
            extra: Extra::new(),
        }
    }

    /// The message's text: the string content, or the `text` of its parts joined by newlines.
    pub fn text(&self) -> String {
        match &self.content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        }
    }
}

/// A non-streamed chat-completion response.
///
/// Lenient on purpose: providers differ in what they send, and the gateway forwards
/// whatever it does not model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// The provider's completion id.
    #[serde(default)]
    pub id: String,
    /// `chat.completion`.
    #[serde(default)]
    pub object: String,
    /// Unix time (s) of creation.
    #[serde(default)]
    pub created: u64,
    /// The model that answered, as the provider names it.
    #[serde(default)]
    pub model: String,
    /// The answers.
    #[serde(default)]
    pub choices: Vec<Choice>,
    /// Token usage, when the provider reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Other fields (`system_fingerprint`, llama.cpp `timings`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
    /// The provider's answer in its own dialect, when the client asked in that dialect
    /// ([`ChatCompletionRequest::native`]): answered as it came, blocks the neutral shape
    /// drops (`thinking` with its signature, server tool results) included. Never serialized.
    #[serde(skip)]
    pub native: Option<Arc<NativeResponse>>,
}

impl ChatCompletion {
    /// The text of the first choice, if any.
    pub fn first_text(&self) -> Option<&str> {
        self.choices
            .first()
            .and_then(|c| c.message.get("content"))
            .and_then(Value::as_str)
    }
}

/// One answer of a [`ChatCompletion`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Position in `choices`.
    #[serde(default)]
    pub index: u32,
    /// The assistant message, kept as JSON so tool calls, refusals and vendor fields pass through.
    #[serde(default)]
    pub message: serde_json::Map<String, Value>,
    /// Why generation stopped (`stop`, `length`, `tool_calls`, …).
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Other fields (`logprobs`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Token counts of one completion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
    /// Details (`prompt_tokens_details`, …), passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_request_fields_round_trip() {
        let body = json!({
            "model": "m",
            "messages": [{"role": "user", "content": "hi", "name": "bob"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "response_format": {"type": "json_object"},
            "logprobs": true,
            "vendor_x": {"a": 1}
        });
        let req: ChatCompletionRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(req.extra.len(), 4);
        assert_eq!(req.messages[0].extra["name"], "bob");
        assert_eq!(serde_json::to_value(&req).unwrap(), body);
    }

    #[test]
    fn unknown_response_fields_round_trip() {
        let body = json!({
            "id": "x", "object": "chat.completion", "created": 1, "model": "smollm2",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                         "finish_reason": "stop", "logprobs": null}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            "timings": {"predicted_ms": 1.5}
        });
        let resp: ChatCompletion = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(resp.first_text(), Some("hi"));
        assert_eq!(resp.extra["timings"]["predicted_ms"], 1.5);
        assert_eq!(serde_json::to_value(&resp).unwrap(), body);
    }

    /// The request round-trip property (`crates/echelon/tests/properties.rs`) found that
    /// serde_json's default float parsing may be off by one ULP, so a number passed
    /// through (a logprob, a tool schema's bound) reached the other side changed; the
    /// workspace enables serde_json's `float_roundtrip` feature.
    #[test]
    fn numbers_pass_through_to_the_last_bit() {
        let numbers = "[-3.5092435806613254,-14.463379272480811,1.2862862030863249e+244]";
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"hi"}}],"x":{numbers}}}"#
        );
        let req = crate::parse_request(body.as_bytes()).unwrap();
        assert_eq!(req.extra["x"].to_string(), numbers);
        let answer = format!(
            r#"{{"choices":[{{"message":{{"content":"hi"}},"logprobs":{{"content":[{{"token":"hi","logprob":-3.5092435806613254}}]}}}}],"x":{numbers}}}"#
        );
        let resp: ChatCompletion = serde_json::from_str(&answer).unwrap();
        assert_eq!(resp.extra["x"].to_string(), numbers);
        assert_eq!(
            resp.choices[0].extra["logprobs"]["content"][0]["logprob"].as_f64(),
            Some(-3.5092435806613254)
        );
    }

    #[test]
    fn text_joins_parts() {
        let m: ChatMessage = serde_json::from_value(json!({
            "role": "user",
            "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]
        }))
        .unwrap();
        assert_eq!(m.text(), "a\nb");
    }
}
