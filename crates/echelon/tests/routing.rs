//! Task groups, fallback strategies, polling pools, wrappers and handles against the
//! fault-injecting test upstream (several instances standing for different providers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use echelon::config::Config;
use echelon::{CallOptions, Gateway, NodeRoutes};
use echelon_testkit::{Behavior, TestUpstream};
use echelon_types::{ChatCompletionRequest, ChatMessage, Role};

fn request(route: &str) -> ChatCompletionRequest {
    ChatCompletionRequest::new(route, vec![ChatMessage::new(Role::User, "hello there")])
}

fn down() -> Behavior {
    Behavior::Status {
        status: 500,
        retry_after: None,
        message: "down".into(),
    }
}

async fn upstreams(n: usize) -> Vec<TestUpstream> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(TestUpstream::start().await.unwrap());
    }
    v
}

/// Providers p0..pN on the upstreams, models m0..mN one per provider, plus `rest`.
fn gateway(ups: &[TestUpstream], rest: &str) -> Arc<Gateway> {
    let mut yaml = String::from("providers:\n");
    for (i, u) in ups.iter().enumerate() {
        yaml.push_str(&format!("  p{i}: {{ base_url: \"{}\" }}\n", u.base_url()));
    }
    yaml.push_str("models:\n");
    for i in 0..ups.len() {
        yaml.push_str(&format!("  m{i}: {{ provider: p{i}, max_retries: 0 }}\n"));
    }
    yaml.push_str(rest);
    let config = Config::from_str(&yaml, "routing.yaml").unwrap();
    Arc::new(Gateway::from_config(&config).unwrap())
}

fn tried(attempts: &[echelon_types::Attempt]) -> Vec<(String, String)> {
    attempts
        .iter()
        .map(|a| (a.model.clone(), a.outcome.to_string()))
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test]
async fn echelon_down_tries_the_echelons_in_order() {
    let ups = upstreams(3).await;
    ups[0].set_behavior(down());
    ups[1].set_behavior(Behavior::CutConnection);
    let gw = gateway(
        &ups,
        "task_groups:\n  g:\n    echelon1: { models: [m0] }\n    echelon2: { models: [m1] }\n    echelon3: { models: [m2] }\n    fallback_config: { strategy: echelon_down }\n",
    );
    let done = gw.chat(request("g")).await.unwrap();
    assert_eq!(done.model, "m2");
    assert_eq!(
        tried(&done.attempts),
        pairs(&[("m0", "server_error"), ("m1", "connect"), ("m2", "ok")])
    );
}

#[tokio::test]
async fn task_group_switch_continues_in_the_fallback_groups() {
    let ups = upstreams(3).await;
    ups[0].set_behavior(down());
    ups[1].set_behavior(down());
    let gw = gateway(
        &ups,
        "task_groups:\n  fast:\n    echelon1: { models: [m0] }\n    fallback_config: { strategy: task_group_switch, fallback_groups: [backup, fast2.echelon2] }\n  backup:\n    echelon1: { models: [m1] }\n  fast2:\n    echelon1: { models: [m1] }\n    echelon2: { models: [m2] }\n",
    );
    let done = gw.chat(request("fast")).await.unwrap();
    assert_eq!(done.model, "m2");
    assert_eq!(
        tried(&done.attempts),
        pairs(&[("m0", "server_error"), ("m1", "server_error"), ("m2", "ok")])
    );
    let routes = gw.routes();
    let route = routes.iter().find(|r| r.id == "fast").unwrap();
    assert_eq!(route.models, vec!["m0", "m1", "m2"]);
}

#[tokio::test]
async fn provider_failover_skips_other_models_of_a_failed_provider() {
    let ups = upstreams(2).await;
    ups[0].set_behavior(down());
    let gw = gateway(
        &ups,
        "  m0b: { provider: p0, model: other, max_retries: 0 }\ntask_groups:\n  g:\n    echelon1: { models: [m0] }\n    echelon2: { models: [m0b] }\n    echelon3: { models: [m1] }\n    fallback_config: { strategy: provider_failover }\n",
    );
    let done = gw.chat(request("g")).await.unwrap();
    assert_eq!(done.model, "m1");
    assert_eq!(
        tried(&done.attempts),
        pairs(&[
            ("m0", "server_error"),
            ("m0b", "provider_failed"),
            ("m1", "ok")
        ])
    );
    assert_eq!(ups[0].chat_requests(), 1, "p0 is not called again");

    // Without the strategy, the second model of p0 is tried.
    let gw = gateway(
        &ups,
        "  m0b: { provider: p0, model: other, max_retries: 0 }\ntask_groups:\n  g:\n    echelon1: { models: [m0] }\n    echelon2: { models: [m0b] }\n    echelon3: { models: [m1] }\n",
    );
    gw.chat(request("g")).await.unwrap();
    assert_eq!(ups[0].chat_requests(), 3);
}

#[tokio::test]
async fn max_attempts_caps_the_calls_of_a_request() {
    let ups = upstreams(3).await;
    for u in &ups {
        u.set_behavior(down());
    }
    let gw = gateway(
        &ups,
        "task_groups:\n  g:\n    echelon1: { models: [m0], max_retries: 5 }\n    echelon2: { models: [m1] }\n    echelon3: { models: [m2] }\n    fallback_config: { max_attempts: 2 }\n",
    );
    let e = gw.chat(request("g")).await.unwrap_err();
    assert_eq!(e.attempts().len(), 2);
    assert!(e.message().contains("max_attempts = 2"), "{}", e.message());
    let calls: usize = ups.iter().map(TestUpstream::chat_requests).sum();
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn models_whose_window_is_too_small_are_skipped_before_sending() {
    let ups = upstreams(2).await;
    let yaml =
        "task_groups:\n  g:\n    echelon1: { models: [small] }\n    echelon2: { models: [m1] }\n";
    let gw = gateway(
        &ups,
        &format!("  small: {{ provider: p0, context_window: 64, max_retries: 0 }}\n{yaml}"),
    );
    let mut req = request("g");
    req.messages = vec![ChatMessage::new(
        Role::User,
        "alpha beta gamma delta ".repeat(40),
    )];
    let done = gw.chat(req).await.unwrap();
    assert_eq!(done.model, "m1");
    assert_eq!(done.attempts[0].outcome, "context_window");
    assert!(
        done.attempts[0]
            .message
            .contains("exceed the context window of 64")
    );
    assert_eq!(ups[0].chat_requests(), 0);
    // A short prompt fits.
    assert_eq!(gw.chat(request("g")).await.unwrap().model, "small");
}

#[tokio::test]
async fn requests_spread_over_an_echelons_models() {
    let ups = upstreams(3).await;
    let gw = gateway(
        &ups,
        "task_groups:\n  g:\n    echelon1: { models: [m0, m1, m2] }\n",
    );
    for _ in 0..30 {
        gw.chat(request("g")).await.unwrap();
    }
    let counts: Vec<usize> = ups.iter().map(TestUpstream::chat_requests).collect();
    assert_eq!(counts, vec![10, 10, 10]);
}

const POOL: &str = "task_groups:\n  g:\n    echelon1: { models: [m0, m1, m2] }\n";

#[tokio::test]
async fn a_pool_round_robins_evenly_over_1000_requests() {
    let ups = upstreams(3).await;
    let gw = gateway(
        &ups,
        &format!(
            "{POOL}polling_pools:\n  pool: {{ task_groups: [g], rotation_strategy: round_robin }}\n"
        ),
    );
    for _ in 0..1000 {
        gw.chat(request("pool")).await.unwrap();
    }
    let mut counts: Vec<usize> = ups.iter().map(TestUpstream::chat_requests).collect();
    counts.sort_unstable();
    assert_eq!(counts, vec![333, 333, 334]);
    assert_eq!(gw.admin_state().pools["pool"].healthy_instances, 3);
}

#[tokio::test]
async fn instance_rotation_moves_on_and_simple_retry_stays() {
    let ups = upstreams(2).await;
    let rotation = gateway(
        &ups[..2],
        "task_groups:\n  g:\n    echelon1: { models: [m0, m1] }\npolling_pools:\n  pool: { task_groups: [g], fallback_config: { strategy: instance_rotation, max_instance_attempts: 2 } }\n",
    );
    ups[0].set_behavior(down());
    for _ in 0..2 {
        assert_eq!(rotation.chat(request("pool")).await.unwrap().model, "m1");
    }
    let before = ups[0].chat_requests();
    let retry = gateway(
        &ups[..2],
        "task_groups:\n  g:\n    echelon1: { models: [m0, m1] }\npolling_pools:\n  pool: { task_groups: [g], fallback_config: { strategy: simple_retry, max_instance_attempts: 2 } }\n",
    );
    // The first pick is m0 (round-robin from the start): simple_retry tries it twice.
    let e = retry.chat(request("pool")).await.unwrap_err();
    assert_eq!(
        tried(e.attempts()),
        pairs(&[("m0", "server_error"), ("m0", "server_error")])
    );
    assert_eq!(ups[0].chat_requests() - before, 2);
}

#[tokio::test]
async fn an_instance_failing_probes_leaves_the_rotation_and_comes_back() {
    let ups = upstreams(2).await;
    let gw = gateway(
        &ups,
        "task_groups:\n  g:\n    echelon1: { models: [m0, m1] }\npolling_pools:\n  pool: { task_groups: [g], health_check: completion, health_check_interval: 0.05, failure_threshold: 1, recovery_time: 0.4 }\n",
    );
    gw.start().unwrap();
    ups[0].set_behavior(down());
    // Wait (bounded) until the probes have marked m0 unhealthy.
    let healthy = |gw: &Gateway| gw.admin_state().pools["pool"].instances[0].healthy;
    for _ in 0..100 {
        if !healthy(&gw) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!healthy(&gw));
    let before = ups[0].chat_requests();
    for _ in 0..6 {
        assert_eq!(gw.chat(request("pool")).await.unwrap().model, "m1");
    }
    // Only probes reached m0 (each probe is one chat request on the test upstream).
    ups[0].set_behavior(Behavior::Normal);
    for _ in 0..200 {
        if healthy(&gw) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(healthy(&gw), "back after recovery_time and a passing probe");
    let mut models = Vec::new();
    for _ in 0..4 {
        models.push(gw.chat(request("pool")).await.unwrap().model);
    }
    assert!(models.contains(&"m0".to_owned()), "{models:?}");
    assert!(ups[0].chat_requests() > before);
}

#[tokio::test]
async fn conversations_stick_to_one_instance_while_it_is_healthy() {
    let ups = upstreams(3).await;
    let gw = gateway(
        &ups,
        &format!(
            "{POOL}polling_pools:\n  pool: {{ task_groups: [g], failure_threshold: 1, recovery_time: 60 }}\n"
        ),
    );
    let session = CallOptions {
        session_id: Some("conv-1".into()),
        ..CallOptions::default()
    };
    let first = gw.chat_with(request("pool"), &session).await.unwrap().model;
    for _ in 0..5 {
        assert_eq!(
            gw.chat_with(request("pool"), &session).await.unwrap().model,
            first
        );
    }
    // A multi-turn request without a session id sticks by its opening.
    let turn = |n: usize| {
        let mut msgs = vec![ChatMessage::new(Role::User, "plan a trip")];
        for i in 0..n {
            msgs.push(ChatMessage::new(Role::Assistant, format!("answer {i}")));
            msgs.push(ChatMessage::new(Role::User, format!("follow-up {i}")));
        }
        ChatCompletionRequest::new("pool", msgs)
    };
    let m1 = gw.chat(turn(1)).await.unwrap().model;
    for n in 2..6 {
        assert_eq!(gw.chat(turn(n)).await.unwrap().model, m1);
    }
    // When the bound instance fails, the conversation moves and stays on the new one.
    let idx: usize = first[1..].parse().unwrap();
    ups[idx].set_behavior(down());
    let moved = gw.chat_with(request("pool"), &session).await.unwrap().model;
    assert_ne!(moved, first);
    for _ in 0..3 {
        assert_eq!(
            gw.chat_with(request("pool"), &session).await.unwrap().model,
            moved
        );
    }
}

#[tokio::test]
async fn wrappers_route_to_their_target_then_their_fallbacks() {
    let ups = upstreams(3).await;
    ups[0].set_behavior(down());
    let gw = gateway(
        &ups,
        "task_groups:\n  fast:\n    echelon1: { models: [m0] }\n    echelon2: { models: [m1] }\n    echelon3: { models: [m2] }\nwrappers:\n  fast_wrapper: { target: fast.echelon1, fallback_groups: [fast.echelon3] }\ndefault_route: fast_wrapper\n",
    );
    let done = gw.chat(request("fast_wrapper")).await.unwrap();
    assert_eq!(
        tried(&done.attempts),
        pairs(&[("m0", "server_error"), ("m2", "ok")])
    );
    assert_eq!(ups[1].chat_requests(), 0, "echelon2 is not in the wrapper");
    // `default` names the default route.
    assert_eq!(gw.chat(request("default")).await.unwrap().model, "m2");
    // Seed 001's node resolution: wrapper > task group > polling pool > default_route.
    let node = NodeRoutes {
        llm_wrapper: Some("fast_wrapper"),
        task_group: Some("fast"),
        polling_pool: None,
    };
    assert_eq!(gw.resolve_node(&node).as_deref(), Some("fast_wrapper"));
    let node = NodeRoutes {
        llm_wrapper: Some("nope"),
        task_group: Some("fast"),
        polling_pool: None,
    };
    assert_eq!(gw.resolve_node(&node).as_deref(), Some("fast"));
    assert_eq!(
        gw.resolve_node(&NodeRoutes::default()).as_deref(),
        Some("fast_wrapper")
    );
}

#[tokio::test]
async fn handles_act_like_one_model_and_keep_stats_and_history() {
    let ups = upstreams(2).await;
    let gw = gateway(
        &ups,
        "task_groups:\n  g:\n    echelon1: { models: [m0] }\n    echelon2: { models: [m1] }\npolling_pools:\n  pool: { task_groups: [g] }\n",
    );
    let llm = gw.llm("g").unwrap();
    assert_eq!(llm.complete("hi").await.unwrap(), "echo: hi");
    ups[0].set_behavior(down());
    assert_eq!(llm.complete("again").await.unwrap(), "echo: again");
    let stats = llm.stats();
    assert_eq!((stats.total_requests, stats.successful_requests), (2, 2));
    assert_eq!((stats.fallbacks, stats.attempts), (1, 3));
    let history = gw.fallback_history("g").unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(
        (history[0].from.as_str(), history[0].to.as_str()),
        ("m0", "m1")
    );
    assert_eq!(history[0].reason, "server_error");
    assert_eq!(gw.admin_state().routes["g"].fallback_history[0].to, "m1");
    llm.reset_stats();
    assert_eq!(llm.stats().total_requests, 0);

    let pool = gw.llm("pool").unwrap();
    assert!(pool.complete("x").await.is_ok());
    assert!(gw.llm("missing").is_err());

    let health = gw.health_check_all().await;
    assert_eq!(health.len(), 2);
    assert!(health.values().all(Result::is_ok), "{health:?}");
    drop(ups);
}
