//! `echelon._native`: the Python bindings of the Echelon gateway, a thin layer over
//! [`echelon::Gateway`], [`echelon::LlmHandle`] and [`echelon::judge`]. The `echelon`
//! package (python/echelon) re-exports it and adds the pure-Python pieces
//! (`OpenAICompatible`, `echelon.rl`).
//!
//! Every call runs on one multi-thread tokio runtime per process, with the GIL released:
//! awaitables are asyncio futures bridged to tokio (`bridge`: no tokio worker ever takes
//! the GIL), and cancelling the awaiting task drops the Rust future (the upstream
//! connection closes and the request is recorded with status 499). The `*_sync` variants block the calling thread
//! (not the GIL) until the answer.

mod bridge;
mod convert;
mod errors;
mod judge;
mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use echelon::config::Config;
use echelon::error::GatewayErrorKind;
use echelon::routing::GatewayStream;
use echelon::usage::ledger::{Ledger, LedgerWriter};
use echelon::{GatewayError, LlmHandle};
use echelon_types::ChatCompletionRequest;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use serde_json::{Map, Value};

use crate::bridge::{EXITING, Failure, IntoPython, awaitable};
use crate::convert::{dict_to_map, from_py, to_py};
use crate::errors::{ConfigError, gateway_error, local_error};
use crate::usage::TeeSink;

/// The process's tokio runtime: made on first use, multi-thread (one worker per core),
/// its threads named `echelon-py`.
///
/// # Errors
/// `EchelonError` (500) when the operating system refuses its threads or its I/O driver.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("echelon-py")
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| local_error(500, format!("cannot start the tokio runtime: {e}")))
}

/// At exit (the atexit hook of `echelon/__init__.py`, after the open gateways are
/// closed): ends the calls still in flight and waits, with the GIL released, until none
/// is left, at most `timeout` seconds.
///
/// No tokio task calls into Python (`bridge`), but a task still running while
/// `Py_FinalizeEx` runs may drop the last reference to a Python object (deferred to
/// PyO3's pool) or push to a queue no loop will drain; ending them here, while the
/// interpreter is still whole, keeps the exit quiet. (With `pyo3_async_runtimes`, whose
/// tasks took the GIL to complete their futures, exiting with calls in flight crashed
/// the interpreter in about one exit in two.)
#[pyfunction]
fn _quiesce(py: Python<'_>, timeout: f64) {
    EXITING.cancel();
    let wait = Duration::try_from_secs_f64(timeout).unwrap_or(Duration::ZERO);
    let deadline = Instant::now() + wait;
    py.detach(|| {
        while bridge::calls_in_flight() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    });
}

/// Runs `fut` to completion on the runtime with the GIL released.
///
/// # Errors
/// When the runtime cannot start ([`runtime`]).
fn block_on<T: Send>(py: Python<'_>, fut: impl Future<Output = T> + Send) -> PyResult<T> {
    let rt = runtime()?;
    Ok(py.detach(|| rt.block_on(fut)))
}

/// The gateway: every model and route of a config, with the ledger `echelon serve`
/// would write.
#[pyclass(frozen, weakref, module = "echelon._native")]
struct Gateway {
    inner: Arc<echelon::Gateway>,
    sink: Arc<TeeSink>,
    writer: Mutex<Option<LedgerWriter>>,
    ledger_path: Option<PathBuf>,
}

#[pymethods]
impl Gateway {
    /// Loads a config file or directory (the files `echelon serve --config` reads, seed
    /// layouts included), opens its usage ledger and starts the background tasks.
    ///
    /// Raises `ConfigError` (each problem as file:line:col) when the config is invalid,
    /// `EchelonError` when the ledger cannot be opened.
    ///
    /// Call `close()` (or use it as a context manager) to flush the ledger; gateways still
    /// open when the interpreter exits are closed then.
    #[staticmethod]
    fn from_config(py: Python<'_>, path: PathBuf) -> PyResult<Py<Gateway>> {
        let config = py
            .detach(|| Config::load(&path))
            .map_err(|e| ConfigError::new_err(format!("invalid config:\n{e}")))?;
        let gateway = Py::new(py, Gateway::build(&config)?)?;
        // Weakly tracked: `echelon` closes the ones still open at exit (atexit).
        py.import("echelon._native")?
            .getattr("_open_gateways")?
            .call_method1("add", (gateway.clone_ref(py),))?;
        Ok(gateway)
    }

    /// A handle on a route (a model, task group, `group.echelonN`, polling pool or
    /// wrapper) that behaves like one model. Raises `RouteNotFound`.
    fn llm(&self, route: &str) -> PyResult<Llm> {
        let handle = self.inner.llm(route).map_err(|e| gateway_error(&e))?;
        Ok(Llm {
            handle,
            gateway: self.inner.clone(),
            sink: self.sink.clone(),
        })
    }

    /// Every route a request may name: dicts with `id`, `kind` (`model`, `task_group`,
    /// `echelon`, `polling_pool` or `wrapper`) and `models` (tried in order).
    fn routes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for r in self.inner.routes().iter() {
            let d = PyDict::new(py);
            d.set_item("id", &r.id)?;
            d.set_item("kind", r.kind)?;
            d.set_item("models", &r.models)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// The live state, as `GET /admin/state` shows it: `models` (breaker, buckets,
    /// in-flight, keys by id), `echelons`, `pools`, `routes`. Times in ms from now.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = serde_json::to_value(self.inner.admin_state())
            .map_err(|e| local_error(500, format!("internal: {e}")))?;
        to_py(py, &state)
    }

    /// Probes every model now (`GET {base_url}/models`); awaitable of a dict model id →
    /// `{"ok": bool, "error": str | None}`.
    fn health_check_all<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let gw = self.inner.clone();
        awaitable(
            py,
            async move { Ok(health_value(gw.health_check_all().await)) },
        )
    }

    /// [`health_check_all`](Self::health_check_all), blocking.
    fn health_check_all_sync(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let gw = self.inner.clone();
        let results = block_on(py, async move { gw.health_check_all().await })?;
        health_value(results).into_python(py)
    }

    /// A judge over a route (seed 003): see `echelon.Judge`. `cache`: True (judge_cache.db
    /// next to the ledger), False, a path, or a Redis URL (`redis://…`, `rediss://…`)
    /// shared by parallel judge workers.
    ///
    /// The issue-17 options are `echelon judge`'s flags: `verdict` (`auto`, `json_schema`,
    /// `regex`), `reasoning_field`, `samples` (K judgements per item), `aggregate`
    /// (`mean`, `median`, `majority`), `quorum`, `seed`, `mode` (`pointwise`,
    /// `pairwise`: items then carry `response_a` and `response_b`), `swap`,
    /// `inconsistent` (`tie`, `error`), `max_tokens_cap` (the length re-ask's ceiling),
    /// `reasoning_effort`. `temperature` None is 0, or 0.7 with `samples` > 1.
    #[pyo3(signature = (route, rubric=None, concurrency=64, max_reasks=2, cache=None,
        reward_coefficient=0.1, target_tokens=512, patterns=None, min_score=1.0,
        max_score=10.0, temperature=None, max_tokens=None, reminder=None,
        verdict="auto", reasoning_field=false, samples=1, aggregate="mean", quorum=None,
        seed=None, mode="pointwise", swap=false, inconsistent="tie", max_tokens_cap=Some(4096),
        reasoning_effort=None))]
    #[allow(clippy::too_many_arguments)]
    fn judge(
        &self,
        route: String,
        rubric: Option<String>,
        concurrency: usize,
        max_reasks: u32,
        cache: Option<&Bound<'_, PyAny>>,
        reward_coefficient: f64,
        target_tokens: u64,
        patterns: Option<Vec<String>>,
        min_score: f64,
        max_score: f64,
        temperature: Option<f64>,
        max_tokens: Option<u32>,
        reminder: Option<String>,
        verdict: &str,
        reasoning_field: bool,
        samples: u32,
        aggregate: &str,
        quorum: Option<u32>,
        seed: Option<u64>,
        mode: &str,
        swap: bool,
        inconsistent: &str,
        max_tokens_cap: Option<u32>,
        reasoning_effort: Option<String>,
    ) -> PyResult<judge::Judge> {
        let bad = |what: &str, e: String| local_error(400, format!("judge: {what}: {e}"));
        let mut jc = echelon::judge::JudgeConfig {
            route,
            concurrency: concurrency.max(1),
            max_reasks,
            reward_coefficient,
            target_tokens,
            min_score,
            max_score,
            temperature,
            max_tokens,
            verdict: verdict
                .parse()
                .map_err(|e: echelon::judge::ParseModeError| bad("verdict", e.to_string()))?,
            reasoning_field,
            samples: samples.max(1),
            aggregate: aggregate
                .parse()
                .map_err(|e: echelon::judge::ParseModeError| bad("aggregate", e.to_string()))?,
            quorum,
            seed,
            mode: mode
                .parse()
                .map_err(|e: echelon::judge::ParseModeError| bad("mode", e.to_string()))?,
            swap,
            inconsistent: inconsistent
                .parse()
                .map_err(|e: echelon::judge::ParseModeError| bad("inconsistent", e.to_string()))?,
            max_tokens_cap,
            reasoning_effort,
            ..echelon::judge::JudgeConfig::default()
        };
        if let Some(r) = rubric {
            jc.rubric = r;
        }
        if let Some(r) = reminder {
            jc.reminder = r;
        }
        if let Some(p) = patterns {
            jc.patterns = p;
        }
        match self.cache_path(cache)? {
            Some(target) if echelon::judge::is_cache_url(&target.to_string_lossy()) => {
                jc.cache_url = Some(target.to_string_lossy().into_owned());
            }
            other => jc.cache_path = other,
        }
        judge::Judge::new(self.inner.clone(), jc)
    }

    /// The ledger file (None when the config disables it).
    #[getter]
    fn ledger_path(&self) -> Option<PathBuf> {
        self.ledger_path.clone()
    }

    /// Stops the background tasks, waits for the records still being written and closes
    /// the ledger (every row is on disk when it returns). Awaitable; idempotent.
    fn close<'py>(slf: Py<Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(py, async move { slf.get().shutdown().await })
    }

    /// [`close`](Self::close), blocking.
    fn close_sync(slf: Py<Self>, py: Python<'_>) -> PyResult<()> {
        Ok(block_on(py, async move { slf.get().shutdown().await })??)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(
        slf: Py<Self>,
        py: Python<'_>,
        _args: &Bound<'_, pyo3::types::PyTuple>,
    ) -> PyResult<bool> {
        Gateway::close_sync(slf, py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("<echelon.Gateway routes={}>", self.inner.routes().len())
    }
}

impl Gateway {
    /// The gateway of a loaded config, its ledger open and its background tasks started.
    fn build(config: &Config) -> PyResult<Gateway> {
        let (sender, writer) = match &config.usage.ledger_path {
            Some(path) => {
                let ledger = Ledger::open(path).map_err(|e| {
                    local_error(
                        500,
                        format!("cannot open the usage ledger {}: {e}", path.display()),
                    )
                })?;
                let (s, w) = ledger.spawn_writer(
                    config.usage.queue_capacity,
                    config.usage.batch_size,
                    Duration::from_millis(config.usage.flush_interval_ms),
                );
                (Some(s), Some(w))
            }
            None => (None, None),
        };
        let sink = Arc::new(TeeSink::new(sender));
        let gateway = echelon::Gateway::from_config(config)
            .map_err(|e| gateway_error(&e))?
            .with_record_sink(sink.clone());
        let gateway = Arc::new(gateway);
        {
            let _enter = runtime()?.enter();
            gateway.start().map_err(|e| gateway_error(&e))?;
        }
        Ok(Gateway {
            inner: gateway,
            sink,
            writer: Mutex::new(writer),
            ledger_path: config.usage.ledger_path.clone(),
        })
    }

    /// `close()`'s work.
    async fn shutdown(&self) -> Result<(), Failure> {
        self.inner.shutdown().await;
        self.sink.close_ledger();
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(writer) = writer {
            tokio::task::spawn_blocking(move || writer.join())
                .await
                .map_err(|e| Failure::Local(500, format!("ledger writer: {e}")))?
                .map_err(|e| Failure::Local(500, format!("ledger writer: {e}")))?;
        }
        Ok(())
    }

    /// The judge cache file for `cache` (True: next to the ledger).
    fn cache_path(&self, cache: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PathBuf>> {
        let Some(cache) = cache else {
            return Ok(None);
        };
        if let Ok(on) = cache.extract::<bool>() {
            if !on {
                return Ok(None);
            }
            let dir = self
                .ledger_path
                .clone()
                .or_else(echelon::config::UsageConfig::default_ledger_path)
                .and_then(|p| p.parent().map(|d| d.join("judge_cache.db")));
            return dir.map(Some).ok_or_else(|| {
                local_error(
                    400,
                    "cache=True needs a ledger directory; pass a path instead",
                )
            });
        }
        cache.extract::<PathBuf>().map(Some)
    }
}

/// Health results as a JSON object of objects (model id → `ok`, `error`).
fn health_value(results: std::collections::BTreeMap<String, Result<(), String>>) -> Value {
    let map: Map<String, Value> = results
        .into_iter()
        .map(|(id, r)| {
            let v = match r {
                Ok(()) => serde_json::json!({"ok": true, "error": null}),
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            };
            (id, v)
        })
        .collect();
    Value::Object(map)
}

/// A chat request on a route from Python arguments: the messages, the keyword parameters
/// (OpenAI's body fields), and the call's own `timeout` (seconds, taken out of the body).
/// `stream` is dropped (the method says whether it streams).
fn build_request(
    route: &str,
    messages: &Bound<'_, PyAny>,
    params: Option<&Bound<'_, PyDict>>,
) -> PyResult<(ChatCompletionRequest, Option<Duration>)> {
    let mut body = match params {
        Some(p) => dict_to_map(p)?,
        None => Map::new(),
    };
    body.remove("stream");
    let timeout = match body.remove("timeout") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => {
            let secs = n.as_f64().unwrap_or(-1.0);
            Some(Duration::try_from_secs_f64(secs).map_err(|_| {
                local_error(
                    400,
                    format!("timeout: must be a positive number of seconds, got {n}"),
                )
            })?)
        }
        Some(other) => {
            return Err(local_error(
                400,
                format!("timeout: must be a number of seconds, got {other}"),
            ));
        }
    };
    body.insert("model".to_owned(), Value::String(route.to_owned()));
    body.insert("messages".to_owned(), from_py(messages)?);
    let req = serde_json::from_value(Value::Object(body))
        .map_err(|e| local_error(400, format!("invalid request: {e}")))?;
    Ok((req, timeout))
}

/// `fut`, failed with a 504 when `timeout` passes first (the request is then dropped:
/// recorded with status 499, the upstream connection closed).
async fn with_timeout<T>(
    timeout: Option<Duration>,
    fut: impl Future<Output = Result<T, GatewayError>>,
) -> Result<T, GatewayError> {
    match timeout {
        None => fut.await,
        Some(t) => tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
            Err(GatewayError::new(
                GatewayErrorKind::Timeout,
                format!(
                    "no answer within the call's timeout of {} s",
                    t.as_secs_f64()
                ),
            ))
        }),
    }
}

/// The text of a completion, or the error `LlmHandle::complete` gives for an answer
/// without text.
fn text_of(done: echelon::Completion) -> Result<String, GatewayError> {
    match done.response.first_text() {
        Some(t) => Ok(t.to_owned()),
        None => Err(GatewayError::new(
            GatewayErrorKind::UpstreamFailed,
            format!(
                "model `{}` answered without text: use chat() to read the answer",
                done.model
            ),
        )
        .with_code("no_text_in_answer")
        .with_attempts(done.attempts)),
    }
}

/// One prompt (with optional body parameters) to text.
async fn complete(
    handle: LlmHandle,
    prompt: String,
    params: Option<(ChatCompletionRequest, Option<Duration>)>,
) -> Result<String, Failure> {
    let result = match params {
        None => handle.complete(&prompt).await,
        Some((req, timeout)) => {
            with_timeout(timeout, async { text_of(handle.chat(req).await?) }).await
        }
    };
    Ok(result?)
}

/// A route used like one model (seed 000's AsyncLLM, seed 004's LLM_Interface). Every
/// call goes through the route's full resilience and is recorded in the ledger.
#[pyclass(frozen, module = "echelon._native")]
struct Llm {
    handle: LlmHandle,
    gateway: Arc<echelon::Gateway>,
    sink: Arc<TeeSink>,
}

impl Llm {
    /// The request of `prompt` when keyword parameters are given (else the plain prompt
    /// path of `LlmHandle::complete`).
    fn prompt_request(
        &self,
        py: Python<'_>,
        prompt: &str,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Option<(ChatCompletionRequest, Option<Duration>)>> {
        match kwargs {
            Some(k) if !k.is_empty() => {
                let messages = PyList::empty(py);
                let m = PyDict::new(py);
                m.set_item("role", "user")?;
                m.set_item("content", prompt)?;
                messages.append(m)?;
                build_request(self.handle.name(), messages.as_any(), Some(k)).map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[pymethods]
impl Llm {
    /// `await llm(prompt, **params)` → the answer's text (str). Keyword parameters are
    /// OpenAI body fields (`temperature`, `max_tokens`, …) and `timeout` (seconds).
    /// Raises `AllAttemptsFailed` when every candidate failed, never returns a placeholder.
    #[pyo3(signature = (prompt, **kwargs))]
    fn __call__<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let params = self.prompt_request(py, &prompt, kwargs)?;
        let handle = self.handle.clone();
        awaitable(py, complete(handle, prompt, params))
    }

    /// `llm(prompt)` from synchronous code: blocks the thread (not the GIL) until the text.
    #[pyo3(signature = (prompt, **kwargs))]
    fn complete_sync(
        &self,
        py: Python<'_>,
        prompt: String,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let params = self.prompt_request(py, &prompt, kwargs)?;
        let handle = self.handle.clone();
        Ok(block_on(py, complete(handle, prompt, params))??)
    }

    /// `await llm.call_with_format(prompt, formatter=None, **params)` (seed 000): the
    /// text of `await llm(prompt, **params)`, passed through `formatter(text)` when given
    /// (a plain function; its exceptions propagate, its return value is the result).
    #[pyo3(signature = (prompt, formatter=None, **kwargs))]
    fn call_with_format<'py>(
        &self,
        py: Python<'py>,
        prompt: String,
        formatter: Option<Py<PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let params = self.prompt_request(py, &prompt, kwargs)?;
        let handle = self.handle.clone();
        awaitable(py, async move {
            let text = complete(handle, prompt, params).await?;
            Ok(Formatted { text, formatter })
        })
    }

    /// `await llm.chat(messages, **params)` → the completion as a dict in OpenAI's shape
    /// (`choices[0].message.content`, `usage`, …). `stream` is ignored (use
    /// `chat_stream`); `timeout` is the call's limit in seconds.
    #[pyo3(signature = (messages, **params))]
    fn chat<'py>(
        &self,
        py: Python<'py>,
        messages: &Bound<'py, PyAny>,
        params: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (req, timeout) = build_request(self.handle.name(), messages, params)?;
        let handle = self.handle.clone();
        awaitable(py, chat(handle, req, timeout))
    }

    /// [`chat`](Self::chat), blocking.
    #[pyo3(signature = (messages, **params))]
    fn chat_sync(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        let (req, timeout) = build_request(self.handle.name(), messages, params)?;
        let handle = self.handle.clone();
        block_on(py, chat(handle, req, timeout))??.into_python(py)
    }

    /// `async for chunk in llm.chat_stream(messages, **params)`: chunk dicts in OpenAI's
    /// shape. Fails over until the first content chunk; a failure after that raises from
    /// the iteration (never a normal end). `timeout` bounds the wait for the first chunk.
    #[pyo3(signature = (messages, **params))]
    fn chat_stream(
        &self,
        messages: &Bound<'_, PyAny>,
        params: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<ChatStream> {
        let (req, timeout) = build_request(self.handle.name(), messages, params)?;
        Ok(ChatStream {
            state: Arc::new(tokio::sync::Mutex::new(StreamState::NotStarted {
                handle: self.handle.clone(),
                req: Box::new(req),
                timeout,
            })),
        })
    }

    /// Tokens and cost of this route's requests made through this gateway (seed 000):
    /// `total_cost` (USD), `total_tokens`, `prompt_tokens`, `completion_tokens`,
    /// `cached_tokens`, `requests`, `failed_requests`, `by_model` (the same per answering
    /// model). Built from the records the ledger gets.
    fn get_usage_summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(py, &self.sink.summary(self.handle.name()))
    }

    /// The route's counters: `total_requests`, `successful_requests`, `fallbacks`,
    /// `attempts`, and `fallback_history` (the last fallback events, oldest first).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let mut v = serde_json::to_value(self.handle.stats())
            .map_err(|e| local_error(500, format!("internal: {e}")))?;
        if let (Value::Object(map), Some(h)) = (&mut v, self.handle_history()) {
            map.insert("fallback_history".to_owned(), h);
        }
        to_py(py, &v)
    }

    /// Zeroes the route's counters and fallback history.
    fn reset_stats(&self) {
        self.handle.reset_stats();
    }

    /// The route name.
    #[getter]
    fn name(&self) -> String {
        self.handle.name().to_owned()
    }

    fn __repr__(&self) -> String {
        format!("<echelon.LLM route={:?}>", self.handle.name())
    }
}

impl Llm {
    /// The route's last fallback events as JSON.
    fn handle_history(&self) -> Option<Value> {
        self.gateway
            .fallback_history(self.handle.name())
            .and_then(|h| serde_json::to_value(h).ok())
    }
}

/// A chat completion as JSON (a dict in Python).
async fn chat(
    handle: LlmHandle,
    req: ChatCompletionRequest,
    timeout: Option<Duration>,
) -> Result<Value, Failure> {
    let done = with_timeout(timeout, handle.chat(req)).await?;
    serde_json::to_value(&done.response).map_err(|e| Failure::Local(500, format!("internal: {e}")))
}

/// Where a [`ChatStream`] is.
enum StreamState {
    NotStarted {
        handle: LlmHandle,
        req: Box<ChatCompletionRequest>,
        timeout: Option<Duration>,
    },
    Open(Box<GatewayStream>),
    Done,
}

/// The async iterator of `llm.chat_stream(...)`: the request starts on the first
/// `__anext__`; dropping (or `aclose()`) before the end abandons it (recorded as 499).
#[pyclass(frozen, module = "echelon._native")]
struct ChatStream {
    state: Arc<tokio::sync::Mutex<StreamState>>,
}

#[pymethods]
impl ChatStream {
    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The next chunk dict; `StopAsyncIteration` at the end; the gateway's exception on a
    /// failure.
    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            let mut guard = state.lock().await;
            if let StreamState::NotStarted { .. } = &*guard {
                let StreamState::NotStarted {
                    handle,
                    req,
                    timeout,
                } = std::mem::replace(&mut *guard, StreamState::Done)
                else {
                    return Err(Failure::Stop);
                };
                let stream = with_timeout(timeout, handle.chat_stream(*req)).await?;
                *guard = StreamState::Open(Box::new(stream));
            }
            let StreamState::Open(stream) = &mut *guard else {
                return Err(Failure::Stop);
            };
            match stream.next().await {
                Some(Ok(chunk)) => serde_json::to_value(&chunk)
                    .map_err(|e| Failure::Local(500, format!("internal: {e}"))),
                Some(Err(e)) => {
                    *guard = StreamState::Done;
                    Err(e.into())
                }
                None => {
                    *guard = StreamState::Done;
                    Err(Failure::Stop)
                }
            }
        })
    }

    /// Abandons the stream now (the upstream connection closes; recorded as 499 unless
    /// it had ended). Awaitable.
    fn aclose<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let state = self.state.clone();
        awaitable(py, async move {
            *state.lock().await = StreamState::Done;
            Ok(())
        })
    }
}

/// `call_with_format`'s answer: the text, passed through the formatter on the event
/// loop's thread.
struct Formatted {
    text: String,
    formatter: Option<Py<PyAny>>,
}

impl IntoPython for Formatted {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self.formatter {
            None => self.text.into_python(py),
            Some(f) => f.call1(py, (self.text,)),
        }
    }
}

/// The `echelon._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Gateway>()?;
    m.add_class::<Llm>()?;
    m.add_class::<ChatStream>()?;
    m.add_class::<judge::Judge>()?;
    m.add_function(wrap_pyfunction!(_quiesce, m)?)?;
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "_open_gateways",
        m.py().import("weakref")?.getattr("WeakSet")?.call0()?,
    )?;
    Ok(())
}
