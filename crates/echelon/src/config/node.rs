//! A YAML or JSON document as a tree of nodes that remember where they are in the
//! file, with `${VAR}` substitution already applied to string values.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use super::env::{EnvLookup, substitute};
use super::error::ConfigError;

/// The syntax of a configuration text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// YAML 1.2 (serde-saphyr).
    Yaml,
    /// JSON (checked with serde_json; positions from serde-saphyr, as JSON is YAML).
    Json,
}

impl Format {
    /// JSON when `origin` ends with `.json` (any case), else YAML.
    pub(crate) fn from_origin(origin: &str) -> Format {
        if origin.to_ascii_lowercase().ends_with(".json") {
            Format::Json
        } else {
            Format::Yaml
        }
    }
}

/// A 1-based position; 0 means unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub(crate) line: u64,
    pub(crate) column: u64,
}

impl Pos {
    fn of(location: &Location) -> Pos {
        Pos {
            line: location.line(),
            column: location.column(),
        }
    }
}

/// One value of the document. No `Debug`: string values may be API keys.
#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) pos: Pos,
}

/// What a node holds.
#[derive(Clone)]
pub(crate) enum Kind {
    /// `~`, `null`, or nothing.
    Null,
    /// A boolean; `text` is the scalar as written.
    Bool { text: String },
    /// An integer; `text` is the scalar as written.
    Int { value: i128, text: String },
    /// A float; `text` is the scalar as written.
    Float { value: f64, text: String },
    /// A string after substitution; `substituted` when a `${VAR}` was replaced (then a
    /// number field accepts it).
    Str { value: String, substituted: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order.
    Map(Vec<Entry>),
}

/// One `key: value` of a mapping.
#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) key: String,
    pub(crate) key_pos: Pos,
    pub(crate) value: Node,
}

impl Node {
    /// A short description of the node's type, for "expected X, found Y" messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool { .. } => "a boolean",
            Kind::Int { .. } => "an integer",
            Kind::Float { .. } => "a number",
            Kind::Str { .. } => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }

    /// The entries when this is a mapping.
    pub(crate) fn entries(&self) -> Option<&[Entry]> {
        match &self.kind {
            Kind::Map(entries) => Some(entries),
            _ => None,
        }
    }
}

/// Joins a key path and a key: `a.b` + `c` → `a.b.c`.
pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Joins a key path and a list index: `a.b` + 2 → `a.b[2]`.
pub(crate) fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

// ---------------------------------------------------------------------------
// serde-saphyr → raw tree with spans

enum Raw {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<RawKey>, Spanned<Raw>)>),
}

enum RawKey {
    Str(String),
    /// A non-string scalar key; its text is taken from the source.
    Other(String),
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::Int(i128::from(v)))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Raw, E> {
        Ok(i128::try_from(v).map_or(Raw::Float(v as f64), Raw::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        Ok(Raw::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Raw>>()? {
            items.push(item);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<RawKey>>()? {
            let value = map.next_value::<Spanned<Raw>>()?;
            entries.push((key, value));
        }
        Ok(Raw::Map(entries))
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawKeyVisitor;

impl Visitor<'_> for RawKeyVisitor {
    type Value = RawKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }
    fn visit_unit<E: de::Error>(self) -> Result<RawKey, E> {
        Ok(RawKey::Other("null".to_owned()))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawKey, E> {
        Ok(RawKey::Other(v.to_string()))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawKey, E> {
        Ok(RawKey::Other(v.to_string()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawKey, E> {
        Ok(RawKey::Other(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawKey, E> {
        Ok(RawKey::Other(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
        Ok(RawKey::Str(v.to_owned()))
    }
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawKeyVisitor)
    }
}

// ---------------------------------------------------------------------------
// raw tree → Node, with substitution

/// The source text, for raw scalar text and positions of `${VAR}` inside scalars.
struct Source<'a> {
    text: &'a str,
    /// Byte offset of the start of each line.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source { text, line_starts }
    }

    /// The source slice a location spans, when known.
    fn slice(&self, location: &Location) -> Option<(usize, &'a str)> {
        let span = location.span();
        let start = usize::try_from(span.byte_offset()?).ok()?;
        let len = usize::try_from(span.byte_len()?).ok()?;
        let text = self.text.get(start..start.checked_add(len)?)?;
        Some((start, text))
    }

    /// Line and column (1-based, column in characters) of a byte offset.
    fn pos_of(&self, offset: usize) -> Option<Pos> {
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        let column = self.text.get(start..offset)?.chars().count() + 1;
        Some(Pos {
            line: line as u64,
            column: column as u64,
        })
    }
}

struct Builder<'a> {
    file: &'a str,
    source: Source<'a>,
    /// `None`: strings are kept as written (`${VAR}` included).
    env: Option<EnvLookup<'a>>,
    errors: Vec<ConfigError>,
}

impl Builder<'_> {
    fn scalar_text(&self, defined: &Location, fallback: String) -> String {
        match self.source.slice(defined) {
            Some((_, text)) if !text.is_empty() => text.to_owned(),
            _ => fallback,
        }
    }

    fn build(&mut self, spanned: Spanned<Raw>, path: &str) -> Node {
        let Spanned {
            value,
            referenced,
            defined,
        } = spanned;
        let pos = Pos::of(&referenced);
        let kind = match value {
            Raw::Null => Kind::Null,
            Raw::Bool(value) => Kind::Bool {
                text: self.scalar_text(&defined, value.to_string()),
            },
            Raw::Int(value) => Kind::Int {
                value,
                text: self.scalar_text(&defined, value.to_string()),
            },
            Raw::Float(value) => Kind::Float {
                value,
                text: self.scalar_text(&defined, value.to_string()),
            },
            Raw::Str(value) => self.string(value, &defined, pos, path),
            Raw::Seq(items) => Kind::Seq(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| self.build(item, &index(path, i)))
                    .collect(),
            ),
            Raw::Map(raw_entries) => {
                let mut entries: Vec<Entry> = Vec::with_capacity(raw_entries.len());
                // Key → where it is first written: one lookup per key, so a mapping of
                // n keys is checked in O(n) (a scan of the entries was O(n²): 24 s for
                // 120,000 keys).
                let mut first_at: HashMap<String, Pos> = HashMap::with_capacity(raw_entries.len());
                for (key, value) in raw_entries {
                    let key_pos = Pos::of(&key.referenced);
                    let key = match key.value {
                        RawKey::Str(s) => s,
                        RawKey::Other(fallback) => self.scalar_text(&key.defined, fallback),
                    };
                    let key_path = join(path, &key);
                    if let Some(first) = first_at.get(&key) {
                        let hint = format!(
                            "first defined at line {}, column {}; remove one",
                            first.line, first.column
                        );
                        self.errors.push(ConfigError {
                            file: self.file.to_owned(),
                            line: known(key_pos.line),
                            column: known(key_pos.column),
                            key_path,
                            message: format!("duplicate key `{key}`"),
                            hint: Some(hint),
                        });
                        continue;
                    }
                    first_at.insert(key.clone(), key_pos);
                    let value = self.build(value, &key_path);
                    entries.push(Entry {
                        key,
                        key_pos,
                        value,
                    });
                }
                Kind::Map(entries)
            }
        };
        Node { kind, pos }
    }

    fn string(&mut self, value: String, defined: &Location, pos: Pos, path: &str) -> Kind {
        let Some(env) = self.env.filter(|_| value.contains('$')) else {
            return Kind::Str {
                value,
                substituted: false,
            };
        };
        match substitute(&value, env) {
            Ok(s) => Kind::Str {
                value: s.value,
                substituted: s.replaced,
            },
            Err(problems) => {
                // Point at each reference inside the scalar's source text when it is
                // written there as such (plain or simply quoted scalars).
                let slice = self.source.slice(defined);
                let mut search_from = 0usize;
                for problem in problems {
                    let mut at = pos;
                    if let Some((start, text)) = slice
                        && let Some(found) = text
                            .get(search_from..)
                            .and_then(|t| t.find(&problem.reference))
                    {
                        let offset = search_from + found;
                        search_from = offset + problem.reference.len();
                        at = self.source.pos_of(start + offset).unwrap_or(pos);
                    }
                    self.errors.push(ConfigError {
                        file: self.file.to_owned(),
                        line: known(at.line),
                        column: known(at.column),
                        key_path: path.to_owned(),
                        message: problem.message,
                        hint: problem.hint,
                    });
                }
                Kind::Str {
                    value: String::new(),
                    substituted: true,
                }
            }
        }
    }
}

fn known(n: u64) -> Option<u64> {
    (n > 0).then_some(n)
}

/// Builds a located error with no key path.
fn syntax_error(file: &str, line: u64, column: u64, message: String) -> ConfigError {
    ConfigError {
        file: file.to_owned(),
        line: known(line),
        column: known(column),
        key_path: String::new(),
        message,
        hint: None,
    }
}

/// Removes a trailing " at line L, column C" (serde-saphyr) or " at line L column C"
/// (serde_json) from a parser message: the position is shown in front already.
fn strip_position(message: &str, line: u64, column: u64) -> String {
    for suffix in [
        format!(" at line {line}, column {column}"),
        format!(" at line {line} column {column}"),
    ] {
        if let Some(stripped) = message.strip_suffix(&suffix) {
            return stripped.to_owned();
        }
    }
    message.to_owned()
}

fn yaml_error(file: &str, error: &serde_saphyr::Error) -> ConfigError {
    let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
    let mut message = error
        .without_snippet()
        .to_string()
        .replace(", set DuplicateKeyPolicy in Options if acceptable", "");
    if let Some(key) = message.strip_prefix("duplicate mapping key: ") {
        message = format!("duplicate key `{}`", strip_position(key, line, column));
    }
    syntax_error(
        file,
        line,
        column,
        strip_position(message.trim(), line, column),
    )
}

/// Parses `text` (named `file` in errors) into a node tree, substituting `${VAR}` in
/// string values. Returns the tree (when the syntax is valid) and every error found.
pub(crate) fn parse(
    text: &str,
    file: &str,
    format: Format,
    env: EnvLookup<'_>,
) -> (Option<Node>, Vec<ConfigError>) {
    parse_with(text, file, format, Some(env))
}

/// [`parse`] without substitution: string values stay as written (`${VAR}`, `$$`), for
/// copying them into another file.
pub(crate) fn parse_verbatim(
    text: &str,
    file: &str,
    format: Format,
) -> (Option<Node>, Vec<ConfigError>) {
    parse_with(text, file, format, None)
}

fn parse_with(
    text: &str,
    file: &str,
    format: Format,
    env: Option<EnvLookup<'_>>,
) -> (Option<Node>, Vec<ConfigError>) {
    if format == Format::Json
        && let Err(e) = serde_json::from_str::<serde_json::Value>(text)
    {
        let (line, column) = (e.line() as u64, e.column() as u64);
        let message = format!(
            "invalid JSON: {}",
            strip_position(&e.to_string(), line, column)
        );
        return (None, vec![syntax_error(file, line, column, message)]);
    }
    // `.inf` and `.nan` reach the tree as floats, so that the field reading them says
    // which key they are at (and every other error of the file is still reported);
    // rejected here, a non-finite float was the file's only, pathless error.
    let mut options = serde_saphyr::Options::default();
    options.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    let raw = match serde_saphyr::from_str_with_options::<Spanned<Raw>>(text, options) {
        Ok(raw) => raw,
        Err(e) => {
            let error = yaml_error(file, &e);
            // Valid JSON that the YAML parser rejects (rare) is read without
            // positions. A duplicate key stays an error.
            if format == Format::Json
                && !error.message.starts_with("duplicate key")
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
            {
                let mut builder = Builder {
                    file,
                    source: Source::new(""),
                    env,
                    errors: Vec::new(),
                };
                let node = builder.json_node(value, "");
                return (Some(node), builder.errors);
            }
            return (None, vec![error]);
        }
    };
    let mut builder = Builder {
        file,
        source: Source::new(text),
        env,
        errors: Vec::new(),
    };
    let node = builder.build(raw, "");
    (Some(node), builder.errors)
}

impl Builder<'_> {
    fn json_node(&mut self, value: serde_json::Value, path: &str) -> Node {
        use serde_json::Value;
        let pos = Pos::default();
        let kind = match value {
            Value::Null => Kind::Null,
            Value::Bool(value) => Kind::Bool {
                text: value.to_string(),
            },
            Value::Number(n) => {
                let text = n.to_string();
                if let Some(i) = n.as_i64() {
                    Kind::Int {
                        value: i128::from(i),
                        text,
                    }
                } else if let Some(u) = n.as_u64() {
                    Kind::Int {
                        value: i128::from(u),
                        text,
                    }
                } else {
                    Kind::Float {
                        value: n.as_f64().unwrap_or(f64::NAN),
                        text,
                    }
                }
            }
            Value::String(s) => self.string(s, &Location::UNKNOWN, pos, path),
            Value::Array(items) => Kind::Seq(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| self.json_node(item, &index(path, i)))
                    .collect(),
            ),
            Value::Object(map) => Kind::Map(
                map.into_iter()
                    .map(|(key, value)| {
                        let value = self.json_node(value, &join(path, &key));
                        Entry {
                            key,
                            key_pos: pos,
                            value,
                        }
                    })
                    .collect(),
            ),
        };
        Node { kind, pos }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_ok(text: &str, format: Format) -> Node {
        let (node, errors) = parse(text, "t", format, &no_env);
        assert!(errors.is_empty(), "{errors:?}");
        node.unwrap()
    }

    #[test]
    fn positions_of_keys_and_values() {
        let node = parse_ok("a: 1\nb:\n  c: \"x\"\n", Format::Yaml);
        let entries = node.entries().unwrap();
        assert_eq!(entries[0].key, "a");
        assert_eq!(entries[0].key_pos, Pos { line: 1, column: 1 });
        assert_eq!(entries[0].value.pos, Pos { line: 1, column: 4 });
        let inner = entries[1].value.entries().unwrap();
        assert_eq!(inner[0].key_pos, Pos { line: 3, column: 3 });
        assert_eq!(inner[0].value.pos, Pos { line: 3, column: 6 });
        assert!(matches!(&inner[0].value.kind, Kind::Str { value, .. } if value == "x"));
    }

    #[test]
    fn non_string_keys_keep_their_text() {
        let node = parse_ok("n: 1\n1: 2\nnull: 3\n", Format::Yaml);
        let keys: Vec<&str> = node
            .entries()
            .unwrap()
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        assert_eq!(keys, ["n", "1", "null"]);
    }

    #[test]
    fn json_positions() {
        let node = parse_ok("{\n  \"a\": {\"b\": 2.5}\n}", Format::Json);
        let a = &node.entries().unwrap()[0];
        assert_eq!(a.key_pos, Pos { line: 2, column: 3 });
        let b = &a.value.entries().unwrap()[0];
        assert_eq!(
            b.value.pos,
            Pos {
                line: 2,
                column: 14
            }
        );
        assert!(matches!(b.value.kind, Kind::Float { value, .. } if value == 2.5));
    }

    #[test]
    fn json_syntax_error_has_position() {
        let (node, errors) = parse(
            "{\"a\": 1,\n \"b\": [1,]\n}",
            "c.json",
            Format::Json,
            &no_env,
        );
        assert!(node.is_none());
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, Some(2));
        assert!(
            errors[0].message.starts_with("invalid JSON: "),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn yaml_syntax_error_has_position() {
        let (node, errors) = parse("a: 1\nb: [1, 2\nc: 3\n", "c.yaml", Format::Yaml, &no_env);
        assert!(node.is_none());
        assert_eq!(errors[0].line, Some(3));
        assert!(
            !errors[0].message.contains("at line"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn duplicate_keys_are_errors() {
        // serde_json accepts duplicate keys; the YAML parser, which gives positions, does not.
        for (text, format, path) in [
            ("a: 1\na: 2\n", Format::Yaml, ""),
            ("{\"a\": 1,\n \"a\": 2}", Format::Json, ""),
        ] {
            let (_, errors) = parse(text, "d", format, &no_env);
            assert_eq!(errors.len(), 1, "{format:?}");
            assert_eq!(errors[0].line, Some(2));
            assert_eq!(errors[0].key_path, path);
            assert_eq!(errors[0].message, "duplicate key `a`");
        }
    }

    #[test]
    fn duplicate_keys_in_a_large_mapping_are_each_found_once() {
        // 120,000 distinct keys, then three that repeat one of them as written: every
        // repeat is reported, at its own line, naming the first; nothing else is. (The
        // YAML parser stops at the first repeat of a value; `7` and `"7"` are distinct
        // values to it but one key here, so these reach the scan.)
        let n = 120_000;
        let mut text = String::with_capacity(n * 16);
        for i in 0..n {
            text.push_str(&format!("\"{i}\": {i}\n"));
        }
        for i in [0, 59_999, n - 1] {
            text.push_str(&format!("{i}: dup\n"));
        }
        let (node, errors) = parse(&text, "big.yaml", Format::Yaml, &no_env);
        let got: Vec<(Option<u64>, &str, Option<&str>)> = errors
            .iter()
            .map(|e| (e.line, e.message.as_str(), e.hint.as_deref()))
            .collect();
        let line = |i: usize| Some(u64::try_from(i).unwrap());
        assert_eq!(
            got,
            [
                (
                    line(n + 1),
                    "duplicate key `0`",
                    Some("first defined at line 1, column 1; remove one")
                ),
                (
                    line(n + 2),
                    "duplicate key `59999`",
                    Some("first defined at line 60000, column 1; remove one")
                ),
                (
                    line(n + 3),
                    "duplicate key `119999`",
                    Some("first defined at line 120000, column 1; remove one")
                ),
            ]
        );
        // The first of each stays; the mapping has every distinct key once.
        let node = node.unwrap();
        let entries = node.entries().unwrap();
        assert_eq!(entries.len(), n);
        assert!(matches!(entries[0].value.kind, Kind::Int { value: 0, .. }));
        assert_eq!(entries[n - 1].key, format!("{}", n - 1));
    }

    #[test]
    fn missing_variable_points_inside_the_scalar() {
        let text = "# $NOT_IN_COMMENTS\nurl: \"http://${HOST_X}:${PORT_X}/v1\"\n";
        let (_, errors) = parse(text, "e.yaml", Format::Yaml, &no_env);
        assert_eq!(errors.len(), 2);
        assert_eq!((errors[0].line, errors[0].column), (Some(2), Some(14)));
        assert_eq!(errors[0].key_path, "url");
        assert_eq!(
            errors[0].message,
            "environment variable `HOST_X` is not set"
        );
        assert_eq!((errors[1].line, errors[1].column), (Some(2), Some(24)));
    }

    #[test]
    fn substituted_values_are_marked() {
        let env = |name: &str| (name == "P").then(|| "4000".to_owned());
        let (node, errors) = parse("port: $P\nx: a$$b\n", "e.yaml", Format::Yaml, &env);
        assert!(errors.is_empty());
        let node = node.unwrap();
        let entries = node.entries().unwrap();
        assert!(matches!(&entries[0].value.kind,
            Kind::Str { value, substituted: true } if value == "4000"));
        assert!(matches!(&entries[1].value.kind,
            Kind::Str { value, substituted: false } if value == "a$b"));
    }
}
