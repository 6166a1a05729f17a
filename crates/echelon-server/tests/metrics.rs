//! `GET /metrics` over a real socket: the Prometheus text format, the figures
//! `echelon::usage::metrics::observe` records, and the live-state gauges (breakers, keys,
//! pools) set at scrape time. Never a key.
//!
//! The recorder is global to the test process, so each test uses its own route and model
//! names and checks exact values only on series nobody else touches.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use echelon::Gateway;
use echelon::config::Config;
use echelon::usage::metrics::{METRIC_NAMES, observe, observe_ledger_queue};
use echelon::usage::record::{AttemptRecord, RequestRecord};
use echelon_server::ServerOptions;
use echelon_testkit::{Behavior, TestUpstream};
use secrecy::SecretString;
use serde_json::{Value, json};

const GATEWAY_KEY: &str = "gw-key-DO-NOT-LEAK-7f3a9c";

struct Harness {
    server: common::Served,
    http: reqwest::Client,
    upstreams: Vec<TestUpstream>,
}

impl Harness {
    /// A gateway over `n` test upstreams; `yaml` may use `{u0}`, `{u1}`, … for their
    /// base URLs.
    async fn start(n: usize, yaml: &str) -> Harness {
        let mut upstreams = Vec::new();
        let mut yaml = yaml.to_owned();
        for i in 0..n {
            let u = TestUpstream::start().await.unwrap();
            yaml = yaml.replace(&format!("{{u{i}}}"), &u.base_url());
            upstreams.push(u);
        }
        let config = Config::from_str(&yaml, "t.yaml").unwrap();
        let gateway = Arc::new(Gateway::from_config(&config).unwrap());
        let options = ServerOptions {
            api_keys: vec![SecretString::from(GATEWAY_KEY)],
            ..ServerOptions::default()
        };
        Harness {
            server: common::serve(gateway, &options).await,
            http: reqwest::Client::new(),
            upstreams,
        }
    }

    fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    fn upstream(&self, i: usize) -> &TestUpstream {
        &self.upstreams[i]
    }

    /// `GET /metrics` (with the gateway key, which an open endpoint ignores), checked
    /// for status and content type, and parsed.
    async fn scrape(&self) -> (String, Exposition) {
        let resp = self
            .http
            .get(self.url("/metrics"))
            .bearer_auth(GATEWAY_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "content type {ct}"
        );
        let text = resp.text().await.unwrap();
        let parsed = Exposition::parse(&text);
        (text, parsed)
    }

    async fn chat(&self, route: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(GATEWAY_KEY)
            .json(&json!({"model": route, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    }

    async fn admin_state(&self) -> Value {
        self.http
            .get(self.url("/admin/state"))
            .bearer_auth(GATEWAY_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A parsed Prometheus text exposition (format 0.0.4).
#[derive(Debug, Default)]
struct Exposition {
    /// `# TYPE` of each metric family.
    types: HashMap<String, String>,
    /// `# HELP` of each metric family.
    help: HashMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Exposition {
    /// Parses `text`, panicking on any line that is not valid exposition format.
    fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                let (kind, name, value) = (
                    parts.next().unwrap(),
                    parts
                        .next()
                        .unwrap_or_else(|| panic!("bad comment: {line}")),
                    parts.next().unwrap_or(""),
                );
                assert!(valid_name(name), "bad metric name in {line:?}");
                match kind {
                    "TYPE" => {
                        assert!(
                            ["counter", "gauge", "histogram", "summary", "untyped"]
                                .contains(&value),
                            "bad type in {line:?}"
                        );
                        out.types.insert(name.to_owned(), value.to_owned());
                    }
                    "HELP" => {
                        out.help.insert(name.to_owned(), value.to_owned());
                    }
                    _ => {}
                }
                continue;
            }
            out.samples.push(parse_sample(line));
        }
        out
    }

    /// The value of the one sample named `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name}{labels:?} appears {} times",
            found.len()
        );
        found.first().copied()
    }

    /// Samples named `name` whose labels include every pair of `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .count()
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{k="v",...} value [timestamp]`, with `\\`, `\"` and `\n` escapes in values.
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..name_end];
    assert!(valid_name(name), "bad metric name in {line:?}");
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        loop {
            let (i, c) = chars
                .next()
                .unwrap_or_else(|| panic!("unclosed {{ in {line:?}"));
            if c == '}' {
                rest = &body[i + 1..];
                break;
            }
            if c == ',' {
                continue;
            }
            let key_start = i;
            let mut key_end = i;
            for (j, c) in chars.by_ref() {
                if c == '=' {
                    key_end = j;
                    break;
                }
            }
            let key = &body[key_start..key_end];
            assert!(valid_name(key), "bad label name {key:?} in {line:?}");
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "in {line:?}");
            let mut value = String::new();
            loop {
                match chars
                    .next()
                    .unwrap_or_else(|| panic!("unclosed \" in {line:?}"))
                {
                    (_, '"') => break,
                    (_, '\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    (_, c) => value.push(c),
                }
            }
            assert!(
                labels.insert(key.to_owned(), value).is_none(),
                "label {key} twice in {line:?}"
            );
        }
    }
    let mut fields = rest.split_whitespace();
    let value = fields
        .next()
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .unwrap_or_else(|_| panic!("bad timestamp in {line:?}"));
    }
    assert!(fields.next().is_none(), "trailing fields in {line:?}");
    (name.to_owned(), labels, value)
}

fn attempt(model: &str, kind: &str, latency_ms: u64) -> AttemptRecord {
    AttemptRecord {
        model: model.into(),
        provider: format!("{model}-prov"),
        key_id: Some("ab12cd34".into()),
        status: match kind {
            "ok" => Some(200),
            "server_error" => Some(500),
            _ => None,
        },
        outcome: kind.parse().unwrap(),
        latency_ms,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_usd: 0.0,
        estimated: false,
    }
}

fn record(
    route: &str,
    answered: Option<&str>,
    status: u16,
    attempts: Vec<AttemptRecord>,
) -> RequestRecord {
    RequestRecord {
        request_id: "req-0123456789abcdef".into(),
        started_at_unix_ms: 1,
        route: route.into(),
        model: answered.map(str::to_owned),
        provider: answered.map(|m| format!("{m}-prov")),
        status,
        stream: false,
        endpoint: Default::default(),
        latency_ms: 300,
        ttft_ms: None,
        prompt_tokens: attempts.iter().map(|a| a.prompt_tokens).sum(),
        completion_tokens: attempts.iter().map(|a| a.completion_tokens).sum(),
        cost_usd: attempts.iter().map(|a| a.cost_usd).sum(),
        estimated: false,
        fallback: attempts.windows(2).any(|w| w[0].model != w[1].model),
        no_finish_reason: false,
        stream_anomalies: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        attempts,
    }
}

const ONE_MODEL: &str = r#"
providers:
  p: { base_url: "{u0}" }
models:
  one-model: { provider: p }
"#;

#[tokio::test]
async fn observed_requests_are_counted_exactly() {
    let h = Harness::start(1, ONE_MODEL).await;
    let (_, before) = h.scrape().await;
    assert_eq!(
        before.get(
            "echelon_requests_total",
            &[("route", "obs"), ("model", "obs-b"), ("status", "200")]
        ),
        None
    );

    // a (circuit open: a skip) → b (500) → c (answers, streamed).
    let mut answered = attempt("obs-c", "ok", 400);
    answered.prompt_tokens = 120;
    answered.completion_tokens = 30;
    answered.cost_usd = 0.0015;
    let mut rec = record(
        "obs",
        Some("obs-c"),
        200,
        vec![
            attempt("obs-a", "circuit_open", 0),
            attempt("obs-b", "server_error", 150),
            answered,
        ],
    );
    rec.stream = true;
    rec.ttft_ms = Some(700);
    observe(&rec);
    observe(&rec);
    // Every candidate failed.
    let failed = record(
        "obs",
        None,
        502,
        vec![
            attempt("obs-b", "server_error", 20),
            attempt("obs-b", "timeout", 5000),
        ],
    );
    observe(&failed);
    // An unknown route: the name a client typed never becomes a label.
    observe(&record("client typed this", None, 404, vec![]));
    observe_ledger_queue(7);

    let (text, m) = h.scrape().await;
    let c = |name: &str, labels: &[(&str, &str)]| {
        m.get(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    assert_eq!(
        c(
            "echelon_requests_total",
            &[("route", "obs"), ("model", "obs-c"), ("status", "200")]
        ),
        2.0
    );
    assert_eq!(
        c(
            "echelon_requests_total",
            &[("route", "obs"), ("model", ""), ("status", "502")]
        ),
        1.0
    );
    assert!(
        c(
            "echelon_requests_total",
            &[("route", "_unrouted"), ("model", ""), ("status", "404")]
        ) >= 1.0
    );
    assert!(!text.contains("client typed this"));
    assert_eq!(
        c("echelon_fallback_requests_total", &[("route", "obs")]),
        2.0
    );

    // Attempts: every kind counted, durations for calls only.
    let att = |model: &str, kind: &str| {
        c(
            "echelon_attempts_total",
            &[
                ("model", model),
                ("provider", &format!("{model}-prov")),
                ("kind", kind),
            ],
        )
    };
    assert_eq!(att("obs-a", "circuit_open"), 2.0);
    assert_eq!(att("obs-b", "server_error"), 3.0);
    assert_eq!(att("obs-b", "timeout"), 1.0);
    assert_eq!(att("obs-c", "ok"), 2.0);
    assert_eq!(
        m.matching(
            "echelon_attempt_duration_seconds_count",
            &[("model", "obs-a")]
        ),
        0
    );
    let dur = |suffix: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("model", "obs-b"), ("provider", "obs-b-prov")];
        labels.extend_from_slice(extra);
        c(
            &format!("echelon_attempt_duration_seconds{suffix}"),
            &labels,
        )
    };
    assert_eq!(dur("_count", &[]), 4.0);
    assert!((dur("_sum", &[]) - (0.15 * 2.0 + 0.02 + 5.0)).abs() < 1e-9);
    assert_eq!(dur("_bucket", &[("le", "0.25")]), 3.0);
    assert_eq!(dur("_bucket", &[("le", "5")]), 4.0);
    assert_eq!(dur("_bucket", &[("le", "+Inf")]), 4.0);

    // Request duration and time to first token.
    let req = |suffix: &str, extra: &[(&str, &str)]| {
        let mut labels = vec![("route", "obs")];
        labels.extend_from_slice(extra);
        c(
            &format!("echelon_request_duration_seconds{suffix}"),
            &labels,
        )
    };
    assert_eq!(req("_count", &[]), 3.0);
    assert!((req("_sum", &[]) - 0.9).abs() < 1e-9);
    assert_eq!(req("_bucket", &[("le", "0.25")]), 0.0);
    assert_eq!(req("_bucket", &[("le", "0.5")]), 3.0);
    let ttft = [("route", "obs"), ("model", "obs-c")];
    assert_eq!(c("echelon_time_to_first_token_seconds_count", &ttft), 2.0);
    assert!((c("echelon_time_to_first_token_seconds_sum", &ttft) - 1.4).abs() < 1e-9);
    let ttft_le = |le: &str| {
        c(
            "echelon_time_to_first_token_seconds_bucket",
            &[ttft[0], ttft[1], ("le", le)],
        )
    };
    assert_eq!(ttft_le("0.5"), 0.0);
    assert_eq!(ttft_le("0.75"), 2.0);

    // Tokens and cost go to the attempt that consumed them.
    assert_eq!(
        c(
            "echelon_tokens_total",
            &[("model", "obs-c"), ("type", "prompt")]
        ),
        240.0
    );
    assert_eq!(
        c(
            "echelon_tokens_total",
            &[("model", "obs-c"), ("type", "completion")]
        ),
        60.0
    );
    assert_eq!(m.matching("echelon_tokens_total", &[("model", "obs-b")]), 0);
    assert!((c("echelon_cost_usd_total", &[("model", "obs-c")]) - 0.003).abs() < 1e-12);

    // Fallbacks: one per pair of consecutive attempts on different models.
    let fb = |from: &str, to: &str, reason: &str| {
        c(
            "echelon_fallbacks_total",
            &[
                ("route", "obs"),
                ("from", from),
                ("to", to),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(fb("obs-a", "obs-b", "circuit_open"), 2.0);
    assert_eq!(fb("obs-b", "obs-c", "server_error"), 2.0);
    assert_eq!(
        m.matching(
            "echelon_fallbacks_total",
            &[("from", "obs-b"), ("to", "obs-b")]
        ),
        0
    );
    // The scrape sets the live depth of the gateway's ledger queue (no ledger here).
    assert_eq!(c("echelon_ledger_queue_depth", &[]), 0.0);

    // Types, and help text for every metric family shown.
    for (name, ty) in [
        ("echelon_requests_total", "counter"),
        ("echelon_fallback_requests_total", "counter"),
        ("echelon_attempts_total", "counter"),
        ("echelon_tokens_total", "counter"),
        ("echelon_fallbacks_total", "counter"),
        ("echelon_cost_usd_total", "gauge"),
        ("echelon_ledger_queue_depth", "gauge"),
        ("echelon_request_duration_seconds", "histogram"),
        ("echelon_attempt_duration_seconds", "histogram"),
        ("echelon_time_to_first_token_seconds", "histogram"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    for name in m.types.keys() {
        assert!(
            METRIC_NAMES.contains(&name.as_str()),
            "{name} not in METRIC_NAMES"
        );
        assert!(
            m.help.get(name).is_some_and(|h| !h.is_empty()),
            "no HELP for {name}"
        );
    }
    assert!(
        !text.contains("req-0123456789abcdef"),
        "a request id became a label"
    );

    // Counters move by exactly what is observed.
    observe(&failed);
    let (_, after) = h.scrape().await;
    assert_eq!(
        after.get(
            "echelon_requests_total",
            &[("route", "obs"), ("model", ""), ("status", "502")]
        ),
        Some(2.0)
    );
    assert_eq!(
        after.get(
            "echelon_requests_total",
            &[("route", "obs"), ("model", "obs-c"), ("status", "200")]
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn live_state_gauges_show_breakers_keys_and_never_a_key() {
    const SECRET: &str = "sk-live-SECRET-0b7e44d1c2";
    let yaml = format!(
        r#"
providers:
  brk-prov: {{ base_url: "{{u0}}", api_keys: ["{SECRET}"] }}
  good-prov: {{ base_url: "{{u1}}", api_keys: ["{SECRET}-2", "{SECRET}-3"] }}
models:
  brk-model: {{ provider: brk-prov, max_retries: 0, circuit_breaker: {{ failure_threshold: 1 }} }}
  good-model: {{ provider: good-prov, max_retries: 0 }}
"#
    );
    let h = Harness::start(2, &yaml).await;
    h.upstream(0).set_behavior(Behavior::status(500));

    let (_, m) = h.scrape().await;
    assert_eq!(
        m.get("echelon_breaker_state", &[("model", "brk-model")]),
        Some(0.0)
    );

    let resp = h.chat("brk-model").await;
    assert_eq!(resp.status(), 502);
    assert_eq!(h.chat("good-model").await.status(), 200);

    let state = h.admin_state().await;
    assert_eq!(state["models"]["brk-model"]["breaker"]["state"], "open");
    let (text, m) = h.scrape().await;
    assert_eq!(
        m.get("echelon_breaker_state", &[("model", "brk-model")]),
        Some(2.0)
    );
    assert_eq!(
        m.get("echelon_breaker_state", &[("model", "good-model")]),
        Some(0.0)
    );
    assert_eq!(
        m.get("echelon_model_in_flight", &[("model", "brk-model")]),
        Some(0.0)
    );

    // Keys: one state series per state, 1 for the current one; ids only.
    for model in ["brk-model", "good-model"] {
        let pool = state["models"][model]["key_pool"].as_str().unwrap();
        let keys = state["models"][model]["keys"].as_array().unwrap();
        assert!(!keys.is_empty());
        for k in keys {
            let id = k["id"].as_str().unwrap();
            for s in ["ok", "cooling_down", "disabled"] {
                let want = if k["state"] == s { 1.0 } else { 0.0 };
                assert_eq!(
                    m.get(
                        "echelon_key_state",
                        &[("key_pool", pool), ("key_id", id), ("state", s)]
                    ),
                    Some(want),
                    "{pool} {id} {s}"
                );
            }
            assert_eq!(
                m.get(
                    "echelon_key_in_flight",
                    &[("key_pool", pool), ("key_id", id)]
                ),
                Some(0.0)
            );
        }
    }
    // The router observes the requests it served.
    assert_eq!(
        m.get(
            "echelon_requests_total",
            &[("route", "brk-model"), ("model", ""), ("status", "502")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "echelon_attempts_total",
            &[
                ("model", "brk-model"),
                ("provider", "brk-prov"),
                ("kind", "server_error")
            ]
        ),
        Some(1.0)
    );
    assert!(!text.contains(SECRET), "an API key leaked into /metrics");
    assert!(
        !text.contains(GATEWAY_KEY),
        "the gateway key leaked into /metrics"
    );
    assert!(!text.contains("sk-"), "something key-like in /metrics");
}

#[tokio::test]
async fn pool_health_gauges_come_from_the_pools() {
    let yaml = r#"
providers:
  pp0: { base_url: "{u0}" }
  pp1: { base_url: "{u1}" }
models:
  pool-m0: { provider: pp0 }
  pool-m1: { provider: pp1 }
task_groups:
  pool-g:
    echelon1: { models: [pool-m0, pool-m1] }
polling_pools:
  gauge-pool: { task_groups: [pool-g] }
"#;
    let h = Harness::start(2, yaml).await;
    let (_, m) = h.scrape().await;
    assert_eq!(
        m.get("echelon_pool_healthy_instances", &[("pool", "gauge-pool")]),
        Some(2.0)
    );
    for model in ["pool-m0", "pool-m1"] {
        assert_eq!(
            m.get(
                "echelon_pool_instance_healthy",
                &[("pool", "gauge-pool"), ("model", model)]
            ),
            Some(1.0)
        );
    }
}
