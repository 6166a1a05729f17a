//! `echelon config migrate`: turns a seed global fallback file into per-group
//! `fallback_config` sections (seed 001 `migrate_global_fallback_to_task_groups`,
//! seed 002 "基于任务组的降级"; DESIGN.md §5).
//!
//! # The global fallback file
//! A file named `global_fallback.yaml` (or `.yml`, `.json`) anywhere under the
//! configuration directory, or any file whose top level has `strategy` or
//! `fallback_groups` and is not a task group: the keys of a task group's
//! `fallback_config` at its top level, optionally plus per-group overrides.
//!
//! ```yaml
//! # configs/llms/global_fallback.yaml
//! strategy: echelon_down
//! fallback_groups: [backup_group]
//! max_attempts: 3
//! retry_delay: 1.0
//! circuit_breaker: { failure_threshold: 5, recovery_time: 60, half_open_requests: 1 }
//! groups:                       # optional: per task group, the same keys
//!   thinking_group: { max_attempts: 5, circuit_breaker: { recovery_time: 120 } }
//! ```
//!
//! [`Config::load`](super::Config::load) refuses such a file with a hint to run the
//! migration.
//!
//! # What the migration does
//! - Every task group without its own `fallback_config` gets one: the global values
//!   overlaid with that group's entry of `groups` (key by key; `circuit_breaker` key by
//!   key too). A group never falls back to itself: its own name is left out of the
//!   `fallback_groups` it gets. Groups that already have a `fallback_config` keep it
//!   (reported as "kept"); a `groups` entry for such a group is then unused.
//! - Files are edited as text, so comments, order and quoting survive: a seed group
//!   file gets a `fallback_config:` block appended; a group written under
//!   `task_groups:` in a larger file gets the block inserted under it (after its last
//!   line), indented like its other keys; a group written as a flow mapping
//!   (`g: { echelon1: … }`, or JSON) gets `, fallback_config: {…}` before its `}`.
//!   Values are copied as written: `${VAR}` references stay references.
//! - The global file is renamed `<name>.migrated` (so it is no longer loaded), and
//!   each changed file is first copied to `<file>.bak` (`.bak.2`, … when taken) unless
//!   [`MigrateOptions::backup`] is off.
//! - The result is always validated by loading it, from the edited texts in memory,
//!   before anything is written: when it does not load, nothing is written and the
//!   [`ConfigErrors`] are returned (their line numbers are those of the edited
//!   texts). After writing, the directory is loaded once more.
//! - With no global fallback file there is nothing to migrate: the report has no
//!   changes (the configuration is still validated). So a second run changes nothing.

mod edit;

use std::fs;
use std::path::{Path, PathBuf};

use super::check::route_problem;
use super::de::fields_of;
use super::env::{self, EnvLookup};
use super::error::{ConfigError, ConfigErrors, reference_hint};
use super::load::{self, GLOBAL_FALLBACK_STEM, Shape, load_texts, shape};
use super::model::{CircuitBreakerConfig, Config, FallbackConfig};
use super::node::{Entry, Format, Kind, Node, Pos, join, parse, parse_verbatim};
use super::read::{Ctx, located, map};
use super::sections::{GroupRefs, fallback};

/// How [`migrate`] runs (the flags of `echelon config migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrateOptions {
    /// Copy each changed file to `<file>.bak` first (`--no-backup` turns it off).
    /// Default on.
    pub backup: bool,
    /// Compute, validate and report the changes, but write nothing
    /// (`--validate-only`).
    pub validate_only: bool,
    /// Describe each added `fallback_config` with all its values, and report each
    /// backup as a change line too (`--verbose`).
    pub verbose: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            backup: true,
            validate_only: false,
            verbose: false,
        }
    }
}

/// What [`migrate`] did (or, with [`MigrateOptions::validate_only`], would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// One human line per change, paths relative to the configuration directory, e.g.
    /// `groups/fast_group.yaml: added fallback_config (strategy echelon_down,
    /// max_attempts 3) from global_fallback.yaml`. Empty when there was nothing to
    /// migrate.
    pub changes: Vec<String>,
    /// The files rewritten (none with `validate_only`).
    pub written: Vec<PathBuf>,
    /// The backups made, one per rewritten file unless backups are off.
    pub backups: Vec<PathBuf>,
    /// Where the global fallback file was moved (`…/global_fallback.yaml.migrated`);
    /// `None` when there was none, or with `validate_only`.
    pub removed_global: Option<PathBuf>,
}

impl MigrationReport {
    /// Whether there was nothing to migrate (no global fallback file).
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Why [`migrate`] failed. Nothing is written unless the error is [`MigrateError::Io`]
/// met while writing.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The path is not a directory: the migration works on a configuration directory.
    #[error(
        "{}: not a directory; `echelon config migrate` takes the configuration directory \
         that holds the global fallback file",
        .0.display()
    )]
    NotADirectory(PathBuf),
    /// A file could not be read, written, copied or renamed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// `read`, `write`, `back up` or `rename`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The configuration, the global fallback file or the migrated result does not
    /// validate.
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
}

impl MigrateError {
    /// The configuration errors, when that is what went wrong.
    pub fn config_errors(&self) -> Option<&ConfigErrors> {
        match self {
            MigrateError::Invalid(errors) => Some(errors),
            _ => None,
        }
    }
}

/// Migrates the configuration directory `path` (see the [module docs](self)), with
/// variables taken from the process environment for validation.
pub fn migrate(path: &Path, options: &MigrateOptions) -> Result<MigrationReport, MigrateError> {
    migrate_with_env(path, options, &env::process_env)
}

/// [`migrate`] with variables taken from `env` (`None` = unset) instead of the process
/// environment: for tests and embedding. Values are always copied as written.
pub fn migrate_with_env(
    path: &Path,
    options: &MigrateOptions,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<MigrationReport, MigrateError> {
    let meta = fs::metadata(path).map_err(|source| MigrateError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(MigrateError::NotADirectory(path.to_owned()));
    }
    let origin = path.display().to_string();
    let files = load::config_files(path).map_err(ConfigErrors)?;
    let mut sources = Vec::with_capacity(files.len());
    for file in files {
        sources.push(Source::read(path, file)?);
    }

    let globals: Vec<usize> = (0..sources.len())
        .filter(|&i| sources[i].is_global())
        .collect();
    let kept_texts = |sources: &[Source]| -> Vec<(String, String, String)> {
        sources
            .iter()
            .filter(|s| !s.is_global())
            .map(|s| (s.name.clone(), s.stem.clone(), s.text.clone()))
            .collect()
    };
    // The configuration as it is, without the global file: it must load already, and
    // the global file's references are checked against it.
    let before = load_texts(&kept_texts(&sources), &origin, env)?;
    let Some(&global) = globals.first() else {
        return Ok(MigrationReport::default());
    };
    if let Some(&second) = globals.get(1) {
        return Err(ConfigErrors::from(located(
            &sources[second].name,
            Pos::default(),
            "",
            format!(
                "a second global fallback file; the first is {}",
                sources[global].name
            ),
            Some("merge them into one, then run the migration again".to_owned()),
        ))
        .into());
    }

    let plan = Global::read(&sources[global], &before, env)?;
    let mut changes = Vec::new();
    let mut edits: Vec<Vec<(usize, String)>> = vec![Vec::new(); sources.len()];
    let mut errors = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        if i == global {
            continue;
        }
        for group in source.groups() {
            let override_ = plan.overrides.iter().find(|o| o.group == group.name);
            let prefix = if group.path.is_empty() {
                format!("{}: ", source.rel)
            } else {
                format!("{}: {}: ", source.rel, group.path)
            };
            if let Some(own) = group.own {
                if matches!(own.value.kind, Kind::Null) {
                    errors.push(located(
                        &source.name,
                        own.key_pos,
                        &join(&group.path, "fallback_config"),
                        "`fallback_config` is empty, so the migration cannot tell whether \
                         to keep the defaults or fill it in",
                        Some(
                            "remove the line to receive the global values, or fill it in \
                             to keep your own; then run the migration again"
                                .to_owned(),
                        ),
                    ));
                    continue;
                }
                let mut line = format!("{prefix}kept its own fallback_config");
                if override_.is_some() {
                    line.push_str(&format!(
                        " (the `groups.{}` entry of {} is not used)",
                        group.name, plan.rel
                    ));
                }
                changes.push(line);
                continue;
            }
            let (entries, dropped_self) = plan.fallback_for(&group.name, override_);
            match insertion(source, &group, &entries, &plan.rel) {
                Ok(edit) => edits[i].push(edit),
                Err(error) => {
                    errors.push(*error);
                    continue;
                }
            }
            let mut line = format!(
                "{prefix}added fallback_config ({}) from {}",
                summary(&entries, options.verbose),
                plan.rel
            );
            if override_.is_some() {
                line.push_str(&format!(" and its `groups.{}` entry", group.name));
            }
            if dropped_self {
                line.push_str(&format!(
                    "; `{}` left out of its own fallback_groups",
                    group.name
                ));
            }
            changes.push(line);
        }
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors).into());
    }
    let moved = numbered_free(&sources[global].path, "migrated");
    changes.push(format!(
        "{}: renamed to {}, so it is no longer loaded",
        plan.rel,
        relative(path, &moved)
    ));

    // The edited texts, validated before anything is written.
    let mut edited = sources.clone();
    for (source, mut inserts) in edited.iter_mut().zip(edits.iter().cloned()) {
        inserts.sort_by_key(|(offset, _)| std::cmp::Reverse(*offset));
        for (offset, text) in inserts {
            source.text.insert_str(offset, &text);
        }
    }
    load_texts(&kept_texts(&edited), &origin, env)?;

    let mut report = MigrationReport {
        changes,
        ..MigrationReport::default()
    };
    if options.validate_only {
        return Ok(report);
    }

    for (i, source) in edited.iter().enumerate() {
        if edits[i].is_empty() {
            continue;
        }
        if options.backup {
            let backup = numbered_free(&source.path, "bak");
            fs::copy(&source.path, &backup).map_err(|e| io("back up", &source.path, e))?;
            if options.verbose {
                report.changes.push(format!(
                    "{}: backed up to {}",
                    source.rel,
                    relative(path, &backup)
                ));
            }
            report.backups.push(backup);
        }
        write_atomically(&source.path, &source.text)?;
        report.written.push(source.path.clone());
    }
    let global_path = &sources[global].path;
    fs::rename(global_path, &moved).map_err(|e| io("rename", global_path, e))?;
    report.removed_global = Some(moved);

    load::load_path(path, env)?;
    Ok(report)
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> MigrateError {
    MigrateError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// `path` relative to `root`, for change lines.
fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `<path>.<suffix>`, or `<path>.<suffix>.2`, `.3`, … when that exists.
fn numbered_free(path: &Path, suffix: &str) -> PathBuf {
    let base = format!("{}.{suffix}", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 2;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

/// Writes `text` to a hidden file next to `path` (hidden names are not loaded), then
/// renames it over `path`, so a crash never leaves half a file.
fn write_atomically(path: &Path, text: &str) -> Result<(), MigrateError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.migrate-tmp"));
    fs::write(&tmp, text).map_err(|e| io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io("write", path, e)
    })
}

// ---------------------------------------------------------------------------
// the files

/// One configuration file, read.
#[derive(Clone)]
struct Source {
    path: PathBuf,
    /// As shown in errors (like the loader does).
    name: String,
    /// Relative to the configuration directory, for change lines.
    rel: String,
    stem: String,
    text: String,
    format: Format,
    /// The tree with values as written; `None` when the syntax is invalid.
    root: Option<Node>,
}

/// A task group as written in a file.
struct GroupSite<'a> {
    name: String,
    /// Its key path (`task_groups.g`), empty for a seed group file.
    path: String,
    /// Where its key is, for a group under `task_groups:`.
    key_pos: Option<Pos>,
    /// Its mapping.
    node: &'a Node,
    /// Its own `fallback_config` entry.
    own: Option<&'a Entry>,
}

impl Source {
    fn read(root: &Path, path: PathBuf) -> Result<Source, MigrateError> {
        let text = fs::read_to_string(&path).map_err(|e| io("read", &path, e))?;
        let name = path.display().to_string();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let format = Format::from_origin(&name);
        let (node, _) = parse_verbatim(&text, &name, format);
        Ok(Source {
            rel: relative(root, &path),
            path,
            name,
            stem,
            text,
            format,
            root: node,
        })
    }

    fn shape(&self) -> Option<Shape> {
        let entries = self.root.as_ref()?.entries()?;
        Some(shape(entries, &self.stem))
    }

    fn is_global(&self) -> bool {
        self.stem == GLOBAL_FALLBACK_STEM || self.shape() == Some(Shape::GlobalFallback)
    }

    /// The task groups the file defines, in file order.
    fn groups(&self) -> Vec<GroupSite<'_>> {
        let Some(root) = &self.root else {
            return Vec::new();
        };
        match self.shape() {
            Some(Shape::Group) => {
                let name = root
                    .entries()
                    .and_then(|es| es.iter().find(|e| e.key == "name"))
                    .and_then(|e| match &e.value.kind {
                        Kind::Str { value, .. } => Some(value.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| self.stem.clone());
                vec![GroupSite {
                    name,
                    path: String::new(),
                    key_pos: None,
                    node: root,
                    own: own_fallback(root),
                }]
            }
            Some(Shape::Native) => root
                .entries()
                .and_then(|es| es.iter().find(|e| e.key == "task_groups"))
                .and_then(|e| e.value.entries())
                .unwrap_or_default()
                .iter()
                .map(|e| GroupSite {
                    name: e.key.clone(),
                    path: join("task_groups", &e.key),
                    key_pos: Some(e.key_pos),
                    node: &e.value,
                    own: own_fallback(&e.value),
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// The `fallback_config` entry of a group's mapping.
fn own_fallback(node: &Node) -> Option<&Entry> {
    node.entries()?.iter().find(|e| e.key == "fallback_config")
}

/// Where and what to insert so `group` gets `fallback_config: <entries>`.
fn insertion(
    source: &Source,
    group: &GroupSite<'_>,
    entries: &[Entry],
    global_rel: &str,
) -> Result<(usize, String), Box<ConfigError>> {
    let text = &source.text;
    let nl = edit::line_ending(text);
    let cannot = |why: &str| {
        Box::new(located(
            &source.name,
            group.key_pos.unwrap_or(group.node.pos),
            &group.path,
            format!(
                "cannot add `fallback_config` to task group `{}` here: {why}",
                group.name
            ),
            Some(format!(
                "add it by hand: `fallback_config: {}`",
                edit::flow_map(entries, false)
            )),
        ))
    };
    let open =
        edit::offset_of(text, group.node.pos).filter(|&o| text.as_bytes().get(o) == Some(&b'{'));
    if let Some(open) = open {
        let json = source.format == Format::Json;
        let (at, comma) = edit::flow_insert_point(text, open)
            .ok_or_else(|| cannot("its `{` has no matching `}`"))?;
        let key = if json {
            "\"fallback_config\""
        } else {
            "fallback_config"
        };
        let sep = if comma { ", " } else { " " };
        let sep = if text.as_bytes().get(at.wrapping_sub(1)) == Some(&b'{') {
            ""
        } else {
            sep
        };
        return Ok((at, format!("{sep}{key}: {}", edit::flow_map(entries, json))));
    }
    if source.format == Format::Json {
        return Err(cannot("the JSON object was not found where expected"));
    }
    let comment = format!("# fallback_config from {global_rel} (echelon config migrate)");
    match group.key_pos {
        // A seed group file: append at the end.
        None => {
            let mut out = String::new();
            if !text.is_empty() && !text.ends_with('\n') {
                out.push_str(nl);
            }
            if !text.trim().is_empty() {
                out.push_str(nl);
            }
            out.push_str(&format!("{comment}{nl}fallback_config:{nl}"));
            edit::block(entries, "  ", nl, &mut out);
            Ok((text.len(), out))
        }
        // Under `task_groups:`: after the group's last line, indented like its keys.
        Some(key_pos) => {
            let key_indent = usize::try_from(key_pos.column.saturating_sub(1)).unwrap_or(0);
            let first_key = group
                .node
                .entries()
                .and_then(|es| es.first())
                .map(|e| e.key_pos);
            let indent = match first_key {
                Some(p) if p.line > key_pos.line => {
                    usize::try_from(p.column.saturating_sub(1)).unwrap_or(0)
                }
                Some(_) => return Err(cannot("its keys are not written below it")),
                None => key_indent + 2,
            };
            if indent <= key_indent {
                return Err(cannot("its keys are not indented below it"));
            }
            let (at, no_newline) = edit::block_end(text, key_pos.line, key_indent);
            let pad = " ".repeat(indent);
            let mut out = String::new();
            if no_newline {
                out.push_str(nl);
            }
            out.push_str(&format!("{pad}{comment}{nl}{pad}fallback_config:{nl}"));
            edit::block(entries, &format!("{pad}  "), nl, &mut out);
            Ok((at, out))
        }
    }
}

/// "strategy echelon_down, max_attempts 3", or every key with `verbose`.
fn summary(entries: &[Entry], verbose: bool) -> String {
    let parts: Vec<String> = entries
        .iter()
        .filter(|e| verbose || matches!(e.key.as_str(), "strategy" | "max_attempts"))
        .map(|e| format!("{} {}", e.key, edit::flow(&e.value, false)))
        .collect();
    if parts.is_empty() {
        "the defaults".to_owned()
    } else {
        parts.join(", ")
    }
}

// ---------------------------------------------------------------------------
// the global fallback file

/// A `groups.<name>` entry of the global file.
struct Override {
    group: String,
    entries: Vec<Entry>,
}

/// The global fallback file, checked, with its values as written.
struct Global {
    rel: String,
    /// The top-level fallback keys (without `groups`).
    defaults: Vec<Entry>,
    overrides: Vec<Override>,
}

impl Global {
    /// Reads and checks the global file against `before` (the rest of the
    /// configuration).
    fn read(source: &Source, before: &Config, env: EnvLookup<'_>) -> Result<Global, ConfigErrors> {
        let file = &source.name;
        let (checked, mut errors) = parse(&source.text, file, source.format, env);
        let mut ctx = Ctx::new(file.clone());
        let mut refs = GroupRefs::default();
        let mut override_names = Vec::new();
        if let Some(root) = &checked
            && !matches!(root.kind, Kind::Null)
            && let Some(view) = map(&mut ctx, root, "")
        {
            let fallback_keys = fields_of::<FallbackConfig>();
            let allowed: Vec<&str> = fallback_keys.iter().copied().chain(["groups"]).collect();
            view.check_keys(&mut ctx, &allowed);
            // Unknown keys are reported once, just above.
            let top = Node {
                kind: Kind::Map(
                    view.entries
                        .iter()
                        .filter(|e| fallback_keys.contains(&e.key.as_str()))
                        .cloned()
                        .collect(),
                ),
                pos: view.pos,
            };
            fallback(&mut ctx, &top, "", &mut refs);
            if let Some(groups) = view
                .value("groups")
                .and_then(|n| map(&mut ctx, n, "groups"))
            {
                for entry in groups.entries {
                    if !before.task_groups.contains_key(&entry.key) {
                        ctx.error(
                            entry.key_pos,
                            &groups.path_of(&entry.key),
                            format!("task group `{}` is not defined", entry.key),
                            Some(reference_hint(
                                &entry.key,
                                "task groups",
                                before.task_groups.keys().map(String::as_str),
                            )),
                        );
                    }
                    fallback(
                        &mut ctx,
                        &entry.value,
                        &groups.path_of(&entry.key),
                        &mut refs,
                    );
                    override_names.push(entry.key.clone());
                }
            }
        }
        for r in &refs.fallback_groups {
            if let Some(problem) = route_problem(before, &r.value) {
                ctx.error(r.pos, &r.path, problem, None);
            }
        }
        errors.extend(ctx.errors);
        if checked.is_none() && errors.is_empty() {
            errors.push(located(
                file,
                Pos::default(),
                "",
                "cannot parse the global fallback file",
                None,
            ));
        }
        if !errors.is_empty() {
            load::sort_errors(&mut errors);
            return Err(ConfigErrors(errors));
        }

        let verbatim: &[Entry] = source
            .root
            .as_ref()
            .and_then(Node::entries)
            .unwrap_or_default();
        let defaults = without_groups(verbatim);
        let overrides = verbatim
            .iter()
            .find(|e| e.key == "groups")
            .and_then(|e| e.value.entries())
            .unwrap_or_default()
            .iter()
            .map(|e| Override {
                group: e.key.clone(),
                entries: e.value.entries().map(<[Entry]>::to_vec).unwrap_or_default(),
            })
            .collect();
        Ok(Global {
            rel: source.rel.clone(),
            defaults,
            overrides,
        })
    }

    /// The `fallback_config` entries for `group`: the defaults overlaid with its
    /// override, in the canonical key order, without `group` itself in
    /// `fallback_groups`. Also whether `group` was left out.
    fn fallback_for(&self, group: &str, override_: Option<&Override>) -> (Vec<Entry>, bool) {
        let mut entries = overlay(
            &self.defaults,
            override_.map_or(&[][..], |o| o.entries.as_slice()),
        );
        let mut dropped = false;
        for entry in &mut entries {
            if entry.key == "fallback_groups"
                && let Kind::Seq(items) = &mut entry.value.kind
            {
                let before = items.len();
                items.retain(|i| !matches!(&i.kind, Kind::Str { value, .. } if value == group));
                dropped = items.len() != before;
            }
        }
        (entries, dropped)
    }
}

fn without_groups(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .filter(|e| e.key != "groups")
        .cloned()
        .collect()
}

/// `base` with each key of `over` replacing it (mappings under `circuit_breaker`
/// merged key by key), sorted in the order of the fields of [`FallbackConfig`] /
/// [`CircuitBreakerConfig`].
fn overlay(base: &[Entry], over: &[Entry]) -> Vec<Entry> {
    let mut out: Vec<Entry> = base.to_vec();
    for e in over {
        match out.iter_mut().find(|b| b.key == e.key) {
            Some(b) => {
                let merged = match (&b.value.kind, &e.value.kind) {
                    (Kind::Map(x), Kind::Map(y)) if e.key == "circuit_breaker" => Some(Node {
                        kind: Kind::Map(overlay(x, y)),
                        pos: e.value.pos,
                    }),
                    _ => None,
                };
                b.value = merged.unwrap_or_else(|| e.value.clone());
            }
            None => out.push(e.clone()),
        }
    }
    let rank = |k: &str| {
        fields_of::<FallbackConfig>()
            .iter()
            .chain(fields_of::<CircuitBreakerConfig>())
            .position(|x| *x == k)
            .unwrap_or(usize::MAX)
    };
    out.sort_by_key(|e| rank(&e.key));
    out
}
