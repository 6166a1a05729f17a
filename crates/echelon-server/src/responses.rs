//! `POST /v1/responses`: the OpenAI Responses API, stateless, bridged to chat
//! completions (translation in [`echelon_types::responses`]).
//!
//! The request is routed by its `model` like a chat completion (models, task groups,
//! echelons, pools, wrappers) through the same resilience, ledger and metrics, and the
//! answer carries the same `x-echelon-*` headers. Errors before an answer (a stream's
//! first content included) are the OpenAI error body with their status and attempts; a
//! stream that fails after its start ends with `response.failed`, never
//! `response.completed`.
//!
//! To a provider that declares `responses: true` the request goes as the client sent it
//! (to its `{base_url}/responses`), and a non-streamed answer is its own Response object;
//! a streamed one is decoded into chat chunks and its events made again here (the
//! gateway checks and meters every stream the same way).

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use echelon::GatewayStream;
use echelon_types::NativeResponse;
use echelon_types::responses::{
    Response as ResponseObject, ResponseEvent, ResponseStreamTranslator, parse_responses_request,
};
use http::{HeaderValue, StatusCode};

use crate::AppState;
use crate::content_type::JsonBody;
use crate::error::{ApiError, ErrorDialect};
use crate::reply::{json_response, overhead_ms, put_overhead, put_route_headers};

/// `POST /v1/responses`.
pub(crate) async fn responses(
    State(state): State<AppState>,
    headers: http::HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    crate::handlers::routed(state, headers, body, ErrorDialect::OpenAi, in_span).await
}

async fn in_span(r: crate::handlers::Routed) -> Result<Response, ApiError> {
    let crate::handlers::Routed {
        state,
        options,
        body,
        arrived,
        ..
    } = r;
    let translated = parse_responses_request(&body).map_err(ApiError::invalid_request)?;
    if !translated.ignored.is_empty() {
        tracing::debug!(fields = ?translated.ignored, "Responses fields without a chat equivalent, ignored");
    }
    // It carries the request as sent, for a provider with `responses: true`.
    let req = translated.chat;
    let echo = translated.echo;
    let route = req.model.clone();
    tracing::debug!(route = %echelon_types::bounded_name(&route), stream = req.is_stream(), "response");
    crate::telemetry::record_request("chat", &route);
    let routed_error = |e: echelon::GatewayError| {
        ApiError::from(&e).with_overhead_ms(overhead_ms(arrived, e.attempts()))
    };
    let id = format!("resp_{}", echelon::usage::new_request_id());
    if req.is_stream() {
        let stream = state
            .gateway
            .chat_stream_with(req, &options)
            .await
            .map_err(routed_error)?;
        let overhead = overhead_ms(arrived, stream.attempts());
        // The model that answers, until its first chunk names the upstream's model.
        let started = ResponseObject::started(id, unix_now(), stream.model().to_owned(), &echo);
        let mut resp = stream_response(stream, ResponseStreamTranslator::new(started));
        resp.headers_mut()
            .insert("x-echelon-overhead-ms", HeaderValue::from(overhead));
        Ok(resp)
    } else {
        let done = state
            .gateway
            .chat_with(req, &options)
            .await
            .map_err(routed_error)?;
        let mut resp = match done.response.native.as_deref() {
            // The upstream's own Response object, as it came.
            Some(NativeResponse::Responses(object)) => json_response(StatusCode::OK, object)?,
            Some(NativeResponse::Anthropic(_)) | None => {
                let mut object =
                    ResponseObject::from_completion(id, &done.response, &done.model, &echo);
                if object.created_at == 0 {
                    object.created_at = unix_now();
                }
                json_response(StatusCode::OK, &object)?
            }
        };
        put_route_headers(resp.headers_mut(), &done.model, &done.attempts);
        put_overhead(resp.headers_mut(), arrived, &done.attempts);
        Ok(resp)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where a relayed stream is.
enum Phase {
    /// `response.created` not sent yet.
    Start(GatewayStream, Box<ResponseStreamTranslator>),
    /// Relaying chunks.
    Running(GatewayStream, Box<ResponseStreamTranslator>),
    /// The last event is sent.
    Done,
}

/// The SSE response: `event: <type>` / `data: <json>` per Responses event, ending with
/// `response.completed` (or `response.incomplete`), or `response.failed` when the
/// stream fails after its start. No `[DONE]`: the Responses API sends none.
fn stream_response(stream: GatewayStream, translator: ResponseStreamTranslator) -> Response {
    let mut headers = http::HeaderMap::new();
    put_route_headers(&mut headers, stream.model(), stream.attempts());
    let events = futures::stream::unfold(
        Phase::Start(stream, Box::new(translator)),
        |phase| async move {
            match phase {
                Phase::Start(mut stream, mut t) => {
                    // The first chunk is already buffered (the gateway answers once
                    // content arrived): it names the upstream's model for
                    // `response.created`.
                    let first = stream.next().await;
                    if let Some(Ok(chunk)) = &first {
                        t.set_model(&chunk.model);
                    }
                    let mut events = t.start();
                    let next = match first {
                        Some(Ok(chunk)) => {
                            events.extend(t.chunk(&chunk));
                            Phase::Running(stream, t)
                        }
                        Some(Err(e)) => {
                            events.extend(t.fail(&e.to_body().error));
                            Phase::Done
                        }
                        None => {
                            events.extend(t.finish());
                            Phase::Done
                        }
                    };
                    Some((Ok::<_, Infallible>(frames(&events)), next))
                }
                Phase::Running(mut stream, mut t) => loop {
                    match stream.next().await {
                        Some(Ok(chunk)) => {
                            let events = t.chunk(&chunk);
                            // A chunk with nothing to say (the role chunk, a finish
                            // reason) sends no frame.
                            if !events.is_empty() {
                                return Some((Ok(frames(&events)), Phase::Running(stream, t)));
                            }
                        }
                        Some(Err(e)) => {
                            let body = e.to_body();
                            return Some((Ok(frames(&t.fail(&body.error))), Phase::Done));
                        }
                        None => return Some((Ok(frames(&t.finish())), Phase::Done)),
                    }
                },
                Phase::Done => None,
            }
        },
    );
    let mut resp = Response::new(Body::from_stream(events));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.extend(headers);
    resp
}

/// `event: <name>\ndata: <json>\n\n` for each event.
fn frames(events: &[ResponseEvent]) -> Bytes {
    let mut out = Vec::with_capacity(events.len() * 256);
    for e in events {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // A JSON value always serialises.
        if serde_json::to_writer(&mut out, &e.data).is_err() {
            out.extend_from_slice(b"{}");
        }
        out.extend_from_slice(b"\n\n");
    }
    Bytes::from(out)
}
