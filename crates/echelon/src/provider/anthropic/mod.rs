//! The Anthropic Messages wire (`api: anthropic`): [`AnthropicProvider`].
//!
//! - `mod.rs`: the provider (URLs, `x-api-key` and `anthropic-version`, calls, probes,
//!   error answers).
//! - `request.rs`: the chat request translated into a Messages request, and the
//!   Messages answer back into a chat completion.
//! - `sse.rs`: the stream events, decoded into chat chunks.
//!
//! Errors (Anthropic's table, <https://docs.anthropic.com/en/api/errors>): 529
//! `overloaded_error` and 500 `api_error` are server errors (retried, counted by the
//! breaker), 429 `rate_limit_error` is rate-limited (its `retry-after` cools the key),
//! 400 `invalid_request_error` is the request's fault, except a prompt that does not
//! fit (`prompt is too long`, or the usual context wording), which is a context-length
//! error; 401/403 refuse the key. An `error` event in a stream is a failure.

mod request;
mod sse;

use std::sync::Arc;
use std::time::Duration;

use echelon_types::anthropic::{ANTHROPIC_VERSION, MessagesResponse};
use echelon_types::{
    ChatCompletion, ChatCompletionRequest, ChatMessage, NativeMessages, NativeResponse, Role,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

pub use self::request::DEFAULT_MAX_TOKENS;
use super::error::{ErrorKind, ProviderError, parse_retry_after};
use super::http::from_reqwest;
use super::openai::{capped, error_body, finished, read_capped};
use super::stream::first_token_timeout;
use super::{ChunkStream, ProbeKind, Provider, ProviderRequest, StreamEvent, Timeouts};
use crate::config::MalformedEvent;
use crate::key::{ApiKey, Redactor};

/// Added to the connect timeout to bound a `GET /v1/models` probe.
const MODELS_PROBE_EXTRA: Duration = Duration::from_secs(5);

/// One Anthropic Messages endpoint: `{base_url}/v1/messages` for calls and streams,
/// `{base_url}/v1/models` for probes (a `base_url` that already ends in `/v1` gets no
/// second one); the key as `x-api-key`, and `anthropic-version: 2023-06-01`. Every error
/// it returns has its message scrubbed by its [`Redactor`].
///
/// Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    http: reqwest::Client,
    /// `{base_url}/v1/messages`, parsed once (`Err`: the URL as written, which does not
    /// parse; each request then fails as reqwest reports it).
    messages_url: Result<reqwest::Url, String>,
    /// `{base_url}/v1/models`, the same way.
    models_url: Result<reqwest::Url, String>,
    timeouts: Timeouts,
    redactor: Redactor,
    max_response_bytes: usize,
    malformed_event: MalformedEvent,
}

fn parse_url(url: String) -> Result<reqwest::Url, String> {
    reqwest::Url::parse(&url).map_err(|_| url)
}

impl AnthropicProvider {
    /// The endpoint at `base_url` (e.g. `https://api.anthropic.com`) over `http`; the
    /// timeouts apply per request.
    pub fn new(http: reqwest::Client, base_url: &str, timeouts: Timeouts) -> Self {
        let base = base_url.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base);
        AnthropicProvider {
            http,
            messages_url: parse_url(format!("{base}/v1/messages")),
            models_url: parse_url(format!("{base}/v1/models")),
            timeouts,
            redactor: Redactor::default(),
            max_response_bytes: super::DEFAULT_MAX_RESPONSE_BYTES,
            malformed_event: MalformedEvent::default(),
        }
    }

    /// The same endpoint scrubbing error messages with `redactor` (the model's keys).
    pub fn with_redactor(mut self, redactor: Redactor) -> Self {
        self.redactor = redactor;
        self
    }

    /// The same endpoint reading answers of at most `max_bytes`; a longer answer fails
    /// the call as [`ErrorKind::Malformed`].
    pub fn with_max_response_bytes(mut self, max_bytes: usize) -> Self {
        self.max_response_bytes = max_bytes;
        self
    }

    /// The same endpoint handling a stream event that is not one as `malformed_event`
    /// says.
    pub fn with_malformed_event(mut self, malformed_event: MalformedEvent) -> Self {
        self.malformed_event = malformed_event;
        self
    }

    fn send(
        &self,
        method: reqwest::Method,
        url: &Result<reqwest::Url, String>,
        key: Option<&ApiKey>,
        timeout: Duration,
        native: Option<&NativeMessages>,
    ) -> reqwest::RequestBuilder {
        let req = match url {
            Ok(url) => self.http.request(method, url.clone()),
            Err(raw) => self.http.request(method, raw),
        };
        let version = native
            .and_then(|n| n.version.as_deref())
            .unwrap_or(ANTHROPIC_VERSION);
        let mut req = req.timeout(timeout).header("anthropic-version", version);
        // The attempt span's `traceparent` when telemetry is on.
        req = crate::telemetry::propagate(req);
        if let Some(beta) = native.and_then(|n| n.beta.as_deref()) {
            req = req.header("anthropic-beta", beta);
        }
        match key {
            Some(key) => req.header("x-api-key", key.expose()),
            None => req,
        }
    }

    fn post_messages(
        &self,
        key: Option<&ApiKey>,
        req: &ProviderRequest<'_>,
    ) -> reqwest::RequestBuilder {
        self.send(
            reqwest::Method::POST,
            &self.messages_url,
            key,
            self.timeouts.total,
            request::native_of(req.body),
        )
        .json(&request::to_messages(req))
    }

    /// One non-streamed call; with `keep_native` (the client asked in the Messages
    /// dialect) the answer keeps its own shape beside the translation.
    /// `structured` names the request's forced structured-output tool, read back as text.
    async fn call_inner(
        &self,
        send: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
        keep_native: bool,
        structured: Option<String>,
    ) -> Result<ChatCompletion, ProviderError> {
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        let message = message(&bytes)?;
        if keep_native {
            let mut completion = request::to_completion(message.clone(), structured.as_deref());
            completion.native = Some(Arc::new(NativeResponse::Anthropic(message)));
            Ok(completion)
        } else {
            Ok(request::to_completion(message, structured.as_deref()))
        }
    }

    async fn stream_inner(
        &self,
        send: reqwest::RequestBuilder,
        key: Option<&ApiKey>,
        structured: Option<String>,
    ) -> Result<ChunkStream, ProviderError> {
        let first_token_deadline = Instant::now() + self.timeouts.first_token;
        let resp = match tokio::time::timeout_at(first_token_deadline, send.send()).await {
            Ok(r) => r.map_err(from_reqwest)?,
            Err(_) => return Err(first_token_timeout(self.timeouts.first_token)),
        };
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = capped(
            resp.bytes_stream().map(|r| r.map_err(from_reqwest)),
            self.max_response_bytes,
        );
        let redactor = self.redactor.clone();
        let events = sse::events(bytes, structured).map(move |event| match event {
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

    async fn probe_inner(
        &self,
        key: Option<&ApiKey>,
        kind: ProbeKind,
        upstream_model: &str,
    ) -> Result<(), ProviderError> {
        match kind {
            ProbeKind::Models => {
                let timeout = self.timeouts.connect + MODELS_PROBE_EXTRA;
                let send = self.send(reqwest::Method::GET, &self.models_url, key, timeout, None);
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
                self.call_inner(self.post_messages(key, &req), key, false, None)
                    .await
                    .map(drop)
            }
        }
    }
}

/// The response when it is 2xx, else its classified error: as
/// [`ProviderError::from_response`] (Anthropic's body has the same `error.message`),
/// and a 400 or 413 whose message says the prompt is too long as
/// [`ErrorKind::ContextLength`].
async fn check_status(
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
    let mut e = ProviderError::from_response(status.as_u16(), retry_after, &body, redactor);
    if e.kind == ErrorKind::BadRequest
        && e.message
            .to_ascii_lowercase()
            .contains("prompt is too long")
    {
        e.kind = ErrorKind::ContextLength;
    }
    Err(e)
}

/// A non-streamed Messages answer, checked to be one (`type: message`).
fn message(bytes: &[u8]) -> Result<MessagesResponse, ProviderError> {
    let message: MessagesResponse = serde_json::from_slice(bytes).map_err(|e| {
        ProviderError::new(
            ErrorKind::Malformed,
            format!("response is not a Messages answer: {e}"),
        )
    })?;
    if message.kind != "message" {
        return Err(ProviderError::new(
            ErrorKind::Malformed,
            "response is not a Messages answer (its `type` is not `message`)",
        ));
    }
    Ok(message)
}

/// A non-streamed Messages answer as a chat completion (a `tool_use` block stays a tool
/// call: the request that would say it was a structured-output one is not known here).
pub(crate) fn answer(bytes: &[u8]) -> Result<ChatCompletion, ProviderError> {
    message(bytes).map(|m| request::to_completion(m, None))
}

/// The Messages request body of `req`, as sent.
pub(crate) fn body(req: &ProviderRequest<'_>) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&request::to_messages(req))
        .map_err(|e| ProviderError::new(ErrorKind::Malformed, e.to_string()))
}

impl Provider for AnthropicProvider {
    fn call<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChatCompletion, ProviderError>> {
        let keep_native = request::native_of(req.body).is_some();
        let structured = request::structured_tool_name(req.body);
        let call = self.call_inner(self.post_messages(key, req), key, keep_native, structured);
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
        let structured = request::structured_tool_name(req.body);
        let stream = self.stream_inner(self.post_messages(key, req), key, structured);
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

    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn endpoint(&self) -> &str {
        match &self.messages_url {
            Ok(url) => url.as_str(),
            Err(raw) => raw,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_hang_off_the_base_url_with_or_without_v1() {
        let t = Duration::from_secs(1);
        let timeouts = Timeouts {
            connect: t,
            total: t,
            first_token: t,
            chunk_gap: t,
        };
        for base in [
            "https://api.anthropic.com",
            "https://api.anthropic.com/",
            "https://api.anthropic.com/v1",
            "https://api.anthropic.com/v1/",
        ] {
            let p = AnthropicProvider::new(reqwest::Client::new(), base, timeouts);
            assert_eq!(
                p.endpoint(),
                "https://api.anthropic.com/v1/messages",
                "{base}"
            );
        }
    }
}
