//! Traces over OTLP/HTTP (issue 18, `telemetry:` in the config): the exporter, head
//! sampling, and the request span of a routed endpoint.
//!
//! The request span (`{operation} {route}`, kind server) is the parent of one span per
//! attempt (built by the library: [`echelon::telemetry`]); a request that arrives with a
//! W3C `traceparent` is traced under it, and each attempt sends its own upstream. Spans
//! are built with the OpenTelemetry API (not through `tracing`), batched and posted to
//! `{otlp_endpoint}/v1/traces` as protobuf by the SDK's batch processor (its own thread,
//! a blocking reqwest client over rustls).
//!
//! Off (no `telemetry.otlp_endpoint`) nothing is installed and
//! [`echelon::telemetry::enabled`] stays false: no span is built and no header read or
//! written.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use echelon::config::TelemetryConfig;
use echelon::telemetry::TraceSpan;
use opentelemetry::KeyValue;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt as _, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};

/// How long a finished span may wait in the batch before it is sent (the SDK's default
/// is 5 s); [`Telemetry::force_flush`] and [`Telemetry::shutdown`] send at once.
pub const BATCH_DELAY: Duration = Duration::from_secs(1);

/// Most time an export request may take before it is given up.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `telemetry.sample_ratio` of the running exporter, as `f64` bits (1.0 until started).
static SAMPLE_RATIO: AtomicU64 = AtomicU64::new(0x3FF0_0000_0000_0000);

/// Whether a new trace (no sampled or unsampled `traceparent` from the caller) is kept:
/// with probability `ratio` (0 never, 1 always), drawn from std's per-thread SipHash keys
/// (`RandomState`, a new state each call), which is enough for head sampling.
fn keep_new_trace(ratio: f64) -> bool {
    use std::hash::BuildHasher as _;
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let draw = std::collections::hash_map::RandomState::new().hash_one(0u8);
    // `as` saturates: ratio < 1 keeps the product below 2^64.
    draw < (ratio * 18_446_744_073_709_551_616.0) as u64
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a bad endpoint, no HTTP client).
    #[error("cannot start the OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// Where spans were to go.
        endpoint: String,
        /// What the exporter said.
        message: String,
    },
}

/// The running exporter: keep it while the server runs, then [`shutdown`](Self::shutdown)
/// to send the last spans.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Starts the exporter `config` asks for and turns span building on
    /// ([`echelon::telemetry::install`]); returns the handle that flushes it, `None` when
    /// telemetry is off (no `otlp_endpoint`). Call it once per process: the first tracer
    /// installed stays.
    ///
    /// Sampling is parent-based, decided
    /// per request before any span is built ([`request_trace`]): a request with a sampled
    /// `traceparent` is kept, one with an unsampled `traceparent` is not, a new trace is
    /// kept with probability `sample_ratio`.
    ///
    /// # Errors
    /// [`TelemetryError::Exporter`] when the exporter cannot be built.
    pub fn start(config: &TelemetryConfig) -> Result<Option<Telemetry>, TelemetryError> {
        let Some(url) = config.traces_url() else {
            return Ok(None);
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: url.clone(),
                message: e.to_string(),
            })?;
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(BATCH_DELAY)
                    .build(),
            )
            .build();
        // The ratio is applied at the edge ([`request_trace`]): a request it leaves out
        // builds no span at all. What reaches the SDK is kept.
        SAMPLE_RATIO.store(config.sample_ratio.to_bits(), Ordering::Relaxed);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batch)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .build(),
            )
            .build();
        echelon::telemetry::install(provider.tracer("echelon"));
        Ok(Some(Telemetry { provider }))
    }

    /// Sends every finished span now (blocks until the export is done or failed).
    ///
    /// # Errors
    /// The SDK's error text when the export failed.
    pub fn force_flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }

    /// Sends the last spans and stops the exporter (blocks; call it off the async
    /// workers, e.g. after the runtime is done).
    ///
    /// # Errors
    /// The SDK's error text when the last export failed.
    pub fn shutdown(&self) -> Result<(), String> {
        self.provider.shutdown().map_err(|e| e.to_string())
    }
}

/// How one routed request is traced.
#[derive(Debug)]
pub(crate) enum RequestTrace {
    /// Telemetry is off: nothing to build, attach or record.
    Off,
    /// Traced: its span.
    Traced(TraceSpan),
    /// Left out by sampling: run it inside [`echelon::telemetry::unsampled`] with the
    /// caller's `traceparent` (if any), to pass upstream unchanged.
    Unsampled(Option<http::HeaderValue>),
}

/// Head sampling and the span of one routed request. A valid caller `traceparent`
/// decides (its sampled flag: parent-based); a new trace is kept with probability
/// `sample_ratio`. A kept request's span is named `request` until the handler names it
/// `{operation} {route}`, kind server, child of the caller's span when it sent one.
pub(crate) fn request_trace(headers: &http::HeaderMap, request_id: &str) -> RequestTrace {
    let Some(tracer) = echelon::telemetry::tracer() else {
        return RequestTrace::Off;
    };
    let parent = TraceContextPropagator::new().extract(&Extractor(headers));
    let caller = parent.span().span_context().clone();
    let keep = if caller.is_valid() {
        caller.is_sampled()
    } else {
        keep_new_trace(f64::from_bits(SAMPLE_RATIO.load(Ordering::Relaxed)))
    };
    if !keep {
        let passed = caller
            .is_valid()
            .then(|| headers.get("traceparent").cloned())
            .flatten();
        return RequestTrace::Unsampled(passed);
    }
    // An invalid or missing traceparent leaves an empty parent: a new trace.
    let span = tracer
        .span_builder("request")
        .with_kind(SpanKind::Server)
        .with_attributes([KeyValue::new("echelon.request_id", request_id.to_owned())])
        .start_with_context(tracer, &parent);
    RequestTrace::Traced(TraceSpan::started(&parent, span))
}

/// Names the current request span `{operation} {route}` and records what the request
/// asked, the route as the client wrote it bounded by `echelon_types::bounded_name`
/// (no-op when the request is not traced).
pub(crate) fn record_request(operation: &'static str, route: &str) {
    let span = TraceSpan::current();
    if span.is_none() {
        return;
    }
    let route = echelon_types::bounded_name(route).into_owned();
    span.rename(format!("{operation} {route}"));
    span.set(KeyValue::new("gen_ai.operation.name", operation));
    span.set(KeyValue::new("gen_ai.request.model", route.clone()));
    span.set(KeyValue::new("echelon.route", route));
}

/// Records on the current request span the model id that answered, the model the
/// answer names and its tokens (no-op when the request is not traced).
pub(crate) fn record_answer(
    model_id: &str,
    response_model: Option<&str>,
    usage: Option<&echelon_types::Usage>,
) {
    let span = TraceSpan::current();
    if span.is_none() {
        return;
    }
    span.set(KeyValue::new("echelon.model", model_id.to_owned()));
    echelon::telemetry::record_usage(
        &span,
        response_model,
        usage.map(|u| u.prompt_tokens),
        usage.map(|u| u.completion_tokens),
    );
}

/// Records the response's status on the request `span`: `error.type` is the status code
/// for a 4xx or 5xx (the HTTP semantic conventions' rule), a 5xx also marks it an error.
pub(crate) fn record_status(span: &TraceSpan, status: http::StatusCode) {
    if span.is_none() {
        return;
    }
    span.set(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if status.is_client_error() || status.is_server_error() {
        span.set(KeyValue::new("error.type", status.as_str().to_owned()));
    }
    if status.is_server_error() {
        span.fail();
    }
}

/// `body` polled with the request's context attached, which it holds until its last
/// chunk (a stream's request span ends with the stream; a continuation's attempts are
/// its children).
pub(crate) fn body_in_span(body: axum::body::Body, span: TraceSpan) -> axum::body::Body {
    use futures::StreamExt;
    use opentelemetry::context::FutureExt as _;
    let Some(cx) = span.context().cloned() else {
        return body;
    };
    let stream = body.into_data_stream();
    axum::body::Body::from_stream(futures::stream::unfold(
        (stream, cx),
        |(mut stream, cx)| async move {
            let next = stream.next().with_context(cx.clone()).await?;
            Some((next, (stream, cx)))
        },
    ))
}

/// `body` polled inside [`echelon::telemetry::unsampled`] (a stream's continuation
/// attempts, made while it is polled, build no span either).
pub(crate) fn body_unsampled(
    body: axum::body::Body,
    traceparent: Option<http::HeaderValue>,
) -> axum::body::Body {
    use futures::StreamExt;
    let stream = body.into_data_stream();
    axum::body::Body::from_stream(futures::stream::unfold(
        (stream, traceparent),
        |(mut stream, tp)| async move {
            let next = echelon::telemetry::unsampled(tp.clone(), stream.next()).await?;
            Some((next, (stream, tp)))
        },
    ))
}

/// Reads propagation headers from an [`http::HeaderMap`].
struct Extractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for Extractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::keep_new_trace;

    #[test]
    fn a_new_trace_is_kept_at_the_configured_ratio() {
        assert!((0..1000).all(|_| keep_new_trace(1.0)));
        assert!((0..1000).all(|_| !keep_new_trace(0.0)));
        assert!((0..1000).all(|_| !keep_new_trace(f64::NAN)));
        let kept = (0..20_000).filter(|_| keep_new_trace(0.25)).count();
        // 0.25 × 20,000 = 5,000; its binomial sd is about 61.
        assert!((4_600..=5_400).contains(&kept), "{kept}");
    }
}
