//! The router's live state, as `GET /admin/state` shows it: per model its breaker, token
//! buckets, in-flight count and keys; per echelon its limits; per route its counters and
//! last fallbacks; per polling pool its instances' health. Never a key, only key ids.

use serde_json::{Value, json};
use tokio::time::Instant;

use super::model::Model;
use super::plan::Tier;
use super::router::Gateway;
use crate::resilience::key_pool::KeyState;
use crate::resilience::token_bucket::TokenBucket;

fn bucket(name: &str, b: &TokenBucket) -> Value {
    json!({
        "name": name,
        "available": (b.available() * 100.0).round() / 100.0,
        "capacity": b.capacity(),
        "refill_per_sec": b.refill_per_sec(),
    })
}

fn model_state(m: &Model, now: Instant) -> Value {
    let breaker = m.breaker().snapshot_at(now);
    let mut buckets: Vec<Value> = m
        .request_buckets
        .iter()
        .map(|nb| bucket(nb.name, &nb.bucket))
        .collect();
    if let Some(tpm) = &m.tpm {
        buckets.push(bucket("tpm_limit", tpm));
    }
    let keys: Vec<Value> = m
        .keys()
        .snapshot()
        .into_iter()
        .map(|k| {
            let mut v = json!({"id": k.id, "in_flight": k.in_flight});
            match k.state {
                KeyState::Ok => v["state"] = json!("ok"),
                KeyState::CoolingDown { until } => {
                    v["state"] = json!("cooling_down");
                    v["until_ms"] = json!(until.saturating_duration_since(now).as_millis() as u64);
                }
                KeyState::Disabled { reason } => {
                    v["state"] = json!("disabled");
                    v["reason"] = json!(reason);
                }
            }
            v
        })
        .collect();
    json!({
        "provider": m.provider(),
        "upstream_model": m.upstream_model(),
        "breaker": {
            "state": breaker.state,
            "next_change_ms": breaker.next_change_in.map(|d| d.as_millis() as u64),
            "consecutive_failures": breaker.consecutive_failures,
            "probes_in_flight": breaker.probes_in_flight,
            "window_requests": breaker.window_requests,
            "window_failures": breaker.window_failures,
            "reason": breaker.reason,
        },
        "buckets": buckets,
        "in_flight": m.in_flight(),
        "concurrency_limit": m.concurrency.as_ref().map(|c| c.limit()),
        "key_pool": m.keys().name(),
        "keys": keys,
    })
}

fn echelon_state(t: &Tier) -> Value {
    json!({
        "models": t.models.iter().map(|m| m.id()).collect::<Vec<_>>(),
        "concurrency_limit": t.concurrency.as_ref().map(|c| c.limit()),
        "in_flight": t.concurrency.as_ref().map(|c| c.in_flight()),
        "rpm_bucket": t.rpm.as_ref().map(|b| bucket("rpm_limit", b)),
    })
}

impl Gateway {
    /// A JSON snapshot of every model's breaker (state, ms until it next changes),
    /// buckets (level, capacity), in-flight count and keys (id, state, cooldown left,
    /// disable reason, in-flight), and of every echelon's limits. Times are in ms from now.
    pub fn admin_state(&self) -> Value {
        let now = Instant::now();
        let models: serde_json::Map<String, Value> = self
            .models()
            .map(|(id, m)| (id.to_owned(), model_state(m, now)))
            .collect();
        let echelons: serde_json::Map<String, Value> = self
            .tiers()
            .map(|t| (t.label.clone(), echelon_state(t)))
            .collect();
        let routes: serde_json::Map<String, Value> = self
            .plans()
            .map(|(name, plan)| {
                let mut v = json!({
                    "kind": plan.kind.as_str(),
                    "stats": plan.stats.snapshot(),
                    "fallback_history": plan.stats.history(),
                });
                if let Some(b) = &plan.group_breaker {
                    let snap = b.snapshot_at(now);
                    v["group_breaker"] = json!({
                        "state": snap.state,
                        "next_change_ms": snap.next_change_in.map(|d| d.as_millis() as u64),
                        "reason": snap.reason,
                    });
                }
                (name.to_owned(), v)
            })
            .collect();
        let pools: serde_json::Map<String, Value> = self
            .pools()
            .map(|(_, pool)| {
                (
                    pool.name().to_owned(),
                    json!({
                        "healthy_instances": pool.healthy_count(),
                        "instances": pool.snapshot(),
                    }),
                )
            })
            .collect();
        json!({"models": models, "echelons": echelons, "pools": pools, "routes": routes})
    }
}
