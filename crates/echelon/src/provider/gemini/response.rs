//! A Gemini `GenerateContentResponse` as a chat completion, and each streamed one as a
//! chat-completion chunk.
//!
//! - `candidates[i]` → `choices[i]`: text parts (not `thought` ones) joined →
//!   `content`; `thought: true` text → `reasoning_content`; `functionCall` parts →
//!   `tool_calls` (id: the call's own `id`, else generated `call_…`; a
//!   `thoughtSignature` kept in `extra_content.google.thought_signature`, which the
//!   request mapping sends back);
//! - `finishReason` ([`finish_reason`]); the original kept in `native_finish_reason`;
//! - `usageMetadata` ([`usage`]);
//! - `responseId` → `id`, `modelVersion` → `model`;
//! - no candidates and a `promptFeedback.blockReason`: the prompt was blocked, an error
//!   ([`blocked`]), never an empty answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use echelon_types::{ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, Usage};
use serde_json::{Map, Value, json};

use crate::provider::error::{ErrorKind, ProviderError, upstream_text};

/// The OpenAI `finish_reason` of a Gemini `finishReason`: `STOP` → `stop` (or
/// `tool_calls` when the candidate called a function), `MAX_TOKENS` → `length`,
/// `SAFETY`, `RECITATION`, `BLOCKLIST`, `PROHIBITED_CONTENT`, `SPII`, `IMAGE_SAFETY`
/// (and other `*_SAFETY`) → `content_filter`, `MALFORMED_FUNCTION_CALL` /
/// `UNEXPECTED_TOOL_CALL` → `tool_calls` when a call came, else `stop`; anything else
/// (`OTHER`, `LANGUAGE`, unknown) → `stop`.
pub(crate) fn finish_reason(reason: &str, called: bool) -> &'static str {
    match reason {
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => "content_filter",
        r if r.ends_with("SAFETY") => "content_filter",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// The OpenAI `usage` of a `usageMetadata`: `prompt_tokens` = `promptTokenCount` (+
/// `toolUsePromptTokenCount`), `completion_tokens` = `candidatesTokenCount` +
/// `thoughtsTokenCount` (OpenAI counts reasoning among completion tokens),
/// `total_tokens` = `totalTokenCount` (else the sum), `cachedContentTokenCount` →
/// `prompt_tokens_details.cached_tokens`, `thoughtsTokenCount` →
/// `completion_tokens_details.reasoning_tokens`.
pub(crate) fn usage(meta: &Value) -> Option<Usage> {
    let meta = meta.as_object()?;
    let n = |k: &str| meta.get(k).and_then(Value::as_u64).unwrap_or(0);
    let prompt = n("promptTokenCount") + n("toolUsePromptTokenCount");
    let thoughts = n("thoughtsTokenCount");
    let completion = n("candidatesTokenCount") + thoughts;
    let total = meta
        .get("totalTokenCount")
        .and_then(Value::as_u64)
        .unwrap_or(prompt + completion);
    let mut extra = Map::new();
    if let Some(cached) = meta.get("cachedContentTokenCount").and_then(Value::as_u64) {
        extra.insert(
            "prompt_tokens_details".into(),
            json!({"cached_tokens": cached}),
        );
    }
    if thoughts > 0 {
        extra.insert(
            "completion_tokens_details".into(),
            json!({"reasoning_tokens": thoughts}),
        );
    }
    Some(Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: total,
        extra,
    })
}

/// The error of a prompt Gemini blocked (`promptFeedback.blockReason`), if this
/// response is one: no candidates, a block reason. The request's fault
/// ([`ErrorKind::BadRequest`]): another model would be asked the same prompt.
pub(crate) fn blocked(response: &Value) -> Option<ProviderError> {
    let has_candidates = response["candidates"]
        .as_array()
        .is_some_and(|c| !c.is_empty());
    let reason = response.pointer("/promptFeedback/blockReason")?.as_str()?;
    if has_candidates {
        return None;
    }
    let mut message = format!("Gemini blocked the prompt (blockReason {reason})");
    if let Some(m) = response
        .pointer("/promptFeedback/blockReasonMessage")
        .and_then(Value::as_str)
    {
        message.push_str(": ");
        message.push_str(&upstream_text(m));
    }
    Some(ProviderError::new(ErrorKind::BadRequest, message))
}

/// A process-unique id with `prefix` (Gemini gives tool calls no id).
pub(crate) fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{nanos:08x}{n:x}")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one candidate's parts say.
#[derive(Default)]
struct Parts {
    text: Option<String>,
    reasoning: Option<String>,
    /// (name, args, thought signature, the call's own id).
    calls: Vec<(String, Value, Option<String>, Option<String>)>,
}

fn read_parts(candidate: &Value) -> Parts {
    let mut out = Parts::default();
    let Some(parts) = candidate
        .pointer("/content/parts")
        .and_then(Value::as_array)
    else {
        return out;
    };
    for part in parts {
        if let Some(call) = part.get("functionCall") {
            out.calls.push((
                call["name"].as_str().unwrap_or_default().to_owned(),
                call.get("args").cloned().unwrap_or_else(|| json!({})),
                part.get("thoughtSignature")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                call.get("id").and_then(Value::as_str).map(str::to_owned),
            ));
        } else if let Some(text) = part.get("text").and_then(Value::as_str) {
            let into = if part.get("thought").and_then(Value::as_bool) == Some(true) {
                &mut out.reasoning
            } else {
                &mut out.text
            };
            into.get_or_insert_with(String::new).push_str(text);
        }
    }
    out
}

/// A tool call in OpenAI's shape (`index` for stream deltas).
fn tool_call(
    (name, args, signature, id): (String, Value, Option<String>, Option<String>),
    index: Option<usize>,
) -> Value {
    let mut call = Map::new();
    if let Some(i) = index {
        call.insert("index".into(), json!(i));
    }
    call.insert("id".into(), json!(id.unwrap_or_else(|| new_id("call_"))));
    call.insert("type".into(), json!("function"));
    call.insert(
        "function".into(),
        json!({"name": name, "arguments": args.to_string()}),
    );
    if let Some(sig) = signature {
        call.insert(
            "extra_content".into(),
            json!({"google": {"thought_signature": sig}}),
        );
    }
    Value::Object(call)
}

fn index_of(candidate: &Value, position: usize) -> u32 {
    candidate
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX))
}

/// A non-streamed response as a chat completion.
///
/// # Errors
/// [`blocked`] for a blocked prompt; [`ErrorKind::Malformed`] for a response without
/// candidates (an empty answer).
pub(crate) fn completion(response: &Value) -> Result<ChatCompletion, ProviderError> {
    if let Some(e) = blocked(response) {
        return Err(e);
    }
    let candidates = response["candidates"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if candidates.is_empty() {
        return Err(ProviderError::new(
            ErrorKind::Malformed,
            "response has no candidates (an empty answer)",
        ));
    }
    let choices = candidates
        .iter()
        .enumerate()
        .map(|(position, candidate)| {
            let parts = read_parts(candidate);
            let called = !parts.calls.is_empty();
            let mut message = Map::new();
            message.insert("role".into(), json!("assistant"));
            message.insert("content".into(), json!(parts.text));
            if let Some(r) = parts.reasoning {
                message.insert("reasoning_content".into(), json!(r));
            }
            if called {
                let calls: Vec<Value> = parts
                    .calls
                    .into_iter()
                    .map(|c| tool_call(c, None))
                    .collect();
                message.insert("tool_calls".into(), Value::Array(calls));
            }
            let native = candidate.get("finishReason").and_then(Value::as_str);
            let mut extra = Map::new();
            if let Some(native) = native {
                extra.insert("native_finish_reason".into(), json!(native));
            }
            Choice {
                index: index_of(candidate, position),
                message,
                finish_reason: native.map(|r| finish_reason(r, called).to_owned()),
                extra,
            }
        })
        .collect();
    Ok(ChatCompletion {
        id: response["responseId"]
            .as_str()
            .map_or_else(|| new_id("chatcmpl-"), str::to_owned),
        object: "chat.completion".into(),
        created: now_secs(),
        model: response["modelVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        choices,
        usage: usage(&response["usageMetadata"]),
        extra: Map::new(),
        native: None,
    })
}

/// The state of one stream's chunk mapping: the id and creation time every chunk
/// shares, and per candidate whether its role was sent, how many tool calls it made
/// (their `index`), and whether it called a function (`STOP` → `tool_calls`).
#[derive(Debug)]
pub(crate) struct ChunkMapper {
    id: Option<String>,
    created: u64,
    /// Per candidate index: (role sent, tool calls so far).
    candidates: Vec<(bool, usize)>,
}

impl Default for ChunkMapper {
    fn default() -> Self {
        ChunkMapper {
            id: None,
            created: now_secs(),
            candidates: Vec::new(),
        }
    }
}

impl ChunkMapper {
    /// One streamed response as a chunk; usage rides on a chunk with a finish reason
    /// (Gemini repeats the running count on every response).
    ///
    /// # Errors
    /// [`blocked`] for a blocked prompt.
    pub(crate) fn chunk(&mut self, response: &Value) -> Result<ChatCompletionChunk, ProviderError> {
        if let Some(e) = blocked(response) {
            return Err(e);
        }
        let id = self
            .id
            .get_or_insert_with(|| {
                response["responseId"]
                    .as_str()
                    .map_or_else(|| new_id("chatcmpl-"), str::to_owned)
            })
            .clone();
        let candidates = response["candidates"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut finished = false;
        let mut choices = Vec::with_capacity(candidates.len());
        for (position, candidate) in candidates.iter().enumerate() {
            let index = index_of(candidate, position);
            let slot = usize::try_from(index).unwrap_or(usize::MAX).min(1024);
            if self.candidates.len() <= slot {
                self.candidates.resize(slot + 1, (false, 0));
            }
            let (role_sent, calls_so_far) = &mut self.candidates[slot];
            let parts = read_parts(candidate);
            let mut delta = Delta {
                role: (!*role_sent).then(|| "assistant".to_owned()),
                content: parts.text,
                extra: Map::new(),
            };
            *role_sent = true;
            if let Some(r) = parts.reasoning {
                delta.extra.insert("reasoning_content".into(), json!(r));
            }
            if !parts.calls.is_empty() {
                let calls: Vec<Value> = parts
                    .calls
                    .into_iter()
                    .map(|c| {
                        let call = tool_call(c, Some(*calls_so_far));
                        *calls_so_far += 1;
                        call
                    })
                    .collect();
                delta.extra.insert("tool_calls".into(), Value::Array(calls));
            }
            let native = candidate.get("finishReason").and_then(Value::as_str);
            let mut extra = Map::new();
            if let Some(native) = native {
                finished = true;
                extra.insert("native_finish_reason".into(), json!(native));
            }
            choices.push(ChunkChoice {
                index,
                delta,
                finish_reason: native.map(|r| finish_reason(r, *calls_so_far > 0).to_owned()),
                extra,
            });
        }
        let usage = if finished || candidates.is_empty() {
            usage(&response["usageMetadata"])
        } else {
            None
        };
        Ok(ChatCompletionChunk {
            id,
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: response["modelVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            choices,
            usage,
            extra: Map::new(),
            verbatim: Default::default(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn maps_finish_reasons() {
        for (gemini, called, openai) in [
            ("STOP", false, "stop"),
            ("STOP", true, "tool_calls"),
            ("MAX_TOKENS", true, "length"),
            ("SAFETY", false, "content_filter"),
            ("RECITATION", false, "content_filter"),
            ("BLOCKLIST", false, "content_filter"),
            ("PROHIBITED_CONTENT", false, "content_filter"),
            ("IMAGE_SAFETY", false, "content_filter"),
            ("MALFORMED_FUNCTION_CALL", false, "stop"),
            ("OTHER", false, "stop"),
        ] {
            assert_eq!(finish_reason(gemini, called), openai, "{gemini}");
        }
    }

    #[test]
    fn maps_usage_with_cache_and_thoughts() {
        let u = usage(&json!({"promptTokenCount": 10, "candidatesTokenCount": 5,
            "thoughtsTokenCount": 3, "totalTokenCount": 18, "cachedContentTokenCount": 4}))
        .unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (10, 8, 18)
        );
        assert_eq!(u.extra["prompt_tokens_details"]["cached_tokens"], 4);
        assert_eq!(u.extra["completion_tokens_details"]["reasoning_tokens"], 3);
        assert!(usage(&Value::Null).is_none());
    }

    #[test]
    fn a_blocked_prompt_is_an_error_not_an_empty_answer() {
        let r = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3}});
        let e = completion(&r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("blockReason SAFETY"), "{e}");
        let e = ChunkMapper::default().chunk(&r).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let e = completion(&json!({"candidates": []})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
    }

    #[test]
    fn stream_tool_calls_are_indexed_across_chunks_and_finish_as_tool_calls() {
        let mut m = ChunkMapper::default();
        let call = |name: &str| {
            json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": name, "args": {"a": 1}}}]}, "index": 0}], "responseId": "r1"})
        };
        let a = m.chunk(&call("f")).unwrap();
        let b = m.chunk(&call("g")).unwrap();
        assert_eq!(a.id, "r1");
        assert_eq!(a.choices[0].delta.role.as_deref(), Some("assistant"));
        assert!(b.choices[0].delta.role.is_none());
        assert_eq!(a.choices[0].delta.extra["tool_calls"][0]["index"], 0);
        assert_eq!(b.choices[0].delta.extra["tool_calls"][0]["index"], 1);
        assert_eq!(
            b.choices[0].delta.extra["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        let end = m
            .chunk(&json!({"candidates": [{"content": {"parts": [{"text": ""}]}, "finishReason": "STOP", "index": 0}],
                           "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 1, "totalTokenCount": 3}}))
            .unwrap();
        assert_eq!(end.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(end.usage.unwrap().total_tokens, 3);
        assert_eq!(end.id, "r1");
    }
}
