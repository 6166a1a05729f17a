//! The HTTP API over a real socket: auth, request validation, pass-through, SSE and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

struct Harness {
    server: common::Served,
    a: TestUpstream,
    b: TestUpstream,
    http: reqwest::Client,
}

impl Harness {
    async fn start(gateway_keys: &[&str]) -> Harness {
        Self::start_with(gateway_keys, 8 * 1024 * 1024).await
    }

    async fn start_with(gateway_keys: &[&str], body_limit_bytes: usize) -> Harness {
        let a = TestUpstream::start_with(UpstreamOptions {
            model_alias: "alias-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let b = TestUpstream::start_with(UpstreamOptions {
            model_alias: "alias-b".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let yaml = format!(
            r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
            a.base_url(),
            b.base_url()
        );
        let config = Config::from_str(&yaml, "t.yaml").unwrap();
        let gateway = Arc::new(Gateway::from_config(&config).unwrap());
        let options = ServerOptions {
            api_keys: gateway_keys
                .iter()
                .map(|k| SecretString::from(*k))
                .collect(),
            body_limit_bytes,
            log_bodies: false,
            metrics: true,
            ..ServerOptions::default()
        };
        let server = common::serve(gateway, &options).await;
        Harness {
            server,
            a,
            b,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    async fn post(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

fn chat(route: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": "hi there"}]})
}

#[tokio::test]
async fn answers_and_passes_unknown_fields_both_ways() {
    let h = Harness::start(&[]).await;
    let mut body = chat("grp");
    body["tools"] = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    body["response_format"] = json!({"type": "json_object"});
    body["x_echo"] = json!({"vendor": 1});
    let resp = h.post(body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "a");
    assert!(
        resp.headers()["x-echelon-attempts"]
            .to_str()
            .unwrap()
            .starts_with("a:ok:200:")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hi there");
    assert!(
        v["timings"].is_object(),
        "llama.cpp-style extras pass through: {v}"
    );
    assert_eq!(v["x_echo"], json!({"vendor": 1}));
    let sent = h.a.recorded()[0].body.clone().unwrap();
    assert_eq!(sent["tools"][0]["function"]["name"], "f");
    assert_eq!(sent["response_format"]["type"], "json_object");
}

#[tokio::test]
async fn malformed_requests_get_400_naming_the_json_path() {
    let h = Harness::start(&[]).await;
    let resp = h
        .post(json!({"model": "grp", "messages": [{"role": "wizard", "content": "x"}]}))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages[0].role");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].role")
    );

    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(h.a.chat_requests(), 0);
}

#[tokio::test]
async fn gateway_keys_are_required_when_configured() {
    let h = Harness::start(&["gw-secret"]).await;
    let resp = h.post(chat("grp")).await;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth("wrong")
        .json(&chat("grp"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = h
        .http
        .post(h.url("/v1/chat/completions"))
        .bearer_auth("gw-secret")
        .json(&chat("grp"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The auth scheme is case-insensitive (RFC 7235 §2.1).
    for scheme in ["bearer", "BEARER"] {
        let resp = h
            .http
            .post(h.url("/v1/chat/completions"))
            .header("authorization", format!("{scheme} gw-secret"))
            .json(&chat("grp"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "scheme {scheme}");
    }
    let resp = h
        .http
        .get(h.url("/v1/models"))
        .header("authorization", "Basic gw-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "another scheme is no bearer token");
    // /health stays open for load balancers.
    assert_eq!(
        h.http.get(h.url("/health")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn lists_routes_and_404s_unknown_ones() {
    let h = Harness::start(&[]).await;
    let v: Value = h
        .http
        .get(h.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a", "b", "grp", "grp.echelon1", "grp.echelon2"]);
    assert_eq!(v["data"][2]["kind"], "task_group");

    let resp = h.post(chat("nope")).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn a_wrong_method_gets_405_in_the_openai_shape() {
    let h = Harness::start(&[]).await;
    for (method, path, allow) in [
        (reqwest::Method::GET, "/v1/chat/completions", "POST"),
        (reqwest::Method::POST, "/v1/models", "GET,HEAD"),
        (reqwest::Method::DELETE, "/admin/state", "GET,HEAD"),
        (reqwest::Method::POST, "/health", "GET,HEAD"),
        (reqwest::Method::PUT, "/metrics", "GET,HEAD"),
    ] {
        let resp = h
            .http
            .request(method.clone(), h.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v,
            json!({"error": {
                "message": format!("{method} is not allowed on {path}"),
                "type": "invalid_request_error",
                "param": null,
                "code": "method_not_allowed",
            }})
        );
    }
    assert_eq!(h.a.chat_requests(), 0);
}

#[tokio::test]
async fn a_wrong_method_without_a_gateway_key_gets_401_first() {
    let h = Harness::start(&["gw-secret"]).await;
    let resp = h
        .http
        .get(h.url("/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = h
        .http
        .get(h.url("/v1/chat/completions"))
        .bearer_auth("gw-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn failover_is_visible_in_headers_and_total_failure_in_the_body() {
    let h = Harness::start(&[]).await;
    h.a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "boom".into(),
    });
    let resp = h.post(chat("grp")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "b");
    let attempts = resp.headers()["x-echelon-attempts"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(attempts.starts_with("a:server_error:500:"), "{attempts}");
    assert!(attempts.contains(", b:ok:200:"), "{attempts}");

    h.b.set_behavior(Behavior::Status {
        status: 503,
        retry_after: None,
        message: "down".into(),
    });
    let resp = h.post(chat("grp")).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let attempts = v["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["model"], "a");
    assert_eq!(attempts[0]["status"], 500);
    assert_eq!(attempts[1]["error_kind"], "server_error");
    assert!(attempts[1]["latency_ms"].is_u64());
}

async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn streams_chunks_and_ends_with_done() {
    let h = Harness::start(&[]).await;
    let mut body = chat("grp");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = h.post(body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = sse_events(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "echo: hi there");
    assert!(chunks.len() >= 4, "content arrives in several chunks");
    assert!(
        chunks.last().unwrap()["usage"]["total_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn a_stream_cut_midway_ends_with_an_error_event_not_done() {
    let h = Harness::start(&[]).await;
    h.a.push_behavior(Behavior::StreamCut { chunks: 3 });
    let mut body = chat("grp");
    body["stream"] = json!(true);
    let events = sse_events(h.post(body).await).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(last["error"]["code"], "stream_interrupted");
    assert_eq!(last["error"]["attempts"][0]["error_kind"], "stream_cut");
    assert_eq!(h.b.chat_requests(), 0);
}

#[tokio::test]
async fn a_stream_failing_before_its_first_chunk_fails_over() {
    let h = Harness::start(&[]).await;
    h.a.push_behavior(Behavior::CutConnection);
    let mut body = chat("grp");
    body["stream"] = json!(true);
    let resp = h.post(body).await;
    assert_eq!(resp.headers()["x-echelon-model"], "b");
    let events = sse_events(resp).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn oversized_bodies_get_413_in_the_openai_shape() {
    let h = Harness::start_with(&[], 1024).await;
    let mut body = chat("grp");
    body["messages"][0]["content"] = json!("x".repeat(4096));
    let resp = h.post(body).await;
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
}

#[tokio::test]
async fn admin_state_is_protected_and_shows_breakers_and_keys_without_secrets() {
    let h = Harness::start(&["gw-secret"]).await;
    let resp = h.http.get(h.url("/admin/state")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = h
        .http
        .get(h.url("/admin/state"))
        .bearer_auth("gw-secret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["models"]["a"]["breaker"]["state"], "closed");
    assert_eq!(v["models"]["a"]["in_flight"], 0);
    assert!(v["echelons"]["grp.echelon1"]["models"].is_array());
    assert!(!v.to_string().contains("gw-secret"));
}

/// Issue 19: when every candidate is rate-limited, the 429 says when to come back — the
/// smallest Retry-After among them (b's 3 s, not a's 7 s), in whole seconds rounded
/// up; a 502 says nothing of the kind.
#[tokio::test]
async fn a_persistent_429_carries_the_smallest_retry_after() {
    let h = Harness::start(&[]).await;
    for (u, secs) in [(&h.a, 7), (&h.b, 3)] {
        u.set_behavior(Behavior::Status {
            status: 429,
            retry_after: Some(secs),
            message: "slow down".into(),
        });
    }
    let resp = h.post(chat("grp")).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["attempts"].as_array().unwrap().len(), 2);

    let mut body = chat("grp");
    body["stream"] = json!(true);
    let resp = h.post(body).await;
    assert_eq!(
        resp.status(),
        429,
        "a stream refused before it starts alike"
    );
    assert_eq!(resp.headers()["retry-after"], "3");

    h.b.set_behavior(Behavior::status(500));
    let resp = h.post(chat("grp")).await;
    assert_eq!(resp.status(), 502);
    assert!(!resp.headers().contains_key("retry-after"));
}

/// Issue 19: every chat completion answer says the gateway's own time,
/// `x-echelon-overhead-ms`: at most the time the client waited, and without the
/// upstream's (here a's 500 ms before it answers).
#[tokio::test]
async fn every_chat_answer_says_the_gateway_overhead() {
    let h = Harness::start(&[]).await;
    let overhead = |resp: &reqwest::Response| -> u64 {
        resp.headers()["x-echelon-overhead-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    for stream in [false, true] {
        h.a.push_behavior(Behavior::Delay(std::time::Duration::from_millis(500)));
        let mut body = chat("grp");
        body["stream"] = json!(stream);
        let started = std::time::Instant::now();
        let resp = h.post(body).await;
        let waited = started.elapsed().as_millis() as u64;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-echelon-model"], "a");
        let ms = overhead(&resp);
        assert!(
            ms <= waited,
            "overhead {ms} ms of {waited} ms (stream: {stream})"
        );
        assert!(
            ms < 500,
            "overhead {ms} ms excludes the upstream's 500 ms (stream: {stream})"
        );
        if stream {
            assert_eq!(sse_events(resp).await.last().unwrap(), "[DONE]");
        }
    }
    // An error answer too.
    h.a.set_behavior(Behavior::status(500));
    h.b.set_behavior(Behavior::status(500));
    let started = std::time::Instant::now();
    let resp = h.post(chat("grp")).await;
    let waited = started.elapsed().as_millis() as u64;
    assert_eq!(resp.status(), 502);
    assert!(overhead(&resp) <= waited);
}
