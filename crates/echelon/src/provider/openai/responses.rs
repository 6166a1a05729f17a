//! `POST {base_url}/responses` for a provider that declares `responses: true`: a request
//! that came to `/v1/responses` is sent as the client wrote it, and the answer (a
//! Response object, or its `response.*` stream events) becomes the neutral chat shape the
//! gateway checks, meters and relays, the Response object itself kept beside it
//! ([`NativeResponse::Responses`](echelon_types::NativeResponse::Responses)).
//!
//! Shapes: the OpenAI API reference for `POST /v1/responses` and its streaming events
//! (<https://platform.openai.com/docs/api-reference/responses-streaming>).

use echelon_types::{
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice, Delta, Extra,
    NativeRequest, NativeResponses, Usage,
};
use futures::Stream;
use serde_json::{Map, Value, json};

use crate::provider::error::{ErrorKind, ProviderError, upstream_text};
use crate::provider::stream::decoded_sse;
use crate::provider::{ProviderRequest, StreamEvent};

/// The client's own Responses request behind `body`, when it came as one and the
/// gateway has not changed its conversation since (its chat translation has as many
/// messages as when it was made).
pub(super) fn native_of(body: &ChatCompletionRequest) -> Option<&NativeResponses> {
    match body.native.as_deref() {
        Some(NativeRequest::Responses(n)) if n.chat_messages == body.messages.len() => Some(n),
        _ => None,
    }
}

/// The body sent: the client's request with the upstream's model name, the stream flag
/// of this attempt, the echelon's defaults where the client set none
/// (`max_output_tokens`, `temperature`), and `store: false` unless the client set it
/// (Echelon is stateless: nothing should be kept upstream that a later request could not
/// reach through the gateway).
pub(super) fn body(req: &ProviderRequest<'_>, native: &NativeResponses) -> Map<String, Value> {
    let mut body = native.body.clone();
    body.insert("model".into(), json!(req.model));
    body.insert("stream".into(), json!(req.stream));
    if let Some(t) = req.temperature {
        body.entry("temperature").or_insert(json!(t));
    }
    if let Some(m) = req.max_tokens {
        body.entry("max_output_tokens").or_insert(json!(m));
    }
    body.entry("store").or_insert(json!(false));
    body
}

/// The chat completion of a Response object: `output_text` parts joined as `content`,
/// `refusal` parts as `refusal`, `function_call` items as `tool_calls` (`call_id` as
/// their id), `reasoning` items' text or summary as `reasoning_content`; `status`
/// `completed` → `stop` (`tool_calls` when it called a function), `incomplete` →
/// `length` or `content_filter` by its reason; `failed` is an error.
///
/// # Errors
/// [`ErrorKind::Malformed`] when it is not a Response object (no `output` array) or
/// carries no finish (`in_progress`, `queued`); [`ErrorKind::ServerError`] when its
/// status is `failed`.
pub(super) fn to_completion(response: &Value) -> Result<ChatCompletion, ProviderError> {
    let Some(output) = response.get("output").and_then(Value::as_array) else {
        return Err(ProviderError::new(
            ErrorKind::Malformed,
            "response is not a Response object (no `output`)",
        ));
    };
    let status = response["status"].as_str().unwrap_or_default();
    if status == "failed" {
        return Err(failed(response));
    }
    let (mut text, mut refusal, mut reasoning, mut calls) =
        (String::new(), String::new(), String::new(), Vec::new());
    for item in output {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    match part["type"].as_str() {
                        Some("output_text") => text.push_str(part["text"].as_str().unwrap_or("")),
                        Some("refusal") => {
                            refusal.push_str(part["refusal"].as_str().unwrap_or(""));
                        }
                        _ => {}
                    }
                }
            }
            Some("function_call") => calls.push(json!({
                "id": item["call_id"].as_str().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": item["name"].as_str().unwrap_or_default(),
                    "arguments": item["arguments"].as_str().unwrap_or("{}"),
                },
            })),
            Some("reasoning") => {
                for part in item["content"]
                    .as_array()
                    .or_else(|| item["summary"].as_array())
                    .into_iter()
                    .flatten()
                {
                    reasoning.push_str(part["text"].as_str().unwrap_or_default());
                }
            }
            _ => {}
        }
    }
    let finish = finish_reason(status, response, !calls.is_empty()).ok_or_else(|| {
        ProviderError::new(
            ErrorKind::Malformed,
            format!(
                "response has no finish (status `{}`)",
                echelon_types::bounded_name(status)
            ),
        )
    })?;
    let mut message = Map::new();
    message.insert("role".into(), json!("assistant"));
    message.insert(
        "content".into(),
        if text.is_empty() && (!calls.is_empty() || !refusal.is_empty()) {
            Value::Null
        } else {
            Value::String(text)
        },
    );
    if !refusal.is_empty() {
        message.insert("refusal".into(), Value::String(refusal));
    }
    if !calls.is_empty() {
        message.insert("tool_calls".into(), Value::Array(calls));
    }
    if !reasoning.is_empty() {
        message.insert("reasoning_content".into(), Value::String(reasoning));
    }
    Ok(ChatCompletion {
        id: response["id"].as_str().unwrap_or_default().to_owned(),
        object: "chat.completion".into(),
        created: response["created_at"].as_u64().unwrap_or_default(),
        model: response["model"].as_str().unwrap_or_default().to_owned(),
        choices: vec![Choice {
            index: 0,
            message,
            finish_reason: Some(finish.to_owned()),
            extra: Extra::new(),
        }],
        usage: usage(&response["usage"]),
        extra: Extra::new(),
        native: None,
    })
}

/// The chat finish reason of a Response's `status` (and `incomplete_details.reason`);
/// `None` for a status that is not an end.
fn finish_reason(status: &str, response: &Value, called: bool) -> Option<&'static str> {
    match status {
        "completed" if called => Some("tool_calls"),
        "completed" => Some("stop"),
        "incomplete" => Some(
            match response
                .pointer("/incomplete_details/reason")
                .and_then(Value::as_str)
            {
                Some("content_filter") => "content_filter",
                _ => "length",
            },
        ),
        _ => None,
    }
}

/// A `failed` Response's error: rate-limited for `rate_limit_exceeded`, else a server
/// error (its `error.code` and `message`).
fn failed(response: &Value) -> ProviderError {
    let code = response.pointer("/error/code").and_then(Value::as_str);
    let message = response
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("the response failed");
    let kind = if code == Some("rate_limit_exceeded") {
        ErrorKind::RateLimited
    } else {
        ErrorKind::ServerError
    };
    ProviderError::new(
        kind,
        format!(
            "{}: {}",
            echelon_types::bounded_name(code.unwrap_or("failed")),
            upstream_text(message)
        ),
    )
}

/// A Response's `usage` in chat names (`input_tokens_details.cached_tokens` →
/// `prompt_tokens_details.cached_tokens`, `output_tokens_details.reasoning_tokens` →
/// `completion_tokens_details.reasoning_tokens`).
fn usage(u: &Value) -> Option<Usage> {
    let input = u.get("input_tokens")?.as_u64()?;
    let output = u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0);
    let mut extra = Extra::new();
    if let Some(c) = u.pointer("/input_tokens_details/cached_tokens") {
        extra.insert("prompt_tokens_details".into(), json!({"cached_tokens": c}));
    }
    if let Some(r) = u.pointer("/output_tokens_details/reasoning_tokens") {
        extra.insert(
            "completion_tokens_details".into(),
            json!({"reasoning_tokens": r}),
        );
    }
    Some(Usage {
        prompt_tokens: input,
        completion_tokens: output,
        total_tokens: u
            .get("total_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(input.saturating_add(output)),
        extra,
    })
}

/// What the stream decoder remembers: the response's id and model, and the item id of
/// each function call so far (its position is the chat `tool_calls` index).
#[derive(Debug, Default)]
struct Decoder {
    id: String,
    model: String,
    created: u64,
    calls: Vec<String>,
}

impl Decoder {
    fn chunk(&self, delta: Delta, finish_reason: Option<&str>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish_reason.map(str::to_owned),
                extra: Extra::new(),
            }],
            usage: None,
            extra: Extra::new(),
            verbatim: Default::default(),
        }
    }

    fn tool_delta(call: Value) -> Delta {
        let mut extra = Extra::new();
        extra.insert("tool_calls".into(), Value::Array(vec![call]));
        Delta {
            role: None,
            content: None,
            extra,
        }
    }

    /// The stream events of one SSE event's `data`: `response.created` → a role chunk;
    /// `response.output_text.delta` → content; `response.output_item.added` of a
    /// `function_call` → the call's head, `response.function_call_arguments.delta` → its
    /// arguments; reasoning text and summary deltas → `reasoning_content`;
    /// `response.completed` / `response.incomplete` → the finish chunk, a usage chunk and
    /// the end; `response.failed` and `error` → a failure; any other event proves the
    /// stream alive.
    fn decode(&mut self, data: &str) -> Vec<Result<StreamEvent, ProviderError>> {
        if data.trim().is_empty() {
            return vec![Ok(StreamEvent::Keepalive)];
        }
        let event: Value = match serde_json::from_str(data) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) | Err(_) => {
                return vec![Ok(StreamEvent::Malformed(
                    "malformed Responses event (not a JSON object)".into(),
                ))];
            }
        };
        let one = |e| vec![Ok(e)];
        let text = |k: &str| event[k].as_str().unwrap_or_default().to_owned();
        match event["type"].as_str().unwrap_or_default() {
            "response.created" => {
                let r = &event["response"];
                self.id = r["id"].as_str().unwrap_or_default().to_owned();
                self.model = r["model"].as_str().unwrap_or_default().to_owned();
                self.created = r["created_at"].as_u64().unwrap_or_default();
                one(StreamEvent::Chunk(self.chunk(
                    Delta {
                        role: Some("assistant".into()),
                        content: None,
                        extra: Extra::new(),
                    },
                    None,
                )))
            }
            "response.output_text.delta" => one(StreamEvent::Chunk(self.chunk(
                Delta {
                    role: None,
                    content: Some(text("delta")),
                    extra: Extra::new(),
                },
                None,
            ))),
            "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => one(
                StreamEvent::Chunk(
                    self.chunk(Delta::extra_field("reasoning_content", text("delta")), None),
                ),
            ),
            "response.output_item.added" if event["item"]["type"] == "function_call" => {
                let item = &event["item"];
                let index = self.calls.len();
                self.calls
                    .push(item["id"].as_str().unwrap_or_default().to_owned());
                let call = json!({
                    "index": index, "id": item["call_id"].as_str().unwrap_or_default(),
                    "type": "function",
                    "function": {"name": item["name"].as_str().unwrap_or_default(), "arguments": ""},
                });
                one(StreamEvent::Chunk(self.chunk(Self::tool_delta(call), None)))
            }
            "response.function_call_arguments.delta" => {
                let item = event["item_id"].as_str().unwrap_or_default();
                match self.calls.iter().position(|c| c == item) {
                    Some(index) => {
                        let call =
                            json!({"index": index, "function": {"arguments": text("delta")}});
                        one(StreamEvent::Chunk(self.chunk(Self::tool_delta(call), None)))
                    }
                    None => one(StreamEvent::Malformed(format!(
                        "function_call_arguments.delta for item {}, which is not a function call",
                        echelon_types::bounded_name(item)
                    ))),
                }
            }
            "response.completed" | "response.incomplete" => {
                let r = &event["response"];
                let status = r["status"].as_str().unwrap_or("completed");
                let finish = finish_reason(status, r, !self.calls.is_empty()).unwrap_or("stop");
                let mut out = vec![Ok(StreamEvent::Chunk(
                    self.chunk(Delta::default(), Some(finish)),
                ))];
                if let Some(u) = usage(&r["usage"]) {
                    let mut usage_chunk = self.chunk(Delta::default(), None);
                    usage_chunk.choices.clear();
                    usage_chunk.usage = Some(u);
                    out.push(Ok(StreamEvent::Chunk(usage_chunk)));
                }
                out.push(Ok(StreamEvent::Done));
                out
            }
            "response.failed" => vec![Err(failed(&event["response"]))],
            "error" => {
                let message = format!(
                    "{}: {}",
                    echelon_types::bounded_name(event["code"].as_str().unwrap_or("error")),
                    upstream_text(event["message"].as_str().unwrap_or_default())
                );
                vec![Err(ProviderError::new(ErrorKind::ServerError, message))]
            }
            _ => one(StreamEvent::Keepalive),
        }
    }
}

/// The decoded events of a Responses SSE body that arrives as `bytes`.
pub(super) fn events<S>(bytes: S) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send
where
    S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
{
    let mut decoder = Decoder::default();
    decoded_sse(bytes, move |data| decoder.decode(data))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_the_clients_with_this_attempts_model_stream_and_defaults() {
        let chat = ChatCompletionRequest::new("route", Vec::new());
        let native = NativeResponses {
            body: json!({"model": "route", "input": "hi", "temperature": 0.1, "store": true})
                .as_object()
                .unwrap()
                .clone(),
            chat_messages: 0,
        };
        let req = ProviderRequest {
            temperature: Some(0.9),
            max_tokens: Some(64),
            ..ProviderRequest::new(&chat, "gpt-up", true)
        };
        let body = Value::Object(body(&req, &native));
        assert_eq!(
            body,
            json!({"model": "gpt-up", "input": "hi", "temperature": 0.1, "store": true,
                   "stream": true, "max_output_tokens": 64})
        );
        let without_store = NativeResponses {
            body: Map::new(),
            chat_messages: 0,
        };
        let sent = self::body(&ProviderRequest::new(&chat, "m", false), &without_store);
        assert_eq!(sent["store"], false);
    }

    #[test]
    fn a_response_object_becomes_a_chat_completion() {
        let c = to_completion(&json!({
            "id": "resp_1", "object": "response", "created_at": 7, "status": "completed",
            "model": "gpt-up",
            "output": [
                {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}]},
                {"type": "message", "id": "msg_1", "role": "assistant", "content": [{"type": "output_text", "text": "4", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{\"a\":1}"}
            ],
            "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 3,
                      "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 13}
        }))
        .unwrap();
        let m = &c.choices[0].message;
        assert_eq!(m["content"], "4");
        assert_eq!(m["reasoning_content"], "think");
        assert_eq!(m["tool_calls"][0]["id"], "call_1");
        assert_eq!(m["tool_calls"][0]["function"]["arguments"], "{\"a\":1}");
        assert_eq!(c.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        let u = c.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (10, 3, 13)
        );
        assert_eq!(u.extra["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(
            (c.id.as_str(), c.model.as_str(), c.created),
            ("resp_1", "gpt-up", 7)
        );
    }

    #[test]
    fn incomplete_failed_and_unfinished_responses() {
        let incomplete = to_completion(&json!({"status": "incomplete", "output": [],
            "incomplete_details": {"reason": "max_output_tokens"}}))
        .unwrap();
        assert_eq!(
            incomplete.choices[0].finish_reason.as_deref(),
            Some("length")
        );
        let failed = to_completion(&json!({"status": "failed", "output": [],
            "error": {"code": "server_error", "message": "boom"}}))
        .unwrap_err();
        assert_eq!(failed.kind, ErrorKind::ServerError);
        assert!(failed.message.contains("boom"));
        let pending = to_completion(&json!({"status": "in_progress", "output": []})).unwrap_err();
        assert_eq!(pending.kind, ErrorKind::Malformed);
        assert_eq!(
            to_completion(&json!({"id": "x"})).unwrap_err().kind,
            ErrorKind::Malformed
        );
    }

    #[test]
    fn stream_events_decode_to_chat_chunks() {
        let mut d = Decoder::default();
        let mut all = Vec::new();
        for e in [
            json!({"type": "response.created", "response": {"id": "resp_9", "model": "gpt-up", "created_at": 3, "status": "in_progress"}}),
            json!({"type": "response.in_progress", "response": {}}),
            json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Hel"}),
            json!({"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "lo"}),
            json!({"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "id": "fc_1", "call_id": "call_7", "name": "f", "arguments": ""}}),
            json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1, "delta": "{}"}),
            json!({"type": "response.completed", "response": {"status": "completed", "usage": {"input_tokens": 5, "output_tokens": 2}}}),
        ] {
            all.extend(d.decode(&e.to_string()));
        }
        let chunks: Vec<_> = all
            .iter()
            .filter_map(|e| match e {
                Ok(StreamEvent::Chunk(c)) => Some(c),
                _ => None,
            })
            .collect();
        assert_eq!(chunks[0].id, "resp_9");
        assert_eq!(
            chunks[0].choices[0].delta.role.as_deref(),
            Some("assistant")
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c.choices.first()?.delta.content.clone())
            .collect();
        assert_eq!(text, "Hello");
        let head = &chunks[3].choices[0].delta.extra["tool_calls"][0];
        assert_eq!(head["id"], "call_7");
        assert_eq!(
            chunks[4].choices[0].delta.extra["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert_eq!(
            chunks[5].choices[0].finish_reason.as_deref(),
            Some("tool_calls")
        );
        assert_eq!(chunks[6].usage.as_ref().unwrap().prompt_tokens, 5);
        assert!(matches!(all.last(), Some(Ok(StreamEvent::Done))));
        assert!(matches!(all[1], Ok(StreamEvent::Keepalive)));
    }

    #[test]
    fn failures_and_junk_in_a_stream() {
        let mut d = Decoder::default();
        let failed = d.decode(
            &json!({"type": "response.failed", "response": {"status": "failed", "error": {"code": "server_error", "message": "x"}}})
                .to_string(),
        );
        assert!(matches!(&failed[0], Err(e) if e.kind == ErrorKind::ServerError));
        let error = d
            .decode(&json!({"type": "error", "code": "overloaded", "message": "busy"}).to_string());
        assert!(matches!(&error[0], Err(e) if e.message.contains("busy")));
        assert!(matches!(
            d.decode("{nope")[0],
            Ok(StreamEvent::Malformed(_))
        ));
    }
}
