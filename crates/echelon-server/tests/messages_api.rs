//! `POST /v1/messages` and `/v1/messages/count_tokens` over a real socket, against
//! OpenAI-wire upstreams: the translation both ways, the stream's event order, a failure
//! after the first content as an `event: error`, Anthropic's error shape, and the
//! gateway key as `x-api-key`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEY: &str = "gw-key-1";

struct Harness {
    server: common::Served,
    up: TestUpstream,
    tools_url: String,
    http: reqwest::Client,
}

/// An OpenAI-wire upstream that always calls the tool `get_weather` (stream or not).
async fn tool_calling_upstream() -> String {
    async fn answer(axum::Json(body): axum::Json<Value>) -> axum::response::Response {
        use axum::response::IntoResponse;
        if body["stream"] == true {
            let chunks = [
                json!({"id": "c1", "model": "tooler", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Checking."}}]}),
                json!({"id": "c1", "model": "tooler", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
                json!({"id": "c1", "model": "tooler", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]}),
                json!({"id": "c1", "model": "tooler", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]}),
                json!({"id": "c1", "model": "tooler", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
                json!({"id": "c1", "model": "tooler", "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}}),
            ];
            let mut body: String = chunks.iter().map(|c| format!("data: {c}\n\n")).collect();
            body.push_str("data: [DONE]\n\n");
            ([(http::header::CONTENT_TYPE, "text/event-stream")], body).into_response()
        } else {
            axum::Json(json!({
                "id": "c1", "object": "chat.completion", "created": 1, "model": "tooler",
                "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                    "role": "assistant", "content": null,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29,
                          "prompt_tokens_details": {"cached_tokens": 16}},
                // What the upstream was sent, for the test to check.
                "x_received": body,
            }))
            .into_response()
        }
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(answer));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

impl Harness {
    async fn start(keys: &[&str]) -> Harness {
        let up = TestUpstream::start_with(UpstreamOptions {
            model_alias: "alias-a".into(),
            record_requests: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let tools_url = tool_calling_upstream().await;
        let yaml = format!(
            r#"
providers:
  pa: {{ base_url: "{}" }}
  pt: {{ base_url: "{tools_url}" }}
  dead: {{ base_url: "http://127.0.0.1:9/v1" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  tooler: {{ provider: pt, max_retries: 0 }}
  dead-model: {{ provider: dead, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [dead-model] }}, echelon2: {{ models: [a] }} }}
"#,
            up.base_url()
        );
        let config = Config::from_str(&yaml, "t.yaml").unwrap();
        let gateway = Arc::new(Gateway::from_config(&config).unwrap());
        let options = ServerOptions {
            api_keys: keys.iter().map(|k| SecretString::from(*k)).collect(),
            ..Default::default()
        };
        Harness {
            server: common::serve(gateway, &options).await,
            up,
            tools_url,
            http: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, http::HeaderMap, String) {
        let resp = self
            .http
            .post(self.server.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap())
    }
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
            assert_eq!(data["type"], name.as_str(), "event name and type agree");
            (name, data)
        })
        .collect()
}

#[tokio::test]
async fn a_text_message_is_translated_to_chat_and_back() {
    let h = Harness::start(&[]).await;
    let (status, headers, body) = h
        .post(
            "/v1/messages",
            &json!({
                "model": "grp", "max_tokens": 33, "stop_sequences": ["STOP"],
                "system": "be brief", "temperature": 0.2,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["content"][0]["text"], "echo: hello there");
    assert_eq!(m["stop_reason"], "end_turn");
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0);
    assert!(m["usage"]["output_tokens"].as_u64().unwrap() > 0);
    // Routed like a chat completion: echelon1 failed, echelon2 answered.
    assert_eq!(headers["x-echelon-model"], "a");
    let attempts = headers["x-echelon-attempts"].to_str().unwrap();
    assert!(attempts.starts_with("dead-model:connect"), "{attempts}");
    assert!(headers.contains_key("x-echelon-overhead-ms"));
    assert!(headers.contains_key("x-request-id"));
    // The upstream got a chat request.
    let sent = h.up.recorded().pop().unwrap().body.unwrap();
    assert_eq!(
        sent["messages"][0],
        json!({"role": "system", "content": "be brief"})
    );
    assert_eq!(
        sent["messages"][1],
        json!({"role": "user", "content": "hello there"})
    );
    assert_eq!(sent["max_tokens"], 33);
    assert_eq!(sent["stop"], json!(["STOP"]));
    assert_eq!(sent["temperature"], 0.2);
}

#[tokio::test]
async fn a_tool_call_round_trip_is_translated_both_ways() {
    let h = Harness::start(&[]).await;
    let (status, _, body) = h
        .post(
            "/v1/messages",
            &json!({
                "model": "tooler", "max_tokens": 100,
                "tools": [{"name": "get_weather", "description": "Weather of a city",
                           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "tool_choice": {"type": "tool", "name": "get_weather"},
                "messages": [
                    {"role": "user", "content": "Weather in Paris?"},
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0", "name": "get_weather", "input": {"city": "Lyon"}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "rain"},
                                                 {"type": "text", "text": "and Paris?"}]}
                ],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        m["content"],
        json!([{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}])
    );
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(
        m["usage"],
        json!({"input_tokens": 4, "output_tokens": 9, "cache_read_input_tokens": 16})
    );
    let sent = &m["x_received"];
    assert!(
        sent.is_null(),
        "unknown response fields are not leaked: {m}"
    );
    let _ = &h.tools_url;
}

#[tokio::test]
async fn the_request_sent_upstream_carries_the_tools_and_tool_turns() {
    // The tool upstream echoes what it got in `x_received`, which from_chat drops; read
    // it through /v1/chat/completions' passthrough instead: the same translation is
    // checked in messages.rs's unit tests, here the routed request reaches the upstream.
    let h = Harness::start(&[]).await;
    let (status, _, body) = h
        .post(
            "/v1/messages",
            &json!({
                "model": "a", "max_tokens": 10,
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
                "tool_choice": {"type": "auto"},
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "text", "text": "calling"}, {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "done", "is_error": true}]}
                ],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let sent = h.up.recorded().pop().unwrap().body.unwrap();
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    );
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(
        sent["messages"][1],
        json!({"role": "assistant", "content": "calling", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})
    );
    assert_eq!(
        sent["messages"][2],
        json!({"role": "tool", "content": "Error: done", "tool_call_id": "t1"})
    );
}

#[tokio::test]
async fn a_stream_is_the_messages_event_sequence() {
    let h = Harness::start(&[]).await;
    let (status, headers, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "a", "max_tokens": 20, "stream": true,
                    "messages": [{"role": "user", "content": "one two three"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers[http::header::CONTENT_TYPE], "text/event-stream");
    assert_eq!(headers["x-echelon-model"], "a");
    let ev = events(&body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "content_block_start");
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(
        names[2..names.len() - 3]
            .iter()
            .all(|n| *n == "content_block_delta")
    );
    let text: String = ev
        .iter()
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "echo: one two three");
    assert_eq!(ev[0].1["message"]["role"], "assistant");
    assert_eq!(
        ev[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let delta = &ev[names.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0);
    assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_streamed_tool_call_is_input_json_deltas() {
    let h = Harness::start(&[]).await;
    let (status, _, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "tooler", "max_tokens": 20, "stream": true,
                    "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
                    "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let ev: Vec<Value> = events(&body).into_iter().map(|(_, d)| d).collect();
    assert_eq!(ev[0]["type"], "message_start");
    assert_eq!(
        ev[1..].to_vec(),
        vec![
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Checking."}}),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"input_tokens": 20, "output_tokens": 9}}),
            json!({"type": "message_stop"}),
        ]
    );
}

#[tokio::test]
async fn a_failure_after_the_first_content_is_an_error_event_not_a_message_stop() {
    let h = Harness::start(&[]).await;
    h.up.set_behavior(Behavior::StreamCut { chunks: 2 });
    let (status, _, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "a", "max_tokens": 20, "stream": true,
                    "messages": [{"role": "user", "content": "one two three four five"}]}),
        )
        .await;
    assert_eq!(status, 200, "the stream had begun");
    let ev = events(&body);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert!(names.contains(&"content_block_delta"), "{names:?}");
    assert_eq!(*names.last().unwrap(), "error", "{names:?}");
    assert!(!names.contains(&"message_stop"), "{names:?}");
    let err = &ev.last().unwrap().1;
    assert_eq!(err["error"]["type"], "api_error");
    assert!(
        err["error"]["message"].as_str().unwrap().contains("stream"),
        "{err}"
    );
}

#[tokio::test]
async fn errors_are_in_anthropics_shape_with_the_gateways_status_and_attempts() {
    let h = Harness::start(&[]).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let (status, _, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "nope", "max_tokens": 5, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
    assert_eq!(v["error"]["code"], "model_not_found");

    let (status, headers, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "dead-model", "max_tokens": 5, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 502);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert_eq!(v["error"]["attempts"][0]["model"], "dead-model");
    assert_eq!(v["error"]["attempts"][0]["error_kind"], "connect");
    assert!(headers.contains_key("x-echelon-attempts"));

    h.up.set_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(3),
        message: "slow down".into(),
    });
    let (status, headers, body) = h
        .post(
            "/v1/messages",
            &json!({"model": "a", "max_tokens": 5, "messages": msgs}),
        )
        .await;
    assert_eq!(status, 429, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert!(headers.contains_key(http::header::RETRY_AFTER));

    for bad in [
        json!({"model": "a", "messages": msgs}),
        json!({"model": "a", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}),
        json!({"model": "a", "max_tokens": "five", "messages": msgs}),
    ] {
        let (status, _, body) = h.post("/v1/messages", &bad).await;
        assert_eq!(status, 400, "{bad}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }
}

#[tokio::test]
async fn the_gateway_key_is_accepted_as_x_api_key_or_bearer() {
    let h = Harness::start(&[KEY]).await;
    let body =
        json!({"model": "a", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});
    let send = |path: &str, header: Option<(&str, String)>| {
        let mut r = h.http.post(h.server.url(path)).json(&body);
        if let Some((k, v)) = header {
            r = r.header(k, v);
        }
        r.send()
    };
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let r = send(path, Some(("x-api-key", KEY.into()))).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let r = send(path, Some(("authorization", format!("Bearer {KEY}"))))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        for header in [None, Some(("x-api-key", "wrong".to_owned()))] {
            let r = send(path, header).await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], "authentication_error");
        }
    }
    // The OpenAI endpoints keep to the bearer token.
    let r = h
        .http
        .post(h.server.url("/v1/chat/completions"))
        .header("x-api-key", KEY)
        .json(&json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn count_tokens_counts_with_the_routed_models_encoding() {
    let h = Harness::start(&[]).await;
    let count = |text: &str| {
        json!({"model": "grp", "system": "be brief",
               "messages": [{"role": "user", "content": text}]})
    };
    let (status, _, short) = h.post("/v1/messages/count_tokens", &count("hello")).await;
    assert_eq!(status, 200, "{short}");
    let short: Value = serde_json::from_str(&short).unwrap();
    let n = short["input_tokens"].as_u64().unwrap();
    // cl100k_base: "be brief" 2, "hello" 1, 3 framing tokens per message, 3 priming.
    let expected = echelon::tokens::Encoding::Cl100kBase.prompt_tokens(&[
        echelon_types::ChatMessage::new(echelon_types::Role::System, "be brief"),
        echelon_types::ChatMessage::new(echelon_types::Role::User, "hello"),
    ]);
    assert_eq!(n, expected);
    let (_, _, long) = h
        .post(
            "/v1/messages/count_tokens",
            &count("hello there, how are you today?"),
        )
        .await;
    let long: Value = serde_json::from_str(&long).unwrap();
    assert!(long["input_tokens"].as_u64().unwrap() > n);
    assert_eq!(h.up.chat_requests(), 0, "counting calls no upstream");

    let (status, _, body) = h
        .post(
            "/v1/messages/count_tokens",
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 404);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
}
