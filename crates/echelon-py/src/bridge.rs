//! asyncio ⇄ tokio: a Rust future awaited from asyncio, with no Python on the tokio side.
//!
//! [`awaitable`] gives the caller an asyncio future of the running event loop and spawns
//! the Rust future on the runtime. When it ends, its answer (a Rust value, not yet a
//! Python object) goes into its loop's [`Queue`]; the first answer into an empty queue
//! writes one byte to a socket the loop watches (`loop.add_reader`). The loop's own
//! thread then drains the queue ([`Drain`]): it makes each answer a Python object and
//! sets its future's result or exception, as many as are ready in one wake-up.
//!
//! Why not `pyo3_async_runtimes::tokio::future_into_py`: it completes each future from a
//! new blocking-pool task that takes the GIL (`PyGILState_Ensure` on a thread without a
//! Python thread state: one is created and torn down per completion, its memory unmapped
//! with a TLB shoot-down) and calls `loop.call_soon_threadsafe`, which wakes the loop once
//! per answer. With 256 asyncio tasks whose answers arrive together, the blocking threads
//! queue up on the GIL that the loop's thread holds while it runs Python (BENCHMARKS.md,
//! "Python bindings"). Here a tokio worker only locks a mutex and, at most once per
//! drain, writes a byte.
//!
//! Cancelling the asyncio future (the awaiting task cancelled) aborts the tokio task:
//! the Rust future is dropped, which closes the upstream connection.
//!
//! Unix only (the wake-up is a Unix socket pair).

use std::cell::RefCell;
use std::future::Future;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, PoisonError};

use echelon::GatewayError;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::convert::to_py;
use crate::errors::{gateway_error, local_error};

/// Cancelled by `_quiesce` when the interpreter exits: the calls still in flight then end
/// at once instead of running on while Python finalizes.
pub(crate) static EXITING: LazyLock<CancellationToken> = LazyLock::new(CancellationToken::new);

/// The calls made by [`awaitable`] not yet ended (answered, cancelled or dropped):
/// `_quiesce` waits for them at exit. (Not every task of the runtime: the upstream
/// connections the pool keeps open live on as tasks, and never touch Python.)
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts one call in [`IN_FLIGHT`] from its making to its drop.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Release);
    }
}

/// How many calls made by [`awaitable`] have not ended yet.
pub(crate) fn calls_in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// Why a call failed, made into its Python exception on the event loop's thread (building
/// an exception needs the GIL, which a tokio worker never takes).
#[derive(Debug)]
pub(crate) enum Failure {
    /// The gateway's error: `RouteNotFound`, `EchelonError` or `AllAttemptsFailed` with
    /// its attempts ([`gateway_error`]).
    Gateway(Box<GatewayError>),
    /// A local failure: `EchelonError` with this HTTP-like status and message
    /// ([`local_error`]).
    Local(u16, String),
    /// The end of an async iteration (`StopAsyncIteration`).
    Stop,
    /// An exception Python already raised (e.g. in a formatter).
    Python(PyErr),
}

impl Failure {
    /// The Python exception (takes the GIL when the caller does not hold it).
    pub(crate) fn into_pyerr(self) -> PyErr {
        match self {
            Failure::Gateway(e) => gateway_error(&e),
            Failure::Local(status, message) => local_error(status, message),
            Failure::Stop => PyStopAsyncIteration::new_err(()),
            Failure::Python(e) => e,
        }
    }
}

impl From<GatewayError> for Failure {
    fn from(e: GatewayError) -> Self {
        Failure::Gateway(Box::new(e))
    }
}

impl From<PyErr> for Failure {
    fn from(e: PyErr) -> Self {
        Failure::Python(e)
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> Self {
        f.into_pyerr()
    }
}

/// A call's answer as a Rust value, made a Python object on the event loop's thread.
pub(crate) trait IntoPython: Send + 'static {
    /// The Python object of this answer.
    ///
    /// # Errors
    /// What Python raised while building it (an allocation, a formatter).
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>>;
}

impl IntoPython for String {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.into_pyobject(py)?.into_any().unbind())
    }
}

impl IntoPython for () {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py.None())
    }
}

impl IntoPython for Value {
    fn into_python(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_py(py, &self).map(Bound::unbind)
    }
}

/// The answer turned into Python, on the loop's thread.
type Completion = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// A finished call waiting for its loop's thread.
struct Done {
    future: Py<PyAny>,
    completion: Completion,
}

/// The finished calls of one event loop, and the socket that wakes it.
struct Queue {
    /// The calls not yet drained, and whether a wake-up byte is pending.
    pending: Mutex<(Vec<Done>, bool)>,
    /// The write end of the loop's socket pair.
    waker: UnixStream,
}

impl Queue {
    /// Queues a finished call; wakes the loop when the queue was empty since its last
    /// drain. No GIL: safe on any thread.
    fn push(&self, done: Done) {
        let wake = {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            pending.0.push(done);
            !std::mem::replace(&mut pending.1, true)
        };
        if wake {
            // Non-blocking; a full socket already holds a wake-up.
            let _ = (&self.waker).write(&[1]);
        }
    }
}

/// The reader callback of a loop's socket (`loop.add_reader`): settles every finished
/// call's future.
#[pyclass(frozen, module = "echelon._native")]
struct Drain {
    queue: Arc<Queue>,
    /// The read end of the socket pair (kept open as long as the loop holds the reader).
    reader: UnixStream,
}

#[pymethods]
impl Drain {
    fn __call__(&self, py: Python<'_>) {
        // The wake-up bytes first, then the queue: a call queued after the take below
        // writes a new byte and wakes the loop again.
        let mut buf = [0u8; 64];
        while matches!((&self.reader).read(&mut buf), Ok(n) if n > 0) {}
        let done = {
            let mut pending = self
                .queue
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            pending.1 = false;
            std::mem::take(&mut pending.0)
        };
        for d in done {
            if let Err(e) = settle(py, d) {
                e.write_unraisable(py, None);
            }
        }
    }
}

/// Sets `d`'s future to its answer (nothing when the future was cancelled meanwhile).
fn settle(py: Python<'_>, d: Done) -> PyResult<()> {
    let future = d.future.bind(py);
    if future.call_method0(intern!(py, "cancelled"))?.is_truthy()? {
        return Ok(());
    }
    match (d.completion)(py) {
        Ok(value) => future.call_method1(intern!(py, "set_result"), (value,))?,
        Err(e) => future.call_method1(intern!(py, "set_exception"), (e.into_value(py),))?,
    };
    Ok(())
}

/// The done callback of a call's future: cancels its token, which drops the Rust future
/// when the asyncio future was cancelled (once the call has answered, nothing waits on
/// the token and cancelling it changes nothing).
#[pyclass(frozen, module = "echelon._native")]
struct CancelOnDone {
    cancel: CancellationToken,
}

#[pymethods]
impl CancelOnDone {
    fn __call__(&self, _future: &Bound<'_, PyAny>) {
        self.cancel.cancel();
    }
}

/// A call handed to the runtime.
type Call = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Hands `call` to the runtime: through a channel to one dispatcher task that spawns it
/// from a worker thread. Spawning from the event loop's thread itself would put each
/// call on the runtime's shared queue and often wake a parked worker (a syscall on the
/// thread every asyncio task waits on); the channel wakes the dispatcher once per burst.
fn submit(call: Call) -> PyResult<()> {
    static DISPATCH: OnceLock<tokio::sync::mpsc::UnboundedSender<Call>> = OnceLock::new();
    let tx = match DISPATCH.get() {
        Some(tx) => tx,
        None => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Call>();
            // Ends when the interpreter exits (`_quiesce`); the calls still queued then
            // are dropped, which ends their count in `IN_FLIGHT`.
            crate::runtime()?.spawn(async move {
                let mut batch = Vec::with_capacity(64);
                loop {
                    tokio::select! {
                        biased;
                        () = EXITING.cancelled() => break,
                        n = rx.recv_many(&mut batch, 256) => if n == 0 { break },
                    }
                    for call in batch.drain(..) {
                        tokio::spawn(call);
                    }
                }
            });
            // Two threads racing here start two dispatchers; the loser's ends with its
            // sender, dropped here.
            DISPATCH.get_or_init(|| tx)
        }
    };
    tx.send(call)
        .map_err(|_| local_error(500, "the runtime is shut down"))
}

/// The attribute of an event loop that holds its [`Drain`].
const DRAIN_ATTR: &str = "_echelon_drain";

thread_local! {
    /// The last event loop this thread made a call from, and its queue. The strong
    /// reference keeps the loop alive, so its identity cannot be reused by another.
    static CURRENT: RefCell<Option<(Py<PyAny>, Arc<Queue>)>> = const { RefCell::new(None) };
}

/// `asyncio.get_running_loop()`.
fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(py.import("asyncio")?.getattr("get_running_loop")?.unbind())
        })?
        .bind(py)
        .call0()
}

/// The queue of `event_loop`: the thread's last one, the one its [`Drain`] holds, or a
/// new one with its socket pair registered as a reader of the loop.
fn queue_for(event_loop: &Bound<'_, PyAny>) -> PyResult<Arc<Queue>> {
    let py = event_loop.py();
    let cached = CURRENT.with(|c| {
        c.borrow()
            .as_ref()
            .filter(|(l, _)| l.bind(py).is(event_loop))
            .map(|(_, q)| q.clone())
    });
    if let Some(q) = cached {
        return Ok(q);
    }
    let existing = event_loop
        .getattr(DRAIN_ATTR)
        .ok()
        .and_then(|d| d.cast_into::<Drain>().ok())
        .map(|d| d.get().queue.clone());
    let queue = match existing {
        Some(q) => q,
        None => {
            let io =
                |e: std::io::Error| local_error(500, format!("event-loop wake-up socket: {e}"));
            let (reader, waker) = UnixStream::pair().map_err(io)?;
            reader.set_nonblocking(true).map_err(io)?;
            waker.set_nonblocking(true).map_err(io)?;
            let queue = Arc::new(Queue {
                pending: Mutex::new((Vec::new(), false)),
                waker,
            });
            let fd = reader.as_raw_fd();
            let drain = Bound::new(
                py,
                Drain {
                    queue: queue.clone(),
                    reader,
                },
            )?;
            event_loop.call_method1(intern!(py, "add_reader"), (fd, &drain))?;
            // A loop without attributes (no `__dict__`) gets a new queue when this thread
            // comes back to it after another loop: only a second socket, still drained.
            let _ = event_loop.setattr(DRAIN_ATTR, drain);
            queue
        }
    };
    CURRENT.with(|c| *c.borrow_mut() = Some((event_loop.clone().unbind(), queue.clone())));
    Ok(queue)
}

/// `fut` as an asyncio future of the running loop: spawned on the runtime at once, its
/// answer made a Python object on the loop's thread. Cancelling the future drops `fut`;
/// when the interpreter exits, `fut` ends with an `EchelonError` (status 499).
///
/// # Errors
/// `RuntimeError` when no event loop runs in this thread; `EchelonError` when the loop's
/// wake-up socket cannot be made.
pub(crate) fn awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = Result<T, Failure>> + Send + 'static,
    T: IntoPython,
{
    let event_loop = running_loop(py)?;
    let queue = queue_for(&event_loop)?;
    let future = event_loop.call_method0(intern!(py, "create_future"))?;
    let target = future.clone().unbind();
    let cancel = CancellationToken::new();
    let cancelled = cancel.clone();
    // Boxed once here: the router's futures are large (about 19 KB for `llm(prompt)`),
    // and every move of an unboxed one (into the task, into `select!`) copies all of it.
    let fut = Box::pin(fut);
    let counted = InFlight::new();
    submit(Box::pin(async move {
        let _counted = counted;
        let out = tokio::select! {
            biased;
            () = cancelled.cancelled() => return,
            () = EXITING.cancelled() => Err(Failure::Local(499, "the interpreter is exiting".to_owned())),
            out = fut => out,
        };
        queue.push(Done {
            future: target,
            completion: Box::new(move |py| match out {
                Ok(value) => value.into_python(py),
                Err(f) => Err(f.into_pyerr()),
            }),
        });
    }))?;
    future.call_method1(intern!(py, "add_done_callback"), (CancelOnDone { cancel },))?;
    Ok(future)
}
