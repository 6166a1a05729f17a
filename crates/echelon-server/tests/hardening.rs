//! Issue 14 items 9 and 10 against a real `echelon_server::serve` on 127.0.0.1:0: who
//! may call the gateway (`Content-Type`, `Host`, `Origin`, `/metrics` behind the keys,
//! the warnings for an exposed keyless gateway) and what bounds a connection
//! (header-read timeout, connection cap, shutdown deadline). Raw TCP where the client's
//! own behaviour (its `Host`, a half-sent head) is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::RecordSink;
use echelon::usage::record::RequestRecord;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "gw-hardening-key";

/// A liveness bound for what must happen "soon" (a closed connection, a returned
/// `serve`): far above the 1 s timeouts the tests configure, not a speed figure.
const SOON: Duration = Duration::from_secs(10);

/// The records the gateway hands over.
#[derive(Default)]
struct Records(Mutex<Vec<RequestRecord>>);

impl RecordSink for Records {
    fn send(&self, record: RequestRecord) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.0.lock().unwrap().push(record);
        Box::pin(async {})
    }
}

struct Harness {
    server: common::Served,
    up: TestUpstream,
    records: Arc<Records>,
    gateway: Arc<Gateway>,
}

async fn start(options: ServerOptions) -> Harness {
    let up = TestUpstream::start().await.unwrap();
    let yaml = format!(
        "providers:\n  p: {{ base_url: \"{}\" }}\nmodels:\n  hard-m: {{ provider: p, max_retries: 0, timeout: 300, chunk_timeout: 300 }}\n",
        up.base_url()
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let records = Arc::new(Records::default());
    let gateway = Arc::new(
        Gateway::from_config(&config)
            .unwrap()
            .with_record_sink(records.clone()),
    );
    Harness {
        server: common::serve(gateway.clone(), &options).await,
        up,
        records,
        gateway,
    }
}

fn chat_body() -> String {
    json!({"model": "hard-m", "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

/// An answer read off a raw connection.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {self:?}"))
    }
}

/// Sends `head` (the request line and headers, without the blank line; `Connection:
/// close` is added) and `body` on a new connection, and reads the whole answer.
async fn raw(addr: SocketAddr, head: &str, body: &str) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    parse(&String::from_utf8_lossy(&out))
}

fn parse(text: &str) -> Raw {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

fn post_chat(host: &str, extra: &str) -> String {
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!("\r\n{extra}")
    };
    format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {host}{extra}")
}

#[tokio::test]
async fn a_post_that_is_not_declared_json_gets_415_before_anything_else() {
    let h = start(ServerOptions::default()).await;
    let host = h.server.addr.to_string();
    for ct in [
        "Content-Type: text/plain",
        "Content-Type: application/x-www-form-urlencoded",
        "",
    ] {
        let r = raw(h.server.addr, &post_chat(&host, ct), &chat_body()).await;
        assert_eq!(r.status, 415, "{ct:?}: {r:?}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "unsupported_media_type", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("application/json"),
            "{v}"
        );
    }
    assert_eq!(h.up.chat_requests(), 0, "nothing reached the upstream");
    let r = raw(
        h.server.addr,
        &post_chat(&host, "Content-Type: Application/JSON; charset=utf-8"),
        &chat_body(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    // A wrong method is still a 405, not a 415.
    let r = raw(
        h.server.addr,
        &format!("GET /v1/chat/completions HTTP/1.1\r\nHost: {host}"),
        "",
    )
    .await;
    assert_eq!(r.status, 405, "{r:?}");
}

#[tokio::test]
async fn a_foreign_host_is_refused_and_the_own_address_and_allowed_hosts_are_served() {
    let h = start(ServerOptions::default()).await;
    let addr = h.server.addr;
    let port = addr.port();
    for bad in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("localhost:{}", port.wrapping_add(1)),
    ] {
        let r = raw(
            addr,
            &format!("GET /admin/state HTTP/1.1\r\nHost: {bad}"),
            "",
        )
        .await;
        assert_eq!(r.status, 403, "{bad}: {r:?}");
        let v = r.json();
        assert_eq!(v["error"]["code"], "host_not_allowed", "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("server.allowed_hosts"),
            "{v}"
        );
        // A chat request too, even a well-formed JSON one: nothing reaches the upstream.
        let r = raw(
            addr,
            &post_chat(&bad, "Content-Type: application/json"),
            &chat_body(),
        )
        .await;
        assert_eq!(r.status, 403, "{bad}: {r:?}");
    }
    assert_eq!(h.up.chat_requests(), 0);
    for good in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let r = raw(
            addr,
            &format!("GET /admin/state HTTP/1.1\r\nHost: {good}"),
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{good}: {r:?}");
    }
    // reqwest (like the SDKs) sends `Host: 127.0.0.1:PORT`.
    let resp = reqwest::get(h.server.url("/health")).await.unwrap();
    assert_eq!(resp.status(), 200);

    let allowed = start(ServerOptions {
        allowed_hosts: vec!["gw.example".into(), "proxy.example:8443".into()],
        ..ServerOptions::default()
    })
    .await;
    let addr = allowed.server.addr;
    for (host, status) in [
        ("gw.example:4000", 200),
        ("GW.example", 200),
        ("proxy.example:8443", 200),
        ("proxy.example:4000", 403),
        ("evil.example", 403),
    ] {
        let r = raw(
            addr,
            &format!("GET /v1/models HTTP/1.1\r\nHost: {host}"),
            "",
        )
        .await;
        assert_eq!(r.status, status, "{host}: {r:?}");
    }
    let any = start(ServerOptions {
        allowed_hosts: vec!["*".into()],
        ..ServerOptions::default()
    })
    .await;
    let r = raw(
        any.server.addr,
        "GET /v1/models HTTP/1.1\r\nHost: whatever.example",
        "",
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn a_foreign_origin_is_refused_and_a_configured_one_gets_cors_headers() {
    let h = start(ServerOptions::default()).await;
    let host = h.server.addr.to_string();
    // A CORS "simple" request (text/plain is refused anyway; JSON here, so that only the
    // Origin is at fault).
    let r = raw(
        h.server.addr,
        &post_chat(
            &host,
            "Content-Type: application/json\r\nOrigin: https://evil.example",
        ),
        &chat_body(),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "origin_not_allowed");
    assert!(r.header("access-control-allow-origin").is_none(), "{r:?}");
    // A preflight gets no allow headers.
    let r = raw(
        h.server.addr,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nOrigin: https://evil.example\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type"
        ),
        "",
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(
        r.head
            .to_ascii_lowercase()
            .find("access-control-")
            .is_none(),
        "{r:?}"
    );
    assert_eq!(h.up.chat_requests(), 0);
    // Without Origin (curl, SDKs): served, without CORS headers.
    let r = raw(
        h.server.addr,
        &post_chat(&host, "Content-Type: application/json"),
        &chat_body(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("access-control-allow-origin").is_none(), "{r:?}");

    const PAGE: &str = "http://localhost:5173";
    let cors = start(ServerOptions {
        cors_origins: vec![PAGE.into()],
        ..ServerOptions::default()
    })
    .await;
    let host = cors.server.addr.to_string();
    let r = raw(
        cors.server.addr,
        &format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nOrigin: {PAGE}\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type"
        ),
        "",
    )
    .await;
    assert_eq!(r.status, 204, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(PAGE));
    assert!(
        r.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    let r = raw(
        cors.server.addr,
        &post_chat(
            &host,
            &format!("Content-Type: application/json\r\nOrigin: {PAGE}"),
        ),
        &chat_body(),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("access-control-allow-origin"), Some(PAGE));
    assert!(
        r.header("access-control-expose-headers")
            .unwrap()
            .contains("x-echelon-attempts")
    );
    let r = raw(
        cors.server.addr,
        &post_chat(
            &host,
            "Content-Type: application/json\r\nOrigin: http://localhost:5174",
        ),
        &chat_body(),
    )
    .await;
    assert_eq!(r.status, 403, "{r:?}");
}

#[tokio::test]
async fn metrics_auth_puts_metrics_behind_the_gateway_keys() {
    let keys = vec![SecretString::from(KEY)];
    let closed = start(ServerOptions {
        api_keys: keys.clone(),
        metrics_auth: true,
        ..ServerOptions::default()
    })
    .await;
    let http = reqwest::Client::new();
    let resp = http
        .get(closed.server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let resp = http
        .get(closed.server.url("/metrics"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let open = start(ServerOptions {
        api_keys: keys,
        ..ServerOptions::default()
    })
    .await;
    let resp = http.get(open.server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "open by default");
}

/// Reads until the peer closes: `true` when it did within [`SOON`] (EOF or reset).
async fn closed_soon(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(SOON, read_all).await.is_ok()
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let h = start(ServerOptions {
        header_read_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    })
    .await;
    let mut half = TcpStream::connect(h.server.addr).await.unwrap();
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-a: ")
        .await
        .unwrap();
    assert!(closed_soon(&mut half).await, "a half-sent head is closed");
    // Nothing at all, and one byte that could begin the HTTP/2 preface.
    let mut silent = TcpStream::connect(h.server.addr).await.unwrap();
    assert!(
        closed_soon(&mut silent).await,
        "a silent connection is closed"
    );
    let mut one = TcpStream::connect(h.server.addr).await.unwrap();
    one.write_all(b"P").await.unwrap();
    assert!(
        closed_soon(&mut one).await,
        "one byte and silence is closed"
    );
    // A complete request is still served.
    let r = raw(
        h.server.addr,
        &format!("GET /health HTTP/1.1\r\nHost: {}", h.server.addr),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
}

/// Sends `GET /health` on `s` (kept alive).
async fn send_health(s: &mut TcpStream, host: &str) {
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
}

/// Reads one `/health` answer off `s`.
async fn health_answer(s: &mut TcpStream) -> u16 {
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("{\"status\":\"ok\"}") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    parse(&String::from_utf8_lossy(&got)).status
}

async fn health_on(s: &mut TcpStream, host: &str) -> u16 {
    send_health(s, host).await;
    health_answer(s).await
}

#[tokio::test]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let h = start(ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    })
    .await;
    let host = h.server.addr.to_string();
    let mut first = TcpStream::connect(h.server.addr).await.unwrap();
    let mut second = TcpStream::connect(h.server.addr).await.unwrap();
    assert_eq!(health_on(&mut first, &host).await, 200);
    assert_eq!(health_on(&mut second, &host).await, 200);
    // Both slots are held by kept-alive connections: a third is queued, not served.
    let mut third = TcpStream::connect(h.server.addr).await.unwrap();
    send_health(&mut third, &host).await;
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.peek(&mut buf))
            .await
            .is_err(),
        "the third connection was answered while two were open"
    );
    drop(first);
    let status = tokio::time::timeout(SOON, health_answer(&mut third))
        .await
        .expect("served once a slot is free");
    assert_eq!(status, 200);
    assert_eq!(health_on(&mut second, &host).await, 200);
}

#[tokio::test]
async fn a_stalled_request_is_ended_at_the_shutdown_timeout_and_serve_returns() {
    let mut h = start(ServerOptions {
        shutdown_timeout: Duration::from_secs(1),
        ..ServerOptions::default()
    })
    .await;
    // A stream that stalls after two content chunks.
    h.up.set_behavior(Behavior::StreamStall { chunks: 2 });
    let url = h.server.url("/v1/chat/completions");
    let client = tokio::spawn(async move {
        let resp = reqwest::Client::new()
            .post(url)
            .json(&json!({"model": "hard-m", "stream": true,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.text().await
    });
    while h.up.chat_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(SOON, h.server.stop())
        .await
        .expect("serve returns after shutdown_timeout");
    let body = tokio::time::timeout(SOON, client)
        .await
        .expect("the client's stream ends")
        .unwrap();
    // The stalled upstream never sends `[DONE]`: ended at the deadline, the chunked
    // body is cut, which the client sees as an error, not as a normal end.
    assert!(body.is_err(), "the stream was cut, not finished: {body:?}");
    // The gateway records the ended stream (499: the client side went away).
    tokio::time::timeout(SOON, h.gateway.shutdown())
        .await
        .unwrap();
    let records = h.records.0.lock().unwrap();
    assert_eq!(records.len(), 1, "one record for the ended stream");
    assert_eq!(records[0].status, 499);
    assert!(records[0].stream);
}

#[test]
fn an_exposed_keyless_gateway_is_warned_about() {
    let lan: SocketAddr = "0.0.0.0:4000".parse().unwrap();
    let lo: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let keyless = ServerOptions::default();
    let warnings = echelon_server::exposure_warnings(lan, &keyless);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("without server.api_keys"),
        "{warnings:?}"
    );
    assert!(echelon_server::exposure_warnings(lo, &keyless).is_empty());
    let keyed = ServerOptions {
        api_keys: vec![SecretString::from(KEY)],
        ..ServerOptions::default()
    };
    assert!(echelon_server::exposure_warnings(lan, &keyed).is_empty());
    let empty_keys = ServerOptions {
        api_keys: vec![SecretString::from(""), SecretString::from("")],
        ..ServerOptions::default()
    };
    let warnings = echelon_server::exposure_warnings(lo, &empty_keys);
    assert!(
        warnings.iter().any(|w| w.contains("authentication is OFF")),
        "{warnings:?}"
    );

    // The same facts, where the configuration says them: `config validate` shows them.
    let config = Config::from_str(
        "server:\n  host: 0.0.0.0\n  api_keys: [\"${ECHELON_HARDENING_UNSET_KEY:-}\"]\n\
         providers:\n  p: { base_url: \"http://127.0.0.1:9\" }\nmodels:\n  m: { provider: p }\n",
        "exposed.yaml",
    )
    .unwrap();
    let shown: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown
            .iter()
            .any(|w| w.contains("exposed.yaml:3:") && w.contains("server.api_keys")),
        "{shown:#?}"
    );
    assert!(
        shown
            .iter()
            .any(|w| w.contains("exposed.yaml:2:") && w.contains("other machines")),
        "{shown:#?}"
    );
    let quiet = Config::from_str(
        "server: { host: 127.0.0.1, api_keys: [] }\n\
         providers:\n  p: { base_url: \"http://127.0.0.1:9\" }\nmodels:\n  m: { provider: p }\n",
        "quiet.yaml",
    )
    .unwrap();
    assert!(quiet.warnings.is_empty(), "{:?}", quiet.warnings);
}

#[test]
fn server_keys_are_read_with_bounds() {
    let config = Config::from_str(
        "server:\n  allowed_hosts: [GW.example, \"proxy:8443\"]\n  cors_origins: [\"http://localhost:5173\"]\n  \
         metrics_auth: true\n  header_read_timeout: 2.5\n  max_connections: 64\n  shutdown_timeout: 0\n\
         providers:\n  p: { base_url: \"http://127.0.0.1:9\" }\nmodels:\n  m: { provider: p }\n",
        "s.yaml",
    )
    .unwrap();
    let s = &config.server;
    assert_eq!(s.allowed_hosts, ["gw.example", "proxy:8443"]);
    assert_eq!(s.cors_origins, ["http://localhost:5173"]);
    assert!(s.metrics_auth);
    assert_eq!(s.header_read_timeout, Duration::from_millis(2500));
    assert_eq!(s.max_connections, Some(64));
    assert_eq!(s.shutdown_timeout, Duration::ZERO);
    let defaults = Config::from_str(
        "providers:\n  p: { base_url: \"http://127.0.0.1:9\" }\nmodels:\n  m: { provider: p }\n",
        "d.yaml",
    )
    .unwrap();
    assert_eq!(defaults.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(defaults.server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(defaults.server.max_connections, None);
    assert!(!defaults.server.metrics_auth);

    for (yaml, at, says) in [
        ("header_read_timeout: 0", "s.yaml:2:24", "greater than 0"),
        ("header_read_timeout: 1e30", "s.yaml:2:24", "at most 86400"),
        ("shutdown_timeout: -1", "s.yaml:2:21", "0 or more"),
        ("max_connections: 0", "s.yaml:2:20", "1 or more"),
        (
            "allowed_hosts: [\"http://gw.example\"]",
            "s.yaml:2:18",
            "no scheme",
        ),
        (
            "cors_origins: [\"http://x.example/\"]",
            "s.yaml:2:17",
            "not an origin",
        ),
    ] {
        let text = format!(
            "server:\n  {yaml}\nproviders:\n  p: {{ base_url: \"http://127.0.0.1:9\" }}\nmodels:\n  m: {{ provider: p }}\n"
        );
        let err = Config::from_str(&text, "s.yaml").unwrap_err().to_string();
        assert!(err.contains(at) && err.contains(says), "{yaml}: {err}");
    }
}
