//! Hot reload over a real socket against real local upstreams (the testkit): `POST
//! /admin/reload`, SIGHUP and the file watcher; a bad config refused with its
//! `file:line:col`; state kept for what did not change; a request in flight finishing on
//! its config; and a load run with reloads every second that loses no request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use echelon::Gateway;
use echelon::config::Config;
use echelon_server::{Reloader, ServerOptions};
use echelon_testkit::{TestUpstream, UpstreamOptions};
use secrecy::SecretString;
use serde_json::{Value, json};

const KEY: &str = "gw-test-key";

struct Served {
    addr: SocketAddr,
    reloader: Arc<Reloader>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
    http: reqwest::Client,
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn chat(&self, route: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": route, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
    }

    async fn reload(&self) -> (u16, Value) {
        let r = self
            .http
            .post(self.url("/admin/reload"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn state(&self) -> Value {
        self.http
            .get(self.url("/admin/state"))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// Writes `text` to `path` atomically (a temporary file renamed over it), as an editor
/// or a deploy tool would, so a reader never sees half a file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn serve(path: &Path) -> Served {
    let config = Config::load(path).unwrap();
    let gateway = Arc::new(Gateway::from_config(&config).unwrap());
    gateway.start().unwrap();
    let reloader = Arc::new(Reloader::new(gateway, path, config));
    let options = ServerOptions {
        api_keys: vec![SecretString::from(KEY)],
        ..ServerOptions::default()
    };
    let app = echelon_server::router_with_reloader(reloader.clone(), &options);
    let listener = echelon_server::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        echelon_server::serve(listener, app, &options, async {
            let _ = rx.await;
        })
        .await
    });
    Served {
        addr,
        reloader,
        _shutdown: tx,
        http: reqwest::Client::new(),
    }
}

async fn upstream(alias: &str) -> TestUpstream {
    TestUpstream::start_with(UpstreamOptions {
        model_alias: alias.into(),
        record_requests: false,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A config over upstreams `a` and `b` and a dead one (`dead`, breaker opens at the first
/// failure and stays open 10 minutes); `extra` is spliced in as more YAML.
fn config(a: &str, b: &str, b_rpm: u32, extra_models: &str, extra_groups: &str) -> String {
    format!(
        r#"
providers:
  pa: {{ base_url: "{a}", api_keys: ["sk-upstream-a"] }}
  pb: {{ base_url: "{b}" }}
  pdead: {{ base_url: "http://127.0.0.1:9/v1" }}
models:
  a: {{ provider: pa, max_retries: 0 }}
  b: {{ provider: pb, max_retries: 0, rpm_limit: {b_rpm} }}
  dead: {{ provider: pdead, max_retries: 0, connect_timeout: 1, circuit_breaker: {{ failure_threshold: 1, recovery_time: 600 }} }}
{extra_models}
task_groups:
  g: {{ echelon1: {{ models: [dead] }}, echelon2: {{ models: [a] }} }}
{extra_groups}
"#
    )
}

fn model<'a>(state: &'a Value, id: &str) -> &'a Value {
    &state["models"][id]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_admin_reload_swaps_the_config_and_keeps_the_state_of_what_stayed() {
    let (ua, ub) = (upstream("ua").await, upstream("ub").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    let v1 = config(
        &ua.base_url(),
        &ub.base_url(),
        60,
        "  c: { provider: pb }",
        "",
    );
    write_config(&path, &v1);
    let s = serve(&path).await;

    // The group fails over from the dead model (its breaker opens) to `a`.
    let r = s.chat("g").await;
    assert_eq!(r.status(), 200);
    // 30 of b's 60 requests a minute spent.
    for _ in 0..30 {
        assert_eq!(s.chat("b").await.status(), 200);
    }
    let before = s.state().await;
    assert_eq!(model(&before, "dead")["breaker"]["state"], "open");
    let level = model(&before, "b")["buckets"][0]["available"]
        .as_f64()
        .unwrap();
    assert!(level < 32.0, "{level}");

    // Without a key: 401 with a Basic challenge (the browser's login prompt).
    let anon = s.http.post(s.url("/admin/reload")).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert!(
        anon.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );

    // v2: d added, c removed, b's limit doubled, a new route.
    let v2 = config(
        &ua.base_url(),
        &ub.base_url(),
        120,
        "  d: { provider: pa }",
        "  h: { echelon1: { models: [d] } }",
    );
    write_config(&path, &v2);
    let (status, body) = s.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"], "ok");
    assert_eq!(body["trigger"], "endpoint");
    let diff = &body["diff"];
    assert_eq!(diff["models"]["added"], json!(["d"]));
    assert_eq!(diff["models"]["removed"], json!(["c"]));
    assert_eq!(diff["models"]["changed"], json!(["b"]));
    assert_eq!(diff["routes"]["added"], json!(["h"]));
    let fate = |unit: &str| {
        diff["state"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["unit"] == unit)
            .map(|n| n["fate"].clone())
    };
    assert_eq!(fate("model dead"), Some(json!("kept")));
    assert_eq!(fate("model b rpm_limit"), Some(json!("rescaled")));
    assert_eq!(fate("keys of provider pa"), Some(json!("kept")));
    assert!(!body.to_string().contains("sk-upstream"), "never a key");

    let after = s.state().await;
    assert_eq!(model(&after, "dead")["breaker"]["state"], "open", "kept");
    let b = &model(&after, "b")["buckets"][0];
    assert_eq!(b["capacity"], 120.0);
    let rescaled = b["available"].as_f64().unwrap();
    // The same fraction of twice the capacity (plus a little refill), not a full bucket.
    assert!(
        (rescaled - 2.0 * level).abs() < 4.0,
        "{level} of 60 → {rescaled} of 120"
    );
    assert!(after["models"].get("c").is_none());
    assert_eq!(s.chat("h").await.status(), 200, "the new route serves");
    assert_eq!(s.chat("c").await.status(), 404, "the removed model is gone");

    // The status the admin page shows.
    let st: Value = s
        .http
        .get(s.url("/admin/reload"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["reloads_ok"], 1);
    assert_eq!(st["last"]["result"], "ok");
    assert!(st["source"].as_str().unwrap().ends_with("echelon.yaml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_with_its_position_and_the_old_one_keeps_serving() {
    let (ua, ub) = (upstream("ua").await, upstream("ub").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    let good = config(&ua.base_url(), &ub.base_url(), 60, "", "");
    write_config(&path, &good);
    let s = serve(&path).await;
    let topology = s.reloader.gateway().topology();

    // An unknown key on line 3 of the file.
    let bad = good.replacen(
        "providers:\n",
        "providers:\n  pz: { base_url: \"http://x\", colour: red }\n",
        1,
    );
    write_config(&path, &bad);
    let (status, body) = s.reload().await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let errors = body["reload"]["errors"].as_array().unwrap();
    let first = errors[0].as_str().unwrap();
    assert!(first.contains("cfg.yaml:3:"), "file:line:col: {first}");
    assert!(first.contains("colour"), "{first}");
    assert!(
        Arc::ptr_eq(&topology, &s.reloader.gateway().topology()),
        "the old topology keeps serving"
    );
    assert_eq!(s.chat("a").await.status(), 200);

    // A config that loads but references nothing it knows is refused too.
    write_config(&path, "models: { m: { provider: nowhere } }\n");
    let (status, body) = s.reload().await;
    assert_eq!(status, 422, "{body}");

    let metrics = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("echelon_config_reloads_total{result=\"error\"}"))
        .unwrap_or_else(|| panic!("no reload counter in\n{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 2.0, "{line}");
    assert_eq!(s.reloader.status().reloads_failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    let slow = TestUpstream::start_with(UpstreamOptions {
        latency: Duration::from_millis(800),
        ..Default::default()
    })
    .await
    .unwrap();
    let ub = upstream("ub").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    write_config(&path, &config(&slow.base_url(), &ub.base_url(), 60, "", ""));
    let s = Arc::new(serve(&path).await);
    let in_flight = tokio::spawn({
        let s = s.clone();
        async move { s.chat("a").await.status() }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // `a` is gone from the new config.
    let without_a = format!(
        r#"
providers:
  pb: {{ base_url: "{}" }}
models:
  b: {{ provider: pb }}
"#,
        ub.base_url()
    );
    write_config(&path, &without_a);
    let (status, body) = s.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        s.chat("a").await.status(),
        404,
        "new requests see the new config"
    );
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the old one finished on its own"
    );
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let (ua, ub) = (upstream("ua").await, upstream("ub").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    write_config(&path, &config(&ua.base_url(), &ub.base_url(), 60, "", ""));
    let s = serve(&path).await;
    s.reloader.spawn_sighup().unwrap();
    write_config(
        &path,
        &config(
            &ua.base_url(),
            &ub.base_url(),
            60,
            "  d: { provider: pa }",
            "",
        ),
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.reloader.status().reloads_ok == 0 {
        assert!(Instant::now() < deadline, "no reload after SIGHUP");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = s.reloader.status().last.unwrap();
    assert_eq!(serde_json::to_value(last.trigger).unwrap(), "signal");
    assert_eq!(s.chat("d").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_config_reloads_once_after_the_file_settles() {
    let (ua, ub) = (upstream("ua").await, upstream("ub").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    write_config(&path, &config(&ua.base_url(), &ub.base_url(), 60, "", ""));
    let s = serve(&path).await;
    let _watch = s.reloader.spawn_watch(Duration::from_millis(300)).unwrap();
    assert!(s.reloader.status().watching);
    // Three saves in quick succession: one reload, of the last.
    for extra in [
        "  d: { provider: pa }",
        "  e: { provider: pa }",
        "  f: { provider: pa }",
    ] {
        write_config(
            &path,
            &config(&ua.base_url(), &ub.base_url(), 60, extra, ""),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.reloader.status().reloads_ok == 0 {
        assert!(
            Instant::now() < deadline,
            "no reload after the file changed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let st = s.reloader.status();
    assert_eq!(st.reloads_ok, 1, "debounced into one reload");
    assert_eq!(
        serde_json::to_value(st.last.unwrap().trigger).unwrap(),
        "watch"
    );
    assert_eq!(s.chat("f").await.status(), 200);
    assert_eq!(s.chat("d").await.status(), 404);
}

/// The load run: 32 clients for `ECHELON_RELOAD_LOAD_SECS` seconds (default 5; the
/// issue's figure is ≥ 20, run with `ECHELON_RELOAD_LOAD_SECS=20`) while the config is
/// reloaded every second, alternating two configs (route `g` served by upstream X in one
/// and Y in the other, a model added and removed). No request may fail; the dead
/// model's open breaker and the metered model's bucket level survive every reload; once
/// the last reload has drained, the model it removed serves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_a_reload_every_second_loses_no_request_and_no_state() {
    let secs: u64 = std::env::var("ECHELON_RELOAD_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let (ux, uy, um) = (
        upstream("x").await,
        upstream("y").await,
        upstream("m").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echelon.yaml");
    let variant = |which: &str| {
        let (member, extra) = if which == "A" {
            ("x", "")
        } else {
            ("y", "  spare: { provider: px }\n")
        };
        format!(
            r#"
providers:
  px: {{ base_url: "{x}" }}
  py: {{ base_url: "{y}" }}
  pm: {{ base_url: "{m}" }}
  pdead: {{ base_url: "http://127.0.0.1:9/v1" }}
models:
  x: {{ provider: px, max_retries: 0 }}
  y: {{ provider: py, max_retries: 0 }}
  metered: {{ provider: pm, rpm_limit: 60 }}
  dead: {{ provider: pdead, max_retries: 0, connect_timeout: 1, circuit_breaker: {{ failure_threshold: 1, recovery_time: 600 }} }}
{extra}
task_groups:
  g: {{ echelon1: {{ models: [dead] }}, echelon2: {{ models: [{member}] }} }}
"#,
            x = ux.base_url(),
            y = uy.base_url(),
            m = um.base_url()
        )
    };
    write_config(&path, &variant("A"));
    let s = Arc::new(serve(&path).await);
    assert_eq!(
        s.chat("g").await.status(),
        200,
        "opens the dead model's breaker"
    );
    for _ in 0..30 {
        assert_eq!(s.chat("metered").await.status(), 200);
    }
    let start_level = model(&s.state().await, "metered")["buckets"][0]["available"]
        .as_f64()
        .unwrap();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut clients = Vec::new();
    for i in 0..32 {
        let (s, ok, failed) = (s.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let stream = (i + n).is_multiple_of(4);
                let r = s
                    .http
                    .post(s.url("/v1/chat/completions"))
                    .bearer_auth(KEY)
                    .json(&json!({"model": "g", "stream": stream,
                        "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await;
                let good = match r {
                    Ok(r) if r.status() == 200 => match r.text().await {
                        Ok(body) => !stream || body.contains("data: [DONE]"),
                        Err(_) => false,
                    },
                    _ => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut reloads = 0;
    let mut slowest_ms = 0;
    let mut which = "B";
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    every_second.tick().await;
    while Instant::now() + Duration::from_millis(1000) < deadline {
        every_second.tick().await;
        write_config(&path, &variant(which));
        let (status, body) = s.reload().await;
        assert_eq!(status, 200, "{body}");
        slowest_ms = slowest_ms.max(body["took_ms"].as_u64().unwrap());
        reloads += 1;
        let st = s.state().await;
        assert_eq!(
            model(&st, "dead")["breaker"]["state"],
            "open",
            "the breaker survives reload {reloads}"
        );
        which = if which == "A" { "B" } else { "A" };
    }
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "reload load run: {secs} s, 32 clients, {reloads} reloads (slowest {slowest_ms} ms), \
         {ok} ok, {failed} failed ({:.0} req/s)",
        ok as f64 / secs as f64
    );
    assert_eq!(failed, 0, "no request fails across {reloads} reloads");
    assert!(reloads + 2 >= secs, "{reloads} reloads in {secs} s");

    let st = s.state().await;
    let level = model(&st, "metered")["buckets"][0]["available"]
        .as_f64()
        .unwrap();
    // Refilled at 1 token/s since, never back to full by a reload.
    let elapsed = secs as f64 + 2.0;
    assert!(
        level <= start_level + elapsed + 1.0 && level < 60.0,
        "metered bucket {start_level} → {level} after {secs} s"
    );

    // End on variant A (route g → x): after the drain, y serves nothing more.
    write_config(&path, &variant("A"));
    assert_eq!(s.reload().await.0, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let y_before = uy.chat_requests();
    for _ in 0..20 {
        assert_eq!(s.chat("g").await.status(), 200);
    }
    assert_eq!(
        uy.chat_requests(),
        y_before,
        "the removed member serves nothing"
    );
}
