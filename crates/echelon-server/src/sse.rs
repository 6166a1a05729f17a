//! Relaying a [`GatewayStream`] as server-sent events.

use std::convert::Infallible;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use echelon::GatewayStream;
use http::{HeaderValue, StatusCode};

use crate::error::ApiError;
use crate::reply::put_route_headers;

/// The SSE response: `data: <chunk>` per chunk, then `data: [DONE]` on a complete end.
/// A failure after the start sends `data: {"error": {...}}` and ends *without* `[DONE]`,
/// which the official SDKs raise as an error.
pub(crate) fn stream_response(stream: GatewayStream) -> Response {
    let mut headers = http::HeaderMap::new();
    put_route_headers(&mut headers, stream.model(), stream.attempts());
    let events = futures::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        match stream.next().await {
            Some(Ok(chunk)) => {
                // As the upstream wrote it when the gateway changed nothing in it.
                let line = match chunk.verbatim.get() {
                    Some(text) => frame(text.as_bytes()),
                    None => match serde_json::to_vec(&chunk) {
                        Ok(json) => frame(&json),
                        Err(e) => frame(
                            &ApiError::internal(format!("chunk serialisation failed: {e}"))
                                .body_json(),
                        ),
                    },
                };
                Some((Ok::<_, Infallible>(line), Some(stream)))
            }
            Some(Err(e)) => Some((Ok(frame(&ApiError::from(e).body_json())), None)),
            None => Some((Ok(Bytes::from_static(b"data: [DONE]\n\n")), None)),
        }
    });
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

fn frame(json: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}
