//! Traces of requests and their attempts (issue 18, `telemetry:`).
//!
//! The library builds the **attempt** spans (one per call to a model, a child of the
//! request's span, with the GenAI semantic conventions' attributes) and sends each
//! call's W3C `traceparent` upstream; the server builds the request span and installs
//! the OpenTelemetry layer that exports them (`echelon_server::telemetry`), then calls
//! [`set_enabled`]. Until then (telemetry off, the default) no span is built and no
//! header added: [`attempt_span`] returns [`Span::none`] after one relaxed atomic load.
//!
//! Sampling is decided once per request, at the edge (`echelon_server::telemetry`): a
//! request left out runs inside [`unsampled`] and builds no span at all, so a low
//! `sample_ratio` lowers the cost, not only the volume.
//!
//! The spans use the target [`TARGET`], which a log subscriber can filter out so that
//! they do not add context to log lines.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of the spans built for export (`echelon::otel`).
pub const TARGET: &str = "echelon::otel";

static ENABLED: AtomicBool = AtomicBool::new(false);

tokio::task_local! {
    /// Set over a request the server decided not to trace (head sampling: an unsampled
    /// caller's trace, or a new trace `sample_ratio` leaves out): its attempts build no
    /// span. Holds the caller's `traceparent`, passed upstream unchanged so that the
    /// decision travels with the trace (W3C Trace Context).
    static UNSAMPLED: Option<http::HeaderValue>;
}

/// `fut` (a request's work) with no span built for its attempts: see [`traced`]. The
/// upstream calls carry `traceparent` as given (the caller's, or none).
pub async fn unsampled<F: std::future::Future>(
    traceparent: Option<http::HeaderValue>,
    fut: F,
) -> F::Output {
    UNSAMPLED.scope(traceparent, fut).await
}

/// Whether the current request's spans are built: telemetry is on ([`enabled`]) and the
/// request is not inside [`unsampled`].
#[inline]
pub fn traced() -> bool {
    enabled() && UNSAMPLED.try_with(|_| ()).is_err()
}

/// Turns the building of spans for export (and the upstream `traceparent`) on or off;
/// the server turns it on once its OpenTelemetry layer is installed.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are built for export ([`set_enabled`]).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span of one call to `model` (`gen_ai.operation.name` = `operation`,
/// `chat` or `embeddings`) for the request routed as `route`: named
/// `{operation} {upstream model}` as the GenAI conventions say, of kind client; the
/// route as the client wrote it, cut to the length the gateway echoes. The
/// fields recorded later ([`Empty`](tracing::field::Empty) until then):
/// `gen_ai.response.model`, `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`,
/// `error.type`, `echelon.attempt.kind`, `echelon.key_id`, `http.response.status_code`.
/// [`Span::none`] when telemetry is off.
pub(crate) fn attempt_span(
    operation: &'static str,
    route: &str,
    model_id: &str,
    provider: &str,
    upstream_model: &str,
    attempt: u32,
) -> Span {
    if !traced() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "attempt",
        otel.name = format!("{operation} {upstream_model}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = provider,
        gen_ai.request.model = upstream_model,
        gen_ai.response.model = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        error.type = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        echelon.route = %echelon_types::bounded_name(route),
        echelon.model = model_id,
        echelon.attempt = attempt,
        echelon.attempt.kind = tracing::field::Empty,
        echelon.key_id = tracing::field::Empty,
    )
}

/// Records the id of the attempt's key on its span (the short id, never the key).
pub(crate) fn record_key(span: &Span, key_id: &str) {
    if !span.is_none() {
        span.record("echelon.key_id", key_id);
    }
}

/// Records a finished attempt on its span: its kind (`ok`, or the failure's kind, also
/// its `error.type`) and the HTTP status.
pub(crate) fn record_outcome(span: &Span, outcome: echelon_types::Outcome, status: Option<u16>) {
    if span.is_none() {
        return;
    }
    span.record("echelon.attempt.kind", outcome.as_str());
    if let Some(s) = status {
        span.record("http.response.status_code", s);
    }
    if outcome != echelon_types::Outcome::Ok {
        span.record("error.type", outcome.as_str());
        span.record("otel.status_code", "ERROR");
    }
}

/// Records what the answer says on `span`: the model that answered and the tokens.
pub fn record_usage(
    span: &Span,
    response_model: Option<&str>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
) {
    if span.is_none() {
        return;
    }
    if let Some(m) = response_model {
        span.record("gen_ai.response.model", m);
    }
    if let Some(n) = input_tokens {
        span.record("gen_ai.usage.input_tokens", n);
    }
    if let Some(n) = output_tokens {
        span.record("gen_ai.usage.output_tokens", n);
    }
}

/// A candidate passed over without a call, as an event `candidate skipped` on the
/// current span (the request's), with `model`, `provider` and `kind` (the skip's reason,
/// e.g. `circuit_open`).
pub(crate) fn skipped(model_id: &str, provider: &str, reason: &'static str) {
    if !traced() {
        return;
    }
    tracing::info!(
        target: TARGET,
        model = model_id,
        provider = provider,
        kind = reason,
        "candidate skipped"
    );
}

/// `req` with the W3C `traceparent` (and `tracestate`) of the current span, the
/// attempt's, when telemetry is on; in an [`unsampled`] request, the caller's
/// `traceparent` (if any) as it came; `req` as it is when telemetry is off.
pub(crate) fn propagate(req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    if !enabled() {
        return req;
    }
    if let Ok(passed) = UNSAMPLED.try_with(Clone::clone) {
        return match passed {
            Some(tp) => req.header("traceparent", tp),
            None => req,
        };
    }
    let cx = Span::current().context();
    let mut headers = http::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut Injector(&mut headers));
    req.headers(headers)
}

/// Writes propagation headers into an [`http::HeaderMap`].
struct Injector<'a>(&'a mut http::HeaderMap);

impl opentelemetry::propagation::Injector for Injector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off (the default): no span, no event, no header; nothing is formatted.
    #[test]
    fn off_builds_nothing() {
        assert!(!enabled());
        let span = attempt_span("chat", "route", "m", "p", "up", 1);
        assert!(span.is_none());
        record_key(&span, "abcd1234");
        record_usage(&span, Some("up"), Some(1), Some(2));
        let req = propagate(reqwest::Client::new().get("http://127.0.0.1:1/"));
        let built = req.build().unwrap_or_else(|e| panic!("{e}"));
        assert!(built.headers().get("traceparent").is_none());
    }
}
