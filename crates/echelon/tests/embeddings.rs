//! `Gateway::embed` against the fault-injecting test upstream: embeddings go through the
//! same plan and resilience as chat completions (issue 20).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use echelon::config::Config;
use echelon::usage::RecordSink;
use echelon::usage::record::RequestRecord;
use echelon::{Gateway, GatewayError};
use echelon_testkit::embeddings::{DEFAULT_DIMENSIONS, text_vector};
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{
    ChatCompletionRequest, ChatMessage, EmbeddingInput, EmbeddingRequest, EmbeddingVector,
    EncodingFormat, Role,
};

#[derive(Default)]
struct Collect(Mutex<Vec<RequestRecord>>);

impl RecordSink for Collect {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(record);
        Box::pin(async {})
    }
}

async fn upstream(alias: &str, key: &str) -> TestUpstream {
    TestUpstream::start_with(UpstreamOptions {
        model_alias: alias.to_owned(),
        api_key: Some(key.to_owned()),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap()
}

async fn pair() -> (TestUpstream, TestUpstream) {
    (
        upstream("alias-a", "key-a").await,
        upstream("alias-b", "key-b").await,
    )
}

/// Models `a` and `b` on two upstreams; task group `grp` (echelon1: a, echelon2: b).
/// `extra_a` is YAML added to `a`'s settings, `extra_b` to `b`'s.
fn config(a: &TestUpstream, b: &TestUpstream, extra_a: &str, extra_b: &str) -> Config {
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["key-a"] }}
  pb: {{ base_url: "{}", api_keys: ["key-b"] }}
models:
  a: {{ provider: pa, model: emb-a, retry_delay: 0.01, {extra_a} }}
  b: {{ provider: pb, model: emb-b, retry_delay: 0.01, {extra_b} }}
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

fn gateway(a: &TestUpstream, b: &TestUpstream, extra_a: &str, extra_b: &str) -> Gateway {
    Gateway::from_config(&config(a, b, extra_a, extra_b)).unwrap()
}

fn floats(v: &EmbeddingVector) -> Vec<f32> {
    match v {
        EmbeddingVector::Float(v) => v.iter().map(|x| *x as f32).collect(),
        EmbeddingVector::Base64(_) => panic!("expected floats"),
    }
}

fn kinds(attempts: &[echelon_types::Attempt]) -> Vec<(String, String)> {
    attempts
        .iter()
        .map(|x| (x.model.clone(), x.outcome.to_string()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(m, k)| ((*m).to_owned(), (*k).to_owned()))
        .collect()
}

#[tokio::test]
async fn a_batch_gets_one_vector_per_input_in_order_with_the_upstream_model_name() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "max_retries: 0", "");
    let inputs = vec!["first text", "second", "third one here"];
    let done = gw
        .embed(EmbeddingRequest::new("grp", inputs.clone()))
        .await
        .unwrap();
    assert_eq!(done.model, "a");
    assert_eq!(done.provider, "pa");
    assert_eq!(done.response.data.len(), 3);
    for (i, text) in inputs.iter().enumerate() {
        assert_eq!(done.response.data[i].index, i as u32);
        assert_eq!(
            floats(&done.response.data[i].embedding),
            text_vector(text, DEFAULT_DIMENSIONS),
            "vector {i} is the one of {text:?}"
        );
    }
    // "first text" 10 chars → 3, "second" → 2, "third one here" → 4.
    assert_eq!(done.response.usage.as_ref().unwrap().prompt_tokens, 9);
    assert_eq!(done.response.model, "alias-a");
    assert_eq!(kinds(&done.attempts), pairs(&[("a", "ok")]));
    let sent = a.recorded();
    assert_eq!(sent.len(), 1);
    let body = sent[0].body.as_ref().unwrap();
    assert_eq!(body["model"], "emb-a", "the upstream name, not the route");
    assert_eq!(body["input"], serde_json::json!(inputs));
    assert_eq!(sent[0].authorization.as_deref(), Some("Bearer key-a"));
    assert_eq!(a.embedding_requests(), 1);
    assert_eq!(a.chat_requests(), 0);
    assert_eq!(b.embedding_requests(), 0);
}

#[tokio::test]
async fn token_inputs_dimensions_unknown_fields_and_base64_pass_through() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "", "");
    let mut req = EmbeddingRequest::new("a", EmbeddingInput::TokenBatches(vec![vec![1, 2, 3]]));
    req.dimensions = Some(4);
    req.user = Some("u-1".into());
    req.extra.insert("vendor_knob".into(), serde_json::json!(7));
    let done = gw.embed(req).await.unwrap();
    assert_eq!(done.response.data[0].embedding.dimensions(), 4);
    assert_eq!(done.response.usage.as_ref().unwrap().prompt_tokens, 3);
    let body = a.recorded()[0].body.clone().unwrap();
    assert_eq!(body["input"], serde_json::json!([[1, 2, 3]]));
    assert_eq!(body["dimensions"], 4);
    assert_eq!(body["user"], "u-1");
    assert_eq!(body["vendor_knob"], 7);
    assert!(body.get("encoding_format").is_none());

    // base64 asked: base64 answered, decoding to the same vector.
    let mut req = EmbeddingRequest::new("a", "hello");
    req.encoding_format = Some(EncodingFormat::Base64);
    let mut done = gw.embed(req).await.unwrap();
    assert!(matches!(
        done.response.data[0].embedding,
        EmbeddingVector::Base64(_)
    ));
    assert_eq!(
        a.recorded()[1].body.as_ref().unwrap()["encoding_format"],
        "base64"
    );
    done.response.convert_to(EncodingFormat::Float).unwrap();
    assert_eq!(
        floats(&done.response.data[0].embedding),
        text_vector("hello", DEFAULT_DIMENSIONS)
    );
}

#[tokio::test]
async fn a_500_is_retried_on_the_same_model() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "max_retries: 1", "");
    a.push_behavior(Behavior::status(500));
    let done = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
    assert_eq!(done.model, "a");
    assert_eq!(
        kinds(&done.attempts),
        pairs(&[("a", "server_error"), ("a", "ok")])
    );
    assert_eq!(a.embedding_requests(), 2);
    assert_eq!(b.embedding_requests(), 0);
}

#[tokio::test]
async fn retry_on_bounds_embeddings_retries_per_kind() {
    let (a, b) = pair().await;
    // Server errors are not retried on `a`: the request moves on at once.
    let gw = gateway(&a, &b, "max_retries: 3, retry_on: { server_error: 0 }", "");
    a.set_behavior(Behavior::status(502));
    let done = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
    assert_eq!(
        kinds(&done.attempts),
        pairs(&[("a", "server_error"), ("b", "ok")])
    );
    assert_eq!(a.embedding_requests(), 1);
}

#[tokio::test]
async fn a_failing_echelon_fails_over_to_the_next_and_faults_apply() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "max_retries: 0", "max_retries: 0");
    for (behavior, kind) in [
        (Behavior::status(503), "server_error"),
        (Behavior::CutConnection, "connect"),
        (Behavior::Malformed, "malformed"),
        (Behavior::NoChoices, "malformed"),
        (Behavior::EmptyAnswer, "malformed"),
    ] {
        a.push_behavior(behavior.clone());
        let done = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
        assert_eq!(done.model, "b", "{behavior:?}");
        assert_eq!(
            kinds(&done.attempts),
            pairs(&[("a", kind), ("b", "ok")]),
            "{behavior:?}"
        );
    }
    // Both fail: the error names every attempt.
    a.set_behavior(Behavior::status(500));
    b.set_behavior(Behavior::status(500));
    let e: GatewayError = gw
        .embed(EmbeddingRequest::new("grp", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502);
    assert_eq!(e.attempts().len(), 2);
}

#[tokio::test]
async fn an_open_breaker_skips_the_model_without_calling_it() {
    let (a, b) = pair().await;
    let gw = gateway(
        &a,
        &b,
        "max_retries: 0, circuit_breaker: { failure_threshold: 1, recovery_time: 60 }",
        "",
    );
    a.set_behavior(Behavior::status(500));
    let first = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
    assert_eq!(
        kinds(&first.attempts),
        pairs(&[("a", "server_error"), ("b", "ok")])
    );
    assert_eq!(gw.model("a").unwrap().breaker().snapshot().state, "open");
    let second = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
    assert_eq!(
        kinds(&second.attempts),
        pairs(&[("a", "circuit_open"), ("b", "ok")])
    );
    assert_eq!(
        a.embedding_requests(),
        1,
        "no call while the breaker is open"
    );
    // The same breaker guards chat: a chat request skips `a` too.
    let chat = gw
        .chat(ChatCompletionRequest::new(
            "grp",
            vec![ChatMessage::new(Role::User, "hi")],
        ))
        .await
        .unwrap();
    assert_eq!(chat.model, "b");
    assert_eq!(chat.attempts[0].outcome, "circuit_open");
}

#[tokio::test]
async fn the_ledger_gets_prompt_tokens_and_cost_and_no_completion_tokens() {
    let (a, b) = pair().await;
    let sink = Arc::new(Collect::default());
    let gw = gateway(
        &a,
        &b,
        "max_retries: 0, pricing: { input_per_1m: 2.0, output_per_1m: 8.0 }",
        "pricing: { input_per_1m: 1.0, output_per_1m: 4.0 }",
    )
    .with_record_sink(sink.clone());
    a.push_behavior(Behavior::status(503));
    let done = gw
        .embed_with(
            EmbeddingRequest::new("grp", vec!["abcdefgh", "abcd"]),
            &echelon::CallOptions {
                request_id: Some("req-emb-1".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(done.model, "b");
    let records = sink.0.lock().unwrap().clone();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.request_id, "req-emb-1");
    assert_eq!(r.route, "grp");
    assert_eq!(r.status, 200);
    assert_eq!(r.model.as_deref(), Some("b"));
    assert_eq!(r.prompt_tokens, 3, "the provider's usage: 2 + 1");
    assert_eq!(r.completion_tokens, 0);
    assert!(!r.estimated);
    assert!(r.fallback);
    assert!((r.cost_usd - 3.0 / 1e6).abs() < 1e-12, "{}", r.cost_usd);
    assert_eq!(r.attempts.len(), 2);
    assert_eq!(
        r.attempts[0].prompt_tokens, 0,
        "the failed attempt used nothing"
    );
    assert_eq!(r.attempts[1].prompt_tokens, 3);
    // A failed request is recorded too.
    b.set_behavior(Behavior::status(500));
    a.set_behavior(Behavior::status(500));
    gw.embed(EmbeddingRequest::new("grp", "x"))
        .await
        .unwrap_err();
    let records = sink.0.lock().unwrap().clone();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].status, 502);
    assert_eq!(records[1].prompt_tokens, 0);
}

#[tokio::test]
async fn tpm_limit_reserves_the_inputs_tokens_and_no_output() {
    let (a, b) = pair().await;
    // 40 tokens per minute on `a`.
    let gw = gateway(&a, &b, "tpm_limit: 40", "");
    // About 50 tokens ("word " is one token in cl100k_base): more than a's bucket holds.
    let big = "word ".repeat(50);
    let done = gw
        .embed(EmbeddingRequest::new("grp", big.as_str()))
        .await
        .unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(done.attempts[0].model, "a");
    assert_eq!(done.attempts[0].outcome, "token_bucket");
    assert_eq!(a.embedding_requests(), 0);
    // A small input fits: no output reserve is added for embeddings (a chat request
    // reserves 512 more tokens, which a 40-token bucket never holds).
    let done = gw
        .embed(EmbeddingRequest::new("grp", "a few words"))
        .await
        .unwrap();
    assert_eq!(done.model, "a");
    let chat = gw
        .chat(ChatCompletionRequest::new(
            "grp",
            vec![ChatMessage::new(Role::User, "a few words")],
        ))
        .await
        .unwrap();
    assert_eq!(chat.model, "b", "chat reserves the output cap too");
}

#[tokio::test]
async fn the_context_window_applies_to_each_input() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "context_window: 16", "context_window: 16");
    // Many inputs, each small: they fit although their sum does not.
    let many: Vec<String> = (0..10).map(|i| format!("input number {i}")).collect();
    let done = gw.embed(EmbeddingRequest::new("grp", many)).await.unwrap();
    assert_eq!(done.response.data.len(), 10);
    // One input too large for every model: refused before sending, naming `input`.
    let e = gw
        .embed(EmbeddingRequest::new(
            "grp",
            vec!["short".to_owned(), "word ".repeat(40)],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(e.code(), Some("context_length_exceeded"));
    assert_eq!(a.embedding_requests() + b.embedding_requests(), 1);
}

#[tokio::test]
async fn an_unknown_route_and_an_empty_input_are_refused() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "", "");
    let e = gw
        .embed(EmbeddingRequest::new("nope", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 404);
    let e = gw
        .embed(EmbeddingRequest::new("grp", Vec::<String>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(a.embedding_requests(), 0);
}

#[tokio::test]
async fn a_400_from_the_provider_is_the_clients_fault_and_stops() {
    let (a, b) = pair().await;
    let gw = gateway(&a, &b, "", "");
    a.push_behavior(Behavior::status(400));
    let e = gw
        .embed(EmbeddingRequest::new("grp", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(
        b.embedding_requests(),
        0,
        "no failover for the request's own fault"
    );
}

#[tokio::test]
async fn an_llm_handle_embeds_on_its_route() {
    let (a, b) = pair().await;
    let gw = Arc::new(gateway(&a, &b, "", ""));
    let handle = gw.llm("b").unwrap();
    let done = handle
        .embed(EmbeddingRequest::new("ignored", "x"))
        .await
        .unwrap();
    assert_eq!(done.model, "b");
}

/// A wire without embeddings (here Anthropic's, once it is built) is passed over
/// without a call: its breaker and buckets see nothing, the next model answers, and a
/// route of such models alone is a 400 that says so.
#[tokio::test]
async fn a_chat_only_wire_is_passed_over() {
    let b = upstream("alias-b", "key-b").await;
    let yaml = format!(
        r#"
providers:
  claude: {{ base_url: "http://127.0.0.1:9", api: anthropic, api_keys: ["k"] }}
  pb: {{ base_url: "{}", api_keys: ["key-b"] }}
models:
  c: {{ provider: claude, model: claude-x, circuit_breaker: {{ failure_threshold: 1 }} }}
  b: {{ provider: pb, model: emb-b }}
task_groups:
  grp:
    echelon1: {{ models: [c] }}
    echelon2: {{ models: [b] }}
  only_c:
    echelon1: {{ models: [c] }}
"#,
        b.base_url()
    );
    // The Anthropic wire serves chat only.
    let config = Config::from_str(&yaml, "test.yaml").unwrap();
    let gw = Gateway::from_config(&config).unwrap();
    let done = gw.embed(EmbeddingRequest::new("grp", "x")).await.unwrap();
    assert_eq!(done.model, "b");
    assert_eq!(
        kinds(&done.attempts),
        pairs(&[("c", "not_found"), ("b", "ok")])
    );
    assert_eq!(gw.model("c").unwrap().breaker().snapshot().state, "closed");
    let e = gw
        .embed(EmbeddingRequest::new("only_c", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.status(), 400);
    assert_eq!(e.code(), Some("embeddings_not_supported"));
    assert!(
        e.message().contains("does not serve embeddings"),
        "{}",
        e.message()
    );
}

/// The real thing: llama-server with `--embeddings --pooling mean` behind a task group
/// whose echelon1 is dead; the same server still answers chat.
#[tokio::test]
async fn a_real_llama_server_embeds_behind_a_failover_and_still_chats() {
    if let Err(why) = echelon_testkit::real::locate() {
        assert!(
            !echelon_testkit::real::required(),
            "the real upstream is required: {why}"
        );
        eprintln!("SKIPPED: real upstream not installed: {why}");
        return;
    }
    let server = echelon_testkit::real::LlamaServer::start_embeddings("emb-real", "emb-key")
        .await
        .unwrap();
    let yaml = format!(
        r#"
providers:
  dead: {{ base_url: "http://127.0.0.1:9/v1" }}
  real: {{ base_url: "{}", api_keys: ["emb-key"] }}
models:
  gone: {{ provider: dead, max_retries: 0 }}
  smol: {{ provider: real, model: smollm2, timeout: 60 }}
task_groups:
  grp:
    echelon1: {{ models: [gone] }}
    echelon2: {{ models: [smol] }}
"#,
        server.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    let done = gw
        .embed(EmbeddingRequest::new(
            "grp",
            vec!["red apples", "red apples", "taxes"],
        ))
        .await
        .unwrap();
    assert_eq!(done.model, "smol");
    assert_eq!(done.attempts[0].outcome, "connect");
    let v: Vec<Vec<f32>> = done
        .response
        .data
        .iter()
        .map(|d| floats(&d.embedding))
        .collect();
    assert_eq!(v.len(), 3);
    assert!(v[0].len() > 16, "SmolLM2's hidden size, not a stub");
    let cosine = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    assert!(
        cosine(&v[0], &v[1]) > 0.9999,
        "the same text, the same vector"
    );
    assert!(cosine(&v[0], &v[2]) < 0.9999);
    assert!(done.response.usage.as_ref().unwrap().prompt_tokens > 0);
    let chat = gw
        .chat(ChatCompletionRequest {
            max_tokens: Some(4),
            ..ChatCompletionRequest::new("grp", vec![ChatMessage::new(Role::User, "hi")])
        })
        .await
        .unwrap();
    assert_eq!(chat.model, "smol");
    assert!(chat.response.first_text().is_some());
}

#[tokio::test]
async fn an_abandoned_embeddings_request_is_recorded_as_499_with_its_prompt() {
    let (a, b) = pair().await;
    let sink = Arc::new(Collect::default());
    let gw = gateway(&a, &b, "", "").with_record_sink(sink.clone());
    a.set_behavior(Behavior::Stall);
    let call = gw.embed(EmbeddingRequest::new("grp", ["word"; 10].join(" ")));
    // The client goes away while the call is in flight.
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), call)
            .await
            .is_err()
    );
    gw.shutdown().await;
    let records = sink.0.lock().unwrap().clone();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].status, 499);
    assert!(records[0].estimated);
    assert_eq!(
        records[0].prompt_tokens, 10,
        "the inputs, counted: the provider may bill them"
    );
    assert_eq!(records[0].attempts[0].outcome.to_string(), "cancelled");
}
