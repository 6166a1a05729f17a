//! Translation cost per request between the dialects (issue 20, "Benchmarks"): the
//! inbound ones (Anthropic Messages and OpenAI Responses → the neutral chat request, and
//! the answer back) and the outbound wires (chat → OpenAI, Anthropic Messages and
//! Gemini request bodies, and their answers → a chat completion), each on a small
//! request (one short user turn) and a 2,000-token one (a system prompt, six turns, a tool
//! call and its result, a tool definition; about 8,000 characters).
//!
//! Every case starts from bytes and ends in bytes or a parsed value, as the gateway does:
//! parse, translate, serialize. Target: ≤ 5 µs for the small request.
//!
//! Run: `cargo bench -p echelon-server --bench translate`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use divan::{Bencher, black_box};
use echelon::config::ProviderApi;
use echelon::provider::{ProviderRequest, wire_answer, wire_body};
use echelon_server::translate::{messages_answer, messages_request};
use echelon_types::responses::{Echo, Response, parse_responses_request};
use echelon_types::{ChatCompletion, ChatCompletionRequest, parse_request};
use serde_json::json;

fn main() {
    divan::main();
}

/// About 2,000 tokens of prose (tiktoken counts ~4 characters per English token).
fn filler(chars: usize) -> String {
    let words =
        "the gateway routes each request to the first healthy echelon and records its usage ";
    words.repeat(chars / words.len() + 1)[..chars].to_owned()
}

#[derive(Clone, Copy, Debug)]
enum Size {
    Small,
    Large,
}

const SIZES: [Size; 2] = [Size::Small, Size::Large];

fn messages_body(size: Size) -> Vec<u8> {
    let v = match size {
        Size::Small => json!({
            "model": "grp", "max_tokens": 64,
            "messages": [{"role": "user", "content": "What is 2+2?"}]
        }),
        Size::Large => json!({
            "model": "grp", "max_tokens": 512, "system": filler(2000),
            "tools": [{"name": "get_weather", "description": "Weather of a city",
                       "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "messages": [
                {"role": "user", "content": filler(1500)},
                {"role": "assistant", "content": [
                    {"type": "text", "text": filler(800)},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": filler(600)}]},
                {"role": "assistant", "content": filler(1000)},
                {"role": "user", "content": filler(1500)},
                {"role": "assistant", "content": filler(600)},
            ]
        }),
    };
    serde_json::to_vec(&v).unwrap()
}

fn responses_body(size: Size) -> Vec<u8> {
    let v = match size {
        Size::Small => json!({"model": "grp", "input": "What is 2+2?", "max_output_tokens": 64}),
        Size::Large => json!({
            "model": "grp", "instructions": filler(2000), "max_output_tokens": 512,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "input": [
                {"role": "user", "content": filler(1500)},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": filler(800)}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": filler(600)},
                {"role": "assistant", "content": filler(1000)},
                {"role": "user", "content": filler(1500)},
                {"role": "assistant", "content": filler(600)},
            ]
        }),
    };
    serde_json::to_vec(&v).unwrap()
}

/// The neutral chat request each outbound case starts from (parsed from the chat body,
/// as `/v1/chat/completions` does).
fn chat_request(size: Size) -> ChatCompletionRequest {
    let v = match size {
        Size::Small => json!({"model": "grp", "max_tokens": 64,
                              "messages": [{"role": "user", "content": "What is 2+2?"}]}),
        Size::Large => json!({
            "model": "grp", "max_tokens": 512,
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "messages": [
                {"role": "system", "content": filler(2000)},
                {"role": "user", "content": filler(1500)},
                {"role": "assistant", "content": filler(800), "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": filler(600)},
                {"role": "assistant", "content": filler(1000)},
                {"role": "user", "content": filler(1500)},
                {"role": "assistant", "content": filler(600)},
            ]
        }),
    };
    parse_request(&serde_json::to_vec(&v).unwrap()).unwrap()
}

/// A non-streamed answer of wire `api` (text of `chars` characters and usage).
fn answer_body(api: ProviderApi, size: Size) -> Vec<u8> {
    let text = match size {
        Size::Small => "4".to_owned(),
        Size::Large => filler(2000),
    };
    let v = match api {
        ProviderApi::OpenAi => json!({
            "id": "c1", "object": "chat.completion", "created": 1, "model": "up",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 2000, "completion_tokens": 500, "total_tokens": 2500}}),
        ProviderApi::Anthropic => json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 2000, "output_tokens": 500, "cache_read_input_tokens": 100}}),
        ProviderApi::Gemini => json!({
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 2000, "candidatesTokenCount": 500, "totalTokenCount": 2500},
            "modelVersion": "gemini-up"}),
    };
    serde_json::to_vec(&v).unwrap()
}

fn completion(size: Size) -> ChatCompletion {
    wire_answer(ProviderApi::OpenAi, &answer_body(ProviderApi::OpenAi, size)).unwrap()
}

const WIRES: [ProviderApi; 3] = [
    ProviderApi::OpenAi,
    ProviderApi::Anthropic,
    ProviderApi::Gemini,
];

/// Inbound: a `/v1/messages` body → the chat request.
#[divan::bench(args = SIZES)]
fn messages_in(bencher: Bencher, size: Size) {
    let body = messages_body(size);
    bencher.bench(|| messages_request(black_box(&body)).unwrap());
}

/// Inbound: a `/v1/responses` body → the chat request.
#[divan::bench(args = SIZES)]
fn responses_in(bencher: Bencher, size: Size) {
    let body = responses_body(size);
    bencher.bench(|| parse_responses_request(black_box(&body)).unwrap());
}

/// Inbound answer: a chat completion → the Messages answer's bytes.
#[divan::bench(args = SIZES)]
fn messages_answer_out(bencher: Bencher, size: Size) {
    let c = completion(size);
    bencher.bench(|| serde_json::to_vec(&messages_answer(black_box(&c), false)).unwrap());
}

/// Inbound answer: a chat completion → the Response object's bytes.
#[divan::bench(args = SIZES)]
fn responses_answer_out(bencher: Bencher, size: Size) {
    let c = completion(size);
    let echo = Echo::default();
    bencher.bench(|| {
        let r = Response::from_completion("resp_1".into(), black_box(&c), "grp", &echo);
        serde_json::to_vec(&r).unwrap()
    });
}

/// Outbound: the chat request → each wire's request body.
#[divan::bench(args = SIZES, consts = [0, 1, 2])]
fn wire_request<const W: usize>(bencher: Bencher, size: Size) {
    let chat = chat_request(size);
    let req = ProviderRequest::new(&chat, "up-model", false);
    bencher.bench(|| wire_body(WIRES[W], black_box(&req)).unwrap());
}

/// Outbound answer: each wire's answer bytes → the chat completion.
#[divan::bench(args = SIZES, consts = [0, 1, 2])]
fn wire_response<const W: usize>(bencher: Bencher, size: Size) {
    let body = answer_body(WIRES[W], size);
    bencher.bench(|| wire_answer(WIRES[W], black_box(&body)).unwrap());
}

/// Both ways through two dialects: a Messages body → chat → a Gemini body, and the
/// Gemini answer → chat → the Messages answer's bytes (Claude Code in front of Gemini).
#[divan::bench(args = SIZES)]
fn messages_via_gemini(bencher: Bencher, size: Size) {
    let body = messages_body(size);
    let answer = answer_body(ProviderApi::Gemini, size);
    bencher.bench(|| {
        let chat = messages_request(black_box(&body)).unwrap();
        let sent = wire_body(
            ProviderApi::Gemini,
            &ProviderRequest::new(&chat, "gemini-up", false),
        )
        .unwrap();
        let c = wire_answer(ProviderApi::Gemini, black_box(&answer)).unwrap();
        (
            sent,
            serde_json::to_vec(&messages_answer(&c, false)).unwrap(),
        )
    });
}
