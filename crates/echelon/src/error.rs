//! The error a caller gets when the gateway cannot answer.

use std::time::Duration;

use echelon_types::{Attempt, ErrorBody};

/// Why a request failed, as the HTTP status it maps to (DESIGN.md §4 "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayErrorKind {
    /// 400: the request is malformed, or a provider refused it as the client's fault
    /// (including a prompt too long for every candidate's context window).
    BadRequest,
    /// 404: the `model` field names no model or task group.
    UnknownRoute,
    /// 429: every attempt was rate-limited (see [`GatewayError::retry_after`]).
    RateLimited,
    /// 502: every attempt failed, for mixed or upstream reasons.
    UpstreamFailed,
    /// 503: no candidate could be tried at all.
    Unavailable,
    /// 504: every attempt timed out (`timeout` or `first_token_timeout`).
    Timeout,
}

/// A failed request: its kind, a message, and every attempt made.
///
/// Ask it questions ([`status`](Self::status), [`is_retryable`](Self::is_retryable),
/// [`attempts`](Self::attempts)); render it with [`to_body`](Self::to_body). It never
/// carries an API key: attempts name keys by their short id.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct GatewayError {
    kind: GatewayErrorKind,
    message: String,
    param: Option<String>,
    code: Option<String>,
    attempts: Vec<Attempt>,
    retry_after: Option<Duration>,
}

impl GatewayError {
    /// A new error without attempts.
    pub fn new(kind: GatewayErrorKind, message: impl Into<String>) -> Self {
        GatewayError {
            kind,
            message: message.into(),
            param: None,
            code: None,
            attempts: Vec::new(),
            retry_after: None,
        }
    }

    /// Sets the request field at fault (a JSON path).
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    /// Appends a sentence to the message.
    pub fn with_note(mut self, note: impl AsRef<str>) -> Self {
        self.message.push_str(" (");
        self.message.push_str(note.as_ref());
        self.message.push(')');
        self
    }

    /// Sets the attempts.
    pub fn with_attempts(mut self, attempts: Vec<Attempt>) -> Self {
        self.attempts = attempts;
        self
    }

    /// Sets how long the caller should wait before sending the request again (the
    /// `Retry-After` of a 429).
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// How long the caller should wait before sending the request again, when known:
    /// on the 429 of a request whose every candidate was rate-limited, the smallest
    /// wait among them (a provider's `Retry-After`, or the remaining cooldown of a
    /// model's keys; zero when one's time has already come). The server sends it as
    /// the `Retry-After` header, in whole seconds rounded up, at least 1.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The kind.
    pub fn kind(&self) -> GatewayErrorKind {
        self.kind
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The machine-readable code, when it has one (`stream_interrupted`,
    /// `context_length_exceeded`, …).
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Every attempt made, in order.
    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// The HTTP status: 400, 404, 429, 502, 503 or 504.
    pub fn status(&self) -> u16 {
        match self.kind {
            GatewayErrorKind::BadRequest => 400,
            GatewayErrorKind::UnknownRoute => 404,
            GatewayErrorKind::RateLimited => 429,
            GatewayErrorKind::UpstreamFailed => 502,
            GatewayErrorKind::Unavailable => 503,
            GatewayErrorKind::Timeout => 504,
        }
    }

    /// Whether the same request may succeed later unchanged (429, 502, 503, 504).
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self.kind,
            GatewayErrorKind::BadRequest | GatewayErrorKind::UnknownRoute
        )
    }

    /// The OpenAI error `type` for this kind.
    pub fn error_type(&self) -> &'static str {
        match self.kind {
            GatewayErrorKind::BadRequest | GatewayErrorKind::UnknownRoute => {
                "invalid_request_error"
            }
            GatewayErrorKind::RateLimited => "rate_limit_error",
            GatewayErrorKind::UpstreamFailed => "upstream_error",
            GatewayErrorKind::Unavailable => "service_unavailable",
            GatewayErrorKind::Timeout => "timeout",
        }
    }

    /// The OpenAI error body, with `attempts`.
    pub fn to_body(&self) -> ErrorBody {
        let mut body = ErrorBody::new(self.error_type(), self.message.clone());
        body.error.param = self.param.clone();
        body.error.code = self.code.clone();
        body.error.attempts = self.attempts.clone();
        body
    }
}
