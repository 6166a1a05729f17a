//! What the server's integration tests share: `echelon serve`'s router over a gateway, on
//! a free port of 127.0.0.1, in the test's runtime.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use echelon::Gateway;
use echelon_server::ServerOptions;

/// A running server; dropping it shuts the server down.
pub(crate) struct Served {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Serves `app` (a fake upstream of a test) on a free port of 127.0.0.1, for the rest
/// of the test's runtime; returns where it listens.
pub(crate) async fn spawn_upstream(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// Serves `gateway` with `options` on a free port.
pub(crate) async fn serve(gateway: Arc<Gateway>, options: &ServerOptions) -> Served {
    let app = echelon_server::router(gateway, options);
    let listener = echelon_server::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let options = options.clone();
    let server = tokio::spawn(async move {
        echelon_server::serve(listener, app, &options, async {
            let _ = rx.await;
        })
        .await
    });
    Served {
        addr,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl Served {
    /// `http://ADDR{path}`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stops accepting, waits for in-flight requests to finish and the server to return.
    pub(crate) async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}
