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
