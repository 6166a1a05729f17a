//! `POST /v1/embeddings` (OpenAI's shape), served like `POST /v1/chat/completions`
//! (`handlers.rs`): a request id on every log line and in the answer, the route by
//! `model` through [`echelon::Gateway::embed_with`], `x-echelon-model`,
//! `x-echelon-attempts` and `x-echelon-overhead-ms` on every routed answer, errors as
//! [`ApiError`] with their attempts.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use echelon::CallOptions;
use echelon_types::parse_embedding_request;
use http::StatusCode;
use tracing::Instrument;

use crate::AppState;
use crate::content_type::JsonBody;
use crate::error::ApiError;
use crate::reply::{json_response, overhead_ms, put_overhead, put_route_headers};

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    let request_id = crate::handlers::request_id(&headers);
    let arrived = std::time::Instant::now();
    let span = tracing::info_span!("request", request_id = %request_id);
    let mut resp = embed_in_span(state, headers, body, request_id.clone(), arrived)
        .instrument(span)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    crate::handlers::echo_request_id(&mut resp, &request_id);
    resp
}

async fn embed_in_span(
    state: AppState,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
    request_id: String,
    arrived: std::time::Instant,
) -> Result<Response, ApiError> {
    let options = CallOptions {
        session_id: headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        request_id: Some(request_id),
    };
    let JsonBody(body) = body?;
    if state.log_bodies {
        tracing::info!(body = %String::from_utf8_lossy(&body), "request body (log_bodies: true)");
    }
    let req = parse_embedding_request(&body).map_err(ApiError::invalid_request)?;
    tracing::debug!(
        route = %echelon_types::bounded_name(&req.model),
        inputs = req.input.len(),
        "embeddings"
    );
    let done = state
        .gateway
        .embed_with(req, &options)
        .await
        .map_err(|e| ApiError::from(&e).with_overhead_ms(overhead_ms(arrived, e.attempts())))?;
    let mut resp = json_response(StatusCode::OK, &done.response)?;
    put_route_headers(resp.headers_mut(), &done.model, &done.attempts);
    put_overhead(resp.headers_mut(), arrived, &done.attempts);
    Ok(resp)
}
