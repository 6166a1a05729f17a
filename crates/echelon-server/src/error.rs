//! Every error the server answers with, as one type: [`ApiError`] carries the status and
//! the error body, and renders itself ([`IntoResponse`]) in an [`ErrorDialect`]. Handlers
//! return `Result<Response, ApiError>`; the gateway's own failures convert with `From`.

use axum::body::Body;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use echelon::GatewayError;
use echelon_types::{ErrorBody, RequestError};
use http::{HeaderValue, StatusCode};

use crate::reply::put_attempts;

/// The shape an error body is written in, chosen by the endpoint that failed.
///
/// An endpoint of another API adds its variant here and its arm in
/// [`ApiError::body_json`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ErrorDialect {
    /// `{"error": {"message", "type", "param", "code", "attempts"?}}` (DESIGN.md §4).
    #[default]
    OpenAi,
    /// Anthropic's `{"type": "error", "error": {"type", "message", "code"?, "param"?,
    /// "attempts"?}}` (`/v1/messages`): `error.type` from the status
    /// ([`error_type_for_status`](echelon_types::anthropic::error_type_for_status)),
    /// Echelon's `code`, `param` and `attempts` kept beside it.
    Anthropic,
}

/// An error answer: HTTP status, error body (message, type, code, param, the gateway's
/// attempts) and the dialect it is rendered in.
///
/// An error of the gateway (the request reached the router) also carries
/// `x-echelon-attempts`, like every routed answer (empty when no attempt was made).
/// Nothing in it is a key: attempts name keys by their short id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {}", body.error.message)]
pub(crate) struct ApiError {
    status: StatusCode,
    /// Boxed: an `ApiError` is the `Err` of every handler, and stays a few words wide.
    body: Box<ErrorBody>,
    dialect: ErrorDialect,
    /// Whether it came from the gateway (then `x-echelon-attempts` is sent).
    routed: bool,
    /// The gateway's [`retry_after`](GatewayError::retry_after): sent as `Retry-After`.
    retry_after: Option<std::time::Duration>,
    /// The gateway's own time on the request, sent as `x-echelon-overhead-ms`.
    overhead_ms: Option<u64>,
}

/// Every endpoint the server has, as a 404 names them.
pub(crate) const ENDPOINTS: &str = "POST /v1/chat/completions, POST /v1/responses, \
POST /v1/messages, POST /v1/messages/count_tokens, POST /v1/embeddings, GET /v1/models, \
GET /health, GET /metrics, GET /admin, GET /admin/state, POST /admin/reload";

impl ApiError {
    /// The message a client gets in the error body.
    pub(crate) fn message(&self) -> &str {
        &self.body.error.message
    }

    /// An error with `status`, OpenAI error `type` `kind` (e.g. `invalid_request_error`),
    /// machine-readable `code` and `message`.
    pub(crate) fn new(
        status: StatusCode,
        kind: &str,
        code: &str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            body: Box::new(ErrorBody::new(kind, message).with_code(code)),
            dialect: ErrorDialect::default(),
            routed: false,
            retry_after: None,
            overhead_ms: None,
        }
    }

    /// The same error rendered in `dialect`.
    pub(crate) fn in_dialect(mut self, dialect: ErrorDialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// The HTTP status.
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// Sets the `x-echelon-overhead-ms` the answer carries.
    pub(crate) fn with_overhead_ms(mut self, ms: u64) -> Self {
        self.overhead_ms = Some(ms);
        self
    }

    /// The body could not be read: 413 `request_too_large` beyond `server.body_limit`,
    /// else the rejection's status with `invalid_body`.
    pub(crate) fn body_rejected(rejection: &BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request_too_large"
        } else {
            "invalid_body"
        };
        Self::new(status, "invalid_request_error", code, rejection.body_text())
    }

    /// The body is not a valid chat request: 400 `invalid_request`, `param` naming the
    /// JSON path at fault when there is one.
    pub(crate) fn invalid_request(e: RequestError) -> Self {
        let mut err = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            e.message,
        );
        err.body.error.param = e.path;
        err
    }

    /// No gateway key was presented where one is required: 401 `invalid_api_key`.
    pub(crate) fn missing_gateway_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing gateway API key: send `Authorization: Bearer <key>`",
        )
    }

    /// The presented gateway key is not one of the configured ones: 401
    /// `invalid_api_key` (the key is not echoed).
    pub(crate) fn invalid_gateway_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "invalid gateway API key",
        )
    }

    /// A path that is no endpoint: 404 `unknown_url`, the message naming the endpoints
    /// that exist ([`ENDPOINTS`]).
    pub(crate) fn unknown_url(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "unknown_url",
            format!("no such endpoint: {path}; the endpoints are {ENDPOINTS}"),
        )
    }

    /// The endpoint at `path` exists but not for `method`: 405 `method_not_allowed`
    /// (axum adds the `Allow` header).
    pub(crate) fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
    }

    /// The request's `Host` names neither this gateway nor a `server.allowed_hosts`
    /// entry: 403 `host_not_allowed` (see [`crate::host`]). The listening address is not
    /// named: a page that got here by DNS rebinding reads this body.
    pub(crate) fn host_not_allowed(host: Option<&str>) -> Self {
        let found = host.map_or_else(
            || "a request without `Host`".to_owned(),
            |h| format!("`Host: {}`", shown(h)),
        );
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "host_not_allowed",
            format!(
                "{found} does not name this gateway: add the host to `server.allowed_hosts` \
                 to serve it"
            ),
        )
    }

    /// The request carries an `Origin` that `server.cors_origins` does not list (a web
    /// page): 403 `origin_not_allowed`.
    pub(crate) fn origin_not_allowed(origin: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "origin_not_allowed",
            format!(
                "requests from web pages of origin `{}` are not allowed: list the origin in \
                 `server.cors_origins` to allow them",
                shown(origin)
            ),
        )
    }

    /// A POST body that does not say it is JSON: 415 `unsupported_media_type`. `found` is
    /// the `Content-Type` sent, if any.
    pub(crate) fn unsupported_media_type(found: Option<&str>) -> Self {
        let found = found.map_or_else(|| "none".to_owned(), |f| format!("`{}`", shown(f)));
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            format!("`Content-Type` must be `application/json`, found {found}"),
        )
    }

    /// Something on the server's side failed (not the request, not an upstream): 500
    /// `server_error` / `internal_error`.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    /// The body in this error's dialect, as JSON: the response body, and the `data:`
    /// of the error event that ends a failed stream.
    pub(crate) fn body_json(&self) -> Vec<u8> {
        let rendered = match self.dialect {
            ErrorDialect::OpenAi => serde_json::to_vec(&self.body),
            ErrorDialect::Anthropic => serde_json::to_vec(&self.anthropic_body()),
        };
        // Serialising an ErrorBody (strings and JSON values) cannot fail; were it to,
        // the client still gets a body of the same shape.
        rendered.unwrap_or_else(|_| {
            br#"{"error":{"message":"error body serialisation failed","type":"server_error","param":null,"code":null}}"#
                .to_vec()
        })
    }
}

impl ApiError {
    /// The body in Anthropic's shape.
    fn anthropic_body(&self) -> echelon_types::anthropic::ErrorResponse {
        use echelon_types::anthropic::{ErrorDetail, ErrorResponse, error_type_for_status};
        let e = &self.body.error;
        let mut extra = echelon_types::Extra::new();
        if let Some(code) = &e.code {
            extra.insert("code".into(), code.clone().into());
        }
        if let Some(param) = &e.param {
            extra.insert("param".into(), param.clone().into());
        }
        if !e.attempts.is_empty()
            && let Ok(a) = serde_json::to_value(&e.attempts)
        {
            extra.insert("attempts".into(), a);
        }
        ErrorResponse {
            kind: "error".into(),
            error: ErrorDetail {
                kind: error_type_for_status(self.status.as_u16()).into(),
                message: e.message.clone(),
                extra,
            },
        }
    }
}

/// How much of a client-sent value an error message echoes, in bytes.
const ECHO_MAX_BYTES: usize = 100;

/// `value` as echoed in a message: at most [`ECHO_MAX_BYTES`] (cut on a character
/// boundary, `…` added).
fn shown(value: &str) -> String {
    if value.len() <= ECHO_MAX_BYTES {
        return value.to_owned();
    }
    let mut end = ECHO_MAX_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &value[..end])
}

impl From<&GatewayError> for ApiError {
    /// The gateway's status (400, 404, 429, 502, 503, 504) and body, attempts included.
    fn from(e: &GatewayError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_GATEWAY),
            body: Box::new(e.to_body()),
            dialect: ErrorDialect::default(),
            routed: true,
            retry_after: e.retry_after(),
            overhead_ms: None,
        }
    }
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> Self {
        ApiError::from(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = Response::new(Body::from(self.body_json()));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.routed {
            put_attempts(resp.headers_mut(), &self.body.error.attempts);
        }
        if let Some(ra) = self.retry_after {
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(ra)),
            );
        }
        if let Some(ms) = self.overhead_ms {
            resp.headers_mut()
                .insert("x-echelon-overhead-ms", HeaderValue::from(ms));
        }
        resp
    }
}

/// A `Retry-After` in delta-seconds (RFC 9110 §10.2.3): whole seconds, rounded up, at
/// least 1 (a client told 0 would come back at once, into the same limit).
pub(crate) fn retry_after_secs(ra: std::time::Duration) -> u64 {
    let whole = ra.as_secs();
    let secs = if ra.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    };
    secs.max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use echelon::error::GatewayErrorKind;
    use echelon_types::Attempt;
    use serde_json::{Value, json};

    use super::*;

    async fn rendered(e: ApiError) -> (StatusCode, http::HeaderMap, Value) {
        let resp = e.into_response();
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    #[tokio::test]
    async fn renders_the_openai_error_body_with_its_status() {
        let (status, headers, v) = rendered(ApiError::unknown_url("/v2/x")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
        assert!(!headers.contains_key("x-echelon-attempts"));
        assert_eq!(
            v,
            json!({"error": {
                "message": format!("no such endpoint: /v2/x; the endpoints are {ENDPOINTS}"),
                "type": "invalid_request_error",
                "param": null,
                "code": "unknown_url",
            }})
        );
        let (status, _, v) = rendered(ApiError::invalid_request(RequestError {
            path: Some("messages[0].role".into()),
            message: "bad role".into(),
        }))
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["param"], "messages[0].role");
        assert_eq!(v["error"]["code"], "invalid_request");
    }

    #[test]
    fn retry_after_is_whole_seconds_rounded_up_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[tokio::test]
    async fn a_gateway_error_keeps_its_status_body_and_attempts() {
        let attempt: Attempt = serde_json::from_value(json!({
            "model": "a", "provider": "p", "key_id": "abcd1234", "status": 500,
            "error_kind": "server_error", "message": "upstream 500", "latency_ms": 12,
        }))
        .unwrap();
        let e = GatewayError::new(GatewayErrorKind::UpstreamFailed, "every model failed")
            .with_attempts(vec![attempt]);
        let expected = serde_json::to_value(e.to_body()).unwrap();
        let (status, headers, v) = rendered(ApiError::from(e)).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(v, expected);
        assert_eq!(v["error"]["attempts"][0]["model"], "a");
        assert_eq!(headers["x-echelon-attempts"], "a:server_error:500:12ms");

        assert!(!headers.contains_key(http::header::RETRY_AFTER));

        let limited = GatewayError::new(GatewayErrorKind::RateLimited, "all rate-limited")
            .with_retry_after(std::time::Duration::from_millis(1200));
        let (status, headers, _) = rendered(ApiError::from(limited)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(headers[http::header::RETRY_AFTER], "2", "rounded up");

        let unknown = GatewayError::new(GatewayErrorKind::UnknownRoute, "no route `x`");
        let (status, headers, _) = rendered(ApiError::from(unknown)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            headers["x-echelon-attempts"], "",
            "routed: the header, empty"
        );
    }
}
