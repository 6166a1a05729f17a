//! `echelon probe` against the test upstream: it measures what it sends, counts
//! failures, and treats a stream without `[DONE]` as a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use echelon_testkit::{Behavior, TestUpstream};
use serde_json::Value;

fn probe(url: &str, extra: &[&str]) -> (std::process::ExitStatus, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_echelon"))
        .args([
            "probe", "--url", url, "--model", "m", "--json", "--warmup", "2",
        ])
        .args(extra)
        .output()
        .expect("run echelon probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("probe printed no JSON ({e}): {stdout}\n{stderr}"));
    (out.status, report, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_report_time_to_first_token_and_every_request_reaches_the_upstream() {
    let up = TestUpstream::start().await.expect("upstream");
    let url = up.base_url();
    let (status, report, _) = tokio::task::spawn_blocking(move || {
        probe(&url, &["--stream", "-n", "25", "--concurrency", "3"])
    })
    .await
    .expect("join");
    assert!(status.success(), "{report}");
    assert_eq!(report["requests"], 25);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["concurrency"], 3);
    let ttft = report["ttft_ms"]["p50"].as_f64().expect("ttft p50");
    let total = report["total_ms"]["p50"].as_f64().expect("total p50");
    assert!(ttft > 0.0 && ttft <= total, "ttft {ttft} total {total}");
    // 2 warm-up requests + 25 measured ones.
    assert_eq!(up.chat_requests(), 27);
    up.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_and_cut_streams_are_counted_as_errors() {
    let up = TestUpstream::start().await.expect("upstream");
    let url = up.base_url();

    up.set_behavior(Behavior::status(500));
    let u = url.clone();
    let (status, report, stderr) = tokio::task::spawn_blocking(move || probe(&u, &["-n", "4"]))
        .await
        .expect("join");
    assert!(!status.success());
    assert_eq!(report["errors"], 4);
    assert!(stderr.contains("HTTP 500"), "{stderr}");
    assert!(report["total_ms"]["p50"].is_null());

    up.set_behavior(Behavior::StreamCut { chunks: 1 });
    let (status, report, stderr) =
        tokio::task::spawn_blocking(move || probe(&url, &["--stream", "-n", "3"]))
            .await
            .expect("join");
    assert!(!status.success());
    assert_eq!(
        report["errors"], 3,
        "a cut stream is not a success: {report}"
    );
    assert!(stderr.contains("error:"), "{stderr}");
    up.shutdown().await;
}
