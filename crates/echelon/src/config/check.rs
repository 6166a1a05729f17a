//! Checks across files, once everything is read: one namespace for routes, every
//! reference resolves, no wrapper reaches itself.

use std::collections::{BTreeMap, HashMap};

use super::error::{ConfigError, reference_hint};
use super::load::{Item, at};
use super::model::{Config, ModelConfig, PollingPoolConfig, TaskGroupConfig, WrapperConfig};
use super::pool::{PoolRefs, WrapperRefs, group_model_hint, models_of};
use super::read::located;
use super::sections::{GroupRefs, Ref};

/// Everything defined, with where.
pub(crate) struct Defined<'a> {
    pub(crate) models: &'a [Item<ModelConfig, Option<Ref>>],
    pub(crate) groups: &'a [Item<TaskGroupConfig, GroupRefs>],
    pub(crate) pools: &'a [Item<PollingPoolConfig, PoolRefs>],
    pub(crate) wrappers: &'a [Item<WrapperConfig, WrapperRefs>],
    pub(crate) default_route: Option<&'a Item<String, Ref>>,
}

/// A kind of route name: (in messages, in hints).
#[derive(Clone, Copy)]
struct RouteKind {
    message: &'static str,
    hint: &'static str,
}

const MODEL: RouteKind = RouteKind {
    message: "model id",
    hint: "model",
};
const GROUP: RouteKind = RouteKind {
    message: "task group",
    hint: "task group",
};
const POOL: RouteKind = RouteKind {
    message: "polling pool",
    hint: "polling pool",
};
const WRAPPER: RouteKind = RouteKind {
    message: "wrapper",
    hint: "wrapper",
};

/// Where a name is defined.
struct Place<'a> {
    kind: RouteKind,
    id: &'a str,
    file: &'a str,
    pos: super::node::Pos,
    path: &'a str,
}

fn places<'a, T, R>(kind: RouteKind, items: &'a [Item<T, R>]) -> impl Iterator<Item = Place<'a>> {
    items.iter().map(move |i| Place {
        kind,
        id: &i.id,
        file: &i.file,
        pos: i.pos,
        path: &i.path,
    })
}

/// Checks every reference of `defined` against `config` (built from it).
pub(crate) fn check_references(
    config: &Config,
    defined: &Defined<'_>,
    errors: &mut Vec<ConfigError>,
) {
    let provider_ids = || config.providers.keys().map(String::as_str);
    let model_ids = || config.models.keys().map(String::as_str);
    let group_names = || config.task_groups.keys().map(String::as_str);

    for item in defined.models {
        if let Some(r) = &item.refs
            && !config.providers.contains_key(&r.value)
        {
            errors.push(located(
                &item.file,
                r.pos,
                &r.path,
                format!(
                    "model `{}` names provider `{}`, which is not defined",
                    item.id, r.value
                ),
                Some(reference_hint(&r.value, "providers", provider_ids())),
            ));
        }
    }

    namespace(defined, errors);

    for item in defined.groups {
        for r in &item.refs.models {
            if !config.models.contains_key(&r.value) {
                errors.push(located(
                    &item.file,
                    r.pos,
                    &r.path,
                    format!("model `{}` is not defined", r.value),
                    Some(reference_hint(&r.value, "models", model_ids())),
                ));
            }
        }
        for r in &item.refs.fallback_groups {
            route(config, &item.file, r, errors);
        }
    }

    for item in defined.pools {
        let Some(r) = &item.refs.task_group else {
            continue;
        };
        let Some(group) = config.task_groups.get(&r.value) else {
            errors.push(located(
                &item.file,
                r.pos,
                &r.path,
                format!(
                    "polling pool `{}` names task group `{}`, which is not defined",
                    item.id, r.value
                ),
                Some(reference_hint(&r.value, "task groups", group_names())),
            ));
            continue;
        };
        let members = models_of(group);
        for w in &item.refs.weights {
            if !members.contains(&w.value.as_str()) {
                errors.push(located(
                    &item.file,
                    w.pos,
                    &w.path,
                    format!(
                        "`{}` is not a model of task group `{}`, so it has no weight in \
                         pool `{}`",
                        w.value, r.value, item.id
                    ),
                    Some(group_model_hint(&w.value, &r.value, &members)),
                ));
            }
        }
    }

    for item in defined.wrappers {
        for r in item.refs.target.iter().chain(&item.refs.fallback_groups) {
            route(config, &item.file, r, errors);
        }
    }
    wrapper_cycles(defined.wrappers, errors);

    if let Some(item) = defined.default_route {
        route(config, &item.file, &item.refs, errors);
    }
}

/// Model ids, task groups, polling pools and wrappers are all routes: a name may be
/// only one of them. Pools and wrappers may not contain `.` (task groups neither; see
/// below); model ids may (seed `provider/model` ids, upstream names like `qwen2.5`).
fn namespace(defined: &Defined<'_>, errors: &mut Vec<ConfigError>) {
    let all = places(MODEL, defined.models)
        .chain(places(GROUP, defined.groups))
        .chain(places(POOL, defined.pools))
        .chain(places(WRAPPER, defined.wrappers));
    let mut first: HashMap<&str, Place<'_>> = HashMap::new();
    for place in all {
        if place.kind.message != MODEL.message && place.id.contains('.') {
            errors.push(located(
                place.file,
                place.pos,
                place.path,
                format!("{} name `{}` contains `.`", place.kind.message, place.id),
                Some(format!(
                    "routes use `.` to name an echelon (`group.echelon2`); rename the {}",
                    place.kind.hint
                )),
            ));
        }
        match first.get(place.id) {
            // Same-kind duplicates are reported by the merge already.
            Some(earlier) if earlier.kind.message != place.kind.message => {
                errors.push(located(
                    place.file,
                    place.pos,
                    place.path,
                    format!(
                        "`{}` is both a {} and a {}",
                        place.id, place.kind.message, earlier.kind.message
                    ),
                    Some(format!(
                        "the {} is defined at {} and the {} at {}; rename one so routes \
                         are unambiguous",
                        earlier.kind.hint,
                        at(earlier.file, earlier.pos),
                        place.kind.hint,
                        at(place.file, place.pos),
                    )),
                ));
            }
            Some(_) => {}
            None => {
                first.insert(place.id, place);
            }
        }
    }
}

/// Records an error when `r` does not name a route.
fn route(config: &Config, file: &str, r: &Ref, errors: &mut Vec<ConfigError>) {
    if let Some(problem) = route_problem(config, &r.value) {
        let word = r.value.split('.').next().unwrap_or_default();
        let hint = match config.task_groups.get(word) {
            Some(group) if r.value.contains('.') => {
                let echelons: Vec<String> = group
                    .echelons
                    .iter()
                    .map(|e| format!("`{word}.{}`", e.name))
                    .collect();
                format!(
                    "name one of {}, or the whole group `{word}`",
                    echelons.join(", ")
                )
            }
            _ if r.value.contains('.') && route_names(config).any(|n| n == word) => {
                format!("name `{word}` itself")
            }
            _ => reference_hint(word, "routes", route_names(config)),
        };
        errors.push(located(file, r.pos, &r.path, problem, Some(hint)));
    }
}

/// Every route name but `group.echelonN`, sorted.
fn route_names(config: &Config) -> impl Iterator<Item = &str> + Clone {
    let mut names: Vec<&str> = config
        .models
        .keys()
        .chain(config.task_groups.keys())
        .chain(config.polling_pools.keys())
        .chain(config.wrappers.keys())
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names.dedup();
    names.into_iter()
}

/// Why `route` is not a model id, task group, `group.echelonN`, polling pool or
/// wrapper; `None` when it is one.
pub(crate) fn route_problem(config: &Config, route: &str) -> Option<String> {
    if config.task_groups.contains_key(route)
        || config.models.contains_key(route)
        || config.polling_pools.contains_key(route)
        || config.wrappers.contains_key(route)
    {
        return None;
    }
    if let Some((prefix, echelon)) = route.split_once('.') {
        if let Some(g) = config.task_groups.get(prefix) {
            if g.echelons.iter().any(|e| e.name == echelon) {
                return None;
            }
            let names: Vec<&str> = g.echelons.iter().map(|e| e.name.as_str()).collect();
            return Some(format!(
                "`{route}`: task group `{prefix}` has no `{echelon}` (it has {})",
                names.join(", ")
            ));
        }
        let other = if config.polling_pools.contains_key(prefix) {
            Some("a polling pool")
        } else if config.wrappers.contains_key(prefix) {
            Some("a wrapper")
        } else if config.models.contains_key(prefix) {
            Some("a model id")
        } else {
            None
        };
        if let Some(other) = other {
            return Some(format!(
                "`{route}`: `{prefix}` is {other}, and only task groups have echelons"
            ));
        }
    }
    Some(format!(
        "`{route}` is not a route (a model id, task group, `group.echelonN`, polling pool \
         or wrapper)"
    ))
}

/// Reports each cycle of wrappers (through `target` and `fallback_groups`) once, at
/// the reference that closes it.
fn wrapper_cycles(wrappers: &[Item<WrapperConfig, WrapperRefs>], errors: &mut Vec<ConfigError>) {
    let by_name: BTreeMap<&str, &Item<WrapperConfig, WrapperRefs>> =
        wrappers.iter().map(|w| (w.id.as_str(), w)).collect();
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks: BTreeMap<&str, Mark> = by_name.keys().map(|k| (*k, Mark::New)).collect();

    // Iterative depth-first search: (wrapper, index of the next reference to follow).
    for &start in by_name.keys() {
        if marks.get(start) != Some(&Mark::New) {
            continue;
        }
        let mut path: Vec<(&str, usize)> = vec![(start, 0)];
        marks.insert(start, Mark::OnPath);
        while let Some((name, next)) = path.last().copied() {
            let item = by_name[name];
            let refs: Vec<&Ref> = item
                .refs
                .target
                .iter()
                .chain(&item.refs.fallback_groups)
                .collect();
            let Some(r) = refs.get(next) else {
                marks.insert(name, Mark::Done);
                path.pop();
                continue;
            };
            if let Some(top) = path.last_mut() {
                top.1 += 1;
            }
            let target = r.value.as_str();
            match marks.get(target).copied() {
                Some(Mark::New) => {
                    marks.insert(target, Mark::OnPath);
                    path.push((target, 0));
                }
                Some(Mark::OnPath) => {
                    let from = path.iter().position(|(n, _)| *n == target).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[from..].iter().map(|(n, _)| *n).collect();
                    cycle.push(target);
                    errors.push(located(
                        &item.file,
                        r.pos,
                        &r.path,
                        format!("wrapper cycle: {}", cycle.join(" → ")),
                        Some(
                            "a wrapper must not reach itself through `target` or \
                             `fallback_groups`; point one of these at a task group, pool \
                             or model instead"
                                .to_owned(),
                        ),
                    ));
                }
                Some(Mark::Done) | None => {}
            }
        }
    }
}
