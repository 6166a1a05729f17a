//! The result of judging one item, and its output line.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde::{Deserialize, Serialize as DeriveSerialize};
use serde_json::{Map, Value};

use super::item::ItemId;
use super::options::{Aggregate, Preference};

/// The `error` of an item whose judge never gave a readable score in range.
pub const UNPARSED: &str = "unparsed";

/// The `error` of an item with fewer parsed samples than the quorum (`samples > 1`).
pub const NO_QUORUM: &str = "no_quorum";

/// The `error` of a pair whose two orders (`swap`) disagree, with
/// `inconsistent: error`.
pub const INCONSISTENT: &str = "inconsistent";

/// The votes of an item judged `samples > 1` times (pointwise).
#[derive(Debug, Clone, PartialEq)]
pub struct Votes {
    /// Each sample's score in sample order; `None` for a sample with no score.
    pub samples: Vec<Option<f64>>,
    /// How the scores were combined into `score`.
    pub aggregate: Aggregate,
    /// Population standard deviation of the parsed scores; `None` when none parsed.
    pub stdev: Option<f64>,
}

/// The verdict of a pairwise item.
#[derive(Debug, Clone, PartialEq)]
pub struct PairVerdict {
    /// The preferred response; `None` on error.
    pub preference: Option<Preference>,
    /// Share of the parsed samples (both orders) preferring A; `None` when none parsed.
    pub p_a: Option<f64>,
    /// Each sample's verdict, read back to the input's order (first order's samples
    /// first); `None` for a sample with no verdict.
    pub samples: Vec<Option<Preference>>,
    /// With `swap`: whether both orders gave the same verdict; `None` without.
    pub position_consistent: Option<bool>,
}

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
    /// Pairwise: `response_a` and `response_b` (written instead of `response`).
    pub pair: Option<(String, String)>,
}

/// The judgement of one item; serializes to its output line (see [`to_line`](Self::to_line)).
///
/// Exactly one of the verdict (`score`, or `pairwise.preference`) and `error` is set.
/// Output fields, in order: `id`, `score`, `reward`, `length_penalty`, then pairwise
/// `preference`, `p_a`, `position_consistent` (with `swap`), then `samples`,
/// `aggregate`, `stdev` (with votes; pairwise: `samples`), then `response_tokens`, `raw`,
/// `route`, `model`, `attempts`, `reasks`, `length_reasks`, `tokens` (`{prompt,
/// completion}`), `cost`, `cached`, `latency_ms`, `error` and `sample_errors` (only
/// when set), then `prompt`/`response`/`reference` (only with `keep_inputs`), then the
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
    /// Re-asks made with twice `max_tokens` after an answer cut by `finish_reason:
    /// length` before a verdict (0 for a cache hit).
    pub length_reasks: u32,
    /// `samples > 1`: each sample's score and how they were combined.
    pub votes: Option<Votes>,
    /// Pairwise: the preference (then `score`, `reward` and `length_penalty` are `None`).
    pub pairwise: Option<PairVerdict>,
    /// The distinct errors of samples that failed (`samples > 1` or `swap`), in order.
    pub sample_errors: Vec<String>,
    /// Milliseconds the item's judge calls took, summed over its samples (not written;
    /// the run's efficiency is computed from it).
    pub busy_ms: u64,
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
const RESERVED: [&str; 28] = [
    "id",
    "score",
    "reward",
    "length_penalty",
    "preference",
    "p_a",
    "position_consistent",
    "samples",
    "aggregate",
    "stdev",
    "length_reasks",
    "sample_errors",
    "response_a",
    "response_b",
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
    /// Whether a verdict was read: a score, or a pairwise preference.
    pub fn is_scored(&self) -> bool {
        self.score.is_some()
            || self
                .pairwise
                .as_ref()
                .is_some_and(|p| p.preference.is_some())
    }

    /// The kind of the error, for the run summary: `unparsed`, `no_quorum`,
    /// `inconsistent`, `internal`, or the gateway status of a failed call (`429`, …).
    pub fn error_kind(&self) -> Option<&str> {
        let error = self.error.as_deref()?;
        Some(error.split(':').next().unwrap_or(error).trim())
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
        if let Some(p) = &self.pairwise {
            map.serialize_entry("preference", &p.preference)?;
            map.serialize_entry("p_a", &finite(p.p_a))?;
            if let Some(consistent) = p.position_consistent {
                map.serialize_entry("position_consistent", &consistent)?;
            }
            map.serialize_entry("samples", &p.samples)?;
        }
        if let Some(v) = &self.votes {
            let samples: Vec<Option<f64>> = v.samples.iter().map(|s| finite(*s)).collect();
            map.serialize_entry("samples", &samples)?;
            map.serialize_entry("aggregate", v.aggregate.name())?;
            map.serialize_entry("stdev", &finite(v.stdev))?;
        }
        map.serialize_entry("response_tokens", &self.response_tokens)?;
        map.serialize_entry("raw", &self.raw)?;
        map.serialize_entry("route", &self.route)?;
        map.serialize_entry("model", &self.model)?;
        map.serialize_entry("attempts", &self.attempts)?;
        map.serialize_entry("reasks", &self.reasks)?;
        map.serialize_entry("length_reasks", &self.length_reasks)?;
        map.serialize_entry("tokens", &self.tokens)?;
        map.serialize_entry("cost", &finite(Some(self.cost)).unwrap_or(0.0))?;
        map.serialize_entry("cached", &self.cached)?;
        map.serialize_entry("latency_ms", &self.latency_ms)?;
        if let Some(error) = &self.error {
            map.serialize_entry("error", error)?;
        }
        if !self.sample_errors.is_empty() {
            map.serialize_entry("sample_errors", &self.sample_errors)?;
        }
        if let Some(inputs) = &self.inputs {
            map.serialize_entry("prompt", &inputs.prompt)?;
            match &inputs.pair {
                Some((a, b)) => {
                    map.serialize_entry("response_a", a)?;
                    map.serialize_entry("response_b", b)?;
                }
                None => map.serialize_entry("response", &inputs.response)?,
            }
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
            length_reasks: 0,
            votes: None,
            pairwise: None,
            sample_errors: Vec::new(),
            busy_ms: 0,
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
                "attempts": 3, "reasks": 2, "length_reasks": 0, "tokens": {"prompt": 10, "completion": 2},
                "cost": 0.5, "cached": false, "latency_ms": 7, "error": "unparsed",
                "split": "train"
            })
        );
        assert!(j.to_line().starts_with("{\"id\":3,\"score\":null,"));
    }
}
