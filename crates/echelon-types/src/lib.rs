//! OpenAI chat-completion wire types for Echelon.
//!
//! The gateway models only the fields it acts on (`model`, `messages`, `stream`,
//! `max_tokens`, `usage`, …). Everything else a client or provider sends — `tools`,
//! `response_format`, `logprobs`, llama.cpp's `timings`, vendor extras — is kept in an
//! `extra` map (`#[serde(flatten)]`) and passes through both ways untouched.
//!
//! Shapes follow the OpenAI API reference for `POST /v1/chat/completions`
//! (<https://platform.openai.com/docs/api-reference/chat>) and `POST /v1/embeddings`
//! (`embeddings.rs`).

pub mod anthropic;
mod chat;
mod echo;
mod embeddings;
mod error;
mod outcome;
mod request_check;
pub mod responses;
mod stream;

pub use chat::{
    ChatCompletion, ChatCompletionRequest, ChatMessage, Choice, NativeMessages, NativeRequest,
    NativeResponse, NativeResponses, Role, StreamOptions, Usage,
};
pub use echo::{MAX_ECHOED_NAME_BYTES, bounded_name, bounded_to};
pub use embeddings::{
    Embedding, EmbeddingInput, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage,
    EmbeddingVector, EncodingFormat, InputItem, parse_embedding_request,
};
pub use error::{Attempt, ErrorBody, ErrorObject};
pub use outcome::{ErrorKind, Outcome, SkipReason, UnknownErrorKind, UnknownOutcome};
pub use request_check::{RequestError, parse_request};
pub use stream::{ChatCompletionChunk, ChunkChoice, Delta, Verbatim};

/// A JSON object of fields the gateway does not model, kept as they came.
pub type Extra = serde_json::Map<String, serde_json::Value>;
