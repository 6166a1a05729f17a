//! Routing and failover against the fault-injecting test upstream (DESIGN.md §4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use echelon::config::Config;
use echelon::{Gateway, GatewayError};
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

/// A gateway with models `a` and `b` on two upstreams and task group `grp` (echelon1: a,
/// echelon2: b). `extra_model` is YAML added to both models' settings.
fn gateway(a: &TestUpstream, b: &TestUpstream, extra_model: &str) -> Gateway {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["key-a"] }}
  pb: {{ base_url: "{}", api_keys: ["key-b"] }}
models:
  a: {{ provider: pa, model: up-a, retry_delay: 0.01, {extra_model} }}
  b: {{ provider: pb, model: up-b, retry_delay: 0.01, {extra_model} }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    let config = Config::from_str(&yaml, "test.yaml").unwrap();
    Gateway::from_config(&config).unwrap()
}

async fn pair() -> (TestUpstream, TestUpstream) {
    let opts = |alias: &str, key: &str| UpstreamOptions {
        model_alias: alias.to_owned(),
        api_key: Some(key.to_owned()),
        ..UpstreamOptions::default()
    };
    (
        TestUpstream::start_with(opts("alias-a", "key-a"))
            .await
            .unwrap(),
        TestUpstream::start_with(opts("alias-b", "key-b"))
            .await
            .unwrap(),
    )
}

fn kinds(e: &GatewayError) -> Vec<(String, String)> {
    e.attempts()
        .iter()
        .map(|a| (a.model.clone(), a.outcome.to_string()))
        .collect()
}

#[tokio::test]
async fn healthy_primary_answers_and_sends_the_upstream_model_name() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "max_retries: 0");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "a");
    assert_eq!(done.response.model, "alias-a");
    assert_eq!(done.response.first_text(), Some("echo: hello there"));
    assert_eq!(done.attempts.len(), 1);
    assert_eq!(done.attempts[0].outcome, "ok");
    assert_eq!(b.chat_requests(), 0);
    let sent = a.recorded();
    assert_eq!(sent[0].body.as_ref().unwrap()["model"], "up-a");
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer key-a"));
}

#[tokio::test]
async fn server_errors_are_retried_then_fail_over_to_the_next_echelon() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "boom".into(),
    });
    let gw = gateway(&a, &b, "max_retries: 2");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(a.chat_requests(), 3, "1 call + 2 retries on a");
    let k: Vec<_> = done
        .attempts
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str(), a.status))
        .collect();
    assert_eq!(
        k,
        vec![
            ("a", "server_error", Some(500)),
            ("a", "server_error", Some(500)),
            ("a", "server_error", Some(500)),
            ("b", "ok", Some(200))
        ]
    );
}

/// A route with a single candidate waits out the Retry-After and retries (with another
/// candidate that can take the request now, the request goes there instead: issue 14,
/// item 4, tests/storm.rs).
#[tokio::test]
async fn retry_after_is_honoured_on_429() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(1),
        message: "slow down".into(),
    });
    let gw = gateway(&a, &b, "max_retries: 1");
    let started = std::time::Instant::now();
    let done = gw.chat(request("a")).await.unwrap();
    assert_eq!(done.model, "a", "the retry on a succeeds");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited for Retry-After"
    );
    assert_eq!(done.attempts[0].outcome, "rate_limited");
    assert_eq!(b.chat_requests(), 0);
}

#[tokio::test]
async fn a_long_retry_after_moves_on_instead_of_waiting() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(3600),
        message: "come back in an hour".into(),
    });
    let gw = gateway(&a, &b, "max_retries: 3");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(a.chat_requests(), 1);
}

/// Issue 14, item 1: a Retry-After too large for a `Duration` (`u64::MAX` seconds) used to
/// panic the request (empty reply, no fallback, no record). It is capped: the healthy
/// fallback answers, streamed or not.
#[tokio::test]
async fn a_retry_after_too_large_for_a_duration_fails_over_without_a_panic() {
    let (a, b) = pair().await;
    let huge = || Behavior::Status {
        status: 429,
        retry_after: Some(u64::MAX),
        message: "rate limited".into(),
    };
    a.push_behavior(huge());
    a.push_behavior(huge());
    let gw = gateway(&a, &b, "max_retries: 3");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(done.attempts[0].outcome, "rate_limited");
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "b");
    while let Some(item) = s.next().await {
        item.unwrap();
    }
}

#[tokio::test]
async fn stall_times_out_and_cut_connection_fails_over() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Stall);
    let gw = gateway(&a, &b, "max_retries: 0, timeout: 0.3");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(done.attempts[0].outcome, "timeout");

    a.set_behavior(Behavior::CutConnection);
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(done.attempts[0].outcome, "connect");
    assert_eq!(done.attempts[0].status, None);
}

#[tokio::test]
async fn a_refused_key_moves_to_the_next_echelon_without_retry() {
    let (a, b) = pair().await;
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["wrong-key"] }}
  pb: {{ base_url: "{}", api_keys: ["key-b"] }}
models:
  a: {{ provider: pa, max_retries: 3, retry_delay: 0.01 }}
  b: {{ provider: pb }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        a.base_url(),
        b.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(a.chat_requests(), 1, "401 is not retried");
    assert_eq!(done.attempts[0].outcome, "auth");
    assert_eq!(done.attempts[0].status, Some(401));
    let id = done.attempts[0].key_id.clone().unwrap();
    assert_eq!(id, echelon::key::key_id("wrong-key"));
    assert!(!format!("{:?}", done.attempts).contains("wrong-key"));
}

#[tokio::test]
async fn context_length_is_not_retried_and_skips_models_no_larger() {
    let opts = |alias: &str| UpstreamOptions {
        model_alias: alias.to_owned(),
        context_window: Some(8),
        ..UpstreamOptions::default()
    };
    let a = TestUpstream::start_with(opts("a")).await.unwrap();
    let b = TestUpstream::start_with(opts("b")).await.unwrap();
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 3, context_window: 2048 }}
  b: {{ provider: pb, max_retries: 3, context_window: 2048 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        a.base_url(),
        b.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let mut req = request("grp");
    req.messages = vec![ChatMessage::new(Role::User, "word ".repeat(200))];
    let e = gw.chat(req).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(
        e.to_body().error.code.as_deref(),
        Some("context_length_exceeded")
    );
    assert_eq!(kinds(&e), vec![("a".into(), "context_length".into())]);
    assert_eq!(a.chat_requests(), 1);
    assert_eq!(b.chat_requests(), 0, "b's window is no larger than a's");
}

/// Issue 19 (failoverbench S12): a model whose window is not declared refuses the prompt
/// and states its window ("context size 8 tokens"): only models declared larger are
/// tried next (here `c`, not `b`), and the refusing model is not called again.
#[tokio::test]
async fn a_stated_context_window_moves_to_a_model_declared_larger() {
    let small = |alias: &str| UpstreamOptions {
        model_alias: alias.to_owned(),
        context_window: Some(8),
        ..UpstreamOptions::default()
    };
    let a = TestUpstream::start_with(small("a")).await.unwrap();
    let b = TestUpstream::start().await.unwrap();
    let c = TestUpstream::start().await.unwrap();
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
  pc: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 3 }}
  b: {{ provider: pb, context_window: 8 }}
  c: {{ provider: pc, context_window: 4096 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }}, echelon3: {{ models: [c] }} }}
"#,
        a.base_url(),
        b.base_url(),
        c.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let mut req = request("grp");
    req.messages = vec![ChatMessage::new(Role::User, "word ".repeat(40))];
    let done = gw.chat(req).await.unwrap();
    assert_eq!(done.model, "c");
    assert_eq!(
        done.attempts
            .iter()
            .map(|a| (a.model.as_str(), a.outcome.as_str()))
            .collect::<Vec<_>>(),
        [("a", "context_length"), ("c", "ok")]
    );
    assert_eq!(a.chat_requests(), 1, "not resent to the model that refused");
    assert_eq!(
        b.chat_requests(),
        0,
        "b is no larger than the stated window"
    );
}

#[tokio::test]
async fn every_tier_failing_gives_a_typed_error_naming_each_attempt() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Status {
        status: 503,
        retry_after: None,
        message: "down".into(),
    });
    b.set_behavior(Behavior::CutConnection);
    let gw = gateway(&a, &b, "max_retries: 1");
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 502);
    assert!(e.is_retryable());
    assert_eq!(
        kinds(&e),
        vec![
            ("a".into(), "server_error".into()),
            ("a".into(), "server_error".into()),
            ("b".into(), "connect".into()),
            ("b".into(), "connect".into()),
        ]
    );
    let body = serde_json::to_value(e.to_body()).unwrap();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert_eq!(body["error"]["attempts"].as_array().unwrap().len(), 4);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a → server_error (HTTP 503)")
    );
}

#[tokio::test]
async fn all_rate_limited_is_429_and_all_timeouts_is_504() {
    let (a, b) = pair().await;
    for u in [&a, &b] {
        u.set_behavior(Behavior::Status {
            status: 429,
            retry_after: Some(3600),
            message: "no".into(),
        });
    }
    let gw = gateway(&a, &b, "max_retries: 1, timeout: 0.2");
    assert_eq!(gw.chat(request("grp")).await.unwrap_err().status(), 429);
    // The 429s put both keys into cooldown: a fresh gateway for the timeout case.
    for u in [&a, &b] {
        u.set_behavior(Behavior::Stall);
    }
    let gw = gateway(&a, &b, "max_retries: 1, timeout: 0.2");
    assert_eq!(gw.chat(request("grp")).await.unwrap_err().status(), 504);
}

#[tokio::test]
async fn unknown_routes_are_404_and_single_echelons_are_routes() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "max_retries: 0");
    let e = gw.chat(request("nope")).await.unwrap_err();
    assert_eq!(e.status(), 404);
    assert!(e.attempts().is_empty());
    let done = gw.chat(request("grp.echelon2")).await.unwrap();
    assert_eq!(done.model, "b");
    let done = gw.chat(request("a")).await.unwrap();
    assert_eq!(done.model, "a");
    let routes = gw.routes();
    let ids: Vec<_> = routes.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec!["a", "b", "grp", "grp.echelon1", "grp.echelon2"]);
}

#[tokio::test]
async fn a_client_fault_400_is_returned_without_failover() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::Status {
        status: 400,
        retry_after: None,
        message: "bad tools".into(),
    });
    let gw = gateway(&a, &b, "max_retries: 2");
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.message().contains("bad tools"));
    assert_eq!(b.chat_requests(), 0);
}

async fn collect_stream(
    gw: &Gateway,
    route: &str,
) -> (String, Vec<(String, String)>, Option<GatewayError>) {
    let mut req = request(route);
    req.stream = Some(true);
    let mut s = gw.chat_stream(req).await.unwrap();
    let mut text = String::new();
    let mut err = None;
    while let Some(item) = s.next().await {
        match item {
            Ok(c) => {
                for ch in &c.choices {
                    text.push_str(ch.delta.content.as_deref().unwrap_or(""));
                }
            }
            Err(e) => err = Some(e),
        }
    }
    let attempts = s
        .attempts()
        .iter()
        .map(|a| (a.model.clone(), a.outcome.to_string()))
        .collect();
    (text, attempts, err)
}

#[tokio::test]
async fn a_stream_fails_over_transparently_before_its_first_chunk() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::StreamCut { chunks: 0 }); // role-only chunk, then cut
    a.push_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "x".into(),
    });
    let gw = gateway(&a, &b, "max_retries: 0");
    let (text, attempts, err) = collect_stream(&gw, "grp").await;
    assert!(err.is_none());
    assert_eq!(text, "echo: hello there");
    assert_eq!(
        attempts,
        vec![("a".into(), "stream_cut".into()), ("b".into(), "ok".into())]
    );
    // second request: a answers 500 → b again
    let (_, attempts, err) = collect_stream(&gw, "grp").await;
    assert!(err.is_none());
    assert_eq!(attempts[0], ("a".into(), "server_error".into()));
}

#[tokio::test]
async fn a_stream_cut_after_its_first_chunk_ends_with_an_error() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::StreamCut { chunks: 3 });
    let gw = gateway(&a, &b, "max_retries: 0");
    let (text, attempts, err) = collect_stream(&gw, "grp").await;
    let err = err.expect("a cut stream must end with an error, not a clean end");
    assert!(!text.is_empty());
    assert_eq!(err.status(), 502);
    assert_eq!(attempts, vec![("a".into(), "stream_cut".into())]);
    assert_eq!(
        b.chat_requests(),
        0,
        "no failover once content reached the client"
    );
}

#[tokio::test]
async fn a_stream_stalling_midway_times_out_with_an_error() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::StreamStall { chunks: 2 });
    let gw = gateway(&a, &b, "max_retries: 0, chunk_timeout: 0.3");
    let (_, attempts, err) = collect_stream(&gw, "grp").await;
    assert_eq!(err.unwrap().status(), 504);
    assert_eq!(attempts, vec![("a".into(), "timeout".into())]);
}

/// With `malformed_event: fail` (the default `skip` delivers it: tests/streams.rs).
#[tokio::test]
async fn malformed_sse_before_content_fails_over() {
    let (a, b) = pair().await;
    a.push_behavior(Behavior::Malformed);
    let gw = gateway(&a, &b, "max_retries: 0, malformed_event: fail");
    let (text, attempts, err) = collect_stream(&gw, "grp").await;
    assert!(err.is_none());
    assert_eq!(text, "echo: hello there");
    assert_eq!(
        attempts,
        vec![("a".into(), "malformed".into()), ("b".into(), "ok".into())]
    );
}
