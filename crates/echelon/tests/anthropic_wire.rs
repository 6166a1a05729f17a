//! The Anthropic Messages wire (`api: anthropic`) against the testkit's `/v1/messages`:
//! the request as Anthropic wants it (headers, system hoisted, max_tokens always sent),
//! a task group whose echelon1 is an Anthropic upstream that fails (529, 429, an in-band
//! error event) over to an OpenAI-wire echelon2, stream translation, and usage with
//! cache tokens in the record and the cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::RecordSink;
use echelon::usage::record::RequestRecord;
use echelon_testkit::anthropic::{CACHE_READ_TOKENS, CACHE_WRITE_TOKENS};
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use serde_json::json;

#[derive(Default)]
struct Collect(Mutex<Vec<RequestRecord>>);

impl RecordSink for Collect {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(record);
        Box::pin(async {})
    }
}

struct Setup {
    gw: Arc<Gateway>,
    sink: Arc<Collect>,
    claude: TestUpstream,
    local: TestUpstream,
}

/// `claude` (api: anthropic, priced with cache rates) and `local` (OpenAI wire); task
/// group `grp`: echelon1 claude, echelon2 local.
async fn setup() -> Setup {
    let claude = TestUpstream::start_with(UpstreamOptions {
        model_alias: "claude-test".into(),
        api_key: Some("sk-ant-test-key-0123456789".into()),
        record_requests: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let local = TestUpstream::start_with(UpstreamOptions {
        model_alias: "local".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        r#"
providers:
  anth: {{ base_url: "{}", api: anthropic, api_keys: ["sk-ant-test-key-0123456789"] }}
  loc: {{ base_url: "{}" }}
models:
  claude:
    provider: anth
    model: claude-sonnet-test
    max_retries: 0
    pricing: {{ input_per_1m: 3, output_per_1m: 15, cached_input_per_1m: 0.3, cache_write_per_1m: 3.75 }}
  local: {{ provider: loc, max_retries: 0 }}
task_groups:
  grp:
    echelon1: {{ models: [claude] }}
    echelon2: {{ models: [local] }}
"#,
        claude.base_url().trim_end_matches("/v1"),
        local.base_url()
    );
    let sink = Arc::new(Collect::default());
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap())
        .unwrap()
        .with_record_sink(sink.clone());
    Setup {
        gw: Arc::new(gw),
        sink,
        claude,
        local,
    }
}

fn ask(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(
        route,
        vec![
            ChatMessage::new(Role::System, "be brief"),
            ChatMessage::new(Role::User, "hello there"),
        ],
    )
}

#[tokio::test]
async fn a_call_speaks_anthropic_and_records_the_cache_tokens_and_their_cost() {
    let s = setup().await;
    let done = s.gw.chat(ask("claude")).await.unwrap();
    assert_eq!(done.model, "claude");
    assert_eq!(done.response.first_text(), Some("echo: hello there"));
    assert_eq!(
        done.response.choices[0].finish_reason.as_deref(),
        Some("stop")
    );
    let usage = done.response.usage.clone().unwrap();
    // 2 words plain, 3 read, 2 written.
    assert_eq!(
        usage.prompt_tokens,
        2 + CACHE_READ_TOKENS + CACHE_WRITE_TOKENS
    );
    assert_eq!(
        usage.extra["prompt_tokens_details"]["cached_tokens"],
        CACHE_READ_TOKENS
    );

    let sent = s.claude.recorded().pop().unwrap();
    assert_eq!(sent.headers["anthropic-version"], "2023-06-01");
    assert_eq!(sent.headers["x-api-key"], "sk-ant-test-key-0123456789");
    assert!(sent.headers.get("authorization").is_none());
    let body = sent.body.unwrap();
    assert_eq!(body["model"], "claude-sonnet-test");
    assert_eq!(body["system"], "be brief");
    assert_eq!(body["max_tokens"], 4096, "always sent: the default");
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "hello there"}])
    );

    s.gw.shutdown().await;
    let records = s.sink.0.lock().unwrap().clone();
    let r = &records[0];
    assert_eq!(r.prompt_tokens, 7);
    assert_eq!(r.cached_tokens, CACHE_READ_TOKENS);
    assert_eq!(r.cache_write_tokens, CACHE_WRITE_TOKENS);
    let expected =
        (2.0 * 3.0 + 3.0 * 0.3 + 2.0 * 3.75 + usage.completion_tokens as f64 * 15.0) / 1e6;
    assert!(
        (r.cost_usd - expected).abs() < 1e-12,
        "{} vs {expected}",
        r.cost_usd
    );
}

#[tokio::test]
async fn an_overloaded_anthropic_echelon1_fails_over_to_the_openai_echelon2() {
    let s = setup().await;
    for fault in [Behavior::status(529), Behavior::status(500)] {
        s.claude.push_behavior(fault.clone());
        let done = s.gw.chat(ask("grp")).await.unwrap();
        assert_eq!(done.model, "local", "{fault}");
        assert_eq!(done.response.first_text(), Some("echo: hello there"));
        assert_eq!(done.attempts[0].model, "claude");
        assert_eq!(
            done.attempts[0].status,
            Some(fault.to_string().parse().unwrap())
        );
        assert_eq!(done.attempts[0].outcome.as_str(), "server_error", "{fault}");
    }
    // A stream whose Anthropic upstream reports an error before any content fails over.
    s.claude.push_behavior(Behavior::StreamError { chunks: 0 });
    let mut req = ask("grp");
    req.stream = Some(true);
    let mut stream = s.gw.chat_stream(req).await.unwrap();
    assert_eq!(stream.model(), "local");
    assert_eq!(stream.attempts()[0].outcome.as_str(), "server_error");
    while let Some(c) = stream.next().await {
        c.unwrap();
    }
    drop(stream);
    // A refusal of the request (400) is the caller's fault: no failover.
    s.claude.push_behavior(Behavior::status(400));
    let e = s.gw.chat(ask("grp")).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(s.local.chat_requests(), 3);
}

#[tokio::test]
async fn a_rate_limited_anthropic_key_cools_down_and_the_request_fails_over() {
    let s = setup().await;
    s.claude.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(7),
        message: "rate limited".into(),
    });
    let done = s.gw.chat(ask("grp")).await.unwrap();
    assert_eq!(done.model, "local");
    assert_eq!(done.attempts[0].outcome.as_str(), "rate_limited");
    // The key cools for the upstream's retry-after: the next request skips it.
    let done = s.gw.chat(ask("grp")).await.unwrap();
    assert_eq!(done.attempts[0].outcome.as_str(), "key_cooldown");
    assert_eq!(s.claude.chat_requests(), 1);
}

#[tokio::test]
async fn a_stream_is_translated_into_chunks_with_usage() {
    let s = setup().await;
    let mut req = ask("claude");
    req.stream = Some(true);
    req.stream_options = Some(echelon_types::StreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let mut stream = s.gw.chat_stream(req).await.unwrap();
    let (mut text, mut finish, mut usage) = (String::new(), None, None);
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        if let Some(ch) = c.choices.first() {
            text.push_str(ch.delta.content.as_deref().unwrap_or_default());
            finish = finish.or(ch.finish_reason.clone());
        }
        usage = usage.or(c.usage);
    }
    assert_eq!(text, "echo: hello there");
    assert_eq!(finish.as_deref(), Some("stop"));
    let usage = usage.unwrap();
    assert_eq!(usage.prompt_tokens, 7);
    assert_eq!(usage.completion_tokens, 3);
    s.gw.shutdown().await;
    let r = s.sink.0.lock().unwrap()[0].clone();
    assert_eq!((r.cached_tokens, r.cache_write_tokens), (3, 2));
    assert!(!r.estimated);
}

#[tokio::test]
async fn a_streamed_tool_call_becomes_tool_call_deltas() {
    let s = setup().await;
    let mut req = ask("claude");
    req.stream = Some(true);
    req.extra.insert(
        "tools".into(),
        json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]),
    );
    req.extra.insert("tool_choice".into(), json!("required"));
    let mut stream = s.gw.chat_stream(req).await.unwrap();
    let (mut args, mut name, mut finish) = (String::new(), None, None);
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        let Some(ch) = c.choices.first() else {
            continue;
        };
        if let Some(calls) = ch.delta.extra.get("tool_calls") {
            let call = &calls[0];
            assert_eq!(call["index"], 0);
            if let Some(n) = call["function"]["name"].as_str() {
                name = Some(n.to_owned());
            }
            args.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
        finish = finish.or(ch.finish_reason.clone());
    }
    assert_eq!(name.as_deref(), Some("lookup"));
    assert_eq!(args, r#"{"text":"hello there"}"#);
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let sent = s.claude.recorded().pop().unwrap().body.unwrap();
    assert_eq!(sent["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        sent["tools"],
        json!([{"name": "lookup", "input_schema": {"type": "object"}}])
    );
}

/// A chat request asking for `response_format` json_schema, whose last user text is `text`.
fn structured_ask(text: &str) -> ChatCompletionRequest {
    let mut req = ChatCompletionRequest::new("claude", vec![ChatMessage::new(Role::User, text)]);
    req.extra.insert(
        "response_format".into(),
        json!({"type": "json_schema", "json_schema": {"name": "verdict", "strict": true,
               "schema": {"type": "object", "properties": {"score": {"type": "integer"}}}}}),
    );
    req
}

#[tokio::test]
async fn a_json_schema_format_is_a_forced_tool_read_back_as_content() {
    let s = setup().await;
    let done = s.gw.chat(structured_ask(r#"{"score": 8}"#)).await.unwrap();
    let choice = &done.response.choices[0];
    assert_eq!(choice.message["content"], r#"{"score":8}"#);
    assert!(choice.message.get("tool_calls").is_none());
    assert_eq!(choice.finish_reason.as_deref(), Some("stop"));
    let sent = s.claude.recorded().pop().unwrap().body.unwrap();
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "verdict"})
    );
    assert_eq!(sent["tools"][0]["name"], "verdict");
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["score"]["type"],
        "integer"
    );
    assert!(sent.get("response_format").is_none());

    // Streamed: the tool's input_json_deltas are content deltas.
    let mut req = structured_ask(r#"{"score": 8}"#);
    req.stream = Some(true);
    let mut stream = s.gw.chat_stream(req).await.unwrap();
    let (mut text, mut finish) = (String::new(), None);
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        let Some(ch) = c.choices.first() else {
            continue;
        };
        assert!(ch.delta.extra.get("tool_calls").is_none(), "{c:?}");
        text.push_str(ch.delta.content.as_deref().unwrap_or_default());
        finish = finish.or(ch.finish_reason.clone());
    }
    assert_eq!(text, r#"{"score": 8}"#);
    assert_eq!(finish.as_deref(), Some("stop"));
}

#[tokio::test]
async fn a_failure_after_the_first_content_is_a_stream_error() {
    let s = setup().await;
    for fault in [
        Behavior::StreamError { chunks: 2 },
        Behavior::StreamCut { chunks: 2 },
    ] {
        s.claude.push_behavior(fault.clone());
        let mut req = ask("grp");
        req.stream = Some(true);
        let mut stream = s.gw.chat_stream(req).await.unwrap();
        assert_eq!(stream.model(), "claude");
        let mut got = String::new();
        let mut failed = false;
        while let Some(c) = stream.next().await {
            match c {
                Ok(c) => got.extend(c.choices.iter().filter_map(|c| c.delta.content.clone())),
                Err(_) => failed = true,
            }
        }
        assert!(failed, "{fault}: the stream ends in an error, not cleanly");
        assert_eq!(got, "echo: hello", "{fault}");
    }
}

#[tokio::test]
async fn a_malformed_frame_is_skipped_and_counted() {
    let s = setup().await;
    s.claude.push_behavior(Behavior::MalformedSse { chunks: 1 });
    let mut req = ask("claude");
    req.stream = Some(true);
    let mut stream = s.gw.chat_stream(req).await.unwrap();
    let mut text = String::new();
    while let Some(c) = stream.next().await {
        text.extend(
            c.unwrap()
                .choices
                .iter()
                .filter_map(|c| c.delta.content.clone()),
        );
    }
    assert_eq!(text, "echo: hello there");
    drop(stream);
    s.gw.shutdown().await;
    assert_eq!(s.sink.0.lock().unwrap()[0].stream_anomalies, 1);
}

#[tokio::test]
async fn a_probe_lists_the_models_and_a_wrong_key_is_an_auth_failure() {
    let s = setup().await;
    let health = s.gw.health_check_all().await;
    assert!(health["claude"].is_ok(), "{health:?}");
    drop(s);
    // A wrong key: 401, the key refused.
    let up = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("right".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "providers:\n  a: {{ base_url: \"{}\", api: anthropic, api_keys: [\"wrong-key-abcdef\"] }}\nmodels:\n  m: {{ provider: a, max_retries: 0 }}\n",
        up.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let e = gw.chat(ask("m")).await.unwrap_err();
    assert_eq!(e.attempts()[0].outcome.as_str(), "auth");
    assert!(!e.to_string().contains("wrong-key-abcdef"));
}
