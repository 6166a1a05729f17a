//! `POST /v1/responses` to a provider that declares `responses: true`: the request goes
//! to its `/responses` as the client wrote it, the non-streamed answer is its own Response
//! object, a stream is relayed as Responses events, a failure falls over to a chat
//! model, and chat completions to the same provider still go to `/chat/completions`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::response::IntoResponse;
use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{TestUpstream, UpstreamOptions};
use serde_json::{Value, json};

/// `(path, body)` of each request the Responses upstream got.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// An upstream serving `/v1/responses` (a Response object with a field Echelon has no
/// type for, or its stream events) and `/v1/chat/completions`; with `fail`, every
/// `/v1/responses` answers 500.
async fn upstream(fail: bool) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let responses = move |axum::Json(body): axum::Json<Value>| {
        let record = record.clone();
        async move {
            let stream = body["stream"] == true;
            record.lock().unwrap().push(("/v1/responses".into(), body));
            if fail {
                return (
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"error": {"message": "boom", "type": "server_error"}})),
                )
                    .into_response();
            }
            if stream {
                let events = [
                    json!({"type": "response.created", "sequence_number": 0, "response": {"id": "resp_up", "object": "response", "created_at": 5, "status": "in_progress", "model": "gpt-up", "output": []}}),
                    json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0, "item": {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant", "content": []}}),
                    json!({"type": "response.output_text.delta", "sequence_number": 2, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "Four"}),
                    json!({"type": "response.output_text.delta", "sequence_number": 3, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "."}),
                    json!({"type": "response.completed", "sequence_number": 4, "response": {"id": "resp_up", "object": "response", "created_at": 5, "status": "completed", "model": "gpt-up", "output": [], "usage": {"input_tokens": 9, "output_tokens": 2, "total_tokens": 11}}}),
                ];
                let body: String = events
                    .iter()
                    .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
                    .collect();
                return ([(http::header::CONTENT_TYPE, "text/event-stream")], body).into_response();
            }
            axum::Json(json!({
                "id": "resp_up", "object": "response", "created_at": 5, "status": "completed",
                "model": "gpt-up",
                "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": "Four.", "annotations": []}]}],
                "usage": {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 11},
                "x_upstream_only": {"kept": true}
            }))
            .into_response()
        }
    };
    let chat_record = seen.clone();
    let chat = move |axum::Json(body): axum::Json<Value>| {
        let record = chat_record.clone();
        async move {
            record
                .lock()
                .unwrap()
                .push(("/v1/chat/completions".into(), body));
            axum::Json(json!({
                "id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-up",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "chat"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            }))
        }
    };
    let app = axum::Router::new()
        .route("/v1/responses", post(responses))
        .route("/v1/chat/completions", post(chat));
    let addr = common::spawn_upstream(app).await;
    (format!("http://{addr}/v1"), seen)
}

struct Harness {
    server: common::Served,
    seen: Seen,
    down_seen: Seen,
    chat: TestUpstream,
}

impl Harness {
    async fn start() -> Harness {
        let (url, seen) = upstream(false).await;
        let (down_url, down_seen) = upstream(true).await;
        let chat = TestUpstream::start_with(UpstreamOptions {
            record_requests: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let yaml = format!(
            r#"
providers:
  oa: {{ base_url: "{url}", responses: true }}
  down: {{ base_url: "{down_url}", responses: true }}
  local: {{ base_url: "{}" }}
models:
  gpt: {{ provider: oa, model: gpt-up, max_retries: 0 }}
  gpt-down: {{ provider: down, model: gpt-up, max_retries: 0 }}
  local: {{ provider: local, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [gpt-down] }}, echelon2: {{ models: [local] }} }}
"#,
            chat.base_url()
        );
        let config = Config::from_str(&yaml, "t.yaml").unwrap();
        let gateway = Arc::new(Gateway::from_config(&config).unwrap());
        Harness {
            server: common::serve(gateway, &ServerOptions::default()).await,
            seen,
            down_seen,
            chat,
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let resp = reqwest::Client::new()
            .post(self.server.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    }
}

/// A request with fields the chat bridge has no place for.
fn request(model: &str) -> Value {
    json!({
        "model": model,
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "2+2?"}]}],
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}, "strict": true}},
        "truncation": "auto",
        "service_tier": "flex"
    })
}

#[tokio::test]
async fn the_request_goes_to_the_providers_responses_api_as_it_came() {
    let h = Harness::start().await;
    let req = request("gpt");
    let (status, body) = h.post("/v1/responses", &req).await;
    assert_eq!(status, 200, "{body}");
    let (path, sent) = h.seen.lock().unwrap().pop().unwrap();
    assert_eq!(path, "/v1/responses");
    assert_eq!(sent["model"], "gpt-up");
    for field in [
        "instructions",
        "input",
        "include",
        "reasoning",
        "text",
        "truncation",
        "service_tier",
    ] {
        assert_eq!(sent[field], req[field], "{field} as the client sent it");
    }
    assert_eq!(sent["stream"], false);
    assert_eq!(sent["store"], false, "nothing kept upstream");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["id"], "resp_up", "the upstream's own object");
    assert_eq!(answer["x_upstream_only"], json!({"kept": true}));
    assert_eq!(answer["output"][0]["content"][0]["text"], "Four.");
}

#[tokio::test]
async fn a_streamed_response_is_relayed_as_responses_events() {
    let h = Harness::start().await;
    let mut req = request("gpt");
    req["stream"] = json!(true);
    let (status, body) = h.post("/v1/responses", &req).await;
    assert_eq!(status, 200);
    let (_, sent) = h.seen.lock().unwrap().pop().unwrap();
    assert_eq!(sent["stream"], true);
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Four.");
    assert!(body.contains("\"input_tokens\":9"), "{body}");
}

#[tokio::test]
async fn a_failing_responses_provider_falls_over_to_a_chat_model() {
    let h = Harness::start().await;
    let (status, body) = h.post("/v1/responses", &request("grp")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.down_seen.lock().unwrap().len(), 1, "echelon1 was tried");
    let sent = h.chat.recorded().pop().unwrap().body.unwrap();
    assert!(sent.get("include").is_none() && sent.get("truncation").is_none());
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["object"], "response");
    assert_eq!(answer["status"], "completed");
}

#[tokio::test]
async fn chat_completions_to_a_responses_provider_still_go_to_chat_completions() {
    let h = Harness::start().await;
    let (status, body) = h
        .post(
            "/v1/chat/completions",
            &json!({"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (path, _) = h.seen.lock().unwrap().pop().unwrap();
    assert_eq!(path, "/v1/chat/completions");
}

#[test]
fn responses_true_is_refused_on_another_wire() {
    let err = Config::from_str(
        "providers:\n  a: { base_url: \"http://127.0.0.1:1\", api: anthropic, responses: true }\nmodels:\n  m: { provider: a }\n",
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("providers.a.responses"), "{err}");
    assert!(err.contains("t.yaml:2:"), "{err}");
}
