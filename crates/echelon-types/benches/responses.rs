//! Translation cost of the Responses API bridge (issue 20, "Benchmarks": ≤ 5 µs for a
//! small request): a Responses body to a chat request, a chat completion to a Response
//! object, and a 10-chunk stream to its `response.*` events, on a small request and on
//! one of about 2,000 tokens (≈ 8,000 characters over 20 items).
//!
//! Run: `cargo bench -p echelon-types --bench responses`
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use divan::{Bencher, black_box};
use echelon_types::responses::{Echo, Response, ResponseStreamTranslator, parse_responses_request};
use echelon_types::{ChatCompletion, ChatCompletionChunk};
use serde_json::json;

fn main() {
    divan::main();
}

fn small_body() -> Vec<u8> {
    json!({"model": "m", "instructions": "Be brief.", "input": "Name three colours.",
           "max_output_tokens": 16})
    .to_string()
    .into_bytes()
}

/// About 2,000 tokens: 20 items of ~400 characters, a tool, a function call round trip.
fn large_body() -> Vec<u8> {
    let text = "lorem ipsum dolor sit amet ".repeat(15);
    let mut input = Vec::new();
    for i in 0..18 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        let kind = if i % 2 == 0 {
            "input_text"
        } else {
            "output_text"
        };
        input.push(json!({"type": "message", "role": role,
                          "content": [{"type": kind, "text": text}]}));
    }
    input.push(
        json!({"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{\"q\":1}"}),
    );
    input.push(json!({"type": "function_call_output", "call_id": "c1", "output": text}));
    json!({"model": "m", "instructions": text, "input": input, "stream": true,
           "tools": [{"type": "function", "name": "f", "parameters": {"type": "object",
                      "properties": {"q": {"type": "integer"}}}}]})
    .to_string()
    .into_bytes()
}

#[divan::bench]
fn request_small(b: Bencher) {
    let body = small_body();
    b.bench(|| parse_responses_request(black_box(&body)).unwrap());
}

#[divan::bench]
fn request_2000_tokens(b: Bencher) {
    let body = large_body();
    b.bench(|| parse_responses_request(black_box(&body)).unwrap());
}

#[divan::bench]
fn response_small(b: Bencher) {
    let completion: ChatCompletion = serde_json::from_value(json!({
        "id": "x", "created": 1, "model": "smol",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Red, green and blue."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }))
    .unwrap();
    let echo = parse_responses_request(&small_body()).unwrap().echo;
    b.bench(|| {
        let r = Response::from_completion("resp_1".into(), black_box(&completion), "m", &echo);
        serde_json::to_vec(&r).unwrap()
    });
}

#[divan::bench]
fn stream_10_chunks(b: Bencher) {
    let chunks: Vec<ChatCompletionChunk> = (0..10)
        .map(|i| {
            serde_json::from_value(json!({"id": "x", "model": "smol",
                "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}}]}))
            .unwrap()
        })
        .collect();
    let echo = Echo::default();
    b.bench(|| {
        let mut t = ResponseStreamTranslator::new(Response::started(
            "resp_1".into(),
            1,
            "smol".into(),
            &echo,
        ));
        let mut bytes = 0;
        for e in t.start() {
            bytes += serde_json::to_vec(&e.data).unwrap().len();
        }
        for c in &chunks {
            for e in t.chunk(black_box(c)) {
                bytes += serde_json::to_vec(&e.data).unwrap().len();
            }
        }
        for e in t.finish() {
            bytes += serde_json::to_vec(&e.data).unwrap().len();
        }
        bytes
    });
}
