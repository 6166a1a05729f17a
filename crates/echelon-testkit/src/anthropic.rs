//! The Anthropic Messages wire as the fake upstream writes it (`POST /v1/messages`):
//! the request read into the chat shape the echo answer is built from, and the answer,
//! stream events and error bodies in Anthropic's shapes (after the API reference's
//! examples: <https://docs.anthropic.com/en/api/messages>, `…/messages-streaming`,
//! `…/errors`).
//!
//! Usage reports the prompt's words as `input_tokens`, and as if a system prompt were
//! cached, [`CACHE_READ_TOKENS`] read from and [`CACHE_WRITE_TOKENS`] written to the
//! cache, so that a gateway's cache-token accounting can be checked.

use bytes::Bytes;
use serde_json::{Value, json};

use crate::wire::{Answer, word_pieces};

/// `cache_read_input_tokens` of every answer.
pub const CACHE_READ_TOKENS: u64 = 3;

/// `cache_creation_input_tokens` of every answer.
pub const CACHE_WRITE_TOKENS: u64 = 2;

/// The chat-shaped body the echo answer is built from: the messages' roles and text
/// blocks, `max_tokens`, `stream`, and the tools with `tool_choice` (`any` → `required`,
/// `tool` → the named function) so that a forced tool is called.
pub(crate) fn to_chat_body(body: &Value) -> Value {
    let messages: Vec<Value> = body
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| json!({"role": m.get("role"), "content": m.get("content")}))
        .collect();
    let tools: Vec<Value> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| json!({"type": "function", "function": {"name": t.get("name")}}))
        .collect();
    let tool_choice = match body.pointer("/tool_choice/type").and_then(Value::as_str) {
        Some("any") => json!("required"),
        Some("tool") => {
            json!({"type": "function", "function": {"name": body.pointer("/tool_choice/name")}})
        }
        _ => Value::Null,
    };
    json!({
        "messages": messages,
        "max_tokens": body.get("max_tokens"),
        "stream": body.get("stream"),
        "tools": tools,
        "tool_choice": tool_choice,
    })
}

/// The `stop_reason` of the answer.
fn stop_reason(answer: &Answer) -> &'static str {
    match answer.finish_reason {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        _ => "end_turn",
    }
}

/// `usage` of the answer; `with_input` false for a `message_delta`'s (output only).
fn usage(answer: &Answer, with_input: bool) -> Value {
    let output = word_pieces(&answer.content).len();
    if with_input {
        json!({
            "input_tokens": answer.prompt_tokens,
            "output_tokens": output,
            "cache_creation_input_tokens": CACHE_WRITE_TOKENS,
            "cache_read_input_tokens": CACHE_READ_TOKENS,
        })
    } else {
        json!({"output_tokens": output})
    }
}

fn message_id(answer: &Answer) -> String {
    format!("msg_{}", answer.id)
}

/// The answer's one content block, complete: its text, or the forced tool call.
fn block(answer: &Answer) -> Value {
    match &answer.tool_call {
        Some(name) => json!({
            "type": "tool_use", "id": answer.call_id(), "name": name,
            "input": serde_json::from_str::<Value>(&answer.content).unwrap_or_else(|_| json!({})),
        }),
        None => json!({"type": "text", "text": answer.content}),
    }
}

/// The non-stream `message`; `stop_reason` null when `finished` is false.
pub(crate) fn message(answer: &Answer, finished: bool) -> Value {
    json!({
        "id": message_id(answer),
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [block(answer)],
        "stop_reason": if finished { json!(stop_reason(answer)) } else { Value::Null },
        "stop_sequence": null,
        "usage": usage(answer, true),
    })
}

/// One SSE event: `event: <type>` and its `data`.
pub(crate) fn sse(data: &Value) -> Bytes {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// `message_start` (content empty, the input usage), then `ping`, then the block's
/// `content_block_start`.
pub(crate) fn head(answer: &Answer) -> Vec<Bytes> {
    let mut start = message(answer, false);
    start["content"] = json!([]);
    start["usage"]["output_tokens"] = json!(1);
    let mut empty = block(answer);
    if answer.tool_call.is_some() {
        empty["input"] = json!({});
    } else {
        empty["text"] = json!("");
    }
    vec![
        sse(&json!({"type": "message_start", "message": start})),
        sse(&json!({"type": "ping"})),
        sse(&json!({"type": "content_block_start", "index": 0, "content_block": empty})),
    ]
}

/// One `content_block_delta` per word piece: `text_delta`s, or `input_json_delta`s of
/// the tool call's input.
pub(crate) fn deltas(answer: &Answer) -> Vec<Bytes> {
    word_pieces(&answer.content)
        .into_iter()
        .map(|piece| {
            let delta = if answer.tool_call.is_some() {
                json!({"type": "input_json_delta", "partial_json": piece})
            } else {
                json!({"type": "text_delta", "text": piece})
            };
            sse(&json!({"type": "content_block_delta", "index": 0, "delta": delta}))
        })
        .collect()
}

/// `content_block_stop`, `message_delta` (the stop reason and output usage) unless
/// `finished` is false, and `message_stop`.
pub(crate) fn tail(answer: &Answer, finished: bool) -> Vec<Bytes> {
    let mut out = vec![sse(&json!({"type": "content_block_stop", "index": 0}))];
    if finished {
        out.push(sse(&json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason(answer), "stop_sequence": null},
            "usage": usage(answer, false),
        })));
    }
    out.push(sse(&json!({"type": "message_stop"})));
    out
}

/// The Anthropic error `type` of a status (529 `overloaded_error`, …).
fn error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 | 503 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type": "error", "error": {"type", "message"}}` for `status`.
pub(crate) fn error_body(status: u16, message: &str) -> Value {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
}

/// The in-band `event: error` of an overloaded upstream.
pub(crate) fn error_event() -> Bytes {
    sse(&error_body(529, "Overloaded"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer(body: Value) -> Answer {
        Answer::for_request(&to_chat_body(&body), "t1".into(), 1, "claude-test".into())
    }

    #[test]
    fn the_echo_answer_in_anthropics_shapes() {
        let a = answer(json!({"model": "x", "max_tokens": 50,
                              "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]}));
        let m = message(&a, true);
        assert_eq!(m["type"], "message");
        assert_eq!(
            m["content"],
            json!([{"type": "text", "text": "echo: hello world"}])
        );
        assert_eq!(m["stop_reason"], "end_turn");
        assert_eq!(m["usage"]["input_tokens"], 2);
        assert_eq!(m["usage"]["cache_read_input_tokens"], CACHE_READ_TOKENS);
        let events: Vec<Bytes> = [head(&a), deltas(&a), tail(&a, true)].concat();
        let names: Vec<String> = events
            .iter()
            .map(|e| {
                std::str::from_utf8(e)
                    .unwrap()
                    .lines()
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(names[0], "event: message_start");
        assert_eq!(names[1], "event: ping");
        assert_eq!(names[2], "event: content_block_start");
        assert_eq!(names[3..6], ["event: content_block_delta"; 3]);
        assert_eq!(
            names[6..],
            [
                "event: content_block_stop",
                "event: message_delta",
                "event: message_stop"
            ]
        );
    }

    #[test]
    fn a_forced_tool_is_a_tool_use_block() {
        let a = answer(
            json!({"model": "x", "max_tokens": 50, "tools": [{"name": "f", "input_schema": {}}],
                              "tool_choice": {"type": "any"},
                              "messages": [{"role": "user", "content": "Paris"}]}),
        );
        let m = message(&a, true);
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(m["content"][0]["input"], json!({"text": "Paris"}));
        assert_eq!(error_body(529, "x")["error"]["type"], "overloaded_error");
    }

    #[test]
    fn a_forced_tool_answers_a_json_object_prompt_with_that_object() {
        let a = answer(json!({"model": "x", "max_tokens": 50,
                              "tools": [{"name": "verdict", "input_schema": {"type": "object"}}],
                              "tool_choice": {"type": "tool", "name": "verdict"},
                              "messages": [{"role": "user", "content": "{\"score\": 7}"}]}));
        let m = message(&a, true);
        assert_eq!(m["content"][0]["name"], "verdict");
        assert_eq!(m["content"][0]["input"], json!({"score": 7}));
    }
}
