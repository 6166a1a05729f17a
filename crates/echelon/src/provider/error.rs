//! What went wrong in one provider call, and what that means for retrying.

use std::time::{Duration, SystemTime};

pub use echelon_types::ErrorKind;

use crate::key::Redactor;

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
    /// The provider's error message, or the local reason. Never contains a key: the
    /// wires build it through the model's [`Redactor`] ([`from_response`](Self::from_response),
    /// [`redacted`](Self::redacted)).
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

    /// Whether the same model may be tried again: timeouts (of either kind), connection
    /// errors, 429, 5xx, malformed answers and cut streams (DESIGN.md §4). How often is
    /// the model's `retry_on` (by default a timed-out model is not retried at all).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Timeout
                | ErrorKind::FirstTokenTimeout
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

    /// This error with its message scrubbed by `redactor` (configured keys → `key#<id>`,
    /// `Bearer` tokens and `sk-…` shapes → `[redacted]`).
    /// The message is also cut to its length limit after the scrub, so an upstream's text
    /// is bounded whichever path it came by (an HTTP body, an in-band stream error).
    pub fn redacted(mut self, redactor: &Redactor) -> Self {
        let message = std::mem::take(&mut self.message);
        self.message = truncate(redactor.scrub(&truncate_to(message, MAX_SCRUBBED_BYTES)));
        self
    }

    /// Classifies an HTTP error answer from its status, headers and body; the message
    /// is scrubbed by `redactor` before it is cut to its length limit (so a key that
    /// straddles the cut cannot leave a piece behind).
    ///
    /// Context-length errors are recognised by OpenAI's code `context_length_exceeded`,
    /// llama.cpp's type `exceed_context_size_error`, or the usual wording in the message.
    pub fn from_response(
        status: u16,
        retry_after: Option<Duration>,
        body: &[u8],
        redactor: &Redactor,
    ) -> Self {
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
            message: truncate(redactor.scrub(&truncate_to(message, MAX_SCRUBBED_BYTES))),
            retry_after,
        }
    }
}

/// Longest provider message kept, in bytes; bodies can be whole HTML pages.
const MAX_MESSAGE_BYTES: usize = 500;

/// Longest part of a provider message that is scrubbed before the final cut to
/// [`MAX_MESSAGE_BYTES`], in bytes: bounds the scrub's work on a huge body, and is far
/// enough past the final cut that what the cut keeps was scrubbed whole.
const MAX_SCRUBBED_BYTES: usize = 64 * 1024;

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
    (message, field("type"), field("code"))
}

/// At most the first [`MAX_SCRUBBED_BYTES`] of an upstream's text, owned (the rest is
/// never copied): what may become an error message once scrubbed.
pub(crate) fn upstream_text(s: &str) -> String {
    let mut cut = s.len().min(MAX_SCRUBBED_BYTES);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < s.len() {
        format!("{}…", &s[..cut])
    } else {
        s.to_owned()
    }
}

/// `s` cut to [`MAX_MESSAGE_BYTES`] (at a character boundary) with `…` when cut.
fn truncate(s: String) -> String {
    truncate_to(s, MAX_MESSAGE_BYTES)
}

/// `s` cut to `max` bytes (at a character boundary) with `…` when cut.
fn truncate_to(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Longest `Retry-After` honoured: a longer one (or one that does not fit a
/// [`Duration`]) counts as this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Parses a `Retry-After` header (RFC 9110 §10.2.3): delta-seconds (a decimal fraction
/// is accepted too) or an HTTP date (any of the three forms of RFC 9110 §5.6.7),
/// capped at [`MAX_RETRY_AFTER`]. Anything else (a sign, an exponent, `NaN`, `inf`,
/// text) is `None`; a date in the past is zero. Never panics, whatever the provider
/// sends.
pub(crate) fn parse_retry_after(value: Option<&http::HeaderValue>) -> Option<Duration> {
    parse_retry_after_at(value?.to_str().ok()?, SystemTime::now())
}

/// [`parse_retry_after`] of a header's text, a date counted from `now`.
fn parse_retry_after_at(text: &str, now: SystemTime) -> Option<Duration> {
    let text = text.trim();
    if is_decimal(text) {
        // Digits only: finite or +inf (more than about 309 digits), never NaN or < 0.
        let secs: f64 = text.parse().ok()?;
        return Some(if secs < MAX_RETRY_AFTER.as_secs_f64() {
            Duration::from_secs_f64(secs)
        } else {
            MAX_RETRY_AFTER
        });
    }
    let date = httpdate::parse_http_date(text).ok()?;
    Some(
        date.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

/// `1*DIGIT [ "." *DIGIT ]` or `"." 1*DIGIT`: delta-seconds, or a decimal fraction of them.
fn is_decimal(text: &str) -> bool {
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    !(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// An in-band stream error is as long as the upstream likes: bounded once owned and
    /// cut to the message limit once scrubbed, like an HTTP error body.
    #[test]
    fn a_huge_upstream_message_is_bounded_on_every_path() {
        let huge = "中".repeat(400_000);
        let owned = upstream_text(&huge);
        assert!(
            owned.len() <= MAX_SCRUBBED_BYTES + '…'.len_utf8(),
            "{}",
            owned.len()
        );
        let e = ProviderError::new(ErrorKind::ServerError, owned).redacted(&Redactor::default());
        assert!(
            e.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8(),
            "{}",
            e.message.len()
        );
        assert!(e.message.ends_with('…'));
        assert_eq!(upstream_text("short"), "short");
    }

    #[test]
    fn classifies_statuses() {
        let e =
            |s, b: &str| ProviderError::from_response(s, None, b.as_bytes(), &Redactor::default());
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
        assert!(
            ProviderError::from_response(400, None, llama.as_bytes(), &Redactor::default())
                .is_context_length()
        );
        let openai = r#"{"error":{"message":"This model's maximum context length is 8192 tokens","type":"invalid_request_error","code":"context_length_exceeded"}}"#;
        let e = ProviderError::from_response(400, None, openai.as_bytes(), &Redactor::default());
        assert!(e.is_context_length());
        assert!(!e.is_retryable());
        assert_eq!(
            e.message,
            "This model's maximum context length is 8192 tokens"
        );
    }

    fn retry_after(text: &str) -> Option<Duration> {
        parse_retry_after(Some(&http::HeaderValue::from_str(text).unwrap()))
    }

    #[test]
    fn parses_retry_after_seconds() {
        assert_eq!(retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(None), None);
    }

    #[test]
    fn parses_decimal_retry_after_seconds() {
        assert_eq!(retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(retry_after("0.25"), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(".5"), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("3."), Some(Duration::from_secs(3)));
    }

    #[test]
    fn caps_huge_retry_after_seconds() {
        assert_eq!(retry_after("3600"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("3601"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("18446744073709551615"), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after("18446744073709551616.5"), Some(MAX_RETRY_AFTER));
        // Parses to +inf as an f64.
        assert_eq!(retry_after(&"9".repeat(400)), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn refuses_retry_after_that_is_not_seconds_or_a_date() {
        for text in [
            "1e30",
            "1E3",
            "-1",
            "+5",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "",
            ".",
            "1.2.3",
            "1 2",
            "5s",
            "soon",
            "0x10",
            "١٢",
            "Wed, 32 Oct 2015 07:28:00 GMT",
        ] {
            assert_eq!(retry_after(text), None, "{text:?}");
        }
        // Not visible ASCII: not even text.
        let opaque = http::HeaderValue::from_bytes(b"\xff10").unwrap();
        assert_eq!(parse_retry_after(Some(&opaque)), None);
    }

    #[test]
    fn parses_retry_after_http_dates() {
        let at = |text: &str| httpdate::parse_http_date(text).unwrap();
        let now = at("Wed, 21 Oct 2015 07:28:00 GMT");
        // IMF-fixdate, and the obsolete RFC 850 and asctime forms recipients must accept.
        for text in [
            "Wed, 21 Oct 2015 07:30:00 GMT",
            "Wednesday, 21-Oct-15 07:30:00 GMT",
            "Wed Oct 21 07:30:00 2015",
        ] {
            assert_eq!(
                parse_retry_after_at(text, now),
                Some(Duration::from_secs(120)),
                "{text}"
            );
        }
        // In the past: retry now.
        assert_eq!(
            parse_retry_after_at("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        // Far ahead: capped.
        assert_eq!(
            parse_retry_after_at("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(MAX_RETRY_AFTER)
        );
        // Through the header, against the clock: a date long gone is zero.
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_huge_retry_after_on_a_429_is_capped_not_a_panic() {
        let e = ProviderError::from_response(429, retry_after("1e30"), b"{}", &Redactor::default());
        assert_eq!(e.retry_after, None);
        let e = ProviderError::from_response(
            429,
            retry_after("18446744073709551615"),
            b"{}",
            &Redactor::default(),
        );
        assert_eq!(e.retry_after, Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn long_messages_are_cut() {
        let body = "x".repeat(2000);
        let e = ProviderError::from_response(500, None, body.as_bytes(), &Redactor::default());
        assert!(e.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
    }

    #[test]
    fn an_echoed_authorization_header_is_scrubbed_from_the_message() {
        use crate::key::ApiKey;
        use secrecy::SecretString;
        let key = ApiKey::new(SecretString::from("sk-echoed-0123456789"));
        let r = Redactor::new([key.clone()]);
        let body = r#"{"error":{"message":"Invalid key. Headers: {\"authorization\": \"Bearer sk-echoed-0123456789\"}"}}"#;
        let e = ProviderError::from_response(401, None, body.as_bytes(), &r);
        assert!(!e.message.contains("sk-echoed"), "{}", e.message);
        assert!(
            e.message.contains(&format!("Bearer key#{}", key.id())),
            "{}",
            e.message
        );
        // Not JSON: the raw body is the message, scrubbed the same way.
        let e = ProviderError::from_response(401, None, b"bad key sk-echoed-0123456789", &r);
        assert_eq!(e.message, format!("bad key key#{}", key.id()));
        // An unknown token after Bearer is redacted too.
        let e = ProviderError::from_response(403, None, b"got Bearer other-token", &r);
        assert_eq!(e.message, "got Bearer [redacted]");
    }

    #[test]
    fn a_key_straddling_the_length_cut_leaves_no_piece() {
        use crate::key::ApiKey;
        use secrecy::SecretString;
        let secret = "zzzz-a-long-configured-key-0123456789";
        let r = Redactor::new([ApiKey::new(SecretString::from(secret))]);
        // The key starts 10 bytes before the cut.
        let body = format!(
            "{}{secret}{}",
            "x".repeat(MAX_MESSAGE_BYTES - 10),
            "y".repeat(100)
        );
        let e = ProviderError::from_response(500, None, body.as_bytes(), &r);
        assert!(!e.message.contains(&secret[..10]), "{}", e.message);
        assert!(e.message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
    }
}
