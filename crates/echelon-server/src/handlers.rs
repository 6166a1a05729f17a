//! The endpoint handlers.

use axum::Json;
use axum::extract::{OriginalUri, State};
use axum::response::{IntoResponse, Response};
use echelon::CallOptions;
use echelon_types::parse_request;
use http::StatusCode;
use serde_json::json;
use tracing::Instrument;

use crate::telemetry::RequestTrace;

use crate::AppState;
use crate::content_type::JsonBody;
use crate::error::{ApiError, ErrorDialect};
use crate::reply::{json_response, overhead_ms, put_overhead, put_route_headers};
use crate::sse::stream_response;

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    routed(state, headers, body, ErrorDialect::OpenAi, chat).await
}

/// A request of a routed endpoint (`/v1/chat/completions`, `/v1/responses`,
/// `/v1/embeddings`, …) as [`routed`] hands it over.
pub(crate) struct Routed {
    pub(crate) state: AppState,
    /// The request id and the session (`x-session-id`).
    pub(crate) options: CallOptions,
    /// The JSON body (already checked to be declared JSON: [`JsonBody`]).
    pub(crate) body: bytes::Bytes,
    /// When the handler started: `x-echelon-overhead-ms` counts from here.
    pub(crate) arrived: std::time::Instant,
    /// The request's headers (a dialect may forward some: `anthropic-version`, `anthropic-beta`).
    pub(crate) headers: http::HeaderMap,
}

/// Serves one request of a routed endpoint with `serve`: the request id (the caller's
/// sane `x-request-id`, else a new one) on every log line of the request (a span) and
/// echoed in the answer, the session header, the body (logged with `log_bodies: true`);
/// an error from `serve` becomes its response, in the endpoint's `dialect`.
pub(crate) async fn routed<F, Fut>(
    state: AppState,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
    dialect: ErrorDialect,
    serve: F,
) -> Response
where
    F: FnOnce(Routed) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let request_id = request_id(&headers);
    let arrived = std::time::Instant::now();
    let span = tracing::info_span!("request", request_id = %request_id);
    // The exported span (`telemetry:`; none when off), innermost so that the handler
    // records into it and the attempts are its children; or, left out by sampling, no
    // span at all.
    let trace = crate::telemetry::request_trace(&headers, &request_id);
    let options = call_options(&headers, request_id.clone());
    let run = async move {
        let JsonBody(body) = body?;
        if state.log_bodies {
            tracing::info!(body = %String::from_utf8_lossy(&body), "request body (log_bodies: true)");
        }
        serve(Routed {
            state,
            options,
            body,
            arrived,
            headers,
        })
        .await
    };
    let result = match &trace {
        RequestTrace::Off => run.instrument(span).await,
        RequestTrace::Traced(otel) => {
            use opentelemetry::context::FutureExt as _;
            let cx = otel.context().cloned().unwrap_or_default();
            run.with_context(cx).instrument(span).await
        }
        RequestTrace::Unsampled(tp) => {
            echelon::telemetry::unsampled(tp.clone(), run)
                .instrument(span)
                .await
        }
    };
    let mut resp = result.unwrap_or_else(|e| e.in_dialect(dialect).into_response());
    echo_request_id(&mut resp, &request_id);
    // A stream's request span ends with its last chunk; an unsampled stream's
    // continuation attempts stay unsampled.
    let sse = |resp: &Response| {
        resp.headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
    };
    match trace {
        RequestTrace::Off => {}
        RequestTrace::Traced(otel) => {
            crate::telemetry::record_status(&otel, resp.status());
            if sse(&resp) {
                resp = resp.map(|body| crate::telemetry::body_in_span(body, otel));
            }
        }
        RequestTrace::Unsampled(tp) => {
            if sse(&resp) {
                resp = resp.map(|body| crate::telemetry::body_unsampled(body, tp));
            }
        }
    }
    resp
}

/// The request's id: the caller's `x-request-id` when it sent a sane one (1 to 128
/// visible ASCII bytes), else a new one. It is on every log line of the request, in its
/// ledger row, and echoed in the response ([`echo_request_id`]).
pub(crate) fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(echelon::usage::new_request_id, str::to_owned)
}

/// The gateway's options of a request: `x-session-id`, and `request_id`.
fn call_options(headers: &http::HeaderMap, request_id: String) -> CallOptions {
    CallOptions {
        session_id: headers
            .get("x-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        request_id: Some(request_id),
    }
}

/// Sets `x-request-id: id` on `resp`.
pub(crate) fn echo_request_id(resp: &mut Response, id: &str) {
    if let Ok(v) = http::HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
}

/// A chat completion, streamed or not.
async fn chat(r: Routed) -> Result<Response, ApiError> {
    let Routed {
        state,
        options,
        body,
        arrived,
        ..
    } = r;
    let req = parse_request(&body).map_err(ApiError::invalid_request)?;
    // Debug, not info: a line per request is a formatted, blocking write to stderr on a
    // worker thread (6 MB of log in a few seconds of bench/run.sh), and every request is
    // in the ledger and the metrics anyway. Failures, skips, fallbacks and breaker
    // transitions still log at info or above.
    tracing::debug!(route = %echelon_types::bounded_name(&req.model), stream = req.is_stream(), "chat completion");
    crate::telemetry::record_request("chat", &req.model);
    // Every routed answer, an error too, says the gateway's own time
    // (`x-echelon-overhead-ms`): for a stream, up to its response head.
    let routed_error = |e: echelon::GatewayError| {
        ApiError::from(&e).with_overhead_ms(overhead_ms(arrived, e.attempts()))
    };
    if req.is_stream() {
        let stream = state
            .gateway
            .chat_stream_with(req, &options)
            .await
            .map_err(routed_error)?;
        crate::telemetry::record_answer(stream.model(), None, None);
        let overhead = overhead_ms(arrived, stream.attempts());
        let mut resp = stream_response(stream);
        resp.headers_mut()
            .insert("x-echelon-overhead-ms", http::HeaderValue::from(overhead));
        Ok(resp)
    } else {
        let done = state
            .gateway
            .chat_with(req, &options)
            .await
            .map_err(routed_error)?;
        crate::telemetry::record_answer(
            &done.model,
            Some(&done.response.model),
            done.response.usage.as_ref(),
        );
        let mut resp = json_response(StatusCode::OK, &done.response)?;
        put_route_headers(resp.headers_mut(), &done.model, &done.attempts);
        put_overhead(resp.headers_mut(), arrived, &done.attempts);
        Ok(resp)
    }
}

/// `GET /v1/models`: every route (models, task groups, echelons) in OpenAI's list shape,
/// with Echelon's `kind` and `models` added.
pub(crate) async fn list_models(State(state): State<AppState>) -> Response {
    let data: Vec<_> = state
        .gateway
        .routes()
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "object": "model",
                "created": 0,
                "owned_by": "echelon",
                "kind": r.kind,
                "models": r.models,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /admin/state`: the router's live state (see [`echelon::Gateway::admin_state`]).
pub(crate) async fn admin_state(State(state): State<AppState>) -> Response {
    Json(state.gateway.admin_state()).into_response()
}

/// `GET /health`.
pub(crate) async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Anything else: 404 in the OpenAI error body.
pub(crate) async fn not_found(uri: http::Uri) -> ApiError {
    ApiError::unknown_url(uri.path())
}

/// A known endpoint called with a method it does not serve: 405 in the OpenAI error body
/// (axum adds `Allow`).
pub(crate) async fn method_not_allowed(method: http::Method, uri: OriginalUri) -> ApiError {
    // The original URI: a nested router sees its path without the `/v1` prefix.
    ApiError::method_not_allowed(&method, uri.path())
}
