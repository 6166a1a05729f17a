//! Reading polling pools (`polling_pools.<name>` or a seed pool file) and wrappers
//! (`wrappers.<name>`): the routes built on top of task groups (seeds 001 and 002).

use std::collections::BTreeMap;

use super::error::{did_you_mean, reference_hint};
use super::model::{
    HealthCheckKind, PollingPoolConfig, PoolFallbackConfig, PoolFallbackStrategy, RotationStrategy,
    WrapperConfig,
};
use super::node::{Kind, Pos};
use super::read::{At, Bound, Ctx, MapView, map};
use super::sections::{Ref, check_name_key};

/// Keys of a polling pool.
pub(crate) const POOL_KEYS: &[&str] = &[
    "name",
    "description",
    "task_groups",
    "task_group",
    "rotation_strategy",
    "weights",
    "health_check_interval",
    "health_check",
    "failure_threshold",
    "recovery_time",
    "fallback_config",
    "fallback_strategy",
    "max_instance_attempts",
];
/// Top-level keys that only a polling pool has: a seed file with one of them is a pool.
pub(crate) const POOL_ONLY_KEYS: &[&str] = &[
    "rotation_strategy",
    "task_group",
    "weights",
    "health_check_interval",
    "health_check",
    "fallback_strategy",
    "max_instance_attempts",
];
/// Keys of a pool's `fallback_config:`.
pub(crate) const POOL_FALLBACK_KEYS: &[&str] = &["strategy", "max_instance_attempts"];
/// Keys of a wrapper.
pub(crate) const WRAPPER_KEYS: &[&str] = &["description", "target", "fallback_groups"];

/// The references of a polling pool, checked once every file is read.
#[derive(Default)]
pub(crate) struct PoolRefs {
    /// Its task group.
    pub(crate) task_group: Option<Ref>,
    /// Every key of `weights` (a model of that group), at the key.
    pub(crate) weights: Vec<Ref>,
}

/// The references of a wrapper, checked once every file is read.
#[derive(Default)]
pub(crate) struct WrapperRefs {
    /// `target`.
    pub(crate) target: Option<Ref>,
    /// Every `fallback_groups` entry.
    pub(crate) fallback_groups: Vec<Ref>,
}

/// Reads a polling pool from the mapping `view`. `name` is the pool's name (the map
/// key, or the file's `name:` or stem); when `check_name` holds, a `name:` key must
/// equal it.
pub(crate) fn polling_pool(
    ctx: &mut Ctx,
    view: &MapView<'_>,
    name: &str,
    check_name: bool,
) -> (PollingPoolConfig, PoolRefs) {
    let mut refs = PoolRefs::default();
    let mut pool = PollingPoolConfig::default();
    view.check_keys(ctx, POOL_KEYS);

    check_name_key(ctx, view, name, "pool", check_name);
    pool.description = view.string(ctx, "description");

    refs.task_group = task_group(ctx, view);
    if let Some(group) = &refs.task_group {
        pool.task_group = group.value.clone();
    }

    if let Some(strategy) = view.string_at(ctx, "rotation_strategy") {
        match RotationStrategy::from_name(&strategy.value) {
            Some(s) => pool.rotation_strategy = s,
            None => unknown_name(ctx, &strategy, "rotation strategy", RotationStrategy::NAMES),
        }
    }
    if let Some(node) = view.value("weights") {
        let path = view.path_of("weights");
        if let Some(weights) = map(ctx, node, &path) {
            for entry in weights.entries {
                if let Some(w) = weights.u32(ctx, &entry.key, 1) {
                    pool.weights.insert(entry.key.clone(), w);
                }
                refs.weights.push(At {
                    value: entry.key.clone(),
                    pos: entry.key_pos,
                    path: weights.path_of(&entry.key),
                });
            }
        }
        if pool.rotation_strategy != RotationStrategy::Weighted {
            ctx.error(
                view.get("weights").map_or(view.pos, |e| e.key_pos),
                &path,
                format!(
                    "`weights` only apply to `rotation_strategy: weighted`, but this pool \
                     uses `{}`",
                    pool.rotation_strategy.as_str()
                ),
                Some("set `rotation_strategy: weighted`, or remove `weights`".to_owned()),
            );
        }
    }
    if let Some(v) = view.f64(ctx, "health_check_interval", Bound::Positive) {
        pool.health_check_interval = v;
    }
    if let Some(kind) = view.string_at(ctx, "health_check") {
        match HealthCheckKind::from_name(&kind.value) {
            Some(k) => pool.health_check = k,
            None => unknown_name(ctx, &kind, "health check", HealthCheckKind::NAMES),
        }
    }
    if let Some(v) = view.u32(ctx, "failure_threshold", 1) {
        pool.failure_threshold = v;
    }
    if let Some(v) = view.f64(ctx, "recovery_time", Bound::NonNegative) {
        pool.recovery_time = v;
    }
    pool.fallback_config = pool_fallback(ctx, view);
    (pool, refs)
}

/// The pool's one task group: `task_groups: [g]` (seed form, exactly one entry) or
/// `task_group: g`.
fn task_group(ctx: &mut Ctx, view: &MapView<'_>) -> Option<Ref> {
    let single = view.string_at(ctx, "task_group");
    let list_node = view.get("task_groups").map(|e| &e.value);
    if let (Some(one), Some(_)) = (&single, list_node) {
        ctx.error(
            view.get("task_group").map_or(one.pos, |e| e.key_pos),
            &one.path,
            "`task_group` and `task_groups` both name the pool's task group",
            Some("keep one of them".to_owned()),
        );
        return single;
    }
    if single.is_some() {
        return single;
    }
    let Some(node) = list_node else {
        if view.get("task_group").is_none() {
            view.missing(
                ctx,
                "task_groups",
                Some(
                    "name the one task group whose models the pool rotates, e.g. \
                      `task_groups: [fast_group]`"
                        .to_owned(),
                ),
            );
        }
        return None;
    };
    let path = view.path_of("task_groups");
    let failed_before = ctx.errors.len();
    let mut groups = view.string_list(ctx, "task_groups").unwrap_or_default();
    if ctx.errors.len() > failed_before {
        return None;
    }
    if groups.len() == 1 {
        return groups.pop();
    }
    let hint = match groups.first() {
        Some(first) => format!(
            "seed 002, task isolation: a pool rotates the models of one task only; make one \
             pool per task group (e.g. `{}_pool` with `task_groups: [{}]`)",
            first.value.strip_suffix("_group").unwrap_or(&first.value),
            first.value
        ),
        None => "name the one task group whose models the pool rotates, e.g. \
                 `task_groups: [fast_group]`"
            .to_owned(),
    };
    ctx.error(
        node.pos,
        &path,
        format!(
            "a polling pool serves exactly one task group, found {}",
            groups.len()
        ),
        Some(hint),
    );
    None
}

/// The pool's fallback: `fallback_config: { strategy, max_instance_attempts }`, or seed
/// 002's top-level `fallback_strategy` and `max_instance_attempts` (not both forms).
fn pool_fallback(ctx: &mut Ctx, view: &MapView<'_>) -> PoolFallbackConfig {
    let mut config = PoolFallbackConfig::default();
    let nested = view.get("fallback_config");
    let flat: Vec<&str> = ["fallback_strategy", "max_instance_attempts"]
        .into_iter()
        .filter(|k| view.get(k).is_some())
        .collect();
    if nested.is_some() && !flat.is_empty() {
        for key in &flat {
            ctx.error(
                view.get(key).map_or(view.pos, |e| e.key_pos),
                &view.path_of(key),
                format!("`{key}` and `fallback_config` both set the pool's fallback"),
                Some(
                    "use one form: `fallback_config: { strategy: instance_rotation, \
                     max_instance_attempts: 2 }`, or seed 002's top-level \
                     `fallback_strategy` and `max_instance_attempts`"
                        .to_owned(),
                ),
            );
        }
        return config;
    }
    let (source, strategy_key) = match view.value("fallback_config") {
        Some(node) => {
            let path = view.path_of("fallback_config");
            let Some(inner) = map(ctx, node, &path) else {
                return config;
            };
            inner.check_keys(ctx, POOL_FALLBACK_KEYS);
            (inner, "strategy")
        }
        None => (
            MapView {
                entries: view.entries,
                path: view.path.clone(),
                pos: view.pos,
            },
            "fallback_strategy",
        ),
    };
    if let Some(strategy) = source.string_at(ctx, strategy_key) {
        match PoolFallbackStrategy::from_name(&strategy.value) {
            Some(s) => config.strategy = s,
            None => unknown_name(
                ctx,
                &strategy,
                "pool fallback strategy",
                PoolFallbackStrategy::NAMES,
            ),
        }
    }
    if let Some(v) = source.u32(ctx, "max_instance_attempts", 1) {
        config.max_instance_attempts = v;
    }
    config
}

/// Records "unknown {what} `x`" with a did-you-mean hint or the accepted names.
fn unknown_name(ctx: &mut Ctx, value: &At<String>, what: &str, names: &[&str]) {
    ctx.error(
        value.pos,
        &value.path,
        format!("unknown {what} `{}`", value.value),
        Some(reference_hint(
            &value.value,
            "values",
            names.iter().copied(),
        )),
    );
}

/// Reads one wrapper (`wrappers.<name>:`).
pub(crate) fn wrapper(ctx: &mut Ctx, view: &MapView<'_>) -> (WrapperConfig, WrapperRefs) {
    let mut refs = WrapperRefs::default();
    let mut wrapper = WrapperConfig::default();
    view.check_keys(ctx, WRAPPER_KEYS);
    wrapper.description = view.string(ctx, "description");
    match view.string_at(ctx, "target") {
        Some(target) => {
            wrapper.target = target.value.clone();
            refs.target = Some(target);
        }
        None if view.value("target").is_none() => view.missing(
            ctx,
            "target",
            Some("name the route tried first, e.g. `target: fast_group.echelon1`".to_owned()),
        ),
        None => {}
    }
    let groups = view.string_list(ctx, "fallback_groups").unwrap_or_default();
    wrapper.fallback_groups = groups.iter().map(|g| g.value.clone()).collect();
    refs.fallback_groups = groups;
    (wrapper, refs)
}

/// Whether a seed file's top level is a polling pool: a pool-only key, or
/// `task_groups:` written as a list or a single name (the native section is a mapping).
pub(crate) fn is_pool_file(entries: &[super::node::Entry]) -> bool {
    entries.iter().any(|e| {
        POOL_ONLY_KEYS.contains(&e.key.as_str())
            || (e.key == "task_groups" && matches!(e.value.kind, Kind::Seq(_) | Kind::Str { .. }))
    })
}

/// The name of a seed pool file: its `name:` when it is a string, else `stem`.
pub(crate) fn seed_name(view: &MapView<'_>, stem: &str) -> (String, Pos) {
    view.get("name")
        .and_then(|e| match &e.value.kind {
            Kind::Str { value, .. } => Some((value.clone(), e.value.pos)),
            _ => None,
        })
        .unwrap_or_else(|| (stem.to_owned(), Pos::default()))
}

/// "did you mean" among the models of a group, or the list of them.
pub(crate) fn group_model_hint(word: &str, group: &str, models: &[&str]) -> String {
    did_you_mean(word, models.iter().copied()).unwrap_or_else(|| {
        let listed: Vec<String> = models.iter().map(|m| format!("`{m}`")).collect();
        format!(
            "the models of task group `{group}` are {}",
            listed.join(", ")
        )
    })
}

/// Models of a group, deduplicated, in echelon order.
pub(crate) fn models_of(group: &super::model::TaskGroupConfig) -> Vec<&str> {
    let mut seen = BTreeMap::new();
    let mut out = Vec::new();
    for m in group.echelons.iter().flat_map(|e| e.models.iter()) {
        if seen.insert(m.as_str(), ()).is_none() {
            out.push(m.as_str());
        }
    }
    out
}
