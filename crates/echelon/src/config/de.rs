//! Typed reading of node trees through serde: a [`serde::Deserializer`] over a
//! [`Node`], so that each configuration section is a `#[derive(Deserialize)]` struct
//! whose fields are written once.
//!
//! Every error keeps its file position and key path (the deserializer knows which node
//! it is reading), and one read reports **all** the errors of the value it reads: when
//! a value fails, the entry (or list item) that failed is *poisoned* and the value is
//! read again without it — as if that entry were absent — until it reads or the failure
//! is not an entry's. So `{ timeout: 0, chunk_timeout: -1 }` reports both, in one load.
//!
//! Conventions of the deserializer:
//! - a `null` value of a struct field reads as if the key were absent (`timeout: ~`
//!   keeps the default); a `null` mapping or list reads as an empty one;
//! - a string field also takes a plain scalar of another type as written (`model: 4`);
//! - a number or boolean field also takes a string that came from a `${VAR}`
//!   substitution (`port: ${PORT}`), not one written in quotes;
//! - a message may carry a hint after [`HINT`] (what `de::Error::custom` receives is
//!   split there), so field checks elsewhere can give one;
//! - string values never appear in a message (they may be API keys).

use std::collections::HashSet;
use std::fmt::{self, Display};

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, Expected, IntoDeserializer, MapAccess,
    SeqAccess, Unexpected, Visitor,
};

use super::error::did_you_mean;
use super::node::{Entry, Kind, Node, Pos, index, join};
use super::read::Ctx;

/// Separates a message from its hint in the text given to `de::Error::custom`.
pub(crate) const HINT: &str = "\n  hint: ";

/// `message` with `hint`, in the form [`DeError`] splits again.
pub(crate) fn with_hint(message: impl Display, hint: impl Display) -> String {
    format!("{message}{HINT}{hint}")
}

/// Hints for a required key that is missing, by (struct name, key).
const MISSING_HINTS: &[(&str, &str, &str)] = &[
    (
        "ProviderConfig",
        "base_url",
        "e.g. `base_url: \"http://127.0.0.1:8082/v1\"`",
    ),
    (
        "PricingConfig",
        "",
        "e.g. `pricing: { input_per_1m: 0.15, output_per_1m: 0.60 }` (USD)",
    ),
    (
        "WrapperConfig",
        "target",
        "name the route tried first, e.g. `target: fast_group.echelon1`",
    ),
];

fn missing_hint(name: &str, field: &str) -> Option<String> {
    MISSING_HINTS
        .iter()
        .find(|(n, f, _)| *n == name && (f.is_empty() || *f == field))
        .map(|(_, _, hint)| (*hint).to_owned())
}

/// The identity of a node inside its (immutable, borrowed) tree.
fn id(node: &Node) -> usize {
    std::ptr::from_ref(node) as usize
}

/// Why reading a node failed (boxed: errors travel up through every level of a read).
#[derive(Debug)]
pub(crate) struct DeError(Box<Problem>);

/// What a [`DeError`] holds.
#[derive(Debug)]
pub(crate) struct Problem {
    message: String,
    hint: Option<String>,
    /// Where: set by the innermost node that knows (first one wins).
    at: Option<(Pos, String)>,
    /// The entry or list item to leave out on the next try.
    poison: Option<usize>,
    /// Already reported (a required key whose value failed): not recorded again.
    silent: bool,
    /// `unknown key`: the key and the struct's fields, for the hint.
    unknown_key: Option<(String, &'static [&'static str])>,
    /// `missing required key`: the key.
    missing: Option<&'static str>,
}

impl std::ops::Deref for DeError {
    type Target = Problem;
    fn deref(&self) -> &Problem {
        &self.0
    }
}

impl std::ops::DerefMut for DeError {
    fn deref_mut(&mut self) -> &mut Problem {
        &mut self.0
    }
}

impl DeError {
    fn new(message: String, hint: Option<String>) -> Self {
        DeError(Box::new(Problem {
            message,
            hint,
            at: None,
            poison: None,
            silent: false,
            unknown_key: None,
            missing: None,
        }))
    }

    fn at(message: String, hint: Option<String>, pos: Pos, path: &str) -> Self {
        let mut e = DeError::new(message, hint);
        e.at = Some((pos, path.to_owned()));
        e
    }

    /// Sets the position and path unless a deeper node has.
    fn locate(mut self, pos: Pos, path: impl FnOnce() -> String) -> Self {
        if self.at.is_none() {
            self.at = Some((pos, path()));
        }
        self
    }

    /// Sets the entry to leave out unless a deeper one is set.
    fn poison(mut self, node: &Node) -> Self {
        if self.poison.is_none() {
            self.poison = Some(id(node));
        }
        self
    }
}

impl Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "{HINT}{hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DeError {}

/// How `Unexpected` values are named in messages (never showing a string's value).
fn describe(unexpected: &Unexpected<'_>) -> String {
    match unexpected {
        Unexpected::Bool(_) => "a boolean".to_owned(),
        Unexpected::Unsigned(_) | Unexpected::Signed(_) => "an integer".to_owned(),
        Unexpected::Float(_) => "a number".to_owned(),
        Unexpected::Char(_) | Unexpected::Str(_) => "a string".to_owned(),
        Unexpected::Bytes(_) => "bytes".to_owned(),
        Unexpected::Unit | Unexpected::Option => "null".to_owned(),
        Unexpected::Seq => "a list".to_owned(),
        Unexpected::Map => "a mapping".to_owned(),
        other => other.to_string(),
    }
}

fn split_hint(text: &str) -> (String, Option<String>) {
    match text.split_once(HINT) {
        Some((message, hint)) => (message.to_owned(), Some(hint.to_owned())),
        None => (text.to_owned(), None),
    }
}

impl de::Error for DeError {
    fn custom<T: Display>(msg: T) -> Self {
        let (message, hint) = split_hint(&msg.to_string());
        DeError::new(message, hint)
    }

    fn invalid_type(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        let (expected, hint) = split_hint(&expected.to_string());
        DeError::new(
            format!("expected {expected}, found {}", describe(&unexpected)),
            hint,
        )
    }

    fn invalid_value(unexpected: Unexpected<'_>, expected: &dyn Expected) -> Self {
        let (expected, hint) = split_hint(&expected.to_string());
        // Numbers are shown; strings never are (they may be keys).
        let found = match unexpected {
            Unexpected::Signed(v) => v.to_string(),
            Unexpected::Unsigned(v) => v.to_string(),
            Unexpected::Float(v) => v.to_string(),
            other => describe(&other),
        };
        DeError::new(format!("expected {expected}, found {found}"), hint)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let names: Vec<String> = expected.iter().map(|v| format!("`{v}`")).collect();
        DeError::new(
            format!("unknown value `{variant}`"),
            Some(
                did_you_mean(variant, expected.iter().copied())
                    .unwrap_or_else(|| format!("one of {}", names.join(", "))),
            ),
        )
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut e = DeError::new(
            format!("unknown key `{field}`"),
            did_you_mean(field, expected.iter().copied()),
        );
        e.unknown_key = Some((field.to_owned(), expected));
        e
    }

    fn missing_field(field: &'static str) -> Self {
        let mut e = DeError::new(format!("missing required key `{field}`"), None);
        e.missing = Some(field);
        e
    }

    fn duplicate_field(field: &'static str) -> Self {
        DeError::new(format!("duplicate key `{field}`"), None)
    }
}

/// What the value being read sees of its own top-level mapping: some keys are read by
/// hand around it (`name`, `echelon<N>` of a task group, …).
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    /// Whether a top-level key is read by this value (the others are left out).
    pub(crate) keeps: &'a dyn Fn(&str) -> bool,
    /// Keys read by hand, offered in "did you mean" hints for unknown keys too.
    pub(crate) also_known: &'a [&'a str],
}

/// Errors reported for one value before reading it stops: each error means reading
/// the value once more, so a hostile entry with thousands of bad items costs at most
/// this many passes.
const MAX_ERRORS_PER_VALUE: usize = 100;

/// Reads `node` (whose key path is `path`) as a `T`, recording every error in `ctx`
/// (up to [`MAX_ERRORS_PER_VALUE`]). Entries that fail are left out (so defaults stand
/// in for them); `None` when the value as a whole cannot be read (not a mapping, a
/// required key missing, too many errors).
pub(crate) fn read<T: DeserializeOwned>(ctx: &mut Ctx, node: &Node, path: &str) -> Option<T> {
    read_in(ctx, node, path, None)
}

/// [`read`], the top-level mapping seen through `scope`.
pub(crate) fn read_in<T: DeserializeOwned>(
    ctx: &mut Ctx,
    node: &Node,
    path: &str,
    scope: Option<Scope<'_>>,
) -> Option<T> {
    let mut poisoned = HashSet::new();
    let mut reported = 0usize;
    loop {
        let de = NodeDe {
            node,
            path: path.to_owned(),
            poisoned: &poisoned,
            scope,
        };
        match T::deserialize(de) {
            Ok(value) => return Some(value),
            Err(e) => {
                let root = id(node);
                let e = *e.0;
                let poison = e.poison;
                if !e.silent {
                    let (pos, at) = e.at.unwrap_or_else(|| (node.pos, path.to_owned()));
                    ctx.error(pos, &at, e.message, e.hint);
                    reported += 1;
                }
                if reported >= MAX_ERRORS_PER_VALUE {
                    ctx.error(
                        node.pos,
                        path,
                        format!("{reported} errors here; the rest are not shown"),
                        Some("fix these first".to_owned()),
                    );
                    return None;
                }
                match poison {
                    Some(p) if p != root && poisoned.insert(p) => {}
                    _ => return None,
                }
            }
        }
    }
}

/// The text of a scalar as a string field reads it: a string's value, another
/// scalar as written; `None` for null, lists and mappings.
pub(crate) fn scalar_text(node: &Node) -> Option<&str> {
    match &node.kind {
        Kind::Str { value, .. } => Some(value),
        Kind::Int { text, .. } | Kind::Float { text, .. } | Kind::Bool { text, .. } => Some(text),
        _ => None,
    }
}

/// The field names of a `#[derive(Deserialize)]` struct (what serde knows it by), for
/// code that reads some keys by hand around it.
pub(crate) fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Fields<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Fields<'_> {
        type Error = DeError;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DeError> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, DeError> {
            *self.0 = fields;
            Err(de::Error::custom("fields taken"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// A node being read.
struct NodeDe<'a> {
    node: &'a Node,
    path: String,
    poisoned: &'a HashSet<usize>,
    /// Only for the top-level value of a [`read_in`].
    scope: Option<Scope<'a>>,
}

impl NodeDe<'_> {
    fn error(&self, message: String, hint: Option<String>) -> DeError {
        DeError::at(message, hint, self.node.pos, &self.path)
    }

    /// "write the number without quotes" for a quoted string.
    fn quoted_hint(&self, hint: &str) -> Option<String> {
        matches!(self.node.kind, Kind::Str { .. }).then(|| hint.to_owned())
    }

    fn integer(&self) -> Result<i128, DeError> {
        let value = match &self.node.kind {
            Kind::Int { value, .. } => Some(*value),
            Kind::Str {
                value,
                substituted: true,
            } => value.trim().parse::<i128>().ok(),
            _ => None,
        };
        value.ok_or_else(|| {
            self.error(
                format!("expected an integer, found {}", self.node.type_name()),
                self.quoted_hint("write the number without quotes"),
            )
        })
    }

    fn float(&self) -> Result<f64, DeError> {
        let value = match &self.node.kind {
            Kind::Int { value, .. } => Some(*value as f64),
            Kind::Float { value, .. } => Some(*value),
            Kind::Str {
                value,
                substituted: true,
            } => value.trim().parse::<f64>().ok(),
            _ => None,
        };
        match value {
            Some(v) if v.is_finite() => Ok(v),
            Some(_) => Err(self.error("expected a finite number".to_owned(), None)),
            None => Err(self.error(
                format!("expected a number, found {}", self.node.type_name()),
                self.quoted_hint("write the number without quotes"),
            )),
        }
    }

    fn boolean(&self) -> Result<bool, DeError> {
        let text = match &self.node.kind {
            Kind::Bool { text } => Some(text.as_str()),
            Kind::Str {
                value,
                substituted: true,
            } => Some(value.trim()),
            _ => None,
        };
        match text.map(str::to_ascii_lowercase).as_deref() {
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            _ => Err(self.error(
                format!(
                    "expected `true` or `false`, found {}",
                    self.node.type_name()
                ),
                self.quoted_hint("write `true` or `false` without quotes"),
            )),
        }
    }

    fn text(&self) -> Result<&str, DeError> {
        scalar_text(self.node).ok_or_else(|| {
            self.error(
                format!("expected a string, found {}", self.node.type_name()),
                None,
            )
        })
    }

    fn entries(&self) -> Result<&[Entry], DeError> {
        match &self.node.kind {
            Kind::Map(entries) => Ok(entries),
            Kind::Null => Ok(&[]),
            _ => Err(self.error(
                format!("expected a mapping, found {}", self.node.type_name()),
                None,
            )),
        }
    }

    fn items(&self) -> Result<&[Node], DeError> {
        match &self.node.kind {
            Kind::Seq(items) => Ok(items),
            Kind::Null => Ok(&[]),
            _ => Err(self.error(
                format!("expected a list, found {}", self.node.type_name()),
                Some("write a list: `[a, b]`, or one `- item` per line".to_owned()),
            )),
        }
    }
}

/// Visits an integer with the narrowest visitor method that holds it.
fn visit_int<'de, V: Visitor<'de>>(visitor: V, value: i128) -> Result<V::Value, DeError> {
    if let Ok(v) = i64::try_from(value) {
        visitor.visit_i64(v)
    } else if let Ok(v) = u64::try_from(value) {
        visitor.visit_u64(v)
    } else {
        visitor.visit_i128(value)
    }
}

macro_rules! integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let value = self.integer()?;
            visit_int(visitor, value)
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.kind {
            Kind::Null => visitor.visit_unit(),
            Kind::Bool { .. } => visitor.visit_bool(self.boolean()?),
            Kind::Int { value, .. } => visit_int(visitor, *value),
            Kind::Float { value, .. } => visitor.visit_f64(*value),
            Kind::Str { value, .. } => visitor.visit_str(value),
            Kind::Seq(_) => self.deserialize_seq(visitor),
            Kind::Map(_) => self.deserialize_map(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_bool(self.boolean()?)
    }

    integers! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_f64(self.float()?)
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_str(self.text()?)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.kind {
            Kind::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.node.kind {
            Kind::Null => visitor.visit_unit(),
            _ => Err(self.error(
                format!("expected null, found {}", self.node.type_name()),
                None,
            )),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let items = self.items()?;
        visitor.visit_seq(SeqDe {
            items: items.iter().enumerate(),
            path: &self.path,
            poisoned: self.poisoned,
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let entries = self.entries()?;
        visitor.visit_map(MapDe {
            entries: entries.iter(),
            current: None,
            path: &self.path,
            poisoned: self.poisoned,
            fields: None,
            scope: self.scope,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let entries = self.entries()?;
        let result = visitor.visit_map(MapDe {
            entries: entries.iter(),
            current: None,
            path: &self.path,
            poisoned: self.poisoned,
            fields: Some(fields),
            scope: self.scope,
        });
        result.map_err(|mut e| {
            let Some(field) = e.missing.filter(|_| e.at.is_none()) else {
                return e;
            };
            match entries.iter().find(|entry| entry.key == field) {
                // Its value failed and was reported: the key is not missing.
                Some(entry) if self.poisoned.contains(&id(&entry.value)) => e.silent = true,
                Some(entry) => {
                    e.message = format!("`{field}` needs a value");
                    e.at = Some((entry.key_pos, join(&self.path, field)));
                }
                None => {
                    e.hint = missing_hint(name, field);
                    e.at = Some((self.node.pos, self.path.clone()));
                }
            }
            e
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let text = self.text()?;
        visitor.visit_enum(text.into_deserializer())
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

/// The items of a list being read; poisoned items are left out.
struct SeqDe<'a, 'p> {
    items: std::iter::Enumerate<std::slice::Iter<'a, Node>>,
    path: &'p str,
    poisoned: &'a HashSet<usize>,
}

impl<'de> SeqAccess<'de> for SeqDe<'_, '_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((i, item)) = self
            .items
            .by_ref()
            .find(|(_, item)| !self.poisoned.contains(&id(item)))
        else {
            return Ok(None);
        };
        let path = index(self.path, i);
        let de = NodeDe {
            node: item,
            path,
            poisoned: self.poisoned,
            scope: None,
        };
        seed.deserialize(de)
            .map(Some)
            .map_err(|e| e.locate(item.pos, || index(self.path, i)).poison(item))
    }
}

/// The entries of a mapping being read; poisoned entries are left out, and so are
/// the keys outside the [`Scope`], and for a struct the fields written `null`.
struct MapDe<'a, 'p> {
    entries: std::slice::Iter<'a, Entry>,
    current: Option<&'a Entry>,
    path: &'p str,
    poisoned: &'a HashSet<usize>,
    /// A struct's fields (`None` for a map).
    fields: Option<&'static [&'static str]>,
    scope: Option<Scope<'a>>,
}

impl MapDe<'_, '_> {
    fn visible(&self, entry: &Entry) -> bool {
        if self.poisoned.contains(&id(&entry.value)) {
            return false;
        }
        if self.scope.is_some_and(|s| !(s.keeps)(&entry.key)) {
            return false;
        }
        let null_field = matches!(entry.value.kind, Kind::Null)
            && self.fields.is_some_and(|f| f.contains(&entry.key.as_str()));
        !null_field
    }
}

impl<'de> MapAccess<'de> for MapDe<'_, '_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let entry = loop {
            match self.entries.next() {
                None => return Ok(None),
                Some(entry) if self.visible(entry) => break entry,
                Some(_) => {}
            }
        };
        self.current = Some(entry);
        let key: de::value::StrDeserializer<'_, DeError> = entry.key.as_str().into_deserializer();
        seed.deserialize(key).map(Some).map_err(|mut e| {
            if let (Some((key, fields)), Some(scope)) = (&e.unknown_key, self.scope) {
                let known = fields.iter().chain(scope.also_known).copied();
                e.hint = did_you_mean(key, known);
            }
            e.locate(entry.key_pos, || join(self.path, &entry.key))
                .poison(&entry.value)
        })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some(entry) = self.current.take() else {
            return Err(de::Error::custom("a value without its key"));
        };
        let de = NodeDe {
            node: &entry.value,
            path: join(self.path, &entry.key),
            poisoned: self.poisoned,
            scope: None,
        };
        seed.deserialize(de).map_err(|e| {
            e.locate(entry.value.pos, || join(self.path, &entry.key))
                .poison(&entry.value)
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::super::node::{Format, parse};
    use super::*;

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        a: u32,
        b: Option<String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        need: String,
        #[serde(default)]
        n: f64,
        #[serde(default)]
        flag: bool,
        #[serde(default)]
        list: Vec<u8>,
        #[serde(default)]
        inner: Inner,
        #[serde(default)]
        map: BTreeMap<String, u32>,
    }

    fn node(text: &str) -> Node {
        let env = |name: &str| (name == "N").then(|| "7".to_owned());
        let (node, errors) = parse(text, "t.yaml", Format::Yaml, &env);
        assert!(errors.is_empty());
        node.unwrap()
    }

    fn read_outer(text: &str) -> (Option<Outer>, Vec<String>) {
        let mut ctx = Ctx::new("t.yaml");
        let value = read::<Outer>(&mut ctx, &node(text), "x");
        (value, ctx.errors.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn reads_a_struct_with_substitutions_and_nulls() {
        let (value, errors) =
            read_outer("need: 5\nn: $N\nflag: ~\nlist: [1, 2]\ninner: { a: 3 }\nmap: { k: 1 }\n");
        assert!(errors.is_empty(), "{errors:?}");
        let value = value.unwrap();
        assert_eq!(value.need, "5", "a scalar reads as text");
        assert_eq!(value.n, 7.0);
        assert!(!value.flag, "null is absent");
        assert_eq!(value.list, [1, 2]);
        assert_eq!(value.inner.a, 3);
        assert_eq!(value.map["k"], 1);
    }

    #[test]
    fn every_error_of_a_value_is_reported_at_its_place() {
        let (value, errors) = read_outer(
            "need: x\nn: \"1\"\nflag: 3\nlist: [1, z, 3]\ninner: { a: -1, bb: 2 }\nzzz: 1\n",
        );
        assert_eq!(
            errors,
            [
                "t.yaml:2:4: x.n: expected a number, found a string\n  hint: write the number without quotes",
                "t.yaml:3:7: x.flag: expected `true` or `false`, found an integer",
                "t.yaml:4:11: x.list[1]: expected an integer, found a string\n  hint: write the number without quotes",
                "t.yaml:5:13: x.inner.a: expected u32, found -1",
                "t.yaml:5:17: x.inner.bb: unknown key `bb`\n  hint: did you mean `b`?",
                "t.yaml:6:1: x.zzz: unknown key `zzz`",
            ]
        );
        // What could be read was: the bad entries are left out.
        let value = value.unwrap();
        assert_eq!(value.list, [1, 3]);
        assert_eq!(value.inner, Inner::default());
    }

    #[test]
    fn missing_required_keys() {
        let (value, errors) = read_outer("n: 1\n");
        assert!(value.is_none());
        assert_eq!(errors, ["t.yaml:1:1: x: missing required key `need`"]);
        let (_, errors) = read_outer("need: ~\n");
        assert_eq!(errors, ["t.yaml:1:1: x.need: `need` needs a value"]);
        // A required key whose value failed is reported once.
        let (_, errors) = read_outer("need: [1]\n");
        assert_eq!(
            errors,
            ["t.yaml:1:7: x.need: expected a string, found a list"]
        );
    }

    #[test]
    fn wrong_shapes() {
        let (_, errors) = read_outer("[1]\n");
        assert_eq!(errors, ["t.yaml:1:1: x: expected a mapping, found a list"]);
        let (_, errors) = read_outer("need: a\nlist: 5\n");
        assert_eq!(
            errors,
            [
                "t.yaml:2:7: x.list: expected a list, found an integer\n  hint: write a list: `[a, b]`, or one `- item` per line"
            ]
        );
    }

    #[test]
    fn a_scope_hides_keys_and_offers_them_as_hints() {
        let mut ctx = Ctx::new("t.yaml");
        let keeps = |k: &str| k != "name";
        let scope = Scope {
            keeps: &keeps,
            also_known: &["name"],
        };
        let value: Option<Inner> =
            read_in(&mut ctx, &node("name: n\na: 2\nnam: 3\n"), "", Some(scope));
        assert_eq!(value.unwrap().a, 2);
        assert_eq!(ctx.errors.len(), 1);
        assert_eq!(ctx.errors[0].hint.as_deref(), Some("did you mean `name`?"));
    }

    #[test]
    fn errors_of_one_value_are_capped() {
        let items = vec!["[x]"; 5_000].join(", ");
        let (value, errors) = read_outer(&format!("need: a\nlist: [{items}]\n"));
        assert!(value.is_none());
        assert_eq!(errors.len(), MAX_ERRORS_PER_VALUE + 1);
        assert!(errors[0].starts_with("t.yaml:2:8: x.list[0]: expected an integer, found a list"));
        assert_eq!(
            errors[MAX_ERRORS_PER_VALUE],
            "t.yaml:1:1: x: 100 errors here; the rest are not shown\n  hint: fix these first"
        );
    }

    #[test]
    fn field_names_of_a_struct() {
        assert_eq!(fields_of::<Inner>(), ["a", "b"]);
    }
}
