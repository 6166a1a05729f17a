//! What changes between two configurations, and what a hot reload from one to the other
//! keeps of the live state: `echelon config diff OLD NEW` prints it, `POST /admin/reload`
//! returns it (issue 18).
//!
//! The rules are the state registry's (`crate::state`): a model's units are kept while
//! its identity (provider, upstream model name, base URL) stays; a changed `rpm_limit`,
//! `tpm_limit` or `rate_limit_*` rescales its bucket (same fraction of the capacity),
//! changed breaker settings start the breaker closed, a changed `concurrency_limit`
//! starts a new limit (requests in flight finish on the old one); a key pool is kept
//! while its keys are the same ones. Keys are named by their short id only.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::{Config, ModelConfig};
use crate::key::key_id;

/// Names added, removed and changed between two configurations, each list sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// In the new configuration only.
    pub added: Vec<String>,
    /// In the old configuration only.
    pub removed: Vec<String>,
    /// In both, with other settings.
    pub changed: Vec<String>,
}

impl Changes {
    /// Whether nothing was added, removed or changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    fn between<T>(
        old: &BTreeMap<String, T>,
        new: &BTreeMap<String, T>,
        same: impl Fn(&T, &T) -> bool,
    ) -> Self {
        let mut c = Changes::default();
        for (name, n) in new {
            match old.get(name) {
                None => c.added.push(name.clone()),
                Some(o) if !same(o, n) => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        c
    }
}

/// One key of a key pool, by id (never the key).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KeyRef {
    /// The pool: `provider <id>` or `model <id>` (a model with keys of its own).
    pub pool: String,
    /// The key's short id ([`key_id`]).
    pub id: String,
}

/// Keys added and removed, by pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyChanges {
    /// Keys only the new configuration has.
    pub added: Vec<KeyRef>,
    /// Keys only the old configuration has.
    pub removed: Vec<KeyRef>,
}

/// What a reload does to a unit of live state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Carried over as it is.
    Kept,
    /// Carried over at the same fraction of a new capacity (a token bucket).
    Rescaled,
    /// Started fresh.
    Reset,
}

impl Fate {
    /// `kept`, `rescaled` or `reset`.
    pub fn name(self) -> &'static str {
        match self {
            Fate::Kept => "kept",
            Fate::Rescaled => "rescaled",
            Fate::Reset => "reset",
        }
    }
}

/// The fate of one unit (or all units of one model) of state that both configurations
/// have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateNote {
    /// What it is: `model a`, `model a breaker`, `model a rpm_limit`, `echelon g.echelon1
    /// rpm_limit`, `keys of provider p`.
    pub unit: String,
    /// What the reload does to it.
    pub fate: Fate,
    /// Why, when it is not kept.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub why: String,
}

/// Everything that differs between two configurations, and what a reload keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    /// Model ids.
    pub models: Changes,
    /// Task groups, polling pools and wrappers (and `default_route`, as `default_route`).
    pub routes: Changes,
    /// Provider ids.
    pub providers: Changes,
    /// Keys, by id.
    pub keys: KeyChanges,
    /// The state of models, echelons and key pools both configurations have.
    pub state: Vec<StateNote>,
    /// Settings a reload does not apply (the listener, the gateway keys, the ledger):
    /// they take effect at the next start.
    pub needs_restart: Vec<String>,
}

impl ConfigDiff {
    /// The differences from `old` to `new`.
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let mut d = ConfigDiff {
            models: Changes::between(&old.models, &new.models, |a, b| {
                format!("{a:?}") == format!("{b:?}")
                    && same_keys(a.api_keys.as_deref(), b.api_keys.as_deref())
            }),
            providers: Changes::between(&old.providers, &new.providers, |a, b| {
                format!("{a:?}") == format!("{b:?}")
                    && same_keys(Some(&a.api_keys), Some(&b.api_keys))
            }),
            ..ConfigDiff::default()
        };
        d.routes = route_changes(old, new);
        d.keys = key_changes(old, new);
        d.state = state_notes(old, new);
        d.needs_restart = restart_notes(old, new);
        d
    }

    /// Whether the two configurations are the same as far as a reload goes.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
            && self.routes.is_empty()
            && self.providers.is_empty()
            && self.keys.added.is_empty()
            && self.keys.removed.is_empty()
            && self.state.iter().all(|n| n.fate == Fate::Kept)
            && self.needs_restart.is_empty()
    }
}

fn same_keys(a: Option<&[SecretString]>, b: Option<&[SecretString]>) -> bool {
    ids(a.unwrap_or_default()) == ids(b.unwrap_or_default())
}

fn ids(keys: &[SecretString]) -> Vec<String> {
    keys.iter().map(|k| key_id(k.expose_secret())).collect()
}

fn route_changes(old: &Config, new: &Config) -> Changes {
    let routes = |c: &Config| {
        let mut m: BTreeMap<String, String> = BTreeMap::new();
        for (n, g) in &c.task_groups {
            m.insert(n.clone(), format!("{g:?}"));
        }
        for (n, p) in &c.polling_pools {
            m.insert(n.clone(), format!("{p:?}"));
        }
        for (n, w) in &c.wrappers {
            m.insert(n.clone(), format!("{w:?}"));
        }
        if let Some(d) = &c.default_route {
            m.insert("default_route".to_owned(), d.clone());
        }
        m
    };
    Changes::between(&routes(old), &routes(new), |a, b| a == b)
}

/// Each configuration's key pools (by the name the topology gives them) and their key ids.
fn key_pools(c: &Config) -> BTreeMap<String, Vec<String>> {
    let mut pools = BTreeMap::new();
    for (id, mc) in &c.models {
        match &mc.api_keys {
            Some(own) => {
                pools.insert(format!("model {id}"), ids(own));
            }
            None => {
                if let Some(p) = c.providers.get(&mc.provider) {
                    pools.insert(format!("provider {}", mc.provider), ids(&p.api_keys));
                }
            }
        }
    }
    pools
}

fn key_changes(old: &Config, new: &Config) -> KeyChanges {
    let (o, n) = (key_pools(old), key_pools(new));
    let refs = |pools: &BTreeMap<String, Vec<String>>| -> BTreeSet<KeyRef> {
        pools
            .iter()
            .flat_map(|(pool, ids)| {
                ids.iter().map(|id| KeyRef {
                    pool: pool.clone(),
                    id: id.clone(),
                })
            })
            .collect()
    };
    let (o, n) = (refs(&o), refs(&n));
    KeyChanges {
        added: n.difference(&o).cloned().collect(),
        removed: o.difference(&n).cloned().collect(),
    }
}

/// `provider|upstream model|base URL`, as the model's state ids hold it.
fn identity(c: &Config, mc: &ModelConfig) -> String {
    let base = mc
        .base_url
        .as_deref()
        .or_else(|| c.providers.get(&mc.provider).map(|p| p.base_url.as_str()))
        .unwrap_or_default();
    format!("{}|{}|{base}", mc.provider, mc.model)
}

fn state_notes(old: &Config, new: &Config) -> Vec<StateNote> {
    let mut notes = Vec::new();
    let note = |unit: String, fate, why: String| StateNote { unit, fate, why };
    for (id, n) in &new.models {
        let Some(o) = old.models.get(id) else {
            continue;
        };
        let (io, inew) = (identity(old, o), identity(new, n));
        if io != inew {
            notes.push(note(
                format!("model {id}"),
                Fate::Reset,
                format!("another upstream ({io} → {inew})"),
            ));
            continue;
        }
        let mut all_kept = true;
        if format!("{:?}", o.circuit_breaker) != format!("{:?}", n.circuit_breaker) {
            all_kept = false;
            notes.push(note(
                format!("model {id} breaker"),
                Fate::Reset,
                "circuit_breaker settings changed".to_owned(),
            ));
        }
        let limits = [
            (
                "rpm_limit",
                o.rpm_limit.map(f64::from),
                n.rpm_limit.map(f64::from),
            ),
            (
                "tpm_limit",
                o.tpm_limit.map(f64::from),
                n.tpm_limit.map(f64::from),
            ),
            ("rate_limit", o.rate_limit_capacity, n.rate_limit_capacity),
        ];
        for (name, a, b) in limits {
            let rate_changed =
                name == "rate_limit" && o.rate_limit_refill_rate != n.rate_limit_refill_rate;
            if a == b && !rate_changed {
                continue;
            }
            all_kept = false;
            let (fate, why) = match (a, b) {
                (Some(_), Some(_)) => (Fate::Rescaled, format!("{name} {} → {}", show(a), show(b))),
                _ => (Fate::Reset, format!("{name} {} → {}", show(a), show(b))),
            };
            notes.push(note(format!("model {id} {name}"), fate, why));
        }
        if o.concurrency_limit != n.concurrency_limit {
            all_kept = false;
            notes.push(note(
                format!("model {id} concurrency"),
                Fate::Reset,
                format!(
                    "concurrency_limit {} → {} (requests in flight finish on the old limit)",
                    show(o.concurrency_limit.map(f64::from)),
                    show(n.concurrency_limit.map(f64::from))
                ),
            ));
        }
        if all_kept {
            notes.push(note(format!("model {id}"), Fate::Kept, String::new()));
        }
    }
    let echelons = |c: &Config| -> BTreeMap<String, Option<u32>> {
        c.task_groups
            .iter()
            .flat_map(|(g, tg)| {
                tg.echelons
                    .iter()
                    .map(move |e| (format!("{g}.{}", e.name), e.rpm_limit))
            })
            .collect()
    };
    let (eo, en) = (echelons(old), echelons(new));
    for (label, b) in &en {
        if let Some(a) = eo.get(label)
            && a != b
        {
            let fate = if a.is_some() && b.is_some() {
                Fate::Rescaled
            } else {
                Fate::Reset
            };
            notes.push(note(
                format!("echelon {label} rpm_limit"),
                fate,
                format!(
                    "rpm_limit {} → {}",
                    show(a.map(f64::from)),
                    show(b.map(f64::from))
                ),
            ));
        }
    }
    let (po, pn) = (key_pools(old), key_pools(new));
    for (pool, keys) in &pn {
        match po.get(pool) {
            Some(k) if k == keys => {
                notes.push(note(format!("keys of {pool}"), Fate::Kept, String::new()))
            }
            Some(_) => notes.push(note(
                format!("keys of {pool}"),
                Fate::Reset,
                "the key list changed: cooldowns and disabled states start over".to_owned(),
            )),
            None => {}
        }
    }
    notes
}

fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn restart_notes(old: &Config, new: &Config) -> Vec<String> {
    let (o, n) = (&old.server, &new.server);
    let mut out = Vec::new();
    let mut check = |name: &str, same: bool| {
        if !same {
            out.push(format!("server.{name}"));
        }
    };
    check("host", o.host == n.host);
    check("port", o.port == n.port);
    check("api_keys", ids(&o.api_keys) == ids(&n.api_keys));
    check("body_limit_bytes", o.body_limit_bytes == n.body_limit_bytes);
    check("log_bodies", o.log_bodies == n.log_bodies);
    check("metrics", o.metrics == n.metrics);
    check("metrics_auth", o.metrics_auth == n.metrics_auth);
    check("allowed_hosts", o.allowed_hosts == n.allowed_hosts);
    check("cors_origins", o.cors_origins == n.cors_origins);
    check(
        "header_read_timeout",
        o.header_read_timeout == n.header_read_timeout,
    );
    check("max_connections", o.max_connections == n.max_connections);
    check("shutdown_timeout", o.shutdown_timeout == n.shutdown_timeout);
    check("watch_config", o.watch_config == n.watch_config);
    if old.usage != new.usage {
        out.push("usage".to_owned());
    }
    // The exporter is installed in the process's tracing subscriber once, at start.
    if old.telemetry != new.telemetry {
        out.push("telemetry".to_owned());
    }
    out
}

impl fmt::Display for ConfigDiff {
    /// One line per change: `+ model c`, `- route h`, `~ model a`, `+ key abcd1234
    /// (provider p)`, `state model a: kept`, `restart server.port`; `no changes` when
    /// there are none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() && self.state.is_empty() {
            return writeln!(f, "no changes");
        }
        for (what, c) in [
            ("model", &self.models),
            ("route", &self.routes),
            ("provider", &self.providers),
        ] {
            for n in &c.added {
                writeln!(f, "+ {what} {n}")?;
            }
            for n in &c.removed {
                writeln!(f, "- {what} {n}")?;
            }
            for n in &c.changed {
                writeln!(f, "~ {what} {n}")?;
            }
        }
        for k in &self.keys.added {
            writeln!(f, "+ key {} ({})", k.id, k.pool)?;
        }
        for k in &self.keys.removed {
            writeln!(f, "- key {} ({})", k.id, k.pool)?;
        }
        for s in &self.state {
            if s.why.is_empty() {
                writeln!(f, "state {}: {}", s.unit, s.fate.name())?;
            } else {
                writeln!(f, "state {}: {} ({})", s.unit, s.fate.name(), s.why)?;
            }
        }
        for r in &self.needs_restart {
            writeln!(f, "restart {r}: changed, applied at the next start")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const OLD: &str = r#"
providers:
  p: { base_url: "http://127.0.0.1:9/v1", api_keys: ["sk-one", "sk-two"] }
models:
  a: { provider: p, rpm_limit: 60 }
  b: { provider: p }
  c: { provider: p, concurrency_limit: 2 }
task_groups:
  g: { echelon1: { models: [a, b], rpm_limit: 10 } }
  h: { echelon1: { models: [c] } }
"#;

    fn cfg(yaml: &str) -> Config {
        Config::from_str(yaml, "t.yaml").unwrap()
    }

    #[test]
    fn the_same_config_has_no_changes_and_keeps_everything() {
        let d = ConfigDiff::between(&cfg(OLD), &cfg(OLD));
        assert!(d.is_empty(), "{d}");
        assert!(d.state.iter().all(|s| s.fate == Fate::Kept));
        assert!(d.state.iter().any(|s| s.unit == "keys of provider p"));
    }

    #[test]
    fn lists_what_changes_and_what_state_is_kept() {
        let new = OLD
            .replace("rpm_limit: 60", "rpm_limit: 120")
            .replace(
                "  b: { provider: p }\n",
                "  b: { provider: p, model: other }\n  d: { provider: p }\n",
            )
            .replace(
                "c: { provider: p, concurrency_limit: 2 }",
                "c: { provider: p, concurrency_limit: 4 }",
            )
            .replace("\"sk-two\"", "\"sk-three\"")
            .replace(
                "  h: { echelon1: { models: [c] } }\n",
                "  k: { echelon1: { models: [c, d] } }\n",
            )
            .replace("rpm_limit: 10", "rpm_limit: 20");
        let d = ConfigDiff::between(&cfg(OLD), &cfg(&new));
        assert_eq!(d.models.added, ["d"]);
        assert_eq!(d.models.changed, ["a", "b", "c"]);
        assert_eq!(d.routes.added, ["k"]);
        assert_eq!(d.routes.removed, ["h"]);
        assert_eq!(d.routes.changed, ["g"]);
        assert_eq!(d.providers.changed, ["p"]);
        assert_eq!(d.keys.added.len(), 1);
        assert_eq!(d.keys.added[0].id, key_id("sk-three"));
        assert_eq!(d.keys.removed[0].id, key_id("sk-two"));
        let fate = |u: &str| d.state.iter().find(|s| s.unit == u).map(|s| s.fate);
        assert_eq!(fate("model a rpm_limit"), Some(Fate::Rescaled));
        assert_eq!(fate("model b"), Some(Fate::Reset));
        assert_eq!(fate("model c concurrency"), Some(Fate::Reset));
        assert_eq!(fate("echelon g.echelon1 rpm_limit"), Some(Fate::Rescaled));
        assert_eq!(fate("keys of provider p"), Some(Fate::Reset));
        let text = d.to_string();
        assert!(text.contains("+ model d\n"), "{text}");
        assert!(text.contains(&format!("+ key {} (provider p)", key_id("sk-three"))));
        assert!(!text.contains("sk-"), "never a key: {text}");
        assert!(!serde_json::to_string(&d).unwrap().contains("sk-"));
    }

    #[test]
    fn server_settings_need_a_restart() {
        let new = format!("server: {{ port: 4100 }}\n{OLD}");
        let d = ConfigDiff::between(&cfg(OLD), &cfg(&new));
        assert_eq!(d.needs_restart, ["server.port"]);
        assert!(!d.is_empty());
    }

    /// The exporter is installed once, at start (issue 18).
    #[test]
    fn the_telemetry_section_needs_a_restart() {
        let new = format!("telemetry: {{ otlp_endpoint: \"http://c:4318\" }}\n{OLD}");
        let d = ConfigDiff::between(&cfg(OLD), &cfg(&new));
        assert_eq!(d.needs_restart, ["telemetry"]);
        assert!(d.to_string().contains("restart telemetry"), "{d}");
    }
}
