//! The OpenAI-compatible chat-completions client (reqwest with rustls).

use std::time::Duration;

use echelon_types::{ChatCompletion, ChatCompletionChunk, ChatCompletionRequest};
use futures::{Stream, StreamExt};
use tokio::time::Instant;

use super::error::{ErrorKind, ProviderError, parse_retry_after};
use super::sse::{ByteStream, SseEvent, SseEvents};
use crate::key::ApiKey;

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

/// A client for one OpenAI-compatible endpoint (`{base_url}/chat/completions`).
///
/// Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct OpenAiClient {
    http: reqwest::Client,
    /// `{base_url}/chat/completions`, parsed once: reqwest would parse a string again
    /// for every request (about 7,000 instructions, a twentieth of a judged item's).
    /// `Err` holds a URL that does not parse; each request then fails as reqwest
    /// reports it.
    endpoint: Result<reqwest::Url, String>,
    timeouts: Timeouts,
}

/// The HTTP clients of one gateway, one per connect timeout: models share them, so the
/// models of a provider share its connection pool, and the system's root certificates
/// are read once per client rather than once per model (about 6 ms per model at start,
/// measured with 20 models).
#[derive(Debug, Default)]
pub struct HttpClients {
    by_connect_timeout: std::collections::HashMap<Duration, reqwest::Client>,
}

impl HttpClients {
    /// No clients yet; each is built on first use.
    pub fn new() -> Self {
        HttpClients::default()
    }

    /// The client for this connect timeout (built on first use; a clone shares its pool).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend initialisation).
    pub fn get(&mut self, connect: Duration) -> Result<reqwest::Client, ProviderError> {
        if let Some(http) = self.by_connect_timeout.get(&connect) {
            return Ok(http.clone());
        }
        let http = build_http(connect)?;
        self.by_connect_timeout.insert(connect, http.clone());
        Ok(http)
    }
}

/// A reqwest client (rustls) with Echelon's connection settings: `TCP_NODELAY`, idle
/// connections kept 90 s.
fn build_http(connect: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| ProviderError::new(ErrorKind::Connect, format!("HTTP client: {e}")))
}

impl OpenAiClient {
    /// A client for `base_url` (e.g. `http://127.0.0.1:8082/v1`) with its own HTTP client
    /// and connection pool.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS backend initialisation).
    pub fn new(base_url: &str, timeouts: Timeouts) -> Result<Self, ProviderError> {
        Ok(Self::with_http(
            build_http(timeouts.connect)?,
            base_url,
            timeouts,
        ))
    }

    /// A client for `base_url` over `http` (from [`HttpClients::get`], whose connect
    /// timeout should be `timeouts.connect`); the other timeouts apply per request.
    pub fn with_http(http: reqwest::Client, base_url: &str, timeouts: Timeouts) -> Self {
        let url = format!("{}/chat/completions", base_url.trim_end_matches('/'));
        OpenAiClient {
            http,
            endpoint: reqwest::Url::parse(&url).map_err(|_| url),
            timeouts,
        }
    }

    /// The endpoint URL.
    pub fn url(&self) -> &str {
        match &self.endpoint {
            Ok(url) => url.as_str(),
            Err(raw) => raw,
        }
    }

    /// The attempt timeouts.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn request(
        &self,
        key: Option<&ApiKey>,
        body: &ChatCompletionRequest,
    ) -> reqwest::RequestBuilder {
        let mut req = match &self.endpoint {
            Ok(url) => self.http.post(url.clone()),
            Err(raw) => self.http.post(raw),
        }
        .json(body);
        if let Some(key) = key {
            req = req.bearer_auth(key.expose());
        }
        req
    }

    /// A non-streamed chat completion. `body.stream` must be unset or false.
    ///
    /// # Errors
    /// A classified [`ProviderError`]: HTTP errors by status, timeouts (total), connection
    /// errors, and `Malformed` for a 2xx body that is not a chat completion.
    pub async fn chat(
        &self,
        key: Option<&ApiKey>,
        body: &ChatCompletionRequest,
    ) -> Result<ChatCompletion, ProviderError> {
        let send = self.request(key, body).timeout(self.timeouts.total).send();
        let resp = send.await.map_err(from_reqwest)?;
        let resp = check_status(resp).await?;
        let bytes = resp.bytes().await.map_err(from_reqwest)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            ProviderError::new(
                ErrorKind::Malformed,
                format!("response is not a chat completion: {e}"),
            )
        })
    }

    /// Starts a streamed chat completion. `body.stream` must be true.
    ///
    /// Returns once the provider has answered 2xx; chunks are then read with
    /// [`ChunkStream::next`], which enforces the first-token, chunk-gap and total timeouts.
    ///
    /// # Errors
    /// As [`chat`](Self::chat); the first-token timeout also bounds the wait for headers.
    pub async fn chat_stream(
        &self,
        key: Option<&ApiKey>,
        body: &ChatCompletionRequest,
    ) -> Result<ChunkStream, ProviderError> {
        let started = Instant::now();
        let first_token_deadline = started + self.timeouts.first_token;
        let send = self.request(key, body).timeout(self.timeouts.total).send();
        let resp = match tokio::time::timeout_at(first_token_deadline, send).await {
            Ok(r) => r.map_err(from_reqwest)?,
            Err(_) => return Err(first_token_timeout(self.timeouts.first_token)),
        };
        let resp = check_status(resp).await?;
        let bytes: ByteStream = Box::pin(resp.bytes_stream().map(|r| r.map_err(from_reqwest)));
        Ok(ChunkStream::with_deadline(
            bytes,
            self.timeouts,
            first_token_deadline,
        ))
    }
}

fn first_token_timeout(limit: Duration) -> ProviderError {
    ProviderError::new(
        ErrorKind::Timeout,
        format!("no first token within {} ms", limit.as_millis()),
    )
}

async fn check_status(resp: reqwest::Response) -> Result<reqwest::Response, ProviderError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = parse_retry_after(resp.headers().get(http::header::RETRY_AFTER));
    let body = resp.bytes().await.unwrap_or_default();
    Err(ProviderError::from_response(
        status.as_u16(),
        retry_after,
        &body,
    ))
}

/// Maps a reqwest error to a classified error; the message never contains the URL's
/// credentials or a header (reqwest does not print headers).
pub(crate) fn from_reqwest(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_body() || e.is_decode() {
        ErrorKind::StreamCut
    } else {
        ErrorKind::Connect
    };
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    ProviderError::new(kind, msg)
}

/// The chunks of a streamed completion, read one at a time.
pub struct ChunkStream {
    events: SseEvents,
    first_token_deadline: Option<Instant>,
    timeouts: Timeouts,
    finished: bool,
    done: bool,
}

impl std::fmt::Debug for ChunkStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStream")
            .field("finished", &self.finished)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl ChunkStream {
    /// The chunks of an SSE body that did not come over HTTP (a recorded transcript, a
    /// test or fuzz input), decoded and checked exactly as a live stream from
    /// [`OpenAiClient::chat_stream`]; the first-token timeout counts from now.
    ///
    /// `bytes` yields the body in pieces split anywhere (inside a line, a UTF-8
    /// character or a `\r\n`); an `Err` piece ends the stream with that error.
    /// [`next`](Self::next) needs a Tokio runtime with the time driver enabled.
    ///
    /// ```
    /// use echelon::provider::{ChunkStream, Timeouts};
    /// use std::time::Duration;
    ///
    /// # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
    /// let body = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    /// let pieces = body.as_bytes().chunks(7).map(|p| Ok(bytes::Bytes::copy_from_slice(p)));
    /// let t = Duration::from_secs(5);
    /// let timeouts = Timeouts { connect: t, total: t, first_token: t, chunk_gap: t };
    /// let mut chunks = ChunkStream::from_sse_bytes(futures::stream::iter(pieces.collect::<Vec<_>>()), timeouts);
    /// assert_eq!(chunks.next().await.unwrap().unwrap().choices[0].delta.content.as_deref(), Some("Hi"));
    /// assert!(chunks.next().await.is_none());
    /// # });
    /// ```
    pub fn from_sse_bytes<S>(bytes: S, timeouts: Timeouts) -> ChunkStream
    where
        S: Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
    {
        ChunkStream::with_deadline(
            Box::pin(bytes),
            timeouts,
            Instant::now() + timeouts.first_token,
        )
    }

    fn with_deadline(
        bytes: ByteStream,
        timeouts: Timeouts,
        first_token_deadline: Instant,
    ) -> ChunkStream {
        ChunkStream {
            events: SseEvents::new(bytes),
            first_token_deadline: Some(first_token_deadline),
            timeouts,
            finished: false,
            done: false,
        }
    }

    /// The next chunk; `None` after `data: [DONE]` (or a clean end after a finish reason).
    ///
    /// # Errors
    /// `Timeout` when the first content chunk does not come within the first-token
    /// timeout or a gap exceeds the chunk-gap timeout; `StreamCut` when the stream ends
    /// or drops before it is complete; `Malformed` for an unparsable event; `ServerError`
    /// for an `{"error": …}` event from the provider.
    pub async fn next(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        if self.done {
            return None;
        }
        let result = self.read().await;
        match &result {
            None | Some(Err(_)) => self.done = true,
            Some(Ok(_)) => {}
        }
        result
    }

    async fn read(&mut self) -> Option<Result<ChatCompletionChunk, ProviderError>> {
        loop {
            let gap_deadline = Instant::now() + self.timeouts.chunk_gap;
            let (deadline, first) = match self.first_token_deadline {
                Some(ft) if ft < gap_deadline => (ft, true),
                _ => (gap_deadline, false),
            };
            let event = match tokio::time::timeout_at(deadline, self.events.next()).await {
                Err(_) if first => {
                    return Some(Err(first_token_timeout(self.timeouts.first_token)));
                }
                Err(_) => {
                    return Some(Err(ProviderError::new(
                        ErrorKind::Timeout,
                        format!("no chunk within {} ms", self.timeouts.chunk_gap.as_millis()),
                    )));
                }
                Ok(e) => e,
            };
            match event {
                None if self.finished => return None,
                None => {
                    return Some(Err(ProviderError::new(
                        ErrorKind::StreamCut,
                        "stream ended before [DONE]",
                    )));
                }
                Some(Err(e)) => return Some(Err(e)),
                Some(Ok(SseEvent::Done)) => return None,
                Some(Ok(SseEvent::Data(data))) => {
                    let chunk = match parse_chunk(&data) {
                        Ok(Some(c)) => c,
                        Ok(None) => continue,
                        Err(e) => return Some(Err(e)),
                    };
                    if chunk.has_content()
                        || chunk.choices.iter().any(|c| c.finish_reason.is_some())
                    {
                        self.first_token_deadline = None;
                    }
                    if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
                        self.finished = true;
                    }
                    return Some(Ok(chunk));
                }
            }
        }
    }
}

fn parse_chunk(data: &str) -> Result<Option<ChatCompletionChunk>, ProviderError> {
    if data.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(data).map_err(|e| {
        ProviderError::new(ErrorKind::Malformed, format!("malformed SSE data: {e}"))
    })?;
    if let Some(err) = value.get("error") {
        let message = err
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("error event in stream")
            .to_owned();
        return Err(ProviderError::new(ErrorKind::ServerError, message));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| ProviderError::new(ErrorKind::Malformed, format!("malformed chunk: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_with_the_same_connect_timeout_share_one_http_client() {
        let mut clients = HttpClients::new();
        for connect in [1, 1, 2, 1, 2] {
            assert!(clients.get(Duration::from_secs(connect)).is_ok());
        }
        assert_eq!(clients.by_connect_timeout.len(), 2);
    }
}
