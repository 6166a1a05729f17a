//! `POST /v1/messages` to an Anthropic-wire upstream: the client's request goes as it
//! came (unknown fields and blocks, `anthropic-version`, `anthropic-beta`), the answer
//! comes back as the upstream wrote it (thinking blocks with their signatures), and a
//! task group that falls over to an OpenAI-wire model still translates.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{TestUpstream, UpstreamOptions};
use serde_json::{Value, json};

/// A streamed answer with a signed thinking block, then text (the fixture of the
/// library's wire tests).
const THINKING: &str = include_str!("../../echelon/tests/fixtures/wire/anthropic_thinking.sse");

/// What the Anthropic upstream received: body, `anthropic-version`, `anthropic-beta`.
type Seen = Arc<Mutex<Vec<(Value, Option<String>, Option<String>)>>>;

/// An Anthropic-wire upstream that records each request and answers with a thinking
/// block (signed), a server tool block Echelon has no type for, and text; or, with
/// `fail`, a 529 overloaded error.
async fn anthropic_upstream(fail: bool) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let answer = move |headers: http::HeaderMap, axum::Json(body): axum::Json<Value>| {
        let record = record.clone();
        async move {
            use axum::response::IntoResponse;
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let body_streams = body["stream"] == true;
            record
                .lock()
                .unwrap()
                .push((body, h("anthropic-version"), h("anthropic-beta")));
            if body_streams {
                return (
                    [(http::header::CONTENT_TYPE, "text/event-stream")],
                    THINKING,
                )
                    .into_response();
            }
            if fail {
                return (
                    http::StatusCode::from_u16(529).unwrap(),
                    axum::Json(json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})),
                )
                    .into_response();
            }
            axum::Json(json!({
                "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-up",
                "content": [
                    {"type": "thinking", "thinking": "2 and 2 make 4.", "signature": "sig-abc"},
                    {"type": "server_tool_use", "id": "srv_1", "name": "web_search", "input": {"query": "2+2"}},
                    {"type": "text", "text": "4", "citations": null}
                ],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 12, "output_tokens": 7, "cache_read_input_tokens": 3, "cache_creation_input_tokens": 0}
            }))
            .into_response()
        }
    };
    let app = axum::Router::new().route("/v1/messages", post(answer));
    let addr = common::spawn_upstream(app).await;
    (format!("http://{addr}"), seen)
}

struct Harness {
    server: common::Served,
    seen: Seen,
    down_seen: Seen,
    openai: TestUpstream,
}

impl Harness {
    async fn start() -> Harness {
        let (claude_url, seen) = anthropic_upstream(false).await;
        let (down_url, down_seen) = anthropic_upstream(true).await;
        let openai = TestUpstream::start_with(UpstreamOptions {
            record_requests: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let yaml = format!(
            r#"
providers:
  anth: {{ base_url: "{claude_url}", api: anthropic, api_keys: ["sk-ant-test-key-0123456789"] }}
  down: {{ base_url: "{down_url}", api: anthropic, api_keys: ["sk-ant-test-key-9876543210"] }}
  local: {{ base_url: "{}" }}
models:
  claude: {{ provider: anth, model: claude-up, max_retries: 0 }}
  claude-down: {{ provider: down, model: claude-up, max_retries: 0 }}
  local: {{ provider: local, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [claude-down] }}, echelon2: {{ models: [local] }} }}
"#,
            openai.base_url()
        );
        let config = Config::from_str(&yaml, "t.yaml").unwrap();
        let gateway = Arc::new(Gateway::from_config(&config).unwrap());
        Harness {
            server: common::serve(gateway, &ServerOptions::default()).await,
            seen,
            down_seen,
            openai,
        }
    }

    async fn post(&self, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .post(self.server.url("/v1/messages"))
            .json(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }
}

/// A Claude Code-like request: a system block with `cache_control`, extended thinking,
/// an earlier assistant turn with a signed thinking block, and fields Echelon has no type
/// for (`thinking`, `service_tier`, `context_management`).
fn rich_request(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "thinking": {"type": "enabled", "budget_tokens": 128},
        "service_tier": "auto",
        "context_management": {"edits": []},
        "metadata": {"user_id": "u-1"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Simple.", "signature": "sig-prev"},
                {"type": "text", "text": "Let me think."}
            ]},
            {"role": "user", "content": "Go on."}
        ]
    })
}

#[tokio::test]
async fn an_anthropic_upstream_gets_the_request_as_the_client_sent_it() {
    let h = Harness::start().await;
    let req = rich_request("claude");
    let (status, _) = h
        .post(
            &req,
            &[
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "interleaved-thinking-2025-05-14"),
            ],
        )
        .await;
    assert_eq!(status, 200);
    let (sent, version, beta) = h.seen.lock().unwrap().pop().unwrap();
    assert_eq!(sent["model"], "claude-up", "the upstream's model name");
    for field in [
        "system",
        "messages",
        "thinking",
        "service_tier",
        "context_management",
        "metadata",
        "max_tokens",
    ] {
        assert_eq!(sent[field], req[field], "{field} as the client sent it");
    }
    assert_eq!(version.as_deref(), Some("2023-06-01"));
    assert_eq!(beta.as_deref(), Some("interleaved-thinking-2025-05-14"));
}

#[tokio::test]
async fn without_client_headers_the_provider_sends_its_own_version_and_no_beta() {
    let h = Harness::start().await;
    let (status, _) = h.post(&rich_request("claude"), &[]).await;
    assert_eq!(status, 200);
    let (_, version, beta) = h.seen.lock().unwrap().pop().unwrap();
    assert_eq!(version.as_deref(), Some("2023-06-01"));
    assert_eq!(beta, None);
}

#[tokio::test]
async fn the_answer_keeps_its_thinking_signature_and_unknown_blocks() {
    let h = Harness::start().await;
    let (status, answer) = h.post(&rich_request("claude"), &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["content"][0],
        json!({"type": "thinking", "thinking": "2 and 2 make 4.", "signature": "sig-abc"})
    );
    assert_eq!(answer["content"][1]["type"], "server_tool_use");
    assert_eq!(answer["content"][1]["input"], json!({"query": "2+2"}));
    assert_eq!(answer["content"][2]["text"], "4");
    assert_eq!(answer["usage"]["cache_read_input_tokens"], 3);
    assert_eq!(answer["id"], "msg_01");
}

#[tokio::test]
async fn a_fallback_to_an_openai_model_translates_and_sends_no_anthropic_fields() {
    let h = Harness::start().await;
    let (status, answer) = h.post(&rich_request("grp"), &[]).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(h.down_seen.lock().unwrap().len(), 1, "echelon1 was tried");
    let sent = h.openai.recorded().pop().unwrap().body.unwrap();
    for field in ["thinking", "service_tier", "context_management", "system"] {
        assert!(sent.get(field).is_none(), "{field} not sent: {sent}");
    }
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(answer["type"], "message");
    assert_eq!(answer["content"][0]["type"], "text");
}

/// `(event name, data)` of each SSE event of `body`.
fn events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            (name, data)
        })
        .collect()
}

async fn stream(h: &Harness, thinking: bool) -> Vec<(String, Value)> {
    let mut req = rich_request("claude");
    req["stream"] = json!(true);
    if !thinking {
        req.as_object_mut().unwrap().remove("thinking");
    }
    let resp = reqwest::Client::new()
        .post(h.server.url("/v1/messages"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    events(&resp.text().await.unwrap())
}

#[tokio::test]
async fn a_streamed_thinking_block_reaches_a_client_that_asked_for_it_with_its_signature() {
    let h = Harness::start().await;
    let events = stream(&h, true).await;
    let (name, start) = &events[1];
    assert_eq!(name, "content_block_start");
    assert_eq!(start["content_block"]["type"], "thinking");
    let thinking: String = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "thinking_delta")
        .map(|(_, d)| d["delta"]["thinking"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(thinking, "Seventeen times three: thirty plus twenty-one.");
    let signature: Vec<_> = events
        .iter()
        .filter(|(_, d)| d["delta"]["type"] == "signature_delta")
        .collect();
    assert_eq!(signature.len(), 1);
    assert_eq!(signature[0].1["delta"]["signature"], "c2lnbmVkLWZpeHR1cmU=");
    assert_eq!(signature[0].1["index"], 0, "on the thinking block");
    let text = events
        .iter()
        .find(|(_, d)| d["delta"]["type"] == "text_delta")
        .unwrap();
    assert_eq!(text.1["index"], 1, "text is the next block");
    assert_eq!(events.last().unwrap().0, "message_stop");
}

#[tokio::test]
async fn a_client_that_did_not_ask_for_thinking_gets_no_thinking_blocks() {
    let h = Harness::start().await;
    let events = stream(&h, false).await;
    assert!(
        events
            .iter()
            .all(|(_, d)| d["content_block"]["type"] != "thinking"
                && d["delta"]["type"] != "thinking_delta"),
        "{events:?}"
    );
    let text = events
        .iter()
        .find(|(_, d)| d["delta"]["type"] == "text_delta")
        .unwrap();
    assert_eq!(text.1["delta"]["text"], "51");
}
