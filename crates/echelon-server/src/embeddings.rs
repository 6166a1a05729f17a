//! `POST /v1/embeddings` (OpenAI's shape), served like `POST /v1/chat/completions`
//! (`handlers.rs`): a request id on every log line and in the answer, the route by
//! `model` through [`echelon::Gateway::embed_with`], `x-echelon-model`,
//! `x-echelon-attempts` and `x-echelon-overhead-ms` on every routed answer, errors as
//! [`ApiError`] with their attempts.

use axum::extract::State;
use axum::response::Response;
use echelon_types::parse_embedding_request;
use http::StatusCode;

use crate::AppState;
use crate::content_type::JsonBody;
use crate::error::{ApiError, ErrorDialect};
use crate::reply::{json_response, overhead_ms, put_overhead, put_route_headers};

/// `POST /v1/embeddings`.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    crate::handlers::routed(state, headers, body, ErrorDialect::OpenAi, embed_in_span).await
}

async fn embed_in_span(r: crate::handlers::Routed) -> Result<Response, ApiError> {
    let crate::handlers::Routed {
        state,
        options,
        body,
        arrived,
        ..
    } = r;
    let req = parse_embedding_request(&body).map_err(ApiError::invalid_request)?;
    crate::telemetry::record_request("embeddings", &req.model);
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
