//! What the gateway records about each request it served: one [`RequestRecord`] per
//! request, one [`AttemptRecord`] per attempt (DESIGN.md §3: "usage and cost are recorded
//! once per request, with every attempt").

use serde::Serialize;

/// The endpoint (dialect) a request came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `POST /v1/chat/completions`, and every chat call of the library.
    #[default]
    Chat,
    /// `POST /v1/messages` (Anthropic Messages).
    Messages,
    /// `POST /v1/responses` (OpenAI Responses).
    Responses,
    /// `POST /v1/embeddings`, and the library's embeddings calls.
    Embeddings,
}

impl Endpoint {
    /// `chat`, `messages`, `responses` or `embeddings`, as stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Messages => "messages",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
        }
    }
}

/// One request, as the ledger and the metrics see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    /// The request id (also the `x-request-id` response header).
    pub request_id: String,
    /// When the request arrived, Unix time in milliseconds.
    pub started_at_unix_ms: u64,
    /// The route the request named (`model` field), after `default` resolution; an unknown
    /// name is kept cut to [`echelon_types::MAX_ECHOED_NAME_BYTES`] (`…(N bytes)` marks the
    /// cut).
    pub route: String,
    /// The model id that answered; `None` when none did.
    pub model: Option<String>,
    /// Its provider id.
    pub provider: Option<String>,
    /// The HTTP status the caller got (200, or the error's status; 499 when the client
    /// went away before the answer was complete, streamed or not).
    pub status: u16,
    /// Whether the caller asked for a stream.
    pub stream: bool,
    /// Which endpoint (dialect) the request came in by; the ledger's `endpoint` column.
    pub endpoint: Endpoint,
    /// Wall time from arrival to the last byte, milliseconds.
    pub latency_ms: u64,
    /// Streams: time to the first content chunk, milliseconds.
    pub ttft_ms: Option<u64>,
    /// Prompt tokens over all attempts that consumed tokens.
    pub prompt_tokens: u64,
    /// Completion tokens over all attempts that consumed tokens.
    pub completion_tokens: u64,
    /// Of [`prompt_tokens`](Self::prompt_tokens), those read from the provider's prompt
    /// cache (`prompt_tokens_details.cached_tokens`; Anthropic's
    /// `cache_read_input_tokens`); the ledger's `cached_tokens` column.
    pub cached_tokens: u64,
    /// Of [`prompt_tokens`](Self::prompt_tokens), those written to the provider's prompt
    /// cache (Anthropic's `cache_creation_input_tokens`); the ledger's
    /// `cache_write_tokens` column.
    pub cache_write_tokens: u64,
    /// Cost over all attempts, USD.
    pub cost_usd: f64,
    /// Whether any token figure was counted locally (tiktoken) because the provider sent
    /// no usage.
    pub estimated: bool,
    /// Whether the request moved past its first candidate.
    pub fallback: bool,
    /// Streams: the stream ended with `[DONE]` but no chunk carried a `finish_reason`
    /// (delivered, but flagged: the answer may be incomplete; the ledger's
    /// `no_finish_reason` column, the `echelon_stream_no_finish_reason_total` metric).
    pub no_finish_reason: bool,
    /// Streams: malformed SSE events of the answering attempt's stream (events whose
    /// data was not a chunk: skipped with `malformed_event: skip`, or the one that ended
    /// the stream); 0 for non-streamed requests (the ledger's `stream_anomalies`
    /// column, the `echelon_stream_anomalies_total{kind="malformed_event"}` metric).
    pub stream_anomalies: u32,
    /// Every attempt, in order (skips included, with zero tokens).
    pub attempts: Vec<AttemptRecord>,
}

/// One attempt of a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    /// The model id.
    pub model: String,
    /// The provider id.
    pub provider: String,
    /// Short id of the key used; never the key.
    pub key_id: Option<String>,
    /// The provider's HTTP status, when it answered.
    pub status: Option<u16>,
    /// What became of it (`ok`, the error kind or the skip reason; the ledger's
    /// `error_kind` column).
    #[serde(rename = "error_kind")]
    pub outcome: echelon_types::Outcome,
    /// Wall time of the attempt, milliseconds.
    pub latency_ms: u64,
    /// Prompt tokens this attempt consumed.
    pub prompt_tokens: u64,
    /// Completion tokens this attempt consumed.
    pub completion_tokens: u64,
    /// Its cost, USD.
    pub cost_usd: f64,
    /// Whether its tokens were counted locally.
    pub estimated: bool,
}
