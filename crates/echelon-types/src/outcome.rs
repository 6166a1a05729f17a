//! What became of one attempt: answered, failed (and how), or passed over without a call.
//!
//! The router, the ledger, the metrics and the error bodies all speak of attempts with
//! these types; the snake_case names ([`Outcome::as_str`]) exist only on the wire
//! (`attempts[].error_kind`, the `x-echelon-attempts` header, ledger rows, metric labels).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The class of a failed provider call (DESIGN.md §4 "Which errors move on").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// A deadline other than the first token's fired: the whole attempt's `timeout`
    /// (or its echelon's), or a stream's chunk gap (`chunk_timeout`).
    Timeout,
    /// A stream's first content chunk did not come within the model's
    /// `first_token_timeout` (a silent or slow upstream; the deadline also covers the
    /// response head). Its own kind so that `retry_on` can treat it apart from
    /// [`ErrorKind::Timeout`]; both are timeouts ([`ErrorKind::is_timeout`]).
    FirstTokenTimeout,
    /// The TCP/TLS connection failed or was reset before an answer.
    Connect,
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
    /// HTTP 401/403: the key is refused.
    Auth,
    /// HTTP 404: the provider does not know the model or path (a config problem).
    NotFound,
    /// The prompt does not fit the model's context window.
    ContextLength,
    /// Any other 4xx: the request itself is at fault.
    BadRequest,
    /// A 2xx whose body or SSE stream could not be parsed, that carried no answer (no
    /// choices; a stream ended without content, tool call or finish reason), or that was
    /// larger than the model's `max_response_bytes`.
    Malformed,
    /// The stream ended (or the connection dropped) before `[DONE]` / a finish reason.
    StreamCut,
    /// The client went away before the answer was complete (status 499).
    Cancelled,
}

impl ErrorKind {
    /// Every kind, in declaration order.
    pub const ALL: [ErrorKind; 12] = [
        ErrorKind::Timeout,
        ErrorKind::FirstTokenTimeout,
        ErrorKind::Connect,
        ErrorKind::RateLimited,
        ErrorKind::ServerError,
        ErrorKind::Auth,
        ErrorKind::NotFound,
        ErrorKind::ContextLength,
        ErrorKind::BadRequest,
        ErrorKind::Malformed,
        ErrorKind::StreamCut,
        ErrorKind::Cancelled,
    ];

    /// The wire name (`attempts[].error_kind`, logs, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::FirstTokenTimeout => "first_token_timeout",
            ErrorKind::Connect => "connect",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Auth => "auth",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ContextLength => "context_length",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Malformed => "malformed",
            ErrorKind::StreamCut => "stream_cut",
            ErrorKind::Cancelled => "cancelled",
        }
    }

    /// The kind whose wire name is `name` ([`as_str`](Self::as_str)).
    pub fn from_name(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether a deadline fired: [`ErrorKind::Timeout`] or
    /// [`ErrorKind::FirstTokenTimeout`] (a request whose every attempt timed out, of
    /// either kind, is a 504).
    pub fn is_timeout(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::FirstTokenTimeout)
    }

    /// Whether a failure of this kind says the model is unhealthy: it feeds the model's
    /// circuit breaker and its polling pool's health. Key and request problems (401/403,
    /// 429, 400, a context-length refusal) and a client that went away do not.
    pub fn counts_against_health(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout
                | ErrorKind::FirstTokenTimeout
                | ErrorKind::Connect
                | ErrorKind::ServerError
                | ErrorKind::Malformed
                | ErrorKind::StreamCut
                | ErrorKind::NotFound
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`ErrorKind`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error kind `{0}`")]
pub struct UnknownErrorKind(pub String);

impl FromStr for ErrorKind {
    type Err = UnknownErrorKind;

    /// The kind of a wire name ([`ErrorKind::as_str`]).
    fn from_str(s: &str) -> Result<ErrorKind, UnknownErrorKind> {
        ErrorKind::from_name(s).ok_or_else(|| UnknownErrorKind(s.to_owned()))
    }
}

/// Why a candidate was passed over without a call (README "Resilience (per model)").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    /// Its circuit breaker is open (or half-open with every probe slot taken).
    CircuitOpen,
    /// A token bucket (`rpm_limit`, `rate_limit_*`, `tpm_limit`, an echelon's `rpm_limit`)
    /// had no room within `queue_timeout`.
    TokenBucket,
    /// A concurrency limit (the model's or its echelon's) had no free slot in time.
    Concurrency,
    /// Every key of its pool is cooling down after a 429.
    KeyCooldown,
    /// Every key of its pool is disabled (refused with 401/403).
    NoKey,
    /// `provider_failover`: its provider already failed for this request.
    ProviderFailed,
    /// The prompt plus `max_tokens` does not fit its declared `context_window`.
    ContextWindow,
}

impl SkipReason {
    /// Every reason, in declaration order.
    pub const ALL: [SkipReason; 7] = [
        SkipReason::CircuitOpen,
        SkipReason::TokenBucket,
        SkipReason::Concurrency,
        SkipReason::KeyCooldown,
        SkipReason::NoKey,
        SkipReason::ProviderFailed,
        SkipReason::ContextWindow,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::CircuitOpen => "circuit_open",
            SkipReason::TokenBucket => "token_bucket",
            SkipReason::Concurrency => "concurrency",
            SkipReason::KeyCooldown => "key_cooldown",
            SkipReason::NoKey => "no_key",
            SkipReason::ProviderFailed => "provider_failed",
            SkipReason::ContextWindow => "context_window",
        }
    }

    /// Whether the skip means "rate-limited now" (a local limit or a cooling key), as
    /// opposed to "not callable at all".
    pub fn is_rate_limit(self) -> bool {
        matches!(
            self,
            SkipReason::TokenBucket | SkipReason::Concurrency | SkipReason::KeyCooldown
        )
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What became of one attempt. On the wire it is one snake_case name: `ok`, an
/// [`ErrorKind`] name or a [`SkipReason`] name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The call answered.
    Ok,
    /// The call was made and failed.
    Failed(ErrorKind),
    /// No call was made.
    Skipped(SkipReason),
}

impl Outcome {
    /// Every outcome: `ok`, then the error kinds, then the skip reasons.
    pub fn all() -> impl Iterator<Item = Outcome> {
        std::iter::once(Outcome::Ok)
            .chain(ErrorKind::ALL.into_iter().map(Outcome::Failed))
            .chain(SkipReason::ALL.into_iter().map(Outcome::Skipped))
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(k) => k.as_str(),
            Outcome::Skipped(r) => r.as_str(),
        }
    }

    /// Whether this outcome says the model is unhealthy ([`ErrorKind::counts_against_health`]).
    pub fn counts_against_health(self) -> bool {
        matches!(self, Outcome::Failed(k) if k.counts_against_health())
    }

    /// Whether the candidate was rate-limited: a 429 from the provider, or a local limit
    /// or cooling key that turned it away.
    pub fn is_rate_limit(self) -> bool {
        match self {
            Outcome::Failed(k) => k == ErrorKind::RateLimited,
            Outcome::Skipped(r) => r.is_rate_limit(),
            Outcome::Ok => false,
        }
    }

    /// Whether the candidate could not be called at all (breaker open, no usable key,
    /// its provider already failed), without being rate-limited.
    pub fn is_unavailable(self) -> bool {
        matches!(
            self,
            Outcome::Skipped(
                SkipReason::CircuitOpen | SkipReason::NoKey | SkipReason::ProviderFailed
            )
        )
    }

    /// Whether a call was made (an answer or a failed call, not a skip).
    pub fn is_call(self) -> bool {
        !matches!(self, Outcome::Skipped(_))
    }

    /// The failure kind, if the call failed.
    pub fn error_kind(self) -> Option<ErrorKind> {
        match self {
            Outcome::Failed(k) => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not an [`Outcome`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown attempt outcome `{0}`")]
pub struct UnknownOutcome(pub String);

impl FromStr for Outcome {
    type Err = UnknownOutcome;

    fn from_str(s: &str) -> Result<Outcome, UnknownOutcome> {
        Outcome::all()
            .find(|o| o.as_str() == s)
            .ok_or_else(|| UnknownOutcome(s.to_owned()))
    }
}

impl PartialEq<&str> for Outcome {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Outcome, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        let all: Vec<Outcome> = Outcome::all().collect();
        assert_eq!(all.len(), 1 + ErrorKind::ALL.len() + SkipReason::ALL.len());
        for o in &all {
            assert_eq!(o.as_str().parse::<Outcome>(), Ok(*o));
            let json = serde_json::to_string(o).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", o.as_str()));
            assert_eq!(serde_json::from_str::<Outcome>(&json).ok(), Some(*o));
        }
        let mut names: Vec<&str> = all.iter().map(|o| o.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert!("nonsense".parse::<Outcome>().is_err());
    }

    #[test]
    fn error_kinds_round_trip_and_first_token_timeout_is_its_own_kind() {
        for k in ErrorKind::ALL {
            assert_eq!(k.to_string().parse::<ErrorKind>(), Ok(k));
            assert_eq!(ErrorKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(
            "first_token_timeout".parse::<Outcome>(),
            Ok(Outcome::Failed(ErrorKind::FirstTokenTimeout))
        );
        assert!("nonsense".parse::<ErrorKind>().is_err());
        assert!(ErrorKind::FirstTokenTimeout.is_timeout());
        assert!(ErrorKind::Timeout.is_timeout());
        assert!(!ErrorKind::Connect.is_timeout());
        assert!(ErrorKind::FirstTokenTimeout.counts_against_health());
    }

    #[test]
    fn questions() {
        assert!(Outcome::Failed(ErrorKind::StreamCut).counts_against_health());
        assert!(!Outcome::Failed(ErrorKind::RateLimited).counts_against_health());
        assert!(!Outcome::Skipped(SkipReason::CircuitOpen).counts_against_health());
        assert!(Outcome::Failed(ErrorKind::RateLimited).is_rate_limit());
        assert!(Outcome::Skipped(SkipReason::Concurrency).is_rate_limit());
        assert!(!Outcome::Skipped(SkipReason::NoKey).is_rate_limit());
        assert!(Outcome::Skipped(SkipReason::NoKey).is_unavailable());
        assert!(!Outcome::Skipped(SkipReason::ContextWindow).is_call());
        assert!(Outcome::Ok.is_call());
    }
}
