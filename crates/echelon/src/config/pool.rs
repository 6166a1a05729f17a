//! Reading polling pools (`polling_pools.<name>` or a seed pool file) and wrappers
//! (`wrappers.<name>`): the routes built on top of task groups (seeds 001 and 002).

use std::collections::BTreeMap;

use super::de::{Scope, read, read_in};
use super::error::did_you_mean;
use super::model::{PollingPoolConfig, PoolFallbackConfig, WrapperConfig};
use super::node::{Kind, Node, Pos};
use super::read::{At, Ctx, MapView};
use super::sections::{Ref, check_name_key, ref_at, refs_in};

/// Keys of a polling pool read here, around the fields of [`PollingPoolConfig`].
const POOL_HAND_KEYS: &[&str] = &[
    "name",
    "task_groups",
    "task_group",
    "fallback_strategy",
    "max_instance_attempts",
];
/// Seed 002's top-level form of a pool's `fallback_config`.
const FLAT_FALLBACK_KEYS: &[&str] = &["fallback_strategy", "max_instance_attempts"];
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

/// Reads a polling pool from the mapping `node`, seen as `view`. `name` is the pool's
/// name (the map key, or the file's `name:` or stem); when `check_name` holds, a
/// `name:` key must equal it.
pub(crate) fn polling_pool(
    ctx: &mut Ctx,
    node: &Node,
    view: &MapView<'_>,
    name: &str,
    check_name: bool,
) -> (PollingPoolConfig, PoolRefs) {
    let mut refs = PoolRefs::default();
    let keeps = |k: &str| !POOL_HAND_KEYS.contains(&k);
    let scope = Scope {
        keeps: &keeps,
        also_known: POOL_HAND_KEYS,
    };
    let mut pool: PollingPoolConfig =
        read_in(ctx, node, &view.path, Some(scope)).unwrap_or_default();

    check_name_key(ctx, view, name, "pool", check_name);
    refs.task_group = task_group(ctx, view);
    if let Some(group) = &refs.task_group {
        pool.task_group = group.value.clone();
    }

    if view.value("weights").is_some() {
        let path = view.path_of("weights");
        if let Some(weights) = view.value("weights").and_then(Node::entries) {
            refs.weights = weights
                .iter()
                .map(|e| At {
                    value: e.key.clone(),
                    pos: e.key_pos,
                    path: super::node::join(&path, &e.key),
                })
                .collect();
        }
        if pool.rotation_strategy != super::model::RotationStrategy::Weighted {
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
    pool.fallback_config = pool_fallback(ctx, node, view, pool.fallback_config);
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

/// The pool's fallback: `nested` (its `fallback_config:`, read with the pool), or seed
/// 002's top-level `fallback_strategy` and `max_instance_attempts` (not both forms).
fn pool_fallback(
    ctx: &mut Ctx,
    node: &Node,
    view: &MapView<'_>,
    nested: PoolFallbackConfig,
) -> PoolFallbackConfig {
    let flat: Vec<&str> = FLAT_FALLBACK_KEYS
        .iter()
        .copied()
        .filter(|k| view.get(k).is_some())
        .collect();
    if flat.is_empty() {
        return nested;
    }
    if view.get("fallback_config").is_some() {
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
        return PoolFallbackConfig::default();
    }
    // `fallback_strategy` is the alias of `strategy`.
    let keeps = |k: &str| FLAT_FALLBACK_KEYS.contains(&k);
    let scope = Scope {
        keeps: &keeps,
        also_known: &[],
    };
    read_in(ctx, node, &view.path, Some(scope)).unwrap_or_default()
}

/// Reads one wrapper (`wrappers.<name>:`) from the mapping `node`, seen as `view`.
pub(crate) fn wrapper(
    ctx: &mut Ctx,
    node: &Node,
    view: &MapView<'_>,
) -> (WrapperConfig, WrapperRefs) {
    let wrapper: WrapperConfig = read(ctx, node, &view.path).unwrap_or_default();
    let refs = WrapperRefs {
        target: ref_at(node, &view.path, "target"),
        fallback_groups: refs_in(node, &view.path, "fallback_groups"),
    };
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
