//! The stream transcripts in `tests/fixtures/wire/` (Anthropic Messages and Gemini
//! `streamGenerateContent` events, see its README) served as an upstream's answer, and
//! the chat stream the gateway makes of each: text, tool-call heads and argument deltas,
//! reasoning, the finish reason, usage with cache tokens, and an in-band error after the
//! first content as a stream error (never a clean end).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_types::{
    ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Extra, Role, StreamOptions, Usage,
};
use serde_json::Value;

const TEXT_TOOL: &str = include_str!("fixtures/wire/anthropic_text_tool.sse");
const THINKING: &str = include_str!("fixtures/wire/anthropic_thinking.sse");
const ERROR_MID: &str = include_str!("fixtures/wire/anthropic_error_mid_stream.sse");
const GEMINI: &str = include_str!("fixtures/wire/gemini_function_call.sse");

/// An upstream of wire `api` (`anthropic` or `gemini`) whose every streamed answer is
/// `transcript`; the gateway's model `m` points at it.
async fn gateway(api: &str, transcript: &'static str) -> Arc<Gateway> {
    let answer = move || async move {
        (
            [(http::header::CONTENT_TYPE, "text/event-stream")],
            transcript,
        )
    };
    let app = axum::Router::new()
        .route("/v1/messages", post(answer))
        .route(
            "/v1beta/models/{model}",
            post(move |_: axum::extract::Path<String>| answer()),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let yaml = format!(
        r#"
providers:
  up: {{ base_url: "http://{addr}", api: {api}, api_keys: ["test-key-0123456789"] }}
models:
  m: {{ provider: up, model: fixture, max_retries: 0 }}
"#
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    Arc::new(Gateway::from_config(&config).unwrap())
}

/// What a stream said, put together.
#[derive(Debug, Default)]
struct Heard {
    id: String,
    model: String,
    text: String,
    reasoning: String,
    signature: String,
    /// `(id, name, arguments)` per tool call index.
    calls: Vec<(String, String, String)>,
    finish: Option<String>,
    usage: Option<Usage>,
    error: Option<String>,
}

impl Heard {
    fn take(&mut self, c: &ChatCompletionChunk) {
        if self.id.is_empty() {
            self.id.clone_from(&c.id);
            self.model.clone_from(&c.model);
        }
        if let Some(u) = &c.usage {
            self.usage = Some(u.clone());
        }
        let Some(ch) = c.choices.first() else { return };
        self.text
            .push_str(ch.delta.content.as_deref().unwrap_or_default());
        let s = |k: &str| {
            ch.delta
                .extra
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
        };
        self.reasoning.push_str(s("reasoning_content"));
        self.signature.push_str(s("reasoning_signature"));
        for call in ch
            .delta
            .extra
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let i = usize::try_from(call["index"].as_u64().unwrap()).unwrap();
            if self.calls.len() <= i {
                self.calls.resize(i + 1, Default::default());
            }
            let entry = &mut self.calls[i];
            if let Some(id) = call["id"].as_str() {
                entry.0 = id.to_owned();
            }
            if let Some(name) = call["function"]["name"].as_str() {
                entry.1 = name.to_owned();
            }
            entry
                .2
                .push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        if ch.finish_reason.is_some() {
            self.finish.clone_from(&ch.finish_reason);
        }
    }
}

async fn hear(gw: &Gateway) -> Heard {
    let mut req = ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "hi")]);
    req.stream = Some(true);
    req.stream_options = Some(StreamOptions {
        include_usage: Some(true),
        extra: Extra::new(),
    });
    let mut stream = gw.chat_stream(req).await.unwrap();
    let mut heard = Heard::default();
    while let Some(c) = stream.next().await {
        match c {
            Ok(c) => heard.take(&c),
            Err(e) => {
                heard.error = Some(e.to_string());
                break;
            }
        }
    }
    heard
}

#[tokio::test]
async fn an_anthropic_text_and_tool_use_transcript_becomes_chat_chunks() {
    let heard = hear(&*gateway("anthropic", TEXT_TOOL).await).await;
    assert_eq!(heard.error, None);
    assert_eq!(heard.id, "msg_fx1");
    assert_eq!(heard.model, "claude-fixture");
    assert_eq!(heard.text, "I'll look up the weather.");
    assert_eq!(
        heard.calls,
        vec![(
            "toolu_fx1".to_owned(),
            "get_weather".to_owned(),
            r#"{"city": "Oslo", "unit": "c"}"#.to_owned()
        )]
    );
    let args: Value = serde_json::from_str(&heard.calls[0].2).unwrap();
    assert_eq!(args["city"], "Oslo");
    assert_eq!(heard.finish.as_deref(), Some("tool_calls"));
    let usage = heard.usage.unwrap();
    // input 380 + 120 read from the cache; output from message_delta.
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (500, 61));
    assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], 120);
}

#[tokio::test]
async fn an_anthropic_thinking_transcript_keeps_the_reasoning_and_its_signature() {
    let heard = hear(&*gateway("anthropic", THINKING).await).await;
    assert_eq!(heard.error, None);
    assert_eq!(
        heard.reasoning,
        "Seventeen times three: thirty plus twenty-one."
    );
    assert_eq!(heard.signature, "c2lnbmVkLWZpeHR1cmU=");
    assert_eq!(heard.text, "51");
    assert_eq!(heard.finish.as_deref(), Some("stop"));
    assert_eq!(heard.usage.unwrap().completion_tokens, 23);
}

#[tokio::test]
async fn an_error_event_after_content_is_a_stream_error_not_an_end() {
    let heard = hear(&*gateway("anthropic", ERROR_MID).await).await;
    assert_eq!(heard.text, "Partial");
    assert_eq!(heard.finish, None, "no finish reason is made up");
    let error = heard.error.expect("the stream fails");
    assert!(error.contains("overloaded_error"), "{error}");
}

#[tokio::test]
async fn a_gemini_function_call_transcript_becomes_chat_chunks() {
    let heard = hear(&*gateway("gemini", GEMINI).await).await;
    assert_eq!(heard.error, None);
    assert_eq!(heard.model, "gemini-fixture");
    assert_eq!(heard.reasoning, "Checking the sky");
    assert_eq!(heard.text, "Let me check. ");
    assert_eq!(heard.calls.len(), 1);
    assert_eq!(heard.calls[0].1, "get_weather");
    let args: Value = serde_json::from_str(&heard.calls[0].2).unwrap();
    assert_eq!(args, serde_json::json!({"city": "Oslo", "unit": "c"}));
    assert_eq!(
        heard.finish.as_deref(),
        Some("tool_calls"),
        "STOP after a function call"
    );
    let usage = heard.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (31, 12));
}
