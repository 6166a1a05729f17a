//! The retry policy per kind of failure (issue 19): `first_token_timeout` as its own
//! outcome, `retry_on` (timeouts not retried on the same model by default), waiting in
//! place for a short Retry-After (`rate_limit_wait`), and the Retry-After of a request
//! whose every candidate is rate-limited.
//!
//! Each case runs a group `grp` of echelon1 = model `a` on upstream `a` and echelon2 =
//! model `b` on upstream `b` (testkit upstreams on 127.0.0.1:0).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use echelon::Gateway;
use echelon::config::Config;
use echelon_testkit::{Behavior, TestUpstream};
use echelon_types::{Attempt, ChatCompletionRequest, ChatMessage, Role};

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

fn rate_limited(retry_after_secs: Option<u64>) -> Behavior {
    Behavior::Status {
        status: 429,
        retry_after: retry_after_secs,
        message: "slow down".into(),
    }
}

/// `grp` over `a` and `b`. `a_keys` / `a_extra` / `b_extra` / `echelon1_extra`: YAML
/// added to `a`'s provider, models `a` and `b`, and echelon1 (`""` for none). Neither
/// model sets `max_retries` (default 2) unless told to.
fn gateway(
    a: &TestUpstream,
    b: &TestUpstream,
    a_keys: &str,
    a_extra: &str,
    b_extra: &str,
    echelon1_extra: &str,
) -> Gateway {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", {a_keys} }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, retry_delay: 0.01, {a_extra} }}
  b: {{ provider: pb, retry_delay: 0.01, {b_extra} }}
task_groups:
  grp:
    echelon1: {{ models: [a], {echelon1_extra} }}
    echelon2: {{ models: [b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    Gateway::from_config(&Config::from_str(&yaml, "retry_policy.yaml").unwrap()).unwrap()
}

async fn pair() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

fn outcomes(attempts: &[Attempt]) -> Vec<(&str, &str)> {
    attempts
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str()))
        .collect()
}

/// Drains a stream, every chunk an `Ok`.
async fn drain(mut s: echelon::GatewayStream) {
    while let Some(item) = s.next().await {
        item.unwrap();
    }
}

/// failoverbench S07: the first token comes after 20 s, past `first_token_timeout: 1`.
/// The stream fails over to echelon2 after exactly one call to echelon1 (old: the
/// timeout was retried twice on `a`, ≈3 s before `b`), with kind
/// `first_token_timeout`, and its answer starts within the deadline + 1 s.
#[tokio::test]
async fn a_late_first_token_fails_over_once_within_the_deadline() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Delay(Duration::from_secs(20)));
    let gw = gateway(&a, &b, "", "first_token_timeout: 1", "", "");
    let started = Instant::now();
    let s = gw.chat_stream(request("grp")).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(s.model(), "b");
    assert_eq!(
        outcomes(s.attempts()),
        [("a", "first_token_timeout"), ("b", "ok")]
    );
    assert_eq!(a.chat_requests(), 1, "no retry of a timed-out model");
    assert!(
        elapsed < Duration::from_secs(2),
        "answered {elapsed:?} after the request, first_token_timeout is 1 s"
    );
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    drain(s).await;
}

/// failoverbench S06: a silent upstream (accepts, never answers) is abandoned once, at
/// its first-token deadline; alone on its route, the request ends in a 504 after that
/// one call, not after `max_retries + 1` deadlines.
#[tokio::test]
async fn a_silent_upstream_is_abandoned_once_at_its_first_token_deadline() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Stall);
    let gw = gateway(&a, &b, "", "first_token_timeout: 1, max_retries: 2", "", "");
    let started = Instant::now();
    let s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "b");
    assert_eq!(
        outcomes(s.attempts()),
        [("a", "first_token_timeout"), ("b", "ok")]
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    drain(s).await;
    assert_eq!(a.chat_requests(), 1);

    let started = Instant::now();
    let e = gw.chat_stream(request("a")).await.unwrap_err();
    assert_eq!(e.status(), 504, "{e}");
    assert_eq!(outcomes(e.attempts()), [("a", "first_token_timeout")]);
    assert_eq!(a.chat_requests(), 2, "one call for the second request too");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A 500, a reset and a 429 still get their same-model retry by default (S01, S03,
/// S15 keep their pass): only the timeouts default to 0.
#[tokio::test]
async fn a_500_a_reset_and_a_429_are_still_retried_on_the_same_model() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "", "", "", "");
    a.push_behavior(Behavior::status(500));
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "a");
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "server_error"), ("a", "ok")]
    );

    a.push_behavior(Behavior::Reset);
    let s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "a");
    assert_eq!(outcomes(s.attempts()), [("a", "connect"), ("a", "ok")]);
    drain(s).await;
    assert_eq!(b.chat_requests(), 0);
    assert_eq!(a.chat_requests(), 4);
}

/// `retry_on` on the model and on the echelon, key by key: the echelon's
/// `timeout: 1` retries a stalled `a` once; the model's `server_error: 0` sends a 500
/// straight to `b`, unless the echelon says `server_error: 1`.
#[tokio::test]
async fn retry_on_is_per_kind_and_the_echelon_overrides_the_model_key_by_key() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::Stall);
    let gw = gateway(
        &a,
        &b,
        "",
        "timeout: 0.3, retry_on: { server_error: 0 }",
        "",
        "retry_on: { timeout: 1 }",
    );
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "timeout"), ("a", "timeout"), ("b", "ok")],
        "the echelon's timeout: 1 retried a once"
    );

    a.set_behavior(Behavior::status(500));
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "server_error"), ("b", "ok")],
        "the model's server_error: 0, which the echelon does not name"
    );

    // The same model through an echelon that names server_error.
    let gw = gateway(
        &a,
        &b,
        "",
        "timeout: 0.3, retry_on: { server_error: 0 }",
        "",
        "retry_on: { server_error: 1 }",
    );
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "server_error"), ("a", "server_error"), ("b", "ok")]
    );
    // And a route to the model alone uses the model's own: no retry.
    let e = gw.chat(request("a")).await.unwrap_err();
    assert_eq!(outcomes(e.attempts()), [("a", "server_error")]);
}

/// The kinds count apart: `{ server_error: 1, connect: 1 }` allows one retry after a
/// 500 and one after a reset, and the next 500 moves on.
#[tokio::test]
async fn retries_after_each_kind_are_counted_apart() {
    let (a, b) = pair().await;
    for behavior in [
        Behavior::status(500),
        Behavior::Reset,
        Behavior::status(500),
    ] {
        a.push_behavior(behavior);
    }
    let gw = gateway(
        &a,
        &b,
        "",
        "retry_on: { server_error: 1, connect: 1 }",
        "",
        "",
    );
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(
        outcomes(&done.attempts),
        [
            ("a", "server_error"),
            ("a", "connect"),
            ("a", "server_error"),
            ("b", "ok")
        ]
    );
}

/// failoverbench S01 with `rate_limit_wait: 3`: a 429 + `Retry-After: 2` on echelon1
/// is waited out and retried on echelon1 (old, and with the default 0: set aside and
/// answered by echelon2 at once). The upstream saw the retry no earlier than the
/// Retry-After allows. Keyless (the model's own wait) and keyed (its key's cooldown).
#[tokio::test]
async fn a_short_retry_after_within_rate_limit_wait_is_waited_out_on_the_same_tier() {
    let (a, b) = pair().await;
    for (keys, echelon) in [
        ("", ""),
        (r#"api_keys: ["key-a"]"#, ""),
        ("", "rate_limit_wait: 3"),
    ] {
        let a_extra = if echelon.is_empty() {
            "rate_limit_wait: 3"
        } else {
            ""
        };
        let gw = gateway(&a, &b, keys, a_extra, "", echelon);
        a.push_behavior(rate_limited(Some(2)));
        let before = a.recorded().len();
        let done = gw.chat(request("grp")).await.unwrap();
        assert_eq!(done.model, "a", "keys {keys:?}, echelon {echelon:?}");
        assert_eq!(
            outcomes(&done.attempts),
            [("a", "rate_limited"), ("a", "ok")],
            "keys {keys:?}, echelon {echelon:?}"
        );
        let calls = a.recorded();
        assert_eq!(calls.len() - before, 2);
        let gap = calls[before + 1].at - calls[before].at;
        assert!(
            gap >= Duration::from_millis(1800),
            "retried {gap:?} after the 429 (Retry-After: 2)"
        );
    }
    assert_eq!(b.chat_requests(), 0, "echelon2 never called");
}

/// A Retry-After longer than `rate_limit_wait` keeps today's set-aside: echelon2
/// answers at once.
#[tokio::test]
async fn a_retry_after_beyond_rate_limit_wait_still_fails_over_at_once() {
    let (a, b) = pair().await;
    a.push_behavior(rate_limited(Some(5)));
    let gw = gateway(&a, &b, "", "rate_limit_wait: 3", "", "");
    let started = Instant::now();
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "rate_limited"), ("b", "ok")]
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A persistent 429 on every candidate: the 429 carries the smallest Retry-After among
/// them — a provider's value (`b`: 3 s) and a cooling key's remaining cooldown (`a`: a
/// 429 without Retry-After cools its key for `key_cooldown: 6`).
#[tokio::test]
async fn every_candidate_rate_limited_gives_the_smallest_retry_after() {
    let (a, b) = pair().await;
    a.set_behavior(rate_limited(None));
    b.set_behavior(rate_limited(Some(3)));
    let gw = gateway(
        &a,
        &b,
        r#"api_keys: ["key-a"], key_cooldown: 6"#,
        "max_retries: 0",
        "max_retries: 0",
        "",
    );
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 429);
    let ra = e.retry_after().expect("a Retry-After");
    assert!(
        ra <= Duration::from_secs(3) && ra > Duration::from_secs(2),
        "{ra:?}: b's 3 s, not a's 6 s"
    );

    // Now the cooling key is the sooner: a's key cools for 3 s, b says 9 s.
    let gw = gateway(
        &a,
        &b,
        r#"api_keys: ["key-a"], key_cooldown: 3"#,
        "max_retries: 0",
        "max_retries: 0",
        "",
    );
    b.set_behavior(rate_limited(Some(9)));
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 429);
    assert_eq!(
        outcomes(e.attempts()),
        [("a", "rate_limited"), ("b", "rate_limited")]
    );
    let ra = e.retry_after().expect("a Retry-After");
    assert!(
        ra <= Duration::from_secs(3) && ra > Duration::from_secs(2),
        "{ra:?}: a's cooling key, not b's 9 s"
    );

    // Not every candidate rate-limited: no Retry-After.
    b.set_behavior(Behavior::status(500));
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 502);
    assert_eq!(e.retry_after(), None);
}
