//! What went wrong in one provider call, and what that means for retrying.

use std::time::Duration;

pub use echelon_types::ErrorKind;

/// A failed provider call.
///
/// Ask it questions rather than matching on its parts: [`is_retryable`](Self::is_retryable),
/// [`is_key_fatal`](Self::is_key_fatal), [`is_client_fault`](Self::is_client_fault).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind}{}: {message}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
pub struct ProviderError {
    /// The class.
    pub kind: ErrorKind,
    /// The HTTP status, when the provider answered with one.
    pub status: Option<u16>,
    /// The provider's error message, or the local reason. Never contains a key.
    pub message: String,
    /// The provider's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    /// A new error without status or Retry-After.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ProviderError {
            kind,
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Whether the same model may be tried again: timeouts, connection errors, 429, 5xx,
    /// malformed answers and cut streams (DESIGN.md §4).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout
                | ErrorKind::Connect
                | ErrorKind::RateLimited
                | ErrorKind::ServerError
                | ErrorKind::Malformed
                | ErrorKind::StreamCut
        )
    }

    /// Whether the key used was refused (401/403): it should not be used again.
    pub fn is_key_fatal(&self) -> bool {
        self.kind == ErrorKind::Auth
    }

    /// Whether the prompt did not fit the context window.
    pub fn is_context_length(&self) -> bool {
        self.kind == ErrorKind::ContextLength
    }

    /// Whether the request itself is at fault (400/422 other than context length):
    /// no other model would do better, so the caller should get the error as it is.
    pub fn is_client_fault(&self) -> bool {
        self.kind == ErrorKind::BadRequest
    }

    /// Classifies an HTTP error answer from its status, headers and body.
    ///
    /// Context-length errors are recognised by OpenAI's code `context_length_exceeded`,
    /// llama.cpp's type `exceed_context_size_error`, or the usual wording in the message.
    pub fn from_response(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        let (message, err_type, code) = parse_error_body(body);
        let context = code.as_deref() == Some("context_length_exceeded")
            || err_type.as_deref() == Some("exceed_context_size_error")
            || {
                let m = message.to_ascii_lowercase();
                m.contains("context length")
                    || m.contains("context window")
                    || m.contains("maximum context")
                    || m.contains("context_length")
            };
        let kind = match status {
            429 => ErrorKind::RateLimited,
            401 | 403 => ErrorKind::Auth,
            404 => ErrorKind::NotFound,
            400 | 413 | 422 if context => ErrorKind::ContextLength,
            400..=499 => ErrorKind::BadRequest,
            _ => ErrorKind::ServerError,
        };
        ProviderError {
            kind,
            status: Some(status),
            message,
            retry_after,
        }
    }
}

/// Longest provider message kept, in bytes; bodies can be whole HTML pages.
const MAX_MESSAGE_BYTES: usize = 500;

fn parse_error_body(body: &[u8]) -> (String, Option<String>, Option<String>) {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let err = parsed.as_ref().map(|v| v.get("error").unwrap_or(v));
    let field = |k: &str| {
        err.and_then(|e| e.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let message = field("message")
        .or_else(|| err.and_then(serde_json::Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    (truncate(message), field("type"), field("code"))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE_BYTES {
        let mut cut = MAX_MESSAGE_BYTES;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Parses a `Retry-After` header given in seconds (RFC 9110 §10.2.3; the HTTP-date form
/// is rare from LLM APIs and is ignored).
pub(crate) fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    let secs: f64 = value?.to_str().ok()?.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        let e = |s, b: &str| ProviderError::from_response(s, None, b.as_bytes());
        assert_eq!(e(429, "{}").kind, ErrorKind::RateLimited);
        assert!(e(429, "{}").is_retryable());
        assert!(e(500, "oops").is_retryable());
        assert!(e(503, "").is_retryable());
        assert!(e(401, "{}").is_key_fatal());
        assert!(!e(401, "{}").is_retryable());
        assert!(e(400, r#"{"error":{"message":"bad"}}"#).is_client_fault());
        assert_eq!(e(404, "{}").kind, ErrorKind::NotFound);
    }

    #[test]
    fn recognises_context_length_errors() {
        let llama = r#"{"error":{"code":400,"message":"the request exceeds the available context size","type":"exceed_context_size_error"}}"#;
        assert!(ProviderError::from_response(400, None, llama.as_bytes()).is_context_length());
        let openai = r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        let e = ProviderError::from_response(400, None, openai.as_bytes());
        assert!(e.is_context_length());
        assert!(!e.is_retryable());
        assert_eq!(
            e.message,
            "This model's maximum context length is 8192 tokens"
        );
    }

    #[test]
    fn parses_retry_after_seconds() {
        let v = http::HeaderValue::from_static("2");
        assert_eq!(parse_retry_after(Some(&v)), Some(Duration::from_secs(2)));
        let v = http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(parse_retry_after(Some(&v)), None);
    }

    #[test]
    fn long_messages_are_cut() {
        let body = "x".repeat(2000);
        let e = ProviderError::from_response(500, None, body.as_bytes());
        assert!(e.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
    }
}
