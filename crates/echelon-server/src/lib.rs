//! Echelon's OpenAI-compatible HTTP server (axum).
//!
//! Endpoints: `POST /v1/chat/completions` (streamed and not), `POST /v1/responses` (the
//! OpenAI Responses API, stateless, bridged to chat completions), `POST /v1/messages`
//! (Anthropic Messages, streamed and not) and `POST /v1/messages/count_tokens`
//! (`messages.rs`), `POST /v1/embeddings` (routed and guarded like chat:
//! `embeddings.rs`), `GET /v1/models` (the
//! routes), `GET /health`, `GET /metrics` (Prometheus), `GET /admin/state` (breakers, buckets, keys, in-flight
//! counts), `GET /admin` (the admin page) and `POST /admin/reload` (hot reload,
//! `reload.rs`; also on SIGHUP and, with `server.watch_config`, on a file change). Gateway keys, when configured, are checked as `Authorization: Bearer` on
//! `/v1/*` and `/admin/*` (on `/v1/messages*` also as `x-api-key`). Every error, 404 and
//! 405 included, is the OpenAI error body (Anthropic's on `/v1/messages*`)
//! (`{"error": {"message", "type", "param", "code", "attempts"}}`) with the status
//! DESIGN.md §4 gives (one type: `error::ApiError`).
//!
//! Every answer carries `x-echelon-model` (the model that answered) and
//! `x-echelon-attempts` (each attempt as `model:error_kind:status:latency_ms`, comma
//! separated), so a failover is visible to any client without logs; every chat
//! completion and embeddings answer (an error too) carries `x-echelon-overhead-ms`, the time spent in
//! the gateway excluding the attempts' upstream latencies (for a stream, up to its
//! response head). A 429 whose every candidate was rate-limited carries `Retry-After`
//! (whole seconds, rounded up, at least 1): the smallest wait among them.

//!
//! # Who may call it
//! Besides the gateway keys: a request is served only when its `Host` names this gateway
//! (`host.rs`: the listening address, loopback names on loopback, `allowed_hosts`), when
//! it carries no `Origin` or one of `cors_origins` (`cors.rs`), and, on `POST`, when its
//! body is declared `application/json` (`content_type.rs`). `/metrics` is behind the keys
//! with `metrics_auth`. Together they keep web pages out of a gateway on a user's
//! machine (issue 14).
//!
//! # Bounds
//! [`serve`] closes connections that do not send a request head within
//! `header_read_timeout`, serves at most `max_connections` at once, and ends in-flight
//! requests `shutdown_timeout` after shutdown begins (`conn.rs`).

mod admin;
mod auth;
mod conn;
mod content_type;
mod cors;
mod embeddings;
mod error;
mod guard;
mod handlers;
mod host;
mod messages;
mod metrics;
pub mod reload;
mod reply;
mod responses;
mod sse;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use echelon::Gateway;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;

pub use auth::GatewayKeys;
pub use reload::Reloader;

/// The inbound dialects' translations to and from the neutral chat shape, exactly as the
/// endpoints make them, for tools and benchmarks (`benches/translate.rs`). The
/// Responses translations are public in [`echelon_types::responses`].
pub mod translate {
    use echelon_types::anthropic::MessagesResponse;
    use echelon_types::{ChatCompletion, ChatCompletionRequest};

    /// A `POST /v1/messages` body as the chat request it is routed as.
    ///
    /// # Errors
    /// The message of the 400 a client would get (not a Messages request, no messages).
    pub fn messages_request(body: &[u8]) -> Result<ChatCompletionRequest, String> {
        crate::messages::parse(body)
            .and_then(crate::messages::to_chat)
            .map_err(|e| e.message().to_owned())
    }

    /// A chat completion as the Messages answer a `/v1/messages` client gets;
    /// `thinking`: whether the client asked for extended thinking (then
    /// `reasoning_content` becomes a `thinking` block).
    pub fn messages_answer(completion: &ChatCompletion, thinking: bool) -> MessagesResponse {
        crate::messages::from_chat(completion, thinking)
    }
}

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Keys a client must present as `Authorization: Bearer`; empty means no auth.
    pub api_keys: Vec<SecretString>,
    /// Largest request body accepted, bytes; larger gets 413.
    pub body_limit_bytes: usize,
    /// Log request bodies (prompts) at info level; off by default (`server.log_bodies`).
    pub log_bodies: bool,
    /// Serve `GET /metrics` and install the Prometheus recorder (`server.metrics`).
    pub metrics: bool,
    /// Put `GET /metrics` behind the gateway keys (`server.metrics_auth`); default off.
    pub metrics_auth: bool,
    /// `Host` values accepted besides this gateway's own address (`server.allowed_hosts`:
    /// `host` or `host:port`; `"*"` turns the check off). Default empty.
    pub allowed_hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) of web pages allowed to call the gateway, with
    /// CORS headers (`server.cors_origins`; `"*"` allows any). Default empty: requests
    /// with an `Origin` header get 403.
    pub cors_origins: Vec<String>,
    /// Longest wait for a complete request head, and on an idle kept-alive connection
    /// (`server.header_read_timeout`). Default 10 s.
    pub header_read_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog
    /// (`server.max_connections`). Default [`default_max_connections`].
    pub max_connections: usize,
    /// After shutdown begins, how long in-flight requests may still run before they are
    /// ended (`server.shutdown_timeout`). Default 30 s.
    pub shutdown_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            api_keys: Vec::new(),
            body_limit_bytes: 8 * 1024 * 1024,
            log_bodies: false,
            metrics: true,
            metrics_auth: false,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            header_read_timeout: Duration::from_secs(10),
            max_connections: default_max_connections(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

/// The default connection cap: 4,096, or half the process's open-files limit when that
/// is lower (the other half is left for the upstream connections each request opens, the
/// ledger and the logs), at least 16.
pub fn default_max_connections() -> usize {
    const CAP: u64 = 4096;
    let by_limit = echelon_socket::open_files_limit().map_or(CAP, |n| n / 2);
    usize::try_from(by_limit.clamp(16, CAP)).unwrap_or(4096)
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) keys: Arc<GatewayKeys>,
    pub(crate) log_bodies: bool,
    /// Reloads the config (`POST /admin/reload`); `None` without a config file.
    pub(crate) reloader: Option<Arc<Reloader>>,
}

/// The axum router with every endpoint (`POST /admin/reload` answers 409: there is no
/// config file to reload; see [`router_with_reloader`]).
pub fn router(gateway: Arc<Gateway>, options: &ServerOptions) -> Router {
    build_router(gateway, None, options)
}

/// [`router`] over the reloader's gateway, with `POST /admin/reload` reloading its
/// config file.
pub fn router_with_reloader(reloader: Arc<Reloader>, options: &ServerOptions) -> Router {
    build_router(reloader.gateway().clone(), Some(reloader), options)
}

fn build_router(
    gateway: Arc<Gateway>,
    reloader: Option<Arc<Reloader>>,
    options: &ServerOptions,
) -> Router {
    let state = AppState {
        gateway,
        keys: Arc::new(GatewayKeys::new(&options.api_keys)),
        log_bodies: options.log_bodies,
        reloader,
    };
    // Its body is read only as JSON (`content_type::JsonBody`).
    let chat = post(handlers::chat_completions);
    // The key check only when there are keys: a `from_fn` layer costs a service clone
    // and a boxed future per request (see `guard.rs`).
    let with_keys = |r: Router<AppState>| {
        if state.keys.is_enabled() {
            r.route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                auth::require_gateway_key,
            ))
        } else {
            r
        }
    };
    // The Anthropic endpoints take the key as `x-api-key` too, and answer a missing or
    // wrong key in Anthropic's error shape.
    let anthropic = Router::new()
        .route("/messages", post(messages::messages))
        .route("/messages/count_tokens", post(messages::count_tokens))
        .method_not_allowed_fallback(handlers::method_not_allowed);
    let anthropic = if state.keys.is_enabled() {
        anthropic.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_gateway_key_anthropic,
        ))
    } else {
        anthropic
    };
    let v1 = with_keys(
        Router::new()
            .route("/chat/completions", chat)
            .route("/embeddings", post(embeddings::embeddings))
            .route("/responses", post(responses::responses))
            .route("/models", get(handlers::list_models))
            .method_not_allowed_fallback(handlers::method_not_allowed),
    )
    .merge(anthropic);
    // Bearer or Basic (a browser's login prompt), with a Basic challenge on 401.
    let admin = Router::new()
        .route("/", get(admin::page))
        .route("/state", get(handlers::admin_state))
        .route("/reload", post(admin::reload).get(admin::reload_status))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .nest("/admin", admin)
        .route("/health", get(handlers::health))
        .merge(if options.metrics {
            metrics::routes(state.clone(), options.metrics_auth)
        } else {
            Router::new()
        })
        // Last, for `/health`: the nested routes and `/metrics` set theirs before their
        // key check, so that a wrong method without a key still gets 401.
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(options.body_limit_bytes))
        // Outermost, on every path: the `Host` check, then the `Origin` check.
        .layer(guard::GuardLayer::new(
            &options.allowed_hosts,
            &options.cors_origins,
        ))
        .with_state(state)
}

/// What is risky in serving with `options` on `local` (the listener's address), one
/// message each: a non-loopback address without gateway keys; `api_keys` given but all
/// empty; `cors_origins` or `allowed_hosts` of `"*"` without keys. [`serve`] logs each
/// at `warn` level when it starts.
pub fn exposure_warnings(local: SocketAddr, options: &ServerOptions) -> Vec<String> {
    let keyless = !GatewayKeys::new(&options.api_keys).is_enabled();
    let mut warnings = Vec::new();
    if keyless
        && !options.api_keys.is_empty()
        && options
            .api_keys
            .iter()
            .all(|k| k.expose_secret().is_empty())
    {
        warnings
            .push("every server.api_keys entry is empty: gateway authentication is OFF".to_owned());
    }
    if keyless && !local.ip().to_canonical().is_loopback() {
        warnings.push(format!(
            "listening on {local}, reachable from other machines, without server.api_keys: \
             anyone who can connect can spend your provider keys"
        ));
    }
    if keyless && options.cors_origins.iter().any(|o| o.trim() == "*") {
        warnings.push(
            "server.cors_origins allows any web page (\"*\") and there are no server.api_keys"
                .to_owned(),
        );
    }
    if keyless && options.allowed_hosts.iter().any(|h| h.trim() == "*") {
        warnings.push(
            "server.allowed_hosts is \"*\" (no Host check: open to DNS rebinding) and there \
             are no server.api_keys"
                .to_owned(),
        );
    }
    warnings
}

/// A listener for [`serve`]: backlog 4,096, not tokio's 128 (see `echelon_socket`).
pub use echelon_socket::{LISTEN_BACKLOG, bind};

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting, lets
/// in-flight requests (streams included) finish for up to `options.shutdown_timeout`,
/// ends those still running and returns.
///
/// Connections are bounded by `options.header_read_timeout` and
/// `options.max_connections` (see `conn.rs`); [`exposure_warnings`] are logged first.
///
/// Accepted connections get `TCP_NODELAY`: without it, Nagle's algorithm holds each
/// small SSE event until the client's delayed ACK (up to 40 ms on Linux), so a stream's
/// chunks would reach the client late and in bursts.
///
/// # Errors
/// An I/O error of the listener (its local address cannot be read).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    for w in exposure_warnings(local, options) {
        tracing::warn!("{w}");
    }
    let limits = conn::Limits {
        header_read_timeout: options.header_read_timeout,
        max_connections: options.max_connections,
        shutdown_timeout: options.shutdown_timeout,
    };
    conn::run(listener, app, limits, shutdown).await
}

/// Resolves on the first SIGINT (Ctrl-C) or, on Unix, SIGTERM; from then on, a second
/// one of either exits the process at once (status 128 + the signal's number: 130 or
/// 143), for when the graceful shutdown takes longer than the operator will wait.
pub async fn shutdown_signal() {
    let mut signals = Signals::new();
    let first = signals.next().await;
    tracing::info!(
        "{} received: finishing in-flight requests (again to exit at once)",
        first.name()
    );
    tokio::spawn(async move {
        let second = signals.next().await;
        tracing::warn!("{} received again: exiting now", second.name());
        std::process::exit(second.exit_code());
    });
}

/// A shutdown signal.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// The shell's status for a process ended by it.
    fn exit_code(self) -> i32 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }
}

/// SIGINT and SIGTERM listeners, registered once and kept, so that a signal arriving
/// just after the first is not missed. A listener that cannot be registered never fires.
struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Signals {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// The next signal.
    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                if let Some(s) = s
                    && s.recv().await.is_some()
                {
                    return;
                }
                std::future::pending().await
            }
            tokio::select! {
                () = recv(&mut self.interrupt) => Signal::Interrupt,
                () = recv(&mut self.terminate) => Signal::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            match tokio::signal::ctrl_c().await {
                Ok(()) => Signal::Interrupt,
                Err(_) => std::future::pending().await,
            }
        }
    }
}
