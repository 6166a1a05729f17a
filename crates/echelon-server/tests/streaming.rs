//! Streams are relayed chunk by chunk as they arrive, not gathered and sent at the end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::ServerOptions;
use echelon_testkit::{TestUpstream, UpstreamOptions};
use futures::StreamExt;
use serde_json::{Value, json};

/// The upstream waits this long before each content chunk.
const CHUNK_DELAY: Duration = Duration::from_millis(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_chunks_reach_the_client_as_the_upstream_sends_them() {
    let up = TestUpstream::start_with(UpstreamOptions {
        chunk_delay: CHUNK_DELAY,
        ..Default::default()
    })
    .await
    .unwrap();
    let yaml = format!(
        "providers:\n  p: {{ base_url: \"{}\" }}\nmodels:\n  m: {{ provider: p }}\n",
        up.base_url()
    );
    let gateway =
        Arc::new(Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap());
    let server = common::serve(gateway, &ServerOptions::default()).await;

    // Five words: five content chunks, CHUNK_DELAY apart at the upstream.
    let resp = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&json!({
            "model": "m",
            "stream": true,
            "messages": [{"role": "user", "content": "one two three four five"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut arrivals = Vec::new();
    let mut pending = String::new();
    let mut body = resp.bytes_stream();
    while let Some(bytes) = body.next().await {
        pending.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event.trim().trim_start_matches("data: ");
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).unwrap();
            if chunk["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|s| !s.is_empty())
            {
                arrivals.push(Instant::now());
            }
        }
    }
    assert!(arrivals.len() >= 4, "content chunks: {}", arrivals.len());
    // Relayed as they come, the chunks are spread over about (n - 1) × CHUNK_DELAY; a
    // relay that gathered the stream would deliver them all at once. Half the spread is
    // the bar, so a slow machine cannot fail this honestly-relayed stream.
    let spread = *arrivals.last().unwrap() - arrivals[0];
    let expected = CHUNK_DELAY * (arrivals.len() as u32 - 1);
    assert!(
        spread >= expected / 2,
        "chunks arrived within {spread:?}; the upstream spread them over {expected:?}"
    );
    drop(server);
    up.shutdown().await;
}

/// The `data:` lines of an SSE body, in order.
fn data_lines(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// Chunks the gateway does not change reach the client as the upstream wrote them (its
/// own field order, spacing and an empty final `delta`, issue 16); a chunk the gateway
/// changes (the finish chunk's `echelon` field after a skipped malformed event) is
/// written from its fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_chunks_are_relayed_byte_for_byte() {
    const ROLE: &str = r#"{"object":"chat.completion.chunk","id":"c1","model":"up","created":1,"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}"#;
    const TEXT: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"system_fingerprint":"fp"}"#;
    const FINISH: &str = r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
    let malformed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let app = {
        let malformed = malformed.clone();
        axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(move || {
                let bad = malformed.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    let mut body = format!("data: {ROLE}\n\ndata: {TEXT}\n\n");
                    if bad {
                        body.push_str("data: {not json\n\n");
                    }
                    body.push_str(&format!("data: {FINISH}\n\ndata: [DONE]\n\n"));
                    ([("content-type", "text/event-stream")], body)
                }
            }),
        )
    };
    let addr = common::spawn_upstream(app).await;
    let yaml = format!(
        "providers:\n  p: {{ base_url: \"http://{addr}/v1\" }}\nmodels:\n  m: {{ provider: p, malformed_event: skip }}\n"
    );
    let gateway =
        Arc::new(Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap());
    let server = common::serve(gateway, &ServerOptions::default()).await;
    let ask = || async {
        let resp = reqwest::Client::new()
            .post(server.url("/v1/chat/completions"))
            .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        data_lines(&resp.text().await.unwrap())
    };

    assert_eq!(ask().await, [ROLE, TEXT, FINISH, "[DONE]"]);

    malformed.store(true, std::sync::atomic::Ordering::SeqCst);
    let lines = ask().await;
    assert_eq!(lines[..2], [ROLE, TEXT]);
    let finish: Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(finish["echelon"]["stream_anomalies"], 1, "{finish}");
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert_eq!(lines[3], "[DONE]");
    drop(server);
}
