//! Hot reload (issue 18): SIGHUP, `POST /admin/reload` and, with `server.watch_config:
//! true`, a change of the config file reload the configuration without a restart.
//!
//! A reload loads and validates the file first: a config that does not load (its
//! errors as `file:line:col: key.path: message`) or does not build is refused, the old
//! one keeps serving, the errors are logged at `error` level and returned by the
//! endpoint. A good one is swapped in atomically ([`Gateway::reload`]): requests in
//! flight finish on the config they started with, new ones see the new one at once, and
//! every unit of state whose identity did not change is kept (see
//! [`echelon::config::diff`]). Each reload counts in `echelon_config_reloads_total{result}`
//! (`ok`, `error`). The `server:` and `usage:` sections are read at start only: a reload
//! that changes them says so (`needs_restart`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use echelon::Gateway;
use echelon::config::{Config, ConfigDiff};
use serde::Serialize;

/// The reload counter, by `result` (`ok`, `error`).
pub const CONFIG_RELOADS_TOTAL: &str = "echelon_config_reloads_total";

/// How long the config file must be quiet after a change before a watched reload runs:
/// an editor's save (write, rename, chmod) is one reload, not three.
pub const WATCH_DEBOUNCE: Duration = Duration::from_millis(500);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// `POST /admin/reload`.
    Endpoint,
    /// The file watcher (`server.watch_config`).
    Watch,
}

/// `ok` or `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    /// The new config serves.
    Ok,
    /// The new config was refused; the old one serves.
    Error,
}

impl ReloadResult {
    /// The `result` label.
    pub fn name(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
        }
    }
}

/// The outcome of one reload: the body of `POST /admin/reload`, and the last one is in
/// the admin page.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadOutcome {
    /// Whether the new config serves.
    pub result: ReloadResult,
    /// What asked for it.
    pub trigger: Trigger,
    /// When it ran, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// How long loading, validating and swapping took, ms.
    pub took_ms: u64,
    /// Why it was refused: each error as `file:line:col: key.path: message`.
    pub errors: Vec<String>,
    /// What changed, and which state was kept, rescaled or reset (`None` when refused).
    pub diff: Option<ConfigDiff>,
}

/// The reload state shown by the admin page.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// The config file or directory reloads read.
    pub source: String,
    /// Whether file changes trigger a reload.
    pub watching: bool,
    /// When the serving config was loaded, ms since the Unix epoch.
    pub loaded_at_unix_ms: u64,
    /// Reloads that succeeded since start.
    pub reloads_ok: u64,
    /// Reloads that were refused since start.
    pub reloads_failed: u64,
    /// The last reload, if any.
    pub last: Option<ReloadOutcome>,
}

/// Reloads a gateway's configuration from its file, one reload at a time.
#[derive(Debug)]
pub struct Reloader {
    gateway: Arc<Gateway>,
    source: PathBuf,
    /// The serving config (what the next diff is taken against).
    current: Mutex<Arc<Config>>,
    status: Mutex<ReloadStatus>,
    /// Held while a reload runs: two triggers at once run one after the other.
    serial: tokio::sync::Mutex<()>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update under these locks is a whole-value write.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Reloader {
    /// A reloader for `gateway`, serving `config` as loaded from `source`.
    pub fn new(gateway: Arc<Gateway>, source: impl Into<PathBuf>, config: Config) -> Self {
        let source = source.into();
        Reloader {
            status: Mutex::new(ReloadStatus {
                source: source.display().to_string(),
                watching: false,
                loaded_at_unix_ms: unix_ms(SystemTime::now()),
                reloads_ok: 0,
                reloads_failed: 0,
                last: None,
            }),
            gateway,
            source,
            current: Mutex::new(Arc::new(config)),
            serial: tokio::sync::Mutex::new(()),
        }
    }

    /// The gateway it reloads.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The config file or directory it reads.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The serving config.
    pub fn current(&self) -> Arc<Config> {
        lock(&self.current).clone()
    }

    /// Counts so far and the last outcome.
    pub fn status(&self) -> ReloadStatus {
        lock(&self.status).clone()
    }

    /// Loads the config from the source, validates it and, when it is good, swaps it in.
    /// The outcome is logged, counted and kept for [`status`](Self::status); a refused
    /// config leaves the old one serving.
    pub async fn reload(&self, trigger: Trigger) -> ReloadOutcome {
        let _one_at_a_time = self.serial.lock().await;
        let started = Instant::now();
        let at = unix_ms(SystemTime::now());
        let path = self.source.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&path)).await;
        let built = match loaded {
            Ok(Ok(config)) => match self.gateway.reload(&config) {
                Ok(()) => Ok(config),
                Err(e) => Err(vec![format!("{}: {}", self.source.display(), e.message())]),
            },
            Ok(Err(errors)) => Err(errors.errors().iter().map(ToString::to_string).collect()),
            Err(e) => Err(vec![format!("the config load failed: {e}")]),
        };
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let outcome = match built {
            Ok(config) => {
                let old = self.current();
                let diff = ConfigDiff::between(&old, &config);
                *lock(&self.current) = Arc::new(config);
                tracing::info!(
                    trigger = ?trigger,
                    took_ms,
                    models_added = diff.models.added.len(),
                    models_removed = diff.models.removed.len(),
                    models_changed = diff.models.changed.len(),
                    "config reloaded from {}",
                    self.source.display()
                );
                for r in &diff.needs_restart {
                    tracing::warn!("config reload: {r} changed; it takes effect at the next start");
                }
                ReloadOutcome {
                    result: ReloadResult::Ok,
                    trigger,
                    at_unix_ms: at,
                    took_ms,
                    errors: Vec::new(),
                    diff: Some(diff),
                }
            }
            Err(errors) => {
                for e in &errors {
                    tracing::error!(trigger = ?trigger, "config reload refused, the old config keeps serving: {e}");
                }
                ReloadOutcome {
                    result: ReloadResult::Error,
                    trigger,
                    at_unix_ms: at,
                    took_ms,
                    errors,
                    diff: None,
                }
            }
        };
        metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => outcome.result.name()).increment(1);
        let mut status = lock(&self.status);
        match outcome.result {
            ReloadResult::Ok => {
                status.reloads_ok += 1;
                status.loaded_at_unix_ms = at;
            }
            ReloadResult::Error => status.reloads_failed += 1,
        }
        status.last = Some(outcome.clone());
        outcome
    }

    /// Reloads on every `SIGHUP` (Unix; elsewhere nothing) while the reloader lives (the
    /// task holds it weakly: dropping the last `Arc` ends the reloads).
    ///
    /// # Errors
    /// When the signal handler cannot be registered.
    pub fn spawn_sighup(self: &Arc<Self>) -> std::io::Result<()> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hangup = signal(SignalKind::hangup())?;
            // Weak: the task must not keep the gateway (and its ledger sender) alive
            // after the server is done with it.
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    let Some(me) = me.upgrade() else {
                        break;
                    };
                    tracing::info!("SIGHUP received: reloading the config");
                    me.reload(Trigger::Signal).await;
                }
            });
        }
        Ok(())
    }

    /// Watches the source (a file: its directory, for the file's name, so that an
    /// editor's rename-over still counts, and for a swapped `..data` link as Kubernetes
    /// mounts a ConfigMap; a directory: recursively) and reloads once it
    /// has been quiet for `debounce` after a change. The watcher lives as long as the
    /// returned task, which holds the reloader weakly (it ends once the reloader is
    /// dropped and another change arrives).
    ///
    /// # Errors
    /// When the watcher cannot be started (e.g. the inotify limit is reached).
    pub fn spawn_watch(
        self: &Arc<Self>,
        debounce: Duration,
    ) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Not canonicalized: a file behind a symlink that is swapped (a Kubernetes
        // ConfigMap's `..data`) is watched through the directory holding the link.
        let source = if self.source.is_absolute() {
            self.source.clone()
        } else {
            std::env::current_dir().map_or_else(|_| self.source.clone(), |d| d.join(&self.source))
        };
        let is_dir = source.is_dir();
        let name = source.file_name().map(std::ffi::OsStr::to_owned);
        let ours = move |p: &PathBuf| {
            let n = p.file_name();
            n == name.as_deref() || n.is_some_and(|n| n.to_string_lossy().starts_with("..data"))
        };
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if matches!(event.kind, notify::EventKind::Access(_)) {
                    return;
                }
                if is_dir || event.paths.iter().any(&ours) {
                    // The receiver is gone only when the task ended.
                    let _ = tx.send(());
                }
            })?;
        let (target, mode) = if is_dir {
            (source.clone(), RecursiveMode::Recursive)
        } else {
            (
                source
                    .parent()
                    .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                RecursiveMode::NonRecursive,
            )
        };
        watcher.watch(&target, mode)?;
        lock(&self.status).watching = true;
        let me = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Quiet for `debounce`: every event in between restarts the wait.
                loop {
                    match tokio::time::timeout(debounce, rx.recv()).await {
                        Ok(Some(())) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(me) = me.upgrade() else {
                    return;
                };
                tracing::info!("config file changed: reloading");
                me.reload(Trigger::Watch).await;
            }
        }))
    }
}
