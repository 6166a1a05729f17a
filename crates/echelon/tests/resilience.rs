//! The resilience core against the test upstream: key pools, token buckets, concurrency
//! limits and circuit breakers, as a caller and `/admin/state` see them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use serde_json::Value;

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

fn gateway(yaml: &str) -> Arc<Gateway> {
    Arc::new(Gateway::from_config(&Config::from_str(yaml, "t.yaml").unwrap()).unwrap())
}

/// Group `grp`: echelon1 = model a (settings `a_extra`) on `a`, echelon2 = model b on `b`.
fn two_tier(a: &TestUpstream, b: &TestUpstream, provider_a: &str, a_extra: &str) -> Arc<Gateway> {
    // Defaults for a: no retry, no queueing; a test's own settings win.
    let mut a_settings = a_extra.to_owned();
    for (key, default) in [("max_retries", "0"), ("queue_timeout", "0")] {
        if !a_extra.contains(key) {
            a_settings = format!("{a_settings}, {key}: {default}");
        }
    }
    let a_extra = a_settings.trim_start_matches(", ");
    gateway(&format!(
        r#"
providers:
  pa: {{ base_url: "{}", {provider_a} }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, retry_delay: 0.01, {a_extra} }}
  b: {{ provider: pb, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        a.base_url(),
        b.base_url()
    ))
}

async fn pair() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

fn keys_sent(u: &TestUpstream) -> Vec<String> {
    u.recorded()
        .iter()
        .map(|r| {
            r.authorization
                .clone()
                .unwrap_or_default()
                .replace("Bearer ", "")
        })
        .collect()
}

fn model_state(gw: &Gateway, model: &str) -> Value {
    serde_json::to_value(gw.admin_state()).unwrap()["models"][model].clone()
}

#[tokio::test]
async fn keys_rotate_and_a_rate_limited_key_cools_down() {
    let (a, b) = pair().await;
    let gw = two_tier(&a, &b, r#"api_keys: ["k1", "k2"], key_cooldown: 30"#, "");
    for _ in 0..4 {
        gw.chat(request("grp")).await.unwrap();
    }
    let sent = keys_sent(&a);
    assert_eq!(sent.iter().filter(|k| *k == "k1").count(), 2, "{sent:?}");
    assert_eq!(sent.iter().filter(|k| *k == "k2").count(), 2, "{sent:?}");

    // A 429 on whichever key comes next cools it down; the same request moves to the
    // other key within its attempt budget (max_retries 1), and later requests avoid it.
    let gw = two_tier(&a, &b, r#"api_keys: ["k1", "k2"]"#, "max_retries: 1");
    a.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(60),
        message: "slow".into(),
    });
    let before = a.recorded().len();
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "a");
    let sent = keys_sent(&a)[before..].to_vec();
    assert_eq!(sent.len(), 2);
    assert_ne!(sent[0], sent[1]);
    for _ in 0..3 {
        gw.chat(request("grp")).await.unwrap();
    }
    let later = &keys_sent(&a)[before + 2..];
    assert!(
        later.iter().all(|k| *k == sent[1]),
        "cooling key unused: {later:?}"
    );
    let keys = model_state(&gw, "a")["keys"].clone();
    let cooling: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == "cooling_down")
        .collect();
    assert_eq!(cooling.len(), 1, "{keys}");
    assert!(cooling[0]["until_ms"].as_u64().unwrap() > 50_000);
    assert_eq!(cooling[0]["id"], echelon::key::key_id(&sent[0]));
}

#[tokio::test]
async fn a_refused_key_is_disabled_and_the_pool_moves_on() {
    let a = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("good".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let b = TestUpstream::start().await.unwrap();
    let gw = two_tier(&a, &b, r#"api_keys: ["bad", "good"]"#, "max_retries: 1");
    for _ in 0..4 {
        let done = gw.chat(request("grp")).await.unwrap();
        assert_eq!(done.model, "a");
    }
    let sent = keys_sent(&a);
    assert!(sent.iter().filter(|k| *k == "bad").count() <= 1, "{sent:?}");
    let keys = model_state(&gw, "a")["keys"].clone();
    let disabled: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["state"] == "disabled")
        .collect();
    if sent.contains(&"bad".to_owned()) {
        assert_eq!(disabled.len(), 1);
        assert_eq!(disabled[0]["reason"], "Invalid API Key");
    }
    let text = serde_json::to_string(&gw.admin_state()).unwrap();
    assert!(
        !text.contains("\"bad\"") && !text.contains("\"good\""),
        "no key in state: {text}"
    );
}

#[tokio::test]
async fn an_rpm_bucket_skips_the_model_then_429s_when_nothing_can_take_it() {
    let (a, b) = pair().await;
    let gw = two_tier(&a, &b, "", "rpm_limit: 2");
    for _ in 0..2 {
        assert_eq!(gw.chat(request("grp")).await.unwrap().model, "a");
    }
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b", "a's bucket is empty: skipped");
    assert_eq!(done.attempts[0].outcome, "token_bucket");
    assert_eq!(a.chat_requests(), 2);
    let bucket = &model_state(&gw, "a")["buckets"][0];
    assert_eq!(bucket["name"], "rpm_limit");
    assert!(bucket["available"].as_f64().unwrap() < 1.0);

    let e = gw.chat(request("a")).await.unwrap_err();
    assert_eq!(e.status(), 429);
    assert_eq!(e.to_body().error.kind, "rate_limit_error");
}

#[tokio::test]
async fn a_tpm_bucket_reserves_prompt_plus_max_tokens_and_refunds_the_rest() {
    let (a, b) = pair().await;
    let gw = two_tier(&a, &b, "", "tpm_limit: 100");
    // Reservation ≈ 10 prompt + 60 = 70 of 100: without the refund of the unused part
    // the second request could not fit.
    for _ in 0..4 {
        let mut req = request("a");
        req.max_tokens = Some(60);
        assert_eq!(gw.chat(req).await.unwrap().model, "a");
    }
    // More than the bucket can ever hold: skipped before sending, 429.
    let mut req = request("a");
    req.max_tokens = Some(500);
    let e = gw.chat(req).await.unwrap_err();
    assert_eq!(e.status(), 429);
    assert_eq!(e.attempts()[0].outcome, "token_bucket");
    assert_eq!(a.chat_requests(), 4);
}

#[tokio::test]
async fn a_concurrency_limit_sends_the_overflow_to_the_next_echelon() {
    let a = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(400),
        ..Default::default()
    })
    .await
    .unwrap();
    let b = TestUpstream::start().await.unwrap();
    let gw = two_tier(&a, &b, "", "concurrency_limit: 1, queue_timeout: 0.05");
    let first = tokio::spawn({
        let gw = gw.clone();
        async move { gw.chat(request("grp")).await.unwrap().model }
    });
    while a.chat_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(model_state(&gw, "a")["in_flight"], 1);
    let second = gw.chat(request("grp")).await.unwrap();
    assert_eq!(second.model, "b");
    assert_eq!(second.attempts[0].outcome, "concurrency");
    assert_eq!(first.await.unwrap(), "a");
    assert_eq!(model_state(&gw, "a")["in_flight"], 0);
}

#[tokio::test]
async fn the_breaker_opens_skips_then_half_opens_and_closes() {
    let (a, b) = pair().await;
    let gw = two_tier(
        &a,
        &b,
        "",
        "circuit_breaker: { failure_threshold: 2, recovery_time: 0.3, half_open_requests: 1 }",
    );
    a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "down".into(),
    });
    for _ in 0..2 {
        assert_eq!(gw.chat(request("grp")).await.unwrap().model, "b");
    }
    assert_eq!(model_state(&gw, "a")["breaker"]["state"], "open");
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.attempts[0].outcome, "circuit_open");
    assert_eq!(a.chat_requests(), 2, "an open breaker sends nothing");

    tokio::time::sleep(Duration::from_millis(350)).await;
    a.set_behavior(Behavior::Normal);
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "a", "the half-open probe succeeds");
    assert_eq!(model_state(&gw, "a")["breaker"]["state"], "closed");

    // A failed probe re-opens it.
    a.set_behavior(Behavior::Status {
        status: 503,
        retry_after: None,
        message: "down".into(),
    });
    for _ in 0..2 {
        gw.chat(request("grp")).await.unwrap();
    }
    assert_eq!(model_state(&gw, "a")["breaker"]["state"], "open");
    tokio::time::sleep(Duration::from_millis(350)).await;
    gw.chat(request("grp")).await.unwrap();
    assert_eq!(
        a.chat_requests(),
        6,
        "2 failures, the good probe, 2 failures, the bad probe"
    );
    assert_eq!(model_state(&gw, "a")["breaker"]["state"], "open");
}

#[tokio::test]
async fn client_faults_and_rate_limits_do_not_open_the_breaker() {
    let (a, b) = pair().await;
    let gw = two_tier(
        &a,
        &b,
        "",
        "circuit_breaker: { failure_threshold: 1, recovery_time: 60 }",
    );
    a.push_behavior(Behavior::Status {
        status: 400,
        retry_after: None,
        message: "bad".into(),
    });
    assert_eq!(gw.chat(request("grp")).await.unwrap_err().status(), 400);
    a.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(3600),
        message: "slow".into(),
    });
    assert_eq!(gw.chat(request("grp")).await.unwrap().model, "b");
    assert_eq!(model_state(&gw, "a")["breaker"]["state"], "closed");
}
