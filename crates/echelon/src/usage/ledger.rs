//! The usage ledger: every request and each of its attempts, in a SQLite file
//! (DESIGN.md §6 "Ledger"), written off the request path.
//!
//! - [`Ledger::open`] creates the file (and its directory) or opens an existing one,
//!   migrating its schema forward; a file written by a newer Echelon is refused.
//! - [`Ledger::spawn_writer`] moves the ledger to a dedicated thread fed by a bounded
//!   queue: the gateway hands each finished [`RequestRecord`] to a [`LedgerSender`],
//!   which waits for room when the queue is full (a full queue slows intake rather than
//!   dropping rows). The thread writes batches of up to `batch_size` records, one
//!   transaction each, at least every `flush_interval`.
//! - When every sender is dropped the thread writes what is left and exits;
//!   [`LedgerWriter::join`] waits for that and returns the number of requests written.
//! - Reports read the file on their own connection ([`crate::usage::report`]).
//!
//! # Schema (version [`SCHEMA_VERSION`], kept in `PRAGMA user_version`)
//! - `requests`: `id` (row id), `request_id`, `started_at_ms` (Unix ms), `route`,
//!   `model`, `provider` (NULL when no model answered), `status` (HTTP), `stream`,
//!   `latency_ms`, `ttft_ms`, `prompt_tokens`, `completion_tokens`, `cost_usd` (USD),
//!   `estimated`, `fallback`, `no_finish_reason` (booleans as 0/1: a stream delivered
//!   although no chunk carried a `finish_reason`, since v2), `stream_anomalies` (a
//!   stream's malformed SSE events, 0 when none or not streamed, since v3),
//!   `cached_tokens` and `cache_write_tokens` (of `prompt_tokens`, those read from and
//!   written to the provider's prompt cache, since v4), `endpoint` (`chat`,
//!   `messages`, `responses` or `embeddings`: the dialect the request came in by,
//!   since v5; older rows read `chat`); indexed on
//!   `started_at_ms`, `model`, `route`.
//! - `attempts`: `id`, `request_rowid` (→ `requests.id`), `seq` (0-based order),
//!   `model`, `provider`, `key_id` (short id, never the key), `status` (NULL when the
//!   provider did not answer), `error_kind` (`ok` or the error/skip kind),
//!   `latency_ms`, `prompt_tokens`, `completion_tokens`, `cost_usd`, `estimated`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::mpsc;

use super::record::RequestRecord;

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// The migrations, in order: entry `i` takes the schema from version `i` to `i + 1`.
/// Append only; never edit a released entry.
const MIGRATIONS: &[&str] = &[
    // v1: requests and attempts.
    "CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        request_id TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        route TEXT NOT NULL,
        model TEXT,
        provider TEXT,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL,
        ttft_ms INTEGER,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        estimated INTEGER NOT NULL,
        fallback INTEGER NOT NULL
    );
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        request_rowid INTEGER NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        key_id TEXT,
        status INTEGER,
        error_kind TEXT NOT NULL,
        latency_ms INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cost_usd REAL NOT NULL,
        estimated INTEGER NOT NULL
    );
    CREATE INDEX requests_started_at_ms ON requests(started_at_ms);
    CREATE INDEX attempts_request_rowid ON attempts(request_rowid);",
    // v2: streams delivered without a finish reason are flagged (issue 14 item 3).
    "ALTER TABLE requests ADD COLUMN no_finish_reason INTEGER NOT NULL DEFAULT 0;",
    // v3: a stream's malformed SSE events, skipped or fatal, are counted (issue 19).
    "ALTER TABLE requests ADD COLUMN stream_anomalies INTEGER NOT NULL DEFAULT 0;",
    // v4: prompt-cache tokens, read and written (issue 20, the Anthropic wire).
    "ALTER TABLE requests ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE requests ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;",
    // v5: the endpoint (dialect) a request came in by (issue 20).
    "ALTER TABLE requests ADD COLUMN endpoint TEXT NOT NULL DEFAULT 'chat';",
];

/// How long a connection waits for a lock held by another one, in milliseconds.
const BUSY_TIMEOUT_MS: u64 = 5_000;
/// Pause before the one retry of a failed batch, in milliseconds.
const RETRY_PAUSE_MS: u64 = 100;

/// What can go wrong with the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// SQLite failed on the file.
    #[error("ledger {}: {source}", path.display())]
    Sqlite {
        /// The ledger file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The ledger's directory could not be created.
    #[error("cannot create the ledger directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file was written by a newer Echelon (its schema version is higher than
    /// [`SCHEMA_VERSION`]).
    #[error(
        "ledger {} has schema version {found}, newer than this build knows ({known}); \
         use a newer echelon or another ledger file",
        path.display()
    )]
    TooNew {
        /// The ledger file.
        path: PathBuf,
        /// Its `user_version`.
        found: i64,
        /// [`SCHEMA_VERSION`].
        known: u32,
    },
    /// A report was asked of a file that is missing, or not a ledger, or whose schema
    /// is older than this build's (open it with [`Ledger::open`] to migrate it).
    #[error("{} is not a ledger at schema version {known} (found version {found})", path.display())]
    NotCurrent {
        /// The file.
        path: PathBuf,
        /// Its `user_version` (0 for a file that is not a ledger).
        found: i64,
        /// [`SCHEMA_VERSION`].
        known: u32,
    },
    /// No ledger file at the path a report names.
    #[error("no ledger at {}", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The writer thread could not be started.
    #[error("cannot start the ledger writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The writer thread panicked (a bug); what it had not committed is lost.
    #[error("the ledger writer thread panicked")]
    WriterPanicked,
    /// Some batches could not be written, even after a retry; the others were.
    #[error(
        "ledger {}: {lost} request(s) could not be written ({written} were); last error: {last_error}",
        path.display()
    )]
    RowsLost {
        /// The ledger file.
        path: PathBuf,
        /// Requests written.
        written: u64,
        /// Requests lost.
        lost: u64,
        /// The last SQLite error, as text.
        last_error: String,
    },
}

impl LedgerError {
    fn sqlite(path: &Path) -> impl FnOnce(rusqlite::Error) -> LedgerError + '_ {
        move |source| LedgerError::Sqlite {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An open ledger file, ready to write.
#[derive(Debug)]
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
}

impl Ledger {
    /// Opens the ledger at `path`, creating it and its parent directories when missing,
    /// in WAL mode, and migrates its schema to [`SCHEMA_VERSION`]. A file whose schema
    /// is newer than this build's is refused ([`LedgerError::TooNew`]).
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| LedgerError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let mut conn = Connection::open(path).map_err(LedgerError::sqlite(path))?;
        conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
            .map_err(LedgerError::sqlite(path))?;
        // Check the version before changing anything in a file we may not understand.
        known_version(&conn, path)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
            .map_err(LedgerError::sqlite(path))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(LedgerError::sqlite(path))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(LedgerError::sqlite(path))?;
        migrate(&mut conn, path)?;
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's schema version (`PRAGMA user_version`); [`SCHEMA_VERSION`] once open.
    pub fn schema_version(&self) -> Result<i64, LedgerError> {
        user_version(&self.conn).map_err(LedgerError::sqlite(&self.path))
    }

    /// Writes `records` (each request with its attempts) in one transaction, on the
    /// caller's thread; returns the number of requests written. Everything or nothing
    /// is written. The gateway uses [`Ledger::spawn_writer`] instead.
    pub fn insert(&mut self, records: &[RequestRecord]) -> Result<u64, LedgerError> {
        insert_batch(&mut self.conn, records).map_err(LedgerError::sqlite(&self.path))
    }

    /// Moves the ledger to a dedicated writer thread (rusqlite is blocking) fed by a
    /// queue of `queue_capacity` records (at least 1). The thread writes batches of up
    /// to `batch_size` records (at least 1), one transaction each; a partial batch is
    /// written once `flush_interval` has passed since its first record arrived. A
    /// batch that fails is logged and retried once; if the retry fails too its records
    /// are lost (logged, and reported by [`LedgerWriter::join`]), and writing goes on.
    ///
    /// Returns the sending side (clone it freely) and the handle to wait for the thread.
    /// The thread exits once every [`LedgerSender`] is dropped and the queue is drained.
    ///
    /// Should the operating system refuse to start the thread, the error is logged,
    /// every send drops its record (logged), and [`LedgerWriter::join`] returns
    /// [`LedgerError::Spawn`]; nothing panics.
    pub fn spawn_writer(
        self,
        queue_capacity: usize,
        batch_size: usize,
        flush_interval: Duration,
    ) -> (LedgerSender, LedgerWriter) {
        let capacity = queue_capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let path = self.path.clone();
        let settings = WriterSettings {
            batch_size: batch_size.max(1),
            flush_interval,
        };
        let handle = std::thread::Builder::new()
            .name("echelon-ledger".to_owned())
            .spawn(move || run_writer(self, rx, settings))
            .inspect_err(|e| {
                tracing::error!(
                    error = %e,
                    path = %path.display(),
                    "cannot start the ledger writer thread; usage records will be dropped"
                );
            });
        (LedgerSender { tx }, LedgerWriter { handle, path })
    }
}

/// The sending side of the ledger's queue. Cheap to clone; the writer exits once every
/// clone is dropped.
#[derive(Debug, Clone)]
pub struct LedgerSender {
    tx: mpsc::Sender<RequestRecord>,
}

impl LedgerSender {
    /// Queues `rec` for the writer, waiting for room when the queue is full (a full
    /// queue slows intake rather than dropping rows). Only when the writer thread is
    /// gone (it panicked, or could not be started) is the record dropped, with an error
    /// logged.
    pub async fn send(&self, rec: RequestRecord) {
        if let Err(mpsc::error::SendError(rec)) = self.tx.send(rec).await {
            tracing::error!(
                request_id = %rec.request_id,
                "ledger writer is gone; usage record dropped"
            );
        }
    }

    /// Records waiting in the queue (capacity − free slots), for the queue-depth metric.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity().saturating_sub(self.tx.capacity())
    }

    /// The queue's capacity, in records.
    pub fn queue_capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

/// The writer thread's handle.
#[derive(Debug)]
pub struct LedgerWriter {
    /// The thread, or why it could not be started.
    handle: std::io::Result<std::thread::JoinHandle<Result<u64, LedgerError>>>,
    path: PathBuf,
}

impl LedgerWriter {
    /// The ledger file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits (blocking the calling thread) until the writer has written everything
    /// queued and exited, which happens once every [`LedgerSender`] is dropped; returns
    /// the number of requests written. Graceful shutdown: drop the senders, then join.
    /// From async code use [`LedgerWriter::finish`].
    pub fn join(self) -> Result<u64, LedgerError> {
        self.handle
            .map_err(LedgerError::Spawn)?
            .join()
            .unwrap_or(Err(LedgerError::WriterPanicked))
    }

    /// [`LedgerWriter::join`] without blocking the async runtime (on its blocking pool).
    pub async fn finish(self) -> Result<u64, LedgerError> {
        tokio::task::spawn_blocking(move || self.join())
            .await
            .unwrap_or(Err(LedgerError::WriterPanicked))
    }
}

#[derive(Clone, Copy)]
struct WriterSettings {
    batch_size: usize,
    flush_interval: Duration,
}

/// Longest the writer gathers records before writing them (bounded by `flush_interval`).
const MAX_GATHER: Duration = Duration::from_millis(10);

/// The writer thread: batches from `rx` into `ledger` until every sender is gone.
///
/// It runs its own current-thread tokio runtime for the waits. A version with
/// `blocking_recv` and `std::thread::sleep` instead measured 12–13% ledger overhead
/// against 2.5% for this one (`SETTINGS="off ledger on" bench/usage_overhead.sh 6 3 50`,
/// same machine and hour), so the runtime stays.
fn run_writer(
    mut ledger: Ledger,
    mut rx: mpsc::Receiver<RequestRecord>,
    settings: WriterSettings,
) -> Result<u64, LedgerError> {
    // A runtime of this thread alone, for `recv` with a deadline; the SQLite writes
    // block it, which is fine as nothing else runs on it.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "ledger writer: no timer runtime; writing without batching delay");
            let path = ledger.path.clone();
            return write_loop_untimed(&mut ledger, &mut rx, settings).finish(&path);
        }
    };
    let mut stats = WriteStats::default();
    runtime.block_on(async {
        let mut batch = Vec::with_capacity(settings.batch_size);
        // After the first record of a round, the writer sleeps instead of waking for
        // every record that follows: one wake-up per round, not per request (at 20k
        // requests/s per-record wake-ups cost more CPU than the SQLite writes).
        let gather = settings.flush_interval.min(MAX_GATHER);
        loop {
            if rx.recv_many(&mut batch, settings.batch_size).await == 0 {
                break;
            }
            tokio::time::sleep(gather).await;
            let mut closed = false;
            loop {
                while batch.len() < settings.batch_size {
                    match rx.try_recv() {
                        Ok(rec) => batch.push(rec),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            closed = true;
                            break;
                        }
                    }
                }
                let full = batch.len() == settings.batch_size;
                stats.add(&mut ledger, &batch);
                batch.clear();
                if !full || closed {
                    break;
                }
            }
            if closed {
                break;
            }
        }
    });
    stats.finish(&ledger.path)
}

/// The writer loop without a timer: each batch is what is queued when the previous one
/// is done (used only when the timer runtime cannot be built).
fn write_loop_untimed(
    ledger: &mut Ledger,
    rx: &mut mpsc::Receiver<RequestRecord>,
    settings: WriterSettings,
) -> WriteStats {
    let mut stats = WriteStats::default();
    let mut batch = Vec::with_capacity(settings.batch_size);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < settings.batch_size {
            match rx.try_recv() {
                Ok(rec) => batch.push(rec),
                Err(_) => break,
            }
        }
        stats.add(ledger, &batch);
        batch.clear();
    }
    stats
}

/// What the writer has done.
#[derive(Default)]
struct WriteStats {
    written: u64,
    lost: u64,
    last_error: Option<String>,
}

impl WriteStats {
    /// Writes `batch`, retrying once after a short pause; records the outcome.
    fn add(&mut self, ledger: &mut Ledger, batch: &[RequestRecord]) {
        if batch.is_empty() {
            return;
        }
        match insert_batch(&mut ledger.conn, batch) {
            Ok(n) => self.written += n,
            Err(first) => {
                tracing::warn!(
                    error = %first,
                    records = batch.len(),
                    path = %ledger.path.display(),
                    "ledger write failed; retrying once"
                );
                std::thread::sleep(Duration::from_millis(RETRY_PAUSE_MS));
                match insert_batch(&mut ledger.conn, batch) {
                    Ok(n) => self.written += n,
                    Err(second) => {
                        tracing::error!(
                            error = %second,
                            records = batch.len(),
                            path = %ledger.path.display(),
                            "ledger write failed twice; these usage records are lost"
                        );
                        self.lost += batch.len() as u64;
                        self.last_error = Some(second.to_string());
                    }
                }
            }
        }
    }

    fn finish(self, path: &Path) -> Result<u64, LedgerError> {
        match self.last_error {
            None => Ok(self.written),
            Some(last_error) => Err(LedgerError::RowsLost {
                path: path.to_path_buf(),
                written: self.written,
                lost: self.lost,
                last_error,
            }),
        }
    }
}

/// `PRAGMA user_version`.
pub(crate) fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |row| row.get(0))
}

/// The file's schema version; a version newer than this build's is refused
/// ([`LedgerError::TooNew`]) before anything reads or changes the file.
fn known_version(conn: &Connection, path: &Path) -> Result<i64, LedgerError> {
    let found = user_version(conn).map_err(LedgerError::sqlite(path))?;
    if found > i64::from(SCHEMA_VERSION) {
        return Err(LedgerError::TooNew {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

/// Applies the migrations past the file's version, each in its own transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LedgerError> {
    let found = known_version(conn, path)?;
    let start = usize::try_from(found.max(0)).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(start) {
        let tx = conn.transaction().map_err(LedgerError::sqlite(path))?;
        tx.execute_batch(sql).map_err(LedgerError::sqlite(path))?;
        tx.pragma_update(None, "user_version", i as i64 + 1)
            .map_err(LedgerError::sqlite(path))?;
        tx.commit().map_err(LedgerError::sqlite(path))?;
    }
    Ok(())
}

/// Opens `path` read-only for reports; it must be a ledger at [`SCHEMA_VERSION`].
pub(crate) fn open_read_only(path: &Path) -> Result<Connection, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::NotFound {
            path: path.to_path_buf(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(LedgerError::sqlite(path))?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
        .map_err(LedgerError::sqlite(path))?;
    let found = known_version(&conn, path)?;
    if found != i64::from(SCHEMA_VERSION) {
        return Err(LedgerError::NotCurrent {
            path: path.to_path_buf(),
            found,
            known: SCHEMA_VERSION,
        });
    }
    Ok(conn)
}

/// An unsigned count as SQLite's INTEGER (saturating at `i64::MAX`).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Writes `records` in one transaction; returns how many requests were written.
fn insert_batch(conn: &mut Connection, records: &[RequestRecord]) -> rusqlite::Result<u64> {
    let tx = conn.transaction()?;
    {
        let mut request = tx.prepare_cached(
            "INSERT INTO requests (request_id, started_at_ms, route, model, provider, status,
                stream, latency_ms, ttft_ms, prompt_tokens, completion_tokens, cost_usd,
                estimated, fallback, no_finish_reason, stream_anomalies, cached_tokens,
                cache_write_tokens, endpoint)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                ?17, ?18, ?19)",
        )?;
        let mut attempt = tx.prepare_cached(
            "INSERT INTO attempts (request_rowid, seq, model, provider, key_id, status,
                error_kind, latency_ms, prompt_tokens, completion_tokens, cost_usd, estimated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        for r in records {
            let rowid = request.insert(params![
                r.request_id,
                int(r.started_at_unix_ms),
                r.route,
                r.model,
                r.provider,
                r.status,
                r.stream,
                int(r.latency_ms),
                r.ttft_ms.map(int),
                int(r.prompt_tokens),
                int(r.completion_tokens),
                r.cost_usd,
                r.estimated,
                r.fallback,
                r.no_finish_reason,
                r.stream_anomalies,
                int(r.cached_tokens),
                int(r.cache_write_tokens),
                r.endpoint.as_str(),
            ])?;
            for (seq, a) in r.attempts.iter().enumerate() {
                attempt.execute(params![
                    rowid,
                    int(seq as u64),
                    a.model,
                    a.provider,
                    a.key_id,
                    a.status,
                    a.outcome.as_str(),
                    int(a.latency_ms),
                    int(a.prompt_tokens),
                    int(a.completion_tokens),
                    a.cost_usd,
                    a.estimated,
                ])?;
            }
        }
    }
    tx.commit()?;
    Ok(records.len() as u64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A ledger written at v2 (before `stream_anomalies` and `endpoint`) is migrated at open: its rows
    /// read 0, new rows keep their count.
    #[test]
    fn a_v2_ledger_gains_stream_anomalies_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        {
            let conn = Connection::open(&path).unwrap();
            for sql in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO requests (request_id, started_at_ms, route, status, stream,
                    latency_ms, prompt_tokens, completion_tokens, cost_usd, estimated, fallback)
                 VALUES ('old', 1, 'r', 200, 1, 5, 0, 0, 0.0, 0, 0)",
                [],
            )
            .unwrap();
        }
        let mut ledger = Ledger::open(&path).unwrap();
        assert_eq!(SCHEMA_VERSION, 5);
        assert_eq!(ledger.schema_version().unwrap(), 5);
        let mut record = crate::usage::RequestMeta::new(Some("new"), "r", true, Default::default())
            .record(None, 200, &[], crate::usage::TokenCount::default(), None);
        record.stream_anomalies = 5;
        record.endpoint = crate::usage::record::Endpoint::Messages;
        ledger.insert(&[record]).unwrap();
        let rows: Vec<(String, i64, String)> = ledger
            .conn
            .prepare("SELECT request_id, stream_anomalies, endpoint FROM requests ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            [
                ("old".to_owned(), 0, "chat".to_owned()),
                ("new".to_owned(), 5, "messages".to_owned())
            ],
            "old rows gain the columns' defaults (v3 anomalies, v5 endpoint)"
        );
    }
}
