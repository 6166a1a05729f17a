//! `POST /v1/responses`: the Responses API bridged to chat completions, against test
//! upstreams: string and item input, instructions, tools both ways, the stream's events
//! in order, a stream that fails after its start, the stateless refusals, and routing
//! through a task group with failover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::response::IntoResponse;
use axum::routing::post;
use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream};
use serde_json::{Value, json};

/// A gateway over testkit upstreams `a` and `b` (models `a`, `b`, task group `grp`
/// with `a` in echelon1 and `b` in echelon2, `dead-model` on a closed port).
async fn gateway(a: &TestUpstream, b: &TestUpstream) -> common::Served {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
  dead: {{ base_url: "http://127.0.0.1:9/v1" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0 }}
  dead-model: {{ provider: dead, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        a.base_url(),
        b.base_url()
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let gateway = Arc::new(Gateway::from_config(&config).unwrap());
    common::serve(gateway, &ServerOptions::default()).await
}

async fn post_json(server: &common::Served, body: Value) -> (u16, http::HeaderMap, Value) {
    let resp = reqwest::Client::new()
        .post(server.url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

/// The `(event name, data)` pairs of an SSE body.
async fn post_stream(server: &common::Served, body: Value) -> (u16, Vec<(String, Value)>) {
    let resp = reqwest::Client::new()
        .post(server.url("/v1/responses"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let mut events = Vec::new();
    for frame in text.split("\n\n").filter(|f| !f.trim().is_empty()) {
        let mut name = None;
        let mut data = None;
        for line in frame.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = Some(n.to_owned());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data = Some(serde_json::from_str::<Value>(d).unwrap());
            }
        }
        events.push((
            name.unwrap_or_else(|| panic!("frame without event: {frame}")),
            data.unwrap_or_else(|| panic!("frame without data: {frame}")),
        ));
    }
    (status, events)
}

async fn upstreams() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

#[tokio::test]
async fn a_string_input_with_instructions_gets_a_response_object() {
    let (a, b) = upstreams().await;
    let server = gateway(&a, &b).await;
    let (status, headers, v) = post_json(
        &server,
        json!({"model": "a", "input": "hello there", "instructions": "be brief",
               "metadata": {"run": "7"}, "temperature": 0.2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(headers["x-echelon-model"], "a");
    assert!(headers.contains_key("x-echelon-overhead-ms"));
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(
        v["model"], "test-model",
        "the upstream's name, as chat completions"
    );
    assert!(v["created_at"].as_u64().unwrap() > 0);
    assert_eq!(v["instructions"], "be brief");
    assert_eq!(v["metadata"], json!({"run": "7"}));
    assert_eq!(v["temperature"], 0.2);
    assert_eq!(v["store"], false);
    let out = &v["output"];
    assert_eq!(out.as_array().unwrap().len(), 1);
    assert_eq!(out[0]["type"], "message");
    assert_eq!(out[0]["role"], "assistant");
    assert_eq!(out[0]["content"][0]["type"], "output_text");
    assert_eq!(out[0]["content"][0]["text"], "echo: hello there");
    let usage = &v["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    assert!(usage["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap())
    );

    let sent = a.recorded()[0].body.clone().unwrap();
    assert_eq!(
        sent["messages"],
        json!([{"role": "system", "content": "be brief"},
               {"role": "user", "content": "hello there"}])
    );
    assert_eq!(sent["temperature"], 0.2);
    assert!(
        sent.get("metadata").is_none(),
        "metadata is echoed, not sent"
    );
}

#[tokio::test]
async fn items_and_tools_are_sent_in_the_chat_shape() {
    let (a, b) = upstreams().await;
    let server = gateway(&a, &b).await;
    let (status, _, v) = post_json(
        &server,
        json!({
            "model": "a",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "function_call", "call_id": "call_1", "name": "weather",
                 "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
                {"type": "message", "role": "user", "content": "so?"},
            ],
            "tools": [{"type": "function", "name": "weather", "description": "w",
                       "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                       "strict": true}],
            "tool_choice": "auto",
            "max_output_tokens": 64,
        }),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"][0]["content"][0]["text"], "echo: so?");
    assert_eq!(
        v["tools"][0]["name"], "weather",
        "echoed in the Responses shape"
    );
    assert_eq!(v["max_output_tokens"], 64);
    let sent = a.recorded()[0].body.clone().unwrap();
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "content": "rain", "tool_call_id": "call_1"},
            {"role": "user", "content": "so?"},
        ])
    );
    assert_eq!(
        sent["tools"],
        json!([{"type": "function", "function": {"name": "weather", "description": "w",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                "strict": true}}])
    );
    assert_eq!(sent["tool_choice"], "auto");
    assert_eq!(sent["max_tokens"], 64);
}

/// A chat upstream that always calls `weather` (stream or not), recording the bodies.
async fn tool_calling_upstream() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |Json(body): Json<Value>| {
            let record = record.clone();
            async move {
                let stream = body["stream"] == true;
                record.lock().unwrap().push(body);
                if !stream {
                    return Json(json!({
                        "id": "c1", "object": "chat.completion", "created": 5, "model": "tooler",
                        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                            "role": "assistant", "content": null,
                            "tool_calls": [{"id": "call_w", "type": "function",
                              "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13,
                                  "prompt_tokens_details": {"cached_tokens": 3}},
                    }))
                    .into_response();
                }
                let chunks = [
                    json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": null}}]}),
                    json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_w",
                           "type": "function", "function": {"name": "weather", "arguments": ""}}]}}]}),
                    json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                           "function": {"arguments": "{\"city\":"}}]}}]}),
                    json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                           "function": {"arguments": "\"Oslo\"}"}}]}}]}),
                    json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
                    json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}}),
                ];
                let mut sse = String::new();
                for c in chunks {
                    let mut c = c;
                    c["id"] = json!("c1");
                    c["object"] = json!("chat.completion.chunk");
                    c["model"] = json!("tooler");
                    sse.push_str(&format!("data: {c}\n\n"));
                }
                sse.push_str("data: [DONE]\n\n");
                ([(http::header::CONTENT_TYPE, "text/event-stream")], sse).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1"), seen)
}

#[tokio::test]
async fn tool_calls_come_back_as_function_call_items_stream_and_not() {
    let (tooler, seen) = tool_calling_upstream().await;
    let yaml = format!(
        "providers:\n  pt: {{ base_url: \"{tooler}\" }}\nmodels:\n  t: {{ provider: pt, max_retries: 0 }}\n"
    );
    let gw = Arc::new(Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap());
    let server = common::serve(gw, &ServerOptions::default()).await;
    let ask = json!({"model": "t", "input": "weather in Oslo?",
                     "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]});

    let (status, _, v) = post_json(&server, ask.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"].as_array().unwrap().len(), 1, "{v}");
    let call = &v["output"][0];
    assert_eq!(call["type"], "function_call");
    assert_eq!(call["call_id"], "call_w");
    assert_eq!(call["name"], "weather");
    assert_eq!(call["arguments"], "{\"city\":\"Oslo\"}");
    assert!(call["id"].as_str().unwrap().starts_with("fc_"));
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 3);

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let (status, events) = post_stream(&server, streamed).await;
    assert_eq!(status, 200);
    let names: Vec<_> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    assert_eq!(events[2].1["item"]["type"], "function_call");
    assert_eq!(events[2].1["item"]["name"], "weather");
    assert_eq!(events[5].1["arguments"], "{\"city\":\"Oslo\"}");
    let done = &events[7].1["response"];
    assert_eq!(done["output"][0]["arguments"], "{\"city\":\"Oslo\"}");
    assert_eq!(done["output"][0]["call_id"], "call_w");
    assert_eq!(done["usage"]["total_tokens"], 13);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0]["tools"][0]["function"]["name"], "weather");
}

#[tokio::test]
async fn a_stream_sends_the_events_in_order_with_sequence_numbers() {
    let (a, b) = upstreams().await;
    let server = gateway(&a, &b).await;
    let (status, events) = post_stream(
        &server,
        json!({"model": "a", "input": "one two three", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let names: Vec<_> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        &names[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
    );
    let deltas = names
        .iter()
        .filter(|n| **n == "response.output_text.delta")
        .count();
    assert!(deltas >= 3, "{names:?}");
    assert_eq!(
        &names[names.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], i as u64, "{name}");
        assert_eq!(data["type"], name.as_str());
    }
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "echo: one two three");
    assert_eq!(
        events[0].1["response"]["model"], "test-model",
        "the upstream's name from the start, as a non-streamed answer"
    );
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    let done = &events.last().unwrap().1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["model"], "test-model");
    assert_eq!(done["output"][0]["content"][0]["text"], text);
    assert!(
        done["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{done}"
    );
    assert_eq!(
        a.recorded()[0].body.as_ref().unwrap()["stream_options"]["include_usage"],
        true
    );
}

#[tokio::test]
async fn a_token_cap_makes_the_response_incomplete() {
    let (a, b) = upstreams().await;
    let server = gateway(&a, &b).await;
    let (_, _, v) = post_json(
        &server,
        json!({"model": "a", "input": "one two three four", "max_output_tokens": 2}),
    )
    .await;
    assert_eq!(v["status"], "incomplete", "{v}");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    let (_, events) = post_stream(
        &server,
        json!({"model": "a", "input": "one two three four", "max_output_tokens": 2, "stream": true}),
    )
    .await;
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "response.incomplete");
    assert_eq!(
        data["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

#[tokio::test]
async fn a_stream_failing_after_its_start_ends_with_response_failed() {
    let (a, b) = upstreams().await;
    a.push_behavior(Behavior::StreamCut { chunks: 2 });
    let server = gateway(&a, &b).await;
    let (status, events) = post_stream(
        &server,
        json!({"model": "a", "input": "one two three four five", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        events
            .iter()
            .any(|(n, _)| n == "response.output_text.delta"),
        "content before the cut"
    );
    assert!(events.iter().all(|(n, _)| n != "response.completed"));
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "response.failed");
    let r = &data["response"];
    assert_eq!(r["status"], "failed");
    assert!(r["error"]["code"].is_string(), "{r}");
    assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    assert_eq!(r["error"]["attempts"][0]["model"], "a");
    assert_eq!(r["output"][0]["status"], "incomplete");
    for (i, (_, d)) in events.iter().enumerate() {
        assert_eq!(d["sequence_number"], i as u64);
    }
}

#[tokio::test]
async fn state_is_refused_with_a_clear_400() {
    let (a, b) = upstreams().await;
    let server = gateway(&a, &b).await;
    for (extra, param) in [
        (
            json!({"previous_response_id": "resp_123"}),
            "previous_response_id",
        ),
        (json!({"store": true}), "store"),
    ] {
        let mut body = json!({"model": "a", "input": "hi"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, _, v) = post_json(&server, body).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], param);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("keeps no response state"),
            "{v}"
        );
    }
    assert_eq!(a.chat_requests(), 0, "nothing reached the upstream");
    let (status, _, _) = post_json(
        &server,
        json!({"model": "a", "input": "hi", "store": false}),
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_task_group_fails_over_and_errors_carry_attempts() {
    let (a, b) = upstreams().await;
    a.set_behavior(Behavior::status(500));
    let server = gateway(&a, &b).await;
    let (status, headers, v) = post_json(&server, json!({"model": "grp", "input": "hi"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(headers["x-echelon-model"], "b");
    let attempts = headers["x-echelon-attempts"].to_str().unwrap();
    assert!(attempts.starts_with("a:server_error:500:"), "{attempts}");
    assert_eq!(v["output"][0]["content"][0]["text"], "echo: hi");

    let (status, events) = post_stream(
        &server,
        json!({"model": "grp", "input": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().0, "response.completed");

    // Every candidate down before the stream starts: the OpenAI error body, not events.
    let (status, headers, v) = post_json(
        &server,
        json!({"model": "dead-model", "input": "hi", "stream": true}),
    )
    .await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(v["error"]["attempts"][0]["model"], "dead-model");
    assert_eq!(v["error"]["attempts"][0]["error_kind"], "connect");
    assert!(headers.contains_key("x-echelon-overhead-ms"));

    let (status, _, v) = post_json(&server, json!({"model": "nope", "input": "hi"})).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn gateway_keys_guard_the_endpoint() {
    let a = TestUpstream::start().await.unwrap();
    let yaml = format!(
        "providers:\n  pa: {{ base_url: \"{}\" }}\nmodels:\n  a: {{ provider: pa }}\n",
        a.base_url()
    );
    let gw = Arc::new(Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap());
    let options = ServerOptions {
        api_keys: vec![secrecy::SecretString::from("gk-1")],
        ..ServerOptions::default()
    };
    let server = common::serve(gw, &options).await;
    let body = json!({"model": "a", "input": "hi"});
    let (status, _, v) = post_json(&server, body.clone()).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let resp = reqwest::Client::new()
        .post(server.url("/v1/responses"))
        .bearer_auth("gk-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(a.chat_requests(), 1);
}
