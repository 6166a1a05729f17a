//! The router's live state, as `GET /admin/state` shows it and the scrape-time metrics
//! read it: per model its breaker, token buckets, in-flight count and keys; per echelon
//! its limits; per route its counters and last fallbacks; per polling pool its
//! instances' health. Never a key, only key ids.
//!
//! One typed tree ([`AdminState`]); its `Serialize` impl *is* the JSON of
//! `/admin/state`, so the field names and shapes below are the wire format. Times are
//! milliseconds from the moment of the snapshot, except the fields named `*_unix_ms`
//! (milliseconds since the Unix epoch, wall clock).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::time::Instant;

use super::gateway::Gateway;
use super::model::Model;
use super::plan::{Plan, Tier};
use super::pool::{InstanceSnapshot, PollingPool};
use super::stats::{FallbackEvent, StatsSnapshot};
use crate::resilience::breaker::{BreakerSnapshot, BreakerState};
use crate::resilience::key_pool::{KeySnapshot, KeyState};
use crate::resilience::token_bucket::TokenBucket;

/// The whole live state: the body of `GET /admin/state`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdminState {
    /// Per model id.
    pub models: BTreeMap<String, ModelState>,
    /// Per echelon label (`group.echelonN`, or a lone model's id).
    pub echelons: BTreeMap<String, EchelonState>,
    /// Per polling pool name.
    pub pools: BTreeMap<String, PoolState>,
    /// Per route name (what a request puts in `model`).
    pub routes: BTreeMap<String, RouteState>,
    /// Where the resilience state lives and how this replica uses it now (issue 15).
    pub state: StateView,
}

/// The state backend as `/admin/state` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StateView {
    /// `memory` or `redis` (`state.backend`).
    pub backend: &'static str,
    /// `memory` (nothing shared), `shared` (through Redis), `local` (Redis down: limits
    /// divided by `state.replicas`) or `reject` (Redis down: attempts refused).
    pub mode: &'static str,
    /// Whether Redis answered the last time it was asked (`true` for `memory`).
    pub up: bool,
}

/// One model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelState {
    /// The provider id it calls.
    pub provider: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Its circuit breaker.
    pub breaker: BreakerView,
    /// Its request buckets (`rpm_limit`, `rate_limit`), then `tpm_limit`, those configured.
    pub buckets: Vec<BucketView>,
    /// Requests in flight on it now (through any route).
    pub in_flight: u32,
    /// Its `concurrency_limit`; `None` when unlimited.
    pub concurrency_limit: Option<u32>,
    /// The name of the key pool it draws from (shared by the provider's models).
    pub key_pool: String,
    /// The pool's keys, by id.
    pub keys: Vec<KeyView>,
}

/// Where a breaker stands (`closed`, `half_open`, `open` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerPhase {
    /// Attempts go through.
    Closed,
    /// Probes go through, up to `half_open_requests` at a time.
    HalfOpen,
    /// Attempts are refused until the open period ends.
    Open,
}

impl BreakerPhase {
    /// The phase of a breaker state.
    pub fn of(state: &BreakerState) -> Self {
        match state {
            BreakerState::Closed => BreakerPhase::Closed,
            BreakerState::HalfOpen { .. } => BreakerPhase::HalfOpen,
            BreakerState::Open { .. } => BreakerPhase::Open,
        }
    }

    /// The phase named by [`BreakerSnapshot::state`] (a [`BreakerState::name`]).
    ///
    /// The snapshot carries only the name; an unknown name (none exists) reads as
    /// `Closed`, the state that asks nothing of an operator.
    fn from_name(name: &str) -> Self {
        match name {
            "open" => BreakerPhase::Open,
            "half_open" => BreakerPhase::HalfOpen,
            _ => BreakerPhase::Closed,
        }
    }

    /// `closed`, `half_open` or `open`, as in logs, metrics and `/admin/state`.
    pub fn name(self) -> &'static str {
        match self {
            BreakerPhase::Closed => "closed",
            BreakerPhase::HalfOpen => "half_open",
            BreakerPhase::Open => "open",
        }
    }

    /// The `echelon_breaker_state` gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge_value(self) -> f64 {
        match self {
            BreakerPhase::Closed => 0.0,
            BreakerPhase::HalfOpen => 1.0,
            BreakerPhase::Open => 2.0,
        }
    }
}

/// A model's circuit breaker.
#[derive(Debug, Clone, Serialize)]
pub struct BreakerView {
    /// Where it stands.
    pub state: BreakerPhase,
    /// Time until it changes on its own (the end of the open period), ms; `None` when it
    /// will not.
    pub next_change_ms: Option<u64>,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
    /// Probes granted and not yet reported (half-open only; 0 otherwise).
    pub probes_in_flight: u32,
    /// Requests within the failure-rate window (0 without that rule).
    pub window_requests: u32,
    /// Failures among them.
    pub window_failures: u32,
    /// Why it last changed state, e.g. `5 consecutive failures`; `None` if it never has.
    pub reason: Option<String>,
}

/// A task group's own breaker (`fallback_config.circuit_breaker`).
#[derive(Debug, Clone, Serialize)]
pub struct GroupBreakerView {
    /// Where it stands.
    pub state: BreakerPhase,
    /// Time until it changes on its own, ms; `None` when it will not.
    pub next_change_ms: Option<u64>,
    /// Why it last changed state; `None` if it never has.
    pub reason: Option<String>,
}

/// One token bucket.
#[derive(Debug, Clone, Serialize)]
pub struct BucketView {
    /// The setting it enforces: `rpm_limit`, `rate_limit` or `tpm_limit`.
    pub name: &'static str,
    /// Tokens available now, rounded to two decimals.
    pub available: f64,
    /// Most tokens it holds.
    pub capacity: f64,
    /// Tokens added per second.
    pub refill_per_sec: f64,
}

/// One API key, by id (never the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyView {
    /// Short id of the key (a hash prefix).
    pub id: String,
    /// Requests in flight with it, across every model sharing the pool.
    pub in_flight: u32,
    /// Its state: `"state": "ok" | "cooling_down" | "disabled"` and that state's fields,
    /// beside `id` and `in_flight`.
    #[serde(flatten)]
    pub state: KeyStateView,
    /// What the provider's rate-limit response headers last said about the key
    /// (`x-ratelimit-*`, `anthropic-ratelimit-*`); absent until a response had them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_rate_limits: Option<ProviderRateLimitsView>,
}

/// A key's last rate-limit headers ([`RateLimits`](crate::key::RateLimits)) and their age.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderRateLimitsView {
    /// The counts and resets, as the provider sent them.
    #[serde(flatten)]
    pub limits: crate::key::RateLimits,
    /// How long ago the response that carried them arrived, ms.
    pub age_ms: u64,
}

/// What a key can be used for now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyStateView {
    /// Usable.
    Ok,
    /// Rate-limited by the provider.
    CoolingDown {
        /// Time until it is usable again, ms.
        until_ms: u64,
    },
    /// Refused by the provider (401/403): not used until its re-probe, when one live
    /// request may use it again (1 min after the first refusal, doubling with each
    /// refused re-probe up to 1 h; a success re-enables it).
    Disabled {
        /// The provider's message (scrubbed of keys).
        reason: String,
        /// 401/403 answers in a row: the first refusal, then each refused re-probe.
        consecutive_failures: u32,
        /// Time until one request may re-probe it, ms (0 when due or in flight).
        reprobe_in_ms: u64,
        /// When that is, ms since the Unix epoch.
        reprobe_at_unix_ms: u64,
        /// Whether the re-probe request is in flight now.
        probe_in_flight: bool,
    },
}

impl KeyStateView {
    /// `ok`, `cooling_down` or `disabled`, as on the wire and in metrics.
    pub fn name(&self) -> &'static str {
        match self {
            KeyStateView::Ok => "ok",
            KeyStateView::CoolingDown { .. } => "cooling_down",
            KeyStateView::Disabled { .. } => "disabled",
        }
    }

    /// Every state's [`name`](Self::name), for metrics that export one series per state.
    pub const NAMES: [&'static str; 3] = ["ok", "cooling_down", "disabled"];
}

/// One echelon's shared limits.
#[derive(Debug, Clone, Serialize)]
pub struct EchelonState {
    /// Its model ids, in order.
    pub models: Vec<String>,
    /// Its `concurrency_limit` over all its models; `None` when unlimited.
    pub concurrency_limit: Option<u32>,
    /// Requests in flight under that limit; `None` without one.
    pub in_flight: Option<u32>,
    /// Its `rpm_limit` bucket; `None` without one.
    pub rpm_bucket: Option<BucketView>,
}

/// One route.
#[derive(Debug, Clone, Serialize)]
pub struct RouteState {
    /// `model`, `task_group`, `echelon`, `polling_pool` or `wrapper`.
    pub kind: &'static str,
    /// Its counters since start or the last reset.
    pub stats: StatsSnapshot,
    /// Its last moves from one candidate to the next, oldest first.
    pub fallback_history: Vec<FallbackEvent>,
    /// The group's own breaker; absent (not `null`) when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_breaker: Option<GroupBreakerView>,
}

/// One polling pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolState {
    /// Instances in the rotation now.
    pub healthy_instances: usize,
    /// Every instance, in the order of the pool's models.
    pub instances: Vec<InstanceSnapshot>,
}

/// Whole milliseconds of `d` (saturating at `u64::MAX`).
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl BucketView {
    fn of(name: &'static str, b: &TokenBucket, now: Instant) -> Self {
        BucketView {
            name,
            available: (b.available_at(now) * 100.0).round() / 100.0,
            capacity: b.capacity(),
            refill_per_sec: b.refill_per_sec(),
        }
    }
}

impl BreakerView {
    fn of(s: BreakerSnapshot) -> Self {
        BreakerView {
            state: BreakerPhase::from_name(s.state),
            next_change_ms: s.next_change_in.map(ms),
            consecutive_failures: s.consecutive_failures,
            probes_in_flight: s.probes_in_flight,
            window_requests: s.window_requests,
            window_failures: s.window_failures,
            reason: s.reason,
        }
    }
}

impl GroupBreakerView {
    fn of(s: BreakerSnapshot) -> Self {
        GroupBreakerView {
            state: BreakerPhase::from_name(s.state),
            next_change_ms: s.next_change_in.map(ms),
            reason: s.reason,
        }
    }
}

impl KeyView {
    fn of(k: KeySnapshot, now: Instant) -> Self {
        let state = match k.state {
            KeyState::Ok => KeyStateView::Ok,
            KeyState::CoolingDown { until } => KeyStateView::CoolingDown {
                until_ms: ms(until.saturating_duration_since(now)),
            },
            KeyState::Disabled {
                reason,
                consecutive_failures,
                reprobe_at,
                probe_in_flight,
            } => {
                let left = reprobe_at.saturating_duration_since(now);
                let at = SystemTime::now()
                    .checked_add(left)
                    .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                    .unwrap_or_default();
                KeyStateView::Disabled {
                    reason,
                    consecutive_failures,
                    reprobe_in_ms: ms(left),
                    reprobe_at_unix_ms: ms(at),
                    probe_in_flight,
                }
            }
        };
        KeyView {
            id: k.id,
            in_flight: k.in_flight,
            state,
            provider_rate_limits: k.rate_limits.map(|(limits, seen)| ProviderRateLimitsView {
                limits,
                age_ms: ms(now.saturating_duration_since(seen)),
            }),
        }
    }
}

impl ModelState {
    fn of(m: &Model, now: Instant) -> Self {
        let buckets = m
            .request_buckets
            .iter()
            .map(|nb| BucketView::of(nb.name, &nb.bucket, now))
            .chain(m.tpm.as_ref().map(|b| BucketView::of("tpm_limit", b, now)))
            .collect();
        ModelState {
            provider: m.provider().to_owned(),
            upstream_model: m.upstream_model().to_owned(),
            breaker: BreakerView::of(m.breaker().snapshot_at(now)),
            buckets,
            in_flight: m.in_flight(),
            concurrency_limit: m.concurrency.as_ref().map(|c| c.limit()),
            key_pool: m.keys().name().to_owned(),
            keys: m
                .keys()
                .snapshot()
                .into_iter()
                .map(|k| KeyView::of(k, now))
                .collect(),
        }
    }
}

impl EchelonState {
    fn of(t: &Tier, now: Instant) -> Self {
        EchelonState {
            models: t.models.iter().map(|m| m.id().to_owned()).collect(),
            concurrency_limit: t.concurrency.as_ref().map(|c| c.limit()),
            in_flight: t.concurrency.as_ref().map(|c| c.in_flight()),
            rpm_bucket: t.rpm.as_ref().map(|b| BucketView::of("rpm_limit", b, now)),
        }
    }
}

impl RouteState {
    fn of(plan: &Plan, now: Instant) -> Self {
        RouteState {
            kind: plan.kind.as_str(),
            stats: plan.stats.snapshot(),
            fallback_history: plan.stats.history(),
            group_breaker: plan
                .group_breaker
                .as_ref()
                .map(|b| GroupBreakerView::of(b.snapshot_at(now))),
        }
    }
}

impl PoolState {
    fn of(pool: &PollingPool) -> Self {
        PoolState {
            healthy_instances: pool.healthy_count(),
            instances: pool.snapshot(),
        }
    }
}

impl Gateway {
    /// A snapshot of every model's breaker (state, ms until it next changes), buckets
    /// (level, capacity), in-flight count and keys (id, state, cooldown left, disable
    /// reason, failures in a row and next re-probe, in-flight); of every echelon's limits, every route's counters and every
    /// polling pool's instances. Times are in ms from now. Serialize it for
    /// `GET /admin/state`.
    pub fn admin_state(&self) -> AdminState {
        let now = Instant::now();
        let topology = self.topology();
        AdminState {
            models: topology
                .models()
                .map(|(id, m)| (id.to_owned(), ModelState::of(m, now)))
                .collect(),
            echelons: topology
                .tiers()
                .map(|t| (t.label.clone(), EchelonState::of(t, now)))
                .collect(),
            pools: topology
                .pools()
                .map(|(_, pool)| (pool.name().to_owned(), PoolState::of(pool)))
                .collect(),
            routes: topology
                .plans()
                .map(|(name, plan)| (name.to_owned(), RouteState::of(plan, now)))
                .collect(),
            state: match self.registry().shared_state() {
                None => StateView {
                    backend: "memory",
                    mode: "memory",
                    up: true,
                },
                Some(s) => StateView {
                    backend: "redis",
                    mode: s.mode().as_str(),
                    up: s.is_up(),
                },
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::Config;

    #[test]
    fn breaker_phases_match_the_breaker_state_names() {
        let now = Instant::now();
        for state in [
            BreakerState::Closed,
            BreakerState::HalfOpen {
                probes_in_flight: 1,
            },
            BreakerState::Open { until: now },
        ] {
            let phase = BreakerPhase::of(&state);
            assert_eq!(phase.name(), state.name());
            assert_eq!(BreakerPhase::from_name(state.name()), phase);
            assert_eq!(serde_json::to_value(phase).unwrap(), state.name());
        }
    }

    #[test]
    fn key_states_serialize_beside_id_and_in_flight() {
        let key = |state| {
            serde_json::to_value(KeyView {
                id: "abcd1234".into(),
                in_flight: 2,
                state,
                provider_rate_limits: None,
            })
            .unwrap()
        };
        assert_eq!(
            key(KeyStateView::Ok),
            json!({"id": "abcd1234", "in_flight": 2, "state": "ok"})
        );
        assert_eq!(
            key(KeyStateView::CoolingDown { until_ms: 1500 }),
            json!({"id": "abcd1234", "in_flight": 2, "state": "cooling_down", "until_ms": 1500})
        );
        let disabled = |reason: &str| KeyStateView::Disabled {
            reason: reason.into(),
            consecutive_failures: 2,
            reprobe_in_ms: 120_000,
            reprobe_at_unix_ms: 1_700_000_120_000,
            probe_in_flight: false,
        };
        assert_eq!(
            key(disabled("Invalid API Key")),
            json!({"id": "abcd1234", "in_flight": 2, "state": "disabled", "reason": "Invalid API Key",
                   "consecutive_failures": 2, "reprobe_in_ms": 120_000,
                   "reprobe_at_unix_ms": 1_700_000_120_000_u64, "probe_in_flight": false})
        );
        for s in [
            KeyStateView::Ok,
            KeyStateView::CoolingDown { until_ms: 0 },
            disabled("r"),
        ] {
            assert_eq!(key(s.clone())["state"], s.name());
            assert!(KeyStateView::NAMES.contains(&s.name()));
        }
    }

    #[tokio::test]
    async fn the_state_serializes_to_the_admin_json_shape() {
        let yaml = r#"
providers:
  p: { base_url: "http://127.0.0.1:9", api_keys: ["k-secret-one", "k-secret-two"] }
models:
  a: { provider: p, rpm_limit: 60, tpm_limit: 1000, concurrency_limit: 4, rate_limit_capacity: 20, rate_limit_refill_rate: 3 }
  b: { provider: p, model: up-b }
task_groups:
  g:
    echelon1: { models: [a], concurrency_limit: 10, rpm_limit: 100 }
    echelon2: { models: [b] }
    fallback_config: { circuit_breaker: { failure_threshold: 5, recovery_time: 60, half_open_requests: 1 } }
polling_pools:
  pool: { task_groups: [g] }
"#;
        let gw = Gateway::from_config(&Config::from_str(yaml, "t.yaml").unwrap()).unwrap();
        let state = gw.admin_state();
        let v = serde_json::to_value(&state).unwrap();
        let text = v.to_string();
        assert!(!text.contains("k-secret"), "no key in state: {text}");

        let key_ids: Vec<&str> = state.models["a"]
            .keys
            .iter()
            .map(|k| k.id.as_str())
            .collect();
        assert_eq!(key_ids.len(), 2);
        assert_eq!(
            v["models"]["a"],
            json!({
                "provider": "p",
                "upstream_model": "a",
                "breaker": {
                    "state": "closed", "next_change_ms": null, "consecutive_failures": 0,
                    "probes_in_flight": 0, "window_requests": 0, "window_failures": 0,
                    "reason": null,
                },
                "buckets": [
                    {"name": "rpm_limit", "available": 60.0, "capacity": 60.0, "refill_per_sec": 1.0},
                    {"name": "rate_limit", "available": 20.0, "capacity": 20.0, "refill_per_sec": 3.0},
                    {"name": "tpm_limit", "available": 1000.0, "capacity": 1000.0,
                     "refill_per_sec": 1000.0 / 60.0},
                ],
                "in_flight": 0,
                "concurrency_limit": 4,
                "key_pool": "provider p",
                "keys": [
                    {"id": key_ids[0], "in_flight": 0, "state": "ok"},
                    {"id": key_ids[1], "in_flight": 0, "state": "ok"},
                ],
            })
        );
        assert_eq!(v["models"]["b"]["buckets"], json!([]));
        assert_eq!(v["models"]["b"]["concurrency_limit"], json!(null));
        assert_eq!(v["models"]["b"]["upstream_model"], "up-b");
        assert_eq!(
            v["echelons"],
            json!({
                "g.echelon1": {
                    "models": ["a"], "concurrency_limit": 10, "in_flight": 0,
                    "rpm_bucket": {"name": "rpm_limit", "available": 100.0, "capacity": 100.0,
                                   "refill_per_sec": 100.0 / 60.0},
                },
                "g.echelon2": {
                    "models": ["b"], "concurrency_limit": null, "in_flight": null,
                    "rpm_bucket": null,
                },
            })
        );
        let stats =
            json!({"total_requests": 0, "successful_requests": 0, "fallbacks": 0, "attempts": 0});
        assert_eq!(
            v["routes"]["g"],
            json!({
                "kind": "task_group", "stats": stats, "fallback_history": [],
                "group_breaker": {"state": "closed", "next_change_ms": null, "reason": null},
            })
        );
        assert_eq!(
            v["routes"]["a"],
            json!({"kind": "model", "stats": stats, "fallback_history": []}),
            "no group_breaker key without a group breaker"
        );
        let routes: Vec<&String> = state.routes.keys().collect();
        assert_eq!(routes, ["a", "b", "g", "g.echelon1", "g.echelon2", "pool"]);
        assert_eq!(v["routes"]["pool"]["kind"], "polling_pool");
        assert_eq!(v["pools"]["pool"]["healthy_instances"], 2);
        assert_eq!(
            v["pools"]["pool"]["instances"][1],
            json!({
                "model": "b", "healthy": true, "consecutive_failures": 0,
                "unhealthy_for_ms": null, "recovery_in_ms": null, "last_probe_ok": null,
                "last_probe_error": null, "last_probe_age_ms": null, "picked": 0, "in_flight": 0,
            })
        );
        let top: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(top, ["echelons", "models", "pools", "routes", "state"]);
        assert_eq!(
            v["state"],
            json!({"backend": "memory", "mode": "memory", "up": true})
        );
    }
}
