//! A `POST /v1/responses` body, checked and translated to a chat-completion request.
//!
//! The body is walked as JSON so that every refusal names the Responses path at fault
//! (`input[2].content[0].type`), not a path of the chat request it becomes.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::request_check::type_name;
use crate::{
    ChatCompletionRequest, ChatMessage, Extra, NativeRequest, NativeResponses, RequestError, Role,
    StreamOptions,
};

/// Fields of a Responses request that chat completions has under the same name and
/// meaning: passed through as they came. The sampling extras (`top_k`, `min_p`,
/// `repetition_penalty`) are the ones vLLM and llama-server read.
const SAME_IN_CHAT: [&str; 13] = [
    "parallel_tool_calls",
    "seed",
    "stop",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "top_k",
    "min_p",
    "repetition_penalty",
];

/// What a Responses request becomes: the chat request to route, and what the answer's
/// Response object echoes back.
#[derive(Debug, Clone, PartialEq)]
pub struct TranslatedRequest {
    /// The chat-completion request, `model` the Responses `model` (a route).
    pub chat: ChatCompletionRequest,
    /// The request's settings as the Response object repeats them.
    pub echo: Echo,
    /// Top-level fields that have no chat equivalent and were dropped (`include`,
    /// `truncation`, …), for a debug log.
    pub ignored: Vec<String>,
}

/// A Responses request's settings, repeated in its Response object as OpenAI does
/// (`instructions`, `tools`, `temperature`, …); `Value::Null` where the request set none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Echo {
    /// `instructions`, as sent.
    pub instructions: Value,
    /// `max_output_tokens`.
    pub max_output_tokens: Option<u32>,
    /// `metadata` (an object; `{}` when not sent). Echoed only, not sent upstream.
    pub metadata: Map<String, Value>,
    /// `parallel_tool_calls`; OpenAI's default is `true`.
    pub parallel_tool_calls: bool,
    /// `reasoning`, as sent.
    pub reasoning: Value,
    /// `temperature`.
    pub temperature: Value,
    /// `text` (with `format`), as sent; `{"format": {"type": "text"}}` when not.
    pub text: Value,
    /// `tool_choice`, as sent; `"auto"` when not.
    pub tool_choice: Value,
    /// `tools`, in the Responses shape, as sent.
    pub tools: Vec<Value>,
    /// `top_p`.
    pub top_p: Value,
    /// `user`.
    pub user: Value,
}

/// Parses a `POST /v1/responses` body and translates it to a chat-completion request,
/// which carries the body as sent in [`ChatCompletionRequest::native`].
///
/// `input` (a string, or message / `function_call` / `function_call_output` items)
/// becomes `messages`, `instructions` a system message before them; function `tools`
/// and `tool_choice` take chat's nested shape; `max_output_tokens` → `max_tokens`;
/// `text.format` → `response_format`; `reasoning.effort` → `reasoning_effort`. A stream
/// asks for usage (`stream_options.include_usage`), which `response.completed` carries.
///
/// # Errors
/// [`RequestError`] naming the path at fault when the body is not a JSON object, `model`
/// or `input` is missing or mistyped, an item or content part is of a kind chat
/// completions cannot carry (hosted tools, `item_reference`, files by id), or the request
/// needs state the gateway does not keep (`previous_response_id`, `store: true`,
/// `conversation`, `background: true`, `prompt`).
pub fn parse_responses_request(body: &[u8]) -> Result<TranslatedRequest, RequestError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RequestError {
        path: None,
        message: format!(
            "request body is not valid JSON: {e} (line {}, column {})",
            e.line(),
            e.column()
        ),
    })?;
    let Value::Object(obj) = value else {
        return Err(RequestError {
            path: None,
            message: format!(
                "request body must be a JSON object, found {}",
                type_name(&value)
            ),
        });
    };
    // The request as sent rides beside its translation, for a provider that serves the
    // Responses API itself (`responses: true`).
    let body = obj.clone();
    let mut translated = translate(obj)?;
    let chat = &mut translated.chat;
    chat.native = Some(Arc::new(NativeRequest::Responses(NativeResponses {
        body,
        chat_messages: chat.messages.len(),
    })));
    Ok(translated)
}

fn translate(mut obj: Map<String, Value>) -> Result<TranslatedRequest, RequestError> {
    refuse_state(&obj)?;
    let model = match obj.remove("model") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) => return Err(RequestError::at("model", "must not be empty")),
        Some(v) => return Err(expected("model", "a string", &v)),
        None => return Err(RequestError::at("model", "missing required field")),
    };
    let mut messages = Vec::new();
    let instructions = obj.remove("instructions").unwrap_or(Value::Null);
    match &instructions {
        Value::Null => {}
        Value::String(s) => messages.push(ChatMessage::new(Role::System, s.clone())),
        v => return Err(expected("instructions", "a string", v)),
    }
    match obj.remove("input") {
        Some(Value::String(s)) => messages.push(ChatMessage::new(Role::User, s)),
        Some(Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                push_item(&mut messages, i, item)?;
            }
        }
        Some(v) => return Err(expected("input", "a string or an array of items", &v)),
        None => return Err(RequestError::at("input", "missing required field")),
    }
    if messages.is_empty() {
        return Err(RequestError::at(
            "input",
            "must contain at least one item (or send `instructions`)",
        ));
    }

    let mut chat = ChatCompletionRequest::new(model, messages);
    let mut echo = Echo {
        instructions,
        parallel_tool_calls: true,
        tool_choice: json!("auto"),
        text: json!({"format": {"type": "text"}}),
        ..Echo::default()
    };
    if let Some(v) = take(&mut obj, "stream") {
        let Value::Bool(b) = v else {
            return Err(expected("stream", "a boolean", &v));
        };
        chat.stream = Some(b);
        if b {
            chat.stream_options = Some(StreamOptions {
                include_usage: Some(true),
                extra: Extra::new(),
            });
        }
    }
    if let Some(v) = take(&mut obj, "max_output_tokens") {
        let n = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| expected("max_output_tokens", "a non-negative integer", &v))?;
        chat.max_tokens = Some(n);
        echo.max_output_tokens = Some(n);
    }
    if let Some(v) = take(&mut obj, "temperature") {
        let t = v
            .as_f64()
            .ok_or_else(|| expected("temperature", "a number", &v))?;
        chat.temperature = Some(t);
        echo.temperature = v;
    }
    if let Some(v) = take(&mut obj, "top_p") {
        if !v.is_number() {
            return Err(expected("top_p", "a number", &v));
        }
        chat.extra.insert("top_p".into(), v.clone());
        echo.top_p = v;
    }
    if let Some(v) = take(&mut obj, "user") {
        let Value::String(u) = &v else {
            return Err(expected("user", "a string", &v));
        };
        chat.user = Some(u.clone());
        echo.user = v;
    }
    if let Some(v) = take(&mut obj, "metadata") {
        let Value::Object(m) = v else {
            return Err(expected("metadata", "an object", &v));
        };
        echo.metadata = m;
    }
    if let Some(v) = take(&mut obj, "tools") {
        let Value::Array(tools) = v else {
            return Err(expected("tools", "an array", &v));
        };
        let chat_tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| chat_tool(i, t))
            .collect::<Result<Vec<_>, _>>()?;
        chat.extra.insert("tools".into(), Value::Array(chat_tools));
        echo.tools = tools;
    }
    if let Some(v) = take(&mut obj, "tool_choice") {
        chat.extra
            .insert("tool_choice".into(), chat_tool_choice(&v)?);
        echo.tool_choice = v;
    }
    if let Some(v) = take(&mut obj, "text") {
        let Value::Object(text) = &v else {
            return Err(expected("text", "an object", &v));
        };
        if let Some(format) = text.get("format").filter(|f| !f.is_null())
            && let Some(rf) = response_format(format)?
        {
            chat.extra.insert("response_format".into(), rf);
        }
        if let Some(verbosity) = text.get("verbosity").filter(|f| !f.is_null()) {
            chat.extra.insert("verbosity".into(), verbosity.clone());
        }
        echo.text = v;
    }
    if let Some(v) = take(&mut obj, "reasoning") {
        if let Some(effort) = v.get("effort").filter(|e| !e.is_null()) {
            chat.extra.insert("reasoning_effort".into(), effort.clone());
        }
        echo.reasoning = v;
    }
    if let Some(v) = obj.get("parallel_tool_calls") {
        echo.parallel_tool_calls = v.as_bool().unwrap_or(true);
    }
    for key in SAME_IN_CHAT {
        if let Some(v) = take(&mut obj, key) {
            chat.extra.insert(key.into(), v);
        }
    }
    // `store: false`, `previous_response_id: null` and the like asked for nothing.
    let ignored = obj
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k)
        .filter(|k| k != "store" && k != "previous_response_id" && k != "background")
        .collect();
    Ok(TranslatedRequest {
        chat,
        echo,
        ignored,
    })
}

/// The fields that need a response store: a 400 saying none is kept.
fn refuse_state(obj: &Map<String, Value>) -> Result<(), RequestError> {
    const STATELESS: &str = "Echelon keeps no response state (the Responses API is served \
                             stateless)";
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(RequestError::at(
            "previous_response_id",
            format!("{STATELESS}: send the whole conversation in `input` instead"),
        ));
    }
    if obj.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(RequestError::at(
            "conversation",
            format!("{STATELESS}: send the whole conversation in `input` instead"),
        ));
    }
    if obj.get("store") == Some(&Value::Bool(true)) {
        return Err(RequestError::at(
            "store",
            format!("{STATELESS}: responses are not stored; send `store: false` or leave it out"),
        ));
    }
    if obj.get("background") == Some(&Value::Bool(true)) {
        return Err(RequestError::at(
            "background",
            format!("{STATELESS}: a background response could not be fetched later"),
        ));
    }
    if obj.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(RequestError::at(
            "prompt",
            "stored prompt templates are not available through Echelon: send the prompt in \
             `instructions` and `input`",
        ));
    }
    Ok(())
}

/// Removes `key`, `None` when absent or null.
fn take(obj: &mut Map<String, Value>, key: &str) -> Option<Value> {
    obj.remove(key).filter(|v| !v.is_null())
}

fn expected(path: impl Into<String>, what: &str, found: &Value) -> RequestError {
    RequestError::at(path, format!("expected {what}, found {}", type_name(found)))
}

fn str_field<'a>(
    item: &'a Map<String, Value>,
    key: &str,
    path: &str,
) -> Result<&'a str, RequestError> {
    match item.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(expected(format!("{path}.{key}"), "a string", v)),
        None => Err(RequestError::at(
            format!("{path}.{key}"),
            "missing required field",
        )),
    }
}

/// Appends the chat message(s) of `input[i]`.
fn push_item(messages: &mut Vec<ChatMessage>, i: usize, item: Value) -> Result<(), RequestError> {
    let path = format!("input[{i}]");
    let Value::Object(item) = item else {
        return Err(expected(path, "an item object", &item));
    };
    let kind = match item.get("type") {
        Some(Value::String(t)) => t.as_str(),
        // The "easy" message form: `{role, content}` without a type.
        None | Some(Value::Null) if item.contains_key("role") => "message",
        None | Some(Value::Null) => {
            return Err(RequestError::at(
                format!("{path}.type"),
                "missing required field",
            ));
        }
        Some(v) => return Err(expected(format!("{path}.type"), "a string", v)),
    };
    match kind {
        "message" => messages.push(message(&path, &item)?),
        "function_call" => {
            let call = json!({
                "id": str_field(&item, "call_id", &path)?,
                "type": "function",
                "function": {
                    "name": str_field(&item, "name", &path)?,
                    "arguments": str_field(&item, "arguments", &path)?,
                },
            });
            // Consecutive calls (and the assistant text just before them) are one chat
            // assistant turn.
            match messages.last_mut() {
                Some(last) if last.role == Role::Assistant => {
                    match last.extra.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => {
                            last.extra
                                .insert("tool_calls".into(), Value::Array(vec![call]));
                        }
                    }
                }
                _ => {
                    let mut m = ChatMessage::new(Role::Assistant, "");
                    m.content = Value::Null;
                    m.extra
                        .insert("tool_calls".into(), Value::Array(vec![call]));
                    messages.push(m);
                }
            }
        }
        "function_call_output" => {
            let call_id = str_field(&item, "call_id", &path)?;
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => tool_output_text(&path, parts)?,
                Some(v) => {
                    return Err(expected(
                        format!("{path}.output"),
                        "a string or an array of parts",
                        v,
                    ));
                }
                None => {
                    return Err(RequestError::at(
                        format!("{path}.output"),
                        "missing required field",
                    ));
                }
            };
            let mut m = ChatMessage::new(Role::Tool, output);
            m.extra.insert("tool_call_id".into(), json!(call_id));
            messages.push(m);
        }
        // A reasoning item carries the model's earlier thinking, which chat
        // completions has no input field for: dropped (README "Responses API").
        "reasoning" => {}
        "item_reference" => {
            return Err(RequestError::at(
                format!("{path}.type"),
                "Echelon keeps no response state, so `item_reference` cannot be resolved: \
                 send the item itself",
            ));
        }
        other => {
            return Err(RequestError::at(
                format!("{path}.type"),
                format!(
                    "item type `{}` cannot be bridged to chat completions; supported: \
                     message, function_call, function_call_output, reasoning (dropped)",
                    crate::bounded_name(other)
                ),
            ));
        }
    }
    Ok(())
}

/// A message item as a chat message.
fn message(path: &str, item: &Map<String, Value>) -> Result<ChatMessage, RequestError> {
    let role = match str_field(item, "role", path)? {
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "system" => Role::System,
        "developer" => Role::Developer,
        other => {
            return Err(RequestError::at(
                format!("{path}.role"),
                format!(
                    "unknown role `{}`, expected one of user, assistant, system, developer",
                    crate::bounded_name(other)
                ),
            ));
        }
    };
    let content = match item.get("content") {
        Some(Value::String(s)) => Value::String(s.clone()),
        Some(Value::Array(parts)) => {
            let mut chat_parts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                chat_parts.push(content_part(&format!("{path}.content[{j}]"), p)?);
            }
            let all_text = chat_parts.iter().all(|p| p["type"] == "text");
            if all_text && (role == Role::Assistant || chat_parts.len() == 1) {
                // One text part, or an assistant's answer in pieces: plain text, which
                // every chat server reads.
                let text: String = chat_parts
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect();
                Value::String(text)
            } else {
                Value::Array(chat_parts)
            }
        }
        Some(v) => {
            return Err(expected(
                format!("{path}.content"),
                "a string or an array of content parts",
                v,
            ));
        }
        None => {
            return Err(RequestError::at(
                format!("{path}.content"),
                "missing required field",
            ));
        }
    };
    Ok(ChatMessage {
        role,
        content,
        extra: Extra::new(),
    })
}

/// A Responses content part as a chat content part.
fn content_part(path: &str, part: &Value) -> Result<Value, RequestError> {
    let Value::Object(p) = part else {
        return Err(expected(path, "a content part object", part));
    };
    match str_field(p, "type", path)? {
        "input_text" | "output_text" => {
            Ok(json!({"type": "text", "text": str_field(p, "text", path)?}))
        }
        "refusal" => Ok(json!({"type": "refusal", "refusal": str_field(p, "refusal", path)?})),
        "input_image" => {
            let url = match p.get("image_url") {
                Some(Value::String(u)) => u,
                Some(v) if !v.is_null() => {
                    return Err(expected(format!("{path}.image_url"), "a string", v));
                }
                _ => {
                    return Err(RequestError::at(
                        format!("{path}.image_url"),
                        "an image by `file_id` needs OpenAI's file store: send `image_url` (a \
                         URL or a `data:` URL)",
                    ));
                }
            };
            let mut image = json!({"url": url});
            if let Some(detail) = p.get("detail").filter(|d| !d.is_null()) {
                image["detail"] = detail.clone();
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        "input_file" => {
            let mut file = Map::new();
            for key in ["file_data", "file_id", "filename"] {
                if let Some(v) = p.get(key).filter(|v| !v.is_null()) {
                    file.insert(key.into(), v.clone());
                }
            }
            if !file.contains_key("file_data") && !file.contains_key("file_id") {
                return Err(RequestError::at(
                    path,
                    "an `input_file` is bridged with `file_data` or `file_id` only (not \
                     `file_url`)",
                ));
            }
            Ok(json!({"type": "file", "file": file}))
        }
        "input_audio" => Ok(json!({"type": "input_audio", "input_audio": p.get("input_audio")})),
        other => Err(RequestError::at(
            format!("{path}.type"),
            format!(
                "content part type `{}` cannot be bridged to chat completions; supported: \
                 input_text, output_text, refusal, input_image, input_file, input_audio",
                crate::bounded_name(other)
            ),
        )),
    }
}

/// A `function_call_output`'s parts as the tool message's text.
fn tool_output_text(path: &str, parts: &[Value]) -> Result<String, RequestError> {
    let mut text = String::new();
    for (j, p) in parts.iter().enumerate() {
        let ppath = format!("{path}.output[{j}]");
        match p.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text") => {
                let Some(t) = p.get("text").and_then(Value::as_str) else {
                    return Err(RequestError::at(
                        format!("{ppath}.text"),
                        "missing required field",
                    ));
                };
                text.push_str(t);
            }
            _ => {
                return Err(RequestError::at(
                    format!("{ppath}.type"),
                    "a chat tool message carries text only: send the output as `input_text` \
                     parts or a string",
                ));
            }
        }
    }
    Ok(text)
}

/// `{type: "function", name, description, parameters, strict}` → chat's
/// `{type: "function", function: {name, description, parameters, strict}}`.
fn chat_tool(i: usize, tool: &Value) -> Result<Value, RequestError> {
    let path = format!("tools[{i}]");
    let Value::Object(t) = tool else {
        return Err(expected(path, "a tool object", tool));
    };
    match str_field(t, "type", &path)? {
        "function" => {
            let mut function = Map::new();
            function.insert("name".into(), json!(str_field(t, "name", &path)?));
            for key in ["description", "parameters", "strict"] {
                if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                    function.insert(key.into(), v.clone());
                }
            }
            Ok(json!({"type": "function", "function": function}))
        }
        other => Err(RequestError::at(
            format!("{path}.type"),
            format!(
                "`{}` is a tool OpenAI runs itself, which a chat-completions upstream cannot; \
                 only `function` tools are bridged",
                crate::bounded_name(other)
            ),
        )),
    }
}

/// `tool_choice`: the strings as they are, `{type: "function", name}` nested.
fn chat_tool_choice(choice: &Value) -> Result<Value, RequestError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => {
            Ok(choice.clone())
        }
        Value::Object(c) if c.get("type").and_then(Value::as_str) == Some("function") => Ok(
            json!({"type": "function", "function": {"name": str_field(c, "name", "tool_choice")?}}),
        ),
        Value::Object(c) if c.get("type").and_then(Value::as_str) == Some("allowed_tools") => {
            let tools = c
                .get("tools")
                .and_then(Value::as_array)
                .map(|ts| {
                    ts.iter()
                        .map(|t| json!({"type": "function", "function": {"name": t.get("name")}}))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            Ok(json!({"type": "allowed_tools", "allowed_tools": {
                "mode": c.get("mode").cloned().unwrap_or(json!("auto")),
                "tools": tools,
            }}))
        }
        _ => Err(RequestError::at(
            "tool_choice",
            "expected \"auto\", \"none\", \"required\", {\"type\": \"function\", \"name\"} or \
             {\"type\": \"allowed_tools\", …}",
        )),
    }
}

/// `text.format` → chat's `response_format`; `None` for plain text.
fn response_format(format: &Value) -> Result<Option<Value>, RequestError> {
    let Value::Object(f) = format else {
        return Err(expected("text.format", "an object", format));
    };
    match str_field(f, "type", "text.format")? {
        "text" => Ok(None),
        "json_object" => Ok(Some(json!({"type": "json_object"}))),
        "json_schema" => {
            let mut schema = Map::new();
            schema.insert("name".into(), json!(str_field(f, "name", "text.format")?));
            for key in ["schema", "description", "strict"] {
                if let Some(v) = f.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": schema})))
        }
        other => Err(RequestError::at(
            "text.format.type",
            format!(
                "unknown format `{}`, expected text, json_object or json_schema",
                crate::bounded_name(other)
            ),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chat_of(body: Value) -> Value {
        let t = parse_responses_request(body.to_string().as_bytes()).unwrap();
        serde_json::to_value(&t.chat).unwrap()
    }

    fn err(body: Value) -> RequestError {
        parse_responses_request(body.to_string().as_bytes()).unwrap_err()
    }

    #[test]
    fn a_string_input_with_instructions_is_a_system_then_user_message() {
        let chat = chat_of(json!({
            "model": "m", "input": "hi", "instructions": "be brief",
            "max_output_tokens": 16, "temperature": 0.5, "top_p": 0.9, "user": "u1",
            "metadata": {"k": "v"}, "seed": 3, "include": ["x"],
        }));
        assert_eq!(
            chat,
            json!({
                "model": "m",
                "messages": [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi"}],
                "max_tokens": 16, "temperature": 0.5, "top_p": 0.9, "user": "u1", "seed": 3,
            })
        );
    }

    #[test]
    fn items_become_messages_tool_calls_and_tool_results() {
        let chat = chat_of(json!({
            "model": "m",
            "input": [
                {"role": "developer", "content": "rules"},
                {"type": "message", "role": "user", "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
                ]},
                {"type": "message", "role": "assistant", "content": [
                    {"type": "output_text", "text": "let me "}, {"type": "output_text", "text": "check"},
                ]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"a\":1}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "reasoning", "summary": []},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2",
                 "output": [{"type": "input_text", "text": "two"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "and?"}]},
            ],
        }));
        assert_eq!(
            chat["messages"],
            json!([
                {"role": "developer", "content": "rules"},
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
                ]},
                {"role": "assistant", "content": "let me check", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}},
                    {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
                ]},
                {"role": "tool", "content": "one", "tool_call_id": "c1"},
                {"role": "tool", "content": "two", "tool_call_id": "c2"},
                {"role": "user", "content": "and?"},
            ])
        );
    }

    #[test]
    fn tools_choice_and_format_take_the_chat_shapes() {
        let t = parse_responses_request(
            json!({
                "model": "m", "input": "x", "stream": true,
                "tools": [{"type": "function", "name": "f", "description": "d",
                           "parameters": {"type": "object"}, "strict": true}],
                "tool_choice": {"type": "function", "name": "f"},
                "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": true}},
                "reasoning": {"effort": "low"},
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let chat = serde_json::to_value(&t.chat).unwrap();
        assert_eq!(
            chat["tools"],
            json!([{"type": "function", "function": {"name": "f", "description": "d",
                    "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            chat["tool_choice"],
            json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(
            chat["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(chat["reasoning_effort"], "low");
        assert_eq!(chat["stream_options"], json!({"include_usage": true}));
        assert_eq!(
            t.echo.tools[0]["name"], "f",
            "echoed in the Responses shape"
        );
    }

    #[test]
    fn state_is_refused_naming_the_field() {
        for (body, path) in [
            (
                json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (json!({"model": "m", "input": "x", "store": true}), "store"),
            (
                json!({"model": "m", "input": "x", "conversation": "c"}),
                "conversation",
            ),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "background",
            ),
        ] {
            let e = err(body);
            assert_eq!(e.path.as_deref(), Some(path));
            assert!(
                e.message.contains("keeps no response state"),
                "{}",
                e.message
            );
        }
        let ok = parse_responses_request(br#"{"model":"m","input":"x","store":false}"#).unwrap();
        assert!(ok.ignored.is_empty(), "{:?}", ok.ignored);
    }

    #[test]
    fn refusals_name_the_responses_path() {
        assert_eq!(err(json!({"input": "x"})).path.as_deref(), Some("model"));
        assert_eq!(err(json!({"model": "m"})).path.as_deref(), Some("input"));
        assert_eq!(
            err(json!({"model": "m", "input": [{"role": "robot", "content": "x"}]}))
                .path
                .as_deref(),
            Some("input[0].role")
        );
        assert_eq!(
            err(json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_video"}]}]}))
                .path
                .as_deref(),
            Some("input[0].content[0].type")
        );
        assert_eq!(
            err(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}))
                .path
                .as_deref(),
            Some("tools[0].type")
        );
        assert_eq!(
            err(json!({"model": "m", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]}))
                .path
                .as_deref(),
            Some("input[0].arguments")
        );
        assert_eq!(
            err(json!({"model": "m", "input": []})).path.as_deref(),
            Some("input")
        );
    }
}
