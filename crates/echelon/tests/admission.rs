//! Admission of attempts (breaker → token buckets → concurrency → key pool) as the test
//! upstream sees it: what a rejected attempt gives back, and what a stream's end reports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

fn gateway(yaml: &str) -> Arc<Gateway> {
    Arc::new(Gateway::from_config(&Config::from_str(yaml, "t.yaml").unwrap()).unwrap())
}

/// Group `grp`: echelon1 = model `a` (one call at a time, answering in 150 ms, with
/// `a_extra`; echelon settings `echelon_extra`), echelon2 = model `b`. A burst of `burst`
/// concurrent requests, then `after` sequential ones; returns the calls `a` received and
/// how long the whole took (the RPM bucket refills meanwhile).
async fn burst_then_sequential(
    a_extra: &str,
    echelon_extra: &str,
    burst: usize,
    after: usize,
) -> (usize, Duration) {
    let started = std::time::Instant::now();
    let a = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(150),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let b = TestUpstream::start().await.unwrap();
    let gw = gateway(&format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0, concurrency_limit: 1, queue_timeout: 0{a_extra} }}
  b: {{ provider: pb, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a]{echelon_extra} }}, echelon2: {{ models: [b] }} }}
"#,
        a.base_url(),
        b.base_url()
    ));
    let calls: Vec<_> = (0..burst)
        .map(|_| {
            let gw = gw.clone();
            tokio::spawn(async move { gw.chat(request("grp")).await })
        })
        .collect();
    for r in calls {
        r.await.unwrap().unwrap();
    }
    assert_eq!(
        a.chat_requests(),
        1,
        "the burst found `a` busy after one call"
    );
    for _ in 0..after {
        gw.chat(request("grp")).await.unwrap();
    }
    (a.chat_requests(), started.elapsed())
}

/// The tokens an RPM bucket of `rpm` refills in `elapsed` (it refills continuously, at
/// `rpm / 60` per second), whole.
fn refilled(rpm: f64, elapsed: Duration) -> usize {
    (rpm / 60.0 * elapsed.as_secs_f64()) as usize
}

/// Issue 13, bug 1: a model whose concurrency limit turns attempts away must not lose the
/// RPM tokens those attempts took. Model `a` allows 10 requests a minute and one at a
/// time; a burst of 20 finds it busy (one call, the rest go to `b`), and the sequential
/// requests after it get the rest of the allowance: exactly 10 calls reach `a` in all.
#[tokio::test]
async fn rpm_tokens_are_spent_only_on_calls_that_are_sent() {
    let (sent, took) = burst_then_sequential(", rpm_limit: 10", "", 20, 20).await;
    // Exactly its allowance, plus what refilled if the machine was slow (about 6 s per
    // token): the refused attempts of the burst took none.
    let most = 10 + refilled(10.0, took);
    assert!(
        (10..=most).contains(&sent),
        "`a` gets its rpm_limit of sent calls: {sent} (at most {most} in {took:?})"
    );
}

/// Echelon tokens too: an echelon `rpm_limit` over a model whose concurrency is full.
#[tokio::test]
async fn echelon_rpm_tokens_come_back_when_the_model_is_busy() {
    let (sent, took) = burst_then_sequential("", ", rpm_limit: 5", 12, 10).await;
    let most = 5 + refilled(5.0, took);
    assert!(
        (5..=most).contains(&sent),
        "the echelon's allowance, all sent: {sent} (at most {most} in {took:?})"
    );
}

/// Issue 13, bug 2: a stream cut after its first chunk counts against the model's health:
/// after `failure_threshold` cut streams its breaker is open and it gets no more calls.
#[tokio::test]
async fn streams_cut_after_the_first_chunk_open_the_breaker() {
    let a = TestUpstream::start().await.unwrap();
    a.set_behavior(Behavior::StreamCut { chunks: 1 });
    let gw = gateway(&format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0, circuit_breaker: {{ failure_threshold: 3, recovery_time: 60 }} }}
"#,
        a.base_url()
    ));
    for i in 0..3 {
        let mut s = gw.chat_stream(request("a")).await.unwrap();
        let mut failed = false;
        while let Some(item) = s.next().await {
            if item.is_err() {
                failed = true;
            }
        }
        assert!(failed, "stream {i} ends with an error");
    }
    let breaker = gw.model("a").unwrap().breaker().snapshot();
    assert_eq!(breaker.state, "open", "{breaker:?}");
    let e = gw.chat_stream(request("a")).await.unwrap_err();
    assert_eq!(e.status(), 503);
    assert_eq!(a.chat_requests(), 3, "no call while the breaker is open");
}

/// Issue 13, bug 2, polling pools: an instance whose streams are cut after the first
/// chunk leaves the rotation after the pool's `failure_threshold`.
#[tokio::test]
async fn streams_cut_after_the_first_chunk_take_an_instance_out_of_its_pool() {
    let a = TestUpstream::start().await.unwrap();
    let b = TestUpstream::start().await.unwrap();
    a.set_behavior(Behavior::StreamCut { chunks: 1 });
    let gw = gateway(&format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  m0: {{ provider: pa, max_retries: 0 }}
  m1: {{ provider: pb, max_retries: 0 }}
task_groups:
  g: {{ echelon1: {{ models: [m0, m1] }} }}
polling_pools:
  pool: {{ task_groups: [g], rotation_strategy: round_robin, failure_threshold: 2, recovery_time: 60, health_check_interval: 3600 }}
"#,
        a.base_url(),
        b.base_url()
    ));
    for _ in 0..10 {
        let mut s = gw.chat_stream(request("pool")).await.unwrap();
        while s.next().await.is_some() {}
    }
    assert_eq!(
        a.chat_requests(),
        2,
        "m0 leaves the rotation after 2 cut streams"
    );
    assert_eq!(b.chat_requests(), 8);
}
