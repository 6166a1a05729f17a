//! The OpenAI error body, extended with the attempts the gateway made.

use serde::{Deserialize, Serialize};

use crate::{Extra, Outcome};

/// `{"error": {...}}`: what every failed request receives (DESIGN.md §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// The error object of an [`ErrorBody`].
///
/// `type` and `code` follow OpenAI's values where one fits (`invalid_request_error`,
/// `authentication_error`, `rate_limit_error`, …). `attempts` is Echelon's addition:
/// every call the gateway made for the request, so the failure can be read without logs.
/// The official Python SDK exposes it as `err.body["attempts"]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    /// Human-readable explanation.
    pub message: String,
    /// Error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (a JSON path such as `messages[0].role`), when one is.
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code, e.g. `model_not_found`.
    #[serde(default)]
    pub code: Option<String>,
    /// Every attempt made, in order; empty when none was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// Other fields a provider sent, passed through.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ErrorBody {
    /// An error body without attempts.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorBody {
            error: ErrorObject {
                message: message.into(),
                kind: kind.into(),
                param: None,
                code: None,
                attempts: Vec::new(),
                extra: Extra::new(),
            },
        }
    }

    /// Sets `code`.
    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.error.code = Some(code.into());
        self
    }

    /// Sets `param`.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.error.param = Some(param.into());
        self
    }
}

/// One call to one model with one key, as reported to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The model id (config name, not the upstream name).
    pub model: String,
    /// The provider id.
    pub provider: String,
    /// Short id of the API key used (first 4 bytes of its SHA-256, hex); never the key.
    #[serde(default)]
    pub key_id: Option<String>,
    /// HTTP status the provider answered, if it answered.
    #[serde(default)]
    pub status: Option<u16>,
    /// What became of it: `ok`, a failure kind (`timeout`, `connect`, `rate_limited`,
    /// `server_error`, …) or a skip reason (`circuit_open`, `token_bucket`, …); on the
    /// wire the field is `error_kind`.
    #[serde(rename = "error_kind")]
    pub outcome: Outcome,
    /// The provider's message or the local reason, trimmed.
    #[serde(default)]
    pub message: String,
    /// Wall time of the attempt, milliseconds.
    pub latency_ms: u64,
}
