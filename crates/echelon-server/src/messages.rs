//! The Anthropic Messages endpoints: `POST /v1/messages` (streamed and not) and
//! `POST /v1/messages/count_tokens`, for the anthropic SDK and Claude Code.
//!
//! A Messages request is translated into the neutral chat request
//! ([`to_chat`]) and routed exactly like `/v1/chat/completions` (same resilience,
//! ledger, metrics, `x-echelon-*` headers, request id); the answer is translated back
//! ([`from_chat`], and [`Translator`] for a stream's events). Errors are Anthropic's
//! `{"type": "error", "error": {"type", "message"}}` with the gateway's status, Echelon's
//! `code` and `attempts` beside `type`; a failure after a stream began is an
//! `event: error` frame, never a `message_stop`.
//!
//! To an Anthropic-wire model the request goes as the client sent it (the translation
//! rides beside it as [`echelon_types::NativeRequest`]; `anthropic-version` and
//! `anthropic-beta` are forwarded) and a non-streamed answer comes back as that upstream
//! wrote it; a streamed one is relayed through the chat chunks, its thinking blocks and
//! signatures included when the client asked for `thinking`.
//!
//! What the translation to other wires loses (each named in the README's mapping table): `cache_control`
//! marks, `thinking` and other top-level fields an OpenAI-wire model has no use for,
//! `thinking` blocks of earlier assistant turns, images inside tool results, which stop
//! sequence matched (`stop_reason` says `end_turn`), and a tool result's `is_error` flag
//! (sent as an `Error: ` prefix of its text).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use echelon::GatewayStream;
use echelon_types::anthropic::{
    BlockDelta, Content, ContentBlock, CountTokensResponse, MessageDeltaBody, MessagesRequest,
    MessagesResponse, MessagesUsage, StreamEvent,
};
use echelon_types::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Extra, NativeMessages,
    NativeRequest, NativeResponse, RequestError, Role, StreamOptions, Usage,
};
use http::{HeaderValue, StatusCode};
use serde_json::{Value, json};

use crate::AppState;
use crate::content_type::JsonBody;
use crate::error::{ApiError, ErrorDialect};
use crate::handlers::{Routed, routed};
use crate::reply::{json_response, overhead_ms, put_overhead, put_route_headers};

/// `POST /v1/messages`.
pub(crate) async fn messages(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    routed(
        state,
        headers,
        body,
        ErrorDialect::Anthropic,
        messages_in_span,
    )
    .await
}

async fn messages_in_span(r: Routed) -> Result<Response, ApiError> {
    let Routed {
        state,
        options,
        body,
        arrived,
        headers,
    } = r;
    let req = parse(&body)?;
    if req.max_tokens.is_none() {
        return Err(invalid("max_tokens", "max_tokens: Field required"));
    }
    let thinking = req
        .extra
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        == Some("enabled");
    let sent = req.clone();
    let mut chat = to_chat(req)?;
    chat.native = Some(Arc::new(NativeRequest::Anthropic(NativeMessages {
        request: sent,
        chat_messages: chat.messages.len(),
        version: forwarded(&headers, "anthropic-version"),
        beta: forwarded(&headers, "anthropic-beta"),
    })));
    tracing::debug!(route = %echelon_types::bounded_name(&chat.model), stream = chat.is_stream(), "messages");
    crate::telemetry::record_request("chat", &chat.model);
    let routed_error = |e: echelon::GatewayError| {
        ApiError::from(&e).with_overhead_ms(overhead_ms(arrived, e.attempts()))
    };
    if chat.is_stream() {
        let stream = state
            .gateway
            .chat_stream_with(chat, &options)
            .await
            .map_err(routed_error)?;
        let overhead = overhead_ms(arrived, stream.attempts());
        let mut resp = stream_response(stream, thinking);
        resp.headers_mut()
            .insert("x-echelon-overhead-ms", HeaderValue::from(overhead));
        Ok(resp)
    } else {
        let done = state
            .gateway
            .chat_with(chat, &options)
            .await
            .map_err(routed_error)?;
        let message = match done.response.native.as_deref() {
            Some(NativeResponse::Anthropic(native)) => native.clone(),
            Some(NativeResponse::Responses(_)) | None => from_chat(&done.response, thinking),
        };
        let mut resp = json_response(StatusCode::OK, &message)?;
        put_route_headers(resp.headers_mut(), &done.model, &done.attempts);
        put_overhead(resp.headers_mut(), arrived, &done.attempts);
        Ok(resp)
    }
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`, N counted by the library's
/// tokenizer ([`echelon::tokens::Encoding`]) of the first model the route would try:
/// tiktoken's `o200k_base` or `cl100k_base` as the model's upstream name says
/// (`cl100k_base` for any non-OpenAI name, Claude's included): an estimate for other
/// vendors' models. Counted: the system prompt, every message's text with OpenAI's
/// per-message framing, tool calls' arguments and the tool definitions' JSON.
pub(crate) async fn count_tokens(
    State(state): State<AppState>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    count_tokens_inner(state, body)
        .await
        .unwrap_or_else(|e| e.in_dialect(ErrorDialect::Anthropic).into_response())
}

async fn count_tokens_inner(
    state: AppState,
    body: Result<JsonBody, ApiError>,
) -> Result<Response, ApiError> {
    let JsonBody(body) = body?;
    let chat = to_chat(parse(&body)?)?;
    let routes = state.gateway.routes();
    let name = if chat.model == echelon::routing::DEFAULT_ROUTE_ALIAS {
        state.gateway.default_route().unwrap_or_default()
    } else {
        chat.model.clone()
    };
    let first = routes
        .iter()
        .find(|r| r.id == name)
        .and_then(|r| r.models.first())
        .and_then(|m| state.gateway.model(m));
    let Some(model) = first else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!(
                "no route `{}`: name a model, task group, echelon, polling pool or wrapper",
                echelon_types::bounded_name(&chat.model)
            ),
        ));
    };
    let encoding = model.encoding();
    let mut n = encoding.prompt_tokens_async(&chat.messages).await;
    for m in &chat.messages {
        if let Some(calls) = m.extra.get("tool_calls") {
            n = n.saturating_add(encoding.count_async(&calls.to_string()).await);
        }
    }
    if let Some(tools) = chat.extra.get("tools") {
        n = n.saturating_add(encoding.count_async(&tools.to_string()).await);
    }
    json_response(StatusCode::OK, &CountTokensResponse { input_tokens: n })
}

/// A 400 `invalid_request_error` naming `path`.
fn invalid(path: impl Into<String>, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(RequestError {
        path: Some(path.into()),
        message: message.into(),
    })
}

/// The body as a Messages request.
/// A header the client sent for an Anthropic upstream, when it is sane visible ASCII
/// (at most 256 bytes): forwarded as it came by the provider of the Anthropic wire.
fn forwarded(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 256).then(|| v.to_owned())
}

pub(crate) fn parse(body: &[u8]) -> Result<MessagesRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid_request(RequestError {
            path: None,
            message: format!("invalid Messages request: {e}"),
        })
    })
}

/// The neutral chat request of a Messages request.
///
/// `system` becomes a leading system message (text blocks joined by newlines); user
/// turns' text and image blocks become content parts (`image_url`, a base64 image as a
/// `data:` URL), their `tool_result` blocks `tool` messages placed before them; assistant
/// turns' text becomes `content`, their `tool_use` blocks `tool_calls` (input as JSON
/// text); `thinking` blocks are dropped. `max_tokens`, `temperature` pass as they are,
/// `stop_sequences` → `stop`, `top_p`/`top_k` → `top_p`/`top_k`, `metadata.user_id` →
/// `user`, `tools` → function tools, `tool_choice` `auto`/`any`/`tool`/`none` →
/// `auto`/`required`/`{function}`/`none` (`disable_parallel_tool_use` →
/// `parallel_tool_calls: false`); a stream asks for its usage.
///
/// # Errors
/// 400 `invalid_request_error` for a role other than `user`/`assistant`, no messages, a
/// block an OpenAI-wire model cannot take (`document`, …), an image without a usable
/// source, a server tool (no `input_schema`), or an unknown `tool_choice`.
pub(crate) fn to_chat(req: MessagesRequest) -> Result<ChatCompletionRequest, ApiError> {
    if req.messages.is_empty() {
        return Err(invalid(
            "messages",
            "messages: at least one message is required",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        let text = system.text();
        if !text.is_empty() {
            messages.push(ChatMessage::new(Role::System, text));
        }
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        match m.role.as_str() {
            "user" => user_turn(i, m.content, &mut messages)?,
            "assistant" => messages.push(assistant_turn(i, m.content)?),
            other => {
                return Err(invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "unknown role `{}`: expected `user` or `assistant`",
                        echelon_types::bounded_name(other)
                    ),
                ));
            }
        }
    }
    let mut chat = ChatCompletionRequest::new(req.model, messages);
    chat.max_tokens = req.max_tokens;
    chat.temperature = req.temperature;
    chat.user = req.metadata.and_then(|m| m.user_id);
    if req.stream == Some(true) {
        chat.stream = Some(true);
        chat.stream_options = Some(StreamOptions {
            include_usage: Some(true),
            extra: Extra::new(),
        });
    }
    if let Some(stop) = req.stop_sequences.filter(|s| !s.is_empty()) {
        chat.extra.insert("stop".into(), json!(stop));
    }
    if let Some(p) = req.top_p {
        chat.extra.insert("top_p".into(), json!(p));
    }
    if let Some(k) = req.top_k {
        chat.extra.insert("top_k".into(), json!(k));
    }
    let has_tools = req.tools.as_ref().is_some_and(|t| !t.is_empty());
    if let Some(tools) = req.tools.filter(|t| !t.is_empty()) {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.into_iter().enumerate() {
            let Some(schema) = t.input_schema else {
                let kind = t.extra.get("type").and_then(Value::as_str).unwrap_or("?");
                return Err(invalid(
                    format!("tools[{i}]"),
                    format!(
                        "server tool `{}` is not supported: only client tools (with \
                         `input_schema`) can be translated",
                        echelon_types::bounded_name(kind)
                    ),
                ));
            };
            let mut function = serde_json::Map::new();
            function.insert("name".into(), t.name.into());
            if let Some(d) = t.description {
                function.insert("description".into(), d.into());
            }
            function.insert("parameters".into(), schema);
            out.push(json!({"type": "function", "function": function}));
        }
        chat.extra.insert("tools".into(), Value::Array(out));
    }
    if let Some(choice) = req.tool_choice {
        let kind = choice.get("type").and_then(Value::as_str).unwrap_or("");
        let mapped = match kind {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            "tool" => match choice.get("name").and_then(Value::as_str) {
                Some(name) => json!({"type": "function", "function": {"name": name}}),
                None => {
                    return Err(invalid(
                        "tool_choice.name",
                        "tool_choice.name: Field required",
                    ));
                }
            },
            _ => {
                return Err(invalid(
                    "tool_choice.type",
                    "tool_choice.type must be `auto`, `any`, `tool` or `none`",
                ));
            }
        };
        if has_tools || kind == "none" {
            chat.extra.insert("tool_choice".into(), mapped);
        }
        if has_tools
            && choice
                .get("disable_parallel_tool_use")
                .and_then(Value::as_bool)
                == Some(true)
        {
            chat.extra
                .insert("parallel_tool_calls".into(), json!(false));
        }
    }
    Ok(chat)
}

/// A user turn: its `tool_result` blocks as `tool` messages, then the rest as one user
/// message (a string when it is a single text).
fn user_turn(i: usize, content: Content, out: &mut Vec<ChatMessage>) -> Result<(), ApiError> {
    let blocks = match content {
        Content::Text(t) => {
            out.push(ChatMessage::new(Role::User, t));
            return Ok(());
        }
        Content::Blocks(b) => b,
    };
    let mut parts = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        match b.kind.as_str() {
            "text" => parts.push(json!({"type": "text", "text": b.text.unwrap_or_default()})),
            "image" => parts.push(image_part(&format!("messages[{i}].content[{j}]"), &b)?),
            "tool_result" => {
                let mut text = b.content.map(|c| c.text()).unwrap_or_default();
                if b.is_error == Some(true) {
                    text = format!("Error: {text}");
                }
                let mut m = ChatMessage::new(Role::Tool, text);
                m.extra.insert(
                    "tool_call_id".into(),
                    b.tool_use_id.unwrap_or_default().into(),
                );
                out.push(m);
            }
            other => return Err(unsupported_block(i, j, other)),
        }
    }
    if parts.len() == 1 && parts[0]["type"] == "text" {
        let text = parts[0]["text"].as_str().unwrap_or_default().to_owned();
        out.push(ChatMessage::new(Role::User, text));
    } else if !parts.is_empty() {
        out.push(ChatMessage {
            role: Role::User,
            content: Value::Array(parts),
            extra: Extra::new(),
        });
    }
    Ok(())
}

/// An assistant turn: its texts concatenated as `content` (null when there is none and
/// there are tool calls), its `tool_use` blocks as `tool_calls`.
fn assistant_turn(i: usize, content: Content) -> Result<ChatMessage, ApiError> {
    let blocks = match content {
        Content::Text(t) => return Ok(ChatMessage::new(Role::Assistant, t)),
        Content::Blocks(b) => b,
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        match b.kind.as_str() {
            "text" => text.push_str(b.text.as_deref().unwrap_or_default()),
            "tool_use" => {
                let arguments = b
                    .input
                    .as_ref()
                    .map_or_else(|| "{}".to_owned(), Value::to_string);
                calls.push(json!({
                    "id": b.id.unwrap_or_default(),
                    "type": "function",
                    "function": {"name": b.name.unwrap_or_default(), "arguments": arguments},
                }));
            }
            "thinking" | "redacted_thinking" => {}
            other => return Err(unsupported_block(i, j, other)),
        }
    }
    let mut m = ChatMessage::new(Role::Assistant, text);
    if !calls.is_empty() {
        if m.text().is_empty() {
            m.content = Value::Null;
        }
        m.extra.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(m)
}

fn unsupported_block(i: usize, j: usize, kind: &str) -> ApiError {
    invalid(
        format!("messages[{i}].content[{j}].type"),
        format!(
            "content block type `{}` is not supported here",
            echelon_types::bounded_name(kind)
        ),
    )
}

/// An `image` block as an `image_url` part: a base64 source as a `data:` URL, a `url`
/// source as its URL.
fn image_part(path: &str, b: &ContentBlock) -> Result<Value, ApiError> {
    let source = b.source.as_ref();
    let field = |k: &str| source.and_then(|s| s.get(k)).and_then(Value::as_str);
    let url = match field("type") {
        Some("base64") => match (field("media_type"), field("data")) {
            (Some(mt), Some(data)) => format!("data:{mt};base64,{data}"),
            _ => {
                return Err(invalid(
                    format!("{path}.source"),
                    "a base64 image needs `media_type` and `data`",
                ));
            }
        },
        Some("url") => match field("url") {
            Some(u) => u.to_owned(),
            None => {
                return Err(invalid(
                    format!("{path}.source.url"),
                    "source.url: Field required",
                ));
            }
        },
        _ => {
            return Err(invalid(
                format!("{path}.source.type"),
                "image source type must be `base64` or `url`",
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Anthropic's `stop_reason` for a chat `finish_reason`: `stop` → `end_turn`, `length`
/// → `max_tokens`, `tool_calls` (and the older `function_call`) → `tool_use`,
/// `content_filter` → `refusal`; anything else (or none) → `end_turn`.
pub(crate) fn stop_reason(finish_reason: Option<&str>) -> &'static str {
    match finish_reason {
        Some("length") => "max_tokens",
        Some("tool_calls" | "function_call") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic usage of a chat usage: `input_tokens` is the prompt less its cached part
/// (`prompt_tokens_details.cached_tokens` → `cache_read_input_tokens`; a
/// `cache_creation_input_tokens` field, as the Anthropic wire records it, →
/// `cache_creation_input_tokens`); the cache fields only when the usage has them.
pub(crate) fn usage(u: &Usage) -> MessagesUsage {
    let read = u
        .extra
        .get("prompt_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64);
    let written = u
        .extra
        .get("cache_creation_input_tokens")
        .and_then(Value::as_u64);
    MessagesUsage {
        input_tokens: u
            .prompt_tokens
            .saturating_sub(read.unwrap_or(0))
            .saturating_sub(written.unwrap_or(0)),
        output_tokens: u.completion_tokens,
        cache_creation_input_tokens: written,
        cache_read_input_tokens: read,
        extra: Extra::new(),
    }
}

/// The message id: the completion's when it already is one (`msg_…`), else `msg_` and it.
fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else if id.is_empty() {
        format!("msg_{}", echelon::usage::new_request_id())
    } else {
        format!("msg_{id}")
    }
}

/// The Messages answer of a chat completion (its first choice): with `thinking` (the
/// client asked for extended thinking) its `reasoning_content` as a leading `thinking`
/// block (signed by `reasoning_signature`, else an empty signature), the text as a `text`
/// block, each tool call as a `tool_use` block (its arguments parsed as JSON; text that
/// is not JSON kept as a string `input`), `stop_reason` by [`stop_reason`], usage by
/// [`usage`].
pub(crate) fn from_chat(c: &ChatCompletion, thinking: bool) -> MessagesResponse {
    let choice = c.choices.first();
    let mut content = Vec::new();
    if let Some(m) = choice.map(|c| &c.message) {
        let reasoning = m.get("reasoning_content").and_then(Value::as_str);
        if let Some(r) = reasoning.filter(|r| thinking && !r.is_empty()) {
            let mut block = ContentBlock {
                kind: "thinking".into(),
                ..Default::default()
            };
            block.extra.insert("thinking".into(), json!(r));
            let signature = m.get("reasoning_signature").and_then(Value::as_str);
            block
                .extra
                .insert("signature".into(), json!(signature.unwrap_or_default()));
            content.push(block);
        }
        let text = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
            _ => String::new(),
        };
        if !text.is_empty() {
            content.push(ContentBlock::text(text));
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let f = call.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let args = f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .unwrap_or("");
            content.push(ContentBlock::tool_use(
                call.get("id").and_then(Value::as_str).unwrap_or_default(),
                name.unwrap_or_default(),
                tool_input(args),
            ));
        }
    }
    MessagesResponse {
        id: message_id(&c.id),
        kind: "message".into(),
        role: "assistant".into(),
        content,
        model: c.model.clone(),
        stop_reason: Some(stop_reason(choice.and_then(|c| c.finish_reason.as_deref())).to_owned()),
        stop_sequence: None,
        usage: c.usage.as_ref().map(usage).unwrap_or_default(),
        extra: Extra::new(),
    }
}

/// A tool call's `input`: its arguments parsed (empty → `{}`), else the text as it is.
fn tool_input(args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.to_owned()))
}

/// The block open in a translated stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text,
    /// A `thinking` block (from `reasoning_content`, signed by `reasoning_signature`).
    Thinking,
    /// A tool call, by its index in the chunks' `tool_calls`.
    Tool(u64),
}

/// Turns a chat stream's chunks into Messages stream events: `message_start` first,
/// then per block `content_block_start`, `content_block_delta`s (`text_delta`,
/// `input_json_delta` for a tool call's arguments, `thinking_delta` and
/// `signature_delta` for `reasoning_content` and `reasoning_signature`),
/// `content_block_stop`; at the end
/// `message_delta` (stop reason, usage) and `message_stop`.
#[derive(Debug, Default)]
pub(crate) struct Translator {
    /// Whether the client asked for extended thinking (`thinking: {type: enabled}`):
    /// only then do `reasoning_content` deltas become `thinking` blocks (a client that
    /// did not ask has no use for them, and an unsigned block sent back to Claude is refused).
    thinking: bool,
    open: Option<Open>,
    /// The index of the next block.
    next_index: u32,
    finish_reason: Option<String>,
    usage: Option<Usage>,
}

impl Translator {
    /// A translator for a client that did (`thinking`) or did not ask for extended thinking.
    pub(crate) fn new(thinking: bool) -> Translator {
        Translator {
            thinking,
            ..Translator::default()
        }
    }

    /// The `message_start` of the stream of `model`.
    pub(crate) fn start(id: &str, model: &str) -> StreamEvent {
        StreamEvent::MessageStart {
            message: MessagesResponse {
                id: message_id(id),
                kind: "message".into(),
                role: "assistant".into(),
                content: Vec::new(),
                model: model.to_owned(),
                stop_reason: None,
                stop_sequence: None,
                usage: MessagesUsage::default(),
                extra: Extra::new(),
            },
        }
    }

    fn close(&mut self, out: &mut Vec<StreamEvent>) {
        if self.open.take().is_some() {
            out.push(StreamEvent::ContentBlockStop {
                index: self.next_index,
            });
            self.next_index += 1;
        }
    }

    fn open(&mut self, kind: Open, block: ContentBlock, out: &mut Vec<StreamEvent>) {
        self.close(out);
        self.open = Some(kind);
        out.push(StreamEvent::ContentBlockStart {
            index: self.next_index,
            content_block: block,
        });
    }

    /// Opens a `thinking` block unless one is open.
    fn open_thinking(&mut self, out: &mut Vec<StreamEvent>) {
        if self.open != Some(Open::Thinking) {
            let mut block = ContentBlock {
                kind: "thinking".into(),
                ..Default::default()
            };
            block.extra.insert("thinking".into(), json!(""));
            block.extra.insert("signature".into(), json!(""));
            self.open(Open::Thinking, block, out);
        }
    }

    /// The events of one chunk (of its first choice).
    pub(crate) fn chunk(&mut self, chunk: &ChatCompletionChunk, out: &mut Vec<StreamEvent>) {
        if let Some(u) = &chunk.usage {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return;
        };
        let field = |name: &str| {
            choice
                .delta
                .extra
                .get(name)
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
        };
        if let Some(thinking) = field("reasoning_content").filter(|_| self.thinking) {
            self.open_thinking(out);
            out.push(StreamEvent::ContentBlockDelta {
                index: self.next_index,
                delta: BlockDelta::ThinkingDelta {
                    thinking: thinking.to_owned(),
                },
            });
        }
        if let Some(signature) = field("reasoning_signature").filter(|_| self.thinking) {
            self.open_thinking(out);
            out.push(StreamEvent::ContentBlockDelta {
                index: self.next_index,
                delta: BlockDelta::SignatureDelta {
                    signature: signature.to_owned(),
                },
            });
        }
        if let Some(text) = choice.delta.content.as_deref().filter(|t| !t.is_empty()) {
            if self.open != Some(Open::Text) {
                self.open(Open::Text, ContentBlock::text(""), out);
            }
            out.push(StreamEvent::ContentBlockDelta {
                index: self.next_index,
                delta: BlockDelta::TextDelta {
                    text: text.to_owned(),
                },
            });
        }
        for call in choice
            .delta
            .extra
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let f = call.get("function");
            let id = call.get("id").and_then(Value::as_str);
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            if self.open != Some(Open::Tool(index)) {
                self.open(
                    Open::Tool(index),
                    ContentBlock::tool_use(
                        id.unwrap_or_default(),
                        name.unwrap_or_default(),
                        json!({}),
                    ),
                    out,
                );
            }
            if let Some(args) = f
                .and_then(|f| f.get("arguments"))
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                out.push(StreamEvent::ContentBlockDelta {
                    index: self.next_index,
                    delta: BlockDelta::InputJsonDelta {
                        partial_json: args.to_owned(),
                    },
                });
            }
        }
        if let Some(r) = &choice.finish_reason {
            self.finish_reason = Some(r.clone());
        }
    }

    /// The events of a complete end.
    pub(crate) fn finish(&mut self, out: &mut Vec<StreamEvent>) {
        self.close(out);
        out.push(StreamEvent::MessageDelta {
            delta: MessageDeltaBody {
                stop_reason: Some(stop_reason(self.finish_reason.as_deref()).to_owned()),
                stop_sequence: None,
                extra: Extra::new(),
            },
            usage: self.usage.as_ref().map(usage).unwrap_or_default(),
        });
        out.push(StreamEvent::MessageStop);
    }
}

/// `event: <type>` and `data: <json>` of each event.
fn frames(events: &[StreamEvent]) -> Bytes {
    let mut out = Vec::new();
    for e in events {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.name().as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serialising an event (strings, numbers, JSON values) cannot fail.
        out.extend_from_slice(&serde_json::to_vec(e).unwrap_or_default());
        out.extend_from_slice(b"\n\n");
    }
    Bytes::from(out)
}

/// `event: error` with the body in Anthropic's shape.
fn error_frame(e: ApiError) -> Bytes {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&e.in_dialect(ErrorDialect::Anthropic).body_json());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// What the stream relay has left to do.
enum Relay {
    Start(Box<GatewayStream>),
    Chunks(Box<GatewayStream>, Translator),
    Ended,
}

/// The SSE response of a Messages stream (see [`Translator`]); a failure after the
/// start is an `event: error` frame and the end of the body, with no `message_stop`.
fn stream_response(stream: GatewayStream, thinking: bool) -> Response {
    let mut headers = http::HeaderMap::new();
    put_route_headers(&mut headers, stream.model(), stream.attempts());
    let events = futures::stream::unfold(Relay::Start(Box::new(stream)), move |relay| async move {
        match relay {
            Relay::Ended => None,
            Relay::Start(mut stream) => {
                // The first chunk names the completion and the upstream model.
                let mut t = Translator::new(thinking);
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        let mut out = vec![Translator::start(&chunk.id, &chunk.model)];
                        t.chunk(&chunk, &mut out);
                        Some((Ok::<_, Infallible>(frames(&out)), Relay::Chunks(stream, t)))
                    }
                    Some(Err(e)) => {
                        let start = frames(&[Translator::start("", stream.model())]);
                        let mut bytes = start.to_vec();
                        bytes.extend_from_slice(&error_frame(ApiError::from(e)));
                        Some((Ok(Bytes::from(bytes)), Relay::Ended))
                    }
                    None => {
                        let mut out = vec![Translator::start("", stream.model())];
                        t.finish(&mut out);
                        Some((Ok(frames(&out)), Relay::Ended))
                    }
                }
            }
            Relay::Chunks(mut stream, mut t) => {
                let mut out = Vec::new();
                loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            t.chunk(&chunk, &mut out);
                            if !out.is_empty() {
                                return Some((Ok(frames(&out)), Relay::Chunks(stream, t)));
                            }
                        }
                        Some(Err(e)) => {
                            return Some((Ok(error_frame(ApiError::from(e))), Relay::Ended));
                        }
                        None => {
                            t.finish(&mut out);
                            return Some((Ok(frames(&out)), Relay::Ended));
                        }
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(events));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.extend(headers);
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn req(v: Value) -> MessagesRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_conversation_with_tools_and_images_translates_to_chat() {
        let chat = to_chat(req(json!({
            "model": "m", "max_tokens": 50, "stop_sequences": ["END"], "top_p": 0.5,
            "temperature": 0.1, "metadata": {"user_id": "u1"},
            "system": [{"type": "text", "text": "be brief"}],
            "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                    {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "thanks"}]}
            ]
        })))
        .unwrap();
        let v = serde_json::to_value(&chat).unwrap();
        assert_eq!(
            v,
            json!({
                "model": "m", "max_tokens": 50, "temperature": 0.1, "user": "u1",
                "stop": ["END"], "top_p": 0.5,
                "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": "Let me look.", "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "toolu_1"},
                    {"role": "user", "content": "thanks"}
                ]
            })
        );
    }

    #[test]
    fn what_cannot_be_translated_is_a_400_naming_it() {
        for (body, path) in [
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
                "tools[0]",
            ),
        ] {
            let e = to_chat(req(body)).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
            let v: Value =
                serde_json::from_slice(&e.in_dialect(ErrorDialect::Anthropic).body_json()).unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert_eq!(v["error"]["param"], path);
        }
    }

    #[test]
    fn reasoning_becomes_a_thinking_block_only_for_a_client_that_asked() {
        let c: ChatCompletion = serde_json::from_value(json!({
            "id": "c", "model": "deepseek",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": "4", "reasoning_content": "2 and 2"}}]
        }))
        .unwrap();
        let asked = serde_json::to_value(from_chat(&c, true)).unwrap();
        assert_eq!(
            asked["content"],
            json!([{"type": "thinking", "thinking": "2 and 2", "signature": ""},
                   {"type": "text", "text": "4"}])
        );
        let not_asked = serde_json::to_value(from_chat(&c, false)).unwrap();
        assert_eq!(not_asked["content"], json!([{"type": "text", "text": "4"}]));
    }

    #[test]
    fn a_completion_translates_to_a_message() {
        let c: ChatCompletion = serde_json::from_value(json!({
            "id": "chatcmpl-1", "model": "smollm2",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": "Checking.",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                               {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 7, "total_tokens": 107,
                      "prompt_tokens_details": {"cached_tokens": 60}}
        }))
        .unwrap();
        let m = serde_json::to_value(from_chat(&c, false)).unwrap();
        assert_eq!(
            m,
            json!({
                "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "smollm2",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": "not json"}],
                "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": 40, "output_tokens": 7, "cache_read_input_tokens": 60}
            })
        );
        for (f, s) in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("content_filter", "refusal"),
            ("tool_calls", "tool_use"),
        ] {
            assert_eq!(stop_reason(Some(f)), s);
        }
    }

    fn chunk(v: Value) -> ChatCompletionChunk {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn stream_chunks_become_block_events_in_order() {
        let mut t = Translator::default();
        let mut out = Vec::new();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": " there"}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}),
        ] {
            t.chunk(&chunk(c), &mut out);
        }
        t.finish(&mut out);
        let got: Vec<Value> = out
            .iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "c1", "name": "f", "input": {}}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"a\":"}}),
                json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "1}"}}),
                json!({"type": "content_block_stop", "index": 1}),
                json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "c2", "name": "g", "input": {}}}),
                json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": "{}"}}),
                json!({"type": "content_block_stop", "index": 2}),
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"input_tokens": 9, "output_tokens": 4}}),
                json!({"type": "message_stop"}),
            ]
        );
    }
}
