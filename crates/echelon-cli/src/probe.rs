//! `echelon probe`: latency of any OpenAI-compatible endpoint, as a client sees it.
//!
//! Sends chat completions (streaming or not) and reports the percentiles of
//! total latency and, for streams, time to first token: the time from sending
//! the request to the first SSE event whose `choices[0].delta.content` is a
//! non-empty string. It is a measuring probe, not a load generator: the bench
//! harness (`bench/run.sh`) drives load with wrk and uses this for what wrk
//! cannot see (time to first token, and whether each stream ended with
//! `[DONE]`).

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde_json::{Value, json};

/// What `echelon probe` was asked to do.
#[derive(Debug, clap::Args)]
pub(crate) struct ProbeArgs {
    /// Base URL of the OpenAI-compatible API, up to and including `/v1`.
    #[arg(long)]
    url: String,
    /// The `model` of each request (a model id, a task group, a pool...).
    #[arg(long)]
    model: String,
    /// Bearer token, if the endpoint wants one.
    #[arg(long, env = "ECHELON_PROBE_API_KEY")]
    api_key: Option<String>,
    /// Ask for a stream and measure time to first token.
    #[arg(long)]
    stream: bool,
    /// Measured requests.
    #[arg(long, short = 'n', default_value_t = 200)]
    requests: usize,
    /// Requests sent first and not measured (connection set-up, caches).
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub(crate) concurrency: usize,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// One request's outcome: latencies, or why it failed.
#[derive(Debug)]
struct Sample {
    /// Time to the first content token (streams only).
    ttft: Option<Duration>,
    /// Time to the end of the body.
    total: Duration,
}

/// Runs the probe and prints its report; the exit code is 1 when any request failed.
pub(crate) async fn probe(args: ProbeArgs) -> anyhow::Result<std::process::ExitCode> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    let url = format!("{}/chat/completions", args.url.trim_end_matches('/'));
    let mut body = json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "hello there, how are you"}],
        "max_tokens": args.max_tokens,
    });
    if args.stream {
        body["stream"] = Value::Bool(true);
    }
    let body = serde_json::to_vec(&body).context("encoding the request")?;
    let request = |client: &reqwest::Client| {
        let mut r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        if let Some(key) = &args.api_key {
            r = r.bearer_auth(key);
        }
        r
    };

    let run = |n: usize| {
        let client = client.clone();
        let request = &request;
        futures::stream::iter(0..n)
            .map(move |_| {
                let client = client.clone();
                async move { one(request(&client), args.stream).await }
            })
            .buffer_unordered(args.concurrency)
            .collect::<Vec<_>>()
    };
    run(args.warmup).await;
    let started = Instant::now();
    let results = run(args.requests).await;
    let wall = started.elapsed();

    let mut errors = Vec::new();
    let mut totals = Vec::new();
    let mut ttfts = Vec::new();
    for r in results {
        match r {
            Ok(s) => {
                totals.push(s.total);
                ttfts.extend(s.ttft);
            }
            Err(e) => errors.push(e),
        }
    }
    totals.sort_unstable();
    ttfts.sort_unstable();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let report = json!({
        "url": url,
        "model": args.model,
        "stream": args.stream,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "errors": errors.len(),
        "requests_per_s": args.requests as f64 / wall.as_secs_f64(),
        "total_ms": {
            "p50": ms(percentile(&totals, 50.0)),
            "p90": ms(percentile(&totals, 90.0)),
            "p99": ms(percentile(&totals, 99.0)),
        },
        "ttft_ms": {
            "p50": ms(percentile(&ttfts, 50.0)),
            "p90": ms(percentile(&ttfts, 90.0)),
            "p99": ms(percentile(&ttfts, 99.0)),
        },
    });
    if args.json {
        println!("{report}");
    } else {
        let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |v| format!("{v:.3}"));
        println!(
            "{} requests ({} errors) at concurrency {}, {:.0} requests/s",
            args.requests,
            errors.len(),
            args.concurrency,
            args.requests as f64 / wall.as_secs_f64()
        );
        for key in ["total_ms", "ttft_ms"] {
            if args.stream || key == "total_ms" {
                let p = &report[key];
                println!(
                    "{key}: p50 {} p90 {} p99 {}",
                    f(&p["p50"]),
                    f(&p["p90"]),
                    f(&p["p99"])
                );
            }
        }
    }
    for e in errors.iter().take(5) {
        eprintln!("error: {e:#}");
    }
    Ok(if errors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Sends one request and times it; a stream must end with `data: [DONE]`.
async fn one(request: reqwest::RequestBuilder, stream: bool) -> anyhow::Result<Sample> {
    let started = Instant::now();
    let response = request.send().await.context("sending")?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        anyhow::bail!("HTTP {status}: {text}");
    }
    if !stream {
        response.bytes().await.context("reading the body")?;
        return Ok(Sample {
            ttft: None,
            total: started.elapsed(),
        });
    }
    let mut ttft = None;
    let mut done = false;
    let mut pending: Vec<u8> = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(bytes) = body.next().await {
        pending.extend_from_slice(&bytes.context("reading the stream")?);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            let data = data.trim_ascii();
            if data == b"[DONE]" {
                done = true;
            } else if ttft.is_none() && has_content(data) {
                ttft = Some(started.elapsed());
            }
        }
    }
    anyhow::ensure!(done, "the stream ended without [DONE]");
    Ok(Sample {
        ttft,
        total: started.elapsed(),
    })
}

/// Whether an SSE event's JSON carries a non-empty `choices[0].delta.content`.
fn has_content(data: &[u8]) -> bool {
    serde_json::from_slice::<Value>(data).is_ok_and(|v| {
        v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    })
}

/// The `p`th percentile (nearest rank) of sorted durations; `None` when empty.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 50.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&v[..1], 99.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn content_is_a_non_empty_delta() {
        assert!(has_content(br#"{"choices":[{"delta":{"content":"Hi"}}]}"#));
        assert!(!has_content(
            br#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#
        ));
        assert!(!has_content(br#"{"choices":[{"delta":{"content":""}}]}"#));
        assert!(!has_content(br#"{"choices":[],"usage":{}}"#));
        assert!(!has_content(b"{not json"));
    }
}
