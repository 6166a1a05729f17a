//! What counts as an answer, and what an answer may cost the gateway (issue 14 items 3, 5
//! and 12, issue 19): an empty 200 is a malformed answer that fails over, and so is a
//! plain answer without a finish reason; a stream without a finish reason is delivered
//! but flagged; token counts never block the runtime; an
//! answer larger than `max_response_bytes` fails over; a request the client abandons is
//! still recorded (499). Real local upstreams (the testkit) on 127.0.0.1:0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::RecordSink;
use echelon::usage::record::RequestRecord;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};

fn request(route: &str, text: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, text)])
}

/// Every record the gateway emits.
#[derive(Default)]
struct Collect(Mutex<Vec<RequestRecord>>);

impl RecordSink for Collect {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(record);
        Box::pin(async {})
    }
}

impl Collect {
    fn records(&self) -> Vec<RequestRecord> {
        self.0.lock().unwrap().clone()
    }
}

/// Models `a` and `b` on two upstreams; task group `grp` (echelon1: a, echelon2: b).
/// `extra_a` is YAML added to `a`'s settings.
fn config(a: &TestUpstream, b: &TestUpstream, extra_a: &str) -> Config {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, model: up-a, max_retries: 0, {extra_a} }}
  b: {{ provider: pb, model: up-b, max_retries: 0 }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    Config::from_str(&yaml, "test.yaml").unwrap()
}

async fn upstreams() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

fn gateway(a: &TestUpstream, b: &TestUpstream, extra_a: &str) -> (Arc<Gateway>, Arc<Collect>) {
    let sink = Arc::new(Collect::default());
    let gw = Gateway::from_config(&config(a, b, extra_a))
        .unwrap()
        .with_record_sink(sink.clone());
    (Arc::new(gw), sink)
}

/// The (model, kind) of each attempt.
fn kinds(attempts: &[echelon_types::Attempt]) -> Vec<(String, String)> {
    attempts
        .iter()
        .map(|a| (a.model.clone(), a.outcome.to_string()))
        .collect()
}

fn pair(model: &str, kind: &str) -> (String, String) {
    (model.to_owned(), kind.to_owned())
}

#[tokio::test]
async fn an_empty_object_or_no_choices_fails_over_as_malformed() {
    for behavior in [Behavior::EmptyAnswer, Behavior::NoChoices] {
        let (a, b) = upstreams().await;
        a.push_behavior(behavior.clone());
        let (gw, _) = gateway(&a, &b, "");
        let done = gw.chat(request("grp", "hello")).await.unwrap();
        assert_eq!(done.model, "b", "{behavior}");
        assert_eq!(done.response.first_text(), Some("echo: hello"));
        assert_eq!(
            kinds(&done.attempts),
            [pair("a", "malformed"), pair("b", "ok")],
            "{behavior}"
        );
        assert!(
            done.attempts[0].message.contains("no choices"),
            "{}",
            done.attempts[0].message
        );
        // A malformed answer counts against health (a breaker failure).
        let failures = gw
            .model("a")
            .unwrap()
            .breaker()
            .snapshot()
            .consecutive_failures;
        assert_eq!(failures, 1, "{behavior}");
    }
}

#[tokio::test]
async fn a_stream_of_only_a_role_chunk_fails_over_before_the_client_sees_it() {
    for behavior in [Behavior::EmptyAnswer, Behavior::NoChoices] {
        let (a, b) = upstreams().await;
        a.push_behavior(behavior.clone());
        let (gw, _) = gateway(&a, &b, "");
        let mut stream = gw.chat_stream(request("grp", "hello")).await.unwrap();
        assert_eq!(stream.model(), "b", "{behavior}");
        assert_eq!(
            kinds(stream.attempts()),
            [pair("a", "malformed"), pair("b", "ok")],
            "{behavior}"
        );
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            if let Some(t) = &chunk
                .unwrap()
                .choices
                .first()
                .and_then(|c| c.delta.content.clone())
            {
                text.push_str(t);
            }
        }
        assert_eq!(text, "echo: hello");
    }
}

/// Counter increments by metric name (a recorder local to the test's thread).
#[derive(Default)]
struct Counters(Arc<Mutex<Vec<(String, u64)>>>);

struct CounterHandle(String, Arc<Mutex<Vec<(String, u64)>>>);

impl metrics::CounterFn for CounterHandle {
    fn increment(&self, value: u64) {
        self.1.lock().unwrap().push((self.0.clone(), value));
    }
    fn absolute(&self, _: u64) {}
}

impl metrics::Recorder for Counters {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::from_arc(Arc::new(CounterHandle(
            key.name().to_owned(),
            self.0.clone(),
        )))
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[test]
fn a_stream_without_a_finish_reason_is_delivered_and_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let counters = Counters::default();
    let seen = counters.0.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let records = metrics::with_local_recorder(&counters, || {
        rt.block_on(async {
            let (a, b) = upstreams().await;
            a.push_behavior(Behavior::NoFinishReason);
            let (sender, writer) = echelon::usage::ledger::Ledger::open(&path)
                .unwrap()
                .spawn_writer(10, 10, Duration::from_millis(5));
            let sink = Arc::new(Collect::default());
            let gw = Gateway::from_config(&config(&a, &b, ""))
                .unwrap()
                .with_record_sink(sink.clone());
            let mut stream = gw.chat_stream(request("grp", "hello")).await.unwrap();
            assert_eq!(stream.model(), "a", "delivered by the first model");
            let mut text = String::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.expect("delivered, not an error");
                if let Some(t) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
                    text.push_str(&t);
                }
            }
            assert_eq!(text, "echo: hello");
            drop(stream);
            gw.shutdown().await;
            let records = sink.records();
            for r in &records {
                sender.send(r.clone()).await;
            }
            drop(sender);
            writer.finish().await.unwrap();
            records
        })
    });
    assert_eq!(records.len(), 1);
    let json = serde_json::to_value(&records[0]).unwrap();
    assert_eq!(json["status"], 200);
    assert_eq!(json["no_finish_reason"], true, "{json}");
    let conn = rusqlite::Connection::open(&path).unwrap();
    let flag: i64 = conn
        .query_row("SELECT no_finish_reason FROM requests", [], |r| r.get(0))
        .unwrap();
    assert_eq!(flag, 1);
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter()
            .any(|(name, n)| name == "echelon_stream_no_finish_reason_total" && *n == 1),
        "{seen:?}"
    );
}

/// Issue 19: a non-streamed answer whose choice has no `finish_reason` (null here) may
/// be cut short: it is malformed, counts against the model's health, and the next
/// candidate answers. (Old: `a`'s answer was relayed as a success.)
#[tokio::test]
async fn a_plain_answer_without_a_finish_reason_fails_over_as_malformed() {
    let (a, b) = upstreams().await;
    a.push_behavior(Behavior::NoFinishReason);
    let (gw, sink) = gateway(&a, &b, "");
    let done = gw.chat(request("grp", "hello")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(done.response.first_text(), Some("echo: hello"));
    assert_eq!(
        done.response.choices[0].finish_reason.as_deref(),
        Some("stop")
    );
    assert_eq!(
        kinds(&done.attempts),
        [pair("a", "malformed"), pair("b", "ok")]
    );
    assert!(
        done.attempts[0].message.contains("no finish_reason"),
        "{}",
        done.attempts[0].message
    );
    let failures = gw
        .model("a")
        .unwrap()
        .breaker()
        .snapshot()
        .consecutive_failures;
    assert_eq!(failures, 1);
    gw.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1);
    assert_eq!(
        (records[0].status, records[0].model.as_deref()),
        (200, Some("b"))
    );
}

#[tokio::test]
async fn a_normal_stream_is_not_flagged() {
    let (a, b) = upstreams().await;
    let (gw, sink) = gateway(&a, &b, "");
    let mut stream = gw.chat_stream(request("grp", "hello")).await.unwrap();
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    drop(stream);
    gw.shutdown().await;
    let json = serde_json::to_value(&sink.records()[0]).unwrap();
    assert_eq!(json["no_finish_reason"], false, "{json}");
}

/// A prompt of `words` words (`"word "` each: one token apiece, 5 bytes).
fn words(words: usize) -> String {
    "word ".repeat(words)
}

#[tokio::test]
async fn a_prompt_far_beyond_the_window_is_refused_without_counting_it() {
    let (a, b) = upstreams().await;
    // 2 MB: at least 2,000,000 / 128 bytes per token = 15,625 tokens (+ 6 of framing),
    // beyond both windows.
    let extra = "context_window: 4096";
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, {extra} }}
  b: {{ provider: pb, {extra} }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let e = gw.chat(request("grp", &words(400_000))).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(
        e.to_body().error.code.as_deref(),
        Some("context_length_exceeded")
    );
    assert_eq!(
        kinds(e.attempts()),
        [pair("a", "context_window"), pair("b", "context_window")]
    );
    // The bound decided: the message says "at least", a count would give the number.
    assert!(
        e.attempts()[0]
            .message
            .starts_with("at least 15631 prompt tokens"),
        "{}",
        e.attempts()[0].message
    );
    assert_eq!(a.chat_requests() + b.chat_requests(), 0);
}

/// `#[tokio::test]` runs on one thread: a count on it would hold every other task until
/// it is done. The huge prompt's bounds do not decide (it needs counting, and is then
/// refused), and while it is counted a tiny request is served to the end.
#[tokio::test]
async fn counting_a_huge_prompt_does_not_hold_up_other_requests() {
    let (a, b) = upstreams().await;
    // 400,000 tokens in 2 MB: at least 15,625 by the bound, at most 2 M; window 200,000.
    let (gw, _) = gateway(&a, &b, "context_window: 200000");
    let huge = tokio::spawn({
        let gw = gw.clone();
        async move { gw.chat(request("a", &words(400_000))).await }
    });
    let tiny = gw.chat(request("grp", "hello")).await.unwrap();
    assert_eq!(tiny.model, "a");
    assert!(
        !huge.is_finished(),
        "counting the huge prompt held the runtime: it was done before the tiny request"
    );
    let e = huge.await.unwrap().unwrap_err();
    assert_eq!(
        e.to_body().error.code.as_deref(),
        Some("context_length_exceeded")
    );
    let message = &e.attempts()[0].message;
    let counted: u64 = message
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("counted exactly, not bounded");
    assert!((400_000..400_010).contains(&counted), "{message}");
}

#[tokio::test]
async fn an_answer_larger_than_max_response_bytes_fails_over() {
    let (a, b) = upstreams().await;
    let (gw, sink) = gateway(&a, &b, "max_response_bytes: 100000");
    // Non-streamed: one body of 200 kB.
    a.push_behavior(Behavior::HugeAnswer { bytes: 200_000 });
    let done = gw.chat(request("grp", "hello")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        kinds(&done.attempts),
        [pair("a", "malformed"), pair("b", "ok")]
    );
    assert!(
        done.attempts[0]
            .message
            .contains("max_response_bytes (100000 bytes)"),
        "{}",
        done.attempts[0].message
    );
    // Streamed: the role chunk passes, the content passes the cap before it ends.
    a.push_behavior(Behavior::HugeAnswer { bytes: 200_000 });
    let stream = gw.chat_stream(request("grp", "hello")).await;
    // The first 64 KiB content chunk starts the stream on `a`; the cap then cuts it.
    let mut stream = stream.unwrap();
    assert_eq!(stream.model(), "a");
    let mut failed = None;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            failed = Some(e);
        }
    }
    let e = failed.expect("the stream ends with an error, never as a normal end");
    assert_eq!(e.attempts().last().unwrap().outcome, "malformed");
    assert!(
        e.message().contains("max_response_bytes"),
        "{}",
        e.message()
    );
    // Under the cap, the same answer is delivered whole.
    a.push_behavior(Behavior::HugeAnswer { bytes: 50_000 });
    let done = gw.chat(request("grp", "hello")).await.unwrap();
    assert_eq!(done.model, "a");
    assert_eq!(done.response.first_text().map(str::len), Some(50_000));
    drop(stream);
    gw.shutdown().await;
    let estimated = sink
        .records()
        .last()
        .map(|r| (r.estimated, r.completion_tokens));
    assert!(
        matches!(estimated, Some((true, n)) if n > 0),
        "{estimated:?}"
    );
}

#[tokio::test]
async fn an_oversized_first_stream_chunk_fails_over_transparently() {
    let (a, b) = upstreams().await;
    // The cap is below the first content chunk: nothing was sent to the client yet.
    let (gw, _) = gateway(&a, &b, "max_response_bytes: 1000");
    a.push_behavior(Behavior::HugeAnswer { bytes: 5_000 });
    let stream = gw.chat_stream(request("grp", "hello")).await.unwrap();
    assert_eq!(stream.model(), "b");
    assert_eq!(
        kinds(stream.attempts()),
        [pair("a", "malformed"), pair("b", "ok")]
    );
}

#[tokio::test]
async fn a_request_the_client_abandons_is_recorded_with_499() {
    let (a, b) = upstreams().await;
    a.set_behavior(Behavior::Stall);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let (sender, writer) = echelon::usage::ledger::Ledger::open(&path)
        .unwrap()
        .spawn_writer(10, 10, Duration::from_millis(5));
    let gw = Gateway::from_config(&config(&a, &b, "timeout: 30"))
        .unwrap()
        .with_record_sink(Arc::new(sender));
    // The client goes away: the server drops the request's future.
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        gw.chat(request("grp", "hello there")),
    )
    .await;
    assert!(gone.is_err(), "the upstream stalls");
    // The same before a stream's first chunk.
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        gw.chat_stream(request("grp", "hello there")),
    )
    .await;
    assert!(gone.is_err());
    gw.shutdown().await;
    drop(gw);
    assert_eq!(writer.finish().await.unwrap(), 2);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: Vec<(i64, Option<String>, i64, i64, i64)> = conn
        .prepare("SELECT status, model, stream, prompt_tokens, estimated FROM requests ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 2);
    for (i, (status, model, stream, prompt, estimated)) in rows.into_iter().enumerate() {
        assert_eq!(status, 499);
        assert_eq!(model.as_deref(), Some("a"), "the model being called");
        assert_eq!(stream, i as i64);
        // The provider may bill the prompt it was sent: estimated, not zero.
        assert!(prompt > 0);
        assert_eq!(estimated, 1);
    }
    let attempts: Vec<(String, String)> = conn
        .prepare("SELECT model, error_kind FROM attempts ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(attempts, [pair("a", "cancelled"), pair("a", "cancelled")]);
    // `echelon usage` shows them as failed requests.
    let by_model = echelon::usage::report::summary(
        &path,
        &echelon::usage::report::UsageFilter::default(),
        echelon::usage::report::GroupBy::Model,
    )
    .unwrap();
    assert_eq!(by_model.len(), 1);
    assert_eq!((by_model[0].requests, by_model[0].failures), (2, 2));
}

#[tokio::test]
async fn a_request_abandoned_after_a_failover_keeps_its_earlier_attempts() {
    let (a, b) = upstreams().await;
    a.push_behavior(Behavior::status(500));
    b.set_behavior(Behavior::Stall);
    let (gw, sink) = gateway(&a, &b, "");
    let gone =
        tokio::time::timeout(Duration::from_millis(300), gw.chat(request("grp", "hi"))).await;
    assert!(gone.is_err());
    gw.shutdown().await;
    let records = sink.records();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.status, 499);
    assert_eq!(r.model.as_deref(), Some("b"));
    let attempts: Vec<(&str, &str)> = r
        .attempts
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(attempts, [("a", "server_error"), ("b", "cancelled")]);
    assert!(r.fallback);
    assert_eq!(
        r.attempts[0].prompt_tokens, 0,
        "a failed call consumed nothing"
    );
    assert!(r.attempts[1].prompt_tokens > 0);
}

#[tokio::test]
async fn a_finished_request_is_recorded_once() {
    let (a, b) = upstreams().await;
    let (gw, sink) = gateway(&a, &b, "");
    gw.chat(request("grp", "hi")).await.unwrap();
    let e = gw.chat(request("nope", "hi")).await.unwrap_err();
    assert_eq!(e.status(), 404);
    gw.shutdown().await;
    let statuses: Vec<u16> = sink.records().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404]);
}

#[tokio::test]
async fn an_upstream_options_default_still_answers() {
    // The new behaviours leave the default alone.
    let up = TestUpstream::start_with(UpstreamOptions::default())
        .await
        .unwrap();
    let (gw, _) = gateway(&up, &up, "");
    assert_eq!(gw.chat(request("grp", "x")).await.unwrap().model, "a");
}

#[test]
fn max_response_bytes_has_a_default_and_bounds() {
    let yaml = |extra: &str| {
        format!(
            "providers:\n  p: {{ base_url: \"http://127.0.0.1:9/v1\" }}\nmodels:\n  m: {{ provider: p{extra} }}\n"
        )
    };
    let config = Config::from_str(&yaml(""), "t.yaml").unwrap();
    assert_eq!(config.models["m"].max_response_bytes, 32 << 20);
    let config = Config::from_str(&yaml(", max_response_bytes: 1000"), "t.yaml").unwrap();
    assert_eq!(config.models["m"].max_response_bytes, 1000);
    for bad in ["0", "2000000000", "-1", "1.5"] {
        let e = Config::from_str(&yaml(&format!(", max_response_bytes: {bad}")), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.yaml:4:") && e.contains("models.m.max_response_bytes"),
            "{bad}: {e}"
        );
    }
}
