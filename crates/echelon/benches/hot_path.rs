//! Per-request cost of each resilience layer on the hot path, and of the layers together
//! (DESIGN.md §7; issue: "the layers together add under 5 µs per request").
//!
//! Run: `cargo bench -p echelon --bench hot_path`
#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use divan::Bencher;
use echelon::key::ApiKey;
use echelon::resilience::breaker::{BreakerSettings, CircuitBreaker};
use echelon::resilience::concurrency::ConcurrencyLimit;
use echelon::resilience::key_pool::KeyPool;
use echelon::resilience::retry_budget::RetryBudget;
use echelon::resilience::token_bucket::TokenBucket;
use echelon_types::{ChatMessage, Role};
use secrecy::SecretString;

fn main() {
    divan::main();
}

fn pool() -> std::sync::Arc<KeyPool> {
    KeyPool::new(
        "bench",
        (0..3)
            .map(|i| ApiKey::new(SecretString::from(format!("sk-bench-{i}"))))
            .collect(),
    )
}

/// A bucket that never runs dry at bench speed.
fn bucket() -> TokenBucket {
    TokenBucket::new(1e12, 1e12)
}

#[divan::bench]
fn token_bucket_try_acquire(b: Bencher) {
    let bucket = bucket();
    b.bench_local(|| divan::black_box(bucket.try_acquire(1.0)));
}

#[divan::bench]
fn key_pool_acquire_release(b: Bencher) {
    let pool = pool();
    b.bench_local(|| drop(divan::black_box(pool.acquire(&[]).unwrap())));
}

#[divan::bench]
fn breaker_check_and_record(b: Bencher) {
    let breaker = CircuitBreaker::new("bench", BreakerSettings::default());
    b.bench_local(|| {
        let permit = breaker.try_acquire().unwrap();
        breaker.record(permit, true);
    });
}

#[divan::bench]
fn retry_budget_deposit(b: Bencher) {
    let budget = RetryBudget::new(0.2, Duration::from_secs(10), 1.0);
    b.bench_local(|| budget.deposit());
}

#[divan::bench]
fn concurrency_acquire_release(b: Bencher) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let limit = ConcurrencyLimit::new(64);
    b.bench_local(|| rt.block_on(async { drop(limit.acquire(Duration::ZERO).await.unwrap()) }));
}

/// Every layer in the order a request passes them: breaker → request bucket → tpm bucket
/// → concurrency → key pool → retry budget, then the outcome recorded and everything
/// released. No tiktoken count (see `prompt_tokens_*`: it runs only with `tpm_limit`).
#[divan::bench]
fn all_layers(b: Bencher) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let breaker = CircuitBreaker::new("bench", BreakerSettings::default());
    let rpm = bucket();
    let tpm = bucket();
    let limit = ConcurrencyLimit::new(64);
    let pool = pool();
    let budget = RetryBudget::new(0.2, Duration::from_secs(10), 1.0);
    b.bench_local(|| {
        rt.block_on(async {
            let permit = breaker.try_acquire().unwrap();
            rpm.acquire(1.0, Duration::ZERO).await.unwrap();
            tpm.acquire(600.0, Duration::ZERO).await.unwrap();
            let slot = limit.acquire(Duration::ZERO).await.unwrap();
            let lease = pool.acquire(&[]).unwrap();
            budget.deposit();
            breaker.record(permit, true);
            tpm.refund(500.0);
            drop((slot, lease));
        })
    });
}

/// The tiktoken count a `tpm_limit` model pays per request, for a short and a 2 KB prompt.
#[divan::bench(args = [40, 2000])]
fn prompt_tokens_cl100k(b: Bencher, chars: usize) {
    let text: String = "the quick brown fox jumps over the lazy dog "
        .chars()
        .cycle()
        .take(chars)
        .collect();
    let messages = vec![ChatMessage::new(Role::User, text)];
    echelon::tokens::prompt_tokens(&messages); // build the encoder outside the timing
    b.bench_local(|| divan::black_box(echelon::tokens::prompt_tokens(&messages)));
}

/// Parsing and checking a typical request body (the gateway's first step).
#[divan::bench]
fn parse_request(b: Bencher) {
    let body = br#"{"model":"demo_group","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Name three colours."}],"max_tokens":64,"temperature":0,"stream":false}"#;
    b.bench_local(|| divan::black_box(echelon_types::parse_request(body).unwrap()));
}

/// A llama.cpp-style answer (with its `timings` extra), as a provider sends it.
const ANSWER: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1795000000,"model":"smollm2","choices":[{"index":0,"message":{"role":"assistant","content":"Red, green and blue."},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"completion_tokens":6,"total_tokens":27},"timings":{"prompt_n":21,"prompt_ms":4.2,"predicted_n":6,"predicted_ms":11.8}}"#;

#[divan::bench]
fn answer_parse(b: Bencher) {
    b.bench_local(|| {
        divan::black_box(serde_json::from_slice::<echelon_types::ChatCompletion>(ANSWER).unwrap())
    });
}

#[divan::bench]
fn answer_serialise(b: Bencher) {
    let answer: echelon_types::ChatCompletion = serde_json::from_slice(ANSWER).unwrap();
    b.bench_local(|| divan::black_box(serde_json::to_vec(&answer).unwrap()));
}

fn sample_record(i: u64) -> echelon::usage::record::RequestRecord {
    use echelon::usage::record::{AttemptRecord, RequestRecord};
    RequestRecord {
        request_id: format!("{i:016x}"),
        started_at_unix_ms: 1_795_000_000_000 + i,
        route: "fast_group".into(),
        model: Some("gpt-4o-mini".into()),
        provider: Some("openai".into()),
        status: 200,
        stream: false,
        endpoint: Default::default(),
        latency_ms: 230,
        ttft_ms: None,
        prompt_tokens: 120,
        completion_tokens: 40,
        cost_usd: 0.000_042,
        estimated: false,
        fallback: false,
        no_finish_reason: false,
        stream_anomalies: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        attempts: vec![AttemptRecord {
            model: "gpt-4o-mini".into(),
            provider: "openai".into(),
            key_id: Some("9f86d081".into()),
            status: Some(200),
            outcome: echelon_types::Outcome::Ok,
            latency_ms: 229,
            prompt_tokens: 120,
            completion_tokens: 40,
            cost_usd: 0.000_042,
            estimated: false,
        }],
    }
}

/// The ledger writer's cost per request (one request row + one attempt row), written in
/// batches of 256 as the writer thread does.
#[divan::bench(sample_count = 20)]
fn ledger_insert_per_request(b: Bencher) {
    let dir = tempfile::tempdir().unwrap();
    let mut ledger = echelon::usage::ledger::Ledger::open(&dir.path().join("l.db")).unwrap();
    let batch: Vec<_> = (0..256).map(sample_record).collect();
    b.counter(divan::counter::ItemsCount::new(256usize))
        .bench_local(|| ledger.insert(&batch).unwrap());
}

/// Building the metrics of one request through the `metrics` facade (no recorder
/// installed here: the facade's own cost; the Prometheus recorder adds its hashing).
#[divan::bench]
fn metrics_observe_no_recorder(b: Bencher) {
    let rec = sample_record(1);
    b.bench_local(|| echelon::usage::metrics::observe(divan::black_box(&rec)));
}
