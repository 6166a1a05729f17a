//! Turning successful results into HTTP responses, and the `x-echelon-*` headers every
//! answer carries (errors are [`ApiError`](crate::error::ApiError)).

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use echelon_types::Attempt;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::error::ApiError;

/// A serialised JSON response.
///
/// # Errors
/// A 500 [`ApiError`] if `value` does not serialise (a map with non-string keys).
pub(crate) fn json_response<T: serde::Serialize>(
    status: StatusCode,
    value: &T,
) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| ApiError::internal(format!("response serialisation failed: {e}")))?;
    Ok((
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        Body::from(bytes),
    )
        .into_response())
}

/// Adds `x-echelon-attempts: model:kind:status:latency_ms, …`.
pub(crate) fn put_attempts(headers: &mut HeaderMap, attempts: &[Attempt]) {
    let text = attempts
        .iter()
        .map(|a| {
            format!(
                "{}:{}:{}:{}ms",
                a.model,
                a.outcome,
                a.status.map_or_else(|| "-".to_owned(), |s| s.to_string()),
                a.latency_ms
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = HeaderValue::from_str(&text) {
        headers.insert("x-echelon-attempts", v);
    }
}

/// Adds `x-echelon-model` and `x-echelon-attempts`.
pub(crate) fn put_route_headers(headers: &mut HeaderMap, model: &str, attempts: &[Attempt]) {
    if let Ok(v) = HeaderValue::from_str(model) {
        headers.insert("x-echelon-model", v);
    }
    put_attempts(headers, attempts);
}

/// The gateway's own time in a routed answer, in whole milliseconds: the time since
/// `arrived` (the handler got the request, its body read) minus the attempts' upstream
/// latencies (`latency_ms`, each call from sending to its answer, or for a stream's
/// answering attempt to its first content chunk), never below 0.
pub(crate) fn overhead_ms(arrived: std::time::Instant, attempts: &[Attempt]) -> u64 {
    let elapsed = u64::try_from(arrived.elapsed().as_millis()).unwrap_or(u64::MAX);
    let upstream = attempts
        .iter()
        .fold(0u64, |sum, a| sum.saturating_add(a.latency_ms));
    elapsed.saturating_sub(upstream)
}

/// Adds `x-echelon-overhead-ms` ([`overhead_ms`]).
pub(crate) fn put_overhead(
    headers: &mut HeaderMap,
    arrived: std::time::Instant,
    attempts: &[Attempt],
) {
    headers.insert(
        "x-echelon-overhead-ms",
        HeaderValue::from(overhead_ms(arrived, attempts)),
    );
}
