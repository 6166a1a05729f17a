//! The result of judging one item, and its output line.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::{Deserialize, Serialize as DeriveSerialize};
use serde_json::{Map, Value};

use super::item::ItemId;

/// The `error` of an item whose judge never gave a readable score in range.
pub const UNPARSED: &str = "unparsed";

/// Tokens of the judge calls (all asks of one item summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, DeriveSerialize, Deserialize)]
pub struct JudgeTokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
}

/// The input fields, kept in the output with `keep_inputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct KeptInputs {
    /// The prompt.
    pub prompt: String,
    /// The judged response.
    pub response: String,
    /// The reference answer, if any.
    pub reference: Option<String>,
}

/// The judgement of one item; serializes to its output line (see [`to_line`](Self::to_line)).
///
/// Exactly one of `score` and `error` is set. Output fields, in order: `id`, `score`,
/// `reward`, `length_penalty`, `response_tokens`, `raw`, `route`, `model`, `attempts`,
/// `reasks`, `tokens` (`{prompt, completion}`), `cost`, `cached`, `latency_ms`, `error`
/// (only when set), then `prompt`/`response`/`reference` (only with `keep_inputs`), then the
/// input's extra fields (an extra field named like an output field is dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The item id, as given.
    pub id: ItemId,
    /// The score read from the judge, within `[min_score, max_score]`; `None` on error.
    pub score: Option<f64>,
    /// `score + length_penalty`; `None` on error.
    pub reward: Option<f64>,
    /// The length penalty of the response (0 or negative); `None` on error.
    pub length_penalty: Option<f64>,
    /// Tokens of the judged response (`cl100k_base`).
    pub response_tokens: u64,
    /// The judge's last reply; `None` when no call answered.
    pub raw: Option<String>,
    /// The route the judge was asked on.
    pub route: String,
    /// The model id that answered last; `None` when none answered.
    pub model: Option<String>,
    /// Gateway attempts over every ask of this item (0 for a cache hit).
    pub attempts: u32,
    /// Re-asks made after an unreadable or out-of-range answer (0 for a cache hit).
    pub reasks: u32,
    /// Tokens of the judge calls made now (zero for a cache hit).
    pub tokens: JudgeTokens,
    /// USD spent on the judge calls made now (0 for a cache hit, or an unpriced model).
    pub cost: f64,
    /// Served from the cache: no upstream call was made.
    pub cached: bool,
    /// Wall time of this item, milliseconds (after waiting for a concurrency slot).
    pub latency_ms: u64,
    /// `"unparsed"`, `"<status>: <message>"` for a failed judge call, or
    /// `"internal: …"`; `None` when scored.
    pub error: Option<String>,
    /// The inputs, when `keep_inputs` is set.
    pub inputs: Option<KeptInputs>,
    /// The input's extra fields.
    pub extra: Map<String, Value>,
}

/// Output field names; an extra input field with one of these names is dropped.
const RESERVED: [&str; 18] = [
    "id",
    "score",
    "reward",
    "length_penalty",
    "response_tokens",
    "raw",
    "route",
    "model",
    "attempts",
    "reasks",
    "tokens",
    "cost",
    "cached",
    "latency_ms",
    "error",
    "prompt",
    "response",
    "reference",
];

impl Judgement {
    /// Whether a score was read.
    pub fn is_scored(&self) -> bool {
        self.score.is_some()
    }

    /// Whether the judge answered but no score in range could be read.
    pub fn is_unparsed(&self) -> bool {
        self.error.as_deref() == Some(UNPARSED)
    }

    /// The output line as a JSON value.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The output line: compact JSON, without the trailing newline.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            // Only a non-string map key could fail, and there is none.
            format!(
                "{{\"id\":{},\"error\":{}}}",
                self.id.as_json(),
                Value::String(format!("internal: {e}"))
            )
        })
    }
}

/// A float as JSON writes it, `null` for NaN or infinity (which JSON cannot hold).
fn finite(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite())
}

impl Serialize for Judgement {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("score", &finite(self.score))?;
        map.serialize_entry("reward", &finite(self.reward))?;
        map.serialize_entry("length_penalty", &finite(self.length_penalty))?;
        map.serialize_entry("response_tokens", &self.response_tokens)?;
        map.serialize_entry("raw", &self.raw)?;
        map.serialize_entry("route", &self.route)?;
        map.serialize_entry("model", &self.model)?;
        map.serialize_entry("attempts", &self.attempts)?;
        map.serialize_entry("reasks", &self.reasks)?;
        map.serialize_entry("tokens", &self.tokens)?;
        map.serialize_entry("cost", &finite(Some(self.cost)).unwrap_or(0.0))?;
        map.serialize_entry("cached", &self.cached)?;
        map.serialize_entry("latency_ms", &self.latency_ms)?;
        if let Some(error) = &self.error {
            map.serialize_entry("error", error)?;
        }
        if let Some(inputs) = &self.inputs {
            map.serialize_entry("prompt", &inputs.prompt)?;
            map.serialize_entry("response", &inputs.response)?;
            map.serialize_entry("reference", &inputs.reference)?;
        }
        for (k, v) in &self.extra {
            if !RESERVED.contains(&k.as_str()) {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_output_line() {
        let mut extra = Map::new();
        extra.insert("split".into(), json!("train"));
        extra.insert("score".into(), json!("clobbered"));
        let j = Judgement {
            id: ItemId::number(3u64),
            score: None,
            reward: None,
            length_penalty: None,
            response_tokens: 5,
            raw: Some("echo".into()),
            route: "judge".into(),
            model: Some("m".into()),
            attempts: 3,
            reasks: 2,
            tokens: JudgeTokens {
                prompt: 10,
                completion: 2,
            },
            cost: 0.5,
            cached: false,
            latency_ms: 7,
            error: Some(UNPARSED.into()),
            inputs: None,
            extra,
        };
        assert!(j.is_unparsed());
        let v: Value = serde_json::from_str(&j.to_line()).unwrap();
        assert_eq!(
            v,
            json!({
                "id": 3, "score": null, "reward": null, "length_penalty": null,
                "response_tokens": 5, "raw": "echo", "route": "judge", "model": "m",
                "attempts": 3, "reasks": 2, "tokens": {"prompt": 10, "completion": 2},
                "cost": 0.5, "cached": false, "latency_ms": 7, "error": "unparsed",
                "split": "train"
            })
        );
        assert!(j.to_line().starts_with("{\"id\":3,\"score\":null,"));
    }
}
