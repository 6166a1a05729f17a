//! Rate-limit storms and client-chosen sizes (issue 14, items 4 and 11).
//!
//! - A request waits for a rate-limited candidate (a 429's Retry-After, a cooling key)
//!   only when no other candidate of its plan can take it now; a route with a single
//!   candidate still waits and retries.
//! - An unknown route name is echoed and stored bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::ledger::Ledger;
use echelon_testkit::{Behavior, TestUpstream};
use echelon_types::{Attempt, ChatCompletionRequest, ChatMessage, MAX_ECHOED_NAME_BYTES, Role};

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

fn rate_limited(retry_after_secs: u64) -> Behavior {
    Behavior::Status {
        status: 429,
        retry_after: Some(retry_after_secs),
        message: "slow down".into(),
    }
}

/// Group `grp`: echelon1 = model `a` on `a`, echelon2 = model `b` on `b`; both with
/// `max_retries: 2`. `keys_a`: the YAML of `a`'s provider keys (`""` for none).
fn gateway(a: &TestUpstream, b: &TestUpstream, keys_a: &str) -> Gateway {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", {keys_a} }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 2, retry_delay: 0.01 }}
  b: {{ provider: pb, max_retries: 2, retry_delay: 0.01 }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    Gateway::from_config(&Config::from_str(&yaml, "storm.yaml").unwrap()).unwrap()
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

/// Issue 14, item 4: `a` always answers 429 + Retry-After: 9 (under the 10 s the old code waited out; long enough that the key is still cooling at the next request on a slow machine) and `b` is healthy. The
/// request is answered by `b` right after `a`'s one 429 — not after sleeping out the
/// Retry-After and retrying `a` (old: `a` 429 ×3, 18 s of sleep, then `b`) — and the next
/// request, while `a`'s key cools down, does not call `a` at all: `a` shows as skipped
/// for its cooldown, `b` answers.
#[tokio::test]
async fn a_rate_limited_echelon_fails_over_without_waiting() {
    let (a, b) = pair().await;
    a.set_behavior(rate_limited(9));
    let gw = gateway(&a, &b, r#"api_keys: ["key-a"]"#);

    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "rate_limited"), ("b", "ok")],
        "b answered after a's one 429, without retrying a"
    );
    assert_eq!(done.attempts[0].status, Some(429));
    assert_eq!(a.chat_requests(), 1);

    // Streamed alike, and a's key is still cooling: a is skipped, not waited for.
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "b");
    assert_eq!(outcomes(s.attempts()), [("a", "key_cooldown"), ("b", "ok")]);
    assert!(
        s.attempts()[0].message.contains("cooling down"),
        "{:?}",
        s.attempts()[0]
    );
    while let Some(item) = s.next().await {
        item.unwrap();
    }
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "key_cooldown"), ("b", "ok")]
    );
    assert_eq!(
        a.chat_requests(),
        1,
        "no call to a while its key cools down"
    );
    assert_eq!(b.chat_requests(), 3);
}

/// The same for a model without keys: its 429's Retry-After makes it wait, so the
/// request moves on to `b` at once.
#[tokio::test]
async fn a_rate_limited_keyless_model_fails_over_without_waiting() {
    let (a, b) = pair().await;
    a.set_behavior(rate_limited(2));
    let gw = gateway(&a, &b, "");
    for _ in 0..2 {
        let done = gw.chat(request("grp")).await.unwrap();
        assert_eq!(done.model, "b");
        assert_eq!(
            outcomes(&done.attempts),
            [("a", "rate_limited"), ("b", "ok")]
        );
    }
    assert_eq!(a.chat_requests(), 2, "one call per request, no retry on a");
}

/// A single candidate still waits out its Retry-After (here the key's cooldown) and
/// retries: nothing else could take the request.
#[tokio::test]
async fn a_single_candidate_still_waits_and_succeeds() {
    let (a, b) = pair().await;
    for keys in [r#"api_keys: ["key-a"]"#, ""] {
        a.push_behavior(rate_limited(1));
        let gw = gateway(&a, &b, keys);
        let before = a.chat_requests();
        let started = std::time::Instant::now();
        let done = gw.chat(request("a")).await.unwrap();
        assert_eq!(done.model, "a");
        assert_eq!(
            outcomes(&done.attempts),
            [("a", "rate_limited"), ("a", "ok")],
            "keys: {keys:?}"
        );
        assert_eq!(a.chat_requests() - before, 2);
        // Not a timing assertion: the retry cannot have come before the Retry-After.
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
    assert_eq!(b.chat_requests(), 0);
}

/// When every candidate is rate-limited, the request waits for the one free first and
/// tries it: here `b` (Retry-After 1) before `a` (Retry-After 3).
#[tokio::test]
async fn with_every_candidate_rate_limited_the_first_free_one_is_retried() {
    let (a, b) = pair().await;
    a.push_behavior(rate_limited(3));
    b.push_behavior(rate_limited(1));
    let gw = gateway(&a, &b, r#"api_keys: ["key-a"]"#);
    let done = gw.chat(request("grp")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        outcomes(&done.attempts),
        [("a", "rate_limited"), ("b", "rate_limited"), ("b", "ok")]
    );
    assert_eq!(a.chat_requests(), 1);
    assert_eq!(b.chat_requests(), 2);
}

/// Every candidate keeps answering 429: the waits stop at each model's `max_retries`, and
/// the caller gets a 429 naming every attempt.
#[tokio::test]
async fn a_storm_on_every_candidate_ends_in_a_bounded_429() {
    let (a, b) = pair().await;
    a.set_behavior(rate_limited(1));
    b.set_behavior(rate_limited(1));
    let gw = gateway(&a, &b, "");
    let e = gw.chat(request("grp")).await.unwrap_err();
    assert_eq!(e.status(), 429);
    // max_retries 2: three calls on each.
    assert_eq!(a.chat_requests(), 3);
    assert_eq!(b.chat_requests(), 3);
    assert!(
        e.attempts()
            .iter()
            .all(|a| a.outcome.as_str() == "rate_limited"),
        "{:?}",
        e.attempts()
    );
}

/// Issue 14, item 11: an unknown 1 MiB `model` name comes back in the 404 and sits in
/// the ledger's `route` column cut to [`MAX_ECHOED_NAME_BYTES`] and marked with its
/// length (old: both whole).
#[tokio::test]
async fn an_unknown_huge_model_name_is_echoed_and_stored_bounded() {
    let (a, b) = pair().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (sender, writer) =
        Ledger::open(&path)
            .unwrap()
            .spawn_writer(16, 16, Duration::from_millis(5));
    let gw = gateway(&a, &b, "").with_record_sink(Arc::new(sender));
    let name = "x".repeat(1024 * 1024);
    let e = gw.chat(request(&name)).await.unwrap_err();
    assert_eq!(e.status(), 404);
    let body = serde_json::to_string(&e.to_body()).unwrap();
    assert!(body.len() < 1024, "{} bytes of 404 body", body.len());
    assert!(
        e.message().contains(&format!(
            "{}…(1048576 bytes)",
            "x".repeat(MAX_ECHOED_NAME_BYTES)
        )),
        "{}",
        e.message()
    );
    gw.shutdown().await;
    drop(gw);
    assert_eq!(writer.finish().await.unwrap(), 1);
    let db = rusqlite::Connection::open(&path).unwrap();
    let (route, status): (String, i64) = db
        .query_row("SELECT route, status FROM requests", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(status, 404);
    assert!(route.len() <= MAX_ECHOED_NAME_BYTES + 31, "{}", route.len());
    assert!(route.ends_with("…(1048576 bytes)"), "{route}");
}

/// A polling pool moves on to its next instance when one is rate-limited, instead of
/// waiting for it; its sticky sessions (hashed keys) still work.
#[tokio::test]
async fn a_pool_moves_past_a_rate_limited_instance() {
    let (a, b) = pair().await;
    a.set_behavior(rate_limited(9));
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["key-a"] }}
  pb: {{ base_url: "{}" }}
models:
  m0: {{ provider: pa, max_retries: 2 }}
  m1: {{ provider: pb, max_retries: 2 }}
task_groups:
  g: {{ echelon1: {{ models: [m0, m1] }} }}
polling_pools:
  pool: {{ task_groups: [g], rotation_strategy: round_robin, health_check_interval: 3600 }}
"#,
        a.base_url(),
        b.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "pool.yaml").unwrap()).unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let done = gw.chat(request("pool")).await.unwrap();
        assert_eq!(done.model, "m1");
        seen.push(
            outcomes(&done.attempts)
                .into_iter()
                .map(|(m, o)| format!("{m}:{o}"))
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    assert_eq!(a.chat_requests(), 1, "{seen:?}");
    assert!(seen.iter().all(|s| s.ends_with("m1:ok")), "{seen:?}");
    assert!(
        seen.iter().any(|s| s == "m0:rate_limited,m1:ok"),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|s| s == "m0:key_cooldown,m1:ok"),
        "{seen:?}"
    );

    // A long x-session-id keeps the conversation on one instance like a short one.
    let options = echelon::CallOptions {
        session_id: Some("s".repeat(256 * 1024)),
        request_id: None,
    };
    for _ in 0..3 {
        let done = gw.chat_with(request("pool"), &options).await.unwrap();
        assert_eq!(done.model, "m1");
    }
}
