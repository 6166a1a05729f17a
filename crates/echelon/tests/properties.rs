//! Properties of the parsers of outside input, checked with proptest on the stable
//! toolchain (the fuzz targets of README "Fuzzing" check the same on arbitrary bytes):
//!
//! - a streamed body decodes to the same chunks, and ends the same way, however the
//!   transport splits it (inside a line, a UTF-8 character or a `\r\n`);
//! - a request the gateway builds serialises to JSON that `parse_request` turns back
//!   into the same request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../fuzz/src/sse_parser.rs"]
#[allow(unreachable_pub, dead_code)]
mod sse_parser;

use std::path::PathBuf;

use echelon_types::{
    ChatCompletionRequest, ChatMessage, Extra, Role, StreamOptions, parse_request,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// Sorted cut offsets into a body of `len` bytes.
fn cuts(len: usize, picks: &[Index]) -> Vec<usize> {
    let mut cuts: Vec<usize> = picks.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// The UTF-8 transcripts of `fuzz/corpus/sse_parser/`.
fn seed_transcripts() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/sse_parser");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .filter(|data| std::str::from_utf8(data).is_ok())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no UTF-8 seeds in {}", dir.display());
    seeds
}

#[test]
fn seed_transcripts_decode_the_same_however_split() {
    let seeds = seed_transcripts();
    let mut runner = TestRunner::new(Config::with_cases(256));
    let strategy = (any::<Index>(), prop::collection::vec(any::<Index>(), 0..40));
    runner
        .run(&strategy, |(seed, picks)| {
            let data = seed.get(&seeds);
            let whole = sse_parser::decode(vec![data.clone()]);
            let split = sse_parser::decode(sse_parser::split_at(data, &cuts(data.len(), &picks)));
            prop_assert_eq!(split, whole);
            Ok(())
        })
        .unwrap();
}

/// One `data:` event with `line_end` ending its lines.
fn event(data: &Value, line_end: &str) -> String {
    format!("data: {data}{line_end}{line_end}")
}

proptest! {
    #![proptest_config(Config::with_cases(128))]

    /// A generated OpenAI-style stream (role chunk, content chunks, a finish chunk with
    /// usage, `[DONE]`) with any text and any line ending decodes to that text and
    /// usage, whole or split anywhere.
    #[test]
    fn generated_streams_decode_to_their_text_however_split(
        pieces in prop::collection::vec(any::<String>(), 0..8),
        line_end in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        comment in any::<bool>(),
        picks in prop::collection::vec(any::<Index>(), 0..40),
        prompt_tokens in any::<u64>(),
        completion_tokens in any::<u64>(),
    ) {
        let chunk = |delta: Value, finish: Value| json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
        });
        let mut body = event(&chunk(json!({"role": "assistant", "content": null}), Value::Null), line_end);
        for piece in &pieces {
            if comment {
                body.push_str(&format!(": keep-alive{line_end}"));
            }
            body.push_str(&event(&chunk(json!({"content": piece}), Value::Null), line_end));
        }
        let mut last = chunk(json!({}), json!("stop"));
        last["usage"] = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens.wrapping_add(completion_tokens),
        });
        body.push_str(&event(&last, line_end));
        body.push_str(&format!("data: [DONE]{line_end}{line_end}"));
        let data = body.into_bytes();

        let whole = sse_parser::decode(vec![data.clone()]);
        prop_assert_eq!(whole.error, None);
        prop_assert_eq!(whole.chunks.len(), pieces.len() + 2);
        let text: String = whole.chunks.iter()
            .flat_map(|c| &c.choices)
            .filter_map(|c| c.delta.content.as_deref())
            .collect();
        prop_assert_eq!(text, pieces.concat());
        let usage = whole.chunks.last().and_then(|c| c.usage.as_ref()).unwrap();
        prop_assert_eq!((usage.prompt_tokens, usage.completion_tokens), (prompt_tokens, completion_tokens));

        let split = sse_parser::decode(sse_parser::split_at(&data, &cuts(data.len(), &picks)));
        prop_assert_eq!(split, whole);
        sse_parser::check(&data);
    }
}

/// Any JSON value of a few levels, with finite numbers of every kind.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Extra (unmodelled) fields: any names but the modelled ones.
fn extra(modelled: &'static [&'static str]) -> impl Strategy<Value = Extra> {
    prop::collection::btree_map(any::<String>(), json_value(), 0..3).prop_map(move |m| {
        m.into_iter()
            .filter(|(k, _)| !modelled.contains(&k.as_str()))
            .collect()
    })
}

fn message() -> impl Strategy<Value = ChatMessage> {
    let role = prop::sample::select(vec![
        Role::System,
        Role::Developer,
        Role::User,
        Role::Assistant,
        Role::Tool,
        Role::Function,
    ]);
    let content = prop_oneof![
        Just(Value::Null),
        any::<String>().prop_map(Value::from),
        prop::collection::vec(any::<String>(), 0..3).prop_map(|parts| {
            parts
                .into_iter()
                .map(|text| json!({"type": "text", "text": text}))
                .collect()
        }),
    ];
    (role, content, extra(&["role", "content"])).prop_map(|(role, content, extra)| ChatMessage {
        role,
        content,
        extra,
    })
}

fn request() -> impl Strategy<Value = ChatCompletionRequest> {
    const MODELLED: &[&str] = &[
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "user",
    ];
    (
        ".+",
        prop::collection::vec(message(), 1..4),
        any::<Option<bool>>(),
        any::<Option<Option<bool>>>(),
        any::<Option<u32>>(),
        any::<Option<u32>>(),
        any::<Option<f64>>().prop_filter("finite", |t| t.is_none_or(f64::is_finite)),
        any::<Option<String>>(),
        extra(MODELLED),
    )
        .prop_map(
            |(
                model,
                messages,
                stream,
                usage,
                max_tokens,
                max_completion_tokens,
                temperature,
                user,
                extra,
            )| {
                ChatCompletionRequest {
                    model,
                    messages,
                    stream,
                    stream_options: usage.map(|include_usage| StreamOptions {
                        include_usage,
                        extra: Extra::new(),
                    }),
                    max_tokens,
                    max_completion_tokens,
                    temperature,
                    user,
                    extra,
                    native: None,
                }
            },
        )
}

proptest! {
    #![proptest_config(Config::with_cases(256))]

    /// What the gateway sends upstream reads back as what it meant to send.
    #[test]
    fn requests_round_trip_through_parse_request(request in request()) {
        let json = serde_json::to_vec(&request).unwrap();
        let parsed = parse_request(&json);
        prop_assert_eq!(parsed.as_ref().ok(), Some(&request), "JSON: {}", String::from_utf8_lossy(&json));
    }
}
