//! The providers' rate-limit response headers (OpenAI's `x-ratelimit-*`, Anthropic's
//! `anthropic-ratelimit-*`) recorded per key and shown by `/admin/state`, by key id only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use serde_json::{Value, json};

const OPENAI_KEY: &str = "sk-openai-test-0123456789";
const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789";

/// An upstream answering chat completions with OpenAI's headers and Messages with
/// Anthropic's (the second request's counts lower than the first's).
async fn upstream() -> String {
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let chat_calls = calls.clone();
    let chat = move || {
        let n = chat_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            (
                [
                    ("x-ratelimit-limit-requests", "500".to_owned()),
                    ("x-ratelimit-remaining-requests", (499 - n).to_string()),
                    ("x-ratelimit-reset-requests", "120ms".to_owned()),
                    ("x-ratelimit-remaining-tokens", "29000".to_owned()),
                ],
                axum::Json(json!({
                    "id": "c1", "object": "chat.completion", "created": 1, "model": "up",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "hi"}}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                })),
            )
        }
    };
    let messages = || async {
        (
            [
                ("anthropic-ratelimit-requests-remaining", "49"),
                ("anthropic-ratelimit-input-tokens-remaining", "7000"),
                ("anthropic-ratelimit-tokens-reset", "2026-12-03T06:00:00Z"),
            ],
            axum::Json(json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
                "content": [{"type": "text", "text": "hi"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 1}
            })),
        )
    };
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages));
    let addr = common::spawn_upstream(app).await;
    format!("http://{addr}")
}

#[tokio::test]
async fn each_keys_last_rate_limit_headers_are_in_admin_state() {
    let url = upstream().await;
    let yaml = format!(
        r#"
providers:
  oa: {{ base_url: "{url}/v1", api_keys: ["{OPENAI_KEY}"] }}
  an: {{ base_url: "{url}", api: anthropic, api_keys: ["{ANTHROPIC_KEY}"] }}
models:
  gpt: {{ provider: oa, model: up, max_retries: 0 }}
  claude: {{ provider: an, model: claude-up, max_retries: 0 }}
"#
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let gateway = Arc::new(Gateway::from_config(&config).unwrap());
    let server = common::serve(gateway, &ServerOptions::default()).await;
    let http = reqwest::Client::new();
    let state = || async {
        let text = http
            .get(server.url("/admin/state"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains(OPENAI_KEY) && !text.contains(ANTHROPIC_KEY));
        serde_json::from_str::<Value>(&text).unwrap()
    };
    let before = state().await;
    assert!(
        before["models"]["gpt"]["keys"][0]
            .get("provider_rate_limits")
            .is_none(),
        "nothing before a response"
    );
    for _ in 0..2 {
        let resp = http
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let resp = http
        .post(server.url("/v1/messages"))
        .json(&json!({"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let after = state().await;
    let openai = &after["models"]["gpt"]["keys"][0]["provider_rate_limits"];
    assert_eq!(openai["requests_limit"], 500);
    assert_eq!(
        openai["requests_remaining"], 498,
        "the latest response's: {openai}"
    );
    assert_eq!(openai["requests_reset"], "120ms");
    assert_eq!(openai["tokens_remaining"], 29000);
    assert!(openai["age_ms"].as_u64().is_some());
    let anthropic = &after["models"]["claude"]["keys"][0]["provider_rate_limits"];
    assert_eq!(anthropic["requests_remaining"], 49);
    assert_eq!(anthropic["input_tokens_remaining"], 7000);
    assert_eq!(anthropic["tokens_reset"], "2026-12-03T06:00:00Z");
    assert!(anthropic.get("tokens_remaining").is_none());
}
