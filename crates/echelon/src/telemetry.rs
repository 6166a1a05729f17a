//! Traces of requests and their attempts (issue 18, `telemetry:`).
//!
//! The library builds the **attempt** spans (one per call to a model, a child of the
//! request's span, with the GenAI semantic conventions' attributes) and sends each
//! call's W3C `traceparent` upstream; the server builds the request span, runs the
//! request with its [`Context`] attached (`opentelemetry::context::FutureExt`), and
//! hands the SDK's tracer to [`install`]. Until then (telemetry off, the default) no span
//! is built and no header added: [`attempt_span`] returns [`TraceSpan::none`] after one
//! atomic load (the tracer's `OnceLock`).
//!
//! The spans are built with the OpenTelemetry API directly, not through `tracing` and
//! `tracing-opentelemetry`: that path cost about 21 µs of CPU per request on the bench
//! machine (the registry, the layer's span builders and every `record`), against a few
//! for the SDK's own spans (BENCHMARKS.md, "Telemetry").
//!
//! Sampling is decided once per request, at the edge (`echelon_server::telemetry`): a
//! request left out runs inside [`unsampled`] and builds no span at all, so a low
//! `sample_ratio` lowers the cost, not only the volume.

use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;

/// The tracer spans are built with ([`install`]); telemetry is on once it is set.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

tokio::task_local! {
    /// Set over a request the server decided not to trace (head sampling: an unsampled
    /// caller's trace, or a new trace `sample_ratio` leaves out): its attempts build no
    /// span. Holds the caller's `traceparent`, passed upstream unchanged so that the
    /// decision travels with the trace (W3C Trace Context).
    static UNSAMPLED: Option<http::HeaderValue>;
}

/// Turns the building of spans (and the upstream `traceparent`) on, with `tracer` (the
/// server's, exporting over OTLP). The first tracer installed stays for the process.
pub fn install(tracer: SdkTracer) {
    let _ = TRACER.set(tracer);
}

/// The installed tracer, when telemetry is on.
#[inline]
pub fn tracer() -> Option<&'static SdkTracer> {
    TRACER.get()
}

/// Whether spans are built for export ([`install`]).
#[inline]
pub fn enabled() -> bool {
    TRACER.get().is_some()
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

/// One exported span (the [`Context`] that holds it), or none: telemetry off or the
/// request unsampled. The span ends when the last clone of its context is dropped, so
/// whoever holds a stream's span holds it open until the stream's end.
#[derive(Debug, Clone, Default)]
pub struct TraceSpan(Option<Context>);

impl TraceSpan {
    /// No span: every record is a no-op.
    pub fn none() -> Self {
        TraceSpan(None)
    }

    /// `span`, started, in a context of its own (its parent's entries kept).
    pub fn started(parent: &Context, span: opentelemetry_sdk::trace::Span) -> Self {
        TraceSpan(Some(parent.with_span(span)))
    }

    /// The current context's span (the request's inside the server's handler), or none
    /// when the request is not [`traced`].
    pub fn current() -> Self {
        if traced() {
            TraceSpan(Some(Context::current()))
        } else {
            TraceSpan(None)
        }
    }

    /// Whether there is no span.
    pub fn is_none(&self) -> bool {
        self.0.is_none()
    }

    /// The context holding the span, to attach while its work is polled.
    pub fn context(&self) -> Option<&Context> {
        self.0.as_ref()
    }

    /// Sets one attribute.
    pub fn set(&self, attribute: KeyValue) {
        if let Some(cx) = &self.0 {
            cx.span().set_attribute(attribute);
        }
    }

    /// Renames the span.
    pub fn rename(&self, name: String) {
        if let Some(cx) = &self.0 {
            cx.span().update_name(name);
        }
    }

    /// Marks the span failed (status `ERROR`).
    pub fn fail(&self) {
        if let Some(cx) = &self.0 {
            cx.span().set_status(Status::error(""));
        }
    }
}

/// The span of one call to `model` (`gen_ai.operation.name` = `operation`,
/// `chat` or `embeddings`) for the request routed as `route`: named
/// `{operation} {upstream model}` as the GenAI conventions say, of kind client, a child
/// of the current context's span (the request's); the route as the client wrote it, cut
/// to the length the gateway echoes. Recorded later: `gen_ai.response.model`,
/// `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens`, `error.type`,
/// `echelon.attempt.kind`, `echelon.key_id`, `http.response.status_code`.
/// [`TraceSpan::none`] when telemetry is off or the request unsampled.
pub(crate) fn attempt_span(
    operation: &'static str,
    route: &str,
    model_id: &str,
    provider: &str,
    upstream_model: &str,
    attempt: u32,
) -> TraceSpan {
    let Some(tracer) = tracer().filter(|_| traced()) else {
        return TraceSpan::none();
    };
    let parent = Context::current();
    let span = tracer
        .span_builder(format!("{operation} {upstream_model}"))
        .with_kind(SpanKind::Client)
        .with_attributes([
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", provider.to_owned()),
            KeyValue::new("gen_ai.request.model", upstream_model.to_owned()),
            KeyValue::new(
                "echelon.route",
                echelon_types::bounded_name(route).into_owned(),
            ),
            KeyValue::new("echelon.model", model_id.to_owned()),
            KeyValue::new("echelon.attempt", i64::from(attempt)),
        ])
        .start_with_context(tracer, &parent);
    TraceSpan::started(&parent, span)
}

/// Records the id of the attempt's key on its span (the short id, never the key).
pub(crate) fn record_key(span: &TraceSpan, key_id: &str) {
    if !span.is_none() {
        span.set(KeyValue::new("echelon.key_id", key_id.to_owned()));
    }
}

/// Records a finished attempt on its span: its kind (`ok`, or the failure's kind, also
/// its `error.type`) and the HTTP status.
pub(crate) fn record_outcome(
    span: &TraceSpan,
    outcome: echelon_types::Outcome,
    status: Option<u16>,
) {
    if span.is_none() {
        return;
    }
    span.set(KeyValue::new("echelon.attempt.kind", outcome.as_str()));
    if let Some(s) = status {
        span.set(KeyValue::new("http.response.status_code", i64::from(s)));
    }
    if outcome != echelon_types::Outcome::Ok {
        span.set(KeyValue::new("error.type", outcome.as_str()));
        span.fail();
    }
}

/// Records what the answer says on `span`: the model that answered and the tokens.
pub fn record_usage(
    span: &TraceSpan,
    response_model: Option<&str>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
) {
    if span.is_none() {
        return;
    }
    if let Some(m) = response_model {
        span.set(KeyValue::new("gen_ai.response.model", m.to_owned()));
    }
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    if let Some(n) = input_tokens {
        span.set(KeyValue::new("gen_ai.usage.input_tokens", count(n)));
    }
    if let Some(n) = output_tokens {
        span.set(KeyValue::new("gen_ai.usage.output_tokens", count(n)));
    }
}

/// A candidate passed over without a call, as an event `candidate skipped` on the
/// current context's span (the request's), with `model`, `provider` and `kind` (the
/// skip's reason, e.g. `circuit_open`).
pub(crate) fn skipped(model_id: &str, provider: &str, reason: &'static str) {
    if !traced() {
        return;
    }
    Context::map_current(|cx| {
        cx.span().add_event(
            "candidate skipped",
            vec![
                KeyValue::new("model", model_id.to_owned()),
                KeyValue::new("provider", provider.to_owned()),
                KeyValue::new("kind", reason),
            ],
        );
    });
}

/// `req` with the W3C `traceparent` (and `tracestate`) of the current context's span,
/// the attempt's, when telemetry is on; in an [`unsampled`] request, the caller's
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
    let mut headers = http::HeaderMap::new();
    Context::map_current(|cx| {
        TraceContextPropagator::new().inject_context(cx, &mut Injector(&mut headers));
    });
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
        assert!(tracer().is_none());
        let span = attempt_span("chat", "route", "m", "p", "up", 1);
        assert!(span.is_none());
        record_key(&span, "abcd1234");
        record_usage(&span, Some("up"), Some(1), Some(2));
        let req = propagate(reqwest::Client::new().get("http://127.0.0.1:1/"));
        let built = req.build().unwrap_or_else(|e| panic!("{e}"));
        assert!(built.headers().get("traceparent").is_none());
    }
}
