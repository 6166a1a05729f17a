//! One item to judge: an input JSONL line `{"id", "prompt", "response", "reference"?, ...}`.

use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// An item id as the input gave it: a JSON string or number.
///
/// It is written back exactly as given (a number stays a number); [`key`](Self::key) is its
/// string form, used to match lines across runs (so `"7"` and `7` are the same item).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct ItemId(Value);

impl ItemId {
    /// A string id.
    pub fn string(id: impl Into<String>) -> ItemId {
        ItemId(Value::String(id.into()))
    }

    /// A numeric id.
    pub fn number(id: impl Into<serde_json::Number>) -> ItemId {
        ItemId(Value::Number(id.into()))
    }

    /// The id of a JSON value: `Some` for a string or a number, else `None`.
    pub fn from_json(value: Value) -> Option<ItemId> {
        match value {
            Value::String(_) | Value::Number(_) => Some(ItemId(value)),
            _ => None,
        }
    }

    /// The id as written in the input (a JSON string or number).
    pub fn as_json(&self) -> &Value {
        &self.0
    }

    /// The string key: the string itself, or the number as JSON writes it.
    pub fn key(&self) -> String {
        match &self.0 {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for ItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Value::String(s) => f.write_str(s),
            other => write!(f, "{other}"),
        }
    }
}

impl From<&str> for ItemId {
    fn from(s: &str) -> ItemId {
        ItemId::string(s)
    }
}

impl From<String> for ItemId {
    fn from(s: String) -> ItemId {
        ItemId::string(s)
    }
}

impl From<u64> for ItemId {
    fn from(n: u64) -> ItemId {
        ItemId::number(n)
    }
}

impl From<i64> for ItemId {
    fn from(n: i64) -> ItemId {
        ItemId::number(n)
    }
}

/// One response to judge.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeItem {
    /// The item id (string or number), echoed in the output.
    pub id: ItemId,
    /// The prompt the response answers (`{prompt}` of the rubric).
    pub prompt: String,
    /// The response being judged (`{response}`; its tokens drive the length penalty).
    pub response: String,
    /// A reference answer (`{reference}`; empty when `None`).
    pub reference: Option<String>,
    /// Pairwise items: the two responses compared (`response_a`, `response_b`);
    /// `response` is then empty. `None` for a pointwise item.
    pub pair: Option<ResponsePair>,
    /// Every other field of the input line, copied to the output line.
    pub extra: Map<String, Value>,
}

/// The two responses of a pairwise item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponsePair {
    /// `response_a` (`{response_a}` of the rubric).
    pub a: String,
    /// `response_b` (`{response_b}`).
    pub b: String,
}

impl JudgeItem {
    /// An item without a reference or extra fields.
    pub fn new(
        id: impl Into<ItemId>,
        prompt: impl Into<String>,
        response: impl Into<String>,
    ) -> JudgeItem {
        JudgeItem {
            id: id.into(),
            prompt: prompt.into(),
            response: response.into(),
            reference: None,
            pair: None,
            extra: Map::new(),
        }
    }

    /// A pairwise item: `response_a` and `response_b` compared.
    pub fn pair(
        id: impl Into<ItemId>,
        prompt: impl Into<String>,
        response_a: impl Into<String>,
        response_b: impl Into<String>,
    ) -> JudgeItem {
        JudgeItem {
            pair: Some(ResponsePair {
                a: response_a.into(),
                b: response_b.into(),
            }),
            ..JudgeItem::new(id, prompt, "")
        }
    }

    /// Sets the reference answer.
    pub fn with_reference(mut self, reference: impl Into<String>) -> JudgeItem {
        self.reference = Some(reference.into());
        self
    }

    /// Parses one input line: a JSON object with `id` (string or number), `prompt` and
    /// `response` (strings) and an optional `reference` (string or null); every other
    /// field goes to [`extra`](Self::extra).
    ///
    /// # Errors
    /// A one-line reason: invalid JSON, not an object, a missing or mistyped field.
    pub fn from_json_line(line: &str) -> Result<JudgeItem, String> {
        JudgeItem::parse_line(line, false)
    }

    /// Parses one pairwise input line: as [`from_json_line`](Self::from_json_line) with
    /// `response_a` and `response_b` (strings) instead of `response`.
    ///
    /// # Errors
    /// As [`from_json_line`](Self::from_json_line).
    pub fn from_json_line_pairwise(line: &str) -> Result<JudgeItem, String> {
        JudgeItem::parse_line(line, true)
    }

    fn parse_line(line: &str, pairwise: bool) -> Result<JudgeItem, String> {
        let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("not a JSON object".to_owned());
        };
        let id = match map.remove("id") {
            None => return Err("missing `id`".to_owned()),
            Some(v) => ItemId::from_json(v)
                .ok_or_else(|| "`id` must be a string or a number".to_owned())?,
        };
        let mut text = |name: &str| match map.remove(name) {
            None => Err(format!("missing `{name}`")),
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(format!("`{name}` must be a string")),
        };
        let prompt = text("prompt")?;
        let (response, pair) = if pairwise {
            let a = text("response_a")?;
            let b = text("response_b")?;
            (String::new(), Some(ResponsePair { a, b }))
        } else {
            (text("response")?, None)
        };
        let reference = match map.remove("reference") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err("`reference` must be a string or null".to_owned()),
        };
        Ok(JudgeItem {
            id,
            prompt,
            response,
            reference,
            pair,
            extra: map,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_json_type() {
        let item =
            JudgeItem::from_json_line(r#"{"id": 42, "prompt": "p", "response": "r"}"#).unwrap();
        assert_eq!(item.id.key(), "42");
        assert_eq!(item.id.as_json(), &serde_json::json!(42));
        let item = JudgeItem::from_json_line(
            r#"{"id": "a-1", "prompt": "p", "response": "r", "reference": null, "k": [1]}"#,
        )
        .unwrap();
        assert_eq!(item.id.key(), "a-1");
        assert_eq!(item.reference, None);
        assert_eq!(item.extra["k"], serde_json::json!([1]));
    }

    #[test]
    fn pairwise_lines_have_two_responses() {
        let line = r#"{"id": 1, "prompt": "p", "response_a": "x", "response_b": "y", "k": 2}"#;
        let item = JudgeItem::from_json_line_pairwise(line).unwrap();
        assert_eq!(
            item.pair.as_ref().map(|p| (p.a.as_str(), p.b.as_str())),
            Some(("x", "y"))
        );
        assert_eq!(item.extra.len(), 1);
        let line = r#"{"id": 1, "prompt": "p", "response_a": "x"}"#;
        assert_eq!(
            JudgeItem::from_json_line_pairwise(line).unwrap_err(),
            "missing `response_b`"
        );
        // A pointwise line is not a pairwise item, nor the reverse.
        assert!(
            JudgeItem::from_json_line(
                r#"{"id": 1, "prompt": "p", "response_a": "x", "response_b": "y"}"#
            )
            .is_err()
        );
    }

    #[test]
    fn bad_lines_say_why() {
        let reason = |l: &str| JudgeItem::from_json_line(l).unwrap_err();
        assert!(reason("{nope").starts_with("invalid JSON"));
        assert_eq!(reason("[1]"), "not a JSON object");
        assert_eq!(
            reason(r#"{"prompt": "p", "response": "r"}"#),
            "missing `id`"
        );
        assert_eq!(
            reason(r#"{"id": true, "prompt": "p", "response": "r"}"#),
            "`id` must be a string or a number"
        );
        assert_eq!(reason(r#"{"id": 1, "response": "r"}"#), "missing `prompt`");
        assert_eq!(
            reason(r#"{"id": 1, "prompt": "p", "response": 3}"#),
            "`response` must be a string"
        );
        assert_eq!(
            reason(r#"{"id": 1, "prompt": "p", "response": "r", "reference": 1}"#),
            "`reference` must be a string or null"
        );
    }
}
