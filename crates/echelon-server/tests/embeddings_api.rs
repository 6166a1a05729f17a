//! `POST /v1/embeddings` over a real socket: the OpenAI shape, the route headers, the
//! request id, gateway keys, validation errors and routed errors with their attempts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::embeddings::{DEFAULT_DIMENSIONS, text_vector};
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
        let start = |alias: &str| {
            TestUpstream::start_with(UpstreamOptions {
                model_alias: alias.into(),
                ..Default::default()
            })
        };
        let a = start("alias-a").await.unwrap();
        let b = start("alias-b").await.unwrap();
        let yaml = format!(
            r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, model: emb-a, max_retries: 0 }}
  b: {{ provider: pb, model: emb-b, max_retries: 0 }}
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

    async fn post(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.server.url("/v1/embeddings"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn answers_in_the_openai_shape_with_route_headers() {
    let h = Harness::start(&[]).await;
    let resp = h
        .http
        .post(h.server.url("/v1/embeddings"))
        .header("x-request-id", "emb-req-1")
        .json(&json!({"model": "grp", "input": ["one", "two"], "user": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["x-request-id"], "emb-req-1");
    assert_eq!(resp.headers()["x-echelon-model"], "a");
    let attempts = resp.headers()["x-echelon-attempts"].to_str().unwrap();
    assert!(attempts.starts_with("a:ok:200:"), "{attempts}");
    assert!(resp.headers().contains_key("x-echelon-overhead-ms"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "alias-a");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["object"], "embedding");
    assert_eq!(v["data"][1]["index"], 1);
    assert_eq!(
        v["data"][1]["embedding"],
        json!(text_vector("two", DEFAULT_DIMENSIONS))
    );
    assert_eq!(v["usage"], json!({"prompt_tokens": 2, "total_tokens": 2}));
    let sent = h.a.recorded()[0].body.clone().unwrap();
    assert_eq!(sent["model"], "emb-a");
    assert_eq!(sent["user"], "u");
}

#[tokio::test]
async fn base64_is_answered_as_asked() {
    let h = Harness::start(&[]).await;
    let resp = h
        .post(json!({"model": "a", "input": "hi", "encoding_format": "base64"}))
        .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let b64 = v["data"][0]["embedding"].as_str().unwrap();
    assert_eq!(b64.len(), (DEFAULT_DIMENSIONS * 4).div_ceil(3) * 4);
}

#[tokio::test]
async fn a_failover_shows_in_the_headers_and_a_total_failure_in_the_body() {
    let h = Harness::start(&[]).await;
    h.a.set_behavior(Behavior::status(500));
    let resp = h.post(json!({"model": "grp", "input": "x"})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-echelon-model"], "b");
    let attempts = resp.headers()["x-echelon-attempts"].to_str().unwrap();
    assert!(attempts.starts_with("a:server_error:500:"), "{attempts}");
    assert!(attempts.contains(", b:ok:200:"), "{attempts}");

    h.b.set_behavior(Behavior::status(503));
    let resp = h.post(json!({"model": "grp", "input": "x"})).await;
    assert_eq!(resp.status(), 502);
    assert!(resp.headers().contains_key("x-echelon-overhead-ms"));
    assert!(resp.headers().contains_key("x-echelon-attempts"));
    let v: Value = resp.json().await.unwrap();
    let attempts = v["error"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["model"], "a");
    assert_eq!(attempts[1]["error_kind"], "server_error");
}

#[tokio::test]
async fn bad_bodies_get_400_naming_the_field_and_unknown_routes_404() {
    let h = Harness::start(&[]).await;
    for (body, param) in [
        (json!({"input": "x"}), "model"),
        (json!({"model": "grp"}), "input"),
        (json!({"model": "grp", "input": []}), "input"),
        (json!({"model": "grp", "input": ["a", 3]}), "input[1]"),
        (
            json!({"model": "grp", "input": "x", "encoding_format": "int8"}),
            "encoding_format",
        ),
    ] {
        let resp = h.post(body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(v["error"]["param"], param, "{body}");
    }
    let resp = h.post(json!({"model": "nope", "input": "x"})).await;
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("nope"));
    // A wrong method is a 405 in the OpenAI shape.
    let resp = h
        .http
        .get(h.server.url("/v1/embeddings"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(h.a.embedding_requests() + h.b.embedding_requests(), 0);
}

#[tokio::test]
async fn gateway_keys_guard_the_endpoint() {
    let h = Harness::start(&["gw-key"]).await;
    let resp = h.post(json!({"model": "a", "input": "x"})).await;
    assert_eq!(resp.status(), 401);
    let resp = h
        .http
        .post(h.server.url("/v1/embeddings"))
        .bearer_auth("gw-key")
        .json(&json!({"model": "a", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(h.a.embedding_requests(), 1);
}

#[tokio::test]
async fn a_provider_400_reaches_the_client_with_its_attempt() {
    let h = Harness::start(&[]).await;
    h.a.push_behavior(Behavior::status(400));
    let resp = h.post(json!({"model": "grp", "input": "x"})).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["attempts"][0]["model"], "a");
    assert_eq!(h.b.embedding_requests(), 0);
}
