//! Providers: the wires Echelon speaks to an upstream, one call with one key at a time.
//!
//! A provider knows nothing of retries or failover; it makes the call, enforces the
//! attempt's timeouts, and classifies what went wrong ([`ProviderError`]) so the layers
//! above can decide (DESIGN.md §4 "Which errors move on").
//!
//! # Adding a wire
//! A new wire goes in `provider/<name>/` implementing [`Provider`], selected in
//! [`build`] by a new [`ProviderApi`] variant. It owns its URLs, auth headers, request
//! mapping (from the neutral [`ProviderRequest`]), response and stream-event mapping
//! (into [`ChunkStream::from_events`]) and error classification (into
//! [`ProviderError`], its messages scrubbed by the model's [`Redactor`]: upstream text
//! can hold the key it was sent). What every wire shares stays here: [`Timeouts`], the HTTP
//! clients ([`HttpClients`]), the stream contract ([`ChunkStream`]) and the error
//! classes. `openai/` ([`OpenAiProvider`]) is the first wire.
//!
//! # Layout
//! - `mod.rs`: the [`Provider`] trait, [`ProviderRequest`], [`ProbeKind`], [`build`].
//! - `error.rs`: [`ProviderError`], [`ErrorKind`], `Retry-After` parsing.
//! - `http.rs`: [`HttpClients`], the reqwest clients the wires share.
//! - `stream.rs`: [`ChunkStream`], the stream contract (timeouts, a complete end).
//! - `openai/`: [`OpenAiProvider`], the OpenAI chat-completions wire.
//! - `anthropic/`: [`AnthropicProvider`], the Anthropic Messages wire.
//! - `gemini/`: [`GeminiProvider`], the Gemini API wire (`generateContent`).

mod anthropic;
mod error;
mod gemini;
mod http;
mod openai;
mod stream;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use echelon_types::{ChatCompletion, ChatCompletionRequest, EmbeddingRequest, EmbeddingResponse};
use futures::future::BoxFuture;

use crate::config::{MalformedEvent, ProviderApi, ProviderConfig};
use crate::key::{ApiKey, Redactor};

pub use anthropic::{AnthropicProvider, DEFAULT_MAX_TOKENS as ANTHROPIC_DEFAULT_MAX_TOKENS};
pub use error::{ErrorKind, MAX_RETRY_AFTER, ProviderError};
pub use gemini::GeminiProvider;
pub use http::HttpClients;
pub use openai::OpenAiProvider;
pub use stream::{ChunkStream, MAX_MALFORMED_IN_A_ROW, StreamEvent};

/// Default largest answer a provider reads, bytes (32 MiB): a model's
/// `max_response_bytes` (`config::ModelConfig::max_response_bytes`).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 << 20;

/// The timeouts of one attempt (DESIGN.md §4 "Streams").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// The whole attempt, from sending to the last byte of the answer.
    pub total: Duration,
    /// Streams: from sending to the first chunk that carries content.
    pub first_token: Duration,
    /// Streams: the longest gap between two chunks.
    pub chunk_gap: Duration,
}

/// What a health probe sends (a polling pool's `health_check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// The provider's model list (OpenAI: `GET {base_url}/models`): cheap, no tokens;
    /// passes on any 2xx.
    Models,
    /// A one-token chat completion (`"ping"`, `max_tokens: 1`) of the upstream model;
    /// passes on a 2xx completion.
    Completion,
}

/// One chat completion to send, in no wire's format: the client's request, shared as it
/// came (never cloned per tier or attempt), and what this attempt changes in it. Each
/// wire applies the changes when it serializes the request.
#[derive(Debug, Clone, Copy)]
pub struct ProviderRequest<'a> {
    /// The request as the client sent it (its `model` is the route, not sent; its
    /// `stream` and `stream_options.include_usage` are replaced by [`stream`](Self::stream)).
    pub body: &'a ChatCompletionRequest,
    /// The name the provider knows the model by, sent in place of `body.model`.
    pub model: &'a str,
    /// The echelon's default temperature: sent only when `body.temperature` is unset.
    pub temperature: Option<f64>,
    /// The echelon's default generation cap, tokens: sent only when the body sets neither
    /// `max_tokens` nor `max_completion_tokens`.
    pub max_tokens: Option<u32>,
    /// Whether to ask for a stream (and, in it, a final usage chunk).
    pub stream: bool,
}

impl<'a> ProviderRequest<'a> {
    /// A request of `body` to `model` with no defaults.
    pub fn new(body: &'a ChatCompletionRequest, model: &'a str, stream: bool) -> Self {
        ProviderRequest {
            body,
            model,
            temperature: None,
            max_tokens: None,
            stream,
        }
    }

    /// The temperature sent: the body's, else the default.
    pub fn effective_temperature(&self) -> Option<f64> {
        self.body.temperature.or(self.temperature)
    }

    /// The generation cap sent, tokens: the body's (`max_completion_tokens`, else
    /// `max_tokens`), else the default.
    pub fn effective_max_tokens(&self) -> Option<u32> {
        self.body.max_output_tokens().or(self.max_tokens)
    }
}

/// One embeddings call to send: the client's request, shared as it came, and the name
/// the provider knows the model by (sent in place of `body.model`).
#[derive(Debug, Clone, Copy)]
pub struct EmbedRequest<'a> {
    /// The request as the client sent it (its `model` is the route, not sent).
    pub body: &'a EmbeddingRequest,
    /// The upstream model name.
    pub model: &'a str,
}

/// The message of [`Provider::embed`]'s default answer.
pub const NO_EMBEDDINGS: &str = "this wire does not serve embeddings";

/// One upstream wire: calls, streams and probes an endpoint with one key at a time.
///
/// Object-safe (models hold an `Arc<dyn Provider>`): the operations return boxed
/// futures. Implementations enforce [`Timeouts`] themselves and classify every failure
/// as a [`ProviderError`] whose message went through the [`Redactor`] they were built
/// with (no configured key, no `Bearer` token, no `sk-…` shape); they never retry.
pub trait Provider: Send + Sync + fmt::Debug {
    /// A non-streamed chat completion (`req.stream` is false).
    ///
    /// # Errors
    /// A classified [`ProviderError`]: HTTP errors by status, timeouts (total),
    /// connection errors, and `Malformed` for a 2xx body that is not a chat completion,
    /// has no choices, has a choice without a `finish_reason` (missing or null: the
    /// answer may be cut short), or is longer than the provider's largest answer.
    fn call<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChatCompletion, ProviderError>>;

    /// Starts a streamed chat completion (`req.stream` is true).
    ///
    /// Resolves once the provider has answered 2xx; the chunks are then read from the
    /// [`ChunkStream`], which enforces the first-token, chunk-gap and total timeouts.
    ///
    /// # Errors
    /// As [`call`](Self::call); the first-token timeout also bounds the wait for headers.
    fn stream<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>>;

    /// One health probe of `upstream_model` (see [`ProbeKind`]); straight to the
    /// provider, bounded by the connect timeout plus a few seconds (`Models`) or the
    /// total timeout (`Completion`).
    ///
    /// # Errors
    /// Why the probe failed, classified as for [`call`](Self::call).
    fn probe<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        kind: ProbeKind,
        upstream_model: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>>;

    /// Whether [`embed`](Self::embed) is implemented. Default `false`: the router then
    /// passes the model over for embeddings requests without admitting or calling it
    /// (`routing/attempt.rs`), so its breaker and buckets never see them.
    fn serves_embeddings(&self) -> bool {
        false
    }

    /// One embeddings call (`POST {base_url}/embeddings` on the OpenAI wire), bounded by
    /// the total timeout and the largest answer. The vectors come back in the encoding
    /// the request asks for (`float` or `base64`), converted when the provider sent the
    /// other.
    ///
    /// # Errors
    /// As [`call`](Self::call); `Malformed` for a 2xx body that is not an embeddings
    /// list, holds another number of vectors than the request has inputs, or has a
    /// base64 vector that does not decode.
    ///
    /// The default (a wire without embeddings: `serves_embeddings` is false) fails at
    /// once with kind [`ErrorKind::NotFound`] and the message [`NO_EMBEDDINGS`]: not
    /// `BadRequest`, because the request is not at fault and another model of the
    /// route may serve it; `NotFound` is what an OpenAI-compatible server without the
    /// endpoint answers.
    fn embed<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a EmbedRequest<'a>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        let _ = (key, req);
        Box::pin(std::future::ready(Err(ProviderError::new(
            ErrorKind::NotFound,
            NO_EMBEDDINGS,
        ))))
    }

    /// The attempt timeouts.
    fn timeouts(&self) -> Timeouts;

    /// The endpoint called, for logs (a URL without credentials in the usual config).
    fn endpoint(&self) -> &str;
}

/// The provider for a model: the wire `provider.api` selects (and, for `api: openai`,
/// `provider.responses` whether `/v1/responses` requests go to its own Responses API), at `base_url` (e.g.
/// `http://127.0.0.1:8082/v1`) over `http` (from [`HttpClients::get`], whose connect
/// timeout should be `timeouts.connect`); the other timeouts apply per request. Its
/// error messages are scrubbed by `redactor` (the model's keys, from
/// [`KeyPool::redactor`](crate::resilience::key_pool::KeyPool::redactor)). An
/// answer longer than `max_response_bytes` (a non-streamed body, a stream's whole body)
/// fails the call as [`ErrorKind::Malformed`]. A stream event that is not a chunk is
/// skipped and counted or ends the stream, as `malformed_event` says (the model's
/// `malformed_event`, [`StreamEvent::Malformed`]).
pub fn build(
    provider: &ProviderConfig,
    http: reqwest::Client,
    base_url: &str,
    timeouts: Timeouts,
    redactor: Redactor,
    max_response_bytes: usize,
    malformed_event: MalformedEvent,
) -> Arc<dyn Provider> {
    match provider.api {
        ProviderApi::OpenAi => Arc::new(
            OpenAiProvider::new(http, base_url, timeouts)
                .with_responses(provider.responses)
                .with_redactor(redactor)
                .with_max_response_bytes(max_response_bytes)
                .with_malformed_event(malformed_event),
        ),
        ProviderApi::Anthropic => Arc::new(
            AnthropicProvider::new(http, base_url, timeouts)
                .with_redactor(redactor)
                .with_max_response_bytes(max_response_bytes)
                .with_malformed_event(malformed_event),
        ),
        ProviderApi::Gemini => Arc::new(
            GeminiProvider::new(http, base_url, timeouts)
                .with_redactor(redactor)
                .with_max_response_bytes(max_response_bytes)
                .with_malformed_event(malformed_event),
        ),
    }
}

/// The request body a model of wire `api` sends for `req`, as JSON bytes: OpenAI chat
/// completions, Anthropic Messages or Gemini `generateContent` (the same translation a
/// call makes). For tools and benchmarks that show or measure what a request becomes.
///
/// # Errors
/// A request the wire cannot carry ([`ErrorKind::Malformed`]; e.g. a Gemini request
/// whose messages translate to no content).
pub fn wire_body(api: ProviderApi, req: &ProviderRequest<'_>) -> Result<Vec<u8>, ProviderError> {
    match api {
        ProviderApi::OpenAi => openai::body(req),
        ProviderApi::Anthropic => anthropic::body(req),
        ProviderApi::Gemini => gemini::body(req),
    }
}

/// The chat completion of a non-streamed answer `body` of wire `api` (the same decoding
/// and checks a call makes).
///
/// # Errors
/// [`ErrorKind::Malformed`] for a body that is not that wire's answer or answers
/// nothing; a Gemini in-band error or blocked prompt as the call classifies it.
pub fn wire_answer(api: ProviderApi, body: &[u8]) -> Result<ChatCompletion, ProviderError> {
    match api {
        ProviderApi::OpenAi => openai::answer(body),
        ProviderApi::Anthropic => anthropic::answer(body),
        ProviderApi::Gemini => gemini::answer(body, &Redactor::default()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A wire with chat only: what every wire is until it implements `embed`.
    #[derive(Debug)]
    struct ChatOnly;

    impl Provider for ChatOnly {
        fn call<'a>(
            &'a self,
            _: Option<&'a ApiKey>,
            _: &'a ProviderRequest<'a>,
        ) -> BoxFuture<'a, Result<ChatCompletion, ProviderError>> {
            unimplemented!()
        }
        fn stream<'a>(
            &'a self,
            _: Option<&'a ApiKey>,
            _: &'a ProviderRequest<'a>,
        ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
            unimplemented!()
        }
        fn probe<'a>(
            &'a self,
            _: Option<&'a ApiKey>,
            _: ProbeKind,
            _: &'a str,
        ) -> BoxFuture<'a, Result<(), ProviderError>> {
            unimplemented!()
        }
        fn timeouts(&self) -> Timeouts {
            unimplemented!()
        }
        fn endpoint(&self) -> &str {
            "chat-only"
        }
    }

    #[tokio::test]
    async fn a_wire_without_embeddings_refuses_them_clearly() {
        let body = EmbeddingRequest::new("r", "hello");
        let req = EmbedRequest {
            body: &body,
            model: "m",
        };
        assert!(!ChatOnly.serves_embeddings());
        let e = ChatOnly.embed(None, &req).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert_eq!(e.message, NO_EMBEDDINGS);
        assert!(
            !e.is_client_fault(),
            "another model of the route may serve it"
        );
    }
}
