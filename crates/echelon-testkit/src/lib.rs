//! A fault-injecting OpenAI-compatible upstream for Echelon's tests and
//! benchmarks.
//!
//! [`TestUpstream`] serves `POST /v1/chat/completions` (plain and streamed), the
//! Anthropic Messages API's `POST /v1/messages` (plain and streamed, with the same
//! faults in Anthropic's shapes: a 529 `overloaded_error`, a 429 with `retry-after`, an
//! in-band `event: error`; see [`anthropic`]), the Gemini API's `generateContent` /
//! `streamGenerateContent` / `batchEmbedContents`, `POST /v1/embeddings` (deterministic
//! vectors: [`embeddings::text_vector`]), `GET /v1/models` and `GET /health` on a
//! local port. A normal answer echoes
//! the last user message (`"echo: <text>"`), or, when the request forces a tool call
//! (`tool_choice: "required"` or naming a function), calls that tool with
//! `{"text": <last user text>}`, or, when the request carries `"x_answers": [..]` and an
//! integer `"seed"`, answers `x_answers[seed % len]` (scripted judge samples); a [`Behavior`] makes one request
//! (or every request) fail in a chosen way: an error status with
//! `Retry-After`, a stall, a cut or reset connection, a stream cut or stalled
//! mid-way, a malformed body, or a delay. A [`FaultPlan`] injects faults at
//! random, reproducibly from a seed.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use echelon_testkit::{Behavior, TestUpstream};
//!
//! let upstream = TestUpstream::start().await?;
//! upstream.push_behavior(Behavior::Status {
//!     status: 429,
//!     retry_after: Some(1),
//!     message: "slow down".into(),
//! });
//! // Point a client at `upstream.base_url()`: its first chat completion gets
//! // the 429, later ones the echo answer.
//! assert_eq!(upstream.chat_requests(), 0);
//! upstream.shutdown().await;
//! # Ok(())
//! # }
//! ```

pub mod anthropic;
mod behavior;
pub mod embeddings;
pub mod otlp;
pub mod real;
mod server;
mod timer;
mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::ToSocketAddrs;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use behavior::{Behavior, FaultPlan, ParseBehaviorError};
/// The header map type of [`RecordedRequest::headers`] (hyper's re-export of `http`).
pub use hyper::HeaderMap;
pub use otlp::{OtlpReceiver, ReceivedSpan};

/// Options of a [`TestUpstream`]; build with `..Default::default()`.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// Answered as `model` in completions and listed by `/v1/models`.
    /// Default `"test-model"`.
    pub model_alias: String,
    /// If set, `/v1/*` requires `Authorization: Bearer <key>`; anything else
    /// gets 401 with an OpenAI `invalid_api_key` error body. The Gemini paths
    /// (`/v1beta/*`) require it in `x-goog-api-key` (or `?key=`), else 400
    /// `API_KEY_INVALID` as Gemini answers.
    pub api_key: Option<String>,
    /// How long a chat completion takes: a non-streamed one is answered this
    /// long after its request's head was read; a stream sends its headers at
    /// once and its first chunk after this long. Kept to within tens of
    /// microseconds, not tokio's whole milliseconds (a timer thread ends each
    /// wait). Default 0.
    pub latency: Duration,
    /// Pause between stream chunks. Default 0.
    pub chunk_delay: Duration,
    /// If set, a request whose messages hold more than `4 * window`
    /// characters (characters / 4 > window, integer division) gets 400 with
    /// llama.cpp's `exceed_context_size_error` and code
    /// `context_length_exceeded`.
    pub context_window: Option<usize>,
    /// Random faults for requests that find the one-shot queue empty.
    pub fault_rate: Option<FaultPlan>,
    /// Keep every chat-completion request for [`TestUpstream::recorded`].
    /// Default `true`; the binary turns it off so long benchmark runs do not
    /// grow without bound ([`TestUpstream::chat_requests`] still counts).
    pub record_requests: bool,
}

impl Default for UpstreamOptions {
    fn default() -> UpstreamOptions {
        UpstreamOptions {
            model_alias: "test-model".to_owned(),
            api_key: None,
            latency: Duration::ZERO,
            chunk_delay: Duration::ZERO,
            context_window: None,
            fault_rate: None,
            record_requests: true,
        }
    }
}

/// One `POST /v1/chat/completions` (or Gemini `generateContent` /
/// `streamGenerateContent`) request as the upstream received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The request target: path and query (`/v1/chat/completions`,
    /// `/v1beta/models/up-g:streamGenerateContent?alt=sse`).
    pub uri: String,
    /// The parsed JSON body as sent (a Gemini request's in Gemini's shape), or `None`
    /// if it was not JSON.
    pub body: Option<serde_json::Value>,
    /// The `Authorization` header value, if any.
    pub authorization: Option<String>,
    /// Every request header.
    pub headers: HeaderMap,
    /// When the request arrived (before its body was read).
    pub at: Instant,
}

/// How many chat completions were answered with one [`Behavior`]
/// ([`TestUpstream::served`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedCount {
    /// The behaviour played.
    pub behavior: Behavior,
    /// Whether those requests asked for a stream.
    pub stream: bool,
    /// How many requests got it.
    pub count: usize,
}

/// A running fake upstream. Dropping it (or `shutdown().await`) stops the
/// server: the listener closes and every open connection (stalled ones
/// included) is dropped.
#[derive(Debug)]
pub struct TestUpstream {
    addr: SocketAddr,
    state: Arc<server::State>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TestUpstream {
    /// Start on 127.0.0.1:0 with default options.
    pub async fn start() -> std::io::Result<TestUpstream> {
        TestUpstream::start_with(UpstreamOptions::default()).await
    }

    /// Start on 127.0.0.1:0 with these options.
    pub async fn start_with(options: UpstreamOptions) -> std::io::Result<TestUpstream> {
        TestUpstream::start_on("127.0.0.1:0", options).await
    }

    /// Start on the given address (e.g. `"0.0.0.0:8080"`; port 0 picks a free
    /// port) with these options.
    pub async fn start_on(
        addr: impl ToSocketAddrs,
        options: UpstreamOptions,
    ) -> std::io::Result<TestUpstream> {
        if !options.latency.is_zero() || !options.chunk_delay.is_zero() {
            timer::start();
        }
        // A backlog of 4,096: the judge benchmark opens 256 connections at once.
        let listener = echelon_socket::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(server::State::new(options));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server::serve(listener, Arc::clone(&state), stopped));
        Ok(TestUpstream {
            addr,
            state,
            stop,
            task,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `"http://127.0.0.1:PORT/v1"`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `"http://127.0.0.1:PORT"`: the API root of the Gemini endpoints
    /// (`POST /v1beta/models/{model}:generateContent`,
    /// `POST /v1beta/models/{model}:streamGenerateContent?alt=sse`, `GET /v1beta/models`),
    /// which answer the same echo and play the same behaviours in Gemini's wire: an
    /// HTTP status as a `google.rpc.Status` body (429 `RESOURCE_EXHAUSTED` with the
    /// `Retry-After` seconds as `RetryInfo.retryDelay`, 503 `UNAVAILABLE`, …), a stream
    /// of whole `GenerateContentResponse`s without `[DONE]`, the bad key as Gemini's
    /// 400 `API_KEY_INVALID`.
    pub fn gemini_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Behaviour for every request that finds the one-shot queue empty
    /// (and, with a [`FaultPlan`], draws no fault). Initially `Normal`.
    pub fn set_behavior(&self, b: Behavior) {
        self.state.set_behavior(b);
    }

    /// Queue a one-shot behaviour; queued behaviours are consumed FIFO by the
    /// next chat-completion requests that pass the auth and context checks.
    pub fn push_behavior(&self, b: Behavior) {
        self.state.push_behavior(b);
    }

    /// Number of `POST /v1/chat/completions` requests received (including
    /// failed ones).
    pub fn chat_requests(&self) -> usize {
        self.state.chat_requests()
    }

    /// Number of `POST /v1/embeddings` requests received (including failed ones).
    /// They play the same behaviours as chat completions (the one-shot queue, the
    /// fault plan, the default) and are recorded with them ([`recorded`](Self::recorded)).
    pub fn embedding_requests(&self) -> usize {
        self.state.embedding_requests()
    }

    /// How many chat completions got each behaviour (one-shot, drawn from the
    /// [`FaultPlan`] or the default), split by streamed or not, in the order
    /// each was first played. Requests refused by the auth or context-window
    /// check play no behaviour and are not counted here.
    pub fn served(&self) -> Vec<ServedCount> {
        self.state.served()
    }

    /// TCP connections accepted since the start.
    pub fn connections(&self) -> usize {
        self.state.connections()
    }

    /// TCP connections currently open (accepted and not yet closed by either
    /// side), idle keep-alive ones included.
    pub fn open_connections(&self) -> usize {
        self.state.open_connections()
    }

    /// Chat completions in progress: the handler is running (a stall counts
    /// until the client goes away) or the response body is still being sent.
    pub fn active_requests(&self) -> usize {
        self.state.active_requests()
    }

    /// The recorded chat-completion and embeddings requests, in arrival order (empty when
    /// [`UpstreamOptions::record_requests`] is off).
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.state.recorded()
    }

    /// Stop the server and wait until the listener and every connection are
    /// closed.
    pub async fn shutdown(self) {
        let TestUpstream { stop, task, .. } = self;
        let _ = stop.send(());
        let _ = task.await;
    }
}
