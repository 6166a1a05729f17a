//! `GET /metrics`: the Prometheus text exposition of [`echelon::usage::metrics`].
//!
//! One [`PrometheusRecorder`](metrics_exporter_prometheus::PrometheusRecorder) is
//! installed per process, the first time a router is built, and shared by every server
//! in it. Each scrape first sets the live-state gauges from
//! [`Gateway::admin_state`](echelon::Gateway::admin_state) (breakers, keys, in-flight
//! counts, pool health), then renders. If another global `metrics` recorder was
//! installed first, `/metrics` answers 503 saying so (the process keeps serving).
//!
//! The endpoint is open by default: Prometheus scrapers often carry no key, and nothing
//! in it is secret (keys appear only as their short ids). `routes(state, true)` puts it
//! behind the gateway keys, like `/admin`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use echelon::usage::metrics as m;
use http::StatusCode;
use http::header::CONTENT_TYPE;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::AppState;

/// The Prometheus text format's content type.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets (seconds) of whole requests and of single calls: LLM answers take from
/// tens of milliseconds to minutes.
const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];

/// Buckets (seconds) of round trips to the shared state backend: tens of microseconds
/// on one host, up to its `timeout_ms`.
const STATE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// Buckets (seconds) of time to first token.
const TTFT_BUCKETS: &[f64] = &[
    0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
];

/// How often histogram samples are folded in when nobody scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The process's recorder handle, or why there is none.
static RECORDER: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Installs the Prometheus recorder on first call (later calls share it), registers the
/// metric descriptions and starts the upkeep thread.
pub(crate) fn handle() -> Result<&'static PrometheusHandle, &'static str> {
    RECORDER
        .get_or_init(install)
        .as_ref()
        .map_err(String::as_str)
}

fn install() -> Result<PrometheusHandle, String> {
    let mut builder = PrometheusBuilder::new();
    for name in m::LATENCY_HISTOGRAMS {
        let buckets = if *name == m::TIME_TO_FIRST_TOKEN_SECONDS {
            TTFT_BUCKETS
        } else if *name == m::STATE_ROUND_TRIP_SECONDS {
            STATE_BUCKETS
        } else {
            DURATION_BUCKETS
        };
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
            .map_err(|e| format!("metrics buckets for {name}: {e}"))?;
    }
    let handle = builder.install_recorder().map_err(|e| {
        tracing::warn!("Prometheus metrics disabled: {e}");
        format!(
            "metrics are unavailable: another metrics recorder is installed in this process ({e})"
        )
    })?;
    m::describe();
    let upkeep = handle.clone();
    let spawned = std::thread::Builder::new()
        .name("echelon-metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        // Scrapes still fold samples in; only idle memory growth is unbounded.
        tracing::warn!("metrics upkeep thread not started: {e}");
    }
    Ok(handle)
}

/// `GET /metrics`, open or behind the gateway keys (`require_key`). Installs the
/// recorder if no router has yet.
pub(crate) fn routes(state: AppState, require_key: bool) -> Router<AppState> {
    let _ = handle();
    let router = Router::new()
        .route("/metrics", get(scrape))
        .method_not_allowed_fallback(crate::handlers::method_not_allowed);
    if require_key {
        router.route_layer(axum::middleware::from_fn_with_state(
            state,
            crate::auth::require_gateway_key,
        ))
    } else {
        router
    }
}

/// `GET /metrics`: live-state gauges, then the text exposition.
async fn scrape(State(state): State<AppState>) -> Response {
    match handle() {
        Ok(h) => {
            m::observe_state(&state.gateway.admin_state());
            m::observe_ledger_queue(state.gateway.record_queue_depth());
            ([(CONTENT_TYPE, TEXT_FORMAT)], h.render()).into_response()
        }
        Err(msg) => unavailable(msg),
    }
}

/// 503 with the reason there is no recorder.
fn unavailable(msg: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{msg}\n"),
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;

    use echelon::Gateway;
    use echelon::config::Config;
    use secrecy::SecretString;

    use super::*;
    use crate::GatewayKeys;

    const KEY: &str = "gw-unit-key";

    async fn serve(require_key: bool) -> String {
        let config = Config::from_str(
            "providers:\n  p: { base_url: \"http://127.0.0.1:9\" }\nmodels:\n  unit-m: { provider: p }\n",
            "t.yaml",
        )
        .unwrap();
        let state = AppState {
            gateway: Arc::new(Gateway::from_config(&config).unwrap()),
            keys: Arc::new(GatewayKeys::new(&[SecretString::from(KEY)])),
            log_bodies: false,
            reloader: None,
        };
        let app = routes(state.clone(), require_key).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/metrics")
    }

    #[tokio::test]
    async fn open_by_default_or_behind_the_gateway_keys() {
        let http = reqwest::Client::new();
        let open = serve(false).await;
        let resp = http.get(&open).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.text().await.unwrap();
        assert!(
            body.contains("echelon_breaker_state{model=\"unit-m\"} 0"),
            "{body}"
        );

        let closed = serve(true).await;
        assert_eq!(http.get(&closed).send().await.unwrap().status(), 401);
        let resp = http.get(&closed).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp.text().await.unwrap().contains(KEY));
    }

    #[tokio::test]
    async fn a_second_recorder_is_refused_and_reported() {
        assert!(handle().is_ok());
        // The process already has a global recorder (ours): installing again fails, with
        // the message `/metrics` would answer with.
        let err = install().unwrap_err();
        assert!(err.contains("another metrics recorder"), "{err}");
        let resp = unavailable(&err);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
