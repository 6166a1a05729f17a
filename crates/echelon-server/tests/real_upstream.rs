//! End to end against the real upstream: llama-server with SmolLM2-135M-Instruct.
//!
//! Skips with a printed reason when it is not installed, unless
//! `ECHELON_REQUIRE_REAL_UPSTREAM=1` (set by `scripts/test.sh` and CI), which fails instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::real::{LlamaServer, start_or_skip};
use serde_json::{Value, json};

struct Stack {
    servers: Vec<LlamaServer>,
    server: common::Served,
}

/// Two llama-servers behind a gateway: task group `demo` has `real-a` (echelon1) then
/// `real-b` (echelon2). `key_a` is the key the gateway sends to the first.
async fn stack(key_a: &str) -> Option<Stack> {
    let servers = start_or_skip(&[("real-a", "key-a"), ("real-b", "key-b")])
        .await
        .unwrap()?;
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["{key_a}"] }}
  pb: {{ base_url: "{}", api_keys: ["key-b"] }}
models:
  real-a: {{ provider: pa, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.05, context_window: 2048 }}
  real-b: {{ provider: pb, model: smollm2, timeout: 60, max_retries: 1, retry_delay: 0.05, context_window: 2048 }}
  real-a-undeclared: {{ provider: pa, model: smollm2, timeout: 60, max_retries: 2, retry_delay: 0.05 }}
task_groups:
  demo:
    echelon1: {{ models: [real-a] }}
    echelon2: {{ models: [real-b] }}
polling_pools:
  demo_pool: {{ task_groups: [demo], rotation_strategy: round_robin, failure_threshold: 1, recovery_time: 60 }}
"#,
        servers[0].base_url(),
        servers[1].base_url()
    );
    let gateway =
        Arc::new(Gateway::from_config(&Config::from_str(&yaml, "e2e.yaml").unwrap()).unwrap());
    Some(Stack {
        servers,
        server: common::serve(gateway, &ServerOptions::default()).await,
    })
}

fn body(content: &str, stream: bool) -> Value {
    json!({
        "model": "demo",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24, "temperature": 0, "seed": 7, "stream": stream
    })
}

async fn post(addr: std::net::SocketAddr, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn plain_chat_is_answered_by_the_real_model() {
    let Some(s) = stack("key-a").await else {
        return;
    };
    let resp = post(s.server.addr, &body("Name a colour.", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "real-a");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "real-a", "llama-server answers with its alias");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(v["timings"].is_object(), "llama.cpp's timings pass through");
}

#[tokio::test]
async fn streamed_chat_arrives_in_several_chunks() {
    let Some(s) = stack("key-a").await else {
        return;
    };
    let resp = post(s.server.addr, &body("Count from one to ten.", true)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let pieces: Vec<String> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .filter(|t| !t.is_empty())
        .collect();
    assert!(
        pieces.len() >= 3,
        "content in several chunks, got {pieces:?}"
    );
}

#[tokio::test]
async fn a_killed_echelon1_fails_over_to_echelon2() {
    let Some(mut s) = stack("key-a").await else {
        return;
    };
    s.servers[0].kill();
    let resp = post(s.server.addr, &body("Say hello.", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "real-b");
    let attempts = resp.headers()["x-echelon-attempts"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(attempts.starts_with("real-a:connect:-:"), "{attempts}");
    assert_eq!(
        attempts.matches("real-a:connect").count(),
        2,
        "one retry: {attempts}"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["model"], "real-b");

    // Streams fail over the same way.
    let resp = post(s.server.addr, &body("Say hello.", true)).await;
    assert_eq!(resp.headers()["x-echelon-model"], "real-b");
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn a_wrong_upstream_key_moves_to_the_next_echelon() {
    let Some(s) = stack("not-the-key").await else {
        return;
    };
    let resp = post(s.server.addr, &body("Say hello.", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "real-b");
    let attempts = resp.headers()["x-echelon-attempts"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(attempts.starts_with("real-a:auth:401:"), "{attempts}");
    assert_eq!(
        attempts.matches("real-a").count(),
        1,
        "a 401 is not retried: {attempts}"
    );
}

#[tokio::test]
async fn a_too_long_prompt_is_a_400_without_retry() {
    let Some(s) = stack("key-a").await else {
        return;
    };
    let long = "lorem ipsum dolor sit amet ".repeat(1200); // far beyond -c 2048

    // A model that declares no window: llama-server refuses, and that is not retried.
    let mut req = body(&long, false);
    req["model"] = "real-a-undeclared".into();
    let resp = post(s.server.addr, &req).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let attempts = v["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "no retry: {attempts:?}");
    assert_eq!(attempts[0]["error_kind"], "context_length");
    assert_eq!(attempts[0]["status"], 400);

    // Models that declare their window: skipped before sending (counted with tiktoken).
    let resp = post(s.server.addr, &body(&long, false)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let kinds: Vec<_> = v["error"]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["model"].as_str().unwrap(),
                a["error_kind"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![("real-a", "context_window"), ("real-b", "context_window")]
    );
}

#[tokio::test]
async fn a_pool_round_robins_over_two_real_servers_and_survives_one_dying() {
    let Some(mut s) = stack("key-a").await else {
        return;
    };
    let mut answered = Vec::new();
    for _ in 0..4 {
        let mut req = body("Say hi.", false);
        req["model"] = "demo_pool".into();
        let resp = post(s.server.addr, &req).await;
        assert_eq!(resp.status(), 200);
        answered.push(
            resp.headers()["x-echelon-model"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(answered, vec!["real-a", "real-b", "real-a", "real-b"]);

    s.servers[0].kill();
    for _ in 0..4 {
        let mut req = body("Say hi.", false);
        req["model"] = "demo_pool".into();
        let resp = post(s.server.addr, &req).await;
        assert_eq!(resp.status(), 200, "the pool keeps answering");
        assert_eq!(resp.headers()["x-echelon-model"], "real-b");
    }
}
