//! Shared state on Redis (issue 15): several gateways (replicas) on one `redis-server`
//! share one set of limits, key cooldowns and breakers; Redis going away never hangs a
//! request, and shared mode resumes when it is back.
//!
//! Each test starts its own `redis-server` on a free port (Debian's `redis-server`,
//! installed by `.ci/run`) and stops it. Without `redis-server` a test is skipped with a
//! note, unless `ECHELON_REQUIRE_REAL_UPSTREAM=1` (CI), where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use echelon::Gateway;
use echelon::config::{Config, StateConfig};
use echelon::state::{MemoryRegistry, RedisState, StateId, StateRegistry, Unit};
use echelon_testkit::{Behavior, TestUpstream};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};
use serde_json::Value;

/// A `redis-server` of this test, killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts one on a free port; `None` (skip) when `redis-server` is not installed and
    /// CI does not require it.
    fn start() -> Option<Redis> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                std::env::var("ECHELON_REQUIRE_REAL_UPSTREAM").as_deref() != Ok("1"),
                "redis-server is not installed (apt-get install redis-server; .ci/run does) \
                 and ECHELON_REQUIRE_REAL_UPSTREAM=1"
            );
            eprintln!("skipped: redis-server is not installed");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut r = Redis { child: None, port };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts it (again) on its port and waits until it answers.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Kills it (SIGKILL) and waits for it to be gone.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a Redis answers `PING` on `port`.
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

/// The `state:` section on `redis`; `timeout_ms` 200 unless `extra` sets it.
fn state_yaml(redis: &Redis, extra: &str) -> String {
    let timeout = if extra.contains("timeout_ms") {
        ""
    } else {
        "timeout_ms: 200, "
    };
    format!(
        "state: {{ backend: redis, url: \"{}\", key_prefix: \"t:\", {timeout}{extra} }}\n",
        redis.url()
    )
}

/// A config of one model on an unreachable provider, with `state:` on `redis` (`extra`
/// added to the section): for tests that drive the state units themselves.
fn one_model_config(redis: &Redis, extra: &str) -> Config {
    Config::from_str(
        &format!(
            "{}models: {{ m: {{ provider: p }} }}\nproviders: {{ p: {{ base_url: \"http://127.0.0.1:1\" }} }}\n",
            state_yaml(redis, extra)
        ),
        "t.yaml",
    )
    .unwrap()
}

/// `replicas` gateways on one Redis: group `grp` = echelon1 model `a` (settings
/// `a_extra`, provider settings `pa_extra`) on `a`, echelon2 model `b` on `b`.
fn replicas(
    n: usize,
    redis: &Redis,
    state_extra: &str,
    a: &TestUpstream,
    b: &TestUpstream,
    pa_extra: &str,
    a_extra: &str,
) -> Vec<Arc<Gateway>> {
    let yaml = format!(
        r#"{}
providers:
  pa: {{ base_url: "{}", {pa_extra} }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0, queue_timeout: 0, {a_extra} }}
  b: {{ provider: pb, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        state_yaml(redis, state_extra),
        a.base_url(),
        b.base_url()
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    (0..n)
        .map(|_| Arc::new(Gateway::from_config(&config).unwrap()))
        .collect()
}

async fn pair() -> (TestUpstream, TestUpstream) {
    (
        TestUpstream::start().await.unwrap(),
        TestUpstream::start().await.unwrap(),
    )
}

fn admin(gw: &Gateway) -> Value {
    serde_json::to_value(gw.admin_state()).unwrap()
}

#[test]
fn the_state_section_is_validated_at_load() {
    let base =
        "models: { m: { provider: p } }\nproviders: { p: { base_url: \"http://127.0.0.1:1\" } }\n";
    let c = Config::from_str(base, "t.yaml").unwrap();
    assert_eq!(c.state, StateConfig::default(), "memory is the default");
    let e = Config::from_str(&format!("{base}state: {{ backend: redsi }}\n"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("redis"), "did you mean: {e}");
    let e = Config::from_str(&format!("{base}state: {{ lease_tll: 5 }}\n"), "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `lease_ttl`"), "{e}");
    let e = Config::from_str(
        &format!("{base}state: {{ backend: redis, url: \"http://x:6379\" }}\n"),
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a Redis URL"), "{e}");
    let e = Config::from_str(
        &format!("{base}state: {{ on_unavailable: rejct, replicas: 0 }}\n"),
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("reject") && e.contains("replicas"), "{e}");
    let env = |name: &str| (name == "REDIS_URL").then(|| "redis://10.0.0.9:6380/2".to_owned());
    let c = Config::from_str_with_env(
        &format!(
            "{base}state: {{ backend: redis, url: \"${{REDIS_URL}}\", lease_ttl: 3, \
             on_unavailable: reject, replicas: 3 }}\n"
        ),
        "t.yaml",
        &env,
    )
    .unwrap();
    assert_eq!(c.state.url, "redis://10.0.0.9:6380/2");
    assert_eq!(c.state.lease_ttl, Duration::from_secs(3));
    assert_eq!(c.state.replicas, 3);
    assert_eq!(
        c.state.on_unavailable,
        echelon::config::OnUnavailable::Reject
    );
}

/// `rediss://` (TLS through rustls) is accepted at load, and a gateway is built on it
/// (nothing connects before the first request, so no TLS server is needed).
#[test]
fn a_rediss_url_loads_and_builds_a_gateway() {
    let base =
        "models: { m: { provider: p } }\nproviders: { p: { base_url: \"http://127.0.0.1:1\" } }\n";
    let c = Config::from_str(
        &format!(
            "{base}state: {{ backend: redis, url: \"rediss://user:pw@redis.example.com:6380/1\" }}\n"
        ),
        "t.yaml",
    )
    .unwrap();
    assert_eq!(c.state.url, "rediss://user:pw@redis.example.com:6380/1");
    let gw = Gateway::from_config(&c).unwrap();
    assert!(gw.registry().shared_state().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_rpm_limit() {
    // 120 requests of burst, 2 per second; each replica alone would allow all of it.
    rpm_accuracy(120, Duration::from_secs(4), false).await;
}

/// The issue's accuracy run: `rpm_limit: 600` for 20 s. Opt-in (CI stays short):
/// `cargo test -p echelon --test redis_state -- --ignored for_20_s --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 20 s run; the 4 s one runs in CI"]
async fn three_replicas_share_one_rpm_limit_for_20_s() {
    rpm_accuracy(600, Duration::from_secs(20), true).await;
}

/// Three replicas, twelve clients on `rpm_limit: rpm` for `run` (as fast as they can,
/// or `paced` at 3× the limit's allowance over the run, 3.3× to be sure of it): the
/// upstream admits at most the allowance (rate × time + capacity) + 1%.
async fn rpm_accuracy(rpm: u32, run: Duration, paced: bool) {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    // A generous timeout: this test is about accuracy in shared mode, and twelve busy
    // clients on two cores can delay polling Redis's answer past 200 ms.
    let gws = replicas(
        3,
        &redis,
        "timeout_ms: 5000",
        &a,
        &b,
        "",
        &format!("rpm_limit: {rpm}"),
    );
    let allowance = f64::from(rpm) * (1.0 + run.as_secs_f64() / 60.0);
    // Each of the 12 clients sends one request per `every`.
    let every =
        paced.then(|| Duration::from_secs_f64(run.as_secs_f64() * 12.0 / (3.3 * allowance)));
    let started = Instant::now();
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..4 {
            let gw = gw.clone();
            clients.push(tokio::spawn(async move {
                let mut n = 0u32;
                while started.elapsed() < run {
                    if let Some(every) = every {
                        tokio::time::sleep_until((started + every * n).into()).await;
                    }
                    gw.chat(request("grp")).await.unwrap();
                    n += 1;
                }
                n
            }));
        }
    }
    let mut sent = 0;
    for c in clients {
        sent += c.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let admitted = a.chat_requests() as f64;
    let allowance = f64::from(rpm) + f64::from(rpm) / 60.0 * secs;
    eprintln!(
        "rpm_limit {rpm} (paced: {paced}): sent {sent}, upstream a admitted {admitted} in {secs:.2} s \
         (allowance {allowance:.1}, {:+.2}% of it)",
        (admitted / allowance - 1.0) * 100.0
    );
    assert!(
        f64::from(sent) >= 3.0 * allowance,
        "the load was not at 3× the limit: {sent}"
    );
    assert!(
        admitted <= allowance * 1.01,
        "three replicas admitted {admitted}, more than the one limit's {allowance:.1} + 1%"
    );
    assert!(
        admitted >= f64::from(rpm),
        "the limit's burst was used: {admitted}"
    );
    for gw in &gws {
        assert_eq!(admin(gw)["state"]["mode"], "shared", "no replica fell back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_tpm_limit_settled_with_the_real_usage() {
    // The burst is 600 tokens, 10 per second.
    tpm_accuracy(600, Duration::from_secs(3)).await;
}

/// The TPM variant of the issue's accuracy run: `tpm_limit: 6000` for 20 s. Opt-in:
/// `cargo test -p echelon --test redis_state -- --ignored for_20_s --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 20 s run; the 3 s one runs in CI"]
async fn three_replicas_share_one_tpm_limit_for_20_s() {
    tpm_accuracy(6000, Duration::from_secs(20)).await;
}

/// Three replicas, nine clients on `tpm_limit: tpm` for `run`: the tokens the upstream
/// reports used stay within the allowance + 1%.
async fn tpm_accuracy(tpm: u32, run: Duration) {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    // Each call reserves prompt + max_tokens (16) and is settled with the testkit's
    // real usage (5 tokens).
    let gws = replicas(
        3,
        &redis,
        "timeout_ms: 5000",
        &a,
        &b,
        "",
        &format!("tpm_limit: {tpm}"),
    );
    let started = Instant::now();
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..3 {
            let gw = gw.clone();
            clients.push(tokio::spawn(async move {
                let (mut used, mut refused) = (0u64, 0u32);
                while started.elapsed() < run {
                    let mut req = request("grp");
                    req.max_tokens = Some(16);
                    let r = gw.chat(req).await.unwrap();
                    if r.model == "a" {
                        used += r.response.usage.as_ref().map_or(0, |u| u.total_tokens);
                    } else {
                        refused += 1;
                    }
                }
                (used, refused)
            }));
        }
    }
    let (mut used, mut refused) = (0u64, 0u32);
    for c in clients {
        let (u, r) = c.await.unwrap();
        used += u;
        refused += r;
    }
    let secs = started.elapsed().as_secs_f64();
    let allowance = f64::from(tpm) + f64::from(tpm) / 60.0 * secs;
    eprintln!(
        "tpm_limit {tpm}: tokens used at a: {used} in {secs:.2} s (allowance {allowance:.1}, \
         {:+.2}% of it; {refused} calls refused to b)",
        (used as f64 / allowance - 1.0) * 100.0
    );
    // Every reservation covers its call's usage, so settling never overdraws.
    assert!(
        (used as f64) <= allowance * 1.01,
        "three replicas used {used} tokens, more than the one limit's {allowance:.0}"
    );
    assert!(
        used as f64 >= f64::from(tpm) * 0.75,
        "the limit was used: {used}"
    );
    assert!(refused > 0, "the load went past the limit");
    for gw in &gws {
        assert_eq!(admin(gw)["state"]["mode"], "shared", "no replica fell back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cooled_on_one_replica_is_not_used_by_another() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    let gws = replicas(2, &redis, "", &a, &b, r#"api_keys: ["k1", "k2"]"#, "");
    a.push_behavior(Behavior::Status {
        status: 429,
        retry_after: Some(30),
        message: "slow down".to_owned(),
    });
    gws[0].chat(request("grp")).await.unwrap();
    let cooled = a.recorded()[0].authorization.clone().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..6 {
        let r = gws[1].chat(request("grp")).await.unwrap();
        assert_eq!(r.model, "a", "the other key serves");
    }
    let later: Vec<_> = a.recorded()[1..]
        .iter()
        .map(|r| r.authorization.clone().unwrap())
        .collect();
    assert_eq!(later.len(), 6);
    assert!(
        later.iter().all(|k| *k != cooled),
        "replica B used {cooled} while A had cooled it: {later:?}"
    );
    let keys = &admin(&gws[1])["models"]["a"]["keys"];
    assert!(
        keys.to_string().contains("cooling"),
        "B shows the cooldown: {keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opened_on_one_replica_rejects_on_the_others_and_probes_fleet_wide() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    let gws = replicas(
        3,
        &redis,
        "",
        &a,
        &b,
        "",
        "circuit_breaker: { failure_threshold: 2, recovery_time: 1, half_open_requests: 2 }",
    );
    a.set_behavior(Behavior::Status {
        status: 500,
        retry_after: None,
        message: "down".to_owned(),
    });
    for _ in 0..2 {
        let r = gws[0].chat(request("grp")).await.unwrap();
        assert_eq!(r.model, "b");
    }
    assert_eq!(a.chat_requests(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for gw in &gws[1..] {
        let r = gw.chat(request("grp")).await.unwrap();
        assert_eq!(r.model, "b", "the breaker A opened rejects on the others");
    }
    assert_eq!(
        a.chat_requests(),
        2,
        "no other replica re-discovered the outage"
    );
    let breaker = &admin(&gws[2])["models"]["a"]["breaker"];
    assert_eq!(breaker["state"], "open", "/admin/state on C: {breaker}");
    // After recovery_time: twelve requests at once over the three replicas, while each
    // probe takes 300 ms: exactly half_open_requests (2) reach a.
    a.set_behavior(Behavior::Delay(Duration::from_millis(300)));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut all = Vec::new();
    for i in 0..12 {
        let gw = gws[i % 3].clone();
        all.push(tokio::spawn(async move {
            gw.chat(request("grp")).await.unwrap()
        }));
    }
    let mut on_a = 0;
    for t in all {
        if t.await.unwrap().model == "a" {
            on_a += 1;
        }
    }
    assert_eq!(a.chat_requests() - 2, 2, "exactly two probes fleet-wide");
    assert_eq!(on_a, 2);
    // The probes succeeded: closed for everyone.
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.set_behavior(Behavior::Normal);
    assert_eq!(gws[2].chat(request("grp")).await.unwrap().model, "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_leases_come_back_within_the_ttl_and_live_ones_are_renewed() {
    let Some(redis) = Redis::start() else { return };
    let config = one_model_config(&redis, "lease_ttl: 1");
    let id = StateId::Route {
        label: "g.echelon1".to_owned(),
        unit: Unit::Concurrency,
    };
    // Replica A holds both slots, in a runtime of its own that then dies (no release, no
    // renewal: what `kill -9` leaves behind).
    let (cfg, id2) = (config.state.clone(), id.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let a = MemoryRegistry::with_redis(RedisState::new(&cfg).unwrap());
            let limit = a.concurrency(&id2, 2);
            for _ in 0..2 {
                let slot = limit.lease(Duration::ZERO).await.unwrap().unwrap();
                assert!(matches!(
                    slot,
                    echelon::resilience::concurrency::Slot::Shared(_)
                ));
                std::mem::forget(slot);
            }
        });
        drop(rt);
    })
    .join()
    .unwrap();
    let b = MemoryRegistry::with_redis(RedisState::new(&config.state).unwrap());
    let limit = b.concurrency(&id, 2);
    let died = Instant::now();
    assert!(
        limit.lease(Duration::ZERO).await.unwrap().is_err(),
        "the dead replica's leases still count"
    );
    let slot = limit.lease(Duration::from_secs(3)).await.unwrap().unwrap();
    let back = died.elapsed();
    assert!(back <= Duration::from_millis(1300), "freed after {back:?}");
    // A live lease is renewed: held for three TTLs, it still counts.
    let second = limit.lease(Duration::ZERO).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        limit.lease(Duration::ZERO).await.unwrap().is_err(),
        "renewed leases hold"
    );
    drop((slot, second));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        limit.lease(Duration::ZERO).await.unwrap().is_ok(),
        "released on drop"
    );
}

/// Requests at `gw` for `secs`, each timed; returns (answered, failed, slowest).
async fn load(gws: &[Arc<Gateway>], run: Duration) -> (usize, Vec<String>, Duration) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for gw in gws {
        for _ in 0..2 {
            let gw = gw.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
                while started.elapsed() < run {
                    let t = Instant::now();
                    match gw.chat(request("grp")).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(format!("{} {}", e.status(), e.message())),
                    }
                    slowest = slowest.max(t.elapsed());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                (ok, failed, slowest)
            }));
        }
    }
    let (mut ok, mut failed, mut slowest) = (0, Vec::new(), Duration::ZERO);
    for t in tasks {
        let (o, f, s) = t.await.unwrap();
        ok += o;
        failed.extend(f);
        slowest = slowest.max(s);
    }
    (ok, failed, slowest)
}

async fn wait_for_mode(gw: &Gateway, mode: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if admin(gw)["state"]["mode"] == mode {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_falls_back_locally_without_hanging_and_shared_mode_resumes() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let (a, b) = pair().await;
    let gws = replicas(
        2,
        &redis,
        "on_unavailable: local, replicas: 2",
        &a,
        &b,
        "",
        "rpm_limit: 100000, concurrency_limit: 50",
    );
    let (ok, failed, _) = load(&gws, Duration::from_millis(500)).await;
    assert!(ok > 0 && failed.is_empty(), "{failed:?}");
    assert_eq!(admin(&gws[0])["state"]["mode"], "shared");
    let stop = Arc::new(AtomicBool::new(false));
    redis.stop();
    let (ok, failed, slowest) = load(&gws, Duration::from_millis(1500)).await;
    assert!(
        ok > 0 && failed.is_empty(),
        "local fallback serves: {failed:?}"
    );
    // timeout_ms (200) + the request's own time, with room for a loaded machine.
    assert!(
        slowest < Duration::from_millis(1000),
        "a request hung for {slowest:?}"
    );
    assert_eq!(admin(&gws[0])["state"]["mode"], "local");
    assert_eq!(admin(&gws[0])["state"]["up"], false);
    stop.store(true, Ordering::Relaxed);
    redis.restart();
    for gw in &gws {
        // The reconnect task backs off to at most 5 s; a request also nudges it.
        assert!(
            wait_for_mode(gw, "shared", Duration::from_secs(8)).await,
            "shared mode resumed without a restart"
        );
    }
    let (ok, failed, _) = load(&gws, Duration::from_millis(300)).await;
    assert!(ok > 0 && failed.is_empty(), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_on_unavailable_reject_answers_503_naming_the_state_backend() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let (a, b) = pair().await;
    // Only model a, so that nothing else can answer.
    let yaml = format!(
        "{}providers: {{ pa: {{ base_url: \"{}\" }} }}\nmodels: {{ a: {{ provider: pa, max_retries: 0, rpm_limit: 1000 }} }}\n",
        state_yaml(&redis, "on_unavailable: reject"),
        a.base_url()
    );
    drop(b);
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    gw.chat(request("a")).await.unwrap();
    redis.stop();
    let t = Instant::now();
    let e = gw.chat(request("a")).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(e.status(), 503, "{}", e.message());
    let body = serde_json::to_string(&e.to_body()).unwrap();
    assert!(body.contains("state backend redis unavailable"), "{body}");
    assert_eq!(admin(&gw)["state"]["mode"], "reject");
    redis.restart();
    assert!(wait_for_mode(&gw, "shared", Duration::from_secs(8)).await);
    gw.chat(request("a")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_session_stays_on_its_instance_whichever_replica_gets_the_turn() {
    let Some(redis) = Redis::start() else { return };
    let mut ups = Vec::new();
    for _ in 0..3 {
        ups.push(TestUpstream::start().await.unwrap());
    }
    let mut yaml = state_yaml(&redis, "");
    yaml.push_str("providers:\n");
    for (i, u) in ups.iter().enumerate() {
        yaml.push_str(&format!("  p{i}: {{ base_url: \"{}\" }}\n", u.base_url()));
    }
    yaml.push_str("models:\n");
    for i in 0..ups.len() {
        yaml.push_str(&format!("  m{i}: {{ provider: p{i}, max_retries: 0 }}\n"));
    }
    yaml.push_str(
        "task_groups:\n  g:\n    echelon1: { models: [m0, m1, m2] }\n\
         polling_pools:\n  pool: { task_groups: [g], rotation_strategy: round_robin }\n",
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let (a, b) = (
        Gateway::from_config(&config).unwrap(),
        Gateway::from_config(&config).unwrap(),
    );
    let session = echelon::CallOptions {
        session_id: Some("conv-1".into()),
        ..echelon::CallOptions::default()
    };
    // A's rotation has moved on: its pick for the session is not what B's rotation,
    // starting fresh, would pick first.
    let unsessioned = a.chat(request("pool")).await.unwrap().model;
    let first = a.chat_with(request("pool"), &session).await.unwrap().model;
    assert_ne!(first, unsessioned);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for turn in 0..6 {
        let gw = if turn % 2 == 0 { &b } else { &a };
        let m = gw.chat_with(request("pool"), &session).await.unwrap().model;
        assert_eq!(
            m,
            first,
            "turn {turn} on replica {}",
            if turn % 2 == 0 { "B" } else { "A" }
        );
    }
}

/// `EVALSHA` + `EVAL` calls Redis has answered so far (`INFO commandstats`).
fn script_calls(port: u16) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    s.write_all(b"INFO commandstats\r\n").unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 8192];
    // A bulk reply `$<len>\r\n<body>\r\n`: read until the body is complete.
    loop {
        let n = s.read(&mut buf).unwrap();
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some((head, body)) = text.split_once("\r\n")
            && let Ok(len) = head.trim_start_matches('$').parse::<usize>()
            && body.len() >= len
        {
            break;
        }
        assert!(n > 0, "redis closed the connection");
    }
    text.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidates_admission_is_one_round_trip() {
    let Some(redis) = Redis::start() else { return };
    let a = TestUpstream::start().await.unwrap();
    // Every admission step a candidate can have: the breaker, the echelon's rpm_limit
    // and concurrency_limit, the model's rpm_limit, tpm_limit and concurrency_limit,
    // and a key pool.
    let yaml = format!(
        r#"{}
providers:
  pa: {{ base_url: "{}", api_keys: ["k1", "k2"] }}
models:
  a: {{ provider: pa, max_retries: 0, rpm_limit: 1000, tpm_limit: 100000, concurrency_limit: 10 }}
task_groups:
  grp: {{ echelon1: {{ models: [a], rpm_limit: 1000, concurrency_limit: 10 }} }}
"#,
        state_yaml(&redis, ""),
        a.base_url()
    );
    let gw = Arc::new(Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap());
    // The first request loads the scripts (NOSCRIPT, then EVAL).
    gw.chat(request("grp")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.set_behavior(Behavior::Delay(Duration::from_millis(600)));
    let (mut admission, mut total) = (0, 0);
    let n = 3;
    for _ in 0..n {
        let before = script_calls(redis.port);
        let gw2 = gw.clone();
        let call = tokio::spawn(async move { gw2.chat(request("grp")).await.unwrap() });
        // Mid-call: admitted, not yet settled.
        tokio::time::sleep(Duration::from_millis(300)).await;
        admission += script_calls(redis.port) - before;
        assert_eq!(call.await.unwrap().model, "a");
        tokio::time::sleep(Duration::from_millis(300)).await;
        total += script_calls(redis.port) - before;
    }
    let (admission, total) = (admission / n, total / n);
    eprintln!("script calls per request: {admission} to admit, {total} in all");
    assert_eq!(admission, 1, "one round trip admits the candidate");
    // Settling (in the background, one call each): the breaker's record, the TPM
    // settlement, two concurrency leases and the key's fleet-wide in-flight lease
    // released. Before: 7 calls to admit and 11 in all.
    assert!(total <= 6, "{total} script calls per request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_refused_by_a_later_step_keeps_nothing_of_the_earlier_ones() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    let gws = replicas(
        2,
        &redis,
        "",
        &a,
        &b,
        "",
        "rpm_limit: 5, concurrency_limit: 1",
    );
    // Replica A holds the one fleet-wide slot for 800 ms.
    a.push_behavior(Behavior::Delay(Duration::from_millis(800)));
    let gw = gws[0].clone();
    let held = tokio::spawn(async move { gw.chat(request("grp")).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Ten candidates on B pass the breaker and the rpm_limit, then find the slot taken:
    // each is refused whole, its rpm token given back in the same script.
    for _ in 0..10 {
        assert_eq!(gws[1].chat(request("grp")).await.unwrap().model, "b");
    }
    assert_eq!(held.await.unwrap().model, "a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 4 of the 5 tokens are left (the held request spent one), whichever replica asks.
    for i in 0..4 {
        let r = gws[i % 2].chat(request("grp")).await.unwrap();
        assert_eq!(
            r.model, "a",
            "request {i}: the refused candidates spent no token"
        );
        // The lease is released in the background after the answer.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gws[1].chat(request("grp")).await.unwrap().model, "b");
    assert_eq!(a.chat_requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_key_is_chosen_across_the_fleet() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    let gws = replicas(2, &redis, "", &a, &b, r#"api_keys: ["k1", "k2"]"#, "");
    a.set_behavior(Behavior::Delay(Duration::from_millis(700)));
    let mut calls = Vec::new();
    // Each replica on its own would start with the same key (its round-robin starts at
    // the first); alternating replicas, every request must find the key the other
    // replica's request in flight does not hold.
    for i in 0..4 {
        let gw = gws[i % 2].clone();
        calls.push(tokio::spawn(async move {
            gw.chat(request("grp")).await.unwrap()
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in calls {
        assert_eq!(c.await.unwrap().model, "a");
    }
    let keys: Vec<String> = a
        .recorded()
        .iter()
        .map(|r| r.authorization.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), 4);
    assert_ne!(
        keys[0], keys[1],
        "B chose the key A was not using: {keys:?}"
    );
    assert_ne!(keys[2], keys[3], "{keys:?}");
    let on_first = keys.iter().filter(|k| **k == keys[0]).count();
    assert_eq!(on_first, 2, "two in flight on each key: {keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_queued_by_a_bucket_waits_within_its_one_round_trip() {
    let Some(redis) = Redis::start() else { return };
    let a = TestUpstream::start().await.unwrap();
    let yaml = format!(
        r#"{}
providers:
  pa: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0, rpm_limit: 60, queue_timeout: 3 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }} }}
"#,
        state_yaml(&redis, ""),
        a.base_url()
    );
    let gw = Gateway::from_config(&Config::from_str(&yaml, "t.yaml").unwrap()).unwrap();
    // The burst of 60, then one more: its token is reserved at once and paid back by
    // the refill (1 per second) about a second later.
    for _ in 0..60 {
        gw.chat(request("grp")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = script_calls(redis.port);
    let t = Instant::now();
    assert_eq!(gw.chat(request("grp")).await.unwrap().model, "a");
    let waited = t.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let calls = script_calls(redis.port) - before;
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_millis(2500),
        "queued for the refill: {waited:?}"
    );
    // One to admit (breaker + bucket), one to settle the breaker.
    assert_eq!(calls, 2, "script calls for the queued request");
    assert_eq!(a.chat_requests(), 61);
}

/// One fleet-wide `pick` of a key of `pool` (the key pool's step of an admission):
/// the key's id and its lease.
async fn pick(
    state: &Arc<RedisState>,
    pool: &Arc<echelon::resilience::key_pool::KeyPool>,
) -> echelon::resilience::key_pool::KeyLease {
    use echelon::state::batch::{self, BatchAnswer};
    let name = state.lease_name();
    let step = pool.shared_step(&[], Some(&name)).unwrap();
    let BatchAnswer::Admitted(mut answers) = batch::admit(state, &[step]).await.unwrap() else {
        panic!("a pick never refuses");
    };
    let (now, fields, id): (i64, Vec<String>, String) =
        redis::FromRedisValue::from_redis_value(answers.remove(0)).unwrap();
    pool.apply_shared(now, &fields);
    pool.acquire_picked(&[], &id, name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_key_counts_expire_within_the_lease_ttl() {
    use echelon::key::ApiKey;
    use echelon::resilience::key_pool::KeyPool;
    let Some(redis) = Redis::start() else { return };
    let config = one_model_config(&redis, "lease_ttl: 1");
    let pool = |state: &Arc<RedisState>| {
        let p = KeyPool::new(
            "p",
            vec![ApiKey::new("k1".into()), ApiKey::new("k2".into())],
        );
        p.share_through(state.clone(), "t:keys:p".to_owned());
        p
    };
    // Replica A picks a key and dies with it (no release, no renewal: `kill -9`).
    let cfg = config.state.clone();
    let dead = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let state = RedisState::new(&cfg).unwrap();
            let lease = pick(&state, &pool(&state)).await;
            let id = lease.key().id().to_owned();
            std::mem::forget(lease);
            id
        })
    })
    .join()
    .unwrap();
    let state = RedisState::new(&config.state).unwrap();
    let b = pool(&state);
    let held = pick(&state, &b).await;
    assert_ne!(
        held.key().id(),
        dead,
        "the dead replica's request still counts"
    );
    // Past the TTL its count is gone while B's own lease is renewed: the least-loaded
    // key is the dead replica's again (a tie would go to B's next in round-robin, the
    // key B holds).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let next = pick(&state, &b).await;
    assert_eq!(next.key().id(), dead, "expired within the lease TTL");
    drop((held, next));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_waits_for_a_fleet_wide_slot_within_its_queue_timeout() {
    let Some(redis) = Redis::start() else { return };
    let (a, b) = pair().await;
    let yaml = format!(
        r#"{}
providers:
  pa: {{ base_url: "{}" }}
  pb: {{ base_url: "{}" }}
models:
  a: {{ provider: pa, max_retries: 0, concurrency_limit: 1, queue_timeout: 3, rpm_limit: 100 }}
  b: {{ provider: pb, max_retries: 0 }}
task_groups:
  grp: {{ echelon1: {{ models: [a] }}, echelon2: {{ models: [b] }} }}
"#,
        state_yaml(&redis, ""),
        a.base_url(),
        b.base_url()
    );
    let config = Config::from_str(&yaml, "t.yaml").unwrap();
    let gws: Vec<_> = (0..2)
        .map(|_| Arc::new(Gateway::from_config(&config).unwrap()))
        .collect();
    a.push_behavior(Behavior::Delay(Duration::from_millis(600)));
    let gw = gws[0].clone();
    let held = tokio::spawn(async move { gw.chat(request("grp")).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    let r = gws[1].chat(request("grp")).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(
        r.model, "a",
        "B waited for A's slot instead of falling over"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    assert_eq!(held.await.unwrap().model, "a");
    // The polls (one every 10 ms for ~450 ms) held nothing: of the rpm_limit's 100
    // tokens 2 are spent (and about one refilled meanwhile, 100 per minute).
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("t:bucket:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let tokens: f64 = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("t")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((97.5..=100.0).contains(&tokens), "{tokens} tokens left");
}
