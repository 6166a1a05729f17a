//! The HTTP side: a tokio accept loop, one hyper HTTP/1 connection per
//! accepted socket, and the request handler.
//!
//! Faults rely on two hyper behaviours: a service future that resolves to
//! `Err` makes hyper drop the connection without writing a response, and a
//! body that yields `Err` makes hyper stop writing mid-body (the chunked
//! encoding is never terminated) and drop the connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::anthropic;
use crate::behavior::{Behavior, FaultDraws};
use crate::wire::{self, Answer, Dialect};
use crate::{RecordedRequest, ServedCount, UpstreamOptions};

/// Error type of response bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body.
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Pause before an injected cut so hyper flushes what was written before.
const FLUSH_BEFORE_CUT: Duration = Duration::from_millis(25);

/// The deliberate error that makes hyper drop a connection.
#[derive(Debug)]
struct Cut;

impl fmt::Display for Cut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("echelon-testkit: injected connection cut")
    }
}

impl std::error::Error for Cut {}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// State shared by the handle and every connection.
#[derive(Debug)]
pub(crate) struct State {
    options: UpstreamOptions,
    default: Mutex<Behavior>,
    queue: Mutex<VecDeque<Behavior>>,
    faults: Option<Mutex<FaultDraws>>,
    chat_requests: AtomicUsize,
    /// `POST /v1/embeddings` requests received.
    embedding_requests: AtomicUsize,
    next_id: AtomicU64,
    recorded: Mutex<Vec<RecordedRequest>>,
    /// TCP connections accepted since the start.
    connections: AtomicUsize,
    /// TCP connections accepted and not yet closed.
    open_connections: AtomicUsize,
    /// Chat completions whose handler is running or whose body is being sent.
    active_requests: AtomicUsize,
    /// How often each behaviour was played, in first-played order.
    served: Mutex<Vec<ServedCount>>,
}

/// One unit of one of [`State`]'s gauges, counted for as long as this lives. It owns
/// its `State`, so that a response body can carry it until hyper drops the body.
struct Held {
    state: Arc<State>,
    gauge: fn(&State) -> &AtomicUsize,
}

impl Held {
    fn up(state: &Arc<State>, gauge: fn(&State) -> &AtomicUsize) -> Held {
        gauge(state).fetch_add(1, Ordering::SeqCst);
        Held {
            state: Arc::clone(state),
            gauge,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        (self.gauge)(&self.state).fetch_sub(1, Ordering::SeqCst);
    }
}

impl State {
    pub(crate) fn new(options: UpstreamOptions) -> State {
        let faults = options
            .fault_rate
            .clone()
            .map(|plan| Mutex::new(FaultDraws::new(plan)));
        State {
            options,
            default: Mutex::new(Behavior::Normal),
            queue: Mutex::new(VecDeque::new()),
            faults,
            chat_requests: AtomicUsize::new(0),
            embedding_requests: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            recorded: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open_connections: AtomicUsize::new(0),
            active_requests: AtomicUsize::new(0),
            served: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_behavior(&self, b: Behavior) {
        *lock(&self.default) = b;
    }

    pub(crate) fn push_behavior(&self, b: Behavior) {
        lock(&self.queue).push_back(b);
    }

    pub(crate) fn chat_requests(&self) -> usize {
        self.chat_requests.load(Ordering::SeqCst)
    }

    pub(crate) fn embedding_requests(&self) -> usize {
        self.embedding_requests.load(Ordering::SeqCst)
    }

    pub(crate) fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.recorded).clone()
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::SeqCst)
    }

    pub(crate) fn active_requests(&self) -> usize {
        self.active_requests.load(Ordering::SeqCst)
    }

    pub(crate) fn served(&self) -> Vec<ServedCount> {
        lock(&self.served).clone()
    }

    fn count_served(&self, behavior: &Behavior, stream: bool) {
        let mut served = lock(&self.served);
        match served
            .iter_mut()
            .find(|s| s.stream == stream && s.behavior == *behavior)
        {
            Some(s) => s.count += 1,
            None => served.push(ServedCount {
                behavior: behavior.clone(),
                stream,
                count: 1,
            }),
        }
    }

    /// The next one-shot behaviour, else a fault-plan draw, else the default.
    fn next_behavior(&self) -> Behavior {
        if let Some(b) = lock(&self.queue).pop_front() {
            return b;
        }
        if let Some(fault) = self.faults.as_ref().and_then(|f| lock(f).draw()) {
            return fault;
        }
        lock(&self.default).clone()
    }
}

/// Accepts connections until `stop` fires (or its sender is dropped), then
/// closes the listener and every open connection.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_connection(stream, Arc::clone(&state)));
                }
                Err(error) => {
                    // E.g. too many open files: back off instead of spinning.
                    tracing::warn!(%error, "echelon-testkit: accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    conns.shutdown().await;
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    state.connections.fetch_add(1, Ordering::SeqCst);
    let _open = Held::up(&state, |s| &s.open_connections);
    let _ = stream.set_nodelay(true);
    let stream = ResettableStream {
        stream,
        reset: Arc::new(AtomicBool::new(false)),
    };
    let reset = Arc::clone(&stream.reset);
    let service = service_fn(move |req| handle(Arc::clone(&state), Arc::clone(&reset), req));
    let result = http1::Builder::new()
        // No hyper timer is configured; idle keep-alive connections stay open.
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = result {
        tracing::debug!(%error, "echelon-testkit: connection ended");
    }
}

/// A connection's socket that, when `reset` is set, is closed with an RST
/// (`SO_LINGER` 0) instead of a FIN ([`Behavior::Reset`]).
struct ResettableStream {
    stream: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResettableStream {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.stream.set_zero_linger();
        }
    }
}

impl tokio::io::AsyncRead for ResettableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for ResettableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

async fn handle(
    state: Arc<State>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Cut> {
    let path = req.uri().path().to_owned();
    let is_api = path == "/v1" || path.starts_with("/v1/");
    if path == "/v1beta" || path.starts_with("/v1beta/") {
        return gemini(state, reset, req, &path).await;
    }
    match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => {
            // Counted until the handler is dropped (a stall ends when hyper drops
            // it with the connection) or, once it answered, until the body is.
            let active = Held::up(&state, |s| &s.active_requests);
            let resp = chat(&state, &reset, req, Dialect::OpenAi, false).await?;
            Ok(resp.map(move |body| {
                body.map_frame(move |frame| {
                    let _active = &active;
                    frame
                })
                .boxed_unsync()
            }))
        }
        (&Method::POST, "/v1/embeddings") => {
            let _active = Held::up(&state, |s| &s.active_requests);
            embeddings(&state, &reset, req).await
        }
        (&Method::POST, "/v1/messages") => {
            let active = Held::up(&state, |s| &s.active_requests);
            let resp = messages(&state, &reset, req).await?;
            Ok(resp.map(move |body| {
                body.map_frame(move |frame| {
                    let _active = &active;
                    frame
                })
                .boxed_unsync()
            }))
        }
        (_, "/health") | (_, "/v1/models") if req.method() != Method::GET => {
            Ok(error_response(405, "method not allowed"))
        }
        (_, "/health") => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        // `GET /v1/models` serves both wires: the key as a bearer token or `x-api-key`.
        _ if is_api && !authorized_anthropic(&state.options, &req) => Ok(unauthorized()),
        (_, "/v1/models") => Ok(json_response(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{
                    "id": state.options.model_alias,
                    "object": "model",
                    "owned_by": "echelon-testkit",
                }],
            }),
        )),
        (_, "/v1/chat/completions") | (_, "/v1/embeddings") | (_, "/v1/messages") => {
            Ok(error_response(405, "method not allowed"))
        }
        _ => Ok(error_response(404, &format!("unknown path {path}"))),
    }
}

/// The Gemini API paths: `POST /v1beta/models/{model}:generateContent`,
/// `POST /v1beta/models/{model}:streamGenerateContent` (SSE with `alt=sse`), and
/// `GET /v1beta/models`; the key in `x-goog-api-key` (or `?key=`).
async fn gemini(
    state: Arc<State>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
    path: &str,
) -> Result<Response<Body>, Cut> {
    let method = path
        .strip_prefix("/v1beta/models/")
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(_, method)| method);
    match (req.method(), method) {
        (&Method::POST, Some(m @ ("generateContent" | "streamGenerateContent"))) => {
            let stream = m == "streamGenerateContent";
            let active = Held::up(&state, |s| &s.active_requests);
            let resp = chat(&state, &reset, req, Dialect::Gemini, stream).await?;
            Ok(resp.map(move |body| {
                body.map_frame(move |frame| {
                    let _active = &active;
                    frame
                })
                .boxed_unsync()
            }))
        }
        _ if !gemini_authorized(&state.options, &req) => Ok(json_response(
            StatusCode::BAD_REQUEST,
            &wire::gemini_invalid_key(),
        )),
        (&Method::POST, Some("batchEmbedContents")) => gemini_embed(&state, req).await,
        (&Method::GET, None) if path.trim_end_matches('/') == "/v1beta/models" => {
            Ok(json_response(
                StatusCode::OK,
                &json!({"models": [{
                    "name": format!("models/{}", state.options.model_alias),
                    "displayName": state.options.model_alias,
                    "supportedGenerationMethods": ["generateContent", "streamGenerateContent"],
                }]}),
            ))
        }
        _ => Ok(json_response(
            StatusCode::NOT_FOUND,
            &wire::gemini_error_body(404, &format!("unknown path {path}"), None),
        )),
    }
}

/// `POST /v1beta/models/{model}:batchEmbedContents`: one `values` vector per request,
/// the same deterministic vectors as `/v1/embeddings` for each request's joined text
/// parts (`outputDimensionality` numbers, default 8). A `Status` behaviour answers that
/// status in Gemini's error shape; every other behaviour answers normally.
async fn gemini_embed(state: &State, req: Request<Incoming>) -> Result<Response<Body>, Cut> {
    state.embedding_requests.fetch_add(1, Ordering::SeqCst);
    let bytes = req.into_body().collect().await.map_err(|_| Cut)?.to_bytes();
    let behavior = state.next_behavior();
    state.count_served(&behavior, false);
    if let Behavior::Status {
        status,
        retry_after,
        message,
    } = behavior
    {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(json_response(
            code,
            &wire::gemini_error_body(code.as_u16(), &message, retry_after),
        ));
    }
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let Some(requests) = body.get("requests").and_then(Value::as_array) else {
        return Ok(json_response(
            StatusCode::BAD_REQUEST,
            &wire::gemini_error_body(400, "`requests` is required", None),
        ));
    };
    let embeddings: Vec<Value> = requests
        .iter()
        .map(|r| {
            let text: String = r
                .pointer("/content/parts")
                .and_then(Value::as_array)
                .map(|parts| {
                    parts
                        .iter()
                        .filter_map(|p| p.get("text").and_then(Value::as_str))
                        .collect()
                })
                .unwrap_or_default();
            let dims = r
                .get("outputDimensionality")
                .and_then(Value::as_u64)
                .and_then(|d| usize::try_from(d).ok())
                .filter(|d| (1..=4096).contains(d))
                .unwrap_or(8);
            json!({"values": crate::embeddings::text_vector(&text, dims)})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "embeddings": embeddings }),
    ))
}

/// Whether a Gemini request carries the key (`x-goog-api-key`, or `key=` in the query).
fn gemini_authorized<B>(options: &UpstreamOptions, req: &Request<B>) -> bool {
    let Some(key) = &options.api_key else {
        return true;
    };
    let header = req
        .headers()
        .get("x-goog-api-key")
        .and_then(|v| v.to_str().ok());
    let query = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("key=")));
    header.or(query).is_some_and(|given| given == key)
}

fn authorized<B>(options: &UpstreamOptions, req: &Request<B>) -> bool {
    let Some(key) = &options.api_key else {
        return true;
    };
    req.headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| given == key)
}

/// As [`authorized`], the key also accepted as `x-api-key` (the Anthropic wire).
fn authorized_anthropic<B>(options: &UpstreamOptions, req: &Request<B>) -> bool {
    let Some(key) = &options.api_key else {
        return true;
    };
    authorized(options, req)
        || req
            .headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|given| given == key)
}

/// An Anthropic error answer with this status (an invalid status becomes 500).
fn anthropic_error(status: u16, message: &str) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &anthropic::error_body(code.as_u16(), message))
}

/// `POST /v1/messages`: the echo answer and the faults, in Anthropic's shapes (see
/// [`Behavior`] for what each does; `EmptyAnswer` and `NoChoices` answer a message
/// without content blocks, `NoFinishReason` one without `stop_reason` (a stream without
/// `message_delta`), `HugeAnswer` and `Delay` answer normally after their effect).
async fn messages(
    state: &State,
    reset: &AtomicBool,
    req: Request<Incoming>,
) -> Result<Response<Body>, Cut> {
    let arrived = Instant::now();
    state.chat_requests.fetch_add(1, Ordering::SeqCst);
    let ok = authorized_anthropic(&state.options, &req);
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map_err(|_| Cut)?.to_bytes();
    let json: Option<Value> = serde_json::from_slice(&bytes).ok();
    if state.options.record_requests {
        lock(&state.recorded).push(RecordedRequest {
            body: json.clone(),
            authorization: parts
                .headers
                .get("x-api-key")
                .or_else(|| parts.headers.get(AUTHORIZATION))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            uri: parts.uri.to_string(),
            headers: parts.headers,
            at: arrived,
        });
    }
    if !ok {
        return Ok(anthropic_error(401, "invalid x-api-key"));
    }
    let Some(body) = json.filter(Value::is_object) else {
        return Ok(anthropic_error(
            400,
            "the request body is not a JSON object",
        ));
    };
    if body.get("max_tokens").and_then(Value::as_u64).is_none() {
        return Ok(anthropic_error(400, "max_tokens: Field required"));
    }
    let chat_body = anthropic::to_chat_body(&body);
    if let Some(n_ctx) = state.options.context_window {
        let prompt_tokens = wire::prompt_chars(&chat_body) / 4;
        if prompt_tokens > n_ctx {
            return Ok(anthropic_error(
                400,
                &format!("prompt is too long: {prompt_tokens} tokens > {n_ctx} maximum"),
            ));
        }
    }
    let behavior = state.next_behavior();
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    state.count_served(&behavior, stream);
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let mut answer = Answer::for_request(
        &chat_body,
        format!("test-{id}"),
        0,
        state.options.model_alias.clone(),
    );
    if let Behavior::HugeAnswer { bytes } = behavior {
        answer.content = huge_text(bytes);
    }
    let latency = state.options.latency;
    let chunk_delay = state.options.chunk_delay;
    crate::timer::sleep_until(arrived + latency).await;
    let finished = !matches!(behavior, Behavior::NoFinishReason);
    if matches!(behavior, Behavior::EmptyAnswer | Behavior::NoChoices) {
        answer.content.clear();
    }
    let paced = |events: Vec<Bytes>| {
        events
            .into_iter()
            .flat_map(|e| [Step::Sleep(chunk_delay), Step::Data(e)])
            .collect::<Vec<_>>()
    };
    let full_stream = |answer: &Answer| {
        let mut steps: Vec<Step> = anthropic::head(answer)
            .into_iter()
            .map(Step::Data)
            .collect();
        steps.extend(paced(anthropic::deltas(answer)));
        steps.extend(paced(anthropic::tail(answer, finished)));
        steps
    };
    match behavior {
        Behavior::Status {
            status,
            retry_after,
            message,
        } => {
            let mut resp = anthropic_error(status, &message);
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            Ok(resp)
        }
        Behavior::Stall => std::future::pending().await,
        Behavior::CutConnection => Err(Cut),
        Behavior::Reset => {
            reset.store(true, Ordering::SeqCst);
            Err(Cut)
        }
        Behavior::Delay(d) => {
            sleep(d).await;
            Ok(if stream {
                sse_response(full_stream(&answer))
            } else {
                json_response(StatusCode::OK, &anthropic::message(&answer, true))
            })
        }
        Behavior::StreamError { chunks } if stream => {
            let mut steps: Vec<Step> = anthropic::head(&answer)
                .into_iter()
                .map(Step::Data)
                .collect();
            steps.extend(paced(
                anthropic::deltas(&answer)
                    .into_iter()
                    .take(chunks)
                    .collect(),
            ));
            steps.push(Step::Data(anthropic::error_event()));
            Ok(sse_response(steps))
        }
        Behavior::StreamError { .. } => Ok(anthropic_error(529, "Overloaded")),
        Behavior::Malformed | Behavior::MalformedSse { .. } | Behavior::MalformedSseRun { .. }
            if stream =>
        {
            let (before, count) = match behavior {
                Behavior::MalformedSse { chunks } => (chunks, 1),
                Behavior::MalformedSseRun { chunks, count } => (chunks, count),
                _ => (0, 1),
            };
            let deltas = anthropic::deltas(&answer);
            let mut steps: Vec<Step> = anthropic::head(&answer)
                .into_iter()
                .map(Step::Data)
                .collect();
            steps.extend(paced(deltas.iter().take(before).cloned().collect()));
            for _ in 0..count {
                steps.push(Step::Data(Bytes::from_static(
                    b"event: content_block_delta\ndata: {not json\n\n",
                )));
            }
            steps.extend(paced(deltas.into_iter().skip(before).collect()));
            steps.extend(paced(anthropic::tail(&answer, true)));
            Ok(sse_response(steps))
        }
        Behavior::Malformed | Behavior::MalformedSse { .. } | Behavior::MalformedSseRun { .. } => {
            Ok(json_bytes_response(
                StatusCode::OK,
                Bytes::from(format!(
                    "{{\"id\":\"msg_{}\",\"type\":\"message\",\"content\":[",
                    answer.id
                )),
            ))
        }
        Behavior::StreamCut { chunks } | Behavior::StreamStall { chunks } => {
            let end = if matches!(behavior, Behavior::StreamCut { .. }) {
                Step::Cut
            } else {
                Step::Stall
            };
            if stream {
                let mut steps: Vec<Step> = anthropic::head(&answer)
                    .into_iter()
                    .map(Step::Data)
                    .collect();
                steps.extend(paced(
                    anthropic::deltas(&answer)
                        .into_iter()
                        .take(chunks)
                        .collect(),
                ));
                steps.push(end);
                return Ok(sse_response(steps));
            }
            let full = Bytes::from(anthropic::message(&answer, true).to_string());
            let partial = full.slice(..full.len() / 2);
            let mut resp = body_response(
                StatusCode::OK,
                "application/json",
                vec![Step::Data(partial), end],
            );
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(full.len()));
            Ok(resp)
        }
        Behavior::Normal
        | Behavior::EmptyAnswer
        | Behavior::NoChoices
        | Behavior::NoFinishReason
        | Behavior::HugeAnswer { .. } => Ok(if stream {
            sse_response(full_stream(&answer))
        } else {
            json_response(StatusCode::OK, &anthropic::message(&answer, finished))
        }),
    }
}

fn unauthorized() -> Response<Body> {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": {
            "message": "Invalid API Key",
            "type": "authentication_error",
            "code": "invalid_api_key",
        }}),
    )
}

/// `POST /v1/embeddings`: the deterministic vectors of `crate::embeddings`, after the
/// same auth and context checks as a chat completion, playing the same behaviours (the
/// one-shot queue, the fault plan, the default). A behaviour without an embeddings
/// meaning (`NoFinishReason`) answers normally; stream faults (`StreamCut`,
/// `StreamStall`) send half of the body and then cut or stall; `EmptyAnswer` is `{}`,
/// `NoChoices` a list without data, `HugeAnswer` one vector of about that many bytes.
async fn embeddings(
    state: &State,
    reset: &AtomicBool,
    req: Request<Incoming>,
) -> Result<Response<Body>, Cut> {
    let arrived = Instant::now();
    state.embedding_requests.fetch_add(1, Ordering::SeqCst);
    let ok = authorized(&state.options, &req);
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map_err(|_| Cut)?.to_bytes();
    let json: Option<Value> = serde_json::from_slice(&bytes).ok();
    if state.options.record_requests {
        lock(&state.recorded).push(RecordedRequest {
            body: json.clone(),
            authorization: parts
                .headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            uri: parts.uri.to_string(),
            headers: parts.headers,
            at: arrived,
        });
    }
    if !ok {
        return Ok(unauthorized());
    }
    let Some(body) = json.filter(Value::is_object) else {
        return Ok(error_response(400, "the request body is not a JSON object"));
    };
    if let Some(n_ctx) = state.options.context_window {
        let largest = crate::embeddings::largest_input_tokens(&body);
        if largest > n_ctx {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &wire::context_error(largest, n_ctx),
            ));
        }
    }
    let behavior = state.next_behavior();
    state.count_served(&behavior, false);
    crate::timer::sleep_until(arrived + state.options.latency).await;
    let model = state.options.model_alias.as_str();
    let answer = |body: &Value| match crate::embeddings::answer(body, model) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(message) => error_response(400, &message),
    };
    match behavior {
        Behavior::Status {
            status,
            retry_after,
            message,
        } => {
            let mut resp = error_response(status, &message);
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            Ok(resp)
        }
        Behavior::Stall => std::future::pending().await,
        Behavior::CutConnection => Err(Cut),
        Behavior::Reset => {
            reset.store(true, Ordering::SeqCst);
            Err(Cut)
        }
        Behavior::Delay(d) => {
            sleep(d).await;
            Ok(answer(&body))
        }
        Behavior::Normal | Behavior::NoFinishReason => Ok(answer(&body)),
        Behavior::Malformed | Behavior::MalformedSse { .. } | Behavior::MalformedSseRun { .. } => {
            Ok(json_bytes_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"object\":\"list\",\"data\":[{\"embedding\":[0.1,"),
            ))
        }
        Behavior::EmptyAnswer => Ok(json_bytes_response(
            StatusCode::OK,
            Bytes::from_static(b"{}"),
        )),
        Behavior::NoChoices => Ok(json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [], "model": model}),
        )),
        // No stream to carry an in-band error: a 500, as a non-streamed chat gets.
        Behavior::StreamError { .. } => Ok(error_response(500, "injected fault: HTTP 500")),
        Behavior::HugeAnswer { bytes } => {
            let mut huge = body.clone();
            // About 10 bytes per number as JSON.
            huge["dimensions"] = json!((bytes / 10).max(1));
            huge["input"] = json!("huge");
            match crate::embeddings::answer(&huge, model) {
                Ok(v) => Ok(json_response(StatusCode::OK, &v)),
                Err(message) => Ok(error_response(400, &message)),
            }
        }
        Behavior::StreamCut { .. } | Behavior::StreamStall { .. } => {
            let end = if matches!(behavior, Behavior::StreamCut { .. }) {
                Step::Cut
            } else {
                Step::Stall
            };
            let full = match crate::embeddings::answer(&body, model) {
                Ok(v) => Bytes::from(v.to_string()),
                Err(message) => return Ok(error_response(400, &message)),
            };
            let partial = full.slice(..full.len() / 2);
            let mut resp = body_response(
                StatusCode::OK,
                "application/json",
                vec![Step::Data(partial), end],
            );
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(full.len()));
            Ok(resp)
        }
    }
}

/// A chat completion in `dialect`; `gemini_stream` is whether a Gemini request asked
/// for a stream (by its path: an OpenAI request says so in its body).
async fn chat(
    state: &State,
    reset: &AtomicBool,
    req: Request<Incoming>,
    dialect: Dialect,
    gemini_stream: bool,
) -> Result<Response<Body>, Cut> {
    let arrived = Instant::now();
    state.chat_requests.fetch_add(1, Ordering::SeqCst);
    let ok = match dialect {
        Dialect::OpenAi => authorized(&state.options, &req),
        Dialect::Gemini => gemini_authorized(&state.options, &req),
    };
    let (parts, body) = req.into_parts();
    // A client that goes away mid-body gets nothing more.
    let bytes = body.collect().await.map_err(|_| Cut)?.to_bytes();
    let json: Option<Value> = serde_json::from_slice(&bytes).ok();
    if state.options.record_requests {
        lock(&state.recorded).push(RecordedRequest {
            uri: parts.uri.to_string(),
            body: json.clone(),
            authorization: parts
                .headers
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            headers: parts.headers,
            at: arrived,
        });
    }

    if !ok {
        return Ok(match dialect {
            Dialect::OpenAi => unauthorized(),
            Dialect::Gemini => json_response(StatusCode::BAD_REQUEST, &wire::gemini_invalid_key()),
        });
    }
    let Some(body) = json.filter(Value::is_object) else {
        return Ok(error_in(
            dialect,
            400,
            "the request body is not a JSON object",
        ));
    };
    let body = match dialect {
        Dialect::OpenAi => body,
        Dialect::Gemini => wire::gemini_as_chat(&body),
    };
    if let Some(n_ctx) = state.options.context_window {
        let prompt_tokens = wire::prompt_chars(&body) / 4;
        if prompt_tokens > n_ctx {
            return Ok(json_response(
                StatusCode::BAD_REQUEST,
                &match dialect {
                    Dialect::OpenAi => wire::context_error(prompt_tokens, n_ctx),
                    Dialect::Gemini => wire::gemini_context_error(prompt_tokens, n_ctx),
                },
            ));
        }
    }

    let behavior = state.next_behavior();
    let stream = match dialect {
        Dialect::OpenAi => body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        Dialect::Gemini => gemini_stream,
    };
    state.count_served(&behavior, stream);
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let answer = Answer::for_request(
        &body,
        format!("chatcmpl-test-{id}"),
        created,
        state.options.model_alias.clone(),
    )
    .in_dialect(dialect);
    let latency = state.options.latency;
    let chunk_delay = state.options.chunk_delay;

    // Streams take their latency inside the body (headers first, then the
    // wait before the first chunk); everything else waits before answering.
    let streamed = stream
        && matches!(
            behavior,
            Behavior::Normal
                | Behavior::Delay(_)
                | Behavior::StreamCut { .. }
                | Behavior::StreamStall { .. }
                | Behavior::Malformed
                | Behavior::MalformedSse { .. }
                | Behavior::MalformedSseRun { .. }
                | Behavior::EmptyAnswer
                | Behavior::NoChoices
                | Behavior::NoFinishReason
                | Behavior::HugeAnswer { .. }
                | Behavior::StreamError { .. }
        );
    // The latency counts from the moment the request's head was read, not from after
    // its body was read and parsed and its answer built: under a burst of requests
    // that work waits its turn for a CPU, and it is not part of the latency asked for.
    let deadline = arrived + latency;
    if !streamed {
        if matches!(behavior, Behavior::Normal) {
            // Rendered before the wait, so that only the write is left after it.
            let resp = normal(&answer, false, latency, chunk_delay);
            crate::timer::sleep_until(deadline).await;
            return Ok(resp);
        }
        crate::timer::sleep_until(deadline).await;
    }

    match behavior {
        Behavior::Status {
            status,
            retry_after,
            message,
        } => match dialect {
            Dialect::OpenAi => {
                let mut resp = error_response(status, &message);
                if let Some(secs) = retry_after {
                    resp.headers_mut()
                        .insert(RETRY_AFTER, HeaderValue::from(secs));
                }
                Ok(resp)
            }
            // Gemini says when to retry in the body (`RetryInfo.retryDelay`), not in
            // a `Retry-After` header.
            Dialect::Gemini => {
                let code =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                Ok(json_response(
                    code,
                    &wire::gemini_error_body(code.as_u16(), &message, retry_after),
                ))
            }
        },
        Behavior::StreamError { chunks } => {
            if !stream {
                return Ok(json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &answer.error_event(),
                ));
            }
            let mut steps = vec![
                Step::Sleep(latency),
                Step::Data(event(&answer.role_chunk())),
            ];
            for chunk in answer.content_chunks().into_iter().take(chunks) {
                steps.push(Step::Sleep(chunk_delay));
                steps.push(Step::Data(event(&chunk)));
            }
            steps.push(Step::Data(event(&answer.error_event())));
            Ok(sse_response(steps))
        }
        Behavior::Stall => std::future::pending().await,
        Behavior::CutConnection => Err(Cut),
        Behavior::Reset => {
            reset.store(true, Ordering::SeqCst);
            Err(Cut)
        }
        Behavior::Delay(d) => {
            sleep(d).await;
            Ok(normal(&answer, stream, latency, chunk_delay))
        }
        Behavior::Normal => Ok(normal(&answer, stream, latency, chunk_delay)),
        Behavior::Malformed | Behavior::MalformedSse { .. } | Behavior::MalformedSseRun { .. }
            if stream =>
        {
            let (before, count) = match behavior {
                Behavior::MalformedSse { chunks } => (chunks, 1),
                Behavior::MalformedSseRun { chunks, count } => (chunks, count),
                _ => (0, 1),
            };
            let mut steps = vec![
                Step::Sleep(latency),
                Step::Data(event(&answer.role_chunk())),
            ];
            let content = answer.content_chunks();
            for chunk in content.iter().take(before) {
                steps.push(Step::Sleep(chunk_delay));
                steps.push(Step::Data(event(chunk)));
            }
            for _ in 0..count {
                steps.push(Step::Data(Bytes::from_static(b"data: {not json\n\n")));
            }
            steps.extend(rest_of_stream(&answer, chunk_delay, before));
            Ok(sse_response(steps))
        }
        Behavior::Malformed | Behavior::MalformedSse { .. } | Behavior::MalformedSseRun { .. } => {
            Ok(json_bytes_response(
                StatusCode::OK,
                Bytes::from(answer.broken_body()),
            ))
        }
        Behavior::EmptyAnswer
        | Behavior::NoChoices
        | Behavior::NoFinishReason
        | Behavior::HugeAnswer { .. } => Ok(scripted_answer(
            &behavior,
            &answer,
            stream,
            latency,
            chunk_delay,
        )),
        Behavior::StreamCut { chunks } | Behavior::StreamStall { chunks } => {
            let end = if matches!(behavior, Behavior::StreamCut { .. }) {
                Step::Cut
            } else {
                Step::Stall
            };
            if stream {
                let mut steps = vec![
                    Step::Sleep(latency),
                    Step::Data(event(&answer.role_chunk())),
                ];
                for chunk in answer.content_chunks().into_iter().take(chunks) {
                    steps.push(Step::Sleep(chunk_delay));
                    steps.push(Step::Data(event(&chunk)));
                }
                steps.push(end);
                return Ok(sse_response(steps));
            }
            // Headers announce the whole body; half of it arrives.
            let full = Bytes::from(answer.completion().to_string());
            let partial = full.slice(..full.len() / 2);
            let mut resp = body_response(
                StatusCode::OK,
                "application/json",
                vec![Step::Data(partial), end],
            );
            resp.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(full.len()));
            Ok(resp)
        }
    }
}

/// The answers that are well-formed HTTP but wrong or extreme ([`Behavior::EmptyAnswer`],
/// [`Behavior::NoChoices`], [`Behavior::NoFinishReason`], [`Behavior::HugeAnswer`]).
fn scripted_answer(
    behavior: &Behavior,
    answer: &Answer,
    stream: bool,
    latency: Duration,
    chunk_delay: Duration,
) -> Response<Body> {
    let mut steps = vec![Step::Sleep(latency)];
    match (behavior, stream) {
        (Behavior::EmptyAnswer, false) => {
            return json_bytes_response(StatusCode::OK, Bytes::from_static(b"{}"));
        }
        (Behavior::EmptyAnswer, true) => {
            steps.push(Step::Data(event(&answer.role_chunk())));
        }
        (Behavior::NoChoices, false) => {
            return json_response(StatusCode::OK, &answer.no_choices());
        }
        (Behavior::NoChoices, true) => {}
        (Behavior::NoFinishReason, false) => {
            return json_response(StatusCode::OK, &answer.completion_without_finish());
        }
        (Behavior::NoFinishReason, true) => {
            steps.push(Step::Data(event(&answer.role_chunk())));
            for chunk in answer.content_chunks() {
                steps.push(Step::Sleep(chunk_delay));
                steps.push(Step::Data(event(&chunk)));
            }
            if let Some(usage) = answer.usage_chunk() {
                steps.push(Step::Data(event(&usage)));
            }
        }
        (Behavior::HugeAnswer { bytes }, stream) => {
            let text = huge_text(*bytes);
            if !stream {
                return json_response(StatusCode::OK, &answer.completion_with_text(text));
            }
            steps.push(Step::Data(event(&answer.role_chunk())));
            let mut rest = text.as_str();
            while !rest.is_empty() {
                // "lorem " is ASCII: any cut is a character boundary.
                let (piece, tail) = rest.split_at(rest.len().min(HUGE_CHUNK_BYTES));
                rest = tail;
                steps.push(Step::Data(event(&answer.text_chunk(piece))));
            }
            steps.push(Step::Data(event(&answer.finish_chunk())));
        }
        _ => return normal(answer, stream, latency, chunk_delay),
    }
    if let Some(done) = answer.done() {
        steps.push(Step::Data(Bytes::from(done)));
    }
    sse_response(steps)
}

/// A stream's [`Behavior::HugeAnswer`] content chunks, bytes at most.
const HUGE_CHUNK_BYTES: usize = 64 * 1024;

/// `"lorem "` repeated to exactly `bytes` bytes.
fn huge_text(bytes: usize) -> String {
    let mut text = "lorem ".repeat(bytes / 6 + 1);
    text.truncate(bytes);
    text
}

/// A normal answer: the completion object, or the whole stream.
fn normal(
    answer: &Answer,
    stream: bool,
    latency: Duration,
    chunk_delay: Duration,
) -> Response<Body> {
    if !stream {
        return json_response(StatusCode::OK, &answer.completion());
    }
    let mut steps = vec![
        Step::Sleep(latency),
        Step::Data(event(&answer.role_chunk())),
    ];
    steps.extend(rest_of_stream(answer, chunk_delay, 0));
    sse_response(steps)
}

/// Everything after the role chunk and the first `skip` content chunks: the
/// other content chunks, finish chunk, optional usage chunk and `[DONE]`, each
/// preceded by `chunk_delay`.
fn rest_of_stream(answer: &Answer, chunk_delay: Duration, skip: usize) -> Vec<Step> {
    let mut events: Vec<Bytes> = answer
        .content_chunks()
        .iter()
        .skip(skip)
        .map(event)
        .collect();
    events.push(event(&answer.finish_chunk()));
    if let Some(usage) = answer.usage_chunk() {
        events.push(event(&usage));
    }
    if let Some(done) = answer.done() {
        events.push(Bytes::from(done));
    }
    events
        .into_iter()
        .flat_map(|e| [Step::Sleep(chunk_delay), Step::Data(e)])
        .collect()
}

fn event(chunk: &Value) -> Bytes {
    Bytes::from(wire::sse(&chunk.to_string()))
}

/// The upstream's latencies and delays: precise to tens of microseconds, not
/// tokio's whole milliseconds ([`crate::timer`]).
async fn sleep(d: Duration) {
    crate::timer::sleep(d).await;
}

/// One step of a scripted response body.
#[derive(Debug)]
enum Step {
    /// Wait (zero is skipped).
    Sleep(Duration),
    /// Send these bytes as one body frame.
    Data(Bytes),
    /// Let hyper flush, then fail the body so the connection is dropped.
    Cut,
    /// Never send anything more.
    Stall,
}

/// A body that plays `steps` in order, flushing each data frame as it goes.
fn scripted_body(steps: Vec<Step>) -> Body {
    let frames = futures::stream::unfold(steps.into_iter(), |mut steps| async move {
        loop {
            match steps.next()? {
                Step::Sleep(d) => sleep(d).await,
                Step::Data(bytes) => return Some((Ok(Frame::data(bytes)), steps)),
                Step::Cut => {
                    tokio::time::sleep(FLUSH_BEFORE_CUT).await;
                    let error: BoxError = Box::new(Cut);
                    return Some((Err(error), steps));
                }
                Step::Stall => std::future::pending::<()>().await,
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

fn body_response(
    status: StatusCode,
    content_type: &'static str,
    steps: Vec<Step>,
) -> Response<Body> {
    let mut resp = Response::new(scripted_body(steps));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn sse_response(steps: Vec<Step>) -> Response<Body> {
    let mut resp = body_response(StatusCode::OK, "text/event-stream", steps);
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_bytes_response(status: StatusCode, bytes: Bytes) -> Response<Body> {
    let mut resp = Response::new(full_body(bytes));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    json_bytes_response(status, Bytes::from(value.to_string()))
}

/// An error body in `dialect` with this status (an invalid status becomes 500).
fn error_in(dialect: Dialect, status: u16, message: &str) -> Response<Body> {
    match dialect {
        Dialect::OpenAi => error_response(status, message),
        Dialect::Gemini => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_response(code, &wire::gemini_error_body(code.as_u16(), message, None))
        }
    }
}

/// An OpenAI error body with this status (an invalid status becomes 500).
fn error_response(status: u16, message: &str) -> Response<Body> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &wire::error_body(code.as_u16(), message))
}
