//! Loading: files and directories, recognising each file's shape, merging the
//! pieces, resolving API keys, and checking every reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};

use super::check;
use super::env::EnvLookup;
use super::error::{ConfigError, ConfigErrors, closest};
use super::model::{
    Config, KeySource, ModelConfig, PollingPoolConfig, ProviderConfig, ServerConfig,
    TaskGroupConfig, UsageConfig, WrapperConfig,
};
use super::node::{Entry, Format, Kind, Node, Pos, join, parse};
use super::pool::{self, PoolRefs, WrapperRefs};
use super::read::{Ctx, located, map};
use super::sections::{self, GroupRefs, Ref, echelon_number};
use super::seed_provider;

/// The top-level sections of the native format.
pub(crate) const SECTION_KEYS: &[&str] = &[
    "server",
    "providers",
    "models",
    "model_defaults",
    "task_groups",
    "polling_pools",
    "wrappers",
    "default_route",
    "usage",
    "state",
    "telemetry",
];

/// The stem of a global fallback file (`global_fallback.yaml`, seed 002).
pub(crate) const GLOBAL_FALLBACK_STEM: &str = "global_fallback";

/// Something defined in one file, with where.
pub(crate) struct Item<T, R> {
    /// Its id (provider id, model id, group name).
    pub(crate) id: String,
    /// The file it is in.
    pub(crate) file: String,
    /// Where its id is written.
    pub(crate) pos: Pos,
    /// Its key path in the file.
    pub(crate) path: String,
    /// The value.
    pub(crate) value: T,
    /// Its references to check.
    pub(crate) refs: R,
}

/// Everything one file defines.
#[derive(Default)]
pub(crate) struct Fragment {
    pub(crate) server: Option<Item<ServerConfig, ()>>,
    pub(crate) providers: Vec<Item<ProviderConfig, ()>>,
    pub(crate) models: Vec<Item<ModelConfig, Option<Ref>>>,
    pub(crate) groups: Vec<Item<TaskGroupConfig, GroupRefs>>,
    pub(crate) pools: Vec<Item<PollingPoolConfig, PoolRefs>>,
    pub(crate) wrappers: Vec<Item<WrapperConfig, WrapperRefs>>,
    pub(crate) default_route: Option<Item<String, Ref>>,
    pub(crate) usage: Option<Item<UsageConfig, ()>>,
    pub(crate) state: Option<Item<super::state::StateConfig, ()>>,
    pub(crate) telemetry: Option<Item<super::telemetry::TelemetryConfig, ()>>,
}

/// The shape of a file's top level.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// `server`, `providers`, `models`, `task_groups`, `polling_pools`, `wrappers`,
    /// `default_route` (also the fallback shape, so unknown keys are reported against
    /// these).
    Native,
    /// A seed task group file: `name` and/or `echelon<N>` keys, `fallback_config`, ….
    Group,
    /// A seed polling pool file (`rotation_strategy`, `task_groups: [..]`, …).
    Pool,
    /// A seed global fallback file (`strategy`, `fallback_groups`, … at the top, or
    /// named `global_fallback.*`): not loaded, `echelon config migrate` turns it into
    /// per-group `fallback_config` sections.
    GlobalFallback,
    /// A seed `provider.json`: provider → model → settings.
    SeedProvider,
}

/// The shape of a file whose top-level entries are `entries` and whose name without
/// extension is `stem`.
pub(crate) fn shape(entries: &[Entry], stem: &str) -> Shape {
    let has = |k: &str| entries.iter().any(|e| e.key == k);
    let echelons = entries.iter().any(|e| echelon_number(&e.key).is_some());
    let native = SECTION_KEYS
        .iter()
        .filter(|k| **k != "task_groups")
        .any(|k| has(k))
        || entries
            .iter()
            .any(|e| e.key == "task_groups" && matches!(e.value.kind, Kind::Map(_)));
    if !native && pool::is_pool_file(entries) {
        return Shape::Pool;
    }
    if native || has("task_groups") {
        return Shape::Native;
    }
    let global_keys = has("strategy") || has("fallback_groups");
    if stem == GLOBAL_FALLBACK_STEM || (global_keys && !echelons && !has("name")) {
        return Shape::GlobalFallback;
    }
    if has("name") || echelons {
        return Shape::Group;
    }
    let map_of_maps = |node: &Node| {
        node.entries()
            .is_some_and(|inner| inner.iter().all(|e| matches!(e.value.kind, Kind::Map(_))))
    };
    // A misspelt section (`modles:`) is reported as such, not read as a seed provider.
    let near_section = entries
        .iter()
        .any(|e| closest(&e.key, SECTION_KEYS.iter().copied()).is_some());
    if !entries.is_empty() && !near_section && entries.iter().all(|e| map_of_maps(&e.value)) {
        return Shape::SeedProvider;
    }
    Shape::Native
}

/// The outcome of reading files: what they define and what is wrong.
#[derive(Default)]
pub(crate) struct Loaded {
    pub(crate) fragments: Vec<Fragment>,
    pub(crate) errors: Vec<ConfigError>,
    /// Whether a file could not be parsed at all (then references are not checked:
    /// they could point into that file).
    pub(crate) incomplete: bool,
    /// The configuration directory, named in the hint to migrate a global fallback
    /// file.
    pub(crate) root: Option<String>,
    /// What loads but looks wrong.
    pub(crate) warnings: Vec<ConfigError>,
}

/// Reads one configuration text. `stem` names a group file that has no `name:`.
pub(crate) fn read_text(
    loaded: &mut Loaded,
    text: &str,
    file: &str,
    stem: &str,
    env: EnvLookup<'_>,
) {
    let (root, errors) = parse(text, file, Format::from_origin(file), env);
    loaded.errors.extend(errors);
    let Some(root) = root else {
        loaded.incomplete = true;
        return;
    };
    if matches!(root.kind, Kind::Null) {
        return;
    }
    let mut ctx = Ctx::new(file);
    let mut fragment = Fragment::default();
    let Some(view) = map(&mut ctx, &root, "") else {
        loaded.errors.extend(ctx.errors);
        loaded.incomplete = true;
        return;
    };
    match shape(view.entries, stem) {
        Shape::Native => {
            view.check_keys(&mut ctx, SECTION_KEYS);
            native(&mut ctx, &view, &mut fragment, env);
        }
        Shape::Group => {
            let name = pool::seed_name(&view, stem);
            let (value, refs) =
                sections::task_group(&mut ctx, &root, &view, &name.0, name.1, false);
            fragment.groups.push(Item {
                id: name.0,
                file: file.to_owned(),
                pos: name.1,
                path: String::new(),
                value,
                refs,
            });
        }
        Shape::Pool => {
            let (name, pos) = pool::seed_name(&view, stem);
            let (value, refs) = pool::polling_pool(&mut ctx, &root, &view, &name, false);
            fragment.pools.push(Item {
                id: name,
                file: file.to_owned(),
                pos,
                path: String::new(),
                value,
                refs,
            });
        }
        Shape::GlobalFallback => {
            let pos = ["strategy", "fallback_groups"]
                .into_iter()
                .find_map(|k| view.get(k))
                .map_or(Pos::default(), |e| e.key_pos);
            let root = loaded.root.as_deref().unwrap_or("<config dir>");
            ctx.error(
                pos,
                "",
                "this is a global fallback file (seed 002), which is no longer read: each \
                 task group has its own `fallback_config`",
                Some(format!(
                    "run `echelon config migrate {root}` to turn it into per-group \
                     `fallback_config` sections"
                )),
            );
        }
        Shape::SeedProvider => seed_provider::read(&mut ctx, &view, &mut fragment),
    }
    loaded.errors.extend(ctx.errors);
    loaded.warnings.extend(ctx.warnings);
    loaded.fragments.push(fragment);
}

/// One [`Item`] per entry of the top-level mapping `section` of `view`, read by `read`
/// from the entry and its key path (`section.key`); `read` returns `None` for an entry it
/// has reported as broken.
fn section_items<T, R>(
    ctx: &mut Ctx,
    view: &super::read::MapView<'_>,
    section: &str,
    file: &str,
    mut read: impl FnMut(&mut Ctx, &Entry, &str) -> Option<(T, R)>,
) -> Vec<Item<T, R>> {
    let Some(entries) = view.value(section).and_then(|n| map(ctx, n, section)) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for entry in entries.entries {
        let path = join(section, &entry.key);
        if let Some((value, refs)) = read(ctx, entry, &path) {
            items.push(Item {
                id: entry.key.clone(),
                file: file.to_owned(),
                pos: entry.key_pos,
                path,
                value,
                refs,
            });
        }
    }
    items
}

fn native(
    ctx: &mut Ctx,
    view: &super::read::MapView<'_>,
    fragment: &mut Fragment,
    env: EnvLookup<'_>,
) {
    let file = ctx.file.clone();
    if let Some(entry) = view.get("usage") {
        let value = sections::usage(ctx, &entry.value, "usage", env);
        fragment.usage = Some(Item {
            id: "usage".to_owned(),
            file: file.clone(),
            pos: entry.key_pos,
            path: "usage".to_owned(),
            value,
            refs: (),
        });
    }
    if let Some(entry) = view.get("state") {
        let value = super::de::read(ctx, &entry.value, "state").unwrap_or_default();
        fragment.state = Some(Item {
            id: "state".to_owned(),
            file: file.clone(),
            pos: entry.key_pos,
            path: "state".to_owned(),
            value,
            refs: (),
        });
    }
    if let Some(entry) = view.get("telemetry") {
        let value = super::de::read(ctx, &entry.value, "telemetry").unwrap_or_default();
        fragment.telemetry = Some(Item {
            id: "telemetry".to_owned(),
            file: file.clone(),
            pos: entry.key_pos,
            path: "telemetry".to_owned(),
            value,
            refs: (),
        });
    }
    if let Some(entry) = view.get("server") {
        let value = sections::server(ctx, &entry.value, "server");
        fragment.server = Some(Item {
            id: "server".to_owned(),
            file: file.clone(),
            pos: entry.key_pos,
            path: "server".to_owned(),
            value,
            refs: (),
        });
    }
    fragment.providers.extend(section_items(
        ctx,
        view,
        "providers",
        &file,
        |ctx, entry, path| Some((sections::provider(ctx, &entry.value, path), ())),
    ));
    let defaults = view
        .get("model_defaults")
        .and_then(|e| sections::model_defaults(ctx, &e.value));
    fragment.models.extend(section_items(
        ctx,
        view,
        "models",
        &file,
        |ctx, entry, path| {
            let with_defaults = defaults.as_ref().map(|d| d.under(&entry.value));
            let node = with_defaults.as_ref().unwrap_or(&entry.value);
            Some(sections::model(ctx, node, &entry.key, path, None))
        },
    ));
    fragment.groups.extend(section_items(
        ctx,
        view,
        "task_groups",
        &file,
        |ctx, entry, path| {
            let group = map(ctx, &entry.value, path)?;
            Some(sections::task_group(
                ctx,
                &entry.value,
                &group,
                &entry.key,
                entry.key_pos,
                true,
            ))
        },
    ));
    fragment.pools.extend(section_items(
        ctx,
        view,
        "polling_pools",
        &file,
        |ctx, entry, path| {
            let pool_view = map(ctx, &entry.value, path)?;
            Some(pool::polling_pool(
                ctx,
                &entry.value,
                &pool_view,
                &entry.key,
                true,
            ))
        },
    ));
    fragment.wrappers.extend(section_items(
        ctx,
        view,
        "wrappers",
        &file,
        |ctx, entry, path| {
            let wrapper_view = map(ctx, &entry.value, path)?;
            Some(pool::wrapper(ctx, &entry.value, &wrapper_view))
        },
    ));
    if let Some(route) = view.string_at(ctx, "default_route") {
        fragment.default_route = Some(Item {
            id: "default_route".to_owned(),
            file: file.clone(),
            pos: view.get("default_route").map_or(route.pos, |e| e.key_pos),
            path: "default_route".to_owned(),
            value: route.value.clone(),
            refs: route,
        });
    }
}

// ---------------------------------------------------------------------------
// files and directories

fn is_config_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml" | "json"))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// Directories deeper than this are not followed (guards against symlink loops).
const MAX_DEPTH: usize = 16;

fn collect(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, errors: &mut Vec<ConfigError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(file_error(dir, format!("cannot read directory: {e}")));
            return;
        }
    };
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(e) => {
                errors.push(file_error(dir, format!("cannot read directory: {e}")));
                continue;
            }
        };
        if is_hidden(&path) {
            continue;
        }
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                if depth < MAX_DEPTH {
                    collect(&path, depth + 1, files, errors);
                } else {
                    errors.push(file_error(&path, "directory nesting too deep".to_owned()));
                }
            }
            Ok(meta) if meta.is_file() && is_config_file(&path) => files.push(path),
            Ok(_) => {}
            Err(e) => errors.push(file_error(&path, format!("cannot read: {e}"))),
        }
    }
}

/// Every configuration file under `dir` (recursively, sorted by path, hidden names
/// skipped), or the problems met while listing them.
pub(crate) fn config_files(dir: &Path) -> Result<Vec<PathBuf>, Vec<ConfigError>> {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    collect(dir, 0, &mut files, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    files.sort();
    Ok(files)
}

pub(crate) fn file_error(path: &Path, message: String) -> ConfigError {
    located(
        &path.display().to_string(),
        Pos::default(),
        "",
        message,
        None,
    )
}

fn read_file(loaded: &mut Loaded, path: &Path, env: EnvLookup<'_>) {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            read_text(loaded, &text, &file, stem, env);
        }
        Err(e) => {
            loaded
                .errors
                .push(file_error(path, format!("cannot read: {e}")));
            loaded.incomplete = true;
        }
    }
}

/// Loads a file or a directory (every `*.yaml`, `*.yml`, `*.json` under it,
/// recursively, sorted by path; names starting with `.` are skipped).
pub(crate) fn load_path(path: &Path, env: EnvLookup<'_>) -> Result<Config, ConfigErrors> {
    let origin = path.display().to_string();
    let meta = std::fs::metadata(path)
        .map_err(|e| ConfigErrors::from(file_error(path, format!("cannot read: {e}"))))?;
    let mut loaded = Loaded {
        root: Some(if meta.is_dir() {
            origin.clone()
        } else {
            match path.parent().map(Path::as_os_str) {
                Some(p) if !p.is_empty() => p.to_string_lossy().into_owned(),
                _ => ".".to_owned(),
            }
        }),
        ..Loaded::default()
    };
    if meta.is_dir() {
        let mut files = Vec::new();
        collect(path, 0, &mut files, &mut loaded.errors);
        if !loaded.errors.is_empty() {
            loaded.incomplete = true;
        }
        files.sort();
        if files.is_empty() && loaded.errors.is_empty() {
            return Err(file_error(
                path,
                "no *.yaml, *.yml or *.json files in this directory".to_owned(),
            )
            .into());
        }
        for file in &files {
            read_file(&mut loaded, file, env);
        }
    } else {
        read_file(&mut loaded, path, env);
    }
    assemble(loaded, &origin, env)
}

/// Loads in-memory texts as if they were the files of a directory `origin`: each is
/// `(file name shown in errors, stem, text)`, read in the order given.
pub(crate) fn load_texts(
    files: &[(String, String, String)],
    origin: &str,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigErrors> {
    let mut loaded = Loaded {
        root: Some(origin.to_owned()),
        ..Loaded::default()
    };
    for (file, stem, text) in files {
        read_text(&mut loaded, text, file, stem, env);
    }
    assemble(loaded, origin, env)
}

/// Loads one in-memory text named `origin`.
pub(crate) fn load_text(
    text: &str,
    origin: &str,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigErrors> {
    let mut loaded = Loaded::default();
    let stem = Path::new(origin)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(origin);
    read_text(&mut loaded, text, origin, stem, env);
    assemble(loaded, origin, env)
}

// ---------------------------------------------------------------------------
// merging and checking

/// `file:line:col` (or less, when unknown).
pub(crate) fn at(file: &str, pos: Pos) -> String {
    match (pos.line, pos.column) {
        (0, _) => file.to_owned(),
        (l, 0) => format!("{file}:{l}"),
        (l, c) => format!("{file}:{l}:{c}"),
    }
}

/// Adds `items` to `into`, reporting ids already defined (by any file).
fn merge<T, R>(
    kind: &str,
    items: Vec<Item<T, R>>,
    seen: &mut HashMap<String, (String, Pos)>,
    into: &mut Vec<Item<T, R>>,
    errors: &mut Vec<ConfigError>,
) {
    for item in items {
        if let Some((file, pos)) = seen.get(&item.id) {
            let same_file = *file == item.file;
            errors.push(located(
                &item.file,
                item.pos,
                &item.path,
                format!(
                    "{kind} `{}` is already defined at {}",
                    item.id,
                    at(file, *pos)
                ),
                Some(if same_file {
                    "ids must be unique; rename or remove one".to_owned()
                } else {
                    format!(
                        "ids must be unique across files: {} and {} both define it",
                        file, item.file
                    )
                }),
            ));
            continue;
        }
        seen.insert(item.id.clone(), (item.file.clone(), item.pos));
        into.push(item);
    }
}

/// The environment variable that fills in the keys of a provider whose file lists none:
/// `local-a` → `LOCAL_A_API_KEY`.
pub(crate) fn key_env_var(provider_id: &str) -> String {
    let mut name: String = provider_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    name.push_str("_API_KEY");
    name
}

/// The keys from `<ID>_API_KEY` when it is set and not empty (comma-separated; empty
/// parts dropped).
pub(crate) fn keys_from_env(provider_id: &str, env: EnvLookup<'_>) -> Option<Vec<SecretString>> {
    let value = env(&key_env_var(provider_id))?;
    let keys: Vec<SecretString> = value
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(SecretString::from)
        .collect();
    (!keys.is_empty()).then_some(keys)
}

/// Where `provider`'s keys come from, filling them in from `<ID>_API_KEY` when the file
/// lists none; also the variable's name when it is set but ignored (the file lists
/// keys, and not the variable's own).
fn provider_key_source(
    id: &str,
    provider: &mut ProviderConfig,
    env: EnvLookup<'_>,
) -> (KeySource, Option<String>) {
    let from_env = keys_from_env(id, env);
    if provider.api_keys.is_empty() {
        return match from_env {
            Some(keys) => {
                provider.api_keys = keys;
                (KeySource::Env(key_env_var(id)), None)
            }
            None => (KeySource::None, None),
        };
    }
    // `api_keys: ["${OPENAI_API_KEY}"]` uses the variable on purpose: no warning.
    let same = from_env.as_deref().is_some_and(|keys| {
        keys.len() == provider.api_keys.len()
            && keys
                .iter()
                .zip(&provider.api_keys)
                .all(|(a, b)| a.expose_secret() == b.expose_secret())
    });
    let ignored = (from_env.is_some() && !same).then(|| key_env_var(id));
    (KeySource::File, ignored)
}

/// Sorts errors by file, line and column.
pub(crate) fn sort_errors(errors: &mut [ConfigError]) {
    errors.sort_by(|a, b| {
        (&a.file, a.line.unwrap_or(0), a.column.unwrap_or(0)).cmp(&(
            &b.file,
            b.line.unwrap_or(0),
            b.column.unwrap_or(0),
        ))
    });
}

/// Merges the fragments, applies the key environment variables and checks references.
pub(crate) fn assemble(
    loaded: Loaded,
    origin: &str,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigErrors> {
    let Loaded {
        fragments,
        mut errors,
        incomplete,
        root: _,
        mut warnings,
    } = loaded;
    sort_errors(&mut warnings);
    for w in &warnings {
        tracing::warn!("config: {w}");
    }

    let mut servers = Vec::new();
    let mut usages = Vec::new();
    let (mut states, mut seen_state) = (Vec::new(), HashMap::new());
    let (mut telemetries, mut seen_telemetry) = (Vec::new(), HashMap::new());
    let mut providers = Vec::new();
    let mut models = Vec::new();
    let mut groups = Vec::new();
    let mut pools = Vec::new();
    let mut wrappers = Vec::new();
    let mut default_routes = Vec::new();
    let (mut seen_server, mut seen_providers, mut seen_models, mut seen_groups) = (
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    let (mut seen_pools, mut seen_wrappers, mut seen_default, mut seen_usage) = (
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    for fragment in fragments {
        merge(
            "section",
            fragment.server.into_iter().collect(),
            &mut seen_server,
            &mut servers,
            &mut errors,
        );
        merge(
            "section",
            fragment.state.into_iter().collect(),
            &mut seen_state,
            &mut states,
            &mut errors,
        );
        merge(
            "section",
            fragment.telemetry.into_iter().collect(),
            &mut seen_telemetry,
            &mut telemetries,
            &mut errors,
        );
        merge(
            "section",
            fragment.usage.into_iter().collect(),
            &mut seen_usage,
            &mut usages,
            &mut errors,
        );
        merge(
            "provider",
            fragment.providers,
            &mut seen_providers,
            &mut providers,
            &mut errors,
        );
        merge(
            "model",
            fragment.models,
            &mut seen_models,
            &mut models,
            &mut errors,
        );
        merge(
            "task group",
            fragment.groups,
            &mut seen_groups,
            &mut groups,
            &mut errors,
        );
        merge(
            "polling pool",
            fragment.pools,
            &mut seen_pools,
            &mut pools,
            &mut errors,
        );
        merge(
            "wrapper",
            fragment.wrappers,
            &mut seen_wrappers,
            &mut wrappers,
            &mut errors,
        );
        merge(
            "setting",
            fragment.default_route.into_iter().collect(),
            &mut seen_default,
            &mut default_routes,
            &mut errors,
        );
    }

    let mut config = Config {
        server: servers.pop().map(|s| s.value).unwrap_or_default(),
        usage: usages.pop().map_or_else(
            || UsageConfig::with_ledger_path(UsageConfig::default_ledger_path_with_env(env)),
            |u| u.value,
        ),
        state: states.pop().map(|s| s.value).unwrap_or_default(),
        telemetry: telemetries.pop().map(|t| t.value).unwrap_or_default(),
        ..Config::default()
    };

    // API keys: `<ID>_API_KEY` only fills in a provider that lists none (its models
    // without keys of their own inherit them); the file's keys are never replaced.
    for item in &providers {
        let mut provider = item.value.clone();
        let (source, ignored) = provider_key_source(&item.id, &mut provider, env);
        if let Some(var) = ignored {
            let warning = located(
                &item.file,
                item.pos,
                &item.path,
                format!(
                    "environment variable `{var}` is ignored: provider `{}` lists its own \
                     api_keys",
                    item.id
                ),
                Some(format!(
                    "`{var}` only fills in a provider without api_keys; to use it here, \
                     write `api_keys: [\"${{{var}}}\"]`, or unset it"
                )),
            );
            tracing::warn!("config: {warning}");
            warnings.push(warning);
        }
        config.key_sources.insert(item.id.clone(), source);
        config.providers.insert(item.id.clone(), provider);
    }
    sort_errors(&mut warnings);
    for item in &models {
        config.models.insert(item.id.clone(), item.value.clone());
    }
    for item in &groups {
        config
            .task_groups
            .insert(item.id.clone(), item.value.clone());
    }
    for item in &pools {
        config
            .polling_pools
            .insert(item.id.clone(), item.value.clone());
    }
    for item in &wrappers {
        config.wrappers.insert(item.id.clone(), item.value.clone());
    }
    config.default_route = default_routes.first().map(|d| d.value.clone());

    if !incomplete {
        let defined = check::Defined {
            models: &models,
            groups: &groups,
            pools: &pools,
            wrappers: &wrappers,
            default_route: default_routes.first(),
        };
        check::check_references(&config, &defined, &mut errors);
        if config.models.is_empty() {
            errors.push(located(
                origin,
                Pos::default(),
                "",
                "no models are defined",
                Some(
                    "add a `models:` section, e.g. `models: { my-model: { provider: local, \
                     model: smollm2 } }`"
                        .to_owned(),
                ),
            ));
        }
    }

    if errors.is_empty() {
        config.warnings = warnings;
        Ok(config)
    } else {
        sort_errors(&mut errors);
        Err(ConfigErrors(errors))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn exposed(keys: &[SecretString]) -> Vec<&str> {
        keys.iter().map(|k| k.expose_secret()).collect()
    }

    const KEYS_YAML: &str = "\
providers:
  local-a: { base_url: \"http://h/v1\", api_keys: [\"${RESOLVE_FILE_KEY}\", inline-key, \"${RESOLVE_EMPTY:-}\"] }
  other: { base_url: \"http://o/v1\", api_keys: [other-key] }
models:
  m: { provider: local-a, api_keys: [model-key] }
  n: { provider: other, api_keys: [\"${RESOLVE_EMPTY:-}\"] }
";

    #[test]
    fn key_resolution_file_references_then_inline_literals() {
        let env = |name: &str| (name == "RESOLVE_FILE_KEY").then(|| "from-file-ref".to_owned());
        let config = load_text(KEYS_YAML, "k.yaml", &env).unwrap();
        // (2) `${VAR}` from the file, (3) inline literal; the empty one is dropped.
        assert_eq!(
            exposed(&config.providers["local-a"].api_keys),
            ["from-file-ref", "inline-key"]
        );
        assert_eq!(
            exposed(config.models["m"].api_keys.as_deref().unwrap()),
            ["model-key"]
        );
        // A model list that is empty after dropping empties inherits the provider's.
        assert!(config.models["n"].api_keys.is_none());
    }

    /// Issue 14 item 7: `<ID>_API_KEY` no longer overrides the file (it did before,
    /// provider and model keys alike); it is ignored with a warning naming it.
    #[test]
    fn key_resolution_file_keys_win_over_the_env_var_with_a_warning() {
        let env = |name: &str| match name {
            "RESOLVE_FILE_KEY" => Some("from-file-ref".to_owned()),
            "LOCAL_A_API_KEY" => Some("env-key-1,env-key-2".to_owned()),
            _ => None,
        };
        let config = load_text(KEYS_YAML, "k.yaml", &env).unwrap();
        assert_eq!(
            exposed(&config.providers["local-a"].api_keys),
            ["from-file-ref", "inline-key"]
        );
        assert_eq!(
            exposed(config.models["m"].api_keys.as_deref().unwrap()),
            ["model-key"]
        );
        assert_eq!(exposed(&config.providers["other"].api_keys), ["other-key"]);
        assert_eq!(config.key_sources["local-a"], KeySource::File);
        assert_eq!(config.key_sources["other"], KeySource::File);
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        let w = &config.warnings[0];
        assert_eq!(
            w.message,
            "environment variable `LOCAL_A_API_KEY` is ignored: provider `local-a` lists its own api_keys"
        );
        assert_eq!((w.file.as_str(), w.line), ("k.yaml", Some(2)));
        assert!(!w.to_string().contains("env-key"), "never the value: {w}");
    }

    #[test]
    fn the_env_var_fills_in_a_provider_that_lists_no_keys() {
        let yaml = "\
providers:
  openai: { base_url: \"http://h/v1\" }
  empty: { base_url: \"http://e/v1\", api_keys: [\"${UNSET_KEY:-}\"] }
  bare: { base_url: \"http://b/v1\" }
models:
  inherits: { provider: openai }
  own: { provider: openai, api_keys: [own-key] }
  e: { provider: empty }
  b: { provider: bare }
";
        let env = |name: &str| match name {
            "OPENAI_API_KEY" => Some("env-openai".to_owned()),
            "EMPTY_API_KEY" => Some("env-empty-1, env-empty-2".to_owned()),
            _ => None,
        };
        let config = load_text(yaml, "f.yaml", &env).unwrap();
        assert_eq!(
            exposed(&config.providers["openai"].api_keys),
            ["env-openai"]
        );
        // The model without keys inherits the provider's; its own keys stay its own.
        assert!(config.models["inherits"].api_keys.is_none());
        assert_eq!(
            exposed(config.models["own"].api_keys.as_deref().unwrap()),
            ["own-key"]
        );
        // A list that is empty once `${VAR:-}` resolved lists no keys.
        assert_eq!(
            exposed(&config.providers["empty"].api_keys),
            ["env-empty-1", "env-empty-2"]
        );
        assert!(config.providers["bare"].api_keys.is_empty());
        assert_eq!(
            config.key_sources["openai"],
            KeySource::Env("OPENAI_API_KEY".into())
        );
        assert_eq!(
            config.key_sources["empty"],
            KeySource::Env("EMPTY_API_KEY".into())
        );
        assert_eq!(config.key_sources["bare"], KeySource::None);
        assert_eq!(
            config.provider_key_ids("openai"),
            [crate::key::key_id("env-openai")]
        );
        assert!(config.provider_key_ids("bare").is_empty());
        assert!(config.provider_key_ids("unknown").is_empty());
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert_eq!(
            KeySource::Env("OPENAI_API_KEY".into()).to_string(),
            "env OPENAI_API_KEY"
        );
    }

    #[test]
    fn a_file_naming_the_env_var_itself_gets_no_warning() {
        let yaml = "\
providers:
  openai: { base_url: \"http://h/v1\", api_keys: [\"${OPENAI_API_KEY}\"] }
models:
  m: { provider: openai }
";
        let env = |name: &str| (name == "OPENAI_API_KEY").then(|| "sk-real".to_owned());
        let config = load_text(yaml, "f.yaml", &env).unwrap();
        assert_eq!(exposed(&config.providers["openai"].api_keys), ["sk-real"]);
        assert_eq!(config.key_sources["openai"], KeySource::File);
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    }

    #[test]
    fn key_env_var_does_not_excuse_a_missing_file_reference() {
        // The file's `${VAR}` must still resolve: a missing variable is an error even
        // when `<ID>_API_KEY` is set.
        let env = |name: &str| (name == "LOCAL_A_API_KEY").then(|| "env-key".to_owned());
        let errors = load_text(KEYS_YAML, "k.yaml", &env).unwrap_err();
        assert_eq!(errors.0.len(), 1);
        assert_eq!(
            errors.0[0].message,
            "environment variable `RESOLVE_FILE_KEY` is not set"
        );
        assert_eq!((errors.0[0].line, errors.0[0].column), (Some(2), Some(51)));
    }

    #[test]
    fn shapes() {
        let shape_of = |text: &str| {
            let (node, _) = parse(text, "s.yaml", Format::Yaml, &|_: &str| None);
            let node = node.unwrap();
            shape(node.entries().unwrap(), "s")
        };
        assert_eq!(shape_of("models: {}\n"), Shape::Native);
        assert_eq!(shape_of("name: g\necheon1: {}\n"), Shape::Group);
        assert_eq!(shape_of("echelon1: { models: [m] }\n"), Shape::Group);
        assert_eq!(
            shape_of("openai: { gpt-4: { model: gpt-4 } }\n"),
            Shape::SeedProvider
        );
        assert_eq!(shape_of("modles: { m: { provider: p } }\n"), Shape::Native);
        assert_eq!(shape_of("name: p\ntask_groups: [g]\n"), Shape::Pool);
        assert_eq!(shape_of("name: p\ntask_group: g\n"), Shape::Pool);
        assert_eq!(shape_of("task_groups: { g: {} }\n"), Shape::Native);
        assert_eq!(
            shape_of("models: {}\nrotation_strategy: weighted\n"),
            Shape::Native
        );
        assert_eq!(
            shape_of("strategy: echelon_down\nmax_attempts: 3\n"),
            Shape::GlobalFallback
        );
        assert_eq!(shape_of("fallback_groups: [a]\n"), Shape::GlobalFallback);
        // By name, whatever it holds (e.g. only per-group overrides).
        let (node, _) = parse(
            "groups: { g: { max_attempts: 2 } }\n",
            "global_fallback.yaml",
            Format::Yaml,
            &|_: &str| None,
        );
        assert_eq!(
            shape(node.unwrap().entries().unwrap(), GLOBAL_FALLBACK_STEM),
            Shape::GlobalFallback
        );
        assert_eq!(
            shape_of("name: g\necheon1: {}\nstrategy: x\n"),
            Shape::Group
        );
        assert_eq!(shape_of("foo: 1\n"), Shape::Native);
    }

    #[test]
    fn key_env_var_names() {
        assert_eq!(key_env_var("openai"), "OPENAI_API_KEY");
        assert_eq!(key_env_var("local-a.b"), "LOCAL_A_B_API_KEY");
        assert_eq!(key_env_var("local_a"), "LOCAL_A_API_KEY");
    }

    #[test]
    fn keys_from_env_splits_and_drops_empty() {
        use secrecy::ExposeSecret;
        let env = |name: &str| match name {
            "A_API_KEY" => Some(" k1 ,,k2, ".to_owned()),
            "B_API_KEY" => Some(" , ".to_owned()),
            _ => None,
        };
        let keys = keys_from_env("a", &env).unwrap_or_default();
        let keys: Vec<&str> = keys.iter().map(|k| k.expose_secret()).collect();
        assert_eq!(keys, ["k1", "k2"]);
        assert!(keys_from_env("b", &env).is_none());
        assert!(keys_from_env("c", &env).is_none());
    }
}
