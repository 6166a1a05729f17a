//! Gemini's errors: the HTTP status and the body's `error` (a `google.rpc.Status`:
//! `code`, `message`, `status`, `details`), as a classified [`ProviderError`].
//!
//! | Gemini | kind |
//! |---|---|
//! | 429 / `RESOURCE_EXHAUSTED` | `rate_limited` (`Retry-After`, else the `RetryInfo.retryDelay` of `details`) |
//! | 500 `INTERNAL`, 503 `UNAVAILABLE`, 504 `DEADLINE_EXCEEDED`, other 5xx | `server_error` |
//! | 400 `INVALID_ARGUMENT` / `FAILED_PRECONDITION`, other 4xx | `bad_request`; `context_length` when the message says the input is over the token limit |
//! | 401 `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 400 with reason `API_KEY_INVALID` | `auth` |
//! | 404 `NOT_FOUND` | `not_found` |
//!
//! An error without an HTTP status (in a stream) is classified by `status`, else
//! `code`, else as `server_error`.

use std::time::Duration;

use serde_json::Value;

use crate::key::Redactor;
use crate::provider::error::{ErrorKind, MAX_RETRY_AFTER, ProviderError, upstream_text};

/// Classifies a Gemini error: `http_status` (none for an error inside a stream),
/// the `Retry-After` header's value, and the body (scrubbed by `redactor`).
pub(crate) fn classify(
    http_status: Option<u16>,
    retry_after: Option<Duration>,
    body: &[u8],
    redactor: &Redactor,
) -> ProviderError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    // The stream endpoint without `alt=sse` answers a JSON array.
    let parsed = match parsed {
        Some(Value::Array(mut items)) if !items.is_empty() => Some(items.swap_remove(0)),
        other => other,
    };
    match parsed.as_ref().and_then(|v| v.get("error")) {
        Some(error) => classify_error(http_status, retry_after, error, redactor),
        None => {
            let text = String::from_utf8_lossy(body);
            let mut e = ProviderError::new(
                kind(http_status, None, None, ""),
                upstream_text(text.trim()),
            );
            e.status = http_status;
            e.retry_after = retry_after;
            e.redacted(redactor)
        }
    }
}

/// Classifies a parsed `error` object (an HTTP error body's, or a stream event's).
pub(crate) fn classify_error(
    http_status: Option<u16>,
    retry_after: Option<Duration>,
    error: &Value,
    redactor: &Redactor,
) -> ProviderError {
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .unwrap_or("Gemini error");
    let status = error.get("status").and_then(Value::as_str);
    let code = error
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok());
    let details = error
        .get("details")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let reason = details
        .iter()
        .find_map(|d| d.get("reason").and_then(Value::as_str));
    let kind = kind(http_status.or(code), status, reason, message);
    let retry_after = retry_after.or_else(|| {
        details
            .iter()
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .and_then(parse_delay)
    });
    let mut e = ProviderError::new(kind, upstream_text(message));
    e.status = http_status;
    e.retry_after = retry_after;
    e.redacted(redactor)
}

/// The kind of an error from its status (HTTP, else the body's `code`), its
/// `google.rpc` status name, its `ErrorInfo` reason and its message.
fn kind(status: Option<u16>, name: Option<&str>, reason: Option<&str>, message: &str) -> ErrorKind {
    if reason == Some("API_KEY_INVALID") {
        return ErrorKind::Auth;
    }
    let by_name = match name {
        Some("RESOURCE_EXHAUSTED") => Some(ErrorKind::RateLimited),
        Some("UNAUTHENTICATED" | "PERMISSION_DENIED") => Some(ErrorKind::Auth),
        Some("NOT_FOUND") => Some(ErrorKind::NotFound),
        Some("INVALID_ARGUMENT" | "FAILED_PRECONDITION" | "OUT_OF_RANGE") => {
            Some(ErrorKind::BadRequest)
        }
        Some("UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED" | "UNKNOWN" | "ABORTED") => {
            Some(ErrorKind::ServerError)
        }
        _ => None,
    };
    let kind = by_name.unwrap_or(match status {
        Some(429) => ErrorKind::RateLimited,
        Some(401 | 403) => ErrorKind::Auth,
        Some(404) => ErrorKind::NotFound,
        Some(400..=499) => ErrorKind::BadRequest,
        _ => ErrorKind::ServerError,
    });
    if kind == ErrorKind::BadRequest && is_context_length(message) {
        ErrorKind::ContextLength
    } else {
        kind
    }
}

/// Whether a message says the prompt is over the model's input limit (Gemini: "The
/// input token count (N) exceeds the maximum number of tokens allowed (M).").
fn is_context_length(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("input token count") && m.contains("exceeds"))
        || m.contains("exceeds the maximum number of tokens")
        || m.contains("context length")
        || m.contains("context window")
        || m.contains("maximum context")
}

/// A `google.protobuf.Duration` in JSON (`"37s"`, `"1.5s"`), capped at
/// [`MAX_RETRY_AFTER`]; `None` when it is not one.
fn parse_delay(text: &str) -> Option<Duration> {
    let secs = text.trim().strip_suffix('s')?;
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let secs: f64 = secs.parse().ok()?;
    Some(if secs < MAX_RETRY_AFTER.as_secs_f64() {
        Duration::from_secs_f64(secs)
    } else {
        MAX_RETRY_AFTER
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn e(status: u16, body: &str) -> ProviderError {
        classify(Some(status), None, body.as_bytes(), &Redactor::default())
    }

    fn body(code: u16, status: &str, message: &str) -> String {
        serde_json::json!({"error": {"code": code, "message": message, "status": status}})
            .to_string()
    }

    #[test]
    fn classifies_the_status_table() {
        for (code, status, message, kind) in [
            (429, "RESOURCE_EXHAUSTED", "quota", ErrorKind::RateLimited),
            (503, "UNAVAILABLE", "overloaded", ErrorKind::ServerError),
            (500, "INTERNAL", "oops", ErrorKind::ServerError),
            (504, "DEADLINE_EXCEEDED", "slow", ErrorKind::ServerError),
            (400, "INVALID_ARGUMENT", "bad field", ErrorKind::BadRequest),
            (
                400,
                "FAILED_PRECONDITION",
                "location",
                ErrorKind::BadRequest,
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "The input token count (2000000) exceeds the maximum number of tokens allowed (1048576).",
                ErrorKind::ContextLength,
            ),
            (401, "UNAUTHENTICATED", "who", ErrorKind::Auth),
            (403, "PERMISSION_DENIED", "no", ErrorKind::Auth),
            (
                404,
                "NOT_FOUND",
                "models/x is not found",
                ErrorKind::NotFound,
            ),
        ] {
            let got = e(code, &body(code, status, message));
            assert_eq!(got.kind, kind, "{code} {status}");
            assert_eq!(got.status, Some(code));
            assert_eq!(got.message, message);
        }
        // Not JSON: by the HTTP status, the raw body the message.
        assert_eq!(
            e(502, "<html>bad gateway</html>").kind,
            ErrorKind::ServerError
        );
        assert_eq!(
            e(502, "<html>bad gateway</html>").message,
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn an_invalid_key_is_auth_although_gemini_answers_400() {
        let b = r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#;
        assert_eq!(e(400, b).kind, ErrorKind::Auth);
    }

    #[test]
    fn a_429_takes_its_retry_delay_from_the_details_unless_a_header_says() {
        let b = r#"{"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED","details":[
            {"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},
            {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"37s"}]}}"#;
        assert_eq!(e(429, b).retry_after, Some(Duration::from_secs(37)));
        let header = classify(
            Some(429),
            Some(Duration::from_secs(2)),
            b.as_bytes(),
            &Redactor::default(),
        );
        assert_eq!(header.retry_after, Some(Duration::from_secs(2)));
        assert_eq!(parse_delay("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_delay("99999999s"), Some(MAX_RETRY_AFTER));
        for bad in ["", "s", "5", "-1s", "1e9s", "soon"] {
            assert_eq!(parse_delay(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_error_in_a_stream_is_classified_by_its_status_name() {
        let r = Redactor::default();
        let err = serde_json::json!({"code": 429, "message": "slow down", "status": "RESOURCE_EXHAUSTED"});
        assert_eq!(
            classify_error(None, None, &err, &r).kind,
            ErrorKind::RateLimited
        );
        let err = serde_json::json!({"code": 503, "message": "busy", "status": "UNAVAILABLE"});
        assert_eq!(
            classify_error(None, None, &err, &r).kind,
            ErrorKind::ServerError
        );
        let err = serde_json::json!({"message": "?"});
        assert_eq!(
            classify_error(None, None, &err, &r).kind,
            ErrorKind::ServerError
        );
    }

    #[test]
    fn an_echoed_key_is_scrubbed() {
        use crate::key::ApiKey;
        use secrecy::SecretString;
        let key = ApiKey::new(SecretString::from("AIzaSyEchoedKey0123456789"));
        let r = Redactor::new([key.clone()]);
        let b = body(400, "INVALID_ARGUMENT", "bad key AIzaSyEchoedKey0123456789");
        let got = classify(Some(400), None, b.as_bytes(), &r);
        assert!(!got.message.contains("AIzaSyEchoed"), "{}", got.message);
    }
}
