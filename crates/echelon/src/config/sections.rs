//! Reading the sections of a configuration file: `server`, `providers.<id>`,
//! `models.<id>`, task groups (`task_groups.<name>` or a seed group file) and `usage`.
//!
//! Each section is a `#[derive(Deserialize)]` struct of [`model`](super::model), read
//! with [`de::read`](super::de::read) (every field, its default and its bounds are
//! written once, on the struct). What is left here is what serde does not say: the
//! `echelon<N>` keys of a task group and their order, the references to check once
//! every file is read (with where they are written), required keys that depend on the
//! format, resolving the ledger path, and warnings.

use std::path::{Path, PathBuf};

use super::de::{Scope, fields_of, read, read_in, scalar_text};
use super::env::EnvLookup;
use super::error::did_you_mean;
use super::model::{
    EchelonConfig, FallbackConfig, ModelConfig, ProviderApi, ProviderConfig, ServerConfig,
    TaskGroupConfig, UsageConfig,
};
use super::node::{Entry, Kind, Node, Pos, index, join};
use super::read::{At, Ctx, MapView, map};
use super::value::limits::QUEUE_TIMEOUT_WARN;
use super::value::show;

/// A reference to something defined elsewhere (a provider, a model, a route).
pub(crate) type Ref = At<String>;

/// The references of a task group, checked once every file is read.
#[derive(Default)]
pub(crate) struct GroupRefs {
    /// Every model named by an echelon.
    pub(crate) models: Vec<Ref>,
    /// Every `fallback_groups` entry.
    pub(crate) fallback_groups: Vec<Ref>,
}

/// The entry `key` of the mapping `node`.
pub(crate) fn entry<'n>(node: &'n Node, key: &str) -> Option<&'n Entry> {
    node.entries()?.iter().find(|e| e.key == key)
}

/// The reference written as the value of `key` in the mapping `node` (at key path
/// `path`), when it is a scalar (anything else is an error of the section's read).
pub(crate) fn ref_at(node: &Node, path: &str, key: &str) -> Option<Ref> {
    let entry = entry(node, key)?;
    Some(At {
        value: scalar_text(&entry.value)?.to_owned(),
        pos: entry.value.pos,
        path: join(path, key),
    })
}

/// The references listed under `key` of the mapping `node` (at key path `path`): its
/// scalar items, each where it is written.
pub(crate) fn refs_in(node: &Node, path: &str, key: &str) -> Vec<Ref> {
    let Some(Kind::Seq(items)) = entry(node, key).map(|e| &e.value.kind) else {
        return Vec::new();
    };
    let list = join(path, key);
    items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| {
            Some(At {
                value: scalar_text(item)?.to_owned(),
                pos: item.pos,
                path: index(&list, i),
            })
        })
        .collect()
}

/// Records "missing `key`" when the mapping `node` has no value for it (nothing when
/// `node` is not a mapping: that is reported already).
fn require(ctx: &mut Ctx, node: &Node, path: &str, key: &str, hint: &str) {
    let entries = match &node.kind {
        Kind::Map(entries) => entries.as_slice(),
        Kind::Null => &[],
        _ => return,
    };
    let view = MapView {
        entries,
        path: path.to_owned(),
        pos: node.pos,
    };
    if view.value(key).is_none() {
        view.missing(ctx, key, Some(hint.to_owned()));
    }
}

/// Reads `server:`.
///
/// Warns when gateway auth is off without it looking meant: `api_keys` lists entries
/// that are all empty once `${VAR}`s are substituted (`${ECHELON_KEY:-}` with the
/// variable unset), or `host` is not a loopback address and no key is configured.
pub(crate) fn server(ctx: &mut Ctx, node: &Node, path: &str) -> ServerConfig {
    let server: ServerConfig = read(ctx, node, path).unwrap_or_default();
    if server.api_keys.is_empty()
        && let Some(e) = entry(node, "api_keys")
        && matches!(&e.value.kind, Kind::Seq(items) if !items.is_empty())
    {
        ctx.warn(
            e.value.pos,
            &join(path, "api_keys"),
            "every `api_keys` entry is empty after substitution: gateway authentication is off",
            Some(
                "set the variable (e.g. `ECHELON_KEY`), or write `api_keys: []` to run \
                 without keys on purpose"
                    .to_owned(),
            ),
        );
    }
    if server.api_keys.is_empty()
        && !is_loopback_host(&server.host)
        && let Some(e) = entry(node, "host")
    {
        ctx.warn(
            e.value.pos,
            &join(path, "host"),
            format!(
                "`host: {}` accepts connections from other machines and no `api_keys` \
                 are configured: anyone who can reach it can spend your provider keys",
                server.host
            ),
            Some("add `server.api_keys`, or listen on `127.0.0.1`".to_owned()),
        );
    }
    server
}

/// Whether `host` (a `server.host` value) names only this machine: `localhost` or a
/// loopback IP.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    let h = host.trim().trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Reads one provider (`providers.<id>:`).
pub(crate) fn provider(ctx: &mut Ctx, node: &Node, path: &str) -> ProviderConfig {
    let provider: Option<ProviderConfig> = read(ctx, node, path);
    if let Some(p) = &provider
        && p.responses
        && p.api != ProviderApi::OpenAi
        && let Some(view) = map(ctx, node, path)
        && let Some(e) = view.get("responses")
    {
        ctx.error(
            e.key_pos,
            &join(path, "responses"),
            format!(
                "`responses: true` is for `api: openai` providers; this one is `api: {}`",
                p.api.as_str()
            ),
            Some("remove `responses`: /v1/responses requests are translated for this wire".into()),
        );
    }
    provider.unwrap_or_else(|| ProviderConfig {
        base_url: String::new(),
        api_keys: Vec::new(),
        api: Default::default(),
        key_cooldown: ProviderConfig::DEFAULT_KEY_COOLDOWN,
        headers: Default::default(),
        responses: false,
    })
}

/// The `model_defaults:` of a file: model keys merged under each model of that file
/// (a key the model writes wins). Read and checked once, as a model without a provider;
/// `None` (nothing merged) when it is not a mapping or has an error, so that an error
/// in it is reported once, at `model_defaults.<key>`, not once per model.
pub(crate) struct ModelDefaults {
    entries: Vec<Entry>,
}

/// Reads `model_defaults:` (see [`ModelDefaults`]). `model` is refused: it is one
/// model's upstream name, which defaults to the model's id.
pub(crate) fn model_defaults(ctx: &mut Ctx, node: &Node) -> Option<ModelDefaults> {
    const PATH: &str = "model_defaults";
    let view = map(ctx, node, PATH)?;
    let before = ctx.errors.len();
    if let Some(e) = view.get("model") {
        ctx.error(
            e.key_pos,
            &join(PATH, "model"),
            "`model` cannot be a default: it is one model's upstream name",
            Some("write `model:` on the model; it defaults to the model's id".to_owned()),
        );
    }
    let _: Option<ModelConfig> = read(ctx, node, PATH);
    (ctx.errors.len() == before).then(|| ModelDefaults {
        entries: view.entries.to_vec(),
    })
}

impl ModelDefaults {
    /// `model` with every default it does not write itself appended (each keeps the
    /// position where `model_defaults:` writes it, for errors); `model` as it is when it
    /// is not a mapping (reading it reports that).
    pub(crate) fn under(&self, model: &Node) -> Node {
        let Kind::Map(own) = &model.kind else {
            return model.clone();
        };
        let written: std::collections::HashSet<&str> = own.iter().map(|e| e.key.as_str()).collect();
        let mut entries = own.clone();
        entries.extend(
            self.entries
                .iter()
                .filter(|d| !written.contains(d.key.as_str()))
                .cloned(),
        );
        Node {
            kind: Kind::Map(entries),
            pos: model.pos,
        }
    }
}

/// Reads one model `id` (`models.<id>:`, or `<provider>.<id>` of a seed
/// `provider.json`, where `provider` is given by the nesting and may not be a key).
/// Returns the model and the reference to its provider (native format only).
pub(crate) fn model(
    ctx: &mut Ctx,
    node: &Node,
    id: &str,
    path: &str,
    provider: Option<&str>,
) -> (ModelConfig, Option<Ref>) {
    let read_model = match provider {
        None => read(ctx, node, path),
        Some(_) => {
            if let Some(e) = entry(node, "provider") {
                ctx.error(
                    e.key_pos,
                    &join(path, "provider"),
                    "unknown key `provider`",
                    Some(
                        "in a seed `provider.json` the enclosing key names the provider".to_owned(),
                    ),
                );
            }
            let keeps = |k: &str| k != "provider";
            let scope = Scope {
                keeps: &keeps,
                also_known: &[],
            };
            read_in(ctx, node, path, Some(scope))
        }
    };
    let mut model = read_model.unwrap_or_else(|| ModelConfig::new(String::new(), String::new()));
    if model.model.is_empty() {
        model.model = id.to_owned();
    }
    let provider_ref = match provider {
        Some(p) => {
            model.provider = p.to_owned();
            None
        }
        None => {
            require(
                ctx,
                node,
                path,
                "provider",
                "name one of the `providers:` entries",
            );
            ref_at(node, path, "provider")
        }
    };
    if model.queue_timeout > QUEUE_TIMEOUT_WARN
        && let Some(e) = entry(node, "queue_timeout")
    {
        let secs = model.queue_timeout.as_secs_f64();
        ctx.warn(
            e.value.pos,
            &join(path, "queue_timeout"),
            format!(
                "`queue_timeout` is in seconds since durations have one unit (it was \
                 milliseconds): {} looks like milliseconds",
                show(secs)
            ),
            Some(format!(
                "for {} ms write `queue_timeout: {}`",
                show(secs),
                show(secs / 1000.0)
            )),
        );
    }
    (model, provider_ref)
}

/// Reads `usage:`. `env` resolves the default ledger path (and `~/` in a path);
/// a relative path is taken relative to the directory of the file being read.
pub(crate) fn usage(ctx: &mut Ctx, node: &Node, path: &str, env: EnvLookup<'_>) -> UsageConfig {
    let mut usage: UsageConfig =
        read(ctx, node, path).unwrap_or_else(|| UsageConfig::with_ledger_path(None));
    usage.ledger_path = match usage.ledger_path.take() {
        // Absent or `true`.
        Some(p) if p.as_os_str().is_empty() => UsageConfig::default_ledger_path_with_env(env),
        Some(p) => Some(ledger_file(&p.to_string_lossy(), &ctx.file, env)),
        None => None,
    };
    usage
}

/// The ledger file `written` in the file `config_file`: `~/…` is under `$HOME`, a
/// relative path is relative to the configuration file's directory.
fn ledger_file(written: &str, config_file: &str, env: EnvLookup<'_>) -> PathBuf {
    if let Some(rest) = written.strip_prefix("~/")
        && let Some(home) = env("HOME").filter(|h| !h.is_empty())
    {
        return Path::new(&home).join(rest);
    }
    let path = Path::new(written);
    if path.is_absolute() {
        return path.to_path_buf();
    }
    match Path::new(config_file).parent() {
        Some(dir) => dir.join(path),
        None => path.to_path_buf(),
    }
}

/// The number of an `echelon<N>` key: `Some(N)` for `echelon1`, `echelon2`, … (no
/// sign, no leading zero; `echelon0` gives `Some(0)`, which the caller rejects).
pub(crate) fn echelon_number(key: &str) -> Option<u32> {
    let digits = key.strip_prefix("echelon")?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Reads the `name:` key of a task group or polling pool (`what`); when `check` holds,
/// reports one that differs from `name`, the name it is known by (its map key, or its
/// file's stem).
pub(crate) fn check_name_key(
    ctx: &mut Ctx,
    view: &MapView<'_>,
    name: &str,
    what: &str,
    check: bool,
) {
    if let Some(given) = view.string_at(ctx, "name")
        && check
        && given.value != name
    {
        ctx.error(
            given.pos,
            &given.path,
            format!("`name` is `{}` but the {what} is `{name}`", given.value),
            Some(format!("remove `name` or make it `{name}`")),
        );
    }
}

/// Keys of a task group besides `echelon<N>`: the fields of [`TaskGroupConfig`] and
/// `name`.
fn group_keys() -> Vec<&'static str> {
    let mut keys = fields_of::<TaskGroupConfig>().to_vec();
    keys.push("name");
    keys
}

/// Reads a task group from the mapping `node`, seen as `view`. `name` is the group's
/// name (the map key, or the file's `name:`); `key_pos` is where it is written. When
/// `check_name` holds, a `name:` key must equal `name`.
pub(crate) fn task_group(
    ctx: &mut Ctx,
    node: &Node,
    view: &MapView<'_>,
    name: &str,
    key_pos: Pos,
    check_name: bool,
) -> (TaskGroupConfig, GroupRefs) {
    let mut refs = GroupRefs::default();
    let group_keys = group_keys();
    let mut numbered: Vec<(u32, Pos, String)> = view
        .entries
        .iter()
        .filter_map(|e| echelon_number(&e.key).map(|n| (n, e.key_pos, e.key.clone())))
        .collect();
    let next = numbered
        .iter()
        .map(|(n, _, _)| *n)
        .max()
        .unwrap_or(0)
        .saturating_add(1);
    // The echelon keys written and the next number: not every number up to the largest
    // (`echelon4000000000` would make four billion candidates).
    let candidates: Vec<String> = group_keys
        .iter()
        .map(|k| (*k).to_owned())
        .chain(numbered.iter().map(|(_, _, k)| k.clone()))
        .chain(std::iter::once(format!("echelon{next}")))
        .collect();
    for entry in view.entries {
        let key = entry.key.as_str();
        if group_keys.contains(&key) {
            continue;
        }
        match echelon_number(key) {
            Some(0) => ctx.error(
                entry.key_pos,
                &view.path_of(key),
                "echelon numbers start at 1",
                Some("rename it `echelon1`".to_owned()),
            ),
            Some(_) => {}
            None => ctx.error(
                entry.key_pos,
                &view.path_of(key),
                format!("unknown key `{key}`"),
                Some(
                    did_you_mean(key, candidates.iter().map(String::as_str)).unwrap_or_else(|| {
                        "a task group has `echelon1`, `echelon2`, …, `description`, `name`, \
                         `fallback_config` and `stream_failure`"
                            .to_owned()
                    }),
                ),
            ),
        }
    }
    numbered.retain(|(n, _, _)| *n > 0);
    numbered.sort_by_key(|(n, _, _)| *n);
    let mut expected = 1u32;
    for (n, pos, key) in &numbered {
        if *n != expected {
            ctx.error(
                *pos,
                &view.path_of(key),
                format!(
                    "echelon numbers must be contiguous from 1: `{key}` comes after {}",
                    if expected == 1 {
                        "nothing".to_owned()
                    } else {
                        format!("`echelon{}`", expected - 1)
                    }
                ),
                Some(format!("rename it `echelon{expected}`")),
            );
        }
        expected = n.saturating_add(1);
    }

    check_name_key(ctx, view, name, "group", check_name);
    // The fields (`description`, `fallback_config`); the keys above are not theirs.
    let fields = fields_of::<TaskGroupConfig>();
    let keeps = |k: &str| fields.contains(&k);
    let scope = Scope {
        keeps: &keeps,
        also_known: &[],
    };
    let mut group: TaskGroupConfig =
        read_in(ctx, node, &view.path, Some(scope)).unwrap_or_default();

    for (_, _, key) in &numbered {
        let Some(entry) = view.get(key) else { continue };
        let path = view.path_of(key);
        group
            .echelons
            .push(echelon(ctx, &entry.value, key, &path, &mut refs));
    }
    if numbered.is_empty() {
        ctx.error(
            key_pos,
            &view.path,
            format!("task group `{name}` has no echelons"),
            Some("add `echelon1: { models: [some-model] }`".to_owned()),
        );
    }
    order_by_priority(&mut group.echelons);

    if let Some(e) = view.get("fallback_config") {
        let path = view.path_of("fallback_config");
        refs.fallback_groups = refs_in(&e.value, &path, "fallback_groups");
    }
    (group, refs)
}

/// Puts echelons (given in number order) in the order they are tried: ascending
/// `priority`, those without one last; ties keep number order.
fn order_by_priority(echelons: &mut [EchelonConfig]) {
    echelons.sort_by_key(|e| (e.priority.is_none(), e.priority));
}

/// Reads the echelon `name` (`echelon<N>:`) at `path`, adding the models it names
/// to `refs`.
fn echelon(
    ctx: &mut Ctx,
    node: &Node,
    name: &str,
    path: &str,
    refs: &mut GroupRefs,
) -> EchelonConfig {
    let mut echelon: EchelonConfig = read(ctx, node, path).unwrap_or_default();
    echelon.name = name.to_owned();
    let models = entry(node, "models");
    // Not a list at all is reported by the read already.
    let unreadable = models.is_some_and(|m| !matches!(m.value.kind, Kind::Seq(_) | Kind::Null));
    if echelon.models.is_empty() && matches!(node.kind, Kind::Map(_) | Kind::Null) && !unreadable {
        let (pos, at) = match models {
            Some(m) => (m.key_pos, join(path, "models")),
            None => (node.pos, path.to_owned()),
        };
        ctx.error(
            pos,
            &at,
            format!("echelon `{name}` has no models"),
            Some("add `models: [some-model]`".to_owned()),
        );
    }
    refs.models.extend(refs_in(node, path, "models"));
    echelon
}

/// Reads a `fallback_config:` (the top level of a seed global fallback file, for the
/// migration), adding its `fallback_groups` to `refs`.
pub(crate) fn fallback(
    ctx: &mut Ctx,
    node: &Node,
    path: &str,
    refs: &mut GroupRefs,
) -> Option<FallbackConfig> {
    let config = read(ctx, node, path)?;
    refs.fallback_groups
        .extend(refs_in(node, path, "fallback_groups"));
    Some(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echelon_numbers() {
        assert_eq!(echelon_number("echelon1"), Some(1));
        assert_eq!(echelon_number("echelon12"), Some(12));
        assert_eq!(echelon_number("echelon0"), Some(0));
        assert_eq!(echelon_number("echelon01"), None);
        assert_eq!(echelon_number("echelon"), None);
        assert_eq!(echelon_number("echelon_1"), None);
        assert_eq!(echelon_number("echelon+1"), None);
    }
}
