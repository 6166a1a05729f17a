//! Several `echelon serve` replicas on one Redis (issue 15): a replica killed with
//! `kill -9` while it holds fleet-wide concurrency leases gives its slots back within
//! `state.lease_ttl`; `/admin/state` and `/metrics` show the state backend.
//!
//! Starts its own `redis-server` on a free port (Debian's `redis-server`, installed by
//! `.ci/run`); skipped without it, unless `ECHELON_REQUIRE_REAL_UPSTREAM=1`, where it
//! fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use echelon_testkit::{Behavior, TestUpstream};

struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a free port, and its port; `None` when it is not installed and
/// CI does not require it.
fn redis() -> Option<(Redis, u16)> {
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        assert!(
            std::env::var("ECHELON_REQUIRE_REAL_UPSTREAM").as_deref() != Ok("1"),
            "redis-server is not installed and ECHELON_REQUIRE_REAL_UPSTREAM=1"
        );
        eprintln!("skipped: redis-server is not installed");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Redis(child), port))
}

async fn chat(client: &reqwest::Client, url: &str) -> u16 {
    client
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "a", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_sigkill_gives_its_leases_back_within_the_ttl() {
    let Some((_redis, port)) = redis() else {
        return;
    };
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::write(
        &dir,
        "gw.yaml",
        &format!(
            r#"
state: {{ backend: redis, url: "redis://127.0.0.1:{port}/0", lease_ttl: 1, timeout_ms: 200 }}
providers: {{ p: {{ base_url: "{}" }} }}
models: {{ a: {{ provider: p, concurrency_limit: 2, queue_timeout: 0, max_retries: 0, timeout: 60 }} }}
usage: {{ ledger: false }}
"#,
            up.base_url()
        ),
    );
    let (mut a, url_a) = common::spawn_serve(&config, dir.path());
    let (mut b, url_b) = common::spawn_serve(&config, dir.path());
    let client = reqwest::Client::new();

    // A holds both fleet-wide slots with two calls the upstream never answers.
    up.push_behavior(Behavior::Stall);
    up.push_behavior(Behavior::Stall);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (c, u) = (client.clone(), url_a.clone());
            tokio::spawn(async move { chat(&c, &u).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.active_requests() < 2 {
        assert!(
            Instant::now() < deadline,
            "A's calls did not reach the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_ne!(chat(&client, &url_b).await, 200, "B sees A's leases");
    let renewed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_ne!(
        chat(&client, &url_b).await,
        200,
        "A's running calls keep renewing their leases past the TTL"
    );

    // kill -9: no release, no more renewals.
    a.kill().unwrap();
    a.wait().unwrap();
    let killed = Instant::now();
    let mut status = chat(&client, &url_b).await;
    while status != 200 && killed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = chat(&client, &url_b).await;
    }
    assert_eq!(status, 200, "A's slots came back");
    assert!(
        killed.elapsed() <= Duration::from_millis(1500),
        "within lease_ttl (1 s) plus a poll: {:?} (held for {:?} before)",
        killed.elapsed(),
        killed - renewed
    );
    drop(held);

    let state: serde_json::Value = client
        .get(format!("{url_b}/admin/state"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        state["state"],
        serde_json::json!({"backend": "redis", "mode": "shared", "up": true})
    );
    let metrics = client
        .get(format!("{url_b}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("echelon_state_backend_up 1"), "{metrics}");
    assert!(
        metrics.contains("echelon_state_round_trip_seconds_bucket"),
        "{metrics}"
    );
    b.kill().unwrap();
    b.wait().unwrap();
}

/// `echelon judge --cache redis://…`: a second judge process (another output file, so
/// nothing is resumed) finds every item in the Redis cache, `cached: true`, and the
/// upstream counts no new call; the entries are the `<key_prefix>judge:<key>` keys with
/// the `--cache-ttl`. With the Redis gone, a third run still judges every item (uncached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_judge_process_hits_the_redis_cache_of_the_first() {
    let Some((redis_server, port)) = redis() else {
        return;
    };
    let up = TestUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::write(
        &dir,
        "gw.yaml",
        &format!(
            r#"
providers: {{ p: {{ base_url: "{}" }} }}
models: {{ m1: {{ provider: p, max_retries: 0 }} }}
usage: {{ ledger: false }}
"#,
            up.base_url()
        ),
    );
    // The test upstream echoes the rubric, so it answers "Score: N".
    let rubric = common::write(&dir, "rubric.txt", "Score: {response}");
    let items: String = (1..=6)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"prompt\": \"p{i}\", \"response\": \"{}\"}}\n",
                i + 2
            )
        })
        .collect();
    let input = common::write(&dir, "in.jsonl", &items);
    let url = format!("redis://127.0.0.1:{port}/0");
    let judge = |out: &str| {
        let mut c = tokio::process::Command::new(common::BIN);
        c.args(["judge", "--route", "m1", "--concurrency", "3", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(dir.path().join(out))
            .arg("--rubric")
            .arg(&rubric)
            .args(["--cache", &url, "--cache-ttl", "3600"]);
        c
    };
    let read = |out: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join(out))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };

    let first = judge("a.jsonl").output().await.unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let a = read("a.jsonl");
    assert_eq!(a.len(), 6);
    assert!(
        a.iter()
            .all(|l| l["cached"] == false && l["score"].is_number()),
        "{a:?}"
    );
    assert_eq!(up.chat_requests(), 6);

    let second = judge("b.jsonl").output().await.unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let b = read("b.jsonl");
    assert_eq!(b.len(), 6);
    for line in &b {
        assert_eq!(line["cached"], true, "{line}");
        let twin = a.iter().find(|l| l["id"] == line["id"]).unwrap();
        assert_eq!(line["score"], twin["score"], "{line}");
    }
    assert_eq!(up.chat_requests(), 6, "the second process paid for nothing");

    // The entries: under the default key prefix (no `state: backend: redis` here), with
    // the TTL.
    let mut conn = redis_conn(port);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("echelon:judge:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 6, "{keys:?}");
    let ttl: i64 = redis::cmd("TTL").arg(&keys[0]).query(&mut conn).unwrap();
    assert!((3500..=3600).contains(&ttl), "{ttl}");
    let value: String = redis::cmd("GET").arg(&keys[0]).query(&mut conn).unwrap();
    let value: serde_json::Value = serde_json::from_str(&value).unwrap();
    assert!(
        value["score"].is_number() && value["raw"].is_string(),
        "{value}"
    );

    // Redis gone: every item is still judged, uncached, and the outage is logged once.
    drop(redis_server);
    let third = judge("c.jsonl").output().await.unwrap();
    let err = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{err}");
    let c = read("c.jsonl");
    assert_eq!(c.len(), 6);
    assert!(
        c.iter()
            .all(|l| l["cached"] == false && l["score"].is_number()),
        "{c:?}"
    );
    assert_eq!(up.chat_requests(), 12);
    assert_eq!(
        err.matches("judge cache: redis unavailable").count(),
        1,
        "{err}"
    );
}

/// A plain (blocking) connection to the test's Redis.
fn redis_conn(port: u16) -> redis::Connection {
    redis::Client::open(format!("redis://127.0.0.1:{port}/0"))
        .unwrap()
        .get_connection()
        .unwrap()
}
