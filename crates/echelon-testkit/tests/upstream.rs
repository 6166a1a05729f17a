//! The fake upstream observed through a real HTTP client (reqwest).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use echelon_testkit::{Behavior, FaultPlan, TestUpstream, UpstreamOptions};
use futures::StreamExt;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .unwrap()
}

fn chat_body(text: &str, stream: bool) -> Value {
    json!({
        "model": "whatever",
        "stream": stream,
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"},
            {"role": "user", "content": text},
        ],
    })
}

async fn post(client: &reqwest::Client, up: &TestUpstream, body: &Value) -> reqwest::Response {
    client
        .post(format!("{}/chat/completions", up.base_url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The `data:` payloads of an SSE body.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
        .collect()
}

fn parse_chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn streamed_content(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

/// Reads a streamed body until it ends or fails: the bytes received and
/// whether it failed.
async fn read_until_error(resp: reqwest::Response) -> (String, Option<reqwest::Error>) {
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            Err(e) => return (text, Some(e)),
        }
    }
    (text, None)
}

#[tokio::test]
async fn normal_completion_echoes_the_last_user_message() {
    let up = TestUpstream::start().await.unwrap();
    let mut body = chat_body("hello big world", false);
    body["x_echo"] = json!({"trace": 7});
    let resp = post(&client(), &up, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["id"], "chatcmpl-test-1");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "test-model");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: hello big world"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // 2 + 2 + 2 + 3 prompt words; "echo: hello big world" is 4 words.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    );
    assert_eq!(v["timings"], json!({"predicted_ms": 1.0}));
    assert_eq!(v["x_echo"], json!({"trace": 7}));

    // Array content, a second request id, no x_echo when not asked.
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "part one"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "part two"},
    ]}]});
    let v: Value = post(&client(), &up, &body).await.json().await.unwrap();
    assert_eq!(v["id"], "chatcmpl-test-2");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: part one part two"
    );
    assert!(v.get("x_echo").is_none());
    up.shutdown().await;
}

#[tokio::test]
async fn max_tokens_truncates_words_and_reports_length() {
    let up = TestUpstream::start().await.unwrap();
    let mut body = chat_body("one two three four", false);
    body["max_tokens"] = json!(3);
    let v: Value = post(&client(), &up, &body).await.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: one two");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    // A limit the answer fits in is a normal stop.
    body["max_tokens"] = json!(100);
    let v: Value = post(&client(), &up, &body).await.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "echo: one two three four"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // Streams truncate the same way.
    body["max_tokens"] = json!(2);
    body["stream"] = json!(true);
    let text = post(&client(), &up, &body).await.text().await.unwrap();
    let chunks = parse_chunks(&sse_data(&text));
    assert_eq!(streamed_content(&chunks), "echo: one");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn normal_stream_sends_one_chunk_per_word_then_done() {
    let up = TestUpstream::start_with(UpstreamOptions {
        model_alias: "alias-x".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut body = chat_body("hi there", true);
    body["stream_options"] = json!({"include_usage": true});
    body["x_echo"] = json!("tag");
    let resp = post(&client(), &up, &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks = parse_chunks(&data);
    // role, "echo:", " hi", " there", finish, usage
    assert_eq!(chunks.len(), 6, "{text}");
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], "chatcmpl-test-1");
        assert_eq!(c["model"], "alias-x");
        assert_eq!(c["x_echo"], "tag");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": null})
    );
    let words: Vec<&str> = chunks[1..4]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(words, ["echo:", " hi", " there"]);
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["timings"]["predicted_ms"], 1.0);
    assert_eq!(chunks[5]["choices"], json!([]));
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11})
    );

    // Without include_usage there is no usage chunk.
    let text = post(&client(), &up, &chat_body("hi there", true))
        .await
        .text()
        .await
        .unwrap();
    let chunks = parse_chunks(&sse_data(&text));
    assert_eq!(chunks.len(), 5);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(streamed_content(&chunks), "echo: hi there");
}

#[tokio::test]
async fn latency_and_chunk_delay_are_applied() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(150),
        chunk_delay: Duration::from_millis(40),
        ..Default::default()
    })
    .await
    .unwrap();
    let start = Instant::now();
    let resp = post(&client(), &up, &chat_body("x", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(start.elapsed() >= Duration::from_millis(150));

    let start = Instant::now();
    let resp = post(&client(), &up, &chat_body("a b c", true)).await;
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let first_at = start.elapsed();
    assert!(first_at >= Duration::from_millis(150), "{first_at:?}");
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .contains("\"role\":\"assistant\"")
    );
    while let Some(item) = stream.next().await {
        item.unwrap();
    }
    // 4 content chunks + finish + [DONE], each after a 40 ms pause.
    let total = start.elapsed();
    assert!(total >= Duration::from_millis(150 + 6 * 40), "{total:?}");
}

#[tokio::test]
async fn models_health_and_unknown_paths() {
    let up = TestUpstream::start_with(UpstreamOptions {
        model_alias: "m1".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let v: Value = c
        .get(format!("{}/models", up.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v,
        json!({"object": "list", "data": [{"id": "m1", "object": "model", "owned_by": "echelon-testkit"}]})
    );
    let resp = c
        .get(format!("http://{}/health", up.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"status": "ok"}));
    let resp = c
        .get(format!("{}/nope", up.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert_eq!(up.chat_requests(), 0);
}

#[tokio::test]
async fn api_key_is_required_before_any_behaviour() {
    let up = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("sk-good".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    up.push_behavior(Behavior::status(503));
    let c = client();
    let url = format!("{}/chat/completions", up.base_url());
    let expected = json!({"error": {
        "message": "Invalid API Key",
        "type": "authentication_error",
        "code": "invalid_api_key",
    }});
    for auth in [None, Some("Bearer sk-bad"), Some("sk-good")] {
        let mut req = c.post(&url).json(&chat_body("hi", false));
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
        assert_eq!(resp.json::<Value>().await.unwrap(), expected);
    }
    let resp = c
        .get(format!("{}/models", up.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // /health is not under /v1 and needs no key.
    let resp = c
        .get(format!("http://{}/health", up.addr()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // The queued 503 was not consumed by the rejected requests.
    let ok = |req: reqwest::RequestBuilder| req.bearer_auth("sk-good");
    let resp = ok(c.post(&url).json(&chat_body("hi", false)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let resp = ok(c.post(&url).json(&chat_body("hi", false)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = ok(c.get(format!("{}/models", up.base_url())))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.chat_requests(), 5);
}

#[tokio::test]
async fn context_window_overflow_is_a_400_before_behaviours() {
    let up = TestUpstream::start_with(UpstreamOptions {
        context_window: Some(10),
        ..Default::default()
    })
    .await
    .unwrap();
    up.set_behavior(Behavior::CutConnection);
    let long = "x".repeat(60);
    let body = json!({"messages": [{"role": "user", "content": long}]});
    let resp = post(&client(), &up, &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "exceed_context_size_error");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(v["error"]["message"].as_str().unwrap().contains("context"));
    assert_eq!(v["error"]["n_prompt_tokens"], 15);
    assert_eq!(v["error"]["n_ctx"], 10);

    // 40 characters = 10 tokens fits; it then meets the default behaviour (a cut).
    let body = json!({"messages": [{"role": "user", "content": "y".repeat(40)}]});
    let err = client()
        .post(format!("{}/chat/completions", up.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap_err();
    assert!(err.status().is_none());
}

#[tokio::test]
async fn status_behaviour_sends_an_openai_error_and_retry_after() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(2),
        message: "slow down".into(),
    });
    up.push_behavior(Behavior::status(500));
    let resp = post(&client(), &up, &chat_body("hi", true)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "2");
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({"error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}})
    );
    let resp = post(&client(), &up, &chat_body("hi", false)).await;
    assert_eq!(resp.status(), 500);
    assert!(resp.headers().get("retry-after").is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["message"], "injected fault: HTTP 500");
}

#[tokio::test]
async fn one_shot_queue_is_fifo_then_default() {
    let up = TestUpstream::start().await.unwrap();
    up.set_behavior(Behavior::status(502));
    up.push_behavior(Behavior::status(429));
    up.push_behavior(Behavior::Normal);
    up.push_behavior(Behavior::status(503));
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            post(&c, &up, &chat_body("q", false))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [429, 200, 503, 502, 502]);
    up.set_behavior(Behavior::Normal);
    assert_eq!(post(&c, &up, &chat_body("q", false)).await.status(), 200);
    assert_eq!(up.chat_requests(), 6);
}

#[tokio::test]
async fn cut_connection_is_a_connection_error_not_a_status() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::CutConnection);
    up.push_behavior(Behavior::CutConnection);
    let c = client();
    for stream in [false, true] {
        let err = c
            .post(format!("{}/chat/completions", up.base_url()))
            .json(&chat_body("hi", stream))
            .send()
            .await
            .unwrap_err();
        assert!(err.status().is_none(), "{err:?}");
        assert!(!err.is_timeout(), "{err:?}");
        // hyper reports IncompleteMessage: the connection closed before any response.
        assert!(err.is_request(), "{err:?}");
    }
    // The upstream itself is fine afterwards.
    assert_eq!(post(&c, &up, &chat_body("hi", false)).await.status(), 200);
    assert_eq!(up.chat_requests(), 3);
}

#[tokio::test]
async fn reset_is_a_connection_reset() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::Reset);
    let c = client();
    let err = c
        .post(format!("{}/chat/completions", up.base_url()))
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap_err();
    assert!(err.status().is_none(), "{err:?}");
    let mut chain = Vec::new();
    let mut source: Option<&dyn std::error::Error> = Some(&err);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    let chain = chain.join(": ");
    assert!(chain.contains("reset"), "an RST, not a FIN: {chain}");
    assert_eq!(post(&c, &up, &chat_body("hi", false)).await.status(), 200);
}

#[tokio::test]
async fn stream_cut_delivers_first_chunks_then_a_body_error() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::StreamCut { chunks: 2 });
    let resp = post(&client(), &up, &chat_body("one two three four", true)).await;
    assert_eq!(resp.status(), 200);
    let (text, err) = read_until_error(resp).await;
    let err = err.expect("the body must fail");
    // The chunked body ends without its terminating chunk: an EOF while decoding.
    assert!(err.is_decode() || err.is_body(), "{err:?}");
    let data = sse_data(&text);
    assert!(!data.iter().any(|d| d == "[DONE]"));
    let chunks = parse_chunks(&data);
    // The role chunk and two content chunks, no finish chunk.
    assert_eq!(chunks.len(), 3, "{text}");
    assert_eq!(streamed_content(&chunks), "echo: one");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    // Non-stream: 200 headers, then the body breaks off.
    up.push_behavior(Behavior::StreamCut { chunks: 1 });
    let resp = post(&client(), &up, &chat_body("hi", false)).await;
    assert_eq!(resp.status(), 200);
    let err = resp.bytes().await.unwrap_err();
    assert!(err.is_decode() || err.is_body(), "{err:?}");
}

#[tokio::test]
async fn stall_outlasts_the_client_timeout() {
    let up = TestUpstream::start().await.unwrap();
    up.set_behavior(Behavior::Stall);
    let c = client_with_timeout(Duration::from_millis(300));
    for stream in [false, true] {
        let start = Instant::now();
        let err = c
            .post(format!("{}/chat/completions", up.base_url()))
            .json(&chat_body("hi", stream))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err:?}");
        assert!(start.elapsed() >= Duration::from_millis(300));
    }
    assert_eq!(up.chat_requests(), 2);
}

#[tokio::test]
async fn stream_stall_sends_chunks_then_nothing() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::StreamStall { chunks: 1 });
    let resp = post(&client(), &up, &chat_body("alpha beta", true)).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    // Role chunk + one content chunk arrive...
    while sse_data(&text).len() < 2 {
        let bytes = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("chunks before the stall")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&bytes).unwrap());
    }
    assert_eq!(streamed_content(&parse_chunks(&sse_data(&text))), "echo:");
    // ...then nothing more.
    let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(next.is_err(), "expected a stall, got {next:?}");
}

#[tokio::test]
async fn shutdown_closes_stalled_connections() {
    let up = TestUpstream::start().await.unwrap();
    up.set_behavior(Behavior::Stall);
    let url = format!("{}/chat/completions", up.base_url());
    let pending = tokio::spawn(async move {
        client()
            .post(url)
            .json(&chat_body("hi", false))
            .send()
            .await
    });
    while up.chat_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let addr = up.addr();
    up.shutdown().await;
    let result = tokio::time::timeout(Duration::from_secs(2), pending)
        .await
        .expect("the stalled request must end at shutdown")
        .unwrap();
    assert!(result.is_err());
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn malformed_bodies() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::Malformed);
    up.push_behavior(Behavior::Malformed);
    let resp = post(&client(), &up, &chat_body("hi", false)).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");

    let resp = post(&client(), &up, &chat_body("hi", true)).await;
    assert_eq!(resp.status(), 200);
    let data = sse_data(&resp.text().await.unwrap());
    assert!(data[0].contains("\"role\":\"assistant\""));
    assert_eq!(data[1], "{not json");
    assert!(serde_json::from_str::<Value>(&data[1]).is_err());
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn malformed_sse_after_content_chunks() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::MalformedSse { chunks: 2 });
    up.push_behavior(Behavior::MalformedSse { chunks: 2 });
    let resp = post(&client(), &up, &chat_body("one two three", true)).await;
    let data = sse_data(&resp.text().await.unwrap());
    assert!(data[0].contains("\"role\":\"assistant\""));
    // Two content chunks, then the bad event, then the rest as normal.
    let before = parse_chunks(&data[1..3]);
    assert_eq!(streamed_content(&before), "echo: one");
    assert_eq!(data[3], "{not json");
    let after = parse_chunks(&data[4..]);
    assert_eq!(streamed_content(&after), " two three");
    assert_eq!(data.last().unwrap(), "[DONE]");
    // A plain request gets the malformed JSON body of `Malformed`.
    let resp = post(&client(), &up, &chat_body("hi", false)).await;
    assert_eq!(resp.status(), 200);
    assert!(serde_json::from_str::<Value>(&resp.text().await.unwrap()).is_err());
}

#[tokio::test]
async fn served_counts_and_connection_gauges() {
    let up = TestUpstream::start().await.unwrap();
    assert_eq!((up.open_connections(), up.active_requests()), (0, 0));
    up.push_behavior(Behavior::status(503));
    up.push_behavior(Behavior::status(503));
    let c = client();
    // Bodies read to the end, so that the client reuses its one connection.
    post(&c, &up, &chat_body("a", false))
        .await
        .text()
        .await
        .unwrap();
    post(&c, &up, &chat_body("b", true))
        .await
        .text()
        .await
        .unwrap();
    post(&c, &up, &chat_body("c", true))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!((up.open_connections(), up.active_requests()), (1, 0));
    up.push_behavior(Behavior::Stall);
    // The stall holds its own connection and counts as active until the client gives up.
    assert_eq!(up.connections(), 1);
    let stalled = tokio::spawn(async move {
        let c = client_with_timeout(Duration::from_millis(300));
        c.post(format!("{}/chat/completions", up.base_url()))
            .json(&chat_body("d", false))
            .send()
            .await
            .map(|_| ())
            .unwrap_err();
        up
    });
    let up = stalled.await.unwrap();
    assert_eq!(up.connections(), 2);
    let served = up.served();
    let count = |b: &Behavior, stream: bool| {
        served
            .iter()
            .find(|s| s.behavior == *b && s.stream == stream)
            .map_or(0, |s| s.count)
    };
    assert_eq!(count(&Behavior::status(503), false), 1);
    assert_eq!(count(&Behavior::Normal, true), 1);
    assert_eq!(count(&Behavior::status(503), true), 1, "{served:?}");
    assert_eq!(count(&Behavior::Stall, false), 1);
    assert_eq!(served.iter().map(|s| s.count).sum::<usize>(), 4);
    // The stalled connection closes once its client timed out; the keep-alive one of
    // `c` stays open and idle.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (up.open_connections(), up.active_requests()) != (1, 0) {
        assert!(
            Instant::now() < deadline,
            "open {} active {}",
            up.open_connections(),
            up.active_requests()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(c);
    while up.open_connections() != 0 {
        assert!(Instant::now() < deadline, "open {}", up.open_connections());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn delay_then_normal() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::Delay(Duration::from_millis(200)));
    let start = Instant::now();
    let resp = post(&client(), &up, &chat_body("late", false)).await;
    assert!(start.elapsed() >= Duration::from_millis(200));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: late");
}

#[tokio::test]
async fn requests_are_recorded_including_failures() {
    let up = TestUpstream::start_with(UpstreamOptions {
        api_key: Some("k1".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let url = format!("{}/chat/completions", up.base_url());
    let before = Instant::now();
    let ok = c
        .post(&url)
        .bearer_auth("k1")
        .header("x-request-id", "r-1")
        .json(&chat_body("first", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let bad_key = c
        .post(&url)
        .bearer_auth("nope")
        .json(&chat_body("second", false))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_key.status(), 401);
    let not_json = c
        .post(&url)
        .bearer_auth("k1")
        .body("this is not json")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert_eq!(
        not_json.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );

    assert_eq!(up.chat_requests(), 3);
    let rec = up.recorded();
    assert_eq!(rec.len(), 3);
    assert_eq!(rec[0].body.as_ref().unwrap(), &chat_body("first", false));
    assert_eq!(rec[0].authorization.as_deref(), Some("Bearer k1"));
    assert_eq!(rec[0].headers["x-request-id"], "r-1");
    assert_eq!(
        rec[1].body.as_ref().unwrap()["messages"][3]["content"],
        "second"
    );
    assert_eq!(rec[1].authorization.as_deref(), Some("Bearer nope"));
    assert!(rec[2].body.is_none());
    assert!(before <= rec[0].at && rec[0].at <= rec[1].at && rec[1].at <= rec[2].at);
}

#[tokio::test]
async fn recording_can_be_turned_off() {
    let up = TestUpstream::start_with(UpstreamOptions {
        record_requests: false,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        post(&client(), &up, &chat_body("q", false)).await.status(),
        200
    );
    assert_eq!(up.chat_requests(), 1);
    assert!(up.recorded().is_empty());
}

async fn fault_sequence(seed: u64) -> Vec<u16> {
    let up = TestUpstream::start_with(UpstreamOptions {
        fault_rate: Some(FaultPlan {
            rate: 0.5,
            faults: vec![
                Behavior::status(429),
                Behavior::status(500),
                Behavior::status(503),
            ],
            seed,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(
            post(&c, &up, &chat_body("q", false))
                .await
                .status()
                .as_u16(),
        );
    }
    up.shutdown().await;
    statuses
}

#[tokio::test]
async fn fault_plan_is_deterministic_per_seed() {
    let a = fault_sequence(42).await;
    assert_eq!(a, fault_sequence(42).await);
    assert_ne!(a, fault_sequence(43).await);
    let faults = a.iter().filter(|&&s| s != 200).count();
    assert!((5..=25).contains(&faults), "{a:?}");
    assert!(a.iter().all(|s| [200, 429, 500, 503].contains(s)), "{a:?}");
}

#[tokio::test]
async fn one_shot_queue_takes_precedence_over_the_fault_plan() {
    let up = TestUpstream::start_with(UpstreamOptions {
        fault_rate: Some(FaultPlan {
            rate: 1.0,
            faults: vec![Behavior::status(503)],
            seed: 1,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    up.push_behavior(Behavior::Normal);
    let c = client();
    assert_eq!(post(&c, &up, &chat_body("q", false)).await.status(), 200);
    assert_eq!(post(&c, &up, &chat_body("q", false)).await.status(), 503);
}

#[tokio::test]
async fn binary_prints_its_address_and_serves_until_sigterm() {
    use tokio::io::AsyncBufReadExt;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_echelon-testkit"))
        .args(["--port", "0", "--model", "bin-model", "--api-key", "sk-bin"])
        .args(["--fault-rate", "1", "--faults", "418"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .expect("the address line")
        .unwrap()
        .unwrap();
    let base = line.strip_prefix("listening on ").expect(&line);
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");

    let c = client();
    let v: Value = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("sk-bin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["id"], "bin-model");
    let resp = c
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth("sk-bin")
        .json(&chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);

    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(lines.next_line().await.unwrap(), None, "exactly one line");
}

#[tokio::test]
async fn a_run_of_malformed_sse_events_then_the_rest() {
    let up = TestUpstream::start().await.unwrap();
    up.push_behavior(Behavior::MalformedSseRun {
        chunks: 1,
        count: 3,
    });
    let resp = post(&client(), &up, &chat_body("one two", true)).await;
    let data = sse_data(&resp.text().await.unwrap());
    assert!(data[0].contains("\"role\":\"assistant\""));
    assert_eq!(streamed_content(&parse_chunks(&data[1..2])), "echo:");
    assert_eq!(data[2..5], ["{not json", "{not json", "{not json"]);
    assert_eq!(streamed_content(&parse_chunks(&data[5..])), " one two");
    assert_eq!(data.last().unwrap(), "[DONE]");
}
