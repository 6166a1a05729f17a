//! The accept loop: each connection served by hyper (HTTP/1.1, and HTTP/2 with prior
//! knowledge) under three bounds `axum::serve` does not set.
//!
//! - **Header-read timeout** ([`Limits::header_read_timeout`]): a connection that has not
//!   sent a complete request head within it is closed, as is a kept-alive connection
//!   idle that long before its next request (hyper's HTTP/1 `header_read_timeout`, which
//!   needs a timer; the first head, including the bytes hyper reads to tell HTTP/1 from
//!   HTTP/2, is bounded here too, because that stage has no timeout of its own).
//! - **Connection cap** ([`Limits::max_connections`]): at most that many connections are
//!   served at once. Beyond it the loop stops accepting: new connections wait in the
//!   kernel's listen backlog (see `echelon_socket::LISTEN_BACKLOG`) until one closes, so
//!   a flood of idle connections delays others but cannot exhaust descriptors; with the
//!   header-read timeout, idle ones make room within that timeout.
//! - **Shutdown deadline** ([`Limits::shutdown_timeout`]): when the shutdown future
//!   resolves, the listener is closed, idle connections close, in-flight requests
//!   (streams included) may finish; those still running at the deadline are ended (their
//!   connection tasks are dropped, which drops the request futures: an abandoned stream
//!   is recorded by the gateway as it is for a client that went away).
//!
//! Every accepted socket gets `TCP_NODELAY` (see [`serve`](crate::serve)), and every
//! request the [`LocalAddr`] extension of its connection (the `Host` check's "this
//! gateway").

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::host::LocalAddr;

/// The bounds of the accept loop (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest wait for a complete request head, or on an idle kept-alive connection.
    pub(crate) header_read_timeout: Duration,
    /// Connections served at once (at least 1).
    pub(crate) max_connections: usize,
    /// Longest wait for in-flight requests after shutdown begins.
    pub(crate) shutdown_timeout: Duration,
}

/// How often "connection limit reached" is logged at most while it stays reached.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then drains
/// (see the module docs) and returns.
pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopping) = watch::channel(());
    let mut conns = JoinSet::new();
    let mut last_full_warning = None;
    let shutdown = std::pin::pin!(shutdown);
    let mut shutdown = shutdown;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = accept(&listener, &permits, &mut last_full_warning, limits.max_connections) => {
                let Some((tcp, permit)) = accepted else { continue };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY could not be set");
                }
                let Ok(local) = tcp.local_addr() else { continue };
                conns.spawn(connection(
                    tcp,
                    local,
                    app.clone(),
                    builder.clone(),
                    limits.header_read_timeout,
                    stopping.clone(),
                    permit,
                ));
            }
        }
    }
    drop(listener);
    let _ = stop.send(());
    let drained = tokio::time::timeout(limits.shutdown_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = conns.len(),
            shutdown_timeout_s = limits.shutdown_timeout.as_secs_f64(),
            "server.shutdown_timeout reached: ending the requests still in flight"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// The next connection, once a slot is free; `None` after an accept error (logged, and
/// slept on for a second unless it concerns only that connection).
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    last_full_warning: &mut Option<Instant>,
    max_connections: usize,
) -> Option<(TcpStream, OwnedSemaphorePermit)> {
    if permits.available_permits() == 0
        && last_full_warning.is_none_or(|t| t.elapsed() >= FULL_WARNING_EVERY)
    {
        *last_full_warning = Some(Instant::now());
        tracing::warn!(
            max_connections,
            "server.max_connections reached: new connections wait until one closes"
        );
    }
    let permit = permits.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((tcp, _remote)) => Some((tcp, permit)),
        Err(e) => {
            use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
            if !matches!(
                e.kind(),
                ConnectionAborted | ConnectionRefused | ConnectionReset
            ) {
                // E.g. out of descriptors: retrying at once would spin (axum::serve does
                // the same).
                tracing::error!(error = %e, "accept failed; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None
        }
    }
}

/// Serves one connection until it ends, is closed for not sending a request head in
/// time, or is shut down gracefully when `stopping` changes; holds `_permit` (its slot
/// under the connection cap) meanwhile.
async fn connection(
    tcp: TcpStream,
    local: SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    first_head_within: Duration,
    mut stopping: watch::Receiver<()>,
    _permit: OwnedSemaphorePermit,
) {
    let requested = Arc::new(AtomicBool::new(false));
    let service = {
        let requested = requested.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            requested.store(true, Ordering::Relaxed);
            req.extensions_mut().insert(LocalAddr(local));
            app.clone().oneshot(req.map(Body::new))
        })
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    let mut conn = std::pin::pin!(conn);
    let first_head = tokio::time::sleep(first_head_within);
    let mut first_head = std::pin::pin!(first_head);
    let mut awaiting_first = true;
    let mut draining = false;
    loop {
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut first_head, if awaiting_first => {
                if !requested.load(Ordering::Relaxed) {
                    tracing::debug!("no request head within server.header_read_timeout: closing");
                    return;
                }
                awaiting_first = false;
            }
            _ = stopping.changed(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}
