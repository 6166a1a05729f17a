//! Usage accounting end to end: every request and attempt lands in the SQLite ledger,
//! tokens and costs add up, stream usage is recorded whether or not the client asked,
//! estimated usage is flagged, and `/metrics` agrees with the ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::ledger::Ledger;
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream, UpstreamOptions};
use serde_json::{Value, json};

struct Stack {
    server: common::Served,
    a: TestUpstream,
    b: TestUpstream,
    db: std::path::PathBuf,
    _dir: tempfile::TempDir,
    writer: Option<echelon::usage::ledger::LedgerWriter>,
}

const ROUTE_PREFIX: &str = "usage";

async fn stack(tag: &str) -> Stack {
    let a = TestUpstream::start_with(UpstreamOptions {
        model_alias: "alias-a".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let b = TestUpstream::start_with(UpstreamOptions {
        model_alias: "alias-b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let yaml = format!(
        r#"
providers:
  pa: {{ base_url: "{}", api_keys: ["sk-usage-secret-a"] }}
  pb: {{ base_url: "{}", api_keys: ["sk-usage-secret-b"] }}
models:
  {tag}-a: {{ provider: pa, max_retries: 0, pricing: {{ input_per_1m: 1.0, output_per_1m: 2.0 }} }}
  {tag}-b: {{ provider: pb, max_retries: 0, pricing: {{ input_per_1m: 10.0, output_per_1m: 20.0 }} }}
task_groups:
  {ROUTE_PREFIX}-{tag}:
    echelon1: {{ models: [{tag}-a] }}
    echelon2: {{ models: [{tag}-b] }}
"#,
        a.base_url(),
        b.base_url()
    );
    let config = Config::from_str(&yaml, "usage.yaml").unwrap();
    let (sender, writer) =
        Ledger::open(&db)
            .unwrap()
            .spawn_writer(1000, 64, Duration::from_millis(20));
    let gateway = Arc::new(
        Gateway::from_config(&config)
            .unwrap()
            .with_record_sink(Arc::new(sender)),
    );
    Stack {
        server: common::serve(gateway, &ServerOptions::default()).await,
        a,
        b,
        db,
        _dir: dir,
        writer: Some(writer),
    }
}

impl Stack {
    async fn post(&self, body: Value) -> reqwest::Response {
        reqwest::Client::new()
            .post(self.server.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Stops the server and waits until the ledger has every row.
    async fn finish(&mut self) -> u64 {
        self.server.stop().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let writer = self.writer.take().unwrap();
        tokio::task::spawn_blocking(move || writer.join())
            .await
            .unwrap()
            .unwrap()
    }

    fn query(&self, sql: &str) -> Vec<Vec<Value>> {
        let conn = rusqlite::Connection::open(&self.db).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |row| {
            Ok((0..n)
                .map(|i| match row.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => json!(v),
                    rusqlite::types::ValueRef::Real(v) => json!(v),
                    rusqlite::types::ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
                    rusqlite::types::ValueRef::Blob(_) => Value::Null,
                })
                .collect())
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }
}

fn chat(route: &str, stream: bool) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": "count these five words"}], "stream": stream})
}

#[tokio::test]
async fn a_mixed_run_records_every_request_and_attempt_and_costs_add_up() {
    let mut s = stack("mix").await;
    let route = format!("{ROUTE_PREFIX}-mix");
    // 3 plain successes on a.
    for _ in 0..3 {
        assert_eq!(s.post(chat(&route, false)).await.status(), 200);
    }
    // 2 fallbacks: a fails, b answers.
    s.a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "x".into(),
    });
    for _ in 0..2 {
        assert_eq!(s.post(chat(&route, false)).await.status(), 200);
    }
    // 1 total failure: both fail.
    s.b.set_behavior(Behavior::Status {
        status: 503,
        retry_after: None,
        message: "y".into(),
    });
    assert_eq!(s.post(chat(&route, false)).await.status(), 502);
    // 1 unknown route.
    assert_eq!(s.post(chat("no-such-route", false)).await.status(), 404);

    let rows = s.finish().await;
    assert!(rows >= 7);
    let req_rows = s.query("SELECT COUNT(*) FROM requests");
    assert_eq!(req_rows[0][0], 7, "one row per request");
    let att_rows = s.query("SELECT COUNT(*) FROM attempts");
    assert_eq!(att_rows[0][0], 3 + 2 * 2 + 2, "one row per attempt");
    assert_eq!(
        s.a.chat_requests() + s.b.chat_requests(),
        3 + 2 * 2 + 2,
        "the ledger's attempts are the calls the upstreams saw"
    );
    let fallbacks = s.query("SELECT COUNT(*) FROM requests WHERE fallback = 1");
    assert_eq!(fallbacks[0][0], 3);
    let failures = s.query(
        "SELECT status, COUNT(*) FROM requests WHERE status >= 400 GROUP BY status ORDER BY status",
    );
    assert_eq!(
        failures,
        vec![vec![json!(404), json!(1)], vec![json!(502), json!(1)]]
    );

    // Costs follow the prices: a at 1/2 USD per 1M, b at 10/20.
    let per_model = s.query(
        "SELECT model, SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) FROM requests WHERE model IS NOT NULL GROUP BY model ORDER BY model",
    );
    assert_eq!(per_model.len(), 2);
    for row in &per_model {
        let (p, c, cost) = (
            row[1].as_f64().unwrap(),
            row[2].as_f64().unwrap(),
            row[3].as_f64().unwrap(),
        );
        let (inp, out) = if row[0] == "mix-a" {
            (1.0, 2.0)
        } else {
            (10.0, 20.0)
        };
        assert!(p > 0.0 && c > 0.0);
        assert!((cost - (p * inp + c * out) / 1e6).abs() < 1e-12, "{row:?}");
    }
    let sums = s
        .query("SELECT (SELECT SUM(cost_usd) FROM requests), (SELECT SUM(cost_usd) FROM attempts)");
    assert!((sums[0][0].as_f64().unwrap() - sums[0][1].as_f64().unwrap()).abs() < 1e-12);
}

#[tokio::test]
async fn stream_usage_is_recorded_whether_or_not_the_client_asked() {
    let mut s = stack("stream").await;
    let route = format!("{ROUTE_PREFIX}-stream");
    // Not asked: no usage chunk reaches the client, the ledger still has the usage.
    let text = s.post(chat(&route, true)).await.text().await.unwrap();
    assert!(!text.contains("\"usage\""), "{text}");
    // Asked: the usage chunk reaches the client.
    let mut body = chat(&route, true);
    body["stream_options"] = json!({"include_usage": true});
    let text = s.post(body).await.text().await.unwrap();
    assert!(text.contains("\"usage\""));
    s.finish().await;
    let rows = s.query("SELECT stream, prompt_tokens, completion_tokens, estimated, ttft_ms FROM requests ORDER BY id");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r[0], 1);
        assert!(
            r[1].as_i64().unwrap() > 0 && r[2].as_i64().unwrap() > 0,
            "{r:?}"
        );
        assert_eq!(r[3], 0, "the provider's usage, not an estimate");
        assert!(r[4].is_i64());
    }
    let sent = s.a.recorded();
    assert!(
        sent.iter()
            .all(|r| r.body.as_ref().unwrap()["stream_options"]["include_usage"] == true)
    );
}

#[tokio::test]
async fn usage_the_provider_does_not_send_is_estimated_and_flagged() {
    let mut s = stack("est").await;
    let route = format!("{ROUTE_PREFIX}-est");
    // A stream cut after some content: no usage chunk ever arrives.
    s.a.push_behavior(Behavior::StreamCut { chunks: 3 });
    let text = s.post(chat(&route, true)).await.text().await.unwrap();
    assert!(text.contains("stream_interrupted"));
    s.finish().await;
    let rows = s.query("SELECT status, prompt_tokens, completion_tokens, estimated FROM requests");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0][0], 502);
    assert!(rows[0][1].as_i64().unwrap() > 0);
    assert!(
        rows[0][2].as_i64().unwrap() > 0,
        "the partial answer counted"
    );
    assert_eq!(rows[0][3], 1, "estimated");
}

#[tokio::test]
async fn metrics_agree_with_the_ledger_and_no_key_leaks() {
    let mut s = stack("met").await;
    let route = format!("{ROUTE_PREFIX}-met");
    for _ in 0..4 {
        s.post(chat(&route, false)).await;
    }
    s.a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "x".into(),
    });
    s.post(chat(&route, false)).await;
    let metrics = reqwest::get(s.server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let state = reqwest::get(s.server.url("/admin/state"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    s.finish().await;
    let sum_for = |needle: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("echelon_requests_total{") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let ledger = s.query("SELECT COUNT(*) FROM requests");
    assert_eq!(
        sum_for(&format!("route=\"{route}\"")),
        ledger[0][0].as_f64().unwrap()
    );
    let db_bytes = std::fs::read(&s.db).unwrap();
    for secret in ["sk-usage-secret-a", "sk-usage-secret-b"] {
        assert!(!metrics.contains(secret));
        assert!(!state.contains(secret));
        assert!(
            !db_bytes
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
        );
    }
}

#[tokio::test]
async fn each_request_is_recorded_with_the_endpoint_it_came_in_by() {
    let mut s = stack("ep").await;
    let route = format!("{ROUTE_PREFIX}-ep");
    let http = reqwest::Client::new();
    let send = |path: &'static str, body: Value| {
        let req = http.post(s.server.url(path)).json(&body);
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200, "{path}");
            resp.text().await.unwrap()
        }
    };
    send("/v1/chat/completions", chat(&route, false)).await;
    send(
        "/v1/messages",
        json!({"model": route, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    send("/v1/responses", json!({"model": route, "input": "hi"})).await;
    send(
        "/v1/embeddings",
        json!({"model": route, "input": ["a", "b"]}),
    )
    .await;
    s.finish().await;
    let rows = s.query("SELECT endpoint, stream, prompt_tokens > 0 FROM requests ORDER BY id");
    assert_eq!(
        rows,
        vec![
            vec![json!("chat"), json!(0), json!(1)],
            vec![json!("messages"), json!(1), json!(1)],
            vec![json!("responses"), json!(0), json!(1)],
            vec![json!("embeddings"), json!(0), json!(1)],
        ]
    );
}
