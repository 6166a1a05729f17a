//! Typed reading of node trees: every problem is recorded (with file, position and
//! key path) and reading goes on, so one load reports all it can.

use secrecy::SecretString;

use super::error::{ConfigError, did_you_mean};
use super::node::{Entry, Kind, Node, Pos, index, join};

/// Collects the errors of one file.
pub(crate) struct Ctx {
    /// The file name shown in errors.
    pub(crate) file: String,
    /// Errors so far.
    pub(crate) errors: Vec<ConfigError>,
}

impl Ctx {
    pub(crate) fn new(file: impl Into<String>) -> Self {
        Ctx {
            file: file.into(),
            errors: Vec::new(),
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

/// The range a number must be in.
#[derive(Clone, Copy)]
pub(crate) enum Bound {
    /// > 0.
    Positive,
    /// ≥ 0.
    NonNegative,
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

    /// Where the value of `key` is written (the mapping's position when absent).
    pub(crate) fn pos_of(&self, key: &str) -> Pos {
        self.get(key).map_or(self.pos, |e| e.value.pos)
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

    /// A string value.
    pub(crate) fn string(&self, ctx: &mut Ctx, key: &str) -> Option<String> {
        self.string_at(ctx, key).map(|s| s.value)
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

    /// A list of secrets; entries empty after substitution are dropped. Error
    /// messages never show the values.
    pub(crate) fn secret_list(&self, ctx: &mut Ctx, key: &str) -> Option<Vec<SecretString>> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        let items = list(ctx, node, &path)?;
        let mut keys = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match &item.kind {
                Kind::Str { value, .. } => {
                    let value = value.trim();
                    if !value.is_empty() {
                        keys.push(SecretString::from(value));
                    }
                }
                Kind::Null => {}
                _ => ctx.error(
                    item.pos,
                    &index(&path, i),
                    format!("expected a string (an API key), found {}", item.type_name()),
                    Some("quote the key: \"...\"".to_owned()),
                ),
            }
        }
        Some(keys)
    }

    /// A finite number within `bound`.
    pub(crate) fn f64(&self, ctx: &mut Ctx, key: &str, bound: Bound) -> Option<f64> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        let value = number(ctx, node, &path)?;
        let ok = match bound {
            Bound::Positive => value > 0.0,
            Bound::NonNegative => value >= 0.0,
        };
        if ok {
            Some(value)
        } else {
            let what = match bound {
                Bound::Positive => "greater than 0",
                Bound::NonNegative => "0 or more",
            };
            ctx.error(
                node.pos,
                &path,
                format!("must be {what}, found {value}"),
                None,
            );
            None
        }
    }

    /// An integer in `min..=max`.
    pub(crate) fn int(&self, ctx: &mut Ctx, key: &str, min: i128, max: i128) -> Option<i128> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        let value = integer(ctx, node, &path)?;
        if (min..=max).contains(&value) {
            Some(value)
        } else {
            let range = if max == i128::from(u32::MAX) || max == i128::from(u64::MAX) {
                format!("{min} or more")
            } else {
                format!("between {min} and {max}")
            };
            ctx.error(
                node.pos,
                &path,
                format!("must be {range}, found {value}"),
                None,
            );
            None
        }
    }

    /// A boolean (`true` / `false`, any case; also from a `${VAR}` substitution).
    pub(crate) fn bool(&self, ctx: &mut Ctx, key: &str) -> Option<bool> {
        let node = self.value(key)?;
        let path = self.path_of(key);
        boolean(ctx, node, &path)
    }

    /// A `u32` ≥ `min`.
    pub(crate) fn u32(&self, ctx: &mut Ctx, key: &str, min: u32) -> Option<u32> {
        self.int(ctx, key, i128::from(min), i128::from(u32::MAX))
            .and_then(|v| u32::try_from(v).ok())
    }
}

/// A string; plain scalars of other types (e.g. `model: 4`) read as written.
pub(crate) fn string(ctx: &mut Ctx, node: &Node, path: &str) -> Option<String> {
    match &node.kind {
        Kind::Str { value, .. } => Some(value.clone()),
        Kind::Int { text, .. } | Kind::Float { text, .. } | Kind::Bool { text, .. } => {
            Some(text.clone())
        }
        _ => {
            ctx.error(
                node.pos,
                path,
                format!("expected a string, found {}", node.type_name()),
                None,
            );
            None
        }
    }
}

/// The boolean a scalar spells (`true` / `false`, any case), if any. A string counts
/// only when it came from a `${VAR}` substitution.
pub(crate) fn bool_value(node: &Node) -> Option<bool> {
    let text = match &node.kind {
        Kind::Bool { text } => text.as_str(),
        Kind::Str {
            value,
            substituted: true,
        } => value.trim(),
        _ => return None,
    };
    match text.to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// A boolean; records an error for anything else.
pub(crate) fn boolean(ctx: &mut Ctx, node: &Node, path: &str) -> Option<bool> {
    let value = bool_value(node);
    if value.is_none() {
        ctx.error(
            node.pos,
            path,
            format!("expected `true` or `false`, found {}", node.type_name()),
            matches!(node.kind, Kind::Str { .. })
                .then(|| "write `true` or `false` without quotes".to_owned()),
        );
    }
    value
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

fn number(ctx: &mut Ctx, node: &Node, path: &str) -> Option<f64> {
    let value = match &node.kind {
        Kind::Int { value, .. } => Some(*value as f64),
        Kind::Float { value, .. } => Some(*value),
        Kind::Str {
            value,
            substituted: true,
        } => value.trim().parse::<f64>().ok(),
        _ => None,
    };
    match value {
        Some(v) if v.is_finite() => Some(v),
        Some(_) => {
            ctx.error(node.pos, path, "expected a finite number", None);
            None
        }
        None => {
            ctx.error(
                node.pos,
                path,
                format!("expected a number, found {}", node.type_name()),
                matches!(node.kind, Kind::Str { .. })
                    .then(|| "write the number without quotes".to_owned()),
            );
            None
        }
    }
}

fn integer(ctx: &mut Ctx, node: &Node, path: &str) -> Option<i128> {
    let value = match &node.kind {
        Kind::Int { value, .. } => Some(*value),
        Kind::Str {
            value,
            substituted: true,
        } => value.trim().parse::<i128>().ok(),
        _ => None,
    };
    if value.is_none() {
        ctx.error(
            node.pos,
            path,
            format!("expected an integer, found {}", node.type_name()),
            matches!(node.kind, Kind::Str { .. })
                .then(|| "write the number without quotes".to_owned()),
        );
    }
    value
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
    fn numbers_strings_and_bounds() {
        let node = root("a: 1.5\nb: \"2\"\nc: $N\nd: -1\ne: abc\nf: 3\ng: $BAD\n");
        let mut ctx = Ctx::new("t.yaml");
        let view = map(&mut ctx, &node, "").unwrap();
        assert_eq!(view.f64(&mut ctx, "a", Bound::Positive), Some(1.5));
        assert_eq!(view.f64(&mut ctx, "b", Bound::NonNegative), None);
        assert_eq!(view.u32(&mut ctx, "c", 0), Some(7));
        assert_eq!(view.f64(&mut ctx, "d", Bound::NonNegative), None);
        assert_eq!(view.u32(&mut ctx, "e", 0), None);
        assert_eq!(view.string(&mut ctx, "f").as_deref(), Some("3"));
        assert_eq!(view.u32(&mut ctx, "g", 0), None);
        assert_eq!(view.f64(&mut ctx, "absent", Bound::NonNegative), None);
        let messages: Vec<String> = ctx.errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            messages,
            [
                "t.yaml:2:4: b: expected a number, found a string\n  hint: write the number without quotes",
                "t.yaml:4:4: d: must be 0 or more, found -1",
                "t.yaml:5:4: e: expected an integer, found a string\n  hint: write the number without quotes",
                "t.yaml:7:4: g: expected an integer, found a string\n  hint: write the number without quotes",
            ]
        );
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
