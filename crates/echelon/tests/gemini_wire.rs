//! The Gemini wire (`providers.<name>.api: gemini`) end to end through the library
//! gateway: request and response translation both ways (fixtures in
//! `tests/fixtures/gemini/`, built from the Gemini API reference's shapes, served by a
//! scripted local server), the testkit's Gemini faults, a task group that fails over
//! from a Gemini echelon1 to an OpenAI-wire echelon2, the error mapping, and
//! `providers.<name>.headers` on both wires.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use echelon::config::Config;
use echelon::error::GatewayErrorKind;
use echelon::{Gateway, GatewayError};
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gemini")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One request as the scripted server read it.
#[derive(Debug, Clone)]
struct Seen {
    /// `POST /v1beta/models/…:generateContent`.
    line: String,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: Value,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A local HTTP/1.1 server that answers every request with the next scripted
/// (status, content type, body) — the last one again when the script runs out — and
/// keeps what it was sent.
struct Scripted {
    root: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    async fn start(script: Vec<(u16, &'static str, String)>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let root = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let (status, content_type, body) = script[n.min(script.len() - 1)].clone();
                n += 1;
                let log = log.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let read = socket.read(&mut chunk).await.unwrap();
                        if read == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..read]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let mut lines = head.split("\r\n");
                    let line = lines.next().unwrap_or_default().to_owned();
                    let headers: Vec<(String, String)> = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let length: usize = headers
                        .iter()
                        .find(|(n, _)| n == "content-length")
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    let mut body_bytes = buf[head_end + 4..].to_vec();
                    while body_bytes.len() < length {
                        let read = socket.read(&mut chunk).await.unwrap();
                        if read == 0 {
                            break;
                        }
                        body_bytes.extend_from_slice(&chunk[..read]);
                    }
                    log.lock().unwrap().push(Seen {
                        line,
                        headers,
                        body: serde_json::from_slice(&body_bytes).unwrap_or(Value::Null),
                    });
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Scripted { root, seen }
    }

    async fn json(status: u16, body: String) -> Scripted {
        Scripted::start(vec![(status, "application/json", body)]).await
    }

    async fn sse(body: String) -> Scripted {
        Scripted::start(vec![(200, "text/event-stream", body)]).await
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A gateway with model `g` (`api: gemini`, upstream model `gemini-2.5-flash`, key
/// `AIza-test-key`) at `root`; `extra` is YAML added to the model.
fn gemini_gateway(root: &str, extra: &str) -> Gateway {
    let yaml = format!(
        r#"
providers:
  google: {{ base_url: "{root}", api: gemini, api_keys: ["AIza-test-key"] }}
models:
  g: {{ provider: google, model: gemini-2.5-flash, max_retries: 0, retry_delay: 0.01, {extra} }}
"#
    );
    Gateway::from_config(&Config::from_str(&yaml, "gemini.yaml").unwrap()).unwrap()
}

fn request(messages: Value, rest: Value) -> ChatCompletionRequest {
    let mut body = json!({"model": "g", "messages": messages});
    if let (Some(b), Some(r)) = (body.as_object_mut(), rest.as_object()) {
        b.extend(r.clone());
    }
    serde_json::from_value(body).unwrap()
}

fn user(text: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new("g", vec![ChatMessage::new(Role::User, text)])
}

#[tokio::test]
async fn a_text_answer_translates_both_ways() {
    let up = Scripted::json(200, fixture("generate_text.json")).await;
    let gw = gemini_gateway(&up.root, "");
    let req = request(
        json!([
            {"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Why is the sky blue?"}
        ]),
        json!({"temperature": 0.3, "top_p": 0.8, "max_tokens": 64, "stop": ["\n\n"],
               "response_format": {"type": "json_object"}}),
    );
    let done = gw.chat(req).await.unwrap();

    let seen = up.seen();
    assert_eq!(
        seen[0].line,
        "POST /v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1"
    );
    assert_eq!(seen[0].header("x-goog-api-key"), Some("AIza-test-key"));
    assert_eq!(seen[0].header("authorization"), None);
    assert_eq!(
        seen[0].body,
        json!({
            "contents": [{"role": "user", "parts": [{"text": "Why is the sky blue?"}]}],
            "systemInstruction": {"parts": [{"text": "Answer in one sentence."}]},
            "generationConfig": {"temperature": 0.3, "topP": 0.8, "maxOutputTokens": 64,
                                 "stopSequences": ["\n\n"], "responseMimeType": "application/json"}
        })
    );

    let r = &done.response;
    assert_eq!(done.model, "g");
    assert_eq!(r.id, "resp-text-1");
    assert_eq!(r.object, "chat.completion");
    assert_eq!(r.model, "gemini-2.5-flash");
    assert_eq!(
        r.first_text(),
        Some("The sky looks blue because air scatters short wavelengths more.")
    );
    assert_eq!(r.choices[0].message["role"], "assistant");
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    let usage = r.usage.as_ref().unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (12, 9, 21)
    );
    assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], 8);
}

#[tokio::test]
async fn a_tool_call_round_trips() {
    let up = Scripted::json(200, fixture("generate_function_call.json")).await;
    let gw = gemini_gateway(&up.root, "");
    let tools = json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": false}}}]);
    let question = json!({"role": "user", "content": "Weather in Paris?"});
    let done = gw
        .chat(request(
            json!([question]),
            json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        ))
        .await
        .unwrap();
    let sent = &up.seen()[0].body;
    assert_eq!(
        sent["tools"],
        json!([{"functionDeclarations": [{"name": "get_weather", "description": "Current weather in a city",
            "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}},
                                     "required": ["city"], "additionalProperties": false}}]}])
    );
    assert_eq!(
        sent["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    );

    let choice = &done.response.choices[0];
    assert_eq!(choice.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(choice.message["content"], Value::Null);
    let call = &choice.message["tool_calls"][0];
    let id = call["id"].as_str().unwrap();
    assert!(id.starts_with("call_"), "{id}");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(
        call["extra_content"]["google"]["thought_signature"],
        "c2lnbmF0dXJlLTE="
    );
    let usage = done.response.usage.as_ref().unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (40, 12));
    assert_eq!(
        usage.extra["completion_tokens_details"]["reasoning_tokens"],
        5
    );

    // The client sends the call back with its result, as the openai SDK does.
    let assistant = Value::Object(choice.message.clone());
    let result = json!({"role": "tool", "tool_call_id": id, "content": "{\"temp_c\": 18}"});
    let _ = gw
        .chat(request(
            json!([question, assistant, result]),
            json!({"tools": tools}),
        ))
        .await;
    let sent = &up.seen()[1].body;
    assert_eq!(
        sent["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris?"}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                "args": {"city": "Paris", "unit": "celsius"}}, "thoughtSignature": "c2lnbmF0dXJlLTE="}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                "response": {"temp_c": 18}}}]}
        ])
    );
}

#[tokio::test]
async fn a_safety_stop_is_content_filter_and_a_blocked_prompt_an_error() {
    let up = Scripted::json(200, fixture("generate_safety.json")).await;
    let done = gemini_gateway(&up.root, "").chat(user("x")).await.unwrap();
    let choice = &done.response.choices[0];
    assert_eq!(choice.finish_reason.as_deref(), Some("content_filter"));
    assert_eq!(choice.extra["native_finish_reason"], "SAFETY");
    assert_eq!(choice.message["content"], Value::Null);

    let up = Scripted::json(200, fixture("prompt_blocked.json")).await;
    let e = gemini_gateway(&up.root, "")
        .chat(user("x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), GatewayErrorKind::BadRequest, "{e}");
    assert!(e.to_string().contains("blockReason SAFETY"), "{e}");
}

/// A stream to its end: (text, finish reasons, tool calls, usage, the error if one).
async fn drain(
    gw: &Gateway,
    req: ChatCompletionRequest,
) -> (
    String,
    Vec<String>,
    Vec<Value>,
    Option<echelon_types::Usage>,
    Option<GatewayError>,
) {
    let mut s = gw.chat_stream(req).await.unwrap();
    let (mut text, mut finishes, mut calls, mut usage, mut error) =
        (String::new(), Vec::new(), Vec::new(), None, None);
    while let Some(item) = s.next().await {
        match item {
            Ok(chunk) => {
                for c in &chunk.choices {
                    text.extend(c.delta.content.clone());
                    finishes.extend(c.finish_reason.clone());
                    if let Some(Value::Array(tc)) = c.delta.extra.get("tool_calls") {
                        calls.extend(tc.iter().cloned());
                    }
                }
                if chunk.usage.is_some() {
                    usage = chunk.usage;
                }
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    (text, finishes, calls, usage, error)
}

fn with_usage(mut req: ChatCompletionRequest) -> ChatCompletionRequest {
    req.stream_options = Some(echelon_types::StreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    req
}

#[tokio::test]
async fn streams_translate_text_tool_calls_usage_and_finish_reasons() {
    let up = Scripted::sse(fixture("stream_text.sse")).await;
    let gw = gemini_gateway(&up.root, "");
    let (text, finishes, calls, usage, error) = drain(&gw, with_usage(user("Sky?"))).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text, "Blue, mostly.");
    assert_eq!(finishes, ["stop"]);
    assert!(calls.is_empty());
    let usage = usage.unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (5, 3, 8)
    );
    assert_eq!(usage.extra["prompt_tokens_details"]["cached_tokens"], 2);
    let seen = up.seen();
    assert_eq!(
        seen[0].line,
        "POST /v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse HTTP/1.1"
    );
    assert_eq!(seen[0].body["contents"][0]["parts"][0]["text"], "Sky?");

    let up = Scripted::sse(fixture("stream_function_call.sse")).await;
    let gw = gemini_gateway(&up.root, "");
    let (text, finishes, calls, _, error) = drain(&gw, user("Weather?")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(text, "Let me check.");
    assert_eq!(finishes, ["tool_calls"]);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Paris\"}");
    assert_eq!(
        calls[0]["extra_content"]["google"]["thought_signature"],
        "c2lnLTI="
    );
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));

    let up = Scripted::sse(fixture("stream_safety.sse")).await;
    let gw = gemini_gateway(&up.root, "");
    let (text, finishes, ..) = drain(&gw, user("x")).await;
    assert_eq!(text, "Here is how");
    assert_eq!(finishes, ["content_filter"]);
}

/// The Gemini error answers and the attempt outcome each becomes.
#[tokio::test]
async fn gemini_errors_map_to_the_gateways_kinds() {
    let status = |code: u16, status: &str, message: &str| {
        json!({"error": {"code": code, "message": message, "status": status}}).to_string()
    };
    let table = [
        (429, status(429, "RESOURCE_EXHAUSTED", "Quota exceeded"), "rate_limited"),
        (503, status(503, "UNAVAILABLE", "The model is overloaded."), "server_error"),
        (500, status(500, "INTERNAL", "An internal error has occurred."), "server_error"),
        (400, status(400, "INVALID_ARGUMENT", "Invalid JSON payload"), "bad_request"),
        (
            400,
            status(400, "INVALID_ARGUMENT", "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."),
            "context_length",
        ),
        (
            400,
            json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT", "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID"}]}})
            .to_string(),
            "auth",
        ),
        (401, status(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), "auth"),
        (403, status(403, "PERMISSION_DENIED", "Permission denied."), "auth"),
        (404, status(404, "NOT_FOUND", "models/nope is not found for API version v1beta"), "not_found"),
    ];
    for (code, body, outcome) in table {
        let up = Scripted::json(code, body.clone()).await;
        let e = gemini_gateway(&up.root, "")
            .chat(user("x"))
            .await
            .unwrap_err();
        let attempt = &e.attempts()[0];
        assert_eq!(attempt.outcome.to_string(), outcome, "{code} {body}");
        assert_eq!(attempt.status, Some(code), "{body}");
    }
}

fn gemini_upstream(options: UpstreamOptions) -> UpstreamOptions {
    UpstreamOptions {
        model_alias: "gemini-test".into(),
        api_key: Some("AIza-g".into()),
        ..options
    }
}

/// Task group `grp`: echelon1 model `g` (Gemini wire, the testkit's Gemini paths),
/// echelon2 model `o` (OpenAI wire).
fn mixed_gateway(g: &TestUpstream, o: &TestUpstream) -> Gateway {
    let yaml = format!(
        r#"
providers:
  google: {{ base_url: "{}", api: gemini, api_keys: ["AIza-g"] }}
  local: {{ base_url: "{}", api_keys: ["sk-o"] }}
models:
  g: {{ provider: google, model: up-g, max_retries: 0, retry_delay: 0.01 }}
  o: {{ provider: local, model: up-o, max_retries: 0, retry_delay: 0.01 }}
task_groups:
  grp:
    echelon1: {{ models: [g] }}
    echelon2: {{ models: [o] }}
"#,
        g.gemini_base_url(),
        o.base_url()
    );
    Gateway::from_config(&Config::from_str(&yaml, "mixed.yaml").unwrap()).unwrap()
}

fn grp() -> ChatCompletionRequest {
    ChatCompletionRequest::new("grp", vec![ChatMessage::new(Role::User, "hello there")])
}

#[tokio::test]
async fn a_gemini_echelon1_answers_through_the_testkit() {
    let g = TestUpstream::start_with(gemini_upstream(UpstreamOptions::default()))
        .await
        .unwrap();
    let o = TestUpstream::start().await.unwrap();
    let gw = mixed_gateway(&g, &o);
    let done = gw.chat(grp()).await.unwrap();
    assert_eq!(done.model, "g");
    assert_eq!(done.response.first_text(), Some("echo: hello there"));
    assert_eq!(
        done.response.choices[0].finish_reason.as_deref(),
        Some("stop")
    );
    let rec = g.recorded();
    assert_eq!(rec[0].uri, "/v1beta/models/up-g:generateContent");
    assert_eq!(rec[0].headers["x-goog-api-key"], "AIza-g");
    assert_eq!(rec[0].body.as_ref().unwrap()["contents"][0]["role"], "user");

    let mut s = gw.chat_stream(grp()).await.unwrap();
    let mut text = String::new();
    while let Some(chunk) = s.next().await {
        text.extend(
            chunk
                .unwrap()
                .choices
                .iter()
                .filter_map(|c| c.delta.content.clone()),
        );
    }
    assert_eq!(text, "echo: hello there");
    assert_eq!(
        g.recorded()[1].uri,
        "/v1beta/models/up-g:streamGenerateContent?alt=sse"
    );
    assert_eq!(o.chat_requests(), 0);
}

#[tokio::test]
async fn a_gemini_429_resource_exhausted_fails_over_to_the_openai_echelon2() {
    let g = TestUpstream::start_with(gemini_upstream(UpstreamOptions::default()))
        .await
        .unwrap();
    let o = TestUpstream::start().await.unwrap();
    let gw = mixed_gateway(&g, &o);
    g.set_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(30),
        message: "Resource has been exhausted (e.g. check quota).".into(),
    });
    let done = gw.chat(grp()).await.unwrap();
    assert_eq!(done.model, "o");
    assert_eq!(done.response.first_text(), Some("echo: hello there"));
    assert_eq!(done.attempts[0].model, "g");
    assert_eq!(done.attempts[0].outcome.to_string(), "rate_limited");
    assert_eq!(done.attempts[0].status, Some(429));
    assert!(
        done.attempts[0]
            .message
            .contains("Resource has been exhausted")
    );

    // Streamed, the same; the key cooled by the retryDelay is skipped or refused again.
    let (text, ..) = {
        let mut s = gw.chat_stream(grp()).await.unwrap();
        assert_eq!(s.model(), "o");
        let mut text = String::new();
        while let Some(chunk) = s.next().await {
            text.extend(
                chunk
                    .unwrap()
                    .choices
                    .iter()
                    .filter_map(|c| c.delta.content.clone()),
            );
        }
        (text, ())
    };
    assert_eq!(text, "echo: hello there");
}

#[tokio::test]
async fn the_testkit_gemini_faults_fail_over_or_fail_loudly() {
    let g = TestUpstream::start_with(gemini_upstream(UpstreamOptions::default()))
        .await
        .unwrap();
    let o = TestUpstream::start().await.unwrap();
    // A gateway per case: the failures would open `g`'s breaker.
    // Before the first content: fail over, each with its kind (a stream skips a
    // malformed event, as on the OpenAI wire, and answers).
    for (behavior, stream_model, outcome) in [
        (Behavior::status(503), "o", "server_error"),
        (Behavior::Malformed, "g", "malformed"),
        (Behavior::StreamError { chunks: 0 }, "o", "server_error"),
        (Behavior::StreamCut { chunks: 0 }, "o", "stream_cut"),
    ] {
        g.set_behavior(behavior.clone());
        let gw = mixed_gateway(&g, &o);
        let mut s = gw.chat_stream(grp()).await.unwrap();
        assert_eq!(s.model(), stream_model, "{behavior}");
        let mut text = String::new();
        while let Some(chunk) = s.next().await {
            text.extend(
                chunk
                    .unwrap()
                    .choices
                    .iter()
                    .filter_map(|c| c.delta.content.clone()),
            );
        }
        assert_eq!(text, "echo: hello there", "{behavior}");
        let done = gw.chat(grp()).await.unwrap();
        assert_eq!(done.model, "o", "{behavior}");
        assert_eq!(done.attempts[0].outcome.to_string(), outcome, "{behavior}");
    }
    // After the first content: the stream fails loudly, never a clean end.
    for behavior in [
        Behavior::StreamError { chunks: 2 },
        Behavior::StreamCut { chunks: 2 },
    ] {
        g.set_behavior(behavior.clone());
        let gw = mixed_gateway(&g, &o);
        let mut s = gw.chat_stream(grp()).await.unwrap();
        assert_eq!(s.model(), "g", "{behavior}");
        let mut text = String::new();
        let mut failed = None;
        while let Some(item) = s.next().await {
            match item {
                Ok(c) => text.extend(c.choices.iter().filter_map(|c| c.delta.content.clone())),
                Err(e) => failed = Some(e),
            }
        }
        assert_eq!(text, "echo: hello", "{behavior}");
        assert!(failed.is_some(), "{behavior}: the stream ended cleanly");
    }
}

#[tokio::test]
async fn provider_headers_go_on_every_call_of_both_wires() {
    let g = TestUpstream::start_with(gemini_upstream(UpstreamOptions::default()))
        .await
        .unwrap();
    let o = TestUpstream::start().await.unwrap();
    let yaml = format!(
        r#"
providers:
  google:
    base_url: "{}"
    api: gemini
    api_keys: ["AIza-g"]
    headers: {{ x-team: rl, X-Portkey-Token: "${{PORTKEY_TOKEN}}", x-goog-api-key: "not-this" }}
  local:
    base_url: "{}"
    headers: {{ x-team: product }}
models:
  g: {{ provider: google, model: up-g }}
  o: {{ provider: local, model: up-o }}
"#,
        g.gemini_base_url(),
        o.base_url()
    );
    let env = |name: &str| (name == "PORTKEY_TOKEN").then(|| "pk-secret-1".to_owned());
    let config = Config::from_str_with_env(&yaml, "headers.yaml", &env).unwrap();
    assert!(!format!("{:?}", config.providers["google"]).contains("pk-secret-1"));
    let gw = Gateway::from_config(&config).unwrap();
    let mut req = user("hi");
    gw.chat(req.clone()).await.unwrap();
    req.model = "o".into();
    gw.chat(req.clone()).await.unwrap();
    let mut s = gw.chat_stream(req).await.unwrap();
    while s.next().await.is_some() {}

    let sent = &g.recorded()[0].headers;
    assert_eq!(sent["x-team"], "rl");
    assert_eq!(sent["x-portkey-token"], "pk-secret-1");
    // The wire's own key header wins over a configured one.
    assert_eq!(sent["x-goog-api-key"], "AIza-g");
    for r in o.recorded() {
        assert_eq!(r.headers["x-team"], "product");
        assert!(r.headers.get("x-portkey-token").is_none());
    }
    assert_eq!(o.recorded().len(), 2);
}

#[test]
fn bad_headers_are_load_errors_at_their_place_without_their_value() {
    let yaml = "providers:\n  p:\n    base_url: http://127.0.0.1:9\n    headers:\n      \"bad name\": x\n      x-ok: \"line\\nbreak-secret\"\n      host: h\nmodels:\n  m: { provider: p }\n";
    let errors = Config::from_str(yaml, "bad.yaml").unwrap_err().0;
    let got: Vec<_> = errors
        .iter()
        .map(|e| (e.line, e.column, e.key_path.clone(), e.message.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                Some(5),
                Some(7),
                "providers.p.headers.bad name".to_owned(),
                "`bad name` is not an HTTP header name".to_owned()
            ),
            (
                Some(6),
                Some(13),
                "providers.p.headers.x-ok".to_owned(),
                "not a valid HTTP header value".to_owned()
            ),
            (
                Some(7),
                Some(7),
                "providers.p.headers.host".to_owned(),
                "header `host` cannot be configured".to_owned()
            ),
        ]
    );
    for e in &errors {
        assert!(!e.to_string().contains("secret"), "{e}");
    }
    // `api: gemini` is a known wire; a typo names it.
    let errors = Config::from_str(
        "providers:\n  p: { base_url: http://127.0.0.1:9, api: gemnii }\nmodels:\n  m: { provider: p }\n",
        "typo.yaml",
    )
    .unwrap_err()
    .0;
    assert_eq!(errors[0].hint.as_deref(), Some("did you mean `gemini`?"));
}

/// Embeddings on the Gemini wire (`batchEmbedContents`): one vector per input text,
/// `dimensions` as `outputDimensionality`, the key in `x-goog-api-key`; a Gemini 503
/// fails over to the OpenAI echelon2; token-id inputs are refused (Gemini embeds text).
#[tokio::test]
async fn gemini_embeddings_map_and_fail_over() {
    use echelon_types::{EmbeddingInput, EmbeddingRequest, EmbeddingVector};
    let g = TestUpstream::start_with(gemini_upstream(UpstreamOptions::default()))
        .await
        .unwrap();
    let o = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("sk-o".into()),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let gw = mixed_gateway(&g, &o);

    let mut req = EmbeddingRequest::new("grp", "x");
    req.input = EmbeddingInput::Texts(vec!["first".into(), "second".into()]);
    req.dimensions = Some(4);
    let done = gw.embed(req.clone()).await.unwrap();
    assert_eq!(done.model, "g");
    assert_eq!(done.response.data.len(), 2);
    for (i, text) in ["first", "second"].iter().enumerate() {
        let expected: Vec<f64> = echelon_testkit::embeddings::text_vector(text, 4)
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(done.response.data[i].index, i as u32);
        assert_eq!(
            done.response.data[i].embedding,
            EmbeddingVector::Float(expected),
            "input {i}"
        );
    }
    assert_eq!(g.embedding_requests(), 1, "one batch call for both inputs");

    g.push_behavior(Behavior::status(503));
    let done = gw.embed(req.clone()).await.unwrap();
    assert_eq!(done.model, "o", "failed over: {:?}", done.attempts);
    assert_eq!(done.attempts[0].outcome, "server_error");

    let mut tokens = req;
    tokens.input = EmbeddingInput::Tokens(vec![1, 2, 3]);
    let e = gw.embed(tokens).await.unwrap_err();
    assert_eq!(e.status(), 400);
    assert!(e.message().contains("text only"), "{}", e.message());
}
