//! The `echelon` binary: config validate, chat, serve's graceful shutdown, and judge (resume, kill -9).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use echelon_testkit::{TestUpstream, UpstreamOptions};

mod common;
use common::{BIN, sigterm, spawn_serve, spawn_serve_with, write};

fn config_for(base_url: &str) -> String {
    format!(
        r#"providers:
  local: {{ base_url: "{base_url}" }}
models:
  m1: {{ provider: local, max_retries: 0 }}
task_groups:
  grp:
    echelon1: {{ models: [m1] }}
"#
    )
}

#[test]
fn validate_prints_ok_for_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "good.yaml", &config_for("http://127.0.0.1:9/v1"));
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn validate_names_file_line_column_for_a_typo_and_a_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let typo = "providers:\n  local: { base_url: \"http://x/v1\" }\nmodels:\n  m1:\n    provider: local\n    timout: 30\n";
    let p = write(&dir, "typo.yaml", typo);
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Errors go to stderr, as serve's do; stdout stays empty.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("{}:6:5", p.display())), "{text}");
    assert!(text.contains("timout"), "{text}");
    assert!(
        text.contains("timeout"),
        "the hint names the right key: {text}"
    );

    let wrong = "providers:\n  local: { base_url: \"http://x/v1\" }\nmodels:\n  m1:\n    provider: local\n    timeout: soon\n";
    let p = write(&dir, "wrong.yaml", wrong);
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains(&format!("{}:6:", p.display())), "{text}");
    assert!(text.contains("models.m1.timeout"), "{text}");
}

#[tokio::test]
async fn chat_prints_the_answer_and_streams_tokens() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "c.yaml", &config_for(&up.base_url()));
    let out = tokio::process::Command::new(BIN)
        .env("ECHELON_DATA_DIR", dir.path())
        .args(["chat", "--config"])
        .arg(&p)
        .args(["--route", "grp", "say hi"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "echo: say hi");
    assert!(String::from_utf8_lossy(&out.stderr).contains("answered by m1"));

    let out = tokio::process::Command::new(BIN)
        .env("ECHELON_DATA_DIR", dir.path())
        .args(["chat", "--stream", "--config"])
        .arg(&p)
        .args(["--route", "grp", "say hi"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "echo: say hi");
}

#[tokio::test]
async fn chat_exits_1_with_the_attempts_when_everything_fails() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    let p = write(&dir, "c.yaml", &config_for("http://127.0.0.1:9/v1"));
    let out = tokio::process::Command::new(BIN)
        .env("ECHELON_DATA_DIR", dir.path())
        .args(["chat", "--config"])
        .arg(&p)
        .args(["--route", "grp", "hi"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("HTTP 502"), "{err}");
    assert!(
        err.contains("m1 (provider local, key -) → connect"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "no placeholder answer");
}

#[tokio::test]
async fn serve_finishes_in_flight_requests_on_sigterm() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = write(&dir, "c.yaml", &config_for(&up.base_url()));
    let (mut child, url) = spawn_serve(&p, dir.path());

    let req = tokio::spawn({
        let url = url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .json(&serde_json::json!({"model": "grp", "messages": [{"role": "user", "content": "slow"}]}))
                .send()
                .await
        }
    });
    while up.chat_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&child);
    let resp = req.await.unwrap().expect("the in-flight request completes");
    assert_eq!(resp.status(), 200);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "serve exits cleanly after draining: {status:?}"
    );
    assert!(
        reqwest::Client::new()
            .get(format!("{url}/health"))
            .send()
            .await
            .is_err()
    );
}

/// Issue 18: `echelon serve` with `telemetry:` installs the exporter in its subscriber,
/// and the spans of a request are sent by SIGTERM at the latest (no wait for the batch).
#[tokio::test]
async fn serve_exports_the_request_spans_by_its_exit() {
    let up = TestUpstream::start().await.unwrap();
    let receiver = echelon_testkit::OtlpReceiver::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{}telemetry: {{ otlp_endpoint: \"{}\" }}\n",
        config_for(&up.base_url()),
        receiver.endpoint()
    );
    let p = write(&dir, "c.yaml", &yaml);
    let (mut child, url) = spawn_serve(&p, dir.path());
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&serde_json::json!({"model": "grp", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let spans = receiver.spans();
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"chat grp"), "{names:?}");
    assert!(names.contains(&"chat m1"), "{names:?}");
    assert!(
        spans
            .iter()
            .all(|s| s.trace_id == "0af7651916cd43dd8448eb211c80319c"),
        "{spans:?}"
    );
    let tp = up.recorded()[0].headers.get("traceparent").cloned();
    assert!(tp.is_some(), "the upstream got a traceparent");
}

/// Issue 14 item 10: a request that outlasts the operator's patience no longer keeps
/// `serve` alive after SIGTERM: a second signal exits at once (status 143).
#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}server: {{ shutdown_timeout: 600 }}\n",
        config_for(&up.base_url()).replace("max_retries: 0", "max_retries: 0, timeout: 300")
    );
    let p = write(&dir, "c.yaml", &text);
    let log = dir.path().join("serve.log");
    let (mut child, url) = spawn_serve_with(
        &p,
        dir.path(),
        std::fs::File::create(&log).unwrap(),
        &[],
        &[],
    );
    let _stalled = tokio::spawn(async move {
        reqwest::Client::new()
            .post(format!("{url}/v1/chat/completions"))
            .json(&serde_json::json!({"model": "grp", "messages": [{"role": "user", "content": "stall"}]}))
            .send()
            .await
    });
    while up.chat_requests() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&child);
    // Two signals sent before serve took the first would be one (signals merge): wait
    // until it says it got it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("received: finishing in-flight requests")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "serve never logged the first SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the in-flight request"
    );
    sigterm(&child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve ignored the second SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(143), "{status:?}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn config_migrate_moves_the_global_fallback_into_the_groups() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../echelon/tests/fixtures/config/migrate_dir");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("llms");
    copy_dir(&fixture, &root);

    // Before: the global file is refused, with a hint to migrate.
    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("echelon config migrate"));

    let out = Command::new(BIN)
        .args(["config", "migrate", "--validate-only"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing written"));
    assert!(root.join("global_fallback.yaml").exists());

    let out = Command::new(BIN)
        .args(["config", "migrate", "--verbose"])
        .arg(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("fast_group"), "{text}");
    assert!(!root.join("global_fallback.yaml").exists());
    assert!(root.join("groups/fast_group.yaml.bak").exists());
    let migrated = std::fs::read_to_string(root.join("groups/fast_group.yaml")).unwrap();
    assert!(migrated.contains("fallback_config:"), "{migrated}");

    let out = Command::new(BIN)
        .args(["config", "validate"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(BIN)
        .args(["config", "migrate"])
        .arg(&root)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "nothing to migrate"
    );
}

#[tokio::test]
async fn sigterm_mid_run_loses_no_ledger_row() {
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let yaml = format!(
        "{}usage: {{ ledger: \"{}\", flush_interval_ms: 1000 }}\n",
        config_for(&up.base_url()),
        db.display()
    );
    let p = write(&dir, "c.yaml", &yaml);
    let (mut child, url) = spawn_serve(&p, dir.path());

    // 20 requests in flight, SIGTERM while the upstream is still answering them.
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({"model": "grp", "messages": [{"role": "user", "content": format!("n{i}")}], "stream": i % 2 == 0});
            let resp = client.post(format!("{url}/v1/chat/completions")).json(&body).send().await?;
            resp.text().await
        }));
    }
    while up.chat_requests() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sigterm(&child);
    let mut completed = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            completed += 1;
        }
    }
    assert_eq!(completed, 20, "every accepted request completes");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let out = Command::new(BIN)
        .args(["usage", "--format", "json", "--by", "route", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v.to_string();
    assert_eq!(
        v["total"]["requests"], 20,
        "a ledger row for every request: {text}"
    );
    assert_eq!(v["total"]["failures"], 0, "{text}");
    // Several ledgers (one per replica) are reported together.
    let db2 = dir.path().join("ledger2.db");
    std::fs::copy(&db, &db2).unwrap();
    let out = Command::new(BIN)
        .args(["usage", "--format", "json", "--by", "route", "--config"])
        .arg(&p)
        .arg("--ledger")
        .arg(&db)
        .arg("--ledger")
        .arg(&db2)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"]["requests"], 40, "{v}");
    assert_eq!(v["rows"][0]["requests"], 40, "{v}");
}

#[tokio::test]
async fn judge_scores_a_file_reports_bad_lines_and_resumes() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "c.yaml", &config_for(&up.base_url()));
    // The test upstream echoes the rubric, so this rubric makes it answer "Score: N".
    let rubric = write(&dir, "rubric.txt", "Score: {response}");
    let input = write(
        &dir,
        "in.jsonl",
        "{\"id\": 1, \"prompt\": \"p\", \"response\": \"7\", \"tag\": \"x\"}\nnot json\n{\"id\": 2, \"prompt\": \"p\", \"response\": \"9\"}\n{\"id\": 3, \"prompt\": \"p\"}\n",
    );
    let output = dir.path().join("out.jsonl");
    // A fresh machine: the data directory does not exist yet (the judge creates it for
    // its cache instead of failing before its first item).
    let data_dir = dir.path().join("fresh").join("data");
    let judge = || {
        let mut c = tokio::process::Command::new(BIN);
        c.env("ECHELON_DATA_DIR", &data_dir)
            .args(["judge", "--route", "grp", "--concurrency", "2", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--rubric")
            .arg(&rubric);
        c
    };
    let out = judge().output().await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "bad lines make a partial success: {err}"
    );
    assert!(err.contains("bad line 2:"), "{err}");
    assert!(err.contains("bad line 4:"), "{err}");
    assert!(data_dir.join("judge_cache.db").is_file(), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let by_id = |id: i64| lines.iter().find(|l| l["id"] == id).unwrap().clone();
    assert_eq!(by_id(1)["score"], 7.0);
    assert_eq!(by_id(1)["tag"], "x", "extra fields carried");
    assert_eq!(by_id(2)["score"], 9.0);
    assert_eq!(by_id(2)["reward"], 9.0);
    assert_eq!(up.chat_requests(), 2);

    // The same command again: everything is already in the output.
    let out = judge().output().await.unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 skipped as already done"));
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 2);
    assert_eq!(
        up.chat_requests(),
        2,
        "no upstream call on a resumed, finished run"
    );
}

/// A real `kill -9` in the middle of a run, then the same command again: every id ends
/// up in the output exactly once, and only the items in flight at the kill are judged
/// twice (issue 6: "a kill -9 mid-run loses only in-flight items and never duplicates a
/// line").
#[tokio::test]
async fn judge_killed_mid_run_resumes_with_each_id_exactly_once() {
    const ITEMS: usize = 100;
    const CONCURRENCY: usize = 4;
    let up = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(40),
        ..UpstreamOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "c.yaml", &config_for(&up.base_url()));
    let rubric = write(&dir, "rubric.txt", "Score: {response}");
    let text: String = (0..ITEMS)
        .map(|i| {
            format!(
                "{{\"id\": \"item-{i}\", \"prompt\": \"p\", \"response\": \"{}\"}}\n",
                i % 10 + 1
            )
        })
        .collect();
    let input = write(&dir, "in.jsonl", &text);
    let output = dir.path().join("out.jsonl");
    let judge = || {
        let mut c = tokio::process::Command::new(BIN);
        c.env("ECHELON_DATA_DIR", dir.path())
            .args(["judge", "--route", "grp", "--no-cache", "--config"])
            .arg(&config)
            .args(["--concurrency", &CONCURRENCY.to_string(), "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--rubric")
            .arg(&rubric)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };

    let mut first = judge().spawn().unwrap();
    // Wait until some lines are out (each wave of 4 takes 40 ms; a debug build loads its
    // tokenizer for a while first), then SIGKILL.
    let written = || {
        std::fs::read_to_string(&output)
            .map(|t| t.matches('\n').count())
            .unwrap_or(0)
    };
    for _ in 0..6000 {
        if written() >= 12 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let done_before = written();
    assert!(
        (12..ITEMS).contains(&done_before),
        "killed mid-run: {done_before} of {ITEMS} lines written"
    );
    let calls_before = up.chat_requests();

    let out = judge().status().await.unwrap();
    assert_eq!(out.code(), Some(0));
    let ids: Vec<String> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["score"].is_number(), "{l}");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(ids.len(), ITEMS, "one line per id");
    assert_eq!(unique.len(), ITEMS, "no id twice");
    // The second run judged what the first had not written, and nothing else.
    assert_eq!(up.chat_requests() - calls_before, ITEMS - done_before);
    // At most the items in flight at the kill were sent twice.
    assert!(
        up.chat_requests() <= ITEMS + CONCURRENCY,
        "{}",
        up.chat_requests()
    );
}

/// Issue 17: `--verdict json_schema`, voting with a quorum, `--summary-json` with errors by
/// kind, pairwise with `--swap`, and a bad mode name refused.
#[tokio::test]
async fn judge_votes_asks_for_the_schema_and_writes_the_summary_json() {
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write(&dir, "c.yaml", &config_for(&up.base_url()));
    let rubric = write(&dir, "rubric.txt", "Score: {response}");
    let input = write(
        &dir,
        "in.jsonl",
        "{\"id\": \"s\", \"prompt\": \"p\", \"response\": \"7\"}\n{\"id\": \"u\", \"prompt\": \"p\", \"response\": \"x\"}\n",
    );
    let output = dir.path().join("out.jsonl");
    let summary = dir.path().join("summary.json");
    let out = tokio::process::Command::new(BIN)
        .args(["judge", "--route", "grp", "--no-cache", "--max-reasks", "0"])
        .args([
            "--verdict",
            "json_schema",
            "--samples",
            "3",
            "--aggregate",
            "median",
        ])
        .args(["--seed", "10", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .arg("--rubric")
        .arg(&rubric)
        .arg("--summary-json")
        .arg(&summary)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "an error line: {err}");
    assert!(err.contains("error no_quorum: 1 items (u)"), "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| lines.iter().find(|l| l["id"] == id).unwrap().clone();
    assert_eq!(by_id("s")["score"], 7.0);
    assert_eq!(by_id("s")["samples"], serde_json::json!([7.0, 7.0, 7.0]));
    assert_eq!(by_id("s")["aggregate"], "median");
    assert_eq!(by_id("s")["stdev"], 0.0);
    assert_eq!(by_id("u")["error"], "no_quorum");
    assert_eq!(by_id("u")["score"], serde_json::Value::Null);
    let sent = up.recorded();
    assert_eq!(sent.len(), 6, "3 samples per item");
    let body = sent[0].body.as_ref().unwrap();
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["temperature"], 0.7);
    let mut seeds: Vec<u64> = sent
        .iter()
        .map(|r| r.body.as_ref().unwrap()["seed"].as_u64().unwrap())
        .collect();
    seeds.sort_unstable();
    assert_eq!(seeds, vec![10, 10, 11, 11, 12, 12]);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["judged"], 2);
    assert_eq!(s["errors"]["no_quorum"]["ids"], serde_json::json!(["u"]));
    assert_eq!(s["parse_failure_rate"], 0.5);

    // Pairwise, both orders: "Winner: A B" then (swapped) "Winner: B A" both prefer A.
    let pairs = write(
        &dir,
        "pairs.jsonl",
        "{\"id\": 1, \"prompt\": \"p\", \"response_a\": \"A\", \"response_b\": \"B\"}\n",
    );
    let rubric = write(&dir, "pair.txt", "Winner: {response_a} {response_b}");
    let prefs = dir.path().join("prefs.jsonl");
    let out = tokio::process::Command::new(BIN)
        .args([
            "judge",
            "--route",
            "grp",
            "--no-cache",
            "--mode",
            "pairwise",
            "--swap",
        ])
        .args(["--inconsistent", "error", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(&pairs)
        .arg("--output")
        .arg(&prefs)
        .arg("--rubric")
        .arg(&rubric)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("preferences A 1 B 0 tie 0"), "{err}");
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&prefs).unwrap().trim()).unwrap();
    assert_eq!(line["preference"], "A", "{line}");
    assert_eq!(line["position_consistent"], true);
    assert_eq!(line["p_a"], 1.0);

    // A mode name that does not exist is refused by the argument parser.
    let out = Command::new(BIN)
        .args(["judge", "--route", "grp", "--aggregate", "mode", "--config"])
        .arg(&config)
        .args(["--input", "x", "--output", "y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("mean, median, majority"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
