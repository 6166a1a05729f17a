//! Turning results into HTTP responses.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use echelon::GatewayError;
use echelon_types::{Attempt, ErrorBody};
use http::{HeaderMap, HeaderValue, StatusCode};

/// A JSON response with the OpenAI error body.
pub(crate) fn error_response(status: StatusCode, body: ErrorBody) -> Response {
    json_response(status, &body)
}

/// A serialised JSON response.
pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(http::header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialisation failed: {e}"),
        )
            .into_response(),
    }
}

/// The response for a [`GatewayError`], with `x-echelon-attempts`.
pub(crate) fn gateway_error_response(e: &GatewayError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = error_response(status, e.to_body());
    put_attempts(resp.headers_mut(), e.attempts());
    resp
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
