//! Echelon's OpenAI-compatible HTTP server (axum).
//!
//! Endpoints: `POST /v1/chat/completions` (streamed and not), `GET /v1/models` (the
//! routes), `GET /health`, `GET /metrics` (Prometheus), `GET /admin/state` (breakers, buckets, keys, in-flight
//! counts). Gateway keys, when configured, are checked as `Authorization: Bearer` on
//! `/v1/*` and `/admin/*`. Every error is the OpenAI error body
//! (`{"error": {"message", "type", "param", "code", "attempts"}}`) with the status
//! DESIGN.md §4 gives.
//!
//! Every answer carries `x-echelon-model` (the model that answered) and
//! `x-echelon-attempts` (each attempt as `model:error_kind:status:latency_ms`, comma
//! separated), so a failover is visible to any client without logs.

mod auth;
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
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_gateway_key,
        ));
    let admin = Router::new()
        .route("/state", get(handlers::admin_state))
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
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(options.body_limit_bytes))
        .with_state(state)
}

/// The backlog [`bind`] asks for: how many connections the kernel completes and queues
/// for the accept loop. Linux caps it at `net.core.somaxconn` (4,096 by default since
/// Linux 5.4).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A listener for [`serve`] on `addr` (the first of its addresses that binds), with
/// `SO_REUSEADDR` on Unix and a backlog of [`LISTEN_BACKLOG`].
///
/// Not `tokio::net::TcpListener::bind`: that listens with a backlog of 128 (the value
/// mio copies from the standard library). When more clients connect at once than the
/// accept loop has taken, Linux drops their SYNs, or the ACKs that complete their
/// handshakes, and counts `ListenOverflows` (`nstat`); the clients try again only after
/// a second. A batch client opening 256 connections at once hit that.
///
/// # Errors
/// `addr` does not resolve, or no address of it can be bound.
pub async fn bind(addr: impl tokio::net::ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As mio does: on Windows the option would let another socket take the port.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        match socket
            .bind(addr)
            .and_then(|()| socket.listen(LISTEN_BACKLOG))
        {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolved to nothing",
        )
    }))
}

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpStream;

    /// 300 clients connect to a listener that accepts none of them. With the backlog of
    /// 128 that `TcpListener::bind` gives, the kernel drops every SYN after the 129th and
    /// those connects hang; with [`super::bind`]'s they all complete.
    #[tokio::test]
    async fn bind_queues_hundreds_of_connections_before_any_accept() {
        const CLIENTS: usize = 300;
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < CLIENTS {
            eprintln!("skipped: net.core.somaxconn is {somaxconn}, below {CLIENTS}");
            return;
        }
        let listener = super::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..CLIENTS {
            // A liveness bound, not a speed figure: a dropped SYN is retried after 1 s,
            // then 3 s, and never gets in while nothing is accepted.
            let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            held.push(stream);
        }
        assert_eq!(held.len(), CLIENTS);
        drop(listener);
    }
}
