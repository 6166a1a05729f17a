//! The OpenAI chat-completions wire (`api: openai`; also llama.cpp, vLLM, DeepSeek, …):
//! [`OpenAiProvider`], over reqwest with rustls.
//!
//! - `mod.rs`: the provider (URLs, bearer auth, calls, probes, embeddings, error answers).
//! - `request.rs`: the request body, serialized from a [`ProviderRequest`] by borrowing.
//! - `sse.rs`: the stream events (SSE, chunk JSON, `[DONE]`, error events).
//! - `responses.rs`: `POST /responses` for a provider that declares `responses: true`
//!   (a `/v1/responses` request sent as it came, the answer decoded back).

mod request;
mod responses;
mod sse;

use std::time::Duration;

use echelon_types::{
    ChatCompletion, ChatCompletionRequest, ChatMessage, EmbeddingInput, EmbeddingResponse,
    EncodingFormat, Extra, NativeResponse, NativeResponses, Role,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use self::request::WireRequest;
use super::error::{ErrorKind, ProviderError, parse_retry_after};
use super::http::from_reqwest;
use super::stream::first_token_timeout;
use super::{
    ChunkStream, EmbedRequest, ProbeKind, Provider, ProviderRequest, StreamEvent, Timeouts,
};
use crate::config::MalformedEvent;
use crate::key::{ApiKey, Redactor};

/// Added to the connect timeout to bound a `GET /models` probe.
const MODELS_PROBE_EXTRA: Duration = Duration::from_secs(5);

/// One OpenAI-compatible endpoint: `{base_url}/chat/completions` for calls and streams,
/// `{base_url}/embeddings` for embeddings, `{base_url}/models` for probes; the key, when there is one, as a bearer token. Every
/// error it returns (HTTP error bodies, error events and failures mid-stream, transport
/// and decoding errors) has its message scrubbed by its [`Redactor`].
///
/// Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    http: reqwest::Client,
    /// `{base_url}/chat/completions`, parsed once: reqwest would parse a string again
    /// for every request (about 7,000 instructions, a twentieth of a judged item's).
    /// `Err` holds a URL that does not parse; each request then fails as reqwest
    /// reports it.
    chat_url: Result<reqwest::Url, String>,
    /// `{base_url}/models`, the same way.
    models_url: Result<reqwest::Url, String>,
    /// `{base_url}/embeddings`, the same way.
    embeddings_url: Result<reqwest::Url, String>,
    /// `{base_url}/responses`, the same way.
    responses_url: Result<reqwest::Url, String>,
    /// Whether the provider declares `responses: true`: a `/v1/responses` request then
    /// goes to `responses_url` as the client sent it.
    responses: bool,
    timeouts: Timeouts,
    /// Scrubs the model's keys (and key shapes) out of every error message.
    redactor: Redactor,
    /// The largest answer read, bytes: a non-streamed body, or a stream's whole body.
    max_response_bytes: usize,
    /// What a stream event that is not a chunk does.
    malformed_event: MalformedEvent,
}

fn parse_url(url: String) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(&url).map_err(|_| url)
}

impl OpenAiProvider {
    /// The endpoint at `base_url` (e.g. `http://127.0.0.1:8082/v1`) over `http` (from
    /// [`HttpClients::get`](super::HttpClients::get), whose connect timeout should be
    /// `timeouts.connect`); the other timeouts apply per request.
    pub fn new(http: reqwest::Client, base_url: &str, timeouts: Timeouts) -> Self {
        let base = base_url.trim_end_matches('/');
        OpenAiProvider {
            http,
            chat_url: parse_url(format!("{base}/chat/completions")),
            models_url: parse_url(format!("{base}/models")),
            embeddings_url: parse_url(format!("{base}/embeddings")),
            responses_url: parse_url(format!("{base}/responses")),
            responses: false,
            timeouts,
            redactor: Redactor::default(),
            max_response_bytes: super::DEFAULT_MAX_RESPONSE_BYTES,
            malformed_event: MalformedEvent::default(),
        }
    }

    /// The same endpoint scrubbing error messages with `redactor` (the model's keys);
    /// without it only the generic key shapes are scrubbed.
    pub fn with_redactor(mut self, redactor: Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    /// The same endpoint sending requests that came to `/v1/responses` to its own
    /// `{base_url}/responses` as they came (`responses: true` in the provider's config);
    /// without it they are bridged to chat completions.
    pub fn with_responses(mut self, responses: bool) -> Self {
        self.responses = responses;
        self
    }

    /// The same endpoint reading answers of at most `max_bytes` (a non-streamed body,
    /// or a stream's whole body); a longer answer fails the call as
    /// [`ErrorKind::Malformed`]. Default [`DEFAULT_MAX_RESPONSE_BYTES`](super::DEFAULT_MAX_RESPONSE_BYTES).
    pub fn with_max_response_bytes(mut self, max_bytes: usize) -> Self {
        self.max_response_bytes = max_bytes;
        self
    }

    /// The same endpoint handling a stream event that is not a chunk as
    /// `malformed_event` says (default [`MalformedEvent::Skip`]: skipped and counted).
    pub fn with_malformed_event(mut self, malformed_event: MalformedEvent) -> Self {
        self.malformed_event = malformed_event;
        self
    }

    /// A request to `url` with the key as a bearer token, bounded by `timeout`.
    fn send(
        &self,
        method: reqwest::Method,
        url: &Result<reqwest::Url, String>,
        key: Option<&ApiKey>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let req = match url {
            Ok(url) => self.http.request(method, url.clone()),
            Err(raw) => self.http.request(method, raw),
        };
        // The attempt span's `traceparent` when telemetry is on.
        let req = crate::telemetry::propagate(req.timeout(timeout));
        match key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        }
    }

    /// A chat-completions POST of `req` (serialized now, without cloning its body).
    fn post_chat(
        &self,
        key: Option<&ApiKey>,
        req: &ProviderRequest<'_>,
    ) -> reqwest::RequestBuilder {
        self.send(
            reqwest::Method::POST,
            &self.chat_url,
            key,
            self.timeouts.total,
        )
        .json(&WireRequest::new(req))
    }

    async fn call_inner(
        &self,
        send: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
    ) -> Result<ChatCompletion, ProviderError> {
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        answer(&bytes)
    }

    async fn stream_inner(
        &self,
        send: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
        responses: bool,
    ) -> Result<ChunkStream, ProviderError> {
        let started = Instant::now();
        let first_token_deadline = started + self.timeouts.first_token;
        let resp = match tokio::time::timeout_at(first_token_deadline, send.send()).await {
            Ok(r) => r.map_err(from_reqwest)?,
            // No response head by the first-token deadline (a silent upstream): kind
            // `first_token_timeout`, like no content chunk by then.
            Err(_) => return Err(first_token_timeout(self.timeouts.first_token)),
        };
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = capped(
            resp.bytes_stream().map(|r| r.map_err(from_reqwest)),
            self.max_response_bytes,
        );
        // In-band error events, malformed events (a parser's message may quote the
        // data) and failures mid-stream carry upstream text too.
        let redactor = self.redactor.clone();
        let events = if responses {
            futures::future::Either::Left(responses::events(bytes))
        } else {
            futures::future::Either::Right(sse::events(bytes))
        };
        let events = events.map(move |event| match event {
            Ok(StreamEvent::Malformed(why)) => Ok(StreamEvent::Malformed(
                ProviderError::new(ErrorKind::Malformed, why)
                    .redacted(&redactor)
                    .message,
            )),
            Ok(event) => Ok(event),
            Err(e) => Err(e.redacted(&redactor)),
        });
        Ok(ChunkStream::with_deadline(
            events,
            self.timeouts,
            first_token_deadline,
            self.malformed_event,
        ))
    }

    /// Where a request goes instead of chat completions: `{base_url}/responses` with the
    /// client's own Responses request, when the provider declares `responses: true` and
    /// the request came to `/v1/responses` unchanged ([`responses::native_of`]).
    fn responses_route<'r>(
        &self,
        req: &'r ProviderRequest<'_>,
    ) -> Option<(&Result<reqwest::Url, String>, &'r NativeResponses)> {
        let native = responses::native_of(req.body).filter(|_| self.responses)?;
        Some((&self.responses_url, native))
    }

    /// One non-streamed Responses call: the Response object as a chat completion, the
    /// object itself kept beside it for the `/v1/responses` client.
    async fn call_responses(
        &self,
        send: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
    ) -> Result<ChatCompletion, ProviderError> {
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        let object: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::new(
                ErrorKind::Malformed,
                format!("response is not a Response object: {e}"),
            )
        })?;
        let mut completion = responses::to_completion(&object)?;
        completion.native = Some(std::sync::Arc::new(NativeResponse::Responses(object)));
        Ok(completion)
    }

    async fn embed_inner(
        &self,
        key: Option<&ApiKey>,
        req: &EmbedRequest<'_>,
    ) -> Result<EmbeddingResponse, ProviderError> {
        let body = WireEmbedding {
            model: req.model,
            input: &req.body.input,
            encoding_format: req.body.encoding_format,
            dimensions: req.body.dimensions,
            user: req.body.user.as_deref(),
            extra: &req.body.extra,
        };
        let send = self
            .send(
                reqwest::Method::POST,
                &self.embeddings_url,
                key,
                self.timeouts.total,
            )
            .json(&body);
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        let answer: EmbeddingResponse = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::new(
                ErrorKind::Malformed,
                format!("response is not an embeddings list: {e}"),
            )
        })?;
        // One vector per input, or the client gets vectors it cannot match to inputs.
        let inputs = req.body.input.len();
        if answer.data.len() != inputs {
            return Err(ProviderError::new(
                ErrorKind::Malformed,
                format!(
                    "response has {} vectors for {inputs} inputs",
                    answer.data.len()
                ),
            ));
        }
        // The client gets the encoding it asked for, whatever the server sent (a server
        // that ignores `encoding_format` answers floats).
        let mut answer = answer;
        answer
            .convert_to(req.body.format())
            .map_err(|why| ProviderError::new(ErrorKind::Malformed, why))?;
        Ok(answer)
    }

    async fn probe_inner(
        &self,
        key: Option<&ApiKey>,
        kind: ProbeKind,
        upstream_model: &str,
    ) -> Result<(), ProviderError> {
        match kind {
            ProbeKind::Models => {
                let timeout = self.timeouts.connect + MODELS_PROBE_EXTRA;
                let send = self.send(reqwest::Method::GET, &self.models_url, key, timeout);
                let resp = send.send().await.map_err(from_reqwest)?;
                check_status(resp, &self.redactor, key).await.map(drop)
            }
            ProbeKind::Completion => {
                let ping = ChatCompletionRequest::new(
                    upstream_model,
                    vec![ChatMessage::new(Role::User, "ping")],
                );
                let req = ProviderRequest {
                    max_tokens: Some(1),
                    ..ProviderRequest::new(&ping, upstream_model, false)
                };
                self.call_inner(self.post_chat(key, &req), key)
                    .await
                    .map(drop)
            }
        }
    }
}

/// A non-streamed chat-completions answer.
pub(crate) fn answer(bytes: &[u8]) -> Result<ChatCompletion, ProviderError> {
    let completion: ChatCompletion = serde_json::from_slice(bytes).map_err(|e| {
        ProviderError::new(
            ErrorKind::Malformed,
            format!("response is not a chat completion: {e}"),
        )
    })?;
    // `{}` and `{"choices":[]}` parse (every field has a default) but answer nothing:
    // relayed, they would be a 200 without an answer (DESIGN.md §4: "an empty 200 is
    // a failure like any other").
    if completion.choices.is_empty() {
        return Err(ProviderError::new(
            ErrorKind::Malformed,
            "response has no choices (an empty answer)",
        ));
    }
    Ok(completion)
}

/// The chat-completions request body of `req`, as sent.
pub(crate) fn body(req: &ProviderRequest<'_>) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&WireRequest::new(req))
        .map_err(|e| ProviderError::new(ErrorKind::Malformed, e.to_string()))
}

impl Provider for OpenAiProvider {
    fn call<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChatCompletion, ProviderError>> {
        if let Some((url, native)) = self.responses_route(req) {
            let send = self
                .send(reqwest::Method::POST, url, key, self.timeouts.total)
                .json(&responses::body(req, native));
            return Box::pin(async move {
                self.call_responses(send, key)
                    .await
                    .and_then(finished)
                    .map_err(|e| e.redacted(&self.redactor))
            });
        }
        let call = self.call_inner(self.post_chat(key, req), key);
        Box::pin(async move {
            call.await
                .and_then(finished)
                .map_err(|e| e.redacted(&self.redactor))
        })
    }

    fn stream<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        let (send, responses) = match self.responses_route(req) {
            Some((url, native)) => (
                self.send(reqwest::Method::POST, url, key, self.timeouts.total)
                    .json(&responses::body(req, native)),
                true,
            ),
            None => (self.post_chat(key, req), false),
        };
        let stream = self.stream_inner(send, key, responses);
        Box::pin(async move { stream.await.map_err(|e| e.redacted(&self.redactor)) })
    }

    fn probe<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        kind: ProbeKind,
        upstream_model: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        let probe = self.probe_inner(key, kind, upstream_model);
        Box::pin(async move { probe.await.map_err(|e| e.redacted(&self.redactor)) })
    }

    fn serves_embeddings(&self) -> bool {
        true
    }

    fn embed<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a EmbedRequest<'a>,
    ) -> BoxFuture<'a, Result<EmbeddingResponse, ProviderError>> {
        Box::pin(async move {
            self.embed_inner(key, req)
                .await
                .map_err(|e| e.redacted(&self.redactor))
        })
    }

    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn endpoint(&self) -> &str {
        match &self.chat_url {
            Ok(url) => url.as_str(),
            Err(raw) => raw,
        }
    }
}

/// An embeddings request body, serialized by borrowing the client's: the upstream model
/// name in place of the route, the other fields as the client sent them.
#[derive(serde::Serialize)]
struct WireEmbedding<'a> {
    model: &'a str,
    input: &'a EmbeddingInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding_format: Option<EncodingFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Extra,
}

/// A non-streamed answer whose every choice says why it stopped; one without a
/// `finish_reason` (missing or null) may be cut short and is `Malformed`, so that it
/// fails over like any malformed body (issue 19: "truncation is never success").
/// Streams are checked by their end instead (`[DONE]` or a finish reason,
/// [`ChunkStream`]). A health probe's answer is not checked: it proves the upstream
/// answers.
pub(super) fn finished(completion: ChatCompletion) -> Result<ChatCompletion, ProviderError> {
    match completion
        .choices
        .iter()
        .position(|c| c.finish_reason.is_none())
    {
        None => Ok(completion),
        Some(i) => Err(ProviderError::new(
            ErrorKind::Malformed,
            format!("response has no finish_reason (choice {i}): the answer may be incomplete"),
        )),
    }
}

/// The error of an answer longer than `max` bytes.
pub(super) fn too_large(max: usize) -> ProviderError {
    ProviderError::new(
        ErrorKind::Malformed,
        format!("response larger than max_response_bytes ({max} bytes)"),
    )
}

/// A 2xx body, read piece by piece up to `max` bytes: a `Content-Length` above it is
/// refused before reading, a body that grows past it is dropped as soon as it does (the
/// gateway never holds more than `max` bytes of one answer).
pub(in crate::provider) async fn read_capped(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<bytes::Bytes, ProviderError> {
    if resp
        .content_length()
        .is_some_and(|n| n > u64::try_from(max).unwrap_or(u64::MAX))
    {
        return Err(too_large(max));
    }
    // A body in one piece (the usual small answer) is kept as it came, without a copy.
    let Some(first) = resp.chunk().await.map_err(from_reqwest)? else {
        return Ok(bytes::Bytes::new());
    };
    if first.len() > max {
        return Err(too_large(max));
    }
    let Some(second) = resp.chunk().await.map_err(from_reqwest)? else {
        return Ok(first);
    };
    let mut body = bytes::BytesMut::from(&first[..]);
    let mut next = Some(second);
    while let Some(piece) = next {
        if body.len().saturating_add(piece.len()) > max {
            return Err(too_large(max));
        }
        body.extend_from_slice(&piece);
        next = resp.chunk().await.map_err(from_reqwest)?;
    }
    Ok(body.freeze())
}

/// Longest part of an error body kept, bytes: its message is cut far shorter (and
/// scrubbed within its first 64 KiB), so a hostile upstream's endless error body is
/// never buffered.
const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// The first [`MAX_ERROR_BODY_BYTES`] of an error answer's body (what arrived before a
/// read error, if one came first); the rest is not read.
pub(in crate::provider) async fn error_body(mut resp: reqwest::Response) -> bytes::Bytes {
    let mut body = bytes::BytesMut::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match resp.chunk().await {
            Ok(Some(piece)) => {
                let room = MAX_ERROR_BODY_BYTES - body.len();
                body.extend_from_slice(&piece[..piece.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body.freeze()
}

/// `bytes`, failing with [`too_large`] once more than `max` bytes have passed: this
/// bounds what a stream can make the gateway buffer (an SSE event without its end, the
/// answer's text kept for counting).
pub(in crate::provider) fn capped<S>(
    bytes: S,
    max: usize,
) -> impl futures::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send
where
    S: futures::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send,
{
    // (bytes seen, the cap was passed): after the error, the stream ends.
    bytes.scan((0usize, false), move |(seen, over), piece| {
        let item = if *over {
            None
        } else {
            Some(piece.and_then(|p| {
                *seen = seen.saturating_add(p.len());
                if *seen > max {
                    *over = true;
                    Err(too_large(max))
                } else {
                    Ok(p)
                }
            }))
        };
        futures::future::ready(item)
    })
}

/// The response when it is 2xx, else its classified error (status, `Retry-After`, the
/// OpenAI error body's message, scrubbed by `redactor`).
pub(super) async fn check_status(
    resp: reqwest::Response,
    redactor: &Redactor,
    key: Option<&ApiKey>,
) -> Result<reqwest::Response, ProviderError> {
    if let Some(key) = key {
        key.observe(resp.headers());
    }
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = parse_retry_after(resp.headers().get(http::header::RETRY_AFTER));
    let body = error_body(resp).await;
    Err(ProviderError::from_response(
        status.as_u16(),
        retry_after,
        &body,
        redactor,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        let t = Duration::from_secs(1);
        Timeouts {
            connect: t,
            total: t,
            first_token: t,
            chunk_gap: t,
        }
    }

    #[test]
    fn urls_hang_off_the_base_url_with_or_without_a_slash() {
        for base in ["http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1/"] {
            let p = OpenAiProvider::new(reqwest::Client::new(), base, timeouts());
            assert_eq!(p.endpoint(), "http://127.0.0.1:9/v1/chat/completions");
            assert_eq!(
                p.models_url.as_ref().unwrap().as_str(),
                "http://127.0.0.1:9/v1/models"
            );
        }
        let p = OpenAiProvider::new(reqwest::Client::new(), "not a url", timeouts());
        assert_eq!(p.endpoint(), "not a url/chat/completions");
    }

    #[tokio::test]
    async fn a_capped_body_fails_once_past_the_cap_and_then_ends() {
        let pieces =
            ["abcd", "efgh", "ijkl", "mnop"].map(|p| Ok(bytes::Bytes::from_static(p.as_bytes())));
        let out: Vec<_> = capped(futures::stream::iter(pieces), 10).collect().await;
        assert_eq!(out.len(), 3, "two pieces, then the error, then nothing");
        assert!(out[0].is_ok() && out[1].is_ok());
        let e = out[2].as_ref().unwrap_err();
        assert_eq!(e.kind, ErrorKind::Malformed);
        assert_eq!(
            e.message,
            "response larger than max_response_bytes (10 bytes)"
        );
        // Exactly at the cap is fine.
        let pieces = ["abcde", "fghij"].map(|p| Ok(bytes::Bytes::from_static(p.as_bytes())));
        let out: Vec<_> = capped(futures::stream::iter(pieces), 10).collect().await;
        assert!(out.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn a_url_that_does_not_parse_fails_each_call_cleanly() {
        let p = OpenAiProvider::new(reqwest::Client::new(), "not a url", timeouts());
        let body = ChatCompletionRequest::new("m", vec![]);
        let e = p
            .call(None, &ProviderRequest::new(&body, "m", false))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect);
        let e = p.probe(None, ProbeKind::Models, "m").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Connect);
    }

    /// A silent upstream (accepts, never answers) is abandoned at the first-token
    /// deadline, before any response head, as kind `first_token_timeout`.
    #[tokio::test]
    async fn a_silent_upstream_is_a_first_token_timeout_before_the_response_head() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(socket);
        });
        let t = Timeouts {
            first_token: Duration::from_millis(200),
            total: Duration::from_secs(10),
            ..timeouts()
        };
        let p = OpenAiProvider::new(reqwest::Client::new(), &format!("http://{addr}/v1"), t);
        let body = ChatCompletionRequest::new("m", vec![ChatMessage::new(Role::User, "hi")]);
        let started = std::time::Instant::now();
        let e = p
            .stream(None, &ProviderRequest::new(&body, "m", true))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::FirstTokenTimeout, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        held.abort();
    }
}
