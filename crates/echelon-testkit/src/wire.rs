//! The wire formats the fake upstream writes: completions, stream chunks and error
//! bodies, in OpenAI's chat-completions shape or Gemini's `GenerateContentResponse`
//! ([`Dialect`]).

use serde_json::{Map, Value, json};

/// The text of a message `content`: a string, or the `text` of each part of
/// an array joined with single spaces. Anything else is empty.
pub(crate) fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn messages(body: &Value) -> &[Value] {
    body.get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The text of the last message with role `user` (empty if none).
pub(crate) fn last_user_text(body: &Value) -> String {
    messages(body)
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .unwrap_or_default()
}

/// Total characters of every message's text.
pub(crate) fn prompt_chars(body: &Value) -> usize {
    messages(body)
        .iter()
        .map(|m| content_text(m.get("content")).chars().count())
        .sum()
}

/// Whitespace-separated words of every message's text.
pub(crate) fn prompt_words(body: &Value) -> usize {
    messages(body)
        .iter()
        .map(|m| content_text(m.get("content")).split_whitespace().count())
        .sum()
}

/// Splits `s` into pieces of one word each, every piece but the first
/// carrying the whitespace before its word, so that the pieces concatenate
/// back to `s` exactly (trailing whitespace stays on the last piece).
pub(crate) fn word_pieces(s: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut prev_ws = true;
    for (i, c) in s.char_indices() {
        let ws = c.is_whitespace();
        if ws && !prev_ws && i > 0 {
            starts.push(i);
        }
        prev_ws = ws;
    }
    // Trailing whitespace is not a word of its own.
    if starts.len() > 1 && s[starts[starts.len() - 1]..].trim().is_empty() {
        starts.pop();
    }
    if s.is_empty() {
        return Vec::new();
    }
    let mut ends: Vec<usize> = starts.iter().skip(1).copied().collect();
    ends.push(s.len());
    starts.iter().zip(ends).map(|(&a, b)| &s[a..b]).collect()
}

/// The wire a request came in on, and its answer goes out in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1beta/models/{model}:generateContent` / `:streamGenerateContent`.
    Gemini,
}

/// A Gemini request body as the chat-completions body [`Answer::for_request`] reads:
/// `systemInstruction` and `contents` (roles `user` / `model`) as `messages` of text
/// parts (a `functionCall` or `functionResponse` part as its name), and
/// `generationConfig.maxOutputTokens` as `max_tokens`.
pub(crate) fn gemini_as_chat(body: &Value) -> Value {
    let text_parts = |parts: Option<&Value>| -> Value {
        let parts = parts
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        Value::Array(
            parts
                .iter()
                .filter_map(|p| {
                    p.get("text")
                        .and_then(Value::as_str)
                        .or_else(|| p.pointer("/functionCall/name").and_then(Value::as_str))
                        .or_else(|| p.pointer("/functionResponse/name").and_then(Value::as_str))
                        .map(|t| json!({"type": "text", "text": t}))
                })
                .collect(),
        )
    };
    let mut messages = Vec::new();
    if let Some(system) = body.get("systemInstruction") {
        messages.push(json!({"role": "system", "content": text_parts(system.get("parts"))}));
    }
    for content in body
        .get("contents")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let role = match content.get("role").and_then(Value::as_str) {
            Some("model") => "assistant",
            _ => "user",
        };
        messages.push(json!({"role": role, "content": text_parts(content.get("parts"))}));
    }
    let mut chat = json!({ "messages": messages });
    if let Some(max) = body.pointer("/generationConfig/maxOutputTokens") {
        chat["max_tokens"] = max.clone();
    }
    chat
}

/// Gemini's name of an OpenAI finish reason.
fn gemini_finish(reason: &str) -> &'static str {
    match reason {
        "length" => "MAX_TOKENS",
        "content_filter" => "SAFETY",
        _ => "STOP",
    }
}

/// The answer to one chat-completion request, before it is serialised.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    pub(crate) content: String,
    pub(crate) finish_reason: &'static str,
    pub(crate) prompt_tokens: usize,
    pub(crate) x_echo: Option<Value>,
    pub(crate) include_usage: bool,
    /// The wire it is written in.
    pub(crate) dialect: Dialect,
    /// A forced tool call (`tool_choice: "required"` or naming a function): the tool's
    /// name; the arguments ([`content`](Self::content)) are the last user text when it is
    /// a JSON object (so a test scripts a structured answer), else `{"text": <that text>}`.
    pub(crate) tool_call: Option<String>,
}

/// The tool a request forces a call of: the named function of a `tool_choice` object,
/// or the first tool's with `tool_choice: "required"`; `None` otherwise.
fn forced_tool(body: &Value) -> Option<String> {
    let name = match body.get("tool_choice")? {
        Value::String(s) if s == "required" => body
            .pointer("/tools/0/function/name")
            .and_then(Value::as_str),
        Value::Object(o) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str),
        _ => None,
    };
    name.map(str::to_owned)
}

/// A forced tool call's arguments for the last user text `text`: `text` itself when it is
/// a JSON object, else `{"text": text}`.
fn tool_arguments(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => text.to_owned(),
        _ => json!({"text": text}).to_string(),
    }
}

/// A scripted answer: with `"x_answers": [strings]` and an integer `"seed"` in the
/// request, the answer is `x_answers[seed % len]` (so a judge's samples, each sent with
/// its own seed, get answers chosen by the test); `None` otherwise.
fn scripted_answer(body: &Value) -> Option<String> {
    let answers = body.get("x_answers")?.as_array()?;
    let seed = usize::try_from(body.get("seed")?.as_u64()?).ok()?;
    let pick = answers.get(seed.checked_rem(answers.len())?)?;
    pick.as_str().map(str::to_owned)
}

impl Answer {
    /// Builds the echo answer for a parsed request body.
    pub(crate) fn for_request(body: &Value, id: String, created: u64, model: String) -> Answer {
        let tool_call = forced_tool(body);
        let full = match (&tool_call, scripted_answer(body)) {
            (Some(_), _) => tool_arguments(&last_user_text(body)),
            (None, Some(scripted)) => scripted,
            (None, None) => format!("echo: {}", last_user_text(body)),
        };
        let max_tokens = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| body.get(*k).and_then(Value::as_u64))
            .and_then(|n| usize::try_from(n).ok());
        let pieces = word_pieces(&full);
        let (content, finish_reason) = match max_tokens {
            Some(max) if pieces.len() > max => (pieces[..max].concat(), "length"),
            _ if tool_call.is_some() => (full.clone(), "tool_calls"),
            _ => (full.clone(), "stop"),
        };
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Answer {
            id,
            created,
            model,
            content,
            finish_reason,
            prompt_tokens: prompt_words(body),
            x_echo: body.get("x_echo").cloned(),
            include_usage,
            dialect: Dialect::OpenAi,
            tool_call,
        }
    }

    /// The tool call's id.
    pub(crate) fn call_id(&self) -> String {
        format!("call_{}", self.id)
    }

    /// The same answer written in `dialect`.
    pub(crate) fn in_dialect(mut self, dialect: Dialect) -> Answer {
        self.dialect = dialect;
        self
    }

    /// A Gemini `GenerateContentResponse` of `text`, with `finish` (an OpenAI
    /// reason) and the usage when asked.
    fn gemini(&self, text: &str, finish: Option<&str>, usage: bool) -> Value {
        let mut candidate = json!({
            "content": {"role": "model", "parts": [{"text": text}]},
            "index": 0,
        });
        if let Some(finish) = finish {
            candidate["finishReason"] = json!(gemini_finish(finish));
        }
        let mut v = json!({
            "candidates": [candidate],
            "modelVersion": self.model,
            "responseId": self.id,
        });
        if usage {
            let completion = word_pieces(&self.content).len();
            v["usageMetadata"] = json!({
                "promptTokenCount": self.prompt_tokens,
                "candidatesTokenCount": completion,
                "totalTokenCount": self.prompt_tokens + completion,
            });
        }
        v
    }

    /// The whole answer without its finish reason (non-stream).
    pub(crate) fn completion_without_finish(&self) -> Value {
        let mut body = self.completion();
        match self.dialect {
            Dialect::OpenAi => {
                if let Some(choice) = body.pointer_mut("/choices/0") {
                    choice["finish_reason"] = Value::Null;
                }
            }
            Dialect::Gemini => {
                if let Some(c) = body
                    .pointer_mut("/candidates/0")
                    .and_then(Value::as_object_mut)
                {
                    c.remove("finishReason");
                }
            }
        }
        body
    }

    /// The whole answer with `text` as its content and no usage (non-stream).
    pub(crate) fn completion_with_text(&self, text: String) -> Value {
        match self.dialect {
            Dialect::OpenAi => {
                let mut body = self.completion();
                if let Some(obj) = body.as_object_mut() {
                    obj.remove("usage");
                }
                body["choices"][0]["message"]["content"] = Value::String(text);
                body
            }
            Dialect::Gemini => self.gemini(&text, Some(self.finish_reason), false),
        }
    }

    /// An answer with no choices / candidates (non-stream).
    pub(crate) fn no_choices(&self) -> Value {
        match self.dialect {
            Dialect::OpenAi => json!({"id": self.id, "object": "chat.completion", "choices": []}),
            Dialect::Gemini => json!({"candidates": [], "responseId": self.id}),
        }
    }

    /// A 200 body cut inside a string: not JSON.
    pub(crate) fn broken_body(&self) -> String {
        match self.dialect {
            Dialect::OpenAi => format!(
                "{{\"id\":\"{}\",\"object\":\"chat.completion\",\"choices\":[{{\"message\":{{\"content\":\"echo",
                self.id
            ),
            Dialect::Gemini => {
                "{\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"echo".to_owned()
            }
        }
    }

    /// The end-of-stream event, if the wire has one (OpenAI's `[DONE]`; a Gemini
    /// stream ends with its finish reason).
    pub(crate) fn done(&self) -> Option<String> {
        match self.dialect {
            Dialect::OpenAi => Some(sse("[DONE]")),
            Dialect::Gemini => None,
        }
    }

    /// A stream's in-band error event ([`crate::Behavior::StreamError`]).
    pub(crate) fn error_event(&self) -> Value {
        let message = "injected fault: error event in stream";
        match self.dialect {
            Dialect::OpenAi => error_body(500, message),
            Dialect::Gemini => gemini_error_body(503, message, None),
        }
    }

    fn usage(&self) -> Value {
        let completion = word_pieces(&self.content).len();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn with_x_echo(&self, mut v: Value) -> Value {
        if let (Some(x), Some(obj)) = (&self.x_echo, v.as_object_mut()) {
            obj.insert("x_echo".into(), x.clone());
        }
        v
    }

    /// The non-stream `chat.completion` object (Gemini: the whole response).
    pub(crate) fn completion(&self) -> Value {
        if self.dialect == Dialect::Gemini {
            return self.gemini(&self.content, Some(self.finish_reason), true);
        }
        self.with_x_echo(json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": match &self.tool_call {
                    Some(name) => json!({"role": "assistant", "content": null, "tool_calls": [{
                        "id": self.call_id(), "type": "function",
                        "function": {"name": name, "arguments": self.content},
                    }]}),
                    None => json!({"role": "assistant", "content": self.content}),
                },
                "finish_reason": self.finish_reason,
            }],
            "usage": self.usage(),
            "timings": {"predicted_ms": 1.0},
        }))
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        self.with_x_echo(json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }))
    }

    /// The first chunk: `delta: {role: assistant, content: null}` (Gemini: a response
    /// with an empty text part).
    pub(crate) fn role_chunk(&self) -> Value {
        if self.dialect == Dialect::Gemini {
            return self.gemini("", None, false);
        }
        self.chunk(json!({"role": "assistant", "content": null}), None)
    }

    /// A chunk of `piece` of text.
    pub(crate) fn text_chunk(&self, piece: &str) -> Value {
        match self.dialect {
            Dialect::OpenAi => self.chunk(json!({ "content": piece }), None),
            Dialect::Gemini => self.gemini(piece, None, false),
        }
    }

    /// One chunk per word piece of the content; for a tool call (OpenAI wire), the
    /// call's head (id, name, empty arguments), then its arguments a word piece at a time.
    pub(crate) fn content_chunks(&self) -> Vec<Value> {
        if let (Some(name), Dialect::OpenAi) = (&self.tool_call, self.dialect) {
            let head = json!({"tool_calls": [{"index": 0, "id": self.call_id(), "type": "function",
                                               "function": {"name": name, "arguments": ""}}]});
            let mut chunks = vec![self.chunk(head, None)];
            chunks.extend(word_pieces(&self.content).into_iter().map(|piece| {
                self.chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    None,
                )
            }));
            return chunks;
        }
        word_pieces(&self.content)
            .into_iter()
            .map(|piece| self.text_chunk(piece))
            .collect()
    }

    /// The chunk with an empty delta and the finish reason (and llama.cpp's
    /// `timings`); Gemini: an empty text part, the finish reason and the usage.
    pub(crate) fn finish_chunk(&self) -> Value {
        if self.dialect == Dialect::Gemini {
            return self.gemini("", Some(self.finish_reason), true);
        }
        let mut chunk = self.chunk(json!({}), Some(self.finish_reason));
        if let Some(obj) = chunk.as_object_mut() {
            obj.insert("timings".into(), json!({"predicted_ms": 1.0}));
        }
        chunk
    }

    /// The `choices: []` usage chunk, if the request asked for one (never in Gemini:
    /// its usage rides on the finish chunk).
    pub(crate) fn usage_chunk(&self) -> Option<Value> {
        (self.include_usage && self.dialect == Dialect::OpenAi).then(|| {
            self.with_x_echo(json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": self.usage(),
            }))
        })
    }
}

/// An SSE event carrying `data`.
pub(crate) fn sse(data: &str) -> String {
    format!("data: {data}\n\n")
}

/// `error.type` and `error.code` used for an HTTP status.
fn error_kind(status: u16) -> (&'static str, &'static str) {
    match status {
        400 => ("invalid_request_error", "invalid_request"),
        401 => ("authentication_error", "invalid_api_key"),
        403 => ("permission_error", "permission_denied"),
        404 => ("not_found_error", "not_found"),
        405 => ("invalid_request_error", "method_not_allowed"),
        408 => ("timeout_error", "timeout"),
        413 => ("invalid_request_error", "request_too_large"),
        422 => ("invalid_request_error", "unprocessable_entity"),
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        503 => ("server_error", "service_unavailable"),
        500..=599 => ("server_error", "server_error"),
        _ => ("api_error", "error"),
    }
}

/// The OpenAI error body `{"error":{"message","type","code"}}` for a status.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    let (kind, code) = error_kind(status);
    json!({"error": {"message": message, "type": kind, "code": code}})
}

/// The `google.rpc.Status` name Gemini answers an HTTP status with.
fn gemini_status(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "UNKNOWN",
    }
}

/// Gemini's error body `{"error":{"code","message","status"}}` for a status; a
/// `retry_delay` (seconds) adds a `google.rpc.RetryInfo` detail, as a 429 carries.
pub(crate) fn gemini_error_body(status: u16, message: &str, retry_delay: Option<u64>) -> Value {
    let mut error = json!({"code": status, "message": message, "status": gemini_status(status)});
    if let Some(secs) = retry_delay {
        error["details"] = json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                {"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaId": "injected"}
            ]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": format!("{secs}s")}
        ]);
    }
    json!({ "error": error })
}

/// Gemini's answer to a request without a valid key: 400 `INVALID_ARGUMENT` with
/// reason `API_KEY_INVALID` (not a 401).
pub(crate) fn gemini_invalid_key() -> Value {
    json!({"error": {
        "code": 400,
        "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                     "domain": "googleapis.com"}],
    }})
}

/// Gemini's over-the-input-limit error.
pub(crate) fn gemini_context_error(prompt_tokens: usize, n_ctx: usize) -> Value {
    gemini_error_body(
        400,
        &format!(
            "The input token count ({prompt_tokens}) exceeds the maximum number of tokens allowed ({n_ctx})."
        ),
        None,
    )
}

/// llama.cpp's context-overflow error (with OpenAI's code).
pub(crate) fn context_error(prompt_tokens: usize, n_ctx: usize) -> Value {
    let mut error = Map::new();
    error.insert(
        "message".into(),
        json!(format!(
            "the request exceeds the available context size: {prompt_tokens} prompt tokens, \
             context size {n_ctx} tokens"
        )),
    );
    error.insert("type".into(), json!("exceed_context_size_error"));
    error.insert("code".into(), json!("context_length_exceeded"));
    error.insert("n_prompt_tokens".into(), json!(prompt_tokens));
    error.insert("n_ctx".into(), json!(n_ctx));
    json!({ "error": error })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn word_pieces_concatenate_back() {
        assert_eq!(
            word_pieces("echo: hello  world"),
            vec!["echo:", " hello", "  world"]
        );
        assert_eq!(word_pieces("echo: "), vec!["echo: "]);
        assert_eq!(word_pieces(" a b \n"), vec![" a", " b \n"]);
        assert_eq!(word_pieces(""), Vec::<&str>::new());
        for s in ["echo: x", "a\nb\tc ", "  ", "héllo wörld ünïcode"] {
            assert_eq!(word_pieces(s).concat(), s);
        }
    }

    #[test]
    fn content_text_reads_strings_and_parts() {
        assert_eq!(content_text(Some(&json!("hi"))), "hi");
        assert_eq!(
            content_text(Some(&json!([
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "x"}},
                {"type": "text", "text": "b"}
            ]))),
            "a b"
        );
        assert_eq!(content_text(Some(&json!(null))), "");
        assert_eq!(content_text(None), "");
    }

    #[test]
    fn a_forced_tool_is_called_with_the_user_text() {
        let body = json!({
            "messages": [{"role": "user", "content": "Paris"}],
            "tools": [{"type": "function", "function": {"name": "get_weather"}}],
            "tool_choice": "required",
        });
        let a = Answer::for_request(&body, "x".into(), 1, "m".into());
        let c = a.completion();
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        let call = &c["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_weather");
        assert_eq!(call["function"]["arguments"], r#"{"text":"Paris"}"#);
        let chunks = a.content_chunks();
        assert_eq!(
            chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "call_x"
        );
        let args: String = chunks[1..]
            .iter()
            .map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(args, r#"{"text":"Paris"}"#);
        // Not forced: the echo.
        let body = json!({"messages": [{"role": "user", "content": "Paris"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]});
        let a = Answer::for_request(&body, "x".into(), 1, "m".into());
        assert_eq!(
            a.completion()["choices"][0]["message"]["content"],
            "echo: Paris"
        );
    }
}
