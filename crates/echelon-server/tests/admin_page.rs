//! `GET /admin` in a real headless browser (Debian's `chromium`, installed by `.ci/run`):
//! after a fault run (a dead model whose breaker opens, a rate-limited key that cools
//! down) the page, opened with the gateway key as Basic credentials, polls
//! `/admin/state`, shows the open breaker and the cooling key by id, logs nothing to the
//! console, and never shows a key. `ECHELON_SKIP_BROWSER=1` skips it on a machine
//! without chromium; `ECHELON_ADMIN_SCREENSHOT=docs/admin.png` keeps the screenshot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use secrecy::SecretString;
use serde_json::json;

const GATEWAY_KEY: &str = "gk-admin-secret-0042";
const UPSTREAM_KEY: &str = "sk-upstream-secret-0042";

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

/// Runs headless chromium on `url` with `extra` flags; returns (stdout, console lines).
fn browse(browser: &str, url: &str, extra: &[&str]) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            // Three polls of the page (one a second) before the DOM is taken.
            "--virtual-time-budget=3500",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&out.stdout).into_owned(), console)
}

async fn serve(app: axum::Router, options: &ServerOptions) -> SocketAddr {
    let listener = echelon_server::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let options = options.clone();
    tokio::spawn(async move {
        echelon_server::serve(listener, app, &options, std::future::pending()).await
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_an_open_breaker_and_a_cooling_key_and_never_a_key() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("ECHELON_SKIP_BROWSER").is_some(),
            "no chromium: install Debian's `chromium` package (.ci/run does), \
             or set ECHELON_SKIP_BROWSER=1"
        );
        eprintln!("skipped: no chromium");
        return;
    };
    let limited = TestUpstream::start_with(UpstreamOptions {
        api_key: Some(UPSTREAM_KEY.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let good = TestUpstream::start().await.unwrap();
    let yaml = format!(
        r#"
providers:
  dead: {{ base_url: "http://127.0.0.1:9/v1" }}
  limited: {{ base_url: "{}", api_keys: ["{UPSTREAM_KEY}"] }}
  good: {{ base_url: "{}" }}
models:
  down: {{ provider: dead, max_retries: 0, connect_timeout: 1, circuit_breaker: {{ failure_threshold: 1, recovery_time: 600 }} }}
  busy: {{ provider: limited, max_retries: 0, rpm_limit: 600 }}
  fine: {{ provider: good }}
task_groups:
  chat: {{ echelon1: {{ models: [down] }}, echelon2: {{ models: [busy] }}, echelon3: {{ models: [fine] }} }}
polling_pools:
  chat_pool: {{ task_groups: [chat], health_check_interval: 600 }}
"#,
        limited.base_url(),
        good.base_url()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let config = Config::load(&path).unwrap();
    let gateway = Arc::new(Gateway::from_config(&config).unwrap());
    let options = ServerOptions {
        api_keys: vec![SecretString::from(GATEWAY_KEY)],
        ..ServerOptions::default()
    };
    let reloader = Arc::new(echelon_server::Reloader::new(gateway, &path, config));
    let server = serve(
        echelon_server::router_with_reloader(reloader, &options),
        &options,
    )
    .await;
    let http = reqwest::Client::new();
    // One reload, so the page has a last reload to show.
    let r = http
        .post(format!("http://{server}/admin/reload"))
        .bearer_auth(GATEWAY_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Without the key: 401 and the Basic challenge a browser answers with a prompt.
    let anon = http
        .get(format!("http://{server}/admin"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    assert!(anon.headers().contains_key("www-authenticate"));

    // The fault run: down refuses connections (its breaker opens), busy answers 429
    // with Retry-After (its key cools down), fine answers.
    limited.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(120),
        message: "slow down".into(),
    });
    for _ in 0..3 {
        let r = http
            .post(format!("http://{server}/v1/chat/completions"))
            .bearer_auth(GATEWAY_KEY)
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let page = http
        .get(format!("http://{server}/admin"))
        .basic_auth("admin", Some(GATEWAY_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.headers().contains_key("content-security-policy"));

    let url = format!("http://admin:{GATEWAY_KEY}@{server}/admin");
    let (dom, console) =
        tokio::task::spawn_blocking(move || browse(browser, &url, &["--dump-dom"]))
            .await
            .unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page loaded the state:\n{dom}"
    );
    assert!(
        dom.contains("data-breaker=\"open\""),
        "an open breaker:\n{dom}"
    );
    assert!(
        dom.contains("data-key-state=\"cooling_down\""),
        "a cooling key:\n{dom}"
    );
    let key_id = echelon::key::key_id(UPSTREAM_KEY);
    assert!(dom.contains(&key_id), "keys by id ({key_id})");
    assert!(dom.contains("down") && dom.contains("chat_pool"));
    assert!(
        dom.contains("echelon.yaml") && dom.contains("last reload ok"),
        "source and reload"
    );
    for secret in [UPSTREAM_KEY, GATEWAY_KEY] {
        assert!(!dom.contains(secret), "a key in the page");
    }

    let shot_dir = tempfile::tempdir().unwrap();
    let shot = shot_dir.path().join("admin.png");
    let arg = format!("--screenshot={}", shot.display());
    let url = format!("http://admin:{GATEWAY_KEY}@{server}/admin");
    let (_, console) = tokio::task::spawn_blocking(move || browse(browser, &url, &[&arg]))
        .await
        .unwrap();
    assert!(console.is_empty(), "console messages: {console:#?}");
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a screenshot"
    );
    if let Some(keep) = std::env::var_os("ECHELON_ADMIN_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
}
