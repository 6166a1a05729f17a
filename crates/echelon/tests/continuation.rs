//! Continuation of a stream that fails after its first content chunk (issue 19,
//! `stream_failure: continue`): the route's next candidate continues the same answer,
//! as an assistant prefill to a `prefill: true` model, else with an instruction; a
//! restated prefix is dropped; the usage is the sum; the client learns it happened; a
//! continuation that fails too ends with the error, never a truncated success.
//!
//! The testkit answers `echo: <last user text>`, so a continuing testkit model given
//! the prefill restates the whole answer (the seam case), and one given the instruction
//! answers something else (the plain continuation case). The last test continues a cut
//! stream on the real llama-server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::RecordSink;
use echelon::usage::record::RequestRecord;
use echelon_testkit::{Behavior, TestUpstream};
use echelon_types::{ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Role};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

const PROMPT: &str = "tell me about the weather on the coast today";

fn request(route: &str) -> ChatCompletionRequest {
    let mut r = ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, PROMPT)]);
    r.stream_options = Some(Default::default());
    if let Some(o) = r.stream_options.as_mut() {
        o.include_usage = Some(true);
    }
    r
}

/// `grp`: echelon1 = `a` on upstream `a`, echelon2 = `b` on upstream `b`, each tried
/// once; `extra` is written under the group (e.g. its `stream_failure`), `b_extra` on
/// model `b`.
fn gateway(a: &TestUpstream, b: &TestUpstream, extra: &str, b_extra: &str) -> Gateway {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0 {b_extra} }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
    {extra}
"#,
        a.base_url(),
        b.base_url()
    );
    Gateway::from_config(&Config::from_str(&yaml, "continuation.yaml").unwrap()).unwrap()
}

const CONTINUE: &str = "stream_failure: { mode: continue }";

async fn pair() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

/// Every chunk of a stream, or the error that ended it.
async fn drain(
    s: &mut echelon::GatewayStream,
) -> (Vec<ChatCompletionChunk>, Option<echelon::GatewayError>) {
    let mut chunks = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(c) => chunks.push(c),
            Err(e) => return (chunks, Some(e)),
        }
    }
    (chunks, None)
}

fn text(chunks: &[ChatCompletionChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.as_deref())
        .collect()
}

/// The records the gateway emits.
#[derive(Default)]
struct Sink(Mutex<Vec<RequestRecord>>);

impl RecordSink for Sink {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        if let Ok(mut records) = self.0.lock() {
            records.push(record);
        }
        Box::pin(async {})
    }
}

/// A prefill model that answers from the start anyway: the client gets the answer
/// once, without the seam of repeated text; `b` was sent the partial answer as the last
/// (assistant) message; one id across the stream; the final chunk says what happened;
/// the usage is the sum of both attempts.
#[tokio::test]
async fn a_cut_stream_is_continued_and_a_restated_prefix_dropped() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::StreamCut { chunks: 3 });
    let sink = Arc::new(Sink::default());
    let gw = gateway(&a, &b, CONTINUE, ", prefill: true").with_record_sink(sink.clone());

    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "a");
    let (chunks, err) = drain(&mut s).await;
    assert!(err.is_none(), "continued, not failed: {err:?}");
    let full = format!("echo: {PROMPT}");
    assert_eq!(text(&chunks), full, "the whole answer, once");
    assert_eq!(s.model(), "b", "b finished it");

    // b got the partial answer as an assistant prefill, not an instruction.
    let sent = b.recorded().pop().unwrap().body.unwrap();
    let messages = sent["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "assistant");
    let partial = last["content"].as_str().unwrap();
    assert!(
        full.starts_with(partial) && partial.len() < full.len() && !partial.is_empty(),
        "the partial answer: {partial:?}"
    );

    let ids: std::collections::HashSet<&str> = chunks.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 1, "one response: {ids:?}");
    let roles = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter(|c| c.delta.role.is_some())
        .count();
    assert_eq!(roles, 1, "one role chunk");
    let finish = chunks
        .iter()
        .find(|c| c.choices.iter().any(|ch| ch.finish_reason.is_some()))
        .unwrap();
    let echelon = &finish.extra["echelon"];
    assert_eq!(echelon["continued_from"], "a");
    assert_eq!(echelon["continued_on"], "b");
    assert_eq!(echelon["continuations"], 1);
    let outcomes: Vec<&str> = s.attempts().iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["stream_cut", "ok"]);

    // The usage: b's own plus a's counted locally (prompt + its partial answer).
    let usage = chunks.iter().find_map(|c| c.usage.clone()).unwrap();
    let b_prompt = sent["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().split_whitespace().count())
        .sum::<usize>() as u64;
    assert!(
        usage.prompt_tokens > b_prompt,
        "a's prompt is added to b's ({b_prompt}): {usage:?}"
    );
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );
    drop(s);
    gw.shutdown().await;
    let records = sink.0.lock().unwrap();
    let r = records.last().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.model.as_deref(), Some("b"));
    assert_eq!(
        r.attempts.len(),
        2,
        "both attempts recorded: {:?}",
        r.attempts
    );
    assert_eq!(r.prompt_tokens, usage.prompt_tokens);
    assert_eq!(r.completion_tokens, usage.completion_tokens);
}

/// A model without `prefill` gets the partial answer then an instruction to go on (the
/// conversation ends with a user message), and what it answers follows the partial text.
#[tokio::test]
async fn a_model_without_prefill_is_asked_to_continue() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::StreamCut { chunks: 2 });
    let gw = gateway(&a, &b, CONTINUE, "");
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    let (chunks, err) = drain(&mut s).await;
    assert!(err.is_none(), "{err:?}");

    let sent = b.recorded().pop().unwrap().body.unwrap();
    let messages = sent["messages"].as_array().unwrap();
    let n = messages.len();
    assert_eq!(messages[n - 1]["role"], "user");
    let instruction = messages[n - 1]["content"].as_str().unwrap();
    assert!(instruction.contains("cut off"), "{instruction}");
    assert_eq!(messages[n - 2]["role"], "assistant");
    let partial = messages[n - 2]["content"].as_str().unwrap().to_owned();
    assert_eq!(
        text(&chunks),
        format!("{partial}echo: {instruction}"),
        "the partial answer, then b's continuation"
    );
}

/// The default (`mode: error`) is today's contract: the explicit error, b never called.
#[tokio::test]
async fn without_continue_a_cut_stream_ends_with_the_error() {
    let (a, b) = pair().await;
    a.set_behavior(Behavior::StreamCut { chunks: 2 });
    let gw = gateway(&a, &b, "", ", prefill: true");
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    let (chunks, err) = drain(&mut s).await;
    let err = err.expect("a cut stream is an error");
    assert_eq!(err.code(), Some("stream_interrupted"));
    assert!(!chunks.is_empty());
    assert_eq!(b.chat_requests(), 0);
}

/// A continuation that fails too ends with the error event naming every attempt — never
/// a truncated success; `max_continuations: 1` stops there even though `c` is healthy.
#[tokio::test]
async fn a_continuation_that_fails_ends_with_the_error() {
    let (a, b) = pair().await;
    let c = TestUpstream::start().await.unwrap();
    a.set_behavior(Behavior::StreamCut { chunks: 2 });
    b.set_behavior(Behavior::StreamCut { chunks: 2 });
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
  pc: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0, prefill: true }}
  c: {{ provider: pc, max_retries: 0, prefill: true }}
task_groups:
  grp:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
    echelon3: {{ models: [c] }}
    stream_failure: {{ mode: continue, max_continuations: 1 }}
"#,
        a.base_url(),
        b.base_url(),
        c.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "c.yaml").unwrap()).unwrap();
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    let (_, err) = drain(&mut s).await;
    let err = err.expect("the continuation was cut too");
    assert_eq!(err.code(), Some("stream_interrupted"));
    let outcomes: Vec<(&str, &str)> = err
        .attempts()
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(outcomes, [("a", "stream_cut"), ("b", "stream_cut")]);
    assert!(err.message().contains("model `b`"), "{}", err.message());
    assert_eq!(c.chat_requests(), 0, "max_continuations: 1");

    // With two allowed, c finishes it.
    let yaml2 = yaml.replace("max_continuations: 1", "max_continuations: 2");
    let gw = Gateway::from_config(&Config::from_str(&yaml2, "c.yaml").unwrap()).unwrap();
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    let (chunks, err) = drain(&mut s).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text(&chunks), format!("echo: {PROMPT}"));
    assert_eq!(s.model(), "c");
}

/// A stream cut before any content is failed over as always: the next candidate gets
/// the client's request as it was, and nothing says "continued".
#[tokio::test]
async fn a_stream_that_only_failed_before_content_is_failed_over_not_continued() {
    let (a, b) = pair().await;
    // Cut before any content: an ordinary failover, no continuation involved.
    a.set_behavior(Behavior::StreamCut { chunks: 0 });
    let gw = gateway(&a, &b, CONTINUE, ", prefill: true");
    let mut s = gw.chat_stream(request("grp")).await.unwrap();
    assert_eq!(s.model(), "b");
    let (chunks, err) = drain(&mut s).await;
    assert!(err.is_none());
    assert_eq!(text(&chunks), format!("echo: {PROMPT}"));
    let sent = b.recorded().pop().unwrap().body.unwrap();
    assert_eq!(
        sent["messages"].as_array().unwrap().len(),
        1,
        "the client's request as it was"
    );
    assert!(
        chunks.iter().all(|c| !c.extra.contains_key("echelon")),
        "not a continuation"
    );
}

/// End to end with the real model: a testkit upstream cuts its stream after a few
/// words, llama-server (declared `prefill: true`) continues. llama-server answers a
/// prefill with the prefill itself followed by the continuation; the client must see
/// the partial answer exactly once, then the rest.
#[tokio::test]
async fn a_cut_stream_is_continued_by_the_real_model() {
    let Some(servers) = echelon_testkit::real::start_or_skip(&[("real", "key-r")])
        .await
        .unwrap()
    else {
        return;
    };
    let a = TestUpstream::start().await.unwrap();
    a.set_behavior(Behavior::StreamCut { chunks: 4 });
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}" }}
  real: {{ base_url: "{}", api_keys: ["key-r"] }}
models:
  cut: {{ provider: pa, max_retries: 0 }}
  smol: {{ provider: real, model: smollm2, timeout: 60, max_retries: 0, prefill: true }}
task_groups:
  grp:
    echelon1: {{ models: [cut] }}
    echelon2: {{ models: [smol] }}
    stream_failure: {{ mode: continue }}
"#,
        a.base_url(),
        servers[0].base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "real.yaml").unwrap()).unwrap();
    let mut req = request("grp");
    req.max_tokens = Some(24);
    req.extra.insert("temperature".into(), 0.into());
    let mut s = gw.chat_stream(req).await.unwrap();
    let (chunks, err) = drain(&mut s).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(s.model(), "smol");
    let all = text(&chunks);
    eprintln!("continued by the real model: {all:?}");
    // The testkit's partial answer: what came in chunks named by its model.
    let partial: String = text(
        &chunks
            .iter()
            .filter(|c| c.model == "test-model")
            .cloned()
            .collect::<Vec<_>>(),
    );
    let partial = partial.as_str();
    assert!(
        format!("echo: {PROMPT}").starts_with(partial) && partial.len() > 8,
        "{partial:?}"
    );
    assert!(all.starts_with(partial), "{all:?} starts with {partial:?}");
    let rest = &all[partial.len()..];
    assert!(
        !rest.trim().is_empty(),
        "the model added something: {all:?}"
    );
    assert!(
        !rest.trim_start().starts_with(partial),
        "no seam of repeated text: {all:?}"
    );
    let finish = chunks
        .iter()
        .find(|c| c.choices.iter().any(|ch| ch.finish_reason.is_some()))
        .unwrap();
    assert_eq!(finish.extra["echelon"]["continued_from"], "cut");
    let usage = chunks.iter().find_map(|c| c.usage.clone()).unwrap();
    assert!(usage.completion_tokens > 0 && usage.prompt_tokens > 0);
}
