//! Prometheus-style metrics through the [`metrics`] facade (DESIGN.md §3: "usage and cost
//! are recorded once per request, with every attempt, into the ledger and the metrics").
//!
//! The library only *records*; which exporter renders the figures is the binary's choice
//! (`echelon-server` installs a Prometheus recorder and serves `GET /metrics`). With no
//! recorder installed every call here is a cheap no-op.
//!
//! - [`observe`]: one finished request ([`RequestRecord`]) → counters and histograms;
//! - [`observe_state`]: the router's live state ([`Gateway::admin_state`]) → gauges, at
//!   scrape time;
//! - [`observe_ledger_queue`]: the ledger writer's queue depth → a gauge;
//! - [`describe`]: help text and units for every metric, once the recorder is installed;
//! - [`METRIC_NAMES`]: every metric name, for tooling (the alert-rule test checks each
//!   `echelon_*` name an alert uses is one of them).
//!
//! Labels are low-cardinality: route, model, provider, pool, key pool and key *id* (a
//! short hash, never the key), status code and error kind. Never a request id or prompt.
//!
//! Cost is a float: the `metrics` facade's counters are `u64`, so
//! `echelon_cost_usd_total` is a gauge that only ever goes up (incremented by each
//! request's cost). It is exported with `# TYPE ... gauge`, and `rate()`/`increase()`
//! work on it exactly as on a counter while the process lives.
//!
//! [`Gateway::admin_state`]: crate::Gateway::admin_state

use echelon_types::Outcome;
use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use super::record::RequestRecord;
use crate::routing::{AdminState, KeyStateView};

/// `echelon_requests_total{route, model, status}`: finished requests.
pub const REQUESTS_TOTAL: &str = "echelon_requests_total";
/// `echelon_fallback_requests_total{route}`: requests that moved past their first model.
pub const FALLBACK_REQUESTS_TOTAL: &str = "echelon_fallback_requests_total";
/// `echelon_request_duration_seconds{route}`: wall time of a request.
pub const REQUEST_DURATION_SECONDS: &str = "echelon_request_duration_seconds";
/// `echelon_time_to_first_token_seconds{route, model}`: streams' time to first content.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "echelon_time_to_first_token_seconds";
/// `echelon_attempts_total{model, provider, kind}`: attempts, calls and skips.
pub const ATTEMPTS_TOTAL: &str = "echelon_attempts_total";
/// `echelon_attempt_duration_seconds{model, provider}`: wall time of a call (not skips).
pub const ATTEMPT_DURATION_SECONDS: &str = "echelon_attempt_duration_seconds";
/// `echelon_tokens_total{model, type}`: prompt and completion tokens.
pub const TOKENS_TOTAL: &str = "echelon_tokens_total";
/// `echelon_cost_usd_total{model}`: cost in USD (a gauge that only goes up).
pub const COST_USD_TOTAL: &str = "echelon_cost_usd_total";
/// `echelon_fallbacks_total{route, from, to, reason}`: moves from one model to another.
pub const FALLBACKS_TOTAL: &str = "echelon_fallbacks_total";
/// `echelon_breaker_state{model}`: 0 closed, 1 half-open, 2 open.
pub const BREAKER_STATE: &str = "echelon_breaker_state";
/// `echelon_key_state{key_pool, key_id, state}`: 1 for the key's current state, else 0.
pub const KEY_STATE: &str = "echelon_key_state";
/// `echelon_key_in_flight{key_pool, key_id}`: requests holding the key.
pub const KEY_IN_FLIGHT: &str = "echelon_key_in_flight";
/// `echelon_model_in_flight{model}`: requests in flight on the model.
pub const MODEL_IN_FLIGHT: &str = "echelon_model_in_flight";
/// `echelon_pool_healthy_instances{pool}`: healthy instances of a polling pool.
pub const POOL_HEALTHY_INSTANCES: &str = "echelon_pool_healthy_instances";
/// `echelon_pool_instance_healthy{pool, model}`: 1 when the instance is in the rotation.
pub const POOL_INSTANCE_HEALTHY: &str = "echelon_pool_instance_healthy";
/// `echelon_ledger_queue_depth`: records waiting for the ledger writer.
pub const LEDGER_QUEUE_DEPTH: &str = "echelon_ledger_queue_depth";
/// `echelon_stream_no_finish_reason_total{route, model}`: streams delivered although no
/// chunk carried a `finish_reason` (ended by `[DONE]` alone; the answer may be cut).
pub const STREAM_NO_FINISH_REASON_TOTAL: &str = "echelon_stream_no_finish_reason_total";
/// `echelon_stream_anomalies_total{model, kind}`: anomalies of streams, by the model
/// that streamed; `kind="malformed_event"`: SSE events whose data was not a chunk
/// (skipped with `malformed_event: skip`, or the one that ended the stream).
pub const STREAM_ANOMALIES_TOTAL: &str = "echelon_stream_anomalies_total";

/// `echelon_state_backend_up`: 1 while the shared state backend (Redis) answers, 0
/// while this replica runs on its local fallback or rejects (absent with `memory`).
pub const STATE_BACKEND_UP: &str = crate::state::redis::STATE_BACKEND_UP;
/// `echelon_state_round_trip_seconds`: round trips to the shared state backend.
pub const STATE_ROUND_TRIP_SECONDS: &str = crate::state::redis::STATE_ROUND_TRIP_SECONDS;

/// Every metric this module records (what [`describe`] registers).
pub const METRIC_NAMES: &[&str] = &[
    REQUESTS_TOTAL,
    FALLBACK_REQUESTS_TOTAL,
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    ATTEMPTS_TOTAL,
    ATTEMPT_DURATION_SECONDS,
    TOKENS_TOTAL,
    COST_USD_TOTAL,
    FALLBACKS_TOTAL,
    BREAKER_STATE,
    KEY_STATE,
    KEY_IN_FLIGHT,
    MODEL_IN_FLIGHT,
    POOL_HEALTHY_INSTANCES,
    POOL_INSTANCE_HEALTHY,
    LEDGER_QUEUE_DEPTH,
    STREAM_NO_FINISH_REASON_TOTAL,
    STREAM_ANOMALIES_TOTAL,
    STATE_BACKEND_UP,
    STATE_ROUND_TRIP_SECONDS,
];

/// The histograms, for exporters that set buckets per metric.
pub const LATENCY_HISTOGRAMS: &[&str] = &[
    REQUEST_DURATION_SECONDS,
    TIME_TO_FIRST_TOKEN_SECONDS,
    ATTEMPT_DURATION_SECONDS,
    STATE_ROUND_TRIP_SECONDS,
];

/// The route label of a request: a client error with no attempt never reached the router
/// (the name may be anything a client typed), so it is folded into `_unrouted`.
fn route_label(rec: &RequestRecord) -> String {
    if rec.attempts.is_empty() && (400..500).contains(&rec.status) {
        "_unrouted".to_owned()
    } else {
        rec.route.clone()
    }
}

/// The kind as a label: the outcome's wire name, one of a fixed set ([`Outcome::all`]),
/// so a label never takes an unbounded set of values.
fn kind_label(outcome: Outcome) -> &'static str {
    outcome.as_str()
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// Records one finished request: its count, duration and time to first token; each
/// attempt (count by kind, duration of calls); tokens and cost per model; and one
/// fallback for each pair of consecutive attempts on different models (a request that
/// went a → b → c counts two; `echelon_fallback_requests_total` counts it once).
pub fn observe(rec: &RequestRecord) {
    let route = route_label(rec);
    let model = rec.model.clone().unwrap_or_default();
    counter!(REQUESTS_TOTAL,
        "route" => route.clone(), "model" => model.clone(), "status" => rec.status.to_string())
    .increment(1);
    histogram!(REQUEST_DURATION_SECONDS, "route" => route.clone()).record(secs(rec.latency_ms));
    if let Some(ttft) = rec.ttft_ms {
        histogram!(TIME_TO_FIRST_TOKEN_SECONDS, "route" => route.clone(), "model" => model.clone())
            .record(secs(ttft));
    }
    if rec.fallback {
        counter!(FALLBACK_REQUESTS_TOTAL, "route" => route.clone()).increment(1);
    }
    if rec.no_finish_reason {
        counter!(STREAM_NO_FINISH_REASON_TOTAL, "route" => route.clone(), "model" => model.clone())
            .increment(1);
    }
    if rec.stream_anomalies > 0 {
        counter!(STREAM_ANOMALIES_TOTAL, "model" => model.clone(), "kind" => "malformed_event")
            .increment(u64::from(rec.stream_anomalies));
    }

    let (mut prompt, mut completion, mut cost) = (0u64, 0u64, 0.0f64);
    for a in &rec.attempts {
        let kind = kind_label(a.outcome);
        counter!(ATTEMPTS_TOTAL,
            "model" => a.model.clone(), "provider" => a.provider.clone(), "kind" => kind)
        .increment(1);
        if a.outcome.is_call() {
            histogram!(ATTEMPT_DURATION_SECONDS,
                "model" => a.model.clone(), "provider" => a.provider.clone())
            .record(secs(a.latency_ms));
        }
        record_usage(&a.model, a.prompt_tokens, a.completion_tokens, a.cost_usd);
        prompt += a.prompt_tokens;
        completion += a.completion_tokens;
        cost += a.cost_usd;
    }
    // Figures the attempts do not account for (a record built without per-attempt usage)
    // go to the answering model.
    record_usage(
        &model,
        rec.prompt_tokens.saturating_sub(prompt),
        rec.completion_tokens.saturating_sub(completion),
        if rec.cost_usd > cost + 1e-12 {
            rec.cost_usd - cost
        } else {
            0.0
        },
    );

    for pair in rec.attempts.windows(2) {
        let (from, to) = (&pair[0], &pair[1]);
        if from.model != to.model {
            counter!(FALLBACKS_TOTAL,
                "route" => route.clone(),
                "from" => from.model.clone(),
                "to" => to.model.clone(),
                "reason" => kind_label(from.outcome))
            .increment(1);
        }
    }
}

fn record_usage(model: &str, prompt: u64, completion: u64, cost_usd: f64) {
    if prompt > 0 {
        counter!(TOKENS_TOTAL, "model" => model.to_owned(), "type" => "prompt").increment(prompt);
    }
    if completion > 0 {
        counter!(TOKENS_TOTAL, "model" => model.to_owned(), "type" => "completion")
            .increment(completion);
    }
    if cost_usd > 0.0 && cost_usd.is_finite() {
        gauge!(COST_USD_TOTAL, "model" => model.to_owned()).increment(cost_usd);
    }
}

/// Sets the gauges of the router's live state from a [`Gateway::admin_state`] snapshot
/// (call it just before rendering a scrape): each model's breaker state (0 closed,
/// 1 half-open, 2 open), in-flight count and keys (one series per key state, 1 for the
/// current one; in-flight), and each polling pool's healthy instances.
///
/// [`Gateway::admin_state`]: crate::Gateway::admin_state
pub fn observe_state(state: &AdminState) {
    if state.state.backend == "redis" {
        gauge!(STATE_BACKEND_UP).set(if state.state.up { 1.0 } else { 0.0 });
    }
    for (id, m) in &state.models {
        gauge!(BREAKER_STATE, "model" => id.clone()).set(m.breaker.state.gauge_value());
        gauge!(MODEL_IN_FLIGHT, "model" => id.clone()).set(f64::from(m.in_flight));
        for k in &m.keys {
            let current = k.state.name();
            for s in KeyStateView::NAMES {
                gauge!(KEY_STATE,
                    "key_pool" => m.key_pool.clone(), "key_id" => k.id.clone(), "state" => s)
                .set(if current == s { 1.0 } else { 0.0 });
            }
            gauge!(KEY_IN_FLIGHT, "key_pool" => m.key_pool.clone(), "key_id" => k.id.clone())
                .set(f64::from(k.in_flight));
        }
    }
    for (name, p) in &state.pools {
        gauge!(POOL_HEALTHY_INSTANCES, "pool" => name.clone()).set(p.healthy_instances as f64);
        for inst in &p.instances {
            gauge!(POOL_INSTANCE_HEALTHY, "pool" => name.clone(), "model" => inst.model.clone())
                .set(if inst.healthy { 1.0 } else { 0.0 });
        }
    }
}

/// Sets `echelon_ledger_queue_depth`: records waiting for the ledger writer.
pub fn observe_ledger_queue(depth: usize) {
    gauge!(LEDGER_QUEUE_DEPTH).set(depth as f64);
}

/// Registers help text and units for every metric in [`METRIC_NAMES`] with the installed
/// recorder (call it once, after installing one).
pub fn describe() {
    describe_gauge!(
        STATE_BACKEND_UP,
        "1 while the shared state backend (Redis) answers; 0 while this replica uses its \
         local fallback (state.on_unavailable: local) or rejects (reject)."
    );
    describe_histogram!(
        STATE_ROUND_TRIP_SECONDS,
        Unit::Seconds,
        "Round trips to the shared state backend (one Lua script each)."
    );
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Finished requests by route, answering model (empty when none answered) and HTTP status."
    );
    describe_counter!(
        FALLBACK_REQUESTS_TOTAL,
        Unit::Count,
        "Requests that moved past their first model (counted once however many moves)."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Wall time of a request, arrival to last byte."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Streams: time from arrival to the first content chunk."
    );
    describe_counter!(
        ATTEMPTS_TOTAL,
        Unit::Count,
        "Attempts by model, provider and kind: `ok`, a call's error kind, or a skip kind \
         (circuit_open, token_bucket, concurrency, key_cooldown, no_key, provider_failed, \
         context_window)."
    );
    describe_histogram!(
        ATTEMPT_DURATION_SECONDS,
        Unit::Seconds,
        "Wall time of a call to a provider (skips excluded)."
    );
    describe_counter!(
        TOKENS_TOTAL,
        Unit::Count,
        "Tokens consumed by model and type (prompt or completion)."
    );
    describe_gauge!(
        COST_USD_TOTAL,
        "Cost in USD by model; a float that only goes up (use rate/increase as on a counter)."
    );
    describe_counter!(
        FALLBACKS_TOTAL,
        Unit::Count,
        "Moves from one model to the next within a request, by the failed model's error kind."
    );
    describe_gauge!(
        BREAKER_STATE,
        "Circuit breaker state per model: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(
        KEY_STATE,
        "API key state per key id (never the key): 1 for the current state \
         (ok, cooling_down, disabled), 0 for the others."
    );
    describe_gauge!(
        KEY_IN_FLIGHT,
        Unit::Count,
        "Requests in flight holding the key."
    );
    describe_gauge!(
        MODEL_IN_FLIGHT,
        Unit::Count,
        "Requests in flight on the model."
    );
    describe_gauge!(
        POOL_HEALTHY_INSTANCES,
        Unit::Count,
        "Healthy instances of a polling pool."
    );
    describe_gauge!(
        POOL_INSTANCE_HEALTHY,
        "1 when the polling pool's instance is healthy (in the rotation), else 0."
    );
    describe_counter!(
        STREAM_NO_FINISH_REASON_TOTAL,
        Unit::Count,
        "Streams delivered although no chunk carried a finish_reason ([DONE] alone ended \
         them): the answer may be incomplete."
    );
    describe_counter!(
        STREAM_ANOMALIES_TOTAL,
        Unit::Count,
        "Stream anomalies by the model that streamed and kind; kind=malformed_event: SSE \
         events whose data was not a chunk (skipped with malformed_event: skip, or the one \
         that ended the stream)."
    );
    describe_gauge!(
        LEDGER_QUEUE_DEPTH,
        Unit::Count,
        "Records waiting for the usage ledger writer."
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::usage::record::AttemptRecord;

    fn attempt(model: &str, kind: &str) -> AttemptRecord {
        AttemptRecord {
            model: model.into(),
            provider: "p".into(),
            key_id: None,
            status: None,
            outcome: kind.parse().unwrap(),
            latency_ms: 3,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            estimated: false,
        }
    }

    fn record(status: u16, attempts: Vec<AttemptRecord>) -> RequestRecord {
        RequestRecord {
            request_id: "r".into(),
            started_at_unix_ms: 0,
            route: "typed by a client".into(),
            model: None,
            provider: None,
            status,
            stream: false,
            endpoint: Default::default(),
            latency_ms: 1,
            ttft_ms: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_usd: 0.0,
            estimated: false,
            fallback: false,
            no_finish_reason: false,
            stream_anomalies: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            attempts,
        }
    }

    #[test]
    fn unknown_kinds_and_unrouted_client_errors_keep_labels_bounded() {
        assert_eq!(kind_label("circuit_open".parse().unwrap()), "circuit_open");
        assert_eq!(kind_label("stream_cut".parse().unwrap()), "stream_cut");
        assert_eq!(route_label(&record(404, vec![])), "_unrouted");
        assert_eq!(route_label(&record(400, vec![])), "_unrouted");
        assert_eq!(
            route_label(&record(502, vec![attempt("a", "server_error")])),
            "typed by a client"
        );
    }

    #[test]
    fn metric_names_are_unique_and_prefixed() {
        let mut names = METRIC_NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), METRIC_NAMES.len());
        assert!(names.iter().all(|n| n.starts_with("echelon_")));
        assert!(LATENCY_HISTOGRAMS.iter().all(|h| METRIC_NAMES.contains(h)));
    }

    #[test]
    fn observing_without_a_recorder_is_a_no_op() {
        let mut rec = record(200, vec![attempt("a", "server_error"), attempt("b", "ok")]);
        rec.model = Some("b".into());
        observe(&rec);
        let mut state = AdminState::default();
        observe_state(&state);
        state.models.insert(
            "a".into(),
            crate::routing::ModelState {
                provider: "p".into(),
                upstream_model: "a".into(),
                breaker: crate::routing::BreakerView {
                    state: crate::routing::BreakerPhase::Open,
                    next_change_ms: Some(1000),
                    consecutive_failures: 5,
                    probes_in_flight: 0,
                    window_requests: 0,
                    window_failures: 0,
                    reason: None,
                },
                buckets: Vec::new(),
                in_flight: 0,
                concurrency_limit: None,
                key_pool: "provider p".into(),
                keys: vec![crate::routing::KeyView {
                    id: "abcd1234".into(),
                    in_flight: 0,
                    state: KeyStateView::Ok,
                    provider_rate_limits: None,
                }],
            },
        );
        observe_state(&state);
        observe_ledger_queue(3);
    }
}
