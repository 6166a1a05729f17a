//! Traces over OTLP/HTTP (issue 18) against a real receiver (the testkit's
//! `OtlpReceiver`, decoding the protobuf): a request that fails over twice gives one
//! request span under the caller's `traceparent` and one child span per attempt with
//! the GenAI attributes, a skipped candidate as an event, and each upstream call
//! carries its attempt's `traceparent`; a caller's unsampled trace builds no span and
//! its `traceparent` reaches the upstream unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_server::telemetry::Telemetry;
use echelon_testkit::{Behavior, OtlpReceiver, ReceivedSpan, TestUpstream, UpstreamOptions};
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const CHUNK_DELAY: Duration = Duration::from_millis(50);

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64
}

async fn upstream(alias: &str, key: &str) -> TestUpstream {
    TestUpstream::start_with(UpstreamOptions {
        model_alias: alias.into(),
        api_key: Some(key.into()),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Exports every finished span now (the SDK's flush blocks: off the async workers).
async fn flush(telemetry: &Telemetry) {
    let t = telemetry.clone();
    tokio::task::spawn_blocking(move || t.force_flush())
        .await
        .unwrap()
        .unwrap();
}

/// The spans of the receiver once `want` have arrived (they are flushed by then).
async fn received(receiver: &OtlpReceiver, want: usize) -> Vec<ReceivedSpan> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = receiver.spans();
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_fails_over_twice_is_one_trace_with_a_span_per_attempt() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let (a, b, c) = (
        upstream("up-a", "sk-secret-a").await,
        upstream("up-b", "sk-secret-b").await,
        upstream("up-c", "sk-secret-c").await,
    );
    // A slow stream: its spans must stay open until its last chunk.
    let d = TestUpstream::start_with(UpstreamOptions {
        model_alias: "up-d".into(),
        chunk_delay: CHUNK_DELAY,
        ..Default::default()
    })
    .await
    .unwrap();
    a.set_behavior(Behavior::status(500));
    b.set_behavior(Behavior::status(500));
    // `a2` shares a's provider: after a fails it is skipped (`provider_failed`).
    let yaml = format!(
        r#"
telemetry: {{ otlp_endpoint: "{}", service_name: echelon-test }}
providers:
  pa: {{ base_url: "{}", api_keys: [sk-secret-a] }}
  pb: {{ base_url: "{}", api_keys: [sk-secret-b] }}
  pc: {{ base_url: "{}", api_keys: [sk-secret-c] }}
  pd: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, model: up-a, max_retries: 0 }}
  a2: {{ provider: pa, model: up-a, max_retries: 0 }}
  b: {{ provider: pb, model: up-b, max_retries: 0 }}
  c: {{ provider: pc, model: up-c, max_retries: 0 }}
  d: {{ provider: pd, model: up-d }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [a2, b] }}
    echelon3: {{ models: [c] }}
    fallback_config: {{ strategy: provider_failover }}
"#,
        receiver.endpoint(),
        a.base_url(),
        b.base_url(),
        c.base_url(),
        d.base_url()
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let telemetry = Telemetry::start(&config.telemetry)
        .unwrap()
        .expect("telemetry is on");

    let gateway = Arc::new(Gateway::from_config(&config).unwrap());
    let server = common::serve(gateway, &ServerOptions::default()).await;
    let resp = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01"))
        .json(&json!({"model": "grp", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["model"], "up-c");

    // Deterministic: everything finished is exported now, no waiting for the batch.
    flush(&telemetry).await;
    let spans = received(&receiver, 4).await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();

    // The request span: under the caller's traceparent, kind server.
    let request = spans
        .iter()
        .find(|s| s.name == "chat grp")
        .unwrap_or_else(|| panic!("no request span in {names:?}"));
    assert_eq!(request.trace_id, TRACE_ID, "the caller's trace is kept");
    assert_eq!(
        request.parent_span_id, CALLER_SPAN,
        "a child of the caller's span"
    );
    assert_eq!(request.kind, 2, "server");
    assert_eq!(request.service_name.as_deref(), Some("echelon-test"));
    assert_eq!(
        request.attr("gen_ai.operation.name").as_deref(),
        Some("chat")
    );
    assert_eq!(request.attr("gen_ai.request.model").as_deref(), Some("grp"));
    assert_eq!(
        request.attr("gen_ai.response.model").as_deref(),
        Some("up-c")
    );
    assert_eq!(request.attr("echelon.route").as_deref(), Some("grp"));
    assert_eq!(request.attr("echelon.model").as_deref(), Some("c"));
    assert_eq!(
        request.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert!(
        request.attr("gen_ai.usage.input_tokens").is_some(),
        "{request:?}"
    );
    // The skipped candidate, as an event of the request span.
    let skip = request
        .events
        .iter()
        .find(|(name, _)| name == "candidate skipped")
        .unwrap_or_else(|| panic!("no skip event: {:?}", request.events));
    assert_eq!(skip.1.get("model"), Some(&json!("a2")));
    assert_eq!(skip.1.get("kind"), Some(&json!("provider_failed")));

    // One child span per attempt, in order, with the GenAI attributes.
    let mut attempts: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attributes.contains_key("echelon.attempt"))
        .collect();
    attempts.sort_by_key(|s| s.attr("echelon.attempt"));
    assert_eq!(attempts.len(), 3, "{names:?}");
    let expect = [
        ("a", "pa", "up-a", "server_error"),
        ("b", "pb", "up-b", "server_error"),
        ("c", "pc", "up-c", "ok"),
    ];
    for (span, (model, provider, upstream_model, kind)) in attempts.iter().zip(expect) {
        assert_eq!(span.trace_id, TRACE_ID);
        assert_eq!(
            span.parent_span_id, request.span_id,
            "{model}: a child of the request"
        );
        assert_eq!(span.kind, 3, "client");
        assert_eq!(span.name, format!("chat {upstream_model}"));
        assert_eq!(span.attr("gen_ai.operation.name").as_deref(), Some("chat"));
        assert_eq!(span.attr("gen_ai.provider.name").as_deref(), Some(provider));
        assert_eq!(
            span.attr("gen_ai.request.model").as_deref(),
            Some(upstream_model)
        );
        assert_eq!(span.attr("echelon.route").as_deref(), Some("grp"));
        assert_eq!(span.attr("echelon.model").as_deref(), Some(model));
        assert_eq!(span.attr("echelon.attempt.kind").as_deref(), Some(kind));
        let key_id = span.attr("echelon.key_id").unwrap();
        assert!(
            !key_id.contains("secret"),
            "a key id, never the key: {key_id}"
        );
        assert!(
            !format!("{span:?}").contains("sk-secret"),
            "no key in {span:?}"
        );
        if kind == "ok" {
            assert_eq!(span.attr("error.type"), None);
            assert_eq!(span.attr("gen_ai.response.model").as_deref(), Some("up-c"));
            assert!(span.attr("gen_ai.usage.input_tokens").is_some());
            assert!(span.attr("gen_ai.usage.output_tokens").is_some());
        } else {
            assert_eq!(span.attr("error.type").as_deref(), Some("server_error"));
            assert_eq!(
                span.attr("http.response.status_code").as_deref(),
                Some("500")
            );
            assert_eq!(span.status_code, 2, "an error status");
        }
    }

    // Each upstream got its attempt's traceparent: same trace, the attempt as parent.
    for (up, span) in [&a, &b, &c].into_iter().zip(&attempts) {
        let recorded = up.recorded();
        let tp = recorded
            .last()
            .and_then(|r| r.headers.get("traceparent"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("no traceparent upstream for {}", span.name))
            .to_owned();
        assert_eq!(tp, format!("00-{TRACE_ID}-{}-01", span.span_id));
    }

    // A stream: the request and attempt spans end with its last chunk, not its first,
    // and the attempt span has the stream's tokens.
    let resp = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({
            "model": "d", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let head_at = SystemTime::now();
    let text = resp.text().await.unwrap();
    let end_at = SystemTime::now();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let streamed = end_at.duration_since(head_at).unwrap();
    assert!(streamed >= 2 * CHUNK_DELAY, "the stream took {streamed:?}");
    flush(&telemetry).await;
    let all = received(&receiver, 6).await;
    let stream_request = all
        .iter()
        .find(|s| s.name == "chat d")
        .expect("stream request span");
    let stream_attempt = all
        .iter()
        .find(|s| s.name == "chat up-d")
        .expect("stream attempt span");
    assert_eq!(stream_attempt.parent_span_id, stream_request.span_id);
    // Closing at the first chunk would end them about `streamed` before the end.
    let slack = unix_nanos(end_at) - CHUNK_DELAY.as_nanos() as u64 / 2;
    assert!(
        stream_attempt.end_unix_nanos >= slack,
        "the attempt span ended {:?} before the stream",
        Duration::from_nanos(unix_nanos(end_at) - stream_attempt.end_unix_nanos)
    );
    assert!(
        stream_request.end_unix_nanos >= slack,
        "the request span ends with the stream"
    );
    assert_eq!(
        stream_attempt.attr("echelon.attempt.kind").as_deref(),
        Some("ok")
    );
    assert_eq!(
        stream_attempt.attr("gen_ai.response.model").as_deref(),
        Some("up-d")
    );
    assert!(
        stream_attempt.attr("gen_ai.usage.output_tokens").is_some(),
        "{stream_attempt:?}"
    );
    assert_eq!(
        stream_attempt.attr("echelon.key_id"),
        None,
        "a keyless provider"
    );

    // A caller's unsampled trace (flags 00): no span at all, and the upstream gets the
    // caller's traceparent as it came, so the decision travels on.
    let before = all.len();
    let unsampled = format!("00-{TRACE_ID}-{CALLER_SPAN}-00");
    let resp = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .header("traceparent", &unsampled)
        .json(&json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    flush(&telemetry).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        receiver.spans().len(),
        before,
        "no span for an unsampled trace"
    );
    let passed = c
        .recorded()
        .last()
        .and_then(|r| r.headers.get("traceparent"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(passed.as_deref(), Some(unsampled.as_str()));

    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap()
        .unwrap();
}
