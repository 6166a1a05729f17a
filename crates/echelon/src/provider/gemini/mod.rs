//! The Gemini API wire (`api: gemini`): [`GeminiProvider`], over reqwest with rustls.
//!
//! - `mod.rs`: the provider (URLs, `x-goog-api-key`, calls, streams, embeddings
//!   (`batchEmbedContents`), probes).
//! - `request.rs`: the request body, mapped from a [`ProviderRequest`].
//! - `response.rs`: responses and stream responses mapped to chat completions / chunks.
//! - `sse.rs`: the stream events (SSE whose data is a whole response; no `[DONE]`).
//! - `error.rs`: error answers (`google.rpc.Status`) classified.

mod error;
mod request;
mod response;
mod sse;

use std::time::Duration;

use echelon_types::{
    ChatCompletion, ChatCompletionRequest, ChatMessage, Embedding, EmbeddingInput,
    EmbeddingResponse, EmbeddingVector, Role,
};
use futures::StreamExt;
use futures::future::BoxFuture;
use tokio::time::Instant;

use super::error::{ErrorKind, ProviderError, parse_retry_after};
use super::http::from_reqwest;
use super::openai::{capped, error_body, read_capped};
use super::stream::first_token_timeout;
use super::{
    ChunkStream, EmbedRequest, ProbeKind, Provider, ProviderRequest, StreamEvent, Timeouts,
};
use crate::config::MalformedEvent;
use crate::key::{ApiKey, Redactor};

/// Added to the connect timeout to bound a `GET /v1beta/models` probe.
const MODELS_PROBE_EXTRA: Duration = Duration::from_secs(5);

/// The header that carries a Gemini API key.
const API_KEY_HEADER: &str = "x-goog-api-key";

/// One Gemini API endpoint: `{base_url}/v1beta/models/{model}:generateContent` for
/// calls, `…:streamGenerateContent?alt=sse` for streams, `GET {base_url}/v1beta/models`
/// for probes; the key, when there is one, in `x-goog-api-key`. `base_url` is the API
/// root (`https://generativelanguage.googleapis.com`); one written with `/v1beta` at
/// its end is taken as the same root. Every error it returns has its message scrubbed
/// by its [`Redactor`].
///
/// Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct GeminiProvider {
    http: reqwest::Client,
    /// `{root}/v1beta/models`: the probe's URL, and the prefix of every model's.
    models_url: String,
    timeouts: Timeouts,
    redactor: Redactor,
    max_response_bytes: usize,
    malformed_event: MalformedEvent,
}

impl GeminiProvider {
    /// The endpoint at `base_url` (e.g. `https://generativelanguage.googleapis.com`) over
    /// `http` (from [`HttpClients::get`](super::HttpClients::get), whose connect
    /// timeout should be `timeouts.connect`); the other timeouts apply per request.
    pub fn new(http: reqwest::Client, base_url: &str, timeouts: Timeouts) -> Self {
        let root = base_url.trim_end_matches('/');
        let root = root.strip_suffix("/v1beta").unwrap_or(root);
        GeminiProvider {
            http,
            models_url: format!("{root}/v1beta/models"),
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

    /// The same endpoint reading answers of at most `max_bytes` (a non-streamed body,
    /// or a stream's whole body); a longer answer fails as [`ErrorKind::Malformed`].
    pub fn with_max_response_bytes(mut self, max_bytes: usize) -> Self {
        self.max_response_bytes = max_bytes;
        self
    }

    /// The same endpoint handling a stream event that is not a response as
    /// `malformed_event` says.
    pub fn with_malformed_event(mut self, malformed_event: MalformedEvent) -> Self {
        self.malformed_event = malformed_event;
        self
    }

    /// `{root}/v1beta/models/{model}:{method}` (a leading `models/` of the name is
    /// dropped: the API lists models by that name).
    fn model_url(&self, model: &str, method: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!("{}/{model}:{method}", self.models_url)
    }

    fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        key: Option<&ApiKey>,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url).timeout(timeout);
        // The attempt span's `traceparent` when telemetry is on.
        let req = crate::telemetry::propagate(req);
        match key {
            Some(key) => req.header(API_KEY_HEADER, key.expose()),
            None => req,
        }
    }

    /// The POST of `req` to its model's `generateContent` (or, streaming,
    /// `streamGenerateContent?alt=sse`).
    fn post(
        &self,
        key: Option<&ApiKey>,
        req: &ProviderRequest<'_>,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let body = request::body(req)?;
        let url = if req.stream {
            self.model_url(req.model, "streamGenerateContent?alt=sse")
        } else {
            self.model_url(req.model, "generateContent")
        };
        Ok(self
            .send(reqwest::Method::POST, &url, key, self.timeouts.total)
            .json(&body))
    }

    async fn call_inner(
        &self,
        key: Option<&ApiKey>,
        req: &ProviderRequest<'_>,
    ) -> Result<ChatCompletion, ProviderError> {
        let send = self.post(key, req)?;
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        answer(&bytes, &self.redactor)
    }

    async fn stream_inner(
        &self,
        key: Option<&ApiKey>,
        req: &ProviderRequest<'_>,
    ) -> Result<ChunkStream, ProviderError> {
        let started = Instant::now();
        let first_token_deadline = started + self.timeouts.first_token;
        let send = self.post(key, req)?;
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
        let events = sse::events(bytes, redactor.clone()).map(move |event| match event {
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

    /// `POST {root}/v1beta/models/{model}:batchEmbedContents`: one request per input
    /// text (`outputDimensionality` from `dimensions`), one `values` vector back per
    /// input. Gemini reports no token usage for embeddings: the ledger counts them.
    async fn embed_inner(
        &self,
        key: Option<&ApiKey>,
        req: &EmbedRequest<'_>,
    ) -> Result<EmbeddingResponse, ProviderError> {
        let texts: Vec<&str> = match &req.body.input {
            EmbeddingInput::Text(t) => vec![t.as_str()],
            EmbeddingInput::Texts(ts) => ts.iter().map(String::as_str).collect(),
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenBatches(_) => {
                return Err(ProviderError::new(
                    ErrorKind::BadRequest,
                    "Gemini embeds text only: token-id inputs cannot be sent to it",
                ));
            }
        };
        let model = req.model.strip_prefix("models/").unwrap_or(req.model);
        let name = format!("models/{model}");
        let requests: Vec<serde_json::Value> = texts
            .iter()
            .map(|text| {
                let mut r = serde_json::json!({
                    "model": name,
                    "content": {"parts": [{"text": text}]},
                });
                if let Some(d) = req.body.dimensions {
                    r["outputDimensionality"] = d.into();
                }
                r
            })
            .collect();
        let url = self.model_url(model, "batchEmbedContents");
        let send = self
            .send(reqwest::Method::POST, &url, key, self.timeouts.total)
            .json(&serde_json::json!({ "requests": requests }));
        let resp = send.send().await.map_err(from_reqwest)?;
        let resp = check_status(resp, &self.redactor, key).await?;
        let bytes = read_capped(resp, self.max_response_bytes).await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::new(
                ErrorKind::Malformed,
                format!("response is not a Gemini BatchEmbedContentsResponse: {e}"),
            )
        })?;
        let vectors = value
            .get("embeddings")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| {
                ProviderError::new(ErrorKind::Malformed, "response has no `embeddings` list")
            })?;
        if vectors.len() != texts.len() {
            return Err(ProviderError::new(
                ErrorKind::Malformed,
                format!(
                    "response has {} vectors for {} inputs",
                    vectors.len(),
                    texts.len()
                ),
            ));
        }
        let mut data = Vec::with_capacity(vectors.len());
        for (i, v) in vectors.iter().enumerate() {
            let values: Vec<f64> = v
                .get("values")
                .and_then(serde_json::Value::as_array)
                .map(|xs| xs.iter().filter_map(serde_json::Value::as_f64).collect())
                .ok_or_else(|| {
                    ProviderError::new(
                        ErrorKind::Malformed,
                        format!("embedding {i} has no `values`"),
                    )
                })?;
            data.push(Embedding {
                object: "embedding".to_owned(),
                embedding: EmbeddingVector::Float(values),
                index: u32::try_from(i).unwrap_or(u32::MAX),
                extra: Default::default(),
            });
        }
        let mut answer = EmbeddingResponse {
            object: "list".to_owned(),
            data,
            model: model.to_owned(),
            usage: None,
            extra: Default::default(),
        };
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
                self.call_inner(key, &req).await.map(drop)
            }
        }
    }
}

/// The `generateContent` request body of `req`, as sent.
pub(crate) fn body(req: &ProviderRequest<'_>) -> Result<Vec<u8>, ProviderError> {
    serde_json::to_vec(&request::body(req)?)
        .map_err(|e| ProviderError::new(ErrorKind::Malformed, e.to_string()))
}

/// A non-streamed `generateContent` answer as a chat completion (an in-band `error`
/// classified, its text scrubbed by `redactor`).
pub(crate) fn answer(bytes: &[u8], redactor: &Redactor) -> Result<ChatCompletion, ProviderError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ProviderError::new(
            ErrorKind::Malformed,
            format!("response is not a Gemini GenerateContentResponse: {e}"),
        )
    })?;
    if let Some(err) = value.get("error") {
        return Err(error::classify_error(None, None, err, redactor));
    }
    response::completion(&value)
}

impl Provider for GeminiProvider {
    fn call<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChatCompletion, ProviderError>> {
        Box::pin(async move {
            self.call_inner(key, req)
                .await
                .and_then(finished)
                .map_err(|e| e.redacted(&self.redactor))
        })
    }

    fn stream<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        req: &'a ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<ChunkStream, ProviderError>> {
        Box::pin(async move {
            self.stream_inner(key, req)
                .await
                .map_err(|e| e.redacted(&self.redactor))
        })
    }

    fn probe<'a>(
        &'a self,
        key: Option<&'a ApiKey>,
        kind: ProbeKind,
        upstream_model: &'a str,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async move {
            self.probe_inner(key, kind, upstream_model)
                .await
                .map_err(|e| e.redacted(&self.redactor))
        })
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
        &self.models_url
    }
}

/// A non-streamed answer whose every candidate says why it stopped (as the OpenAI
/// wire's `finished`): one without a `finishReason` may be cut short.
fn finished(completion: ChatCompletion) -> Result<ChatCompletion, ProviderError> {
    match completion
        .choices
        .iter()
        .position(|c| c.finish_reason.is_none())
    {
        None => Ok(completion),
        Some(i) => Err(ProviderError::new(
            ErrorKind::Malformed,
            format!("response has no finishReason (candidate {i}): the answer may be incomplete"),
        )),
    }
}

/// The response when it is 2xx, else its classified Gemini error.
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
    Err(error::classify(
        Some(status.as_u16()),
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
    fn urls_hang_off_the_api_root() {
        for base in [
            "https://g.test",
            "https://g.test/",
            "https://g.test/v1beta",
            "https://g.test/v1beta/",
        ] {
            let p = GeminiProvider::new(reqwest::Client::new(), base, timeouts());
            assert_eq!(p.endpoint(), "https://g.test/v1beta/models");
            assert_eq!(
                p.model_url("models/gemini-2.5-flash", "generateContent"),
                "https://g.test/v1beta/models/gemini-2.5-flash:generateContent"
            );
        }
    }

    #[tokio::test]
    async fn a_request_the_wire_cannot_carry_fails_before_sending() {
        let p = GeminiProvider::new(reqwest::Client::new(), "http://127.0.0.1:9", timeouts());
        let body: ChatCompletionRequest = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]
        }))
        .unwrap();
        let e = p
            .call(None, &ProviderRequest::new(&body, "m", false))
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest, "{e}");
    }
}
