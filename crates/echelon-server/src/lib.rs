//! Echelon's OpenAI-compatible HTTP server (axum).
//!
//! Endpoints: `POST /v1/chat/completions` (streamed and not), `GET /v1/models` (the
//! routes), `GET /health`, `GET /metrics` (Prometheus), `GET /admin/state` (breakers, buckets, keys, in-flight
//! counts). Gateway keys, when configured, are checked as `Authorization: Bearer` on
//! `/v1/*` and `/admin/*`. Every error, 404 and 405 included, is the OpenAI error body
//! (`{"error": {"message", "type", "param", "code", "attempts"}}`) with the status
//! DESIGN.md §4 gives (one type: `error::ApiError`).
//!
//! Every answer carries `x-echelon-model` (the model that answered) and
//! `x-echelon-attempts` (each attempt as `model:error_kind:status:latency_ms`, comma
//! separated), so a failover is visible to any client without logs.

mod auth;
mod error;
mod handlers;
mod metrics;
mod reply;
mod sse;

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use echelon::Gateway;
use secrecy::SecretString;
use tokio::net::TcpListener;

pub use auth::GatewayKeys;

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
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            api_keys: Vec::new(),
            body_limit_bytes: 8 * 1024 * 1024,
            log_bodies: false,
            metrics: true,
        }
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) keys: Arc<GatewayKeys>,
    pub(crate) log_bodies: bool,
}

/// The axum router with every endpoint.
pub fn router(gateway: Arc<Gateway>, options: &ServerOptions) -> Router {
    let state = AppState {
        gateway,
        keys: Arc::new(GatewayKeys::new(&options.api_keys)),
        log_bodies: options.log_bodies,
    };
    let v1 = Router::new()
        .route("/chat/completions", post(handlers::chat_completions))
        .route("/models", get(handlers::list_models))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_gateway_key,
        ));
    let admin = Router::new()
        .route("/state", get(handlers::admin_state))
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_gateway_key,
        ));
    Router::new()
        .nest("/v1", v1)
        .nest("/admin", admin)
        .route("/health", get(handlers::health))
        .merge(if options.metrics {
            metrics::routes(state.clone(), false)
        } else {
            Router::new()
        })
        // Last, for `/health`: the nested routes and `/metrics` set theirs before their
        // key check, so that a wrong method without a key still gets 401.
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(options.body_limit_bytes))
        .with_state(state)
}

/// A listener for [`serve`]: backlog 4,096, not tokio's 128 (see `echelon_socket`).
pub use echelon_socket::{LISTEN_BACKLOG, bind};

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight requests (streams included) finish.
///
/// Accepted connections get `TCP_NODELAY`: without it, Nagle's algorithm holds each
/// small SSE event until the client's delayed ACK (up to 40 ms on Linux), so a stream's
/// chunks would reach the client late and in bursts.
///
/// # Errors
/// An I/O error of the listener.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY could not be set");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received: finishing in-flight requests"),
        () = term => tracing::info!("SIGTERM received: finishing in-flight requests"),
    }
}
