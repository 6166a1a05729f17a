//! The Redis (Valkey-compatible) state backend (issue 15): one handle, [`RedisState`],
//! that the resilience units of a topology share when `state.backend: redis`.
//!
//! Every operation is one atomic Lua script run with `EVALSHA` (the `redis` crate's
//! [`Script`] loads it on `NOSCRIPT` and retries), whose time is Redis `TIME`, never a
//! replica's clock. The scripts are next to the unit they serve
//! (`resilience::token_bucket`, `concurrency`, `breaker`, `key_pool`), each a Lua
//! function that `state::batch` also composes into the one script admitting a whole
//! candidate in one round trip; this file only runs them: with a deadline of
//! `state.timeout_ms`, and with a health flag so that a request never waits on a
//! backend known to be down.
//!
//! Health: an error or a timeout marks the backend down (logged once per transition);
//! while it is down no request touches it and one background task pings it with
//! exponential backoff (100 ms doubling to 5 s); the first answer marks it up again, so
//! shared mode resumes without a restart. What a unit does while it is down is
//! [`OnUnavailable`]: its in-process state, with its limits divided by `replicas`, or
//! a refusal.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ToRedisArgs};
use tokio::time::Instant;

use crate::config::{OnUnavailable, StateConfig};

/// The gauge: 1 while the shared state backend answers, 0 while it is down.
pub const STATE_BACKEND_UP: &str = "echelon_state_backend_up";
/// The histogram of state round trips, in seconds (each script call, success or not).
pub const STATE_ROUND_TRIP_SECONDS: &str = "echelon_state_round_trip_seconds";

/// The shared state backend could not answer in time (down, slow, or refused the
/// script); with `on_unavailable: reject` the attempt is refused with this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state backend redis unavailable (state.on_unavailable: reject)")]
pub struct Unavailable;

/// How this replica uses its state right now, as `/admin/state` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateMode {
    /// Shared through Redis.
    Shared,
    /// Redis is down: in-process state, limits divided by `replicas`.
    Local,
    /// Redis is down: attempts needing shared state are refused.
    Reject,
}

impl StateMode {
    /// `shared`, `local` or `reject`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateMode::Shared => "shared",
            StateMode::Local => "local",
            StateMode::Reject => "reject",
        }
    }
}

/// The connection to the shared state, its settings and its health.
pub struct RedisState {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    lease_ttl: Duration,
    on_unavailable: OnUnavailable,
    replicas: u32,
    up: AtomicBool,
    /// Whether the reconnect task runs.
    probing: AtomicBool,
    /// Numbers this replica's concurrency leases.
    leases: AtomicU64,
    /// This replica's id in lease names (pid and start time).
    replica: String,
}

impl fmt::Debug for RedisState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("RedisState")
            .field("prefix", &self.prefix)
            .field("up", &self.is_up())
            .finish()
    }
}

/// The settings that make a [`RedisState`] could not be used.
#[derive(Debug, thiserror::Error)]
#[error("state.url: {0}")]
pub struct BadUrl(String);

impl RedisState {
    /// A handle on the Redis at `config.url`. Nothing is connected yet: the first
    /// operation (inside a tokio runtime) connects. It counts as up until an operation
    /// fails.
    ///
    /// # Errors
    /// [`BadUrl`] when the URL does not parse (a validated config never has one).
    pub fn new(config: &StateConfig) -> Result<Arc<RedisState>, BadUrl> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| BadUrl(e.detail().unwrap_or("unparsable").to_owned()))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        metrics::gauge!(STATE_BACKEND_UP).set(1.0);
        Ok(Arc::new(RedisState {
            client,
            conn: OnceLock::new(),
            prefix: config.key_prefix.clone(),
            timeout: config.timeout(),
            lease_ttl: config.lease_ttl,
            on_unavailable: config.on_unavailable,
            replicas: config.replicas.max(1),
            up: AtomicBool::new(true),
            probing: AtomicBool::new(false),
            leases: AtomicU64::new(0),
            replica: format!("{}-{started}", std::process::id()),
        }))
    }

    /// The key of `name` under the configured prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The concurrency lease TTL (`state.lease_ttl`).
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// The number of replicas the limits are shared by (`state.replicas`, ≥ 1).
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// A fresh name for a concurrency lease held by this replica.
    pub fn lease_name(&self) -> String {
        let n = self.leases.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.replica)
    }

    /// Whether the backend answered the last time it was asked.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How units behave now.
    pub fn mode(&self) -> StateMode {
        match (self.is_up(), self.on_unavailable) {
            (true, _) => StateMode::Shared,
            (false, OnUnavailable::Local) => StateMode::Local,
            (false, OnUnavailable::Reject) => StateMode::Reject,
        }
    }

    /// What a unit does when an operation could not be run: `Ok(())` to go on with its
    /// in-process state (`local`), `Err(Unavailable)` to refuse (`reject`).
    pub fn fallback(&self) -> Result<(), Unavailable> {
        match self.on_unavailable {
            OnUnavailable::Local => Ok(()),
            OnUnavailable::Reject => Err(Unavailable),
        }
    }

    fn connection(&self) -> Result<ConnectionManager, redis::RedisError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let made = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.conn.get_or_init(|| made).clone())
    }

    /// Runs `script` on `keys` with `args`, within `timeout_ms`.
    ///
    /// # Errors
    /// [`Unavailable`] at once while the backend is down, or when this call fails or
    /// times out (which marks it down and starts the reconnect task).
    pub async fn run<T: FromRedisValue>(
        self: &Arc<Self>,
        script: &Script,
        keys: &[&str],
        args: &[&dyn ToRedisArgsDyn],
    ) -> Result<T, Unavailable> {
        if !self.is_up() {
            self.probe();
            return Err(Unavailable);
        }
        let mut conn = match self.connection() {
            Ok(c) => c,
            Err(e) => {
                self.down(&e.to_string());
                return Err(Unavailable);
            }
        };
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(*k);
        }
        for a in args {
            a.push_to(&mut inv);
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, inv.invoke_async::<T>(&mut conn)).await;
        metrics::histogram!(STATE_ROUND_TRIP_SECONDS).record(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.down(&e.to_string());
                Err(Unavailable)
            }
            Err(_) => {
                self.down(&format!("no answer within {} ms", self.timeout.as_millis()));
                Err(Unavailable)
            }
        }
    }

    /// Runs `script` in the background (a settlement from a `Drop` or a report), in the
    /// current tokio runtime; nothing happens outside one or while the backend is down.
    pub fn spawn_run(self: &Arc<Self>, script: &'static Script, keys: Vec<String>, args: Vec<Arg>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        handle.spawn(async move {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let args: Vec<&dyn ToRedisArgsDyn> =
                args.iter().map(|a| a as &dyn ToRedisArgsDyn).collect();
            let _: Result<redis::Value, _> = me.run(script, &keys, &args).await;
        });
    }

    fn down(self: &Arc<Self>, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            metrics::gauge!(STATE_BACKEND_UP).set(0.0);
            tracing::error!(
                on_unavailable = self.on_unavailable.as_str(),
                replicas = self.replicas,
                "state backend redis unavailable ({why}): {}",
                match self.on_unavailable {
                    OnUnavailable::Local =>
                        "using in-process state with the limits divided by state.replicas",
                    OnUnavailable::Reject => "refusing attempts that need shared state",
                }
            );
        }
        self.probe();
    }

    /// Starts the reconnect task unless it runs.
    fn probe(self: &Arc<Self>) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let me = self.clone();
        handle.spawn(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                tokio::time::sleep(wait).await;
                if me.ping().await {
                    me.up.store(true, Ordering::Relaxed);
                    metrics::gauge!(STATE_BACKEND_UP).set(1.0);
                    tracing::info!("state backend redis is back: shared state resumed");
                    break;
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            me.probing.store(false, Ordering::Relaxed);
        });
    }

    /// One `PING` within the timeout.
    async fn ping(&self) -> bool {
        let Ok(mut conn) = self.connection() else {
            return false;
        };
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        matches!(
            tokio::time::timeout(self.timeout.max(Duration::from_millis(100)), ping).await,
            Ok(Ok(_))
        )
    }
}

/// A script argument owned by a background call.
#[derive(Debug, Clone)]
pub enum Arg {
    /// A number.
    F(f64),
    /// An integer.
    I(i64),
    /// Text.
    S(String),
}

/// A script argument, object-safe (what [`RedisState::run`] takes).
pub trait ToRedisArgsDyn: Send + Sync {
    /// Adds itself to the invocation.
    fn push_to(&self, inv: &mut redis::ScriptInvocation<'_>);
}

impl<T: ToRedisArgs + Send + Sync> ToRedisArgsDyn for T {
    fn push_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self);
    }
}

impl ToRedisArgs for Arg {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        match self {
            Arg::F(x) => x.write_redis_args(out),
            Arg::I(x) => x.write_redis_args(out),
            Arg::S(x) => x.write_redis_args(out),
        }
    }
}

/// Redis `TIME` in milliseconds, as a Lua prelude of every script.
pub const NOW_MS: &str = "local __t = redis.call('TIME')\nlocal now = tonumber(__t[1]) * 1000 + math.floor(tonumber(__t[2]) / 1000)\n";
