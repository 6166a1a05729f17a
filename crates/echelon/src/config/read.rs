//! Reading node trees by hand, for what the section structs do not cover (a task
//! group's `echelon<N>` keys, a pool's task group, top-level shapes): every problem is
//! recorded (with file, position and key path) and reading goes on, so one load reports
//! all it can. The sections themselves are read through serde ([`de`](super::de)).

use super::de::scalar_text;
use super::error::{ConfigError, did_you_mean};
use super::node::{Entry, Kind, Node, Pos, index, join};

/// Collects the errors of one file.
pub(crate) struct Ctx {
    /// The file name shown in errors.
    pub(crate) file: String,
    /// Errors so far.
    pub(crate) errors: Vec<ConfigError>,
    /// Warnings so far: what loads but looks wrong.
    pub(crate) warnings: Vec<ConfigError>,
    /// Where each warning was written, with its message (each is said once).
    warned_at: std::collections::HashSet<(u64, u64, String)>,
}

impl Ctx {
    pub(crate) fn new(file: impl Into<String>) -> Self {
        Ctx {
            file: file.into(),
            errors: Vec::new(),
            warnings: Vec::new(),
            warned_at: std::collections::HashSet::new(),
        }
    }

    /// Records a warning at `pos` (0 = unknown).
    pub(crate) fn warn(
        &mut self,
        pos: Pos,
        path: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let w = located(&self.file, pos, path, message, hint);
        // A `model_defaults:` value is read under every model of its file: warn about
        // the place it is written once (a set, not a scan: a file may warn per model).
        if pos.line == 0
            || self
                .warned_at
                .insert((pos.line, pos.column, w.message.clone()))
        {
            self.warnings.push(w);
        }
    }

    /// Records an error at `pos` (0 = unknown).
    pub(crate) fn error(
        &mut self,
        pos: Pos,
        path: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        self.errors
            .push(located(&self.file, pos, path, message, hint));
    }
}

/// Builds an error at `pos` of `file` (0 = unknown line or column).
pub(crate) fn located(
    file: &str,
    pos: Pos,
    path: &str,
    message: impl Into<String>,
    hint: Option<String>,
) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: (pos.line > 0).then_some(pos.line),
        column: (pos.line > 0 && pos.column > 0).then_some(pos.column),
        key_path: path.to_owned(),
        message: message.into(),
        hint,
    }
}

/// A mapping being read.
pub(crate) struct MapView<'n> {
    pub(crate) entries: &'n [Entry],
    pub(crate) path: String,
    pub(crate) pos: Pos,
}

/// A value with where it was written.
pub(crate) struct At<T> {
    pub(crate) value: T,
    pub(crate) pos: Pos,
    /// Its key path.
    pub(crate) path: String,
}

/// Views `node` as a mapping (`null` reads as an empty one). Records an error and
/// returns `None` for any other type.
pub(crate) fn map<'n>(ctx: &mut Ctx, node: &'n Node, path: &str) -> Option<MapView<'n>> {
    match &node.kind {
        Kind::Map(entries) => Some(MapView {
            entries,
            path: path.to_owned(),
            pos: node.pos,
        }),
        Kind::Null => Some(MapView {
            entries: &[],
            path: path.to_owned(),
            pos: node.pos,
        }),
        _ => {
            ctx.error(
                node.pos,
                path,
                format!("expected a mapping, found {}", node.type_name()),
                None,
            );
            None
        }
    }
}

impl<'n> MapView<'n> {
    /// The path of `key` in this mapping.
    pub(crate) fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Records an error for every key not in `allowed`, with a hint naming the
    /// closest allowed key.
    pub(crate) fn check_keys(&self, ctx: &mut Ctx, allowed: &[&str]) {
        for entry in self.entries {
            if !allowed.contains(&entry.key.as_str()) {
                ctx.error(
                    entry.key_pos,
                    &self.path_of(&entry.key),
                    format!("unknown key `{}`", entry.key),
                    did_you_mean(&entry.key, allowed.iter().copied()),
                );
            }
        }
    }

    /// The entry for `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&'n Entry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// The value of `key` unless absent or `null`.
    pub(crate) fn value(&self, key: &str) -> Option<&'n Node> {
        self.get(key)
            .map(|e| &e.value)
            .filter(|v| !matches!(v.kind, Kind::Null))
    }

    /// Records "missing `key`" at this mapping (or at the key, when it is there but
    /// empty).
    pub(crate) fn missing(&self, ctx: &mut Ctx, key: &str, hint: Option<String>) {
        let (pos, path) = match self.get(key) {
            Some(entry) => (entry.key_pos, self.path_of(key)),
            None => (self.pos, self.path.clone()),
        };
        let message = if self.get(key).is_some() {
            format!("`{key}` needs a value")
        } else {
            format!("missing required key `{key}`")
        };
        ctx.error(pos, &path, message, hint);
    }

    /// A string value with its position.
    pub(crate) fn string_at(&self, ctx: &mut Ctx, key: &str) -> Option<At<String>> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        string(ctx, node, &path).map(|value| At {
            value,
            pos: node.pos,
            path,
        })
    }

    /// A list of strings, each with its position.
    pub(crate) fn string_list(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<At<String>>> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        let items = list(ctx, node, &path)?;
        Some(
            items
                .iter()
                .enumerate()
                .filter_map(|(i, item)| {
                    let path = index(&path, i);
                    string(ctx, item, &path).map(|value| At {
                        value,
                        pos: item.pos,
                        path,
                    })
                })
                .collect(),
        )
    }
}

/// A string; plain scalars of other types (e.g. `model: 4`) read as written.
pub(crate) fn string(ctx: &mut Ctx, node: &Node, path: &str) -> Option<String> {
    let text = scalar_text(node).map(str::to_owned);
    if text.is_none() {
        ctx.error(
            node.pos,
            path,
            format!("expected a string, found {}", node.type_name()),
            None,
        );
    }
    text
}

/// A list (`null` reads as an empty one).
pub(crate) fn list<'n>(ctx: &mut Ctx, node: &'n Node, path: &str) -> Option<&'n [Node]> {
    match &node.kind {
        Kind::Seq(items) => Some(items),
        Kind::Null => Some(&[]),
        _ => {
            ctx.error(
                node.pos,
                path,
                format!("expected a list, found {}", node.type_name()),
                Some("write a list: `[a, b]`, or one `- item` per line".to_owned()),
            );
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::node::{Format, parse};
    use super::*;

    fn root(text: &str) -> Node {
        let env = |name: &str| match name {
            "N" => Some("7".to_owned()),
            "BAD" => Some("x".to_owned()),
            _ => None,
        };
        let (node, errors) = parse(text, "t.yaml", Format::Yaml, &env);
        assert!(errors.is_empty());
        node.unwrap()
    }

    #[test]
    fn unknown_keys_get_hints() {
        let node = root("timout: 1\nzzz: 2\n");
        let mut ctx = Ctx::new("t.yaml");
        let view = map(&mut ctx, &node, "models.m").unwrap();
        view.check_keys(&mut ctx, &["timeout", "model"]);
        assert_eq!(ctx.errors.len(), 2);
        assert_eq!(ctx.errors[0].key_path, "models.m.timout");
        assert_eq!(
            ctx.errors[0].hint.as_deref(),
            Some("did you mean `timeout`?")
        );
        assert_eq!(ctx.errors[1].hint, None);
    }
}
