//! Secrets and keys against real local upstreams (issue 14 items 6, 7, 8): an upstream
//! that echoes the `Authorization` header never gets a key into an error, the admin
//! state or the logs; `<PROVIDER>_API_KEY` never replaces the file's keys; a key
//! refused once comes back after its re-probe delay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use echelon::config::{Config, KeySource};
use echelon::resilience::key_pool::REPROBE_INITIAL;
use echelon::{Gateway, GatewayError};
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An OpenAI-shaped key (caught by the key-shape pass too).
const KEY_A: &str = "sk-secret-primary-0123456789abcdef";
/// A key of no known shape: only the exact-value pass can catch it.
const KEY_B: &str = "plainsecret-b-XYZ987-qwerty";
const KEY_C: &str = "plainsecret-c-LMN654-asdfgh";
const KEY_D: &str = "plainsecret-d-JKL321-zxcvbn";
const KEY_E: &str = "plainsecret-e-GHJ852-poiuyt";

/// Every key and a distinctive piece of each: none may appear.
const SECRETS: [&str; 10] = [
    KEY_A,
    KEY_B,
    KEY_C,
    KEY_D,
    KEY_E,
    "primary-0123456789",
    "XYZ987",
    "LMN654",
    "JKL321",
    "GHJ852",
];

fn assert_no_secret(what: &str, text: &str) {
    for s in SECRETS {
        assert!(!text.contains(s), "{what} contains `{s}`:\n{text}");
    }
}

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello")])
}

/// How a scripted upstream answers, given the request's `Authorization` header.
#[derive(Clone, Copy)]
enum Script {
    /// 401 with an OpenAI error body whose message echoes the header, and the key alone.
    Echo401,
    /// 500 with a plain-text body echoing the header.
    Echo500,
    /// 200 with JSON that is not a chat completion, the header where a list should be
    /// (the decoding error quotes it).
    EchoNotACompletion,
    /// A 200 stream: the role chunk, then an in-band error event echoing the header.
    StreamErrorFirst,
    /// A 200 stream: the role chunk, one content chunk, then an in-band error event
    /// echoing the header (a failure mid-stream).
    StreamErrorAfterContent,
}

/// `Authorization: Bearer <key>` as the upstream saw it, and the key alone.
fn echo(auth: &str) -> String {
    let key = auth.strip_prefix("Bearer ").unwrap_or(auth);
    format!("Incorrect API key provided. Authorization: {auth}; key={key}")
}

fn sse(data: &str) -> String {
    format!("data: {data}\n\n")
}

const ROLE_CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#;
const CONTENT_CHUNK: &str = r#"{"id":"c","object":"chat.completion.chunk","created":0,"model":"m","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;

impl Script {
    fn answer(self, auth: &str) -> String {
        let error_json = serde_json::json!({
            "error": {"message": echo(auth), "type": "invalid_request_error", "code": "invalid_api_key"}
        })
        .to_string();
        let whole = |status: &str, ctype: &str, body: &str| {
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let stream_head =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n";
        match self {
            Script::Echo401 => whole("401 Unauthorized", "application/json", &error_json),
            Script::Echo500 => whole(
                "500 Internal Server Error",
                "text/plain",
                &format!("upstream crashed; request headers: {}", echo(auth)),
            ),
            Script::EchoNotACompletion => whole(
                "200 OK",
                "application/json",
                &serde_json::json!({"choices": echo(auth)}).to_string(),
            ),
            Script::StreamErrorFirst => {
                format!("{stream_head}{}{}", sse(ROLE_CHUNK), sse(&error_json))
            }
            Script::StreamErrorAfterContent => format!(
                "{stream_head}{}{}{}",
                sse(ROLE_CHUNK),
                sse(CONTENT_CHUNK),
                sse(&error_json)
            ),
        }
    }
}

/// A scripted HTTP/1.1 upstream on 127.0.0.1:0: reads each request whole, answers with
/// `script`, closes the connection.
async fn scripted(script: Script) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let length: usize = header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + length {
                    let n = conn.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let auth = header("authorization").unwrap_or_default();
                let _ = conn.write_all(script.answer(&auth).as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

/// A `tracing` capture of everything echelon logs on this thread while the guard lives.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("echelon=trace")
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Models `a` (401 echo, key A), `b` (500 echo, key B), `c` (in-band error before
/// content, key C), `d` (error after content, key D) and `e` (a 200 that is not a
/// completion, key E); task groups `g` (a, b, e) and `gs` (a, c, d).
async fn echoing_gateway() -> Gateway {
    let a = scripted(Script::Echo401).await;
    let b = scripted(Script::Echo500).await;
    let c = scripted(Script::StreamErrorFirst).await;
    let d = scripted(Script::StreamErrorAfterContent).await;
    let e = scripted(Script::EchoNotACompletion).await;
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "http://{a}/v1", api_keys: ["{KEY_A}"] }}
  pb: {{ base_url: "http://{b}/v1", api_keys: ["{KEY_B}"] }}
  pc: {{ base_url: "http://{c}/v1", api_keys: ["{KEY_C}"] }}
  pd: {{ base_url: "http://{d}/v1", api_keys: ["{KEY_D}"] }}
  pe: {{ base_url: "http://{e}/v1", api_keys: ["{KEY_E}"] }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0 }}
  c: {{ provider: pc, max_retries: 0 }}
  d: {{ provider: pd, max_retries: 0 }}
  e: {{ provider: pe, max_retries: 0 }}
task_groups:
  g:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [b] }}
    echelon3: {{ models: [e] }}
  gs:
    echelon1: {{ models: [a] }}
    echelon2: {{ models: [c] }}
    echelon3: {{ models: [d] }}
"#
    );
    let config = Config::from_str_with_env(&yaml, "secrets.yaml", &|_: &str| None).unwrap();
    Gateway::from_config(&config).unwrap()
}

/// Everything a client or an operator can see of a failed request.
fn visible(e: &GatewayError) -> String {
    let attempts: Vec<&str> = e.attempts().iter().map(|a| a.message.as_str()).collect();
    format!(
        "{e}\n{}\n{}\n{attempts:?}",
        e.message(),
        serde_json::to_string(&e.to_body()).unwrap()
    )
}

#[tokio::test]
async fn an_upstream_echoing_the_authorization_header_leaks_no_key() {
    let gw = echoing_gateway().await;
    let logs = Logs::default();
    let _guard = logs.capture();

    let err = gw.chat(request("g")).await.unwrap_err();
    let outcomes: Vec<(&str, &str)> = err
        .attempts()
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [("a", "auth"), ("b", "server_error"), ("e", "malformed")]
    );
    // The upstream text is still there, scrubbed: the key by its id, or redacted.
    let a_message = &err.attempts()[0].message;
    assert!(
        a_message.starts_with("Incorrect API key provided."),
        "{a_message}"
    );
    assert!(a_message.contains("key#"), "{a_message}");
    for attempt in &err.attempts()[1..] {
        assert!(attempt.message.contains("key#"), "{}", attempt.message);
    }
    assert_no_secret("the error", &visible(&err));

    let admin = serde_json::to_string(&gw.admin_state()).unwrap();
    assert!(
        admin.contains("\"state\":\"disabled\""),
        "key a disabled: {admin}"
    );
    assert_no_secret("/admin/state", &admin);

    let logged = logs.text();
    assert!(
        logged.contains("attempt failed"),
        "the capture works: {logged}"
    );
    assert_no_secret("the logs", &logged);
}

#[tokio::test]
async fn a_streamed_request_to_echoing_upstreams_leaks_no_key() {
    let gw = echoing_gateway().await;
    let logs = Logs::default();
    let _guard = logs.capture();

    // a: 401 echo; c: an in-band error event before any content (fails over); d: content,
    // then an error event mid-stream (the client's stream ends with the error).
    let mut stream = gw.chat_stream(request("gs")).await.unwrap();
    let mut texts = Vec::new();
    let err = loop {
        match stream.next().await {
            Some(Ok(chunk)) => texts.extend(chunk.choices[0].delta.content.clone()),
            Some(Err(e)) => break e,
            None => panic!("the stream must end with the upstream's error"),
        }
    };
    assert_eq!(texts, ["Hi"]);
    let outcomes: Vec<(&str, &str)> = err
        .attempts()
        .iter()
        .map(|a| (a.model.as_str(), a.outcome.as_str()))
        .collect();
    assert_eq!(
        outcomes,
        [("a", "auth"), ("c", "server_error"), ("d", "server_error")]
    );
    for attempt in err.attempts() {
        assert!(attempt.message.contains("key#"), "{}", attempt.message);
    }
    assert_no_secret("the stream's error", &visible(&err));
    drop(stream);

    assert_no_secret(
        "/admin/state",
        &serde_json::to_string(&gw.admin_state()).unwrap(),
    );
    let logged = logs.text();
    assert!(
        logged.contains("stream failed after its first chunk"),
        "{logged}"
    );
    assert_no_secret("the logs", &logged);
}

#[tokio::test]
async fn a_provider_named_openai_with_file_keys_never_gets_the_environment_key() {
    let upstream = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("file-key-for-the-fake".to_owned()),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        r#"
providers:
  openai: {{ base_url: "{}", api_keys: ["file-key-for-the-fake"] }}
models:
  m: {{ provider: openai, max_retries: 0 }}
"#,
        upstream.base_url()
    );
    // The process environment is left alone: the loader takes an injected lookup.
    let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-real-openai-key-000".to_owned());
    let config = Config::from_str_with_env(&yaml, "openai.yaml", &env).unwrap();

    let done = Gateway::from_config(&config)
        .unwrap()
        .chat(request("m"))
        .await
        .unwrap();
    assert_eq!(done.attempts.len(), 1);
    let sent: Vec<Option<String>> = upstream
        .recorded()
        .into_iter()
        .map(|r| r.authorization)
        .collect();
    assert_eq!(sent, [Some("Bearer file-key-for-the-fake".to_owned())]);

    assert_eq!(config.key_sources["openai"], KeySource::File);
    let warning = config
        .warnings
        .iter()
        .find(|w| w.message.contains("OPENAI_API_KEY"))
        .expect("a warning names the ignored variable");
    assert!(!warning.to_string().contains("sk-real-openai-key-000"));
}

#[tokio::test]
async fn a_one_key_model_refused_once_comes_back_after_the_re_probe_delay() {
    let upstream = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("the-only-key".to_owned()),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    upstream.push_behavior(Behavior::status(401));
    let yaml = format!(
        r#"
providers:
  p: {{ base_url: "{}", api_keys: ["the-only-key"] }}
models:
  m: {{ provider: p, max_retries: 0 }}
"#,
        upstream.base_url()
    );
    let config = Config::from_str_with_env(&yaml, "one.yaml", &|_: &str| None).unwrap();
    let gw = Gateway::from_config(&config).unwrap();

    // The glitch: one 401 disables the only key.
    let err = gw.chat(request("m")).await.unwrap_err();
    assert_eq!(err.attempts()[0].outcome, "auth");
    let disabled_at_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    // Until the re-probe: the typed `no_key` refusal, saying when.
    let err = gw.chat(request("m")).await.unwrap_err();
    assert_eq!(err.status(), 503);
    assert_eq!(err.attempts()[0].outcome, "no_key");
    assert_eq!(
        err.attempts()[0].message,
        "every key is disabled; next re-probe in 60 s"
    );
    assert_eq!(
        upstream.chat_requests(),
        1,
        "nothing sent with the disabled key"
    );

    let admin = serde_json::to_value(gw.admin_state()).unwrap();
    let key = &admin["models"]["m"]["keys"][0];
    assert_eq!(key["state"], "disabled", "{key}");
    assert_eq!(key["consecutive_failures"], 1);
    assert_eq!(key["probe_in_flight"], false);
    let reprobe_in_ms = key["reprobe_in_ms"].as_u64().unwrap();
    assert!(
        (55_000..=60_000).contains(&reprobe_in_ms),
        "{reprobe_in_ms}"
    );
    let reprobe_at = key["reprobe_at_unix_ms"].as_u64().unwrap();
    let expected = disabled_at_unix_ms + REPROBE_INITIAL.as_millis() as u64;
    assert!(
        reprobe_at.abs_diff(expected) < 5_000,
        "{reprobe_at} vs {expected}"
    );

    // A minute later (tokio time, paused only while it is moved on), one live request
    // re-probes the key; the upstream accepts it and the key is back for good.
    tokio::time::pause();
    tokio::time::advance(REPROBE_INITIAL).await;
    tokio::time::resume();
    let done = gw.chat(request("m")).await.unwrap();
    assert_eq!(done.response.first_text(), Some("echo: hello"));
    let done = gw.chat(request("m")).await.unwrap();
    assert_eq!(done.attempts[0].outcome, "ok");
    assert_eq!(upstream.chat_requests(), 3);
    let admin = serde_json::to_value(gw.admin_state()).unwrap();
    assert_eq!(admin["models"]["m"]["keys"][0]["state"], "ok");
}
