//! The OpenAI wire format as the fake upstream writes it: completions,
//! stream chunks and error bodies.

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
    /// A forced tool call (`tool_choice: "required"` or naming a function): the tool's
    /// name; the arguments are `{"text": <last user text>}` ([`content`](Self::content)).
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

impl Answer {
    /// Builds the echo answer for a parsed request body.
    pub(crate) fn for_request(body: &Value, id: String, created: u64, model: String) -> Answer {
        let tool_call = forced_tool(body);
        let full = match &tool_call {
            Some(_) => json!({"text": last_user_text(body)}).to_string(),
            None => format!("echo: {}", last_user_text(body)),
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
            tool_call,
        }
    }

    /// The tool call's id.
    pub(crate) fn call_id(&self) -> String {
        format!("call_{}", self.id)
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

    /// The non-stream `chat.completion` object.
    pub(crate) fn completion(&self) -> Value {
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

    /// The first chunk: `delta: {role: assistant, content: null}`.
    pub(crate) fn role_chunk(&self) -> Value {
        self.chunk(json!({"role": "assistant", "content": null}), None)
    }

    /// One chunk per word piece of the content; for a tool call, the call's head (id,
    /// name, empty arguments), then its arguments a word piece at a time.
    pub(crate) fn content_chunks(&self) -> Vec<Value> {
        if let Some(name) = &self.tool_call {
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
            .map(|piece| self.chunk(json!({"content": piece}), None))
            .collect()
    }

    /// The chunk with an empty delta and the finish reason (and llama.cpp's
    /// `timings`).
    pub(crate) fn finish_chunk(&self) -> Value {
        let mut chunk = self.chunk(json!({}), Some(self.finish_reason));
        if let Some(obj) = chunk.as_object_mut() {
            obj.insert("timings".into(), json!({"predicted_ms": 1.0}));
        }
        chunk
    }

    /// The `choices: []` usage chunk, if the request asked for one.
    pub(crate) fn usage_chunk(&self) -> Option<Value> {
        self.include_usage.then(|| {
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
