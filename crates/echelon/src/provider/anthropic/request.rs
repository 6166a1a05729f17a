//! The body of an Anthropic Messages request, translated from a [`ProviderRequest`], and
//! the answer translated back into a [`ChatCompletion`].

use echelon_types::anthropic::{
    Content, ContentBlock, Message, MessagesRequest, MessagesResponse, MessagesUsage, Metadata,
    Tool,
};
use echelon_types::{
    ChatCompletion, ChatCompletionRequest, ChatMessage, Choice, Extra, NativeMessages,
    NativeRequest, Role, Usage,
};
use serde_json::{Value, json};

use crate::provider::ProviderRequest;

/// `max_tokens` sent when neither the request nor the echelon sets a cap: Anthropic
/// requires one. 4,096 tokens, the largest output every current Claude model allows.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The Messages request for `req`.
///
/// System and developer messages are hoisted into `system` (joined by blank lines);
/// user content parts become `text` and `image` blocks (a `data:` URL as a base64
/// source, any other URL as a `url` source); an assistant's `tool_calls` become
/// `tool_use` blocks (arguments parsed as JSON; text that is not JSON sent as
/// `{}`), its `content` a text block; `tool` messages become `tool_result` blocks of a
/// user turn (consecutive ones in one turn). `max_tokens` is always sent (the request's,
/// else the echelon's, else [`DEFAULT_MAX_TOKENS`]); `stop` → `stop_sequences`,
/// `temperature`, `top_p`, `top_k` as they are, `user` → `metadata.user_id`, function
/// tools → tools (`parameters` → `input_schema`), `tool_choice` `auto`/`required`/
/// `none`/`{function}` → `auto`/`any`/`none`/`tool`, `parallel_tool_calls: false` →
/// `disable_parallel_tool_use`. A `response_format` of `json_schema` or `json_object` on
/// a request without tools of its own becomes a forced tool call ([`structured_tool`]);
/// with tools of its own it is not sent. Other OpenAI fields (`seed`, `n`, `logprobs`,
/// …) have no Anthropic equivalent and are not sent.
///
/// A request that came in the Messages dialect ([`native_of`]) is sent as the client
/// wrote it, unknown fields and blocks (`thinking`, `cache_control`, server tools)
/// included, with the route's model name, generation cap, temperature default and stream
/// flag; if the gateway changed its conversation since (a prefill or a continuation
/// added a turn), the changed chat messages are translated and the client's other
/// top-level fields kept.
pub(super) fn to_messages(req: &ProviderRequest<'_>) -> MessagesRequest {
    match native_of(req.body) {
        Some(native) if native.chat_messages == req.body.messages.len() => {
            let sent = &native.request;
            MessagesRequest {
                model: req.model.to_owned(),
                max_tokens: Some(req.effective_max_tokens().unwrap_or(DEFAULT_MAX_TOKENS)),
                temperature: req.effective_temperature(),
                stream: req.stream.then_some(true),
                ..sent.clone()
            }
        }
        Some(native) => {
            let mut m = translate(req);
            let sent = &native.request;
            for (k, v) in &sent.extra {
                m.extra.entry(k.clone()).or_insert_with(|| v.clone());
            }
            if sent.metadata.is_some() {
                m.metadata.clone_from(&sent.metadata);
            }
            m
        }
        None => translate(req),
    }
}

/// The client's own Messages request behind `body`, if it came as one.
pub(super) fn native_of(body: &ChatCompletionRequest) -> Option<&NativeMessages> {
    match body.native.as_deref() {
        Some(NativeRequest::Anthropic(n)) => Some(n),
        Some(NativeRequest::Responses(_)) | None => None,
    }
}

/// [`to_messages`] for a request that did not come in the Messages dialect.
fn translate(req: &ProviderRequest<'_>) -> MessagesRequest {
    let body = req.body;
    let mut system = Vec::new();
    let mut messages: Vec<Message> = Vec::with_capacity(body.messages.len());
    for m in &body.messages {
        match m.role {
            Role::System | Role::Developer => {
                let t = m.text();
                if !t.is_empty() {
                    system.push(t);
                }
            }
            Role::User => messages.push(Message {
                role: "user".into(),
                content: user_content(&m.content),
                extra: Extra::new(),
            }),
            Role::Assistant => messages.push(assistant(m)),
            Role::Tool | Role::Function => {
                let block = ContentBlock {
                    kind: "tool_result".into(),
                    tool_use_id: Some(
                        m.extra
                            .get("tool_call_id")
                            .or_else(|| m.extra.get("name"))
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    content: Some(Content::Text(m.text())),
                    ..Default::default()
                };
                match messages.last_mut() {
                    Some(Message {
                        role,
                        content: Content::Blocks(blocks),
                        ..
                    }) if role == "user" && blocks.iter().all(|b| b.kind == "tool_result") => {
                        blocks.push(block);
                    }
                    _ => messages.push(Message {
                        role: "user".into(),
                        content: Content::Blocks(vec![block]),
                        extra: Extra::new(),
                    }),
                }
            }
        }
    }
    let extra = &body.extra;
    let stop_sequences = match extra.get("stop") {
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
        ),
        _ => None,
    };
    let tools: Option<Vec<Tool>> = extra.get("tools").and_then(Value::as_array).map(|tools| {
        tools
            .iter()
            .filter_map(|t| {
                let f = t.get("function")?;
                Some(Tool {
                    name: f.get("name")?.as_str()?.to_owned(),
                    description: f
                        .get("description")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    input_schema: Some(
                        f.get("parameters")
                            .cloned()
                            .unwrap_or_else(|| json!({"type": "object"})),
                    ),
                    extra: Extra::new(),
                })
            })
            .collect()
    });
    let mut tool_choice = extra.get("tool_choice").and_then(|c| match c {
        Value::String(s) if s == "auto" => Some(json!({"type": "auto"})),
        Value::String(s) if s == "required" => Some(json!({"type": "any"})),
        Value::String(s) if s == "none" => Some(json!({"type": "none"})),
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .map(|name| json!({"type": "tool", "name": name})),
        _ => None,
    });
    if extra.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false)
        && tools.as_ref().is_some_and(|t| !t.is_empty())
    {
        let choice = tool_choice.get_or_insert_with(|| json!({"type": "auto"}));
        if let Some(o) = choice.as_object_mut() {
            o.insert("disable_parallel_tool_use".into(), Value::Bool(true));
        }
    }
    let tools = match structured_tool(body) {
        Some(tool) => {
            tool_choice = Some(json!({"type": "tool", "name": tool.name}));
            Some(vec![tool])
        }
        None => tools,
    };
    MessagesRequest {
        model: req.model.to_owned(),
        messages,
        system: (!system.is_empty()).then(|| Content::Text(system.join("\n\n"))),
        max_tokens: Some(req.effective_max_tokens().unwrap_or(DEFAULT_MAX_TOKENS)),
        stop_sequences: stop_sequences.filter(|s| !s.is_empty()),
        temperature: req.effective_temperature(),
        top_p: extra.get("top_p").and_then(Value::as_f64),
        top_k: extra
            .get("top_k")
            .and_then(Value::as_u64)
            .and_then(|k| u32::try_from(k).ok()),
        tools: tools.filter(|t| !t.is_empty()),
        tool_choice,
        stream: req.stream.then_some(true),
        metadata: body.user.as_ref().map(|u| Metadata {
            user_id: Some(u.clone()),
            extra: Extra::new(),
        }),
        extra: Extra::new(),
    }
}

/// The name of [`structured_tool`] for a `json_object` format, or a `json_schema` one
/// without a usable name.
pub(super) const STRUCTURED_TOOL: &str = "json_response";

/// The tool a structured-output request is answered through on the Messages wire, which
/// has no `response_format`: for a chat request (not one that came in the Messages
/// dialect) with `response_format: {type: json_schema, json_schema: {name, description,
/// schema}}` and no tools of its own, a tool of that name (characters outside
/// `[A-Za-z0-9_-]` as `_`, at most 64, Anthropic's rule; empty as [`STRUCTURED_TOOL`])
/// whose `input_schema` is the schema (`{"type": "object"}` when absent); for
/// `{type: json_object}` the tool [`STRUCTURED_TOOL`] with that permissive schema. The
/// request forces it (`tool_choice: {type: tool, name}`), and its `tool_use` block in
/// the answer is read back as the message's text (the input as JSON), finishing `stop`:
/// Anthropic's way of getting JSON out of Claude (its "JSON mode" guide). `strict` is
/// not sent. `None` for any other request, one with tools of its own included (its
/// `response_format` is then not sent, as before).
pub(super) fn structured_tool(body: &ChatCompletionRequest) -> Option<Tool> {
    if native_of(body).is_some() {
        return None;
    }
    let extra = &body.extra;
    if extra
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty())
    {
        return None;
    }
    let format = extra.get("response_format")?;
    let permissive = || json!({"type": "object"});
    match format.get("type").and_then(Value::as_str)? {
        "json_object" => Some(Tool {
            name: STRUCTURED_TOOL.to_owned(),
            description: Some("Answer with a JSON object.".to_owned()),
            input_schema: Some(permissive()),
            extra: Extra::new(),
        }),
        "json_schema" => {
            let spec = format.get("json_schema");
            let name: String = spec
                .and_then(|s| s.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect();
            Some(Tool {
                name: if name.is_empty() {
                    STRUCTURED_TOOL.to_owned()
                } else {
                    name
                },
                description: Some(
                    spec.and_then(|s| s.get("description"))
                        .and_then(Value::as_str)
                        .unwrap_or("Answer with a JSON object that follows this schema.")
                        .to_owned(),
                ),
                input_schema: Some(
                    spec.and_then(|s| s.get("schema"))
                        .cloned()
                        .unwrap_or_else(permissive),
                ),
                extra: Extra::new(),
            })
        }
        _ => None,
    }
}

/// The name of the tool [`structured_tool`] forces for `body`, if any.
pub(super) fn structured_tool_name(body: &ChatCompletionRequest) -> Option<String> {
    structured_tool(body).map(|t| t.name)
}

/// A user message's content: a string as it is, parts as blocks.
fn user_content(content: &Value) -> Content {
    let Value::Array(parts) = content else {
        return Content::Text(content.as_str().unwrap_or_default().to_owned());
    };
    Content::Blocks(
        parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => Some(ContentBlock::text(
                    p.get("text").and_then(Value::as_str).unwrap_or_default(),
                )),
                Some("image_url") => {
                    let url = p
                        .pointer("/image_url/url")
                        .or_else(|| p.get("image_url"))
                        .and_then(Value::as_str)?;
                    Some(ContentBlock {
                        kind: "image".into(),
                        source: Some(image_source(url)),
                        ..Default::default()
                    })
                }
                _ => None,
            })
            .collect(),
    )
}

/// An image URL as an Anthropic image source: `data:<type>;base64,<data>` as a base64
/// source, anything else as a `url` source.
fn image_source(url: &str) -> Value {
    if let Some(rest) = url.strip_prefix("data:")
        && let Some((media_type, data)) = rest.split_once(";base64,")
    {
        return json!({"type": "base64", "media_type": media_type, "data": data});
    }
    json!({"type": "url", "url": url})
}

/// An assistant message as blocks: its text, then a `tool_use` per tool call.
fn assistant(m: &ChatMessage) -> Message {
    let text = m.text();
    let calls = m.extra.get("tool_calls").and_then(Value::as_array);
    if calls.is_none_or(Vec::is_empty) {
        return Message {
            role: "assistant".into(),
            content: Content::Text(text),
            extra: Extra::new(),
        };
    }
    let mut blocks = Vec::new();
    if !text.is_empty() {
        blocks.push(ContentBlock::text(text));
    }
    for call in calls.into_iter().flatten() {
        let f = call.get("function");
        let args = f
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let input = serde_json::from_str::<Value>(args)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        blocks.push(ContentBlock::tool_use(
            call.get("id").and_then(Value::as_str).unwrap_or_default(),
            f.and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .unwrap_or_default(),
            input,
        ));
    }
    Message {
        role: "assistant".into(),
        content: Content::Blocks(blocks),
        extra: Extra::new(),
    }
}

/// The chat `finish_reason` of an Anthropic `stop_reason`: `end_turn`, `stop_sequence`
/// and `pause_turn` → `stop`, `max_tokens` → `length`, `tool_use` → `tool_calls`,
/// `refusal` → `content_filter`; an unknown one passes as it is.
pub(super) fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

/// Chat usage of Anthropic usage: `prompt_tokens` is the whole prompt, the sum of
/// `input_tokens`, `cache_creation_input_tokens` and `cache_read_input_tokens`; the
/// cache reads in
/// `prompt_tokens_details.cached_tokens`, the cache writes in
/// `cache_creation_input_tokens` (what the ledger prices at `cache_write_per_1m`).
pub(super) fn usage(u: &MessagesUsage) -> Usage {
    let written = u.cache_creation_input_tokens.unwrap_or(0);
    let read = u.cache_read_input_tokens.unwrap_or(0);
    let prompt = u.input_tokens.saturating_add(written).saturating_add(read);
    let mut extra = Extra::new();
    extra.insert(
        "prompt_tokens_details".into(),
        json!({"cached_tokens": read}),
    );
    extra.insert("cache_creation_input_tokens".into(), json!(written));
    Usage {
        prompt_tokens: prompt,
        completion_tokens: u.output_tokens,
        total_tokens: prompt.saturating_add(u.output_tokens),
        extra,
    }
}

/// The chat completion of a Messages answer: text blocks joined as `content` (null
/// when there is none and there are tool calls), `tool_use` blocks as `tool_calls`
/// (input as JSON text), `thinking` blocks' text as `reasoning_content`, the stop
/// reason by [`finish_reason`] (none stays none: the answer may be incomplete), usage
/// by [`usage`]. With `structured` (the name of the request's [`structured_tool`]) a
/// `tool_use` block of that tool is the message's text instead (its input as JSON), and
/// `tool_use` finishes as `stop` when no other tool was called.
pub(super) fn to_completion(m: MessagesResponse, structured: Option<&str>) -> ChatCompletion {
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    let mut answered = false;
    for b in &m.content {
        match b.kind.as_str() {
            "text" => text.push_str(b.text.as_deref().unwrap_or_default()),
            "tool_use" if structured.is_some() && b.name.as_deref() == structured => {
                answered = true;
                text.push_str(
                    &b.input
                        .as_ref()
                        .map_or_else(|| "{}".to_owned(), Value::to_string),
                );
            }
            "thinking" => thinking.push_str(
                b.extra
                    .get("thinking")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            ),
            "tool_use" => calls.push(json!({
                "id": b.id.as_deref().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": b.name.as_deref().unwrap_or_default(),
                    "arguments": b.input.as_ref().map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })),
            _ => {}
        }
    }
    let structured_answer = answered && calls.is_empty();
    let mut message = serde_json::Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if text.is_empty() && !calls.is_empty() {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    if !thinking.is_empty() {
        message.insert("reasoning_content".into(), Value::String(thinking));
    }
    ChatCompletion {
        id: m.id,
        object: "chat.completion".into(),
        created: now_secs(),
        model: m.model,
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: m.stop_reason.as_deref().map(|r| match r {
                "tool_use" if structured_answer => "stop".to_owned(),
                r => finish_reason(r),
            }),
            extra: Extra::new(),
        }],
        usage: Some(usage(&m.usage)),
        extra: Extra::new(),
        native: None,
    }
}

/// Unix time, seconds.
pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use echelon_types::ChatCompletionRequest;

    fn wire(body: Value, max_tokens: Option<u32>) -> Value {
        let body: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        let req = ProviderRequest {
            max_tokens,
            ..ProviderRequest::new(&body, "claude-x", false)
        };
        serde_json::to_value(to_messages(&req)).unwrap()
    }

    /// A chat request translated from `sent` (as `/v1/messages` does: one chat message per
    /// Messages turn here), carrying `sent` as its native request.
    fn with_native(sent: Value, chat: Value) -> ChatCompletionRequest {
        let request: MessagesRequest = serde_json::from_value(sent).unwrap();
        let mut body: ChatCompletionRequest = serde_json::from_value(chat).unwrap();
        body.native = Some(std::sync::Arc::new(NativeRequest::Anthropic(
            NativeMessages {
                chat_messages: request.messages.len(),
                request,
                version: None,
                beta: None,
            },
        )));
        body
    }

    #[test]
    fn a_native_request_is_sent_as_it_came_with_the_routes_model_and_cap() {
        let body = with_native(
            json!({"model": "route", "max_tokens": 50, "thinking": {"type": "enabled", "budget_tokens": 20},
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}),
            json!({"model": "route", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}),
        );
        let req = ProviderRequest {
            temperature: Some(0.2),
            ..ProviderRequest::new(&body, "claude-x", true)
        };
        let v = serde_json::to_value(to_messages(&req)).unwrap();
        assert_eq!(v["model"], "claude-x");
        assert_eq!(v["max_tokens"], 50);
        assert_eq!(v["temperature"], 0.2, "the echelon's default applies");
        assert_eq!(v["stream"], true);
        assert_eq!(v["thinking"]["budget_tokens"], 20);
        assert_eq!(
            v["messages"][0]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
    }

    #[test]
    fn a_changed_conversation_is_translated_and_keeps_the_clients_top_level_fields() {
        // A continuation added an assistant turn: two chat messages, one Messages turn.
        let body = with_native(
            json!({"model": "route", "max_tokens": 50, "thinking": {"type": "enabled", "budget_tokens": 20},
                   "metadata": {"user_id": "u9"},
                   "messages": [{"role": "user", "content": "hi"}]}),
            json!({"model": "route", "max_tokens": 50, "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hel"}]}),
        );
        let v = serde_json::to_value(to_messages(&ProviderRequest::new(&body, "claude-x", false)))
            .unwrap();
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
        assert_eq!(v["messages"][1]["role"], "assistant");
        assert_eq!(v["thinking"]["budget_tokens"], 20);
        assert_eq!(v["metadata"]["user_id"], "u9");
    }

    #[test]
    fn a_chat_request_becomes_a_messages_request() {
        let v = wire(
            json!({
                "model": "route", "temperature": 0.3, "stop": "END", "top_p": 0.9, "user": "u1",
                "seed": 4, "response_format": {"type": "json_object"},
                "tools": [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}],
                "tool_choice": "required", "parallel_tool_calls": false,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "developer", "content": "be kind"},
                    {"role": "user", "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "one"},
                    {"role": "tool", "tool_call_id": "c2", "content": "two"},
                    {"role": "user", "content": "and?"}
                ]
            }),
            None,
        );
        assert_eq!(
            v,
            json!({
                "model": "claude-x", "max_tokens": 4096, "temperature": 0.3, "top_p": 0.9,
                "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                "system": "be brief\n\nbe kind",
                "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "look"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAA"}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
                    {"role": "assistant", "content": [
                        {"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}},
                        {"type": "tool_use", "id": "c2", "name": "f", "input": {}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "one"},
                        {"type": "tool_result", "tool_use_id": "c2", "content": "two"}]},
                    {"role": "user", "content": "and?"}
                ]
            })
        );
    }

    #[test]
    fn max_tokens_comes_from_the_request_then_the_echelon_then_the_default() {
        let ask = json!({"model": "r", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(wire(ask.clone(), None)["max_tokens"], 4096);
        assert_eq!(wire(ask.clone(), Some(100))["max_tokens"], 100);
        let mut own = ask;
        own["max_completion_tokens"] = json!(7);
        assert_eq!(wire(own, Some(100))["max_tokens"], 7);
    }

    #[test]
    fn a_message_becomes_a_completion_with_cache_usage() {
        let m: MessagesResponse = serde_json::from_value(json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Sure."},
                        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 1000}
        }))
        .unwrap();
        let c = serde_json::to_value(to_completion(m, None)).unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["choices"][0]["message"]["content"], "Sure.");
        assert_eq!(c["choices"][0]["message"]["reasoning_content"], "hmm");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0],
            json!({"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}})
        );
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 1110, "completion_tokens": 5, "total_tokens": 1115,
                   "prompt_tokens_details": {"cached_tokens": 1000}, "cache_creation_input_tokens": 100})
        );
    }

    #[test]
    fn a_json_schema_format_without_tools_is_a_forced_tool() {
        let schema = json!({"type": "object", "properties": {"score": {"type": "integer"}},
                            "required": ["score"], "additionalProperties": false});
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": "rate"}],
                   "response_format": {"type": "json_schema",
                       "json_schema": {"name": "verdict", "strict": true, "schema": schema}}}),
            None,
        );
        assert_eq!(
            v["tools"],
            json!([{"name": "verdict",
                    "description": "Answer with a JSON object that follows this schema.",
                    "input_schema": schema}])
        );
        assert_eq!(v["tool_choice"], json!({"type": "tool", "name": "verdict"}));
        assert!(v.get("response_format").is_none(), "{v}");

        // json_object: the same with a permissive schema; an odd name is made valid.
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}],
                   "response_format": {"type": "json_object"}}),
            None,
        );
        assert_eq!(v["tools"][0]["name"], STRUCTURED_TOOL);
        assert_eq!(v["tools"][0]["input_schema"], json!({"type": "object"}));
        assert_eq!(
            v["tool_choice"],
            json!({"type": "tool", "name": STRUCTURED_TOOL})
        );
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "my verdict!"}}}),
            None,
        );
        assert_eq!(v["tools"][0]["name"], "my_verdict_");
        assert_eq!(v["tools"][0]["input_schema"], json!({"type": "object"}));

        // Plain text: nothing forced.
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}],
                   "response_format": {"type": "text"}}),
            None,
        );
        assert!(
            v.get("tools").is_none() && v.get("tool_choice").is_none(),
            "{v}"
        );
    }

    #[test]
    fn a_request_with_its_own_tools_keeps_them_and_drops_the_format() {
        let v = wire(
            json!({"model": "r", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
                   "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": {"type": "object"}}}}),
            None,
        );
        assert_eq!(v["tools"].as_array().unwrap().len(), 1);
        assert_eq!(v["tools"][0]["name"], "f");
        assert_eq!(v["tool_choice"], json!({"type": "auto"}));
    }

    fn tool_answer(blocks: Value) -> MessagesResponse {
        serde_json::from_value(json!({
            "id": "msg_2", "type": "message", "role": "assistant", "model": "claude-x",
            "content": blocks, "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5}
        }))
        .unwrap()
    }

    #[test]
    fn the_forced_tools_input_is_the_answers_text_finishing_stop() {
        let blocks = json!([{"type": "tool_use", "id": "toolu_1", "name": "verdict", "input": {"score": 7}}]);
        let c = serde_json::to_value(to_completion(tool_answer(blocks.clone()), Some("verdict")))
            .unwrap();
        let choice = &c["choices"][0];
        assert_eq!(choice["message"]["content"], "{\"score\":7}");
        assert!(choice["message"].get("tool_calls").is_none(), "{c}");
        assert_eq!(choice["finish_reason"], "stop");

        // Without the structured tool (or another tool's call) it stays a tool call.
        let c = serde_json::to_value(to_completion(tool_answer(blocks.clone()), None)).unwrap();
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        let c = serde_json::to_value(to_completion(tool_answer(blocks), Some("other"))).unwrap();
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "verdict"
        );
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    }
}
